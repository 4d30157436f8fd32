"""Tip goals: a model's goal for her room, counted by its tips, with an
all-or-nothing option whose tips wait in escrow.

States (the row in ``goals``, migration 0012)::

    active --a tip reaches the target--> reached   (outcome release)
      |  \\--deadline_at passes first--> failed    (outcome refund)
      +--DELETE /v1/me/goal------------> deleted   (outcome refund)
    reached | failed --DELETE--> deleted (outcome kept: the room stops showing it)

Where things live, and why:

- The workflow state is in Postgres (the escrow foundation's rule: the state
  decides, the money follows; docs/economy.md, "Escrow").
- The counting is in Redis, in the room's goal hash (``{eco}:goal:<room>``),
  because a tip counts toward the goal in its own Lua call (tip.lua,
  tip_item.lua): the progress moves exactly with the tip, and an
  all-or-nothing goal's tip goes into its escrow in that call. The hash is
  written by ``goal_state.lua`` after Postgres, and rebuilt from Postgres
  and the ledger when missing (``load``): its progress is the sum of the
  tips whose ledger entry names the goal (meta ``goal``).
- A target is reached inside a tip's call, in Redis: the tip's reply says
  so and ``reached`` closes the goal in Postgres (then releases). A process
  dying between the two leaves the goal active in Postgres and reached in
  Redis; the sweeper's ``check_reached`` (every sweep) and the deadline's
  handler (``expire``) finish it.

Money (all-or-nothing goals only): closing commits the state, its outcome
and a ``goal.settle`` deadline in one transaction; then ``settle`` closes
the Redis hash (no tip enters the escrow after that), moves the money
(RELEASE of the whole escrow with key ``goal-release:<id>``, or one
GOAL_REFUND per fan with key ``goal-refund:<id>:<fan>``, for what the
ledger says the fan put in less what came back), sets ``settled_at`` and
drops the deadline. Refunds wait until the ledger holds exactly what the
escrow holds (a tip still in the outbox would be missed otherwise), so a
crash anywhere is finished by the deadline, and nothing leaves escrow twice.

A reach that races the deadline or a delete: Postgres decides (the compare-
and-set from ``active``). The room may then have seen the tip's `reached`
event before the `failed` or `deleted` one that tells the outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
from redis.asyncio import Redis
from redis.exceptions import RedisError

from tokenchat.protocol import events
from tokenchat.protocol.limits import GOAL_ID_RE

from ..config import Settings
from ..errors import BadRequest, Conflict, EscrowEmpty, NotFound, ServiceError, Unavailable
from ..keys import Keys
from . import deadlines
from .economy import Economy, escrow_account
from .scripts import script_source

log = logging.getLogger(__name__)

GOALS_INITIATOR = "sys:goals"
ESCROW_KIND = "goal"
EXPIRE = "goal.expire"  # the deadline of a goal that has one
SETTLE = "goal.settle"  # a closed all-or-nothing goal's money
_DB_ERRORS = (asyncpg.PostgresError, OSError, asyncio.TimeoutError)
_REDIS_ERRORS = (RedisError, OSError)
_COLUMNS = """id, room, model, title, target, all_or_nothing, deadline_at, state, outcome,
              closed_at, settled_at, created_at"""
# Attempts at a Redis write when Redis keeps being reset meanwhile.
_LOAD_ATTEMPTS_MAX = 3


def new_goal_id() -> str:
    return "g_" + secrets.token_hex(12)


def release_key(goal_id: str) -> str:
    """The idempotency key of a reached goal's release."""
    return f"goal-release:{goal_id}"


def refund_key(goal_id: str, fan: str) -> str:
    """The idempotency key of one fan's refund from a goal."""
    return f"goal-refund:{goal_id}:{fan}"


def _ms(value: datetime | None) -> int | None:
    return None if value is None else int(value.timestamp() * 1000)


def wire(row: Any, progress: int) -> dict[str, Any]:
    """A goal as clients see it (`goal` events, `join`, the HTTP replies)."""
    return {
        "id": row["id"],
        "title": row["title"],
        "target": row["target"],
        "progress": progress,
        "state": row["state"],
        "all_or_nothing": row["all_or_nothing"],
        "deadline": _ms(row["deadline_at"]),
    }


class Goals:
    """The goal workflow: the model's set and delete, the room's current
    goal, the loader of the Redis hash, and the sweeper's handlers."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        redis: Redis,
        keys: Keys,
        settings: Settings,
        economy: Economy,
        post: Any,
    ) -> None:
        self._pool = pool
        self._redis = redis
        self._keys = keys
        self._settings = settings
        self._economy = economy
        # RoomStore.append: set, failed and deleted go into the room's
        # history as `goal` events (progress and reached come from tip.lua).
        self._post = post
        self._state_script = redis.register_script(script_source("goal_state"))
        # show_load.lua is the generic fenced "write this hash if absent".
        self._load_script = redis.register_script(script_source("show_load"))
        economy.goal_loader = self.load
        economy.goal_reached = self.reached

    def register(self, sweeper: deadlines.Sweeper) -> None:
        sweeper.handle(EXPIRE, self.expire)
        sweeper.handle(SETTLE, self.settle)
        sweeper.every_sweep(self.check_reached)

    # --- the model --------------------------------------------------------------------
    async def set(
        self, model: str, title: str, target: int, deadline_ms: int | None, all_or_nothing: bool
    ) -> dict[str, Any]:
        """A new active goal for the model's room. CONFLICT while one is
        active: the model deletes it first (its held tips go back)."""
        deadline_at = None
        if deadline_ms is not None:
            deadline_at = datetime.fromtimestamp(deadline_ms / 1000, tz=UTC)
            now = datetime.now(tz=UTC)
            if deadline_at <= now:
                raise BadRequest("field 'deadline' is in the past")
            if deadline_at > now + timedelta(seconds=self._settings.goal_deadline_ahead_s_max):
                raise BadRequest(
                    "field 'deadline' is more than "
                    f"{int(self._settings.goal_deadline_ahead_s_max)} s ahead"
                )
        goal_id = new_goal_id()
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                if await conn.fetchval("SELECT id FROM rooms WHERE id = $1", model) is None:
                    raise NotFound(f"no room '{model}'")
                row = await conn.fetchrow(
                    f"""INSERT INTO goals (id, room, model, title, target, all_or_nothing,
                                           deadline_at)
                        VALUES ($1, $2, $2, $3, $4, $5, $6) RETURNING {_COLUMNS}""",
                    goal_id,
                    model,
                    title,
                    target,
                    all_or_nothing,
                    deadline_at,
                )
                if deadline_at is not None:
                    await deadlines.schedule(conn, goal_id, EXPIRE, deadline_at)
        except asyncpg.UniqueViolationError as exc:  # goals_one_active
            raise Conflict(
                "a goal is active in your room: delete it first (DELETE /v1/me/goal)"
            ) from exc
        except _DB_ERRORS as exc:
            raise Unavailable("goals are unavailable; no goal was set") from exc
        try:
            await self._redis_set(row, 0)
        except Unavailable:
            # Postgres has the goal; a stale hash must not stay: drop it, and
            # the next tip loads the goal from Postgres.
            with contextlib.suppress(*_REDIS_ERRORS):
                await self._redis.delete(self._keys.goal(model))
            log.warning("goal %s set, its Redis hash not written", goal_id)
        goal = wire(row, 0)
        await self._publish(model, goal)
        return goal

    async def delete(self, model: str, attempts: int = _LOAD_ATTEMPTS_MAX) -> dict[str, Any]:
        """Remove the room's current goal: an active one closes with its
        held tips refunded; a reached or failed one leaves the room's view."""
        row = await self._current_row(model)
        if row is None or row["state"] == "deleted":
            raise NotFound("your room has no goal")
        if row["state"] == "active" and await self._reached_in_redis(row):
            # Its target was reached (the process that saw it died before
            # Postgres did): it is reached, not deleted with a refund.
            await self.reached(row["id"])
            row = await self._fetch(row["id"])
        closing = row["state"] == "active"
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                closed = await conn.fetchrow(
                    f"""UPDATE goals SET state = 'deleted',
                               closed_at = coalesce(closed_at, now()),
                               outcome = coalesce(outcome, 'refund')
                        WHERE id = $1 AND state = $2 RETURNING {_COLUMNS}""",
                    row["id"],
                    row["state"],
                )
                if closed is not None and closing:
                    await self._closing_deadlines(conn, closed)
        except _DB_ERRORS as exc:
            raise Unavailable("goals are unavailable; nothing changed") from exc
        if closed is None:  # it changed meanwhile (reached, expired): look again
            if attempts <= 1:
                raise Conflict("the goal keeps changing; try again")
            return await self.delete(model, attempts - 1)
        progress = await self._close_redis(closed)
        settled = await self._settle_now(closed["id"])
        goal = wire(closed, progress)
        await self._publish(model, goal)
        return {"goal": goal, "settled": settled}

    # --- reading ----------------------------------------------------------------------
    async def current(self, room: str) -> dict[str, Any] | None:
        """The room's goal as tips see it (the Redis hash, loaded on a
        miss): None when the room has none or its newest was deleted."""
        key = self._keys.goal(room)
        for _ in range(_LOAD_ATTEMPTS_MAX):
            try:
                fields: dict[bytes, bytes] = await self._redis.hgetall(key)  # type: ignore[misc,assignment]
            except _REDIS_ERRORS as exc:
                raise Unavailable("goals are unavailable") from exc
            if fields:
                return _from_hash(fields)
            await self.load(room)
        raise Unavailable("the goal could not be loaded")

    # --- Redis ------------------------------------------------------------------------
    async def load(self, room: str) -> None:
        """Put the room's goal hash into Redis from Postgres (its newest goal)
        and the ledger (its progress: the tips naming it), behind the epoch
        fence. A room with no goal gets a hash with id '' (not "not loaded")."""
        for _ in range(_LOAD_ATTEMPTS_MAX):
            epoch = await self._economy.epoch()
            try:
                async with self._pool.acquire() as conn:
                    row = await conn.fetchrow(
                        f"""SELECT {_COLUMNS} FROM goals WHERE room = $1
                            ORDER BY created_at DESC, id LIMIT 1""",
                        room,
                    )
                    progress = 0
                    if row is not None and row["state"] != "deleted":
                        progress = await self._ledger_progress(conn, row["id"])
            except _DB_ERRORS as exc:
                raise Unavailable("goals are unavailable; nothing was charged") from exc
            if row is None or row["state"] == "deleted":
                fields: list[Any] = ["id", "", "room", room]
            else:
                fields = self._hash_fields(row, progress)
                if row["state"] == "active" and progress >= row["target"]:
                    # Reached in a Redis that was lost before Postgres knew:
                    # no tip counts any more; check_reached closes it.
                    fields[fields.index("state") + 1] = "reached"
            try:
                result = await self._load_script(
                    keys=[self._keys.epoch(), self._keys.goal(room)], args=[epoch, *fields]
                )
            except _REDIS_ERRORS as exc:
                raise Unavailable("goals are unavailable; nothing was charged") from exc
            if _text(result) in ("OK", "EXISTS"):
                return
            log.warning("Redis was reset while loading the goal of %s; loading again", room)
        raise Unavailable("Redis keeps being reset; try again")

    async def _ledger_progress(self, conn: Any, goal_id: str) -> int:
        """Tokens tipped toward the goal, from the ledger: each tip's credit
        (to the model, or to the escrow of an all-or-nothing goal)."""
        value = await conn.fetchval(
            """SELECT coalesce(sum(p.amount), 0)::bigint FROM ledger_transactions t
               JOIN ledger_postings p ON p.tx_id = t.id AND p.amount > 0
               WHERE t.meta ? 'goal' AND t.meta->>'goal' = $1 AND t.kind = 'tip'""",
            goal_id,
        )
        return int(value)

    def _hash_fields(self, row: Any, progress: int) -> list[Any]:
        escrow = escrow_account(ESCROW_KIND, row["id"]) if row["all_or_nothing"] else ""
        deadline = _ms(row["deadline_at"])
        return [
            "id",
            row["id"],
            "state",
            row["state"],
            "target",
            row["target"],
            "progress",
            progress,
            "title",
            row["title"],
            "room",
            row["room"],
            "aon",
            "1" if row["all_or_nothing"] else "0",
            "deadline",
            "" if deadline is None else deadline,
            "escrow",
            escrow,
            "escrow_key",
            self._keys.balance(escrow) if escrow else "",
        ]

    async def _redis_set(self, row: Any, progress: int) -> None:
        try:
            await self._state_script(
                keys=[self._keys.goal(row["room"])], args=["set", *self._hash_fields(row, progress)]
            )
        except _REDIS_ERRORS as exc:
            raise Unavailable("goals are unavailable") from exc

    async def _close_redis(self, row: Any) -> int:
        """The hash's goal leaves `active` (no tip counts or enters its
        escrow after this); returns its progress."""
        for _ in range(_LOAD_ATTEMPTS_MAX):
            try:
                result = await self._state_script(
                    keys=[self._keys.goal(row["room"])], args=["close", row["id"], row["state"]]
                )
            except _REDIS_ERRORS as exc:
                raise Unavailable("goals are unavailable") from exc
            if isinstance(result, list):
                return int(result[1])
            await self.load(row["room"])  # loads the state Postgres has now
        raise Unavailable("the goal could not be loaded")

    async def _reached_in_redis(self, row: Any) -> bool:
        try:
            found = await self._redis.hmget(self._keys.goal(row["room"]), ["id", "state"])  # type: ignore[misc]
        except _REDIS_ERRORS as exc:
            raise Unavailable("goals are unavailable") from exc
        return [_text(v) if v is not None else None for v in found] == [row["id"], "reached"]

    # --- closing ----------------------------------------------------------------------
    async def reached(self, goal_id: str) -> None:
        """A tip reached the goal's target (in Redis): close it in Postgres,
        then release an all-or-nothing goal's escrow to the model. The tip
        published the `reached` event. Idempotent."""
        if not GOAL_ID_RE.fullmatch(goal_id):
            return
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                row = await conn.fetchrow(
                    f"""UPDATE goals SET state = 'reached', closed_at = now(), outcome = 'release'
                        WHERE id = $1 AND state = 'active' RETURNING {_COLUMNS}""",
                    goal_id,
                )
                if row is not None:
                    await self._closing_deadlines(conn, row)
        except _DB_ERRORS as exc:
            raise Unavailable("goals are unavailable") from exc
        if row is not None:
            await self._settle_now(goal_id)

    async def expire(self, goal_id: str) -> None:
        """The deadline passed: a goal still active fails (its held tips go
        back), unless Redis saw it reached."""
        row = await self._fetch(goal_id)
        if row is None or row["state"] != "active":
            return
        if await self._reached_in_redis(row):
            await self.reached(goal_id)
            return
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                closed = await conn.fetchrow(
                    f"""UPDATE goals SET state = 'failed', closed_at = now(), outcome = 'refund'
                        WHERE id = $1 AND state = 'active' AND deadline_at <= now()
                        RETURNING {_COLUMNS}""",
                    goal_id,
                )
                if closed is not None:
                    await self._closing_deadlines(conn, closed)
        except _DB_ERRORS as exc:
            raise Unavailable("goals are unavailable") from exc
        if closed is None:
            return
        progress = await self._close_redis(closed)
        await self._settle_now(goal_id)
        await self._publish(closed["room"], wire(closed, progress))

    async def check_reached(self) -> None:
        """Every sweep: goals active in Postgres that a tip reached in Redis
        (the process that saw it died before closing it)."""
        try:
            rows = await self._pool.fetch(
                "SELECT id, room FROM goals WHERE state = 'active' ORDER BY id"
            )
        except _DB_ERRORS as exc:
            raise Unavailable("goals are unavailable") from exc
        if not rows:
            return
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for row in rows:
                    pipe.hmget(self._keys.goal(row["room"]), ["id", "state"])
                found = await pipe.execute()
        except _REDIS_ERRORS as exc:
            raise Unavailable("goals are unavailable") from exc
        for row, (goal_id, state) in zip(rows, found, strict=True):
            if goal_id is not None and _text(goal_id) == row["id"] and state == b"reached":
                await self.reached(row["id"])

    async def settle(self, goal_id: str) -> None:
        """Move a closed all-or-nothing goal's escrow the way its outcome
        says. Safe to run any number of times, from any process."""
        row = await self._fetch(goal_id)
        if row is None or row["state"] == "active" or row["settled_at"] is not None:
            return
        if row["all_or_nothing"]:
            # Redis first: no tip enters the escrow once this returns.
            await self._close_redis(row)
            escrow = escrow_account(ESCROW_KIND, goal_id)
            if row["outcome"] == "release":
                with contextlib.suppress(EscrowEmpty):  # released before, or no tip held
                    await self._economy.release(
                        escrow,
                        row["model"],
                        initiator=GOALS_INITIATOR,
                        key=release_key(goal_id),
                        meta={"goal": goal_id},
                    )
            else:
                await self._refund_all(goal_id, escrow)
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                await conn.execute(
                    "UPDATE goals SET settled_at = now() WHERE id = $1 AND settled_at IS NULL",
                    goal_id,
                )
                await deadlines.cancel(conn, goal_id, SETTLE)
        except _DB_ERRORS as exc:
            raise Unavailable("goals are unavailable") from exc

    async def _refund_all(self, goal_id: str, escrow: str) -> None:
        """Each fan's held tips back, read from the ledger once it holds
        exactly what the escrow holds."""
        held = await self._economy.escrow_balance(escrow)
        try:
            rows = await self._pool.fetch(
                """SELECT p.account_id AS account, -sum(p.amount)::bigint AS held
                   FROM ledger_transactions t JOIN ledger_postings p ON p.tx_id = t.id
                   WHERE t.meta ? 'goal' AND t.meta->>'goal' = $1
                     AND t.kind IN ('tip', 'escrow_refund') AND p.account_id LIKE 'u:%'
                   GROUP BY p.account_id HAVING sum(p.amount) <> 0 ORDER BY p.account_id""",
                goal_id,
            )
        except _DB_ERRORS as exc:
            raise Unavailable("the ledger is unavailable") from exc
        if sum(row["held"] for row in rows) != held:
            raise Unavailable(f"goal {goal_id}: the ledger is behind its escrow; settling later")
        for row in rows:
            fan = row["account"].removeprefix("u:")
            with contextlib.suppress(EscrowEmpty):
                await self._economy.goal_refund(
                    escrow,
                    fan,
                    row["held"],
                    initiator=GOALS_INITIATOR,
                    key=refund_key(goal_id, fan),
                    goal=goal_id,
                )

    async def _settle_now(self, goal_id: str) -> bool:
        """Settle at once; on failure the state stands and the deadline
        settles later. Whether it settled."""
        try:
            await self.settle(goal_id)
        except ServiceError as exc:
            log.warning("goal %s closed, not settled yet: %s", goal_id, exc.message)
            return False
        return True

    async def _closing_deadlines(self, conn: Any, row: Any) -> None:
        await deadlines.cancel(conn, row["id"], EXPIRE)
        grace = timedelta(seconds=self._settings.goal_settle_grace_s)
        await deadlines.schedule(conn, row["id"], SETTLE, row["closed_at"] + grace)

    # --- Postgres ---------------------------------------------------------------------
    async def _fetch(self, goal_id: str) -> Any:
        try:
            return await self._pool.fetchrow(f"SELECT {_COLUMNS} FROM goals WHERE id = $1", goal_id)
        except _DB_ERRORS as exc:
            raise Unavailable("goals are unavailable") from exc

    async def _current_row(self, room: str) -> Any:
        try:
            return await self._pool.fetchrow(
                f"""SELECT {_COLUMNS} FROM goals WHERE room = $1
                    ORDER BY created_at DESC, id LIMIT 1""",
                room,
            )
        except _DB_ERRORS as exc:
            raise Unavailable("goals are unavailable") from exc

    async def _publish(self, room: str, goal: dict[str, Any]) -> None:
        """A `goal` event to the room (and its history). Best effort after
        the commit: a lost event is seen in `join` and GET .../goal."""
        try:
            await self._post(room, events.goal_event(room, goal))
        except ServiceError as exc:
            log.warning("goal event of %s lost: %s", goal["id"], exc.message)


def _from_hash(fields: dict[bytes, bytes]) -> dict[str, Any] | None:
    def get(name: str) -> str:
        return fields.get(name.encode(), b"").decode()

    if not get("id") or get("state") == "deleted":
        return None
    deadline = get("deadline")
    return {
        "id": get("id"),
        "title": get("title"),
        "target": int(get("target")),
        "progress": int(get("progress")),
        "state": get("state"),
        "all_or_nothing": get("aon") == "1",
        "deadline": int(deadline) if deadline else None,
    }


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
