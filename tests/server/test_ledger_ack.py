"""ledger_ack.lua, the writer's acknowledgement of a committed batch: every
entry of a batch of any size leaves the outbox, and the commits are told."""

from __future__ import annotations

from redis.asyncio import Redis

from tokenchat.server.config import Settings
from tokenchat.server.economy.scripts import script_source

# Past Lua's unpack limit (about 8000 values) in one XACK: a batch this big
# is a valid TOKENCHAT_LEDGER_BATCH_MAX.
ENTRIES = 9000


async def test_a_batch_past_luas_unpack_limit_is_acked_and_deleted_whole(
    settings: Settings, redis: Redis
) -> None:
    outbox, group = settings.redis_prefix + "outbox", "writers"
    channel = settings.redis_prefix + "commits"
    pipe = redis.pipeline(transaction=False)
    for n in range(ENTRIES):
        pipe.xadd(outbox, {"n": n})
    ids = [entry_id.decode() for entry_id in await pipe.execute()]
    await redis.xgroup_create(outbox, group, id="0")
    await redis.xreadgroup(group, "w1", {outbox: ">"}, count=ENTRIES)
    pubsub = redis.pubsub()
    await pubsub.subscribe(channel)
    try:
        ack = redis.register_script(script_source("ledger_ack"))
        deleted = await ack(keys=[outbox], args=[group, channel, b"C-payload", b"", *ids])
        assert deleted == ENTRIES
        assert await redis.xlen(outbox) == 0
        assert (await redis.xpending(outbox, group))["pending"] == 0
        await pubsub.get_message(timeout=1.0)  # the subscription's confirmation
        message = await pubsub.get_message(timeout=1.0)
        assert message is not None and message["data"] == b"C-payload"
    finally:
        await pubsub.aclose()
