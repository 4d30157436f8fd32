"""Tips benchmark: N fans tipping in M rooms, each waiting for its ack.

It measures how many tips tokenchat commits per second (``tip`` -> session ->
script batcher -> the ``tip`` Lua script in Redis -> ``ok`` reply, with the
tip event fanned out to the room and the ledger writer moving every tip to
Postgres) against the ceiling of the same script called straight from Python.

    python -m loadtests.tips --fans 200 --rooms 20 --duration 10 --runs 3

tokenchat: ``tokenchat migrate``, then, as the ``Procfile`` deploys it,
``serve --workers N`` (``--workers``, default 1) without a ledger writer of
its own and ``tokenchat ledger`` beside it (``--inline-ledger``: the writer
inside ``serve`` instead), on free ports, with its own Redis key prefix,
Postgres schema and JWT secret. ``--rooms`` models say hello so their rooms exist,
then the fans connect from ``--load-procs`` processes (uvloop, the minimal
WebSocket client of ``loadtests.harness.client``), say hello, join room ``i % rooms``
and are credited through ``POST /v1/admin/credits``. Each fan tips amount 1
with a fresh idempotency key and sends its next tip when the ack of the last
one arrives, so the number of fans is the concurrency. Two phases follow,
each with a warm-up and a measured window:

- full rate: committed tips/s (``ok`` acks received in the window), ack
  latency p50/p99, errors by code;
- capped: each fan paces itself with a token bucket so that all together
  offer at most half the pipelined baseline rate (the median of the baseline
  runs so far); it answers "what is the ack latency when tokenchat is asked
  for half of what Redis can do?" (goal: p99 < 50 ms).

Then ``GET /v1/admin/reconcile`` must say ok (the ledger drained and Redis
agrees with Postgres), the number of tip transactions Postgres gained must
equal the number of tips acknowledged, and the ledger lag is read from the
``tokenchat_ledger_lag_seconds`` histogram of the writer's ``/metrics``.
"python CPU" of tokenchat is every ``serve`` process (supervisor and
workers); the ledger writer's CPU is a row of its own.

Baseline: one process (uvloop, redis-py asyncio) runs the exact script the
server loads (``TIP.script``) with the KEYS/ARGV that ``Economy.tip`` builds
(both through ``TIP.call``), under a key prefix of its own with balances set
high, for the same number of virtual fans. Pipelined: each round is one
pipeline of one EVALSHA per fan, the way the server's batcher sends what
arrives in one event-loop tick. Unpipelined, for context: one coroutine per
fan, one EVALSHA at a time.

``--action`` puts another paid command in the fans' loop (``WORKLOADS``):
``tip_item`` and ``request_offer`` as tips are; ``unlock`` and ``buy_ticket``
on ``--items`` media or ticket shows per room, a new one each call, so that
every call is a real charge; ``meter`` runs one private show per room with
1-s periods and the fans send nothing: the calls are the server's own meter
ticks, counted from Postgres (ticks, and each show's final charge), so its
"committed/s" is ticks/s and its CPU per call is CPU per tick.

A second baseline, beside plain tips (not with ``--action``, ``--goal`` or
``--limits``; ``--no-peer`` leaves it out): tips as most people would build
them, python-socketio with ``AsyncRedisManager`` and one asyncpg transaction
per tip (``loadtests.tips_peer``, whose docstring says what it does), tipped
by the same fans speaking Socket.IO, one full-rate phase; its books are
checked after the run (tips in Postgres = tips acked, none negative).

``--delivery-latency`` measures instead what relaying a tip to its room
costs (docs/economy.md, "Delivery relay"): the time from a fan sending a
tip to another member of the room receiving its ``tip`` event, with
``TOKENCHAT_DELIVERY=script`` (in the tip's own script) against
``TOKENCHAT_DELIVERY=relay`` (the {eco} delivery stream and the relay), on
the same Redis, runs interleaved (odd runs: script first). Each of the
``--fans`` fans tips in room ``i % rooms`` at its share of
``--capped-rate`` (default ``DELIVERY_RATE_DEFAULT`` tips/s in all), one
tip in flight, with a ``@T<ns>@`` stamp as its text; one watcher per room
records each tip event's delay (one process, one monotonic clock). Also
the ack latency, which relaying must not change.

Runs alternate (odd runs: baseline first, even runs: tokenchat first) so that
a drift of the machine hits both, and every capped phase has a baseline rate
to take half of. The table shows medians with the min-max spread of the runs.

The server gets the ``TOKENCHAT_*`` variables of this process's environment,
except the ones the benchmark sets (prefix, schema, secret, ports, the lifted
command rate limit), so a setting can be tried without editing anything:
``TOKENCHAT_REDIS_POOL_MAX=512 python -m loadtests.tips --quick``.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import dataclasses
import itertools
import math
import multiprocessing
import os
import random
import secrets
import statistics
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Literal, cast

import orjson

from loadtests.harness.cli import (
    DURATION_DEFAULT_S,
    QUICK_DURATION_S,
    QUICK_RUNS,
    QUICK_WARMUP_S,
    RUNS_DEFAULT,
    WARMUP_DEFAULT_S,
    positive_float,
    positive_int,
    resolve_timing,
)
from loadtests.harness.client import CONNECT_TIMEOUT_S, HOST, JSON_SUBPROTOCOL, Member, open_member
from loadtests.harness.processes import (
    IDLE_BUSY_MAX_PCT,
    POLL_INTERVAL_S,
    SETUP_TIMEOUT_S,
    WORKER_STOP_TIMEOUT_S,
    Bench,
    Server,
    delete_matching,
    drop_schema,
    first_error,
    free_port,
    http_answers,
    http_json,
    process_tree,
    raise_open_files_limit,
    recv_from_parent,
    run_load_process,
    sample_cpu,
    schedule,
    wait_for_idle,
)
from loadtests.harness.report import clean_json, machine_summary, median_range, run_bench
from loadtests.harness.stats import (
    NS_PER_S,
    US_PER_S,
    Stats,
    hist_percentile_ms,
    histogram_quantile,
    ledger_lag_buckets,
    median_of,
    merge_counts,
    merge_hists,
    per_run_ratios,
    ratio_of_medians,
    values_of,
)
from tokenchat.server.economy.batcher import LuaScript, send_pipeline

Phase = Literal["full", "capped"]
Mode = Literal["pipelined", "unpipelined"]
# What a row of results is: a tokenchat phase or a baseline mode.
# "socketio": the second baseline, python-socketio + asyncpg (loadtests.tips_peer).
Kind = Literal["tokenchat", "capped", "pipelined", "unpipelined", "socketio"]

FAN_ID_FORMAT = "bench_f{:05d}"  # user ids of the fans
MODEL_ID_FORMAT = "bench_model{:03d}"  # user ids of the models; a room's id is its model's
ADMIN_ID = "bench_admin"  # who credits the fans
TIP_AMOUNT = 1  # tokens per tip: the smallest, so the balance never runs out
# --goal: each room's goal target, the largest a goal may have, so that no
# run of the benchmark reaches it and every tip counts toward it.
GOAL_TARGET_TOKENS = 1_000_000_000
# Credited to every fan per tokenchat run (the contract's largest amount): a
# fan tips well under 10,000 times a run, so this is never the limit.
FUND_TOKENS = 1_000_000  # tokens
# The baseline's fans start with this: a whole run of tips leaves most of it.
BASELINE_BALANCE_TOKENS = 10**12  # tokens

# --- defaults of the command line ---------------------------------------------
FANS_DEFAULT = 200  # connections, each with one tip in flight
ROOMS_DEFAULT = 20  # models; fan i joins room i % rooms
LOAD_PROCS_DEFAULT = 2  # load-generator processes, each on its own uvloop
# The capped phase offers this share of the pipelined baseline's rate.
CAPPED_FRACTION = 0.5
# A capped phase that commits less than this share of what it offered was
# saturated (the fans waited for acks, not for tokens).
SATURATED_SHARE = 0.95
# The issue's goals, shown next to the figures.
RATIO_GOAL = 0.5  # tokenchat / pipelined baseline, committed tips/s
CAPPED_P99_GOAL_MS = 50.0

# --- bounds: every wait has one ------------------------------------------------
# Fans doing their handshake, hello and join at once, over all load processes:
# as in loadtests.fanout, enough to set up 200 fans in about a second without
# a burst of hellos queueing past tokenchat's Redis pool (64 connections).
CONNECT_CONCURRENCY_TOTAL = 32  # connections
# Credits posted at once: the admin endpoint is one script call each.
FUND_CONCURRENCY = 8  # HTTP requests
# A credit answered 503 (the ledger's confirmation timed out on a loaded
# machine, outcome unknown) is posted again with its key: each attempt waits
# up to TOKENCHAT_LEDGER_ACK_TIMEOUT_S (5 s), so 5 bound a stuck ledger to
# about 25 s before the run fails.
FUND_ATTEMPTS = 5  # HTTP requests per credit
# /v1/admin/reconcile drains the outbox for up to 10 s, then reads every balance.
RECONCILE_TIMEOUT_S = 60.0
# After a phase's window: how long the tips in flight may take to be answered.
# A tip unanswered by then is reported (the contract answers every command).
PHASE_DRAIN_TIMEOUT_S = 5.0
REPORT_SLACK_S = 10.0  # on top of the phase's own length, for a result to come
# Between the phases: the writer moves a few thousand entries a second, and a
# full phase leaves at most tens of thousands behind.
LEDGER_DRAIN_TIMEOUT_S = 60.0
BASELINE_START_TIMEOUT_S = 30.0  # the baseline process loaded and set up
# One Redis call or pipeline of the baseline: a shared Redis that stops
# answering (paused, or blocked by someone's long command) fails the run with
# a reason instead of holding it until the parent's deadline.
BASELINE_REDIS_TIMEOUT_S = 10.0
# After a baseline mode: deleting its idempotency keys (about a million at
# worst) may take a few seconds.
BASELINE_CLEANUP_TIMEOUT_S = 60.0  # s
# Token bucket of a paced fan: tokens accrue at its share of the capped rate and
# it may hold this many, so a late timer or a slow ack is caught up once, and
# the offered load never exceeds the cap over any longer stretch.
BUCKET_TOKENS = 2.0  # tips
# The baseline has no ledger writer: it trims its outbox itself so that memory
# and the script's XLEN check stay bounded, as the writer's XDEL keeps them.
OUTBOX_TRIM_INTERVAL_S = 0.1
OUTBOX_KEEP_ENTRIES = 10_000
# --limits: what each fan limits herself to, far above a run's tips.
BENCH_LIMITS = {"daily": 10**11, "weekly": 10**11, "monthly": 10**11}
# A run whose other processes used more than this is flagged in the table.
OTHER_BUSY_WARN_PCT = 25.0  # % of one CPU
# --delivery-latency: the tips offered in all (tips/s) unless --capped-rate:
# a light load, so that the figure is the path's latency, not queueing.
DELIVERY_RATE_DEFAULT = 200.0
DELIVERY_MODES = ("script", "relay")  # TOKENCHAT_DELIVERY, in run order of odd runs
WATCHER_ID_FORMAT = "bench_w{:03d}"  # user ids of the rooms' watchers


@dataclasses.dataclass(frozen=True, slots=True)
class Workload:
    """What the fans send (``--action``): one paid command of the registry.

    ``prepare`` runs once the models have said hello, with the bench and the
    HTTP port; it makes what the command needs (a menu, media) and returns,
    per room, the heads of the frames the fans send (everything before the
    key's value). ``kind`` is the ledger kind one applied call writes, so
    that the rows Postgres gained can be checked against the acks.
    """

    kind: str
    prepare: Callable[[TipsBench, int], dict[str, tuple[bytes, ...]]]
    # Server settings the workload needs (e.g. 1-s private-show periods).
    env: Mapping[str, str] = dataclasses.field(default_factory=dict)
    # Run after the phases, before the reconcile (e.g. end the private shows
    # so that no money moves while Redis and Postgres are compared).
    finish: Callable[[TipsBench, int], None] | None = None
    # Not None: the server makes the calls itself (the private-show meter)
    # and the fans send nothing; this counts the calls made so far, read at
    # the window's bounds for the calls/s. Such a workload has no capped phase.
    progress: Callable[[TipsBench], int] | None = None


def _prepare_tip(bench: TipsBench, http_port: int) -> dict[str, tuple[bytes, ...]]:
    return {
        model_id(room): (
            b'{"type":"tip","room":"%s","amount":%d,"key":"'
            % (model_id(room).encode(), TIP_AMOUNT),
        )
        for room in range(bench.args.rooms)
    }


def _model_tokens(bench: TipsBench) -> dict[str, str]:
    from tokenchat.server.auth import issue_token

    return {
        model_id(room): issue_token(bench.jwt_secret, model_id(room), "model")
        for room in range(bench.args.rooms)
    }


def _prepare_tip_item(bench: TipsBench, http_port: int) -> dict[str, tuple[bytes, ...]]:
    """Each model saves a one-item menu (price TIP_AMOUNT); fans tip that item
    with ``max_price`` its price (``tip_item.lua``)."""
    heads: dict[str, tuple[bytes, ...]] = {}
    for model, token in _model_tokens(bench).items():
        status, reply = http_json(
            f"http://{HOST}:{http_port}/v1/me/menu",
            token,
            {"items": [{"label": "bench", "price": TIP_AMOUNT}]},
            method="PUT",
        )
        if status != 200:
            raise RuntimeError(f"menu of {model} refused: {status} {reply}")
        item = reply["items"][0]["id"]
        heads[model] = (
            b'{"type":"tip","room":"%s","item":"%s","max_price":%d,"key":"'
            % (model.encode(), item.encode(), TIP_AMOUNT),
        )
    return heads


def _prepare_request_offer(bench: TipsBench, http_port: int) -> dict[str, tuple[bytes, ...]]:
    """Fans offer their room's model TIP_AMOUNT for a custom request: a hold
    into a new escrow, and the request's row and deadline in Postgres."""
    return {
        model_id(room): (
            b'{"type":"request_offer","model":"%s","text":"bench","amount":%d,"key":"'
            % (model_id(room).encode(), TIP_AMOUNT),
        )
        for room in range(bench.args.rooms)
    }


def _prepare_dm(bench: TipsBench, http_port: int) -> dict[str, tuple[bytes, ...]]:
    """Each model sets her DM price to TIP_AMOUNT; fans DM their room's model
    with ``max_price`` that price (``dm.lua``: the block check, the inbox
    and the DM archive stream, whose copy into Postgres runs beside the
    ledger writer: in ``tokenchat ledger``, or in ``serve`` with
    ``--inline-ledger``)."""
    heads: dict[str, tuple[bytes, ...]] = {}
    for model, token in _model_tokens(bench).items():
        status, reply = http_json(
            f"http://{HOST}:{http_port}/v1/me/prices", token, {"dm": TIP_AMOUNT}, method="PUT"
        )
        if status != 200:
            raise RuntimeError(f"prices of {model} refused: {status} {reply}")
        heads[model] = (
            b'{"type":"dm","to":"%s","text":"bench","max_price":%d,"key":"'
            % (model.encode(), TIP_AMOUNT),
        )
    return heads


WORKLOADS: dict[str, Workload] = {
    "tip": Workload(kind="tip", prepare=_prepare_tip),
    "tip_item": Workload(kind="tip", prepare=_prepare_tip_item),
    "request_offer": Workload(kind="hold", prepare=_prepare_request_offer),
    # unlock, buy_ticket and meter: defined below (PAID WORKLOADS), added there.
    "dm": Workload(kind="dm", prepare=_prepare_dm),
}

# Frames of the fast path, compared as bytes: the server encodes replies with
# orjson and `type` first (tokenchat.protocol.events), and every event has no `re`.
OK_PREFIX = b'{"type":"ok"'
ERROR_PREFIX = b'{"type":"error"'
DUPLICATE_MARK = b'"duplicate":true'
# An unlock or a ticket the fan owned already: nothing charged, no ledger row.
# Must stay 0: each call names an item the fan has not bought (--items).
ALREADY_MARK = b'"already":true'


# ============================================================================
# Load processes: fans tipping
# ============================================================================


@dataclasses.dataclass(frozen=True, slots=True)
class PhaseSpec:
    """One measured phase, as the parent schedules it (CLOCK_MONOTONIC, ns)."""

    phase: Phase
    start_ns: int
    window_start_ns: int
    window_end_ns: int
    rate_per_fan: float  # tips/s each fan may send; 0: as fast as its acks come
    # Per room, the frames' heads (``Workload.prepare``): a fan's n-th call
    # sends ``heads[room][n % len]`` followed by its key.
    heads: Mapping[str, tuple[bytes, ...]]


class Tally:
    """What the fans of one load process counted in one phase (single-threaded)."""

    def __init__(self, spec: PhaseSpec, active: int) -> None:
        self.spec = spec
        self.stats = Stats()  # acks: count and latency histogram
        self.stats.window_start_ns = spec.window_start_ns
        self.stats.window_end_ns = spec.window_end_ns
        self.stats.counting = True
        self.sent = 0
        self.duplicates = 0  # ok with "duplicate": true (must stay 0: keys are fresh)
        self.already = 0  # ok with "already": true (must stay 0: items are fresh)
        self.errors: dict[str, int] = {}  # by code, over warm-up and window
        self.messages: dict[str, str] = {}  # the first message of each code, to say why
        self.errors_in_window = 0
        self.events = 0  # tip (and other) events the fans received
        self.unanswered = 0  # fans whose connection ended with a tip in flight
        self.active = active  # fans still in the phase
        self.done = asyncio.Event()
        if active == 0:
            self.done.set()

    def error(self, code: str, message: str, now_ns: int) -> None:
        self.errors[code] = self.errors.get(code, 0) + 1
        self.messages.setdefault(code, message)
        if self.spec.window_start_ns <= now_ns < self.spec.window_end_ns:
            self.errors_in_window += 1

    def fan_done(self) -> None:
        self.active -= 1
        if self.active <= 0:
            self.done.set()


class TipFan(Member):
    """A fan: a ``Member`` that, during a phase, tips in a loop on its acks.

    The loop runs in the protocol's callbacks (an ack sends the next tip from
    ``data_received``), without a task per fan, so the load process spends its
    time on the socket and not on scheduling.
    """

    def __init__(self, port: int, conn_stats: Stats, user_id: str, room: str) -> None:
        super().__init__(port, JSON_SUBPROTOCOL, conn_stats)
        self.user_id = user_id
        self.room = room
        self._heads: tuple[bytes, ...] = ()
        self._tally: Tally | None = None
        self._nonce = b""
        self._seq = 0
        self._sent_ns = 0
        self._in_flight = False
        self._stop_ns = 0
        self._rate = 0.0  # tips/s; 0 = unpaced
        self._tokens = 0.0
        self._refill_ns = 0
        self._timer: asyncio.TimerHandle | None = None

    # --- a phase ------------------------------------------------------------------
    def begin(self, tally: Tally, nonce: str) -> None:
        spec = tally.spec
        self._tally = tally
        self._heads = spec.heads[self.room]
        # A fresh idempotency key per tip: the nonce makes keys unique across
        # runs, whose fans have the same user ids (a reused key is a DUP).
        self._nonce = nonce.encode()
        # _seq goes on from the last phase: it picks the head too, and the
        # n-th call of a run must name the n-th item (an unlock or ticket
        # that names an item bought in the last phase answers `already`).
        self._in_flight = False
        self._stop_ns = spec.window_end_ns
        self._rate = spec.rate_per_fan
        if not self._heads:  # the server makes the calls (the meter)
            self.finish()
            return
        if self._rate <= 0:
            self._send_tip()
            return
        # Paced: start at a random point of the first interval, so the fans'
        # tips spread over time instead of arriving together every interval.
        # The bucket starts filling then, not now: tokens accrued during the
        # offset would bring every fan's second tip back to the same instant.
        self._timer = asyncio.get_running_loop().call_later(
            random.random() / self._rate, self._start_paced
        )

    def _start_paced(self) -> None:
        self._timer = None
        self._tokens = 1.0
        self._refill_ns = time.monotonic_ns()
        if self._tally is not None:
            self._next(self._refill_ns)

    def _send_tip(self) -> None:
        assert self._tally is not None
        self._seq += 1
        frame = self.tip_frame(self._heads[self._seq % len(self._heads)], self._seq)
        self._in_flight = True
        self._tally.sent += 1
        self._sent_ns = time.monotonic_ns()
        self.send_text(frame)

    def tip_frame(self, head: bytes, seq: int) -> bytes:
        """The frame of call ``seq``: its head, its key and its id (the
        socketio baseline's fans frame it their way)."""
        return b'%s%s-%d","id":%d}' % (head, self._nonce, seq, seq)

    def _next(self, now_ns: int) -> None:
        """After an ack (or a timer): tip again, wait for a token, or finish."""
        if now_ns >= self._stop_ns or self.transport is None or self.transport.is_closing():
            self.finish()
            return
        if self._rate <= 0:
            self._send_tip()
            return
        elapsed_s = (now_ns - self._refill_ns) / NS_PER_S
        self._tokens = min(BUCKET_TOKENS, self._tokens + elapsed_s * self._rate)
        self._refill_ns = now_ns
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            self._send_tip()
            return
        delay_s = (1.0 - self._tokens) / self._rate
        if now_ns + delay_s * NS_PER_S >= self._stop_ns:
            self.finish()  # its next token comes after the phase
            return
        self._timer = asyncio.get_running_loop().call_later(delay_s, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self._tally is not None and not self._in_flight:
            self._next(time.monotonic_ns())

    def finish(self) -> None:
        """Leave the phase (a tip still in flight counts as unanswered)."""
        tally, self._tally = self._tally, None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if tally is not None:
            if self._in_flight:
                tally.unanswered += 1
            tally.fan_done()

    # --- frames -------------------------------------------------------------------
    def _on_text(self, buf: bytearray, start: int, end: int, now_ns: int) -> None:
        if self._waiting:  # set-up: hello and join replies, matched by `re`
            super()._on_text(buf, start, end, now_ns)
            return
        tally = self._tally
        if tally is None:
            return  # between phases: a credit's balance push, presence, ...
        if buf.startswith(OK_PREFIX, start):
            if not self._in_flight:
                return
            self._in_flight = False
            tally.stats.record(now_ns, self._sent_ns)
            if buf.find(DUPLICATE_MARK, start, end) >= 0:
                tally.duplicates += 1
            if buf.find(ALREADY_MARK, start, end) >= 0:
                tally.already += 1
            self._next(now_ns)
        elif buf.startswith(ERROR_PREFIX, start):
            reply = orjson.loads(bytes(buf[start:end]))
            tally.error(str(reply.get("code")), str(reply.get("message")), now_ns)
            if self._in_flight:
                self._in_flight = False
                self._next(now_ns)
        else:
            tally.events += 1  # another fan's tip in this room, or presence

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.finish()


@dataclasses.dataclass(frozen=True, slots=True)
class FanWorkerSpec:
    port: int
    fan_indexes: tuple[int, ...]  # global fan numbers held by this process
    rooms: int
    jwt_secret: str
    cpus: frozenset[int] | None  # to pin this process to (None: anywhere)
    connect_concurrency: int  # fans set up at once by this process


def fan_id(index: int) -> str:
    return FAN_ID_FORMAT.format(index)


def model_id(room: int) -> str:
    return MODEL_ID_FORMAT.format(room)


async def open_fan(spec: FanWorkerSpec, conn_stats: Stats, index: int) -> TipFan:
    """A fan connected, authenticated and in its room."""
    user_id, room = fan_id(index), model_id(index % spec.rooms)
    fan = await open_member(
        "tokenchat",
        spec.port,
        conn_stats,
        user_id=user_id,
        role="fan",
        jwt_secret=spec.jwt_secret,
        room=room,
        protocol=lambda: TipFan(spec.port, conn_stats, user_id, room),
    )
    return cast(TipFan, fan)


async def run_phase(fans: list[TipFan], spec: PhaseSpec, conn_stats: Stats) -> dict[str, Any]:
    tally = Tally(spec, len(fans))
    disconnects_before = conn_stats.disconnects
    await asyncio.sleep(max(0.0, (spec.start_ns - time.monotonic_ns()) / NS_PER_S))
    nonce = secrets.token_hex(6)
    for fan in fans:
        fan.begin(tally, nonce)
    # Bounded: a tip the server never answers must not hold the phase forever.
    left_s = (spec.window_end_ns - time.monotonic_ns()) / NS_PER_S + PHASE_DRAIN_TIMEOUT_S
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(max(0.0, left_s)):
            await tally.done.wait()
    stuck = tally.active
    for fan in fans:
        fan.finish()  # the ones still waiting for an ack count as unanswered
    return {
        "fans": len(fans),
        "acked_total": tally.stats.received_total,
        "acked_in_window": tally.stats.received_in_window,
        "hist": tally.stats.hist,
        "sent": tally.sent,
        "duplicates": tally.duplicates,
        "already": tally.already,
        "errors": tally.errors,
        "error_messages": tally.messages,
        "errors_in_window": tally.errors_in_window,
        "events": tally.events,
        "unanswered": tally.unanswered,
        "stuck": stuck,
        "disconnects": conn_stats.disconnects - disconnects_before,
    }


async def fan_worker_async(
    spec: FanWorkerSpec,
    conn: Connection,
    opener: Callable[[FanWorkerSpec, Stats, int], Awaitable[TipFan]] | None = None,
) -> None:
    """A load process's fans: set up (by ``opener``, default ``open_fan``:
    tokenchat's), then one phase per message from the parent."""
    opener = opener or open_fan
    conn_stats = Stats()  # only its disconnect count is used
    conn_stats.counting = True
    fans: list[TipFan] = []
    gate = asyncio.Semaphore(spec.connect_concurrency)

    async def connect(index: int) -> None:
        async with gate:
            fans.append(await opener(spec, conn_stats, index))

    try:
        try:
            async with asyncio.timeout(SETUP_TIMEOUT_S), asyncio.TaskGroup() as group:
                for index in spec.fan_indexes:
                    group.create_task(connect(index))
        except Exception as exc:
            conn.send(("failed", f"connecting fans: {first_error(exc)!r}"))
            return
        conn.send(("ready", len(fans)))
        while True:
            message = await recv_from_parent(conn, SETUP_TIMEOUT_S)
            if message[0] != "phase":
                return
            conn.send(("result", await run_phase(fans, message[1], conn_stats)))
    finally:
        for fan in fans:
            fan.close()


def fan_worker_main(spec: FanWorkerSpec, conn: Connection) -> None:
    run_load_process(lambda: fan_worker_async(spec, conn), conn, spec.cpus)


# ============================================================================
# The baseline: the tip script straight from redis-py
# ============================================================================


@dataclasses.dataclass(frozen=True, slots=True)
class BaselineSpec:
    redis_url: str
    prefix: str  # its own keys, under the benchmark's prefix
    fans: int
    rooms: int
    cpus: frozenset[int] | None
    goal: bool = False  # each room has an active tip goal (--goal)
    limits: bool = False  # --limits: the fans' limits hashes hold limits


def goal_hash(room: str, goal: bool) -> dict[Any, Any]:
    """A baseline room's goal hash, as server/economy/goals.py writes it:
    none (id ''), or with --goal an active goal that no run reaches."""
    if not goal:
        return {"id": "", "room": room}
    return {
        "id": "g_" + room.encode().hex()[:24].rjust(24, "0"),
        "state": "active",
        "target": GOAL_TARGET_TOKENS,
        "progress": 0,
        "title": "bench goal",
        "room": room,
        "aon": "0",
        "deadline": "",
        "escrow": "",
        "escrow_key": "",
    }


class VirtualFan:
    """The parts of a fan's EVALSHA that ``Economy.tip`` computes per call but
    that do not change from one tip to the next (computed once here: the
    baseline is the Redis side of a tip, not its Python side). The order of
    KEYS and ARGV is ``TIP``'s declaration's, through ``TIP.call``."""

    def __init__(self, index: int, rooms: int, prefix: str, sha: str) -> None:
        from tokenchat.protocol import events
        from tokenchat.server.config import Settings
        from tokenchat.server.economy.actions import TIP
        from tokenchat.server.economy.economy import fingerprint, user_account, user_initiator
        from tokenchat.server.economy.scripts import history_trim
        from tokenchat.server.keys import Keys

        keys, settings = Keys(prefix), Settings()
        self.user_id = fan_id(index)
        room = owner = model_id(index % rooms)
        self.keys = keys
        self.nonce = secrets.token_hex(6)
        self.seq = 0
        self.sha = sha
        self.initiator = user_initiator(self.user_id)
        payer, payee = user_account(self.user_id), user_account(owner)
        # Filled per tip: the idempotency record, the transaction, the key.
        self.key_names, self.arg_names = TIP.all_keys, TIP.all_args
        self.script_keys, self.script_args = TIP.call(
            keys={
                "idem": None,
                "outbox": keys.outbox(),
                "payer_balance": keys.balance(payer),
                "payee_balance": keys.balance(payee),
                "history": keys.room_history(room),
                "room_show": keys.room_show(room),
                "room_channel": keys.room_channel(room),
                "goal": keys.goal(room),
                # No bench goal is all-or-nothing: the goal's hash stands in
                # for its escrow, as in Economy.tip before it learns one.
                "goal_escrow": keys.goal(room),
                "payer_limits": keys.limits(self.user_id),
                "payer_spent": keys.spent(self.user_id),
            },
            args={
                "request": fingerprint("tip", room=room, amount=TIP_AMOUNT, text=""),
                "tx": None,
                "outbox_max": settings.outbox_entries_max,
                "initiator": self.initiator,
                "key": None,
                "meta": orjson.dumps({"room": room}),
                "amount": TIP_AMOUNT,
                "tip_min": 1,  # every bench room keeps the default
                "payer": payer,
                "payee": payee,
                "room_channel": keys.room_channel(room),
                "event": orjson.dumps(events.tip_event_body(room, self.user_id, TIP_AMOUNT, "")),
                "payee_channel": keys.user_channel(owner),
                **history_trim(settings.history_len, settings.history_age_s),
            },
        )
        self.idem_at = self.key_names.index("idem")
        self.tx_at = self.arg_names.index("tx")
        self.key_at = self.arg_names.index("key")

    def call(self) -> list[str | bytes | int]:
        """EVALSHA's arguments for the next tip, in ``TIP``'s order."""
        from tokenchat.server.economy.economy import new_tx_id

        self.seq += 1
        key = f"{self.nonce}-{self.seq}"
        script_keys, script_args = list(self.script_keys), list(self.script_args)
        script_keys[self.idem_at] = self.keys.idempotency(self.initiator, key)
        script_args[self.tx_at] = new_tx_id()
        script_args[self.key_at] = key
        return [self.sha, len(script_keys), *script_keys, *script_args]


def _ok(result: Any) -> bool:
    return isinstance(result, list) and bool(result) and result[0] == b"OK"


class ModeTally:
    def __init__(self, window_start_ns: int, window_end_ns: int) -> None:
        self.stats = Stats()  # a pipeline's or a call's round trip
        self.stats.window_start_ns = window_start_ns
        self.stats.window_end_ns = window_end_ns
        self.calls_in_window = 0
        self.calls_total = 0
        self.errors: dict[str, int] = {}
        # Calls refused with NOSCRIPT: Redis forgot the script (someone flushed
        # the shared Redis's script cache). Nothing ran; the script is loaded
        # again, as the server's batcher does.
        self.noscript = 0

    def add(self, now_ns: int, sent_ns: int, results: Sequence[Any]) -> bool:
        """Count a round's results; False if the script must be loaded again."""
        from redis.exceptions import NoScriptError

        self.stats.record(now_ns, sent_ns)
        ok = 0
        loaded = True
        for result in results:
            if _ok(result):
                ok += 1
            elif isinstance(result, NoScriptError):
                self.noscript += 1
                loaded = False
            else:
                code = str(result[0] if isinstance(result, list) and result else result)
                self.errors[code] = self.errors.get(code, 0) + 1
        self.calls_total += ok
        if self.stats.window_start_ns <= now_ns < self.stats.window_end_ns:
            self.calls_in_window += ok
        return loaded


async def run_pipelined(
    redis: Any, script: LuaScript, fans: list[VirtualFan], tally: ModeTally
) -> None:
    """One pipeline of one EVALSHA per fan, again and again, as the batcher does."""
    while time.monotonic_ns() < tally.stats.window_end_ns:
        commands = [["EVALSHA", *fan.call()] for fan in fans]
        sent_ns = time.monotonic_ns()
        results = await send_pipeline(redis, commands)
        if not tally.add(time.monotonic_ns(), sent_ns, results):
            await redis.script_load(script.source)


async def run_unpipelined(
    redis: Any, script: LuaScript, fans: list[VirtualFan], tally: ModeTally
) -> None:
    """Each fan a coroutine with one EVALSHA at a time on a connection of its own."""

    async def one_fan(fan: VirtualFan) -> None:
        while time.monotonic_ns() < tally.stats.window_end_ns:
            call = fan.call()
            sent_ns = time.monotonic_ns()
            try:
                result = await redis.execute_command("EVALSHA", *call)
            except Exception as exc:  # a refusal or a dropped connection: counted
                result = exc
            if not tally.add(time.monotonic_ns(), sent_ns, [result]):
                await redis.script_load(script.source)

    async with asyncio.TaskGroup() as group:
        for fan in fans:
            group.create_task(one_fan(fan))


async def trim_outbox(redis: Any, outbox: str) -> None:
    while True:
        await asyncio.sleep(OUTBOX_TRIM_INTERVAL_S)
        await redis.xtrim(outbox, maxlen=OUTBOX_KEEP_ENTRIES, approximate=True)


def idempotency_pattern(prefix: str) -> str:
    """SCAN pattern of the idempotency keys under ``prefix`` (``Keys.idempotency``)."""
    from tokenchat.server.keys import Keys

    sample = Keys(prefix).idempotency("u", "k")
    return sample[: sample.index("idem:") + len("idem:")] + "*"


async def seed_virtual_fans(
    redis: Any, keys: Any, fans: int, rooms: int, limits: bool, goal: bool
) -> None:
    """What ``VirtualFan`` calls find in Redis: the fans' balances set high,
    their limits and counters loaded, the owners' balances and the rooms'
    goal hashes, as a fan's first tip on the server leaves them."""
    from tokenchat.server.economy.economy import user_account

    async with redis.pipeline(transaction=False) as pipe:
        for i in range(fans):
            pipe.set(keys.balance(user_account(fan_id(i))), BASELINE_BALANCE_TOKENS)
            # Loaded limits (none, or --limits's) and counters.
            loaded: dict[str | bytes, int] = {"v": 1}
            if limits:
                loaded.update(d=BENCH_LIMITS["daily"], w=BENCH_LIMITS["weekly"])
                loaded.update(m=BENCH_LIMITS["monthly"])
            pipe.hset(keys.limits(fan_id(i)), mapping=cast(Any, loaded))
            pipe.hset(keys.spent(fan_id(i)), "t", 0)
        for room in range(rooms):
            pipe.set(keys.balance(user_account(model_id(room))), 0)
            pipe.delete(keys.goal(model_id(room)))
            pipe.hset(keys.goal(model_id(room)), mapping=goal_hash(model_id(room), goal))
        await pipe.execute()


async def baseline_async(spec: BaselineSpec, conn: Connection) -> None:
    from redis.asyncio import Redis

    from tokenchat.server.economy.actions import TIP
    from tokenchat.server.keys import Keys

    keys = Keys(spec.prefix)
    # A connection per unpipelined fan, plus the trimmer's and spare ones.
    redis: Redis = Redis.from_url(
        spec.redis_url,
        max_connections=spec.fans + 8,
        socket_timeout=BASELINE_REDIS_TIMEOUT_S,
        socket_connect_timeout=BASELINE_REDIS_TIMEOUT_S,
    )
    try:
        script = TIP.script
        if await redis.script_load(script.source) != script.sha:
            raise RuntimeError("Redis's SHA1 of the tip script differs from the server's")
        fans = [VirtualFan(i, spec.rooms, spec.prefix, script.sha) for i in range(spec.fans)]
        await seed_virtual_fans(redis, keys, spec.fans, spec.rooms, spec.limits, spec.goal)
        conn.send(("ready", None))
        while True:
            message = await recv_from_parent(conn, SETUP_TIMEOUT_S)
            if message[0] != "go":
                return
            _, mode, start_ns, window_start_ns, window_end_ns = message
            await asyncio.sleep(max(0.0, (start_ns - time.monotonic_ns()) / NS_PER_S))
            tally = ModeTally(window_start_ns, window_end_ns)
            trimmer = asyncio.create_task(trim_outbox(redis, keys.outbox()))
            try:
                if mode == "pipelined":
                    await run_pipelined(redis, script, fans, tally)
                else:
                    await run_unpipelined(redis, script, fans, tally)
            finally:
                trimmer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await trimmer
            # Outside the window: the next mode starts from the same keyspace.
            await redis.unlink(keys.outbox())
            await delete_matching(redis, idempotency_pattern(spec.prefix))
            conn.send(
                (
                    "result",
                    {
                        "calls_in_window": tally.calls_in_window,
                        "calls_total": tally.calls_total,
                        "hist": tally.stats.hist,
                        "errors": tally.errors,
                        "noscript": tally.noscript,
                    },
                )
            )
    finally:
        await redis.aclose()


def baseline_main(spec: BaselineSpec, conn: Connection) -> None:
    run_load_process(lambda: baseline_async(spec, conn), conn, spec.cpus)


# ============================================================================
# The parent
# ============================================================================


def cpu_per_op(cpu: dict[str, float | None], main: str, per_s: float) -> dict[str, float | None]:
    """CPU time (us) per committed tip or call of the Python process, Redis and
    Postgres: unlike rates, these hardly move when other work shares the machine."""

    def per_op(pct: float | None) -> float | None:
        return None if pct is None or per_s <= 0 else pct / 100 / per_s * US_PER_S

    return {
        "main_us_per_op": per_op(cpu[main]),
        "redis_us_per_op": per_op(cpu["redis"]),
        "postgres_us_per_op": per_op(cpu["postgres"]) if main == "server" else None,
    }


class TipsBench(Bench):
    """The harness's ``Bench`` (isolated prefix and schema, subprocesses,
    cleanup of keys and schema in ``close``) with the tips scenario."""

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(args, "tips")
        self.admin_token = ""
        self.baseline_prefix = f"{self.redis_prefix}baseline:"
        self.baseline_started = False  # from then on there may be keys to delete
        self.ledger_writer: Server | None = None
        self.ledger_metrics_url = ""
        self.workload = WORKLOADS[args.action]
        self.heads: dict[str, tuple[bytes, ...]] = {}  # per room, from the workload
        self.progress_before = 0  # Workload.progress before the run's server started
        self.serve_ws_port = 0  # the running server's WebSocket port
        # What a workload keeps between prepare and finish (the meter's shows).
        self.workload_state: Any = None
        self.peer_started = False  # the socketio baseline ran: its schema may be left
        # Settings of the next tokenchat start (--delivery-latency: the mode).
        self.extra_env: dict[str, str] = {}

    def close(self, *, keep_logs: bool) -> None:
        super().close(keep_logs=keep_logs)
        if self.peer_started:
            from loadtests import tips_peer

            url = self.settings().database_url
            asyncio.run(drop_schema(url, tips_peer.peer_schema(self)))
        # Bench removes the prefix's keys only once tokenchat was migrated; the
        # baseline (first in odd runs) may have left keys before that.
        if self.baseline_started:
            asyncio.run(self.delete_keys(f"{self.redis_prefix}*"))

    # --- tokenchat ------------------------------------------------------------------
    def start_tokenchat(self, *, ledger: bool = True) -> tuple[Server, int]:
        """The server started on free ports and its rooms created; (server, HTTP port).

        With ``ledger``, a ledger writer too: ``tokenchat ledger`` beside it,
        or inside ``serve`` with ``--inline-ledger``; ``self.ledger_metrics_url``
        is where its lag histogram is. ``stop_tokenchat`` stops both.
        """
        from tokenchat.server.auth import issue_token

        inline = ledger and self.args.inline_ledger
        server, http_port = self.start_serve(
            TOKENCHAT_LEDGER_ENABLED="1" if inline else "0", **self.workload.env, **self.extra_env
        )
        self.ledger_metrics_url = f"http://{HOST}:{http_port}/metrics"
        self.ledger_writer = None
        if ledger and not inline:
            metrics_port = free_port()
            argv = ["-m", "tokenchat.server.cli", "ledger", "--metrics-port", str(metrics_port)]
            self.ledger_writer = self._spawn("tokenchat", argv, self.env, 0)
            self.ledger_metrics_url = f"http://{HOST}:{metrics_port}/metrics"
            url = self.ledger_metrics_url
            self._wait_ready(self.ledger_writer, lambda: http_answers(url))
        self.admin_token = issue_token(self.jwt_secret, ADMIN_ID, "admin")
        asyncio.run(self._models_hello(server.ws_port))
        if self.args.goal:
            self.set_goals(http_port)
        self.serve_ws_port = server.ws_port
        self.heads = self.workload.prepare(self, http_port)
        return server, http_port

    def stop_tokenchat(self, server: Server) -> None:
        server.stop()
        if self.ledger_writer is not None:
            self.ledger_writer.stop()
            self.ledger_writer = None

    def tokenchat_pids(self, server: Server) -> dict[str, list[int]]:
        """The processes whose CPU is tokenchat's: ``serve`` and its workers,
        and the ledger writer when it runs alone."""
        writer = self.ledger_writer
        return {
            "server": process_tree(server.process.pid),
            "ledger": [writer.process.pid] if writer is not None else [],
        }

    async def _models_hello(self, port: int) -> None:
        """Each room exists once its model has said hello (DESIGN.md section 3)."""

        async def hello(room: int) -> None:
            member = await open_member(
                "tokenchat",
                port,
                Stats(),
                user_id=model_id(room),
                role="model",
                jwt_secret=self.jwt_secret,
            )
            member.close()

        async with asyncio.TaskGroup() as group:
            for room in range(self.args.rooms):
                group.create_task(hello(room))

    def set_goals(self, http_port: int) -> None:
        """--goal: every room gets a tip goal (PUT /v1/me/goal) that no run
        reaches, so every tip counts toward it."""
        from tokenchat.server.auth import issue_token

        url = f"http://{HOST}:{http_port}/v1/me/goal"
        for room in range(self.args.rooms):
            token = issue_token(self.jwt_secret, model_id(room), "model")
            body = {"title": "bench goal", "target": GOAL_TARGET_TOKENS}
            status, reply = http_json(url, token, body, method="PUT")
            if status != 200:
                raise RuntimeError(f"goal of {model_id(room)} refused: {status} {reply}")

    def fund_fans(self, http_port: int, number: int) -> None:
        url = f"http://{HOST}:{http_port}/v1/admin/credits"

        def fund(index: int) -> None:
            # The key is the admin's: one per credit, or the second fan's is a CONFLICT.
            key = f"fund-{number}-{index}"
            body = {"user": fan_id(index), "amount": FUND_TOKENS, "key": key}
            for _ in range(FUND_ATTEMPTS):
                status, reply = http_json(url, self.admin_token, body)
                # 503: the ledger did not confirm in time and the outcome is
                # unknown; the same key makes the retry exactly-once.
                if status != 503:
                    break
            if status != 200:
                raise RuntimeError(f"credit for {fan_id(index)} refused: {status} {reply}")

        with concurrent.futures.ThreadPoolExecutor(FUND_CONCURRENCY) as pool:
            list(pool.map(fund, range(self.args.fans)))
        if self.args.limits:
            self.limit_fans(http_port)

    def limit_fans(self, http_port: int) -> None:
        """``--limits``: every fan sets a daily, weekly and monthly limit far
        above what the run spends, so that each tip's user gate checks all
        three windows (none set: it still counts them)."""
        from tokenchat.server.auth import issue_token

        url = f"http://{HOST}:{http_port}/v1/me/limits"

        def limit(index: int) -> None:
            token = issue_token(self.jwt_secret, fan_id(index), "fan")
            status, reply = http_json(url, token, BENCH_LIMITS, method="PUT")
            if status != 200:
                raise RuntimeError(f"limits of {fan_id(index)} refused: {status} {reply}")

        with concurrent.futures.ThreadPoolExecutor(FUND_CONCURRENCY) as pool:
            list(pool.map(limit, range(self.args.fans)))

    def run_tokenchat(
        self, number: int, capped_rate: float, profile: Path | None
    ) -> list[dict[str, Any]]:
        """Both phases on one server; their rows, with the ledger's checks."""
        args = self.args
        tips_before = self._ledger_rows()
        # Before the server starts: prepare may start the calls (the meter's
        # shows run from their accept on), and the ledger counts those too.
        self.progress_before = self.workload.progress(self) if self.workload.progress else 0
        server, http_port = self.start_tokenchat()
        conns: list[Connection] = []
        try:
            context = multiprocessing.get_context("spawn")
            procs = min(args.load_procs, args.fans)
            for w in range(procs):
                spec = FanWorkerSpec(
                    port=server.ws_port,
                    fan_indexes=tuple(range(w, args.fans, procs)),
                    rooms=args.rooms,
                    jwt_secret=self.jwt_secret,
                    cpus=self.loadgen_cpus,
                    connect_concurrency=max(1, CONNECT_CONCURRENCY_TOTAL // procs),
                )
                conns.append(self._start_worker(context, fan_worker_main, spec, f"fans-{w}"))
            ready = self._gather(conns, "ready", SETUP_TIMEOUT_S + CONNECT_TIMEOUT_S, server)
            connected = sum(int(value) for value in ready)
            if connected != args.fans:
                raise RuntimeError(f"only {connected} of {args.fans} fans connected")
            self.fund_fans(http_port, number)
            rows = [self._phase(conns, server, number, "full", 0.0, profile)]
            # The full phase leaves a ledger backlog that the writer (in the
            # server process) then works off; the capped phase starts once it
            # is gone, as the full phase did, so that its latency is that of
            # its own load.
            rows[0]["ledger_drain_s"] = self._wait_outbox_empty(server)
            # NaN when no baseline was measured (it failed); a server-driven
            # workload (the meter) cannot be paced by the fans.
            if capped_rate > 0 and self.workload.progress is None:
                rows.append(
                    self._phase(conns, server, number, "capped", capped_rate / args.fans, None)
                )
            for conn in conns:
                conn.send(("stop", None))
            self._stop_workers()
            if self.workload.finish is not None:
                self.workload.finish(self, http_port)
            status, reconcile = http_json(
                f"http://{HOST}:{http_port}/v1/admin/reconcile",
                self.admin_token,
                timeout_s=RECONCILE_TIMEOUT_S,
            )
            _, metrics_text = http_json(self.ledger_metrics_url)
        finally:
            self._stop_workers()
            for conn in conns:
                conn.close()
            # Left by a run that failed before its workload's finish.
            state, self.workload_state = self.workload_state, None
            if state is not None:
                state.close()
            self.stop_tokenchat(server)
        buckets = ledger_lag_buckets(metrics_text if isinstance(metrics_text, str) else "")
        reconciled = isinstance(reconcile, dict) and status == 200 and reconcile.get("ok") is True
        acked = sum(row["acked_total"] - row["duplicates"] - row["already"] for row in rows)
        if self.workload.progress is not None:
            # The server's calls: every one it made (its count, after finish).
            acked = self.workload.progress(self) - self.progress_before
        ledger = {
            "reconcile_ok": reconciled,
            "reconcile": reconcile if isinstance(reconcile, dict) else {"error": reconcile},
            "ledger_tips": self._ledger_rows() - tips_before,
            "acked_tips": acked,
            "lag_p50_ms": 1000 * histogram_quantile(buckets, 0.50),
            "lag_p99_ms": 1000 * histogram_quantile(buckets, 0.99),
            "lag_max_bucket_s": max((b for b, _ in buckets if not math.isinf(b)), default=None),
        }
        for row in rows:
            row["ledger"] = ledger
            row["writer_batch"] = self._writer_batch(*row["window_ms"])
        # The fans' idempotency keys are no use after the run; without them the
        # next run starts from the same keyspace size as this one did.
        asyncio.run(self.delete_keys(idempotency_pattern(self.redis_prefix)))
        return rows

    def _phase(
        self,
        conns: list[Connection],
        server: Server,
        number: int,
        phase: Phase,
        rate_per_fan: float,
        profile: Path | None,
        *,
        kind: Kind | None = None,
        heads: Mapping[str, tuple[bytes, ...]] | None = None,
    ) -> dict[str, Any]:
        """One phase of the fans against ``server``; its row. ``kind`` names
        the row (default: tokenchat's phases), ``heads`` what the fans send
        (default: the workload's)."""
        args = self.args
        start_ns, window_start_ns, window_end_ns = schedule(args.warmup, args.duration)
        heads = self.heads if heads is None else heads
        spec = PhaseSpec(phase, start_ns, window_start_ns, window_end_ns, rate_per_fan, heads)
        for conn in conns:
            conn.send(("phase", spec))
        pids = {
            **self.tokenchat_pids(server),
            "redis": self.redis_pids(),
            "loadgen": self.loadgen_pids(),
        }
        counted = self.workload.progress
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            # The server's own calls are counted at the window's bounds, beside
            # the CPU sampling (a count takes a few ms: far under the window).
            progress = (
                pool.submit(self._progress_over, counted, window_start_ns, window_end_ns)
                if counted is not None
                else None
            )
            cpu = self.measure_cpu(
                server, pids, window_start_ns, window_end_ns, profile, postgres=True
            )
            calls_in_window = progress.result() if progress is not None else None
        wait_s = (window_end_ns - time.monotonic_ns()) / NS_PER_S
        # The window in wall-clock ms, as the ledger's applied_ms counts it.
        wall_ms, now_ns = time.time() * 1000, time.monotonic_ns()
        window_ms = (
            int(wall_ms - (now_ns - window_start_ns) / 1e6),
            int(wall_ms - (now_ns - window_end_ns) / 1e6),
        )
        reports = self._gather(
            conns, "result", wait_s + PHASE_DRAIN_TIMEOUT_S + REPORT_SLACK_S, server
        )
        hist = merge_hists([r["hist"] for r in reports])
        offered = rate_per_fan * args.fans if rate_per_fan else None
        if calls_in_window is None:
            calls_in_window = sum(r["acked_in_window"] for r in reports)
        per_s = calls_in_window / args.duration
        return {
            "run": number,
            "kind": kind or ("tokenchat" if phase == "full" else "capped"),
            "per_s": per_s,
            "offered_per_s": offered,
            "p50_ms": hist_percentile_ms(hist, 0.50),
            "p99_ms": hist_percentile_ms(hist, 0.99),
            "acked_total": sum(r["acked_total"] for r in reports),
            "sent": sum(r["sent"] for r in reports),
            "duplicates": sum(r["duplicates"] for r in reports),
            "already": sum(r["already"] for r in reports),
            "errors": merge_counts([r["errors"] for r in reports]),
            "error_messages": {k: v for r in reports for k, v in r["error_messages"].items()},
            "errors_in_window": sum(r["errors_in_window"] for r in reports),
            "events_per_s": sum(r["events"] for r in reports) / (args.warmup + args.duration),
            "unanswered": sum(r["unanswered"] for r in reports),
            "disconnects": sum(r["disconnects"] for r in reports),
            "cpu_main_pct": cpu["server"],
            "cpu_ledger_pct": cpu["ledger"],
            "cpu_redis_pct": cpu["redis"],
            "cpu_postgres_pct": cpu["postgres"],
            "cpu_loadgen_pct": cpu["loadgen"],
            "cpu_irq_pct": cpu["irq"],
            "cpu_other_pct": cpu["other"],
            **cpu_per_op(cpu, "server", per_s),
            "window_ms": window_ms,
        }

    def _progress_over(
        self, counted: Callable[[TipsBench], int], start_ns: int, end_ns: int
    ) -> int:
        """How much ``counted`` grew from ``start_ns`` to ``end_ns`` (monotonic)."""
        time.sleep(max(0.0, (start_ns - time.monotonic_ns()) / NS_PER_S))
        first = counted(self)
        time.sleep(max(0.0, (end_ns - time.monotonic_ns()) / NS_PER_S))
        return counted(self) - first

    def _wait_outbox_empty(self, server: Server) -> float | None:
        """Seconds until the ledger outbox was empty; None if it was not in time."""
        from redis import Redis

        from tokenchat.server.keys import Keys

        outbox = Keys(self.redis_prefix).outbox()
        client: Redis = Redis.from_url(self.settings().redis_url)
        start = time.monotonic()
        try:
            while client.xlen(outbox) > 0:
                if server.process.poll() is not None:
                    raise RuntimeError(f"tokenchat exited:\n{server.log_tail()}")
                if time.monotonic() - start > LEDGER_DRAIN_TIMEOUT_S:
                    return None
                time.sleep(POLL_INTERVAL_S)
        finally:
            client.close()
        return time.monotonic() - start

    def _ledger_rows(self) -> int:
        """Transactions of the workload's kind in this benchmark's Postgres
        schema (0 before migrate)."""
        if not self.migrated:
            return 0

        async def count() -> int:
            import asyncpg

            conn = await asyncpg.connect(self.settings().database_url)
            try:
                value = await conn.fetchval(
                    f'SELECT count(*) FROM "{self.schema}".ledger_transactions WHERE kind = $1',
                    self.workload.kind,
                )
            finally:
                await conn.close()
            return int(value)

        return asyncio.run(count())

    def _writer_batch(self, start_ms: int, end_ms: int) -> float:
        """Ledger transactions per writer transaction among those Redis
        applied from ``start_ms`` to ``end_ms``: the batch the writer formed
        at that load (each batch is one Postgres transaction, one
        ``writer_xid``; a batch crossing the window's edges counts in part).
        NaN when the window holds none."""

        async def mean() -> float:
            import asyncpg

            conn = await asyncpg.connect(self.settings().database_url)
            try:
                value = await conn.fetchval(
                    f"""SELECT count(*)::float8 / nullif(count(DISTINCT writer_xid), 0)
                        FROM "{self.schema}".ledger_transactions
                        WHERE applied_ms >= $1 AND applied_ms < $2""",
                    start_ms,
                    end_ms,
                )
            finally:
                await conn.close()
            return math.nan if value is None else float(value)

        return asyncio.run(mean())

    # --- the baseline ---------------------------------------------------------------
    def run_baseline(self, number: int) -> list[dict[str, Any]]:
        args = self.args
        spec = BaselineSpec(
            redis_url=self.settings().redis_url,
            prefix=self.baseline_prefix,
            fans=args.fans,
            rooms=args.rooms,
            # --pin: the baseline plays the server's part, so it gets the server's CPU.
            cpus=self.server_cpus,
            goal=args.goal,
            limits=args.limits,
        )
        context = multiprocessing.get_context("spawn")
        parent_end, child_end = context.Pipe()
        self.baseline_started = True
        process = context.Process(
            target=baseline_main, args=(spec, child_end), name="baseline", daemon=True
        )
        process.start()
        child_end.close()
        self.workers.append(process)
        rows: list[dict[str, Any]] = []
        try:
            self._receive(parent_end, process, "ready", BASELINE_START_TIMEOUT_S)
            modes: tuple[Mode, ...] = ("pipelined", "unpipelined")
            for mode in modes:
                start_ns, window_start_ns, window_end_ns = schedule(args.warmup, args.duration)
                parent_end.send(("go", mode, start_ns, window_start_ns, window_end_ns))
                assert process.pid is not None
                pids = {"client": [process.pid], "redis": self.redis_pids()}
                cpu = sample_cpu(pids, window_start_ns, window_end_ns, postgres=True)
                wait_s = (window_end_ns - time.monotonic_ns()) / NS_PER_S
                report = self._receive(
                    parent_end, process, "result", wait_s + BASELINE_CLEANUP_TIMEOUT_S
                )
                per_s = report["calls_in_window"] / args.duration
                rows.append(
                    {
                        "run": number,
                        "kind": mode,
                        "per_s": per_s,
                        "p50_ms": hist_percentile_ms(report["hist"], 0.50),
                        "p99_ms": hist_percentile_ms(report["hist"], 0.99),
                        "acked_total": report["calls_total"],
                        "errors": report["errors"],
                        "noscript": report["noscript"],
                        "cpu_main_pct": cpu["client"],
                        "cpu_redis_pct": cpu["redis"],
                        "cpu_postgres_pct": cpu["postgres"],
                        "cpu_loadgen_pct": None,
                        "cpu_irq_pct": cpu["irq"],
                        "cpu_other_pct": cpu["other"],
                        **cpu_per_op(cpu, "client", per_s),
                    }
                )
            parent_end.send(("stop", None))
            process.join(WORKER_STOP_TIMEOUT_S)
        finally:
            self._stop_workers()
            parent_end.close()
        return rows

    @staticmethod
    def _receive(
        conn: Connection,
        process: multiprocessing.process.BaseProcess,
        expected: str,
        timeout_s: float,
    ) -> Any:
        deadline = time.monotonic() + timeout_s
        while not conn.poll(POLL_INTERVAL_S):
            if not process.is_alive():
                raise RuntimeError("the baseline process died; see its traceback above")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the baseline process did not report {expected!r} in time")
        kind, value = conn.recv()
        if kind != expected:
            raise RuntimeError(f"baseline process: {kind}: {value}")
        return value


# ============================================================================
# Figures
# ============================================================================


def ratio_of(rows: list[dict[str, Any]]) -> float:
    return ratio_of_medians(rows, "kind", "tokenchat", "pipelined", "per_s")


ROWS: tuple[tuple[str, str, str], ...] = (
    ("per_s", "committed/s", "{:,.0f}"),
    ("offered_per_s", "offered/s (cap)", "{:,.0f}"),
    ("p50_ms", "ack p50 ms", "{:.2f}"),
    ("p99_ms", "ack p99 ms", "{:.2f}"),
    ("main_us_per_op", "python CPU us/op", "{:.0f}"),
    ("redis_us_per_op", "redis CPU us/op", "{:.0f}"),
    ("postgres_us_per_op", "postgres us/op", "{:.0f}"),
    ("writer_batch", "writer batch", "{:.0f}"),
    ("cpu_main_pct", "python CPU %", "{:.0f}"),
    ("cpu_ledger_pct", "ledger writer CPU %", "{:.0f}"),
    ("cpu_redis_pct", "redis CPU %", "{:.0f}"),
    ("cpu_postgres_pct", "postgres CPU %", "{:.0f}"),
    ("cpu_loadgen_pct", "loadgen CPU %", "{:.0f}"),
    ("cpu_irq_pct", "irq+softirq CPU %", "{:.0f}"),
    ("cpu_other_pct", "other procs CPU %", "{:.0f}"),
)
COLUMNS: tuple[tuple[Kind, str], ...] = (
    ("tokenchat", "tokenchat"),
    ("capped", "tokenchat capped"),
    ("pipelined", "baseline pipelined"),
    ("unpipelined", "baseline unpipelined"),
    ("socketio", "socketio+asyncpg"),
)
COLUMN_WIDTH = 24  # characters


def render_table(args: argparse.Namespace, rows: list[dict[str, Any]]) -> str:
    def cell(kind: Kind, key: str, fmt: str) -> str:
        return median_range(values_of(rows, "kind", kind, key), fmt)

    lines = [
        f"tips (--action {args.action}): {args.fans} fans in {args.rooms} rooms, "
        f"amount {TIP_AMOUNT}, one call in flight "
        f"per fan, {args.runs} run(s) x {args.duration:g} s (after {args.warmup:g} s warm-up), "
        f"{args.load_procs} load processes, {os.cpu_count()} CPUs",
        "median (min-max over runs); latency: tokenchat per tip ack, baseline pipelined per "
        "pipeline of one call per fan, unpipelined per call; python CPU: tokenchat server / "
        "baseline client",
        f"{'':<18} " + " ".join(f"{title:<{COLUMN_WIDTH}}" for _, title in COLUMNS),
    ]
    for key, label, fmt in ROWS:
        cells = " ".join(f"{cell(kind, key, fmt):<{COLUMN_WIDTH}}" for kind, _ in COLUMNS)
        lines.append(f"{label:<18} {cells}".rstrip())
    pairs = per_run_ratios(rows, "kind", "tokenchat", "pipelined", "per_s")
    ratio = ratio_of(rows)
    verdict = "meets" if ratio >= RATIO_GOAL else "BELOW"
    lines.append(
        f"ratio tokenchat / pipelined baseline (committed/s, medians): {ratio:.2f} "
        f"({verdict} the goal {RATIO_GOAL})   per run: {' '.join(f'{p:.2f}' for p in pairs)}"
    )
    if any(r["kind"] == "socketio" for r in rows):
        peer = " ".join(
            f"{p:.2f}" for p in per_run_ratios(rows, "kind", "tokenchat", "socketio", "per_s")
        )
        lines.append(
            "ratio tokenchat / socketio+asyncpg (committed/s, medians): "
            f"{ratio_of_medians(rows, 'kind', 'tokenchat', 'socketio', 'per_s'):.2f}"
            f"   per run: {peer}"
        )
    if not any(r["kind"] == "capped" for r in rows):
        # A server-driven workload (the meter) has no capped phase.
        return "\n".join([*lines, *_render_checks(args, rows)])
    capped_p99 = median_of(rows, "kind", "capped", "p99_ms")
    verdict = "meets" if capped_p99 < CAPPED_P99_GOAL_MS else "ABOVE"
    offered = median_of(rows, "kind", "capped", "offered_per_s")
    committed = median_of(rows, "kind", "capped", "per_s")
    where = (
        "at --capped-rate"
        if args.capped_rate
        else f"at {CAPPED_FRACTION:.0%} of the pipelined rate"
    )
    lines.append(
        f"{where} (offered {offered:,.0f}/s, committed {committed:,.0f}/s): "
        f"ack p50 {median_of(rows, 'kind', 'capped', 'p50_ms'):.2f} ms, "
        f"p99 {capped_p99:.2f} ms ({verdict} the goal p99 < {CAPPED_P99_GOAL_MS:g} ms)"
    )
    if committed < SATURATED_SHARE * offered:
        lines.append(
            "  saturated: tokenchat committed less than it was offered, so the capped phase "
            "ran at full load and its latency is that of a queue, not of a tip"
        )
    return "\n".join([*lines, *_render_checks(args, rows)])


def _render_checks(args: argparse.Namespace, rows: list[dict[str, Any]]) -> list[str]:
    """The table's lines after the figures: ledger backlog, errors, checks."""
    lines: list[str] = []
    drains = [r.get("ledger_drain_s") for r in rows if r["kind"] == "tokenchat"]
    if drains:
        lines.append(
            "ledger backlog after the full phase, worked off before the capped one in: "
            + ", ".join("over the limit" if d is None else f"{d:.1f} s" for d in drains)
        )
    for kind, title in COLUMNS:
        errors = merge_counts([r["errors"] for r in rows if r["kind"] == kind])
        odd = sum(
            r.get("duplicates", 0) + r.get("unanswered", 0) + r.get("already", 0)
            for r in rows
            if r["kind"] == kind
        )
        odd += sum(r.get("disconnects", 0) for r in rows if r["kind"] == kind)
        noscript = sum(r.get("noscript", 0) for r in rows if r["kind"] == kind)
        if noscript:
            lines.append(
                f"{title}: {noscript} calls met NOSCRIPT (script cache flushed), not counted"
            )
        if errors or odd:
            lines.append(
                f"{title}: errors by code {errors or '{}'}; "
                f"duplicates+already+unanswered+disconnects {odd}"
            )
        messages = {
            k: v for r in rows if r["kind"] == kind for k, v in r.get("error_messages", {}).items()
        }
        for code, message in sorted(messages.items()):
            lines.append(f"  {code}: {message}")
    noisy = [r for r in rows if (r.get("cpu_other_pct") or 0.0) > OTHER_BUSY_WARN_PCT]
    if noisy:
        lines.append(
            "WARNING: other processes used over "
            f"{OTHER_BUSY_WARN_PCT:g}% of a CPU during: "
            + ", ".join(f"{r['kind']}#{r['run']} ({r['cpu_other_pct']:.0f}%)" for r in noisy)
            + " (a shared machine: see --wait-idle)"
        )
    ledgers = [r["ledger"] for r in rows if r["kind"] == "tokenchat"]
    if ledgers:
        lag50 = [x["lag_p50_ms"] for x in ledgers if not math.isnan(x["lag_p50_ms"])]
        lag99 = [x["lag_p99_ms"] for x in ledgers if not math.isnan(x["lag_p99_ms"])]
        checks = " ".join(
            f"#{r['run']}:{'ok' if x['reconcile_ok'] else 'NOT OK'}"
            f"{'' if x['ledger_tips'] == x['acked_tips'] else ' TIPS MISMATCH'}"
            for r, x in zip([r for r in rows if r["kind"] == "tokenchat"], ledgers, strict=True)
        )
        lines.append(
            f"ledger: reconcile after each run {checks}; tips in Postgres = tips acked: "
            + ", ".join(f"{x['ledger_tips']}/{x['acked_tips']}" for x in ledgers)
        )
        if lag50 and lag99:
            lines.append(
                f"ledger lag (commit in Redis -> in Postgres, whole run, from /metrics buckets): "
                f"p50 {statistics.median(lag50):.0f} ms ({min(lag50):.0f}-{max(lag50):.0f}), "
                f"p99 {statistics.median(lag99):.0f} ms ({min(lag99):.0f}-{max(lag99):.0f})"
            )
    peers = [r for r in rows if r["kind"] == "socketio"]
    if peers:
        lines.append(
            "socketio+asyncpg books after each run (tips in Postgres = tips acked, none "
            "negative, balances = funding - tips sent + tips received): "
            + ", ".join(
                f"#{r['run']}:{'ok' if r['ledger']['reconcile_ok'] else 'NOT OK'} "
                f"{r['ledger']['ledger_tips']}/{r['ledger']['acked_tips']}"
                for r in peers
            )
        )
    return lines


def report_json(args: argparse.Namespace, rows: list[dict[str, Any]]) -> dict[str, Any]:
    tips = {
        "value": median_of(rows, "kind", "tokenchat", "per_s"),
        "unit": "tips/s",
        "baseline": median_of(rows, "kind", "pipelined", "per_s"),
        "baseline_unpipelined": median_of(rows, "kind", "unpipelined", "per_s"),
        "ratio": ratio_of(rows),
        "ratio_goal": RATIO_GOAL,
        "p50_ms": median_of(rows, "kind", "tokenchat", "p50_ms"),
        "p99_ms": median_of(rows, "kind", "tokenchat", "p99_ms"),
        "capped_offered_per_s": median_of(rows, "kind", "capped", "offered_per_s"),
        "capped_per_s": median_of(rows, "kind", "capped", "per_s"),
        "capped_p50_ms": median_of(rows, "kind", "capped", "p50_ms"),
        "capped_p99_ms": median_of(rows, "kind", "capped", "p99_ms"),
        "capped_p99_goal_ms": CAPPED_P99_GOAL_MS,
        # The second baseline (loadtests.tips_peer), NaN (null) with --no-peer.
        "peer": median_of(rows, "kind", "socketio", "per_s"),
        "peer_name": "python-socketio + AsyncRedisManager, one asyncpg transaction per tip",
        "peer_ratio": ratio_of_medians(rows, "kind", "tokenchat", "socketio", "per_s"),
        "peer_p50_ms": median_of(rows, "kind", "socketio", "p50_ms"),
        "peer_p99_ms": median_of(rows, "kind", "socketio", "p99_ms"),
        "peer_python_us_per_tip": median_of(rows, "kind", "socketio", "main_us_per_op"),
        "peer_postgres_us_per_tip": median_of(rows, "kind", "socketio", "postgres_us_per_op"),
        "python_us_per_tip": median_of(rows, "kind", "tokenchat", "main_us_per_op"),
        "postgres_us_per_tip": median_of(rows, "kind", "tokenchat", "postgres_us_per_op"),
        "fans": args.fans,
        "rooms": args.rooms,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "load_procs": args.load_procs,
        "runs": rows,
    }
    return {"scenarios": {"tips": clean_json(tips)}, "machine": machine_summary()}


# ============================================================================
# Paid workloads: unlock, buy_ticket and the private-show meter
# ============================================================================

# Items (media to unlock, ticket shows) each model makes per run, unless
# --items says: the n-th call of a fan names the n-th item of its room, so a
# fan needs one item per call of the run (both phases) or its next calls are
# `already` answers that charge nothing (counted, and reported). This many
# calls/s per fan is several times what 200 fans reach on 2 CPUs.
ITEMS_CALLS_PER_FAN_PER_S = 20.0  # calls/s
ITEMS_CONCURRENCY = 8  # media or shows created at once while preparing
# A ticket show starts this far ahead: it stays `scheduled` (tickets sell) for
# the whole run, and its no-show deadline is never due during it.
SHOW_STARTS_AHEAD_S = 3600
SHOW_MIN_S = 60  # its minimum length (never reached: it never starts)
# The meter: 1-s billing periods (the setting's default is 10 s), so that each
# running show costs one tick a second. At 60 tokens a minute a tick charges
# one token, and a show's final charge is a whole token too.
METER_TICK_S = 1
METER_RATE = 60  # tokens a minute
METER_SETUP_TIMEOUT_S = 120.0  # every show requested and accepted
METER_END_TIMEOUT_S = 120.0  # every show ended (and settled: its final charge)


def items_per_room(bench: TipsBench) -> int:
    args = bench.args
    if args.items:
        return int(args.items)
    seconds = float(args.warmup) + float(args.duration)
    return math.ceil(ITEMS_CALLS_PER_FAN_PER_S * 2 * seconds)


def _prepare_unlock(bench: TipsBench, http_port: int) -> dict[str, tuple[bytes, ...]]:
    """Each model uploads ``items_per_room`` locked photos at TIP_AMOUNT
    through the catalog (``MediaCatalog.create``: the sniffing, the blurred
    thumbnail and the row that POST /v1/media makes, without the HTTP upload
    and its per-user rate limit); each fan unlocks a new one each call."""
    return asyncio.run(_create_media(bench))


def _tiny_png() -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (2, 2), (200, 40, 90)).save(out, "PNG")
    return out.getvalue()


async def _create_media(bench: TipsBench) -> dict[str, tuple[bytes, ...]]:
    import io
    import tempfile

    from redis.asyncio import Redis

    from tokenchat.server.catalog.media import LocalDiskStore, MediaCatalog, Upload
    from tokenchat.server.db import create_pool
    from tokenchat.server.keys import Keys

    settings = bench.settings()
    png = _tiny_png()
    count = items_per_room(bench)
    pool = await create_pool(
        settings.database_url,
        bench.schema,
        min_size=1,
        max_size=ITEMS_CONCURRENCY,
        timeout_s=SETUP_TIMEOUT_S,
    )
    redis: Redis = Redis.from_url(settings.redis_url)
    gate = asyncio.Semaphore(ITEMS_CONCURRENCY)
    # The files go to a directory deleted at the end: the benchmark never
    # reads content, only the rows (and the cache the unlock script reads,
    # which the server loads from them).
    with tempfile.TemporaryDirectory(prefix="tokenchat-bench-media-") as root:
        catalog = MediaCatalog(
            pool, redis, Keys(bench.redis_prefix), LocalDiskStore(Path(root)), settings
        )

        async def one(owner: str) -> str:
            async with gate:
                upload = Upload(io.BytesIO(png), len(png))
                info = await catalog.create(owner, upload, TIP_AMOUNT, None, None)
                return info.id

        try:
            heads: dict[str, tuple[bytes, ...]] = {}
            for room in range(bench.args.rooms):
                model = model_id(room)
                ids = await asyncio.gather(*(one(model) for _ in range(count)))
                heads[model] = tuple(
                    b'{"type":"unlock","media":"%s","max_price":%d,"key":"'
                    % (media.encode(), TIP_AMOUNT)
                    for media in ids
                )
        finally:
            await pool.close()
            await redis.aclose()
    return heads


def _prepare_buy_ticket(bench: TipsBench, http_port: int) -> dict[str, tuple[bytes, ...]]:
    """Each model schedules ``items_per_room`` ticket shows at TIP_AMOUNT
    (POST /v1/me/shows, an hour ahead); each fan buys a ticket to a new one
    each call (ticket.lua: the price into the show's escrow)."""
    tokens = _model_tokens(bench)
    count = items_per_room(bench)
    starts_at_ms = int((time.time() + SHOW_STARTS_AHEAD_S) * 1000)

    def schedule_show(model: str) -> str:
        status, reply = http_json(
            f"http://{HOST}:{http_port}/v1/me/shows",
            tokens[model],
            {"title": "bench", "price": TIP_AMOUNT, "starts_at": starts_at_ms,
             "min_s": SHOW_MIN_S},
        )  # fmt: skip
        if status != 201:
            raise RuntimeError(f"show of {model} refused: {status} {reply}")
        return str(reply["show"])

    heads: dict[str, tuple[bytes, ...]] = {}
    with concurrent.futures.ThreadPoolExecutor(ITEMS_CONCURRENCY) as pool:
        for model in tokens:
            shows = list(pool.map(schedule_show, [model] * count))
            heads[model] = tuple(
                b'{"type":"buy_ticket","room":"%s","show":"%s","key":"'
                % (model.encode(), show.encode())
                for show in shows
            )
    return heads


class MeterShows:
    """One running private show per room (its fan: fan ``room``, who sits in
    it), held open for the run: billing pauses while either side has no
    session (``Privates.away``), so both stay connected here, on an event
    loop of this thread's own, from ``prepare`` to ``finish``."""

    def __init__(self, bench: TipsBench, ws_port: int) -> None:
        self.bench = bench
        self.ws_port = ws_port
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=self.loop.run_forever, name="meter-shows", daemon=True
        )
        self.thread.start()
        self.members: list[Member] = []
        self.shows: dict[str, Member] = {}  # show id -> its fan's connection
        self.ids = itertools.count(1)

    def run(self, coro: Any, timeout_s: float) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    async def _open(self, user_id: str, role: str) -> Member:
        member = await open_member(
            "tokenchat",
            self.ws_port,
            Stats(),
            user_id=user_id,
            role=role,
            jwt_secret=self.bench.jwt_secret,
        )
        self.members.append(member)
        return member

    async def _call(self, member: Member, command: dict[str, Any]) -> dict[str, Any]:
        # Ids above the set-up's (open_member's hello is 1 to 4).
        reply = await member.request({**command, "id": 100 + next(self.ids)})
        if reply.get("type") != "ok":
            raise RuntimeError(f"{command['type']} refused: {reply}")
        return reply

    async def start(self) -> None:
        gate = asyncio.Semaphore(ITEMS_CONCURRENCY)

        async def one(room: int) -> None:
            async with gate:
                model = await self._open(model_id(room), "model")
                fan = await self._open(fan_id(room), "fan")
                key = f"meter-{secrets.token_hex(6)}"
                asked = await self._call(
                    fan,
                    {"type": "private_request", "model": model_id(room), "rate": METER_RATE,
                     "key": key},
                )  # fmt: skip
                show = str(asked["show"])
                accepted = await self._call(model, {"type": "private_accept", "show": show})
                if accepted.get("state") != "running":
                    raise RuntimeError(f"show {show} not running: {accepted}")
                self.shows[show] = fan

        async with asyncio.TaskGroup() as group:
            for room in range(self.bench.args.rooms):
                group.create_task(one(room))

    async def end(self) -> None:
        gate = asyncio.Semaphore(ITEMS_CONCURRENCY)

        async def one(show: str, fan: Member) -> None:
            async with gate:
                await self._call(fan, {"type": "private_end", "show": show})

        try:
            async with asyncio.TaskGroup() as group:
                for show, fan in self.shows.items():
                    group.create_task(one(show, fan))
        finally:
            for member in self.members:
                member.close()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()


def _prepare_meter(bench: TipsBench, http_port: int) -> dict[str, tuple[bytes, ...]]:
    """Each model sets a private rate of METER_RATE a minute and no minimum;
    fan ``room`` is credited, asks her for a show, and she accepts: ``rooms``
    shows run, each ticked once a second by the server's meter (its pass
    every ``private_meter_interval_s``, default 1 s), until ``finish`` ends
    them. The fans send nothing."""
    tokens = _model_tokens(bench)
    for model, token in tokens.items():
        status, reply = http_json(
            f"http://{HOST}:{http_port}/v1/me/prices",
            token,
            {"private_rate": METER_RATE, "private_min_s": 0},
            method="PUT",
        )
        if status != 200:
            raise RuntimeError(f"private price of {model} refused: {status} {reply}")
    # The show's fan pays from the first tick: credited here, before the
    # fans' own credit (which comes after prepare).
    nonce = secrets.token_hex(6)
    for room in range(bench.args.rooms):
        body = {"user": fan_id(room), "amount": FUND_TOKENS, "key": f"meter-{nonce}-{room}"}
        status, reply = http_json(
            f"http://{HOST}:{http_port}/v1/admin/credits", bench.admin_token, body
        )
        if status != 200:
            raise RuntimeError(f"credit for {fan_id(room)} refused: {status} {reply}")
    ws_port = bench.serve_ws_port
    shows = MeterShows(bench, ws_port)
    try:
        shows.run(shows.start(), METER_SETUP_TIMEOUT_S)
    except BaseException:
        shows.close()
        raise
    bench.workload_state = shows
    return {model: () for model in tokens}


def _finish_meter(bench: TipsBench, http_port: int) -> None:
    """End every show (each settles at once: its final charge, its escrow back)."""
    shows = bench.workload_state
    if not isinstance(shows, MeterShows):
        return
    bench.workload_state = None
    try:
        shows.run(shows.end(), METER_END_TIMEOUT_S)
    finally:
        shows.close()


def _meter_calls(bench: TipsBench) -> int:
    """Meter calls the server made for this bench's shows so far: each show's
    ticks, and its final charge once ended (whole seconds past its last tick:
    at one token a second, charged > ticks); 0 before the schema exists."""
    if not bench.migrated:
        return 0

    async def count() -> int:
        import asyncpg

        conn = await asyncpg.connect(bench.settings().database_url)
        try:
            value = await conn.fetchval(
                f"""SELECT coalesce(sum(ticks), 0)
                           + count(*) FILTER (WHERE charged * 60 > ticks * $1 * rate)
                    FROM "{bench.schema}".private_shows""",
                METER_TICK_S,
            )
        finally:
            await conn.close()
        return int(value)

    return asyncio.run(count())


WORKLOADS.update(
    {
        "unlock": Workload(kind="unlock", prepare=_prepare_unlock),
        "buy_ticket": Workload(
            kind="ticket",
            prepare=_prepare_buy_ticket,
            # POST /v1/me/shows is rate-limited per user (0.2/s): lifted, as
            # the command rate limit is, for the set-up's thousands of shows.
            env={
                "TOKENCHAT_HTTP_CREATES_PER_S": "1000000",
                "TOKENCHAT_HTTP_CREATES_BURST": "1000000",
            },
        ),
        "meter": Workload(
            kind="meter",
            prepare=_prepare_meter,
            env={"TOKENCHAT_PRIVATE_TICK_S": str(METER_TICK_S)},
            finish=_finish_meter,
            progress=_meter_calls,
        ),
    }
)


# ============================================================================
# Command line
# ============================================================================


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.tips", description=(__doc__ or "").split("\n\n")[0]
    )
    parser.add_argument("--fans", type=positive_int, default=FANS_DEFAULT)
    parser.add_argument("--rooms", type=positive_int, default=ROOMS_DEFAULT)
    parser.add_argument(
        "--duration",
        type=positive_float,
        help=f"measured seconds per phase (default {DURATION_DEFAULT_S:g})",
    )
    parser.add_argument("--warmup", type=float, help=f"seconds (default {WARMUP_DEFAULT_S:g})")
    parser.add_argument("--runs", type=positive_int, help=f"default {RUNS_DEFAULT}")
    parser.add_argument("--load-procs", type=positive_int, default=LOAD_PROCS_DEFAULT)
    parser.add_argument(
        "--workers", type=positive_int, default=1, help="tokenchat serve --workers (default 1)"
    )
    parser.add_argument(
        "--inline-ledger",
        action="store_true",
        help="run the ledger writer inside serve instead of as tokenchat ledger beside it",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"{QUICK_RUNS} run of {QUICK_DURATION_S:g} s after {QUICK_WARMUP_S:g} s "
        "(flags given explicitly still win): under a minute",
    )
    parser.add_argument(
        "--pin",
        action="store_true",
        help="pin the server (or the baseline client) to the first CPU, the load processes "
        "to the others",
    )
    parser.add_argument(
        "--capped-rate",
        type=positive_float,
        metavar="TIPS_PER_S",
        help=f"offer this in the capped phase instead of {CAPPED_FRACTION:g} x the pipelined "
        "baseline (to see the latency at a load tokenchat can carry)",
    )
    parser.add_argument(
        "--wait-idle",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="before each server's turn, wait up to this long for the rest of the machine "
        f"to use under {IDLE_BUSY_MAX_PCT:g}%% of a CPU (on a shared machine)",
    )
    parser.add_argument(
        "--action",
        choices=sorted(WORKLOADS),
        default="tip",
        help="the paid command the fans send (default tip); the baseline stays the tip script",
    )
    parser.add_argument(
        "--goal",
        action="store_true",
        help="every room has an active tip goal that the tips count toward (and the "
        "baseline's rooms one in Redis): the tip cost with a goal running",
    )
    parser.add_argument(
        "--items",
        type=positive_int,
        help="unlock, buy_ticket: media or ticket shows each model makes per run (default: "
        f"{ITEMS_CALLS_PER_FAN_PER_S:g} calls/s per fan over both phases)",
    )
    parser.add_argument(
        "--limits",
        action="store_true",
        help="every fan sets daily, weekly and monthly spending limits (PUT /v1/me/limits) "
        "before tipping; the baseline fans get the same limits in Redis",
    )
    parser.add_argument(
        "--no-peer",
        action="store_true",
        help="leave out the second baseline (python-socketio + one asyncpg transaction per "
        "tip, loadtests.tips_peer), which runs beside plain tips otherwise",
    )
    parser.add_argument(
        "--delivery-latency",
        action="store_true",
        help="instead of the rates: tip sent -> tip event received by another member, "
        "TOKENCHAT_DELIVERY=script against relay, runs interleaved (paced at --capped-rate, "
        f"default {DELIVERY_RATE_DEFAULT:g} tips/s in all)",
    )
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument(
        "--profile",
        type=Path,
        help="py-spy the server during the first run's full-rate window into this path "
        "(.svg flame graph, .json speedscope, else py-spy's raw stacks, summarized on stdout)",
    )
    args = parser.parse_args(argv)
    resolve_timing(parser, args)
    if args.rooms > args.fans:
        parser.error("--rooms must not exceed --fans (every room needs a fan)")
    if args.pin and len(os.sched_getaffinity(0)) < 2:
        parser.error("--pin needs at least 2 CPUs")
    return args


def run_all(
    bench: TipsBench, on_rows: Callable[[list[dict[str, Any]]], None]
) -> list[dict[str, Any]]:
    """Every run, alternating which side goes first; each row reported as it comes."""
    args = bench.args
    rows: list[dict[str, Any]] = []
    for number in range(1, args.runs + 1):
        steps: list[Callable[[], list[dict[str, Any]]]] = []

        def baseline(number: int = number) -> list[dict[str, Any]]:
            return bench.run_baseline(number)

        def tokenchat(number: int = number) -> list[dict[str, Any]]:
            # Half of the pipelined rate measured so far (every run has at
            # least one: odd runs measure the baseline first).
            capped = args.capped_rate or CAPPED_FRACTION * median_of(
                rows, "kind", "pipelined", "per_s"
            )
            profile = args.profile if number == 1 else None
            return bench.run_tokenchat(number, capped, profile)

        def peer(number: int = number) -> list[dict[str, Any]]:
            from loadtests import tips_peer

            return tips_peer.run_peer(bench, number)

        steps = [baseline, tokenchat] if number % 2 else [tokenchat, baseline]
        if peer_runs(args):
            steps = [*steps, peer] if number % 2 else [peer, *steps]
        for step in steps:
            if args.wait_idle > 0:
                busy_pct = wait_for_idle(args.wait_idle)
                if busy_pct >= IDLE_BUSY_MAX_PCT:
                    print(f"machine still busy ({busy_pct:.0f}% of a CPU); going on", flush=True)
            new = step()
            rows.extend(new)
            on_rows(new)
    return rows


def peer_runs(args: argparse.Namespace) -> bool:
    """The socketio baseline runs beside plain tips only (it knows no other
    paid command, goals or limits), unless --no-peer."""
    return not args.no_peer and args.action == "tip" and not args.goal and not args.limits


def print_rows(rows: list[dict[str, Any]]) -> None:
    for row in rows:
        extra = ""
        if row.get("offered_per_s"):
            extra = f"  (offered {row['offered_per_s']:,.0f}/s)"
        errors = sum(row["errors"].values())
        print(
            f"run {row['run']} {row['kind']:<11} {row['per_s']:>10,.0f}/s{extra}"
            f"  p50 {row['p50_ms']:.2f} ms  p99 {row['p99_ms']:.2f} ms  errors {errors}",
            flush=True,
        )


# ============================================================================
# --delivery-latency: in-script delivery against the relay
# ============================================================================


def run_delivery_latency(bench: TipsBench) -> list[dict[str, Any]]:
    """Every run, each delivery mode once, alternating which goes first."""
    rows: list[dict[str, Any]] = []
    for number in range(1, bench.args.runs + 1):
        modes = DELIVERY_MODES if number % 2 else DELIVERY_MODES[::-1]
        for mode in modes:
            bench.extra_env = {"TOKENCHAT_DELIVERY": mode}
            server, http_port = bench.start_tokenchat()
            try:
                bench.fund_fans(http_port, number)
                row = asyncio.run(_delivery_run(bench, server.ws_port, mode))
            finally:
                bench.stop_tokenchat(server)
            row["run"] = number
            rows.append(row)
            print(
                f"run {number} {mode:<6} tip->event p50 {row['event_p50_ms']:.2f} ms"
                f"  p99 {row['event_p99_ms']:.2f} ms  ack p50 {row['ack_p50_ms']:.2f} ms"
                f"  events {row['events']}  errors {row['errors']}",
                flush=True,
            )
    return rows


async def _delivery_run(bench: TipsBench, ws_port: int, mode: str) -> dict[str, Any]:
    """One server's window: paced tips stamped with the send time, their
    events timed by each room's watcher, their acks by the fans."""
    args = bench.args
    rate = args.capped_rate or DELIVERY_RATE_DEFAULT
    watched, own = Stats(), Stats()  # the watchers' events; the fans' own (unused)
    gate = asyncio.Semaphore(CONNECT_CONCURRENCY_TOTAL)

    async def member(user: str, role: str, room: str, stats: Stats) -> Member:
        async with gate:
            return await open_member(
                "tokenchat",
                ws_port,
                stats,
                user_id=user,
                role=role,
                jwt_secret=bench.jwt_secret,
                room=room,
            )

    watchers = await asyncio.gather(
        *(
            member(WATCHER_ID_FORMAT.format(r), "fan", model_id(r), watched)
            for r in range(args.rooms)
        )
    )
    fans = await asyncio.gather(
        *(member(fan_id(i), "fan", model_id(i % args.rooms), own) for i in range(args.fans))
    )
    start_ns = time.monotonic_ns() + int(args.warmup * NS_PER_S)
    end_ns = start_ns + int(args.duration * NS_PER_S)
    watched.window_start_ns, watched.window_end_ns = start_ns, end_ns
    acks: list[float] = []
    errors: dict[str, int] = {}
    interval_s = args.fans / rate

    async def tip(index: int, fan: Member) -> None:
        ids = itertools.count(100)
        # Spread the fans' first tips over one interval.
        await asyncio.sleep(interval_s * index / args.fans)
        next_s = time.monotonic()
        while time.monotonic_ns() < end_ns:
            sent_ns = time.monotonic_ns()
            reply = await fan.request(
                {
                    "type": "tip",
                    "id": next(ids),
                    "room": model_id(index % args.rooms),
                    "amount": TIP_AMOUNT,
                    "key": secrets.token_hex(8),
                    "text": f"@T{sent_ns}@",
                }
            )
            if reply.get("type") != "ok":
                code = str(reply.get("code"))
                errors[code] = errors.get(code, 0) + 1
            elif start_ns <= sent_ns < end_ns:
                acks.append((time.monotonic_ns() - sent_ns) / 1e6)
            next_s += interval_s
            await asyncio.sleep(max(0.0, next_s - time.monotonic()))

    try:
        async with asyncio.timeout(args.warmup + args.duration + REPORT_SLACK_S):
            await asyncio.gather(*(tip(i, fan) for i, fan in enumerate(fans)))
        await asyncio.sleep(1.0)  # the last events of the window arrive
    finally:
        for each in (*fans, *watchers):
            each.close()
    return {
        "kind": mode,
        "offered_per_s": rate,
        "events": watched.received_in_window,
        "acks": len(acks),
        "event_p50_ms": hist_percentile_ms(watched.hist, 0.50),
        "event_p99_ms": hist_percentile_ms(watched.hist, 0.99),
        "ack_p50_ms": statistics.median(acks) if acks else math.nan,
        "ack_p99_ms": statistics.quantiles(acks, n=100)[98] if len(acks) > 1 else math.nan,
        "errors": errors,
    }


def render_delivery_table(args: argparse.Namespace, rows: list[dict[str, Any]]) -> str:
    lines = [
        f"tip sent -> tip event at another member, {args.fans} fans in {args.rooms} rooms,"
        f" {args.capped_rate or DELIVERY_RATE_DEFAULT:g} tips/s offered,"
        f" {args.runs} run(s) of {args.duration:g} s (median, min-max of runs)",
        "",
        "| TOKENCHAT_DELIVERY | event p50 ms | event p99 ms | ack p50 ms | ack p99 ms |",
        "|---|---|---|---|---|",
    ]
    for mode in DELIVERY_MODES:
        cells = [
            median_range(values_of(rows, "kind", mode, key), "{:.2f}")
            for key in ("event_p50_ms", "event_p99_ms", "ack_p50_ms", "ack_p99_ms")
        ]
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    script = median_of(rows, "kind", "script", "event_p50_ms")
    relay = median_of(rows, "kind", "relay", "event_p50_ms")
    lines += ["", f"the relay adds {relay - script:+.2f} ms to the median tip -> event"]
    return "\n".join(lines)


def report_delivery_json(args: argparse.Namespace, rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {"scenarios": {"delivery_latency": clean_json(rows)}, "machine": machine_summary()}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    raise_open_files_limit()
    if args.delivery_latency:
        return run_bench(
            args, TipsBench(args), run_delivery_latency, render_delivery_table, report_delivery_json
        )
    return run_bench(
        args, TipsBench(args), lambda bench: run_all(bench, print_rows), render_table, report_json
    )


if __name__ == "__main__":
    sys.exit(main())
