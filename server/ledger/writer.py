"""The ledger writer: the Redis outbox into Postgres, exactly once.

Money scripts append one entry per transaction to the outbox stream. Writers
(one per ``serve`` process, or ``tokenchat ledger``) read it through one
consumer group, so each entry goes to one writer at a time, and write a batch
in one Postgres transaction of one statement (``_WRITE_BATCH``, the batch as
arrays): ``INSERT ... ON CONFLICT DO NOTHING`` on the transaction id, the
postings of the transactions actually inserted, and the accounts' running
balances. Only
after COMMIT are the entries acknowledged and deleted from the stream, so an
entry leaves Redis only once it is in Postgres. A writer that dies between
COMMIT and XACK leaves entries that another writer claims (XAUTOCLAIM) and
writes again: ON CONFLICT makes that a no-op, so nothing is doubled.

If Redis loses its data while a batch is in flight (its epoch changes), the
batch is rolled back instead of committed: balances reloaded from Postgres
meanwhile must not miss transactions committed after they were read.

No entry can stall the writer. Postgres refuses an entry for one of two
kinds of reason:

- data (``_is_data_refusal``): a value it cannot store (a NUL byte, an
  escape jsonb refuses, a number out of range) or a check on the entry's own
  columns. Retrying cannot help, so the batch is bisected at once: the halves
  are written in order, and the one entry left refused is parked.
- integrity (``_INTEGRITY_REFUSALS``): a refusal that another writer's batch
  may lift once it commits (the credit this batch spends, the spend a refund
  reverses). The batch is retried for ``ledger_claim_idle_s``, then written
  entry by entry and what is still refused is parked.

Parking (``_reject``, the one way an entry leaves the outbox without entering
the ledger) copies the entry into ``ledger_rejected`` with every string
escaped to printable ASCII (``escape_text``), so parking cannot itself be
refused for the entry's content, and then acknowledges it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from .. import bus, metrics, redis_client, streams
from ..aio import raise_if_cancelling, reraise_if_cancelled
from ..config import Settings
from ..economy.economy import Economy
from ..economy.relay import deliveries_state
from ..economy.scripts import script_source
from ..keys import Keys, glob_escape

log = logging.getLogger(__name__)

GROUP = "ledger"
# Backoff after a failed batch (Postgres or Redis away): short first, so a
# blip costs little, capped so a long outage costs one attempt a few seconds.
RETRY_DELAY_MIN_S = 0.1
RETRY_DELAY_MAX_S = 5.0
# What Postgres says of an entry it will not take (a constraint, or the
# balanced-transaction trigger), as opposed to being away, when another
# writer's commit may still make it pass.
_INTEGRITY_REFUSALS = (asyncpg.IntegrityConstraintViolationError, asyncpg.RaiseError)
# The one check on the entries' columns that another commit can satisfy: a
# spend whose credit another writer has not committed yet.
_RETRYABLE_CHECKS = frozenset({"balance_not_negative"})
# Values the client side of asyncpg cannot even send: a str that is not
# UTF-8 (a lone surrogate), an int beyond 64 bits, a value of the wrong type.
_UNSENDABLE = (UnicodeError, OverflowError, asyncpg.exceptions._base.DataError)
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1  # a bigint column's range
# Longest reason kept with a parked entry; Postgres messages are short.
REASON_LEN_MAX = 1000  # characters
# Accounts a writer remembers as existing in Postgres, so a batch whose
# accounts are all known skips _NEW_ACCOUNTS (its statement was about 4 us
# per tip at the ~90-tip batches of the tips benchmark, docs/benchmarks.md).
# About 100 bytes each, so at most ~5 MB; past it the set starts afresh (a
# writer sees far fewer accounts than this between restarts at normal load).
KNOWN_ACCOUNTS_MAX = 50_000  # account ids


@dataclass(frozen=True, slots=True)
class Entry:
    outbox_id: str
    tx: str
    kind: str
    initiator: str
    key: str
    request: str
    reply: str
    meta: str
    postings: list[tuple[str, int]]
    reverses: str | None = None  # a refund's original transaction (from meta)

    @property
    def applied_ms(self) -> int:
        return int(self.outbox_id.partition("-")[0])

    @classmethod
    def parse(cls, outbox_id: bytes, fields: dict[bytes, bytes]) -> Entry:
        """The entry in one outbox record; ``MalformedEntry`` (carrying what
        could be read) when it is not one a money script writes."""
        try:
            text = {k.decode(): v.decode() for k, v in fields.items()}
            words = text["postings"].split()
            if len(words) % 2:
                raise ValueError("postings must be pairs of account and amount")
            postings = [(words[i], int(words[i + 1])) for i in range(0, len(words), 2)]
            if any(not _INT64_MIN <= amount <= _INT64_MAX for _, amount in postings):
                raise ValueError("a posting's amount is beyond 64 bits")
            meta = text.get("meta") or "{}"
            reverses = orjson.loads(meta).get("reverses") if text["kind"] == "refund" else None
            return cls(
                outbox_id.decode(),
                text["tx"],
                text["kind"],
                text["initiator"],
                text["key"],
                text["request"],
                text["reply"],
                meta,
                postings,
                reverses if isinstance(reverses, str) else None,
            )
        except (KeyError, ValueError, AttributeError) as exc:  # UnicodeError is a ValueError
            raise MalformedEntry(outbox_id, fields, exc) from None


class MalformedEntry(ValueError):
    """An outbox record that is not a ledger entry (a field missing, not
    UTF-8, postings unreadable). ``entry`` holds what could be read, its
    bytes decoded with backslash escapes, for parking."""

    def __init__(self, outbox_id: bytes, fields: dict[bytes, bytes], cause: Exception) -> None:
        def text(name: str) -> str:
            return fields.get(name.encode(), b"").decode(errors="backslashreplace")

        # The postings it could not read are kept in the reason.
        super().__init__(
            f"unreadable outbox entry ({type(cause).__name__}: {cause}); "
            f"postings {text('postings')!r}"
        )

        self.entry = Entry(
            outbox_id.decode(errors="backslashreplace"),
            text("tx"),
            text("kind"),
            text("initiator"),
            text("key"),
            text("request"),
            text("reply"),
            text("meta"),
            [],
        )


class KnownAccounts:
    """The user and escrow accounts (the ones _NEW_ACCOUNTS makes) that a
    committed batch of this writer held, so that they exist in Postgres:
    accounts are never deleted (migration 0023 refuses it). Should one be
    missing anyway (a database restored from an older backup), its posting
    is refused with foreign_key_violation, the writer forgets everything
    (``forget``) and the retry makes it."""

    def __init__(self, limit: int = KNOWN_ACCOUNTS_MAX) -> None:
        self._limit = limit
        self._known: set[str] = set()

    def unknown(self, accounts: list[str]) -> list[str]:
        """Of ``accounts``, those _NEW_ACCOUNTS makes and not known to exist."""
        return [a for a in accounts if a.startswith(_MADE_ACCOUNTS) and a not in self._known]

    def remember(self, accounts: list[str]) -> None:
        """After the COMMIT of a batch that made (or found) ``accounts``."""
        if len(self._known) + len(accounts) > self._limit:
            self._known.clear()
        self._known.update(accounts)

    def forget(self) -> None:
        self._known.clear()


class NotRecorded(Exception):
    """Postgres took the batch but not this entry: another transaction holds
    its refund (``reverses`` is unique) or its id."""


class LedgerWriter:
    def __init__(
        self, settings: Settings, pool: asyncpg.Pool, economy: Economy, consumer: str
    ) -> None:
        self._settings = settings
        self._pool = pool
        self._economy = economy
        self._keys = Keys(settings.redis_prefix)
        self._consumer = consumer
        # Its own client: a blocking read holds its connection for a while.
        self._redis: Redis = redis_client.connect(
            settings,
            max_connections=4,
            socket_timeout_s=settings.ledger_block_ms / 1000 + settings.redis_timeout_s,
            blocking=False,
        )
        self._ack_script = self._redis.register_script(script_source("ledger_ack"))
        self._group_ready = False
        self._claims = streams.ClaimClock()
        self._refused_since = 0.0
        # A batch of this writer failed: its entries are pending for it alone.
        self._retry_own = False
        self._accounts = KnownAccounts()

    @property
    def consumer(self) -> str:
        """This writer's name in the outbox's consumer group."""
        return self._consumer

    async def close(self) -> None:
        await self._redis.aclose()

    async def run(self) -> None:
        """Write batches until cancelled; backends failing only slow it down."""
        delay_s = RETRY_DELAY_MIN_S
        linger_s = self._settings.ledger_linger_ms / 1000
        # In `ledger` durability spends wait on every commit: group commit
        # means the next batch starts as soon as this one has committed.
        lingers = self._settings.durability == "redis"
        loop = asyncio.get_running_loop()
        while True:
            # A cancellation that landed inside a blocking read can be
            # swallowed by redis-py, which then reads on: stop here instead
            # of blocking again (a cancelled writer otherwise lingered for
            # seconds, one blocking read after another).
            raise_if_cancelling()
            try:
                started = loop.time()
                written = await self.step(block=True)
                metrics.OUTBOX_DEPTH.set(await self.pending())
                delay_s = RETRY_DELAY_MIN_S
                if lingers and 0 < written < self._settings.ledger_batch_max:
                    # A part batch: let more entries gather before the next
                    # one (ledger_linger_ms). A full batch, or an idle wait
                    # that has outlasted the linger already, goes on at once.
                    await asyncio.sleep(linger_s - (loop.time() - started))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a backend away, or a bad batch: retry later
                reraise_if_cancelled(exc)
                log.warning("ledger writer: %s; retrying in %.1f s", exc, delay_s)
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, RETRY_DELAY_MAX_S)

    async def step(self, *, block: bool, claim_idle_ms: int | None = None) -> int:
        """Read one batch (stale entries of dead writers first) and write it."""
        await self._ensure_group()
        epoch = await self._economy.epoch(rebuilding_ok=True)
        entries = await self._claim(claim_idle_ms)
        if not entries and self._retry_own:
            # Retry our own failed batch (Postgres was away, say) now, rather
            # than leave it until XAUTOCLAIM finds it idle past the claim time.
            entries = await self._read_new(block=False, start="0")
            self._retry_own = bool(entries)
        if not entries:
            entries = await self._read_new(block)
        if not entries:
            return 0
        try:
            await self._write_with_retries(entries, epoch)
        except BaseException:
            self._retry_own = True
            raise
        return len(entries)

    async def pending(self) -> int:
        """Entries in the outbox not yet in Postgres."""
        return int(await self._redis.xlen(self._keys.outbox()))

    async def drain(self, timeout_s: float) -> int:
        """Write until the outbox is empty or the time is up; return what is left."""
        return await streams.drain(self.step, self.pending, timeout_s)

    # --- reading --------------------------------------------------------------------
    async def _ensure_group(self) -> None:
        if self._group_ready:
            return
        await streams.create_group(self._redis, self._keys.outbox(), GROUP)
        self._group_ready = True

    async def _claim(self, claim_idle_ms: int | None) -> list[Entry]:
        claim_idle_ms = self._claims.idle_ms(self._settings.ledger_claim_idle_s, claim_idle_ms)
        if claim_idle_ms is None:
            return []
        try:
            reply = await self._redis.xautoclaim(
                self._keys.outbox(),
                GROUP,
                self._consumer,
                min_idle_time=claim_idle_ms,
                start_id="0-0",
                count=self._settings.ledger_batch_max,
            )
        except ResponseError as exc:
            self._on_missing_group(exc)
            return []
        claimed: Any = reply[1]
        return await self._parse(claimed)

    async def _read_new(self, block: bool, start: str = ">") -> list[Entry]:
        """New entries (``>``), or from ``0`` those delivered to us and not acked."""
        try:
            reply = await self._redis.xreadgroup(
                GROUP,
                self._consumer,
                {self._keys.outbox(): start},
                count=self._settings.ledger_batch_max,
                block=self._settings.ledger_block_ms if block else None,
            )
        except ResponseError as exc:
            self._on_missing_group(exc)
            return []
        streams: Any = reply or []
        return await self._parse([row for _, rows in streams for row in rows])

    async def _parse(self, rows: list[Any]) -> list[Entry]:
        """The entries among outbox records; a malformed one is parked now.
        (A record without fields was deleted after its delivery: skipped.)"""
        entries = []
        for outbox_id, fields in rows:
            if not fields:
                continue
            try:
                entries.append(Entry.parse(outbox_id, fields))
            except MalformedEntry as exc:
                await self._reject(exc.entry, exc)
        return entries

    def _on_missing_group(self, exc: ResponseError) -> None:
        if "NOGROUP" not in str(exc):
            raise exc
        # Redis lost its data: the stream and group go with it; make them anew.
        log.warning("the outbox group is gone (Redis reset?); recreating it")
        self._group_ready = False

    # --- writing --------------------------------------------------------------------
    async def _write_with_retries(self, entries: list[Entry], epoch: str) -> None:
        try:
            await self._write_bisecting(entries, epoch)
        except _INTEGRITY_REFUSALS as exc:
            # Usually passing: another writer's earlier batch (say, the credit
            # this batch spends) has not committed yet. Refused for long, it is
            # an entry Postgres will never take: write the batch entry by
            # entry and park what is refused, so the rest of the ledger moves.
            now = time.monotonic()
            self._refused_since = self._refused_since or now
            if now - self._refused_since < self._settings.ledger_claim_idle_s:
                raise
            log.error(
                "ledger batch refused for %.0f s (%s); isolating it", now - self._refused_since, exc
            )
            for entry in entries:
                try:
                    await self._write([entry], epoch)
                except Exception as single:
                    if not isinstance(single, _INTEGRITY_REFUSALS) and not _is_data_refusal(single):
                        raise
                    await self._reject(entry, single)
        self._refused_since = 0.0

    async def _write_bisecting(self, entries: list[Entry], epoch: str) -> None:
        """Write the entries; when Postgres refuses one for its data, write
        each half in order, down to the culprit, which is parked at once.

        Bisection, not entry by entry: a poisoned entry costs about 2 log2(n)
        transactions (20 for a full batch of 1000) instead of n, and the good
        entries still commit in outbox order, so a spend never goes before the
        credit it spends."""
        try:
            await self._write(entries, epoch)
        except Exception as exc:
            if not _is_data_refusal(exc):
                raise
            if len(entries) == 1:
                await self._reject(entries[0], exc)
                return
            half = len(entries) // 2
            await self._write_bisecting(entries[:half], epoch)
            await self._write_bisecting(entries[half:], epoch)

    async def _write(self, entries: list[Entry], epoch: str) -> None:
        try:
            await self._write_once(entries, epoch)
        except BaseException:
            # Whatever refused the batch, the retry makes every account again
            # rather than trust the cache (see KnownAccounts).
            self._accounts.forget()
            raise

    async def _write_once(self, entries: list[Entry], epoch: str) -> None:
        accounts = [account for e in entries for account, _ in e.postings]
        new = self._accounts.unknown(accounts)
        async with self._pool.acquire() as conn, conn.transaction():
            newest = max(_stream_position(entry.outbox_id) for entry in entries)
            if new:
                await conn.execute(_NEW_ACCOUNTS, new)
            rows = await conn.fetch(
                _WRITE_BATCH,
                [e.tx for e in entries],
                [e.kind for e in entries],
                [e.initiator for e in entries],
                [e.key for e in entries],
                [e.reverses for e in entries],
                [e.request for e in entries],
                [e.reply for e in entries],
                [e.meta for e in entries],
                [e.applied_ms for e in entries],
                [e.outbox_id for e in entries],
                [e.tx for e in entries for _ in e.postings],
                accounts,
                [amount for e in entries for _, amount in e.postings],
                epoch,
                self._consumer,
                *newest,
            )
            refused = {row["outbox_id"] for row in rows}
            # The fence: commit only into the Redis dataset the batch came from.
            if await self._economy.epoch(rebuilding_ok=True) != epoch:
                raise RedisReset("Redis was reset while this batch was written; dropping it")
        self._accounts.remember(new)
        # Parked after the commit: if this writer dies first, the entries are
        # delivered again and refused again (what holds their place is
        # committed), so parking them is never lost, only repeated.
        for entry in entries:
            if entry.outbox_id in refused:
                await self._reject(entry, NotRecorded(_NOT_RECORDED_REASON))
        await self._ack(
            [entry.outbox_id for entry in entries],
            committed=[entry.tx for entry in entries if entry.outbox_id not in refused],
            parked=[],
        )
        now_s = time.time()
        for entry in entries:
            metrics.LEDGER_LAG.observe(max(0.0, now_s - entry.applied_ms / 1000))
        metrics.LEDGER_WRITTEN.inc(len(entries))

    async def _reject(self, entry: Entry, exc: Exception) -> None:
        """Park an entry that will not enter the ledger, so the rest moves on:
        every parking goes through here. Its strings are escaped first, so
        Postgres can store whatever the entry held; only Postgres or Redis
        being away can fail this (and the entry is then delivered again)."""
        reason = escape_text(f"{type(exc).__name__}: {exc}")[:REASON_LEN_MAX]
        outbox_id, tx = escape_text(entry.outbox_id), escape_text(entry.tx)
        log.error("ledger: entry %s (tx %s) parked: %s", outbox_id, tx, reason)
        inserted = await self._pool.fetchval(
            """INSERT INTO ledger_rejected (outbox_id, tx_id, reason, entry)
               VALUES ($1, $2, $3, $4::jsonb) ON CONFLICT DO NOTHING RETURNING 1""",
            outbox_id,
            tx,
            reason,
            orjson.dumps(escaped_entry(entry)).decode(),
        )
        if inserted:  # not a re-delivery of an entry parked already
            metrics.LEDGER_REJECTED.inc()
            metrics.LEDGER_REJECTED_ROWS.inc()
        # The spend waiting on it (durability `ledger`) is told it was parked.
        await self._ack([entry.outbox_id], committed=[], parked=[tx])

    async def _ack(self, ids: list[str], *, committed: list[str], parked: list[str]) -> None:
        """After COMMIT: the entries leave the outbox, and the spends waiting
        on them (durability `ledger`, on any node) are told, in one atomic
        call (ledger_ack.lua)."""
        # Published in either durability mode: a writer need not know how
        # the gateways it serves are configured (Procfile: separate ones).
        await self._ack_script(
            keys=[self._keys.outbox()],
            args=[
                GROUP,
                self._keys.ledger_commits(),
                bus.LedgerCommitted(tuple(committed)).encode() if committed else b"",
                bus.LedgerParked(tuple(parked)).encode() if parked else b"",
                *ids,
            ],
        )


class RedisReset(Exception):
    """Redis lost its data while a batch was being written."""


def escape_text(text: str) -> str:
    """``text`` in printable ASCII: a backslash doubled, every other
    character outside 0x20-0x7E written as Python writes it in a string
    literal (``\\x00``, ``\\n``, ``\\u00e9``, ``\\ud800``). Any str, lone
    surrogates included, comes out as one that text and jsonb columns take;
    ``codecs.decode(escaped, "unicode_escape")`` gives the original back."""
    if text.isascii() and text.isprintable() and "\\" not in text:
        return text
    return text.encode("unicode_escape").decode("ascii")


def escaped_entry(entry: Entry) -> dict[str, Any]:
    """A parked entry as stored in ``ledger_rejected.entry``: each string
    field through ``escape_text``, postings as [account, amount] pairs."""
    return {
        "outbox_id": escape_text(entry.outbox_id),
        "tx": escape_text(entry.tx),
        "kind": escape_text(entry.kind),
        "initiator": escape_text(entry.initiator),
        "key": escape_text(entry.key),
        "request": escape_text(entry.request),
        "reply": escape_text(entry.reply),
        "meta": escape_text(entry.meta),
        "postings": [[escape_text(account), amount] for account, amount in entry.postings],
    }


def _is_data_refusal(exc: BaseException) -> bool:
    """Postgres (or asyncpg, before sending) refuses the entry for what it
    holds, which no retry can change."""
    if isinstance(exc, asyncpg.DataError | asyncpg.NotNullViolationError):
        return True  # class 22: bad encoding, a jsonb escape, out of range...
    if isinstance(exc, asyncpg.CheckViolationError):
        return exc.constraint_name not in _RETRYABLE_CHECKS
    return isinstance(exc, _UNSENDABLE)


def _stream_position(outbox_id: str) -> tuple[int, int]:
    ms, _, seq = outbox_id.partition("-")
    return int(ms), int(seq)


# A whole batch in one statement, from arrays (no staging tables: creating,
# filling and truncating them on every commit was most of a small batch's
# cost). The new transactions; the postings of those actually inserted (a
# transaction id seen before inserts nothing: a re-delivery); each account's
# running balance raised by its postings' sum (new user accounts `u:<id>` and
# escrow accounts `esc:<kind>:<id>` are made by _NEW_ACCOUNTS just before: a
# sibling of this statement could not see them); the writer's watermark for
# this epoch (see Economy.ensure_fresh). It returns the outbox ids of entries
# in neither the ledger nor this batch's inserts: they collided with another
# transaction on the refund (`reverses` is unique).
_NOT_RECORDED_REASON = "another transaction already holds its refund"
# The accounts _NEW_ACCOUNTS makes when a posting names them (its LIKEs).
_MADE_ACCOUNTS = ("u:", "esc:")
_NEW_ACCOUNTS = """
INSERT INTO accounts (id, kind)
SELECT DISTINCT id, CASE WHEN id LIKE 'esc:%' THEN 'escrow' ELSE 'user' END
FROM unnest($1::text[]) AS a(id) WHERE id LIKE 'u:%' OR id LIKE 'esc:%'
ORDER BY 1
ON CONFLICT (id) DO NOTHING
"""
_WRITE_BATCH = """
WITH batch AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],
                         $6::text[], $7::text[], $8::text[], $9::bigint[], $10::text[])
        AS b(id, kind, initiator, idem_key, reverses, request, reply, meta, applied_ms,
             outbox_id)
), inserted AS (
    INSERT INTO ledger_transactions
        (id, kind, initiator, idem_key, reverses, request, reply, meta, applied_ms, outbox_id)
    SELECT id, kind, initiator, idem_key, reverses, request, reply::jsonb, meta::jsonb,
           applied_ms, outbox_id
    FROM batch ORDER BY outbox_id
    ON CONFLICT DO NOTHING
    RETURNING id
), posted AS (
    INSERT INTO ledger_postings (tx_id, account_id, amount)
    SELECT l.tx_id, l.account_id, l.amount
    FROM unnest($11::text[], $12::text[], $13::bigint[]) AS l(tx_id, account_id, amount)
    JOIN inserted i ON i.id = l.tx_id
    RETURNING account_id, amount
), balances AS (
    UPDATE accounts a SET balance = a.balance + d.delta
    FROM (SELECT account_id, sum(amount) AS delta FROM posted GROUP BY account_id) d
    WHERE a.id = d.account_id
), watermark AS (
    INSERT INTO ledger_watermarks AS w (epoch, writer, last_ms, last_seq)
    VALUES ($14, $15, $16, $17)
    ON CONFLICT (epoch, writer) DO UPDATE
        SET last_ms = EXCLUDED.last_ms, last_seq = EXCLUDED.last_seq, updated_at = now()
        WHERE (w.last_ms, w.last_seq) < (EXCLUDED.last_ms, EXCLUDED.last_seq)
)
SELECT b.outbox_id FROM batch b
WHERE NOT EXISTS (SELECT 1 FROM inserted i WHERE i.id = b.id)
  AND NOT EXISTS (SELECT 1 FROM ledger_transactions t WHERE t.id = b.id)
"""


async def reconcile(
    redis: Redis,
    pool: asyncpg.Pool,
    keys: Keys,
    writer: LedgerWriter,
    drain_timeout_s: float,
    relay_lag_max_s: float = math.inf,
) -> dict[str, Any]:
    """Drain the outbox, then compare every hot balance with Postgres; and
    report the relay's delivery stream (``deliveries``), not ok while its
    oldest entry is older than ``relay_lag_max_s``."""
    pending = await writer.drain(drain_timeout_s)
    deliveries = await deliveries_state(redis, keys, relay_lag_max_s)
    mismatches: list[dict[str, Any]] = []
    redis_balances = await _redis_balances(redis, keys)
    async with pool.acquire() as conn:
        rows = await conn.fetch(
            """SELECT a.id, a.balance, coalesce(sum(p.amount), 0)::bigint AS postings
               FROM accounts a LEFT JOIN ledger_postings p ON p.account_id = a.id
               GROUP BY a.id"""
        )
        rejected = await conn.fetchval("SELECT count(*) FROM ledger_rejected")
        # Escrow: a closed object's escrow must be empty, and an escrow that
        # holds tokens must belong to an object (escrow_objects, 0009).
        escrows = await conn.fetch(
            """SELECT a.id, a.balance, o.closed FROM accounts a
               LEFT JOIN escrow_objects o ON o.account = a.id
               WHERE a.kind = 'escrow' AND a.balance <> 0
                 AND (o.account IS NULL OR o.closed)"""
        )
    metrics.LEDGER_REJECTED_ROWS.set(rejected)
    postgres = {row["id"]: row["balance"] for row in rows}
    for row in rows:
        if row["balance"] != row["postings"]:
            mismatches.append(
                {"account": row["id"], "postgres": row["balance"], "postings": row["postings"]}
            )
    for account, hot in sorted(redis_balances.items()):
        durable = postgres.get(account, 0)
        if hot != durable:
            mismatches.append({"account": account, "redis": hot, "postgres": durable})
    for row in escrows:
        problem = "closed object's escrow" if row["closed"] else "escrow of no object"
        mismatches.append({"account": row["id"], "escrow": row["balance"], "problem": problem})
    total = sum(postgres.values())
    if total != 0:
        mismatches.append({"account": "*", "postgres_sum": total, "expected": 0})
    metrics.RECONCILE_MISMATCHES.set(len(mismatches))
    return {
        "ok": not mismatches
        and pending == 0
        and rejected == 0
        and not deliveries["behind"]
        and deliveries["parked"] == 0,
        "pending": pending,
        "deliveries": deliveries,
        "rejected": rejected,
        "mismatches": mismatches,
        "accounts": len(postgres),
        "issued": -postgres.get("sys:mint", 0),
    }


async def parked_entries(pool: asyncpg.Pool, limit: int) -> dict[str, Any]:
    """The newest ``limit`` rows of ``ledger_rejected`` and how many there are."""
    async with pool.acquire() as conn:
        rows = await conn.fetch(
            """SELECT outbox_id, tx_id, reason, entry::text AS entry, recorded_at
               FROM ledger_rejected ORDER BY recorded_at DESC, outbox_id DESC LIMIT $1""",
            limit,
        )
        total = await conn.fetchval("SELECT count(*) FROM ledger_rejected")
    metrics.LEDGER_REJECTED_ROWS.set(total)
    items = [
        {
            "outbox_id": row["outbox_id"],
            "tx": row["tx_id"],
            "reason": row["reason"],
            "recorded_at": row["recorded_at"].isoformat(),
            "entry": orjson.loads(row["entry"]),
        }
        for row in rows
    ]
    return {"total": total, "items": items}


async def _redis_balances(redis: Redis, keys: Keys) -> dict[str, int]:
    prefix = keys.balance_prefix()
    names = [key async for key in redis.scan_iter(match=glob_escape(prefix) + "*", count=1000)]
    balances: dict[str, int] = {}
    for start in range(0, len(names), 1000):
        chunk = names[start : start + 1000]
        for name, value in zip(chunk, await redis.mget(chunk), strict=True):
            if value is not None:
                balances[name.decode()[len(prefix) :]] = int(value)
    return balances
