"""Benchmark harness: every scenario beside a baseline measured in the same run.

    python -m loadtests.bench --quick                 # every scenario, under two minutes
    python -m loadtests.bench --duration 10 --runs 3 --json bench.json
    python -m loadtests.bench --only idle,ledger

It starts what it measures (``tokenchat serve --workers N``, the baselines)
against ``TOKENCHAT_REDIS_URL`` and ``TOKENCHAT_DATABASE_URL``, each under a
Redis key prefix and Postgres schema of its own that it removes at the end,
and generates the load from separate processes (uvloop and the minimal
WebSocket client of ``loadtests.harness.client``). Scenarios:

- ``fanout``: ``python -m loadtests.fanout`` with 1000 members, against a bare
  ``websockets`` server broadcasting every frame (deliveries/s).
- ``fanout_peer``: the same load against python-socketio's ``AsyncServer``
  with an ``AsyncRedisManager`` on the same Redis (its own channel), served by
  uvicorn; the members speak the Engine.IO v4 / Socket.IO v5 websocket
  protocol with the same minimal client. Ratio: tokenchat over socketio.
- ``tips``: ``python -m loadtests.tips`` (200 fans, 20 rooms) against the tip
  Lua script called from Python, pipelined, at the same concurrency.
- ``tips_peer`` (a row of its own, from the ``tips`` scenario's runs): the same
  fans against tips as most people would build them, python-socketio with
  ``AsyncRedisManager`` and one asyncpg transaction per tip
  (``loadtests.tips_peer``). Ratio: tokenchat over it.
- ``idle``: N authenticated idle sessions (``hello`` answered); the server's
  RSS (VmRSS) before and after, KiB per session, against the same number of
  idle connections to the bare ``websockets`` server.
- ``reconnect``: ``python -m loadtests.reconnect``: N open sockets (the idle
  scenario's N) say hello at once to a freshly started process, first hello
  to last welcome (s); beside it, connect+hello against connecting alone to
  the bare ``websockets`` server (the ratio), and the same with batching off.
- ``ledger``: fans paced to offer 2,000 tips/s; the lag from the Lua call to
  the Postgres commit (p50/p99 of the ``tokenchat_ledger_lag_seconds``
  histogram's increase over the phase); then, with the writer off
  (``TOKENCHAT_LEDGER_ENABLED=0``), a burst fills the outbox and a lone
  ``tokenchat ledger`` is timed until the outbox is empty (entries/s).

Every figure is a median over ``--runs``; ratios are value over baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, cast

import orjson

from loadtests import fanout
from loadtests.fanout import ROOM, WorkerSpec
from loadtests.harness.cli import (
    QUICK_DURATION_S,
    QUICK_RUNS,
    QUICK_WARMUP_S,
    positive_float,
    positive_int,
    resolve_timing,
)
from loadtests.harness.client import (
    CONNECT_TIMEOUT_S,
    HOST,
    KINDS,
    SIO_PATH,
    Kind,
    Member,
    SenderState,
    open_member,
)
from loadtests.harness.processes import (
    FD_HEADROOM,
    REPO_ROOT,
    SETUP_TIMEOUT_S,
    Server,
    first_error,
    free_port,
    http_json,
    raise_open_files_limit,
    recv_from_parent,
    run_load_process,
    sigterm_as_exit,
    tcp_answers,
    tree_rss_kib,
)
from loadtests.harness.report import clean_json, machine_summary
from loadtests.harness.stats import (
    Stats,
    histogram_quantile,
    lag_delta,
    ledger_lag_buckets,
    median,
)

SCENARIOS = ("fanout", "fanout_peer", "tips", "idle", "ledger", "reconnect")

# --- the issue's figures ---------------------------------------------------------
FANOUT_MEMBERS = 1000
TIPS_FANS = 200
TIPS_ROOMS = 20
IDLE_SESSIONS = 10_000
LEDGER_RATE_PER_S = 2000.0  # tips/s offered in the ledger scenario
DRAIN_ENTRIES = 20_000  # outbox entries the burst aims for (the writer off)
GOALS = {
    "fanout": ">= 0.8 x bare broadcast",
    "fanout_peer": ">= 2.0 x socketio",
    "tips": ">= 0.5 x pipelined, capped p99 < 50 ms",
    "tips_peer": "none set (what users would build themselves)",
    "idle": "<= 16 KiB/session",  # issue #14 goal 5 (it was 20)
    "ledger": "lag p99 < 1 s at 2,000 tips/s",
    "reconnect": "10,000 welcomed <= 2 s after all say hello",
}

# --- --quick (its timing: loadtests.harness.cli) ----------------------------------
QUICK_IDLE_SESSIONS = 3000  # hellos set up ~100-300/s here (a Postgres upsert each)
QUICK_DRAIN_BURST_S = 4.0

# --- bounds ------------------------------------------------------------------------
# A scenario run as a subprocess: its own bounds plus this much per run.
SUBPROCESS_SLACK_S = 120.0
IDLE_CONNECT_CONCURRENCY_TOTAL = 32  # handshakes + hellos at once, all processes
IDLE_SETTLE_S = 2.0  # after the last session is up, before reading VmRSS
IDLE_BEFORE_SETTLE_S = 1.0  # after the server answers, before the first VmRSS
IDLE_SETUP_TIMEOUT_S = 240.0  # every session of every load process up (or failed)
IDLE_HOLD_TIMEOUT_S = 120.0  # a load process waits this long for "stop"
IDLE_LOAD_PROCS = 2
LEDGER_DRAIN_TIMEOUT_S = 180.0  # the lone writer empties the outbox
OUTBOX_POLL_S = 0.02
# The Redis pub/sub channel of the socketio baseline's AsyncRedisManager.
SIO_CHANNEL_PREFIX = "tokenchat-bench-socketio-"

KIB = 1024


# ============================================================================
# Running the scenario modules as subprocesses
# ============================================================================


def run_module(module: str, argv: list[str], timeout_s: float) -> dict[str, Any]:
    """``python -m module argv --json tmp``; the scenarios of its JSON."""
    with tempfile.TemporaryDirectory(prefix="tokenchat-bench-") as tmp:
        path = Path(tmp) / "out.json"
        command = [sys.executable, "-m", module, *argv, "--json", str(path)]
        print(f"$ {' '.join(command[1:])}", flush=True)
        subprocess.run(command, cwd=REPO_ROOT, check=True, timeout=timeout_s)
        scenarios: dict[str, Any] = json.loads(path.read_text())["scenarios"]
        return scenarios


def scenario_fanout(args: argparse.Namespace) -> dict[str, Any]:
    argv = [
        "--members", str(args.members),
        "--duration", str(args.duration),
        "--warmup", str(args.warmup),
        "--runs", str(args.runs),
        "--workers", str(args.workers),
    ]  # fmt: skip
    per_run_s = 2 * (args.duration + args.warmup + 60)
    result: dict[str, Any] = run_module(
        "loadtests.fanout", argv, args.runs * per_run_s + SUBPROCESS_SLACK_S
    )["fanout"]
    return result


def scenario_tips(args: argparse.Namespace) -> dict[str, Any]:
    argv = [
        "--fans", str(TIPS_FANS),
        "--rooms", str(TIPS_ROOMS),
        "--duration", str(args.duration),
        "--warmup", str(args.warmup),
        "--runs", str(args.runs),
        "--workers", str(args.workers),
    ]  # fmt: skip
    # Five measured phases (two baseline modes, tokenchat's two, socketio's one),
    # each with its server's start, its fans' set-up and the checks after it.
    per_run_s = 5 * (args.duration + args.warmup) + 180
    result: dict[str, Any] = run_module(
        "loadtests.tips", argv, args.runs * per_run_s + SUBPROCESS_SLACK_S
    )["tips"]
    # The tips module reports its own goal and run details; keep them all.
    return result


def tips_peer_row(tips: dict[str, Any]) -> dict[str, Any]:
    """The ``tips`` scenario's figures against its second baseline, as a row:
    tokenchat's committed tips/s over python-socketio + asyncpg's."""
    if "error" in tips:
        return {"error": "the tips scenario failed"}
    if tips.get("peer") is None:
        return {"error": "the tips scenario ran without its socketio baseline"}
    return {
        "value": tips.get("value"),
        "unit": "tips/s",
        "baseline": tips.get("peer"),
        "baseline_name": tips.get("peer_name"),
        "ratio": tips.get("peer_ratio"),
        "p50_ms": tips.get("p50_ms"),
        "p99_ms": tips.get("p99_ms"),
        "baseline_p50_ms": tips.get("peer_p50_ms"),
        "baseline_p99_ms": tips.get("peer_p99_ms"),
        "python_us_per_tip": tips.get("python_us_per_tip"),
        "postgres_us_per_tip": tips.get("postgres_us_per_tip"),
        "baseline_python_us_per_tip": tips.get("peer_python_us_per_tip"),
        "baseline_postgres_us_per_tip": tips.get("peer_postgres_us_per_tip"),
    }


# ============================================================================
# fanout_peer: python-socketio with AsyncRedisManager
# ============================================================================


def serve_socketio(port: int, redis_url: str, channel: str) -> None:
    """One room; every ``say`` is emitted to it (through Redis pub/sub)."""
    import socketio
    import uvicorn

    manager = socketio.AsyncRedisManager(redis_url, channel=channel)
    sio = socketio.AsyncServer(async_mode="asgi", client_manager=manager)

    async def connect(sid: str, environ: dict[str, Any], auth: Any = None) -> None:
        await sio.enter_room(sid, ROOM)

    async def say(sid: str, data: Any) -> None:
        # A room emit is published to Redis; every node, this one included,
        # delivers it to its members when it comes back from pub/sub.
        await sio.emit("msg", data, room=ROOM)

    sio.on("connect", connect)
    sio.on("say", say)
    app = socketio.ASGIApp(sio)
    from tokenchat.server.aio import tune_gc

    tune_gc()  # as tokenchat's processes do, so that the comparison is of servers
    uvicorn.run(app, host=HOST, port=port, loop="uvloop", log_level="warning", lifespan="off")


class SioMember(Member):
    """A ``Member`` speaking Engine.IO v4 over the websocket: ``0`` open,
    ``40`` namespace connect, ``2``/``3`` ping/pong, ``42[...]`` events."""

    path = SIO_PATH

    def __init__(self, port: int, stats: Stats, sender: SenderState | None) -> None:
        super().__init__(port, None, stats, sender)
        self.joined: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.joined.done():
            self.joined.set_exception(ConnectionError("connection closed"))
        super().connection_lost(exc)

    def _on_text(self, buf: bytearray, start: int, end: int, now_ns: int) -> None:
        if end - start == 1 and buf[start] == ord("2"):
            self.send_text(b"3")  # Engine.IO ping from the server
            return
        if not self.joined.done():
            if buf.startswith(b"40", start):
                self.joined.set_result(None)
            elif buf.startswith(b"0", start):
                self.send_text(b"40")  # connect to the default namespace
            elif buf.startswith(b"44", start):
                self.joined.set_exception(ConnectionError(bytes(buf[start:end]).decode()))
            return
        super()._on_text(buf, start, end, now_ns)


async def open_sio_member(
    kind: Kind,
    port: int,
    stats: Stats,
    *,
    user_id: str,
    role: str,
    jwt_secret: str,
    room: str | None = None,
    sender: SenderState | None = None,
) -> Member:
    """``open_member`` for socketio: connected and in the room (socketio puts
    every connection in ``ROOM``, whatever ``room`` says)."""
    loop = asyncio.get_running_loop()
    member: SioMember | None = None
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            _, member = await loop.create_connection(
                lambda: SioMember(port, stats, sender), HOST, port
            )
            await member.opened
            await member.joined
    except BaseException:
        if member is not None:
            member.close()
        raise
    return member


def sio_message_frame(kind: Kind, sender: SenderState, sequence: int, text_bytes: int) -> bytes:
    """A ``say`` event whose data is the ``message`` event tokenchat delivers,
    so that both servers deliver about the same bytes."""
    stamp = b"@T%d" % time.monotonic_ns() + sender.tag
    text = stamp + b"x" * max(0, text_bytes - len(stamp))
    sender_id = fanout.MEMBER_ID_FORMAT.format(sender.index).encode()
    return b"".join(
        (
            b'42["say",{"type":"message","room":"',
            ROOM.encode(),
            b'","from":"',
            sender_id,
            b'","text":"',
            text,
            b'","offset":"1700000000000-0","ts":1700000000000}]',
        )
    )


_FANOUT_WORKER_MAIN = fanout.worker_main


def peer_worker_main(spec: WorkerSpec, conn: Connection) -> None:
    """``fanout.worker_main``, with socketio members when the spec's kind is
    "baseline" (fanout_peer runs socketio in the baseline's place)."""
    if spec.kind == "baseline":
        fanout.open_member = open_sio_member  # type: ignore[assignment,attr-defined]
        fanout.message_frame = sio_message_frame
    _FANOUT_WORKER_MAIN(spec, conn)


class PeerBench(fanout.FanoutBench):
    """``fanout.FanoutBench`` with python-socketio in the baseline's place."""

    def start_server(self, kind: Kind) -> Server:
        if kind == "tokenchat":
            return super().start_server(kind)
        port = free_port()
        argv = [
            "-m", "loadtests.bench",
            "--serve-socketio", str(port),
            "--socketio-redis", self.settings().redis_url,
            "--socketio-channel", SIO_CHANNEL_PREFIX + self.redis_prefix,
        ]  # fmt: skip
        server = self._spawn(kind, argv, self.env, port)
        self._wait_ready(server, lambda: tcp_answers(port))
        return server


def scenario_fanout_peer(args: argparse.Namespace) -> dict[str, Any]:
    fargs = fanout.parse_args(
        [
            "--members", str(args.members),
            "--duration", str(args.duration),
            "--warmup", str(args.warmup),
            "--runs", str(args.runs),
            "--workers", str(args.workers),
        ]
    )  # fmt: skip
    runs: list[dict[str, Any]] = []
    bench = PeerBench(fargs)
    # FanoutBench._load starts fanout.worker_main in its load processes: that name
    # now names the wrapper above (pickled by reference, so the spawned
    # processes import and run it).
    fanout.worker_main = peer_worker_main
    try:
        with bench.closed_after():
            for number in range(1, args.runs + 1):
                for kind in KINDS:
                    run = bench.run_once(kind, number, None)
                    runs.append(run)
                    name = "tokenchat" if kind == "tokenchat" else "socketio"
                    print(
                        f"fanout_peer run {number} {name:<9} {run['deliveries_per_s']:>10,.0f}"
                        f" deliveries/s  p50 {run['p50_ms']:.1f} ms  p99 {run['p99_ms']:.1f} ms"
                        f"  complete {run['complete']:.2%}",
                        flush=True,
                    )
    finally:
        fanout.worker_main = _FANOUT_WORKER_MAIN
    report = fanout.report_json(fargs, runs)["scenarios"]["fanout"]
    report["unit"] = "deliveries/s"
    report["baseline_name"] = "python-socketio AsyncServer + AsyncRedisManager (uvicorn)"
    for run in report["runs"]:
        if run["server"] == "baseline":
            run["server"] = "socketio"
    return cast(dict[str, Any], report)


# ============================================================================
# idle: memory per authenticated idle session
# ============================================================================


@dataclasses.dataclass(frozen=True, slots=True)
class IdleSpec:
    kind: Kind
    port: int
    indexes: tuple[int, ...]
    jwt_secret: str
    concurrency: int


async def idle_worker_async(spec: IdleSpec, conn: Connection) -> None:
    stats = Stats()
    members: list[Member] = []
    failures: dict[str, int] = {}
    gate = asyncio.Semaphore(spec.concurrency)

    async def connect(index: int) -> None:
        async with gate:
            try:
                member = await open_member(
                    spec.kind,
                    spec.port,
                    stats,
                    user_id=f"idle_u{index:05d}",
                    role="fan",
                    jwt_secret=spec.jwt_secret,
                )
                members.append(member)
            except Exception as exc:
                name = repr(first_error(exc))[:120]
                failures[name] = failures.get(name, 0) + 1

    try:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(IDLE_SETUP_TIMEOUT_S):
                await asyncio.gather(*(connect(i) for i in spec.indexes))
        conn.send(("ready", {"connected": len(members), "failures": failures}))
        stats.counting = True  # from now on a dropped session is counted
        await recv_from_parent(conn, IDLE_HOLD_TIMEOUT_S)
        conn.send(("result", {"disconnects": stats.disconnects}))
    finally:
        for member in members:
            member.close()


def idle_worker_main(spec: IdleSpec, conn: Connection) -> None:
    run_load_process(lambda: idle_worker_async(spec, conn), conn, None)


class IdleBench(fanout.FanoutBench):
    def run_idle(self, kind: Kind, sessions: int) -> dict[str, Any]:
        server = self.start_server(kind)
        conns: list[Connection] = []
        try:
            time.sleep(IDLE_BEFORE_SETTLE_S)
            rss_before = tree_rss_kib(server.process.pid)
            context = multiprocessing.get_context("spawn")
            procs = min(IDLE_LOAD_PROCS, sessions)
            for w in range(procs):
                spec = IdleSpec(
                    kind=kind,
                    port=server.ws_port,
                    indexes=tuple(range(w, sessions, procs)),
                    jwt_secret=self.jwt_secret,
                    concurrency=max(1, IDLE_CONNECT_CONCURRENCY_TOTAL // procs),
                )
                conns.append(self._start_worker(context, idle_worker_main, spec, f"idle-{w}"))
            started = time.monotonic()
            ready = self._gather(conns, "ready", IDLE_SETUP_TIMEOUT_S + 30, server)
            setup_s = time.monotonic() - started
            connected = sum(r["connected"] for r in ready)
            failures: dict[str, int] = {}
            for r in ready:
                for name, count in r["failures"].items():
                    failures[name] = failures.get(name, 0) + count
            time.sleep(IDLE_SETTLE_S)
            rss_after = tree_rss_kib(server.process.pid)
            for conn in conns:
                conn.send(("stop",))
            results = self._gather(conns, "result", 30, server)
        finally:
            self._stop_workers()
            for conn in conns:
                conn.close()
            server.stop()
        per_session = (rss_after - rss_before) / connected if connected else math.nan
        return {
            "server": kind,
            "sessions_asked": sessions,
            "sessions": connected,
            "failures": failures,
            "disconnects": sum(r["disconnects"] for r in results),
            "rss_before_kib": rss_before,
            "rss_after_kib": rss_after,
            "kib_per_session": per_session,
            "setup_s": setup_s,
        }


def scenario_idle(args: argparse.Namespace) -> dict[str, Any]:
    fargs = fanout.parse_args(
        ["--members", str(args.idle_sessions), "--workers", str(args.workers)]
    )
    bench = IdleBench(fargs)
    runs: list[dict[str, Any]] = []
    with bench.closed_after():
        for number in range(1, args.runs + 1):
            for kind in KINDS:
                run = bench.run_idle(kind, args.idle_sessions)
                run["run"] = number
                runs.append(run)
                print(
                    f"idle run {number} {kind:<9} {run['sessions']:,} sessions"
                    f" {run['kib_per_session']:.1f} KiB/session"
                    f" (RSS {run['rss_before_kib'] / KIB:.0f} -> {run['rss_after_kib'] / KIB:.0f}"
                    f" MiB, set up in {run['setup_s']:.1f} s)"
                    + (f" failures {run['failures']}" if run["failures"] else ""),
                    flush=True,
                )

    def med(kind: str, key: str) -> float:
        return median([r[key] for r in runs if r["server"] == kind])

    value, baseline = med("tokenchat", "kib_per_session"), med("baseline", "kib_per_session")
    return {
        "value": value,
        "unit": "KiB/session",
        "baseline": baseline,
        "ratio": value / baseline if baseline else math.nan,
        "p50_ms": None,
        "p99_ms": None,
        "sessions_asked": args.idle_sessions,
        "sessions": int(med("tokenchat", "sessions")),
        "baseline_sessions": int(med("baseline", "sessions")),
        "setup_s": med("tokenchat", "setup_s"),
        "runs": runs,
    }


# ============================================================================
# reconnect: N sockets say hello at once to a fresh process
# ============================================================================


def scenario_reconnect(args: argparse.Namespace) -> dict[str, Any]:
    argv = ["--sessions", str(args.idle_sessions), "--runs", str(args.runs)]
    argv += ["--workers", str(args.workers)]
    # Per run: five phases, each a server start and N sockets (~30 s at 10,000).
    timeout_s = SUBPROCESS_SLACK_S * 2 * (args.runs + 1)
    row = run_module("loadtests.reconnect", argv, timeout_s)["reconnect"]
    return cast(dict[str, Any], row)


# ============================================================================
# ledger: lag at a steady offered rate, and the writer's drain rate
# ============================================================================


def scenario_ledger(args: argparse.Namespace) -> dict[str, Any]:
    from loadtests import tips

    targs = tips.parse_args(
        [
            "--fans", str(TIPS_FANS),
            "--rooms", str(TIPS_ROOMS),
            "--duration", str(args.duration),
            "--warmup", str(args.warmup),
            "--runs", "1",
            "--workers", str(args.workers),
        ]
    )  # fmt: skip
    bench = tips.TipsBench(targs)
    runs: list[dict[str, Any]] = []
    with bench.closed_after():
        for number in range(1, args.runs + 1):
            run = ledger_lag_run(bench, tips, number, args.ledger_rate)
            run.update(ledger_drain_run(bench, tips, number, args))
            runs.append(run)
            print(
                f"ledger run {number}: offered {args.ledger_rate:,.0f} tips/s, committed"
                f" {run['committed_per_s']:,.0f}/s, lag p50 {run['lag_p50_ms']:.0f} ms"
                f" p99 {run['lag_p99_ms']:.0f} ms; drain {run['drain_entries']:,} entries"
                f" at {run['drain_per_s']:,.0f}/s",
                flush=True,
            )

    def med(key: str) -> float:
        return median([r[key] for r in runs])

    return {
        "value": med("committed_per_s"),
        "unit": "tips/s committed at 2,000 offered",
        "baseline": args.ledger_rate,
        "ratio": med("committed_per_s") / args.ledger_rate,
        "p50_ms": med("lag_p50_ms"),
        "p99_ms": med("lag_p99_ms"),
        "ack_p50_ms": med("ack_p50_ms"),
        "ack_p99_ms": med("ack_p99_ms"),
        "offered_per_s": args.ledger_rate,
        "drain_per_s": med("drain_per_s"),
        "drain_entries": int(med("drain_entries")),
        "runs": runs,
    }


def _start_fans(bench: Any, tips: Any, server: Server) -> list[Connection]:
    """The fan load processes of ``loadtests.tips``, connected to ``server``."""
    args = bench.args
    context = multiprocessing.get_context("spawn")
    conns: list[Connection] = []
    procs = min(args.load_procs, args.fans)
    for w in range(procs):
        spec = tips.FanWorkerSpec(
            port=server.ws_port,
            fan_indexes=tuple(range(w, args.fans, procs)),
            rooms=args.rooms,
            jwt_secret=bench.jwt_secret,
            cpus=None,
            connect_concurrency=max(1, tips.CONNECT_CONCURRENCY_TOTAL // procs),
        )
        conns.append(bench._start_worker(context, tips.fan_worker_main, spec, f"fans-{w}"))
    ready = bench._gather(conns, "ready", SETUP_TIMEOUT_S + CONNECT_TIMEOUT_S, server)
    connected = sum(int(value) for value in ready)
    if connected != args.fans:
        raise RuntimeError(f"only {connected} of {args.fans} fans connected")
    return conns


def _stop_fans(bench: Any, conns: list[Connection]) -> None:
    for conn in conns:
        with contextlib.suppress(OSError):
            conn.send(("stop", None))
    bench._stop_workers()
    for conn in conns:
        conn.close()


def ledger_lag_run(bench: Any, tips: Any, number: int, rate: float) -> dict[str, Any]:
    server, http_port = bench.start_tokenchat()
    conns: list[Connection] = []
    metrics_url = bench.ledger_metrics_url
    try:
        conns = _start_fans(bench, tips, server)
        bench.fund_fans(http_port, number)
        bench._wait_outbox_empty(server)  # the credits' entries are written first
        _, text = http_json(metrics_url)
        before = ledger_lag_buckets(text if isinstance(text, str) else "")
        row = bench._phase(conns, server, number, "capped", rate / bench.args.fans, None)
        drain_s = bench._wait_outbox_empty(server)
        _, text = http_json(metrics_url)
        after = ledger_lag_buckets(text if isinstance(text, str) else "")
    finally:
        _stop_fans(bench, conns)
        bench.stop_tokenchat(server)
    delta = lag_delta(before, after)
    return {
        "run": number,
        "offered_per_s": rate,
        "committed_per_s": row["per_s"],
        "ack_p50_ms": row["p50_ms"],
        "ack_p99_ms": row["p99_ms"],
        "errors": row["errors"],
        "lag_samples": delta[-1][1] if delta else 0,
        "lag_p50_ms": 1000 * histogram_quantile(delta, 0.50),
        "lag_p99_ms": 1000 * histogram_quantile(delta, 0.99),
        "outbox_empty_after_s": drain_s,
        "cpu_server_pct": row["cpu_main_pct"],
        "cpu_ledger_pct": row["cpu_ledger_pct"],
        "cpu_redis_pct": row["cpu_redis_pct"],
        "cpu_postgres_pct": row["cpu_postgres_pct"],
    }


def ledger_drain_run(
    bench: Any, tips: Any, number: int, args: argparse.Namespace
) -> dict[str, Any]:
    """The writer off, a full-rate burst fills the outbox; then a lone
    ``tokenchat ledger`` empties it."""
    from redis import Redis

    from tokenchat.server.keys import Keys

    outbox = Keys(bench.redis_prefix).outbox()
    saved_timing = (bench.args.warmup, bench.args.duration)
    bench.args.warmup, bench.args.duration = 0.0, args.drain_burst
    client: Redis = Redis.from_url(bench.settings().redis_url)
    conns: list[Connection] = []
    writer: Server | None = None
    try:
        server, http_port = bench.start_tokenchat(ledger=False)
        try:
            conns = _start_fans(bench, tips, server)
            bench.fund_fans(http_port, 1000 + number)
            burst = bench._phase(conns, server, number, "full", 0.0, None)
        finally:
            _stop_fans(bench, conns)
            bench.stop_tokenchat(server)
        entries = int(client.xlen(outbox))
        started = time.monotonic()
        writer = bench._spawn("tokenchat", ["-m", "tokenchat.server.cli", "ledger"], bench.env, 0)
        first_drop: tuple[float, int] | None = None
        while True:
            left = int(client.xlen(outbox))
            now = time.monotonic()
            if first_drop is None and left < entries:
                first_drop = (now, left)
            if left == 0:
                break
            if writer.process.poll() is not None:
                raise RuntimeError(f"tokenchat ledger exited:\n{writer.log_tail()}")
            if now - started > LEDGER_DRAIN_TIMEOUT_S:
                raise TimeoutError(f"outbox still holds {left} entries")
            time.sleep(OUTBOX_POLL_S)
        done = time.monotonic()
    finally:
        if writer is not None:
            writer.stop()
        client.close()
        bench.args.warmup, bench.args.duration = saved_timing
    # From the first entry gone (the writer connected and read its first
    # batch) to the last; the start-up is reported on its own.
    assert first_drop is not None
    span = done - first_drop[0]
    drained = first_drop[1]  # entries left when the writer's first batch was gone
    return {
        "burst_per_s": burst["per_s"],
        "drain_entries": entries,
        "drain_s": done - started,
        "drain_startup_s": first_drop[0] - started,
        "drain_per_s": (drained / span) if span > 0 else math.nan,
    }


# ============================================================================
# Report
# ============================================================================


def fmt(value: Any, spec: str) -> str:
    if not isinstance(value, int | float) or math.isnan(value):
        return "-"
    return format(value, spec)


def render_table(scenarios: dict[str, dict[str, Any]]) -> str:
    header = (
        f"{'scenario':<12} {'value':>12} {'baseline':>12} {'ratio':>7} {'p50 ms':>8}"
        f" {'p99 ms':>8}  unit / goal"
    )
    lines = [header, "-" * len(header)]
    for name, s in scenarios.items():
        if "error" in s:
            lines.append(f"{name:<12} failed: {s['error']}")
            continue
        lines.append(
            f"{name:<12} {fmt(s.get('value'), ',.1f'):>12} {fmt(s.get('baseline'), ',.1f'):>12}"
            f" {fmt(s.get('ratio'), '.2f'):>7} {fmt(s.get('p50_ms'), '.1f'):>8}"
            f" {fmt(s.get('p99_ms'), '.1f'):>8}  {s.get('unit', '')}; goal {GOALS[name]}"
        )
        extra = scenario_notes(name, s)
        if extra:
            lines.append(f"{'':<12} {extra}")
    return "\n".join(lines)


def scenario_notes(name: str, s: dict[str, Any]) -> str:
    if name == "tips":
        return (
            f"capped: offered {fmt(s.get('capped_offered_per_s'), ',.0f')}/s, committed"
            f" {fmt(s.get('capped_per_s'), ',.0f')}/s,"
            f" ack p99 {fmt(s.get('capped_p99_ms'), '.1f')} ms"
        )
    if name == "tips_peer":
        return (
            f"socketio+asyncpg p50/p99 {fmt(s.get('baseline_p50_ms'), '.1f')}/"
            f"{fmt(s.get('baseline_p99_ms'), '.1f')} ms; python us/tip"
            f" {fmt(s.get('python_us_per_tip'), '.0f')} vs"
            f" {fmt(s.get('baseline_python_us_per_tip'), '.0f')}, postgres us/tip"
            f" {fmt(s.get('postgres_us_per_tip'), '.0f')} vs"
            f" {fmt(s.get('baseline_postgres_us_per_tip'), '.0f')}"
        )
    if name == "idle":
        return (
            f"{s['sessions']:,} of {s['sessions_asked']:,} sessions asked"
            f" (baseline {s['baseline_sessions']:,})"
        )
    if name == "reconnect":
        return (
            f"{s.get('sessions', 0):,} sessions; connect+hello"
            f" {fmt(s.get('connect_hello_s'), '.2f')} s vs bare connect"
            f" {fmt(s.get('baseline'), '.2f')} s (the ratio); batching off:"
            f" {fmt(s.get('unbatched_s'), '.2f')} s, connect+hello"
            f" {fmt(s.get('unbatched_connect_hello_s'), '.2f')} s"
        )
    if name == "ledger":
        return (
            f"lag p50/p99 above; acks p99 {fmt(s.get('ack_p99_ms'), '.1f')} ms; writer drains"
            f" {fmt(s.get('drain_per_s'), ',.0f')} entries/s ({s.get('drain_entries')} entries)"
        )
    if name in ("fanout", "fanout_peer"):
        return (
            f"baseline p50/p99 {fmt(s.get('baseline_p50_ms'), '.1f')}/"
            f"{fmt(s.get('baseline_p99_ms'), '.1f')} ms"
        )
    return ""


def machine_info() -> dict[str, Any]:
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return {
        **machine_summary(),
        "memory_mib": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // KIB // KIB,
        "loadavg": os.getloadavg(),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "commit": commit or None,
        "open_files_max": raise_open_files_limit(),
    }


# ============================================================================
# --plots: latency against offered load
# ============================================================================

PLOT_FANOUT_WINDOWS = (1, 8, 64)  # messages in flight per sender (4 senders)
PLOT_TIPS_RATES = (300.0, 1000.0, 2000.0)  # tips/s offered (capped phase)


def save_latency_plot(fig: Any, ax: Any, xlabel: str, ylabel: str, title: str, path: Path) -> None:
    """Label a latency-against-load plot (log latency axis) and write it as PNG."""
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def sweep_and_plot(args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
    """fanout at several windows and tips at several offered rates, one short
    run each; PNGs of latency against throughput into ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    points: dict[str, Any] = {"fanout": [], "tips": []}
    for window in PLOT_FANOUT_WINDOWS:
        argv = [
            "--members", str(args.members), "--window", str(window),
            "--duration", str(args.duration), "--warmup", str(args.warmup), "--runs", "1",
        ]  # fmt: skip
        f = run_module("loadtests.fanout", argv, 600)["fanout"]
        points["fanout"].append({"window": window, **{k: f[k] for k in FANOUT_KEYS}})
    for rate in PLOT_TIPS_RATES:
        argv = [
            "--fans", str(TIPS_FANS), "--rooms", str(TIPS_ROOMS), "--capped-rate", str(rate),
            "--duration", str(args.duration), "--warmup", str(args.warmup), "--runs", "1",
            "--no-peer",  # the plot is of tokenchat's capped phase
        ]  # fmt: skip
        t = run_module("loadtests.tips", argv, 600)["tips"]
        points["tips"].append({"offered_per_s": rate, **{k: t.get(k) for k in TIPS_KEYS}})

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for prefix, label in (("", "tokenchat"), ("baseline_", "bare websockets")):
        xs = [p["value" if not prefix else "baseline"] for p in points["fanout"]]
        for q, style in (("p50_ms", "o-"), ("p99_ms", "s--")):
            ys = [p[prefix + q] for p in points["fanout"]]
            ax.plot(xs, ys, style, label=f"{label} {q[:3]}")
        for p, x in zip(points["fanout"], xs, strict=True):
            ax.annotate(f"w{p['window']}", (x, p[prefix + "p50_ms"]), fontsize=7)
    save_latency_plot(
        fig,
        ax,
        f"deliveries/s ({args.members} members, 4 senders, window w)",
        "delivery latency, ms",
        "fanout: latency against load",
        out_dir / "fanout_latency.png",
    )

    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs = [p["capped_per_s"] for p in points["tips"]]
    ax.plot(xs, [p["capped_p50_ms"] for p in points["tips"]], "o-", label="ack p50")
    ax.plot(xs, [p["capped_p99_ms"] for p in points["tips"]], "s--", label="ack p99")
    for p, x in zip(points["tips"], xs, strict=True):
        ax.annotate(f"offered {p['offered_per_s']:.0f}", (x, p["capped_p50_ms"]), fontsize=7)
    ax.axhline(50, color="grey", lw=0.8, ls=":", label="goal p99 50 ms")
    save_latency_plot(
        fig,
        ax,
        f"committed tips/s ({TIPS_FANS} fans, {TIPS_ROOMS} rooms, paced)",
        "ack latency, ms",
        "tips: ack latency against offered load",
        out_dir / "tips_latency.png",
    )
    return points


FANOUT_KEYS = ("value", "baseline", "p50_ms", "p99_ms", "baseline_p50_ms", "baseline_p99_ms")
TIPS_KEYS = ("capped_per_s", "capped_p50_ms", "capped_p99_ms", "value", "baseline")


# ============================================================================
# Command line
# ============================================================================

RUNNERS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "fanout": scenario_fanout,
    "fanout_peer": scenario_fanout_peer,
    "tips": scenario_tips,
    "idle": scenario_idle,
    "ledger": scenario_ledger,
    "reconnect": scenario_reconnect,
}


def scenario_list(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown scenario(s) {unknown}; choose from {', '.join(SCENARIOS)}"
        )
    return names


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.bench", description=(__doc__ or "").split("\n\n")[0]
    )
    parser.add_argument(
        "--only", type=scenario_list, help=f"comma-separated subset of {','.join(SCENARIOS)}"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"{QUICK_RUNS} run of {QUICK_DURATION_S:g} s after {QUICK_WARMUP_S:g} s, "
        f"{QUICK_IDLE_SESSIONS:,} idle sessions (flags given explicitly still win)",
    )
    parser.add_argument("--duration", type=positive_float, help="measured s per phase")
    parser.add_argument("--warmup", type=float, help="seconds before each measurement")
    parser.add_argument("--runs", type=positive_int, help="per scenario and server")
    parser.add_argument("--members", type=positive_int, default=FANOUT_MEMBERS)
    parser.add_argument(
        "--workers",
        type=positive_int,
        default=1,
        help="tokenchat serve --workers in every scenario (default 1)",
    )
    parser.add_argument("--idle-sessions", type=positive_int)
    parser.add_argument("--ledger-rate", type=positive_float, default=LEDGER_RATE_PER_S)
    parser.add_argument(
        "--drain-burst", type=positive_float, help="seconds of full-rate tips, writer off"
    )
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument(
        "--plots",
        type=Path,
        metavar="DIR",
        help="instead of the scenarios: sweep fanout's window and tips' offered rate, "
        "one run each, and write latency-against-load PNGs into DIR",
    )
    parser.add_argument("--serve-socketio", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--socketio-redis", help=argparse.SUPPRESS)
    parser.add_argument("--socketio-channel", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    resolve_timing(parser, args)
    quick = args.quick
    if args.idle_sessions is None:
        args.idle_sessions = QUICK_IDLE_SESSIONS if quick else IDLE_SESSIONS
    if args.drain_burst is None:
        # At ~1-2k tips/s, a burst this long fills the outbox with ~10-20k entries.
        args.drain_burst = QUICK_DRAIN_BURST_S if quick else max(args.duration, 10.0)
    args.only = args.only or list(SCENARIOS)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve_socketio is not None:
        raise_open_files_limit()
        serve_socketio(args.serve_socketio, args.socketio_redis, args.socketio_channel)
        return 0
    open_files_max = raise_open_files_limit()
    if args.plots is not None:
        points = sweep_and_plot(args, args.plots)
        print(json.dumps(clean_json(points), indent=2))
        if args.json is not None:
            args.json.write_text(json.dumps(clean_json(points), indent=2) + "\n")
        return 0
    needed = max(args.members, args.idle_sessions) + FD_HEADROOM
    if open_files_max < needed:
        print(
            f"open files limit {open_files_max} < {needed}: idle sessions capped by it",
            file=sys.stderr,
        )
        args.idle_sessions = max(1, open_files_max - FD_HEADROOM)
    machine = machine_info()
    scenarios: dict[str, dict[str, Any]] = {}
    started = time.monotonic()
    with sigterm_as_exit():
        try:
            for name in args.only:
                print(f"== {name}", flush=True)
                t0 = time.monotonic()
                try:
                    scenarios[name] = RUNNERS[name](args)
                except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
                    scenarios[name] = {"error": str(exc)}
                except Exception as exc:
                    scenarios[name] = {"error": repr(exc)[:500]}
                scenarios[name]["elapsed_s"] = time.monotonic() - t0
                if name == "tips":
                    scenarios["tips_peer"] = tips_peer_row(scenarios["tips"])
        except (KeyboardInterrupt, SystemExit):
            print("interrupted", file=sys.stderr)
            return 130
    machine["elapsed_s"] = time.monotonic() - started
    machine["settings"] = {
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "runs": args.runs,
        "quick": args.quick,
    }
    print()
    print(render_table(scenarios))
    print(
        f"\n{machine['elapsed_s']:.0f} s in all; {machine['date_utc']} commit {machine['commit']}"
    )
    if args.json is not None:
        report = {"scenarios": scenarios, "machine": machine}
        args.json.write_text(orjson.dumps(clean_json(report), option=orjson.OPT_INDENT_2).decode())
    return 1 if any("error" in s for s in scenarios.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
