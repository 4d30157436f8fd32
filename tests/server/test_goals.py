"""Tip goals against real Redis, Postgres and server processes: counting by
plain and menu tips, `goal` events on both sides, `room.goal` on join, the
all-or-nothing escrow released on reach and refunded per fan on a missed
deadline or a delete, refusals and hostile input, idempotent retries, a reach
whose process died before Postgres knew, Redis losing everything, and
reconcile."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from tests.conftest import Http, Running, eventually, pg
from tokenchat.client_demo.client import Client
from tokenchat.server.config import Settings

Start = Callable[..., Awaitable[Running]]


async def set_goal(server: Running, target: int, **fields: Any) -> dict[str, Any]:
    status, reply = await Http(server).call(
        "PUT", "/v1/me/goal", "alice", "model", title="New toy", target=target, **fields
    )
    assert status == 200, reply
    goal = reply["goal"]
    assert goal["id"].startswith("g_") and goal["state"] == "active" and goal["progress"] == 0
    return dict(goal)


async def members(server: Running, tokens: int = 100) -> tuple[Client, Client, Client]:
    """alice (model), bob and carol (fans with ``tokens`` each), all in alice's room."""
    model = await server.client("alice", "model")
    bob = await server.client("bob")
    carol = await server.client("carol")
    for name, client in (("bob", bob), ("carol", carol)):
        await Http(server).credit(name, tokens)
        assert (await client.next_event("balance"))["balance"] == tokens
    for client in (model, bob, carol):
        await client.call("join", room="alice")
    return model, bob, carol


async def balance(client: Client) -> int:
    return int((await client.call("balance"))["balance"])


async def goal_event(client: Client, state: str, progress: int | None = None) -> dict[str, Any]:
    """The next `goal` event with ``state`` (and ``progress``), skipping others."""
    while True:
        event = await client.next_event("goal")
        assert event["room"] == "alice"
        goal = event["goal"]
        if goal["state"] == state and (progress is None or goal["progress"] == progress):
            return dict(goal)


async def escrow_of(settings: Settings, goal: str) -> int:
    rows = await pg(settings, "SELECT balance FROM accounts WHERE id = $1", f"esc:goal:{goal}")
    return int(rows[0]["balance"]) if rows else 0


async def goal_row(settings: Settings, goal: str) -> Any:
    return (await pg(settings, "SELECT * FROM goals WHERE id = $1", goal))[0]


async def settled(settings: Settings, goal: str) -> None:
    async def done() -> bool:
        return (await goal_row(settings, goal))["settled_at"] is not None

    await eventually(done)


async def drain(server: Running) -> None:
    assert await server.node.ledger.drain(10.0) == 0


# --- counting ------------------------------------------------------------------------------


async def test_tips_and_menu_tips_count_and_both_sides_see_the_goal_reached(
    server: Running, settings: Settings
) -> None:
    model, bob, carol = await members(server)
    joined = await carol.call("join", room="alice")
    assert joined["room"]["goal"] is None
    goal = await set_goal(server, 20)
    for client in (model, bob, carol):
        assert (await goal_event(client, "active", 0))["id"] == goal["id"]
    tip = await bob.call("tip", room="alice", amount=8, key="t1")
    assert tip["goal"]["progress"] == 8 and tip["goal"]["state"] == "active"
    for client in (model, carol):
        assert (await goal_event(client, "active", 8))["target"] == 20
    joined = await carol.call("join", room="alice")
    assert {k: joined["room"]["goal"][k] for k in ("id", "progress", "state")} == {
        "id": goal["id"],
        "progress": 8,
        "state": "active",
    }
    # The goal event follows the tip's in the room's history.
    kinds = [event["type"] for event in joined["history"]]
    assert kinds[-2:] == ["tip", "goal"]
    status, _ = await Http(server).call(
        "PUT", "/v1/me/menu", "alice", "model", items=[{"label": "Dance", "price": 12}]
    )
    assert status == 200
    _, menu = await Http(server).call("GET", "/v1/users/alice/menu")
    item = menu["items"][0]["id"]
    reached = await carol.call("tip", room="alice", item=item, key="m1")
    assert reached["goal"] == {**reached["goal"], "progress": 20, "state": "reached"}
    for client in (model, bob, carol):
        assert (await goal_event(client, "reached", 20))["id"] == goal["id"]
    await eventually(lambda: _state_is(settings, goal["id"], "reached"))
    # A plain goal paid the model as each tip came; later tips count no more.
    assert await balance(model) == 20
    after = await bob.call("tip", room="alice", amount=1, key="t2")
    assert "goal" not in after
    status, current = await Http(server).call("GET", "/v1/rooms/alice/goal")
    assert status == 200 and current["goal"]["state"] == "reached"
    assert current["goal"]["progress"] == 20
    await drain(server)
    assert (await Http(server).reconcile())["ok"] is True


async def _state_is(settings: Settings, goal: str, state: str) -> bool:
    return bool((await goal_row(settings, goal))["state"] == state)


async def test_a_retried_tip_counts_once(server: Running) -> None:
    _model, bob, _carol = await members(server)
    await set_goal(server, 100)
    first = await bob.call("tip", room="alice", amount=5, key="same")
    again = await bob.call("tip", room="alice", amount=5, key="same")
    assert again["duplicate"] is True and again["tx"] == first["tx"]
    assert again["goal"]["progress"] == 5
    current = await server.node.goals.current("alice")
    assert current is not None and current["progress"] == 5


# --- all or nothing ----------------------------------------------------------------------


async def test_all_or_nothing_holds_tips_and_releases_them_once_reached(
    server: Running, settings: Settings
) -> None:
    model, bob, carol = await members(server)
    goal = await set_goal(server, 30, all_or_nothing=True)
    assert goal["all_or_nothing"] is True
    await bob.call("tip", room="alice", amount=10, key="a")
    await carol.call("tip", room="alice", amount=15, key="b")
    assert await balance(model) == 0  # held, not paid
    await drain(server)
    assert await escrow_of(settings, goal["id"]) == 25
    # An admin cannot refund a held tip: the goal does.
    [held] = await pg(
        settings, "SELECT id FROM ledger_transactions WHERE idem_key = 'a' AND kind = 'tip'"
    )
    status, reply = await Http(server).call(
        "POST", "/v1/admin/refunds", "ops", "admin", tx=held["id"], key="r"
    )
    assert status == 409 and reply["error"]["code"] == "CONFLICT"
    await bob.call("tip", room="alice", amount=5, key="c")  # 30: reached
    await goal_event(model, "reached", 30)
    await settled(settings, goal["id"])
    assert await balance(model) == 30
    await drain(server)
    assert await escrow_of(settings, goal["id"]) == 0
    releases = await pg(
        settings,
        """SELECT count(*) AS n FROM ledger_transactions
           WHERE kind = 'release' AND meta->>'goal' = $1""",
        goal["id"],
    )
    assert releases[0]["n"] == 1
    await server.node.goals.settle(goal["id"])  # again: nothing moves
    assert await balance(model) == 30
    assert (await Http(server).reconcile())["ok"] is True


async def test_a_missed_deadline_refunds_each_fan_what_they_tipped(
    start_server: Start, settings: Settings
) -> None:
    server = await start_server(goal_settle_grace_s=0.2, deadline_sweep_interval_s=0.1)
    model, bob, carol = await members(server)
    deadline = int((time.time() + 1.0) * 1000)
    goal = await set_goal(server, 1000, all_or_nothing=True, deadline=deadline)
    assert goal["deadline"] == deadline
    await bob.call("tip", room="alice", amount=10, key="a")
    await bob.call("tip", room="alice", amount=7, key="b")
    await carol.call("tip", room="alice", amount=3, key="c")
    failed = await goal_event(carol, "failed")
    assert failed["progress"] == 20
    await settled(settings, goal["id"])
    assert (await balance(bob), await balance(carol), await balance(model)) == (100, 100, 0)
    await drain(server)
    refunds = await pg(
        settings,
        """SELECT meta->>'fan' AS fan, reply->>'amount' AS amount FROM ledger_transactions
           WHERE kind = 'escrow_refund' AND meta->>'goal' = $1 ORDER BY 1""",
        goal["id"],
    )
    assert [(r["fan"], int(r["amount"])) for r in refunds] == [("bob", 17), ("carol", 3)]
    # A tip after the goal failed is a plain tip, to the model.
    after = await bob.call("tip", room="alice", amount=1, key="d")
    assert "goal" not in after and await balance(model) == 1
    assert await pg(settings, "SELECT * FROM deadlines") == []
    assert (await Http(server).reconcile())["ok"] is True


async def test_deleting_an_active_goal_refunds_and_frees_the_room_for_a_new_one(
    server: Running, settings: Settings
) -> None:
    _model, bob, carol = await members(server)
    goal = await set_goal(server, 100, all_or_nothing=True)
    await bob.call("tip", room="alice", amount=40, key="a")
    status, reply = await Http(server).call(
        "PUT", "/v1/me/goal", "alice", "model", title="Another", target=5
    )
    assert status == 409 and reply["error"]["code"] == "CONFLICT"
    status, reply = await Http(server).call("DELETE", "/v1/me/goal", "alice", "model")
    assert status == 200 and reply["settled"] is True
    assert reply["goal"]["state"] == "deleted" and reply["goal"]["progress"] == 40
    assert (await goal_event(carol, "deleted"))["id"] == goal["id"]
    assert await balance(bob) == 100
    joined = await carol.call("join", room="alice")
    assert joined["room"]["goal"] is None
    status, _ = await Http(server).call("DELETE", "/v1/me/goal", "alice", "model")
    assert status == 404
    second = await set_goal(server, 5)
    assert second["id"] != goal["id"]
    assert (await carol.call("tip", room="alice", amount=2, key="x"))["goal"]["progress"] == 2
    await drain(server)
    assert await escrow_of(settings, goal["id"]) == 0
    assert (await Http(server).reconcile())["ok"] is True


async def test_tips_declare_whichever_escrow_the_rooms_goal_names_now(
    server: Running, settings: Settings
) -> None:
    # A tip declares the escrow it writes (a key of its call, for Redis
    # Cluster); the process learns it from the script (GOAL_ESCROW), so a
    # goal replaced since, or gone, must not send tokens to the old escrow.
    model, bob, _carol = await members(server)
    first = await set_goal(server, 100, all_or_nothing=True)
    await bob.call("tip", room="alice", amount=4, key="a")  # learns the first escrow
    status, _ = await Http(server).call("DELETE", "/v1/me/goal", "alice", "model")
    assert status == 200
    second = await set_goal(server, 100, all_or_nothing=True)
    tipped = await bob.call("tip", room="alice", amount=6, key="b")  # still knows the first
    assert tipped["goal"]["id"] == second["id"] and tipped["goal"]["progress"] == 6
    again = await bob.call("tip", room="alice", amount=1, key="c")  # knows the second
    assert again["goal"]["progress"] == 7
    status, _ = await Http(server).call("DELETE", "/v1/me/goal", "alice", "model")
    assert status == 200
    plain = await bob.call("tip", room="alice", amount=2, key="d")  # no goal: to the model
    assert "goal" not in plain and await balance(model) == 2
    assert await balance(bob) == 98
    await drain(server)
    assert (await escrow_of(settings, first["id"]), await escrow_of(settings, second["id"])) == (
        0,
        0,
    )
    held = await pg(
        settings,
        """SELECT meta->>'goal' AS goal, sum(p.amount)::bigint AS tokens
           FROM ledger_transactions t JOIN ledger_postings p ON p.tx_id = t.id
           WHERE t.kind = 'tip' AND p.account_id LIKE 'esc:goal:%' GROUP BY 1 ORDER BY 2""",
    )
    assert [(r["goal"], r["tokens"]) for r in held] == [(first["id"], 4), (second["id"], 7)]
    assert (await Http(server).reconcile())["ok"] is True


# --- refusals and hostile input --------------------------------------------------------------


async def test_refusals_and_hostile_input_change_nothing(
    start_server: Start, settings: Settings
) -> None:
    server = await start_server(http_creates_burst=100)  # each refusal counts too
    http = Http(server)
    await server.client("alice", "model")
    now_ms = int(time.time() * 1000)
    for field, value in (
        ("title", ""),
        ("title", "a\x00b"),
        ("title", "x" * 201),
        ("title", 5),
        ("target", 0),
        ("target", -5),
        ("target", 10**12),
        ("target", "5"),
        ("target", True),
        ("target", 1.5),
        ("deadline", now_ms - 1000),
        ("deadline", now_ms + 400 * 86400 * 1000),
        ("deadline", "soon"),
        ("deadline", 2**60),
        ("all_or_nothing", "yes"),
        ("all_or_nothing", 1),
    ):
        body = {"title": "t", "target": 5, field: value}
        status, reply = await http.call("PUT", "/v1/me/goal", "alice", "model", **body)
        assert status == 400 and reply["error"]["code"] == "BAD_REQUEST", (field, value, reply)
    status, _ = await http.call("PUT", "/v1/me/goal", "bob", "fan", title="t", target=5)
    assert status == 403
    status, _ = await http.call("DELETE", "/v1/me/goal", "bob", "fan")
    assert status == 403
    status, reply = await http.call("DELETE", "/v1/me/goal", "alice", "model")
    assert status == 404 and reply["error"]["code"] == "NOT_FOUND"
    for room in ("nobody", "x" * 65, "a b"):
        status, _ = await http.call("GET", f"/v1/rooms/{room}/goal")
        assert status == 404, room
    assert await pg(settings, "SELECT * FROM goals") == []
    status, reply = await http.call("GET", "/v1/rooms/alice/goal")
    assert status == 200 and reply == {"room": "alice", "goal": None}


async def test_a_refused_tip_counts_nothing(server: Running, settings: Settings) -> None:
    _model, bob, _carol = await members(server, tokens=10)
    goal = await set_goal(server, 100, all_or_nothing=True)
    reply = await bob.request("tip", room="alice", amount=11, key="k")
    assert reply["code"] == "INSUFFICIENT_FUNDS"
    current = await server.node.goals.current("alice")
    assert current is not None and current["progress"] == 0
    assert (await bob.call("tip", room="alice", amount=10, key="k"))["goal"]["progress"] == 10
    await drain(server)
    assert await escrow_of(settings, goal["id"]) == 10


# --- crashes and Redis loss ----------------------------------------------------------------


async def test_a_reach_the_process_did_not_close_is_closed_by_the_sweeper(
    start_server: Start, settings: Settings
) -> None:
    server = await start_server(deadline_sweep_interval_s=0.1, goal_settle_grace_s=0.2)
    model, bob, _carol = await members(server)
    goal = await set_goal(server, 10, all_or_nothing=True)
    server.node.economy.goal_reached = None  # the process "dies" after the tip
    reached = await bob.call("tip", room="alice", amount=10, key="k")
    assert reached["goal"]["state"] == "reached"
    await settled(settings, goal["id"])
    assert (await goal_row(settings, goal["id"]))["state"] == "reached"
    assert await balance(model) == 10
    assert (await Http(server).reconcile())["ok"] is True


async def test_redis_loss_rebuilds_progress_from_the_ledger(
    start_server: Start, settings: Settings, private_redis: str
) -> None:
    server = await start_server(redis_url=private_redis)
    model, bob, carol = await members(server)
    goal = await set_goal(server, 30, all_or_nothing=True)
    await bob.call("tip", room="alice", amount=12, key="a")
    await carol.call("tip", room="alice", amount=8, key="b")
    await drain(server)
    await server.node.redis.flushall()  # the goal's hash, the balances, the escrow's
    current = await server.node.goals.current("alice")
    assert current is not None and (current["id"], current["progress"]) == (goal["id"], 20)
    retried = await bob.call("tip", room="alice", amount=12, key="a")
    assert retried["duplicate"] is True  # its record came back with the fan's balance
    reached = await carol.call("tip", room="alice", amount=10, key="c")
    assert reached["goal"]["progress"] == 30 and reached["goal"]["state"] == "reached"
    await settled(settings, goal["id"])
    assert await balance(model) == 30
    await drain(server)
    assert await escrow_of(settings, goal["id"]) == 0
    assert (await Http(server).reconcile())["ok"] is True


async def test_redis_loss_after_a_delete_refunds_each_fan_once(
    start_server: Start, settings: Settings, private_redis: str
) -> None:
    server = await start_server(redis_url=private_redis)
    _model, bob, _carol = await members(server)
    goal = await set_goal(server, 100, all_or_nothing=True)
    await bob.call("tip", room="alice", amount=25, key="a")
    await Http(server).call("DELETE", "/v1/me/goal", "alice", "model")
    assert await balance(bob) == 100
    await drain(server)
    await server.node.redis.flushall()  # the refund key's record goes too
    await pg(settings, "UPDATE goals SET settled_at = NULL WHERE id = $1", goal["id"])
    await server.node.goals.settle(goal["id"])  # again: the ledger says refunded
    assert await balance(bob) == 100
    await drain(server)
    rows = await pg(
        settings,
        "SELECT count(*) AS n FROM ledger_transactions WHERE kind = 'escrow_refund'",
    )
    assert rows[0]["n"] == 1
    assert (await Http(server).reconcile())["ok"] is True


async def test_a_redis_older_than_the_ledger_rebuilds_the_goals_progress(
    start_server: Start, private_redis: str
) -> None:
    from tests.server import test_ledger_durability as durability
    from tokenchat.server.keys import Keys

    running = await durability.start(start_server, redis_url=private_redis)
    node = running.node
    keys = Keys(node.settings.redis_prefix)
    http = Http(running)
    fan = await durability.room_with_fan(running, http, "bob", 100)
    async with durability.writer_running(node):
        await set_goal(running, 100)
        assert (await fan.call("tip", room="alice", amount=10, key="a"))["goal"]["progress"] == 10
    # Redis goes back in time (see test_ledger_durability): its outbox behind
    # the ledger, its scripts forgotten, and the goal's progress it held then.
    await node.redis.hset(keys.goal("alice"), "progress", 0)  # type: ignore[misc]
    await durability.rewind_outbox(node.redis, keys)
    await node.redis.script_flush()
    async with durability.writer_running(node):
        reply = await fan.call("tip", room="alice", amount=5, key="b")
    assert reply["goal"]["progress"] == 15  # rebuilt from the ledger, then counted
    assert (await http.reconcile())["ok"] is True
