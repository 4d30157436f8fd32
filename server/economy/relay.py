"""The delivery relay: relayed spends' room events from {eco} to their rooms.

In delivery mode `relay` (Redis Cluster, where a room is another slot than
the money; docs/economy.md, "Delivery relay"), a paid action whose delivery
leaves the money slot (``Action.relayed``: tip, tip_item) writes its room
events into the delivery stream (``Keys.deliveries``), in the same atomic
call as the charge and the ledger outbox entry. Relays (one per gateway
node, one consumer group) read that stream and move each entry into its
room with ONE script in the room's slot (``relay_deliver.lua``): unless a
dedupe key named by the transaction exists, the history XADD and the
PUBLISH, then the key's SET (last: Redis does not roll back a script that
failed halfway). Only after that script ran is the entry acknowledged and deleted.

At least once, shown once: a relay that dies between the room script and
its XACK leaves the entry pending; after ``relay_claim_idle_s`` another
relay claims it (XAUTOCLAIM, as the ledger writer does) and runs the script
again, which finds the dedupe key and writes nothing. The key lives
``relay_dedupe_s``, longer than any redelivery short of every relay being
down that long.

Why the gateway nodes run it (not the ledger process): a tip's latency to
the room is the relay's, so it runs where rooms are served, on every node,
with no extra process to deploy; the ledger process is optional
(``TOKENCHAT_LEDGER_ENABLED``) and may be one per deployment, and a room's
events must not wait for Postgres.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import NoScriptError, ResponseError

from .. import metrics, redis_client, streams
from ..aio import raise_if_cancelling, reraise_if_cancelled
from ..config import Settings
from ..keys import Keys
from .batcher import Arg, send_pipeline
from .scripts import HISTORY_LIB, history_trim, script_source

log = logging.getLogger(__name__)

GROUP = "relay"
# Entries moved per read: one pipeline of room scripts; large enough to
# drain a burst in a few round trips, small enough that one batch's
# latency stays in milliseconds.
BATCH_MAX = 200
# How long a read waits for new entries before looking again (ms): the
# claims of dead relays' entries are looked for between two reads.
BLOCK_MS = 1000
# How often the relay reads its stream's oldest entry for the gauge
# tokenchat_relay_oldest_pending_seconds (s): alerts look at minutes.
OLDEST_GAUGE_INTERVAL_S = 1.0
# Backoff after a failed pass (Redis away): short first, capped.
RETRY_DELAY_MIN_S = 0.05
RETRY_DELAY_MAX_S = 2.0
# Refusals in a row after which an entry is parked (Keys.deliveries_parked):
# with the backoff above that is about 11 s of a room answering an error
# (WRONGTYPE, OOM...), longer than a transient one, and short enough that one
# bad entry does not hold every room's tips behind it (this relay reads its
# own failed entries before new ones) for long.
RELAY_ATTEMPTS_MAX = 10
# How often each relay retries the parked entries (s), and how many per pass:
# parked means an operator is needed; a slow retry delivers them once the room
# takes them again, and the dedupe key makes two relays retrying one harmless.
# The parked stream is not trimmed: each entry is a paid event not yet shown.
PARKED_RETRY_S = 30.0
PARKED_BATCH_MAX = 100


# Entries whose refusals one relay counts at most: past it the counts start
# over (a bound on memory; the entries then take longer to be parked).
_FAILURES_MAX = 10 * BATCH_MAX


class Relay:
    """One consumer of the delivery stream's group (``consumer``: the node's id)."""

    def __init__(self, settings: Settings, consumer: str, redis: Any = None) -> None:
        """``redis``: its own client (a blocking read holds a connection for
        a while), by default one to ``settings.redis_url``; on Redis Cluster
        a ``RedisCluster``, through which each room script goes to its
        room's primary (``_send``)."""
        self._settings = settings
        self._keys = Keys(settings.redis_prefix)
        self._consumer = consumer
        self._redis: Any = redis or redis_client.connect(
            settings,
            max_connections=4,
            socket_timeout_s=BLOCK_MS / 1000 + settings.redis_timeout_s,
            blocking=False,
        )
        # history_add (history_lib.lua) first: the room's history trimmed as
        # every room event's is.
        self._deliver = self._redis.register_script(
            script_source(HISTORY_LIB) + "\n" + script_source("relay_deliver")
        )
        self._trim = history_trim(settings.history_len, settings.history_age_s)
        self._group_ready = False
        self._claims = streams.ClaimClock()
        # Entries read by this relay and not acknowledged (a failed pass):
        # read again (from 0) before new ones, rather than waiting for a claim.
        self._retry_own = False
        # Delivered entries to acknowledge with the next read (see step).
        self._to_ack: list[bytes] = []
        self._dedupe_ms = int(settings.relay_dedupe_s * 1000)
        # Entry id -> its room's refusals in a row (RELAY_ATTEMPTS_MAX);
        # forgotten once delivered or parked, all of it past _FAILURES_MAX
        # (entries another relay claimed meanwhile): it only delays a park.
        self._failures: dict[bytes, int] = {}

    @property
    def consumer(self) -> str:
        return self._consumer

    async def close(self) -> None:
        await self._redis.aclose()

    async def run(self) -> None:
        """Relay until cancelled; Redis failing only slows it down."""
        delay_s = RETRY_DELAY_MIN_S
        loop = asyncio.get_running_loop()
        gauged = 0.0
        parked_retried = loop.time()
        while True:
            raise_if_cancelling()
            try:
                # Entries whose room script answered an error are read again
                # by the next pass, which does not block: back off, not spin.
                refused = await self.step(block=True) > 0 and self._retry_own
                # The oldest entry's age at most once a second (an XRANGE),
                # busy or idle: a backlog behind a busy relay shows too.
                if loop.time() - gauged >= OLDEST_GAUGE_INTERVAL_S:
                    gauged = loop.time()
                    metrics.RELAY_OLDEST.set(await self.oldest_pending_s())
                if loop.time() - parked_retried >= PARKED_RETRY_S:
                    parked_retried = loop.time()
                    await self.retry_parked()
                if refused:
                    await asyncio.sleep(delay_s)
                    delay_s = min(delay_s * 2, RETRY_DELAY_MAX_S)
                else:
                    delay_s = RETRY_DELAY_MIN_S
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis away, or a bad batch: retry later
                reraise_if_cancelled(exc)
                log.warning("delivery relay: %s; retrying in %.2f s", exc, delay_s)
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, RETRY_DELAY_MAX_S)

    async def step(self, *, block: bool, claim_idle_ms: int | None = None) -> int:
        """Deliver one batch: dead relays' entries first, then our own
        unacknowledged ones (after a failed pass), then new ones. Returns
        the entries handled.

        A delivered batch is acknowledged (XACK, XDEL) in the same round
        trip as the next read, before it (one write, in order), or at once
        when ``block`` is false (drain, tests): the hot path costs two round
        trips per batch, the read and the room scripts."""
        try:
            return await self._step(block, claim_idle_ms)
        except Exception:
            # A failed pass may leave entries pending for this consumer alone
            # (read and not delivered, or read with the reply lost): read our
            # own first next time, rather than wait relay_claim_idle_s for a
            # claim while newer tips of the same rooms go before them.
            self._retry_own = True
            raise

    async def _step(self, block: bool, claim_idle_ms: int | None) -> int:
        await self._ensure_group()
        try:
            rows = await self._claim(claim_idle_ms)
            # Our own unacknowledged entries wait behind claimed ones, younger
            # than the claim time: still to read after this batch.
            own_left = bool(rows) and self._retry_own
            if not rows and self._retry_own:
                await self._flush_acks()  # else they would be read again
                rows = await self._read(start="0", block=False)
                self._retry_own = bool(rows)
            if not rows:
                rows = await self._read_new(block)
            else:
                await self._flush_acks()
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            # Redis lost its data: the stream and group go with it.
            self._group_ready = False
            self._to_ack.clear()
            return 0
        if not rows:
            return 0
        delivered = await self._deliver_rows(rows)
        self._to_ack.extend(delivered)
        self._retry_own = own_left or len(delivered) < len(rows)
        if not block:
            await self._flush_acks()
        return len(rows)

    async def retry_parked(self) -> int:
        """Run the oldest parked entries' room scripts again; delete the ones
        delivered (or found delivered). Returns how many were."""
        stream = self._keys.deliveries_parked()
        rows: Any = await self._redis.xrange(stream, count=PARKED_BATCH_MAX)
        calls: list[bytes] = []
        commands: list[list[Arg]] = []
        for entry_id, fields in rows:
            command = self._room_call(entry_id, fields)
            if command is None:
                continue  # logged; kept for the operator
            calls.append(entry_id)
            commands.append(command)
        results = await self._send(commands) if commands else []
        done = [i for i, r in zip(calls, results, strict=True) if not isinstance(r, Exception)]
        if done:
            await self._redis.xdel(stream, *done)
            metrics.RELAYED.inc(len(done))
            log.warning("delivery relay: %d parked entries delivered", len(done))
        return len(done)

    async def pending(self) -> int:
        """Delivery entries not yet delivered (and acknowledged)."""
        return int(await self._redis.xlen(self._keys.deliveries()))

    async def oldest_pending_s(self) -> float:
        """Age of the oldest entry in the stream (0 when empty), from its id's
        milliseconds (Redis' clock) to this host's clock."""
        return await _oldest_age_s(self._redis, self._keys.deliveries())

    async def drain(self, timeout_s: float) -> int:
        """Deliver until the stream is empty or the time is up; what is left
        (an entry another relay holds is delivered twice at worst, which its
        dedupe key turns into a no-op)."""
        return await streams.drain(self.step, self.pending, timeout_s)

    # --- reading ------------------------------------------------------------------------
    async def _ensure_group(self) -> None:
        if self._group_ready:
            return
        # Loaded with the group: both go when Redis loses its data.
        await self._redis.script_load(self._deliver.script)
        await streams.create_group(self._redis, self._keys.deliveries(), GROUP)
        self._group_ready = True

    async def _claim(self, claim_idle_ms: int | None) -> list[Any]:
        claim_idle_ms = self._claims.idle_ms(self._settings.relay_claim_idle_s, claim_idle_ms)
        if claim_idle_ms is None:
            return []
        reply: Any = await self._redis.xautoclaim(
            self._keys.deliveries(),
            GROUP,
            self._consumer,
            min_idle_time=claim_idle_ms,
            start_id="0-0",
            count=BATCH_MAX,
        )
        return list(reply[1])

    def _ack_commands(self) -> list[list[Arg]]:
        if not self._to_ack:
            return []
        stream = self._keys.deliveries()
        return [["XACK", stream, GROUP, *self._to_ack], ["XDEL", stream, *self._to_ack]]

    async def _flush_acks(self) -> None:
        commands = self._ack_commands()
        if commands:
            _raise_first(await self._send(commands))
            self._to_ack.clear()

    async def _read_new(self, block: bool) -> list[Any]:
        """New entries, after the acknowledgements of the last batch, in one
        round trip (raw replies: the hot path skips redis-py's parsing)."""
        read: list[Arg] = ["XREADGROUP", "GROUP", GROUP, self._consumer, "COUNT", BATCH_MAX]
        if block:
            read += ["BLOCK", BLOCK_MS]
        read += ["STREAMS", self._keys.deliveries(), ">"]
        acks = self._ack_commands()
        replies = await self._send([*acks, read])
        _raise_first(replies)
        self._to_ack.clear()
        streams = replies[-1] or []
        # A map of streams over RESP3 (redis-py 8's default), pairs over RESP2.
        pairs = streams.items() if isinstance(streams, dict) else streams
        return [(entry_id, _pairs(fields)) for _, entries in pairs for entry_id, fields in entries]

    async def _send(self, commands: list[list[Arg]]) -> list[Any]:
        """Pipelined, each error reply an item of the list: on a single Redis
        one write on one connection (``send_pipeline``: hiredis-packed,
        replies unparsed); on a cluster redis-py's cluster pipeline, which
        sends each command to its slot's primary, in order per primary."""
        if isinstance(self._redis, Redis):
            return await send_pipeline(self._redis, commands)
        async with self._redis.pipeline() as pipe:
            for command in commands:
                pipe.execute_command(*command)
            replies: list[Any] = await pipe.execute(raise_on_error=False)
            return replies

    async def _read(self, *, start: str, block: bool) -> list[Any]:
        """From ``0``: the entries delivered to us and not acknowledged."""
        reply: Any = await self._redis.xreadgroup(
            GROUP,
            self._consumer,
            {self._keys.deliveries(): start},
            count=BATCH_MAX,
            block=BLOCK_MS if block else None,
        )
        return [row for _, rows in reply or [] for row in rows]

    # --- delivering ---------------------------------------------------------------------
    async def _deliver_rows(self, rows: list[Any]) -> list[bytes]:
        """Run each entry's room script, in stream order, in one pipeline.
        Returns the ids to acknowledge: delivered, found delivered already,
        parked (refused RELAY_ATTEMPTS_MAX times in a row), deleted (no
        fields) or malformed (dropped with an error: no script could ever
        deliver it, and it must not hold the stream)."""
        done: list[bytes] = []
        calls: list[tuple[bytes, dict[bytes, bytes]]] = []
        commands: list[list[Arg]] = []
        for entry_id, fields in rows:
            command = self._room_call(entry_id, fields) if fields else None
            if command is None:
                done.append(entry_id)
                continue
            commands.append(command)
            calls.append((entry_id, fields))
        results = await self._send(commands) if commands else []
        now_ms = time.time() * 1000
        script_missing = False
        park: list[list[Arg]] = []
        for (entry_id, fields), result in zip(calls, results, strict=True):
            if isinstance(result, Exception):
                # Not acknowledged: our own pending read tries it again.
                if isinstance(result, NoScriptError):
                    script_missing = True
                    continue
                refusals = self._failures.get(entry_id, 0) + 1
                if refusals < RELAY_ATTEMPTS_MAX:
                    self._failures[entry_id] = refusals
                    log.warning("delivery relay: entry %r not delivered: %s", entry_id, result)
                    continue
                log.error(
                    "delivery relay: parking entry %r after %d refusals: %s",
                    entry_id,
                    refusals,
                    result,
                )
                park.append(
                    [
                        "XADD",
                        self._keys.deliveries_parked(),
                        "*",
                        *(x for pair in fields.items() for x in pair),
                        "entry",
                        entry_id,
                        "error",
                        str(result)[:200],
                    ]
                )
                self._failures.pop(entry_id, None)
                done.append(entry_id)
                continue
            self._failures.pop(entry_id, None)
            done.append(entry_id)
            metrics.RELAYED.inc()
            if result == b"DUP":
                metrics.RELAY_DUPLICATES.inc()
            else:
                metrics.RELAY_LAG.observe(max(0.0, now_ms - _entry_ms(entry_id)) / 1000)
        if park:
            # Parked before acknowledged (the ack goes with the next read): a
            # crash in between leaves it both parked and pending, delivered
            # twice at worst, which the dedupe key turns into one.
            _raise_first(await self._send(park))
            metrics.RELAY_PARKED.inc(len(park))
        if len(self._failures) > _FAILURES_MAX:
            self._failures.clear()
        if script_missing:  # once per batch, not once per entry (Redis restarted)
            await self._redis.script_load(self._deliver.script)
        return done

    def _room_call(self, entry_id: bytes, fields: dict[bytes, bytes]) -> list[Arg] | None:
        """The room script call delivering one entry; None (logged) when the
        entry is malformed."""
        try:
            tx = fields[b"tx"].decode()
            channel = fields[b"channel"].decode()
            events = fields[b"events"]
        except (KeyError, UnicodeError) as exc:
            log.error("delivery relay: dropping malformed entry %r: %r", entry_id, exc)
            return None
        room = self._keys.channel_room(channel)
        if room is None:
            log.error("delivery relay: entry %r names no room channel", entry_id)
            return None
        keys = [self._keys.relayed(room, tx), self._keys.room_history(room), channel]
        trim = self._trim
        args: list[Arg] = [self._dedupe_ms, trim["history_len"], events, trim["history_age_ms"]]
        return ["EVALSHA", self._deliver.sha, len(keys), *keys, *args]


async def deliveries_state(redis: Redis, keys: Keys, lag_max_s: float) -> dict[str, Any]:
    """What reconcile and /readyz say of the delivery stream: entries not
    yet delivered, the oldest one's age (seconds), and whether that passes
    ``lag_max_s`` (no relay running, or one falling behind)."""
    stream = keys.deliveries()
    pending = int(await redis.xlen(stream))
    oldest_s = await _oldest_age_s(redis, stream) if pending else 0.0
    metrics.RELAY_OLDEST.set(oldest_s)
    parked = int(await redis.xlen(keys.deliveries_parked()))
    return {
        "pending": pending,
        "oldest_s": round(oldest_s, 3),
        "behind": oldest_s > lag_max_s,
        "parked": parked,
    }


async def _oldest_age_s(redis: Any, stream: str) -> float:
    """The age of the stream's oldest entry (0 when empty), from its id's
    milliseconds (Redis' clock) to this host's clock."""
    first: Any = await redis.xrange(stream, count=1)
    return max(0.0, time.time() - _entry_ms(first[0][0]) / 1000) if first else 0.0


def _pairs(fields: list[bytes] | dict[bytes, bytes] | None) -> dict[bytes, bytes] | None:
    """A stream entry's fields: raw (a flat list), or parsed (a cluster
    pipeline's); None once deleted."""
    if fields is None or isinstance(fields, dict):
        return fields
    return dict(zip(fields[::2], fields[1::2], strict=True))


def _raise_first(replies: list[Any]) -> None:
    """The first error among pipelined replies, raised (send_pipeline
    returns them as items)."""
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply


def _entry_ms(entry_id: bytes | str) -> int:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return int(text.partition("-")[0])
