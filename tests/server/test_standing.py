"""Standing (issue #12, sections 2 and 3) against real Redis, Postgres and
server processes: leaderboards from the ledger's projection (windows,
refunds, ties, a retried tip counted once), the king on join and as an event
when it changes (and when the window rolls it out), tiers on message, tip
and dm events and after Redis lost them, GET /v1/tiers, hostile input."""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.conftest import Http, Running, eventually, pg
from tokenchat.client_demo.client import Client
from tokenchat.server.config import Settings
from tokenchat.server.standing import HOUR_MS, tier_of, window_start_hour

# Tiers small enough for a test to cross: 0 grey, 1 blue (1+), 2 green (50+).
TIERS = "0:grey,1:blue,50:green"


@pytest.fixture
async def server(start_server: Any) -> Running:
    running: Running = await start_server(
        tiers=TIERS, standing_interval_s=0.05, tier_cache_ttl_s=0.05
    )
    return running


async def members(server: Running, **tokens: int) -> dict[str, Client]:
    """alice (model) and the given fans, credited, all in alice's room."""
    clients = {"alice": await server.client("alice", "model")}
    for name, amount in tokens.items():
        clients[name] = await server.client(name)
        await Http(server).credit(name, amount)
        assert (await clients[name].next_event("balance"))["balance"] == amount
    for client in clients.values():
        await client.call("join", room="alice")
    return clients


async def drain(server: Running) -> None:
    assert await server.node.ledger.drain(10.0) == 0


async def board(server: Running, window: str = "12h", room: str = "alice") -> dict[str, Any]:
    status, reply = await Http(server).call("GET", f"/v1/rooms/{room}/leaderboard?window={window}")
    assert status == 200, reply
    return dict(reply)


async def king_event(client: Client, user: str | None) -> dict[str, Any]:
    while True:
        event = await client.next_event("king")
        if (event["king"] or {}).get("user") == user:
            return event


async def test_leaderboard_ranks_tippers_and_subtracts_refunds(
    server: Running, settings: Settings
) -> None:
    clients = await members(server, bob=100, carol=100)
    bob, carol = clients["bob"], clients["carol"]
    await bob.call("tip", room="alice", amount=10, key="b1")
    await carol.call("tip", room="alice", amount=30, key="c1")
    tip = await bob.call("tip", room="alice", amount=25, key="b2")
    # A retry of the same tip is answered as a duplicate and counted once.
    assert (await bob.call("tip", room="alice", amount=25, key="b2"))["duplicate"] is True
    await drain(server)
    reply = await board(server)
    assert reply["room"] == "alice" and reply["window"] == "12h"
    assert abs(reply["as_of"] - time.time() * 1000) < 5000
    assert [(e["rank"], e["user"], e["tokens"]) for e in reply["entries"]] == [
        (1, "bob", 35),
        (2, "carol", 30),
    ]
    for window in ("day", "week", "all"):
        assert [e["tokens"] for e in (await board(server, window))["entries"]] == [35, 30]
    # A refunded tip leaves every window.
    status, refund = await Http(server).call(
        "POST", "/v1/admin/refunds", "ops", "admin", tx=tip["tx"], key="r1"
    )
    assert status == 200, refund
    await drain(server)
    for window in ("12h", "all"):
        entries = (await board(server, window))["entries"]
        assert [(e["user"], e["tokens"]) for e in entries] == [("carol", 30), ("bob", 10)]
    # The projection agrees with the ledger it projects.
    rows = await pg(
        settings,
        """SELECT substr(p.account_id, 3) AS user_id, -sum(p.amount) AS tokens
           FROM ledger_postings p JOIN ledger_transactions t ON t.id = p.tx_id
           WHERE p.account_id IN ('u:bob', 'u:carol')
             AND t.kind IN ('tip', 'refund') GROUP BY 1 ORDER BY 1""",
    )
    assert {r["user_id"]: r["tokens"] for r in rows} == {"bob": 10, "carol": 30}
    assert (await Http(server).reconcile())["ok"] is True


async def test_windows_roll_by_hour(server: Running, settings: Settings) -> None:
    """Tips of 13 hours ago are out of 12h but in day; of 2 days ago in week."""
    now_hour = int(time.time() * 1000) // HOUR_MS
    await pg(
        settings,
        """INSERT INTO standing_room_hourly (room, user_id, hour, tokens) VALUES
           ('alice', 'old', $1, 7), ('alice', 'older', $2, 9), ('alice', 'new', $3, 1)""",
        now_hour - 14,
        now_hour - 48,
        now_hour,
    )
    await server.client("alice", "model")  # the room exists
    assert [e["user"] for e in (await board(server, "12h"))["entries"]] == ["new"]
    assert [e["user"] for e in (await board(server, "day"))["entries"]] == ["old", "new"]
    assert [e["user"] for e in (await board(server, "week"))["entries"]] == [
        "older",
        "old",
        "new",
    ]
    assert window_start_hour(10 * HOUR_MS + 5, 3600) == 9
    assert window_start_hour(10 * HOUR_MS, None) == 0


async def test_king_on_join_and_as_event_when_it_changes(server: Running) -> None:
    clients = await members(server, bob=100, carol=100)
    model, bob, carol = clients["alice"], clients["bob"], clients["carol"]
    await bob.call("tip", room="alice", amount=10, key="b1")
    event = await king_event(model, "bob")
    assert event["room"] == "alice" and event["king"] == {"user": "bob", "tokens": 10}
    assert "offset" in event and "ts" in event
    await king_event(carol, "bob")
    # Bob tipping more is no new king: no event; carol overtaking is one.
    await bob.call("tip", room="alice", amount=5, key="b2")
    await carol.call("tip", room="alice", amount=20, key="c1")
    event = await king_event(bob, "carol")
    assert event["king"] == {"user": "carol", "tokens": 20}
    dave = await server.client("dave")
    reply = await dave.call("join", room="alice")
    assert reply["room"]["king"] == {"user": "carol", "tokens": 20}
    # The king event is in the history too, like any room event.
    assert any(e["type"] == "king" for e in reply["history"])
    # A room nobody tipped in has no king.
    await server.client("erin", "model")
    assert (await dave.call("join", room="erin"))["room"]["king"] is None


async def test_king_rolls_out_with_the_window(server: Running) -> None:
    clients = await members(server, bob=100)
    model = clients["alice"]
    await clients["bob"].call("tip", room="alice", amount=10, key="b1")
    await king_event(model, "bob")
    # 13 hours on, the tip has left the 12 h window: the room has no king.
    later = int(time.time() * 1000) + 13 * HOUR_MS
    await server.node.standing.step(now_ms=later)
    event = await king_event(model, None)
    assert event["king"] is None
    fresh = await server.client("zed")
    assert (await fresh.call("join", room="alice"))["room"]["king"] is None


async def test_tiers_on_message_tip_and_dm_events(server: Running, settings: Settings) -> None:
    clients = await members(server, bob=200)
    model, bob = clients["alice"], clients["bob"]
    await bob.call("say", room="alice", text="hi")
    assert (await model.next_event("message"))["tier"] == 0
    await bob.call("tip", room="alice", amount=5, key="b1")
    assert (await model.next_event("tip"))["tier"] == 0  # the tier before this tip

    async def blue() -> bool:
        await bob.call("say", room="alice", text="again")
        return bool((await model.next_event("message"))["tier"] == 1)

    await eventually(blue)
    await bob.call("tip", room="alice", amount=50, key="b2")
    await eventually(lambda: _tier_is(server, "bob", 2))

    async def green_dm() -> bool:
        await bob.call("dm", to="alice", text="psst", key=f"d{time.monotonic_ns()}")
        return bool((await model.next_event("dm"))["tier"] == 2)

    await eventually(green_dm)
    # The model's earnings are no spending: she stays at tier 0.
    assert (await pg(settings, "SELECT tier FROM standing_tiers WHERE user_id = 'alice'")) in (
        [],
        [{"tier": 0}],
    )
    entries = (await board(server))["entries"]
    assert entries == [{"rank": 1, "user": "bob", "tokens": 55, "tier": 2}]


async def _tier_is(server: Running, user: str, tier: int) -> bool:
    return await server.node.standing.tiers.of(user) == tier


async def test_tiers_survive_redis_losing_them(server: Running, settings: Settings) -> None:
    clients = await members(server, bob=100)
    await clients["bob"].call("tip", room="alice", amount=60, key="b1")
    await eventually(lambda: _tier_is(server, "bob", 2))
    await server.node.redis.delete(server.node.keys.tiers())
    server.node.standing.tiers.forget()

    async def refilled() -> bool:
        raw = await server.node.redis.hget(server.node.keys.tiers(), "bob")
        return raw == b"2"

    await eventually(refilled)
    assert await server.node.standing.tiers.of("bob") == 2


async def test_tiers_fall_when_the_window_rolls(server: Running) -> None:
    clients = await members(server, bob=100)
    await clients["bob"].call("tip", room="alice", amount=60, key="b1")
    await eventually(lambda: _tier_is(server, "bob", 2))
    later = int(time.time() * 1000) + 31 * 24 * HOUR_MS
    await server.node.standing.step(now_ms=later)
    assert await server.node.redis.hget(server.node.keys.tiers(), "bob") is None


async def test_tiers_route_and_parsing(server: Running) -> None:
    status, reply = await Http(server).call("GET", "/v1/tiers")
    assert status == 200
    assert reply == {
        "window_s": 30 * 24 * 3600,
        "tiers": [
            {"tier": 0, "name": "grey", "min_tokens": 0},
            {"tier": 1, "name": "blue", "min_tokens": 1},
            {"tier": 2, "name": "green", "min_tokens": 50},
        ],
    }
    tiers = Settings(tiers=TIERS).tier_list()
    assert [tier_of(n, tiers) for n in (0, 1, 49, 50, 10**12)] == [0, 1, 1, 2, 2]
    for bad in ("", "5:grey", "0:grey,0:blue", "0:grey,x:blue", "0:", "0:grey,-1:blue"):
        with pytest.raises(ValueError, match="TOKENCHAT_TIERS"):
            Settings(tiers=bad)
    for name in ("king_window_s", "tier_window_s", "standing_interval_s", "tier_cache_ttl_s"):
        with pytest.raises(ValueError):
            Settings(**{name: 0})


async def test_leaderboard_hostile_input(server: Running) -> None:
    await server.client("alice", "model")
    http = Http(server)
    for query in ("?window=year", "?window=", "?window=12h%00", "?window=" + "x" * 5000):
        status, reply = await http.call("GET", f"/v1/rooms/alice/leaderboard{query}")
        assert status == 400 and reply["error"]["code"] == "BAD_REQUEST", (query, reply)
    for room in ("nobody", "x" * 500, "%20", "a%2Fb"):
        status, reply = await http.call("GET", f"/v1/rooms/{room}/leaderboard")
        assert status == 404 and reply["error"]["code"] == "NOT_FOUND", (room, reply)
    # Default window: 12h; an empty room answers no entries.
    reply = await board(server, "12h")
    assert reply["entries"] == []
    status, reply = await http.call("GET", "/v1/rooms/alice/leaderboard")
    assert status == 200 and reply["window"] == "12h"


async def test_projection_survives_a_restart(start_server: Any, settings: Settings) -> None:
    first = await start_server(tiers=TIERS, standing_interval_s=0.05)
    clients = await members(first, bob=100)
    await clients["bob"].call("tip", room="alice", amount=12, key="b1")
    await drain(first)
    await king_event(clients["alice"], "bob")
    for client in clients.values():
        await client.close()
    await first.process.stop()
    second = await start_server(tiers=TIERS, standing_interval_s=0.05)
    assert (await board(second))["entries"][0]["tokens"] == 12
    fan = await second.client("zed")
    assert (await fan.call("join", room="alice"))["room"]["king"] == {"user": "bob", "tokens": 12}


async def test_a_redelivered_ledger_entry_is_counted_once(
    server: Running, settings: Settings
) -> None:
    """A writer that died between COMMIT and XACK: another writes the same
    entry again; the ledger inserts nothing, and neither does the projection."""
    from tokenchat.server.ledger.writer import Entry

    clients = await members(server, bob=100)
    tip = await clients["bob"].call("tip", room="alice", amount=15, key="b1")
    await drain(server)
    row = (await pg(settings, "SELECT * FROM ledger_transactions WHERE id = $1", tip["tx"]))[0]
    postings = await pg(
        settings, "SELECT account_id, amount FROM ledger_postings WHERE tx_id = $1", tip["tx"]
    )
    entry = Entry(
        row["outbox_id"],
        row["id"],
        row["kind"],
        row["initiator"],
        row["idem_key"],
        row["request"],
        row["reply"],
        row["meta"],
        [(p["account_id"], p["amount"]) for p in postings],
    )
    ledger = server.node.ledger
    await ledger._write([entry], await server.node.economy.epoch(rebuilding_ok=True))
    assert (await board(server, "all"))["entries"][0]["tokens"] == 15

    async def folded() -> bool:
        """The projector (migration 0022) has reached the ledger's newest row."""
        await server.node.standing.project()
        rows = await pg(
            settings,
            """SELECT NOT EXISTS (SELECT FROM ledger_transactions l, standing_watermark w
                                  WHERE l.writer_xid IS NOT NULL
                                    AND (l.writer_xid, l.id) > (w.writer_xid, w.tx_id)) AS done""",
        )
        return bool(rows[0]["done"])

    await eventually(folded)  # the sums themselves, not only the board
    spent = await pg(
        settings, "SELECT sum(tokens) AS n FROM standing_user_hourly WHERE user_id = 'bob'"
    )
    assert spent[0]["n"] == 15
