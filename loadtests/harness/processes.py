"""Processes of a benchmark: the servers it starts, its load processes, the CPU
and memory they use, py-spy, and the removal of what it leaves behind."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import multiprocessing
import os
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from loadtests.harness.client import HOST
from loadtests.harness.stats import NS_PER_S

if TYPE_CHECKING:
    from tokenchat.server.config import Settings

REPO_ROOT = Path(__file__).resolve().parents[2]

# --- bounds: every wait has one ------------------------------------------------
SETUP_TIMEOUT_S = 120.0  # every member of every load process connected
SERVER_START_TIMEOUT_S = 30.0  # until the server answers
SERVER_STOP_TIMEOUT_S = 10.0  # after SIGTERM, before SIGKILL
WORKER_STOP_TIMEOUT_S = 3.0  # after SIGTERM, before SIGKILL
MIGRATE_TIMEOUT_S = 60.0  # `tokenchat migrate`
# The server side of tokenchat drains sessions for this long on SIGTERM; the
# members are gone by then, so a short grace only bounds a stuck shutdown.
SERVER_SHUTDOWN_GRACE_S = 2.0
# Between telling the load processes "go" and the first send, so that every
# process has read the schedule before any starts.
GO_DELAY_S = 0.5
POLL_INTERVAL_S = 0.05  # readiness polls
HTTP_TIMEOUT_S = 10.0  # one admin or metrics request
REDIS_INFO_TIMEOUT_S = 2.0  # asking Redis for its pid (to report its CPU)
# Open files: what to ask for when the hard limit is unlimited (Linux caps it
# at fs.nr_open, 1M by default), and the files a process needs besides its
# members' sockets (Redis and Postgres pools, listeners, pipes, logs).
NOFILE_UNLIMITED_TARGET = 1 << 20  # files
FD_HEADROOM = 256  # files
# tokenchat rate-limits each session to 20 commands/s (TOKENCHAT_COMMANDS_PER_S),
# which is right for people and wrong for a sender measuring fan-out capacity:
# the benchmark lifts it so that the window, not the limiter, paces the sends.
COMMANDS_PER_S_LIFTED = 1_000_000.0  # commands per second per session
COMMANDS_BURST_LIFTED = 1_000_000  # commands
# SCAN page and UNLINK batch when deleting a benchmark's keys.
SCAN_COUNT = 10_000  # keys
UNLINK_BATCH = 1_000  # keys
# --wait-idle: the machine counts as idle when everything on it, interrupts
# included, uses less than this over one sample; other work on a 2-core machine
# moves the figures more than anything measured here.
IDLE_BUSY_MAX_PCT = 25.0  # % of one CPU
IDLE_SAMPLE_S = 1.0


# ============================================================================
# Load processes
# ============================================================================


async def recv_from_parent(conn: Connection, timeout_s: float) -> Any:
    """The next message from the parent, without blocking the event loop."""
    loop = asyncio.get_running_loop()
    readable: asyncio.Future[None] = loop.create_future()

    def on_readable() -> None:
        if not readable.done():
            readable.set_result(None)

    fd = conn.fileno()
    loop.add_reader(fd, on_readable)
    try:
        async with asyncio.timeout(timeout_s):
            await readable
    finally:
        loop.remove_reader(fd)
    # The event loop made the pipe non-blocking: a message larger than the
    # pipe's buffer (a phase with thousands of frame heads) would then fail
    # half read with EAGAIN. Once it begins to arrive, read it whole.
    os.set_blocking(fd, True)
    return conn.recv()


def first_error(exc: BaseException) -> BaseException:
    """The first leaf of an exception group (a TaskGroup's), or the exception."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def raise_open_files_limit() -> int:
    """Every member is a socket: allow as many as the hard limit lets us.

    Returns the soft limit now in force (servers started later inherit it).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = NOFILE_UNLIMITED_TARGET if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def run_on_uvloop(coro_factory: Callable[[], Any]) -> None:
    import uvloop

    from tokenchat.server.aio import tune_gc

    # As the server does: a load process's own full collections would stall
    # its clients and show up in the measured latency as the server's.
    tune_gc()
    uvloop.run(coro_factory())


def run_load_process(
    coro_factory: Callable[[], Any], conn: Connection, cpus: frozenset[int] | None
) -> None:
    """The body of every load process (members, fans, idle sessions, the tips
    baseline): run ``coro_factory`` on uvloop until it returns or the parent
    is gone, then close the pipe to the parent."""
    # Ctrl-C reaches the whole process group; the parent stops the workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise_open_files_limit()
    if cpus is not None:
        os.sched_setaffinity(0, cpus)
    try:
        run_on_uvloop(coro_factory)
    except (EOFError, BrokenPipeError, TimeoutError):
        pass  # the parent went away or gave up: nothing to report to
    finally:
        conn.close()


def schedule(warmup_s: float, duration_s: float) -> tuple[int, int, int]:
    """When the load starts, and the measured window (CLOCK_MONOTONIC, ns, one
    clock for every process of the machine): the load starts ``GO_DELAY_S``
    from now and is measured for ``duration_s`` after ``warmup_s``."""
    start_ns = time.monotonic_ns() + int(GO_DELAY_S * NS_PER_S)
    window_start_ns = start_ns + int(warmup_s * NS_PER_S)
    return start_ns, window_start_ns, window_start_ns + int(duration_s * NS_PER_S)


# ============================================================================
# Servers
# ============================================================================


def free_port() -> int:
    """A port free now. The server binds it a moment later: only a process that
    binds random ports in between could take it, and the start would then fail
    loudly rather than measure the wrong thing."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


@dataclasses.dataclass
class Server:
    kind: str  # what it is, in logs and errors: "tokenchat", "baseline", ...
    process: subprocess.Popen[bytes]
    ws_port: int
    log_path: Path

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(SERVER_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(SERVER_STOP_TIMEOUT_S)


def tcp_answers(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=POLL_INTERVAL_S * 10):
            return True
    except OSError:
        return False


def http_json(
    url: str,
    token: str | None = None,
    body: Any = None,
    timeout_s: float = HTTP_TIMEOUT_S,
    method: str | None = None,
) -> tuple[int, Any]:
    """(status, parsed JSON body or text) of a GET, or of a POST when
    ``body`` (``method`` says otherwise: a PUT)."""
    data = None if body is None else orjson.dumps(body)
    method = method or ("GET" if data is None else "POST")
    request = urllib.request.Request(url, data=data, method=method)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    try:
        return status, orjson.loads(raw)
    except orjson.JSONDecodeError:
        return status, raw.decode(errors="replace")


def http_answers(url: str) -> bool:
    try:
        return http_json(url, timeout_s=POLL_INTERVAL_S * 10)[0] == 200
    except (urllib.error.URLError, OSError):
        return False


class Bench:
    """Owns everything a benchmark starts, and removes it in ``close``: its
    servers and load processes, and its Redis keys and Postgres schema (a key
    prefix, a schema and a JWT secret of its own, so it shares Redis and
    Postgres with nothing else)."""

    def __init__(self, args: argparse.Namespace, name: str) -> None:
        self.args = args
        tag = secrets.token_hex(4)
        self.redis_prefix = f"bench:{tag}:"
        self.schema = f"bench_{tag}"
        self.jwt_secret = secrets.token_urlsafe(32)
        self.log_dir = Path(tempfile.mkdtemp(prefix=f"tokenchat-{name}-"))
        self.env = dict(os.environ)
        self.env.update(
            TOKENCHAT_REDIS_PREFIX=self.redis_prefix,
            TOKENCHAT_DATABASE_SCHEMA=self.schema,
            TOKENCHAT_JWT_SECRET=self.jwt_secret,
            TOKENCHAT_HOST=HOST,
            TOKENCHAT_LOG_LEVEL="WARNING",
            TOKENCHAT_COMMANDS_PER_S=str(COMMANDS_PER_S_LIFTED),
            TOKENCHAT_COMMANDS_BURST=str(COMMANDS_BURST_LIFTED),
            TOKENCHAT_SHUTDOWN_GRACE_S=str(SERVER_SHUTDOWN_GRACE_S),
            # The benchmark measures a production configuration: no dev mode,
            # no fake payments, and so no need for TOKENCHAT_INSECURE.
            TOKENCHAT_DEV_MODE="0",
            TOKENCHAT_PAYMENT_PROVIDER="none",
            TOKENCHAT_INSECURE="0",
        )
        self.migrated = False
        self.servers: list[Server] = []
        self.workers: list[multiprocessing.process.BaseProcess] = []
        self.redis_pid = self._redis_pid()
        # --pin: the server gets a core of its own, the load processes the rest.
        self.server_cpus: frozenset[int] | None = None
        self.loadgen_cpus: frozenset[int] | None = None
        if args.pin:
            cpus = sorted(os.sched_getaffinity(0))
            self.server_cpus, self.loadgen_cpus = frozenset(cpus[:1]), frozenset(cpus[1:])

    def settings(self) -> Settings:
        """tokenchat's settings as the servers of this benchmark read them."""
        from tokenchat.server.config import Settings

        return Settings.from_env(self.env)

    # --- servers ------------------------------------------------------------------
    def _spawn(self, kind: str, argv: list[str], env: dict[str, str], ws_port: int) -> Server:
        log_path = self.log_dir / f"{kind}-{len(self.servers)}.log"
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                [sys.executable, *argv],
                cwd=REPO_ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        server = Server(kind, process, ws_port, log_path)
        self.servers.append(server)
        if self.server_cpus is not None:
            os.sched_setaffinity(process.pid, self.server_cpus)
        return server

    def start_serve(self, **env: str) -> tuple[Server, int]:
        """``tokenchat migrate``, then ``tokenchat serve --workers N`` on free
        ports with ``env`` added, answering ``/healthz``; (server, HTTP port)."""
        # Before every start, not once: the schema then matches the server code
        # that starts, even if a migration was added since the last run.
        self.migrated = True  # from now on there may be a schema to drop
        subprocess.run(
            [sys.executable, "-m", "tokenchat.server.cli", "migrate"],
            cwd=REPO_ROOT,
            env=self.env,
            check=True,
            timeout=MIGRATE_TIMEOUT_S,
            stdout=subprocess.DEVNULL,
        )
        self.log_dir.mkdir(parents=True, exist_ok=True)
        http_port = free_port()
        # --one-port (fanout): the gateway at /ws on the HTTP port (equal ports
        # are one-port mode), to compare with the default two ports.
        ws_port = http_port if getattr(self.args, "one_port", False) else free_port()
        server_env = dict(
            self.env, TOKENCHAT_WS_PORT=str(ws_port), TOKENCHAT_HTTP_PORT=str(http_port), **env
        )
        argv = ["-m", "tokenchat.server.cli", "serve", "--workers", str(self.args.workers)]
        server = self._spawn("tokenchat", argv, server_env, ws_port)
        self._wait_ready(server, lambda: http_answers(f"http://{HOST}:{http_port}/healthz"))
        return server, http_port

    def _wait_ready(self, server: Server, check: Callable[[], bool]) -> None:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while not check():
            if server.process.poll() is not None:
                raise RuntimeError(f"{server.kind} server exited:\n{server.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{server.kind} server not ready:\n{server.log_tail()}")
            time.sleep(POLL_INTERVAL_S)

    def _redis_pid(self) -> int | None:
        """Redis's pid, to report its CPU, when it runs on this machine."""
        from redis import Redis

        client: Redis = Redis.from_url(
            self.settings().redis_url, socket_timeout=REDIS_INFO_TIMEOUT_S
        )
        try:
            pid = int(client.info("server")["process_id"])
        except Exception:
            return None
        finally:
            client.close()
        return pid if Path(f"/proc/{pid}/stat").exists() else None

    # --- load processes -----------------------------------------------------------
    def _start_worker(
        self, context: Any, target: Callable[[Any, Connection], None], spec: Any, name: str
    ) -> Connection:
        """A load process running ``target(spec, conn)``; returns the parent's end."""
        parent_end, child_end = context.Pipe()
        worker = context.Process(target=target, args=(spec, child_end), name=name, daemon=True)
        worker.start()
        child_end.close()
        self.workers.append(worker)
        conn: Connection = parent_end
        return conn

    def _gather(
        self, conns: list[Connection], expected: str, timeout_s: float, server: Server
    ) -> list[Any]:
        """One message of kind ``expected`` from every load process."""
        deadline = time.monotonic() + timeout_s
        values: dict[int, Any] = {}
        while len(values) < len(conns):
            if server.process.poll() is not None:
                raise RuntimeError(f"{server.kind} server exited:\n{server.log_tail()}")
            left_s = deadline - time.monotonic()
            if left_s <= 0:
                raise TimeoutError(f"load processes did not report {expected!r} in time")
            for conn in wait([c for i, c in enumerate(conns) if i not in values], left_s):
                assert isinstance(conn, Connection)
                try:
                    kind, value = conn.recv()
                except EOFError:
                    raise RuntimeError("a load process died; see its traceback above") from None
                if kind != expected:
                    raise RuntimeError(f"load process: {kind}: {value}")
                values[conns.index(conn)] = value
        return [values[i] for i in range(len(conns))]

    def redis_pids(self) -> list[int]:
        return [self.redis_pid] if self.redis_pid else []

    def loadgen_pids(self) -> list[int]:
        return [w.pid for w in self.workers if w.pid is not None]

    def measure_cpu(
        self,
        server: Server,
        pids: dict[str, list[int]],
        start_ns: int,
        end_ns: int,
        profile: Path | None,
        *,
        postgres: bool = False,
    ) -> dict[str, float | None]:
        """``sample_cpu`` over the window; with ``profile``, py-spy records
        ``server`` meanwhile into that path."""
        time.sleep(max(0.0, (start_ns - time.monotonic_ns()) / NS_PER_S))
        spy = start_py_spy(server.process.pid, self.args.duration, profile) if profile else None
        try:
            return sample_cpu(pids, start_ns, end_ns, postgres=postgres)
        finally:
            if spy is not None:
                finish_py_spy(spy, profile)

    def _stop_workers(self) -> None:
        for worker in self.workers:
            if worker.is_alive():
                worker.terminate()
        for worker in self.workers:
            worker.join(WORKER_STOP_TIMEOUT_S)
            if worker.is_alive():
                worker.kill()
                worker.join(WORKER_STOP_TIMEOUT_S)
        self.workers.clear()

    # --- the end ------------------------------------------------------------------
    def close(self, *, keep_logs: bool) -> None:
        """Stop whatever still runs, then remove tokenchat's keys and schema."""
        self._stop_workers()
        for server in self.servers:
            server.stop()
        if self.migrated:
            asyncio.run(self._remove_state())
        if keep_logs:
            print(f"server logs kept in {self.log_dir}", file=sys.stderr)
        else:
            shutil.rmtree(self.log_dir, ignore_errors=True)

    @contextlib.contextmanager
    def closed_after(self) -> Iterator[None]:
        """``close`` after the block, whatever happens in it; the server logs
        are kept when it raised (Ctrl-C included)."""
        failed = False
        try:
            yield
        except BaseException:
            failed = True
            raise
        finally:
            self.close(keep_logs=failed)

    async def _remove_state(self) -> None:
        settings = self.settings()
        await remove_state(
            settings.redis_url, self.redis_prefix, settings.database_url, self.schema
        )

    async def delete_keys(self, pattern: str) -> None:
        from redis.asyncio import Redis

        redis: Redis = Redis.from_url(self.settings().redis_url)
        try:
            await delete_matching(redis, pattern)
        finally:
            await redis.aclose()


async def delete_matching(redis: Any, pattern: str) -> int:
    """UNLINK every key matching ``pattern`` (SCAN: never blocks Redis long)."""
    deleted = 0
    batch: list[bytes] = []
    async for key in redis.scan_iter(match=pattern, count=SCAN_COUNT):
        batch.append(key)
        if len(batch) >= UNLINK_BATCH:
            deleted += await redis.unlink(*batch)
            batch.clear()
    if batch:
        deleted += await redis.unlink(*batch)
    return deleted


async def remove_state(redis_url: str, redis_prefix: str, database_url: str, schema: str) -> None:
    """Delete a benchmark's Redis keys and drop its Postgres schema."""
    from redis.asyncio import Redis

    redis: Redis = Redis.from_url(redis_url)
    try:
        await delete_matching(redis, f"{redis_prefix}*")
    finally:
        await redis.aclose()
    await drop_schema(database_url, schema)


async def drop_schema(database_url: str, schema: str) -> None:
    """Drop a benchmark's Postgres schema, if it is there."""
    import asyncpg

    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


# ============================================================================
# CPU and memory
# ============================================================================


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (``serve --workers N`` forks its workers)."""
    tree = [pid]
    for parent in tree:  # grows as children are found
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{parent}/task").iterdir():
                tree.extend(int(c) for c in (task / "children").read_text().split())
    return tree


CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")  # the unit of cpu_ticks


def cpu_ticks(pids: list[int]) -> int | None:
    """utime + stime of these processes (clock ticks), None if unknown."""
    if not pids:
        return None
    total = 0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return None
        # Fields after the command name, which is in parentheses and may hold spaces.
        fields = stat[stat.rindex(")") + 2 :].split()
        total += int(fields[11]) + int(fields[12])
    return total


def machine_busy_ticks() -> tuple[int, int]:
    """Busy time of all CPUs (clock ticks): in tasks, and in (soft) interrupts."""
    with open("/proc/stat") as stat:
        fields = stat.readline().split()
    user, nice, system, _idle, _iowait, irq, softirq = (int(f) for f in fields[1:8])
    return user + nice + system, irq + softirq


def ticks_by_name(name: str) -> dict[int, int]:
    """utime + stime (clock ticks) of every process whose command is ``name``."""
    ticks: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # gone meanwhile
        if stat[stat.index("(") + 1 : stat.rindex(")")] != name:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        ticks[int(entry.name)] = int(fields[11]) + int(fields[12])
    return ticks


def sample_cpu(
    pids: dict[str, list[int]], start_ns: int, end_ns: int, *, postgres: bool = False
) -> dict[str, float | None]:
    """CPU use (% of one core) between the two times of each group of processes;
    with ``postgres``, of Postgres (all its processes: the ledger writer's COPYs
    are ours, the rest of a shared Postgres is not); of the rest of the
    machine's tasks, and of interrupts."""
    time.sleep(max(0.0, (start_ns - time.monotonic_ns()) / NS_PER_S))
    before = {name: cpu_ticks(p) for name, p in pids.items()}
    postgres_before = ticks_by_name("postgres") if postgres else {}
    machine_before = machine_busy_ticks()
    time.sleep(max(0.0, (end_ns - time.monotonic_ns()) / NS_PER_S))
    after = {name: cpu_ticks(p) for name, p in pids.items()}
    postgres_after = ticks_by_name("postgres") if postgres else {}
    machine_after = machine_busy_ticks()
    per_tick_pct = 100 / os.sysconf("SC_CLK_TCK") / ((end_ns - start_ns) / NS_PER_S)
    result: dict[str, float | None] = {}
    for name in pids:
        b, a = before[name], after[name]
        result[name] = None if a is None or b is None else (a - b) * per_tick_pct
    if postgres:
        # A backend that exited meanwhile is missed; one that started counts whole.
        result["postgres"] = per_tick_pct * sum(
            ticks - postgres_before.get(pid, 0) for pid, ticks in postgres_after.items()
        )
    # Task time of the whole machine that none of the processes above was
    # charged: whatever else runs here (a noisy neighbour shows up in it and
    # explains a slow run). Interrupt time, mostly loopback TCP delivering
    # our own traffic, is charged to no process and is shown on its own.
    tasks_pct, irq_pct = (
        (a - b) * per_tick_pct for a, b in zip(machine_after, machine_before, strict=True)
    )
    result["other"] = max(0.0, tasks_pct - sum(v or 0.0 for v in result.values()))
    result["irq"] = irq_pct
    return result


def wait_for_idle(max_wait_s: float) -> float:
    """Wait (at most ``max_wait_s``) until the machine is idle; its last busy %."""
    deadline = time.monotonic() + max_wait_s
    tick_s = 1.0 / os.sysconf("SC_CLK_TCK")
    while True:
        before = machine_busy_ticks()
        time.sleep(IDLE_SAMPLE_S)
        after = machine_busy_ticks()
        busy_pct = 100 * sum(a - b for a, b in zip(after, before, strict=True)) * tick_s
        busy_pct /= IDLE_SAMPLE_S
        if busy_pct < IDLE_BUSY_MAX_PCT or time.monotonic() >= deadline:
            return busy_pct


def vm_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def tree_rss_kib(pid: int) -> int:
    """RSS of ``pid`` and its descendants (``serve --workers N``)."""
    return sum(vm_rss_kib(p) for p in process_tree(pid))


# ============================================================================
# Profiling
# ============================================================================


def start_py_spy(pid: int, duration_s: float, output: Path) -> subprocess.Popen[bytes]:
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    fmt = {".svg": "flamegraph", ".json": "speedscope"}.get(output.suffix, "raw")
    argv = [py_spy, "record", "--pid", str(pid), "--duration", str(max(1, int(duration_s)))]
    # --subprocesses: with --workers N the work is in the forked workers.
    argv += ["--subprocesses"]
    # --nonblocking: sample without pausing the server, so it runs at full speed.
    argv += ["--rate", "100", "--nonblocking", "--format", fmt, "--output", str(output)]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def finish_py_spy(spy: subprocess.Popen[bytes], output: Path | None) -> None:
    try:
        _, err = spy.communicate(timeout=SERVER_STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        spy.kill()
        spy.wait()
        return
    if spy.returncode != 0:
        print(f"py-spy failed: {err.decode(errors='replace').strip()}", file=sys.stderr)
    elif output is not None and output.suffix not in (".svg", ".json"):
        print(summarize_profile(output))


def summarize_profile(path: Path, top: int = 20) -> str:
    """Top functions by own and by inclusive samples, from py-spy's raw format.

    Frames are counted per function, not per line (``f (file.py:12)`` and
    ``f (file.py:14)`` are one ``f (file.py)``), which is what a hot spot is.
    """
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [_function_of(frame) for frame in stack.split(";")]
        own[frames[-1]] = own.get(frames[-1], 0) + count
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + count
    lines = [f"profile {path}: {total} samples (not idle)"]
    for title, table in (("own", own), ("inclusive", inclusive)):
        lines.append(f"  top by {title} samples:")
        for frame, count in sorted(table.items(), key=lambda kv: -kv[1])[:top]:
            lines.append(f"    {100 * count / max(total, 1):5.1f}%  {frame}")
    return "\n".join(lines)


def _function_of(frame: str) -> str:
    where, colon, line = frame.rpartition(":")
    return where + ")" if colon and line.rstrip(")").isdigit() else frame


def profile_path(profile: Path, kind: str) -> Path:
    """``out.txt`` -> ``out.tokenchat.txt``: one profile per server."""
    return profile.with_name(f"{profile.stem}.{kind}{profile.suffix}")


@contextlib.contextmanager
def sigterm_as_exit() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so every ``finally`` cleans up."""

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
