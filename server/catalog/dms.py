"""Private messages kept for history, and who blocks whose DMs.

DMs are delivered by ``dm.lua`` (the recipient's inbox stream, bounded, and
their user channel). So that a conversation can be paged later, the same
atomic call appends the DM to one archive stream, ``{eco}:dmlog``; the
``DmArchive`` loop copies it into the ``dms`` table off the hot path (a
consumer group, the way the ledger writer reads the outbox), then
acknowledges and deletes the entries. Paid and free DMs alike: a free DM has
a transaction id but no ledger row. A DM shows in history within about
``dm_archive_block_ms`` of its delivery; a Redis that loses its data loses
the DMs not yet archived (their money, if any, is in the ledger as usual).

Blocks: ``dm_blocks`` in Postgres is the truth; Redis keeps one set per
blocker (``Keys.blocks``), loaded lazily when ``dm.lua`` finds it missing,
and ``dm.lua`` refuses a blocked sender in the very call that would charge.
A change commits in Postgres first, then bumps the blocker's generation and
drops the set, so the next DM reloads it (``blocks_load.lua`` fences a load
that raced the change).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import asyncpg
import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from tokenchat.protocol.limits import USER_ID_RE

from .. import metrics, redis_client, streams
from ..aio import raise_if_cancelling, reraise_if_cancelled
from ..config import Settings
from ..economy.scripts import script_source
from ..errors import BadRequest, LimitExceeded, NotFound, Unavailable
from ..keys import Keys

log = logging.getLogger(__name__)

GROUP = "dm-archive"
# A failed pass of the archiver is tried again after this long, doubling.
RETRY_DELAY_MIN_S = 0.1
RETRY_DELAY_MAX_S = 5.0
# Loads of a blocks set raced by a change before giving up (each race means a
# block or an unblock committed meanwhile; two in a row are already rare).
BLOCKS_LOAD_ATTEMPTS_MAX = 5
# Postgres refuses NUL in text (the wire contract allows it in a DM): the
# archive keeps the replacement character in its place.
NUL = "\x00"
REPLACEMENT = "\ufffd"

_DB_ERRORS = (asyncpg.PostgresError, OSError, asyncio.TimeoutError)
_REDIS_ERRORS = (RedisError, OSError)

_INSERT = """
INSERT INTO dms (tx, sender, recipient, text, price, media, ts, pair_low, pair_high)
SELECT tx, sender, recipient, text, price, media::jsonb, ts,
       least(sender, recipient), greatest(sender, recipient)
  FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bigint[], $6::text[],
              $7::bigint[]) AS u(tx, sender, recipient, text, price, media, ts)
ON CONFLICT (tx) DO NOTHING
"""


def _row(fields: dict[bytes, bytes]) -> tuple[Any, ...]:
    """(tx, sender, recipient, text, price, media JSON or None, ts) of an entry."""
    event = orjson.loads(fields[b"e"])
    media = event.get("media")
    return (
        str(event["tx"]),
        str(event["from"]),
        fields[b"to"].decode(),
        str(event["text"]).replace(NUL, REPLACEMENT),
        int(event["price"]),
        None if media is None else orjson.dumps(media).decode().replace("\\u0000", ""),
        int(event["ts"]),
    )


class DmArchive:
    """Copies the archive stream into Postgres; pages conversations."""

    def __init__(self, settings: Settings, pool: asyncpg.Pool, consumer: str) -> None:
        self._settings = settings
        self._pool = pool
        self._keys = Keys(settings.redis_prefix)
        self._consumer = consumer
        # Its own client: a blocking read holds its connection for a while.
        self._redis: Redis = redis_client.connect(
            settings,
            max_connections=2,
            socket_timeout_s=settings.dm_archive_block_ms / 1000 + settings.redis_timeout_s,
            blocking=False,
        )
        self._group_ready = False

    async def close(self) -> None:
        await self._redis.aclose()

    async def run(self) -> None:
        """Archive until cancelled; backends failing only slow it down."""
        delay_s = RETRY_DELAY_MIN_S
        while True:
            raise_if_cancelling()
            try:
                await self.step(block=True)
                # One XLEN per batch or per idle read: an operator sees a
                # stream no archiver drains (docs/ops/alerts.yml).
                metrics.DM_ARCHIVE_DEPTH.set(await self.pending())
                delay_s = RETRY_DELAY_MIN_S
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a backend away: retry later
                reraise_if_cancelled(exc)
                log.warning("DM archive: %s; retrying in %.1f s", exc, delay_s)
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, RETRY_DELAY_MAX_S)

    async def step(self, *, block: bool, claim_idle_ms: int | None = None) -> int:
        """Archive one batch: entries of dead archivers first, then our own
        unacknowledged ones, then new ones. Returns the entries handled."""
        await self._ensure_group()
        idle_ms = (
            int(self._settings.dm_archive_claim_idle_s * 1000)
            if claim_idle_ms is None
            else claim_idle_ms
        )
        stream = self._keys.dm_log()
        batch = self._settings.dm_archive_batch_max
        try:
            claimed: Any = await self._redis.xautoclaim(
                stream, GROUP, self._consumer, min_idle_time=idle_ms, count=batch
            )
            rows = list(claimed[1])
            if not rows:
                own: Any = await self._redis.xreadgroup(
                    GROUP, self._consumer, {stream: "0"}, count=batch
                )
                rows = [row for _, entries in own or [] for row in entries]
            if not rows:
                new: Any = await self._redis.xreadgroup(
                    GROUP,
                    self._consumer,
                    {stream: ">"},
                    count=batch,
                    block=self._settings.dm_archive_block_ms if block else None,
                )
                rows = [row for _, entries in new or [] for row in entries]
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            # Redis lost its data: the stream and group go with it.
            self._group_ready = False
            return 0
        if not rows:
            return 0
        await self._write([fields for _, fields in rows if fields])
        ids = [entry_id for entry_id, _ in rows]
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.xack(stream, GROUP, *ids)
            pipe.xdel(stream, *ids)
            await pipe.execute()
        metrics.DM_ARCHIVED.inc(len(rows))
        return len(rows)

    async def drain(self, timeout_s: float) -> int:
        """Archive until the stream is empty or the time is up; what is left."""
        return await streams.drain(self.step, self.pending, timeout_s)

    async def pending(self) -> int:
        return int(await self._redis.xlen(self._keys.dm_log()))

    async def _ensure_group(self) -> None:
        if self._group_ready:
            return
        await streams.create_group(self._redis, self._keys.dm_log(), GROUP)
        self._group_ready = True

    async def _write(self, entries: list[dict[bytes, bytes]]) -> None:
        rows = []
        for fields in entries:
            try:
                rows.append(_row(fields))
            except (KeyError, ValueError, TypeError) as exc:  # not written by dm.lua
                log.error("DM archive: dropping a malformed entry %r: %s", fields, exc)
        if not rows:
            return
        try:
            await self._insert(rows)
        except (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError):
            # One row Postgres refuses must not hold the others back forever:
            # each is tried alone and the refused ones are logged and dropped.
            for row in rows:
                try:
                    await self._insert([row])
                except (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError) as exc:
                    log.error("DM archive: Postgres refused DM %s: %s", row[0], exc)

    async def _insert(self, rows: list[tuple[Any, ...]]) -> None:
        columns = list(zip(*rows, strict=True))
        await self._pool.execute(_INSERT, *[list(column) for column in columns])

    # --- reading ------------------------------------------------------------------------
    async def conversation(
        self, user_id: str, other: str, before: tuple[int, str] | None, limit: int
    ) -> dict[str, Any]:
        """The DMs between two users, newest first, ``limit`` of them before
        the cursor (``ts``, ``tx``); ``next`` is the cursor of the next page."""
        low, high = sorted((user_id, other))
        try:
            rows = await self._pool.fetch(
                """SELECT tx, sender, recipient, text, price, media::text AS media, ts
                     FROM dms
                    WHERE pair_low = $1 AND pair_high = $2
                      AND ($3::bigint IS NULL OR (ts, tx) < ($3, $4))
                    ORDER BY ts DESC, tx DESC LIMIT $5""",
                low,
                high,
                None if before is None else before[0],
                None if before is None else before[1],
                limit + 1,
            )
        except _DB_ERRORS as exc:
            raise Unavailable("DM history is unavailable") from exc
        page = rows[:limit]
        messages = [
            {
                "tx": row["tx"],
                "from": row["sender"],
                "to": row["recipient"],
                "text": row["text"],
                "price": row["price"],
                "ts": row["ts"],
                **({"media": orjson.loads(row["media"])} if row["media"] else {}),
            }
            for row in page
        ]
        more = len(rows) > limit
        cursor = f"{page[-1]['ts']}-{page[-1]['tx']}" if more and page else None
        return {"with": other, "messages": messages, "next": cursor}


class Blocks:
    """Who blocks whose DMs: Postgres, and the Redis sets dm.lua reads."""

    def __init__(self, settings: Settings, pool: asyncpg.Pool, redis: Redis) -> None:
        self._settings = settings
        self._pool = pool
        self._redis = redis
        self._keys = Keys(settings.redis_prefix)
        # A repeat writes the same set, or nothing: safe to send again.
        self._load_script = redis.register_script(script_source("blocks_load"))

    async def block(self, user_id: str, other: str) -> dict[str, Any]:
        """``user_id`` refuses DMs from ``other`` from now on (idempotent)."""
        _check_other(user_id, other)
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                # One blocker at a time: the count and the insert agree.
                await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", user_id)
                exists = await conn.fetchval("SELECT 1 FROM users WHERE id = $1", other)
                if exists is None:
                    raise NotFound(f"no user '{other}'")
                count = await conn.fetchval(
                    "SELECT count(*) FROM dm_blocks WHERE blocker = $1", user_id
                )
                if count >= self._settings.dm_blocks_max:
                    raise LimitExceeded(
                        f"at most {self._settings.dm_blocks_max} blocks; unblock someone first"
                    )
                await conn.execute(
                    """INSERT INTO dm_blocks (blocker, blocked) VALUES ($1, $2)
                       ON CONFLICT DO NOTHING""",
                    user_id,
                    other,
                )
        except _DB_ERRORS as exc:
            raise Unavailable("blocks are unavailable; nothing changed") from exc
        await self._changed(user_id)
        return {"user": other, "blocked": True}

    async def unblock(self, user_id: str, other: str) -> dict[str, Any]:
        """``user_id`` takes DMs from ``other`` again (idempotent)."""
        _check_other(user_id, other)
        try:
            await self._pool.execute(
                "DELETE FROM dm_blocks WHERE blocker = $1 AND blocked = $2", user_id, other
            )
        except _DB_ERRORS as exc:
            raise Unavailable("blocks are unavailable; nothing changed") from exc
        await self._changed(user_id)
        return {"user": other, "blocked": False}

    async def list_for(self, user_id: str) -> list[dict[str, Any]]:
        try:
            rows = await self._pool.fetch(
                """SELECT blocked, created_at FROM dm_blocks WHERE blocker = $1
                   ORDER BY created_at DESC, blocked""",
                user_id,
            )
        except _DB_ERRORS as exc:
            raise Unavailable("blocks are unavailable") from exc
        return [
            {"user": row["blocked"], "since": int(row["created_at"].timestamp() * 1000)}
            for row in rows
        ]

    async def _changed(self, user_id: str) -> None:
        """After a commit: the next DM to ``user_id`` reloads their set. A
        failure here is answered UNAVAILABLE (the change is committed; the
        same request again finishes it), never ignored: a stale set would let
        a blocked user's DMs through."""
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.incr(self._keys.blocks_generation(user_id))
                pipe.delete(self._keys.blocks(user_id))
                await pipe.execute()
        except _REDIS_ERRORS as exc:
            raise Unavailable("saved, but not in effect yet: send the same request again") from exc

    async def load(self, user_id: str) -> None:
        """Put ``user_id``'s blocks into Redis (Economy calls this when dm.lua
        finds them missing)."""
        generation_key = self._keys.blocks_generation(user_id)
        for _ in range(BLOCKS_LOAD_ATTEMPTS_MAX):
            try:
                seen: Any = await self._redis.get(generation_key)
                rows = await self._pool.fetch(
                    "SELECT blocked FROM dm_blocks WHERE blocker = $1", user_id
                )
                status: Any = await self._load_script(
                    keys=[self._keys.blocks(user_id), generation_key],
                    args=[seen or b"", *[row["blocked"] for row in rows]],
                )
            except (*_DB_ERRORS, *_REDIS_ERRORS) as exc:
                raise Unavailable("blocks could not be loaded; nothing was charged") from exc
            if (status.decode() if isinstance(status, bytes) else str(status)) != "STALE":
                return
        raise Unavailable("blocks kept changing while loading; nothing was charged")


def _check_other(user_id: str, other: str) -> None:
    if not USER_ID_RE.fullmatch(other):
        raise BadRequest("the path must name a user id")
    if other == user_id:
        raise BadRequest("you cannot block yourself")


def parse_cursor(raw: str | None) -> tuple[int, str] | None:
    """A page cursor, ``<ms>-<id>``, as this module and the ledger's history
    hand them out; BAD_REQUEST for anything else."""
    if raw is None or raw == "":
        return None
    ms, sep, rest = raw.partition("-")
    if not sep or not (1 <= len(ms) <= 15 and ms.isascii() and ms.isdigit()):
        raise BadRequest("query parameter 'before' must be a cursor a previous page gave")
    if not 1 <= len(rest) <= 64:
        raise BadRequest("query parameter 'before' must be a cursor a previous page gave")
    return int(ms), rest


# Inboxes one dm_forget.lua call scans at most (each at most inbox_len
# entries): a deleted account's DMs leave the inboxes of everyone she wrote
# to in calls of a bounded length, Redis serving others in between.
FORGET_INBOXES_PER_CALL = 100


async def forget_sender(
    pool: asyncpg.Pool, redis: Redis, keys: Keys, user: str, *, archived_too: bool
) -> int:
    """A deleted account (DELETE /v1/me): her DMs out of the archive stream
    and the inboxes of those she wrote to, so no hello replays one and the
    archiver copies none into ``dms`` (dm_forget.lua); with them the request
    and private-show events naming her that wait in her counterparts'
    inboxes. The inboxes: those of her archived DMs' recipients, of her
    entries still in the archive stream, and of the other party of each
    request and private show she was party to (those rows stay). The
    deletion calls it twice: before its transaction removes her ``dms`` rows
    (which name the recipients), and after her sessions are closed
    (``archived_too``: then her rows go again out of ``dms``, for one the
    archiver had read before). Retry-safe. Returns how many Redis entries
    went."""
    script = redis.register_script(script_source("dm_forget"))
    try:
        rows = await pool.fetch(
            """SELECT recipient FROM dms WHERE sender = $1
               UNION SELECT CASE WHEN fan = $1 THEN model ELSE fan END FROM requests
                      WHERE fan = $1 OR model = $1
               UNION SELECT CASE WHEN fan = $1 THEN model ELSE fan END FROM private_shows
                      WHERE fan = $1 OR model = $1""",
            user,
        )
    except _DB_ERRORS as exc:
        raise Unavailable("DMs are unavailable") from exc
    # A first call with no inbox names the recipients of the stream's entries.
    try:
        first = await script(keys=[keys.dm_log()], args=[user])
        removed = int(first[0])
        recipients = sorted(
            ({row["recipient"] for row in rows} | {_text(r) for r in first[1:]}) - {user}
        )
        for start in range(0, len(recipients), FORGET_INBOXES_PER_CALL):
            chunk = recipients[start : start + FORGET_INBOXES_PER_CALL]
            reply = await script(keys=[keys.dm_log(), *map(keys.inbox, chunk)], args=[user])
            removed += int(reply[0])
    except _REDIS_ERRORS as exc:
        raise Unavailable("DM inboxes are unavailable") from exc
    if archived_too:
        try:
            await pool.execute("DELETE FROM dms WHERE sender = $1", user)
        except _DB_ERRORS as exc:
            raise Unavailable("DMs are unavailable") from exc
    return removed


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
