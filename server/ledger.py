"""The ledger writer: the Redis outbox into Postgres, exactly once.

Money scripts append one entry per transaction to the outbox stream. Writers
(one per ``serve`` process, or ``tokenchat ledger``) read it through one
consumer group, so each entry goes to one writer at a time, and write a batch
in one Postgres transaction: COPY into staging tables, then
``INSERT ... ON CONFLICT DO NOTHING`` on the transaction id, the postings of
the transactions actually inserted, and the accounts' running balances. Only
after COMMIT are the entries acknowledged and deleted from the stream, so an
entry leaves Redis only once it is in Postgres. A writer that dies between
COMMIT and XACK leaves entries that another writer claims (XAUTOCLAIM) and
writes again: ON CONFLICT makes that a no-op, so nothing is doubled.

If Redis loses its data while a batch is in flight (its epoch changes), the
batch is rolled back instead of committed: balances reloaded from Postgres
meanwhile must not miss transactions committed after they were read.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from . import confirmations, metrics
from .aio import reraise_if_cancelled
from .config import Settings
from .economy import Economy
from .keys import Keys, glob_escape

log = logging.getLogger(__name__)

GROUP = "ledger"
# Backoff after a failed batch (Postgres or Redis away): short first, so a
# blip costs little, capped so a long outage costs one attempt a few seconds.
RETRY_DELAY_MIN_S = 0.1
RETRY_DELAY_MAX_S = 5.0
# What Postgres says of an entry it will not take (a constraint, or the
# balanced-transaction trigger), as opposed to being away.
_REFUSALS = (asyncpg.IntegrityConstraintViolationError, asyncpg.RaiseError)


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

    @property
    def applied_ms(self) -> int:
        return int(self.outbox_id.partition("-")[0])

    @property
    def reverses(self) -> str | None:
        if self.kind != "refund":
            return None
        value = orjson.loads(self.meta).get("reverses")
        return value if isinstance(value, str) else None

    @classmethod
    def parse(cls, outbox_id: bytes, fields: dict[bytes, bytes]) -> Entry:
        text = {k.decode(): v.decode() for k, v in fields.items()}
        words = text["postings"].split()
        postings = [(words[i], int(words[i + 1])) for i in range(0, len(words), 2)]
        return cls(
            outbox_id.decode(),
            text["tx"],
            text["kind"],
            text["initiator"],
            text["key"],
            text["request"],
            text["reply"],
            text.get("meta") or "{}",
            postings,
        )


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
        self._redis: Redis = Redis.from_url(
            settings.redis_url,
            max_connections=4,
            socket_timeout=settings.ledger_block_ms / 1000 + settings.redis_timeout_s,
            socket_connect_timeout=settings.redis_timeout_s,
        )
        self._group_ready = False
        self._last_claim = 0.0
        self._refused_since = 0.0
        # A batch of this writer failed: its entries are pending for it alone.
        self._retry_own = False

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
            try:
                started = loop.time()
                written = await self.step(block=True)
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
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if await self.pending() == 0:
                return 0
            # Claim everything: an entry another writer holds is written
            # twice at worst, which ON CONFLICT turns into a no-op.
            if await self.step(block=False, claim_idle_ms=0) == 0:
                await asyncio.sleep(0.05)
        return await self.pending()

    # --- reading --------------------------------------------------------------------
    async def _ensure_group(self) -> None:
        if self._group_ready:
            return
        try:
            await self._redis.xgroup_create(self._keys.outbox(), GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    async def _claim(self, claim_idle_ms: int | None) -> list[Entry]:
        now = time.monotonic()
        if claim_idle_ms is None:
            if now - self._last_claim < self._settings.ledger_claim_idle_s / 2:
                return []
            claim_idle_ms = int(self._settings.ledger_claim_idle_s * 1000)
        self._last_claim = now
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
        return [Entry.parse(i, f) for i, f in claimed if f]

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
        return [Entry.parse(i, f) for _, rows in streams for i, f in rows if f]

    def _on_missing_group(self, exc: ResponseError) -> None:
        if "NOGROUP" not in str(exc):
            raise exc
        # Redis lost its data: the stream and group go with it; make them anew.
        log.warning("the outbox group is gone (Redis reset?); recreating it")
        self._group_ready = False

    # --- writing --------------------------------------------------------------------
    async def _write_with_retries(self, entries: list[Entry], epoch: str) -> None:
        try:
            await self._write(entries, epoch)
        except _REFUSALS as exc:
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
                except _REFUSALS as single:
                    await self._reject(entry, single)
        self._refused_since = 0.0

    async def _write(self, entries: list[Entry], epoch: str) -> None:
        async with self._pool.acquire() as conn, conn.transaction():
            await _stage(conn, entries)
            deltas = await conn.fetch(_INSERT_NEW)
            if deltas:
                await conn.execute(
                    """UPDATE accounts SET balance = accounts.balance + d.delta
                       FROM unnest($1::text[], $2::bigint[]) AS d(id, delta)
                       WHERE accounts.id = d.id""",
                    [row["account_id"] for row in deltas],
                    [row["delta"] for row in deltas],
                )
            await _record_watermark(conn, epoch, self._consumer, entries)
            refused = await conn.fetch(_NOT_RECORDED)
            for row in refused:
                await conn.execute(
                    """INSERT INTO ledger_rejected (outbox_id, tx_id, reason, entry)
                       VALUES ($1, $2, $3, $4::jsonb) ON CONFLICT DO NOTHING""",
                    row["outbox_id"],
                    row["id"],
                    "another transaction already holds its idempotency key or refund",
                    orjson.dumps(dict(row)).decode(),
                )
                metrics.LEDGER_REJECTED.inc()
                log.error("ledger: entry %s (tx %s) was not recorded", row["outbox_id"], row["id"])
            # The fence: commit only into the Redis dataset the batch came from.
            if await self._economy.epoch(rebuilding_ok=True) != epoch:
                raise RedisReset("Redis was reset while this batch was written; dropping it")
        parked = {row["id"] for row in refused}
        await self._ack(
            [entry.outbox_id for entry in entries],
            committed=[entry.tx for entry in entries if entry.tx not in parked],
            parked=sorted(parked),
        )
        now_s = time.time()
        for entry in entries:
            metrics.LEDGER_LAG.observe(max(0.0, now_s - entry.applied_ms / 1000))
        metrics.LEDGER_WRITTEN.inc(len(entries))

    async def _reject(self, entry: Entry, exc: Exception) -> None:
        """Park an entry Postgres refuses, so the rest of the ledger moves on."""
        log.error(
            "ledger: entry %s (tx %s) refused by Postgres: %s", entry.outbox_id, entry.tx, exc
        )
        await self._pool.execute(
            """INSERT INTO ledger_rejected (outbox_id, tx_id, reason, entry)
               VALUES ($1, $2, $3, $4::jsonb) ON CONFLICT DO NOTHING""",
            entry.outbox_id,
            entry.tx,
            str(exc)[:1000],
            orjson.dumps(_entry_json(entry)).decode(),
        )
        metrics.LEDGER_REJECTED.inc()
        await self._ack([entry.outbox_id], committed=[], parked=[entry.tx])

    async def _ack(self, ids: list[str], *, committed: list[str], parked: list[str]) -> None:
        """After COMMIT: the entries leave the outbox, and the spends waiting
        on them (durability `ledger`, on any node) are told, in one MULTI."""
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.xack(self._keys.outbox(), GROUP, *ids)
            pipe.xdel(self._keys.outbox(), *ids)
            # Published in either durability mode: a writer need not know how
            # the gateways it serves are configured (Procfile: separate ones).
            channel = self._keys.ledger_commits()
            if committed:
                pipe.publish(channel, confirmations.encode(confirmations.COMMITTED, committed))
            if parked:
                pipe.publish(channel, confirmations.encode(confirmations.PARKED, parked))
            await pipe.execute()


class RedisReset(Exception):
    """Redis lost its data while a batch was being written."""


def _entry_json(entry: Entry) -> dict[str, Any]:
    return {
        "outbox_id": entry.outbox_id,
        "tx": entry.tx,
        "kind": entry.kind,
        "initiator": entry.initiator,
        "key": entry.key,
        "request": entry.request,
        "reply": entry.reply,
        "meta": entry.meta,
        "postings": entry.postings,
    }


async def _stage(conn: Any, entries: list[Entry]) -> None:
    await conn.execute(
        """CREATE TEMP TABLE IF NOT EXISTS staging_tx (
               id text, kind text, initiator text, idem_key text, reverses text,
               request text, reply text, meta text, applied_ms bigint, outbox_id text
           ) ON COMMIT DELETE ROWS;
           CREATE TEMP TABLE IF NOT EXISTS staging_postings (
               tx_id text, account_id text, amount bigint
           ) ON COMMIT DELETE ROWS"""
    )
    await conn.copy_records_to_table(
        "staging_tx",
        records=[
            (
                e.tx,
                e.kind,
                e.initiator,
                e.key,
                e.reverses,
                e.request,
                e.reply,
                e.meta,
                e.applied_ms,
                e.outbox_id,
            )
            for e in entries
        ],
    )
    await conn.copy_records_to_table(
        "staging_postings",
        records=[(e.tx, account, amount) for e in entries for account, amount in e.postings],
    )
    await conn.execute(
        """INSERT INTO accounts (id, kind)
           SELECT DISTINCT account_id, 'user' FROM staging_postings WHERE account_id LIKE 'u:%'
           ON CONFLICT (id) DO NOTHING"""
    )


async def _record_watermark(conn: Any, epoch: str, writer: str, entries: list[Entry]) -> None:
    """Remember the newest outbox entry of this epoch that the ledger holds, so
    that a Redis which comes back older than that is caught (Economy.ensure_fresh).
    One row per writer, so concurrent writers never wait on each other's row."""
    newest = max(_stream_position(entry.outbox_id) for entry in entries)
    await conn.execute(
        """INSERT INTO ledger_watermarks AS w (epoch, writer, last_ms, last_seq)
           VALUES ($1, $2, $3, $4)
           ON CONFLICT (epoch, writer) DO UPDATE
               SET last_ms = EXCLUDED.last_ms, last_seq = EXCLUDED.last_seq, updated_at = now()
               WHERE (w.last_ms, w.last_seq) < (EXCLUDED.last_ms, EXCLUDED.last_seq)""",
        epoch,
        writer,
        *newest,
    )


def _stream_position(outbox_id: str) -> tuple[int, int]:
    ms, _, seq = outbox_id.partition("-")
    return int(ms), int(seq)


# The new transactions, their postings, and each account's change, in one
# statement; a transaction id seen before inserts nothing (a re-delivery).
_INSERT_NEW = """
WITH inserted AS (
    INSERT INTO ledger_transactions
        (id, kind, initiator, idem_key, reverses, request, reply, meta, applied_ms, outbox_id)
    SELECT id, kind, initiator, idem_key, reverses, request, reply::jsonb, meta::jsonb,
           applied_ms, outbox_id
    FROM staging_tx ORDER BY outbox_id
    ON CONFLICT DO NOTHING
    RETURNING id
), posted AS (
    INSERT INTO ledger_postings (tx_id, account_id, amount)
    SELECT p.tx_id, p.account_id, p.amount
    FROM staging_postings p JOIN inserted i ON i.id = p.tx_id
    RETURNING account_id, amount
)
SELECT account_id, sum(amount)::bigint AS delta FROM posted GROUP BY account_id ORDER BY account_id
"""

# Staged entries that are in neither the ledger (by id) nor were inserted:
# they collided with another transaction on the idempotency key or refund.
_NOT_RECORDED = """
SELECT s.* FROM staging_tx s
WHERE NOT EXISTS (SELECT 1 FROM ledger_transactions t WHERE t.id = s.id)
"""


async def reconcile(
    redis: Redis, pool: asyncpg.Pool, keys: Keys, writer: LedgerWriter, drain_timeout_s: float
) -> dict[str, Any]:
    """Drain the outbox, then compare every hot balance with Postgres."""
    pending = await writer.drain(drain_timeout_s)
    mismatches: list[dict[str, Any]] = []
    redis_balances = await _redis_balances(redis, keys)
    async with pool.acquire() as conn:
        rows = await conn.fetch(
            """SELECT a.id, a.balance, coalesce(sum(p.amount), 0)::bigint AS postings
               FROM accounts a LEFT JOIN ledger_postings p ON p.account_id = a.id
               GROUP BY a.id"""
        )
        rejected = await conn.fetchval("SELECT count(*) FROM ledger_rejected")
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
    total = sum(postgres.values())
    if total != 0:
        mismatches.append({"account": "*", "postgres_sum": total, "expected": 0})
    return {
        "ok": not mismatches and pending == 0 and rejected == 0,
        "pending": pending,
        "rejected": rejected,
        "mismatches": mismatches,
        "accounts": len(postgres),
        "issued": -postgres.get("sys:mint", 0),
    }


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
