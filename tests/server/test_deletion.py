"""Account deletion, completed (issue #13 sections 4 and 1), against real
Redis, Postgres and server processes: a deleted model's id is in no view any
more (every view's JSON is scanned for it), her room, menu, media (files
too) and profile are gone; the escrows open at deletion are settled by their
own workflows before the forfeiture, or the deletion is refused while one
closes only by itself; a payout stuck in ``requesting`` is finished by the
sweeper. Each ends with reconcile ok and liabilities adding up."""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from PIL import Image

from tests.conftest import Http, Running, eventually, pg, token
from tokenchat.client_demo.client import Client
from tokenchat.server.economy.economy import Economy
from tokenchat.server.errors import Unavailable

Start = Callable[..., Awaitable[Running]]
IBAN = "DE89370400440532013000"


def png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (32, 24), (10, 200, 30)).save(out, "PNG")
    return out.getvalue()


async def upload(server: Running, price: int = 7) -> str:
    async with httpx.AsyncClient(base_url=server.http_url, timeout=30) as client:
        response = await client.post(
            "/v1/media",
            headers={"Authorization": f"Bearer {token('alice', 'model')}"},
            files={"file": ("a.png", png(), "image/png")},
            data={"price": str(price)},
        )
    assert response.status_code == 200, response.text
    return str(response.json()["media"]["id"])


async def files_in(folder: str) -> list[str]:
    def walk() -> list[str]:
        return sorted(str(p) for p in Path(folder).rglob("*") if p.is_file())

    return await asyncio.to_thread(walk)


async def drain(server: Running) -> None:
    assert await server.node.ledger.drain(10.0) == 0


async def balance(client: Client) -> int:
    return int((await client.call("balance"))["balance"])


async def ready(server: Running, fans: int = 300) -> tuple[Client, Client, Http]:
    """alice (model) and bob (a fan with ``fans`` tokens), both in her room."""
    http = Http(server)
    model = await server.client("alice", "model")
    fan = await server.client("bob")
    await http.credit("bob", fans)
    assert (await fan.next_event("balance"))["balance"] == fans
    for client in (model, fan):
        await client.call("join", room="alice")
    return model, fan, http


async def books_balance(server: Running, http: Http) -> dict[str, Any]:
    """Reconcile ok and liabilities adding up with the mint."""
    await drain(server)
    result = await http.reconcile()
    assert result["ok"] is True, result
    status, figures = await http.call("GET", "/v1/admin/liabilities", "ops", "admin")
    assert status == 200 and figures["balanced"] is True, figures
    return dict(figures)


async def delete(http: Http, user: str, role: str = "fan") -> tuple[int, Any]:
    return await http.call("DELETE", "/v1/me", user, role, confirm=user)


async def escrow(server: Running, account: str) -> int:
    rows = await pg(server.process.settings, "SELECT balance FROM accounts WHERE id = $1", account)
    return int(rows[0]["balance"]) if rows else 0


# --- part 1: her id in no view ------------------------------------------------------------


async def test_a_deleted_model_is_in_no_view_and_her_room_menu_media_profile_are_gone(
    start_server: Start,
) -> None:
    server = await start_server()
    settings = server.process.settings
    model, fan, http = await ready(server)
    status, _ = await http.call(
        "PUT", "/v1/me/profile", "alice", "model", display_name="Alice", bio="hi", tags=["art"]
    )
    assert status == 200
    status, menu = await http.call(
        "PUT", "/v1/me/menu", "alice", "model", items=[{"label": "Dance", "price": 9}]
    )
    assert status == 200, menu
    status, _ = await http.call("PUT", "/v1/me/prices", "alice", "model", dm=3)
    assert status == 200
    media = await upload(server)
    assert await files_in(settings.media_dir), "the upload wrote no file"
    tip = await fan.call("tip", room="alice", amount=20, key="t1")
    await fan.call("tip", room="alice", item=menu["items"][0]["id"], key="m1")
    await fan.call("unlock", media=media, key="u1")
    await fan.call("dm", to="alice", text="hello", key="d1")
    status, _ = await http.call("PUT", "/v1/me/follows/alice", "bob")
    assert status == 200
    assert await server.node.dm_archive.drain(10.0) == 0

    status, reply = await delete(http, "alice", "model")
    assert status == 200, reply
    alias = reply["pseudonym"]
    assert reply["forfeited"] == 20 + 9 + 7 + 3
    await drain(server)

    # Every view bob or an admin reads: not one string is her id or account.
    views = [
        ("bob", "fan", "/v1/me/transactions"),
        ("bob", "fan", f"/v1/me/transactions/{tip['tx']}"),
        ("bob", "fan", "/v1/me/requests"),
        ("bob", "fan", "/v1/me/privates"),
        ("bob", "fan", "/v1/me/follows"),
        ("bob", "fan", "/v1/me/notifications"),
        ("bob", "fan", "/v1/me/dms?with=" + alias),
        ("bob", "fan", "/v1/rooms"),
        ("bob", "fan", "/v1/rooms?sort=new"),
        ("ops", "admin", "/v1/admin/users?prefix=a"),
        ("ops", "admin", "/v1/admin/users/bob/transactions"),
        ("ops", "admin", "/v1/admin/payouts"),
        ("ops", "admin", "/v1/admin/refunds"),
        ("ops", "admin", "/v1/admin/audit"),
        ("ops", "admin", "/v1/admin/stats"),
        ("ops", "admin", "/v1/admin/liabilities"),
    ]
    seen = {}
    for sub, role, path in views:
        status, body = await http.call("GET", path, sub, role)
        assert status == 200, (path, body)
        seen[path] = body
    async with httpx.AsyncClient(base_url=server.http_url, timeout=30) as client:
        response = await client.get(
            "/v1/me/export", headers={"Authorization": f"Bearer {token('bob')}"}
        )
    assert response.status_code == 200
    seen["/v1/me/export"] = orjson.loads(response.content)
    for path, body in seen.items():
        assert not _names(body, "alice"), (path, body)
    # ...and they show her pseudonym where they showed her.
    assert {t["room"] for t in seen["/v1/me/transactions"]["transactions"] if "room" in t} == {
        alias
    }
    assert seen[f"/v1/me/transactions/{tip['tx']}"]["to"] == alias
    assert seen[f"/v1/me/transactions/{tip['tx']}"]["room"] == alias
    assert alias in orjson.dumps(seen["/v1/me/export"]["transactions"]).decode()

    # Her room, menu, media and profile are gone, files included.
    for table, column in (
        ("rooms", "id"),
        ("menus", "model_id"),
        ("media", "owner_id"),
        ("profiles", "user_id"),
        ("prices", "model_id"),
        ("follows", "model"),
    ):
        assert await pg(settings, f"SELECT 1 FROM {table} WHERE {column} = 'alice'") == [], table
    assert await files_in(settings.media_dir) == []
    joined = await fan.request("join", room="alice")
    assert joined.get("code") == "NOT_FOUND", joined
    assert (await fan.request("unlock", media=media, key="u2"))["code"] == "NOT_FOUND"
    status, _ = await http.call("GET", "/v1/models/alice", "bob")
    assert status == 404
    await books_balance(server, http)
    await model.close()


def _names(value: Any, user: str) -> bool:
    if isinstance(value, str):
        return value in (user, f"u:{user}")
    if isinstance(value, dict):
        return any(_names(k, user) or _names(v, user) for k, v in value.items())
    if isinstance(value, list):
        return any(_names(item, user) for item in value)
    return False


# --- part 2: escrows open at deletion -----------------------------------------------------


async def test_deleting_a_model_refunds_her_fans_and_forfeits_her_rejected_payout(
    start_server: Start,
) -> None:
    server = await start_server(payout_min_tokens=10)
    model, fan, http = await ready(server, fans=500)
    carol = await server.client("carol")
    await http.credit("carol", 100)
    # Earnings to pay out, then a payout waiting for an admin.
    await fan.call("tip", room="alice", amount=50, key="t1")
    await http.call("POST", "/v1/admin/users/alice/verify", "ops", "admin")
    await http.call(
        "PUT", "/v1/me/payout-method", "alice", "model", type="bank", holder="A", iban=IBAN
    )
    status, payout = await http.call("POST", "/v1/me/payouts", "alice", "model", tokens=30, key="p")
    assert status == 201, payout
    # A running all-or-nothing goal holding bob's tips.
    status, set_ = await http.call(
        "PUT", "/v1/me/goal", "alice", "model", title="Toy", target=1000, all_or_nothing=True
    )
    assert status == 200, set_
    goal = set_["goal"]
    await fan.call("tip", room="alice", amount=40, key="g1")
    # A scheduled show with bob's ticket.
    status, show = await http.call(
        "POST",
        "/v1/me/shows",
        "alice",
        "model",
        title="Later",
        price=25,
        starts_at=int((time.time() + 3600) * 1000),
        min_s=1,
    )
    assert status == 201, show
    await fan.call("buy_ticket", room="alice", show=show["show"], key="b1")
    # Requests to her: one offered, one accepted.
    offered = await fan.call("request_offer", model="alice", text="a", amount=15, key="o1")
    accepted = await fan.call("request_offer", model="alice", text="b", amount=20, key="o2")
    await model.call("request_accept", request=accepted["request"])
    # A private show carol asked for.
    await http.call("PUT", "/v1/me/prices", "alice", "model", private_rate=60, private_min_s=60)
    private = await carol.call("private_request", model="alice", rate=60, key="k1")
    assert await balance(fan) == 500 - 50 - 40 - 25 - 15 - 20

    status, reply = await delete(http, "alice", "model")
    assert status == 200, reply
    # Her balance (20 after the hold) and the rejected payout's 30 are forfeited.
    assert reply["forfeited"] == 50
    assert reply["closed"] == {
        "requests": 2,
        "privates": 1,
        "tickets": 0,
        "shows": 1,
        "goals": 1,
        "payouts": 1,
    }
    # Every fan has all of it back but the tip she earned.
    assert await balance(fan) == 450
    assert await balance(carol) == 100
    await drain(server)
    settings = server.process.settings
    for account in (
        f"esc:goal:{goal['id']}",
        f"esc:show:{show['show']}",
        f"esc:request:{offered['request']}",
        f"esc:request:{accepted['request']}",
        f"esc:payout:{payout['payout']}",
    ):
        assert await escrow(server, account) == 0, account
    rows = await pg(settings, "SELECT state, decided_by FROM payouts")
    assert [(r["state"], r["decided_by"]) for r in rows] == [("rejected", "sys:accounts")]
    rows = await pg(settings, "SELECT state FROM private_shows WHERE id = $1", private["show"])
    assert rows[0]["state"] == "declined"
    assert await escrow(server, "u:alice") == 0
    assert await escrow(server, "sys:forfeited") == 50
    figures = await books_balance(server, http)
    assert figures["escrow"] == 0 and figures["models"] == 0
    await carol.close()


async def test_deleting_a_fan_cancels_her_offers_refunds_her_tickets_and_forfeits_it_all(
    start_server: Start,
) -> None:
    server = await start_server()
    model, fan, http = await ready(server)
    status, show = await http.call(
        "POST",
        "/v1/me/shows",
        "alice",
        "model",
        title="Later",
        price=25,
        starts_at=int((time.time() + 3600) * 1000),
        min_s=1,
    )
    assert status == 201
    await fan.call("buy_ticket", room="alice", show=show["show"], key="b1")
    offered = await fan.call("request_offer", model="alice", text="a", amount=15, key="o1")
    await http.call("PUT", "/v1/me/prices", "alice", "model", private_rate=60, private_min_s=60)
    private = await fan.call("private_request", model="alice", rate=60, key="k1")
    await fan.call("tip", room="alice", amount=10, key="t1")
    assert await balance(fan) == 300 - 25 - 15 - 10

    status, reply = await delete(http, "bob")
    assert status == 200, reply
    # What came back from the escrows is forfeited with the rest.
    assert reply["forfeited"] == 290
    assert (reply["closed"]["requests"], reply["closed"]["tickets"]) == (1, 1)
    assert reply["closed"]["privates"] == 1
    await drain(server)
    settings = server.process.settings
    assert await escrow(server, f"esc:show:{show['show']}") == 0
    assert await escrow(server, f"esc:request:{offered['request']}") == 0
    rows = await pg(settings, "SELECT state, text FROM requests")
    assert [(r["state"], r["text"]) for r in rows] == [("cancelled", "(deleted)")]
    rows = await pg(settings, "SELECT state FROM private_shows WHERE id = $1", private["show"])
    assert rows[0]["state"] == "ended"
    # The show goes on without her ticket; her tip stays the model's.
    rows = await pg(settings, "SELECT state FROM shows")
    assert [r["state"] for r in rows] == ["scheduled"]
    assert await balance(model) == 10
    assert await escrow(server, "sys:forfeited") == 290
    await books_balance(server, http)


async def test_deletion_is_refused_while_an_escrow_only_closes_by_itself(
    start_server: Start,
) -> None:
    server = await start_server()
    model, fan, http = await ready(server)
    accepted = await fan.call("request_offer", model="alice", text="b", amount=20, key="o1")
    await model.call("request_accept", request=accepted["request"])
    status, set_ = await http.call(
        "PUT", "/v1/me/goal", "alice", "model", title="Toy", target=1000, all_or_nothing=True
    )
    assert status == 200, set_
    goal = set_["goal"]
    await fan.call("tip", room="alice", amount=40, key="g1")

    status, error = await delete(http, "bob")
    assert status == 409 and error["error"]["code"] == "CONFLICT", error
    assert [(o["kind"], o["id"]) for o in error["error"]["open"]] == [
        ("request", accepted["request"]),
        ("goal", goal["id"]),
    ]
    assert error["error"]["open"][0]["until"] > time.time() * 1000
    # Nothing moved, nothing deleted: bob is still here with his balance.
    assert await balance(fan) == 300 - 20 - 40
    status, _ = await http.call("GET", "/v1/me", "bob")
    assert status == 200
    # Once they have closed (delivered; the goal deleted by its model), it goes.
    await model.call("request_deliver", request=accepted["request"], text="done")
    status, _ = await http.call("DELETE", "/v1/me/goal", "alice", "model")
    assert status == 200
    status, reply = await delete(http, "bob")
    assert status == 200, reply
    assert reply["forfeited"] == 300 - 20
    await books_balance(server, http)


# --- part 3: a payout stuck in requesting -------------------------------------------------


@pytest.mark.parametrize("held", [True, False])
async def test_a_payout_whose_request_died_is_finished_by_the_sweeper(
    start_server: Start, monkeypatch: pytest.MonkeyPatch, held: bool
) -> None:
    server = await start_server(
        payout_min_tokens=10, payout_requesting_max_age_s=0.5, deadline_sweep_interval_s=0.1
    )
    model, fan, http = await ready(server)
    await fan.call("tip", room="alice", amount=100, key="t1")
    await http.call("POST", "/v1/admin/users/alice/verify", "ops", "admin")
    await http.call(
        "PUT", "/v1/me/payout-method", "alice", "model", type="bank", holder="A", iban=IBAN
    )
    real_hold = Economy.hold

    async def died(self: Economy, *args: Any, **kwargs: Any) -> dict[str, Any]:
        # The request dies after its row: with the hold applied and its
        # answer lost, or before the hold reached Redis.
        if held:
            await real_hold(self, *args, **kwargs)
        raise Unavailable("Redis did not answer in time")

    monkeypatch.setattr(Economy, "hold", died)
    status, error = await http.call("POST", "/v1/me/payouts", "alice", "model", tokens=40, key="p")
    assert status == 503, error
    monkeypatch.setattr(Economy, "hold", real_hold)
    settings = server.process.settings
    [row] = await pg(settings, "SELECT id, state FROM payouts")
    assert row["state"] == "requesting"

    async def decided() -> bool:
        rows = await pg(settings, "SELECT state FROM payouts WHERE id = $1", row["id"])
        return bool(rows[0]["state"] != "requesting")

    await eventually(decided)
    [done] = await pg(settings, "SELECT state, hold_tx, reason FROM payouts")
    if held:
        # Finished: requested with its hold, for an admin to decide.
        assert done["state"] == "requested" and done["reason"] is None
        assert await balance(model) == 60
        status, paid = await http.call(
            "POST", f"/v1/admin/payouts/{row['id']}/approve", "ops", "admin"
        )
        assert status == 200 and paid["state"] == "paid", paid
    else:
        # Cancelled: nothing held, nothing moved; the model's retry of the
        # key holds it then, once.
        assert done["state"] == "refused" and "nothing was held" in done["reason"]
        assert await balance(model) == 100
        assert await escrow(server, f"esc:payout:{row['id']}") == 0
        status, again = await http.call(
            "POST", "/v1/me/payouts", "alice", "model", tokens=40, key="p"
        )
        assert status == 201 and again["state"] == "requested" and again["reason"] is None
        assert await balance(model) == 60
    # The sweeper does nothing more to it, however often it runs.
    assert await server.node.payouts.finish_requesting(
        (await pg(settings, "SELECT * FROM payouts"))[0]
    ) in ("requested", "paid")
    await drain(server)
    kinds = await pg(settings, "SELECT kind FROM ledger_transactions WHERE meta ? 'payout'")
    assert sorted(k["kind"] for k in kinds) == (["hold", "payout"] if held else ["hold"])
    await books_balance(server, http)


async def test_a_credit_reaching_a_deleted_account_later_is_forfeited_by_the_sweeper(
    start_server: Start,
) -> None:
    server = await start_server(deadline_sweep_interval_s=0.1)
    model, fan, http = await ready(server, fans=100)
    tip = await fan.call("tip", room="alice", amount=30, key="t1")
    status, reply = await delete(http, "bob")
    assert status == 200 and reply["forfeited"] == 70, reply
    # An admin refunds the deleted fan's tip: the tokens reach his account...
    status, refund = await http.call(
        "POST", "/v1/admin/refunds", "ops", "admin", tx=tip["tx"], key="r1"
    )
    assert status == 200, refund
    assert await balance(model) == 0
    settings = server.process.settings

    async def forfeited() -> bool:
        await drain(server)
        return await escrow(server, "sys:forfeited") == 100

    # ...and are forfeited by the next sweeps, once.
    await eventually(forfeited)
    assert await escrow(server, "u:bob") == 0
    [row] = await pg(settings, "SELECT forfeited FROM deleted_users")
    assert row["forfeited"] == 100
    await server.node.closing.forfeit_late_credits()  # nothing left: nothing moves
    await drain(server)
    kinds = await pg(
        settings,
        """SELECT t.kind, p.amount FROM ledger_transactions t JOIN ledger_postings p
             ON p.tx_id = t.id WHERE p.account_id = 'sys:forfeited' ORDER BY t.applied_ms""",
    )
    assert [(k["kind"], k["amount"]) for k in kinds] == [("forfeit", 70), ("forfeit", 30)]
    await books_balance(server, http)


async def test_a_deleted_user_named_like_a_field_value_changes_only_where_she_is_named(
    start_server: Start,
) -> None:
    # A user may be called `tip`: her pseudonym replaces her where a field
    # names a user, never a transaction's kind.
    server = await start_server()
    http = Http(server)
    await server.client("alice", "model")
    fan = await server.client("tip")
    await http.credit("tip", 50)
    await fan.call("join", room="alice")
    await fan.call("tip", room="alice", amount=5, key="t1")
    status, reply = await delete(http, "tip")
    assert status == 200, reply
    await drain(server)
    status, hers = await http.call("GET", "/v1/me/transactions?kind=tip", "alice", "model")
    assert status == 200, hers
    [row] = hers["transactions"]
    assert (row["kind"], row["counterparty"], row["room"]) == ("tip", reply["pseudonym"], "alice")
    status, theirs = await http.call("GET", "/v1/admin/users/alice/transactions", "ops", "admin")
    assert [t["kind"] for t in theirs["transactions"]] == ["tip"]
    await books_balance(server, http)


async def test_a_deletion_cut_short_by_a_backend_forfeits_nothing_and_its_retry_finishes(
    start_server: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = await start_server()
    _model, fan, http = await ready(server)
    offered = await fan.call("request_offer", model="alice", text="a", amount=15, key="o1")
    real_refund = Economy.escrow_refund

    async def lost(self: Economy, *args: Any, **kwargs: Any) -> dict[str, Any]:
        raise Unavailable("Redis did not answer in time")

    # Every refund fails for a while (the workflow's own try and the settle
    # check after it alike).
    monkeypatch.setattr(Economy, "escrow_refund", lost)
    status, error = await delete(http, "bob")
    monkeypatch.setattr(Economy, "escrow_refund", real_refund)
    # The request is cancelled, its refund did not move: nothing forfeited.
    assert status == 503 and error["error"]["code"] == "UNAVAILABLE", error
    assert await balance(fan) == 285
    assert await pg(server.process.settings, "SELECT 1 FROM deleted_users") == []
    # Asked again: the refund moves, then the forfeiture takes it all, once.
    status, reply = await delete(http, "bob")
    assert status == 200, reply
    assert reply["forfeited"] == 300
    assert await escrow(server, f"esc:request:{offered['request']}") == 0
    assert await escrow(server, "sys:forfeited") == 300
    await books_balance(server, http)
