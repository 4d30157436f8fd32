"""The WebSocket gateway: the ``websockets`` library's server, run directly.

Each connection gets a ``Session``. The library enforces the frame size limit
(closing with 1009), answers pings and times out dead peers. Compression is
off: permessage-deflate costs tens of KiB of memory per connection and CPU on
every broadcast, and chat frames are small.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Sequence
from http import HTTPStatus
from typing import Any

import orjson
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.http11 import Request, Response
from websockets.typing import Subprotocol

from tokenchat.protocol import SUBPROTOCOLS, CloseCode
from tokenchat.protocol.codec import JSON_SUBPROTOCOL

from .health import HEALTHY, HEALTHZ_PATH, READYZ_PATH, readiness
from .node import Node
from .session import Session

log = logging.getLogger(__name__)

WS_PATH = "/ws"
# Frames queued by the library ahead of the session's command loop. A session
# handles one command at a time; 16 lets a client pipeline a few while TCP
# flow control holds back the rest.
RECEIVE_QUEUE_FRAMES_MAX = 16
# Outgoing bytes above which `send` waits (backpressure on a client's own
# replies); broadcasts never wait and use the hub's 4008 limit instead.
SEND_HIGH_WATER_BYTES = 64 * 1024


def _select_subprotocol(
    connection: ServerConnection, offered: Sequence[Subprotocol]
) -> Subprotocol | None:
    # The contract: no subprotocol offered means JSON.
    if not offered:
        return None
    for name in offered:
        if name in SUBPROTOCOLS:
            return name
    return None


def _json_response(connection: ServerConnection, status: int, body: dict[str, Any]) -> Response:
    response = connection.respond(HTTPStatus(status), orjson.dumps(body).decode())
    del response.headers["Content-Type"]
    response.headers["Content-Type"] = "application/json"
    return response


class Gateway:
    def __init__(self, node: Node, *, sock: socket.socket | None = None) -> None:
        self.node = node
        self._sock = sock
        self._server: Server | None = None

    async def start(self) -> None:
        settings = self.node.settings
        kwargs: dict[str, object] = {}
        if self._sock is not None:
            kwargs["sock"] = self._sock
        else:
            kwargs.update(host=settings.host, port=settings.ws_port)
        self._server = await serve(
            self._handle,
            process_request=self._process_request,
            subprotocols=[Subprotocol(name) for name in SUBPROTOCOLS],
            select_subprotocol=_select_subprotocol,
            compression=None,
            max_size=settings.frame_size_max_bytes,
            max_queue=RECEIVE_QUEUE_FRAMES_MAX,
            write_limit=SEND_HIGH_WATER_BYTES,
            ping_interval=settings.ping_interval_s,
            ping_timeout=settings.ping_timeout_s,
            close_timeout=settings.close_timeout_s,
            **kwargs,  # type: ignore[arg-type]
        )

    @property
    def port(self) -> int:
        assert self._server is not None
        sockname = next(iter(self._server.sockets)).getsockname()
        return int(sockname[1])

    async def _process_request(
        self, connection: ServerConnection, request: Request
    ) -> Response | None:
        """Answer the health probes here as the HTTP port does (one port is
        enough for a load balancer); anything but /ws is not found."""
        path = request.path.split("?", 1)[0]
        if path == HEALTHZ_PATH:
            return _json_response(connection, HTTPStatus.OK, HEALTHY)
        if path == READYZ_PATH:
            status, body = await readiness(self.node)
            return _json_response(connection, status, body)
        if path != WS_PATH:
            return connection.respond(HTTPStatus.NOT_FOUND, f"WebSocket endpoint is {WS_PATH}\n")
        return None

    async def _handle(self, ws: ServerConnection) -> None:
        if ws.subprotocol is None and ws.request is not None:
            offered = ws.request.headers.get_all("Sec-WebSocket-Protocol")
            if offered:
                # Offered only protocols we do not speak: say so and close.
                await ws.close(
                    CloseCode.FORBIDDEN, f"unsupported subprotocol; use {JSON_SUBPROTOCOL}"
                )
                return
        await Session(self.node, ws).run()

    async def shutdown(self) -> None:
        """Stop accepting, let commands in flight finish, close with 1012."""
        if self._server is None:
            return
        self._server.close(close_connections=False)
        for session in list(self.node.sessions):
            session.drain()
        grace_s = self.node.settings.shutdown_grace_s
        try:
            async with asyncio.timeout(grace_s):
                await self._server.wait_closed()
        except TimeoutError:
            log.warning("sessions still open after %.0f s; closing them", grace_s)
            self._server.close(close_connections=True)
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
