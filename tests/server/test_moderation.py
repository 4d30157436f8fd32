"""Moderation (issue #12 section 4) and the audit log (section 7), against
real Redis, Postgres and server processes: every command and its refusals,
room settings, platform bans, removal across two server processes, and bans
that survive a restart with Redis emptied."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from tests.conftest import Http, Running, eventually, pg, token
from tests.server.proc import close_all, close_code, connect, serve
from tokenchat.client_demo.client import Client
from tokenchat.server.config import Settings

Start = Callable[..., Awaitable[Running]]


async def room_with(server: Running, *fans: str) -> tuple[Client, list[Client]]:
    """alice's room with ``fans`` in it (each joined)."""
    model = await server.client("alice", "model")
    await model.call("join", room="alice")
    joined = []
    for fan in fans:
        client = await server.client(fan)
        await client.call("join", room="alice")
        joined.append(client)
    return model, joined


async def refused(client: Client, type_: str, code: str, **fields: Any) -> dict[str, Any]:
    reply = await client.request(type_, **fields)
    assert reply["type"] == "error" and reply["code"] == code, reply
    return reply


async def audit(server: Running, **query: Any) -> list[dict[str, Any]]:
    path = "/v1/admin/audit" + (
        "?" + "&".join(f"{k}={v}" for k, v in query.items()) if query else ""
    )
    status, page = await Http(server).call("GET", path, "ops", "admin")
    assert status == 200, page
    return list(page["entries"])


def soon_ms(seconds: float) -> int:
    return int((time.time() + seconds) * 1000)


async def test_mute_stops_chat_not_tips_and_unmute_lifts_it(server: Running) -> None:
    model, (bob,) = await room_with(server, "bob")
    await Http(server).credit("bob", 10)
    reply = await model.call("mute", room="alice", user="bob", seconds=60)
    assert reply["user"] == "bob" and soon_ms(55) < reply["until"] <= soon_ms(61)
    muted = await refused(bob, "say", "MUTED", room="alice", text="hi")
    assert muted["until"] == reply["until"]
    assert (await bob.call("tip", room="alice", amount=3, key="t1"))["balance"] == 7
    await model.call("unmute", room="alice", user="bob")
    await bob.call("say", room="alice", text="back")
    actions = [(e["action"], e["actor"], e["target"]) for e in await audit(server)]
    assert actions[:2] == [("unmute", "alice", "bob"), ("mute", "alice", "bob")]


async def test_a_mute_ends_by_itself(server: Running) -> None:
    model, (bob,) = await room_with(server, "bob")
    await model.call("mute", room="alice", user="bob", seconds=1)
    await refused(bob, "say", "MUTED", room="alice", text="hi")
    await asyncio.sleep(1.1)
    await bob.call("say", room="alice", text="free again")


async def test_kick_removes_the_member_who_may_join_again(server: Running) -> None:
    model, (bob, carol) = await room_with(server, "bob", "carol")
    await model.call("kick", room="alice", user="bob")
    removed = await bob.next_event("removed")
    assert removed == {"type": "removed", "room": "alice", "reason": "kicked"}
    await refused(bob, "say", "NOT_IN_ROOM", room="alice", text="still here?")
    await carol.call("say", room="alice", text="carol stays")
    await bob.call("join", room="alice")
    await bob.call("say", room="alice", text="I am back")


async def test_a_ban_removes_keeps_out_and_ends(server: Running) -> None:
    model, (bob, carol) = await room_with(server, "bob", "carol")
    second = await server.client("bob")  # another tab: removed too
    await second.call("join", room="alice")
    reply = await model.call("ban", room="alice", user="bob", seconds=1)
    for session in (bob, second):
        removed = await session.next_event("removed")
        assert removed["reason"] == "banned" and removed["until"] == reply["until"]
    await refused(second, "tip", "NOT_IN_ROOM", room="alice", amount=1, key="k")
    await carol.call("say", room="alice", text="carol was not touched")
    refusal = await refused(bob, "join", "BANNED", room="alice")
    assert refusal["until"] == reply["until"]
    await asyncio.sleep(1.1)
    await bob.call("join", room="alice")


async def test_a_permanent_ban_has_no_until_and_unban_lifts_it(server: Running) -> None:
    model, (bob,) = await room_with(server, "bob")
    reply = await model.call("ban", room="alice", user="bob")
    assert reply["until"] is None
    assert "until" not in await bob.next_event("removed")
    assert "until" not in await refused(bob, "join", "BANNED", room="alice")
    # Banning again (a retry) changes nothing; unbanning twice neither.
    await model.call("ban", room="alice", user="bob")
    await model.call("unban", room="alice", user="bob")
    await model.call("unban", room="alice", user="bob")
    await bob.call("join", room="alice")


async def test_clear_removes_a_users_lines_for_everyone(server: Running) -> None:
    model, (bob, carol) = await room_with(server, "bob", "carol")
    await Http(server).credit("bob", 10)
    await bob.call("say", room="alice", text="spam 1")
    await carol.call("say", room="alice", text="hello")
    await bob.call("say", room="alice", text="spam 2")
    await bob.call("tip", room="alice", amount=2, key="t1")
    reply = await model.call("clear", room="alice", user="bob")
    assert reply["removed"] == 2
    for client in (model, bob, carol):
        assert await client.next_event("clear") == {"type": "clear", "room": "alice", "user": "bob"}
    late = await server.client("dave")
    history = (await late.call("join", room="alice"))["history"]
    kept = [(e["type"], e["from"]) for e in history]
    assert kept == [("message", "carol"), ("tip", "bob")]


async def test_slow_mode_spaces_chat_lines_but_not_tips(server: Running) -> None:
    model, (bob,) = await room_with(server, "bob")
    await Http(server).credit("bob", 10)
    await model.call("slow", room="alice", seconds=2)
    await bob.call("say", room="alice", text="one")
    slowed = await refused(bob, "say", "SLOW_MODE", room="alice", text="two")
    assert soon_ms(0) < slowed["until"] <= soon_ms(2.1)
    await bob.call("tip", room="alice", amount=1, key="t1")
    await bob.call("tip", room="alice", amount=1, key="t2")
    for n in range(3):  # the model is never slowed
        await model.call("say", room="alice", text=f"model {n}")
    await model.call("slow", room="alice", seconds=0)
    await bob.call("say", room="alice", text="two")
    joined = await bob.call("join", room="alice")
    assert joined["room"]["moderation"]["slow_s"] == 0


async def test_moderators_are_appointed_and_bounded(server: Running, settings: Settings) -> None:
    http = Http(server)
    model, (bob, carol, mod) = await room_with(server, "bob", "carol", "mod")
    # A fan cannot moderate.
    await refused(bob, "kick", "FORBIDDEN", room="alice", user="carol")
    status, reply = await http.call("PUT", "/v1/me/moderators", "alice", "model", users=["mod"])
    assert status == 200 and reply["moderators"] == ["mod"]
    status, reply = await http.call("GET", "/v1/me/moderators", "alice", "model")
    assert reply["moderators"] == ["mod"]
    await mod.call("mute", room="alice", user="carol", seconds=30)
    await refused(carol, "say", "MUTED", room="alice", text="x")
    # A moderator acts on neither the model, another moderator, nor herself.
    await refused(mod, "ban", "FORBIDDEN", room="alice", user="alice")
    await refused(mod, "kick", "FORBIDDEN", room="alice", user="mod")
    await http.call("PUT", "/v1/me/moderators", "alice", "model", users=["mod", "bob"])
    await refused(mod, "kick", "FORBIDDEN", room="alice", user="bob")
    # Moderators chat freely, slow mode or not.
    await model.call("slow", room="alice", seconds=60)
    await mod.call("say", room="alice", text="1")
    await mod.call("say", room="alice", text="2")
    # Dismissed: no longer a moderator anywhere.
    await http.call("PUT", "/v1/me/moderators", "alice", "model", users=[])
    await refused(mod, "unmute", "FORBIDDEN", room="alice", user="carol")
    # Bounds and hostile bodies.
    many = [f"u{n}" for n in range(settings.moderators_max + 1)]
    for body in ({"users": many}, {"users": "mod"}, {"users": [1]}, {"users": ["a b"]}, {}):
        status, reply = await http.call("PUT", "/v1/me/moderators", "alice", "model", **body)
        assert status == 400 and reply["error"]["code"] == "BAD_REQUEST", body
    status, reply = await http.call("PUT", "/v1/me/moderators", "alice", "model", users=["ghost"])
    assert status == 404
    status, reply = await http.call("PUT", "/v1/me/moderators", "bob", "fan", users=["mod"])
    assert status == 403


async def test_hostile_moderation_commands(server: Running) -> None:
    model, _ = await room_with(server, "bob")
    for fields in (
        {"room": "alice", "user": "bob", "seconds": 0},
        {"room": "alice", "user": "bob", "seconds": 10**12},
        {"room": "alice", "user": "bob", "seconds": "60"},
        {"room": "alice", "user": "bob", "seconds": True},
        {"room": "alice", "user": "b b", "seconds": 5},
        {"room": "alice", "seconds": 5},
    ):
        await refused(model, "mute", "BAD_REQUEST", **fields)
    await refused(model, "slow", "BAD_REQUEST", room="alice", seconds=-1)
    await refused(model, "slow", "BAD_REQUEST", room="alice", seconds=10**9)
    await refused(model, "ban", "NOT_FOUND", room="alice", user="ghost")
    await refused(model, "kick", "FORBIDDEN", room="alice", user="alice")
    # Another model's room is not hers to moderate.
    await refused(model, "kick", "FORBIDDEN", room="zoe", user="bob")
    # Nothing was recorded for any of them.
    assert await audit(server) == []


async def test_room_settings_require_tokens_to_chat(start_server: Start) -> None:
    server = await start_server(payment_provider="fake", chat_purchase_recheck_s=0.1)
    http = Http(server)
    model, (bob,) = await room_with(server, "bob")
    status, reply = await http.call(
        "PUT", "/v1/me/room", "alice", "model", chat_requires="balance", chat_min_balance=10
    )
    assert status == 200, reply
    assert reply == {
        "room": "alice",
        "slow_s": 0,
        "chat_requires": "balance",
        "chat_min_balance": 10,
    }
    await refused(bob, "say", "FORBIDDEN", room="alice", text="hi")
    await http.credit("bob", 10)
    await bob.call("say", room="alice", text="hi")
    await model.call("say", room="alice", text="the model always chats")

    await http.call("PUT", "/v1/me/room", "alice", "model", chat_requires="purchased")
    await refused(bob, "say", "FORBIDDEN", room="alice", text="credited is not bought")
    status, bought = await http.call(
        "POST", "/v1/purchases", "bob", bundle="starter", payment_ref="p-1"
    )
    assert status == 200, bought
    await asyncio.sleep(0.15)  # the "not bought" answer is reused that long
    await bob.call("say", room="alice", text="bought")
    joined = await bob.call("join", room="alice")
    assert joined["room"]["moderation"]["chat_requires"] == "purchased"

    for body in (
        {"chat_requires": "gold"},
        {"chat_min_balance": -1},
        {"slow_s": 10**9},
        {"slow_s": "5"},
        {},
    ):
        status, reply = await http.call("PUT", "/v1/me/room", "alice", "model", **body)
        assert status == 400, (body, reply)
    status, _ = await http.call("PUT", "/v1/me/room", "bob", "fan", slow_s=5)
    assert status == 403
    actions = [e["action"] for e in await audit(server)]
    assert actions.count("room_settings") == 2


async def test_a_platform_ban_closes_sessions_and_refuses_everything(server: Running) -> None:
    http = Http(server)
    _, (bob,) = await room_with(server, "bob")
    status, reply = await http.call(
        "POST", "/v1/admin/bans/bob", "ops", "admin", seconds=600, reason="spam"
    )
    assert status == 200 and reply["until"] > soon_ms(590)
    assert await close_code(bob, 5.0) == 4003
    again = await server.client()
    refusal = await again.request("hello", token=token("bob"))
    assert refusal["code"] == "BANNED" and refusal["until"] == reply["until"]
    assert await close_code(again, 5.0) == 4003
    status, body = await http.call("GET", "/v1/me", "bob")
    assert status == 403 and body["error"]["code"] == "BANNED"
    # Admins are not banned; unknown users are not found; fans cannot ban.
    await server.client("ops2", "admin")
    assert (await http.call("POST", "/v1/admin/bans/ops2", "ops", "admin"))[0] == 403
    assert (await http.call("POST", "/v1/admin/bans/ghost", "ops", "admin"))[0] == 404
    assert (await http.call("POST", "/v1/admin/bans/carol", "bob2", "fan"))[0] == 403
    for body in ({"seconds": 0}, {"seconds": "60"}, {"reason": 5}, {"reason": "x" * 501}):
        status, _ = await http.call("POST", "/v1/admin/bans/bob", "ops", "admin", **body)
        assert status == 400, body
    assert (await http.call("POST", "/v1/admin/bans/a%20b", "ops", "admin"))[0] == 400
    status, _ = await http.call("DELETE", "/v1/admin/bans/bob", "ops", "admin")
    assert status == 200
    back = await server.client("bob")
    await back.call("join", room="alice")
    actions = [(e["action"], e["target"]) for e in await audit(server)]
    assert actions[:2] == [("platform_unban", "bob"), ("platform_ban", "bob")]


async def test_the_audit_log_pages_and_is_for_admins(server: Running) -> None:
    http = Http(server)
    model, _ = await room_with(server, "bob", "carol")
    for user in ("bob", "carol"):
        await model.call("kick", room="alice", user=user)
    await http.credit("bob", 5)
    first = await audit(server, limit=2)
    assert [e["action"] for e in first] == ["credit", "kick"]
    assert first[0]["detail"]["amount"] == 5 and first[0]["actor"] == "ops"
    _, page = await http.call("GET", "/v1/admin/audit?limit=2", "ops", "admin")
    rest = await audit(server, limit=2, before=page["next"])
    assert [(e["action"], e["target"]) for e in rest] == [("kick", "bob")]
    assert (await http.call("GET", "/v1/admin/audit", "bob"))[0] == 403
    for query in ("limit=0", "limit=x", "before=-1", "limit=100000"):
        assert (await http.call("GET", f"/v1/admin/audit?{query}", "ops", "admin"))[0] == 400
    rows = await pg(server.node.settings, "SELECT count(*) AS n FROM audit_log")
    assert rows[0]["n"] == 3
    with pytest.raises(Exception, match="append only"):
        await pg(server.node.settings, "UPDATE audit_log SET actor = 'x'")


async def test_a_ban_on_one_server_removes_the_member_from_another(
    settings: Settings, tmp_path: Path
) -> None:
    """Two `serve` processes: the model on A bans a fan connected to B."""
    clients: list[Client] = []
    async with serve(settings, tmp_path) as a, serve(settings, tmp_path) as b:
        try:
            model = await connect(a, "alice", "model")
            bob = await connect(b, "bob")
            carol = await connect(b, "carol")
            clients += [model, bob, carol]
            for client in clients:
                await client.call("join", room="alice")
            await bob.call("say", room="alice", text="spam")
            await model.call("clear", room="alice", user="bob")
            assert (await carol.next_event("clear"))["user"] == "bob"
            await model.call("ban", room="alice", user="bob")
            assert (await bob.next_event("removed"))["reason"] == "banned"
            await refused(bob, "join", "BANNED", room="alice")
            await model.call("mute", room="alice", user="carol", seconds=60)

            async def muted() -> bool:
                # B hears the news a moment after A answered (pub/sub).
                reply = await carol.request("say", room="alice", text="hi")
                return reply.get("code") == "MUTED"

            await eventually(muted)
            await model.call("unban", room="alice", user="bob")

            async def back_in() -> bool:
                # B hears of the unban a moment later too (pub/sub), as of
                # the mute above; until then B still refuses him (BANNED).
                reply = await bob.request("join", room="alice")
                return reply["type"] != "error"

            await eventually(back_in)
        finally:
            await close_all(clients)


async def test_bans_and_mutes_survive_a_restart_with_redis_emptied(
    start_server: Start, settings: Settings, redis: Redis
) -> None:
    server = await start_server()
    model, (bob, carol) = await room_with(server, "bob", "carol")
    await model.call("ban", room="alice", user="bob")
    await model.call("mute", room="alice", user="carol", seconds=600)
    await server.client("dave")
    await Http(server).call("POST", "/v1/admin/bans/dave", "ops", "admin")
    await server.process.stop()
    keys = [key async for key in redis.scan_iter(match=f"{settings.redis_prefix}*")]
    if keys:
        await redis.delete(*keys)

    server = await start_server()
    bob = await server.client("bob")
    await refused(bob, "join", "BANNED", room="alice")
    carol = await server.client("carol")
    await carol.call("join", room="alice")
    await refused(carol, "say", "MUTED", room="alice", text="hi")
    dave = await server.client()
    assert (await dave.request("hello", token=token("dave")))["code"] == "BANNED"


async def test_a_node_that_missed_the_news_reloads_the_rules(
    start_server: Start, settings: Settings
) -> None:
    """The change is in Postgres; a node whose copy is stale learns it when
    its pub/sub reconnects (here: its copy is dropped as a reconnect does)."""
    a = await start_server()
    b = await start_server()
    model = await a.client("alice", "model")
    bob = await b.client("bob")
    await bob.call("join", room="alice")
    await bob.call("say", room="alice", text="loaded")
    await pg(
        settings,
        "INSERT INTO room_restrictions (room, user_id, kind, until, by_user)"
        " VALUES ('alice', 'bob', 'mute', NULL, 'alice')",
    )
    await bob.call("say", room="alice", text="the copy does not know yet")
    b.node.moderation.forget_all()
    await refused(bob, "say", "MUTED", room="alice", text="now it does")
    await model.close()
