"""The figures of the capacity model (docs/scaling.md), as CPU time per operation.

The machine is shared, so rates measured on it say more about the other work
than about tokenchat; CPU seconds per operation move much less. Everything
here is counted that way:

- **Redis** runs as a server of this benchmark's own (``redis-server`` from
  the PATH, ``--redis-server`` to choose another; 127.0.0.1, a free port,
  started and stopped here), so its process's CPU (``/proc/<pid>/stat``, every
  thread) and ``INFO commandstats`` hold this benchmark's work and nothing
  else. Once with the append-only file as deployed (``appendfsync everysec``,
  compose.yaml) and once without persistence:

  - ``script``: the ``tip`` script the server loads (``TIP.script``), called
    with the KEYS/ARGV ``Economy.tip`` builds (``loadtests.tips.VirtualFan``,
    200 fans in 20 rooms), pipelined as the batcher sends it, for
    ``--duration`` s: Redis CPU per call, commandstats' ``usec_per_call``
    (the script alone, no I/O), the memory each call leaves behind (its
    idempotency record, kept 24 h), and ``1 / CPU per call``: the rate of
    tips at which one primary, one core, is full;
  - ``room_event``: the script of every ``say`` (history XADD and PUBLISH in
    one call), a 100-character message, pipelined, no subscriber;
  - ``publish``: ``PUBLISH`` and ``SPUBLISH`` of a tip event's payload to one
    channel with 0, 1 and ``--subscribers`` subscribers (each a gateway
    node subscribed to a room), ``--pipeline`` publishes per pipeline;
    Redis CPU per publish, and the bytes every subscriber received checked
    against what was published;
  - ``subscribe``: one connection subscribes to ``--subscriptions`` user
    channels, 500 per ``SUBSCRIBE`` as a batch of hellos does: Redis memory
    and CPU per channel (every connected user holds one).

- **Two shards**: ``--transfers`` tips from payers on one Redis to a payee on
  another, as the two-phase transfer of ``loadtests.xshard`` (the prototype
  of docs/scaling.md, "Past one money shard"): each shard's CPU per transfer.

- **Postgres**: the ledger writer's statements on one connection and the
  standing projector's fold (``loadtests.ledger_backend.measure``), the
  backend's CPU per tip (one ledger transaction, two postings), at a small
  batch (50, a lightly loaded writer) and a full one (1,000).

- **The gateway** (memory per session, CPU per delivery, per tip, per hello)
  is what ``loadtests.bench`` measures: by default derived from the runs
  recorded in ``--bench-json`` (docs/benchmarks.json), or with ``--gateway``
  re-measured by running ``python -m loadtests.bench --only
  fanout,tips,idle,reconnect --quick`` first.

Each Redis and Postgres figure is the median of ``--runs`` runs. ``--json
PATH`` merges ``scenarios.capacity`` into that file (created if missing),
beside what ``loadtests.bench`` wrote there.

    python -m loadtests.capacity --quick
    python -m loadtests.capacity --runs 3 --json docs/benchmarks.json
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
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from loadtests.harness.cli import positive_float, positive_int, resolve_timing
from loadtests.harness.client import HOST
from loadtests.harness.processes import (
    CLOCK_TICKS_PER_S,
    REPO_ROOT,
    cpu_ticks,
    free_port,
    recv_from_parent,
    run_load_process,
    sigterm_as_exit,
)
from loadtests.harness.report import clean_json, machine_summary, median_range
from loadtests.harness.stats import NS_PER_S, median

# --- what is measured -----------------------------------------------------------
FANS = 200  # virtual fans of the script phase: the tips benchmark's
ROOMS = 20
SUBSCRIBERS_DEFAULT = 10  # gateway nodes subscribed to one room's channel
# Publishes per pipeline: the batcher sends what one event-loop tick brings
# in one pipeline; 100 is a busy gateway's tick (the tips benchmark's fans
# send 200), and it decides how many writes Redis makes per subscriber.
PIPELINE_DEFAULT = 100  # commands
# User channels one connection subscribes to (a node's, one per connected
# user): enough for the per-channel memory to dwarf the dict's resizing steps.
SUBSCRIPTIONS_DEFAULT = 100_000  # channels
SUBSCRIBE_BATCH = 500  # channels per SUBSCRIBE: TOKENCHAT_HELLO_BATCH_MAX's default
# Cross-shard transfers (loadtests.xshard) per run: 4 script calls each, so
# 5,000 give each shard 0.2-0.4 s of CPU, 20-40 of /proc's 10-ms ticks.
TRANSFERS_DEFAULT = 5000
LEDGER_BATCHES = (50, 1000)  # tips per writer transaction: light load, full batches
LEDGER_TIPS = 10_000  # per batch size and run (26-100 us each: 0.3-1 s of CPU)
LEDGER_PASS = 1000  # ledger transactions per projector pass
MESSAGE_CHARS = 100  # a chat message's text: the fan-out benchmark's
CHANNEL = "capacity:room:{bench}:events"
KEY_PREFIX = "capacity:"
# --- bounds -------------------------------------------------------------------
REDIS_START_TIMEOUT_S = 10.0  # until the new redis-server answers PING
REDIS_STOP_TIMEOUT_S = 10.0  # after SIGTERM (no save points: it exits at once), before SIGKILL
SUBSCRIBE_TIMEOUT_S = 10.0  # until every subscriber is counted by NUMSUB
SUBSCRIBER_DRAIN_S = 2.0  # after the last publish, for the last bytes to arrive
POLL_INTERVAL_S = 0.05
SCRIPT_WARMUP_S = 0.5  # script loaded, keys hot, before the measured calls
GATEWAY_BENCH_TIMEOUT_S = 1800.0  # --gateway: loadtests.bench --quick of four scenarios


# ============================================================================
# A Redis of our own
# ============================================================================


@dataclasses.dataclass
class OwnRedis:
    """A redis-server this benchmark started, alone in its folder."""

    process: subprocess.Popen[bytes]
    port: int
    folder: Path
    aof: bool

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def cpu_s(self) -> float:
        ticks = cpu_ticks([self.process.pid])
        if ticks is None:
            raise RuntimeError("the benchmark's redis-server is gone")
        return ticks / CLOCK_TICKS_PER_S

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(REDIS_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(REDIS_STOP_TIMEOUT_S)
        shutil.rmtree(self.folder, ignore_errors=True)


def start_redis(binary: str, *, aof: bool) -> OwnRedis:
    """redis-server on a free port of 127.0.0.1, as deployed (AOF, fsync every
    second) or without persistence; returns once it answers PING."""
    folder = Path(tempfile.mkdtemp(prefix="capacity-redis-"))
    port = free_port()
    argv = [binary, "--port", str(port), "--bind", HOST, "--dir", str(folder), "--save", ""]
    argv += ["--appendonly", "yes", "--appendfsync", "everysec"] if aof else ["--appendonly", "no"]
    log = (folder / "redis.log").open("wb")
    process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    server = OwnRedis(process, port, folder, aof)
    deadline = time.monotonic() + REDIS_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            text = (folder / "redis.log").read_text(errors="replace")[-2000:]
            server.stop()
            raise RuntimeError(f"redis-server exited: {text}")
        with contextlib.suppress(OSError), socket_to(port) as sock:
            sock.sendall(b"PING\r\n")
            if sock.recv(64).startswith(b"+PONG"):
                return server
        time.sleep(POLL_INTERVAL_S)
    server.stop()
    raise TimeoutError(f"redis-server did not answer within {REDIS_START_TIMEOUT_S} s")


@contextlib.contextmanager
def socket_to(port: int) -> Iterator[socket.socket]:
    sock = socket.create_connection((HOST, port), timeout=1.0)
    try:
        yield sock
    finally:
        sock.close()


# ============================================================================
# RESP, for the subscribers (they read bytes and count them, nothing more)
# ============================================================================


def resp_command(*parts: str | bytes) -> bytes:
    """One command as a RESP array of bulk strings."""
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        raw = part.encode() if isinstance(part, str) else part
        out.append(b"$%d\r\n%s\r\n" % (len(raw), raw))
    return b"".join(out)


def message_frame(command: str, channel: str, payload: bytes) -> bytes:
    """What a subscriber of ``channel`` reads for one publish (RESP2 push)."""
    kind = "smessage" if command == "SPUBLISH" else "message"
    return resp_command(kind, channel, payload)


def subscribe_reply(command: str, channel: str) -> bytes:
    """The confirmation a connection reads after subscribing to one channel."""
    return subscribed_reply(command, channel, 1)


@dataclasses.dataclass(frozen=True)
class SubscriberSpec:
    port: int
    command: str  # PUBLISH or SPUBLISH: what the publisher sends
    channel: str
    connections: int
    stop_within_s: float  # the publishing phase's length and margins: then give up


async def subscribers_async(spec: SubscriberSpec, conn: Connection) -> None:
    """``connections`` sockets subscribed to the channel, reading until told to
    stop; then the bytes each read after its subscription was confirmed."""
    subscribe = "SSUBSCRIBE" if spec.command == "SPUBLISH" else "SUBSCRIBE"
    confirm = subscribe_reply(spec.command, spec.channel)
    received = [0] * spec.connections

    async def one(index: int) -> None:
        reader, writer = await asyncio.open_connection(HOST, spec.port)
        try:
            writer.write(resp_command(subscribe, spec.channel))
            head = await reader.readexactly(len(confirm))
            if head != confirm:
                raise RuntimeError(f"unexpected reply to {subscribe}: {head!r}")
            while chunk := await reader.read(1 << 16):
                received[index] += len(chunk)
        finally:
            writer.close()

    tasks = [asyncio.create_task(one(i)) for i in range(spec.connections)]
    conn.send(("ready", None))
    await recv_from_parent(conn, spec.stop_within_s)  # "stop"
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    conn.send(("result", received))


def subscribers_main(spec: SubscriberSpec, conn: Connection) -> None:
    run_load_process(lambda: subscribers_async(spec, conn), conn, None)


# ============================================================================
# Redis: the money script, and publishes
# ============================================================================


async def _used_memory(redis: Any) -> int:
    info = await redis.info("memory")
    return int(info["used_memory"])


async def measure_script(server: OwnRedis, duration_s: float) -> dict[str, Any]:
    """The tip script, pipelined as the batcher sends it, on ``server``."""
    from redis.asyncio import Redis

    from loadtests.tips import ModeTally, VirtualFan, run_pipelined, seed_virtual_fans, trim_outbox
    from tokenchat.server.economy.actions import TIP
    from tokenchat.server.keys import Keys

    keys = Keys(KEY_PREFIX)
    redis = Redis.from_url(server.url)
    try:
        script = TIP.script
        await redis.script_load(script.source)
        fans = [VirtualFan(i, ROOMS, KEY_PREFIX, script.sha) for i in range(FANS)]
        await seed_virtual_fans(redis, keys, FANS, ROOMS, False, False)
        now = time.monotonic_ns()
        await run_pipelined(
            redis, script, fans, ModeTally(now, now + int(SCRIPT_WARMUP_S * NS_PER_S))
        )
        await redis.unlink(keys.outbox())
        await redis.config_resetstat()
        memory_before = await _used_memory(redis)
        cpu_before, wall_before = server.cpu_s(), time.monotonic_ns()
        tally = ModeTally(wall_before, wall_before + int(duration_s * NS_PER_S))
        # The outbox is trimmed as the ledger writer would empty it (its XTRIM
        # counts in Redis's CPU, as the writer's reads and acks would).
        trimmer = asyncio.create_task(trim_outbox(redis, keys.outbox()))
        try:
            await run_pipelined(redis, script, fans, tally)
        finally:
            trimmer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await trimmer
        cpu = server.cpu_s() - cpu_before
        wall = (time.monotonic_ns() - wall_before) / NS_PER_S
        stats = (await redis.info("commandstats")).get("cmdstat_evalsha", {})
        await redis.unlink(keys.outbox())
        memory_after = await _used_memory(redis)
        calls = tally.calls_total
        if not calls or tally.errors:
            raise RuntimeError(f"tip script: {calls} calls, refusals {tally.errors}")
        cpu_us = cpu / calls * 1e6
        return {
            "aof": server.aof,
            "calls": calls,
            "calls_per_s": calls / wall,
            "redis_cpu_pct": cpu / wall * 100,
            "redis_cpu_us_per_call": cpu_us,
            "usec_per_call": float(stats.get("usec_per_call", math.nan)),
            "primary_full_calls_per_s": 1e6 / cpu_us,
            "bytes_per_call": (memory_after - memory_before) / calls,
        }
    finally:
        await redis.flushall()
        await redis.aclose()


async def measure_room_event(server: OwnRedis, duration_s: float, pipeline: int) -> dict[str, Any]:
    """``room_event.lua`` (every ``say``: history XADD and SPUBLISH, one call),
    with a message of 100 characters in ``ROOMS`` rooms, pipelined."""
    import orjson
    from redis.asyncio import Redis

    from tokenchat.protocol import events
    from tokenchat.server.config import Settings
    from tokenchat.server.economy.batcher import send_pipeline
    from tokenchat.server.economy.scripts import HISTORY_LIB, lua_script
    from tokenchat.server.keys import Keys

    settings = Settings()
    keys, history_len = Keys(KEY_PREFIX), settings.history_len
    history_age_ms = int(settings.history_age_s * 1000)
    script = lua_script("room_event", retry_safe=False, libs=(HISTORY_LIB,))
    redis = Redis.from_url(server.url)
    try:
        await redis.script_load(script.source)
        commands: list[list[str | bytes | int]] = []
        for i in range(pipeline):
            room = f"model{i % ROOMS}"
            body = orjson.dumps(events.message_event_body(room, f"fan{i}", "x" * MESSAGE_CHARS))
            # The channel is a key (SPUBLISH: the script runs in its slot).
            script_keys = [keys.room_history(room), keys.room_show(room), keys.room_channel(room)]
            script_args: list[str | bytes | int] = [
                history_len,
                body,
                f"u:fan{i}",
                history_age_ms,
            ]
            commands.append(["EVALSHA", script.sha, len(script_keys), *script_keys, *script_args])
        calls = 0
        cpu_before, wall_before = server.cpu_s(), time.monotonic()
        while time.monotonic() < wall_before + duration_s:
            replies = await send_pipeline(redis, commands)
            if not all(isinstance(reply, bytes) for reply in replies):
                raise RuntimeError(f"room_event refused: {replies[0]!r}")
            calls += pipeline
        cpu = server.cpu_s() - cpu_before
        wall = time.monotonic() - wall_before
        return {
            "calls": calls,
            "calls_per_s": calls / wall,
            "redis_cpu_us_per_call": cpu / calls * 1e6,
        }
    finally:
        await redis.flushall()
        await redis.aclose()


def tip_payload() -> bytes:
    """A tip event as tip.lua publishes it: ``E<offset> <json>``."""
    import orjson

    from tokenchat.protocol import events

    body = orjson.dumps(events.tip_event_body("model0", "fan0", 1, ""))
    return b"E1764633600000-0 " + body


async def measure_publish(
    server: OwnRedis, command: str, subscribers: int, duration_s: float, pipeline: int
) -> dict[str, Any]:
    """``command`` (PUBLISH or SPUBLISH) to one channel with ``subscribers``
    connections subscribed, ``pipeline`` publishes per round trip."""
    from redis.asyncio import Redis

    from tokenchat.server.economy.batcher import send_pipeline

    payload = tip_payload()
    redis = Redis.from_url(server.url)
    context = multiprocessing.get_context("spawn")
    parent_conn: Connection | None = None
    process = None
    try:
        if subscribers:
            parent_conn, child_conn = context.Pipe()
            stop_within_s = duration_s + SUBSCRIBE_TIMEOUT_S + SUBSCRIBER_DRAIN_S
            spec = SubscriberSpec(server.port, command, CHANNEL, subscribers, stop_within_s)
            process = context.Process(
                target=subscribers_main, args=(spec, child_conn), name="capacity-subscribers"
            )
            process.start()
            child_conn.close()
            await recv_from_parent(parent_conn, SUBSCRIBE_TIMEOUT_S)
            await _wait_subscribed(redis, command, subscribers)
        commands: list[list[str | bytes | int]] = [[command, CHANNEL, payload]] * pipeline
        published = 0
        cpu_before, wall_before = server.cpu_s(), time.monotonic()
        deadline = wall_before + duration_s
        while time.monotonic() < deadline:
            replies = await send_pipeline(redis, commands)
            if any(reply != subscribers for reply in replies):
                raise RuntimeError(f"{command} reached {replies[0]!r}, not {subscribers}")
            published += pipeline
        cpu = server.cpu_s() - cpu_before
        wall = time.monotonic() - wall_before
        delivered = math.nan
        if parent_conn is not None:
            await asyncio.sleep(SUBSCRIBER_DRAIN_S)
            parent_conn.send(("stop",))
            _, received = await recv_from_parent(parent_conn, SUBSCRIBE_TIMEOUT_S)
            frame = len(message_frame(command, CHANNEL, payload))
            delivered = sum(received) / frame / (published * subscribers)
        return {
            "command": command,
            "subscribers": subscribers,
            "published": published,
            "published_per_s": published / wall,
            "redis_cpu_pct": cpu / wall * 100,
            "redis_cpu_us_per_publish": cpu / published * 1e6,
            "payload_bytes": len(payload),
            # 1.0: every subscriber read every message, byte for byte.
            "delivered_fraction": delivered,
        }
    finally:
        if process is not None:
            process.join(SUBSCRIBE_TIMEOUT_S)
            if process.is_alive():
                process.kill()
                process.join()
        if parent_conn is not None:
            parent_conn.close()
        await redis.aclose()


async def _wait_subscribed(redis: Any, command: str, subscribers: int) -> None:
    numsub = redis.pubsub_shardnumsub if command == "SPUBLISH" else redis.pubsub_numsub
    deadline = time.monotonic() + SUBSCRIBE_TIMEOUT_S
    while time.monotonic() < deadline:
        if dict(await numsub(CHANNEL)).get(CHANNEL.encode(), 0) == subscribers:
            return
        await asyncio.sleep(POLL_INTERVAL_S)
    raise TimeoutError(f"{subscribers} subscribers not counted within {SUBSCRIBE_TIMEOUT_S} s")


def subscribed_reply(command: str, channel: str, count: int) -> bytes:
    """The confirmation of one channel, the connection's ``count``-th."""
    kind = "ssubscribe" if command == "SPUBLISH" else "subscribe"
    return b"*3\r\n" + resp_command(kind, channel)[len(b"*2\r\n") :] + b":%d\r\n" % count


async def measure_subscriptions(server: OwnRedis, channels: int, batch: int) -> dict[str, Any]:
    """One connection subscribes to ``channels`` user channels, ``batch`` per
    SUBSCRIBE (as a batch of hellos does): Redis memory and CPU per channel.
    Every connected user is one such channel on the node's connection."""
    from redis.asyncio import Redis

    from tokenchat.server.keys import Keys

    keys = Keys(KEY_PREFIX)
    names = [keys.user_channel(f"user{i:07d}") for i in range(channels)]
    redis = Redis.from_url(server.url)
    reader, writer = await asyncio.open_connection(HOST, server.port)
    try:
        memory_before = await _used_memory(redis)
        cpu_before = server.cpu_s()
        for start in range(0, channels, batch):
            chunk = names[start : start + batch]
            writer.write(resp_command("SUBSCRIBE", *chunk))
            expected = b"".join(
                subscribed_reply("PUBLISH", name, start + i + 1) for i, name in enumerate(chunk)
            )
            if await reader.readexactly(len(expected)) != expected:
                raise RuntimeError("unexpected reply to SUBSCRIBE")
        cpu = server.cpu_s() - cpu_before
        memory = await _used_memory(redis) - memory_before
        return {
            "channels": channels,
            "batch": batch,
            "bytes_per_channel": memory / channels,
            "redis_cpu_us_per_channel": cpu / channels * 1e6,
        }
    finally:
        writer.close()
        await redis.aclose()


# ============================================================================
# Postgres: the ledger writer and the projector, per tip
# ============================================================================


async def measure_ledger(batch: int, tips: int) -> dict[str, Any]:
    from loadtests.ledger_backend import measure

    return await measure(batch, tips, LEDGER_PASS, None)


# ============================================================================
# The gateway: from loadtests.bench's report
# ============================================================================


def gateway_figures(report: dict[str, Any]) -> dict[str, Any]:
    """Per-operation figures of the gateway from a ``loadtests.bench`` report
    (its JSON): medians over the report's runs; NaN for a scenario it lacks.

    - ``kib_per_session``: the idle scenario's RSS per session;
    - ``us_per_delivery``: the ``serve`` tree's CPU over the fan-out rate
      (tokenchat's runs), and ``irq_us_per_delivery`` the machine's
      interrupts over the same rate (the kernel's share, all processes);
      ``bare_*`` the same of the bare ``websockets`` baseline's runs;
    - ``serve_us_per_tip``, ``redis_us_per_tip``, ``postgres_us_per_tip``,
      ``ledger_us_per_tip``: the tips scenario's full-rate runs;
    - ``us_per_hello``: the reconnect scenario's server CPU per hello.
    """
    scenarios = report.get("scenarios", {})

    def runs(name: str, keep: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
        return [r for r in scenarios.get(name, {}).get("runs", []) if keep(r)]

    fanout = runs("fanout", lambda r: r.get("server") == "tokenchat")
    bare = runs("fanout", lambda r: r.get("server") == "baseline")
    tips = runs("tips", lambda r: r.get("kind") == "tokenchat")

    def per_delivery(run: dict[str, Any], column: str) -> float | None:
        pct, rate = run.get(column), run.get("deliveries_per_s")
        return pct / 100 / rate * 1e6 if pct is not None and rate else None

    def ledger_per_tip(run: dict[str, Any]) -> float | None:
        pct, rate = run.get("cpu_ledger_pct"), run.get("per_s")
        return pct / 100 / rate * 1e6 if pct is not None and rate else None

    idle = scenarios.get("idle", {})
    reconnect = scenarios.get("reconnect", {})
    return {
        "kib_per_session": float(idle.get("value") or math.nan),
        "us_per_delivery": median([per_delivery(r, "cpu_server_pct") for r in fanout]),
        "irq_us_per_delivery": median([per_delivery(r, "cpu_irq_pct") for r in fanout]),
        # The bare websockets server writes every frame to every connection
        # at once: the cost of a delivery that shares its write with nothing.
        "bare_us_per_delivery": median([per_delivery(r, "cpu_server_pct") for r in bare]),
        "bare_irq_us_per_delivery": median([per_delivery(r, "cpu_irq_pct") for r in bare]),
        "serve_us_per_tip": median([r.get("main_us_per_op") for r in tips]),
        "redis_us_per_tip": median([r.get("redis_us_per_op") for r in tips]),
        "postgres_us_per_tip": median([r.get("postgres_us_per_op") for r in tips]),
        "ledger_us_per_tip": median([ledger_per_tip(r) for r in tips]),
        "us_per_hello": float(reconnect.get("server_cpu_us_per_hello") or math.nan),
        "source_date_utc": report.get("machine", {}).get("date_utc"),
        "source_commit": report.get("machine", {}).get("commit"),
    }


def run_gateway_bench(args: argparse.Namespace, output: Path) -> dict[str, Any]:
    """``python -m loadtests.bench --only fanout,tips,idle,reconnect --quick``,
    its report read back."""
    argv = [sys.executable, "-m", "loadtests.bench", "--only", "fanout,tips,idle,reconnect"]
    argv += ["--quick", "--idle-sessions", str(args.idle_sessions), "--json", str(output)]
    print("gateway:", " ".join(argv[1:]), flush=True)
    subprocess.run(argv, cwd=REPO_ROOT, check=True, timeout=GATEWAY_BENCH_TIMEOUT_S)
    report: dict[str, Any] = json.loads(output.read_text())
    return report


# ============================================================================
# The run
# ============================================================================


PUBLISH_COMMANDS = ("PUBLISH", "SPUBLISH")


async def measure_round(args: argparse.Namespace, number: int) -> list[dict[str, Any]]:
    """One run: every Redis phase on fresh servers, then the ledger batches."""
    rows: list[dict[str, Any]] = []
    for aof in (True, False):
        server = start_redis(args.redis_server, aof=aof)
        try:
            row = await measure_script(server, args.duration)
            rows.append({"run": number, "phase": "script", **row})
            print(
                f"run {number} script {'aof' if aof else 'no persistence'}:"
                f" {row['redis_cpu_us_per_call']:.1f} us Redis CPU per call"
                f" (usec_per_call {row['usec_per_call']:.1f}), {row['calls_per_s']:,.0f} calls/s"
                f" at {row['redis_cpu_pct']:.0f} % of a core, {row['bytes_per_call']:.0f} B kept",
                flush=True,
            )
            if not aof:
                continue  # publishes do not touch the append-only file
            row = await measure_room_event(server, args.duration, args.pipeline)
            rows.append({"run": number, "phase": "room_event", **row})
            print(
                f"run {number} room_event (say): {row['redis_cpu_us_per_call']:.1f} us Redis CPU"
                f" per call ({row['calls_per_s']:,.0f} calls/s)",
                flush=True,
            )
            row = await measure_subscriptions(server, args.subscriptions, SUBSCRIBE_BATCH)
            rows.append({"run": number, "phase": "subscribe", **row})
            print(
                f"run {number} SUBSCRIBE {args.subscriptions:,} user channels:"
                f" {row['bytes_per_channel']:.0f} B and {row['redis_cpu_us_per_channel']:.2f} us"
                " Redis CPU per channel",
                flush=True,
            )
            for command in PUBLISH_COMMANDS:
                for subscribers in sorted({0, 1, args.subscribers}):
                    row = await measure_publish(
                        server, command, subscribers, args.duration, args.pipeline
                    )
                    rows.append({"run": number, "phase": "publish", **row})
                    print(
                        f"run {number} {command} to {subscribers} subscribers:"
                        f" {row['redis_cpu_us_per_publish']:.2f} us Redis CPU per publish"
                        f" ({row['published_per_s']:,.0f}/s, delivered"
                        f" {row['delivered_fraction']:.3f})",
                        flush=True,
                    )
        finally:
            server.stop()
    from loadtests.xshard import time_transfers

    row = await time_transfers(args.transfers, args.pipeline, args.redis_server)
    rows.append({"run": number, "phase": "xshard", **row})
    print(
        f"run {number} cross-shard transfer: payer's shard {row['a_us_per_transfer']:.0f} us,"
        f" payee's {row['b_us_per_transfer']:.0f} us Redis CPU",
        flush=True,
    )
    for batch in LEDGER_BATCHES:
        row = await measure_ledger(batch, args.ledger_tips)
        rows.append({"run": number, "phase": "ledger", **row})
        print(
            f"run {number} ledger batch {batch}: writer {row['writer_us_per_tip']:.0f} us,"
            f" projector {row['projector_us_per_tip']:.0f} us Postgres CPU per tip",
            flush=True,
        )
    return rows


def pick(rows: list[dict[str, Any]], **match: Any) -> list[dict[str, Any]]:
    return [r for r in rows if all(r.get(k) == v for k, v in match.items())]


def summarize(args: argparse.Namespace, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the runs, in the figures the model reads."""

    def med(column: str, **match: Any) -> float:
        return median([r[column] for r in pick(rows, **match)])

    script_aof = med("redis_cpu_us_per_call", phase="script", aof=True)
    figures: dict[str, Any] = {
        "script_redis_us_aof": script_aof,
        "script_redis_us_no_persistence": med("redis_cpu_us_per_call", phase="script", aof=False),
        "script_usec_per_call_aof": med("usec_per_call", phase="script", aof=True),
        "script_calls_per_s_aof": med("calls_per_s", phase="script", aof=True),
        "script_redis_cpu_pct_aof": med("redis_cpu_pct", phase="script", aof=True),
        "primary_full_tips_per_s": 1e6 / script_aof if script_aof else math.nan,
        "script_bytes_kept_per_call": med("bytes_per_call", phase="script", aof=True),
    }
    figures["room_event_redis_us"] = med("redis_cpu_us_per_call", phase="room_event")
    figures["subscribe_bytes_per_channel"] = med("bytes_per_channel", phase="subscribe")
    figures["subscribe_redis_us_per_channel"] = med("redis_cpu_us_per_channel", phase="subscribe")
    for command in PUBLISH_COMMANDS:
        for subscribers in sorted({0, 1, args.subscribers}):
            name = f"{command.lower()}_{subscribers}_redis_us"
            figures[name] = med(
                "redis_cpu_us_per_publish",
                phase="publish",
                command=command,
                subscribers=subscribers,
            )
    figures["xshard_payer_shard_us"] = med("a_us_per_transfer", phase="xshard")
    figures["xshard_payee_shard_us"] = med("b_us_per_transfer", phase="xshard")
    for batch in LEDGER_BATCHES:
        figures[f"ledger_writer_us_batch_{batch}"] = med(
            "writer_us_per_tip", phase="ledger", batch=batch
        )
        figures[f"ledger_projector_us_batch_{batch}"] = med(
            "projector_us_per_tip", phase="ledger", batch=batch
        )
    return figures


def render(args: argparse.Namespace, figures: dict[str, Any], gateway: dict[str, Any]) -> str:
    def spread(column: str, fmt: str, **match: Any) -> str:
        values = [r[column] for r in pick(args.rows, **match)]
        # A figure a run could not measure (NaN, None) is left out, as median() does.
        return median_range([v for v in values if v is not None and not math.isnan(v)], fmt)

    def script_cpu(aof: bool) -> str:
        return spread("redis_cpu_us_per_call", "{:.1f}", phase="script", aof=aof)

    n = args.subscribers
    lines = [
        f"capacity figures, medians of {args.runs} run(s) of {args.duration:g} s (min-max):",
        "",
        "Redis (a server of its own; its process CPU per operation, us)",
        f"  tip script, AOF everysec       {script_cpu(True)}"
        f"  (usec_per_call {spread('usec_per_call', '{:.1f}', phase='script', aof=True)})",
        f"  tip script, no persistence     {script_cpu(False)}",
        f"  one primary full at            {figures['primary_full_tips_per_s']:,.0f} tips/s"
        " (1 / CPU per call, AOF)",
        f"  memory kept per tip (24 h)     {figures['script_bytes_kept_per_call']:.0f} B",
    ]
    say = spread("redis_cpu_us_per_call", "{:.1f}", phase="room_event")
    lines.append(f"  room_event (a say), 0 subs     {say}")
    for command in PUBLISH_COMMANDS:
        for subscribers in sorted({0, 1, n}):
            cell = spread(
                "redis_cpu_us_per_publish",
                "{:.2f}",
                phase="publish",
                command=command,
                subscribers=subscribers,
            )
            lines.append(f"  {command:<8} {subscribers:>3} subscribers      {cell}")
    channel_bytes = spread("bytes_per_channel", "{:.0f}", phase="subscribe")
    channel_cpu = spread("redis_cpu_us_per_channel", "{:.2f}", phase="subscribe")
    lines.append(f"  a user channel subscribed      {channel_bytes} B, {channel_cpu} us")
    payer = spread("a_us_per_transfer", "{:.0f}", phase="xshard")
    payee = spread("b_us_per_transfer", "{:.0f}", phase="xshard")
    lines.append(f"  cross-shard transfer (xshard)  payer's shard {payer}, payee's {payee}")
    lines += ["", "Postgres (the writer's backend, CPU per tip, us)"]
    for batch in LEDGER_BATCHES:
        writer = spread("writer_us_per_tip", "{:.0f}", phase="ledger", batch=batch)
        projector = spread("projector_us_per_tip", "{:.0f}", phase="ledger", batch=batch)
        lines.append(f"  batch {batch:>5}: writer {writer}, projector {projector}")
    lines += [
        "",
        f"Gateway (loadtests.bench, {gateway['source_date_utc']} at {gateway['source_commit']})",
        f"  memory per idle session        {gateway['kib_per_session']:.1f} KiB",
        f"  serve CPU per delivery         {gateway['us_per_delivery']:.2f} us"
        f" (+ {gateway['irq_us_per_delivery']:.2f} us interrupts)",
        f"  bare websockets, per delivery  {gateway['bare_us_per_delivery']:.2f} us"
        f" (+ {gateway['bare_irq_us_per_delivery']:.2f} us interrupts): a write each",
        f"  CPU per tip: serve {gateway['serve_us_per_tip']:.0f}, ledger writer"
        f" {gateway['ledger_us_per_tip']:.0f}, Redis {gateway['redis_us_per_tip']:.0f},"
        f" Postgres {gateway['postgres_us_per_tip']:.0f} us",
        f"  serve CPU per hello            {gateway['us_per_hello']:.0f} us",
    ]
    return "\n".join(lines)


def write_json(
    path: Path, args: argparse.Namespace, figures: dict[str, Any], gateway: dict[str, Any]
) -> None:
    """Merge ``scenarios.capacity`` into ``path`` (loadtests.bench's structure)."""
    text = path.read_text() if path.exists() else ""
    report: dict[str, Any] = json.loads(text) if text else {}
    # The file's own indentation, so that a merge changes only what it adds.
    lines = text.splitlines()
    indent = len(lines[1]) - len(lines[1].lstrip(" ")) if len(lines) > 1 else 2
    report.setdefault("scenarios", {})["capacity"] = clean_json(
        {
            "value": figures["primary_full_tips_per_s"],
            "unit": "tips/s at which one Redis primary (one core, AOF everysec) is full",
            "baseline": None,
            "ratio": None,
            "p50_ms": None,
            "p99_ms": None,
            **figures,
            "gateway": gateway,
            "subscribers": args.subscribers,
            "pipeline": args.pipeline,
            "duration_s": args.duration,
            "ledger_tips": args.ledger_tips,
            "runs": args.rows,
            "machine": {
                **machine_summary(),
                "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "commit": git_commit(),
                "loadavg": list(os.getloadavg()),
            },
        }
    )
    report.setdefault("machine", machine_summary())
    path.write_text(json.dumps(report, indent=indent or 2) + "\n")


def git_commit() -> str | None:
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO_ROOT,
            check=True,
            capture_output=True,
            text=True,
        )
        return out.stdout.strip()
    return None


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=positive_float, help="seconds per Redis phase")
    parser.add_argument("--runs", type=positive_int)
    parser.add_argument("--quick", action="store_true", help="one run of 3 s per phase")
    parser.add_argument("--subscribers", type=positive_int, default=SUBSCRIBERS_DEFAULT)
    parser.add_argument("--pipeline", type=positive_int, default=PIPELINE_DEFAULT)
    parser.add_argument("--subscriptions", type=positive_int, default=SUBSCRIPTIONS_DEFAULT)
    parser.add_argument(
        "--transfers", type=positive_int, default=TRANSFERS_DEFAULT, help="cross-shard, per run"
    )
    parser.add_argument("--ledger-tips", type=positive_int, default=LEDGER_TIPS)
    parser.add_argument("--redis-server", default=shutil.which("redis-server") or "redis-server")
    parser.add_argument(
        "--bench-json",
        type=Path,
        default=REPO_ROOT / "docs" / "benchmarks.json",
        help="loadtests.bench's report the gateway figures are read from",
    )
    parser.add_argument(
        "--gateway", action="store_true", help="re-measure the gateway figures (loadtests.bench)"
    )
    parser.add_argument(
        "--gateway-report",
        type=Path,
        help="with --gateway: keep loadtests.bench's report here (for a later --bench-json)",
    )
    parser.add_argument("--idle-sessions", type=positive_int, default=3000)
    parser.add_argument("--json", type=Path, help="merge scenarios.capacity into this file")
    args = parser.parse_args(argv)
    args.warmup = 0.0  # the script phase warms up on its own (SCRIPT_WARMUP_S)
    resolve_timing(parser, args)
    return args


async def measure_all(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for number in range(1, args.runs + 1):
        rows += await measure_round(args, number)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C: every redis-server started here is stopped.
    with sigterm_as_exit():
        return measure_and_report(args)


def measure_and_report(args: argparse.Namespace) -> int:
    if args.gateway:
        with tempfile.TemporaryDirectory(prefix="capacity-") as folder:
            report = args.gateway_report or Path(folder) / "bench.json"
            gateway = gateway_figures(run_gateway_bench(args, report))
        gateway["source_date_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        gateway["source_commit"] = git_commit()
    else:
        gateway = gateway_figures(json.loads(args.bench_json.read_text()))
    args.rows = asyncio.run(measure_all(args))
    figures = summarize(args, args.rows)
    print()
    print(render(args, figures, gateway))
    if args.json is not None:
        write_json(args.json, args, figures, gateway)
    return 0


if __name__ == "__main__":
    sys.exit(main())
