"""Running a gateway process: the node, the WebSocket gateway and the HTTP API
in one event loop, and ``--workers N`` processes sharing the ports.

Each worker binds its own listening sockets with SO_REUSEPORT, so the kernel
spreads new connections over the workers with no proxy in between. On SIGTERM
(or SIGINT) a worker stops accepting, lets commands in flight finish, closes
sessions with 1012 and exits; the parent forwards the signal and waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Callable, Generator
from typing import Any

import uvicorn

from . import metrics
from .aio import tune_gc
from .config import Settings
from .gateway import Gateway
from .http_api import create_app
from .node import Node

log = logging.getLogger(__name__)

# Pending connections the kernel queues per listening socket before accepting.
LISTEN_BACKLOG = 2048
# How long the parent waits for workers to exit after forwarding SIGTERM,
# beyond their own grace period, before killing them.
WORKER_EXIT_SLACK_S = 5.0


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
        ws_sock = listening_socket(settings.host, settings.ws_port)
        http_sock = listening_socket(settings.host, settings.http_port)
        self.ws_port = ws_sock.getsockname()[1]
        self.http_port = http_sock.getsockname()[1]
        self.node = await Node.connect(settings)
        await self.node.start()
        self.gateway = Gateway(self.node, sock=ws_sock)
        await self.gateway.start()
        config = uvicorn.Config(
            create_app(self.node),
            lifespan="off",
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=int(settings.shutdown_grace_s),
        )
        self._http = _EmbeddedUvicorn(config)
        self._http_task = asyncio.create_task(self._http.serve(sockets=[http_sock]))
        while not self._http.started:
            if self._http_task.done():
                await self._http_task
                raise RuntimeError("the HTTP server did not start")
            await asyncio.sleep(0.01)
        log.info(
            "serving: ws://%s:%d/ws http://%s:%d (node %s, pid %d)",
            settings.host,
            self.ws_port,
            settings.host,
            self.http_port,
            self.node.id,
            os.getpid(),
        )

    async def stop(self) -> None:
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


def _worker_main(settings: Settings, log_level: str) -> None:
    logging.basicConfig(
        level=log_level, format=f"%(asctime)s [{os.getpid()}] %(levelname)s %(name)s: %(message)s"
    )
    run(lambda: serve_until_signalled(settings))


def serve_workers(settings: Settings, log_level: str) -> int:
    """Run ``settings.workers`` processes on the same ports; return an exit code.

    The parent only supervises: it forwards SIGTERM/SIGINT, kills a worker that
    outlives its grace period, and if a worker dies on its own it stops the
    others and exits non-zero, so the process manager restarts the whole set
    (a half-dead set would keep serving on fewer cores without anyone noticing).
    """
    if settings.workers == 1:
        if settings.metrics_port:
            metrics.serve_on_port(settings.host, settings.metrics_port)
        run(lambda: serve_until_signalled(settings))
        return 0
    if settings.http_port == 0 or settings.ws_port == 0:
        raise ValueError("--workers > 1 needs fixed ports (they are shared with SO_REUSEPORT)")
    metrics_dir = tempfile.mkdtemp(prefix="tokenchat-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    if settings.metrics_port:
        # The parent outlives every worker: its scrapes aggregate all of them.
        metrics.serve_on_port(settings.host, settings.metrics_port)
    context = multiprocessing.get_context("spawn")
    workers = [
        context.Process(target=_worker_main, args=(settings, log_level), name=f"worker-{i}")
        for i in range(settings.workers)
    ]
    stopping: list[int] = []

    def forward(signum: int, frame: object) -> None:
        stopping.append(signum)
        for worker in workers:
            if worker.pid is not None and worker.is_alive():
                os.kill(worker.pid, signum)

    # Installed before any worker starts, so no signal can orphan one.
    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    try:
        for worker in workers:
            worker.start()
        while not stopping and all(worker.is_alive() for worker in workers):
            multiprocessing.connection.wait([w.sentinel for w in workers], timeout=1.0)
        if not stopping:
            log.error("a worker died; stopping the others")
            forward(signal.SIGTERM, None)
        deadline = time.monotonic() + settings.shutdown_grace_s + WORKER_EXIT_SLACK_S
        for worker in workers:
            worker.join(max(0.0, deadline - time.monotonic()))
            if worker.is_alive():
                log.error("%s did not stop in time; killing it", worker.name)
                worker.kill()
                worker.join()
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
    clean = bool(stopping) and all(worker.exitcode == 0 for worker in workers)
    return 0 if clean else 1
