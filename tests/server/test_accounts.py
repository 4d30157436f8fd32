"""Payment webhooks, refunds and chargebacks, data export and account
deletion (issue #13 section 4), against real Redis, Postgres and server
processes: signed events credit and claw back exactly once, every refusal
moves nothing, the shortfall of a chargeback after a spend is recorded, and
the books reconcile after each."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import orjson
import pytest
from redis.asyncio import Redis

from tests.conftest import Http, Running, eventually, pg, token
from tests.proxy import Proxy
from tokenchat.client_demo import client as sdk
from tokenchat.server.http.payments import sign_webhook

Start = Callable[..., Awaitable[Running]]
SECRET = "whsec_test_0123456789abcdef"


async def webhook(
    server: Running,
    event: dict[str, Any] | bytes,
    *,
    secret: str = SECRET,
    timestamp: int | None = None,
    header: str | None = None,
) -> tuple[int, Any]:
    body = event if isinstance(event, bytes) else orjson.dumps(event)
    if header is None:
        header = sign_webhook(secret, body, int(time.time()) if timestamp is None else timestamp)
    async with httpx.AsyncClient(base_url=server.http_url, timeout=30) as http:
        response = await http.post(
            "/v1/payments/webhook",
            content=body,
            headers={"Payment-Signature": header, "Content-Type": "application/json"},
        )
    return response.status_code, response.json()


def confirmed(
    ref: str, user: str = "bob", bundle: str = "starter", cents: int = 999
) -> dict[str, Any]:
    return {
        "id": f"evt_{uuid.uuid4().hex}",
        "type": "payment.confirmed",
        "data": {"payment_ref": ref, "user": user, "bundle": bundle, "amount_cents": cents},
    }


def reversed_(ref: str, kind: str = "payment.charged_back") -> dict[str, Any]:
    return {"id": f"evt_{uuid.uuid4().hex}", "type": kind, "data": {"payment_ref": ref}}


async def paid_server(start_server: Start, **overrides: Any) -> Running:
    return await start_server(payment_provider="fake", payment_webhook_secret=SECRET, **overrides)


async def balance_of(http: Http, user: str) -> int:
    status, me = await http.call("GET", "/v1/me", user)
    assert status == 200, me
    return int(me["balance"])


async def drained(server: Running) -> None:
    assert await server.node.ledger.drain(10.0) == 0


# --- webhooks ----------------------------------------------------------------------------


async def test_a_confirmed_payment_credits_once_whatever_is_replayed(start_server: Start) -> None:
    server = await paid_server(start_server)
    http = Http(server)
    await http.call("GET", "/v1/me", "bob")  # bob exists
    event = confirmed("pi_1")
    status, reply = await webhook(server, event)
    assert status == 200, reply
    assert reply["tokens"] == 100 and reply["balance"] == 100 and "duplicate" not in reply
    # The same event again (the provider retries): answered from the record.
    status, again = await webhook(server, event)
    assert status == 200 and again["duplicate"] is True and again["tx"] == reply["tx"]
    # Another event for the same payment, and the client's own purchase call
    # with the provider's payment id: the bundle is not credited twice.
    status, other = await webhook(server, confirmed("pi_1"))
    assert status == 200 and other["duplicate"] is True
    status, bought = await http.call(
        "POST", "/v1/purchases", "bob", bundle="starter", payment_ref="pi_1"
    )
    assert status == 200 and bought["duplicate"] is True
    assert await balance_of(http, "bob") == 100
    rows = await pg(server.process.settings, "SELECT count(*) AS n FROM payment_events")
    assert rows[0]["n"] == 2
    assert (await http.reconcile())["ok"] is True


async def test_bad_signatures_stale_timestamps_and_hostile_events_apply_nothing(
    start_server: Start,
) -> None:
    server = await paid_server(start_server, payment_webhook_tolerance_s=60)
    http = Http(server)
    await http.call("GET", "/v1/me", "bob")
    event = confirmed("pi_bad")
    body = orjson.dumps(event)
    now = int(time.time())
    refusals = [
        await webhook(server, event, secret="whsec_someone_else"),
        await webhook(server, event, timestamp=now - 600),  # a capture replayed late
        await webhook(server, event, timestamp=now + 600),
        await webhook(server, event, header=""),
        await webhook(server, event, header="t=abc,v1=00"),
        await webhook(server, event, header=f"t={now}"),
        await webhook(server, event, header="v1=" + "0" * 64),
        await webhook(server, event, header="x" * 5000),
        # A valid signature of another body.
        await webhook(server, event, header=sign_webhook(SECRET, body + b" ", now)),
    ]
    assert [status for status, _ in refusals] == [401] * len(refusals), refusals
    assert all(r["error"]["code"] == "UNAUTHENTICATED" for _, r in refusals)
    # Signed, but wrong: each refused with nothing credited.
    hostile: list[tuple[Any, int]] = [
        (b"not json", 400),
        (b"[1, 2]", 400),
        ({**event, "id": 5}, 400),
        ({**event, "id": "x" * 200}, 400),
        ({**event, "type": "payment.stolen"}, 400),
        ({**event, "data": "pi"}, 400),
        ({**event, "data": {**event["data"], "payment_ref": ""}}, 400),
        ({**event, "data": {**event["data"], "payment_ref": "p" * 129}}, 400),
        ({**event, "data": {**event["data"], "amount_cents": 1}}, 409),
        ({**event, "data": {**event["data"], "amount_cents": True}}, 400),
        ({**event, "data": {**event["data"], "amount_cents": 2**62}}, 400),
        (orjson.dumps(event).replace(b'"amount_cents":999', b'"amount_cents":1' + b"0" * 40), 400),
        ({**event, "data": {**event["data"], "bundle": "nope"}}, 404),
        ({**event, "data": {**event["data"], "user": "nobody"}}, 404),
        # Not a user id: Postgres cannot store NUL, and spaces split postings.
        ({**event, "data": {**event["data"], "user": "b\x00b"}}, 400),
        ({**event, "data": {**event["data"], "user": "bob bob"}}, 400),
        (reversed_("pi_never_bought"), 404),
    ]
    for body_or_event, expected in hostile:
        status, reply = await webhook(server, body_or_event)
        assert status == expected, (body_or_event, reply)
    async with httpx.AsyncClient(base_url=server.http_url) as client:
        huge = b"{" + b" " * 20_000 + b"}"
        response = await client.post(
            "/v1/payments/webhook",
            content=huge,
            headers={"Payment-Signature": sign_webhook(SECRET, huge, now)},
        )
        assert response.status_code == 400
    assert await balance_of(http, "bob") == 0
    assert (await pg(server.process.settings, "SELECT count(*) AS n FROM payment_events"))[0][
        "n"
    ] == 0
    # The same event id again with other fields: CONFLICT.
    assert (await webhook(server, event))[0] == 200
    status, reply = await webhook(server, {**event, "type": "payment.refunded"})
    assert status == 409 and reply["error"]["code"] == "CONFLICT"
    assert await balance_of(http, "bob") == 100
    assert (await http.reconcile())["ok"] is True


async def test_webhooks_are_refused_without_a_secret(start_server: Start) -> None:
    server = await start_server(payment_provider="fake")
    status, reply = await webhook(server, confirmed("pi_x"))
    assert status == 503 and reply["error"]["code"] == "UNAVAILABLE"


# --- refunds and chargebacks -------------------------------------------------------------


async def test_a_chargeback_after_a_partial_spend_claws_back_the_rest_and_records_the_shortfall(
    start_server: Start,
) -> None:
    server = await paid_server(start_server)
    http = Http(server)
    model = await server.client("alice", "model")
    fan = await server.client("bob")
    assert (await webhook(server, confirmed("pi_cb")))[0] == 200
    await fan.call("join", room="alice")
    await fan.call("tip", room="alice", amount=30, key="t1")
    await drained(server)

    event = reversed_("pi_cb")
    status, reply = await webhook(server, event)
    assert status == 200, reply
    assert (reply["tokens"], reply["clawed"], reply["shortfall"]) == (100, 70, 30)
    # The fan's session is told (pushes: 100 bought, 70 after the tip, then 0).
    while (await fan.next_event("balance"))["balance"] != 0:
        pass
    assert await balance_of(http, "bob") == 0
    assert await balance_of(http, "alice") == 30  # her earning is not taken
    # Durable: the shortfall row and the admin's flag.
    settings = server.process.settings
    rows = await pg(settings, "SELECT * FROM payment_reversals WHERE payment_ref = 'pi_cb'")
    assert (rows[0]["kind"], rows[0]["clawed"], rows[0]["shortfall"]) == ("chargeback", 70, 30)
    status, flags = await http.call("GET", "/v1/admin/flags", "ops", "admin")
    assert status == 200
    assert [(f["user"], f["reason"], f["shortfall"]) for f in flags["flags"]] == [
        ("bob", "chargeback", 30)
    ]
    assert (await http.call("GET", "/v1/admin/flags", "bob"))[0] == 403
    # The ledger: a `chargeback` from bob into the mint.
    await drained(server)
    posted = await pg(
        settings,
        """SELECT p.account_id, p.amount FROM ledger_postings p
             JOIN ledger_transactions t ON t.id = p.tx_id
            WHERE t.kind = 'chargeback' ORDER BY p.amount""",
    )
    assert [(r["account_id"], r["amount"]) for r in posted] == [("u:bob", -70), ("sys:mint", 70)]
    assert (await http.reconcile())["ok"] is True

    # Replays: the same event, a refund of the same payment later: nothing more.
    status, again = await webhook(server, event)
    assert status == 200 and again["duplicate"] is True and again["clawed"] == 70
    status, refund = await webhook(server, reversed_("pi_cb", "payment.refunded"))
    assert status == 200 and refund["reversed_as"] == "chargeback" and refund["clawed"] == 70
    assert await balance_of(http, "bob") == 0
    status, flags = await http.call("GET", "/v1/admin/flags", "ops", "admin")
    assert len(flags["flags"]) == 1
    assert (await http.reconcile())["ok"] is True
    await model.close()
    await fan.close()


async def test_a_refund_claws_back_without_a_flag_and_survives_redis_losing_its_data(
    start_server: Start, redis: Redis
) -> None:
    server = await paid_server(start_server)
    http = Http(server)
    await http.call("GET", "/v1/me", "bob")
    assert (await webhook(server, confirmed("pi_rf")))[0] == 200
    assert (await webhook(server, confirmed("pi_keep")))[0] == 200
    status, reply = await webhook(server, reversed_("pi_rf", "payment.refunded"))
    assert status == 200 and (reply["clawed"], reply["shortfall"]) == (100, 0)
    assert await balance_of(http, "bob") == 100
    status, flags = await http.call("GET", "/v1/admin/flags", "ops", "admin")
    assert flags["flags"] == []
    await drained(server)
    # Redis loses everything: the reversal's record in Postgres still stops a
    # second clawback (a chargeback of the same payment, a new event id).
    prefix = server.process.settings.redis_prefix
    keys = [key async for key in redis.scan_iter(match=f"{prefix}*")]
    await redis.delete(*keys)
    status, charged = await webhook(server, reversed_("pi_rf"))
    assert status == 200 and charged["reversed_as"] == "refund" and charged["clawed"] == 100
    assert await balance_of(http, "bob") == 100
    # A chargeback of a refunded payment still flags the account.
    status, flags = await http.call("GET", "/v1/admin/flags", "ops", "admin")
    assert [f["payment_ref"] for f in flags["flags"]] == ["pi_rf"]
    assert (await http.reconcile())["ok"] is True


async def test_a_chargeback_of_an_unspent_purchase_with_nothing_left_moves_nothing(
    start_server: Start,
) -> None:
    server = await paid_server(start_server)
    http = Http(server)
    fan = await server.client("bob")
    await server.client("alice", "model")
    assert (await webhook(server, confirmed("pi_all")))[0] == 200
    await fan.call("join", room="alice")
    await fan.call("tip", room="alice", amount=100, key="all")
    status, reply = await webhook(server, reversed_("pi_all"))
    assert status == 200 and (reply["clawed"], reply["shortfall"]) == (0, 100)
    await drained(server)
    rows = await pg(
        server.process.settings,
        "SELECT count(*) AS n FROM ledger_transactions WHERE kind = 'chargeback'",
    )
    assert rows[0]["n"] == 0  # nothing moved: no transaction
    assert await balance_of(http, "bob") == 0
    assert (await http.reconcile())["ok"] is True


async def test_an_admin_resolves_a_flag_once_and_the_audit_log_says_who(
    start_server: Start,
) -> None:
    server = await paid_server(start_server)
    http = Http(server)
    await http.call("GET", "/v1/me", "bob")
    for ref in ("pi_f1", "pi_f2"):
        assert (await webhook(server, confirmed(ref)))[0] == 200
        assert (await webhook(server, reversed_(ref)))[0] == 200
    status, flags = await http.call("GET", "/v1/admin/flags?state=open", "ops", "admin")
    assert status == 200
    assert [(f["payment_ref"], f["state"], f["resolved_by"]) for f in flags["flags"]] == [
        ("pi_f2", "open", None),
        ("pi_f1", "open", None),
    ]
    first = flags["flags"][1]["id"]

    # Refusals change nothing: a fan, a note too long or not text, no such flag.
    path = f"/v1/admin/flags/{first}/resolve"
    assert (await http.call("POST", path, "bob", resolution="mine"))[0] == 403
    status, bad = await http.call("POST", path, "ops", "admin", resolution="x" * 1001)
    assert status == 400 and bad["error"]["code"] == "BAD_REQUEST"
    assert (await http.call("POST", path, "ops", "admin", resolution=7))[0] == 400
    assert (await http.call("POST", "/v1/admin/flags/999999/resolve", "ops", "admin"))[0] == 404
    assert (await http.call("POST", "/v1/admin/flags/x1/resolve", "ops", "admin"))[0] == 404
    status, still = await http.call("GET", "/v1/admin/flags?state=open", "ops", "admin")
    assert len(still["flags"]) == 2

    status, resolved = await http.call("POST", path, "ops", "admin", resolution="card replaced")
    assert status == 200, resolved
    assert (resolved["id"], resolved["state"], resolved["resolution"]) == (
        first,
        "resolved",
        "card replaced",
    )
    assert resolved["resolved_by"] == "ops" and resolved["resolved_ts"] >= resolved["ts"]
    assert "already" not in resolved
    # Again (a retried click, another admin): nothing changes, one audit row.
    status, again = await http.call("POST", path, "root", "admin", resolution="other words")
    assert status == 200 and again["already"] is True
    assert (again["resolution"], again["resolved_by"]) == ("card replaced", "ops")
    status, audit = await http.call("GET", "/v1/admin/audit", "ops", "admin")
    rows = [e for e in audit["entries"] if e["action"] == "flag_resolve"]
    assert [(e["actor"], e["target"], e["detail"]) for e in rows] == [
        (
            "ops",
            "bob",
            {
                "flag": first,
                "reason": "chargeback",
                "payment_ref": "pi_f1",
                "shortfall": 0,
                "resolution": "card replaced",
            },
        )
    ]

    # The listing by state, and the default (all).
    status, open_ = await http.call("GET", "/v1/admin/flags?state=open", "ops", "admin")
    assert [f["payment_ref"] for f in open_["flags"]] == ["pi_f2"]
    status, done = await http.call("GET", "/v1/admin/flags?state=resolved", "ops", "admin")
    assert [f["payment_ref"] for f in done["flags"]] == ["pi_f1"]
    status, every = await http.call("GET", "/v1/admin/flags", "ops", "admin")
    assert [f["state"] for f in every["flags"]] == ["open", "resolved"]
    assert (await http.call("GET", "/v1/admin/flags?state=closed", "ops", "admin"))[0] == 400
    # Without a note, too, through the client library.
    admin = token("ops", "admin")
    plain = await sdk.resolve_flag(server.http_url, admin, open_["flags"][0]["id"])
    assert plain["state"] == "resolved" and plain["resolution"] is None
    listed = await sdk.account_flags(server.http_url, admin, state="open")
    assert listed["flags"] == []


async def test_admins_resolving_one_flag_at_once_close_it_once(start_server: Start) -> None:
    server = await paid_server(start_server)
    http = Http(server)
    await http.call("GET", "/v1/me", "bob")
    assert (await webhook(server, confirmed("pi_race")))[0] == 200
    assert (await webhook(server, reversed_("pi_race")))[0] == 200
    status, flags = await http.call("GET", "/v1/admin/flags", "ops", "admin")
    assert status == 200, flags
    path = f"/v1/admin/flags/{flags['flags'][0]['id']}/resolve"
    replies = await asyncio.gather(
        *(http.call("POST", path, f"admin{n}", "admin", resolution=f"by {n}") for n in range(5))
    )
    assert [status for status, _ in replies] == [200] * 5
    first = [reply for _, reply in replies if "already" not in reply]
    assert len(first) == 1
    # Every answer names the one resolution that happened.
    assert {(reply["resolved_by"], reply["resolution"]) for _, reply in replies} == {
        (first[0]["resolved_by"], first[0]["resolution"])
    }
    rows = await pg(
        server.process.settings, "SELECT count(*) AS n FROM audit_log WHERE action = 'flag_resolve'"
    )
    assert rows[0]["n"] == 1


async def test_a_flag_resolve_with_postgres_away_changes_nothing(
    start_server: Start, postgres_proxy: Proxy
) -> None:
    server = await paid_server(start_server, database_url=postgres_proxy.url)
    http = Http(server)
    await http.call("GET", "/v1/me", "bob")
    assert (await webhook(server, confirmed("pi_pg")))[0] == 200
    assert (await webhook(server, reversed_("pi_pg")))[0] == 200
    status, flags = await http.call("GET", "/v1/admin/flags", "ops", "admin")
    path = f"/v1/admin/flags/{flags['flags'][0]['id']}/resolve"
    await postgres_proxy.cut()
    try:
        status, reply = await http.call("POST", path, "ops", "admin", resolution="first try")
        assert status == 503 and reply["error"]["code"] == "UNAVAILABLE", reply
    finally:
        await postgres_proxy.restore()

    async def resolved() -> bool:
        status, _ = await http.call("POST", path, "ops", "admin", resolution="retried")
        return status == 200

    await eventually(resolved)
    status, flag = await http.call("POST", path, "ops", "admin")
    assert flag["already"] is True and flag["resolution"] == "retried"
    rows = await pg(
        server.process.settings, "SELECT count(*) AS n FROM audit_log WHERE action = 'flag_resolve'"
    )
    assert rows[0]["n"] == 1


# --- export ------------------------------------------------------------------------------


async def test_export_streams_the_users_data_and_says_what_it_cut(start_server: Start) -> None:
    server = await paid_server(start_server, export_section_rows_max=2)
    http = Http(server)
    fan = await server.client("bob")
    await server.client("alice", "model")
    for n in range(3):
        assert (await webhook(server, confirmed(f"pi_e{n}")))[0] == 200
    await fan.call("dm", to="alice", text="hello there", key="d1")
    assert (await http.call("PUT", "/v1/me/blocks/carol", "bob"))[0] in (200, 404)
    status, _ = await http.call("POST", "/v1/reports", "bob", user="alice", reason="rude")
    assert status == 201
    await drained(server)
    assert await server.node.dm_archive.drain(10.0) == 0

    async with httpx.AsyncClient(base_url=server.http_url) as client:
        response = await client.get(
            "/v1/me/export", headers={"Authorization": f"Bearer {token('bob')}"}
        )
        assert response.status_code == 200
        assert "attachment" in response.headers["content-disposition"]
        data = orjson.loads(response.content)
        assert (await client.get("/v1/me/export")).status_code == 401
    assert data["user"]["id"] == "bob" and data["balance"] == 300
    assert [p["payment_ref"] for p in data["purchases"]] == ["pi_e0", "pi_e1"]
    assert len(data["transactions"]) == 2
    assert [d["text"] for d in data["dms"]] == ["hello there"]
    assert [r["reason"] for r in data["reports"]] == ["rude"]
    assert set(data["truncated"]) == {"purchases", "transactions"} and data["rows_max"] == 2
    assert {"reversals", "blocks"} <= data.keys()


# --- deletion ----------------------------------------------------------------------------


async def test_deleting_an_account_forfeits_its_balance_shuts_it_out_and_pseudonymises(
    start_server: Start,
) -> None:
    server = await paid_server(start_server)
    http = Http(server)
    model = await server.client("alice", "model")
    fan = await server.client("bob")
    assert (await webhook(server, confirmed("pi_d")))[0] == 200
    await fan.call("join", room="alice")
    tip = await fan.call("tip", room="alice", amount=40, key="t1")
    await fan.call("dm", to="alice", text="bye", key="d1")
    await model.call("dm", to="bob", text="see you", key="d2")
    assert await server.node.dm_archive.drain(10.0) == 0

    # Refusals first: nothing deleted.
    assert (await http.call("DELETE", "/v1/me", "bob"))[0] == 400
    assert (await http.call("DELETE", "/v1/me", "bob", confirm="alice"))[0] == 400
    assert (await http.call("DELETE", "/v1/me", "ops", "admin", confirm="ops"))[0] == 403
    assert (await http.call("DELETE", "/v1/me", "ghost", confirm="ghost"))[0] == 404
    assert await balance_of(http, "bob") == 60

    status, reply = await http.call("DELETE", "/v1/me", "bob", confirm="bob")
    assert status == 200, reply
    assert reply["forfeited"] == 60 and reply["pseudonym"].startswith("del:")
    alias = reply["pseudonym"]
    # Shut out: the session is closed, HTTP and a new hello are refused.
    await eventually(lambda: _closed(fan))
    status, refused = await http.call("GET", "/v1/me", "bob")
    assert status == 403 and refused["error"]["code"] == "BANNED"
    with pytest.raises(Exception, match=r"(?i)banned"):
        await server.client("bob")
    # Personal data gone; the books keep their rows.
    settings = server.process.settings
    assert await pg(settings, "SELECT 1 FROM dms WHERE sender = 'bob'") == []
    kept = await pg(settings, "SELECT recipient FROM dms WHERE sender = 'alice'")
    assert [r["recipient"] for r in kept] == [alias]
    await drained(server)
    forfeits = await pg(
        settings,
        """SELECT p.account_id, p.amount FROM ledger_postings p
             JOIN ledger_transactions t ON t.id = p.tx_id
            WHERE t.kind = 'forfeit' ORDER BY p.amount""",
    )
    assert [(r["account_id"], r["amount"]) for r in forfeits] == [
        ("u:bob", -60),
        ("sys:forfeited", 60),
    ]
    # What alice sees of the ledger names the pseudonym only.
    status, hers = await http.call("GET", "/v1/me/transactions?kind=tip", "alice", "model")
    assert [t["counterparty"] for t in hers["transactions"]] == [alias]
    status, receipt = await http.call("GET", f"/v1/me/transactions/{tip['tx']}", "alice", "model")
    assert status == 200 and receipt["from"] == alias
    assert "u:bob" not in orjson.dumps(receipt).decode()
    # A payment for the deleted account is refused (the provider refunds it).
    status, late = await webhook(server, confirmed("pi_late"))
    assert status == 409, late
    assert (await http.reconcile())["ok"] is True
    await model.close()


async def _closed(client: Any) -> bool:
    return bool(client.closed)


async def test_a_deleted_account_stays_shut_out_and_its_flags_pseudonymous_after_a_restart(
    start_server: Start, redis: Redis
) -> None:
    first = await paid_server(start_server)
    http = Http(first)
    await http.call("GET", "/v1/me", "bob")
    assert (await webhook(first, confirmed("pi_r")))[0] == 200
    status, deleted = await http.call("DELETE", "/v1/me", "bob", confirm="bob")
    assert status == 200 and deleted["forfeited"] == 100
    # Charged back after the deletion: nothing left to take, all short.
    status, charged = await webhook(first, reversed_("pi_r"))
    assert status == 200 and (charged["clawed"], charged["shortfall"]) == (0, 100)
    await drained(first)
    await first.process.stop()
    prefix = first.process.settings.redis_prefix
    keys = [key async for key in redis.scan_iter(match=f"{prefix}*")]
    await redis.delete(*keys)

    second = await paid_server(start_server)
    http = Http(second)
    status, refused = await http.call("GET", "/v1/me", "bob")
    assert status == 403 and refused["error"]["code"] == "BANNED"
    status, flags = await http.call("GET", "/v1/admin/flags?user=bob", "ops", "admin")
    assert [(f["user"], f["shortfall"]) for f in flags["flags"]] == [(deleted["pseudonym"], 100)]
    assert (await http.call("GET", "/v1/admin/flags?limit=0", "ops", "admin"))[0] == 400
    assert (await http.reconcile())["ok"] is True
