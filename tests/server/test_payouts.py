"""Payouts (issue #13 section 1, and verification and payout methods of
section 4) against real Redis, Postgres and server processes: versioned
rules, a model's payout held in escrow, approval to sys:payouts and
rejection back to her, every refusal (nothing moved), idempotent retries,
hostile input, the earnings statement valued at the rule in force at each
earning, liabilities that add up with the mint, a crash between the
decision and the money, and a Redis that lost its data."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from tests.conftest import Http, Running, pg
from tokenchat.client_demo.client import Client
from tokenchat.server.config import Settings
from tokenchat.server.economy.economy import Economy
from tokenchat.server.errors import Unavailable

Start = Callable[..., Awaitable[Running]]
IBAN = "DE89370400440532013000"  # the standard example: valid check digits
MIN = 10  # payout_min_tokens in these tests


async def ready_model(server: Running, tips: int = 100) -> tuple[Client, Client, Http]:
    """alice: a verified model with a payout method and ``tips`` tokens from bob."""
    model = await server.client("alice", "model")
    fan = await server.client("bob")
    http = Http(server)
    await http.credit("bob", 500)
    assert (await fan.next_event("balance"))["balance"] == 500
    status, reply = await http.call("POST", "/v1/admin/users/alice/verify", "ops", "admin")
    assert status == 200 and reply["verified"] is True, reply
    status, reply = await http.call(
        "PUT", "/v1/me/payout-method", "alice", "model", type="bank", holder="Alice A", iban=IBAN
    )
    assert status == 200 and reply["method"]["iban"] == "…3000", reply
    if tips:
        await fan.call("join", room="alice")
        await fan.call("tip", room="alice", amount=tips, key="tip-1")
    return fan, model, http


async def balance(client: Client) -> int:
    return int((await client.call("balance"))["balance"])


async def ask(http: Http, tokens: Any, key: Any = "p1", who: str = "alice") -> tuple[int, Any]:
    return await http.call("POST", "/v1/me/payouts", who, "model", tokens=tokens, key=key)


async def account(settings: Settings, account_id: str) -> int:
    rows = await pg(settings, "SELECT balance FROM accounts WHERE id = $1", account_id)
    return int(rows[0]["balance"]) if rows else 0


async def kinds_of(settings: Settings, payout_id: str) -> list[str]:
    rows = await pg(
        settings,
        """SELECT kind FROM ledger_transactions WHERE meta->>'payout' = $1
           ORDER BY applied_ms, id""",
        payout_id,
    )
    return [row["kind"] for row in rows]


async def drain(server: Running) -> None:
    assert await server.node.ledger.drain(10.0) == 0


@pytest.fixture
async def server(start_server: Start) -> Running:
    return await start_server(payout_min_tokens=MIN, payout_cents_per_token=5.0)


# --- the lifecycle ---------------------------------------------------------------------------


async def test_request_approve_pays_out_once_through_escrow(
    server: Running, settings: Settings
) -> None:
    _fan, model, http = await ready_model(server)
    status, payout = await ask(http, 60)
    assert status == 201, payout
    assert (payout["state"], payout["tokens"], payout["balance"]) == ("requested", 60, 40)
    assert (payout["rule"], payout["cents_per_token"], payout["cents"]) == (0, 5.0, 300)
    assert payout["method"] == {"type": "bank", "holder": "Alice A", "iban": "…3000"}
    payout_id = payout["payout"]
    assert await balance(model) == 40
    # A retry of the key answers the same payout and holds nothing more.
    status, again = await ask(http, 60)
    assert status == 200 and again["duplicate"] is True and again["payout"] == payout_id
    assert await balance(model) == 40
    await drain(server)
    assert await account(settings, f"esc:payout:{payout_id}") == 60

    status, listed = await http.call("GET", "/v1/admin/payouts?state=requested", "ops", "admin")
    assert [p["payout"] for p in listed["payouts"]] == [payout_id]
    status, paid = await http.call("POST", f"/v1/admin/payouts/{payout_id}/approve", "ops", "admin")
    assert status == 200, paid
    assert (paid["state"], paid["settled"], paid["decided_by"]) == ("paid", True, "ops")
    # Approving again is a duplicate; rejecting a paid payout is a conflict.
    status, again = await http.call(
        "POST", f"/v1/admin/payouts/{payout_id}/approve", "ops", "admin"
    )
    assert status == 200 and again["duplicate"] is True and again["settle_tx"] == paid["settle_tx"]
    status, error = await http.call("POST", f"/v1/admin/payouts/{payout_id}/reject", "ops", "admin")
    assert status == 409 and error["error"]["code"] == "CONFLICT"
    await drain(server)
    assert await kinds_of(settings, payout_id) == ["hold", "payout"]
    assert await account(settings, "sys:payouts") == 60
    assert await account(settings, f"esc:payout:{payout_id}") == 0
    assert await balance(model) == 40
    status, mine = await http.call("GET", "/v1/me/payouts", "alice", "model")
    assert [(p["payout"], p["state"]) for p in mine["payouts"]] == [(payout_id, "paid")]
    # The ledger's payout is in her history too: the receipt names it.
    status, receipt = await http.call(
        "GET", f"/v1/me/transactions/{paid['settle_tx']}", "ops", "admin"
    )
    assert status == 200 and receipt["kind"] == "payout" and receipt["payout"] == payout_id
    assert (await http.reconcile())["ok"] is True


async def test_reject_returns_the_tokens_to_the_model(server: Running, settings: Settings) -> None:
    _fan, model, http = await ready_model(server)
    status, payout = await ask(http, 30)
    assert status == 201
    status, rejected = await http.call(
        "POST", f"/v1/admin/payouts/{payout['payout']}/reject", "ops", "admin", reason="no docs"
    )
    assert status == 200, rejected
    assert (rejected["state"], rejected["reason"], rejected["settled"]) == (
        "rejected",
        "no docs",
        True,
    )
    assert await balance(model) == 100
    status, again = await http.call(
        "POST", f"/v1/admin/payouts/{payout['payout']}/reject", "ops", "admin"
    )
    assert status == 200 and again["duplicate"] is True
    status, error = await http.call(
        "POST", f"/v1/admin/payouts/{payout['payout']}/approve", "ops", "admin"
    )
    assert status == 409, error
    assert await balance(model) == 100
    await drain(server)
    assert await kinds_of(settings, payout["payout"]) == ["hold", "escrow_refund"]
    assert await account(settings, "sys:payouts") == 0
    assert (await http.reconcile())["ok"] is True


# --- refusals and hostile input ----------------------------------------------------------------


async def test_refusals_move_nothing(server: Running, settings: Settings) -> None:
    model = await server.client("alice", "model")
    http = Http(server)
    await http.credit("alice", 100)
    # Not verified, then no payout method.
    status, error = await ask(http, 20)
    assert status == 403 and "verify" in error["error"]["message"], error
    await http.call("POST", "/v1/admin/users/alice/verify", "ops", "admin")
    status, error = await ask(http, 20)
    assert status == 403 and "payout method" in error["error"]["message"], error
    status, _ = await http.call(
        "PUT", "/v1/me/payout-method", "alice", "model", type="paypal", email="a@example.com"
    )
    assert status == 200
    # Below the minimum; over her balance.
    status, error = await ask(http, MIN - 1)
    assert status == 400 and f"{MIN} tokens" in error["error"]["message"], error
    status, error = await ask(http, 101, key="big")
    assert status == 409 and error["error"]["code"] == "INSUFFICIENT_FUNDS", error
    assert await balance(model) == 100
    status, mine = await http.call("GET", "/v1/me/payouts", "alice", "model")
    assert mine["payouts"] == []  # a refused request is no payout
    # The same key after she has more: it goes through, once.
    await http.credit("alice", 1)
    status, payout = await ask(http, 101, key="big")
    assert status == 201 and payout["state"] == "requested", payout
    assert await balance(model) == 0
    # The key with other fields is a conflict; a fan or an admin cannot ask.
    status, error = await ask(http, 50, key="big")
    assert status == 409 and error["error"]["code"] == "CONFLICT"
    status, error = await http.call("POST", "/v1/me/payouts", "bob", "fan", tokens=20, key="f")
    assert status == 403
    # Un-verifying stops the next one.
    status, _ = await http.call("DELETE", "/v1/admin/users/alice/verify", "ops", "admin")
    await http.credit("alice", 50)
    status, error = await ask(http, 20, key="after")
    assert status == 403
    await drain(server)
    assert await account(settings, "u:alice") == 50
    assert (await http.reconcile())["ok"] is True


@pytest.mark.parametrize(
    "body",
    [
        {"tokens": "20", "key": "k"},
        {"tokens": 20.5, "key": "k"},
        {"tokens": True, "key": "k"},
        {"tokens": -5, "key": "k"},
        {"tokens": 10**30, "key": "k"},
        {"tokens": 20},
        {"tokens": 20, "key": ""},
        {"tokens": 20, "key": "x" * 1000},
        {"tokens": 20, "key": ["k"]},
    ],
)
async def test_hostile_payout_requests_are_bad_requests(
    server: Running, body: dict[str, Any]
) -> None:
    await ready_model(server, tips=0)
    status, error = await Http(server).call("POST", "/v1/me/payouts", "alice", "model", **body)
    assert status == 400 and error["error"]["code"] == "BAD_REQUEST", error


async def test_hostile_admin_and_method_input(server: Running) -> None:
    await ready_model(server, tips=0)
    http = Http(server)
    for path in (
        "/v1/admin/payouts/po_000000000000000000000000/approve",
        "/v1/admin/payouts/nope/approve",
        "/v1/admin/payouts/" + "x" * 500 + "/reject",
    ):
        status, error = await http.call("POST", path, "ops", "admin")
        assert status == 404 and error["error"]["code"] == "NOT_FOUND", (path, error)
    status, error = await http.call("GET", "/v1/admin/payouts?state=lost", "ops", "admin")
    assert status == 400
    status, error = await http.call("POST", "/v1/admin/users/nobody/verify", "ops", "admin")
    assert status == 404
    status, error = await http.call("POST", "/v1/admin/users/bob/verify", "ops", "admin")
    assert status == 400  # bob is a fan
    status, error = await http.call("GET", "/v1/admin/payouts", "alice", "model")
    assert status == 403
    for method in (
        {"type": "bank", "holder": "A", "iban": "DE00370400440532013000"},  # bad check digits
        {"type": "bank", "holder": "", "iban": IBAN},
        {"type": "bank", "holder": "A" * 101, "iban": IBAN},
        {"type": "paypal", "email": "not-an-email"},
        {"type": "crypto", "wallet": "x"},
        {"type": ["bank"]},
    ):
        status, error = await http.call("PUT", "/v1/me/payout-method", "alice", "model", **method)
        assert status == 400, (method, error)
    status, error = await http.call(
        "POST", "/v1/admin/payouts/po_000000000000000000000000/reject", "ops", "admin", reason=5
    )
    assert status == 400


# --- rules -------------------------------------------------------------------------------------


async def test_rules_are_versions_never_in_the_past_and_a_payout_keeps_its_own(
    server: Running,
) -> None:
    _fan, _model, http = await ready_model(server)
    now_ms = int(time.time() * 1000)
    for body in (
        {"cents_per_token": 6, "min_payout_tokens": 20, "effective_at": now_ms - 60_000},
        {"cents_per_token": -1, "min_payout_tokens": 20},
        {"cents_per_token": "6", "min_payout_tokens": 20},
        {"cents_per_token": 6, "min_payout_tokens": 0},
        {"cents_per_token": 6, "min_payout_tokens": 20, "effective_at": "soon"},
        {"cents_per_token": 10**9, "min_payout_tokens": 20},
    ):
        status, error = await http.call("POST", "/v1/admin/payout-rules", "ops", "admin", **body)
        assert status == 400, (body, error)
    status, error = await http.call(
        "POST", "/v1/admin/payout-rules", "alice", "model", cents_per_token=9, min_payout_tokens=1
    )
    assert status == 403
    # A rule now, and one a day from now.
    status, now_rule = await http.call(
        "POST", "/v1/admin/payout-rules", "ops", "admin", cents_per_token=7.5, min_payout_tokens=20
    )
    assert status == 201, now_rule
    status, later = await http.call(
        "POST",
        "/v1/admin/payout-rules",
        "ops",
        "admin",
        cents_per_token=9,
        min_payout_tokens=50,
        effective_at=now_ms + 86_400_000,
    )
    assert status == 201, later
    status, listed = await http.call("GET", "/v1/admin/payout-rules", "ops", "admin")
    assert [r["rule"] for r in listed["rules"]] == [later["rule"], now_rule["rule"], 0]
    assert listed["current"]["rule"] == now_rule["rule"]
    status, current = await http.call("GET", "/v1/payout-rule", "alice", "model")
    assert (current["cents_per_token"], current["min_payout_tokens"]) == (7.5, 20)
    # The minimum in force now: 20.
    status, error = await ask(http, 15)
    assert status == 400
    status, payout = await ask(http, 21)
    assert status == 201, payout
    assert (payout["rule"], payout["cents_per_token"], payout["cents"]) == (
        now_rule["rule"],
        7.5,
        158,  # 157.5 rounded half up
    )
    # A newer rule in force now does not change that payout.
    status, _ = await http.call(
        "POST", "/v1/admin/payout-rules", "ops", "admin", cents_per_token=1, min_payout_tokens=1
    )
    status, paid = await http.call(
        "POST", f"/v1/admin/payouts/{payout['payout']}/approve", "ops", "admin"
    )
    assert (paid["rule"], paid["cents"]) == (now_rule["rule"], 158)


# --- earnings and liabilities -------------------------------------------------------------------


async def test_earnings_statement_by_kind_at_the_rule_of_each_earning(
    server: Running, settings: Settings
) -> None:
    fan, _model, http = await ready_model(server, tips=0)
    start_ms = int(time.time() * 1000) - 1000
    await fan.call("join", room="alice")
    await fan.call("tip", room="alice", amount=10, key="t1")  # at rule 0: 5 cents
    status, _ = await http.call("PUT", "/v1/me/prices", "alice", "model", dm=4)
    assert status == 200
    await fan.call("dm", to="alice", text="hi", key="d1")  # 4 at 5 cents
    status, rule = await http.call(
        "POST", "/v1/admin/payout-rules", "ops", "admin", cents_per_token=10, min_payout_tokens=5
    )
    assert status == 201
    await fan.call("tip", room="alice", amount=20, key="t2")  # at 10 cents
    # Her own spending and a payout's hold are not earnings.
    await http.credit("alice", 50)
    status, statement = await http.call("GET", f"/v1/me/earnings?from={start_ms}", "alice", "model")
    assert status == 200, statement
    assert statement["kinds"] == {
        "dm": {"tokens": 4, "cents": 20, "count": 1},
        "tip": {"tokens": 30, "cents": 250, "count": 2},
    }
    assert statement["total"] == {"tokens": 34, "cents": 270}
    assert statement["rule"]["rule"] == rule["rule"]
    # A period before any of it is empty; ISO dates are taken too.
    status, empty = await http.call(
        "GET", "/v1/me/earnings?from=2020-01-01&to=2020-02-01", "alice", "model"
    )
    assert status == 200 and empty["kinds"] == {} and empty["total"]["tokens"] == 0
    # A refund of an earning counts minus, in her statement.
    tips = await pg(settings, "SELECT id FROM ledger_transactions WHERE idem_key = 't2'")
    status, _ = await http.call(
        "POST", "/v1/admin/refunds", "ops", "admin", tx=tips[0]["id"], key="r1"
    )
    assert status == 200
    status, statement = await http.call("GET", f"/v1/me/earnings?from={start_ms}", "alice", "model")
    assert statement["kinds"]["refunded"]["tokens"] == -20
    assert statement["total"]["tokens"] == 14
    # The receipt of the first tip values her earnings at the rule of its time.
    first = await pg(settings, "SELECT id FROM ledger_transactions WHERE idem_key = 't1'")
    status, receipt = await http.call(
        "GET", f"/v1/me/transactions/{first[0]['id']}", "alice", "model"
    )
    assert receipt["earnings"]["cents"] == 50 and receipt["earnings"]["rule"] == 0
    for query in (
        "from=yesterday",
        "from=2024-01-01&to=2023-01-01",
        "from=" + "9" * 30,
        "to=999999999999999",  # the year 33658
        "from=2024-13-01",
        "from=-5",
    ):
        status, error = await http.call("GET", f"/v1/me/earnings?{query}", "alice", "model")
        assert status == 400, (query, error)
    status, error = await http.call("GET", "/v1/me/earnings?from=2000-01-01", "alice", "model")
    assert status == 400  # longer than earnings_period_days_max
    status, error = await http.call("GET", "/v1/me/earnings", "bob", "fan")
    assert status == 403


async def test_liabilities_add_up_with_the_mint_after_a_mixed_workload(
    server: Running, settings: Settings
) -> None:
    fan, _model, http = await ready_model(server, tips=0)
    carol = await server.client("carol", "model")
    await http.credit("dave", 40)
    await fan.call("join", room="alice")
    await fan.call("tip", room="alice", amount=120, key="t1")
    await fan.call("join", room="carol")
    await fan.call("tip", room="carol", amount=30, key="t2")
    await fan.call(
        "request_offer", model="carol", text="a song", amount=25, key="o1"
    )  # held in escrow
    _, paid = await ask(http, 50, key="paid")
    await http.call("POST", f"/v1/admin/payouts/{paid['payout']}/approve", "ops", "admin")
    _, _held = await ask(http, 20, key="held")
    _, back = await ask(http, 15, key="back")
    await http.call("POST", f"/v1/admin/payouts/{back['payout']}/reject", "ops", "admin")
    status, figures = await http.call("GET", "/v1/admin/liabilities", "ops", "admin")
    assert status == 200, figures
    # bob: 500 - 120 - 30 - 25; dave: 40. alice: 120 - 50 - 20; carol: 30.
    assert figures["fans"] == 325 + 40
    assert figures["models"] == 50 + 30
    assert figures["escrow"] == 25 + 20
    assert figures["paid_out"] == 50
    assert figures["issued"] == 540
    assert figures["issued"] == (
        figures["fans"]
        + figures["models"]
        + figures["escrow"]
        + figures["paid_out"]
        + figures["system"]
    )
    assert figures["balanced"] is True and figures["pending"] == 0
    assert figures["paid_out_cents"] == 250
    status, _ = await http.call("GET", "/v1/admin/liabilities", "alice", "model")
    assert status == 403
    assert (await http.reconcile())["ok"] is True
    await carol.close()


# --- crashes and Redis loss ---------------------------------------------------------------------


async def test_a_crash_between_the_decision_and_the_money_is_settled_by_the_sweeper(
    start_server: Start, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = await start_server(
        payout_min_tokens=MIN, payout_settle_grace_s=0.3, deadline_sweep_interval_s=0.1
    )
    _fan, _model, http = await ready_model(server)
    _, payout = await ask(http, 40)
    real_payout = Economy.payout
    failures: list[int] = []

    async def lost(self: Economy, *args: Any, **kwargs: Any) -> dict[str, Any]:
        if not failures:
            failures.append(1)
            raise Unavailable("Redis did not answer in time")
        return await real_payout(self, *args, **kwargs)

    monkeypatch.setattr(Economy, "payout", lost)
    status, error = await http.call(
        "POST", f"/v1/admin/payouts/{payout['payout']}/approve", "ops", "admin"
    )
    assert status == 503, error
    rows = await pg(settings, "SELECT action FROM deadlines WHERE subject = $1", payout["payout"])
    assert [row["action"] for row in rows] == ["payout.settle"]

    async def settled() -> bool:
        rows = await pg(settings, "SELECT settled_at FROM payouts WHERE id = $1", payout["payout"])
        return rows[0]["settled_at"] is not None

    from tests.conftest import eventually

    await eventually(settled)
    await drain(server)
    assert await kinds_of(settings, payout["payout"]) == ["hold", "payout"]
    assert await pg(settings, "SELECT * FROM deadlines") == []
    assert (await http.reconcile())["ok"] is True


async def test_redis_loss_keeps_payouts_and_pays_once(
    start_server: Start, settings: Settings, private_redis: str
) -> None:
    server = await start_server(redis_url=private_redis, payout_min_tokens=MIN)
    _fan, model, http = await ready_model(server)
    _, payout = await ask(http, 70)
    await drain(server)
    await server.node.redis.flushall()  # everything hot is gone, the ledger stays
    # The model's retry is still a duplicate (Postgres has the row).
    status, again = await ask(http, 70)
    assert status == 200 and again["duplicate"] is True
    status, paid = await http.call(
        "POST", f"/v1/admin/payouts/{payout['payout']}/approve", "ops", "admin"
    )
    assert status == 200 and paid["state"] == "paid", paid
    await drain(server)
    await server.node.redis.flushall()  # the settle key's record goes too
    await pg(settings, "UPDATE payouts SET settled_at = NULL WHERE id = $1", payout["payout"])
    await server.node.payouts.settle(payout["payout"])  # finds the escrow empty
    assert await balance(model) == 30
    await drain(server)
    assert await kinds_of(settings, payout["payout"]) == ["hold", "payout"]
    assert await account(settings, "sys:payouts") == 70
    result = await http.reconcile()
    assert result["ok"] is True, result


async def test_payouts_survive_a_restart(start_server: Start, settings: Settings) -> None:
    server = await start_server(payout_min_tokens=MIN)
    _fan, _model, http = await ready_model(server)
    _, payout = await ask(http, 25)
    await drain(server)
    await server.process.stop()
    server = await start_server(payout_min_tokens=MIN)
    http = Http(server)
    status, listed = await http.call("GET", "/v1/admin/payouts", "ops", "admin")
    assert [p["payout"] for p in listed["payouts"]] == [payout["payout"]]
    status, paid = await http.call(
        "POST", f"/v1/admin/payouts/{payout['payout']}/approve", "ops", "admin"
    )
    assert status == 200 and paid["state"] == "paid"
    assert (await http.reconcile())["ok"] is True


async def test_racing_requests_and_decisions_have_one_outcome(
    server: Running, settings: Settings
) -> None:
    import asyncio

    _fan, model, http = await ready_model(server)
    # The same key twice at once: one payout, held once.
    first, second = await asyncio.gather(ask(http, 30, key="race"), ask(http, 30, key="race"))
    assert {first[0], second[0]} <= {200, 201}, (first, second)
    assert first[1]["payout"] == second[1]["payout"]
    assert await balance(model) == 70
    payout_id = first[1]["payout"]
    # Approve and reject at once: one wins, the other is a conflict or its duplicate.
    path = f"/v1/admin/payouts/{payout_id}"
    approved, rejected = await asyncio.gather(
        http.call("POST", f"{path}/approve", "ops", "admin"),
        http.call("POST", f"{path}/reject", "ops", "admin"),
    )
    assert sorted([approved[0], rejected[0]]) == [200, 409], (approved, rejected)
    await drain(server)
    kinds = await kinds_of(settings, payout_id)
    assert kinds in (["hold", "payout"], ["hold", "escrow_refund"])
    assert await balance(model) == (70 if kinds[1] == "payout" else 100)
    assert (await http.reconcile())["ok"] is True
