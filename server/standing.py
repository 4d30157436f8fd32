"""Standing: leaderboards, the king of the room, and tiers (issue #12).

The input is a projection of the ledger: tips per room, user and hour, tips
per room and user all time, and spending per user and hour. A refund is
subtracted from the hour of the spend it reverses. So reads never group the
ledger.

- The ledger projector (``project``, first thing in every pass of ``run``)
  folds committed ledger rows into those sums in a transaction of its own,
  off the ledger writer's (migration 0022; until then a trigger did it in
  the writer's transaction, about 50 us of Postgres per tip). It reads the
  rows after a watermark (``standing_watermark``, the last (writer_xid, id)
  projected) and below its snapshot's xmin, where no transaction is still
  running or can still start, so no row ever lands behind the watermark;
  sums and watermark move in one transaction that holds the watermark's row
  lock, so each row is counted once, by one node, whatever crashes.
- ``leaderboard``: the top tippers of a room over a window, a sum over at
  most one row per user and hour of that window (``all``: one row per user),
  plus the room's rows committed after the watermark (read in the same
  snapshot as the sums): a leaderboard is as current as the ledger.
- The king and tier pass (``step``, every ``standing_interval_s`` on every
  node) takes the rooms and users whose sums changed (``standing_dirty``,
  DELETE ... RETURNING: each change goes to one node) and recomputes their
  king and tier; and when an hour turns (windows roll hourly), every room
  with a king and every user above tier 0. A changed king is stored with a
  conditional UPDATE (so of two nodes only one sees the change) and
  published as a ``king`` event through the room's history, like any room
  event. A changed tier goes to Postgres (``standing_tiers``) and to the
  Redis hash ``Keys.tiers``, which the gateways read through ``TierCache``:
  no Postgres read per message, tip or DM.

Staleness: a tip is in the leaderboard once the ledger writer has committed
it (the outbox's lag, ``ledger_linger_ms`` plus a batch, well under a second
on a healthy node); kings, tiers and the trending sums of discovery follow
within ``standing_interval_s`` of that (longer only while a transaction that
began before the tip's writer, anywhere on the Postgres server, has written
and stays open: the projector waits for it, and the metric
``tokenchat_standing_behind_seconds`` says how long), and events carry a tier up to
``tier_cache_ttl_s`` older still. Windows cover whole hours: the ``12h``
window holds the hour that contains (now - 12 h) and every later one, so a
tip leaves it between 12 and 13 hours later.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
from redis.asyncio import Redis
from redis.exceptions import RedisError

from tokenchat.protocol import events

from .aio import pause, reraise_if_cancelled
from .config import Settings
from .errors import BadRequest, Unavailable
from .keys import Keys
from .metrics import STANDING_BEHIND

log = logging.getLogger(__name__)

HOUR_MS = 3_600_000
# The contract: the top 100 tippers.
LEADERBOARD_ENTRIES_MAX = 100
# The windows of GET /v1/rooms/{room}/leaderboard, in seconds (None: all time).
WINDOWS: dict[str, int | None] = {
    "12h": 12 * 3600,
    "day": 24 * 3600,
    "week": 7 * 24 * 3600,
    "all": None,
}
# Users and rooms the projector recomputes per statement: bounds one query.
PROJECT_BATCH_MAX = 1000
# Ledger transactions the ledger projector folds per Postgres transaction:
# bounds its memory and how long it holds the sums' row locks. At the tip
# rate measured (about 5,500/s, docs/benchmarks.md) a 1-s pass is about one
# batch; a backlog (a node that was down) drains batch after batch.
LEDGER_PROJECT_BATCH_MAX = 5000  # ledger transactions
# Batches one pass folds at most before it recomputes kings and tiers, so a
# long backlog still lets them move: 20 x 5,000 = 100,000 transactions.
LEDGER_PROJECT_BATCHES_MAX = 20
# Tiers a node keeps in memory at most; past it the cache starts afresh (a
# node serves far fewer users at once; this only bounds a pathological run).
TIER_CACHE_ENTRIES_MAX = 100_000
# The field of Keys.tiers that says the hash has been filled.
_FILLED = "*"

_DB_ERRORS = (asyncpg.PostgresError, OSError, asyncio.TimeoutError)
_REDIS_ERRORS = (RedisError, OSError)

Publish = Callable[[str, dict[str, Any]], Awaitable[str]]

# The rows of the ledger transactions ``t`` (a relation the caller defines)
# that count for standing, with their room (tips), hour and signed tokens: a
# user's outflow in a paid kind counts plus; their inflow in a refund (in the
# original's hour and room) or an escrow refund counts minus. Credits,
# purchases, payouts and releases are not spending. (Migration 0013's
# trigger, moved here.) Each transaction's postings, and a refund's original,
# are read by probing the primary keys from ``t``'s rows: the subqueries'
# `OFFSET 0` keeps the planner from flattening them into joins, which it
# planned as hash joins over sequential scans of both ledger tables whenever
# its statistics were missing or stale (`account_id LIKE 'u:%'` looks rare to
# it): 78 ms per pass of 1,000 at 100,000 ledger rows, growing with the
# ledger, against 8 ms probing (docs/benchmarks.md).
_STANDING_ROWS = """
    SELECT CASE WHEN src.kind = 'tip' THEN src.meta->>'room' END AS room,
           substr(p.account_id, 3) AS user_id,
           src.applied_ms / 3600000 AS hour,
           -p.amount AS tokens
    FROM t
    CROSS JOIN LATERAL (
        SELECT account_id, amount FROM ledger_postings WHERE tx_id = t.id OFFSET 0
    ) p
    LEFT JOIN LATERAL (
        SELECT kind, meta, applied_ms FROM ledger_transactions
        WHERE t.kind = 'refund' AND id = t.reverses OFFSET 0
    ) o ON true
    CROSS JOIN LATERAL (
        SELECT coalesce(o.kind, t.kind) AS kind, coalesce(o.meta, t.meta) AS meta,
               coalesce(o.applied_ms, t.applied_ms) AS applied_ms
    ) src
    WHERE p.account_id LIKE 'u:%'
      AND ((p.amount < 0 AND t.kind NOT IN
                ('credit', 'purchase', 'payout', 'refund', 'escrow_refund', 'release'))
        OR (p.amount > 0 AND t.kind IN ('refund', 'escrow_refund')))
"""
# One batch of the ledger projector: the next transactions after the
# watermark ($1, $2) and below the horizon ($3, a snapshot's xmin taken
# before this statement: every xid below it had ended by then), folded into
# the sums, their rooms and users marked dirty for the king and tier pass,
# and the watermark moved to the last one. The upserts are sorted, so two
# statements touching the same sums lock them in one order.
_PROJECT_LEDGER = (
    """
WITH t AS (
    SELECT id, writer_xid, kind, meta, applied_ms, reverses FROM ledger_transactions
    WHERE writer_xid IS NOT NULL AND (writer_xid, id) > ($1::text::xid8, $2::text)
      AND writer_xid < $3::text::xid8
    ORDER BY writer_xid, id LIMIT $4
), batch AS ("""
    + _STANDING_ROWS
    + """), room_hourly AS (
    INSERT INTO standing_room_hourly AS s (room, user_id, hour, tokens)
    SELECT room, user_id, hour, sum(tokens) FROM batch WHERE room IS NOT NULL
    GROUP BY room, hour, user_id ORDER BY room, hour, user_id
    ON CONFLICT (room, hour, user_id) DO UPDATE SET tokens = s.tokens + EXCLUDED.tokens
), room_total AS (
    INSERT INTO standing_room_total AS s (room, user_id, tokens)
    SELECT room, user_id, sum(tokens) FROM batch WHERE room IS NOT NULL
    GROUP BY room, user_id ORDER BY room, user_id
    ON CONFLICT (room, user_id) DO UPDATE SET tokens = s.tokens + EXCLUDED.tokens
), user_hourly AS (
    INSERT INTO standing_user_hourly AS s (user_id, hour, tokens)
    SELECT user_id, hour, sum(tokens) FROM batch
    GROUP BY user_id, hour ORDER BY user_id, hour
    ON CONFLICT (user_id, hour) DO UPDATE SET tokens = s.tokens + EXCLUDED.tokens
), dirty AS (
    INSERT INTO standing_dirty (kind, id)
    SELECT kind, id FROM (
        SELECT 'room' AS kind, room AS id FROM batch WHERE room IS NOT NULL
        UNION
        SELECT 'user', user_id FROM batch
    ) d
    ORDER BY 1, 2
    ON CONFLICT DO NOTHING
), last AS (
    SELECT writer_xid, id FROM t ORDER BY writer_xid DESC, id DESC LIMIT 1
), mark AS (
    UPDATE standing_watermark w
    SET writer_xid = last.writer_xid, tx_id = last.id, updated_at = now()
    FROM last
)
SELECT count(*) FROM t
"""
)
# A room's rows committed after the watermark ($X, $I: $4, $5 in the
# window's query, $3, $4 in the all-time one; read in the same snapshot as
# the sums, so a row is either in the sums or here, never both, never
# neither). The watermark comes as constants
# so that the planner sees how near the ledger's end it is and takes the
# index's range after it (joined to the watermark's row, it read the whole
# ledger).
_PENDING_ROOM = (
    """
t AS MATERIALIZED (
    SELECT id, kind, meta, applied_ms, reverses FROM ledger_transactions
    WHERE writer_xid IS NOT NULL AND (writer_xid, id) > ($X::text::xid8, $I::text)
),
pending AS (SELECT user_id, hour, tokens FROM ("""
    + _STANDING_ROWS
    + """) r WHERE r.room = $1)
"""
)
# A room's top tippers over a window ($2: its first hour): the hourly sums
# plus the rows not projected yet.
_LEADERBOARD_WINDOW = (
    "WITH"
    + _PENDING_ROOM.replace("$X", "$4").replace("$I", "$5")
    + """
SELECT s.user_id, s.tokens, coalesce(tr.tier, 0) AS tier
FROM (SELECT user_id, sum(tokens)::bigint AS tokens
      FROM (SELECT user_id, tokens FROM standing_room_hourly WHERE room = $1 AND hour >= $2
            UNION ALL
            SELECT user_id, tokens FROM pending WHERE hour >= $2) x
      GROUP BY user_id HAVING sum(tokens) > 0) s
LEFT JOIN standing_tiers tr ON tr.user_id = s.user_id
ORDER BY s.tokens DESC, s.user_id LIMIT $3
"""
)
# All time: the stored totals (through their rank index: the top $2 plus one
# per user with pending rows, since at most that many can fall below a user
# the top $2 leaves out, and those users' own totals) plus the pending rows.
_LEADERBOARD_ALL = (
    "WITH"
    + _PENDING_ROOM.replace("$X", "$3").replace("$I", "$4")
    + """,
stored AS (
    (SELECT user_id, tokens FROM standing_room_total WHERE room = $1
     ORDER BY tokens DESC, user_id
     LIMIT $2 + (SELECT count(DISTINCT user_id) FROM pending))
    UNION
    SELECT user_id, tokens FROM standing_room_total
    WHERE room = $1 AND user_id IN (SELECT user_id FROM pending)
)
SELECT s.user_id, s.tokens, coalesce(tr.tier, 0) AS tier
FROM (SELECT user_id, sum(tokens)::bigint AS tokens
      FROM (SELECT user_id, tokens FROM stored
            UNION ALL
            SELECT user_id, tokens FROM pending) x
      GROUP BY user_id HAVING sum(tokens) > 0) s
LEFT JOIN standing_tiers tr ON tr.user_id = s.user_id
ORDER BY s.tokens DESC, s.user_id LIMIT $2
"""
)


def window_start_hour(now_ms: int, window_s: int | None) -> int:
    """The oldest hour a window holds: the hour containing now - window."""
    if window_s is None:
        return 0
    return (now_ms - window_s * 1000) // HOUR_MS


def tier_of(spent: int, tiers: list[tuple[int, str]]) -> int:
    """The index of the last tier whose minimum ``spent`` reaches."""
    tier = 0
    for index, (minimum, _) in enumerate(tiers):
        if spent >= minimum:
            tier = index
    return tier


class TierCache:
    """Each user's tier as the projector last wrote it to Redis, held in
    this process for ``tier_cache_ttl_s``: one Redis read per user per TTL,
    none per message. Redis away: the last tier known, else 0 (a message
    never fails for its colour)."""

    def __init__(self, redis: Redis, keys: Keys, ttl_s: float) -> None:
        self._redis = redis
        self._key = keys.tiers()
        self._ttl_s = ttl_s
        self._tiers: dict[str, tuple[int, float]] = {}

    async def of(self, user_id: str) -> int:
        now = time.monotonic()
        cached = self._tiers.get(user_id)
        if cached is not None and cached[1] > now:
            return cached[0]
        try:
            raw: Any = await self._redis.hget(self._key, user_id)
        except _REDIS_ERRORS:
            return cached[0] if cached is not None else 0
        tier = int(raw) if raw is not None else 0
        if len(self._tiers) >= TIER_CACHE_ENTRIES_MAX:
            self._tiers.clear()
        self._tiers[user_id] = (tier, now + self._ttl_s)
        return tier

    def forget(self) -> None:
        self._tiers.clear()


class Standing:
    def __init__(
        self, pool: asyncpg.Pool, redis: Redis, keys: Keys, settings: Settings, publish: Publish
    ) -> None:
        self._pool = pool
        self._redis = redis
        self._keys = keys
        self._settings = settings
        self._publish = publish
        self._tiers = settings.tier_list()
        self.tiers = TierCache(redis, keys, settings.tier_cache_ttl_s)
        self._hour_seen: int | None = None

    # --- reads ------------------------------------------------------------------
    def tier_names(self) -> dict[str, Any]:
        """GET /v1/tiers."""
        return {
            "window_s": self._settings.tier_window_s,
            "tiers": [
                {"tier": index, "name": name, "min_tokens": minimum}
                for index, (minimum, name) in enumerate(self._tiers)
            ],
        }

    async def leaderboard(self, room: str, window: str) -> dict[str, Any]:
        """The room's top tippers over ``window`` (one of WINDOWS)."""
        if window not in WINDOWS:
            raise BadRequest(f"window must be one of {', '.join(WINDOWS)}")
        now_ms = int(time.time() * 1000)
        try:
            async with (
                self._pool.acquire() as conn,
                conn.transaction(isolation="repeatable_read", readonly=True),
            ):
                # One snapshot for the watermark and the sums it stands for.
                mark = await _watermark(conn)
                if WINDOWS[window] is None:
                    rows = await conn.fetch(
                        _LEADERBOARD_ALL,
                        room,
                        LEADERBOARD_ENTRIES_MAX,
                        mark["writer_xid"],
                        mark["tx_id"],
                    )
                else:
                    rows = await conn.fetch(
                        _LEADERBOARD_WINDOW,
                        room,
                        window_start_hour(now_ms, WINDOWS[window]),
                        LEADERBOARD_ENTRIES_MAX,
                        mark["writer_xid"],
                        mark["tx_id"],
                    )
        except _DB_ERRORS as exc:
            raise Unavailable("the leaderboard is unavailable") from exc
        return {
            "room": room,
            "window": window,
            "as_of": now_ms,
            "entries": [
                {"rank": rank, "user": row["user_id"], "tokens": row["tokens"], "tier": row["tier"]}
                for rank, row in enumerate(rows, start=1)
            ],
        }

    async def king(self, room: str) -> dict[str, Any] | None:
        """The room's king as the projector last saw it ({user, tokens})."""
        try:
            async with self._pool.acquire() as conn:
                row = await conn.fetchrow(
                    "SELECT user_id, tokens FROM standing_kings WHERE room = $1", room
                )
        except _DB_ERRORS as exc:
            raise Unavailable("the king is unavailable") from exc
        return None if row is None else {"user": row["user_id"], "tokens": row["tokens"]}

    async def rename_king(self, user: str, alias: str) -> list[str]:
        """A deleted account (DELETE /v1/me, after ``deleted_users`` has her
        row): wherever ``user`` is king, her pseudonym ``alias`` is, and the room
        gets the `king` event saying so; her own room has no king any more (the
        room is gone). Each room under the projector's lock for it
        (``Standing._project_kings``), which maps her id to ``alias`` from then
        on. Retry-safe: a second run finds nothing to rename. Bounded by the
        rooms she reigns in (a scan of standing_kings: one row per room).
        Returns the renamed rooms."""
        renamed: list[tuple[str, int]] = []
        try:
            async with self._pool.acquire() as conn:
                await conn.execute("DELETE FROM standing_kings WHERE room = $1", user)
                rooms = await conn.fetch("SELECT room FROM standing_kings WHERE user_id = $1", user)
                for row in rooms:
                    async with conn.transaction():
                        await conn.execute(
                            "SELECT pg_advisory_xact_lock(hashtext($1))", row["room"]
                        )
                        tokens = await conn.fetchval(
                            """UPDATE standing_kings SET user_id = $3, updated_at = now()
                                WHERE room = $1 AND user_id = $2 RETURNING tokens""",
                            row["room"],
                            user,
                            alias,
                        )
                    if tokens is not None:
                        renamed.append((row["room"], int(tokens)))
        except _DB_ERRORS as exc:
            raise Unavailable("kings are unavailable") from exc
        await _publish_kings(
            self._publish, [(room, {"user": alias, "tokens": tokens}) for room, tokens in renamed]
        )
        return [room for room, _ in renamed]

    # --- the projector --------------------------------------------------------------
    async def run(self) -> None:
        """Project until cancelled; a backend away only delays it."""
        while True:
            try:
                await self.step()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                reraise_if_cancelled(exc)
                log.warning("standing projector: %s", exc)
            await pause(self._settings.standing_interval_s)

    async def project(self) -> int:
        """Fold the committed ledger rows after the watermark into the sums,
        batch after batch (at most LEDGER_PROJECT_BATCHES_MAX); return how
        many ledger transactions were folded. Another node folding at the
        same moment: this one folds nothing and leaves it to that one."""
        folded = 0
        for _ in range(LEDGER_PROJECT_BATCHES_MAX):
            count = await self._project_batch()
            folded += count
            if count < LEDGER_PROJECT_BATCH_MAX:
                break
        else:
            # A backlog (a node that was down, a long-open transaction that
            # held the horizon): kings and tiers go first, the rest next pass.
            log.warning("standing projector: %d ledger transactions folded, more remain", folded)
        await self.behind_s()
        return folded

    async def behind_s(self) -> float:
        """How far the projection is behind the ledger: the age of the first
        ledger row after the watermark (in (writer_xid, id) order, which is
        about commit order), 0 when there is none; also set as the metric
        ``tokenchat_standing_behind_seconds``. One index probe after the
        watermark, so it costs the same with a backlog of any size."""
        async with self._pool.acquire() as conn:
            mark = await _watermark(conn)
            # The watermark as constants, as in _PENDING_ROOM: the planner
            # then starts the index scan at it instead of the ledger's start.
            behind: float = await conn.fetchval(
                """SELECT coalesce(extract(epoch FROM clock_timestamp() - min(recorded_at)), 0)
                   FROM (SELECT recorded_at FROM ledger_transactions
                         WHERE writer_xid IS NOT NULL
                           AND (writer_xid, id) > ($1::text::xid8, $2::text)
                         ORDER BY writer_xid, id LIMIT 1) l""",
                mark["writer_xid"],
                mark["tx_id"],
            )
        behind = max(0.0, float(behind))  # clocks: recorded_at is the writer's now()
        STANDING_BEHIND.set(behind)
        return behind

    async def _project_batch(self) -> int:
        async with self._pool.acquire() as conn, conn.transaction():
            # The horizon comes from this statement's snapshot, taken before
            # this transaction has an xid of its own: every xid below it had
            # ended then, so the next statement sees all of them committed.
            mark = await conn.fetchrow(
                """SELECT writer_xid::text AS writer_xid, tx_id,
                          pg_snapshot_xmin(pg_current_snapshot())::text AS horizon
                   FROM standing_watermark FOR UPDATE SKIP LOCKED"""
            )
            if mark is None:
                return 0  # another node holds the watermark: it is folding
            count: int = await conn.fetchval(
                _PROJECT_LEDGER,
                mark["writer_xid"],
                mark["tx_id"],
                mark["horizon"],
                LEDGER_PROJECT_BATCH_MAX,
            )
        return count

    async def step(self, *, now_ms: int | None = None) -> None:
        """One pass: fold the ledger's new rows into the sums, refill Redis's
        tiers if it lost them, then recompute the changed rooms and users
        (all of them when an hour has turned)."""
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        hour = now_ms // HOUR_MS
        await self.project()
        await self._ensure_redis_tiers()
        rolled = hour != self._hour_seen
        async with self._pool.acquire() as conn:
            dirty = await conn.fetch("DELETE FROM standing_dirty RETURNING kind, id")
            rooms = {row["id"] for row in dirty if row["kind"] == "room"}
            users = {row["id"] for row in dirty if row["kind"] == "user"}
            if rolled:
                rooms |= {r["room"] for r in await conn.fetch("SELECT room FROM standing_kings")}
                users |= {
                    r["user_id"]
                    for r in await conn.fetch("SELECT user_id FROM standing_tiers WHERE tier > 0")
                }
        try:
            for chunk in _chunks(sorted(users)):
                await self._project_tiers(chunk, now_ms)
            for chunk in _chunks(sorted(rooms)):
                await self._project_kings(chunk, now_ms)
        except BaseException:
            # Not done: look at them again next pass.
            await self._mark_dirty(rooms, users)
            raise
        self._hour_seen = hour

    async def _mark_dirty(self, rooms: set[str], users: set[str]) -> None:
        rows = [("room", r) for r in rooms] + [("user", u) for u in users]
        if not rows:
            return
        try:
            async with self._pool.acquire() as conn:
                await conn.executemany(
                    "INSERT INTO standing_dirty (kind, id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                    rows,
                )
        except _DB_ERRORS:
            log.warning("standing: %d changes not put back; the next hour redoes them", len(rows))

    async def _project_tiers(self, users: list[str], now_ms: int) -> None:
        start = window_start_hour(now_ms, self._settings.tier_window_s)
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(
                """SELECT u.id AS user_id, coalesce(sum(s.tokens), 0)::bigint AS spent
                   FROM unnest($1::text[]) AS u(id)
                   LEFT JOIN standing_user_hourly s ON s.user_id = u.id AND s.hour >= $2
                   GROUP BY u.id""",
                users,
                start,
            )
            spent = {row["user_id"]: max(0, row["spent"]) for row in rows}
            tiers = {user: tier_of(amount, self._tiers) for user, amount in spent.items()}
            changed = await conn.fetch(
                """INSERT INTO standing_tiers AS t (user_id, spent, tier)
                   SELECT * FROM unnest($1::text[], $2::bigint[], $3::int[]) ORDER BY 1
                   ON CONFLICT (user_id) DO UPDATE
                       SET spent = EXCLUDED.spent, tier = EXCLUDED.tier, updated_at = now()
                       WHERE (t.spent, t.tier) IS DISTINCT FROM (EXCLUDED.spent, EXCLUDED.tier)
                   RETURNING user_id, tier""",
                list(spent),
                list(spent.values()),
                [tiers[user] for user in spent],
            )
        if changed:
            await self._write_redis_tiers({row["user_id"]: row["tier"] for row in changed})

    async def _write_redis_tiers(self, tiers: dict[str, int]) -> None:
        raised = {user: tier for user, tier in tiers.items() if tier > 0}
        dropped = [user for user, tier in tiers.items() if tier == 0]
        async with self._redis.pipeline(transaction=False) as pipe:
            if raised:
                pipe.hset(self._keys.tiers(), mapping=raised)  # type: ignore[arg-type]
            if dropped:
                pipe.hdel(self._keys.tiers(), *dropped)
            await pipe.execute()

    async def _ensure_redis_tiers(self) -> None:
        """Redis lost the tiers (or never had them): fill the hash from Postgres."""
        key = self._keys.tiers()
        if await self._redis.hexists(key, _FILLED):
            return
        async with self._pool.acquire() as conn:
            rows = await conn.fetch("SELECT user_id, tier FROM standing_tiers WHERE tier > 0")
        mapping: dict[str, int] = {row["user_id"]: row["tier"] for row in rows}
        mapping[_FILLED] = 1
        await self._redis.hset(key, mapping=mapping)  # type: ignore[arg-type]
        self.tiers.forget()

    async def _project_kings(self, rooms: list[str], now_ms: int) -> None:
        start = window_start_hour(now_ms, self._settings.king_window_s)
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(
                """SELECT DISTINCT ON (r.room) r.room, s.user_id, s.tokens
                   FROM unnest($1::text[]) AS r(room)
                   LEFT JOIN LATERAL (
                       SELECT user_id, sum(tokens)::bigint AS tokens
                       FROM standing_room_hourly
                       WHERE room = r.room AND hour >= $2
                       GROUP BY user_id HAVING sum(tokens) > 0
                       ORDER BY 2 DESC, 1 LIMIT 1
                   ) s ON true
                   ORDER BY r.room""",
                rooms,
                start,
            )
            changes: list[tuple[str, dict[str, Any] | None]] = []
            for row in rows:
                room = row["room"]
                king = None if row["user_id"] is None else row["user_id"]
                # One node at a time per room: of two nodes seeing the same
                # change, the second finds it stored and publishes nothing.
                async with conn.transaction():
                    await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", room)
                    # A deleted account reigns under her pseudonym (docs/
                    # economy.md, "Deleted accounts"): looked up under the
                    # room's lock, which the deletion's renaming takes too,
                    # so a pass that summed before the deletion committed
                    # cannot put her id back after the renaming.
                    pair = await conn.fetchrow(
                        """SELECT (SELECT user_id FROM standing_kings WHERE room = $1) AS before,
                                  (SELECT pseudonym FROM deleted_users
                                    WHERE user_id = $2) AS alias""",
                        room,
                        king,
                    )
                    assert pair is not None  # a SELECT without FROM gives one row
                    before = pair["before"]
                    if pair["alias"] is not None:
                        king = pair["alias"]
                    if king is None:
                        await conn.execute("DELETE FROM standing_kings WHERE room = $1", room)
                    else:
                        # The tokens are kept current (the join gives them);
                        # only a new user (or none) is news for the room.
                        await conn.execute(
                            """INSERT INTO standing_kings AS k (room, user_id, tokens)
                               VALUES ($1, $2, $3)
                               ON CONFLICT (room) DO UPDATE
                                   SET user_id = EXCLUDED.user_id, tokens = EXCLUDED.tokens,
                                       updated_at = now()
                                   WHERE (k.user_id, k.tokens) IS DISTINCT FROM
                                         (EXCLUDED.user_id, EXCLUDED.tokens)""",
                            room,
                            king,
                            row["tokens"],
                        )
                if before != king:
                    changes.append(
                        (room, None if king is None else {"user": king, "tokens": row["tokens"]})
                    )
        await _publish_kings(self._publish, changes)


async def _watermark(
    conn: asyncpg.Connection | asyncpg.pool.PoolConnectionProxy,
) -> asyncpg.Record:
    """The ledger projector's watermark: the last (writer_xid, tx_id) folded."""
    mark = await conn.fetchrow(
        "SELECT writer_xid::text AS writer_xid, tx_id FROM standing_watermark"
    )
    assert mark is not None  # migration 0022's row, never deleted
    return mark


async def _publish_kings(
    publish: Publish, changes: list[tuple[str, dict[str, Any] | None]]
) -> None:
    """Each room's `king` event (None: no king any more), once it is stored."""
    for room, king in changes:
        # Stored first, then published: a join in between already gives it.
        try:
            await publish(room, events.king_event(room, king))
        except Exception as exc:  # the room's Redis away: the join still tells
            reraise_if_cancelled(exc)
            log.warning("king event of %s not published: %s", room, exc)


def _chunks(items: list[str]) -> list[list[str]]:
    return [items[i : i + PROJECT_BATCH_MAX] for i in range(0, len(items), PROJECT_BATCH_MAX)]
