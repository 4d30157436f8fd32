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
   runs its own uvloop and a minimal WebSocket client (below), so that reading
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

The minimal client speaks RFC 6455 only as far as these servers need: one
handshake, masked client frames, unfragmented unmasked server frames, ping
answered with pong. It is a measuring instrument, not a general client.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import json
import math
import multiprocessing
import os
import platform
import resource
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any, Literal, cast

import orjson

Kind = Literal["tokenchat", "baseline"]
KINDS: tuple[Kind, ...] = ("tokenchat", "baseline")

HOST = "127.0.0.1"
REPO_ROOT = Path(__file__).resolve().parents[1]
ROOM = "bench_model"  # the model whose room every member joins
MEMBER_ID_FORMAT = "bench_m{:05d}"  # user ids of the members (and senders)
JSON_SUBPROTOCOL = "tokenchat.v1.json"

# --- defaults of the command line ---------------------------------------------
MEMBERS_DEFAULT = 500  # connections, each reading every event
SENDERS_DEFAULT = 4  # of the members, the ones that also send
WINDOW_DEFAULT_MSGS = 8  # per sender: sent but not yet seen back
TEXT_DEFAULT_BYTES = 100  # of each message's text (ASCII)
DURATION_DEFAULT_S = 10.0  # measured, per run and server
WARMUP_DEFAULT_S = 2.0  # sending but not measured, before each measurement
RUNS_DEFAULT = 3  # per server, alternating
LOAD_PROCS_DEFAULT = 2  # load-generator processes, each on its own uvloop

# --- bounds: every wait has one ------------------------------------------------
# Members doing their handshake (and hello/join) at once, over all load
# processes: enough to connect 1000 members in a few seconds, and below
# tokenchat's Redis pool (TOKENCHAT_REDIS_POOL_MAX, 64), which redis-py does not
# queue on: command 65 in flight fails at once, and a hello answers UNAVAILABLE.
CONNECT_CONCURRENCY_TOTAL = 32  # connections
CONNECT_TIMEOUT_S = 15.0  # one member's connect + handshake + hello + join
SETUP_TIMEOUT_S = 120.0  # every member of every load process connected
SERVER_START_TIMEOUT_S = 30.0  # until the server answers
SERVER_STOP_TIMEOUT_S = 10.0  # after SIGTERM, before SIGKILL
WORKER_STOP_TIMEOUT_S = 3.0  # after SIGTERM, before SIGKILL
MIGRATE_TIMEOUT_S = 60.0  # `tokenchat migrate`
# The server side of tokenchat drains sessions for this long on SIGTERM; the
# members are gone by then, so a short grace only bounds a stuck shutdown.
SERVER_SHUTDOWN_GRACE_S = 2.0
# Between telling the load processes "go" and the first send, so that every
# process has read the schedule before it starts.
GO_DELAY_S = 0.5
# After the senders stop: how long their last messages may take to come back,
# then how long the other members get to read them too.
DRAIN_TIMEOUT_S = 5.0
SETTLE_S = 0.5
# A message not seen back by its sender within this is written off as lost, so
# a lost event costs the sender one window slot for a while, not forever.
SLOT_TIMEOUT_S = 5.0
# hello/join answered UNAVAILABLE are sent again, this many times in all, after
# a delay doubling from this one: a loaded machine (or a Redis pool briefly
# exhausted by the connect burst) should slow the set-up, not abort the run.
SETUP_ATTEMPTS_MAX = 4  # attempts
SETUP_RETRY_DELAY_S = 0.2
# A result report from a load process after the "report" request.
REPORT_TIMEOUT_S = 30.0
# Beyond a load process's own bounds (a sender's last slot wait, the drain), for
# it to be scheduled and write to its pipe on a loaded machine.
REPORT_SLACK_S = 5.0
POLL_INTERVAL_S = 0.05  # readiness polls
REDIS_INFO_TIMEOUT_S = 2.0  # asking Redis for its pid (to report its CPU)
HANDSHAKE_MAX_BYTES = 16 * 1024  # of the server's HTTP 101 response
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

# --- latency histogram -----------------------------------------------------------
# Log-spaced buckets, each 2 % wider than the last, from 10 us to ~100 s: a
# percentile is exact to 2 % and memory does not grow with the delivery count.
HIST_MIN_NS = 10_000
HIST_GROWTH = 1.02
HIST_BUCKETS = 820
_INV_LOG_GROWTH = 1.0 / math.log(HIST_GROWTH)

# RFC 6455 section 1.3: the server proves it read the key by hashing it with this.
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
OP_TEXT = 0x1
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA

NS_PER_S = 1_000_000_000
NS_PER_MS = 1_000_000


# ============================================================================
# Measurement state of one load process
# ============================================================================


class Stats:
    """What the members of one load process counted (single-threaded)."""

    def __init__(self) -> None:
        self.window_start_ns = 0
        self.window_end_ns = 0
        self.counting = False
        self.received_total = 0  # benchmark events since "go", any time
        self.received_in_window = 0
        self.hist = [0] * HIST_BUCKETS
        self.errors = 0  # error replies (tokenchat: a `say` refused)
        self.disconnects = 0  # members whose connection ended during the run
        self.setup_retries = 0  # hello/join answered UNAVAILABLE and sent again

    def record(self, now_ns: int, sent_ns: int) -> None:
        self.received_total += 1
        if self.window_start_ns <= now_ns < self.window_end_ns:
            self.received_in_window += 1
            latency_ns = now_ns - sent_ns
            index = 0
            if latency_ns > HIST_MIN_NS:
                index = min(
                    int(math.log(latency_ns / HIST_MIN_NS) * _INV_LOG_GROWTH), HIST_BUCKETS - 1
                )
            self.hist[index] += 1


def hist_percentile_ms(hist: Sequence[int], fraction: float) -> float:
    """The latency (ms) below which ``fraction`` of the samples fall."""
    total = sum(hist)
    if total == 0:
        return math.nan
    rank = fraction * total
    seen = 0
    for index, count in enumerate(hist):
        seen += count
        if seen >= rank:
            # The geometric middle of the bucket.
            return HIST_MIN_NS * math.pow(HIST_GROWTH, index + 0.5) / NS_PER_MS
    return HIST_MIN_NS * math.pow(HIST_GROWTH, HIST_BUCKETS) / NS_PER_MS


class SenderState:
    """The send window of one sending member."""

    def __init__(self, index: int, window: int) -> None:
        self.index = index
        self.window = window
        self.tag = b"@S%d@" % index  # follows the timestamp in its texts
        self.in_flight = 0
        self.sent = 0
        self.lost = 0
        self.slot_free = asyncio.Event()

    def release(self) -> None:
        if self.in_flight > 0:
            self.in_flight -= 1
        self.slot_free.set()


# ============================================================================
# The minimal WebSocket client (RFC 6455)
# ============================================================================


class HandshakeError(Exception):
    pass


def _mask(payload: bytes, key: bytes) -> bytes:
    """RFC 6455 section 5.3: XOR with the 4-byte key, repeated."""
    length = len(payload)
    if length == 0:
        return payload
    stream = (key * (length // 4 + 1))[:length]
    masked = int.from_bytes(payload, "big") ^ int.from_bytes(stream, "big")
    return masked.to_bytes(length, "big")


class Member(asyncio.Protocol):
    """One member's connection: handshake, then frames scanned as they come.

    Frames that carry a benchmark timestamp are counted in ``stats``; during
    set-up, JSON replies are matched to the waiting request by ``re``.
    """

    def __init__(
        self,
        port: int,
        subprotocol: str | None,
        stats: Stats,
        sender: SenderState | None = None,
    ) -> None:
        self._port = port
        self._subprotocol = subprotocol
        self._stats = stats
        self.sender = sender
        self._key = base64.b64encode(secrets.token_bytes(16))
        self._buf = bytearray()
        self._open = False
        self.transport: asyncio.Transport | None = None
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}

    # --- asyncio.Protocol ---------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCPTransport has the Transport API without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        lines = [
            "GET /ws HTTP/1.1",
            f"Host: {HOST}:{self._port}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {self._key.decode()}",
            "Sec-WebSocket-Version: 13",
        ]
        if self._subprotocol:
            lines.append(f"Sec-WebSocket-Protocol: {self._subprotocol}")
        self.transport.write(("\r\n".join(lines) + "\r\n\r\n").encode())

    def connection_lost(self, exc: Exception | None) -> None:
        if self._stats.counting:
            self._stats.disconnects += 1
        failure = ConnectionError("connection closed")
        if not self.opened.done():
            self.opened.set_exception(failure)
        for waiter in self._waiting.values():
            if not waiter.done():
                waiter.set_exception(failure)
        if self.sender is not None:
            self.sender.slot_free.set()

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        if not self._open and not self._finish_handshake():
            return
        # One clock read per read(): every frame in it arrived at this moment.
        now_ns = time.monotonic_ns()
        pos = 0
        size = len(buf)
        while size - pos >= 2:
            length = buf[pos + 1] & 0x7F
            if length < 126:
                start = pos + 2
            elif length == 126:
                start = pos + 4
                if start > size:
                    break
                length = int.from_bytes(buf[pos + 2 : start], "big")
            else:
                start = pos + 10
                if start > size:
                    break
                length = int.from_bytes(buf[pos + 2 : start], "big")
            end = start + length
            if end > size:
                break
            opcode = buf[pos] & 0x0F
            if opcode == OP_TEXT:
                self._on_text(buf, start, end, now_ns)
            elif opcode == OP_PING:
                self._send_frame(OP_PONG, bytes(buf[start:end]))
            elif opcode == OP_CLOSE:
                self.close()
                return
            pos = end
        if pos:
            del buf[:pos]

    # --- frames -------------------------------------------------------------------
    def _finish_handshake(self) -> bool:
        buf = self._buf
        head_end = buf.find(b"\r\n\r\n")
        if head_end < 0:
            if len(buf) > HANDSHAKE_MAX_BYTES:
                self._fail(HandshakeError("handshake response too large"))
            return False
        head = bytes(buf[:head_end]).decode("latin-1").split("\r\n")
        del buf[: head_end + 4]
        headers = {}
        for line in head[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        accept = base64.b64encode(hashlib.sha1(self._key + WS_GUID).digest()).decode()
        if " 101 " not in head[0] + " " or headers.get("sec-websocket-accept") != accept:
            self._fail(HandshakeError(f"handshake refused: {head[0]!r}"))
            return False
        self._open = True
        self.opened.set_result(None)
        return True

    def _on_text(self, buf: bytearray, start: int, end: int, now_ns: int) -> None:
        if self._waiting:
            # Set-up: a reply (a `join` reply holds history, whose texts carry
            # the markers of an earlier run: it is not a delivery).
            reply = orjson.loads(bytes(buf[start:end]))
            re = reply.get("re") if isinstance(reply, dict) else None
            waiter = self._waiting.get(re) if isinstance(re, int) else None
            if waiter is not None and not waiter.done():
                waiter.set_result(reply)
            return
        marker = buf.find(b"@T", start, end)
        if marker >= 0:
            stamp_end = buf.find(b"@", marker + 2, end)
            self._stats.record(now_ns, int(buf[marker + 2 : stamp_end]))
            sender = self.sender
            if sender is not None and buf[stamp_end : stamp_end + len(sender.tag)] == sender.tag:
                sender.release()
            return
        # Replies to `say` are `ok` (ignored) or an error, which frees the slot
        # its message would have freed.
        if buf.find(b'"type":"error"', start, end) >= 0:
            self._stats.errors += 1
            if self.sender is not None:
                self.sender.release()

    def _send_frame(self, opcode: int, payload: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        length = len(payload)
        header = bytearray([0x80 | opcode])
        # RFC 6455 section 5.1: a client masks every frame it sends.
        if length < 126:
            header.append(0x80 | length)
        elif length < 1 << 16:
            header.append(0x80 | 126)
            header += length.to_bytes(2, "big")
        else:
            header.append(0x80 | 127)
            header += length.to_bytes(8, "big")
        key = secrets.token_bytes(4)
        header += key
        self.transport.write(bytes(header) + _mask(payload, key))

    def send_text(self, payload: bytes) -> None:
        self._send_frame(OP_TEXT, payload)

    async def request(self, command: dict[str, Any]) -> dict[str, Any]:
        """Send a command and wait for its reply (the caller bounds the wait)."""
        command_id = command["id"]
        assert isinstance(command_id, int)
        waiter: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[command_id] = waiter
        try:
            self.send_text(orjson.dumps(command))
            return await waiter
        finally:
            del self._waiting[command_id]

    def _fail(self, exc: Exception) -> None:
        if not self.opened.done():
            self.opened.set_exception(exc)
        self.close()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def open_member(
    kind: Kind,
    port: int,
    stats: Stats,
    *,
    user_id: str,
    role: str,
    jwt_secret: str,
    sender: SenderState | None = None,
) -> Member:
    """A connected member; for tokenchat, authenticated and in the room."""
    loop = asyncio.get_running_loop()
    subprotocol = JSON_SUBPROTOCOL if kind == "tokenchat" else None
    member: Member | None = None
    step = "connect"
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            _, member = await loop.create_connection(
                lambda: Member(port, subprotocol, stats, sender), HOST, port
            )
            step = "handshake"
            await member.opened
            if kind == "tokenchat":
                step = "hello"
                token = _token(jwt_secret, user_id, role)
                await _command(member, stats, {"type": "hello", "token": token}, "welcome")
                if role != "model":
                    step = "join"
                    await _command(member, stats, {"type": "join", "room": ROOM}, "ok")
    except BaseException as exc:
        if member is not None:
            member.close()
        if isinstance(exc, TimeoutError):
            raise TimeoutError(f"{user_id}: {step} took over {CONNECT_TIMEOUT_S} s") from None
        raise
    return member


async def _command(
    member: Member, stats: Stats, command: dict[str, Any], expected: str
) -> dict[str, Any]:
    """A set-up command; UNAVAILABLE ("a backend is down, nothing was done") is
    retried a few times, as a real client would, and counted."""
    for attempt in range(SETUP_ATTEMPTS_MAX):
        reply = await member.request({**command, "id": attempt + 1})
        if reply.get("type") == expected:
            return reply
        if reply.get("code") != "UNAVAILABLE" or attempt + 1 == SETUP_ATTEMPTS_MAX:
            break
        stats.setup_retries += 1
        await asyncio.sleep(SETUP_RETRY_DELAY_S * 2**attempt)
    raise RuntimeError(f"{command['type']} refused: {reply}")


def _token(jwt_secret: str, user_id: str, role: str) -> str:
    from tokenchat.server.auth import issue_token

    return issue_token(jwt_secret, user_id, role)


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
    return conn.recv()


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
    kind: Kind
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


class Bench:
    """Owns everything the benchmark starts, and removes it in ``close``."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        tag = secrets.token_hex(4)
        self.redis_prefix = f"bench:{tag}:"
        self.schema = f"bench_{tag}"
        self.jwt_secret = secrets.token_urlsafe(32)
        self.log_dir = Path(tempfile.mkdtemp(prefix="tokenchat-fanout-"))
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

    # --- servers ------------------------------------------------------------------
    def _spawn(self, kind: Kind, argv: list[str], env: dict[str, str], ws_port: int) -> Server:
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

    def start_server(self, kind: Kind) -> Server:
        if kind == "baseline":
            port = free_port()
            argv = ["-m", "loadtests.fanout", "--serve-baseline", str(port)]
            server = self._spawn(kind, argv, self.env, port)
            self._wait_ready(server, lambda: _tcp_answers(port))
            return server
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
        ws_port, http_port = free_port(), free_port()
        env = dict(self.env, TOKENCHAT_WS_PORT=str(ws_port), TOKENCHAT_HTTP_PORT=str(http_port))
        argv = ["-m", "tokenchat.server.cli", "serve", "--workers", str(self.args.workers)]
        server = self._spawn(kind, argv, env, ws_port)
        self._wait_ready(server, lambda: _http_ok(f"http://{HOST}:{http_port}/healthz"))
        # The room exists once its model has said hello (DESIGN.md section 3).
        asyncio.run(self._model_hello(ws_port))
        return server

    def _wait_ready(self, server: Server, check: Callable[[], bool]) -> None:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while not check():
            if server.process.poll() is not None:
                raise RuntimeError(f"{server.kind} server exited:\n{server.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{server.kind} server not ready:\n{server.log_tail()}")
            time.sleep(POLL_INTERVAL_S)

    async def _model_hello(self, port: int) -> None:
        member = await open_member(
            "tokenchat", port, Stats(), user_id=ROOM, role="model", jwt_secret=self.jwt_secret
        )
        member.close()

    def _redis_pid(self) -> int | None:
        """Redis's pid, to report its CPU, when it runs on this machine."""
        from redis import Redis

        from tokenchat.server.config import Settings

        client: Redis = Redis.from_url(
            Settings.from_env(self.env).redis_url, socket_timeout=REDIS_INFO_TIMEOUT_S
        )
        try:
            pid = int(client.info("server")["process_id"])
        except Exception:
            return None
        finally:
            client.close()
        return pid if Path(f"/proc/{pid}/stat").exists() else None

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
            now_ns = time.monotonic_ns()
            send_start_ns = now_ns + int(GO_DELAY_S * NS_PER_S)
            window_start_ns = send_start_ns + int(args.warmup * NS_PER_S)
            window_end_ns = window_start_ns + int(args.duration * NS_PER_S)
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

    def _sample_cpu(
        self, server: Server, start_ns: int, end_ns: int, profile: Path | None
    ) -> dict[str, float | None]:
        """CPU use (% of one core) of server, Redis and load generator in the window."""
        pids: dict[str, list[int]] = {
            "server": process_tree(server.process.pid),
            "redis": [self.redis_pid] if self.redis_pid and server.kind == "tokenchat" else [],
            "loadgen": [w.pid for w in self.workers if w.pid is not None],
        }
        time.sleep(max(0.0, (start_ns - time.monotonic_ns()) / NS_PER_S))
        spy = start_py_spy(server.process.pid, self.args.duration, profile) if profile else None
        before = {name: cpu_ticks(p) for name, p in pids.items()}
        machine_before = machine_busy_ticks()
        time.sleep(max(0.0, (end_ns - time.monotonic_ns()) / NS_PER_S))
        after = {name: cpu_ticks(p) for name, p in pids.items()}
        machine_after = machine_busy_ticks()
        elapsed_s = (end_ns - start_ns) / NS_PER_S
        tick_s = 1.0 / os.sysconf("SC_CLK_TCK")
        result: dict[str, float | None] = {}
        for name in pids:
            b, a = before[name], after[name]
            result[name] = None if a is None or b is None else 100 * (a - b) * tick_s / elapsed_s
        # Task time of the whole machine that none of the processes above was
        # charged: whatever else runs here (a noisy neighbour shows up in it and
        # explains a slow run). Interrupt time, mostly loopback TCP delivering
        # our own traffic, is charged to no process and is shown on its own.
        tasks_pct, irq_pct = (
            100 * (a - b) * tick_s / elapsed_s
            for a, b in zip(machine_after, machine_before, strict=True)
        )
        result["other"] = max(0.0, tasks_pct - sum(v or 0.0 for v in result.values()))
        result["irq"] = irq_pct
        if spy is not None:
            finish_py_spy(spy, profile)
        return result

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

    async def _remove_state(self) -> None:
        import asyncpg
        from redis.asyncio import Redis

        from tokenchat.server.config import Settings

        settings = Settings.from_env(self.env)
        redis: Redis = Redis.from_url(settings.redis_url)
        try:
            keys = [k async for k in redis.scan_iter(match=f"{self.redis_prefix}*", count=1000)]
            for chunk_start in range(0, len(keys), 1000):
                await redis.delete(*keys[chunk_start : chunk_start + 1000])
        finally:
            await redis.aclose()
        conn = await asyncpg.connect(settings.database_url)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE')
        finally:
            await conn.close()


def _tcp_answers(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=POLL_INTERVAL_S * 10):
            return True
    except OSError:
        return False


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=POLL_INTERVAL_S * 10) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (``serve --workers N`` forks its workers)."""
    tree = [pid]
    for parent in tree:  # grows as children are found
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{parent}/task").iterdir():
                tree.extend(int(c) for c in (task / "children").read_text().split())
    return tree


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


# --- profiling ------------------------------------------------------------------


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


def profile_path(profile: Path, kind: Kind) -> Path:
    """``out.txt`` -> ``out.tokenchat.txt``: one profile per server."""
    return profile.with_name(f"{profile.stem}.{kind}{profile.suffix}")


# --- figures ----------------------------------------------------------------------


def summarize_run(
    kind: Kind,
    number: int,
    connected: int,
    duration_s: float,
    reports: list[dict[str, Any]],
    cpu: dict[str, float | None],
) -> dict[str, Any]:
    hist = [sum(column) for column in zip(*(r["hist"] for r in reports), strict=True)]
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


def values_of(runs: list[dict[str, Any]], kind: Kind, key: str) -> list[float]:
    return [r[key] for r in runs if r["server"] == kind and r[key] is not None]


def median_of(runs: list[dict[str, Any]], kind: Kind, key: str) -> float:
    values = values_of(runs, kind, key)
    return statistics.median(values) if values else math.nan


def render_table(args: argparse.Namespace, runs: list[dict[str, Any]]) -> str:
    def cell(kind: Kind, key: str, fmt: str) -> str:
        values = values_of(runs, kind, key)
        if not values:
            return "-"
        text = fmt.format(statistics.median(values))
        if len(values) > 1:
            text += f" ({fmt.format(min(values))}-{fmt.format(max(values))})"
        return text

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
    pairs = [
        t["deliveries_per_s"] / b["deliveries_per_s"]
        for t, b in zip(
            [r for r in runs if r["server"] == "tokenchat"],
            [r for r in runs if r["server"] == "baseline"],
            strict=False,
        )
        if b["deliveries_per_s"]
    ]
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
    baseline = median_of(runs, "baseline", "deliveries_per_s")
    return median_of(runs, "tokenchat", "deliveries_per_s") / baseline if baseline else math.nan


def report_json(args: argparse.Namespace, runs: list[dict[str, Any]]) -> dict[str, Any]:
    def clean(value: Any) -> Any:
        # JSON has no NaN: a figure that could not be measured is null.
        return None if isinstance(value, float) and math.isnan(value) else value

    fanout = {
        "value": median_of(runs, "tokenchat", "deliveries_per_s"),
        "unit": "deliveries/s",
        "baseline": median_of(runs, "baseline", "deliveries_per_s"),
        "ratio": ratio_of(runs),
        "p50_ms": median_of(runs, "tokenchat", "p50_ms"),
        "p99_ms": median_of(runs, "tokenchat", "p99_ms"),
        "baseline_p50_ms": median_of(runs, "baseline", "p50_ms"),
        "baseline_p99_ms": median_of(runs, "baseline", "p99_ms"),
        "members": args.members,
        "senders": args.senders,
        "window_msgs": args.window,
        "text_bytes": args.text_bytes,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "load_procs": args.load_procs,
        "pinned": args.pin,
        "runs": [{k: clean(v) for k, v in run.items()} for run in runs],
    }
    return {
        "scenarios": {"fanout": {k: clean(v) for k, v in fanout.items()}},
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
    }


# ============================================================================
# Command line
# ============================================================================


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return value


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

    def measure(bench: Bench) -> list[dict[str, Any]]:
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

    return run_bench(args, Bench(args), measure, render_table, report_json)


def run_bench(
    args: argparse.Namespace,
    bench: Bench,
    measure: Callable[[Any], list[dict[str, Any]]],
    render: Callable[[argparse.Namespace, list[dict[str, Any]]], str],
    report: Callable[[argparse.Namespace, list[dict[str, Any]]], dict[str, Any]],
) -> int:
    """Measure, clean up whatever happens, print the table, write the JSON.

    The exit code: 0, or 130 when interrupted (Ctrl-C or SIGTERM)."""
    with sigterm_as_exit():
        failed = False  # keep the server logs only when something broke
        try:
            rows = measure(bench)
        except (KeyboardInterrupt, SystemExit):
            print("interrupted; cleaning up", file=sys.stderr)
            return 130
        except BaseException:
            failed = True
            raise
        finally:
            bench.close(keep_logs=failed)
    print(render(args, rows))
    if args.json is not None:
        args.json.write_text(json.dumps(report(args, rows), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
