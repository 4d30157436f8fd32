"""The product on a Redis Cluster of three primaries (issue #16, part 2).

The shared tests marked ``cluster`` run on it too (tests/conftest.py); these
check what only a cluster has: the local cluster itself, room channels on
their own shard only, nodes sharing rooms across shards, scripts loaded
again on every primary, and a room whose slot moves to another primary.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast

import pytest
from redis.asyncio import Redis, RedisCluster
from redis.crc import key_slot
from redis.exceptions import MaxConnectionsError

from tests.conftest import Http, Running, eventually
from tokenchat.server import redis_client
from tokenchat.server.config import Settings
from tokenchat.server.devstack.cluster import CLUSTER_SLOTS, LocalCluster, slot_ranges
from tokenchat.server.economy.batcher import LuaScript, ScriptBatcher
from tokenchat.server.gateway.broker import RedisBroker
from tokenchat.server.keys import Keys

# On the cluster only, and in `pytest -m cluster`.
pytestmark = pytest.mark.cluster(only=True)


@pytest.fixture
async def http(server: Running) -> Http:
    return Http(server)


@pytest.fixture
async def primaries(redis: Redis) -> AsyncIterator[list[Redis]]:
    """A plain client of each primary, to ask it what it alone holds."""
    cluster = cast(RedisCluster, redis)
    await cluster.initialize()
    clients = [Redis(host=node.host, port=int(node.port)) for node in cluster.get_primaries()]
    yield clients
    for client in clients:
        await client.aclose()


def rooms_on_distinct_shards(keys: Keys, count: int) -> list[str]:
    """Room ids whose channels hash to ``count`` different thirds of the slots."""
    ranges = slot_ranges(3)
    found: dict[int, str] = {}
    n = 0
    while len(found) < count:
        room = f"model{n}"
        slot = key_slot(keys.room_channel(room).encode())
        third = next(i for i, (lo, hi) in enumerate(ranges) if lo <= slot <= hi)
        found.setdefault(third, room)
        n += 1
    return list(found.values())


def test_the_local_cluster_has_three_primaries_over_every_slot() -> None:
    import redis

    with LocalCluster() as cluster:
        client = redis.RedisCluster.from_url(cluster.url)
        try:
            assert len(client.get_primaries()) == 3
            info = client.cluster_info()
            assert info["cluster_state"] == "ok"
            assert int(info["cluster_slots_ok"]) == CLUSTER_SLOTS
        finally:
            client.close()
    assert cluster.nodes == []  # stopped


async def test_a_rooms_channel_is_subscribed_on_its_shard_only(
    server: Running, primaries: list[Redis]
) -> None:
    keys = server.node.keys
    rooms = rooms_on_distinct_shards(keys, 3)
    clients = []
    for room in rooms:
        model = await server.client(room, "model")
        await model.call("join", room=room)
        clients.append(model)
    for room, model in zip(rooms, clients, strict=True):
        channel = keys.room_channel(room)
        counts = []
        for primary in primaries:
            ((_, subscribers),) = await primary.pubsub_shardnumsub(channel)
            counts.append(subscribers)
        # One subscription (this node's), on the primary owning the slot.
        assert sorted(counts) == [0, 0, 1], (room, counts)
        said = await model.call("say", room=room, text="here")
        assert (await model.next_event("message"))["offset"] == said["offset"]
    for model in clients:
        await model.close()


async def test_two_nodes_share_rooms_on_every_shard_in_one_order(
    start_server: Callable[..., Awaitable[Running]],
) -> None:
    first, second = await start_server(), await start_server()
    rooms = rooms_on_distinct_shards(first.node.keys, 3)
    for room in rooms:
        model = await first.client(room, "model")
        fan = await second.client("fan")
        for client in (model, fan):
            await client.call("join", room=room)
        said = [
            await (model if i % 2 else fan).call("say", room=room, text=f"line {i}")
            for i in range(6)
        ]
        for client in (model, fan):
            seen = [(await client.next_event("message"))["offset"] for _ in said]
            assert seen == [reply["offset"] for reply in said]
        for client in (model, fan):
            await client.close()


async def test_scripts_load_again_on_every_primary_after_a_flush(
    server: Running, http: Http, primaries: list[Redis]
) -> None:
    model = await server.client("alice", "model")
    await model.call("join", room="alice")
    await http.credit("bob", 10)
    for primary in primaries:
        await primary.script_flush()
    fan = await server.client("bob")
    await fan.call("join", room="alice")
    said = await fan.call("say", room="alice", text="after the flush")
    assert (await model.next_event("message"))["offset"] == said["offset"]
    await http.call("PUT", "/v1/me/prices", "alice", "model", dm=2)
    assert (await fan.call("dm", to="alice", text="psst", key="d1"))["balance"] == 8
    assert (await http.reconcile())["ok"] is True
    for client in (model, fan):
        await client.close()


async def _move_slot(cluster: RedisCluster, slot: int, primaries: list[Redis]) -> None:
    """Move ``slot`` with its keys to another primary, as redis-cli --cluster
    reshard does: IMPORTING/MIGRATING, MIGRATE of each key, then NODE."""
    await cluster.nodes_manager.initialize()
    source_node = cluster.nodes_manager.get_node_from_slot(slot)
    target_node = next(n for n in cluster.get_primaries() if n.name != source_node.name)
    source = Redis(host=source_node.host, port=int(source_node.port))
    target = Redis(host=target_node.host, port=int(target_node.port))
    try:
        source_id = _text(await source.execute_command("CLUSTER", "MYID"))
        target_id = _text(await target.execute_command("CLUSTER", "MYID"))
        await target.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
        await source.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
        while names := await source.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100):
            await source.execute_command(
                "MIGRATE", target_node.host, target_node.port, "", 0, 5000, "KEYS", *names
            )
        # The target first, then the source, then the others (each once:
        # Redis ends a slot's sharded subscriptions when it is given the
        # slot again, which the broker survives but this test does not test).
        await target.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
        await source.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
        for primary in primaries:
            if _text(await primary.execute_command("CLUSTER", "MYID")) not in (
                source_id,
                target_id,
            ):
                await primary.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
    finally:
        await source.aclose()
        await target.aclose()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def test_a_room_whose_slot_moves_keeps_its_events(
    server: Running, redis: Redis, primaries: list[Redis]
) -> None:
    keys = server.node.keys
    model = await server.client("alice", "model")
    fan = await server.client("bob")
    for client in (model, fan):
        await client.call("join", room="alice")
    before = await model.call("say", room="alice", text="before")
    assert (await fan.next_event("message"))["offset"] == before["offset"]
    slot = key_slot(keys.room_channel("alice").encode())
    await _move_slot(cast(RedisCluster, redis), slot, primaries)

    # The node hears the shard give the channel up and subscribes on the new
    # one; a line said meanwhile comes from history, once, in order.
    async def subscribed_on_new_owner() -> bool:
        counts = [
            (await primary.pubsub_shardnumsub(keys.room_channel("alice")))[0][1]
            for primary in primaries
        ]
        return sorted(counts) == [0, 0, 1]

    during = await model.call("say", room="alice", text="during")
    await eventually(subscribed_on_new_owner, timeout_s=10.0)
    after = await model.call("say", room="alice", text="after")
    seen = [(await fan.next_event("message", timeout_s=10))["offset"] for _ in range(2)]
    assert seen == [during["offset"], after["offset"]]
    history = await fan.call("join", room="alice", since=before["offset"])
    assert [event["text"] for event in history["history"]] == ["during", "after"]
    await asyncio.sleep(0.2)
    # Seen once: no line again after the gap fill (presence may come, as ever).
    left = [fan.events.get_nowait() for _ in range(fan.events.qsize())]
    assert [event for event in left if event["type"] == "message"] == []
    for client in (model, fan):
        await client.close()


async def test_a_moved_channel_is_held_before_its_new_shard_subscription_and_its_old_link_closes(
    settings: Settings, redis: Redis, primaries: list[Redis]
) -> None:
    cluster = cast(RedisCluster, redis)
    keys = Keys(settings.redis_prefix)
    channel = keys.room_channel("alice")
    # Whether the channel's new SSUBSCRIBE was already sent when the node was
    # told to hold its rooms: if so, a live event could be delivered before
    # the gap fill, and the hub would then drop the missed ones as older.
    sent_before_hold: list[bool] = []

    def on_reconnect() -> None:
        pubsub = broker._channel_links[channel].pubsub
        sent_before_hold.append(
            channel in pubsub.shard_channels or channel.encode() in pubsub.shard_channels
        )

    broker = RedisBroker(
        cluster,
        lambda channel, data: None,
        on_reconnect,
        control_channel=f"{settings.redis_prefix}control",
        timeout_s=5.0,
        sharded=lambda name: keys.channel_room(name) is not None,
    )
    await broker.start()
    try:
        await broker.subscribe(channel)
        old_link = broker._channel_links[channel].name
        await _move_slot(cluster, key_slot(channel.encode()), primaries)

        async def moved() -> bool:
            waiter = broker._confirmations.get(channel)
            return (
                broker._channel_links[channel].name != old_link
                and waiter is not None
                and waiter.done()
            )

        await eventually(moved, timeout_s=10.0)
        assert sent_before_hold == [False]
        # The old shard's link, left without channels, is closed.
        assert old_link not in broker._links
        await broker.subscribe(channel)  # confirmed on the new shard
    finally:
        await broker.close()


# Holds its node for 300 ms (Redis's clock), so that a second batch meanwhile
# finds the node's one connection busy.
HOLD = """
local t = redis.call('TIME')
local start = t[1] * 1000000 + t[2]
repeat t = redis.call('TIME') until t[1] * 1000000 + t[2] - start > 300000
return redis.call('INCR', KEYS[1])
"""


async def test_a_node_whose_connections_are_all_busy_fails_the_batch_without_a_reset(
    settings: Settings,
) -> None:
    redis = redis_client.connect(settings, max_connections=1, socket_timeout_s=5.0)
    resets: list[None] = []

    async def on_reset() -> None:
        resets.append(None)

    batcher = ScriptBatcher(redis, timeout_s=5.0, on_reset=on_reset)
    hold = LuaScript("hold", HOLD, retry_safe=True)
    count = LuaScript("count", "return redis.call('INCR', KEYS[1])", retry_safe=True)
    key = settings.redis_prefix + "busy"
    try:
        for script in (hold, count):
            await redis.script_load(script.source)
        first = asyncio.create_task(batcher.call(hold, [key], []))
        await asyncio.sleep(0.1)
        # The node's one connection is the first batch's: this one fails at
        # once (UNAVAILABLE to a client, docs/deploy.md), and it is no sign
        # that Redis restarted, which would check the ledger before anything
        # is sent again.
        with pytest.raises(MaxConnectionsError):
            await batcher.call(count, [key], [])
        assert await first == 1
        assert resets == []
    finally:
        await redis.aclose()
