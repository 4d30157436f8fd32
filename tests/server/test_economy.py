"""The token economy through real clients: tips, DMs, credits, refunds,
purchases, prices, idempotency, and the ledger they leave in Postgres."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import pytest

from tests.conftest import Http, Running, pg
from tokenchat.client_demo.client import Client, CommandError
from tokenchat.server.config import Settings


@pytest.fixture
async def http(server: Running) -> Http:
    return Http(server)


async def room_with_fan(server: Running, http: Http, tokens: int) -> tuple[Client, Client]:
    model = await server.client("alice", "model")
    await model.call("join", room="alice")
    fan = await server.client("bob")
    await fan.call("join", room="alice")
    if tokens:
        await http.credit("bob", tokens)
        assert (await fan.next_event("balance"))["balance"] == tokens
    return model, fan


# --- credits and balances ------------------------------------------------------------


@pytest.mark.cluster
async def test_credit_shows_in_balance_welcome_and_me(server: Running, http: Http) -> None:
    reply = await http.credit("bob", 250, key="grant-1")
    assert reply["balance"] == 250 and isinstance(reply["tx"], str)
    again = await http.credit("bob", 250, key="grant-1")
    assert again == {**reply, "duplicate": True}
    client = await server.client("bob")
    assert client.welcome is not None and client.welcome["balance"] == 250
    assert (await client.call("balance"))["balance"] == 250
    status, me = await http.call("GET", "/v1/me", "bob")
    assert status == 200 and me["balance"] == 250
    await client.close()


@pytest.mark.parametrize("amount", [0, -5, 1.5, "10", True, None, 1_000_001, 10**30])
async def test_bad_credit_amounts_are_refused(http: Http, amount: object) -> None:
    status, reply = await http.call(
        "POST", "/v1/admin/credits", "ops", "admin", user="bob", amount=amount, key="k"
    )
    assert status == 400 and reply["error"]["code"] == "BAD_REQUEST"
    assert "'amount'" in reply["error"]["message"]
    status, me = await http.call("GET", "/v1/me", "bob")
    assert me["balance"] == 0


async def test_only_admins_credit(http: Http) -> None:
    status, reply = await http.call(
        "POST", "/v1/admin/credits", "bob", "fan", user="bob", amount=5, key="k"
    )
    assert status == 403 and reply["error"]["code"] == "FORBIDDEN"


# --- tips -----------------------------------------------------------------------------


async def test_tip_moves_tokens_and_every_member_sees_it(server: Running, http: Http) -> None:
    model, fan = await room_with_fan(server, http, 100)
    watcher = await server.client("carol")
    await watcher.call("join", room="alice")
    await fan.call("say", room="alice", text="before")
    reply = await fan.call("tip", room="alice", amount=30, key="tip-1", text="great show")
    assert reply["balance"] == 70 and reply["tx"] and reply["offset"]
    await fan.call("say", room="alice", text="after")
    pushed = []
    for member in (model, fan, watcher):
        kinds = []
        while len(kinds) < 3:
            event = await member.next_event()
            if event["type"] in ("message", "tip"):
                kinds.append(event)
            elif event["type"] == "balance":
                pushed.append((member, event["balance"]))
        assert [e["type"] for e in kinds] == ["message", "tip", "message"]
        tip = kinds[1]
        assert tip["from"] == "bob" and tip["amount"] == 30 and tip["text"] == "great show"
        assert tip["offset"] == reply["offset"] and tip["room"] == "alice"
    if not pushed:
        pushed.append((model, (await model.next_event("balance"))["balance"]))
    assert pushed == [(model, 30)], "only the model's balance was changed by someone else"
    assert (await model.call("balance"))["balance"] == 30
    for client in (model, fan, watcher):
        await client.close()


async def test_tip_refusals_move_nothing(server: Running, http: Http) -> None:
    model, fan = await room_with_fan(server, http, 10)
    status, _ = await http.call("PUT", "/v1/me/prices", "alice", "model", tip_min=5)
    assert status == 200
    cases = [
        ({"amount": 4}, "BAD_REQUEST"),  # under tip_min
        ({"amount": 11}, "INSUFFICIENT_FUNDS"),
        ({"amount": 0}, "BAD_REQUEST"),
        ({"amount": -3}, "BAD_REQUEST"),
        ({"amount": 2.5}, "BAD_REQUEST"),
        ({"amount": "5"}, "BAD_REQUEST"),
    ]
    for fields, code in cases:
        reply = await fan.request("tip", room="alice", key="k", **fields)
        assert reply["code"] == code, (fields, reply)
    assert (await fan.request("tip", room="alice", amount=5))["code"] == "BAD_REQUEST"  # no key
    # Beyond 64 bits: orjson on the client refuses it, so send the JSON by hand.
    await fan.send_raw(
        '{"type":"tip","id":"big","room":"alice","amount":1' + "0" * 20 + ',"key":"k"}'
    )
    huge = await fan.next_event("error")
    assert huge["re"] == "big" and huge["code"] == "BAD_REQUEST"
    assert (await model.request("tip", room="alice", amount=5, key="own"))["code"] == "FORBIDDEN"
    await fan.call("leave", room="alice")
    assert (await fan.request("tip", room="alice", amount=5, key="k"))["code"] == "NOT_IN_ROOM"
    assert (await fan.call("balance"))["balance"] == 10
    assert (await model.call("balance"))["balance"] == 0
    await fan.close()
    await model.close()


async def test_idempotency_duplicate_conflict_and_unburnt_keys(server: Running, http: Http) -> None:
    model, fan = await room_with_fan(server, http, 50)
    first = await fan.call("tip", room="alice", amount=20, key="same")
    again = await fan.call("tip", room="alice", amount=20, key="same")
    assert again == {**first, "re": again["re"], "duplicate": True}
    other_session = await server.client("bob")
    await other_session.call("join", room="alice")
    from_elsewhere = await other_session.call("tip", room="alice", amount=20, key="same")
    assert from_elsewhere["tx"] == first["tx"] and from_elsewhere["duplicate"] is True
    conflict = await fan.request("tip", room="alice", amount=21, key="same")
    assert conflict["code"] == "CONFLICT"
    assert (await fan.call("balance"))["balance"] == 30
    refused = await fan.request("tip", room="alice", amount=40, key="later")
    assert refused["code"] == "INSUFFICIENT_FUNDS"
    await http.credit("bob", 10)
    ok = await fan.call("tip", room="alice", amount=40, key="later")  # the key was not burnt
    assert ok["balance"] == 0 and "duplicate" not in ok
    for client in (model, fan, other_session):
        await client.close()


async def test_racing_sessions_spend_exactly_what_there_is(
    start_server: Callable[..., Awaitable[Running]],
) -> None:
    running = await start_server(
        commands_per_s=1000.0, commands_burst=1000, sessions_per_user_max=12
    )
    http = Http(running)
    await (await running.client("alice", "model")).close()
    await http.credit("bob", 100)
    sessions = [await running.client("bob") for _ in range(12)]
    for session in sessions:
        await session.call("join", room="alice")
    price = 7

    async def spend_all(session: Client, n: int) -> list[str]:
        replies = await asyncio.gather(
            *(session.request("tip", room="alice", amount=price, key=f"s{n}-{i}") for i in range(5))
        )
        return [r.get("code", "ok") for r in replies]

    results = [
        c for codes in await asyncio.gather(*map(spend_all, sessions, range(12))) for c in codes
    ]
    assert results.count("ok") == 100 // price
    assert results.count("INSUFFICIENT_FUNDS") == len(results) - 100 // price
    assert (await sessions[0].call("balance"))["balance"] == 100 % price
    assert (await http.reconcile())["ok"] is True
    for session in sessions:
        await session.close()


# --- DMs and prices --------------------------------------------------------------------


@pytest.mark.cluster
async def test_paid_dm_reaches_every_session_and_respects_max_price(
    server: Running, http: Http
) -> None:
    status, prices = await http.call("PUT", "/v1/me/prices", "alice", "model", dm=10)
    assert status == 200 and prices == {"dm": 10, "tip_min": 1}
    tabs = [await server.client("alice", "model") for _ in range(2)]
    fan = await server.client("bob")
    await http.credit("bob", 25)
    refused = await fan.request("dm", to="alice", text="hi", key="d1", max_price=5)
    assert refused["code"] == "PRICE_CHANGED" and "10" in refused["message"]
    reply = await fan.call("dm", to="alice", text="hi", key="d1", max_price=10)
    assert reply["price"] == 10 and reply["balance"] == 15
    for tab in tabs:
        event = await tab.next_event("dm")
        assert event["from"] == "bob" and event["text"] == "hi" and event["price"] == 10
        assert event["tx"] == reply["tx"] and isinstance(event["ts"], int)
        assert (await tab.next_event("balance"))["balance"] == 10
    again = await fan.call("dm", to="alice", text="hi", key="d1", max_price=10)
    assert again["duplicate"] is True and again["tx"] == reply["tx"]
    assert (await fan.request("dm", to="nobody", text="x", key="d2"))["code"] == "NOT_FOUND"
    assert (await fan.request("dm", to="bob", text="x", key="d3"))["code"] == "FORBIDDEN"
    assert (await fan.call("dm", to="alice", text="second", key="d4"))["balance"] == 5
    assert (await fan.request("dm", to="alice", text="x", key="d5"))["code"] == "INSUFFICIENT_FUNDS"
    for client in (*tabs, fan):
        await client.close()


@pytest.mark.cluster
async def test_dm_to_an_offline_user_waits_for_their_next_hello(
    server: Running, http: Http
) -> None:
    await (await server.client("alice", "model")).close()
    fan = await server.client("bob")
    await fan.call("dm", to="alice", text="are you there?", key="d1")  # free: price 0
    await fan.call("dm", to="alice", text="second", key="d2")
    model = await server.client("alice", "model")
    texts = [(await model.next_event("dm"))["text"] for _ in range(2)]
    assert texts == ["are you there?", "second"]
    await model.close()
    again = await server.client("alice", "model")  # delivered once, not at every hello
    await again.call("ping")
    await asyncio.sleep(0.1)
    assert again.events.empty()
    await again.close()
    await fan.close()


@pytest.mark.parametrize(
    "body", [{"dm": -1}, {"dm": 1_000_001}, {"dm": 1.5}, {"dm": True}, {"tip_min": 0}, {}]
)
async def test_bad_prices_are_refused(server: Running, http: Http, body: dict[str, Any]) -> None:
    await (await server.client("alice", "model")).close()
    status, reply = await http.call("PUT", "/v1/me/prices", "alice", "model", **body)
    assert status == 400 and reply["error"]["code"] == "BAD_REQUEST"


async def test_only_models_set_prices(http: Http) -> None:
    status, reply = await http.call("PUT", "/v1/me/prices", "bob", "fan", dm=5)
    assert status == 403 and reply["error"]["code"] == "FORBIDDEN"


# --- purchases ----------------------------------------------------------------------------


async def test_purchase_credits_a_bundle_once_per_payment(
    start_server: Callable[..., Awaitable[Running]],
) -> None:
    running = await start_server(payment_provider="fake")
    http = Http(running)
    status, listed = await http.call("GET", "/v1/bundles")
    bundles = {b["id"]: b for b in listed["bundles"]}
    assert bundles["starter"] == {
        "id": "starter",
        "tokens": 100,
        "price_cents": 999,
        "discount_pct": 0,
    }
    assert bundles["whale"]["discount_pct"] > bundles["fan"]["discount_pct"] > 0
    status, bought = await http.call(
        "POST", "/v1/purchases", "bob", bundle="fan", payment_ref="pay-1"
    )
    assert status == 200 and bought["balance"] == 550 and bought["tokens"] == 550
    status, again = await http.call(
        "POST", "/v1/purchases", "bob", bundle="fan", payment_ref="pay-1"
    )
    assert again["duplicate"] is True and again["tx"] == bought["tx"] and again["balance"] == 550
    status, stolen = await http.call(
        "POST", "/v1/purchases", "eve", bundle="fan", payment_ref="pay-1"
    )
    assert status == 409 and stolen["error"]["code"] == "CONFLICT"
    status, declined = await http.call(
        "POST", "/v1/purchases", "bob", bundle="fan", payment_ref="declined-2"
    )
    assert status == 403 and declined["error"]["code"] == "FORBIDDEN"
    status, missing = await http.call(
        "POST", "/v1/purchases", "bob", bundle="nope", payment_ref="p3"
    )
    assert status == 404 and missing["error"]["code"] == "NOT_FOUND"
    status, me = await http.call("GET", "/v1/me", "bob")
    assert me["balance"] == 550
    assert (await http.reconcile())["ok"] is True


async def test_purchases_are_refused_without_a_provider(http: Http) -> None:
    status, reply = await http.call("POST", "/v1/purchases", "bob", bundle="fan", payment_ref="p")
    assert status == 503 and reply["error"]["code"] == "UNAVAILABLE"


# --- refunds ------------------------------------------------------------------------------


async def test_refund_rules(server: Running, http: Http, settings: Settings) -> None:
    model, fan = await room_with_fan(server, http, 100)
    tip = await fan.call("tip", room="alice", amount=40, key="t1")
    status, refund = await http.call(
        "POST", "/v1/admin/refunds", "ops", "admin", tx=tip["tx"], key="r1"
    )
    assert status == 200, refund
    assert refund["balance"] == 100 and refund["refunds"] == tip["tx"]
    assert (await fan.next_event("balance"))["balance"] == 100
    assert (await model.call("balance"))["balance"] == 0
    status, again = await http.call(
        "POST", "/v1/admin/refunds", "ops", "admin", tx=tip["tx"], key="r1"
    )
    assert status == 200 and again["duplicate"] is True and again["tx"] == refund["tx"]
    status, second = await http.call(
        "POST", "/v1/admin/refunds", "ops", "admin", tx=tip["tx"], key="r2"
    )
    assert status == 409 and second["error"]["code"] == "CONFLICT"
    status, of_refund = await http.call(
        "POST", "/v1/admin/refunds", "ops", "admin", tx=refund["tx"], key="r3"
    )
    assert status == 409 and "refund" in of_refund["error"]["message"]
    credit = await http.credit("bob", 5)
    status, of_credit = await http.call(
        "POST", "/v1/admin/refunds", "ops", "admin", tx=credit["tx"], key="r4"
    )
    assert status == 409 and of_credit["error"]["code"] == "CONFLICT"
    status, unknown = await http.call(
        "POST", "/v1/admin/refunds", "ops", "admin", tx="0" * 32, key="r5"
    )
    assert status == 404 and unknown["error"]["code"] == "NOT_FOUND"
    # A model who spent her tips cannot be refunded into debt.
    tip2 = await fan.call("tip", room="alice", amount=50, key="t2")
    await (await server.client("dora", "model")).close()
    await model.call("join", room="dora")
    await model.call("tip", room="dora", amount=50, key="spent")
    status, into_debt = await http.call(
        "POST", "/v1/admin/refunds", "ops", "admin", tx=tip2["tx"], key="r6"
    )
    assert status == 409 and into_debt["error"]["code"] == "INSUFFICIENT_FUNDS"
    await fan.close()
    result = await http.reconcile()
    assert result["ok"] is True, result
    rows = await pg(
        settings, "SELECT kind, reverses FROM ledger_transactions WHERE reverses IS NOT NULL"
    )
    assert [(r["kind"], r["reverses"]) for r in rows] == [("refund", tip["tx"])]
    assert tip2["balance"] == 55
    await model.close()


# --- the ledger ---------------------------------------------------------------------------


async def test_every_acknowledged_spend_is_in_the_ledger_once(
    server: Running, http: Http, settings: Settings
) -> None:
    model, fan = await room_with_fan(server, http, 100)
    await http.call("PUT", "/v1/me/prices", "alice", "model", dm=3)
    tips = [await fan.call("tip", room="alice", amount=5, key=f"t{i}") for i in range(4)]
    dm = await fan.call("dm", to="alice", text="hello", key="d1")
    await fan.call("tip", room="alice", amount=5, key="t0")  # a duplicate
    result = await http.reconcile()
    assert result == {**result, "ok": True, "pending": 0, "mismatches": [], "issued": 100}
    rows = await pg(settings, "SELECT id, kind FROM ledger_transactions ORDER BY applied_ms")
    assert [r["kind"] for r in rows] == ["credit", "tip", "tip", "tip", "tip", "dm"]
    assert [r["id"] for r in rows[1:]] == [t["tx"] for t in tips] + [dm["tx"]]
    balances = {
        r["id"]: r["balance"] for r in await pg(settings, "SELECT id, balance FROM accounts")
    }
    assert balances["u:bob"] == 77 and balances["u:alice"] == 23 and balances["sys:mint"] == -100
    for statement in ("UPDATE ledger_postings SET amount = 1", "DELETE FROM ledger_transactions"):
        with pytest.raises(asyncpg.RaiseError, match="append-only"):
            await pg(settings, statement)
    await fan.close()
    await model.close()


async def test_unbalanced_transactions_cannot_be_committed(
    server: Running, settings: Settings
) -> None:
    conn = await asyncpg.connect(settings.database_url)
    try:
        await conn.execute(f'SET search_path TO "{settings.database_schema}"')
        with pytest.raises(asyncpg.CheckViolationError, match="unbalanced"):
            async with conn.transaction():
                await conn.execute(
                    """INSERT INTO ledger_transactions (id, kind, initiator, idem_key, request,
                           reply, applied_ms, outbox_id)
                       VALUES ('x', 'credit', 'ops', 'k', '{}', '{}', 0, '0-1')"""
                )
                await conn.execute(
                    "INSERT INTO ledger_postings VALUES ('x', 'sys:mint', -5), ('x', 'sys:fees', 4)"
                )
        with pytest.raises(asyncpg.CheckViolationError):
            await conn.execute("UPDATE accounts SET balance = -1 WHERE id = 'sys:fees'")
    finally:
        await conn.close()


async def test_a_fan_cannot_spend_what_a_client_error_never_charged(
    server: Running, http: Http
) -> None:
    model, fan = await room_with_fan(server, http, 10)
    with pytest.raises(CommandError):
        await fan.call("tip", room="alice", amount=11, key="too-much")
    assert (await http.reconcile())["issued"] == 10
    await fan.close()
    await model.close()


async def test_spends_survive_redis_forgetting_its_scripts(
    server: Running, http: Http, redis: Any
) -> None:
    # Every server loaded script survives this: NOSCRIPT makes them load again.
    model, fan = await room_with_fan(server, http, 10)
    await fan.call("tip", room="alice", amount=2, key="before")
    await redis.script_flush()
    reply = await fan.call("tip", room="alice", amount=3, key="after")
    assert reply["balance"] == 5
    await fan.call("say", room="alice", text="chat scripts reload too")
    assert (await http.reconcile())["ok"] is True
    await fan.close()
    await model.close()


async def test_a_tip_retried_after_tip_min_rose_is_still_its_original(
    server: Running, http: Http
) -> None:
    model, fan = await room_with_fan(server, http, 100)
    first = await fan.call("tip", room="alice", amount=5, key="early")
    status, _ = await http.call("PUT", "/v1/me/prices", "alice", "model", tip_min=50)
    assert status == 200
    again = await fan.call("tip", room="alice", amount=5, key="early")
    assert again["duplicate"] is True and again["tx"] == first["tx"]
    refused = await fan.request("tip", room="alice", amount=5, key="late")
    assert refused["code"] == "BAD_REQUEST" and "tip_min, 50" in refused["message"]
    assert (await fan.call("balance"))["balance"] == 95
    await fan.close()
    await model.close()


# --- initiators, unknown users, the writer's pool, create limits ------------------------


async def test_a_user_named_payments_cannot_block_a_purchase(
    start_server: Callable[..., Awaitable[Running]], settings: Settings
) -> None:
    running = await start_server(payment_provider="fake")
    http = Http(running)
    model = await running.client("alice", "model")
    await model.call("join", room="alice")
    squatter = await running.client("payments")  # a user id that once named the system
    await squatter.call("join", room="alice")
    await http.credit("payments", 10)
    # Before namespaces, this key was the very key bob's purchase below needs.
    await squatter.call("tip", room="alice", amount=1, key="pay-77")
    status, bought = await http.call(
        "POST", "/v1/purchases", "bob", bundle="starter", payment_ref="pay-77"
    )
    assert status == 200, bought
    assert bought["balance"] == 100 and "duplicate" not in bought
    await eventually_rows(
        settings, 2, "SELECT 1 FROM ledger_transactions WHERE idem_key = 'pay-77'"
    )
    rows = await pg(
        settings,
        "SELECT kind, initiator FROM ledger_transactions WHERE idem_key = 'pay-77' ORDER BY kind",
    )
    assert [(r["kind"], r["initiator"]) for r in rows] == [
        ("purchase", "sys:payments"),
        ("tip", "u:payments"),
    ]
    assert (await http.reconcile())["ok"] is True
    await squatter.close()
    await model.close()


async def eventually_rows(settings: Settings, count: int, sql: str) -> None:
    """Wait for the ledger writer to have written ``count`` rows of ``sql``."""
    async with asyncio.timeout(10):
        while len(await pg(settings, sql)) < count:  # noqa: ASYNC110 - polling Postgres
            await asyncio.sleep(0.05)


async def test_migration_0003_rewrites_the_old_initiators(settings: Settings) -> None:
    from tokenchat.server.db import load_migrations

    first, second, third = load_migrations()[:3]
    assert third.name == "initiator_namespaces"
    schema = settings.database_schema + "_old"
    conn = await asyncpg.connect(settings.database_url)
    try:
        await conn.execute(f'CREATE SCHEMA "{schema}"; SET search_path TO "{schema}"')
        await conn.execute(first.sql)
        await conn.execute(second.sql)
        old = [  # (id, kind, initiator, meta): rows as written before namespaces
            ("t1", "tip", "bob", "{}"),
            ("p1", "purchase", "payments", '{"bundle": "fan"}'),
            ("c1", "credit", "tokenchat-dev", "{}"),
            ("c2", "credit", "ops", '{"by": "ops"}'),
            ("c3", "credit", "tokenchat-dev", '{"by": "tokenchat-dev"}'),  # an admin so named
            ("t2", "tip", "payments", "{}"),  # a user so named
        ]
        async with conn.transaction():
            for tx, kind, initiator, meta in old:
                await conn.execute(
                    """INSERT INTO ledger_transactions (id, kind, initiator, idem_key, request,
                           reply, meta, applied_ms, outbox_id)
                       VALUES ($1, $2, $3, 'k', '[]', '{}', $4::jsonb, 0, '0-1')""",
                    tx,
                    kind,
                    initiator,
                    meta,
                )
                await conn.execute(
                    "INSERT INTO ledger_postings VALUES ($1, 'sys:mint', -1), ($1, 'sys:fees', 1)",
                    tx,
                )
        async with conn.transaction():
            await conn.execute(third.sql)
        rows = await conn.fetch("SELECT id, initiator FROM ledger_transactions ORDER BY id")
        assert {r["id"]: r["initiator"] for r in rows} == {
            "c1": "sys:dev",
            "c2": "u:ops",
            "c3": "u:tokenchat-dev",
            "p1": "sys:payments",
            "t1": "u:bob",
            "t2": "u:payments",
        }
        # The ledger is append-only again once the migration is done.
        with pytest.raises(asyncpg.RaiseError, match="append-only"):
            await conn.execute("UPDATE ledger_transactions SET initiator = 'x'")
    finally:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await conn.close()


async def test_a_dm_to_an_unknown_user_leaves_no_key(
    server: Running, http: Http, settings: Settings, redis: Any
) -> None:
    await http.credit("bob", 10)
    fan = await server.client("bob")
    before = {key async for key in redis.scan_iter(match=f"{settings.redis_prefix}*")}
    with pytest.raises(CommandError) as refused:
        await fan.call("dm", to="ghost", text="anyone?", key="d1")
    assert refused.value.code == "NOT_FOUND"
    status, reply = await http.call("GET", "/v1/users/ghost/prices", "bob")
    assert status == 404 and reply["error"]["code"] == "NOT_FOUND"
    after = {key async for key in redis.scan_iter(match=f"{settings.redis_prefix}*")}
    assert [key for key in after - before if b"ghost" in key] == []
    assert (await fan.call("balance"))["balance"] == 10
    await fan.close()


async def test_unknown_users_are_remembered_until_they_exist(
    start_server: Callable[..., Awaitable[Running]], postgres_proxy: Any
) -> None:
    running = await start_server(database_url=postgres_proxy.url, database_timeout_s=1.0)
    http = Http(running)
    await http.credit("bob", 10)
    fan = await running.client("bob")
    with pytest.raises(CommandError) as first:
        await fan.call("dm", to="ghost", text="hi", key="d1")
    assert first.value.code == "NOT_FOUND"

    # With Postgres gone, a known-absent user is still answered at once, from
    # memory: a flood of DMs to made-up names does not reach Postgres.
    await postgres_proxy.cut()
    for i in range(20):
        with pytest.raises(CommandError) as again:
            await fan.call("dm", to="ghost", text="hi", key=f"d{i + 2}")
        assert again.value.code == "NOT_FOUND"
    with pytest.raises(CommandError) as other:  # a name never looked up needs Postgres
        await fan.call("dm", to="ghost2", text="hi", key="e1")
    assert other.value.code == "UNAVAILABLE"
    await postgres_proxy.restore()

    # The user appears (hello on this process): the DM goes through at once.
    ghost = await running.client("ghost")
    reply = await fan.call("dm", to="ghost", text="found you", key="d99")
    assert reply["price"] == 0
    assert (await ghost.next_event("dm"))["text"] == "found you"
    await ghost.close()
    await fan.close()


async def test_the_ledger_writer_is_not_starved_by_a_full_pool(
    start_server: Callable[..., Awaitable[Running]], settings: Settings
) -> None:
    running = await start_server(database_pool_min=0, database_pool_max=2)
    http = Http(running)
    model, fan = await room_with_fan(running, http, 50)
    node = running.process.node
    assert node is not None and node.ledger_pool is not node.pool
    await eventually_rows(settings, 1, "SELECT 1 FROM ledger_transactions")
    # An HTTP flood holds every connection of the main pool...
    held = [await node.pool.acquire() for _ in range(2)]
    try:
        tip = await fan.call("tip", room="alice", amount=7, key="starved")
        # ...and the writer still moves the tip to Postgres.
        await eventually_rows(
            settings, 1, f"SELECT 1 FROM ledger_transactions WHERE id = '{tip['tx']}'"
        )
    finally:
        for conn in held:
            await node.pool.release(conn)
    await model.close()
    await fan.close()


async def test_purchases_are_rate_limited_per_user(
    start_server: Callable[..., Awaitable[Running]],
) -> None:
    running = await start_server(
        payment_provider="fake", http_creates_burst=2, http_creates_per_s=0.01
    )
    http = Http(running)
    for ref in ("r1", "r2"):
        status, reply = await http.call(
            "POST", "/v1/purchases", "bob", bundle="starter", payment_ref=ref
        )
        assert status == 200, reply
    status, reply = await http.call(
        "POST", "/v1/purchases", "bob", bundle="starter", payment_ref="r3"
    )
    assert status == 429 and reply["error"]["code"] == "RATE_LIMITED"
    # Nothing was credited for the refused one; another user has a bucket of their own.
    assert (await http.call("GET", "/v1/me", "bob"))[1]["balance"] == 200
    status, _ = await http.call("POST", "/v1/purchases", "eve", bundle="starter", payment_ref="r4")
    assert status == 200
