"""Hellos admitted in batches (server/gateway/admission.py), against the real
Redis and Postgres: each hello of a batch gets its own welcome, one refused
hello leaves the others alone, and a backend away refuses every hello of the
batch with nothing left half-done."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from tests.conftest import Http, Running, pg, token
from tests.proxy import Proxy
from tokenchat.client_demo.client import Client
from tokenchat.server import metrics
from tokenchat.server.auth import Identity
from tokenchat.server.config import Settings

Start = Callable[..., Awaitable[Running]]

# Long enough that hellos sent together on a loaded test machine all land in
# one window (the production default is 2 ms).
WINDOW_S = 0.2


def batches_seen() -> tuple[float, float]:
    """(batches, hellos) the batch-size histogram has counted in this process."""
    count = total = 0.0
    for family in metrics.HELLO_BATCH_SIZE.collect():
        for sample in family.samples:
            if sample.name.endswith("_count"):
                count = sample.value
            elif sample.name.endswith("_sum"):
                total = sample.value
    return count, total


async def hello_all(running: Running, tokens: list[str]) -> list[tuple[Client, dict[str, Any]]]:
    """Open one client per token, then send every hello at once."""
    clients = [await running.client() for _ in tokens]
    replies = await asyncio.gather(
        *(client.request("hello", token=t) for client, t in zip(clients, tokens, strict=True))
    )
    return list(zip(clients, replies, strict=True))


async def test_concurrent_hellos_share_one_batch_and_each_gets_its_own_welcome(
    start_server: Start, settings: Settings
) -> None:
    running = await start_server(hello_batch_window_s=WINDOW_S)
    http = Http(running)
    users = [f"batch_u{n:02d}" for n in range(12)]
    for n, user in enumerate(users[:6]):
        await http.credit(user, 10 + n)
    batches_before, hellos_before = batches_seen()

    answered = await hello_all(
        running, [token(user, "model" if n == 0 else "fan") for n, user in enumerate(users)]
    )

    for n, (_, welcome) in enumerate(answered):
        assert welcome["type"] == "welcome", welcome
        assert welcome["user"] == {"id": users[n], "role": "model" if n == 0 else "fan"}
        assert welcome["balance"] == (10 + n if n < 6 else 0)
    assert len({welcome["session"] for _, welcome in answered}) == len(users)
    batches, hellos = batches_seen()
    assert hellos - hellos_before == len(users)
    assert batches - batches_before < len(users) / 2, "the hellos were not batched"
    # One upsert wrote them all, and the model's room with her.
    rows = await pg(settings, "SELECT id, role FROM users WHERE id LIKE 'batch_u%' ORDER BY id")
    assert [(r["id"], r["role"]) for r in rows] == [
        (user, "model" if n == 0 else "fan") for n, user in enumerate(users)
    ]
    assert await pg(settings, "SELECT 1 FROM rooms WHERE id = $1", users[0])
    # Each session gets the pushes of its own user's channel (one SUBSCRIBE).
    await http.credit(users[7], 5)
    assert (await answered[7][0].next_event("balance"))["balance"] == 5
    for client, _ in answered:
        await client.close()


async def test_a_refused_hello_does_not_fail_the_others_of_its_batch(start_server: Start) -> None:
    running = await start_server(hello_batch_window_s=WINDOW_S, sessions_per_user_max=2)
    tokens = [token("crowd_a"), "not-a-jwt", token("twice"), token("twice"), token("twice")]
    tokens += [token("crowd_b")]

    answered = await hello_all(running, tokens)

    replies = [reply for _, reply in answered]
    assert replies[0]["type"] == "welcome" and replies[0]["user"]["id"] == "crowd_a"
    assert replies[1]["type"] == "error" and replies[1]["code"] == "UNAUTHENTICATED"
    twice = replies[2:5]
    assert sum(reply["type"] == "welcome" for reply in twice) == 2
    (limited,) = [reply for reply in twice if reply["type"] == "error"]
    assert limited["code"] == "LIMIT_EXCEEDED"
    assert replies[5]["type"] == "welcome" and replies[5]["user"]["id"] == "crowd_b"
    node = running.node
    assert len(node._user_sessions["twice"]) == 2
    for client, _ in answered:
        await client.close()


async def test_a_platform_banned_user_in_a_batch_is_closed_alone(start_server: Start) -> None:
    running = await start_server(hello_batch_window_s=WINDOW_S)
    http = Http(running)
    await (await running.client("banned_one")).close()
    status, _ = await http.call("POST", "/v1/admin/bans/banned_one", "ops", "admin", seconds=600)
    assert status == 200

    answered = await hello_all(running, [token("fine_one"), token("banned_one"), token("fine_two")])

    assert [reply["type"] for _, reply in answered] == ["welcome", "error", "welcome"]
    assert answered[1][1]["code"] == "BANNED"
    async with asyncio.timeout(5):
        await answered[1][0].ws.wait_closed()
    assert answered[1][0].ws.close_code == 4003
    assert "banned_one" not in running.node._user_sessions
    for client, _ in answered:
        await client.close()


async def test_postgres_down_during_a_batch_refuses_each_hello_and_leaves_nothing_half_done(
    start_server: Start, postgres_proxy: Proxy, settings: Settings
) -> None:
    running = await start_server(
        database_url=postgres_proxy.url, database_timeout_s=1.0, hello_batch_window_s=WINDOW_S
    )
    users = [f"pg_down_{n}" for n in range(8)]
    await postgres_proxy.cut()
    try:
        answered = await hello_all(running, [token(user) for user in users])
        for _, reply in answered:
            assert reply["type"] == "error" and reply["code"] == "UNAVAILABLE", reply
        node = running.node
        assert not set(users) & set(node._user_sessions), "a refused hello stayed online"
        assert not set(users) & node._subscribed_users, "a refused hello was subscribed"
    finally:
        await postgres_proxy.restore()
    assert not await pg(settings, "SELECT 1 FROM users WHERE id LIKE 'pg\\_down\\_%'")
    # The sessions stayed open: the same hellos, again together, now succeed.
    retried = await asyncio.gather(
        *(client.hello(token(user)) for (client, _), user in zip(answered, users, strict=True))
    )
    assert [welcome["user"]["id"] for welcome in retried] == users
    for client, _ in answered:
        await client.close()


async def test_redis_down_during_a_batch_takes_every_hello_offline_again(
    start_server: Start, redis_proxy: Proxy
) -> None:
    running = await start_server(
        redis_url=redis_proxy.url, redis_timeout_s=1.0, hello_batch_window_s=WINDOW_S
    )
    users = [f"redis_down_{n}" for n in range(6)]
    # Known to Postgres already: the batch gets past the upsert, then needs Redis.
    await running.node.directory.touch_users([Identity(user, "fan") for user in users])
    clients = [await running.client() for _ in users]
    await redis_proxy.cut()
    try:
        replies = await asyncio.gather(
            *(c.request("hello", token=token(u)) for c, u in zip(clients, users, strict=True))
        )
        assert {reply.get("code") for reply in replies} == {"UNAVAILABLE"}, replies
        assert not set(users) & set(running.node._user_sessions)
    finally:
        await redis_proxy.restore()
    for client in clients:
        await client.close()


async def test_one_batch_naming_a_user_under_two_roles_keeps_the_last(
    server: Running, settings: Settings
) -> None:
    directory = server.node.directory
    failed = await directory.touch_users(
        [Identity("two_roles", "fan"), Identity("plain", "fan"), Identity("two_roles", "model")]
    )
    assert failed == {}
    rows = await pg(settings, "SELECT id, role FROM users WHERE id IN ('two_roles', 'plain')")
    assert {r["id"]: r["role"] for r in rows} == {"two_roles": "model", "plain": "fan"}
    assert await pg(settings, "SELECT 1 FROM rooms WHERE id = 'two_roles'")
