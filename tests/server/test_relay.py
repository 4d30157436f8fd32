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
from tokenchat.server.economy.actions import ACTIONS
from tokenchat.server.economy.relay import GROUP, Relay, deliveries_state
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


async def _stop_relay(node: Any) -> None:
    """Stop a node's own relay (a test's relays then do the work)."""
    (task,) = [t for t in node._loops if t.get_name() == "delivery-relay"]
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def tips_in_history(redis: Redis, keys: Keys, room: str) -> list[dict[str, Any]]:
    rows: Any = await redis.xrange(keys.room_history(room))
    events = [orjson.loads(fields[b"e"]) for _, fields in rows]
    return [event for event in events if event["type"] == "tip"]


def test_one_declaration_two_modes() -> None:
    """The relay variant of a script is the same source with money_lib's
    RELAY set: no copy of tip.lua; actions whose delivery stays in the
    money slot run one script in both modes."""
    assert {action.name for action in ACTIONS if action.relayed} == {"tip", "tip_item", "ticket"}
    for action in ACTIONS:
        script, relay = action.script_for("script"), action.script_for("relay")
        if not action.relayed:
            assert relay is not script and relay.source == script.source
            continue
        assert script.source.startswith("local RELAY = false\n")
        assert relay.source == script.source.replace("local RELAY = false", "local RELAY = true", 1)


async def test_auto_is_script_on_a_single_redis(server: Running) -> None:
    assert server.node.settings.delivery == "auto"
    assert server.node.economy.delivery == "script"


@pytest.mark.cluster
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
        assert tip["offset"] and tip["tx"] == reply["tx"]  # a seen-set's key
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
    start_server: Any, redis: Redis
) -> None:
    """Two ways a relay dies: after reading an entry (claimed, nothing
    delivered), and after delivering it but before its XACK. Another relay
    claims both; members see each tip once, history holds each once. Until
    then /readyz and reconcile say the relay is behind."""
    relayed: Running = await start_server(delivery="relay", relay_lag_max_s=0.2)
    http = Http(relayed)
    node = relayed.node
    keys = node.keys
    model, fan = await room_with_fan(relayed, http, 100)
    # Stop the node's own relay: the "dead" ones below do the work.
    await _stop_relay(node)

    await fan.call("tip", room="alice", amount=10, key="a", text="one")
    await fan.call("tip", room="alice", amount=20, key="b", text="two")
    stream = keys.deliveries()
    await eventually(lambda: _xlen_is(redis, stream, 2))
    await asyncio.sleep(0.3)
    status, ready = await http.call("GET", "/readyz")
    assert status == 200 and ready["relay_behind"] is True
    state = await deliveries_state(redis, keys, 60.0)
    assert state["pending"] == 2 and not state["behind"], state
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
    reconciled = await http.reconcile()
    assert reconciled["ok"] and reconciled["deliveries"]["pending"] == 0
    for client in (model, fan):
        await client.close()


async def _xlen_is(redis: Redis, stream: str, length: int) -> bool:
    return int(await redis.xlen(stream)) == length


@pytest.mark.cluster
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


@pytest.mark.cluster
async def test_a_relayed_tip_that_reaches_a_goal_delivers_both_events_in_order(
    relayed: Running, redis: Redis
) -> None:
    http = Http(relayed)
    model, fan = await room_with_fan(relayed, http, 100)
    status, reply = await http.call(
        "PUT", "/v1/me/goal", "alice", "model", title="New toy", target=50
    )
    assert status == 200, reply
    tipped = await fan.call("tip", room="alice", amount=60, key="g", text="")
    assert tipped["goal"]["state"] == "reached" and "offset" not in tipped
    (announced,) = await room_events(model, 1)  # the goal set, before the tip
    assert announced["type"] == "goal" and announced["goal"]["progress"] == 0
    tip, goal = await room_events(model, 2)
    assert tip["type"] == "tip" and goal["type"] == "goal"
    assert goal["goal"]["progress"] == 60 and tip["offset"] < goal["offset"]
    assert (await http.reconcile())["ok"]
    for client in (model, fan):
        await client.close()


@pytest.mark.cluster
async def test_ticket_shows_in_relay_mode_check_the_mirror_and_let_late_holders_chat(
    relayed: Running, redis: Redis
) -> None:
    """Tips check the show marker's {eco} mirror; a ticket sold during the
    show reaches the room's marker too, so its holder may chat."""
    from tests.server.test_shows import members, no_event, schedule, show_event

    keys = relayed.node.keys
    model, bob, carol = await members(relayed)
    show = await schedule(relayed, price=10, min_s=3600)
    await bob.call("buy_ticket", room="alice", show=show, key="k")
    await model.call("show_start", show=show)
    await show_event(carol, "running")
    mirror: Any = await redis.hgetall(keys.room_show_mirror("alice"))
    marker: Any = await redis.hgetall(keys.room_show("alice"))
    assert mirror == marker and mirror[b"id"] == show.encode()
    refused = await carol.request("tip", room="alice", amount=5, key="t1")
    assert refused["code"] == "FORBIDDEN"
    refused = await carol.request("say", room="alice", text="let me in")
    assert refused["code"] == "FORBIDDEN"
    tipped = await bob.call("tip", room="alice", amount=5, key="t1")
    assert "offset" not in tipped
    event = await model.next_event("tip")
    assert event["in_show"] == show and event["from"] == "bob"
    await no_event(carol)
    # Carol buys during the show: the mirror at once, the room's marker after.
    await carol.call("buy_ticket", room="alice", show=show, key="k")
    assert await redis.hget(keys.room_show("alice"), "u:carol") == b"1"
    await carol.call("say", room="alice", text="in")
    await carol.call("tip", room="alice", amount=5, key="t2")
    await model.call("show_end", show=show)
    await show_event(bob, "ended")
    assert not await redis.exists(keys.room_show_mirror("alice"), keys.room_show("alice"))
    assert (await Http(relayed).reconcile())["ok"]
    for client in (model, bob, carol):
        await client.close()


async def test_relay_mode_calls_touch_one_slot_each(
    relayed: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What makes relay mode run on Redis Cluster: every key of a relayed
    action's call is in the money slot, and every key of the relay's room
    script in the room's (CRC16 of the hash tag, as the cluster routes)."""
    from redis.crc import key_slot

    economy = relayed.node.economy
    calls: list[list[Any]] = []
    real_call = economy._call

    async def recorded(script: Any, keys: list[Any], args: list[Any]) -> list[Any]:
        calls.append([str(key) for key in keys])
        return await real_call(script, keys, args)

    monkeypatch.setattr(economy, "_call", recorded)
    http = Http(relayed)
    model, fan = await room_with_fan(relayed, http, 100)
    status, reply = await http.call(
        "PUT", "/v1/me/menu", "alice", "model", items=[{"label": "Dance", "price": 7}]
    )
    assert status == 200, reply
    await fan.call("tip", room="alice", amount=5, key="plain")
    await fan.call("tip", room="alice", item=reply["items"][0]["id"], key="item")
    money_slot = key_slot(relayed.node.keys.balance("u:bob").encode())
    assert calls and all(key_slot(key.encode()) == money_slot for keys in calls for key in keys)
    names = relayed.node.keys
    room_keys = [
        names.relayed("alice", "t_x"),
        names.room_history("alice"),
        names.room_channel("alice"),
    ]
    assert len({key_slot(key.encode()) for key in room_keys}) == 1
    for client in (model, fan):
        await client.close()


async def test_a_full_delivery_stream_refuses_tips_and_charges_nothing(
    start_server: Any, redis: Redis
) -> None:
    """The delivery stream is bounded like the outbox: with no relay
    draining it, a relayed tip past TOKENCHAT_OUTBOX_ENTRIES_MAX entries is
    UNAVAILABLE and moves nothing; once a relay runs, tips go through."""
    relayed: Running = await start_server(delivery="relay", outbox_entries_max=2)
    http = Http(relayed)
    node = relayed.node
    model, fan = await room_with_fan(relayed, http, 100)
    await _stop_relay(node)
    # The ledger writer keeps the outbox short; the delivery stream fills.
    await fan.call("tip", room="alice", amount=1, key="a")
    await fan.call("tip", room="alice", amount=1, key="b")
    refused = await fan.request("tip", room="alice", amount=1, key="c")
    assert refused["code"] == "UNAVAILABLE" and "nothing was charged" in refused["message"]
    assert (await fan.call("balance"))["balance"] == 98
    survivor = Relay(node.settings, consumer="survivor")
    try:
        assert await survivor.drain(10.0) == 0
        await fan.call("tip", room="alice", amount=1, key="c")
        assert await survivor.drain(10.0) == 0
    finally:
        await survivor.close()
    amounts = [e["amount"] for e in await room_events(model, 3)]
    assert amounts == [1, 1, 1]
    assert (await http.reconcile())["ok"]
    for client in (model, fan):
        await client.close()


async def test_a_malformed_delivery_entry_is_dropped_not_stuck(
    relayed: Running, redis: Redis
) -> None:
    """An entry no money script wrote (a field missing, a channel of no
    room) cannot be delivered by any relay: it is dropped with an error
    instead of holding the stream; the next tip goes through."""
    http = Http(relayed)
    keys = relayed.node.keys
    model, fan = await room_with_fan(relayed, http, 100)
    await redis.xadd(keys.deliveries(), {"tx": "t_bad", "events": "{}"})
    await redis.xadd(keys.deliveries(), {"tx": "t_bad2", "channel": "nowhere", "events": "{}"})
    await fan.call("tip", room="alice", amount=3, key="after")
    (tip,) = await room_events(model, 1)
    assert tip["amount"] == 3
    await eventually(lambda: _xlen_is(redis, keys.deliveries(), 0))
    for client in (model, fan):
        await client.close()


async def test_a_failed_pass_reads_its_own_entries_again_at_once(
    relayed: Running, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis failing between a relay's read and its room scripts leaves the
    batch pending for that relay alone: its next pass delivers it, without
    waiting relay_claim_idle_s for a claim (a minute here)."""
    http = Http(relayed)
    node = relayed.node
    model, fan = await room_with_fan(relayed, http, 100)
    await _stop_relay(node)
    await fan.call("tip", room="alice", amount=10, key="a")
    settings = node.settings.replace(relay_claim_idle_s=60.0, relay_dedupe_s=600.0)
    relay = Relay(settings, consumer="flaky")
    real_deliver = relay._deliver_rows
    failures = [ConnectionError("Redis went away mid-pass")]

    async def fails_once(rows: list[Any]) -> list[bytes]:
        if failures:
            raise failures.pop()
        return await real_deliver(rows)

    monkeypatch.setattr(relay, "_deliver_rows", fails_once)
    try:
        with pytest.raises(ConnectionError):
            await relay.step(block=False)
        assert await relay.step(block=False) == 1
    finally:
        await relay.close()
    (tip,) = await room_events(model, 1)
    assert tip["amount"] == 10
    assert await redis.xlen(node.keys.deliveries()) == 0
    for client in (model, fan):
        await client.close()


async def test_a_show_ending_during_a_marker_copy_leaves_no_marker(
    relayed: Running, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Relay mode copies the marker's mirror onto the room in two calls (a
    read, then show_marker.lua). A show that ends between them (the sweep's
    restore_markers racing show_end) must not leave its room's marker set,
    which would keep the room's chat to the ended show's holders."""
    from tests.server.test_shows import members, schedule, show_event

    keys = relayed.node.keys
    shows = relayed.node.shows
    model, bob, carol = await members(relayed)
    show = await schedule(relayed, price=10, min_s=3600)
    await model.call("show_start", show=show)
    await show_event(carol, "running")
    real_marker = shows._marker_script
    ended_between = [True]

    async def end_between(keys: list[str], args: list[Any]) -> Any:
        if ended_between and args[0] == "running":
            ended_between.pop()
            # What an end does meanwhile: the mirror, then its own copy.
            await redis.delete(relayed.node.keys.room_show_mirror("alice"))
            await real_marker(keys=keys, args=["ended", show])
        return await real_marker(keys=keys, args=args)

    monkeypatch.setattr(shows, "_marker_script", end_between)
    await shows._copy_marker("alice", show, "running")
    assert not ended_between
    assert not await redis.exists(keys.room_show("alice"))
    for client in (model, bob, carol):
        await client.close()


async def test_an_entry_its_room_refuses_is_retried_with_backoff_not_in_a_spin(
    relayed: Running, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A room script that answers an error (here WRONGTYPE: the room's
    history key is not a stream) leaves its entry pending and unmarked (a
    script is not rolled back: a dedupe key set before the failed XADD
    would make the retry a DUP, and the event lost). The relay reads it
    again after a growing delay, not in a spin, and delivers it once the
    room can take it."""
    # A prefix of its own: no other relay (the node's) may take the entry.
    settings = relayed.node.settings
    settings = settings.replace(redis_prefix=settings.redis_prefix + "backoff:")
    keys = Keys(settings.redis_prefix)
    history = keys.room_history("broken")
    await redis.set(history, "not a stream")
    await redis.xadd(
        keys.deliveries(),
        {"tx": "t_poison", "channel": keys.room_channel("broken"), "events": '{"type":"tip"}'},
    )
    relay = Relay(settings, consumer="backoff")
    passes = 0
    real_deliver = relay._deliver_rows

    async def counted(rows: list[Any]) -> list[bytes]:
        nonlocal passes
        passes += 1
        return await real_deliver(rows)

    monkeypatch.setattr(relay, "_deliver_rows", counted)
    try:
        task = asyncio.create_task(relay.run())
        await asyncio.sleep(1.5)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        # 50 ms doubling to 2 s: about 6 passes in 1.5 s; a spin makes hundreds.
        assert 2 <= passes <= 20, passes
        assert await redis.xlen(keys.deliveries()) == 1  # still pending, not lost
        await redis.delete(history)
        assert await relay.step(block=False) == 1
        assert await redis.xlen(keys.deliveries()) == 0
        assert await redis.xlen(history) == 1
    finally:
        await relay.close()
        await redis.delete(history, keys.deliveries(), keys.relayed("broken", "t_poison"))


async def test_an_entry_refused_again_and_again_is_parked_and_the_others_go_on(
    relayed: Running, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An entry its room keeps refusing is parked after RELAY_ATTEMPTS_MAX
    refusals in a row, so the entries behind it (another room's) are
    delivered; reconcile says `parked` and is not ok; once the room takes it
    again the parked entry is delivered by the slow retry, once."""
    from tokenchat.server.economy import relay as relay_module

    monkeypatch.setattr(relay_module, "RELAY_ATTEMPTS_MAX", 3)
    settings = relayed.node.settings
    settings = settings.replace(redis_prefix=settings.redis_prefix + "park:")
    keys = Keys(settings.redis_prefix)
    broken, fine = keys.room_history("broken"), keys.room_history("fine")
    await redis.set(broken, "not a stream")
    for room, tx in (("broken", "t_bad"), ("fine", "t_good")):
        await redis.xadd(
            keys.deliveries(),
            {"tx": tx, "channel": keys.room_channel(room), "events": '{"type":"tip"}'},
        )
    relay = Relay(settings, consumer="parker")
    try:
        for _ in range(3):
            await relay.step(block=False)
        assert await redis.xlen(fine) == 1  # the entry behind it went on
        assert await redis.xlen(keys.deliveries()) == 0
        assert await redis.xlen(keys.deliveries_parked()) == 1
        state = await deliveries_state(redis, keys, 60.0)
        assert state["parked"] == 1 and state["pending"] == 0
        assert await relay.retry_parked() == 0  # the room still refuses it
        await redis.delete(broken)
        assert await relay.retry_parked() == 1
        assert await relay.retry_parked() == 0
        assert await redis.xlen(broken) == 1
        assert await redis.xlen(keys.deliveries_parked()) == 0
        assert (await deliveries_state(redis, keys, 60.0))["parked"] == 0
    finally:
        await relay.close()
        await redis.delete(
            broken,
            fine,
            keys.deliveries(),
            keys.deliveries_parked(),
            keys.relayed("broken", "t_bad"),
            keys.relayed("fine", "t_good"),
        )


async def test_reconcile_is_not_ok_while_a_delivery_is_parked(
    relayed: Running, redis: Redis
) -> None:
    keys = relayed.node.keys
    http = Http(relayed)
    status, before = await http.call("GET", "/v1/admin/reconcile", "ops", "admin")
    assert status == 200 and before["ok"] and before["deliveries"]["parked"] == 0, before
    await redis.xadd(keys.deliveries_parked(), {"tx": "t", "channel": "c", "events": "{}"})
    try:
        status, after = await http.call("GET", "/v1/admin/reconcile", "ops", "admin")
        assert status == 200 and not after["ok"] and after["deliveries"]["parked"] == 1, after
    finally:
        await redis.delete(keys.deliveries_parked())


async def test_scripts_flushed_are_loaded_once_per_batch(
    relayed: Running, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After Redis forgot its scripts (a restart), a batch answering NOSCRIPT
    loads relay_deliver.lua once, not once per entry, and the next pass
    delivers every entry."""
    settings = relayed.node.settings
    settings = settings.replace(redis_prefix=settings.redis_prefix + "noscript:")
    keys = Keys(settings.redis_prefix)
    channel = keys.room_channel("r")
    for tx in ("t_1", "t_2", "t_3"):
        await redis.xadd(keys.deliveries(), {"tx": tx, "channel": channel, "events": '{"a":1}'})
    relay = Relay(settings, consumer="noscript")
    loads = 0
    real_load = relay._redis.script_load

    async def counted(script: str) -> Any:
        nonlocal loads
        loads += 1
        return await real_load(script)

    try:
        await relay._ensure_group()
        await redis.script_flush()
        monkeypatch.setattr(relay._redis, "script_load", counted)
        assert await relay.step(block=False) == 3
        assert loads == 1
        assert await relay.step(block=False) == 3
        assert await redis.xlen(keys.deliveries()) == 0
        assert await redis.xlen(keys.room_history("r")) == 3
    finally:
        await relay.close()
        relayed_keys = [keys.relayed("r", tx) for tx in ("t_1", "t_2", "t_3")]
        await redis.delete(keys.deliveries(), keys.room_history("r"), *relayed_keys)


async def test_a_claim_does_not_make_the_relay_forget_its_own_failed_entries(
    relayed: Running, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pass that claims a dead relay's entry, right after a failed pass of
    our own, still leaves our failed entry (younger than the claim time) to
    be read at once by the pass after, not by a claim seconds later."""
    settings = relayed.node.settings
    settings = settings.replace(
        redis_prefix=settings.redis_prefix + "claimown:", relay_claim_idle_s=2.0
    )
    keys = Keys(settings.redis_prefix)
    channel = keys.room_channel("r")
    dead, relay = Relay(settings, consumer="dead"), Relay(settings, consumer="own")
    try:
        await dead._ensure_group()
        await redis.xadd(keys.deliveries(), {"tx": "t_dead", "channel": channel, "events": "{}"})
        assert len(await dead._read(start=">", block=False)) == 1
        await asyncio.sleep(1.2)
        await redis.xadd(keys.deliveries(), {"tx": "t_own", "channel": channel, "events": "{}"})
        real_deliver = relay._deliver_rows
        failures = [ConnectionError("Redis went away mid-pass")]

        async def fails_once(rows: list[Any]) -> list[bytes]:
            if failures:
                raise failures.pop()
            return await real_deliver(rows)

        monkeypatch.setattr(relay, "_deliver_rows", fails_once)
        with pytest.raises(ConnectionError):
            await relay.step(block=False)  # reads t_own, fails
        await asyncio.sleep(1.2)  # t_dead idle 2.4 s, t_own 1.2 s: only t_dead claimed
        assert await relay.step(block=False) == 1
        assert await redis.xlen(keys.deliveries()) == 1
        assert await relay.step(block=False) == 1  # t_own, at once
        assert await redis.xlen(keys.deliveries()) == 0
    finally:
        await dead.close()
        await relay.close()
        relayed_keys = [keys.relayed("r", tx) for tx in ("t_dead", "t_own")]
        await redis.delete(keys.deliveries(), keys.room_history("r"), *relayed_keys)
