"""Receipts and history, DM history, blocks and reports (issue #12 sections 6
and 7), against real Redis, Postgres and server processes: the happy paths,
every refusal (a blocked DM moves nothing), idempotent retries, hostile
input, and what survives a restart and a Redis that lost its data."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from tests.conftest import Http, Running, eventually, pg
from tokenchat.client_demo.client import Client
from tokenchat.server.config import Settings

Start = Callable[..., Awaitable[Running]]


async def people(server: Running, tokens: int = 100) -> tuple[Client, Client, Http]:
    model = await server.client("alice", "model")
    fan = await server.client("bob")
    http = Http(server)
    if tokens:
        await http.credit("bob", tokens)
        assert (await fan.next_event("balance"))["balance"] == tokens
    return fan, model, http


async def drain(server: Running) -> None:
    assert await server.node.ledger.drain(10.0) == 0
    assert await server.node.dm_archive.drain(10.0) == 0


async def set_dm_price(http: Http, price: int) -> None:
    status, reply = await http.call("PUT", "/v1/me/prices", "alice", "model", dm=price)
    assert status == 200, reply


async def balance(client: Client) -> int:
    return int((await client.call("balance"))["balance"])


# --- transactions and receipts -----------------------------------------------------------


async def test_transactions_page_the_users_side_newest_first_and_filter_by_kind(
    server: Running,
) -> None:
    fan, _model, http = await people(server)
    await fan.call("join", room="alice")
    tips = [(await fan.call("tip", room="alice", amount=n, key=f"t{n}"))["tx"] for n in (1, 2, 3)]
    await set_dm_price(http, 4)
    dm = await fan.call("dm", to="alice", text="hi", key="d1")
    await drain(server)

    status, page = await http.call("GET", "/v1/me/transactions?limit=2", "bob")
    assert status == 200, page
    assert [(t["tx"], t["kind"], t["amount"]) for t in page["transactions"]] == [
        (dm["tx"], "dm", -4),
        (tips[2], "tip", -3),
    ]
    assert page["transactions"][0]["to"] == "alice"
    assert page["transactions"][1]["room"] == "alice"
    assert page["transactions"][1]["counterparty"] == "alice"
    seen = [t["tx"] for t in page["transactions"]]
    while page["next"]:
        status, page = await http.call(
            "GET", f"/v1/me/transactions?limit=2&before={page['next']}", "bob"
        )
        assert status == 200, page
        seen += [t["tx"] for t in page["transactions"]]
    assert len(seen) == 5 and len(set(seen)) == 5  # 4 spends and the credit, each once
    assert seen[2:4] == [tips[1], tips[0]]

    status, only_tips = await http.call("GET", "/v1/me/transactions?kind=tip", "bob")
    assert [t["tx"] for t in only_tips["transactions"]] == tips[::-1]
    assert only_tips["next"] is None
    # The model's side of the same tips: positive, from bob.
    status, hers = await http.call("GET", "/v1/me/transactions?kind=tip", "alice", "model")
    assert [(t["amount"], t["counterparty"]) for t in hers["transactions"]] == [
        (3, "bob"),
        (2, "bob"),
        (1, "bob"),
    ]
    # Someone else sees none of it.
    status, none = await http.call("GET", "/v1/me/transactions", "carol")
    assert status == 200 and none == {"transactions": [], "next": None}


async def test_a_receipt_values_the_spend_at_the_fans_average_purchase_price(
    start_server: Start, settings: Settings
) -> None:
    server = await start_server(payment_provider="fake", payout_cents_per_token=5.0)
    model = await server.client("alice", "model")
    fan = await server.client("bob")
    http = Http(server)
    # starter: 100 tokens for 999 cents; fan: 550 for 4999. 650 tokens, 5998 cents.
    for bundle, ref in (("starter", "p1"), ("fan", "p2")):
        status, reply = await http.call(
            "POST", "/v1/purchases", "bob", bundle=bundle, payment_ref=ref
        )
        assert status == 200, reply
    await fan.call("join", room="alice")
    tip = await fan.call("tip", room="alice", amount=65, key="t1")
    await drain(server)

    status, mine = await http.call("GET", f"/v1/me/transactions/{tip['tx']}", "bob")
    assert status == 200, mine
    assert (mine["kind"], mine["tokens"], mine["amount"], mine["from"], mine["to"]) == (
        "tip",
        65,
        -65,
        "bob",
        "alice",
    )
    assert mine["room"] == "alice" and mine["counterparty"] == "alice"
    # 65 tokens x 5998/650 cents = 599.8 -> 600 cents.
    assert mine["value"]["cents"] == 600
    assert mine["value"]["purchased_tokens"] == 650 and mine["value"]["purchased_cents"] == 5998
    assert "earnings" not in mine  # what she earns is hers to see

    status, hers = await http.call("GET", f"/v1/me/transactions/{tip['tx']}", "alice", "model")
    assert status == 200, hers
    assert hers["amount"] == 65 and hers["earnings"] == {
        "cents": 325,
        "cents_per_token": 5.0,
        "basis": "TOKENCHAT_PAYOUT_CENTS_PER_TOKEN",
        "rule": 0,  # the setting: no payout rule was added
    }
    assert "value" not in hers  # the fan's purchase prices are the fan's

    status, admin = await http.call("GET", f"/v1/me/transactions/{tip['tx']}", "ops", "admin")
    assert status == 200 and admin["value"]["cents"] == 600 and admin["earnings"]["cents"] == 325

    # Not a party: NOT_FOUND, exactly as for a transaction that does not exist.
    for path in (f"/v1/me/transactions/{tip['tx']}", "/v1/me/transactions/nope"):
        status, reply = await http.call("GET", path, "carol")
        assert status == 404 and reply["error"]["code"] == "NOT_FOUND"
    await model.close()


async def test_a_fan_who_never_bought_tokens_has_no_money_value(server: Running) -> None:
    fan, _model, http = await people(server)  # an admin's grant, not a purchase
    await fan.call("join", room="alice")
    tip = await fan.call("tip", room="alice", amount=10, key="t1")
    await drain(server)
    status, mine = await http.call("GET", f"/v1/me/transactions/{tip['tx']}", "bob")
    assert status == 200 and mine["value"]["cents"] is None


@pytest.mark.parametrize(
    "query",
    [
        "kind=nonsense",
        "limit=0",
        "limit=100000000000000000000000",
        "limit=abc",
        "before=garbage",
        "before=1-" + "x" * 100,
        "before=99999999999999999999-x",
    ],
)
async def test_transactions_refuse_hostile_queries(server: Running, query: str) -> None:
    status, reply = await Http(server).call("GET", f"/v1/me/transactions?{query}", "bob")
    assert status == 400 and reply["error"]["code"] == "BAD_REQUEST", reply


async def test_history_needs_a_token(server: Running) -> None:
    for path in ("/v1/me/transactions", "/v1/me/transactions/x", "/v1/me/dms?with=a"):
        status, reply = await Http(server).call("GET", path)
        assert status == 401, reply


async def test_a_huge_transaction_id_is_not_found(server: Running) -> None:
    status, reply = await Http(server).call("GET", "/v1/me/transactions/" + "a" * 5000, "bob")
    assert status == 404 and reply["error"]["code"] == "NOT_FOUND"


# --- DM history --------------------------------------------------------------------------


async def test_dm_history_pages_a_conversation_both_ways_paid_and_free(server: Running) -> None:
    fan, model, http = await people(server)
    sent = [(await fan.call("dm", to="alice", text="free one", key="d1"))["tx"]]
    await set_dm_price(http, 3)
    sent.append((await fan.call("dm", to="alice", text="paid one", key="d2"))["tx"])
    sent.append((await model.call("dm", to="bob", text="hello back", key="d3"))["tx"])
    await fan.call("dm", to="alice", text="paid one", key="d2")  # a retry: still one DM
    other = await server.client("carol")
    await http.credit("carol", 10)
    await other.call("dm", to="alice", text="not yours", key="d1")
    await drain(server)

    status, page = await http.call("GET", "/v1/me/dms?with=alice&limit=2", "bob")
    assert status == 200, page
    assert [(m["tx"], m["from"], m["to"], m["text"], m["price"]) for m in page["messages"]] == [
        (sent[2], "alice", "bob", "hello back", 0),
        (sent[1], "bob", "alice", "paid one", 3),
    ]
    assert page["with"] == "alice" and page["next"]
    status, older = await http.call("GET", f"/v1/me/dms?with=alice&before={page['next']}", "bob")
    assert [m["tx"] for m in older["messages"]] == [sent[0]] and older["next"] is None
    # The model sees the same conversation from her side; carol's is another.
    status, hers = await http.call("GET", "/v1/me/dms?with=bob", "alice", "model")
    assert [m["tx"] for m in hers["messages"]] == sent[::-1]
    status, carols = await http.call("GET", "/v1/me/dms?with=alice", "carol")
    assert [m["text"] for m in carols["messages"]] == ["not yours"]


async def test_dm_history_refuses_hostile_queries(server: Running) -> None:
    http = Http(server)
    for query in ("", "with=", "with=a%20b", "with=" + "x" * 65, "with=a&before=zz"):
        status, reply = await http.call("GET", f"/v1/me/dms?{query}", "bob")
        assert status == 400 and reply["error"]["code"] == "BAD_REQUEST", (query, reply)


async def test_a_dm_with_nul_is_archived_with_a_replacement_character(server: Running) -> None:
    fan, _model, http = await people(server, tokens=0)
    await fan.call("dm", to="alice", text="a\x00b", key="d1")
    await drain(server)
    _status, page = await http.call("GET", "/v1/me/dms?with=alice", "bob")
    assert [m["text"] for m in page["messages"]] == ["a\ufffdb"]


async def test_dms_sent_while_no_archiver_runs_are_archived_after_a_restart(
    start_server: Start, settings: Settings
) -> None:
    first = await start_server()
    fan, _model, _http = await people(first, tokens=0)
    # Stop this process's archiver, as if it had died: the stream keeps the DMs.
    for task in first.node._loops:
        if task.get_name() == "dm-archive":
            task.cancel()
    sent = [(await fan.call("dm", to="alice", text=f"m{n}", key=f"d{n}"))["tx"] for n in (1, 2)]
    assert await first.node.dm_archive.pending() == 2
    assert await pg(settings, "SELECT * FROM dms") == []
    await first.process.stop()

    second = await start_server()

    async def archived() -> bool:
        return len(await pg(settings, "SELECT * FROM dms")) == 2

    await eventually(archived, timeout_s=10.0)
    _status, page = await Http(second).call("GET", "/v1/me/dms?with=alice", "bob")
    assert [m["tx"] for m in page["messages"]] == sent[::-1]


# --- blocks ------------------------------------------------------------------------------


async def test_a_blocked_users_dm_is_refused_and_charges_nothing(
    server: Running, settings: Settings
) -> None:
    fan, model, http = await people(server)
    await set_dm_price(http, 5)
    status, reply = await http.call("PUT", "/v1/me/blocks/bob", "alice", "model")
    assert status == 200 and reply == {"user": "bob", "blocked": True}
    status, again = await http.call("PUT", "/v1/me/blocks/bob", "alice", "model")
    assert status == 200 and again == reply  # idempotent

    refused = await fan.request("dm", to="alice", text="let me in", key="d1")
    assert refused["type"] == "error" and refused["code"] == "FORBIDDEN", refused
    assert await balance(fan) == 100 and await balance(model) == 0
    await drain(server)
    assert await pg(settings, "SELECT * FROM ledger_transactions WHERE kind = 'dm'") == []
    assert await pg(settings, "SELECT * FROM dms") == []
    with pytest.raises(TimeoutError):
        await model.next_event("dm", timeout_s=0.3)

    # Only alice blocks bob: bob's DMs to others, and hers to him, go through.
    carol = await server.client("carol", "model")
    assert (await fan.call("dm", to="carol", text="hi", key="d2"))["price"] == 0
    assert (await model.call("dm", to="bob", text="no", key="d3"))["price"] == 0
    await carol.close()

    status, listed = await http.call("GET", "/v1/me/blocks", "alice", "model")
    assert [b["user"] for b in listed["blocks"]] == ["bob"]
    status, reply = await http.call("DELETE", "/v1/me/blocks/bob", "alice", "model")
    assert status == 200 and reply == {"user": "bob", "blocked": False}
    # The refused key was not burnt: the same key now delivers and charges once.
    sent = await fan.call("dm", to="alice", text="let me in", key="d1")
    assert sent["price"] == 5 and sent["balance"] == 95
    assert (await model.next_event("dm"))["text"] == "let me in"


async def test_a_block_survives_redis_losing_its_data_and_a_restart(
    start_server: Start, settings: Settings, redis: Any
) -> None:
    first = await start_server()
    fan, _model, http = await people(first)
    status, _ = await http.call("PUT", "/v1/me/blocks/bob", "alice", "model")
    assert status == 200
    refused = await fan.request("dm", to="alice", text="x", key="d1")
    assert refused["code"] == "FORBIDDEN"
    await drain(first)
    await first.process.stop()
    # Redis forgets every key of this test: the set is loaded from Postgres again.
    keys = [key async for key in redis.scan_iter(match=f"{settings.redis_prefix}*")]
    await redis.delete(*keys)

    second = await start_server()
    fan2 = await second.client("bob")
    refused = await fan2.request("dm", to="alice", text="x", key="d2")
    assert refused["type"] == "error" and refused["code"] == "FORBIDDEN", refused
    assert await balance(fan2) == 100


async def test_a_block_made_after_the_set_was_loaded_takes_effect_at_once(
    server: Running,
) -> None:
    fan, _model, http = await people(server, tokens=0)
    await fan.call("dm", to="alice", text="one", key="d1")  # loads alice's (empty) set
    status, _ = await http.call("PUT", "/v1/me/blocks/bob", "alice", "model")
    assert status == 200
    refused = await fan.request("dm", to="alice", text="two", key="d2")
    assert refused["code"] == "FORBIDDEN"


async def test_a_load_that_read_postgres_before_a_block_writes_nothing(
    server: Running, settings: Settings, redis: Any
) -> None:
    """The fence of blocks_load.lua: a load carrying the generation seen
    before a change is STALE, so the set never misses a committed block."""
    node = server.node
    await people(server, tokens=0)
    seen = await redis.get(node.keys.blocks_generation("alice"))
    status, _ = await Http(server).call("PUT", "/v1/me/blocks/bob", "alice", "model")
    assert status == 200
    stale = await node.blocks._load_script(
        keys=[node.keys.blocks("alice"), node.keys.blocks_generation("alice")],
        args=[seen or b""],  # what a load that read Postgres before the block holds
    )
    assert stale == b"STALE"
    assert await redis.exists(node.keys.blocks("alice")) == 0


async def test_blocks_refuse_hostile_input(server: Running) -> None:
    _fan, _model, http = await people(server, tokens=0)
    for method in ("PUT", "DELETE"):
        status, reply = await http.call(method, "/v1/me/blocks/bob", "bob")
        assert status == 400 and reply["error"]["code"] == "BAD_REQUEST"  # yourself
        status, reply = await http.call(method, "/v1/me/blocks/" + "x" * 100, "bob")
        assert status == 400 and reply["error"]["code"] == "BAD_REQUEST"
    status, reply = await http.call("PUT", "/v1/me/blocks/nobody", "bob")
    assert status == 404 and reply["error"]["code"] == "NOT_FOUND"
    status, reply = await http.call("PUT", "/v1/me/blocks/alice", None)
    assert status == 401


async def test_blocks_are_bounded(start_server: Start) -> None:
    server = await start_server(dm_blocks_max=1)
    _fan, _model, http = await people(server, tokens=0)
    carol = await server.client("carol")
    assert (await http.call("PUT", "/v1/me/blocks/bob", "alice", "model"))[0] == 200
    status, reply = await http.call("PUT", "/v1/me/blocks/carol", "alice", "model")
    assert status == 429 and reply["error"]["code"] == "LIMIT_EXCEEDED"
    await carol.close()


# --- reports -----------------------------------------------------------------------------


async def test_a_report_reaches_the_admin_queue_and_is_resolved_once(server: Running) -> None:
    _fan, _model, http = await people(server, tokens=0)
    status, filed = await http.call(
        "POST", "/v1/reports", "alice", "model", user="bob", message="tx123", reason="spam"
    )
    assert status == 201, filed
    assert (filed["reporter"], filed["user"], filed["message"], filed["state"]) == (
        "alice",
        "bob",
        "tx123",
        "open",
    )
    second = (await http.call("POST", "/v1/reports", "bob", user="alice", reason="rude"))[1]

    status, queue = await http.call("GET", "/v1/admin/reports?limit=1", "ops", "admin")
    assert status == 200 and [r["id"] for r in queue["reports"]] == [second["id"]]
    status, rest = await http.call(
        "GET", f"/v1/admin/reports?limit=1&before={queue['next']}", "ops", "admin"
    )
    assert [r["id"] for r in rest["reports"]] == [filed["id"]] and rest["next"] is None

    path = f"/v1/admin/reports/{filed['id']}/resolve"
    status, done = await http.call("POST", path, "ops", "admin", resolution="warned")
    assert status == 200 and done["state"] == "resolved" and done["resolved_by"] == "ops"
    status, again = await http.call("POST", path, "ops", "admin", resolution="other")
    assert status == 200 and again["already"] is True and again["resolution"] == "warned"
    status, open_ = await http.call("GET", "/v1/admin/reports", "ops", "admin")
    assert [r["id"] for r in open_["reports"]] == [second["id"]]
    status, resolved = await http.call("GET", "/v1/admin/reports?state=resolved", "ops", "admin")
    assert [r["id"] for r in resolved["reports"]] == [filed["id"]]
    # The admin's action is audited once (the repeat changed nothing).
    status, audit = await http.call("GET", "/v1/admin/audit", "ops", "admin")
    rows = [e for e in audit["entries"] if e["action"] == "report_resolve"]
    assert status == 200 and len(rows) == 1, audit
    assert rows[0]["actor"] == "ops" and rows[0]["detail"]["report"] == filed["id"]


async def test_reports_refuse_hostile_input_and_non_admins(server: Running) -> None:
    _fan, _model, http = await people(server, tokens=0)
    bad_bodies: list[dict[str, Any]] = [
        {"reason": "x"},
        {"user": "alice"},
        {"user": "alice", "reason": ""},
        {"user": "alice", "reason": "x" * 1001},
        {"user": "alice", "reason": 5},
        {"user": "alice", "reason": "x", "message": "m" * 200},
        {"user": ["alice"], "reason": "x"},
        {"user": "bob", "reason": "myself"},
    ]
    for body in bad_bodies:
        status, reply = await http.call("POST", "/v1/reports", "bob", **body)
        assert status == 400 and reply["error"]["code"] == "BAD_REQUEST", (body, reply)
    status, reply = await http.call("POST", "/v1/reports", "bob", user="nobody", reason="x")
    assert status == 404
    status, reply = await http.call("GET", "/v1/admin/reports", "bob")
    assert status == 403 and reply["error"]["code"] == "FORBIDDEN"
    status, reply = await http.call("POST", "/v1/admin/reports/1/resolve", "alice", "model")
    assert status == 403
    for path in ("/v1/admin/reports/999/resolve", "/v1/admin/reports/abc/resolve"):
        status, reply = await http.call("POST", path, "ops", "admin")
        assert status == 404, (path, reply)
    for query in ("state=nonsense", "before=-1", "before=x", "limit=0"):
        status, reply = await http.call("GET", f"/v1/admin/reports?{query}", "ops", "admin")
        assert status == 400, (query, reply)


async def test_a_rebuild_of_an_older_redis_drops_stale_blocks(server: Running, redis: Any) -> None:
    """A Redis restored from an older copy may hold a blocks set without a
    block Postgres has: the rebuild drops the sets with the balances, and the
    next DM loads the truth."""
    fan, _model, http = await people(server, tokens=0)
    status, _ = await http.call("PUT", "/v1/me/blocks/bob", "alice", "model")
    assert status == 200
    assert (await fan.request("dm", to="alice", text="x", key="d1"))["code"] == "FORBIDDEN"
    keys = server.node.keys
    await redis.srem(keys.blocks("alice"), "bob")  # what the older copy held
    await server.node.economy._rebuild()
    assert await redis.exists(keys.blocks("alice")) == 0
    refused = await fan.request("dm", to="alice", text="x", key="d2")
    assert refused["type"] == "error" and refused["code"] == "FORBIDDEN", refused


async def test_an_escrow_hold_is_in_the_fans_history_with_its_request(server: Running) -> None:
    fan, model, http = await people(server)
    offer = await fan.call("request_offer", model="alice", text="a photo", amount=30, key="o1")
    await drain(server)
    status, page = await http.call("GET", "/v1/me/transactions?kind=hold", "bob")
    assert status == 200, page
    [hold] = page["transactions"]
    assert (hold["tx"], hold["amount"], hold["request"]) == (offer["tx"], -30, offer["request"])
    assert hold["counterparty"] == f"esc:request:{offer['request']}"
    # The model is no party to the hold (the escrow is): NOT_FOUND for her.
    status, reply = await http.call("GET", f"/v1/me/transactions/{offer['tx']}", "alice", "model")
    assert status == 404, reply
    status, mine = await http.call("GET", f"/v1/me/transactions/{offer['tx']}", "bob")
    # To whom: the model the request is for, though the tokens sit in escrow.
    assert status == 200 and mine["to"] == "alice" and "earnings" not in mine
    await model.close()
