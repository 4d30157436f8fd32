"""Spending limits, self-exclusion and reality checks (issue #12 section 5)
against real Redis, Postgres and server processes: limits on every kind of
spend, lowering at once and raising after the delay, refusals that move
nothing, idempotent retries, hostile input, Redis losing the counters, two
server processes racing one limit, and the reality_check event."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Http, Running, eventually, pg, token
from tests.server.proc import connect, serve
from tokenchat.client_demo.client import Client
from tokenchat.server.config import Settings
from tokenchat.server.economy.economy import escrow_account
from tokenchat.server.economy.limits import windows
from tokenchat.server.errors import SelfExcluded, SpendLimit

Start = Callable[..., Awaitable[Running]]


async def members(server: Running, tokens: int = 200) -> tuple[Client, Client]:
    """alice (model) and bob (a fan with ``tokens``), both in alice's room."""
    model = await server.client("alice", "model")
    fan = await server.client("bob")
    if tokens:
        await Http(server).credit("bob", tokens)
        assert (await fan.next_event("balance"))["balance"] == tokens
    for client in (model, fan):
        await client.call("join", room="alice")
    return model, fan


async def balance(client: Client) -> int:
    return int((await client.call("balance"))["balance"])


async def set_limits(server: Running, user: str = "bob", **body: Any) -> dict[str, Any]:
    status, reply = await Http(server).call("PUT", "/v1/me/limits", user, **body)
    assert status == 200, reply
    return dict(reply)


async def get_limits(server: Running, user: str = "bob") -> dict[str, Any]:
    status, reply = await Http(server).call("GET", "/v1/me/limits", user)
    assert status == 200, reply
    return dict(reply)


async def spend_rows(settings: Settings, user: str = "bob") -> int:
    rows = await pg(
        settings,
        "SELECT count(*) AS n FROM ledger_postings WHERE account_id = $1 AND amount < 0",
        f"u:{user}",
    )
    return int(rows[0]["n"])


async def drain(server: Running) -> None:
    assert await server.node.ledger.drain(10.0) == 0


# --- the windows --------------------------------------------------------------------------


def test_calendar_windows_in_utc() -> None:
    # Wednesday 2026-12-30 15:00 UTC: its day, its week from Monday the
    # 28th, its month, which ends with the year.
    at = 1798642800000
    (d, daily, _, d0, d1), (w, weekly, _, w0, w1), (m, monthly, _, m0, m1) = windows(at)
    assert (d, daily, w, weekly, m, monthly) == ("d", "daily", "w", "weekly", "m", "monthly")
    assert (d0, d1) == (1798588800000, 1798675200000)  # 2026-12-30 and -31, 00:00
    assert (w0, w1) == (1798416000000, 1799020800000)  # Monday 12-28, Monday 01-04
    assert (m0, m1) == (1796083200000, 1798761600000)  # 12-01, 2027-01-01
    # A Monday at midnight opens a new week; the Sunday before closes one.
    monday = 1798416000000
    assert windows(monday)[1][3] == monday and windows(monday - 1)[1][4] == monday


# --- limits on the spends -------------------------------------------------------------------


async def test_a_daily_limit_refuses_what_passes_it_and_moves_nothing(
    server: Running, settings: Settings
) -> None:
    model, fan = await members(server)
    view = await set_limits(server, daily=50)
    assert view["limits"] == {"daily": 50, "weekly": None, "monthly": None}
    assert view["windows"]["daily"]["remaining"] == 50
    await fan.call("tip", room="alice", amount=30, key="t1")
    refused = await fan.request("tip", room="alice", amount=30, key="t2")
    assert refused["code"] == "SPEND_LIMIT", refused
    assert refused["window"] == "daily" and refused["remaining"] == 20
    assert refused["resets_at"] == windows(int(time.time() * 1000))[0][4]
    assert await balance(fan) == 170 and await balance(model) == 30
    # A retry of the accepted tip is its duplicate, not a refusal.
    again = await fan.call("tip", room="alice", amount=30, key="t1")
    assert again["duplicate"] is True
    await fan.call("tip", room="alice", amount=20, key="t3")
    view = await get_limits(server)
    assert view["windows"]["daily"] == {
        "limit": 50,
        "spent": 50,
        "remaining": 0,
        "resets_at": refused["resets_at"],
    }
    assert view["windows"]["monthly"]["spent"] == 50
    await drain(server)
    assert await spend_rows(settings) == 2
    assert (await Http(server).reconcile())["ok"] is True


async def test_every_kind_of_spend_obeys_the_limit(server: Running, settings: Settings) -> None:
    _, fan = await members(server)
    status, _ = await Http(server).call("PUT", "/v1/me/prices", "alice", "model", dm=10)
    assert status == 200
    status, menu = await Http(server).call(
        "PUT", "/v1/me/menu", "alice", "model", items=[{"label": "wave", "price": 15}]
    )
    assert status == 200, menu
    await set_limits(server, weekly=40)
    await fan.call("dm", to="alice", text="hi", key="d1")  # 10
    await fan.call("tip", room="alice", item=menu["items"][0]["id"], key="i1")  # 15
    offer = await fan.call("request_offer", model="alice", text="a song", amount=10, key="o1")
    assert offer["request"].startswith("r_")  # a hold of 10: 35 spent
    from tests.server.test_media import uploaded

    media = await uploaded(server, price=6)
    status, show = await Http(server).call(
        "POST",
        "/v1/me/shows",
        "alice",
        "model",
        title="late",
        price=6,
        starts_at=int(time.time() * 1000) + 60_000,
        min_s=1,
    )
    assert status == 201, show
    for command, fields in (
        ("dm", {"to": "alice", "text": "again"}),
        ("tip", {"room": "alice", "item": menu["items"][0]["id"]}),
        ("request_offer", {"model": "alice", "text": "more", "amount": 10}),
        ("tip", {"room": "alice", "amount": 6}),
        ("unlock", {"media": media["id"]}),
        ("buy_ticket", {"room": "alice", "show": show["show"]}),
    ):
        refused = await fan.request(command, key=f"x-{command}", **fields)
        assert refused["code"] == "SPEND_LIMIT", (command, refused)
        assert refused["window"] == "weekly" and refused["remaining"] == 5
    assert await balance(fan) == 165
    # The economy's own spends (a private show's minimum and meter) too.
    economy = server.node.economy
    escrow = escrow_account("private", "p_" + "0" * 24)
    with pytest.raises(SpendLimit):
        await economy.hold(
            "bob", escrow, 6, subject="p", key="h1", request="[]", meta={}, initiator="sys:t"
        )
    with pytest.raises(SpendLimit):
        await economy.meter(
            "bob", escrow, "alice", 6, initiator="sys:t", key="m1", request="[]", meta={}
        )
    assert await economy.limits.spendable("bob") == 5
    await fan.call("tip", room="alice", amount=5, key="t-last")
    await drain(server)
    assert await spend_rows(settings) == 4
    assert (await Http(server).reconcile())["ok"] is True


async def test_lowering_applies_at_once_raising_after_the_delay(start_server: Start) -> None:
    server = await start_server(limit_raise_delay_s=1.0)
    _, fan = await members(server)
    await set_limits(server, daily=100, monthly=100)
    view = await set_limits(server, daily=20)  # lower: now
    assert view["limits"]["daily"] == 20 and view["pending"] == {}
    view = await set_limits(server, daily=60, monthly=None)  # a raise and a removal: later
    assert view["limits"] == {"daily": 20, "weekly": None, "monthly": 100}
    assert view["pending"]["daily"]["to"] == 60 and view["pending"]["monthly"]["to"] is None
    assert view["pending"]["daily"]["at"] > int(time.time() * 1000)
    refused = await fan.request("tip", room="alice", amount=30, key="t1")
    assert refused["code"] == "SPEND_LIMIT" and refused["remaining"] == 20
    await asyncio.sleep(1.1)
    await fan.call("tip", room="alice", amount=30, key="t2")  # the raise applied by itself
    view = await get_limits(server)
    assert view["limits"] == {"daily": 60, "weekly": None, "monthly": None}
    assert view["pending"] == {} and view["windows"]["daily"]["remaining"] == 30
    # A lower limit cancels a raise pending for that window.
    await set_limits(server, daily=200)
    view = await set_limits(server, daily=40)
    assert view["limits"]["daily"] == 40 and view["pending"] == {}
    refused = await fan.request("tip", room="alice", amount=11, key="t3")
    assert refused["code"] == "SPEND_LIMIT" and refused["remaining"] == 10


async def test_a_limit_under_what_was_spent_leaves_nothing(server: Running) -> None:
    _, fan = await members(server)
    await fan.call("tip", room="alice", amount=30, key="t1")  # before any limit
    view = await set_limits(server, daily=10)
    assert view["windows"]["daily"] == {**view["windows"]["daily"], "spent": 30, "remaining": 0}
    refused = await fan.request("tip", room="alice", amount=1, key="t2")
    assert refused["code"] == "SPEND_LIMIT" and refused["remaining"] == 0
    # A free DM is no spend: it goes through.
    await fan.call("dm", to="alice", text="free", key="d1")


# --- self-exclusion ----------------------------------------------------------------------


async def test_self_exclusion_blocks_spends_and_purchases_until_it_ends(
    start_server: Start, settings: Settings
) -> None:
    server = await start_server(payment_provider="fake", self_exclusion_day_s=4.0)
    model, fan = await members(server)
    http = Http(server)
    status, reply = await http.call("POST", "/v1/me/self-exclusion", "bob", days=1)
    assert status == 200, reply
    until = reply["excluded_until"]
    assert until > int(time.time() * 1000)
    refused = await fan.request("tip", room="alice", amount=1, key="t1")
    assert refused["code"] == "SELF_EXCLUDED" and refused["until"] == until
    refused = await fan.request("request_offer", model="alice", text="x", amount=5, key="o1")
    assert refused["code"] == "SELF_EXCLUDED"
    status, bought = await http.call(
        "POST", "/v1/purchases", "bob", bundle="starter", payment_ref="pay-x"
    )
    assert status == 403, bought
    assert bought["error"]["code"] == "SELF_EXCLUDED" and bought["error"]["until"] == until
    # The credit script refuses it too (a purchase that got past the check).
    with pytest.raises(SelfExcluded):
        await server.node.economy.credit(
            "bob", 5, initiator="sys:payments", key="direct", kind="purchase"
        )
    # An admin's grant is no purchase: it goes through.
    await http.credit("bob", 1)
    # Not lifted early: a shorter one changes nothing; limits do not lift it.
    status, again = await http.call("POST", "/v1/me/self-exclusion", "bob", days=1)
    assert status == 200 and again["excluded_until"] >= until
    await set_limits(server, daily=None)
    assert (await get_limits(server))["excluded_until"] == again["excluded_until"]
    assert await balance(fan) == 201 and await balance(model) == 0
    await asyncio.sleep(max(0.0, (again["excluded_until"] - time.time() * 1000) / 1000) + 0.1)
    await fan.call("tip", room="alice", amount=1, key="t2")
    status, bought = await http.call(
        "POST", "/v1/purchases", "bob", bundle="starter", payment_ref="pay-y"
    )
    assert status == 200, bought
    assert (await get_limits(server))["excluded_until"] is None
    rows = await pg(settings, "SELECT excluded_until FROM spend_limits WHERE user_id = 'bob'")
    assert rows[0]["excluded_until"] == again["excluded_until"]


# --- hostile input ------------------------------------------------------------------------


async def test_hostile_limits_and_exclusions_are_bad_requests(server: Running) -> None:
    http = Http(server)
    for body in (
        {},
        {"daily": "10"},
        {"daily": -1},
        {"daily": True},
        {"weekly": 10**13},
        {"monthly": 1.5},
        {"reality_check_min": 0},
        {"reality_check_min": 100000},
        {"yearly": 5},
    ):
        status, reply = await http.call("PUT", "/v1/me/limits", "bob", **body)
        assert status == 400 and reply["error"]["code"] == "BAD_REQUEST", (body, reply)
    for body in ({}, {"days": 0}, {"days": "3"}, {"days": 10**9}, {"days": None}):
        status, reply = await http.call("POST", "/v1/me/self-exclusion", "bob", **body)
        assert status == 400 and reply["error"]["code"] == "BAD_REQUEST", (body, reply)
    async with httpx.AsyncClient(base_url=server.http_url) as raw:
        response = await raw.put(
            "/v1/me/limits",
            content=b"[1]",
            headers={"Authorization": f"Bearer {token('bob')}"},
        )
        assert response.status_code == 400
        response = await raw.get("/v1/me/limits")
        assert response.status_code == 401
    # Nothing was saved.
    assert (await get_limits(server))["limits"] == {
        "daily": None,
        "weekly": None,
        "monthly": None,
    }


# --- Redis loss and restart ------------------------------------------------------------------


async def test_counters_rebuild_from_the_ledger_after_a_redis_loss(
    start_server: Start, settings: Settings, private_redis: str
) -> None:
    server = await start_server(redis_url=private_redis)
    _, fan = await members(server)
    await set_limits(server, daily=50)
    await fan.call("tip", room="alice", amount=40, key="t1")
    await drain(server)
    await server.node.redis.flushall()  # counters, limits and balances gone
    refused = await fan.request("tip", room="alice", amount=20, key="t2")
    assert refused["code"] == "SPEND_LIMIT" and refused["remaining"] == 10, refused
    assert (await fan.call("tip", room="alice", amount=40, key="t1"))["duplicate"] is True
    await fan.call("tip", room="alice", amount=10, key="t3")
    view = await get_limits(server)
    assert view["windows"]["daily"]["spent"] == 50


async def test_limits_survive_a_restart(start_server: Start, settings: Settings) -> None:
    server = await start_server()
    _, fan = await members(server)
    await set_limits(server, daily=25)
    await fan.call("tip", room="alice", amount=20, key="t1")
    await drain(server)
    await fan.close()
    await server.process.stop()
    again = await start_server()
    fan = await again.client("bob")
    await fan.call("join", room="alice")
    refused = await fan.request("tip", room="alice", amount=10, key="t2")
    assert refused["code"] == "SPEND_LIMIT" and refused["remaining"] == 5


# --- concurrency: two server processes -----------------------------------------------------


async def test_two_server_processes_never_charge_past_a_limit(
    settings: Settings, tmp_path: Path
) -> None:
    limit, amount, tips_each = 100, 7, 25
    clients: list[Client] = []
    async with serve(settings, tmp_path) as first, serve(settings, tmp_path) as second:
        try:
            model = await connect(first, "alice", "model")
            clients.append(model)
            async with httpx.AsyncClient(base_url=first.http_url, timeout=30) as http:
                admin = {"Authorization": f"Bearer {token('ops', 'admin')}"}
                bob = {"Authorization": f"Bearer {token('bob')}"}
                reply = await http.post(
                    "/v1/admin/credits",
                    headers=admin,
                    json={"user": "bob", "amount": 1000, "key": "c"},
                )
                assert reply.status_code == 200, reply.text
                reply = await http.put("/v1/me/limits", headers=bob, json={"daily": limit})
                assert reply.status_code == 200, reply.text
            fans = [await connect(first, "bob"), await connect(second, "bob")]
            clients.extend(fans)
            for fan in fans:
                await fan.call("join", room="alice")

            async def burst(n: int, fan: Client) -> list[dict[str, Any]]:
                return list(
                    await asyncio.gather(
                        *(
                            fan.request("tip", room="alice", amount=amount, key=f"{n}-{i}")
                            for i in range(tips_each)
                        )
                    )
                )

            replies = [r for rs in await asyncio.gather(*map(burst, (0, 1), fans)) for r in rs]
            accepted = [r for r in replies if r["type"] == "ok"]
            refused = [r for r in replies if r["type"] == "error"]
            assert {r["code"] for r in refused} == {"SPEND_LIMIT"}
            assert len(accepted) == limit // amount  # 14: 98 tokens
            assert await balance(fans[0]) == 1000 - len(accepted) * amount
            assert await balance(model) == len(accepted) * amount
        finally:
            for client in clients:
                await client.close()


# --- reality checks ---------------------------------------------------------------------------


async def test_reality_checks_tell_time_online_and_spent(start_server: Start) -> None:
    server = await start_server(reality_check_minute_s=1.0, reality_check_poll_s=0.1)
    _, fan = await members(server)
    await asyncio.sleep(0.3)  # the session's task has read her total (after the welcome)
    await fan.call("tip", room="alice", amount=5, key="before")
    await set_limits(server, reality_check_min=1)
    await fan.call("tip", room="alice", amount=12, key="t1")  # maybe before it noticed
    event = await fan.next_event("reality_check", timeout_s=5)
    assert event["every_min"] == 1 and event["online_s"] >= 0
    # Since the session opened, not since it noticed the setting.
    assert event["spent"] == 17
    # Another session counts from its own hello, and spends from other
    # sessions count.
    second = await server.client("bob")
    await asyncio.sleep(0.3)  # its task has read her total (right after the welcome)
    await fan.call("tip", room="alice", amount=3, key="t2")
    assert (await second.next_event("reality_check", timeout_s=5))["spent"] == 3
    later = await fan.next_event("reality_check", timeout_s=5)
    assert later["spent"] == 20 and later["online_s"] >= event["online_s"]
    await second.close()
    # Off again: no more of them.
    await set_limits(server, reality_check_min=None)
    await asyncio.sleep(0.3)
    while not fan.events.empty():
        fan.events.get_nowait()
    with pytest.raises(TimeoutError):
        await fan.next_event("reality_check", timeout_s=1.2)


async def test_a_private_show_ends_where_the_limit_does(
    start_server: Start, settings: Settings
) -> None:
    server = await start_server(private_tick_s=1, private_meter_interval_s=0.1)
    model, fan = await members(server)
    status, _ = await Http(server).call(
        "PUT", "/v1/me/prices", "alice", "model", private_rate=60, private_min_s=0
    )
    assert status == 200
    await set_limits(server, daily=3)  # three seconds at a token a second
    show = (await fan.call("private_request", model="alice", rate=60, key="p1"))["show"]
    await model.call("private_accept", show=show)

    async def ended() -> bool:
        rows = await pg(
            settings,
            "SELECT state, end_reason FROM private_shows WHERE id = $1",
            show,
        )
        return bool(rows) and rows[0]["state"] == "ended"

    await eventually(ended, timeout_s=10)
    assert 200 - await balance(fan) == 3


# --- the client library --------------------------------------------------------------------


async def test_the_client_library_sets_reads_and_shows_refusals(server: Running) -> None:
    from tokenchat.client_demo.client import (
        CommandError,
        HttpError,
        Session,
        get_limits,
        put_limits,
        self_exclude,
    )

    await Http(server).credit("bob", 50)
    await (await server.client("alice", "model")).close()
    bob = token("bob")
    view = await put_limits(server.http_url, bob, monthly=20, reality_check_min=30)
    assert view["limits"]["monthly"] == 20 and view["reality_check_min"] == 30
    assert (await get_limits(server.http_url, bob))["windows"]["monthly"]["remaining"] == 20
    with pytest.raises(HttpError) as bad:
        await put_limits(server.http_url, bob, monthly=-5)
    assert bad.value.code == "BAD_REQUEST"
    async with await Session.connect(server.ws_url, bob) as session:
        await session.join("alice")
        await session.tip("alice", 15)
        with pytest.raises(CommandError) as refused:
            await session.tip("alice", 15)
        assert refused.value.code == "SPEND_LIMIT"
        assert refused.value.reply["remaining"] == 5 and refused.value.reply["window"] == "monthly"
    until = await self_exclude(server.http_url, bob, 3)
    assert until > time.time() * 1000
    status, reply = await Http(server).call(
        "POST", "/v1/purchases", "bob", bundle="starter", payment_ref="p1"
    )
    assert status == 403 and reply["error"]["until"] == until


async def test_the_scripts_calendar_is_pythons(redis: Any) -> None:
    # money_lib.lua's month arithmetic (the windows user_gate computes from
    # TIME) against Python's calendar, on every 7th day from 1970 to 2110
    # and around the edges of months and leap years.
    import datetime as dt

    from tokenchat.server.economy.scripts import script_source

    probe = (
        script_source("money_lib")
        + """
local out = {}
for i = 1, #ARGV do
  local y, m = civil_from_days(tonumber(ARGV[i]))
  local ny, nm = y, m + 1
  if nm > 12 then ny, nm = y + 1, 1 end
  out[#out + 1] = y * 100 + m
  out[#out + 1] = days_from_civil(ny, nm)
end
return out
"""
    )
    edges = [
        (dt.date(y, m, 1) - dt.date(1970, 1, 1)).days + delta
        for y in (1970, 2000, 2024, 2026, 2100)
        for m in (1, 2, 3, 12)
        for delta in (-1, 0, 1)
    ]
    days = sorted({*range(0, 51000, 7), *(d for d in edges if d >= 0)})
    for start in range(0, len(days), 500):
        chunk = days[start : start + 500]
        result = await redis.eval(probe, 0, *chunk)
        for n, day in enumerate(chunk):
            date = dt.date(1970, 1, 1) + dt.timedelta(days=day)
            following = (date.replace(day=1) + dt.timedelta(days=32)).replace(day=1)
            assert result[2 * n] == date.year * 100 + date.month, date
            assert result[2 * n + 1] == (following - dt.date(1970, 1, 1)).days, date
