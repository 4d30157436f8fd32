"""Run ``tokenchat`` as a real OS process, the way an operator does.

``serve()`` starts ``python -m tokenchat.server.cli serve`` in its own process group
(so a ``--workers N`` parent and its workers can be killed together even if
the parent dies first), waits until ``/readyz`` answers 200 and always kills
the group on the way out. ``run_cli()`` runs one short CLI command. Every wait
is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path

import httpx
from redis.asyncio import Redis

from tests.conftest import token
from tokenchat.client_demo.client import Client
from tokenchat.server.config import Settings
from tokenchat.server.keys import Keys

# A cold `serve` imports everything, connects to both backends and (with
# workers) spawns fresh interpreters: about a second; 20 s is generous.
READY_TIMEOUT_S = 20.0
# One short CLI command (token, migrate, a refused serve).
CLI_TIMEOUT_S = 30.0
POLL_INTERVAL_S = 0.05


def free_port() -> int:
    """A TCP port that was free a moment ago (bind to 0, read it, release it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def cli_env(settings: Settings | None = None, **extra: str) -> dict[str, str]:
    """This environment minus any TOKENCHAT_* variable, plus the test's backends."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("TOKENCHAT_") and name != "PROMETHEUS_MULTIPROC_DIR"
    }
    env["PYTHONUNBUFFERED"] = "1"
    # Said explicitly: these servers run as production does, so `serve`
    # refuses dev mode and fake payments unless a test passes
    # TOKENCHAT_INSECURE=1 itself.
    env["TOKENCHAT_INSECURE"] = "0"
    if settings is not None:
        env.update(
            TOKENCHAT_REDIS_URL=settings.redis_url,
            TOKENCHAT_REDIS_CLUSTER=str(settings.redis_cluster),
            TOKENCHAT_REDIS_PREFIX=settings.redis_prefix,
            TOKENCHAT_DATABASE_URL=settings.database_url,
            TOKENCHAT_DATABASE_SCHEMA=settings.database_schema,
            TOKENCHAT_JWT_SECRET=settings.jwt_secret,
        )
    env.update(extra)
    return env


@dataclasses.dataclass(frozen=True)
class CliResult:
    returncode: int
    stdout: str
    stderr: str


async def run_cli(
    *args: str,
    env: Mapping[str, str],
    cwd: Path | None = None,
    timeout_s: float = CLI_TIMEOUT_S,
) -> CliResult:
    """Run ``python -m tokenchat.server.cli ARGS`` to completion."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tokenchat.server.cli",
        *args,
        env=dict(env),
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(timeout_s):
            out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"tokenchat {' '.join(args)} took over {timeout_s} s") from None
    assert proc.returncode is not None
    return CliResult(proc.returncode, out.decode(), err.decode())


class ServerProcess:
    """A running ``tokenchat serve`` (the parent process when it has workers)."""

    def __init__(
        self, proc: asyncio.subprocess.Process, http_port: int, ws_port: int, log_path: Path
    ) -> None:
        self.proc = proc
        self.http_port = http_port
        self.ws_port = ws_port
        self.log_path = log_path
        self.ws_url = f"ws://127.0.0.1:{ws_port}/ws"
        self.http_url = f"http://127.0.0.1:{http_port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    def log(self) -> str:
        """Everything the process wrote to stdout and stderr so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    async def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        async with httpx.AsyncClient(timeout=1.0) as http:
            while True:
                if self.proc.returncode is not None:
                    raise AssertionError(
                        f"serve exited with {self.proc.returncode} while starting:\n{self.log()}"
                    )
                with contextlib.suppress(httpx.HTTPError):
                    response = await http.get(f"{self.http_url}/readyz")
                    if response.status_code == 200:
                        return
                if time.monotonic() > deadline:
                    raise AssertionError(f"serve not ready after {timeout_s} s:\n{self.log()}")
                await asyncio.sleep(POLL_INTERVAL_S)

    def send_signal(self, signum: int) -> None:
        """Signal the serve process itself (not its group)."""
        os.kill(self.proc.pid, signum)

    async def wait_exit(self, timeout_s: float) -> int:
        try:
            async with asyncio.timeout(timeout_s):
                return await self.proc.wait()
        except TimeoutError:
            raise AssertionError(
                f"serve still running {timeout_s} s after being asked to stop:\n{self.log()}"
            ) from None

    async def kill_group(self) -> None:
        """SIGKILL the process and every worker it started; reap the process."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5.0):
                await self.proc.wait()

    async def metrics(self) -> str:
        async with httpx.AsyncClient(timeout=5.0) as http:
            response = await http.get(f"{self.http_url}/metrics")
            response.raise_for_status()
            return response.text


@contextlib.asynccontextmanager
async def serve(
    settings: Settings,
    log_dir: Path,
    *,
    workers: int = 1,
    env: Mapping[str, str] | None = None,
) -> AsyncIterator[ServerProcess]:
    """Start ``serve`` on fresh ports, wait until ready, always kill it after."""
    http_port, ws_port = free_port(), free_port()
    log_path = log_dir / f"serve-{http_port}.log"
    args = [
        sys.executable,
        "-m",
        "tokenchat.server.cli",
        "serve",
        "--host",
        "127.0.0.1",
        "--http-port",
        str(http_port),
        "--ws-port",
        str(ws_port),
        "--workers",
        str(workers),
    ]
    with log_path.open("wb") as log_fh:
        proc = await asyncio.create_subprocess_exec(
            *args,
            # TMPDIR: `--workers N` leaves its metrics folder behind (mkdtemp).
            env=cli_env(settings, TMPDIR=str(log_dir), **dict(env or {})),
            stdin=subprocess.DEVNULL,
            stdout=log_fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = ServerProcess(proc, http_port, ws_port, log_path)
    try:
        await server.wait_ready()
        yield server
    finally:
        await server.kill_group()


# --- what a test needs around a server process ------------------------------------


async def connect(server: ServerProcess, sub: str | None = None, role: str = "fan") -> Client:
    client = await Client.connect(server.ws_url, open_timeout=5)
    if sub is not None:
        await client.hello(token(sub, role))
    return client


async def close_all(clients: list[Client]) -> None:
    for client in clients:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(2.0):
                await client.close()


async def close_code(client: Client, timeout_s: float) -> int | None:
    """The close code the server sent, once the connection is closed."""
    async with asyncio.timeout(timeout_s):
        await client.ws.wait_closed()
    return client.ws.close_code


async def node_ids(redis: Redis, prefix: str) -> set[str]:
    """Ids of the gateway processes whose heartbeat runs (the nodes' sorted
    set, node_beat.lua: a node that stops cleanly leaves it at once)."""
    seconds, micros = await redis.time()
    now_ms = seconds * 1000 + micros // 1000
    live = await redis.zrangebyscore(Keys(prefix).nodes(), f"({now_ms}", "+inf")
    return {node.decode() for node in live}


async def wait_for(
    what: str, check: Callable[[], Awaitable[bool]], timeout_s: float = 10.0
) -> None:
    """Poll the async predicate ``check`` until it is true."""
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(POLL_INTERVAL_S)


def children_of(pid: int) -> dict[int, str]:
    """{pid: command line} of the live processes whose parent is ``pid`` (Linux)."""
    found: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        fields = stat.rpartition(")")[2].split()
        if len(fields) > 1 and int(fields[1]) == pid and fields[0] != "Z":
            found[int(entry.name)] = cmdline.replace(b"\0", b" ").decode(errors="replace")
    return found


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def worker_pids(server: ServerProcess) -> list[int]:
    """The multiprocessing workers of a ``--workers N`` parent (not its
    resource tracker, the other child multiprocessing may start)."""
    return [pid for pid, cmd in children_of(server.pid).items() if "multiprocessing.spawn" in cmd]
