"""Reconnect benchmark: N open sockets say hello at once to a fresh process.

After a restart or a deploy, every client of a process reconnects and says
hello within a second or two; until its welcome, a user sees nothing. This
measures how long a freshly started ``tokenchat serve`` takes to welcome them
all (issue #14, goal 4: 10,000 sessions within 2 s):

    python -m loadtests.reconnect --sessions 10000 --runs 3

First (run 0, not in the medians) every user says a first hello, which
creates her in Postgres and loads her balance and limits into Redis: what a
restart finds. Then each run measures, in this order, each on a freshly
started server:

- ``connect+hello`` (tokenchat): N clients each open a socket and say hello at
  once, ``--connect-concurrency`` at a time over all load processes; from the
  first connect to the last welcome.
- ``reconnect`` (tokenchat): N sockets are opened first (handshake only, the
  hello timeout raised so they may wait), then every socket sends its hello
  at once; from the first ``hello`` sent to the last ``welcome`` received
  (CLOCK_MONOTONIC, one clock for every process of the machine).
- ``connect`` (baseline): the same N sockets opened, with the same
  concurrency, to a bare ``websockets`` server (``loadtests.fanout``'s): what
  connecting alone costs, beside tokenchat's connect+hello.

tokenchat runs twice per run: with hello batching as configured
(``batched``) and with ``TOKENCHAT_HELLO_BATCH_MAX=1`` (``unbatched``: every
hello alone, through the same code), and with ``--before-python PYTHON`` a
third time, served by another checkout (``before``: the code before
batching, such as main's), interleaved so that a drift of the shared machine
hits all of them. A hello answered UNAVAILABLE is sent again (as a client
would, counted as a retry); one refused otherwise fails the run's figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import math
import multiprocessing
import signal
import sys
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Literal

from loadtests import fanout
from loadtests.harness.cli import positive_int
from loadtests.harness.client import (
    CONNECT_TIMEOUT_S,
    HOST,
    JSON_SUBPROTOCOL,
    SETUP_ATTEMPTS_MAX,
    SETUP_RETRY_DELAY_S,
    Kind,
    Member,
)
from loadtests.harness.processes import (
    CLOCK_TICKS_PER_S,
    FD_HEADROOM,
    Server,
    cpu_ticks,
    finish_py_spy,
    first_error,
    process_tree,
    profile_path,
    raise_open_files_limit,
    recv_from_parent,
    run_load_process,
    start_py_spy,
)
from loadtests.harness.report import clean_json, machine_summary, median_range, run_bench
from loadtests.harness.stats import NS_PER_S, Stats, median

Variant = Literal["batched", "unbatched", "before", "baseline"]
VARIANTS: tuple[Variant, ...] = ("batched", "unbatched", "before", "baseline")
Phase = Literal["reconnect", "connect_hello", "connect"]

USER_ID_FORMAT = "reconnect_u{:05d}"

# --- defaults of the command line ---------------------------------------------
SESSIONS_DEFAULT = 10_000  # the issue's figure
RUNS_DEFAULT = 3
LOAD_PROCS_DEFAULT = 2  # load processes, each on its own uvloop
# Sockets opening at once over all load processes, for every server alike:
# below asyncio's listen backlog (100), so the kernel's accept queue never
# drops a SYN and the figure is the server's, not the SYN retransmission
# timer's (at 256, a loaded server let a few connects pass 15 s).
CONNECT_CONCURRENCY_DEFAULT = 64

# --- bounds: every wait has one ------------------------------------------------
# Sockets opened before any hello must outlive the contract's 10 s hello
# timeout: opening 10,000 takes a few seconds on a busy machine.
HELLO_TIMEOUT_RAISED_S = 120.0
OPEN_TIMEOUT_S = 120.0  # every socket of a load process open
HELLOS_TIMEOUT_S = 120.0  # every hello of a load process answered
# The parent names a start this far ahead, so that every load process's first
# hello leaves at the same moment.
GO_AHEAD_S = 0.3
# A measured phase's py-spy recording (--profile): longer than the slowest
# unbatched reconnect seen here (~18 s for 10,000), ended with the phase.
PROFILE_MAX_S = 60.0


@dataclasses.dataclass(frozen=True, slots=True)
class Spec:
    kind: Kind
    phase: Phase
    port: int
    indexes: tuple[int, ...]
    jwt_secret: str
    concurrency: int


class StampedMember(Member):
    """A member that stamps when its last reply arrived (the read's clock)."""

    reply_ns = 0

    def _on_text(self, buf: bytearray, start: int, end: int, now_ns: int) -> None:
        self.reply_ns = now_ns
        super()._on_text(buf, start, end, now_ns)


async def _open(spec: Spec, stats: Stats) -> StampedMember:
    subprotocol = JSON_SUBPROTOCOL if spec.kind == "tokenchat" else None
    _, member = await asyncio.get_running_loop().create_connection(
        lambda: StampedMember(spec.port, subprotocol, stats), HOST, spec.port
    )
    await member.opened
    return member


async def _hello(member: StampedMember, token: str, stats: Stats) -> int:
    """Hello until welcomed (UNAVAILABLE is retried, as a client would);
    the monotonic ns of the welcome."""
    reply: dict[str, Any] = {}
    for attempt in range(SETUP_ATTEMPTS_MAX):
        reply = await member.request({"type": "hello", "token": token, "id": attempt + 1})
        if reply.get("type") == "welcome":
            return member.reply_ns
        if reply.get("code") != "UNAVAILABLE":
            break
        stats.setup_retries += 1
        await asyncio.sleep(SETUP_RETRY_DELAY_S * 2**attempt)
    raise RuntimeError(f"hello refused: {reply}")


async def worker_async(spec: Spec, conn: Connection) -> None:
    from tokenchat.server.auth import issue_token

    stats = Stats()
    members: list[StampedMember] = []
    failures: dict[str, int] = {}
    gate = asyncio.Semaphore(spec.concurrency)
    tokens = {
        index: issue_token(spec.jwt_secret, USER_ID_FORMAT.format(index), "fan")
        for index in spec.indexes
    }
    done_ns: list[int] = []

    def failed(exc: BaseException) -> None:
        name = repr(first_error(exc))[:120]
        failures[name] = failures.get(name, 0) + 1

    async def connect(index: int, hello: bool) -> None:
        async with gate:
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT_S):
                    member = await _open(spec, stats)
                    members.append(member)
                    if hello:
                        done_ns.append(await _hello(member, tokens[index], stats))
                    else:
                        done_ns.append(time.monotonic_ns())
            except Exception as exc:
                failed(exc)

    try:
        if spec.phase == "reconnect":
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(OPEN_TIMEOUT_S):
                    await asyncio.gather(*(connect(i, False) for i in spec.indexes))
            by_index = dict(zip(spec.indexes, members, strict=False))
            conn.send(("ready", {"opened": len(members), "failures": dict(failures)}))
            _, start_ns = await recv_from_parent(conn, OPEN_TIMEOUT_S)
            await asyncio.sleep(max(0.0, (start_ns - time.monotonic_ns()) / NS_PER_S))
            done_ns.clear()
            first_ns = time.monotonic_ns()

            async def hello(index: int, member: StampedMember) -> None:
                try:
                    done_ns.append(await _hello(member, tokens[index], stats))
                except Exception as exc:
                    failed(exc)

            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(HELLOS_TIMEOUT_S):
                    await asyncio.gather(*(hello(i, m) for i, m in by_index.items()))
        else:
            _, start_ns = await recv_from_parent(conn, OPEN_TIMEOUT_S)
            await asyncio.sleep(max(0.0, (start_ns - time.monotonic_ns()) / NS_PER_S))
            first_ns = time.monotonic_ns()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(OPEN_TIMEOUT_S + HELLOS_TIMEOUT_S):
                    await asyncio.gather(
                        *(connect(i, spec.phase == "connect_hello") for i in spec.indexes)
                    )
        conn.send(
            (
                "result",
                {
                    "first_ns": first_ns,
                    "last_ns": max(done_ns, default=0),
                    "done": len(done_ns),
                    "failures": failures,
                    "retries": stats.setup_retries,
                },
            )
        )
        await recv_from_parent(conn, OPEN_TIMEOUT_S)  # "stop": the parent has read the server
    finally:
        for member in members:
            member.close()


def worker_main(spec: Spec, conn: Connection) -> None:
    run_load_process(lambda: worker_async(spec, conn), conn, None)


# `python -c EXEC_OTHER PYTHON -m tokenchat.server.cli ...` becomes, in the
# same process (same pid: stopped and profiled like any server), PYTHON
# running the server of the checkout PYTHON's environment installed.
EXEC_OTHER = "import os, sys; os.execv(sys.argv[1], sys.argv[1:])"


class ReconnectBench(fanout.FanoutBench):
    """One server at a time (fresh for every phase) and the load processes."""

    serve_python: str | None = None  # set while the `before` variant starts

    def start_variant(self, variant: Variant) -> Server:
        if variant == "baseline":
            return self.start_server("baseline")
        env = {"TOKENCHAT_HELLO_TIMEOUT_S": str(HELLO_TIMEOUT_RAISED_S)}
        if variant == "unbatched":
            env["TOKENCHAT_HELLO_BATCH_MAX"] = "1"
        self.serve_python = self.args.before_python if variant == "before" else None
        try:
            server, _ = self.start_serve(**env)
        finally:
            self.serve_python = None
        return server

    def _spawn(self, kind: str, argv: list[str], env: dict[str, str], ws_port: int) -> Server:
        if self.serve_python is not None:
            argv = ["-c", EXEC_OTHER, self.serve_python, *argv]
        return super()._spawn(kind, argv, env, ws_port)

    def run_phase(
        self, variant: Variant, phase: Phase, sessions: int, profile: Path | None
    ) -> dict[str, Any]:
        args = self.args
        server = self.start_variant(variant)
        kind: Kind = "baseline" if variant == "baseline" else "tokenchat"
        conns: list[Connection] = []
        spy = None
        try:
            context = multiprocessing.get_context("spawn")
            procs = min(args.load_procs, sessions)
            for w in range(procs):
                spec = Spec(
                    kind=kind,
                    phase=phase,
                    port=server.ws_port,
                    indexes=tuple(range(w, sessions, procs)),
                    jwt_secret=self.jwt_secret,
                    concurrency=max(1, args.connect_concurrency // procs),
                )
                conns.append(self._start_worker(context, worker_main, spec, f"{phase}-{w}"))
            opened = sessions
            open_s = math.nan
            if phase == "reconnect":
                started = time.monotonic()
                ready = self._gather(conns, "ready", OPEN_TIMEOUT_S + 30, server)
                open_s = time.monotonic() - started
                opened = sum(r["opened"] for r in ready)
            start_ns = time.monotonic_ns() + int(GO_AHEAD_S * NS_PER_S)
            if profile is not None:
                spy = start_py_spy(server.process.pid, PROFILE_MAX_S, profile)
            # The server's CPU from "go" to the last result: what the hellos
            # cost it (its own process tree; the load processes not counted).
            tree = process_tree(server.process.pid)
            ticks_before = cpu_ticks(tree)
            for conn in conns:
                conn.send(("go", start_ns))
            results = self._gather(conns, "result", OPEN_TIMEOUT_S + HELLOS_TIMEOUT_S + 30, server)
            ticks_after = cpu_ticks(tree)
        finally:
            if spy is not None:
                # py-spy stops and writes what it recorded on SIGINT, as on Ctrl-C.
                spy.send_signal(signal.SIGINT)
                finish_py_spy(spy, profile)
            for conn in conns:
                with contextlib.suppress(OSError):
                    conn.send(("stop",))
            self._stop_workers()
            for conn in conns:
                conn.close()
            server.stop()
        failures: dict[str, int] = {}
        for r in results:
            for name, count in r["failures"].items():
                failures[name] = failures.get(name, 0) + count
        done = sum(r["done"] for r in results)
        first_ns = min(r["first_ns"] for r in results)
        last_ns = max(r["last_ns"] for r in results)
        complete = done == sessions and not failures
        return {
            "variant": variant,
            "phase": phase,
            "sessions": sessions,
            "opened": opened,
            "open_s": open_s,
            "done": done,
            "failures": failures,
            "retries": sum(r["retries"] for r in results),
            # Only a phase in which every session got through has a time.
            "seconds": (last_ns - first_ns) / NS_PER_S if complete else math.nan,
            # CPU of the server per session of the phase (us): per hello, or
            # per connect+hello; NaN where a process was gone before it was read.
            "server_cpu_us_per_session": (
                (ticks_after - ticks_before) / CLOCK_TICKS_PER_S / sessions * 1e6
                if ticks_before is not None and ticks_after is not None
                else math.nan
            ),
        }


PHASES: tuple[tuple[Variant, Phase], ...] = (
    ("batched", "connect_hello"),
    ("batched", "reconnect"),
    ("before", "connect_hello"),
    ("before", "reconnect"),
    ("unbatched", "connect_hello"),
    ("unbatched", "reconnect"),
    ("baseline", "connect"),
)


def measure(bench: ReconnectBench) -> list[dict[str, Any]]:
    args = bench.args
    variants = [v for v in args.variants if v != "before" or args.before_python]
    wanted = [(v, p) for v, p in PHASES if v in variants]
    runs: list[dict[str, Any]] = []
    if any(variant != "baseline" for variant, _ in wanted):
        # Users created by a first hello, their balances and limits in Redis:
        # every measured phase then finds what a restart finds. Run 0, left
        # out of the medians (first hellos are another figure).
        prime = bench.run_phase("batched", "connect_hello", args.sessions, None)
        prime["run"] = 0
        runs.append(prime)
        print(
            f"run 0 (users' first hellos, not in the medians) {prime['seconds']:.2f} s"
            f" ({prime['done']:,} of {prime['sessions']:,})",
            flush=True,
        )
    for number in range(1, args.runs + 1):
        for variant, phase in wanted:
            profile = None
            if args.profile is not None and number == 1 and variant != "baseline":
                profile = profile_path(args.profile, f"{variant}-{phase}")
            run = bench.run_phase(variant, phase, args.sessions, profile)
            run["run"] = number
            runs.append(run)
            print(
                f"run {number} {variant:<9} {phase:<13} {run['seconds']:6.2f} s"
                f"  ({run['done']:,} of {run['sessions']:,}"
                + (f", sockets opened in {run['open_s']:.1f} s" if phase == "reconnect" else "")
                + (f", {run['retries']} retries" if run["retries"] else "")
                + (f", failures {run['failures']}" if run["failures"] else "")
                + ")",
                flush=True,
            )
    return runs


def _values(runs: list[dict[str, Any]], variant: str, phase: str) -> list[float]:
    return [
        r["seconds"]
        for r in runs
        if r["variant"] == variant and r["phase"] == phase and r["run"] > 0
    ]


def figure(runs: list[dict[str, Any]], variant: str, phase: str) -> float:
    return median(_values(runs, variant, phase))


def render_table(args: argparse.Namespace, runs: list[dict[str, Any]]) -> str:
    lines = [
        f"reconnect: {args.sessions:,} sessions, {args.runs} run(s), {args.load_procs} load"
        f" processes, {args.connect_concurrency} connecting at once",
        "seconds, median (min-max over runs)",
        f"{'':<20} {'batched':<20} {'before':<20} {'unbatched':<20} baseline (bare websockets)",
    ]
    for phase, label in (("reconnect", "all hello at once"), ("connect_hello", "connect+hello")):
        cells = [
            median_range(_values(runs, v, phase), "{:.2f}")
            for v in ("batched", "before", "unbatched")
        ]
        base = median_range(_values(runs, "baseline", "connect"), "{:.2f}")
        lines.append(
            f"{label:<20} {cells[0]:<20} {cells[1]:<20} {cells[2]:<20}"
            f" {base if phase != 'reconnect' else '-'}"
        )
    baseline = figure(runs, "baseline", "connect")
    for variant in ("batched", "before", "unbatched"):
        value = figure(runs, variant, "connect_hello")
        if not math.isnan(value) and baseline:
            lines.append(f"connect+hello / bare connect ({variant}): {value / baseline:.2f}")
    batched, unbatched = (
        figure(runs, "batched", "reconnect"),
        figure(runs, "unbatched", "reconnect"),
    )
    before = figure(runs, "before", "reconnect")
    for name, value in (("unbatched", unbatched), ("before", before)):
        if not math.isnan(batched) and not math.isnan(value):
            lines.append(f"reconnect {name} / batched: {value / batched:.2f}")
    return "\n".join(lines)


def report_json(args: argparse.Namespace, runs: list[dict[str, Any]]) -> dict[str, Any]:
    baseline = figure(runs, "baseline", "connect")
    connect_hello = figure(runs, "batched", "connect_hello")
    row = {
        "value": figure(runs, "batched", "reconnect"),
        "unit": "s to welcome every session",
        # Beside it, connecting alone to the bare server; the ratio compares
        # like with like: connect+hello over connect.
        "baseline": baseline,
        "ratio": connect_hello / baseline if baseline else math.nan,
        "p50_ms": None,
        "p99_ms": None,
        "connect_hello_s": connect_hello,
        "unbatched_s": figure(runs, "unbatched", "reconnect"),
        "unbatched_connect_hello_s": figure(runs, "unbatched", "connect_hello"),
        "before_s": figure(runs, "before", "reconnect"),
        "before_connect_hello_s": figure(runs, "before", "connect_hello"),
        "before_python": args.before_python,
        # The server's CPU per hello in the reconnect phase (us; median).
        "server_cpu_us_per_hello": median(
            [
                r["server_cpu_us_per_session"]
                for r in runs
                if r["variant"] == "batched" and r["phase"] == "reconnect" and r["run"] > 0
            ]
        ),
        "sessions": args.sessions,
        "load_procs": args.load_procs,
        "connect_concurrency": args.connect_concurrency,
        "runs": runs,
    }
    return {"scenarios": {"reconnect": clean_json(row)}, "machine": machine_summary()}


def variant_list(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown {unknown}; choose from {', '.join(VARIANTS)}")
    return names


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.reconnect", description=(__doc__ or "").split("\n\n")[0]
    )
    parser.add_argument("--sessions", type=positive_int, default=SESSIONS_DEFAULT)
    parser.add_argument("--runs", type=positive_int, default=RUNS_DEFAULT)
    parser.add_argument("--load-procs", type=positive_int, default=LOAD_PROCS_DEFAULT)
    parser.add_argument(
        "--connect-concurrency", type=positive_int, default=CONNECT_CONCURRENCY_DEFAULT
    )
    parser.add_argument(
        "--variants",
        type=variant_list,
        default=list(VARIANTS),
        help=f"comma-separated subset of {','.join(VARIANTS)}",
    )
    parser.add_argument(
        "--workers", type=positive_int, default=1, help="tokenchat serve --workers (default 1)"
    )
    parser.add_argument(
        "--before-python",
        metavar="PYTHON",
        help="the `before` variant: tokenchat served by this interpreter, i.e. the checkout "
        "its environment installed (such as main's .venv/bin/python), beside this one",
    )
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument(
        "--profile",
        type=Path,
        help="py-spy tokenchat during each phase of run 1, into this path with the variant "
        "and phase before the suffix (.svg, .json, else raw, summarized)",
    )
    return parser.parse_args(argv)


def fanout_args(args: argparse.Namespace) -> argparse.Namespace:
    """What the fan-out bench this one extends reads of its arguments."""
    fargs = fanout.parse_args(["--members", str(args.sessions), "--workers", str(args.workers)])
    for name, value in vars(args).items():
        setattr(fargs, name, value)
    return fargs


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    open_files_max = raise_open_files_limit()
    # The server holds a socket per session; fail now rather than mid-run.
    if open_files_max < args.sessions + FD_HEADROOM:
        print(
            f"open files limit {open_files_max} is too low for {args.sessions} sessions; "
            f"raise `ulimit -n` to at least {args.sessions + FD_HEADROOM}",
            file=sys.stderr,
        )
        return 2
    fargs = fanout_args(args)
    return run_bench(fargs, ReconnectBench(fargs), measure, render_table, report_json)


if __name__ == "__main__":
    sys.exit(main())
