"""The evening scenario (``loadtests/locust_evening.py``) run headless against
a server of its own, with its figures per task and the books checked after.

    python -m loadtests.evening --users 500 --spawn-rate 50 --run-time 60

It starts ``tokenchat serve`` as the benchmarks do (``loadtests.harness``:
free ports of 127.0.0.1, a Redis key prefix, a Postgres schema and a JWT
secret of its own, all removed at the end; the ledger writer inside
``serve``), runs ``locust -f loadtests/locust_evening.py --headless`` against
it for ``--run-time`` seconds with ``--users`` users (``--models`` of them
models), samples the CPU of the server, Redis, Postgres and locust over the
run after its ramp-up, and then asks ``GET /v1/admin/reconcile`` whether
Redis and the Postgres ledger agree. It prints, per row of locust's table
(``WS tip``, ``WS say``, ``POST /v1/admin/credits (fund)``, ...), the
requests, failures, requests/s and p50/p99 in ms, the failures by error, and
the locustfile's ``tokenchat counters`` line; ``--json`` writes them.

Exit code: 0 when locust ran to its end, every row is free of failures and
reconcile said ok; 1 otherwise (the table says what).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loadtests.harness.cli import positive_float, positive_int
from loadtests.harness.client import HOST
from loadtests.harness.processes import (
    REPO_ROOT,
    Bench,
    http_json,
    process_tree,
    raise_open_files_limit,
    sample_cpu,
)
from loadtests.harness.report import clean_json, machine_summary
from loadtests.harness.stats import NS_PER_S

LOCUSTFILE = REPO_ROOT / "loadtests" / "locust_evening.py"
USERS_DEFAULT = 500  # models included
# Users started per second. An evening's audience arrives over minutes; at
# 50/s on a busy 2-CPU machine the burst of hellos (a Postgres upsert each)
# queued past the 5-s reply timeout, so the ramp-up, not the evening, filled
# every row's tail (docs/benchmarks.md, "The evening scenario").
SPAWN_RATE_DEFAULT = 10.0  # users/s
RUN_TIME_DEFAULT_S = 60.0
MODELS_DEFAULT = 10  # rooms
USER_PREFIX = "ev"  # user ids: ev_model000, ev_<run tag>_viewer00001, ...

# --- bounds ------------------------------------------------------------------------
# locust's own stop: users finish their task within this after --run-time.
LOCUST_STOP_TIMEOUT_S = 10
# Start-up (imports, rooms, menus and photos created) and shutdown, on top of
# --run-time, before the locust process is killed.
LOCUST_SLACK_S = 120.0
# /v1/admin/reconcile drains the outbox for up to 10 s, then reads every balance.
RECONCILE_TIMEOUT_S = 60.0
# The CPU window ends this long before --run-time does, so that locust's stop
# (users leaving) is not in it.
CPU_WINDOW_TAIL_S = 1.0
COUNTERS_MARK = "tokenchat counters: "


def read_stats(csv_prefix: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Locust's ``_stats.csv`` rows (the ``Aggregated`` one last) and
    ``_failures.csv`` rows, as numbers where they are numbers."""
    rows: list[dict[str, Any]] = []
    with open(f"{csv_prefix}_stats.csv", newline="") as f:
        for line in csv.DictReader(f):
            rows.append(
                {
                    "type": line["Type"],
                    "name": line["Name"],
                    "requests": int(line["Request Count"]),
                    "failures": int(line["Failure Count"]),
                    "per_s": float(line["Requests/s"]),
                    # Locust writes "N/A" for a percentile of no requests.
                    "p50_ms": _number(line["50%"]),
                    "p99_ms": _number(line["99%"]),
                }
            )
    failures: list[dict[str, Any]] = []
    with open(f"{csv_prefix}_failures.csv", newline="") as f:
        for line in csv.DictReader(f):
            failures.append(
                {
                    "type": line["Method"],
                    "name": line["Name"],
                    "error": line["Error"],
                    "occurrences": int(line["Occurrences"]),
                }
            )
    return rows, failures


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def run(args: argparse.Namespace, bench: Bench) -> dict[str, Any]:
    from tokenchat.server.auth import issue_token

    server, http_port = bench.start_serve()
    with tempfile.TemporaryDirectory(prefix="tokenchat-evening-") as tmp:
        csv_prefix = Path(tmp) / "evening"
        log_path = Path(tmp) / "locust.log"
        command = [
            sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
            "-u", str(args.users), "-r", str(args.spawn_rate), "-t", f"{args.run_time:g}s",
            "--stop-timeout", str(LOCUST_STOP_TIMEOUT_S),
            "--host", f"http://{HOST}:{http_port}",
            "--tc-ws-port", str(server.ws_port),
            "--tc-models", str(args.models),
            "--tc-prefix", USER_PREFIX,
            "--csv", str(csv_prefix),
        ]  # fmt: skip
        if args.weights:
            command += ["--tc-evening-weights", args.weights]
        if args.reply_timeout is not None:
            command += ["--tc-reply-timeout", f"{args.reply_timeout:g}"]
        print(f"$ {' '.join(command[1:])}", flush=True)
        ramp_s = args.users / args.spawn_rate
        started_ns = time.monotonic_ns()
        window_start_ns = started_ns + int(min(ramp_s, args.run_time / 2) * NS_PER_S)
        window_end_ns = started_ns + int((args.run_time - CPU_WINDOW_TAIL_S) * NS_PER_S)
        with open(log_path, "wb") as log:
            locust = subprocess.Popen(
                command, cwd=REPO_ROOT, env=bench.env, stdout=log, stderr=subprocess.STDOUT
            )
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                pids = {
                    "server": process_tree(server.process.pid),
                    "redis": bench.redis_pids(),
                    "locust": process_tree(locust.pid),
                }
                cpu_future = (
                    pool.submit(sample_cpu, pids, window_start_ns, window_end_ns, postgres=True)
                    if window_end_ns > window_start_ns
                    else None
                )
                try:
                    exit_code = locust.wait(args.run_time + LOCUST_SLACK_S)
                except subprocess.TimeoutExpired:
                    locust.kill()
                    exit_code = locust.wait()
                cpu = cpu_future.result() if cpu_future is not None else {}
        log_text = log_path.read_text(errors="replace")
        try:
            rows, failures = read_stats(csv_prefix)
        except FileNotFoundError:
            print(log_text[-4000:], file=sys.stderr)
            raise RuntimeError(f"locust wrote no statistics (exit code {exit_code})") from None
    counters = ""
    for line in log_text.splitlines():
        if COUNTERS_MARK in line:
            counters = line.split(COUNTERS_MARK, 1)[1].strip()
    admin = issue_token(bench.jwt_secret, f"{USER_PREFIX}_reconciler", "admin")
    status, reconcile = http_json(
        f"http://{HOST}:{http_port}/v1/admin/reconcile", admin, timeout_s=RECONCILE_TIMEOUT_S
    )
    server.stop()
    errors = [line for line in log_text.splitlines() if "Traceback" in line or " ERROR/" in line]
    return {
        "users": args.users,
        "models": args.models,
        "spawn_rate": args.spawn_rate,
        "run_time_s": args.run_time,
        "weights": args.weights or "default",
        "locust_exit_code": exit_code,
        "rows": rows,
        "failures": failures,
        "counters": counters,
        "locust_errors": errors[:10],
        "reconcile_ok": status == 200
        and isinstance(reconcile, dict)
        and reconcile.get("ok") is True,
        "reconcile": reconcile,
        "cpu_pct": cpu,
    }


def render(result: dict[str, Any]) -> str:
    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:,.0f}"

    lines = [
        f"evening: {result['users']} users ({result['models']} models), "
        f"{result['spawn_rate']:g}/s started, {result['run_time_s']:g} s, weights "
        f"{result['weights']}",
        f"{'type':<8} {'name':<44} {'requests':>9} {'failures':>9} {'req/s':>8} "
        f"{'p50 ms':>7} {'p99 ms':>7}",
    ]
    for row in result["rows"]:
        lines.append(
            f"{row['type']:<8} {row['name'][:44]:<44} {row['requests']:>9,} "
            f"{row['failures']:>9,} {row['per_s']:>8.1f} {ms(row['p50_ms']):>7} "
            f"{ms(row['p99_ms']):>7}"
        )
    for failure in result["failures"]:
        lines.append(
            f"failure: {failure['type']} {failure['name']}: {failure['error']} "
            f"x{failure['occurrences']}"
        )
    cpu = result["cpu_pct"]
    if cpu:
        lines.append(
            "CPU % of one core after the ramp-up: "
            + ", ".join(f"{name} {value:.0f}" for name, value in cpu.items() if value is not None)
        )
    if result["counters"]:
        lines.append(f"counters: {result['counters']}")
    for error in result["locust_errors"]:
        lines.append(f"locust log: {error}")
    lines.append(
        f"reconcile after the run: {'ok' if result['reconcile_ok'] else 'NOT OK'}; "
        f"locust exit code {result['locust_exit_code']}"
    )
    return "\n".join(lines)


def passed(result: dict[str, Any]) -> bool:
    return (
        result["reconcile_ok"]
        and result["locust_exit_code"] == 0
        and not result["failures"]
        and not result["locust_errors"]
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.evening", description=(__doc__ or "").split("\n\n")[0]
    )
    parser.add_argument("--users", type=positive_int, default=USERS_DEFAULT)
    parser.add_argument("--spawn-rate", type=positive_float, default=SPAWN_RATE_DEFAULT)
    parser.add_argument(
        "--run-time", type=positive_float, default=RUN_TIME_DEFAULT_S, help="seconds"
    )
    parser.add_argument("--models", type=positive_int, default=MODELS_DEFAULT)
    parser.add_argument(
        "--weights", help="viewer,chatter,tipper,dm,private (locust_evening's default: 80,10,6,3,1)"
    )
    parser.add_argument(
        "--reply-timeout",
        type=positive_float,
        help="seconds before a command counts as timed out (the locustfile's default: 5)",
    )
    parser.add_argument(
        "--workers", type=positive_int, default=1, help="tokenchat serve --workers (default 1)"
    )
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    if args.models >= args.users:
        parser.error("--users must exceed --models (the fans are the rest)")
    args.pin = False  # the harness's Bench asks; locust runs where the OS puts it
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    raise_open_files_limit()
    bench = Bench(args, "evening")
    with bench.closed_after():
        result = run(args, bench)
    print(render(result))
    if args.json is not None:
        report = {"scenarios": {"evening": clean_json(result)}, "machine": machine_summary()}
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if passed(result) else 1


if __name__ == "__main__":
    sys.exit(main())
