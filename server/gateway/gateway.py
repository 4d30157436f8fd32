"""The WebSocket gateway: the ``websockets`` library's server, run directly.

It listens on a port of its own (``ws_port``), or, in one-port mode, takes
over the connections that the HTTP server (uvicorn) finds asking for a
WebSocket upgrade: uvicorn parses the request head, then hands the socket to
a connection of this gateway's ``websockets`` server (``upgrade_protocol``).
From then on the socket is the gateway's alone, so a session writes, and the
hub fans out, through the same ``websockets`` protocol objects either way.

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
from websockets.server import ServerProtocol
from websockets.typing import Subprotocol

from tokenchat.protocol import SUBPROTOCOLS, CloseCode
from tokenchat.protocol.codec import JSON_SUBPROTOCOL

from .health import HEALTHY, HEALTHZ_PATH, READYZ_PATH, readiness
from .node import Node
from .session import Session

log = logging.getLogger(__name__)

WS_PATH = "/ws"
# What a plain GET / on the WebSocket port answers: 200, so a load balancer
# whose health check asks for / (the default of several) sees a live port.
ROOT_PATH = "/"
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


def _forget_handshake_headers(ws: ServerConnection) -> None:
    """Free the opening handshake's headers once the gateway has read them.

    The library keeps the request and the response, headers included, for
    the connection's whole life; nothing here reads them after the
    subprotocol check above. They were ~1.8 KiB traced and ~4 KiB of RSS of
    every idle session (tracemalloc, 2,000 sessions; docs/benchmarks.md, idle
    memory). The request's path and the objects stay, only emptied.
    """
    for message in (ws.request, ws.response):
        if message is not None:
            message.headers.clear()


class _SharedListener:
    """What a ``websockets.Server`` needs of its listener, in one-port mode,
    where the listening socket is the HTTP server's: closing it only stops
    upgrades (they are refused 503 from then on, as by a gateway that stopped
    accepting), while the HTTP API keeps answering, /readyz with 503."""

    def __init__(self, sockets: tuple[socket.socket, ...]) -> None:
        self.sockets = sockets
        self._serving = True

    def close(self) -> None:
        self._serving = False

    def is_serving(self) -> bool:
        return self._serving

    async def wait_closed(self) -> None:
        return None  # the HTTP server closes the socket; nothing to wait for here

    async def start_serving(self) -> None:
        self._serving = True

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return asyncio.get_running_loop()


class Gateway:
    def __init__(self, node: Node, *, sock: socket.socket | None = None) -> None:
        self.node = node
        self._sock = sock
        self._server: Server | None = None

    def _options(self) -> dict[str, Any]:
        settings = self.node.settings
        return {
            "max_queue": RECEIVE_QUEUE_FRAMES_MAX,
            "write_limit": SEND_HIGH_WATER_BYTES,
            "ping_interval": settings.ping_interval_s,
            "ping_timeout": settings.ping_timeout_s,
            "close_timeout": settings.close_timeout_s,
        }

    def _serve(self, **listen: Any) -> Server:
        """The ``websockets`` server; it listens once awaited."""
        return serve(
            self._handle,
            process_request=self._process_request,
            subprotocols=[Subprotocol(name) for name in SUBPROTOCOLS],
            select_subprotocol=_select_subprotocol,
            compression=None,
            max_size=self.node.settings.frame_size_max_bytes,
            **self._options(),
            **listen,
        )

    async def start(self) -> None:
        """Listen on the socket given, or on ``ws_port``."""
        settings = self.node.settings
        if self._sock is not None:
            self._server = await self._serve(sock=self._sock)
        else:
            self._server = await self._serve(host=settings.host, port=settings.ws_port)

    def start_shared(self, sockets: tuple[socket.socket, ...]) -> None:
        """One-port mode: accept only what ``upgrade_protocol`` is handed.

        The ``websockets`` server is built as for a port of its own (the same
        handshake, ``process_request``, limits and shutdown), but never
        listens: its listener is a stand-in for the HTTP server's ``sockets``.
        """
        server = self._serve()  # not awaited: it would open a listener
        server.server = _SharedListener(sockets)  # type: ignore[assignment]
        self._server = server

    def upgrade_protocol(self, **uvicorn_state: Any) -> asyncio.Protocol:
        """A gateway connection for a socket that uvicorn found asking for a
        WebSocket upgrade: uvicorn's ``ws`` protocol class. uvicorn then calls
        ``connection_made`` with its transport and ``data_received`` with the
        request head, and the connection shakes hands as on its own port."""
        server = self._server
        assert server is not None, "start_shared first"
        settings = self.node.settings
        connection: ServerConnection

        def select(protocol: ServerProtocol, offered: Sequence[Subprotocol]) -> Subprotocol | None:
            return _select_subprotocol(connection, offered)

        protocol = ServerProtocol(
            subprotocols=[Subprotocol(name) for name in SUBPROTOCOLS],
            select_subprotocol=select,
            max_size=settings.frame_size_max_bytes,
            logger=server.logger,
        )
        connection = ServerConnection(protocol, server, **self._options())
        return connection

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
        if path == ROOT_PATH and "upgrade" not in request.headers:
            return connection.respond(HTTPStatus.OK, f"tokenchat gateway: WebSocket at {WS_PATH}\n")
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
        _forget_handshake_headers(ws)
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
