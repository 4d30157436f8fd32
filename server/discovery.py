"""Discovery, profiles, follows and live notifications (issue #13, sections 2-3).

- Room listing (``GET /v1/rooms``): each node keeps one snapshot of every
  model's room (at most ``discovery_rooms_max``) with her profile, her viewers
  (Redis presence) and her tips over the trending window (the standing
  projection's hourly sums, migration 0013: no ledger scan, nothing added to
  the tip path). The snapshot is rebuilt in the background once it is
  ``discovery_refresh_s`` old (or five times its last build's duration, if
  more: a rebuild takes at most a fifth of a core) (the stale one is served meanwhile), sorted
  once per sort; a request filters and pages it in memory, so its cost does
  not depend on how many browsers poll the page.
- Stable paging: a cursor is a position in ONE ranking, the one page 1 was
  read from. When a first page has more pages, the node pins that sort's
  ranking of its snapshot (the room ids in order) in Redis under an id of
  the snapshot and the sort; the cursor is ``<pin>.<position>``, so later
  pages, on any node, walk the same order whatever the ranks did since: no
  room is seen twice or skipped. A pin is written once per snapshot and
  sort, only when someone pages, and lives ``discovery_cursor_idle_s`` after
  its last page read; an older cursor answers CURSOR_EXPIRED (read page 1
  again). The position counts the whole ranking, not the filtered one, so a
  room whose tags change between pages moves no other room.
- "Goes live": the model joins her own room after being away at least
  ``live_away_s``. A small Lua script counts her sessions in her room and
  remembers when she last left (``Keys.live_state``), so a second tab or a
  reconnect inside the window notifies no one.
- Going live costs the joining node two cheap writes: a ``live_jobs`` row and
  one ``L`` payload on the live channel. Every node hears the payload and
  pushes ``live`` to ITS OWN connected followers (one Postgres query per
  chunk of its local users, pushes yielded every ``live_push_chunk``), so the
  connected fan-out is spread over the nodes and never holds a loop. The job
  stores a notification for every follower, ``live_batch_followers`` per
  set-based statement, keyset-paged and leased: a node that dies mid-way
  leaves a cursor another node resumes from.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any, Final

import asyncpg
import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError

from tokenchat.protocol.commands import stored_string

from . import bus
from .aio import pause, reraise_if_cancelled
from .config import Settings
from .errors import BadRequest, CursorExpired, NotFound, Unavailable
from .keys import Keys

log = logging.getLogger(__name__)

HOUR_MS = 3_600_000
# Rooms whose viewers one gather reads before yielding to the event loop, so
# a rebuild over 10,000 rooms never holds the loop for one long turn.
VIEWERS_CHUNK = 500
# The share of one core rebuilding the snapshot may take: a snapshot is
# rebuilt at most every discovery_refresh_s and at least this many of its
# last build's durations apart (a 10,000-room site rebuilds less often).
REBUILD_SHARE_MAX = 0.2
SORTS = ("trending", "viewers", "new")
ROOMS_PAGE_DEFAULT = 100  # the listing's size before paging existed
ROOMS_PAGE_MAX = 200
FOLLOWS_PAGE_DEFAULT = 50
FOLLOWS_PAGE_MAX = 200
NOTIFICATIONS_PAGE_DEFAULT = 50
NOTIFICATIONS_PAGE_MAX = 200
# Profile limits (characters; tags: a count of short lower-case words).
DISPLAY_NAME_LEN_MAX = 64
BIO_LEN_MAX = 1000
DISPLAY_NAME: Final = stored_string(0, DISPLAY_NAME_LEN_MAX)
BIO: Final = stored_string(0, BIO_LEN_MAX)
TAGS_MAX = 10
TAG_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,23}")
AVATAR_URL_LEN_MAX = 512
ONLINE_STATUSES = ("online", "away", "busy", "offline")
# A text filter (q) longer than this matches nothing useful and costs a scan.
QUERY_LEN_MAX = 100
# Pinned rankings a node keeps in memory besides Redis (the ones it wrote or
# read last): a client paging through one listing reads Redis once per node.
# 10,000 rooms: a list of 10,000 references, ~80 KB each.
PINS_CACHED_MAX = 16
# A room cursor: the pin (the snapshot's id, the sort) and a position.
ROOM_CURSOR_RE = re.compile(r"([0-9a-f]{16})-(trending|viewers|new)\.([0-9]{1,9})")
# Local users one "which of these follow her" query names at most.
LOCAL_FOLLOWERS_QUERY_MAX = 5000

_DB_ERRORS = (asyncpg.PostgresError, OSError, asyncio.TimeoutError)
_REDIS_ERRORS = (RedisError, OSError, asyncio.TimeoutError)

# KEYS[1] live state hash; ARGV: now ms, away ms, "join" | "leave", TTL s.
# Returns 1 when a join makes her live (she was not in her room and left it
# at least `away` ago, or never was), else 0. The hash expires TTL after her
# last join or leave, so a count a crashed node left behind (a session that
# never left) does not keep her from going live for ever.
_PRESENCE_LUA = """
local now = tonumber(ARGV[1])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[4]))
if ARGV[3] == 'join' then
  local n = redis.call('HINCRBY', KEYS[1], 'in', 1)
  if n ~= 1 then return 0 end
  local left = redis.call('HGET', KEYS[1], 'left')
  if left and now - tonumber(left) < tonumber(ARGV[2]) then return 0 end
  return 1
end
local n = redis.call('HINCRBY', KEYS[1], 'in', -1)
if n <= 0 then
  redis.call('HSET', KEYS[1], 'in', 0, 'left', now)
end
return 0
"""


@dataclass(slots=True)
class ListedRoom:
    id: str
    tip_min: int
    created_ms: int
    display_name: str
    bio: str
    tags: list[str]
    avatar: str | None
    online_status: str
    viewers: int = 0
    trending: int = 0
    live: bool = False  # she has a session in her own room
    text: str = ""  # lower-cased name + bio + id, what `q` searches

    def to_wire(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "owner": self.id,
            "viewers": self.viewers,
            "tip_min": self.tip_min,
            "display_name": self.display_name,
            "tags": self.tags,
            "avatar": self.avatar,
            "online_status": self.online_status,
            "trending": self.trending,
            "created_ms": self.created_ms,
            "live": self.live,
        }


def check_profile(body: dict[str, Any]) -> dict[str, Any]:
    """The fields of a PUT /v1/me/profile body, checked (BadRequest if not)."""
    # Both are kept in Postgres, which refuses NUL in text: refused here, at
    # the door, rather than answered 503 by a store that cannot take them.
    name = body.get("display_name", "")
    if not DISPLAY_NAME.accept(name):
        raise BadRequest(f"field 'display_name' must be {DISPLAY_NAME.describe}")
    bio = body.get("bio", "")
    if not BIO.accept(bio):
        raise BadRequest(f"field 'bio' must be {BIO.describe}")
    tags = body.get("tags", [])
    if (
        not isinstance(tags, list)
        or len(tags) > TAGS_MAX
        or not all(isinstance(t, str) and TAG_RE.fullmatch(t) for t in tags)
    ):
        raise BadRequest(
            f"field 'tags' must be a list of at most {TAGS_MAX} tags, "
            "each 1-24 characters of a-z, 0-9 and '-'"
        )
    avatar = body.get("avatar")
    if avatar is not None and (
        not isinstance(avatar, str)
        or len(avatar) > AVATAR_URL_LEN_MAX
        or not (avatar.startswith("https://") or avatar.startswith("http://"))
        or any(c.isspace() for c in avatar)
    ):
        raise BadRequest(
            f"field 'avatar' must be an http(s) URL of at most {AVATAR_URL_LEN_MAX} characters"
        )
    status = body.get("online_status", "offline")
    if status not in ONLINE_STATUSES:
        raise BadRequest(f"field 'online_status' must be one of {', '.join(ONLINE_STATUSES)}")
    return {
        "display_name": name.strip(),
        "bio": bio,
        "tags": list(dict.fromkeys(tags)),
        "avatar": avatar,
        "online_status": status,
    }


@dataclass(frozen=True, slots=True)
class RoomCursor:
    """Where the next page of a room listing starts: ``position`` in the
    ranking pinned as ``pin`` (a snapshot's id and the sort)."""

    pin: str
    sort: str
    position: int

    @classmethod
    def parse(cls, raw: str, sort: str) -> RoomCursor:
        match = ROOM_CURSOR_RE.fullmatch(raw)
        if match is None:
            raise BadRequest("query parameter 'cursor' must be a cursor a previous page gave")
        if match[2] != sort:
            raise BadRequest(f"this cursor pages the '{match[2]}' sort, not '{sort}'")
        return cls(f"{match[1]}-{match[2]}", match[2], int(match[3]))

    def __str__(self) -> str:
        return f"{self.pin}.{self.position}"


@dataclass(slots=True)
class _Pin:
    ids: list[str]
    used: float  # monotonic s of its last page read here


def page_cursor(raw: str | None, digits_max: int = 9) -> int:
    """A decimal cursor as the last page gave it: a notification id (a
    bigint: ``digits_max`` 18)."""
    if raw is None or raw == "":
        return 0
    if len(raw) > digits_max or not raw.isascii() or not raw.isdigit():
        raise BadRequest("query parameter 'cursor' must be a cursor a previous page gave")
    return int(raw)


def _walk(
    rooms: Any, start: int, tag: str | None, q: str | None, limit: int
) -> tuple[list[ListedRoom], int | None]:
    """The first ``limit`` rooms of ``rooms`` (a ranking from position
    ``start``; None: a room no longer listed) that pass the filters, and the
    position of the next one that does (None: this is the last page)."""
    needle = q.lower() if q else None
    page: list[ListedRoom] = []
    for position, room in enumerate(rooms, start):
        if room is None or (tag and tag not in room.tags):
            continue
        if needle and needle not in room.text:
            continue
        if len(page) == limit:
            return page, position
        page.append(room)
    return page, None


class Discovery:
    def __init__(self, pool: asyncpg.Pool, redis: Redis, keys: Keys, settings: Settings) -> None:
        self._pool = pool
        self._redis = redis
        self._keys = keys
        self._settings = settings
        self.channel = keys.live_channel()
        self._presence = redis.register_script(_PRESENCE_LUA)
        self._snapshot: list[ListedRoom] = []
        self._snapshot_at = -1e18
        self._snapshot_lock = asyncio.Lock()
        self._rebuild: asyncio.Future[None] | None = None
        self._sorted: dict[str, list[ListedRoom]] = {sort: [] for sort in SORTS}
        self._by_id: dict[str, ListedRoom] = {}
        # The snapshot's id (random: unique across nodes and restarts) and the
        # sorts whose ranking of it is pinned in Redis, since when.
        self._generation = secrets.token_hex(8)
        self._pinned_sorts: dict[str, float] = {}  # sort -> monotonic s written
        self._pins: collections.OrderedDict[str, _Pin] = collections.OrderedDict()
        self._build_s = 0.0  # how long the last rebuild took
        # Seconds the last job took from its first to its last batch: read by
        # the benchmark (loadtests/discovery.py).
        self.last_job_s = 0.0

    # --- profiles ----------------------------------------------------------------
    async def set_profile(self, user_id: str, profile: dict[str, Any]) -> dict[str, Any]:
        try:
            await self._pool.execute(
                """INSERT INTO profiles (user_id, display_name, bio, tags, avatar, online_status)
                   VALUES ($1, $2, $3, $4, $5, $6)
                   ON CONFLICT (user_id) DO UPDATE SET display_name = $2, bio = $3,
                       tags = $4, avatar = $5, online_status = $6, updated_at = now()""",
                user_id,
                profile["display_name"],
                profile["bio"],
                profile["tags"],
                profile["avatar"],
                profile["online_status"],
            )
        except _DB_ERRORS as exc:
            reraise_if_cancelled(exc)
            raise Unavailable("the profile store is unavailable") from exc
        self.invalidate()
        return {"id": user_id, **profile}

    async def profile(self, model: str) -> dict[str, Any]:
        """A model's profile (empty fields if she never set one); NotFound if
        no model of that id exists."""
        try:
            row = await self._pool.fetchrow(
                """SELECT u.id, p.display_name, p.bio, p.tags, p.avatar, p.online_status,
                          (SELECT count(*) FROM follows f WHERE f.model = u.id) AS followers
                   FROM users u LEFT JOIN profiles p ON p.user_id = u.id
                   WHERE u.id = $1 AND u.role = 'model'
                     AND NOT EXISTS (SELECT 1 FROM deleted_users d WHERE d.user_id = u.id)""",
                model,
            )
        except _DB_ERRORS as exc:
            reraise_if_cancelled(exc)
            raise Unavailable("the profile store is unavailable") from exc
        if row is None:
            raise NotFound(f"no model '{model}'")
        return {
            "id": model,
            "display_name": row["display_name"] or "",
            "bio": row["bio"] or "",
            "tags": list(row["tags"] or []),
            "avatar": row["avatar"],
            "online_status": row["online_status"] or "offline",
            "followers": row["followers"],
        }

    # --- the room listing ----------------------------------------------------------
    async def rooms(
        self,
        viewers_of: Any,
        sort: str,
        tag: str | None,
        q: str | None,
        cursor: RoomCursor | None,
        limit: int,
    ) -> dict[str, Any]:
        """One page: the first from this node's snapshot (pinning its ranking
        when more pages follow), a later one from the pinned ranking."""
        await self._current(viewers_of)
        by_id = self._by_id
        if cursor is None:
            generation, ranked = self._generation, self._sorted[sort]
            page, next_position = _walk(ranked, 0, tag, q, limit)
            if next_position is None:
                return {"rooms": [room.to_wire() for room in page], "next_cursor": None}
            pin = f"{generation}-{sort}"
            written = self._pinned_sorts.get(sort)
            # Rewritten at half its idle time: a snapshot can outlive its pin
            # when no request came to rebuild it.
            if written is None or time.monotonic() - written > self._pin_rewrite_s():
                await self._pin(pin, sort, generation, [room.id for room in ranked])
            elif pin in self._pins:
                self._pins[pin].used = time.monotonic()
                self._pins.move_to_end(pin)
        else:
            pin = cursor.pin
            ids = await self._pinned(pin)
            listed = (by_id.get(room_id) for room_id in ids[cursor.position :])
            page, next_position = _walk(listed, cursor.position, tag, q, limit)
        next_cursor = None if next_position is None else RoomCursor(pin, sort, next_position)
        return {
            "rooms": [room.to_wire() for room in page],
            "next_cursor": None if next_cursor is None else str(next_cursor),
        }

    async def _pin(self, pin: str, sort: str, generation: str, ids: list[str]) -> None:
        """Keep ``ids`` (one sort's ranking of the snapshot ``generation``) for
        the listing's later pages: here, and in Redis for the other nodes.
        Written once per snapshot and sort; if Redis refuses it, the pages
        served by this node still work and the next first page tries again."""
        self._remember(pin, ids)
        self._pinned_sorts[sort] = time.monotonic()
        try:
            await self._redis.set(
                self._keys.rooms_pin(pin),
                "\n".join(ids),
                px=int(self._settings.discovery_cursor_idle_s * 1000),
            )
        except _REDIS_ERRORS as exc:
            reraise_if_cancelled(exc)
            if generation == self._generation:
                self._pinned_sorts.pop(sort, None)
            log.warning("room ranking %s not pinned in Redis: %s", pin, exc)

    def _pin_rewrite_s(self) -> float:
        return self._settings.discovery_cursor_idle_s / 2

    async def _pinned(self, pin: str) -> list[str]:
        """The ranking ``pin`` names, its idle time renewed; CursorExpired
        when no node keeps it any more."""
        idle_s = self._settings.discovery_cursor_idle_s
        now = time.monotonic()
        local = self._pins.get(pin)
        if local is not None and now - local.used > idle_s:
            del self._pins[pin]
            local = None
        key = self._keys.rooms_pin(pin)
        try:
            # Renewed in Redis on every page read, wherever it is served.
            alive = await self._redis.pexpire(key, int(idle_s * 1000))
            raw = None if local is not None or not alive else await self._redis.get(key)
        except _REDIS_ERRORS as exc:
            reraise_if_cancelled(exc)
            if local is None:
                raise Unavailable("the room listing's pages are unavailable") from exc
            alive, raw = True, None
        if local is not None:
            local.used = now
            self._pins.move_to_end(pin)
            return local.ids
        if not alive or raw is None:
            raise CursorExpired(
                "this listing's ranking is no longer kept: read the first page again"
            )
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        ids = text.split("\n") if text else []
        self._remember(pin, ids)
        return ids

    def _remember(self, pin: str, ids: list[str]) -> None:
        self._pins[pin] = _Pin(ids, time.monotonic())
        self._pins.move_to_end(pin)
        while len(self._pins) > PINS_CACHED_MAX:
            self._pins.popitem(last=False)

    async def _current(self, viewers_of: Any) -> list[ListedRoom]:
        """The snapshot; a stale one is served while one task rebuilds it,
        so no request but a node's very first waits for a rebuild."""
        every_s = max(self._settings.discovery_refresh_s, self._build_s / REBUILD_SHARE_MAX)
        stale = time.monotonic() - self._snapshot_at > every_s
        if stale and self._snapshot_at > 0 and self._rebuild is None:
            self._rebuild = asyncio.ensure_future(self._refresh(viewers_of))
        if self._snapshot_at > 0:
            return self._snapshot
        async with self._snapshot_lock:  # the first: one build for a burst
            if self._snapshot_at <= 0:
                self._install(await self._build(viewers_of))
        return self._snapshot

    async def _refresh(self, viewers_of: Any) -> None:
        try:
            self._install(await self._build(viewers_of))
        except Unavailable as exc:  # the stale copy stays; the next request retries
            log.warning("room listing not refreshed: %s", exc.message)
        finally:
            self._rebuild = None

    def _install(self, rooms: list[ListedRoom]) -> None:
        self._sorted = {
            "viewers": sorted(rooms, key=lambda r: (-r.viewers, r.id)),
            "trending": sorted(rooms, key=lambda r: (-r.trending, -r.viewers, r.id)),
            "new": sorted(rooms, key=lambda r: (-r.created_ms, r.id)),
        }
        self._by_id = {room.id: room for room in rooms}
        self._snapshot = rooms
        self._snapshot_at = time.monotonic()
        self._generation = secrets.token_hex(8)
        self._pinned_sorts = {}

    def invalidate(self) -> None:
        """This node's next listing waits for a fresh snapshot (a profile
        changed here: its model sees her change at once)."""
        self._snapshot_at = -1e18

    async def _build(self, viewers_of: Any) -> list[ListedRoom]:
        started = time.monotonic()
        try:
            return await self._build_once(viewers_of)
        finally:
            self._build_s = time.monotonic() - started

    async def _build_once(self, viewers_of: Any) -> list[ListedRoom]:
        now_ms = int(time.time() * 1000)
        since_hour = (now_ms - self._settings.trending_window_s * 1000) // HOUR_MS
        try:
            async with self._pool.acquire() as conn:
                rows = await conn.fetch(
                    """SELECT r.id, r.tip_min,
                              (extract(epoch FROM r.created_at) * 1000)::bigint AS created_ms,
                              p.display_name, p.bio, p.tags, p.avatar, p.online_status
                       FROM rooms r JOIN users u ON u.id = r.id
                       LEFT JOIN profiles p ON p.user_id = r.id
                       WHERE u.role = 'model' ORDER BY r.id LIMIT $1""",
                    self._settings.discovery_rooms_max,
                )
                sums = await conn.fetch(
                    """SELECT room, sum(tokens)::bigint AS tokens FROM standing_room_hourly
                       WHERE hour >= $1 GROUP BY room""",
                    since_hour,
                )
        except _DB_ERRORS as exc:
            reraise_if_cancelled(exc)
            raise Unavailable("the room store is unavailable") from exc
        trending = {row["room"]: int(row["tokens"]) for row in sums}
        listed = []
        for row in rows:
            name = row["display_name"] or ""
            bio = row["bio"] or ""
            listed.append(
                ListedRoom(
                    id=row["id"],
                    tip_min=row["tip_min"],
                    created_ms=row["created_ms"],
                    display_name=name,
                    bio=bio,
                    tags=list(row["tags"] or []),
                    avatar=row["avatar"],
                    online_status=row["online_status"] or "offline",
                    trending=max(0, trending.get(row["id"], 0)),
                    text=f"{row['id']}\n{name}\n{bio}".lower(),
                )
            )
        for start in range(0, len(listed), VIEWERS_CHUNK):
            chunk = listed[start : start + VIEWERS_CHUNK]
            try:
                counts = await viewers_of([room.id for room in chunk])
            except _REDIS_ERRORS as exc:
                reraise_if_cancelled(exc)
                raise Unavailable("room presence is unavailable") from exc
            for room, count in zip(chunk, counts, strict=True):
                room.viewers = count
            for room, live in zip(chunk, await self._live_of(chunk), strict=True):
                room.live = live
            await asyncio.sleep(0)
        return listed

    async def _live_of(self, rooms: list[ListedRoom]) -> list[bool]:
        """Whether each model has a session in her own room (the count that
        "goes live" keeps), in one pipeline."""
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for room in rooms:
                    pipe.hget(self._keys.live_state(room.id), "in")
                counts = await pipe.execute()
        except _REDIS_ERRORS as exc:
            reraise_if_cancelled(exc)
            raise Unavailable("room presence is unavailable") from exc
        return [count is not None and int(count) > 0 for count in counts]

    # --- follows ---------------------------------------------------------------------
    async def follow(self, fan: str, model: str) -> None:
        if fan == model:
            raise BadRequest("you cannot follow yourself")
        try:
            async with self._pool.acquire() as conn:
                # A deleted model is no model to follow.
                role = await conn.fetchval(
                    """SELECT role FROM users u WHERE id = $1
                        AND NOT EXISTS (SELECT 1 FROM deleted_users d WHERE d.user_id = u.id)""",
                    model,
                )
                if role != "model":
                    raise NotFound(f"no model '{model}'")
                await conn.execute(
                    """INSERT INTO follows (follower, model) VALUES ($1, $2)
                       ON CONFLICT DO NOTHING""",
                    fan,
                    model,
                )
        except _DB_ERRORS as exc:
            reraise_if_cancelled(exc)
            raise Unavailable("the follow store is unavailable") from exc

    async def unfollow(self, fan: str, model: str) -> None:
        try:
            await self._pool.execute(
                "DELETE FROM follows WHERE follower = $1 AND model = $2", fan, model
            )
        except _DB_ERRORS as exc:
            reraise_if_cancelled(exc)
            raise Unavailable("the follow store is unavailable") from exc

    async def follows(self, fan: str, cursor: str, limit: int) -> dict[str, Any]:
        """The models ``fan`` follows, by model id, after ``cursor`` (a model id)."""
        try:
            rows = await self._pool.fetch(
                """SELECT f.model, (extract(epoch FROM f.created_at) * 1000)::bigint AS since_ms,
                          coalesce(p.display_name, '') AS display_name
                   FROM follows f LEFT JOIN profiles p ON p.user_id = f.model
                   WHERE f.follower = $1 AND f.model > $2 ORDER BY f.model LIMIT $3""",
                fan,
                cursor,
                limit + 1,
            )
        except _DB_ERRORS as exc:
            reraise_if_cancelled(exc)
            raise Unavailable("the follow store is unavailable") from exc
        page = rows[:limit]
        return {
            "follows": [dict(row) for row in page],
            "next_cursor": page[-1]["model"] if len(rows) > limit else None,
        }

    async def notifications(self, user: str, cursor: int | None, limit: int) -> dict[str, Any]:
        """``user``'s stored notifications, newest first, older than ``cursor``."""
        try:
            rows = await self._pool.fetch(
                """SELECT id, kind, model, ts_ms FROM notifications
                   WHERE user_id = $1 AND ($2::bigint IS NULL OR id < $2)
                   ORDER BY id DESC LIMIT $3""",
                user,
                cursor,
                limit + 1,
            )
        except _DB_ERRORS as exc:
            reraise_if_cancelled(exc)
            raise Unavailable("the notification store is unavailable") from exc
        page = rows[:limit]
        return {
            "notifications": [
                {"id": str(r["id"]), "kind": r["kind"], "model": r["model"], "ts": r["ts_ms"]}
                for r in page
            ],
            "next_cursor": str(page[-1]["id"]) if len(rows) > limit else None,
        }

    # --- going live ----------------------------------------------------------------
    async def arrived(self, model: str) -> bool:
        """The model joined her own room: True (and the job written, the news
        published) when that makes her live."""
        now_ms = int(time.time() * 1000)
        away_ms = int(self._settings.live_away_s * 1000)
        try:
            live = await self._presence(
                keys=[self._keys.live_state(model)],
                args=[now_ms, away_ms, "join", self._settings.live_state_ttl_s],
            )
        except _REDIS_ERRORS as exc:
            reraise_if_cancelled(exc)
            log.warning("could not record %s's arrival: %s", model, exc)
            return False
        if not live:
            return False
        await self.go_live(model, now_ms)
        return True

    async def departed(self, model: str) -> None:
        try:
            await self._presence(
                keys=[self._keys.live_state(model)],
                args=[int(time.time() * 1000), 0, "leave", self._settings.live_state_ttl_s],
            )
        except _REDIS_ERRORS as exc:
            reraise_if_cancelled(exc)
            log.warning("could not record %s's departure: %s", model, exc)

    async def go_live(self, model: str, ts_ms: int) -> int | None:
        """Write the job, tell every node, then store the notifications."""
        try:
            job = await self._pool.fetchval(
                """INSERT INTO live_jobs (model, ts_ms, lease_until)
                   VALUES ($1, $2, now() + make_interval(secs => $3)) RETURNING id""",
                model,
                ts_ms,
                self._settings.live_job_lease_s,
            )
        except _DB_ERRORS as exc:
            reraise_if_cancelled(exc)
            log.warning("could not write %s's live job: %s", model, exc)
            return None
        news = bus.LiveNews(orjson.dumps({"model": model, "ts": ts_ms}))
        try:
            await self._redis.publish(self.channel, news.encode())
        except _REDIS_ERRORS as exc:
            reraise_if_cancelled(exc)
            log.warning("could not publish %s going live: %s", model, exc)
        await self.run_job(job, model, ts_ms, "")
        return int(job)

    async def run_job(self, job: int, model: str, ts_ms: int, cursor: str) -> None:
        """Store the job's notifications batch by batch from ``cursor``."""
        started = time.perf_counter()
        batch = self._settings.live_batch_followers
        while True:
            try:
                async with self._pool.acquire() as conn, conn.transaction():
                    row = await conn.fetchrow(
                        """WITH b AS (
                               SELECT follower FROM follows WHERE model = $1 AND follower > $2
                               ORDER BY follower LIMIT $3
                           ), ins AS (
                               INSERT INTO notifications (user_id, kind, model, ts_ms, job)
                               SELECT follower, 'live', $1, $4, $5 FROM b
                               ON CONFLICT (user_id, job) DO NOTHING
                           )
                           SELECT max(follower) AS last, count(*) AS n FROM b""",
                        model,
                        cursor,
                        batch,
                        ts_ms,
                        job,
                    )
                    assert row is not None
                    done = row["n"] < batch
                    if row["last"] is not None:
                        cursor = row["last"]
                    await conn.execute(
                        """UPDATE live_jobs SET cursor = $2, done = $3,
                               lease_until = now() + make_interval(secs => $4)
                           WHERE id = $1""",
                        job,
                        cursor,
                        done,
                        self._settings.live_job_lease_s,
                    )
            except _DB_ERRORS as exc:
                reraise_if_cancelled(exc)
                # The lease runs out and a node's sweep resumes from the cursor.
                log.warning("live job %s stopped at %r: %s", job, cursor, exc)
                return
            if done:
                self.last_job_s = time.perf_counter() - started
                return
            await asyncio.sleep(0)  # one batch per loop turn

    async def run(self) -> None:
        """Every ``live_job_interval_s``: take over a job whose node died."""
        while True:
            await pause(self._settings.live_job_interval_s)
            try:
                row = await self._pool.fetchrow(
                    """UPDATE live_jobs SET lease_until = now() + make_interval(secs => $1)
                       WHERE id = (SELECT id FROM live_jobs
                                   WHERE NOT done AND lease_until < now()
                                   ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED)
                       RETURNING id, model, ts_ms, cursor""",
                    self._settings.live_job_lease_s,
                )
            except _DB_ERRORS as exc:
                reraise_if_cancelled(exc)
                continue
            if row is not None:
                await self.run_job(row["id"], row["model"], row["ts_ms"], row["cursor"])

    async def local_followers(self, model: str, users: list[str]) -> list[str]:
        """Which of ``users`` (this node's connected users) follow ``model``."""
        found: list[str] = []
        for start in range(0, len(users), LOCAL_FOLLOWERS_QUERY_MAX):
            chunk = users[start : start + LOCAL_FOLLOWERS_QUERY_MAX]
            try:
                rows = await self._pool.fetch(
                    "SELECT follower FROM follows WHERE model = $1 AND follower = ANY($2::text[])",
                    model,
                    chunk,
                )
            except _DB_ERRORS as exc:
                reraise_if_cancelled(exc)
                log.warning("could not find %s's connected followers: %s", model, exc)
                return found
            found.extend(row["follower"] for row in rows)
        return found
