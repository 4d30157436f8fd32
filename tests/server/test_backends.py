"""A dead Redis or a dead Postgres: clear errors, nothing lost, recovery.

Each server under test reaches the backend through a ``Proxy`` the test can
cut, which to the server is exactly a backend that died; the shared Redis and
Postgres keep serving every other test.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import httpx
from redis.asyncio import Redis

from tests.conftest import Running, token
from tests.proxy import Proxy
from tokenchat.client_demo.client import Client
from tokenchat.server.gateway.node import Node


async def ready_status(running: Running) -> int:
    async with httpx.AsyncClient() as http:
        return (await http.get(running.http_url + "/readyz")).status_code


async def test_redis_down_answers_unavailable_then_recovers(
    start_server: Callable[..., Awaitable[Running]], redis_proxy: Proxy
) -> None:
    running = await start_server(redis_url=redis_proxy.url, redis_timeout_s=0.5)
    model = await running.client("alice", "model")
    await model.call("join", room="alice")
    fan = await running.client("bob")
    await fan.call("join", room="alice")

    await redis_proxy.cut()
    reply = await fan.request("say", room="alice", text="into the void")
    assert reply["code"] == "UNAVAILABLE"
    assert (await model.request("join", room="alice"))["code"] == "UNAVAILABLE"
    assert (await fan.call("ping"))["type"] == "ok", "the session stays open"
    assert await ready_status(running) == 503

    await redis_proxy.restore()
    for _ in range(50):  # pub/sub reconnects with backoff
        reply = await fan.request("say", room="alice", text="back")
        if reply["type"] == "ok":
            break
    assert reply["type"] == "ok"
    event = await model.next_event("message", timeout_s=10)
    assert event["text"] == "back"
    assert await ready_status(running) == 200
    await fan.close()
    await model.close()


async def test_events_published_while_pubsub_was_down_are_filled_in_order(
    start_server: Callable[..., Awaitable[Running]], redis_proxy: Proxy
) -> None:
    cut_off = await start_server(redis_url=redis_proxy.url, redis_timeout_s=0.5)
    healthy = await start_server()
    model = await healthy.client("alice", "model")
    await model.call("join", room="alice")
    watcher = await cut_off.client("bob")
    await watcher.call("join", room="alice")

    await redis_proxy.cut()
    sent = []
    for n in range(5):
        await model.call("say", room="alice", text=f"while down {n}")
        sent.append(f"while down {n}")
    await redis_proxy.restore()
    await model.call("say", room="alice", text="after")
    sent.append("after")
    received = [(await watcher.next_event("message", timeout_s=10))["text"] for _ in sent]
    assert received == sent
    await watcher.close()
    await model.close()


async def missed_while_unsubscribed(node: Node, model: Client, room: str, texts: list[str]) -> None:
    """Say ``texts`` while ``node`` does not hear ``room``: a gap to fill."""
    channel = node.keys.room_channel(room)
    await node.broker.unsubscribe(channel)
    for text in texts:
        await model.call("say", room=room, text=text)
    await node.broker.subscribe(channel)


async def test_a_live_event_right_after_a_pubsub_reconnect_waits_for_the_gap(
    server: Running, redis: Redis
) -> None:
    node = server.node
    model = await server.client("alice", "model")
    await model.call("join", room="alice")
    watcher = await server.client("bob")
    await watcher.call("join", room="alice")
    texts = ["missed 0", "missed 1", "live"]
    await missed_while_unsubscribed(node, model, "alice", texts)

    # "live" is the first message on the new connection: it comes before the
    # node has read the missed ones from history, as on a real reconnect.
    ((offset, fields),) = await redis.xrevrange(node.keys.room_history("alice"), count=1)
    node._on_broker_reconnect()
    node._on_broker_message(node.keys.room_channel("alice"), b"E%s %s" % (offset, fields[b"e"]))
    received = [(await watcher.next_event("message"))["text"] for _ in texts]
    assert received == texts
    await watcher.close()
    await model.close()


async def test_a_failed_history_read_after_a_pubsub_reconnect_is_retried(
    server: Running, redis: Redis
) -> None:
    node = server.node
    model = await server.client("alice", "model")
    await model.call("join", room="alice")
    watcher = await server.client("bob")
    await watcher.call("join", room="alice")
    texts = ["missed 0", "missed 1"]
    await missed_while_unsubscribed(node, model, "alice", texts)

    # The pooled connection the gap read takes next dies, as every idle one
    # does when Redis goes away: the first read after the reconnect fails.
    await redis.client_kill_filter(_id=await node.redis.client_id())
    node._on_broker_reconnect()
    received = [(await watcher.next_event("message"))["text"] for _ in texts]
    assert received == texts
    await watcher.close()
    await model.close()


async def test_postgres_down_refuses_new_users_but_chat_goes_on(
    start_server: Callable[..., Awaitable[Running]], postgres_proxy: Proxy
) -> None:
    running = await start_server(database_url=postgres_proxy.url, database_timeout_s=1.0)
    model = await running.client("alice", "model")
    await model.call("join", room="alice")
    fan = await running.client("bob")
    await fan.call("join", room="alice")

    await postgres_proxy.cut()
    newcomer = await running.client()
    reply = await newcomer.request("hello", token=token("newcomer"))
    assert reply["code"] == "UNAVAILABLE"
    assert await ready_status(running) == 503
    await fan.call("say", room="alice", text="still chatting")
    assert (await model.next_event("message"))["text"] == "still chatting"

    await postgres_proxy.restore()
    welcome = await newcomer.hello(token("newcomer"))  # the session stayed open
    assert welcome["user"]["id"] == "newcomer"
    assert await ready_status(running) == 200
    for client in (newcomer, fan, model):
        await client.close()
