"""One-port mode: the HTTP API and the gateway on one port (WebSocket at /ws,
HTTP everywhere else), the Procfile's web line with only $PORT set, and the
WebSocket URL that GET /v1/config names behind proxies."""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from redis.asyncio import Redis
from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.http11 import Response
from websockets.uri import parse_uri

from tests.conftest import Running, eventually, token
from tests.server.proc import ServerProcess, cli_env, free_port
from tokenchat.client_demo.client import Client
from tokenchat.protocol.codec import JSON_SUBPROTOCOL
from tokenchat.server.config import Settings

REPO_ROOT = Path(__file__).resolve().parents[2]
ROOM = "alice"


async def get(url: str, **headers: str) -> httpx.Response:
    async with httpx.AsyncClient(timeout=5.0) as http:
        return await http.get(url, headers=headers)


async def chat_on(ws_url: str) -> None:
    """A model and a fan on ``ws_url``: the fan's message reaches both."""
    model = await Client.connect(ws_url)
    fan = await Client.connect(ws_url)
    try:
        assert (await model.hello(token(ROOM, "model")))["type"] == "welcome"
        assert (await fan.hello(token("bob")))["type"] == "welcome"
        await model.call("join", room=ROOM)
        await fan.call("join", room=ROOM)
        await fan.call("say", room=ROOM, text="one port")
        for client in (model, fan):
            event = await client.next_event("message")
            assert event["text"] == "one port" and event["from"] == "bob"
    finally:
        await model.close()
        await fan.close()


async def test_one_port_serves_http_and_the_gateway_end_to_end(
    start_server: Callable[..., Awaitable[Running]],
) -> None:
    running = await start_server(one_port=1)
    port = running.process.http_port
    assert running.process.ws_port == port
    base = f"http://127.0.0.1:{port}"
    health = await get(base + "/healthz")
    assert health.status_code == 200 and health.json() == {"ok": True}
    assert (await get(base + "/readyz")).json()["ok"] is True
    page = await get(base + "/")
    assert page.status_code == 200 and "<html" in page.text.lower()
    config = (await get(base + "/v1/config")).json()
    assert config["ws_url"] == f"ws://127.0.0.1:{port}/ws"
    # The page's URL is the one that works.
    await chat_on(config["ws_url"])
    # A WebSocket upgrade elsewhere than /ws is refused as on the gateway's
    # own port; a plain GET of /ws is an HTTP request like any other.
    with pytest.raises(Exception, match="404"):
        await Client.connect(f"ws://127.0.0.1:{port}/elsewhere")
    assert (await get(base + "/ws")).status_code == 404
    # HTTP with a body still goes to the API (the gateway never sees it).
    async with httpx.AsyncClient(base_url=base, timeout=5.0) as http:
        credit = await http.post(
            "/v1/admin/credits",
            json={"user": "bob", "amount": 5, "key": "oneport"},
            headers={"Authorization": f"Bearer {token('ops', 'admin')}"},
        )
        assert credit.status_code == 200, credit.text


async def test_equal_ports_mean_one_port(
    start_server: Callable[..., Awaitable[Running]],
) -> None:
    """--http-port P --ws-port P is one-port mode, not two listeners on one
    port that the kernel would split connections between (SO_REUSEPORT)."""
    port = free_port()
    running = await start_server(http_port=port, ws_port=port)
    assert running.process.ws_port == running.process.http_port == port
    for _ in range(4):  # every connection lands where it should
        assert (await get(f"http://127.0.0.1:{port}/v1/bundles")).status_code == 200
    await chat_on(f"ws://127.0.0.1:{port}/ws")


def raw_upgrade_request(protocol: ClientProtocol) -> bytes:
    protocol.send_request(protocol.connect())
    return b"".join(protocol.data_to_send())


async def test_an_upgrade_after_http_requests_on_one_keep_alive_connection(
    start_server: Callable[..., Awaitable[Running]],
) -> None:
    """A proxy with upstream keep-alive may send the upgrade on a connection
    that carried plain requests first: it still reaches the gateway."""
    running = await start_server(one_port=1)
    port = running.process.http_port
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for _ in range(2):
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 200"), head
            length = next(
                int(line.split(b":")[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            assert orjson.loads(await reader.readexactly(length)) == {"ok": True}
        client = ClientProtocol(
            parse_uri(f"ws://127.0.0.1:{port}/ws"),
            subprotocols=[JSON_SUBPROTOCOL],  # type: ignore[list-item]
        )
        writer.write(raw_upgrade_request(client))
        replies: list[dict[str, Any]] = []
        hello = orjson.dumps({"type": "hello", "token": token("carol"), "id": "h1"})
        async with asyncio.timeout(5):
            while not replies:
                client.receive_data(await reader.read(65536))
                for event in client.events_received():
                    if isinstance(event, Response):
                        assert event.status_code == 101
                        client.send_text(hello)
                        writer.write(b"".join(client.data_to_send()))
                    elif isinstance(event, Frame) and event.opcode is Opcode.TEXT:
                        replies.append(orjson.loads(event.data))
        assert replies[0]["type"] == "welcome", replies
    finally:
        writer.close()


async def test_one_port_drains_like_two(settings: Settings, private_redis: str) -> None:
    """While a stopping process drains, /readyz on the one port says 503 (the
    HTTP API still answers), a new upgrade is refused 503, and the command in
    flight still finishes before its session is closed with 1012."""
    from tokenchat.server.app import Process

    process = Process(settings.replace(redis_url=private_redis, one_port=1, shutdown_grace_s=5.0))
    await process.start()
    base = f"http://127.0.0.1:{process.http_port}"
    ws_url = f"ws://127.0.0.1:{process.http_port}/ws"
    redis: Redis = Redis.from_url(private_redis)
    client = await Client.connect(ws_url)
    stopping: asyncio.Task[None] | None = None
    try:
        await client.hello(token(ROOM, "model"))
        await client.call("join", room=ROOM)
        # A command held in flight (Redis writes paused) keeps the drain going.
        await redis.execute_command("CLIENT", "PAUSE", "5000", "WRITE")  # type: ignore[no-untyped-call]
        say = asyncio.create_task(client.request("say", room=ROOM, text="x", timeout_s=10))
        await asyncio.sleep(0.2)
        assert not say.done()
        stopping = asyncio.create_task(process.stop())

        async def draining() -> bool:
            response = await get(base + "/readyz")
            return response.status_code == 503 and response.json()["draining"] is True

        await eventually(draining, timeout_s=3)
        with pytest.raises(Exception, match="503"):
            await Client.connect(ws_url)
        await redis.execute_command("CLIENT", "UNPAUSE")  # type: ignore[no-untyped-call]
        assert (await say)["type"] == "ok", "the command in flight still finished"
        await client.wait_closed()
        assert client.close_code == 1012
        async with asyncio.timeout(10):
            await stopping
    finally:
        await redis.execute_command("CLIENT", "UNPAUSE")  # type: ignore[no-untyped-call]
        if stopping is None:
            await process.stop()
        elif not stopping.done():
            await stopping
        await client.close()
        await redis.aclose()


# --- the WebSocket port answers load balancers ----------------------------------------


async def test_a_plain_get_on_the_websocket_port_is_answered(server: Running) -> None:
    ws_base = f"http://127.0.0.1:{server.process.ws_port}"
    for path in ("/", "/healthz"):
        response = await get(ws_base + path)
        assert response.status_code == 200, path
    assert "/ws" in (await get(ws_base + "/")).text
    assert (await get(ws_base + "/nothing")).status_code == 404


# --- GET /v1/config: the URL the page dials ---------------------------------------------


async def ws_url_of(running: Running, **headers: str) -> str:
    response = await get(running.http_url + "/v1/config", **headers)
    assert response.status_code == 200
    url: str = response.json()["ws_url"]
    return url


async def test_config_names_the_websocket_port_on_a_bare_two_port_server(
    server: Running,
) -> None:
    ws_port = server.process.ws_port
    assert await ws_url_of(server) == f"ws://127.0.0.1:{ws_port}/ws"
    assert await ws_url_of(server, Host="localhost:1234") == f"ws://localhost:{ws_port}/ws"
    # A Host that is no host name is not echoed into the URL.
    assert await ws_url_of(server, Host="evil/ x") == f"ws://127.0.0.1:{ws_port}/ws"


async def test_config_behind_a_trusted_tls_proxy_names_wss_on_the_proxy(
    server: Running,
) -> None:
    """The test client is 127.0.0.1, trusted by default (a proxy on this host)."""
    forwarded = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "chat.example.com"}
    assert await ws_url_of(server, **forwarded) == "wss://chat.example.com/ws"
    # A proxy that keeps the Host header and says only the scheme.
    assert (
        await ws_url_of(server, Host="chat.example.com:8443", **{"X-Forwarded-Proto": "https"})
        == "wss://chat.example.com:8443/ws"
    )
    # A chain of proxies: the first value is what the browser used.
    chained = {"X-Forwarded-Proto": "https, http", "X-Forwarded-Host": "a.example, b.internal"}
    assert await ws_url_of(server, **chained) == "wss://a.example/ws"


async def test_config_ignores_forwarded_headers_from_untrusted_peers(
    start_server: Callable[..., Awaitable[Running]],
) -> None:
    running = await start_server(trusted_proxies="10.0.0.0/8")
    forwarded = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "evil.example"}
    ws_port = running.process.ws_port
    assert await ws_url_of(running, **forwarded) == f"ws://127.0.0.1:{ws_port}/ws"


async def test_public_ws_url_wins(start_server: Callable[..., Awaitable[Running]]) -> None:
    running = await start_server(public_ws_url="wss://chat.example.com/ws")
    assert await ws_url_of(running) == "wss://chat.example.com/ws"
    forwarded = {"X-Forwarded-Proto": "http", "X-Forwarded-Host": "other.example"}
    assert await ws_url_of(running, **forwarded) == "wss://chat.example.com/ws"


def test_settings_refuse_malformed_public_url_and_proxies() -> None:
    with pytest.raises(ValueError, match="PUBLIC_WS_URL"):
        Settings(public_ws_url="https://chat.example.com/ws")
    with pytest.raises(ValueError, match="TRUSTED_PROXIES"):
        Settings(trusted_proxies="10.0.0.0/8, not-an-address")
    with pytest.raises(ValueError, match="ONE_PORT"):
        Settings(one_port=2)
    assert Settings(trusted_proxies="*").trusted_proxy_networks()
    assert Settings(http_port=9000, ws_port=9000).serves_one_port()
    assert not Settings(http_port=0, ws_port=0).serves_one_port()


# --- the Procfile on a PaaS: only $PORT ---------------------------------------------------


def procfile_line(name: str) -> str:
    for line in (REPO_ROOT / "Procfile").read_text().splitlines():
        if line.startswith(f"{name}:"):
            return line.partition(":")[2].strip()
    raise AssertionError(f"no {name} line in the Procfile")


async def test_the_procfile_web_line_serves_everything_on_port(
    settings: Settings, tmp_path: Path
) -> None:
    """Run as Heroku, Render or Railway do: bash -c the web line with PORT set
    and WS_PORT not, so only $PORT is reachable."""
    port = free_port()
    env = cli_env(settings, PORT=str(port), TMPDIR=str(tmp_path))
    env.pop("WS_PORT", None)
    env.pop("WEB_CONCURRENCY", None)
    # `tokenchat` is the console script installed next to this interpreter.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    log_path = tmp_path / "web.log"
    with log_path.open("wb") as log_fh:
        proc = await asyncio.create_subprocess_exec(
            "bash",
            "-c",
            procfile_line("web"),
            env=env,
            cwd=tmp_path,
            stdin=subprocess.DEVNULL,
            stdout=log_fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = ServerProcess(proc, port, port, log_path)
    try:
        await server.wait_ready()
        assert (await get(server.http_url + "/v1/config")).json()["ws_url"] == (
            f"ws://127.0.0.1:{port}/ws"
        )
        await chat_on(server.ws_url)
        assert "one port" in server.log(), server.log()
    finally:
        await server.kill_group()
    assert shlex.split(procfile_line("web"))  # the line parses as a shell command


async def test_forwarded_host_does_not_open_the_dev_token_to_dns_rebinding(
    start_server: Callable[..., Awaitable[Running]],
) -> None:
    """A page on a rebound name reaches 127.0.0.1 (a trusted peer) and may add
    X-Forwarded-Host itself: the dev token's Host check still sees its name."""
    running = await start_server(dev_mode=1)
    async with httpx.AsyncClient(base_url=running.http_url, timeout=5.0) as http:
        reply = await http.post(
            "/v1/dev/token",
            json={"user": "mia", "role": "fan"},
            headers={"Host": "evil.example:8000", "X-Forwarded-Host": "localhost"},
        )
        assert reply.status_code == 403, reply.text
        # Its /v1/config, on the other hand, is the attacker's own business.
        config = await http.get("/v1/config", headers={"X-Forwarded-Host": "localhost:9"})
        assert config.json()["ws_url"] == "ws://localhost:9/ws"


def test_serve_one_port_flag_sets_one_port_mode() -> None:
    from tokenchat.server.cli import _settings_from

    parsed = argparse.Namespace(host=None, http_port=9000, ws_port=None, one_port=1, workers=None)
    assert _settings_from(parsed).serves_one_port()
    parsed.one_port = None  # not given: the environment's (here the default, two ports)
    assert not _settings_from(parsed).serves_one_port()
