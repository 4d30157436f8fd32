"""docs/deploy.md's proxy configurations, run for real: Debian's nginx (and
Caddy) with a self-signed certificate in front of a real server, in two-port
and one-port mode. A WebSocket client connects through wss:// and exchanges
commands, and the page's /v1/config through the proxy names the wss:// URL.

The configurations are read from docs/deploy.md itself, so the documented
text is the tested text; only the certificate, the ports and (for Caddy) the
site address are substituted."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import httpx
import pytest

from tests.conftest import Running, token
from tests.server.proc import free_port
from tokenchat.client_demo.client import Client

DEPLOY_DOC = Path(__file__).resolve().parents[2] / "docs" / "deploy.md"
# nginx or Caddy starts in well under a second; 10 s is generous on a busy machine.
PROXY_START_TIMEOUT_S = 10.0
PROXY_STOP_TIMEOUT_S = 10.0
ROOM = "alice"
CHROMIUM = Path("/usr/bin/chromium")


def documented_block(marker: str) -> str:
    """The fenced code block right after ``<!-- MARKER`` in docs/deploy.md."""
    text = DEPLOY_DOC.read_text()
    found = re.search(re.escape(f"<!-- {marker}") + r".*?-->\n```\w*\n(.*?)\n```", text, re.S)
    assert found, f"docs/deploy.md has no block after <!-- {marker}"
    return found.group(1)


def substituted(text: str, replacements: dict[str, str]) -> str:
    for old, new in replacements.items():
        assert text.count(old) == 1, f"the documented config should hold {old!r} once"
        text = text.replace(old, new)
    return text


def tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin")
    if path is None:
        pytest.fail(
            f"{name} is missing: docs/deploy.md's configs are tested with it "
            f"(apt-get install -y {name}; .ci/run installs it)"
        )
    return path


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and localhost: (cert, key)."""
    openssl = tool("openssl")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            *(openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost"),
            *("-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"),
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )
    return cert, key


def chromium_missing() -> bool:
    return not CHROMIUM.exists()


def read_log(path: Path) -> str:
    return path.read_text(errors="replace")


@contextlib.asynccontextmanager
async def running_proxy(
    argv: list[str], port: int, log_path: Path, env: dict[str, str] | None = None
) -> AsyncIterator[None]:
    """Run the proxy until the context ends; ready once ``port`` accepts."""
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    try:
        async with asyncio.timeout(PROXY_START_TIMEOUT_S):
            while True:
                if proc.returncode is not None:
                    raise AssertionError(f"{argv[0]} exited:\n{read_log(log_path)}")
                try:
                    _, writer = await asyncio.open_connection("127.0.0.1", port)
                except OSError:
                    await asyncio.sleep(0.05)
                    continue
                writer.close()
                break
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            async with asyncio.timeout(PROXY_STOP_TIMEOUT_S):
                await proc.wait()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()


async def check_through_proxy(port: int, cert: Path) -> None:
    """What a browser on https://127.0.0.1:PORT/ does, checked."""
    context = ssl.create_default_context(cafile=str(cert))
    base = f"https://127.0.0.1:{port}"
    async with httpx.AsyncClient(base_url=base, verify=context, timeout=5.0) as http:
        assert (await http.get("/")).status_code == 200
        assert (await http.get("/healthz")).json() == {"ok": True}
        config = (await http.get("/v1/config")).json()
    ws_url = config["ws_url"]
    assert ws_url == f"wss://127.0.0.1:{port}/ws", config
    model = await Client.connect(ws_url, ssl=context)
    fan = await Client.connect(ws_url, ssl=context)
    try:
        assert (await model.hello(token(ROOM, "model")))["type"] == "welcome"
        assert (await fan.hello(token("bob")))["type"] == "welcome"
        await model.call("join", room=ROOM)
        await fan.call("join", room=ROOM)
        assert (await fan.call("ping"))["type"] == "ok"
        await fan.call("say", room=ROOM, text="through the proxy")
        for client in (model, fan):
            event = await client.next_event("message")
            assert event["text"] == "through the proxy" and event["from"] == "bob"
    finally:
        await model.close()
        await fan.close()


async def start_mode(start_server: Callable[..., Awaitable[Running]], mode: str) -> Running:
    return await start_server(one_port=1 if mode == "one" else 0)


def nginx_argv(
    running: Running, certificate: tuple[Path, Path], tmp_path: Path, port: int
) -> list[str]:
    """nginx serving docs/deploy.md's site on ``port`` in front of ``running``."""
    nginx = tool("nginx")
    cert, key = certificate
    site = substituted(
        documented_block("nginx config"),
        {
            "listen 443 ssl;": f"listen 127.0.0.1:{port} ssl;",
            "/etc/ssl/certs/chat.example.com.pem": str(cert),
            "/etc/ssl/private/chat.example.com.key": str(key),
            "server 127.0.0.1:8000;": f"server 127.0.0.1:{running.process.http_port};",
            "server 127.0.0.1:8001;": f"server 127.0.0.1:{running.process.ws_port};",
        },
    )
    # Around the site: what Debian's /etc/nginx/nginx.conf gives it, with every
    # path in this test's folder (the master runs as whoever runs the test).
    user = "user root;" if os.geteuid() == 0 else ""
    temp = tmp_path / "nginx"
    temp.mkdir()
    conf = tmp_path / "nginx.conf"
    conf.write_text(
        f"""{user}
daemon off;
worker_processes 1;
pid {temp}/nginx.pid;
error_log {temp}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
{site}
}}
"""
    )
    return [nginx, "-p", str(temp), "-c", str(conf), "-e", str(temp / "error.log")]


@pytest.mark.parametrize("mode", ["two", "one"])
async def test_nginx_with_tls_in_front(
    start_server: Callable[..., Awaitable[Running]],
    certificate: tuple[Path, Path],
    tmp_path: Path,
    mode: str,
) -> None:
    running = await start_mode(start_server, mode)
    port = free_port()
    argv = nginx_argv(running, certificate, tmp_path, port)
    async with running_proxy(argv, port, tmp_path / "nginx.log"):
        await check_through_proxy(port, certificate[0])


async def test_the_demo_page_behind_nginx_dials_wss(
    start_server: Callable[..., Awaitable[Running]],
    certificate: tuple[Path, Path],
    tmp_path: Path,
) -> None:
    """Chromium opens https://127.0.0.1:PORT/ through nginx (two-port mode):
    the page signs in and its WebSocket is wss:// on the proxy, not ws://:8001."""
    if chromium_missing():
        pytest.fail(f"{CHROMIUM} is missing (apt-get install -y chromium; .ci/run installs it)")
    from playwright.async_api import async_playwright, expect

    running = await start_server(dev_mode=1)
    port = free_port()
    argv = nginx_argv(running, certificate, tmp_path, port)
    async with running_proxy(argv, port, tmp_path / "nginx.log"), async_playwright() as pw:
        browser = await pw.chromium.launch(
            executable_path=str(CHROMIUM),
            # The certificate is self-signed: nothing else about TLS is skipped.
            args=["--headless", "--no-sandbox", "--disable-gpu", "--ignore-certificate-errors"],
            headless=True,
        )
        try:
            context = await browser.new_context(ignore_https_errors=True)
            page = await context.new_page()
            sockets: list[str] = []
            page.on("websocket", lambda ws: sockets.append(ws.url))
            await page.goto(f"https://127.0.0.1:{port}/")
            await page.get_by_label("Name", exact=True).fill("mia")
            await page.get_by_label("Model", exact=True).check()
            await page.get_by_role("button", name="Sign in", exact=True).click()
            await expect(page.locator("#conn-status")).to_have_text("Online", timeout=10_000)
            await expect(page.locator("#me-name")).to_have_text("mia")
            assert sockets and set(sockets) == {f"wss://127.0.0.1:{port}/ws"}, sockets
        finally:
            await browser.close()


@pytest.mark.parametrize("mode", ["two", "one"])
async def test_caddy_with_tls_in_front(
    start_server: Callable[..., Awaitable[Running]],
    certificate: tuple[Path, Path],
    tmp_path: Path,
    mode: str,
) -> None:
    caddy = tool("caddy")
    cert, key = certificate
    running = await start_mode(start_server, mode)
    port = free_port()
    site = substituted(
        documented_block("Caddyfile"),
        {
            "chat.example.com {": f"https://127.0.0.1:{port} {{\n\ttls {cert} {key}",
            "reverse_proxy /ws 127.0.0.1:8001": (
                f"reverse_proxy /ws 127.0.0.1:{running.process.ws_port}"
            ),
            "reverse_proxy 127.0.0.1:8000": f"reverse_proxy 127.0.0.1:{running.process.http_port}",
        },
    )
    caddyfile = tmp_path / "Caddyfile"
    # No admin endpoint (its port 2019 is shared by every Caddy on the host)
    # and no http->https redirect listener on port 80.
    caddyfile.write_text(f"{{\n\tadmin off\n\tauto_https disable_redirects\n}}\n\n{site}\n")
    home = tmp_path / "caddy-home"
    home.mkdir()
    env = dict(
        os.environ,
        HOME=str(home),
        XDG_DATA_HOME=str(home / "data"),
        XDG_CONFIG_HOME=str(home / "config"),
    )
    argv = [caddy, "run", "--config", str(caddyfile), "--adapter", "caddyfile"]
    async with running_proxy(argv, port, tmp_path / "caddy.log", env):
        await check_through_proxy(port, cert)
