"""The admin routes the admin page reads (issue #15 item 6; server/http/admin.py),
against a real server, Redis and Postgres: live counters that move with
tips and sessions, finding a user with their balance and transactions, the
refunds list, and refusals of non-admins and hostile input."""

from __future__ import annotations

from typing import Any

import httpx

from tests.conftest import Http, Running, pg
from tokenchat.server.http.admin import TipRate


async def admin(http: Http, path: str) -> dict[str, Any]:
    status, reply = await http.call("GET", path, "ops", "admin")
    assert status == 200, (path, reply)
    return dict(reply)


async def test_stats_count_sessions_rooms_tips_and_the_outbox(server: Running) -> None:
    http = Http(server)
    before = await admin(http, "/v1/admin/stats")
    model = await server.client("alice", "model")
    fan = await server.client("bob")
    await http.credit("bob", 100)
    await fan.call("join", room="alice")
    during = await admin(http, "/v1/admin/stats")
    # Counters are this process's (the registry is shared by every test).
    assert during["sessions"] - before["sessions"] == 2
    assert during["rooms"] >= 1 and during["rooms_live"] >= 1 and during["viewers"] >= 1
    for n in range(3):
        await fan.call("tip", room="alice", amount=1, key=f"k{n}")
    after = await admin(http, "/v1/admin/stats")
    assert after["tips_total"] - during["tips_total"] == 3
    assert after["tips_per_s"] > 0
    assert server.node.ledger is not None
    assert await server.node.ledger.drain(10.0) == 0
    drained = await admin(http, "/v1/admin/stats")
    assert (drained["outbox_depth"], drained["ledger_lag_s"]) == (0, 0)
    assert drained["ledger_rejected_rows"] >= 0 and drained["node"] == server.node.id
    await fan.close()
    await model.close()


async def test_stats_show_the_outbox_and_its_age_while_postgres_lags(
    start_server: Any,
) -> None:
    # No ledger writer (and spends that do not wait for one): entries stay in
    # the outbox, as when Postgres is away.
    server: Running = await start_server(ledger_enabled=0, durability="redis")
    http = Http(server)
    model = await server.client("alice", "model")
    fan = await server.client("bob")
    await http.credit("bob", 10)
    await fan.call("join", room="alice")
    await fan.call("tip", room="alice", amount=2, key="t1")
    stats = await admin(http, "/v1/admin/stats")
    assert stats["outbox_depth"] == 2  # the credit and the tip
    assert stats["ledger_lag_s"] > 0
    await fan.close()
    await model.close()


def test_tip_rate_averages_over_the_window() -> None:
    rate = TipRate(window_s=10.0)
    assert rate.observe(100.0, 5) == 0.0  # one sample: no span yet
    assert rate.observe(102.0, 25) == 10.0
    assert rate.observe(112.0, 25) == 0.0  # the burst left the window
    assert rate.observe(113.0, 3) == 0.0  # a restarted counter starts over


async def test_find_a_user_their_balance_and_transactions(server: Running) -> None:
    http = Http(server)
    model = await server.client("alice", "model")
    fan = await server.client("ana")
    await server.client("anabel")
    await http.credit("ana", 50)
    await fan.call("join", room="alice")
    tip = await fan.call("tip", room="alice", amount=7, key="t1")
    assert await server.node.ledger.drain(10.0) == 0

    found = await admin(http, "/v1/admin/users?prefix=ana")
    assert [u["id"] for u in found["users"]] == ["ana", "anabel"]
    assert found["users"][0]["role"] == "fan"
    one = await admin(http, "/v1/admin/users?prefix=ana&limit=1")
    assert [u["id"] for u in one["users"]] == ["ana"]
    # `_` is a character of ids, never a LIKE wildcard.
    assert (await admin(http, "/v1/admin/users?prefix=a_a"))["users"] == []

    detail = await admin(http, "/v1/admin/users/ana")
    assert detail["user"]["id"] == "ana" and detail["balance"] == 43
    assert detail["ledger_balance"] == 43
    assert detail["platform_ban"] is None and detail["open_reports"] == 0
    history = await admin(http, "/v1/admin/users/ana/transactions")
    newest = history["transactions"][0]
    assert (newest["tx"], newest["kind"], newest["amount"]) == (tip["tx"], "tip", -7)
    assert history["user"] == "ana" and len(history["transactions"]) == 2
    tips = await admin(http, "/v1/admin/users/ana/transactions?kind=tip&limit=1")
    assert [t["tx"] for t in tips["transactions"]] == [tip["tx"]]

    # A ban and a report show on the user.
    status, _ = await http.call("POST", "/v1/admin/bans/ana", "ops", "admin", reason="spam")
    assert status == 200
    status, _ = await http.call("POST", "/v1/reports", "alice", "model", user="ana", reason="x")
    assert status == 201
    detail = await admin(http, "/v1/admin/users/ana")
    assert detail["platform_ban"] == {"until": None, "reason": "spam", "by": "ops"}
    assert detail["open_reports"] == 1
    await model.close()


async def test_refunds_list_the_newest_with_what_they_reverse(server: Running) -> None:
    http = Http(server)
    fan = await server.client("bob")
    await server.client("alice", "model")
    await http.credit("bob", 50)
    await fan.call("join", room="alice")
    first = await fan.call("tip", room="alice", amount=5, key="t1")
    second = await fan.call("tip", room="alice", amount=6, key="t2")
    assert (await admin(http, "/v1/admin/refunds"))["refunds"] == []
    for tx in (first["tx"], second["tx"]):
        status, reply = await http.call(
            "POST", "/v1/admin/refunds", "ops", "admin", tx=tx, key=f"r-{tx}"
        )
        assert status == 200, reply
    assert await server.node.ledger.drain(10.0) == 0
    listed = (await admin(http, "/v1/admin/refunds"))["refunds"]
    assert [(r["reverses"], r["original_kind"], r["tokens"], r["by"]) for r in listed] == [
        (second["tx"], "tip", 6, "ops"),
        (first["tx"], "tip", 5, "ops"),
    ]
    assert [r["reverses"] for r in (await admin(http, "/v1/admin/refunds?limit=1"))["refunds"]] == [
        second["tx"]
    ]
    rows = await pg(
        server.process.settings,
        "SELECT count(*) AS n FROM ledger_transactions WHERE kind = 'refund'",
    )
    assert rows[0]["n"] == 2


async def test_admin_routes_refuse_non_admins_and_hostile_input(server: Running) -> None:
    http = Http(server)
    await server.client("ana")
    paths = [
        "/v1/admin/stats",
        "/v1/admin/users?prefix=a",
        "/v1/admin/users/ana",
        "/v1/admin/users/ana/transactions",
        "/v1/admin/refunds",
    ]
    for path in paths:
        for role in ("fan", "model"):
            status, reply = await http.call("GET", path, "ana", role)
            assert status == 403 and reply["error"]["code"] == "FORBIDDEN", (path, role)
        status, reply = await http.call("GET", path)
        assert status == 401 and reply["error"]["code"] == "UNAUTHENTICATED", path
    for path in [
        "/v1/admin/users",
        "/v1/admin/users?prefix=",
        "/v1/admin/users?prefix=a%20b",
        "/v1/admin/users?prefix=" + "a" * 65,
        "/v1/admin/users?prefix=a&limit=0",
        "/v1/admin/users?prefix=a&limit=51",
        "/v1/admin/users?prefix=a&limit=" + "9" * 5000,
        "/v1/admin/users/a%20b",
        "/v1/admin/users/" + "a" * 65,
        "/v1/admin/users/ana/transactions?kind=nonsense",
        "/v1/admin/users/ana/transactions?before=x",
        "/v1/admin/users/ana/transactions?limit=100000",
        "/v1/admin/refunds?limit=0",
        "/v1/admin/refunds?limit=-1",
        "/v1/admin/refunds?limit=501",
    ]:
        status, reply = await http.call("GET", path, "ops", "admin")
        assert status == 400 and reply["error"]["code"] == "BAD_REQUEST", (path, reply)
    status, reply = await http.call("GET", "/v1/admin/users/nobody", "ops", "admin")
    assert status == 404 and reply["error"]["code"] == "NOT_FOUND"
    # An unknown user has no transactions (the same answer as one with none).
    nobody = await admin(http, "/v1/admin/users/nobody/transactions")
    assert nobody["transactions"] == [] and nobody["next"] is None


async def test_the_admin_page_is_served_without_data(server: Running) -> None:
    async with httpx.AsyncClient(base_url=server.http_url) as client:
        page = await client.get("/admin")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        assert "<title>tokenchat admin</title>" in page.text
        assert "default-src 'self'" in page.headers["content-security-policy"]
        for path, kind in [("/static/admin.js", "javascript"), ("/static/admin.css", "text/css")]:
            response = await client.get(path)
            assert response.status_code == 200 and kind in response.headers["content-type"]
