"""Script calls issued in the same event-loop tick go to Redis as one pipeline.

Thousands of sessions spending at once would otherwise cost one round trip
each; gathering what arrives within a tick costs no added latency (the flush
runs as soon as the loop is idle) and turns N round trips into one. Redis
still runs each script atomically and on its own; a pipeline only shares the
network trip.

NOSCRIPT (Redis restarted and forgot its scripts) is answered by loading the
script and running those calls again: a call that got NOSCRIPT did not run.

A batch goes out through ``send_pipeline``, not redis-py's ``Pipeline``: the
commands are packed by hiredis (C) in one buffer and the replies read without
a timeout context each, which py-spy showed at 18 % of the server's time in
the tips benchmark when redis-py packed them in Python. It also decides the
retry itself: redis-py re-sends a whole pipeline after a dropped connection,
which for a script that is not idempotent (``room_event``: a chat message
posted twice) is wrong; here only calls marked ``retry_safe`` are re-sent.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import hiredis
from redis.asyncio import Redis
from redis.exceptions import ConnectionError, NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

Arg = str | bytes | int

# Calls per pipeline at most: bounds the size of one request and reply, and
# how long one batch holds Redis (a few ms at this size).
BATCH_CALLS_MAX = 512


class LuaScript:
    """A script's source and SHA1, run by EVALSHA through a ``ScriptBatcher``.

    ``retry_safe``: running a call twice has the effect of running it once
    (an idempotency key, or a fence), so it may be sent again when the
    connection dropped before its reply came back.
    """

    def __init__(self, name: str, source: str, *, retry_safe: bool) -> None:
        self.name = name
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()
        self.retry_safe = retry_safe


async def send_pipeline(redis: Redis, commands: Sequence[Sequence[Arg]]) -> list[Any]:
    """Send ``commands`` in one write on one pooled connection and read every
    reply: a command's error reply is its item in the list, not raised.

    A dropped connection or timeout raises (``ConnectionError``,
    ``TimeoutError`` or cancellation) after closing the connection, whose
    unread replies would otherwise answer the next caller.
    """
    pool = redis.connection_pool
    connection = await pool.get_connection()  # type: ignore[no-untyped-call]
    try:
        # hiredis's stub types the argument as a 1-tuple; it takes any length.
        packed = [hiredis.pack_command(tuple(command)) for command in commands]  # type: ignore[arg-type]
        await connection.send_packed_command(
            b"".join(packed),
            check_health=False,
        )
        replies: list[Any] = []
        for _ in commands:
            try:
                # No per-reply timeout: the caller bounds the whole batch.
                replies.append(await connection.read_response(timeout=math.inf))
            except ResponseError as exc:
                replies.append(exc)
        return replies
    except BaseException:
        await connection.disconnect(nowait=True)
        raise
    finally:
        await pool.release(connection)


class ScriptBatcher:
    """``on_reset``: awaited before calls are sent again after Redis dropped
    the connection or forgot its scripts (NOSCRIPT), the two signs that it may
    have restarted, perhaps from an older copy of its data; an exception it
    raises fails those calls instead of sending them."""

    def __init__(
        self,
        redis: Redis,
        timeout_s: float,
        on_reset: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._redis = redis
        self._timeout_s = timeout_s
        self._on_reset = on_reset
        self._pending: list[tuple[LuaScript, Sequence[Arg], asyncio.Future[Any]]] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def call(self, script: LuaScript, keys: Sequence[Arg], args: Sequence[Arg]) -> Any:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if not self._pending:
            asyncio.get_running_loop().call_soon(self._flush)
        self._pending.append((script, [script.sha, len(keys), *keys, *args], future))
        return await future

    def _flush(self) -> None:
        while self._pending:
            batch = self._pending[:BATCH_CALLS_MAX]
            del self._pending[:BATCH_CALLS_MAX]
            task = asyncio.create_task(self._execute(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _execute(
        self, batch: list[tuple[LuaScript, Sequence[Arg], asyncio.Future[Any]]], retry: bool = True
    ) -> None:
        try:
            try:
                async with asyncio.timeout(self._timeout_s):
                    results = await send_pipeline(self._redis, _commands(batch))
            except TimeoutError:  # Redis stalled, not gone: sending again would not help
                raise
            except (ConnectionError, RedisTimeoutError, OSError) as exc:
                # A pooled connection Redis had closed (it restarted, say):
                # once more on a new one, with the calls that may run twice.
                for script, _, future in batch:
                    if not script.retry_safe and not future.done():
                        future.set_exception(exc)
                batch = [item for item in batch if item[0].retry_safe]
                if batch and self._on_reset is not None:
                    await self._on_reset()
                async with asyncio.timeout(self._timeout_s):
                    results = await send_pipeline(self._redis, _commands(batch)) if batch else []
        except BaseException as exc:
            for _, _, future in batch:
                if not future.done():
                    future.set_exception(exc if isinstance(exc, Exception) else TimeoutError())
            if not isinstance(exc, Exception):
                raise
            return
        missing = []
        for (script, call, future), result in zip(batch, results, strict=True):
            if future.done():
                continue
            if isinstance(result, NoScriptError) and retry:
                missing.append((script, call, future))
            elif isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)
        if missing:
            try:
                if self._on_reset is not None:
                    await self._on_reset()
                for script in {script.sha: script for script, _, _ in missing}.values():
                    await self._redis.script_load(script.source)
            except Exception as exc:
                for _, _, future in missing:
                    future.set_exception(exc)
                return
            await self._execute(missing, retry=False)


def _commands(batch: list[tuple[LuaScript, Sequence[Arg], asyncio.Future[Any]]]) -> list[list[Arg]]:
    return [["EVALSHA", *call] for _, call, _ in batch]
