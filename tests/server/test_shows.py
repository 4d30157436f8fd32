"""Ticket shows against real Redis, Postgres and server processes: the
lifecycle on both sides, show-time events kept from non-holders (live, join
history, since), refunds on cancel and early end, the sweeper's auto-cancel
with second-long settings, refusals and hostile input, idempotent retries,
Redis losing everything, and reconcile."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from tests.conftest import Http, Running, eventually, pg
from tokenchat.client_demo.client import Client
from tokenchat.server.config import Settings

Start = Callable[..., Awaitable[Running]]


async def schedule(
    server: Running, price: int = 25, min_s: int = 1, starts_in_s: float = 0.0
) -> str:
    status, reply = await Http(server).call(
        "POST",
        "/v1/me/shows",
        "alice",
        "model",
        title="Friday show",
        price=price,
        starts_at=int((time.time() + starts_in_s) * 1000),
        min_s=min_s,
    )
    assert status == 201, reply
    assert reply["state"] == "scheduled" and reply["show"].startswith("t_")
    return str(reply["show"])


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


async def drain(server: Running) -> None:
    assert await server.node.ledger.drain(10.0) == 0


async def escrow_kinds(settings: Settings, show: str) -> list[str]:
    rows = await pg(
        settings,
        """SELECT t.kind FROM ledger_transactions t JOIN ledger_postings p ON p.tx_id = t.id
           WHERE p.account_id = $1 ORDER BY t.kind""",
        f"esc:show:{show}",
    )
    return [row["kind"] for row in rows]


async def escrow_of(settings: Settings, show: str) -> int:
    rows = await pg(settings, "SELECT balance FROM accounts WHERE id = $1", f"esc:show:{show}")
    return int(rows[0]["balance"]) if rows else 0


async def show_event(client: Client, state: str) -> dict[str, Any]:
    while True:
        event = await client.next_event("show")
        if event["state"] == state:
            return event


async def no_event(client: Client, within_s: float = 0.3) -> None:
    """Nothing but presence and balance events reach ``client`` for a while
    (a `king` crowned by show-time tips is show time too)."""
    try:
        async with asyncio.timeout(within_s):
            while True:
                event = await client.events.get()
                assert event["type"] in ("presence", "balance"), event
    except TimeoutError:
        pass


async def settled(settings: Settings, show: str) -> None:
    async def done() -> bool:
        rows = await pg(settings, "SELECT settled_at FROM shows WHERE id = $1", show)
        return rows[0]["settled_at"] is not None

    await eventually(done)


# --- the lifecycle -----------------------------------------------------------------------


async def test_a_show_sells_tickets_hides_its_chat_from_non_holders_and_pays_the_model(
    server: Running, settings: Settings
) -> None:
    model, bob, carol = await members(server)
    show = await schedule(server, price=25, min_s=1)
    for client in (model, bob, carol):
        event = await show_event(client, "scheduled")
        assert (event["room"], event["show"], event["price"], event["min_s"]) == (
            "alice",
            show,
            25,
            1,
        )
        assert isinstance(event["starts_at"], int)
    joined = await carol.call("join", room="alice")
    assert joined["room"]["show"]["show"] == show and joined["ticket"] is False

    bought = await bob.call("buy_ticket", room="alice", show=show, key="t1")
    assert bought["balance"] == 75 and bought["price"] == 25 and "already" not in bought
    again = await bob.call("buy_ticket", room="alice", show=show, key="t2")
    assert again["already"] is True and again["balance"] == 75
    retry = await bob.call("buy_ticket", room="alice", show=show, key="t1")
    assert retry["duplicate"] is True and retry["tx"] == bought["tx"]
    assert await balance(bob) == 75
    joined = await bob.call("join", room="alice")
    assert joined["ticket"] is True

    before = await carol.call("say", room="alice", text="before the show")
    started = await model.call("show_start", show=show)
    assert started["state"] == "running"
    for client in (model, bob, carol):
        await show_event(client, "running")
    said = await model.call("say", room="alice", text="show time")
    message = await bob.next_event("message")
    assert message["text"] == "show time" and message["in_show"] == show
    tip = await bob.call("tip", room="alice", amount=5, key="tip1")
    assert (await model.next_event("message"))["text"] == "show time"
    assert (await model.next_event("tip"))["in_show"] == show
    refused = await carol.request("say", room="alice", text="let me in")
    assert refused["type"] == "error" and refused["code"] == "FORBIDDEN"
    refused = await carol.request("tip", room="alice", amount=5, key="tip2")
    assert refused["code"] == "FORBIDDEN" and await balance(carol) == 100
    await no_event(carol)
    # Not through a new join's history, nor through `since`.
    for since in (None, before["offset"]):
        fields = {} if since is None else {"since": since}
        rejoined = await carol.call("join", room="alice", **fields)
        texts = [event.get("text") for event in rejoined["history"]]
        assert "show time" not in texts and rejoined["ticket"] is False
        assert all("in_show" not in event for event in rejoined["history"])
        assert rejoined["room"]["show"]["state"] == "running"
    holder = await bob.call("join", room="alice", since=before["offset"])
    assert [e["offset"] for e in holder["history"] if "in_show" in e] == [
        said["offset"],
        tip["offset"],
    ]

    await asyncio.sleep(1.1)  # min_s
    ended = await model.call("show_end", show=show)
    assert ended["outcome"] == "release" and ended["settled"] is True
    await show_event(carol, "ended")
    assert await balance(model) == 25 + 5
    assert (await carol.call("say", room="alice", text="after"))["offset"]
    await drain(server)
    assert await escrow_kinds(settings, show) == ["release", "ticket"]
    assert await escrow_of(settings, show) == 0
    status, listed = await Http(server).call("GET", "/v1/rooms/alice/shows")
    assert status == 200 and [(s["show"], s["state"]) for s in listed["shows"]] == [(show, "ended")]
    again_after = await carol.request("buy_ticket", room="alice", show=show, key="late")
    assert again_after["code"] == "CONFLICT" and await balance(carol) == 100
    result = await Http(server).reconcile()
    assert result["ok"] is True, result


async def test_a_ticket_bought_in_one_session_opens_the_show_in_the_others(
    start_server: Start,
) -> None:
    # Bob's second session is on another server process: the ticket reaches
    # it over his user channel (bus kind T), without a new join.
    first = await start_server()
    second = await start_server()
    model, bob, _carol = await members(first)
    other = await second.client("bob")
    await other.call("join", room="alice")
    show = await schedule(first, price=25, min_s=1)
    await model.call("show_start", show=show)
    await show_event(other, "running")
    await model.call("say", room="alice", text="before the ticket")
    await no_event(other)
    await bob.call("buy_ticket", room="alice", show=show, key="t1")

    async def sees_show_time() -> bool:
        await model.call("say", room="alice", text="show time")
        try:
            async with asyncio.timeout(0.3):
                while True:
                    event = await other.events.get()
                    if event["type"] == "message":
                        return bool(event["text"] == "show time" and event["in_show"] == show)
        except TimeoutError:
            return False

    await eventually(sees_show_time)
    await other.close()


async def test_cancel_and_an_early_end_refund_every_ticket_once(
    server: Running, settings: Settings
) -> None:
    model, bob, carol = await members(server)
    cancelled = await schedule(server, price=10)
    for fan in (bob, carol):
        await fan.call("buy_ticket", room="alice", show=cancelled, key="c")
    reply = await model.call("show_cancel", show=cancelled)
    assert reply["outcome"] == "refund" and reply["settled"] is True
    for fan in (bob, carol):
        assert await balance(fan) == 100
    assert (await model.call("show_cancel", show=cancelled))["duplicate"] is True

    early = await schedule(server, price=20, min_s=3600)
    await bob.call("buy_ticket", room="alice", show=early, key="e")
    await model.call("show_start", show=early)
    # A ticket bought while the show runs lets the fan in at once.
    await carol.call("buy_ticket", room="alice", show=early, key="e")
    await model.call("say", room="alice", text="in the show")
    assert (await carol.next_event("message"))["in_show"] == early
    ended = await model.call("show_end", show=early)
    assert ended["outcome"] == "refund"
    for fan in (bob, carol):
        assert await balance(fan) == 100
    assert await balance(model) == 0
    await drain(server)
    for show in (cancelled, early):
        kinds = await escrow_kinds(settings, show)
        assert kinds == ["escrow_refund", "escrow_refund", "ticket", "ticket"]
        assert await escrow_of(settings, show) == 0
    # The fan sees each refund in the ledger: one escrow_refund per ticket.
    refunds = await pg(
        settings,
        """SELECT count(*) AS n FROM ledger_transactions t JOIN ledger_postings p
           ON p.tx_id = t.id WHERE p.account_id = 'u:bob' AND t.kind = 'escrow_refund'""",
    )
    assert refunds[0]["n"] == 2
    assert (await Http(server).reconcile())["ok"] is True


async def test_a_show_not_started_in_time_cancels_itself_and_refunds(
    start_server: Start, settings: Settings
) -> None:
    server = await start_server(
        show_start_grace_s=0.5, show_settle_grace_s=0.2, deadline_sweep_interval_s=0.1
    )
    model, bob, carol = await members(server)
    show = await schedule(server, price=30)
    await bob.call("buy_ticket", room="alice", show=show, key="k")
    assert await balance(bob) == 70
    event = await show_event(carol, "cancelled")
    assert event["show"] == show
    await settled(settings, show)
    assert await balance(bob) == 100
    refused = await model.request("show_start", show=show)
    assert refused["code"] == "CONFLICT"
    assert await pg(settings, "SELECT * FROM deadlines") == []


async def test_a_running_show_ends_by_itself_after_the_longest_length(
    start_server: Start, settings: Settings
) -> None:
    server = await start_server(show_length_max_s=1.0, deadline_sweep_interval_s=0.1)
    model, bob, _carol = await members(server)
    show = await schedule(server, price=30, min_s=1)
    await bob.call("buy_ticket", room="alice", show=show, key="k")
    await model.call("show_start", show=show)
    await show_event(bob, "ended")
    await settled(settings, show)
    assert await balance(model) == 30


# --- refusals --------------------------------------------------------------------------------


async def test_refusals_move_nothing(server: Running, settings: Settings) -> None:
    model, bob, _carol = await members(server, tokens=20)
    show = await schedule(server, price=25)
    dora = await server.client("dora", "model")
    await dora.call("join", room="dora")

    async def refused(client: Client, code: str, type_: str, **fields: Any) -> None:
        reply = await client.request(type_, **fields)
        assert reply["type"] == "error" and reply["code"] == code, (type_, fields, reply)

    await refused(bob, "INSUFFICIENT_FUNDS", "buy_ticket", room="alice", show=show, key="k")
    await refused(model, "FORBIDDEN", "buy_ticket", room="alice", show=show, key="k")
    await refused(bob, "NOT_IN_ROOM", "buy_ticket", room="dora", show=show, key="k")
    await bob.call("join", room="dora")
    await Http(server).credit("bob", 100)
    await refused(bob, "NOT_FOUND", "buy_ticket", room="dora", show=show, key="k")
    for bad in ("r_" + "0" * 24, "m_" + "0" * 24, "t_" + "0" * 24, "t_x"):
        await refused(bob, "NOT_FOUND", "buy_ticket", room="alice", show=bad, key="k")
        await refused(model, "NOT_FOUND", "show_start", show=bad)
        await refused(model, "NOT_FOUND", "show_cancel", show=bad)
    await refused(dora, "FORBIDDEN", "show_start", show=show)
    await refused(model, "CONFLICT", "show_end", show=show)  # not running
    assert await balance(bob) == 120
    bought = await bob.call("buy_ticket", room="alice", show=show, key="k")  # key not burnt
    assert bought["balance"] == 95
    await refused(bob, "CONFLICT", "buy_ticket", room="dora", show=show, key="k")
    second = await schedule(server, price=5)
    await model.call("show_start", show=show)
    await refused(model, "CONFLICT", "show_start", show=second)  # one running per room
    await drain(server)
    assert await escrow_kinds(settings, show) == ["ticket"]


async def test_hostile_input_is_a_bad_request(start_server: Start) -> None:
    server = await start_server(http_creates_burst=100)  # each refusal counts too
    http = Http(server)
    now_ms = int(time.time() * 1000)
    good = {"title": "t", "price": 5, "starts_at": now_ms, "min_s": 60}
    for field, value in (
        ("title", ""),
        ("title", "a\x00b"),
        ("title", "x" * 201),
        ("price", 0),
        ("price", "5"),
        ("price", True),
        ("min_s", 0),
        ("min_s", 86401),
        ("starts_at", -1),
        ("starts_at", "soon"),
        ("starts_at", now_ms + 400 * 86400 * 1000),
    ):
        status, reply = await http.call(
            "POST", "/v1/me/shows", "alice", "model", **{**good, field: value}
        )
        assert status == 400 and reply["error"]["code"] == "BAD_REQUEST", (field, value, reply)
    status, _ = await http.call("POST", "/v1/me/shows", "bob", "fan", **good)
    assert status == 403
    fan = await server.client("bob")
    for fields in (
        {"room": "alice", "show": "t_" + "0" * 24},
        {"room": "alice", "show": "t_0", "key": ""},
        {"room": "alice", "show": "x" * 65, "key": "k"},
        {"room": "alice", "show": 5, "key": "k"},
    ):
        reply = await fan.request("buy_ticket", **fields)
        assert reply["code"] == "BAD_REQUEST", (fields, reply)


# --- durability -----------------------------------------------------------------------------


async def test_redis_loss_refunds_each_ticket_once_and_restores_the_show(
    start_server: Start, settings: Settings, private_redis: str
) -> None:
    server = await start_server(redis_url=private_redis, deadline_sweep_interval_s=0.1)
    model, bob, carol = await members(server)
    show = await schedule(server, price=25, min_s=3600)
    await bob.call("buy_ticket", room="alice", show=show, key="k")
    await model.call("show_start", show=show)
    await drain(server)
    await server.node.redis.flushall()  # the show's hash, its marker, the balances

    # The sweeper puts the running show's marker back: no leak after the loss.
    async def restored() -> bool:
        reply = await carol.request("say", room="alice", text="x")
        return reply["type"] == "error" and reply["code"] == "FORBIDDEN"

    await eventually(restored)
    # The ticket survived in the ledger: a second one is `already`.
    assert (await bob.call("buy_ticket", room="alice", show=show, key="k2"))["already"] is True
    await model.call("show_end", show=show)  # early: refunded
    assert await balance(bob) == 100
    await drain(server)
    await server.node.redis.flushall()  # the refund key's record goes too
    await pg(settings, "UPDATE shows SET settled_at = NULL WHERE id = $1", show)
    await server.node.shows.settle(show)  # again: the ledger says refunded
    assert await balance(bob) == 100
    await drain(server)
    assert await escrow_kinds(settings, show) == ["escrow_refund", "ticket"]
    assert (await Http(server).reconcile())["ok"] is True


# --- the marker ------------------------------------------------------------------------------


def test_the_live_path_finds_the_marker_in_the_tail_and_never_in_a_text() -> None:
    from tokenchat.server.gateway.hub import event_show, is_show_time
    from tokenchat.server.gateway.rooms import complete_event

    show = "t_" + "a" * 24
    widest = b"18446744073709551615-18446744073709551615"  # the largest offset
    for text in ("", "x" * 4000, '"in_show":"t_' + "b" * 24 + '"'):
        body = orjson.dumps({"type": "message", "room": "alice", "from": "bob", "text": text})
        marked = body[:-1] + b',"in_show":"' + show.encode() + b'"}'
        for offset in (b"1-0", widest):
            assert is_show_time(complete_event(marked, offset))
            assert event_show(complete_event(marked, offset)) == show
            # A chat line quoting the marker is escaped JSON: not show time.
            assert not is_show_time(complete_event(body, offset))


async def test_a_join_with_postgres_away_succeeds_and_leaks_nothing(
    start_server: Start, postgres_proxy: Any
) -> None:
    server = await start_server(database_url=postgres_proxy.url)
    model, bob, carol = await members(server)
    show = await schedule(server, price=25, min_s=3600)
    await bob.call("buy_ticket", room="alice", show=show, key="k")
    await model.call("show_start", show=show)
    await model.call("say", room="alice", text="show time")
    await postgres_proxy.cut()
    try:
        for fan, sees in ((carol, False), (bob, True)):
            joined = await fan.call("join", room="alice")
            texts = [event.get("text") for event in joined["history"]]
            assert ("show time" in texts) is sees, (fan, texts)
            assert joined["room"]["show"] is None and joined["ticket"] is False
    finally:
        await postgres_proxy.restore()


async def test_a_menu_tip_during_a_show_is_for_ticket_holders_only(
    server: Running, settings: Settings
) -> None:
    model, bob, carol = await members(server)
    status, reply = await Http(server).call(
        "PUT", "/v1/me/menu", "alice", "model", items=[{"label": "Dance", "price": 7}]
    )
    assert status == 200, reply
    item = reply["items"][0]["id"]
    show = await schedule(server, price=10, min_s=3600)
    await bob.call("buy_ticket", room="alice", show=show, key="k")
    await model.call("show_start", show=show)
    await show_event(carol, "running")
    refused = await carol.request("tip", room="alice", item=item, key="i1")
    assert refused["code"] == "FORBIDDEN" and await balance(carol) == 100
    tipped = await bob.call("tip", room="alice", item=item, key="i1")
    assert tipped["price"] == 7
    event = await model.next_event("tip")
    assert event["in_show"] == show and event["item"]["label"] == "Dance"
    await no_event(carol)
    rejoined = await carol.call("join", room="alice")
    assert all(e.get("type") != "tip" for e in rejoined["history"])
    # Bob's show-time tip made him king: a ticket holder's join names him,
    # while a non-holder's names no king until the show is over.

    async def crowned() -> bool:
        joined = await bob.call("join", room="alice")
        return bool(joined["room"]["king"] and joined["room"]["king"]["user"] == "bob")

    await eventually(crowned, timeout_s=10.0)
    assert (await carol.call("join", room="alice"))["room"]["king"] is None
