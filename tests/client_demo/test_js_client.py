"""The JavaScript client package (client_demo/js): served to the page,
shipped in the wheel, and run with Node against a real server.

Its unit tests (codec, correlation, backoff, resume against a scripted
gateway) run with `node --test client_demo/js/` in the README's test command.
Here `client_demo/js/tests/live_server.mjs` runs against a server on the test
Redis and Postgres: hello, join, say, errors with codes, a tip whose key is
sent twice, a drop and the re-join with `since`, a tip sent while offline,
HTTP calls (a purchase sent twice with one payment_ref), a refused token.
Afterwards the ledger must show each tip and the purchase once, and reconcile.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import tomllib
from pathlib import Path

import httpx
import pytest

from tests.client_demo.test_web import StartServer, start_dev
from tests.conftest import Http, token

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "client_demo" / "js"
LIVE_TEST = PACKAGE / "tests" / "live_server.mjs"
NODE_ARGS = ["--test", "--test-reporter=tap"]
# Node 20.10+ has a global WebSocket behind this flag; 22 and later have it on.
WEBSOCKET_FLAG = "--experimental-websocket"
# The live test's steps each wait at most 5 s; the whole run well under this (s).
NODE_RUN_TIMEOUT_S = 90
FAN_BALANCE = 100


def node() -> list[str]:
    """The node command, with the flag its global WebSocket needs, if any."""
    found = shutil.which("node")
    assert found, "node is not installed: the JavaScript client is tested with Node >= 20.10"
    for command in ([found], [found, WEBSOCKET_FLAG]):
        probe = subprocess.run(
            [*command, "-p", "typeof WebSocket"], capture_output=True, text=True, check=False
        )
        if probe.stdout.strip() == "function":
            return command
    raise AssertionError(f"{found} has no WebSocket: the JavaScript client needs Node >= 20.10")


async def test_the_package_is_served_to_the_page(start_server: StartServer) -> None:
    running = await start_dev(start_server)
    async with httpx.AsyncClient(base_url=running.http_url) as http:
        module = await http.get("/js/tokenchat.js")
        assert module.status_code == 200
        assert "javascript" in module.headers["content-type"]
        assert "export class Connection" in module.text
        assert "default-src 'self'" in module.headers["content-security-policy"]
        page = await http.get("/static/app.js")
        assert 'from "../js/tokenchat.js"' in page.text
        assert (await http.get("/static/connection.js")).status_code == 404  # moved
        missing = await http.get("/js/nope.js")
        assert missing.status_code == 404
        assert missing.json()["error"]["code"] == "NOT_FOUND"
        assert (await http.get("/js/../__init__.py")).status_code == 404


def test_the_package_is_described_and_shipped() -> None:
    manifest = json.loads((PACKAGE / "package.json").read_text())
    assert manifest["type"] == "module"
    assert manifest["exports"]["."] == {"types": "./tokenchat.d.ts", "default": "./tokenchat.js"}
    for name in manifest["files"]:
        assert (PACKAGE / name).is_file(), name
    source = (PACKAGE / "tokenchat.js").read_text()
    assert f'export const VERSION = "{manifest["version"]}";' in source
    # The wheel carries the package's top level (the page imports it), not its tests.
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    data = pyproject["tool"]["setuptools"]["package-data"]["tokenchat.client_demo"]
    assert "js/*" in data
    # Every export is declared in the type definitions.
    declarations = (PACKAGE / "tokenchat.d.ts").read_text()
    exported = [
        line.split()[2].split("(")[0]
        for line in source.splitlines()
        if line.startswith(("export const ", "export class ", "export function "))
    ]
    assert len(exported) > 10
    for name in exported:
        assert f" {name}" in declarations and (
            f"declare const {name}:" in declarations
            or f"declare class {name} " in declarations
            or f"declare function {name}(" in declarations
        ), f"{name} is exported by tokenchat.js but not declared in tokenchat.d.ts"


@pytest.mark.parametrize("delivery", ["script", "relay"])
async def test_node_client_against_a_running_server(
    start_server: StartServer, delivery: str
) -> None:
    """In both delivery modes: relayed tips are acknowledged without an offset."""
    command = node()  # before the server runs in this loop: the probe blocks
    # The fake payment provider approves purchases (the live test buys a bundle).
    running = await start_server(payment_provider="fake", delivery=delivery)
    http = Http(running)
    await http.credit("fan_js", FAN_BALANCE)
    env = {
        **os.environ,
        "TOKENCHAT_WS_URL": running.ws_url,
        "TOKENCHAT_HTTP_URL": running.http_url,
        "TOKENCHAT_MODEL": "mia_js",
        "TOKENCHAT_MODEL_TOKEN": token("mia_js", "model"),
        "TOKENCHAT_FAN": "fan_js",
        "TOKENCHAT_FAN_TOKEN": token("fan_js"),
        "TOKENCHAT_FAN_BALANCE": str(FAN_BALANCE),
        "TOKENCHAT_DELIVERY": delivery,
    }
    # The server runs in this event loop: Node must run beside it, not block it.
    process = await asyncio.create_subprocess_exec(
        *command,
        *NODE_ARGS,
        str(LIVE_TEST),
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(), NODE_RUN_TIMEOUT_S)
    except TimeoutError:
        process.kill()
        output, _ = await process.communicate()
        raise AssertionError(f"node did not finish:\n{output.decode()}") from None
    report = output.decode()
    assert process.returncode == 0, report
    assert "\n# fail 0\n" in report, report
    assert "\n# pass 8\n" in report, report

    # Each tip once in the ledger (5, sent twice with one key; 3, sent offline).
    status, listed = await http.call("GET", "/v1/me/transactions?kind=tip", "fan_js")
    assert status == 200, listed
    assert sorted(t["amount"] for t in listed["transactions"]) == [-5, -3]
    status, listed = await http.call("GET", "/v1/me/transactions?kind=purchase", "fan_js")
    assert status == 200, listed
    assert len(listed["transactions"]) == 1, listed
    reconcile = await http.reconcile()
    assert reconcile["ok"], reconcile
