"""Cross-node fan-out: Redis pub/sub, one subscription per channel per node.

A node subscribes to a room's channel only while it has members in that room.
``subscribe()`` returns once Redis has confirmed the subscription, so a caller
that reads history afterwards cannot miss an event between the two: anything
published after the history read arrives on the channel.

Messages are handed to one synchronous callback in the order the pub/sub
connection received them, which for one channel is the order Redis published
them. When the connection drops, the reader reconnects with backoff, redis-py
resubscribes every channel, and ``on_reconnect`` tells the node so it can fill
from history whatever was published while it was away. From then until Redis
confirms a channel's resubscription, ``subscribe()`` of that channel waits for
the confirmation, so the node can read history after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any, Protocol

from redis.asyncio import Redis
from redis.exceptions import RedisError

from ..aio import raise_if_cancelling, reraise_if_cancelled

log = logging.getLogger(__name__)

MessageHandler = Callable[[str, bytes], None]
ReconnectHandler = Callable[[], None]

# Backoff between reconnect attempts while Redis is down: starts small so a
# blip heals fast, capped so a long outage costs one attempt every 2 s.
RECONNECT_DELAY_MIN_S = 0.05
RECONNECT_DELAY_MAX_S = 2.0


class Broker(Protocol):
    async def start(self) -> None: ...
    async def close(self) -> None: ...
    async def subscribe(self, channel: str) -> None: ...
    async def subscribe_many(self, channels: list[str]) -> None: ...
    async def unsubscribe(self, channel: str) -> None: ...


class RedisBroker:
    def __init__(
        self,
        redis: Redis,
        on_message: MessageHandler,
        on_reconnect: ReconnectHandler,
        *,
        control_channel: str,
        timeout_s: float,
    ) -> None:
        self._pubsub = redis.pubsub(ignore_subscribe_messages=False)
        self._on_message = on_message
        self._on_reconnect = on_reconnect
        # Always subscribed to this one, so the reader never idles unsubscribed.
        self._control_channel = control_channel
        self._timeout_s = timeout_s
        self._confirmations: dict[str, asyncio.Future[None]] = {}
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await asyncio.wait_for(self._pubsub.subscribe(self._control_channel), self._timeout_s)
        self._reader = asyncio.create_task(self._read_forever(), name="broker-reader")

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        with contextlib.suppress(RedisError, OSError):
            await self._pubsub.aclose()  # type: ignore[no-untyped-call]

    async def subscribe(self, channel: str) -> None:
        """Subscribe and wait for Redis to confirm it (``RedisError`` on failure)."""
        waiter = self._confirmations.get(channel)
        if waiter is None:
            waiter = asyncio.get_running_loop().create_future()
            self._confirmations[channel] = waiter
            try:
                await asyncio.wait_for(self._pubsub.subscribe(channel), self._timeout_s)
            except (RedisError, OSError, TimeoutError):
                self._confirmations.pop(channel, None)
                raise
        try:
            await asyncio.wait_for(asyncio.shield(waiter), self._timeout_s)
        except TimeoutError:
            self._confirmations.pop(channel, None)
            raise

    async def subscribe_many(self, channels: list[str]) -> None:
        """``subscribe`` for many channels in one SUBSCRIBE command (one round
        trip and one write for a batch of hellos); returns once Redis has
        confirmed every one of them (``RedisError`` or ``TimeoutError`` on failure)."""
        loop = asyncio.get_running_loop()
        new = [channel for channel in dict.fromkeys(channels) if channel not in self._confirmations]
        for channel in new:
            self._confirmations[channel] = loop.create_future()
        if new:
            try:
                await asyncio.wait_for(self._pubsub.subscribe(*new), self._timeout_s)
            except (RedisError, OSError, TimeoutError):
                for channel in new:
                    self._confirmations.pop(channel, None)
                raise
        waiters = [self._confirmations.get(channel) for channel in channels]
        pending = [asyncio.shield(waiter) for waiter in waiters if waiter is not None]
        try:
            await asyncio.wait_for(asyncio.gather(*pending), self._timeout_s)
        except TimeoutError:
            for channel in channels:
                self._confirmations.pop(channel, None)
            raise

    async def unsubscribe(self, channel: str) -> None:
        self._confirmations.pop(channel, None)
        await asyncio.wait_for(self._pubsub.unsubscribe(channel), self._timeout_s)

    async def _read_forever(self) -> None:
        delay_s = RECONNECT_DELAY_MIN_S
        while True:
            raise_if_cancelling()
            try:
                message = await self._pubsub.get_message(timeout=None)
            except (RedisError, OSError) as exc:
                reraise_if_cancelled(exc)
                log.warning("pub/sub connection lost (%s); reconnecting", exc)
                delay_s = await self._reconnect(delay_s)
                continue
            delay_s = RECONNECT_DELAY_MIN_S
            if message is not None:
                self._dispatch(message)

    async def _reconnect(self, delay_s: float) -> float:
        await asyncio.sleep(delay_s)
        try:
            # Reconnecting makes redis-py resubscribe every channel it had.
            await self._pubsub.connect()  # type: ignore[no-untyped-call]
        except (RedisError, OSError):
            return min(delay_s * 2, RECONNECT_DELAY_MAX_S)
        log.info("pub/sub reconnected")
        # A confirmation from the old connection says nothing of the new one:
        # until Redis confirms the resubscription, `subscribe()` waits again.
        loop = asyncio.get_running_loop()
        for channel, waiter in self._confirmations.items():
            if waiter.done():
                self._confirmations[channel] = loop.create_future()
        self._on_reconnect()
        return RECONNECT_DELAY_MIN_S

    def _dispatch(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        channel = message["channel"]
        if isinstance(channel, bytes):
            channel = channel.decode()
        if kind == "message":
            if channel != self._control_channel:
                self._on_message(channel, message["data"])
        elif kind == "subscribe":
            waiter = self._confirmations.get(channel)
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
