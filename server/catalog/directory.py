"""Users and rooms: Postgres holds them, Redis caches what the hot path reads.

Users are created on first sight. A model's room exists from her first
`hello`: the room's id is her user id. The gateway reads a room's settings
from the Redis cache and falls back to Postgres on a miss.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import asyncpg
from redis.asyncio import Redis
from redis.exceptions import RedisError

from ..auth import Identity
from ..errors import Unavailable
from ..keys import Keys

log = logging.getLogger(__name__)

# Users this process has already written, so a reconnect storm does not turn
# into a storm of upserts. Bounded: past it, the set is simply started over.
SEEN_USERS_MAX = 100_000
# A room's settings are kept in the process this long: every tip reads
# tip_min, and a Redis round trip per tip cost a sixth of the tip path
# (py-spy, loadtests.tips). A model's new tip_min reaches other processes
# within this time; the process that saved it forgets its copy at once.
ROOM_INFO_TTL_S = 1.0
ROOMS_CACHED_MAX = 10_000
# Ids known not to be users (a DM or a price lookup found no row), so a flood
# naming made-up users costs one Postgres query per id per TTL, not one per
# request. A user created meanwhile on another process is refused for at most
# the TTL (this process forgets the entry at once when it creates the user);
# the bound caps the memory (64-character ids: about 10 MB).
ABSENT_USER_TTL_S = 5.0
ABSENT_USERS_MAX = 50_000


@dataclasses.dataclass(frozen=True, slots=True)
class RoomInfo:
    id: str
    owner: str
    tip_min: int

    def to_wire(self, viewers: int) -> dict[str, Any]:
        return {"id": self.id, "owner": self.owner, "viewers": viewers, "tip_min": self.tip_min}


class AbsentUsers:
    """A bounded, expiring set of user ids that had no row in Postgres."""

    __slots__ = ("_entries_max", "_expiry", "_ttl_s")

    def __init__(
        self, ttl_s: float = ABSENT_USER_TTL_S, entries_max: int = ABSENT_USERS_MAX
    ) -> None:
        if ttl_s <= 0 or entries_max < 1:
            raise ValueError("ttl_s must be > 0 and entries_max >= 1")
        self._ttl_s = ttl_s
        self._entries_max = entries_max
        # Insertion order is expiry order (one TTL for all): the first is the oldest.
        self._expiry: dict[str, float] = {}

    def __contains__(self, user_id: str) -> bool:
        expiry = self._expiry.get(user_id)
        if expiry is None:
            return False
        if expiry <= time.monotonic():
            del self._expiry[user_id]
            return False
        return True

    def __len__(self) -> int:
        return len(self._expiry)

    def add(self, user_id: str) -> None:
        self._expiry.pop(user_id, None)
        while len(self._expiry) >= self._entries_max:
            del self._expiry[next(iter(self._expiry))]
        self._expiry[user_id] = time.monotonic() + self._ttl_s

    def discard(self, user_id: str) -> None:
        self._expiry.pop(user_id, None)


class Directory:
    def __init__(self, pool: asyncpg.Pool, redis: Redis, keys: Keys) -> None:
        self._pool = pool
        self._redis = redis
        self._keys = keys
        self._seen: set[Identity] = set()
        # A room id that is no model's room is cached as None, for the same
        # time as a room, so joins to made-up rooms do not each query Postgres.
        self._rooms: dict[str, tuple[float, RoomInfo | None]] = {}
        self.absent_users = AbsentUsers()

    async def touch_user(self, identity: Identity) -> None:
        """Record the user (and a model's room). Raises ``Unavailable``."""
        if identity in self._seen:
            return
        try:
            # One statement (one round trip, atomic): the user, and a model's room.
            await self._pool.execute(
                """WITH saved AS (
                       INSERT INTO users (id, role) VALUES ($1, $2)
                       ON CONFLICT (id) DO UPDATE SET role = EXCLUDED.role, seen_at = now()
                       RETURNING id, role
                   )
                   INSERT INTO rooms (id) SELECT id FROM saved WHERE role = 'model'
                   ON CONFLICT (id) DO NOTHING""",
                identity.user_id,
                identity.role,
            )
        except (TimeoutError, asyncpg.PostgresError, OSError) as exc:
            raise Unavailable("the user store is unavailable") from exc
        self._remember(identity)

    async def touch_users(self, identities: list[Identity]) -> dict[Identity, Unavailable]:
        """``touch_user`` for the hellos of one batch: one multi-row statement
        (one round trip, atomic) instead of one per hello. Returns the
        identities that could not be written, each with its error (all of
        them when Postgres is away)."""
        todo = [identity for identity in dict.fromkeys(identities) if identity not in self._seen]
        failed: dict[Identity, Unavailable] = {}
        while todo:
            # One row per id per statement (ON CONFLICT cannot touch a row
            # twice); the same user under a second role goes in the next round,
            # so the last hello's role wins, as one statement each would leave it.
            rows = {identity.user_id: identity for identity in reversed(todo)}
            todo = [identity for identity in todo if rows[identity.user_id] is not identity]
            batch = sorted(rows.values(), key=lambda identity: identity.user_id)
            try:
                await self._upsert_users(batch)
            except (TimeoutError, OSError, asyncpg.PostgresConnectionError) as exc:
                error = Unavailable("the user store is unavailable")
                error.__cause__ = exc
                failed.update(dict.fromkeys([*batch, *todo], error))
                return failed
            except asyncpg.PostgresError:
                # A row Postgres refused fails the whole statement: write them
                # one by one, so that only that hello is refused.
                for identity in batch:
                    try:
                        await self.touch_user(identity)
                    except Unavailable as exc:
                        failed[identity] = exc
                continue
            for identity in batch:
                self._remember(identity)
        return failed

    async def _upsert_users(self, identities: list[Identity]) -> None:
        # Rows in id order: two batches upserting the same users lock them in
        # the same order, so they cannot deadlock.
        await self._pool.execute(
            """WITH saved AS (
                   INSERT INTO users (id, role)
                   SELECT id, role FROM unnest($1::text[], $2::text[]) AS t(id, role)
                   ORDER BY id
                   ON CONFLICT (id) DO UPDATE SET role = EXCLUDED.role, seen_at = now()
                   RETURNING id, role
               )
               INSERT INTO rooms (id) SELECT id FROM saved WHERE role = 'model'
               ON CONFLICT (id) DO NOTHING""",
            [identity.user_id for identity in identities],
            [identity.role for identity in identities],
        )

    def _remember(self, identity: Identity) -> None:
        # Known to exist from now on in this process (and a model's room with it).
        self.absent_users.discard(identity.user_id)
        self.forget_room(identity.user_id)
        if len(self._seen) >= SEEN_USERS_MAX:
            self._seen.clear()
        self._seen.add(identity)

    async def room(self, room_id: str) -> RoomInfo | None:
        """The room, or None when no model of that id exists."""
        now = time.monotonic()
        cached = self._rooms.get(room_id)
        if cached is not None and cached[0] > now:
            return cached[1]
        info = await self._room_from_stores(room_id)
        if len(self._rooms) >= ROOMS_CACHED_MAX:
            self._rooms.clear()
        self._rooms[room_id] = (now + ROOM_INFO_TTL_S, info)
        return info

    def forget_room(self, room_id: str) -> None:
        """Drop this process's copy (its settings just changed)."""
        self._rooms.pop(room_id, None)

    async def _room_from_stores(self, room_id: str) -> RoomInfo | None:
        key = self._keys.room_info(room_id)
        try:
            cached = await self._redis.hgetall(key)
        except (RedisError, OSError) as exc:
            raise Unavailable("room state is unavailable") from exc
        if cached:
            return RoomInfo(room_id, room_id, int(cached[b"tip_min"]))
        try:
            row = await self._pool.fetchrow(
                """SELECT r.id, r.tip_min FROM rooms r JOIN users u ON u.id = r.id
                   WHERE r.id = $1 AND u.role = 'model'""",
                room_id,
            )
        except (TimeoutError, asyncpg.PostgresError, OSError) as exc:
            raise Unavailable("the room store is unavailable") from exc
        if row is None:
            return None
        info = RoomInfo(room_id, room_id, row["tip_min"])
        try:
            await self._redis.hset(key, mapping={"tip_min": info.tip_min})
        except (RedisError, OSError) as exc:
            raise Unavailable("room state is unavailable") from exc
        return info

    async def room_infos(self, limit: int) -> list[RoomInfo]:
        """Every model's room with its settings (at most ``limit``), by id."""
        try:
            rows = await self._pool.fetch(
                """SELECT r.id, r.tip_min FROM rooms r JOIN users u ON u.id = r.id
                   WHERE u.role = 'model' ORDER BY r.id LIMIT $1""",
                limit,
            )
        except (TimeoutError, asyncpg.PostgresError, OSError) as exc:
            raise Unavailable("the room store is unavailable") from exc
        return [RoomInfo(row["id"], row["id"], row["tip_min"]) for row in rows]
