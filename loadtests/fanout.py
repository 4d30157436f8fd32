"""Fan-out benchmark: one room, N members, a few senders at full rate.

It measures tokenchat's room broadcast (``say`` -> Lua XADD + PUBLISH in
Redis -> pub/sub -> hub -> ``websockets.broadcast``) against the ceiling that
DESIGN.md section 2 took its numbers from: a bare ``websockets`` server whose
handler broadcasts every text frame it receives to every connection. Both run
on uvloop, in a process of their own, on 127.0.0.1.

    python -m loadtests.fanout --members 500 --duration 10 --runs 3

How a run goes, for either server:

1. The server is started as a subprocess on free ports (tokenchat with its own
   Redis key prefix, Postgres schema and JWT secret, so it shares Redis and
   Postgres with nothing else) and polled until it answers.
2. Load processes (``--load-procs``, default 2) each open a share of the
   members and, for tokenchat, send ``hello`` and ``join`` the room of the
   model ``bench_model``. The load generator is split over processes so that
   reading N sockets does not queue behind one core of its own; each process
   runs its own uvloop and the minimal WebSocket client of
   ``loadtests.harness.client``, so that reading
   a frame costs little more than the system call that brings it and the
   server, not the load generator, sets the rate.
3. The first ``--senders`` members also send: text of ``--text-bytes`` bytes
   that starts with ``@T<send time, ns>@S<sender>@``. Each sender keeps at most
   ``--window`` messages in flight, a message being in flight until the sender
   sees it come back to itself; that bounds what is queued anywhere (server,
   Redis, sockets) the same way for both servers.
4. After ``--warmup`` seconds, every member counts the events it receives for
   ``--duration`` seconds and the latency of each (receive time minus the send
   time in the text: CLOCK_MONOTONIC is one clock for every process of the
   machine). Then the senders stop, the messages in flight drain, and every
   member reports how many of all sent messages it received (completeness).

Runs alternate tokenchat and baseline so that a drift of the machine hits
both; the table shows medians with the min-max spread of the runs.

"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import math
import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import orjson

from loadtests.harness.cli import (
    DURATION_DEFAULT_S,
    RUNS_DEFAULT,
    WARMUP_DEFAULT_S,
    positive_float,
    positive_int,
)
from loadtests.harness.client import (
    CONNECT_TIMEOUT_S,
    HOST,
    KINDS,
    Kind,
    Member,
    SenderState,
    open_member,
)
from loadtests.harness.processes import (
    FD_HEADROOM,
    SETUP_TIMEOUT_S,
    Bench,
    Server,
    first_error,
    free_port,
    process_tree,
    profile_path,
    raise_open_files_limit,
    recv_from_parent,
    run_load_process,
    run_on_uvloop,
    schedule,
    tcp_answers,
)
from loadtests.harness.report import clean_json, machine_summary, median_range, run_bench
from loadtests.harness.stats import (
    NS_PER_S,
    Stats,
    hist_percentile_ms,
    median_of,
    merge_hists,
    per_run_ratios,
    ratio_of_medians,
    values_of,
)

ROOM = "bench_model"  # the model whose room every member joins
MEMBER_ID_FORMAT = "bench_m{:05d}"  # user ids of the members (and senders)

# --- defaults of the command line ---------------------------------------------
MEMBERS_DEFAULT = 500  # connections, each reading every event
SENDERS_DEFAULT = 4  # of the members, the ones that also send
WINDOW_DEFAULT_MSGS = 8  # per sender: sent but not yet seen back
TEXT_DEFAULT_BYTES = 100  # of each message's text (ASCII)
LOAD_PROCS_DEFAULT = 2  # load-generator processes, each on its own uvloop

# --- bounds: every wait has one ------------------------------------------------
# Members doing their handshake (and hello/join) at once, over all load
# processes: enough to connect 1000 members in a few seconds, and below
# tokenchat's Redis pool (TOKENCHAT_REDIS_POOL_MAX, 64), which redis-py does not
# queue on: command 65 in flight fails at once, and a hello answers UNAVAILABLE.
CONNECT_CONCURRENCY_TOTAL = 32  # connections
# After the senders stop: how long their last messages may take to come back,
# then how long the other members get to read them too.
DRAIN_TIMEOUT_S = 5.0
SETTLE_S = 0.5
# A message not seen back by its sender within this is written off as lost, so
# a lost event costs the sender one window slot for a while, not forever.
SLOT_TIMEOUT_S = 5.0
# A result report from a load process after the "report" request.
REPORT_TIMEOUT_S = 30.0
# Beyond a load process's own bounds (a sender's last slot wait, the drain), for
# it to be scheduled and write to its pipe on a loaded machine.
REPORT_SLACK_S = 5.0


# ============================================================================
# A load process
# ============================================================================


@dataclasses.dataclass(frozen=True, slots=True)
class WorkerSpec:
    kind: Kind
    port: int
    member_indexes: tuple[int, ...]  # global member numbers held by this process
    sender_indexes: tuple[int, ...]  # of those, the ones that also send
    jwt_secret: str
    window_msgs: int
    text_bytes: int
    cpus: frozenset[int] | None  # to pin this process to (None: anywhere)
    connect_concurrency: int  # members set up at once by this process


def message_frame(kind: Kind, sender: SenderState, sequence: int, text_bytes: int) -> bytes:
    """What a sender sends: the text carries the send time and the sender."""
    stamp = b"@T%d" % time.monotonic_ns() + sender.tag
    text = stamp + b"x" * max(0, text_bytes - len(stamp))
    if kind == "tokenchat":
        return orjson.dumps({"type": "say", "id": sequence, "room": ROOM, "text": text.decode()})
    # The baseline relays frames as they are: send it the shape and size of the
    # `message` event tokenchat makes of a `say`, so both deliver the same bytes.
    sender_id = MEMBER_ID_FORMAT.format(sender.index).encode()
    return b"".join(
        (
            b'{"type":"message","room":"',
            ROOM.encode(),
            b'","from":"',
            sender_id,
            b'","text":"',
            text,
            b'","offset":"1700000000000-0","ts":1700000000000}',
        )
    )


async def run_sender(
    kind: Kind, member: Member, sender: SenderState, text_bytes: int, start_ns: int, stop_ns: int
) -> None:
    await asyncio.sleep(max(0.0, (start_ns - time.monotonic_ns()) / NS_PER_S))
    sequence = 0
    while time.monotonic_ns() < stop_ns:
        if member.transport is None or member.transport.is_closing():
            return
        if sender.in_flight >= sender.window:
            sender.slot_free.clear()
            try:
                await asyncio.wait_for(sender.slot_free.wait(), SLOT_TIMEOUT_S)
            except TimeoutError:
                sender.in_flight -= 1
                sender.lost += 1
            continue
        sequence += 1
        sender.in_flight += 1
        sender.sent += 1
        member.send_text(message_frame(kind, sender, sequence, text_bytes))


async def wait_drained(senders: list[SenderState], timeout_s: float) -> None:
    """Until every sender has seen its last message back (or the time is up)."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout_s):
            for sender in senders:
                while sender.in_flight:
                    sender.slot_free.clear()
                    await sender.slot_free.wait()


async def worker_async(spec: WorkerSpec, conn: Connection) -> None:
    stats = Stats()
    senders = {i: SenderState(i, spec.window_msgs) for i in spec.sender_indexes}
    members: list[Member] = []
    gate = asyncio.Semaphore(spec.connect_concurrency)

    async def connect(index: int) -> None:
        async with gate:
            member = await open_member(
                spec.kind,
                spec.port,
                stats,
                user_id=MEMBER_ID_FORMAT.format(index),
                role="fan",
                jwt_secret=spec.jwt_secret,
                room=ROOM,
                sender=senders.get(index),
            )
        members.append(member)

    try:
        try:
            async with asyncio.timeout(SETUP_TIMEOUT_S), asyncio.TaskGroup() as group:
                for index in spec.member_indexes:
                    group.create_task(connect(index))
        except Exception as exc:
            conn.send(("failed", f"connecting members: {first_error(exc)!r}"))
            return
        conn.send(("ready", len(members)))
        _, send_start_ns, window_start_ns, window_end_ns = await recv_from_parent(
            conn, SETUP_TIMEOUT_S
        )
        stats.window_start_ns, stats.window_end_ns = window_start_ns, window_end_ns
        stats.counting = True
        by_index = {m.sender.index: m for m in members if m.sender is not None}
        async with asyncio.TaskGroup() as group:
            for index, sender in senders.items():
                group.create_task(
                    run_sender(
                        spec.kind,
                        by_index[index],
                        sender,
                        spec.text_bytes,
                        send_start_ns,
                        window_end_ns,
                    )
                )
        await wait_drained(list(senders.values()), DRAIN_TIMEOUT_S)
        conn.send(("drained", sum(s.sent for s in senders.values())))
        await recv_from_parent(conn, REPORT_TIMEOUT_S)
        stats.counting = False
        conn.send(
            (
                "result",
                {
                    "members": len(members),
                    "received_total": stats.received_total,
                    "received_in_window": stats.received_in_window,
                    "hist": stats.hist,
                    "errors": stats.errors,
                    "disconnects": stats.disconnects,
                    "setup_retries": stats.setup_retries,
                    "sent": sum(s.sent for s in senders.values()),
                    "lost": sum(s.lost for s in senders.values()),
                },
            )
        )
    finally:
        for member in members:
            member.close()


def worker_main(spec: WorkerSpec, conn: Connection) -> None:
    run_load_process(lambda: worker_async(spec, conn), conn, spec.cpus)


# ============================================================================
# The baseline server
# ============================================================================


async def baseline_serve(port: int) -> None:
    """Every text frame received goes to every connection: one room."""
    from websockets.asyncio.server import ServerConnection, broadcast, serve
    from websockets.exceptions import ConnectionClosed

    connections: set[ServerConnection] = set()

    async def handler(ws: ServerConnection) -> None:
        connections.add(ws)
        try:
            async for message in ws:
                broadcast(connections, message)
        except ConnectionClosed:
            pass  # members leave by dropping TCP at the end of a run
        finally:
            connections.discard(ws)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    # compression=None as in tokenchat's gateway, so both send the same bytes.
    async with serve(handler, HOST, port, compression=None):
        await stop.wait()


# ============================================================================
# The parent: servers, runs, report
# ============================================================================


class FanoutBench(Bench):
    """The fan-out scenario on the harness's ``Bench``: one server at a time,
    tokenchat or the baseline, and the members' load processes."""

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(args, "fanout")

    # --- servers ------------------------------------------------------------------
    def start_server(self, kind: Kind) -> Server:
        if kind == "baseline":
            port = free_port()
            argv = ["-m", "loadtests.fanout", "--serve-baseline", str(port)]
            server = self._spawn(kind, argv, self.env, port)
            self._wait_ready(server, lambda: tcp_answers(port))
            return server
        server, _ = self.start_serve()
        # The room exists once its model has said hello (DESIGN.md section 3).
        asyncio.run(self._model_hello(server.ws_port))
        return server

    async def _model_hello(self, port: int) -> None:
        member = await open_member(
            "tokenchat", port, Stats(), user_id=ROOM, role="model", jwt_secret=self.jwt_secret
        )
        member.close()

    # --- one run ------------------------------------------------------------------
    def run_once(self, kind: Kind, number: int, profile: Path | None) -> dict[str, Any]:
        server = self.start_server(kind)
        try:
            return self._load(kind, number, server, profile)
        finally:
            server.stop()

    def _load(
        self, kind: Kind, number: int, server: Server, profile: Path | None
    ) -> dict[str, Any]:
        args = self.args
        context = multiprocessing.get_context("spawn")
        conns: list[Connection] = []
        procs = min(args.load_procs, args.members)
        for w in range(procs):
            indexes = tuple(range(w, args.members, procs))
            spec = WorkerSpec(
                kind=kind,
                port=server.ws_port,
                member_indexes=indexes,
                sender_indexes=tuple(i for i in indexes if i < args.senders),
                jwt_secret=self.jwt_secret,
                window_msgs=args.window,
                text_bytes=args.text_bytes,
                cpus=self.loadgen_cpus,
                connect_concurrency=max(1, CONNECT_CONCURRENCY_TOTAL // procs),
            )
            conns.append(self._start_worker(context, worker_main, spec, f"load-{w}"))
        try:
            ready = self._gather(conns, "ready", SETUP_TIMEOUT_S + CONNECT_TIMEOUT_S, server)
            connected = sum(int(value) for value in ready)
            send_start_ns, window_start_ns, window_end_ns = schedule(args.warmup, args.duration)
            for conn in conns:
                conn.send(("go", send_start_ns, window_start_ns, window_end_ns))
            cpu = self._sample_cpu(server, window_start_ns, window_end_ns, profile)
            wait_s = (window_end_ns - time.monotonic_ns()) / NS_PER_S
            drained_s = wait_s + SLOT_TIMEOUT_S + DRAIN_TIMEOUT_S + REPORT_SLACK_S
            self._gather(conns, "drained", drained_s, server)
            time.sleep(SETTLE_S)
            for conn in conns:
                conn.send(("report",))
            reports = self._gather(conns, "result", REPORT_TIMEOUT_S, server)
        finally:
            self._stop_workers()
            for conn in conns:
                conn.close()
        return summarize_run(kind, number, connected, args.duration, reports, cpu)

    def _sample_cpu(
        self, server: Server, start_ns: int, end_ns: int, profile: Path | None
    ) -> dict[str, float | None]:
        """CPU use (% of one core) of server, Redis and load generator in the window."""
        pids: dict[str, list[int]] = {
            "server": process_tree(server.process.pid),
            "redis": self.redis_pids() if server.kind == "tokenchat" else [],
            "loadgen": self.loadgen_pids(),
        }
        return self.measure_cpu(server, pids, start_ns, end_ns, profile)


# --- figures ----------------------------------------------------------------------


def summarize_run(
    kind: Kind,
    number: int,
    connected: int,
    duration_s: float,
    reports: list[dict[str, Any]],
    cpu: dict[str, float | None],
) -> dict[str, Any]:
    hist = merge_hists([r["hist"] for r in reports])
    sent = sum(r["sent"] for r in reports)
    received_total = sum(r["received_total"] for r in reports)
    in_window = sum(r["received_in_window"] for r in reports)
    return {
        "run": number,
        "server": kind,
        "members": connected,
        "deliveries_per_s": in_window / duration_s,
        "messages_per_s": in_window / duration_s / max(connected, 1),
        "p50_ms": hist_percentile_ms(hist, 0.50),
        "p99_ms": hist_percentile_ms(hist, 0.99),
        "sent": sent,
        # Of every message sent, the share of members that received it.
        "complete": received_total / (sent * connected) if sent and connected else math.nan,
        "lost": sum(r["lost"] for r in reports),
        "errors": sum(r["errors"] for r in reports),
        "disconnects": sum(r["disconnects"] for r in reports),
        "setup_retries": sum(r["setup_retries"] for r in reports),
        "cpu_server_pct": cpu["server"],
        "cpu_redis_pct": cpu["redis"],
        "cpu_loadgen_pct": cpu["loadgen"],
        "cpu_other_pct": cpu["other"],
        "cpu_irq_pct": cpu["irq"],
    }


ROWS: tuple[tuple[str, str, str], ...] = (
    ("deliveries_per_s", "deliveries/s", "{:,.0f}"),
    ("messages_per_s", "messages/s", "{:,.1f}"),
    ("p50_ms", "latency p50 ms", "{:.1f}"),
    ("p99_ms", "latency p99 ms", "{:.1f}"),
    ("complete", "complete", "{:.2%}"),
    ("cpu_server_pct", "server CPU %", "{:.0f}"),
    ("cpu_redis_pct", "redis CPU %", "{:.0f}"),
    ("cpu_loadgen_pct", "loadgen CPU %", "{:.0f}"),
    ("cpu_irq_pct", "irq+softirq CPU %", "{:.0f}"),
    ("cpu_other_pct", "other procs CPU %", "{:.0f}"),
)


def render_table(args: argparse.Namespace, runs: list[dict[str, Any]]) -> str:
    def cell(kind: Kind, key: str, fmt: str) -> str:
        return median_range(values_of(runs, "server", kind, key), fmt)

    lines = [
        f"fan-out: {args.members} members, {args.senders} senders x {args.window} in flight, "
        f"{args.text_bytes}-byte texts, {args.runs} run(s) x {args.duration:g} s "
        f"(after {args.warmup:g} s warm-up), {args.load_procs} load processes, "
        f"{os.cpu_count()} CPUs{', server pinned to its own CPU' if args.pin else ''}",
        "median (min-max over runs)",
        f"{'':<18} {'tokenchat':<30} baseline (bare websockets)",
    ]
    for key, label, fmt in ROWS:
        lines.append(f"{label:<18} {cell('tokenchat', key, fmt):<30} {cell('baseline', key, fmt)}")
    pairs = per_run_ratios(runs, "server", "tokenchat", "baseline", "deliveries_per_s")
    ratio = ratio_of(runs)
    lines.append(
        f"ratio tokenchat/baseline (deliveries/s, medians): {ratio:.2f}"
        f"   per run: {' '.join(f'{p:.2f}' for p in pairs)}"
    )
    keys = ("lost", "errors", "disconnects", "setup_retries")
    if any(r[key] for r in runs for key in keys):
        lines.append(
            f"{'/'.join(keys)} per run: "
            + ", ".join(
                f"{r['server']}#{r['run']}: {'/'.join(str(r[key]) for key in keys)}" for r in runs
            )
        )
    return "\n".join(lines)


def ratio_of(runs: list[dict[str, Any]]) -> float:
    return ratio_of_medians(runs, "server", "tokenchat", "baseline", "deliveries_per_s")


def report_json(args: argparse.Namespace, runs: list[dict[str, Any]]) -> dict[str, Any]:
    fanout = {
        "value": median_of(runs, "server", "tokenchat", "deliveries_per_s"),
        "unit": "deliveries/s",
        "baseline": median_of(runs, "server", "baseline", "deliveries_per_s"),
        "ratio": ratio_of(runs),
        "p50_ms": median_of(runs, "server", "tokenchat", "p50_ms"),
        "p99_ms": median_of(runs, "server", "tokenchat", "p99_ms"),
        "baseline_p50_ms": median_of(runs, "server", "baseline", "p50_ms"),
        "baseline_p99_ms": median_of(runs, "server", "baseline", "p99_ms"),
        "members": args.members,
        "senders": args.senders,
        "window_msgs": args.window,
        "text_bytes": args.text_bytes,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "load_procs": args.load_procs,
        "pinned": args.pin,
        "runs": runs,
    }
    return {"scenarios": {"fanout": clean_json(fanout)}, "machine": machine_summary()}


# ============================================================================
# Command line
# ============================================================================


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.fanout", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--members", type=positive_int, default=MEMBERS_DEFAULT)
    parser.add_argument(
        "--duration",
        type=positive_float,
        default=DURATION_DEFAULT_S,
        help="measured seconds per run and server",
    )
    parser.add_argument("--runs", type=positive_int, default=RUNS_DEFAULT)
    parser.add_argument("--warmup", type=float, default=WARMUP_DEFAULT_S, help="seconds")
    parser.add_argument("--senders", type=positive_int, default=SENDERS_DEFAULT)
    parser.add_argument(
        "--window",
        type=positive_int,
        default=WINDOW_DEFAULT_MSGS,
        help="messages in flight per sender",
    )
    parser.add_argument("--text-bytes", type=positive_int, default=TEXT_DEFAULT_BYTES)
    parser.add_argument("--load-procs", type=positive_int, default=LOAD_PROCS_DEFAULT)
    parser.add_argument(
        "--workers", type=positive_int, default=1, help="tokenchat serve --workers (default 1)"
    )
    parser.add_argument("--only", choices=KINDS, help="measure one server only")
    parser.add_argument(
        "--one-port",
        action="store_true",
        help="tokenchat in one-port mode (WebSocket at /ws on the HTTP port)",
    )
    parser.add_argument(
        "--pin",
        action="store_true",
        help="pin the server to the first CPU and the load processes to the others",
    )
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument(
        "--profile",
        type=Path,
        help="py-spy each server during the first run's measurement, into this path with "
        "the server's name before the suffix (.svg flame graph, .json speedscope, "
        "else py-spy's raw stacks, summarized on stdout)",
    )
    parser.add_argument("--serve-baseline", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.senders > args.members:
        parser.error("--senders must not exceed --members")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    if args.pin and len(os.sched_getaffinity(0)) < 2:
        parser.error("--pin needs at least 2 CPUs")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    open_files_max = raise_open_files_limit()
    if args.serve_baseline is not None:
        run_on_uvloop(lambda: baseline_serve(args.serve_baseline))
        return 0
    # The server holds a socket per member; fail now rather than mid-run.
    if open_files_max < args.members + FD_HEADROOM:
        print(
            f"open files limit {open_files_max} is too low for {args.members} members; "
            f"raise `ulimit -n` to at least {args.members + FD_HEADROOM}",
            file=sys.stderr,
        )
        return 2
    kinds: tuple[Kind, ...] = (args.only,) if args.only else KINDS

    def measure(bench: FanoutBench) -> list[dict[str, Any]]:
        runs: list[dict[str, Any]] = []
        for number in range(1, args.runs + 1):
            for kind in kinds:
                profile = None
                if args.profile is not None and number == 1:
                    profile = profile_path(args.profile, kind)
                run = bench.run_once(kind, number, profile)
                runs.append(run)
                print(
                    f"run {number} {kind:<9} {run['deliveries_per_s']:>10,.0f} deliveries/s"
                    f"  p50 {run['p50_ms']:.1f} ms  p99 {run['p99_ms']:.1f} ms"
                    f"  complete {run['complete']:.2%}",
                    flush=True,
                )
        return runs

    return run_bench(args, FanoutBench(args), measure, render_table, report_json)


if __name__ == "__main__":
    sys.exit(main())
