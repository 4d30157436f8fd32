"""A small asyncio client for the tokenchat wire protocol.

One connection, commands matched to replies by ``id``, events delivered in
order on an async iterator. Tests, load tests and the demo clients use it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from protocol import JSON_SUBPROTOCOL, Codec, codec_for

# Events held for a caller that is not consuming them; a client that never
# reads its events should not grow without bound either.
EVENT_QUEUE_MAX = 100_000
# How long a command waits for its reply by default.
REPLY_TIMEOUT_S = 10.0


class CommandError(Exception):
    """An ``error`` reply."""

    def __init__(self, reply: dict[str, Any]) -> None:
        super().__init__(f"{reply.get('code')}: {reply.get('message')}")
        self.reply = reply
        self.code: str = reply.get("code", "")


class Client:
    def __init__(self, ws: ClientConnection, codec: Codec) -> None:
        self.ws = ws
        self.codec = codec
        self._ids = itertools.count(1)
        self._waiting: dict[int | str, asyncio.Future[dict[str, Any]]] = {}
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue(EVENT_QUEUE_MAX)
        self.welcome: dict[str, Any] | None = None
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def connect(
        cls, url: str, *, subprotocol: str | None = JSON_SUBPROTOCOL, **kwargs: Any
    ) -> Client:
        protocols = [subprotocol] if subprotocol else None
        ws = await connect(url, subprotocols=protocols, compression=None, **kwargs)  # type: ignore[arg-type]
        return cls(ws, codec_for(ws.subprotocol))

    async def close(self) -> None:
        await self.ws.close()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def send_raw(self, data: str | bytes) -> None:
        await self.ws.send(data)

    async def request(
        self, type_: str, *, timeout_s: float = REPLY_TIMEOUT_S, **fields: Any
    ) -> dict[str, Any]:
        """Send a command and return its reply, ``ok``/``welcome`` or ``error``."""
        command_id = next(self._ids)
        waiter = asyncio.get_running_loop().create_future()
        self._waiting[command_id] = waiter
        try:
            frame = self.codec.encode({"type": type_, "id": command_id, **fields})
            await self.ws.send(frame, text=not self.codec.binary)
            async with asyncio.timeout(timeout_s):
                reply: dict[str, Any] = await waiter
                return reply
        finally:
            self._waiting.pop(command_id, None)

    async def call(self, type_: str, **fields: Any) -> dict[str, Any]:
        """Like ``request`` but raises ``CommandError`` on an error reply."""
        reply = await self.request(type_, **fields)
        if reply["type"] == "error":
            raise CommandError(reply)
        return reply

    async def hello(self, token: str) -> dict[str, Any]:
        self.welcome = await self.call("hello", token=token)
        return self.welcome

    async def next_event(self, type_: str | None = None, timeout_s: float = 5.0) -> dict[str, Any]:
        """The next event (of ``type_``, skipping others)."""
        async with asyncio.timeout(timeout_s):
            while True:
                event = await self.events.get()
                if type_ is None or event["type"] == type_:
                    return event

    async def iter_events(self) -> AsyncIterator[dict[str, Any]]:
        while True:
            yield await self.events.get()

    async def _read(self) -> None:
        try:
            async for data in self.ws:
                message = self.codec.decode(data)
                assert isinstance(message, dict)
                re = message.get("re")
                if re is not None and message["type"] in ("ok", "error", "welcome"):
                    waiter = self._waiting.get(re)
                    if waiter is not None and not waiter.done():
                        waiter.set_result(message)
                        continue
                if message["type"] == "error" and re is None:
                    # An error for a frame that had no readable id.
                    for waiter in self._waiting.values():
                        if not waiter.done():
                            waiter.set_result(message)
                            break
                    else:
                        self.events.put_nowait(message)
                    continue
                self.events.put_nowait(message)
        except ConnectionClosed:
            pass
        finally:
            for waiter in self._waiting.values():
                if not waiter.done():
                    waiter.set_exception(ConnectionError("connection closed"))
