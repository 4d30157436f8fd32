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

On a Redis Cluster (server/redis_client.py) a batch is split by the node
owning each call's first key, each part sent to its node at the same time on
one of that node's connections. A call answered MOVED or ASK (the slot moved,
or is moving) did not run: it is sent again where the answer points, after
the client reloads the slot map (MOVED) or behind ASKING (ASK). NOSCRIPT is
answered as above: ``script_load`` of the cluster client loads the script
on every primary.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import hiredis
from redis.asyncio import Redis, RedisCluster
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.connection import Connection
from redis.exceptions import (
    AskError,
    ConnectionError,
    MaxConnectionsError,
    MovedError,
    NoScriptError,
    RedisClusterException,
    ResponseError,
)
from redis.exceptions import TimeoutError as RedisTimeoutError

Arg = str | bytes | int

# Calls per pipeline at most: bounds the size of one request and reply, and
# how long one batch holds Redis (a few ms at this size).
BATCH_CALLS_MAX = 512
# On a cluster, a call answered MOVED or ASK is sent where the answer points
# at most this many times: one redirect is a moved slot, two a slot that
# moved while it was migrating; more means the slot map is in flux, and the
# call fails with the last redirect rather than chase it.
CLUSTER_REDIRECTS_MAX = 3


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
    unread replies would otherwise answer the next caller. On a cluster, a
    dropped connection to one node raises for the whole batch (the batcher
    re-sends its retry-safe calls), as one dropped connection does here.
    """
    if isinstance(redis, RedisCluster):
        return await _send_cluster(redis, commands)
    pool = redis.connection_pool
    connection = await pool.get_connection()  # type: ignore[no-untyped-call]
    try:
        return await _send_on(connection, commands)
    finally:
        await pool.release(connection)


async def _send_on(connection: Connection, commands: Sequence[Sequence[Arg]]) -> list[Any]:
    """``commands`` in one write on ``connection``, and their replies."""
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


async def _send_node(node: ClusterNode, commands: Sequence[Sequence[Arg]]) -> list[Any]:
    connection = node.acquire_connection()
    try:
        return await _send_on(connection, commands)
    finally:
        node.release(connection)


def _first_key_node(redis: RedisCluster, command: Sequence[Arg]) -> ClusterNode:
    """The primary owning an ``EVALSHA sha numkeys key...`` call's first key
    (Redis runs a script where its keys are; the others must share its slot)."""
    if int(command[2]) == 0:
        return redis.get_default_node()
    try:
        return redis.nodes_manager.get_node_from_slot(redis.keyslot(command[3]))
    except RedisClusterException as exc:  # no node serves the slot: the cluster is down
        raise ConnectionError(str(exc)) from exc


async def _send_cluster(redis: RedisCluster, commands: Sequence[Sequence[Arg]]) -> list[Any]:
    await redis.initialize()  # the slot map, loaded on first use
    replies: list[Any] = [None] * len(commands)
    # Per call still to send: its node, and whether it goes behind ASKING.
    todo = {i: (_first_key_node(redis, command), False) for i, command in enumerate(commands)}
    for redirect in range(CLUSTER_REDIRECTS_MAX + 1):
        groups: dict[tuple[str, bool], tuple[ClusterNode, list[int]]] = {}
        for i, (node, asking) in todo.items():
            groups.setdefault((node.name, asking), (node, []))[1].append(i)
        parts = list(groups.items())
        results = await asyncio.gather(
            *(
                _send_node(
                    node,
                    _asking([commands[i] for i in calls])
                    if asking
                    else [commands[i] for i in calls],
                )
                for (_, asking), (node, calls) in parts
            )
        )
        todo = {}
        moved = False
        for ((_, asking), (_, calls)), result in zip(parts, results, strict=True):
            # Behind ASKING, every other reply is ASKING's OK.
            for i, reply in zip(calls, result[1::2] if asking else result, strict=True):
                replies[i] = reply
                if redirect == CLUSTER_REDIRECTS_MAX or not isinstance(reply, AskError):
                    continue
                if isinstance(reply, MovedError):
                    moved = True
                    todo[i] = (_node_at(redis, reply.host, reply.port), False)
                else:  # ASK: this one call, on the importing node
                    todo[i] = (_node_at(redis, reply.host, reply.port), True)
        if not todo:
            break
        if moved:
            # The whole slot map may have changed (a resharding, a failover).
            await redis.nodes_manager.initialize()
    return replies


def _node_at(redis: RedisCluster, host: str, port: int) -> ClusterNode:
    node = redis.get_node(host=host, port=port)
    if node is None:  # a node the client has not met yet
        node = ClusterNode(host, port, **redis.nodes_manager.connection_kwargs)
        redis.nodes_manager.nodes_cache[node.name] = node
    return node


def _asking(commands: list[Sequence[Arg]]) -> list[Sequence[Arg]]:
    """Each command behind ASKING, which lets the importing node run it once."""
    return [part for command in commands for part in (("ASKING",), command)]


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
            except MaxConnectionsError:
                # A cluster node's connections all busy (a ConnectionError to
                # redis-py, but no sign of a restart): fail at once, no reset.
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
