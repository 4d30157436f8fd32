"""The script batcher against the real Redis: one pipeline per tick, replies
matched to callers, and which calls are sent again after a dropped connection.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError, ResponseError

from tokenchat.server.config import Settings
from tokenchat.server.economy.batcher import LuaScript, ScriptBatcher

COUNT = "return redis.call('INCRBY', KEYS[1], ARGV[1])"
REFUSE = "return redis.error_reply('NOPE ' .. ARGV[1])"


class Client:
    """A Redis client with a name of its own, so that the test can close its
    connections from the Redis side without touching anybody else's."""

    def __init__(self, settings: Settings) -> None:
        self.name = f"batcher-{uuid.uuid4().hex}"
        self.redis: Redis = Redis.from_url(settings.redis_url, client_name=self.name)
        self._admin: Redis = Redis.from_url(settings.redis_url)

    async def connection_ids(self) -> list[str]:
        return [c["id"] for c in await self._admin.client_list() if c.get("name") == self.name]

    async def kill_connections(self) -> int:
        ids = await self.connection_ids()
        for client_id in ids:
            await self._admin.client_kill_filter(_id=client_id)
        return len(ids)

    async def close(self) -> None:
        await self.redis.aclose()
        await self._admin.aclose()


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[Client]:
    client = Client(settings)
    try:
        yield client
    finally:
        await client.close()


async def test_calls_of_one_tick_share_a_pipeline_and_get_their_own_replies(
    client: Client, settings: Settings
) -> None:
    batcher = ScriptBatcher(client.redis, timeout_s=5)
    count = LuaScript("count", COUNT, retry_safe=True)
    refuse = LuaScript("refuse", REFUSE, retry_safe=True)
    key = settings.redis_prefix + "counter"
    results = await asyncio.gather(
        *(batcher.call(count, [key], [n]) for n in (1, 2, 3)),
        batcher.call(refuse, [], ["x"]),
        batcher.call(count, [key], [10]),
        return_exceptions=True,
    )
    # Each script loaded on first use (NOSCRIPT answered), in call order.
    assert results[:3] == [1, 3, 6]
    assert isinstance(results[3], ResponseError) and "NOPE x" in str(results[3])
    assert results[4] == 16
    # One connection served the whole tick.
    assert len(await client.connection_ids()) == 1


async def test_a_dropped_connection_resends_only_calls_that_may_run_twice(
    client: Client, settings: Settings
) -> None:
    batcher = ScriptBatcher(client.redis, timeout_s=5)
    safe = LuaScript("count", COUNT, retry_safe=True)
    unsafe = LuaScript("count-once", COUNT + " -- posted", retry_safe=False)
    safe_key, unsafe_key = settings.redis_prefix + "safe", settings.redis_prefix + "unsafe"
    assert await batcher.call(safe, [safe_key], [1]) == 1
    assert await batcher.call(unsafe, [unsafe_key], [1]) == 1

    # Redis closes the pooled connection (a restart, an idle timeout): the
    # next batch finds out only when it writes or reads on it.
    assert await client.kill_connections() == 1
    safe_result, unsafe_result = await asyncio.gather(
        batcher.call(safe, [safe_key], [1]),
        batcher.call(unsafe, [unsafe_key], [1]),
        return_exceptions=True,
    )
    assert safe_result == 2, "a retry-safe call goes again on a new connection"
    assert isinstance(unsafe_result, ConnectionError), "the other is answered with the error"
    admin: Redis = Redis.from_url(settings.redis_url)
    try:
        assert int(await admin.get(unsafe_key) or 0) == 1, "and it did not run"
        assert int(await admin.get(safe_key) or 0) == 2, "the safe one ran once more, not twice"
    finally:
        await admin.aclose()
    # The batcher goes on with a healthy connection.
    assert await batcher.call(unsafe, [unsafe_key], [1]) == 2
