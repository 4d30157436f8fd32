"""Delivery mode `relay` on a single Redis (the mode forced by
TOKENCHAT_DELIVERY=relay): a tip's room event goes through the {eco}
delivery stream and the relay (server/economy/relay.py), and still is
charged once, delivered once to every member and in history once."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
from redis.asyncio import Redis

from tests.conftest import Http, Running, eventually
from tests.server.test_economy import room_with_fan
from tokenchat.client_demo.client import Client
from tokenchat.server.economy.relay import GROUP, Relay
from tokenchat.server.keys import Keys


@pytest.fixture
async def relayed(start_server: Any) -> Running:
    running: Running = await start_server(delivery="relay")
    assert running.node.economy.delivery == "relay"
    return running


async def room_events(client: Client, count: int, timeout_s: float = 5.0) -> list[dict[str, Any]]:
    """The next ``count`` message/tip/goal events the client gets."""
    got: list[dict[str, Any]] = []
    while len(got) < count:
        event = await client.next_event(timeout_s=timeout_s)
        if event["type"] in ("message", "tip", "goal"):
            got.append(dict(event))
    return got


async def no_more_room_events(client: Client, wait_s: float = 0.5) -> None:
    with pytest.raises(TimeoutError):
        while True:
            event = await client.next_event(timeout_s=wait_s)
            assert event["type"] not in ("message", "tip", "goal"), event


async def tips_in_history(redis: Redis, keys: Keys, room: str) -> list[dict[str, Any]]:
    rows: Any = await redis.xrange(keys.room_history(room))
    events = [orjson.loads(fields[b"e"]) for _, fields in rows]
    return [event for event in events if event["type"] == "tip"]


async def test_auto_is_script_on_a_single_redis(server: Running) -> None:
    assert server.node.settings.delivery == "auto"
    assert server.node.economy.delivery == "script"


async def test_a_relayed_tip_is_charged_once_seen_once_and_in_history_once(
    relayed: Running, redis: Redis
) -> None:
    http = Http(relayed)
    keys = relayed.node.keys
    model, fan = await room_with_fan(relayed, http, 100)
    watcher = await relayed.client("carol")
    await watcher.call("join", room="alice")
    reply = await fan.call("tip", room="alice", amount=30, key="tip-1", text="great")
    # Acknowledged before the relay delivered it: no offset (docs/protocol.md).
    assert reply["balance"] == 70 and reply["tx"] and "offset" not in reply
    for member in (model, fan, watcher):
        (tip,) = await room_events(member, 1)
        assert tip["type"] == "tip" and tip["from"] == "bob" and tip["amount"] == 30
        assert tip["offset"]
    # An idempotent retry: the original reply, nothing charged or delivered again.
    again = await fan.call("tip", room="alice", amount=30, key="tip-1", text="great")
    assert again == {**reply, "re": again["re"], "duplicate": True}
    for member in (model, fan, watcher):
        await no_more_room_events(member)
    assert len(await tips_in_history(redis, keys, "alice")) == 1
    assert await redis.xlen(keys.deliveries()) == 0  # delivered, acknowledged, deleted
    assert (await model.call("balance"))["balance"] == 30
    joined = await (await relayed.client("dave")).call("join", room="alice")
    assert [e["type"] for e in joined["history"] if e["type"] == "tip"] == ["tip"]
    assert (await http.reconcile())["ok"]
    for client in (model, fan, watcher):
        await client.close()


async def test_a_dead_relays_entry_is_redelivered_and_seen_once(
    relayed: Running, redis: Redis
) -> None:
    """Two ways a relay dies: after reading an entry (claimed, nothing
    delivered), and after delivering it but before its XACK. Another relay
    claims both; members see each tip once, history holds each once."""
    http = Http(relayed)
    node = relayed.node
    keys = node.keys
    model, fan = await room_with_fan(relayed, http, 100)
    # Stop the node's own relay: the "dead" ones below do the work.
    (task,) = [t for t in node._loops if t.get_name() == "delivery-relay"]
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await node.relay.close()

    await fan.call("tip", room="alice", amount=10, key="a", text="one")
    await fan.call("tip", room="alice", amount=20, key="b", text="two")
    stream = keys.deliveries()
    await eventually(lambda: _xlen_is(redis, stream, 2))
    settings = node.settings.replace(relay_claim_idle_s=0.2, relay_dedupe_s=60)
    # Relay "read-only": reads the first entry and dies.
    dead_reader = Relay(settings, consumer="dead-reader")
    await dead_reader._ensure_group()
    rows = await dead_reader._read(start=">", block=False)
    assert len(rows) == 2
    # Relay "delivered, no ack": delivers the second, dies before its XACK.
    dead_deliverer = Relay(settings, consumer="dead-deliverer")
    await dead_deliverer._redis.xclaim(stream, GROUP, "dead-deliverer", 0, [rows[1][0]])
    assert await dead_deliverer._deliver_rows([rows[1]]) == [rows[1][0]]
    for member in (model, fan):
        (tip,) = await room_events(member, 1)
        assert tip["amount"] == 20
    pending: Any = await redis.xpending(stream, GROUP)
    assert pending["pending"] == 2
    await dead_reader.close()
    await dead_deliverer.close()

    survivor = Relay(settings, consumer="survivor")
    try:
        await asyncio.sleep(0.3)  # both entries idle past the claim time
        assert await survivor.step(block=False) == 2
    finally:
        await survivor.close()
    for member in (model, fan):
        (tip,) = await room_events(member, 1)
        assert tip["amount"] == 10
        await no_more_room_events(member)
    assert sorted(t["amount"] for t in await tips_in_history(redis, keys, "alice")) == [10, 20]
    assert await redis.xlen(stream) == 0
    assert (await http.reconcile())["ok"]
    for client in (model, fan):
        await client.close()


async def _xlen_is(redis: Redis, stream: str, length: int) -> bool:
    return int(await redis.xlen(stream)) == length


async def test_a_relayed_tip_is_refunded(relayed: Running, redis: Redis) -> None:
    http = Http(relayed)
    model, fan = await room_with_fan(relayed, http, 100)
    reply = await fan.call("tip", room="alice", amount=40, key="tip", text="")
    await room_events(model, 1)
    status, refund = await http.call(
        "POST", "/v1/admin/refunds", "ops", "admin", tx=reply["tx"], key="refund-1"
    )
    assert status == 200, refund
    assert (await fan.call("balance"))["balance"] == 100
    assert (await model.call("balance"))["balance"] == 0
    assert (await http.reconcile())["ok"]
    for client in (model, fan):
        await client.close()
