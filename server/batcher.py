"""Script calls issued in the same event-loop tick go to Redis as one pipeline.

Thousands of sessions spending at once would otherwise cost one round trip
each; gathering what arrives within a tick costs no added latency (the flush
runs as soon as the loop is idle) and turns N round trips into one. Redis
still runs each script atomically and on its own; a pipeline only shares the
network trip.

NOSCRIPT (Redis restarted and forgot its scripts) is answered by loading the
script and running those calls again: a call that got NOSCRIPT did not run.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import NoScriptError

Arg = str | bytes | int

# Calls per pipeline at most: bounds the size of one request and reply, and
# how long one batch holds Redis (a few ms at this size).
BATCH_CALLS_MAX = 512


class LuaScript:
    """A script's source and SHA1, run by EVALSHA through a ``ScriptBatcher``."""

    def __init__(self, name: str, source: str) -> None:
        self.name = name
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()


class ScriptBatcher:
    def __init__(self, redis: Redis, timeout_s: float) -> None:
        self._redis = redis
        self._timeout_s = timeout_s
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
            async with asyncio.timeout(self._timeout_s):
                async with self._redis.pipeline(transaction=False) as pipe:
                    for _, call, _ in batch:
                        pipe.execute_command("EVALSHA", *call)
                    results = await pipe.execute(raise_on_error=False)
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
                for script in {script.sha: script for script, _, _ in missing}.values():
                    await self._redis.script_load(script.source)
            except Exception as exc:
                for _, _, future in missing:
                    future.set_exception(exc)
                return
            await self._execute(missing, retry=False)
