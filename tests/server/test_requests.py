"""Custom requests and the escrow under them, against real Redis, Postgres and
server processes: the lifecycle, every refusal, idempotent retries, the
deadline sweeper (second-long settings) and its lease, crashes between the
state and the money, Redis losing everything mid-lifecycle, and reconcile."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from tests.conftest import Http, Running, eventually, pg
from tokenchat.client_demo.client import Client
from tokenchat.server.config import Settings
from tokenchat.server.economy.economy import Economy
from tokenchat.server.errors import Unavailable

Start = Callable[..., Awaitable[Running]]


async def fan_and_model(server: Running, tokens: int = 100) -> tuple[Client, Client]:
    model = await server.client("alice", "model")
    fan = await server.client("bob")
    if tokens:
        await Http(server).credit("bob", tokens)
        assert (await fan.next_event("balance"))["balance"] == tokens
    return fan, model


async def offer(fan: Client, amount: int = 30, key: str = "o1", text: str = "a photo") -> str:
    reply = await fan.call("request_offer", model="alice", text=text, amount=amount, key=key)
    request_id = reply["request"]
    assert isinstance(request_id, str) and request_id.startswith("r_")
    return request_id


async def event_state(client: Client, request_id: str, state: str) -> dict[str, Any]:
    """The next `request` event of this request, which must be in ``state``."""
    while True:
        event = await client.next_event("request")
        if event["request"] == request_id:
            assert event["state"] == state, event
            return event


async def balance(client: Client) -> int:
    return int((await client.call("balance"))["balance"])


async def ledger_kinds(settings: Settings, request_id: str) -> list[str]:
    rows = await pg(
        settings,
        """SELECT t.kind FROM ledger_transactions t JOIN ledger_postings p ON p.tx_id = t.id
           WHERE p.account_id = $1 ORDER BY t.applied_ms, t.kind""",
        f"esc:request:{request_id}",
    )
    return [row["kind"] for row in rows]


async def escrow_of(settings: Settings, request_id: str) -> int:
    rows = await pg(
        settings, "SELECT balance FROM accounts WHERE id = $1", f"esc:request:{request_id}"
    )
    return int(rows[0]["balance"]) if rows else 0


async def drain(server: Running) -> None:
    assert await server.node.ledger.drain(10.0) == 0


async def no_deadlines_left(settings: Settings) -> None:
    """Wait for the settling to finish: its last step drops its deadline,
    after the money moved (which a balance shows first)."""

    async def none() -> bool:
        return await pg(settings, "SELECT * FROM deadlines") == []

    await eventually(none)


# --- the lifecycle -----------------------------------------------------------------------


@pytest.mark.cluster
async def test_offer_accept_deliver_pays_the_model_once_and_both_sides_see_it(
    server: Running, settings: Settings
) -> None:
    fan, model = await fan_and_model(server)
    reply = await fan.call("request_offer", model="alice", text="a photo", amount=30, key="o1")
    request_id = reply["request"]
    assert reply["balance"] == 70 and isinstance(reply["tx"], str)
    for side in (fan, model):
        event = await event_state(side, request_id, "offered")
        assert (event["from"], event["to"], event["text"], event["amount"]) == (
            "bob",
            "alice",
            "a photo",
            30,
        )
        assert event["expires_ms"] > event["ts"]
    await drain(server)
    assert await escrow_of(settings, request_id) == 30

    accepted = await model.call("request_accept", request=request_id)
    assert accepted["state"] == "accepted"
    for side in (fan, model):
        await event_state(side, request_id, "accepted")
    delivered = await model.call(
        "request_deliver", request=request_id, text="here", media="https://x.test/p.jpg"
    )
    assert delivered["state"] == "delivered" and delivered["settled"] is True
    for side in (fan, model):
        event = await event_state(side, request_id, "delivered")
        assert event["delivery"] == {"text": "here", "media": "https://x.test/p.jpg"}
        assert event["expires_ms"] is None
    assert (await model.next_event("balance"))["balance"] == 30
    assert await balance(fan) == 70 and await balance(model) == 30

    http = Http(server)
    for user, role in (("bob", "fan"), ("alice", "model")):
        status, listed = await http.call("GET", "/v1/me/requests", user, role)
        assert status == 200 and [r["state"] for r in listed["requests"]] == ["delivered"]
    listed_ws = await fan.call("request_list")
    assert listed_ws["requests"][0]["request"] == request_id
    await drain(server)
    assert await ledger_kinds(settings, request_id) == ["hold", "release"]
    assert await escrow_of(settings, request_id) == 0
    result = await http.reconcile()
    assert result["ok"] is True, result
    await fan.close()
    await model.close()


@pytest.mark.cluster
async def test_decline_and_cancel_refund_the_fan(server: Running, settings: Settings) -> None:
    fan, model = await fan_and_model(server)
    declined_offer = await offer(fan, 20, "o1")
    accepted_then_declined = await offer(fan, 30, "o2")
    cancelled = await offer(fan, 40, "o3")
    assert await balance(fan) == 10
    assert (await model.call("request_decline", request=declined_offer))["state"] == "declined"
    await model.call("request_accept", request=accepted_then_declined)
    assert (await model.call("request_decline", request=accepted_then_declined))["settled"]
    assert (await fan.call("request_cancel", request=cancelled))["state"] == "cancelled"
    assert await balance(fan) == 100 and await balance(model) == 0
    await drain(server)
    for request_id in (declined_offer, accepted_then_declined, cancelled):
        assert await ledger_kinds(settings, request_id) == ["hold", "escrow_refund"]
    assert (await Http(server).reconcile())["ok"] is True
    await fan.close()
    await model.close()


async def test_an_offline_model_gets_the_offer_at_her_next_hello(server: Running) -> None:
    await (await server.client("alice", "model")).close()
    fan = await server.client("bob")
    await Http(server).credit("bob", 100)
    request_id = await offer(fan)
    model = await server.client("alice", "model")
    event = await event_state(model, request_id, "offered")
    assert event["from"] == "bob"
    await fan.close()
    await model.close()


# --- refusals -------------------------------------------------------------------------------


async def test_refusals_move_nothing(server: Running, settings: Settings) -> None:
    fan, model = await fan_and_model(server, tokens=50)
    other = await server.client("carol")
    await (await server.client("dora", "model")).close()

    async def refused(client: Client, code: str, type_: str, **fields: Any) -> None:
        reply = await client.request(type_, **fields)
        assert reply["type"] == "error" and reply["code"] == code, (type_, fields, reply)

    offer_fields = {"text": "x", "amount": 10, "key": "k"}
    await refused(fan, "NOT_FOUND", "request_offer", model="nobody", **offer_fields)
    await refused(fan, "NOT_FOUND", "request_offer", model="carol", **offer_fields)  # a fan
    await refused(model, "FORBIDDEN", "request_offer", model="alice", **offer_fields)
    await refused(
        fan, "INSUFFICIENT_FUNDS", "request_offer", model="alice", text="x", amount=51, key="k"
    )
    assert await balance(fan) == 50
    request_id = await offer(fan, 10, "k")  # the refused key was not burnt
    # Ids of another kind, or of no request, are not found.
    for bad in ("t_" + "0" * 24, "m_" + "0" * 24, "r_" + "0" * 24, "r_x"):
        await refused(model, "NOT_FOUND", "request_accept", request=bad)
        await refused(fan, "NOT_FOUND", "request_cancel", request=bad)
    # Only the model accepts, delivers and declines; only the fan cancels;
    # a stranger does not learn that the request exists.
    await refused(fan, "FORBIDDEN", "request_accept", request=request_id)
    await refused(fan, "FORBIDDEN", "request_decline", request=request_id)
    await refused(model, "FORBIDDEN", "request_cancel", request=request_id)
    await refused(other, "NOT_FOUND", "request_accept", request=request_id)
    await refused(
        await server.client("dora", "model"), "NOT_FOUND", "request_accept", request=request_id
    )
    # Out of order.
    await refused(model, "CONFLICT", "request_deliver", request=request_id)
    await model.call("request_accept", request=request_id)
    await refused(fan, "CONFLICT", "request_cancel", request=request_id)
    await model.call("request_deliver", request=request_id)
    await refused(model, "CONFLICT", "request_decline", request=request_id)
    await refused(model, "CONFLICT", "request_accept", request=request_id)
    assert await balance(fan) == 40 and await balance(model) == 10
    rows = await pg(settings, "SELECT count(*) AS n FROM requests")
    assert rows[0]["n"] == 1
    for client in (fan, model, other):
        await client.close()


@pytest.mark.parametrize(
    ("type_", "fields"),
    [
        ("request_offer", {"model": "alice", "text": "", "amount": 5, "key": "k"}),
        ("request_offer", {"model": "alice", "text": "x" * 1001, "amount": 5, "key": "k"}),
        # Postgres stores the text (requests, the hold's meta): no NUL.
        ("request_offer", {"model": "alice", "text": "a\x00b", "amount": 5, "key": "k"}),
        ("request_offer", {"model": "alice", "text": "x", "amount": 0, "key": "k"}),
        ("request_offer", {"model": "alice", "text": "x", "amount": True, "key": "k"}),
        ("request_offer", {"model": "alice", "text": "x", "amount": 1_000_001, "key": "k"}),
        ("request_offer", {"model": "al ice", "text": "x", "amount": 5, "key": "k"}),
        ("request_offer", {"model": "alice", "text": "x", "amount": 5, "key": "k\n"}),
        ("request_offer", {"model": "alice", "text": "x", "amount": 5}),
        ("request_accept", {"request": "r_../../x"}),
        ("request_accept", {"request": "r" * 65}),
        ("request_accept", {"request": 7}),
        ("request_accept", {}),
        ("request_deliver", {"request": "r_" + "0" * 24, "text": "x" * 1001}),
        ("request_deliver", {"request": "r_" + "0" * 24, "text": "\x00"}),
        ("request_deliver", {"request": "r_" + "0" * 24, "media": "a\x00b"}),
        ("request_deliver", {"request": "r_" + "0" * 24, "media": "é"}),
        ("request_deliver", {"request": "r_" + "0" * 24, "media": "x" * 513}),
    ],
)
async def test_hostile_input_is_a_bad_request(
    server: Running, type_: str, fields: dict[str, Any]
) -> None:
    fan, model = await fan_and_model(server, tokens=10)
    reply = await (model if type_ != "request_offer" else fan).request(type_, **fields)
    assert reply["type"] == "error" and reply["code"] == "BAD_REQUEST", reply
    assert await balance(fan) == 10
    await fan.close()
    await model.close()


# --- idempotency ----------------------------------------------------------------------------


async def test_retries_are_duplicates_and_a_reused_key_is_a_conflict(
    server: Running, settings: Settings
) -> None:
    fan, model = await fan_and_model(server)
    first = await fan.call("request_offer", model="alice", text="a photo", amount=30, key="o1")
    again = await fan.call("request_offer", model="alice", text="a photo", amount=30, key="o1")
    assert again == {**first, "re": again["re"], "duplicate": True}
    other = await fan.request("request_offer", model="alice", text="a video", amount=30, key="o1")
    assert other["type"] == "error" and other["code"] == "CONFLICT"
    assert await balance(fan) == 70
    request_id = first["request"]
    await model.call("request_accept", request=request_id)
    assert (await model.call("request_accept", request=request_id))["duplicate"] is True
    await model.call("request_deliver", request=request_id, text="here")
    retry = await model.call("request_deliver", request=request_id, text="here")
    assert retry["duplicate"] is True and retry["settled"] is True
    # Settling again, from anywhere, moves nothing.
    await server.node.requests.settle(request_id)
    assert await balance(model) == 30 and await balance(fan) == 70
    await drain(server)
    assert await ledger_kinds(settings, request_id) == ["hold", "release"]
    rows = await pg(settings, "SELECT count(*) AS n FROM requests")
    assert rows[0]["n"] == 1
    await fan.close()
    await model.close()


# --- the sweeper ----------------------------------------------------------------------------


async def test_the_sweeper_expires_offers_and_undelivered_requests(
    start_server: Start, settings: Settings
) -> None:
    server = await start_server(
        request_offer_ttl_s=0.5,
        request_delivery_ttl_s=0.8,
        deadline_sweep_interval_s=0.1,
    )
    fan, model = await fan_and_model(server)
    ignored = await offer(fan, 20, "o1")
    taken = await offer(fan, 30, "o2")
    await model.call("request_accept", request=taken)
    assert await balance(fan) == 50
    for side in (fan, model):
        await event_state(side, ignored, "offered")
        await event_state(side, ignored, "expired")
    await event_state(model, taken, "expired")

    async def refunded() -> bool:
        return await balance(fan) == 100

    await eventually(refunded)
    late = await model.request("request_deliver", request=taken)
    assert late["type"] == "error" and late["code"] == "CONFLICT"
    await drain(server)
    for request_id in (ignored, taken):
        assert await ledger_kinds(settings, request_id) == ["hold", "escrow_refund"]
    await no_deadlines_left(settings)
    assert (await Http(server).reconcile())["ok"] is True
    await fan.close()
    await model.close()


async def test_one_of_two_processes_holds_the_sweep_lease_and_the_other_takes_over(
    start_server: Start,
) -> None:
    quick = {"deadline_sweep_interval_s": 0.1, "deadline_lease_ttl_s": 0.5}
    first = await start_server(**quick)
    second = await start_server(**quick)

    async def one_holds() -> bool:
        return [first.node.sweeper.holding, second.node.sweeper.holding].count(True) == 1

    await eventually(one_holds)
    for _ in range(5):  # and it keeps holding it: renewed, not lost and retaken
        await asyncio.sleep(0.15)
        assert await one_holds()
    holder, other = (first, second) if first.node.sweeper.holding else (second, first)
    await holder.process.stop()

    async def taken_over() -> bool:
        return other.node.sweeper.holding

    await eventually(taken_over, timeout_s=3.0)


async def test_a_crash_between_the_state_and_the_money_is_settled_by_the_sweeper(
    start_server: Start, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = await start_server(request_settle_grace_s=0.3, deadline_sweep_interval_s=0.1)
    fan, model = await fan_and_model(server)
    request_id = await offer(fan)
    await model.call("request_accept", request=request_id)
    real_release = Economy.release
    failures = []

    async def lost(self: Economy, *args: Any, **kwargs: Any) -> dict[str, Any]:
        if not failures:
            failures.append(1)
            raise Unavailable("Redis did not answer in time")
        return await real_release(self, *args, **kwargs)

    monkeypatch.setattr(Economy, "release", lost)
    reply = await model.call("request_deliver", request=request_id)
    assert reply["state"] == "delivered" and reply["settled"] is False
    deadlines = await pg(settings, "SELECT action FROM deadlines WHERE subject = $1", request_id)
    assert [row["action"] for row in deadlines] == ["request.settle"]
    assert (await model.next_event("balance"))["balance"] == 30  # the sweeper paid her
    await drain(server)
    assert await ledger_kinds(settings, request_id) == ["hold", "release"]
    await no_deadlines_left(settings)
    assert (await Http(server).reconcile())["ok"] is True
    await fan.close()
    await model.close()


async def test_a_hold_whose_row_was_never_written_is_adopted(
    start_server: Start, settings: Settings
) -> None:
    server = await start_server(request_settle_grace_s=0.2, deadline_sweep_interval_s=0.1)
    fan, model = await fan_and_model(server)
    # What `offer` does before writing the row, as if its process died then.
    request_id = "r_" + "ab" * 12
    await server.node.economy.hold(
        "bob",
        f"esc:request:{request_id}",
        25,
        subject=request_id,
        key="o1",
        request='["request_offer",{"amount":25,"model":"alice","text":"lost"}]',
        meta={"request": request_id, "from": "bob", "to": "alice", "text": "lost", "amount": 25},
    )
    await drain(server)
    event = await event_state(model, request_id, "offered")
    assert (event["text"], event["amount"]) == ("lost", 25)
    # The fan's retry of that key names the same request and holds nothing more.
    again = await fan.call("request_offer", model="alice", text="lost", amount=25, key="o1")
    assert again["request"] == request_id and again["duplicate"] is True
    assert await balance(fan) == 75
    assert (await Http(server).reconcile())["ok"] is True
    await fan.close()
    await model.close()


# --- Redis loss -----------------------------------------------------------------------------


async def test_redis_loss_mid_lifecycle_releases_once(
    start_server: Start, settings: Settings, private_redis: str
) -> None:
    server = await start_server(redis_url=private_redis)
    fan, model = await fan_and_model(server)
    request_id = await offer(fan)
    await model.call("request_accept", request=request_id)
    await server.node.redis.flushall()  # everything hot is gone, the ledger stays
    assert await balance(fan) == 70
    await model.call("request_deliver", request=request_id)
    assert await balance(model) == 30
    await drain(server)
    await server.node.redis.flushall()  # the settle key's record goes too
    # Settling again (a sweeper, a replay) finds the escrow empty: nothing moves.
    await pg(settings, "UPDATE requests SET settled_at = NULL WHERE id = $1", request_id)
    await server.node.requests.settle(request_id)
    retry = await model.call("request_deliver", request=request_id)
    assert retry["duplicate"] is True
    assert await balance(model) == 30 and await balance(fan) == 70
    await drain(server)
    assert await ledger_kinds(settings, request_id) == ["hold", "release"]
    result = await Http(server).reconcile()
    assert result["ok"] is True, result
    await fan.close()
    await model.close()


async def test_deadlines_outlive_a_redis_loss(
    start_server: Start, settings: Settings, private_redis: str
) -> None:
    server = await start_server(
        redis_url=private_redis,
        request_offer_ttl_s=1.0,
        deadline_sweep_interval_s=0.1,
        deadline_lease_ttl_s=0.5,
    )
    fan, model = await fan_and_model(server)
    request_id = await offer(fan)
    await drain(server)
    # The lease, the balances, the escrow, the idempotency records: all gone.
    await server.node.redis.flushall()

    async def settled() -> bool:
        rows = await pg(
            settings, "SELECT state, settled_at FROM requests WHERE id = $1", request_id
        )
        return rows[0]["settled_at"] is not None

    await eventually(settled)
    assert (await pg(settings, "SELECT state FROM requests"))[0]["state"] == "expired"
    assert await balance(fan) == 100
    await drain(server)
    assert await ledger_kinds(settings, request_id) == ["hold", "escrow_refund"]
    assert (await Http(server).reconcile())["ok"] is True
    await fan.close()
    await model.close()


# --- reconcile ------------------------------------------------------------------------------


async def test_reconcile_flags_a_closed_request_whose_escrow_is_not_empty(
    start_server: Start, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A long grace: the sweeper leaves the unsettled request alone meanwhile.
    server = await start_server(request_settle_grace_s=3600.0)
    fan, model = await fan_and_model(server)
    request_id = await offer(fan)

    async def lost(self: Economy, *args: Any, **kwargs: Any) -> dict[str, Any]:
        raise Unavailable("Redis did not answer in time")

    with monkeypatch.context() as patch:
        patch.setattr(Economy, "escrow_refund", lost)
        assert (await fan.call("request_cancel", request=request_id))["settled"] is False
    result = await Http(server).reconcile()
    assert result["ok"] is False
    assert {
        "account": f"esc:request:{request_id}",
        "escrow": 30,
        "problem": "closed object's escrow",
    } in result["mismatches"]
    await server.node.requests.settle(request_id)
    assert await balance(fan) == 100
    assert (await Http(server).reconcile())["ok"] is True
    await fan.close()
    await model.close()
