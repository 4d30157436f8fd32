"""Running a gateway process: the node, the WebSocket gateway and the HTTP API
in one event loop, and ``--workers N`` processes sharing the ports.

Each worker binds its own listening sockets with SO_REUSEPORT, so the kernel
spreads new connections over the workers with no proxy in between. On SIGTERM
(or SIGINT) a worker stops accepting, lets commands in flight finish, closes
sessions with 1012 and exits; the parent forwards the signal and waits.

A worker that dies on its own (a crash, the OOM killer, ``kill -9``) takes only
its own sessions with it: the parent starts a replacement on the same ports
while the others keep serving. A worker that dies soon after it started is in
a crash loop (a bad config, a backend refusing it), so each such death in a row
doubles the wait before the next start, up to a cap.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import multiprocessing
import multiprocessing.connection
import multiprocessing.process
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Callable, Generator
from typing import Any

import uvicorn
from prometheus_client import multiprocess

from . import metrics
from .aio import tune_gc
from .config import Settings
from .gateway.gateway import Gateway
from .gateway.node import Node
from .http.api import create_app
from .logs import LogFormat
from .logs import configure as configure_logs

log = logging.getLogger(__name__)

# Pending connections the kernel queues per listening socket before accepting.
LISTEN_BACKLOG = 2048
# How long the parent waits for workers to exit after forwarding SIGTERM,
# beyond their own grace period, before killing them.
WORKER_EXIT_SLACK_S = 5.0
# A worker that dies is replaced after this long: at once for a worker killed
# in service (the port keeps serving on the others meanwhile), but not in a
# loop so tight that a failing start burns a core and floods the log.
WORKER_RESTART_DELAY_MIN_S = 0.5
# Each crash in a row doubles the delay up to this cap: a worker that cannot
# start (say Redis refuses it) is retried twice a minute until it can.
WORKER_RESTART_DELAY_MAX_S = 30.0
# A worker that dies within this long of its start counts as a crash loop (and
# doubles the delay); one that lived longer died in service, and its
# replacement starts after the minimum delay. A cold worker serves within
# about a second (imports, both backends, the listeners).
WORKER_CRASH_LOOP_S = 5.0
# How often the parent looks at its workers when none of them died.
SUPERVISE_INTERVAL_S = 1.0


def listening_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on accepted connections only
    # when the listening socket says TCP, and without it a reply written right
    # after an event waits ~40 ms for the peer's delayed ACK (Nagle).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(LISTEN_BACKLOG)
    sock.setblocking(False)
    return sock


class _EmbeddedUvicorn(uvicorn.Server):
    """uvicorn without its own signal handling: the process owns the signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


class Process:
    """One gateway process, started and stopped from inside an event loop."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.node: Node | None = None
        self.gateway: Gateway | None = None
        self._http: _EmbeddedUvicorn | None = None
        self._http_task: asyncio.Task[None] | None = None
        self.ws_port = 0
        self.http_port = 0

    async def start(self) -> None:
        settings = self.settings
        one_port = settings.serves_one_port()
        http_sock = listening_socket(settings.host, settings.http_port)
        self.http_port = http_sock.getsockname()[1]
        ws_sock = None if one_port else listening_socket(settings.host, settings.ws_port)
        self.ws_port = self.http_port if ws_sock is None else ws_sock.getsockname()[1]
        # The ports bound (port 0 picks one): /v1/config names the real one.
        settings = settings.replace(http_port=self.http_port, ws_port=self.ws_port)
        self.node = await Node.connect(settings)
        await self.node.start()
        self.gateway = Gateway(self.node, sock=ws_sock)
        # Two ports: the gateway listens on its own. One port: uvicorn parses
        # every request head and hands an upgrade's socket to the gateway, so
        # the sessions and the hub write through websockets' objects as on
        # their own port (docs/architecture.md, "One port or two").
        ws: Any = "auto"  # two ports: uvicorn's own, as ever (no route takes it)
        if one_port:
            self.gateway.start_shared((http_sock,))
            ws = self.gateway.upgrade_protocol
        else:
            await self.gateway.start()
        config = uvicorn.Config(
            create_app(self.node),
            lifespan="off",
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=int(settings.shutdown_grace_s),
            ws=ws,
            # X-Forwarded-* (or RFC 7239 Forwarded) are applied by
            # http/forwarded.py, from the peers of TOKENCHAT_TRUSTED_PROXIES
            # only, X-Forwarded-Host included.
            proxy_headers=False,
        )
        self._http = _EmbeddedUvicorn(config)
        self._http_task = asyncio.create_task(self._http.serve(sockets=[http_sock]))
        while not self._http.started:
            if self._http_task.done():
                await self._http_task
                raise RuntimeError("the HTTP server did not start")
            await asyncio.sleep(0.01)
        log.info(
            "serving: ws://%s:%d/ws http://%s:%d%s (node %s, pid %d)",
            settings.host,
            self.ws_port,
            settings.host,
            self.http_port,
            " (one port)" if one_port else "",
            self.node.id,
            os.getpid(),
        )

    async def stop(self) -> None:
        if self.node is not None:
            self.node.draining = True  # /readyz answers 503 from now on
        if self.gateway is not None:
            await self.gateway.shutdown()
        if self._http is not None and self._http_task is not None:
            self._http.should_exit = True
            await self._http_task
        if self.node is not None:
            await self.node.close()


async def serve_until_signalled(
    settings: Settings, on_ready: Callable[[Process], None] | None = None
) -> None:
    process = Process(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await process.start()
        if on_ready is not None:
            on_ready(process)
        await stop.wait()
        log.info("shutting down: draining sessions")
    finally:
        await process.stop()


def run(coro_factory: Callable[[], Any]) -> None:
    """Run on uvloop where it is installed (it is on Linux and macOS)."""
    tune_gc()
    try:
        import uvloop
    except ImportError:  # pragma: no cover - Windows
        asyncio.run(coro_factory())
    else:
        uvloop.run(coro_factory())


def _worker_main(
    settings: Settings, log_level: str, log_format: LogFormat, replacement: bool
) -> None:
    configure_logs(log_level, log_format, worker=True)
    if replacement:
        # Counted here, not in the parent: only workers write to the shared
        # metrics folder, and a counter's file outlives its process.
        metrics.WORKER_REPLACEMENTS.inc()
    run(lambda: serve_until_signalled(settings))


@dataclasses.dataclass
class _Slot:
    """One of the N worker places: its current process, or when to start one."""

    index: int
    process: multiprocessing.process.BaseProcess | None = None
    started_at: float = 0.0
    crashes_in_a_row: int = 0
    restart_at: float = 0.0

    @property
    def name(self) -> str:
        return f"worker-{self.index}"


def restart_delay_s(crashes_in_a_row: int) -> float:
    """How long to wait before replacing a worker, given its crash streak."""
    if crashes_in_a_row <= 0:
        return WORKER_RESTART_DELAY_MIN_S
    exponent = min(crashes_in_a_row, 32)  # 2**32 x the minimum is far past the cap
    return min(WORKER_RESTART_DELAY_MIN_S * (1 << exponent), WORKER_RESTART_DELAY_MAX_S)


class _Supervisor:
    """Keeps ``settings.workers`` worker processes alive until told to stop."""

    def __init__(
        self, settings: Settings, log_level: str, log_format: LogFormat, metrics_dir: str
    ) -> None:
        self.settings = settings
        self.log_level = log_level
        self.log_format = log_format
        self.metrics_dir = metrics_dir
        self.context = multiprocessing.get_context("spawn")
        self.slots = [_Slot(i) for i in range(settings.workers)]
        self.stopping: list[int] = []

    def forward(self, signum: int, frame: object) -> None:
        """The signal handler: stop replacing, pass the signal to every worker."""
        self.stopping.append(signum)
        for slot in self.slots:
            process = slot.process
            if process is not None and process.pid is not None and process.is_alive():
                os.kill(process.pid, signum)

    def start(self, slot: _Slot, *, replacement: bool) -> None:
        process = self.context.Process(
            target=_worker_main,
            args=(self.settings, self.log_level, self.log_format, replacement),
            name=slot.name,
        )
        process.start()
        slot.process, slot.started_at = process, time.monotonic()
        if self.stopping and process.pid is not None:
            # The signal came while this one was starting: it missed the forward.
            os.kill(process.pid, self.stopping[-1])

    def supervise(self) -> None:
        """Start every worker, then replace the dead ones until a signal comes."""
        for slot in self.slots:
            self.start(slot, replacement=False)
        while not self.stopping:
            now = time.monotonic()
            for slot in self.slots:
                if slot.process is not None and not slot.process.is_alive():
                    self._buried(slot, now)
                if slot.process is None and now >= slot.restart_at and not self.stopping:
                    log.warning("starting a replacement %s", slot.name)
                    self.start(slot, replacement=True)
            alive = [s.process.sentinel for s in self.slots if s.process is not None]
            waits = [s.restart_at - now for s in self.slots if s.process is None]
            timeout_s = max(0.0, min([SUPERVISE_INTERVAL_S, *waits]))
            multiprocessing.connection.wait(alive, timeout=timeout_s)

    def _buried(self, slot: _Slot, now: float) -> None:
        """Record a worker's death and schedule its replacement."""
        assert slot.process is not None
        process, slot.process = slot.process, None
        process.join()
        if process.pid is not None:
            # Its live gauges (sessions open) must stop counting in /metrics.
            multiprocess.mark_process_dead(process.pid, self.metrics_dir)  # type: ignore[no-untyped-call]
        lived_s = now - slot.started_at
        slot.crashes_in_a_row = slot.crashes_in_a_row + 1 if lived_s < WORKER_CRASH_LOOP_S else 0
        delay_s = restart_delay_s(slot.crashes_in_a_row)
        slot.restart_at = now + delay_s
        log.error(
            "%s (pid %s) died with exit code %s after %.1f s; replacing it in %.1f s%s",
            slot.name,
            process.pid,
            process.exitcode,
            lived_s,
            delay_s,
            f" (crash {slot.crashes_in_a_row} in a row)" if slot.crashes_in_a_row else "",
        )

    def stop(self) -> bool:
        """Wait for every worker to exit (killing the late); True when all exited 0."""
        deadline = time.monotonic() + self.settings.shutdown_grace_s + WORKER_EXIT_SLACK_S
        clean = True
        for slot in self.slots:
            process = slot.process
            if process is None:
                continue
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                log.error("%s did not stop in time; killing it", slot.name)
                process.kill()
                process.join()
            clean = clean and process.exitcode == 0
        return clean


def serve_workers(settings: Settings, log_level: str, log_format: LogFormat = "text") -> int:
    """Run ``settings.workers`` processes on the same ports; return an exit code.

    The parent only supervises: it replaces a worker that dies on its own (with
    crash-loop backoff, see ``restart_delay_s``), forwards SIGTERM/SIGINT and
    then starts nothing more, and kills a worker that outlives its grace period.
    The exit code is 0 when every worker stopped cleanly after the signal.
    """
    if settings.workers == 1:
        if settings.metrics_port:
            metrics.serve_on_port(settings.host, settings.metrics_port)
        run(lambda: serve_until_signalled(settings))
        return 0
    if settings.http_port == 0 or (settings.ws_port == 0 and not settings.serves_one_port()):
        raise ValueError("--workers > 1 needs fixed ports (they are shared with SO_REUSEPORT)")
    metrics_dir = tempfile.mkdtemp(prefix="tokenchat-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    if settings.metrics_port:
        # The parent outlives every worker: its scrapes aggregate all of them.
        metrics.serve_on_port(settings.host, settings.metrics_port)
    supervisor = _Supervisor(settings, log_level, log_format, metrics_dir)
    # Installed before any worker starts, so no signal can orphan one.
    signal.signal(signal.SIGTERM, supervisor.forward)
    signal.signal(signal.SIGINT, supervisor.forward)
    try:
        supervisor.supervise()
        clean = supervisor.stop()
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0 if clean else 1
