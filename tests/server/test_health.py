"""Health probes: /healthz and /readyz answer alike on the HTTP port and on
the WebSocket port, and /readyz says 503 while a backend is down or while the
process drains after SIGTERM (so a load balancer stops sending it traffic)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
from redis.asyncio import Redis

from tests.conftest import Running, eventually, token
from tests.proxy import Proxy
from tokenchat.client_demo.client import Client
from tokenchat.server.app import Process
from tokenchat.server.config import Settings

PROBES = ("/healthz", "/readyz")


async def probe(base_url: str, path: str) -> tuple[int, str, Any]:
    """(status, content type, JSON body) of one GET."""
    async with httpx.AsyncClient(base_url=base_url, timeout=5.0) as http:
        response = await http.get(path)
    return response.status_code, response.headers["content-type"], response.json()


def ws_port_url(running: Running) -> str:
    return f"http://127.0.0.1:{running.process.ws_port}"


async def test_both_ports_answer_the_probes_alike(server: Running) -> None:
    for path in PROBES:
        on_http = await probe(server.http_url, path)
        on_ws = await probe(ws_port_url(server), path)
        assert on_ws == on_http, path
        status, content_type, body = on_http
        assert status == 200 and content_type == "application/json" and body["ok"] is True
    assert (await probe(server.http_url, "/readyz"))[2] == {
        "ok": True,
        "redis": True,
        "postgres": True,
        "draining": False,
    }
    # Anything else on the WebSocket port is still not found, and /ws still
    # upgrades.
    async with httpx.AsyncClient(timeout=5.0) as http:
        assert (await http.get(ws_port_url(server) + "/elsewhere")).status_code == 404
    client = await server.client("bob")
    assert (await client.call("ping"))["type"] == "ok"
    await client.close()


async def test_both_ports_say_not_ready_while_postgres_is_down(
    start_server: Callable[..., Awaitable[Running]], postgres_proxy: Proxy
) -> None:
    running = await start_server(database_url=postgres_proxy.url)
    await postgres_proxy.cut()
    try:
        for base_url in (running.http_url, ws_port_url(running)):
            status, _, body = await probe(base_url, "/readyz")
            assert status == 503, base_url
            assert body == {"ok": False, "redis": True, "postgres": False, "draining": False}
            assert (await probe(base_url, "/healthz"))[0] == 200, "alive, only not ready"
    finally:
        await postgres_proxy.restore()

    async def ready_again() -> bool:
        urls = (running.http_url, ws_port_url(running))
        return [(await probe(url, "/readyz"))[0] for url in urls] == [200, 200]

    await eventually(ready_again, timeout_s=10)


async def test_readyz_is_503_while_the_process_drains(
    settings: Settings, private_redis: str
) -> None:
    # A command held in flight (Redis writes paused) keeps the process
    # draining long enough to look at it.
    process = Process(settings.replace(redis_url=private_redis, shutdown_grace_s=5.0))
    await process.start()
    http_url = f"http://127.0.0.1:{process.http_port}"
    redis: Redis = Redis.from_url(private_redis)
    client: Client | None = None
    stopping: asyncio.Task[None] | None = None
    try:
        client = await Client.connect(f"ws://127.0.0.1:{process.ws_port}/ws")
        await client.hello(token("alice", "model"))
        await client.call("join", room="alice")
        assert (await probe(http_url, "/readyz"))[0] == 200
        await redis.execute_command("CLIENT", "PAUSE", "5000", "WRITE")  # type: ignore[no-untyped-call]
        say = asyncio.create_task(client.request("say", room="alice", text="x", timeout_s=10))
        await asyncio.sleep(0.2)
        assert not say.done()
        stopping = asyncio.create_task(process.stop())

        async def draining() -> bool:
            status, _, body = await probe(http_url, "/readyz")
            return status == 503 and body["draining"] is True

        await eventually(draining, timeout_s=3)
        status, _, body = await probe(http_url, "/readyz")
        assert status == 503
        assert body == {"ok": False, "redis": True, "postgres": True, "draining": True}
        assert (await probe(http_url, "/healthz"))[0] == 200, "alive while draining"
        await redis.execute_command("CLIENT", "UNPAUSE")  # type: ignore[no-untyped-call]
        assert (await say)["type"] == "ok", "the command in flight still finished"
        async with asyncio.timeout(10):
            await stopping
    finally:
        await redis.execute_command("CLIENT", "UNPAUSE")  # type: ignore[no-untyped-call]
        if stopping is None:
            await process.stop()
        elif not stopping.done():
            await stopping
        if client is not None:
            await client.close()
        await redis.aclose()
