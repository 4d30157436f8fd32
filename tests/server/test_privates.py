"""Private shows billed per minute, against real Redis, Postgres and server
processes with second-long settings: the lifecycle on both sides, the
private room, the meter and its exact final charge, the minimum (forfeited by
a fan who ends early, refunded when the model does), zero balance, the low
balance warning, the accept timeout, the disconnect grace, refusals, hostile
input, idempotent retries, a crash between a tick's money and its row, and a
metering node dying (another takes the show over; nothing charged twice)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from tests.conftest import Http, Running, eventually, pg
from tokenchat.client_demo.client import Client
from tokenchat.server.config import Settings
from tokenchat.server.economy.economy import fingerprint
from tokenchat.server.economy.privates import PRIVATE_INITIATOR

Start = Callable[..., Awaitable[Running]]
# Short settings: one-second billing periods, a meter pass every 0.1 s.
QUICK: dict[str, Any] = {
    "private_tick_s": 1,
    "private_meter_interval_s": 0.1,
    "private_lease_ttl_s": 0.5,
    "deadline_sweep_interval_s": 0.1,
    "private_settle_grace_s": 0.5,
}


async def setup(
    server: Running, tokens: int = 100, rate: int = 60, min_s: int = 0
) -> tuple[Client, Client]:
    model = await server.client("alice", "model")
    fan = await server.client("bob")
    status, prices = await Http(server).call(
        "PUT", "/v1/me/prices", "alice", "model", private_rate=rate, private_min_s=min_s
    )
    assert status == 200 and prices == {"private_rate": rate, "private_min_s": min_s}, prices
    if tokens:
        await Http(server).credit("bob", tokens)
        assert (await fan.next_event("balance"))["balance"] == tokens
    return fan, model


async def private_event(
    client: Client, show: str, state: str, check: Callable[[dict[str, Any]], bool] | None = None
) -> dict[str, Any]:
    """The next `private` event of this show in ``state`` (passing ``check``)."""
    while True:
        event = await client.next_event("private", timeout_s=10.0)
        if event["show"] == show and event["state"] == state and (check is None or check(event)):
            return event


async def start_show(fan: Client, model: Client, rate: int = 60, key: str = "k1") -> str:
    reply = await fan.call("private_request", model="alice", rate=rate, key=key)
    show = str(reply["show"])
    assert show.startswith("p_") and reply["state"] == "requested"
    requested = await private_event(model, show, "requested")
    assert requested["fan"] == "bob" and requested["rate"] == rate
    assert requested["expires_ms"] > requested["ts"]
    accepted = await model.call("private_accept", show=show)
    assert accepted == {**accepted, "state": "running", "room": f"p:{show}"}
    for side in (fan, model):
        await private_event(side, show, "running")
    return show


async def balance(client: Client) -> int:
    return int((await client.call("balance"))["balance"])


async def drain(server: Running) -> None:
    assert await server.node.ledger.drain(10.0) == 0


async def account(settings: Settings, account_id: str) -> int:
    rows = await pg(settings, "SELECT balance FROM accounts WHERE id = $1", account_id)
    return int(rows[0]["balance"]) if rows else 0


async def meter_txs(settings: Settings, show: str) -> list[tuple[str, int]]:
    """(idempotency key, tokens to the model) of every meter of the show."""
    rows = await pg(
        settings,
        """SELECT t.idem_key, p.amount FROM ledger_transactions t
           JOIN ledger_postings p ON p.tx_id = t.id
           WHERE t.kind = 'meter' AND t.meta->>'show' = $1 AND p.account_id = 'u:alice'
           ORDER BY t.applied_ms""",
        show,
    )
    return [(row["idem_key"], int(row["amount"])) for row in rows]


async def settled(settings: Settings, show: str) -> dict[str, Any]:
    async def done() -> bool:
        rows = await pg(settings, "SELECT settled_at FROM private_shows WHERE id = $1", show)
        return rows[0]["settled_at"] is not None

    await eventually(done, timeout_s=10.0)
    return dict((await pg(settings, "SELECT * FROM private_shows WHERE id = $1", show))[0])


# --- the lifecycle -----------------------------------------------------------------------


async def test_a_show_runs_in_its_private_room_and_bills_exactly_to_the_second(
    start_server: Start, settings: Settings
) -> None:
    server = await start_server(**QUICK)
    fan, model = await setup(server, min_s=2)
    status, prices = await Http(server).call("GET", "/v1/users/alice/prices")
    assert status == 200 and prices == {"dm": 0, "private_rate": 60, "private_min_s": 2}
    show = await start_show(fan, model)
    # The private room: both members may join and `say` for free.
    for side in (fan, model):
        joined = await side.call("join", room=f"p:{show}")
        assert joined["room"]["owner"] == "alice"
    await fan.call("say", room=f"p:{show}", text="hi")
    said = await model.next_event("message")
    assert (said["room"], said["from"], said["text"]) == (f"p:{show}", "bob", "hi")
    # The meter runs: both sides see the seconds and the tokens grow.
    for side in (fan, model):
        running = await private_event(side, show, "running", lambda e: e["seconds"] >= 3)
        assert running["charged"] == running["seconds"]  # 60 a minute: 1 a second
    ended = await fan.call("private_end", show=show)
    assert ended["state"] == "ended" and ended["reason"] == "fan" and ended["settled"] is True
    seconds = ended["seconds"]
    assert seconds >= 3 and ended["charged"] == seconds
    for side in (fan, model):
        event = await private_event(side, show, "ended", lambda e: e["charged"] == seconds)
        assert event["reason"] == "fan" and event["seconds"] == seconds
    assert await balance(fan) == 100 - seconds and await balance(model) == seconds
    await drain(server)
    assert await account(settings, "u:bob") == 100 - seconds
    assert await account(settings, "u:alice") == seconds
    assert await account(settings, f"esc:private:{show}") == 0
    keys = [key for key, _ in await meter_txs(settings, show)]
    assert len(keys) == len(set(keys))  # no period charged twice
    assert sum(amount for _, amount in await meter_txs(settings, show)) == seconds
    # A retried end is a duplicate; the room is closed to newcomers.
    again = await model.call("private_end", show=show)
    assert again["duplicate"] is True and again["charged"] == seconds
    assert (await Http(server).reconcile())["ok"] is True
    status, listed = await Http(server).call("GET", "/v1/me/privates", "bob")
    assert status == 200 and listed["privates"][0]["state"] == "ended"
    await fan.close()
    await model.close()


async def test_a_fan_who_ends_before_the_minimum_forfeits_it(
    start_server: Start, settings: Settings
) -> None:
    server = await start_server(**QUICK)
    fan, model = await setup(server, min_s=30)
    show = await start_show(fan, model)
    assert await balance(fan) == 70  # the minimum, held in escrow
    ended = await fan.call("private_end", show=show)
    assert ended["charged"] == 30 and ended["seconds"] < 30
    row = await settled(settings, show)
    assert row["charged"] == 30
    assert await balance(fan) == 70 and await balance(model) == 30
    await drain(server)
    kinds = await pg(
        settings,
        """SELECT DISTINCT t.kind FROM ledger_transactions t JOIN ledger_postings p
           ON p.tx_id = t.id WHERE p.account_id = $1 ORDER BY 1""",
        f"esc:private:{show}",
    )
    assert {r["kind"] for r in kinds} <= {"hold", "meter", "release"}
    assert "release" in {r["kind"] for r in kinds}
    assert await account(settings, f"esc:private:{show}") == 0
    assert (await Http(server).reconcile())["ok"] is True
    await fan.close()
    await model.close()


async def test_a_model_who_ends_early_is_paid_the_time_elapsed_only(
    start_server: Start, settings: Settings
) -> None:
    server = await start_server(**QUICK)
    fan, model = await setup(server, min_s=30)
    show = await start_show(fan, model)
    await private_event(model, show, "running", lambda e: e["seconds"] >= 2)
    ended = await model.call("private_end", show=show)
    seconds = ended["seconds"]
    assert ended["reason"] == "model" and 2 <= seconds < 30 and ended["charged"] == seconds
    await settled(settings, show)
    assert await balance(fan) == 100 - seconds and await balance(model) == seconds
    await drain(server)
    assert await account(settings, f"esc:private:{show}") == 0
    assert (await Http(server).reconcile())["ok"] is True
    await fan.close()
    await model.close()


async def test_zero_balance_ends_the_show_at_the_second_it_covers_with_a_warning_first(
    start_server: Start, settings: Settings
) -> None:
    server = await start_server(**QUICK)
    fan, model = await setup(server, tokens=3, rate=60)
    show = await start_show(fan, model)
    warned = await private_event(fan, show, "running", lambda e: "warning" in e)
    assert warned["warning"] == "low_balance" and warned["seconds_left"] < 60
    ended = await private_event(fan, show, "ended", lambda e: e["settled_ms"] is not None)
    assert ended["reason"] == "balance" and ended["seconds"] == 3 and ended["charged"] == 3
    assert await balance(fan) == 0 and await balance(model) == 3
    await drain(server)
    assert (await Http(server).reconcile())["ok"] is True
    await fan.close()
    await model.close()


async def test_a_request_not_answered_in_time_expires_and_decline_charges_nothing(
    start_server: Start, settings: Settings
) -> None:
    server = await start_server(**QUICK, private_accept_timeout_s=0.5)
    fan, model = await setup(server, min_s=10)
    reply = await fan.call("private_request", model="alice", rate=60, key="k1")
    show = reply["show"]
    for side in (fan, model):
        await private_event(side, show, "expired")
    late = await model.request("private_accept", show=show)
    assert late["type"] == "error" and late["code"] == "CONFLICT"
    second = (await fan.call("private_request", model="alice", rate=60, key="k2"))["show"]
    declined = await model.call("private_decline", show=second)
    assert declined["state"] == "declined"
    await private_event(fan, second, "declined")
    third = (await fan.call("private_request", model="alice", rate=60, key="k3"))["show"]
    withdrawn = await fan.call("private_end", show=third)
    assert withdrawn["reason"] == "cancelled" and withdrawn["charged"] == 0
    assert await balance(fan) == 100
    assert await pg(settings, "SELECT * FROM deadlines") == []
    await fan.close()
    await model.close()


# --- refusals, hostile input, retries ------------------------------------------------------


async def test_refusals_move_nothing(start_server: Start, settings: Settings) -> None:
    server = await start_server(**QUICK)
    fan, model = await setup(server, rate=60, min_s=10)
    carol = await server.client("carol")
    await Http(server).credit("carol", 100)

    async def refused(client: Client, type_: str, code: str, **fields: Any) -> None:
        reply = await client.request(type_, **fields)
        assert reply["type"] == "error" and reply["code"] == code, reply

    await refused(fan, "private_request", "PRICE_CHANGED", model="alice", rate=59, key="a")
    await refused(fan, "private_request", "NOT_FOUND", model="nobody", rate=60, key="b")
    await refused(fan, "private_request", "NOT_FOUND", model="carol", rate=60, key="c")
    await refused(model, "private_request", "FORBIDDEN", model="alice", rate=60, key="d")
    # An id of another kind, and one that does not exist, are NOT_FOUND.
    await refused(model, "private_accept", "NOT_FOUND", show="r_" + "ab" * 12)
    await refused(model, "private_accept", "NOT_FOUND", show="p_" + "ab" * 12)
    show = (await fan.call("private_request", model="alice", rate=60, key="k1"))["show"]
    await refused(carol, "private_end", "NOT_FOUND", show=show)
    await refused(fan, "private_accept", "FORBIDDEN", show=show)
    # Not running yet: its room does not exist.
    await refused(fan, "join", "NOT_FOUND", room=f"p:{show}")
    await model.call("private_accept", show=show)
    # One running show per model.
    other = (await carol.call("private_request", model="alice", rate=60, key="k1"))["show"]
    await refused(model, "private_accept", "CONFLICT", show=other)
    # The room is the two members' alone; tips are not taken there.
    await refused(carol, "join", "NOT_FOUND", room=f"p:{show}")
    await refused(carol, "join", "NOT_FOUND", room="p:nothing")
    await fan.call("join", room=f"p:{show}")
    await refused(fan, "tip", "NOT_FOUND", room=f"p:{show}", amount=5, key="t")
    # A rate turned off.
    status, _ = await Http(server).call("PUT", "/v1/me/prices", "alice", "model", private_rate=0)
    assert status == 200
    await refused(carol, "private_request", "FORBIDDEN", model="alice", rate=60, key="k9")
    await fan.call("private_end", show=show)
    await settled(settings, show)
    assert await balance(carol) == 100
    await fan.close()
    await model.close()
    await carol.close()


async def test_hostile_input_is_a_bad_request(start_server: Start) -> None:
    server = await start_server(**QUICK)
    fan, model = await setup(server)
    for fields in (
        {"model": "alice", "rate": 0, "key": "k"},
        {"model": "alice", "rate": -5, "key": "k"},
        {"model": "alice", "rate": True, "key": "k"},
        {"model": "alice", "rate": 10**12, "key": "k"},
        {"model": "alice", "rate": 60, "key": ""},
        {"model": "alice", "rate": 60, "key": "\x00"},
        {"model": "al ice", "rate": 60, "key": "k"},
        {"model": "alice", "rate": "60", "key": "k"},
    ):
        reply = await fan.request("private_request", **fields)
        assert reply["type"] == "error" and reply["code"] == "BAD_REQUEST", (fields, reply)
    for show in ("", "p_" + "x" * 80, "p-../", 5, None):
        reply = await model.request("private_accept", show=show)
        assert reply["type"] == "error" and reply["code"] == "BAD_REQUEST", (show, reply)
    http = Http(server)
    for body in (
        {"private_rate": -1},
        {"private_rate": "60"},
        {"private_min_s": 3601},
        {"private_rate": 10**7},
    ):
        status, reply = await http.call("PUT", "/v1/me/prices", "alice", "model", **body)
        assert status == 400, (body, reply)
    status, _ = await http.call("PUT", "/v1/me/prices", "bob", "fan", private_rate=5)
    assert status == 403
    await fan.close()
    await model.close()


async def test_a_retried_request_is_a_duplicate_and_other_fields_conflict(
    start_server: Start, settings: Settings
) -> None:
    server = await start_server(**QUICK)
    fan, model = await setup(server)
    first = await fan.call("private_request", model="alice", rate=60, key="k1")
    again = await fan.call("private_request", model="alice", rate=60, key="k1")
    assert again["show"] == first["show"] and again["duplicate"] is True
    for fields in ({"rate": 61}, {"model": "carol"}):
        asked = {"model": "alice", "rate": 60, "key": "k1", **fields}
        reply = await fan.request("private_request", **asked)
        assert reply["type"] == "error" and reply["code"] == "CONFLICT", reply
    assert len(await pg(settings, "SELECT * FROM private_shows")) == 1
    accepted = await model.call("private_accept", show=first["show"])
    retried = await model.call("private_accept", show=first["show"])
    assert accepted["state"] == "running" and retried["duplicate"] is True
    await fan.call("private_end", show=first["show"])
    await fan.close()
    await model.close()


# --- crashes, takeovers, disconnects -----------------------------------------------------


async def test_a_tick_whose_row_was_not_written_is_replayed_as_a_duplicate(
    start_server: Start, settings: Settings
) -> None:
    # The meter pass is slow here, so the test charges the next period by
    # itself first, as a node that died after the money and before the row.
    server = await start_server(**{**QUICK, "private_meter_interval_s": 0.5})
    fan, model = await setup(server)
    show = await start_show(fan, model)
    row = (await pg(settings, "SELECT ticks FROM private_shows WHERE id = $1", show))[0]
    n = row["ticks"] + 1
    key = f"meter:{show}:{n}"
    await server.node.economy.meter(
        "bob",
        f"esc:private:{show}",
        "alice",
        1,
        initiator=PRIVATE_INITIATOR,
        key=key,
        request=fingerprint("meter", show=show, key=key, amount=1),
        meta={"show": show},
    )
    await private_event(fan, show, "running", lambda e: e["seconds"] >= n + 1)
    ended = await fan.call("private_end", show=show)
    await settled(settings, show)
    assert await balance(fan) == 100 - ended["seconds"]
    assert await balance(model) == ended["charged"] == ended["seconds"]
    await drain(server)
    keys = [k for k, _ in await meter_txs(settings, show)]
    assert len(keys) == len(set(keys)) and key in keys
    await fan.close()
    await model.close()


async def test_a_show_ended_after_a_tick_whose_row_was_not_written_charges_it_once(
    start_server: Start, settings: Settings
) -> None:
    # No meter pass runs after the first: the period charged here (as by a
    # node that died after the money and before the row) is settled by the
    # end alone, which must count it once, not again in the final charge.
    server = await start_server(**{**QUICK, "private_meter_interval_s": 3600})
    fan, model = await setup(server)
    show = await start_show(fan, model)
    key = f"meter:{show}:1"
    await server.node.economy.meter(
        "bob",
        f"esc:private:{show}",
        "alice",
        1,
        initiator=PRIVATE_INITIATOR,
        key=key,
        request=fingerprint("meter", show=show, key=key, amount=1),
        meta={"show": show},
    )
    await asyncio.sleep(2.5)
    ended = await fan.call("private_end", show=show)
    row = await settled(settings, show)
    seconds = int(row["end_s"])
    assert seconds >= 2 and row["ticks"] == 0
    assert await balance(fan) == 100 - seconds
    assert await balance(model) == seconds == int(row["charged"]), ended
    await drain(server)
    txs = await meter_txs(settings, show)
    assert sum(amount for _, amount in txs) == seconds
    assert [k for k, _ in txs].count(key) == 1
    await fan.close()
    await model.close()


async def test_when_the_metering_node_dies_another_takes_over_and_no_second_is_lost(
    start_server: Start, settings: Settings
) -> None:
    # The clients' node never meters (one pass an hour); two others do.
    front = await start_server(**{**QUICK, "private_meter_interval_s": 3600.0})
    meters = [await start_server(**QUICK), await start_server(**QUICK)]
    fan, model = await setup(front)
    show = await start_show(fan, model)

    def holders() -> list[Running]:
        return [m for m in meters if show in m.node.privates.driving]

    async def one_holds() -> bool:
        return len(holders()) == 1

    await eventually(one_holds)
    holder = holders()[0]
    await private_event(fan, show, "running", lambda e: e["seconds"] >= 2)
    stopped_at = time.monotonic()
    await holder.process.stop()
    other = next(m for m in meters if m is not holder)

    async def taken_over() -> bool:
        return show in other.node.privates.driving

    await eventually(taken_over, timeout_s=5.0)
    # Billing catches up with the wall clock.
    await private_event(fan, show, "running", lambda e: e["seconds"] >= 5)
    assert time.monotonic() - stopped_at < 10
    ended = await fan.call("private_end", show=show)
    await settled(settings, show)
    assert ended["charged"] == ended["seconds"]
    assert await balance(fan) == 100 - ended["seconds"]
    await drain(other)
    txs = await meter_txs(settings, show)
    assert len({k for k, _ in txs}) == len(txs)
    assert sum(a for _, a in txs) == ended["seconds"]
    assert (await Http(front).reconcile())["ok"] is True
    await fan.close()
    await model.close()


async def test_a_fan_who_drops_past_the_grace_ends_the_show_billed_until_the_drop(
    start_server: Start, settings: Settings
) -> None:
    server = await start_server(**QUICK, private_grace_s=1.0)
    fan, model = await setup(server)
    show = await start_show(fan, model)
    await private_event(model, show, "running", lambda e: e["seconds"] >= 2)
    dropped_at = time.monotonic()
    await fan.close()
    event = await private_event(model, show, "ended", lambda e: e["settled_ms"] is not None)
    assert event["reason"] == "fan_left"
    assert time.monotonic() - dropped_at >= 1.0
    row = await settled(settings, show)
    # Billing paused at the drop: the grace second is not charged.
    assert 2 <= row["end_s"] <= 4 and row["charged"] == row["end_s"]
    assert await balance(model) == row["end_s"]
    await model.close()


async def test_a_fan_back_within_the_grace_continues_and_the_pause_is_not_billed(
    start_server: Start, settings: Settings
) -> None:
    server = await start_server(**QUICK, private_grace_s=5.0)
    fan, model = await setup(server)
    show = await start_show(fan, model)
    began = time.monotonic()
    await fan.close()
    await asyncio.sleep(2.0)
    fan = await server.client("bob")
    await asyncio.sleep(1.0)
    ended = await model.call("private_end", show=show)
    wall = time.monotonic() - began
    assert ended["state"] == "ended" and ended["reason"] == "model"
    assert ended["seconds"] <= wall - 1.5, (ended, wall)
    await settled(settings, show)
    await fan.close()
    await model.close()


@pytest.mark.parametrize("side", ["fan", "model"])
async def test_either_side_may_end_and_the_other_is_told(
    start_server: Start, settings: Settings, side: str
) -> None:
    server = await start_server(**QUICK)
    fan, model = await setup(server)
    show = await start_show(fan, model)
    ender, other = (fan, model) if side == "fan" else (model, fan)
    await ender.call("private_end", show=show)
    event = await private_event(other, show, "ended")
    assert event["reason"] == side
    await settled(settings, show)
    await fan.close()
    await model.close()


async def test_a_show_ended_while_its_minimum_was_being_held_gives_it_all_back(
    start_server: Start, settings: Settings
) -> None:
    server = await start_server(**QUICK)
    fan, model = await setup(server, min_s=30)
    show = (await fan.call("private_request", model="alice", rate=60, key="k1"))["show"]
    # What accept does before the row says `running`, as if its process
    # stopped there: the state `accepted`, the minimum held.
    await pg(settings, "UPDATE private_shows SET state = 'accepted' WHERE id = $1", show)
    await server.node.economy.hold(
        "bob",
        f"esc:private:{show}",
        30,
        subject=show,
        key=f"start:{show}",
        request=fingerprint("private_start", show=show, amount=30),
        meta={"show": show},
        initiator=PRIVATE_INITIATOR,
    )
    assert await balance(fan) == 70
    ended = await fan.call("private_end", show=show)
    assert ended["state"] == "ended" and ended["seconds"] == 0
    row = await settled(settings, show)
    assert row["charged"] == 0 and row["started_at"] is None
    assert await balance(fan) == 100 and await balance(model) == 0
    await drain(server)
    assert await account(settings, f"esc:private:{show}") == 0
    assert (await Http(server).reconcile())["ok"] is True
    await fan.close()
    await model.close()
