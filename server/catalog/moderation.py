"""Moderation: who may chat in a room, who may join it, who may connect.

Postgres is the truth (migration 0014): room settings, moderators, mutes,
bans, platform bans and the audit log. Every change commits there first,
with its audit row in the same transaction, and is then announced on the
moderation channel (bus kind ``M``), which every node subscribes to. Each
node keeps an in-process copy:

- ``RoomRules`` per room (settings, moderators, active mutes and bans),
  loaded from Postgres on first use and dropped when a change to that room
  is announced, or when the node's pub/sub reconnects (an announcement may
  have been missed); so a restart or the loss of Redis loses nothing.
- the platform bans, loaded at start and after every reconnect.

That keeps ``say`` cheap: a room with no rules costs one dict lookup; only
slow mode (one Redis SET NX per line) and ``chat_requires`` (a balance read,
or a cached purchase check) cost a round trip, and only in rooms using them.

Removal is the node's part (gateway/node.py): on ``removed`` it takes every
local session of that user out of the room and tells them (``removed``); on
``platform`` it closes every local session of a banned user with 4003.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError

from tokenchat.protocol.limits import CHAT_REQUIRES

from .. import bus
from ..auth import Identity
from ..config import Settings
from ..economy.batcher import ScriptBatcher
from ..economy.scripts import lua_script
from ..errors import (
    BadRequest,
    Banned,
    Forbidden,
    Muted,
    NotFound,
    SlowMode,
    Unavailable,
)
from ..keys import Keys

log = logging.getLogger(__name__)
# A pooled connection (asyncpg hands out a proxy of one) or the pool itself:
# whatever runs `execute`.
Executor = Any

# GET /v1/admin/audit: rows in one page, by default and at most.
AUDIT_PAGE_DEFAULT = 100
AUDIT_PAGE_MAX = 1000
# Users whose purchase check is cached in one process (a bound on memory).
PURCHASE_CACHE_MAX = 100_000

_DB_ERRORS = (asyncpg.PostgresError, OSError, TimeoutError)
_REDIS_ERRORS = (RedisError, OSError, TimeoutError)


def now_ms() -> int:
    return int(time.time() * 1000)


def _ms(value: Any) -> int | None:
    """A timestamptz from Postgres as ms since the epoch (None stays None)."""
    return None if value is None else int(value.timestamp() * 1000)


def _active(until_ms: int | None, at_ms: int) -> bool:
    return until_ms is None or until_ms > at_ms


@dataclasses.dataclass(frozen=True, slots=True)
class RoomRules:
    """One room's moderation state as one node sees it."""

    room: str
    slow_s: int = 0
    chat_requires: str = "none"
    chat_min_balance: int = 0
    moderators: frozenset[str] = frozenset()
    # user -> until (ms; None: permanent). Expired entries are ignored.
    mutes: dict[str, int | None] = dataclasses.field(default_factory=dict)
    bans: dict[str, int | None] = dataclasses.field(default_factory=dict)

    @property
    def chat_is_open(self) -> bool:
        """No chat rule at all: `say` checks nothing more (the hot path)."""
        return self.slow_s == 0 and self.chat_requires == "none" and not self.mutes

    def settings_wire(self) -> dict[str, Any]:
        return {
            "slow_s": self.slow_s,
            "chat_requires": self.chat_requires,
            "chat_min_balance": self.chat_min_balance,
        }

    def staff(self, user: str) -> bool:
        """The owner or one of her moderators: no chat rule applies to them."""
        return user == self.room or user in self.moderators


# Keys one SCAN step of the room histories asks for when a deleted
# account's events are taken out of them (Moderation.forget_user): a step is one
# short Redis call, and 1,000 keys keep the number of calls low at 10,000
# rooms without blocking Redis for long.
HISTORY_SCAN_COUNT = 1000


class Moderation:
    def __init__(
        self,
        pool: asyncpg.Pool,
        redis: Redis,
        keys: Keys,
        settings: Settings,
        balance_of: Callable[[str], Awaitable[int]],
    ) -> None:
        self._pool = pool
        self._redis = redis
        self._keys = keys
        self._settings = settings
        self._balance_of = balance_of
        self._batcher = ScriptBatcher(redis, settings.redis_timeout_s)
        self._clear = lua_script("clear", retry_safe=True)
        self._rules: dict[str, RoomRules] = {}
        # Bumped by every announced change: a load that started before a
        # change is not kept (it may predate the commit). One counter for all
        # rooms: changes are rare, and a load they make redundant is cheap.
        self._changes = 0
        self._platform: dict[str, int | None] | None = None  # None: not loaded
        self._platform_generation = 0
        # user -> monotonic time until which "has not purchased" holds;
        # a user who has purchased maps to None.
        self._purchased: dict[str, float | None] = {}
        self.channel = keys.moderation_channel()

    # --- the in-process copy --------------------------------------------------------------
    async def rules(self, room: str) -> RoomRules:
        cached = self._rules.get(room)
        if cached is not None:
            return cached
        for _ in range(3):
            changes = self._changes
            rules = await self._load_rules(room)
            if self._changes == changes:
                if len(self._rules) >= self._settings.moderation_rooms_cached_max:
                    self._rules.clear()
                self._rules[room] = rules
                return rules
        return rules  # changing under us: use the newest read, uncached

    async def _load_rules(self, room: str) -> RoomRules:
        try:
            async with self._pool.acquire() as conn:
                settings = await conn.fetchrow(
                    "SELECT slow_s, chat_requires, chat_min_balance FROM room_settings"
                    " WHERE room = $1",
                    room,
                )
                moderators = await conn.fetch(
                    "SELECT user_id FROM room_moderators WHERE room = $1", room
                )
                restrictions = await conn.fetch(
                    "SELECT user_id, kind, until FROM room_restrictions"
                    " WHERE room = $1 AND (until IS NULL OR until > now())",
                    room,
                )
        except _DB_ERRORS as exc:
            raise Unavailable("the room's rules are unavailable") from exc
        mutes = {r["user_id"]: _ms(r["until"]) for r in restrictions if r["kind"] == "mute"}
        bans = {r["user_id"]: _ms(r["until"]) for r in restrictions if r["kind"] == "ban"}
        return RoomRules(
            room,
            settings["slow_s"] if settings else 0,
            settings["chat_requires"] if settings else "none",
            settings["chat_min_balance"] if settings else 0,
            frozenset(r["user_id"] for r in moderators),
            mutes,
            bans,
        )

    def forget(self, room: str) -> None:
        self._rules.pop(room, None)
        self._changes += 1

    def forget_all(self) -> None:
        """Pub/sub reconnected: announcements may have been missed."""
        self._rules.clear()
        self._changes += 1
        self._platform = None
        self._platform_generation += 1

    async def load_platform_bans(self) -> None:
        generation = self._platform_generation
        try:
            rows = await self._pool.fetch(
                "SELECT user_id, until FROM platform_bans WHERE until IS NULL OR until > now()"
            )
        except _DB_ERRORS as exc:
            raise Unavailable("platform bans are unavailable") from exc
        if generation == self._platform_generation:
            self._platform = {r["user_id"]: _ms(r["until"]) for r in rows}

    def platform_ban_cached(self, user: str) -> int | bool | None:
        """False: not banned (or not known yet); else the ban's until (None:
        permanent). For HTTP, which reads the copy without waiting."""
        if self._platform is None or user not in self._platform:
            return False
        until = self._platform[user]
        return until if _active(until, now_ms()) else False

    async def check_platform(self, user: str) -> None:
        """Banned if ``user`` is banned from the platform (hello)."""
        if self._platform is None:
            await self.load_platform_bans()
        assert self._platform is not None
        until = self._platform.get(user, False)
        if until is not False and _active(until, now_ms()):
            raise Banned("you are banned from this platform", until)

    def on_news(self, news: dict[str, Any]) -> None:
        """Apply an announced change to the copy (the node acts on the rest)."""
        op = news.get("op")
        room = news.get("room")
        if isinstance(room, str):
            self.forget(room)
        if op != "platform":
            return
        self._platform_generation += 1  # a load in flight may predate it
        user = news.get("user")
        if self._platform is not None and isinstance(user, str):
            if news.get("banned"):
                until = news.get("until")
                self._platform[user] = until if isinstance(until, int) else None
            else:
                self._platform.pop(user, None)

    # --- checks on the session's path ----------------------------------------------------
    async def check_join(self, room: str, user: str) -> RoomRules:
        rules = await self.rules(room)
        if user in rules.bans:
            until = rules.bans[user]
            if _active(until, now_ms()):
                raise Banned(f"you are banned from room '{room}'", until)
        return rules

    async def check_say(self, room: str, user: str) -> None:
        rules = self._rules.get(room)
        if rules is None:
            rules = await self.rules(room)
        if rules.chat_is_open and not rules.bans:
            return
        if rules.staff(user):
            return
        at_ms = now_ms()
        ban = rules.bans.get(user, False)
        if ban is not False and _active(ban, at_ms):
            raise Banned(f"you are banned from room '{room}'", ban)
        mute = rules.mutes.get(user, False)
        if mute is not False and _active(mute, at_ms):
            raise Muted(f"you are muted in room '{room}'", mute)
        if rules.chat_requires == "purchased" and not await self._has_purchased(user):
            raise Forbidden(f"room '{room}' lets fans chat once they have bought tokens")
        balance_needed = rules.chat_requires == "balance"
        if balance_needed and await self._balance_of(user) < rules.chat_min_balance:
            raise Forbidden(
                f"room '{room}' lets fans chat while they hold at least "
                f"{rules.chat_min_balance} tokens"
            )
        if rules.slow_s > 0:
            await self._slow_down(room, user, rules.slow_s)

    async def _slow_down(self, room: str, user: str, slow_s: int) -> None:
        key = self._keys.slow_mode(room, user)
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.set(key, b"1", nx=True, px=slow_s * 1000)
                pipe.pttl(key)
                placed, ttl_ms = await pipe.execute()
        except _REDIS_ERRORS as exc:
            raise Unavailable("slow mode is unavailable") from exc
        if not placed:
            wait_ms = max(int(ttl_ms), 1)
            raise SlowMode(f"slow mode: one line per {slow_s} s", now_ms() + wait_ms)

    async def _has_purchased(self, user: str) -> bool:
        clock = time.monotonic()
        cached = self._purchased.get(user, 0.0)
        if cached is None:
            return True
        if cached > clock:
            return False
        try:
            found = await self._pool.fetchval(
                "SELECT EXISTS (SELECT 1 FROM purchases WHERE user_id = $1)", user
            )
        except _DB_ERRORS as exc:
            raise Unavailable("purchases are unavailable") from exc
        if len(self._purchased) >= PURCHASE_CACHE_MAX:
            self._purchased.clear()
        self._purchased[user] = None if found else clock + self._settings.chat_purchase_recheck_s
        return bool(found)

    # --- moderation commands ------------------------------------------------------------
    async def _authorize(self, actor: Identity, room: str, target: str | None) -> RoomRules:
        """The room's rules if ``actor`` may moderate it (and act on ``target``)."""
        rules = await self.rules(room)
        user = actor.user_id
        is_owner = user == room
        if not (is_owner or user in rules.moderators or actor.role == "admin"):
            raise Forbidden(f"only room '{room}''s model and her moderators moderate it")
        if target is None:
            return rules
        if target == user:
            raise Forbidden("you cannot moderate yourself")
        if target == room:
            raise Forbidden("nobody moderates a room's own model in her room")
        if target in rules.moderators and not is_owner and actor.role != "admin":
            raise Forbidden("only the model moderates her moderators")
        role = await self._role_of(target)
        if role is None:
            raise NotFound(f"no user '{target}'")
        if role == "admin":
            raise Forbidden("admins are not moderated")
        return rules

    async def _role_of(self, user: str) -> str | None:
        try:
            role: str | None = await self._pool.fetchval(
                "SELECT role FROM users WHERE id = $1", user
            )
        except _DB_ERRORS as exc:
            raise Unavailable("the user store is unavailable") from exc
        return role

    async def restrict(
        self, actor: Identity, room: str, target: str, kind: str, seconds: int | None
    ) -> dict[str, Any]:
        """A mute or a ban (``kind``), ``seconds`` long (None: permanent)."""
        await self._authorize(actor, room, target)
        until_ms = None if seconds is None else now_ms() + seconds * 1000
        detail = {"seconds": seconds, "until": until_ms}

        async def write(conn: Executor) -> None:
            await conn.execute(
                """INSERT INTO room_restrictions (room, user_id, kind, until, by_user)
                   VALUES ($1, $2, $3, to_timestamp($4::bigint / 1000.0), $5)
                   ON CONFLICT (room, user_id, kind) DO UPDATE
                   SET until = EXCLUDED.until, by_user = EXCLUDED.by_user,
                       created_at = now()""",
                room,
                target,
                kind,
                until_ms,
                actor.user_id,
            )

        await self._change(actor.user_id, kind, room, target, detail, write)
        if kind == "ban":
            news = {"op": "removed", "room": room, "user": target, "reason": "banned"}
            await self.announce({**news, "until": until_ms})
        else:
            await self.announce({"op": "rules", "room": room})
        return {"room": room, "user": target, "until": until_ms}

    async def lift(self, actor: Identity, room: str, target: str, kind: str) -> dict[str, Any]:
        """Unmute or unban; lifting what is not there is not an error."""
        await self._authorize(actor, room, target)

        async def write(conn: Executor) -> None:
            await conn.execute(
                "DELETE FROM room_restrictions WHERE room = $1 AND user_id = $2 AND kind = $3",
                room,
                target,
                kind,
            )

        await self._change(actor.user_id, f"un{kind}", room, target, {}, write)
        await self.announce({"op": "rules", "room": room})
        return {"room": room, "user": target}

    async def kick(self, actor: Identity, room: str, target: str) -> dict[str, Any]:
        await self._authorize(actor, room, target)
        await self._change(actor.user_id, "kick", room, target, {}, None)
        await self.announce({"op": "removed", "room": room, "user": target, "reason": "kicked"})
        return {"room": room, "user": target}

    async def clear(self, actor: Identity, room: str, target: str) -> dict[str, Any]:
        await self._authorize(actor, room, target)
        try:
            removed = await self._batcher.call(
                self._clear, [self._keys.room_history(room)], [target]
            )
        except _REDIS_ERRORS as exc:
            raise Unavailable("room history is unavailable") from exc
        await self._change(actor.user_id, "clear", room, target, {"removed": int(removed)}, None)
        await self.announce({"op": "clear", "room": room, "user": target})
        return {"room": room, "user": target, "removed": int(removed)}

    async def forget_user(self, user: str) -> int:
        """A deleted account (DELETE /v1/me): every event naming ``user`` out
        of every room's history (clear.lua, 'all'), and each room where one
        went told with a `clear` event, as a moderator's clear tells it.
        Chat lines are not in Postgres, so the rooms she wrote in are found
        by scanning the history streams: a bounded read (one stream per room
        with recent events, each at most history_len events, SCAN steps of
        HISTORY_SCAN_COUNT keys). Retry-safe: a second run removes nothing
        and tells nobody. Returns how many events went."""
        removed = 0
        try:
            async for name in self._redis.scan_iter(
                match=self._keys.room_histories(), count=HISTORY_SCAN_COUNT
            ):
                key = name.decode() if isinstance(name, bytes) else str(name)
                room = self._keys.room_of_history(key)
                gone = int(await self._batcher.call(self._clear, [key], [user, "all"]))
                if gone:
                    removed += gone
                    await self.announce({"op": "clear", "room": room, "user": user, "all": True})
        except _REDIS_ERRORS as exc:
            raise Unavailable("room history is unavailable") from exc
        return removed

    async def slow(self, actor: Identity, room: str, seconds: int) -> dict[str, Any]:
        await self._authorize(actor, room, None)
        return await self._set_settings(actor, room, {"slow_s": seconds}, action="slow")

    async def set_room(self, actor: Identity, changes: dict[str, Any]) -> dict[str, Any]:
        """PUT /v1/me/room: the model's own room."""
        room = actor.user_id
        if "chat_requires" in changes and changes["chat_requires"] not in CHAT_REQUIRES:
            raise BadRequest(f"field 'chat_requires' must be one of {', '.join(CHAT_REQUIRES)}")
        return await self._set_settings(actor, room, changes, action="room_settings")

    async def _set_settings(
        self, actor: Identity, room: str, changes: dict[str, Any], *, action: str
    ) -> dict[str, Any]:
        current = await self.rules(room)
        merged = {**current.settings_wire(), **changes}

        async def write(conn: Executor) -> None:
            await conn.execute(
                """INSERT INTO room_settings (room, slow_s, chat_requires, chat_min_balance)
                   VALUES ($1, $2, $3, $4)
                   ON CONFLICT (room) DO UPDATE
                   SET slow_s = EXCLUDED.slow_s, chat_requires = EXCLUDED.chat_requires,
                       chat_min_balance = EXCLUDED.chat_min_balance, updated_at = now()""",
                room,
                merged["slow_s"],
                merged["chat_requires"],
                merged["chat_min_balance"],
            )

        await self._change(actor.user_id, action, room, None, changes, write)
        await self.announce({"op": "rules", "room": room})
        return {"room": room, **merged}

    async def set_moderators(self, owner: Identity, users: list[str]) -> dict[str, Any]:
        room = owner.user_id
        wanted = list(dict.fromkeys(users))
        if room in wanted:
            raise BadRequest("a model is her room's owner, not one of its moderators")
        if wanted:
            try:
                found = await self._pool.fetch(
                    "SELECT id, role FROM users WHERE id = ANY($1::text[])", wanted
                )
            except _DB_ERRORS as exc:
                raise Unavailable("the user store is unavailable") from exc
            known = {r["id"] for r in found}
            missing = [user for user in wanted if user not in known]
            if missing:
                raise NotFound(f"no user '{missing[0]}'")

        async def write(conn: Executor) -> None:
            await conn.execute("DELETE FROM room_moderators WHERE room = $1", room)
            await conn.executemany(
                "INSERT INTO room_moderators (room, user_id) VALUES ($1, $2)",
                [(room, user) for user in wanted],
            )

        await self._change(room, "moderators", room, None, {"users": wanted}, write)
        await self.announce({"op": "rules", "room": room})
        return {"room": room, "moderators": wanted}

    async def moderators(self, room: str) -> list[str]:
        return sorted((await self.rules(room)).moderators)

    # --- platform bans (admins) ---------------------------------------------------------------
    async def platform_ban(
        self, admin: Identity, user: str, seconds: int | None, reason: str
    ) -> dict[str, Any]:
        role = await self._role_of(user)
        if role is None:
            raise NotFound(f"no user '{user}'")
        if role == "admin":
            raise Forbidden("admins are not banned; take the role away instead")
        until_ms = None if seconds is None else now_ms() + seconds * 1000

        async def write(conn: Executor) -> None:
            await conn.execute(
                """INSERT INTO platform_bans (user_id, until, reason, by_user)
                   VALUES ($1, to_timestamp($2::bigint / 1000.0), $3, $4)
                   ON CONFLICT (user_id) DO UPDATE
                   SET until = EXCLUDED.until, reason = EXCLUDED.reason,
                       by_user = EXCLUDED.by_user, created_at = now()""",
                user,
                until_ms,
                reason,
                admin.user_id,
            )

        detail = {"seconds": seconds, "until": until_ms, "reason": reason}
        await self._change(admin.user_id, "platform_ban", None, user, detail, write)
        await self.announce({"op": "platform", "user": user, "banned": True, "until": until_ms})
        return {"user": user, "until": until_ms, "reason": reason}

    async def platform_unban(self, admin: Identity, user: str) -> dict[str, Any]:
        async def write(conn: Executor) -> None:
            await conn.execute("DELETE FROM platform_bans WHERE user_id = $1", user)

        await self._change(admin.user_id, "platform_unban", None, user, {}, write)
        await self.announce({"op": "platform", "user": user, "banned": False})
        return {"user": user}

    # --- the audit log -------------------------------------------------------------------
    async def _change(
        self,
        actor: str,
        action: str,
        room: str | None,
        target: str | None,
        detail: dict[str, Any],
        write: Callable[[Executor], Awaitable[None]] | None,
    ) -> None:
        """``write`` and its audit row, in one transaction."""
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                if write is not None:
                    await write(conn)
                await append_audit(conn, actor, action, room, target, detail)
        except _DB_ERRORS as exc:
            if isinstance(exc, asyncpg.ForeignKeyViolationError):
                raise NotFound("no such room or user") from exc
            raise Unavailable("moderation is unavailable") from exc

    async def audit(self, before: int | None, limit: int) -> dict[str, Any]:
        try:
            rows = await self._pool.fetch(
                """SELECT id, at, actor, action, room, target, detail FROM audit_log
                   WHERE ($1::bigint IS NULL OR id < $1) ORDER BY id DESC LIMIT $2""",
                before,
                limit,
            )
        except _DB_ERRORS as exc:
            raise Unavailable("the audit log is unavailable") from exc
        entries = [
            {
                "id": r["id"],
                "ts": _ms(r["at"]),
                "actor": r["actor"],
                "action": r["action"],
                "room": r["room"],
                "target": r["target"],
                "detail": orjson.loads(r["detail"]),
            }
            for r in rows
        ]
        more = len(entries) == limit
        return {"entries": entries, "next": entries[-1]["id"] if more and entries else None}

    # --- announcements -----------------------------------------------------------------------
    async def announce(self, news: dict[str, Any]) -> None:
        """Tell every node (this one too) about a committed change.

        The change is in Postgres already: if Redis does not take the news,
        nodes that missed it still see it once their pub/sub reconnects (they
        reload), but a member may stay in the room until then, so the caller
        is told (UNAVAILABLE) and may repeat the command, which is idempotent."""
        # This node's copy first, before the reply: the caller's next command
        # (or a member's on this node) must see the change; the news comes
        # back on the channel too, which changes nothing more.
        self.on_news(news)
        payload = bus.ModerationChanged(orjson.dumps(news)).encode()
        try:
            await self._redis.publish(self.channel, payload)
        except _REDIS_ERRORS as exc:
            raise Unavailable("saved, but not every server heard it yet: repeat it") from exc


async def append_audit(
    conn: Executor,
    actor: str,
    action: str,
    room: str | None,
    target: str | None,
    detail: dict[str, Any],
) -> None:
    """One audit row (in the caller's transaction when ``conn`` is one)."""
    await conn.execute(
        "INSERT INTO audit_log (actor, action, room, target, detail)"
        " VALUES ($1, $2, $3, $4, $5::jsonb)",
        actor,
        action,
        room,
        target,
        orjson.dumps(detail).decode(),
    )


def decode_news(message: bus.ModerationChanged) -> dict[str, Any] | None:
    try:
        news = orjson.loads(message.body)
    except orjson.JSONDecodeError:
        return None
    return news if isinstance(news, dict) else None
