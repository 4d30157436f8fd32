"""Spending limits, self-exclusion and reality checks (issue #12 section 5).

A fan limits what she spends per calendar window in UTC (the day, the ISO
week from Monday, the month), excludes herself from spending and buying for
some days, and may ask for a ``reality_check`` event every N minutes.

Where each part lives:

- her settings: the ``spend_limits`` row (durable), cached in the Redis hash
  ``Keys.limits`` (loaded when a script finds it missing, replaced by a newer
  version when she changes it);
- what she spent per window: the hash ``Keys.spent``, advanced by the money
  scripts themselves (money_lib.lua: ``user_gate`` checks, ``transfer``
  counts) in the same atomic call as the spend, so that no two spends, on
  any node, together pass a limit. When Redis lacks it (never written since
  Redis lost its data, or dropped by a rebuild) it is summed from the ledger:
  every spend that advanced the lost hash lived in the same lost Redis, or
  reached Postgres before a rebuild let loads run again.

Lowering a limit applies at once; raising or removing one waits
``limit_raise_delay_s`` (a pending raise that the scripts apply themselves
when its time comes, without a sweeper). A self-exclusion only ever moves
later.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

import asyncpg
import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError

from ..config import Settings
from ..errors import SelfExcluded, Unavailable
from ..keys import Keys
from .actions import SPEND_KINDS
from .scripts import lua_script

if TYPE_CHECKING:
    from .economy import Economy

DAY_MS: Final = 86_400_000
# The windows, as money_lib.lua names them: hash field letter, wire name.
WINDOWS: Final = (("d", "daily"), ("w", "weekly"), ("m", "monthly"))
WINDOW_NAMES: Final = tuple(name for _, name in WINDOWS)
# The largest limit one may set: far above any real spend, inside bigint.
LIMIT_MAX: Final = 1_000_000_000_000
# The longest self-exclusion in days (ten years), and a reality check's
# longest period in minutes (a day).
EXCLUSION_DAYS_MAX: Final = 3650
REALITY_CHECK_MIN_MAX: Final = 1440
# The load script's tries when Redis is reset while it loads.
LOAD_ATTEMPTS_MAX: Final = 4

_DB_ERRORS = (asyncpg.PostgresError, OSError, asyncio.TimeoutError)
_REDIS_ERRORS = (RedisError, OSError)


def now_ms() -> int:
    return int(time.time() * 1000)


def windows(at_ms: int) -> list[tuple[str, str, int, int, int]]:
    """Each window at ``at_ms``: field letter, name, index (as money_lib.lua
    computes it), start and end (ms)."""
    day = at_ms // DAY_MS
    week = (day + 3) // 7  # 1970-01-01 was a Thursday: weeks start on Monday
    date = dt.date(1970, 1, 1) + dt.timedelta(days=day)
    first = date.replace(day=1)
    following = (first + dt.timedelta(days=32)).replace(day=1)
    epoch = dt.date(1970, 1, 1)
    return [
        ("d", "daily", day, day * DAY_MS, (day + 1) * DAY_MS),
        ("w", "weekly", week, (week * 7 - 3) * DAY_MS, (week * 7 + 4) * DAY_MS),
        (
            "m",
            "monthly",
            date.year * 12 + date.month - 1,
            (first - epoch).days * DAY_MS,
            (following - epoch).days * DAY_MS,
        ),
    ]


def _folded(row: Any, name: str, at_ms: int) -> tuple[int | None, Any]:
    """A window's limit in force at ``at_ms`` and its pending raise
    (``{"to", "at"}`` or None), a raise whose time has come applied."""
    if row is None:
        return None, None
    limit, to, at = row[name], row[f"{name}_next"], row[f"{name}_next_at"]
    if at is None:
        return limit, None
    if at <= at_ms:
        return to, None
    return limit, {"to": to, "at": at}


def _cache_fields(row: Any) -> list[Any]:
    """The limits hash's fields (without `v`) for a row: money_lib.lua's names."""
    fields: list[Any] = []
    if row is None:
        return fields
    for letter, name in WINDOWS:
        if row[name] is not None:
            fields += [letter, row[name]]
        if row[f"{name}_next_at"] is not None:
            to = row[f"{name}_next"]
            fields += [f"{letter}p", "" if to is None else to, f"{letter}a", row[f"{name}_next_at"]]
    if row["excluded_until"] is not None:
        fields += ["x", row["excluded_until"]]
    if row["reality_check_min"] is not None:
        fields += ["rc", row["reality_check_min"]]
    return fields


class SpendLimits:
    def __init__(
        self, redis: Redis, pool: asyncpg.Pool, keys: Keys, settings: Settings, economy: Economy
    ) -> None:
        self._redis = redis
        self._pool = pool
        self._keys = keys
        self._settings = settings
        self._economy = economy
        self._script = lua_script("limits_load", retry_safe=True)

    # --- Postgres ---------------------------------------------------------------------
    async def _row(self, user_id: str) -> Any:
        try:
            return await self._pool.fetchrow(
                "SELECT * FROM spend_limits WHERE user_id = $1", user_id
            )
        except _DB_ERRORS as exc:
            raise Unavailable("spending limits are unavailable; nothing was charged") from exc

    async def _spent_in_ledger(self, user_id: str, at_ms: int) -> list[Any]:
        """Her counters hash's fields, summed from the ledger at ``at_ms``."""
        spans = windows(at_ms)
        try:
            row = await self._pool.fetchrow(
                """SELECT coalesce(sum(-p.amount) FILTER (WHERE t.applied_ms >= $3), 0) AS d,
                          coalesce(sum(-p.amount) FILTER (WHERE t.applied_ms >= $4), 0) AS w,
                          coalesce(sum(-p.amount) FILTER (WHERE t.applied_ms >= $5), 0) AS m,
                          coalesce(sum(-p.amount), 0) AS t
                   FROM ledger_postings p JOIN ledger_transactions t ON t.id = p.tx_id
                   WHERE p.account_id = $1 AND p.amount < 0 AND t.kind = ANY($2)""",
                f"u:{user_id}",
                sorted(SPEND_KINDS),
                spans[0][3],
                spans[1][3],
                spans[2][3],
            )
        except _DB_ERRORS as exc:
            raise Unavailable("the ledger is unavailable; nothing was charged") from exc
        assert row is not None  # an aggregate always has a row
        fields: list[Any] = ["t", int(row["t"])]
        for letter, _, index, _, _ in spans:
            fields += [f"{letter}n", index, f"{letter}s", int(row[letter])]
        return fields

    # --- Redis ------------------------------------------------------------------------
    async def load(self, user_id: str, *, counters: bool = True) -> None:
        """Her limits and (``counters``) her counters into Redis, each only
        if absent, behind the epoch fence (limits_load.lua). Without
        counters it is one primary-key read: what a session's reality
        checks need at every hello."""
        for _ in range(LOAD_ATTEMPTS_MAX):
            epoch = await self._economy.epoch()
            row = await self._row(user_id)
            spent = await self._spent_in_ledger(user_id, now_ms()) if counters else None
            result = await self._run(
                user_id,
                [
                    "load",
                    epoch,
                    0 if row is None else row["version"],
                    orjson.dumps(_cache_fields(row)),
                    "" if spent is None else orjson.dumps(spent),
                ],
            )
            if result in ("OK", "KEPT"):
                return
        raise Unavailable("Redis keeps being reset; try again")

    async def _run(self, user_id: str, args: list[Any]) -> str:
        keys = [self._keys.epoch(), self._keys.limits(user_id), self._keys.spent(user_id)]
        result = await self._economy._call(self._script, keys, args)
        return result.decode() if isinstance(result, bytes) else str(result)

    async def _cached(self, user_id: str, *fields: str) -> tuple[list[Any], list[Any]]:
        """Fields of her limits hash and of her counters hash (loaded first
        when missing); each list starts with `v` / `t`."""
        lim_fields, spent_fields = ["v", *fields], ["t", "dn", "ds", "wn", "ws", "mn", "ms"]
        for _ in range(LOAD_ATTEMPTS_MAX):
            try:
                async with self._redis.pipeline(transaction=True) as pipe:
                    pipe.hmget(self._keys.limits(user_id), lim_fields)
                    pipe.hmget(self._keys.spent(user_id), spent_fields)
                    limits, spent = await pipe.execute()
            except _REDIS_ERRORS as exc:
                raise Unavailable("spending limits are unavailable") from exc
            if limits[0] is not None and spent[0] is not None:
                return limits, spent
            await self.load(user_id)
        raise Unavailable("spending limits could not be loaded")

    async def _publish(self, user_id: str, row: Any) -> None:
        """Her changed row into the cache (dropped if it cannot be written,
        so that the next spend loads it from Postgres)."""
        try:
            fields = orjson.dumps(_cache_fields(row))
            await self._run(user_id, ["set", "", row["version"], fields, ""])
        except Unavailable:
            with contextlib.suppress(*_REDIS_ERRORS):
                await self._redis.delete(self._keys.limits(user_id))
            raise Unavailable("saved; spends will obey it once Redis is back") from None

    # --- the API ------------------------------------------------------------------------
    async def view(self, user_id: str) -> dict[str, Any]:
        """GET /v1/me/limits: limits in force, pending raises, spent and
        remaining per window, self-exclusion, reality check."""
        row = await self._row(user_id)
        _, spent = await self._cached(user_id)
        at = now_ms()
        limits: dict[str, Any] = {}
        pending: dict[str, Any] = {}
        windows_out: dict[str, Any] = {}
        for n, (_, name, index, _, resets_at) in enumerate(windows(at)):
            limit, raise_ = _folded(row, name, at)
            limits[name] = limit
            if raise_ is not None:
                pending[name] = raise_
            used = (
                int(spent[2 + 2 * n])
                if spent[1 + 2 * n] is not None and int(spent[1 + 2 * n]) == index
                else 0
            )
            windows_out[name] = {
                "limit": limit,
                "spent": used,
                "remaining": None if limit is None else max(limit - used, 0),
                "resets_at": resets_at,
            }
        excluded = None if row is None else row["excluded_until"]
        return {
            "limits": limits,
            "pending": pending,
            "windows": windows_out,
            "excluded_until": excluded if excluded is not None and excluded > at else None,
            "reality_check_min": None if row is None else row["reality_check_min"],
            "raise_delay_s": self._settings.limit_raise_delay_s,
        }

    async def set(self, user_id: str, changes: Mapping[str, int | None]) -> dict[str, Any]:
        """Apply ``changes`` (window names and/or ``reality_check_min``; None:
        none). A lower limit applies now; a higher one (or none) after the
        raise delay, replacing any raise pending for that window."""
        at = now_ms()
        delay_ms = int(self._settings.limit_raise_delay_s * 1000)
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                await conn.execute(
                    "INSERT INTO spend_limits (user_id) VALUES ($1) ON CONFLICT DO NOTHING",
                    user_id,
                )
                row: Any = await conn.fetchrow(
                    "SELECT * FROM spend_limits WHERE user_id = $1 FOR UPDATE", user_id
                )
                values: list[Any] = []
                for name in WINDOW_NAMES:
                    limit, raise_ = _folded(row, name, at)
                    if name in changes:
                        new = changes[name]
                        if new is not None and (limit is None or new <= limit):
                            limit, raise_ = new, None  # lower (or the same): at once
                        elif new is None and limit is None:
                            raise_ = None
                        else:
                            raise_ = {"to": new, "at": at + delay_ms}
                    values += [
                        limit,
                        None if raise_ is None else raise_["to"],
                        None if raise_ is None else raise_["at"],
                    ]
                check = (
                    changes["reality_check_min"]
                    if "reality_check_min" in changes
                    else row["reality_check_min"]
                )
                row = await conn.fetchrow(
                    """UPDATE spend_limits SET
                           daily = $2, daily_next = $3, daily_next_at = $4,
                           weekly = $5, weekly_next = $6, weekly_next_at = $7,
                           monthly = $8, monthly_next = $9, monthly_next_at = $10,
                           reality_check_min = $11, version = version + 1, updated_at = now()
                       WHERE user_id = $1 RETURNING *""",
                    user_id,
                    *values,
                    check,
                )
        except _DB_ERRORS as exc:
            raise Unavailable("spending limits are unavailable; nothing was changed") from exc
        assert row is not None
        await self._publish(user_id, row)
        return await self.view(user_id)

    async def exclude(self, user_id: str, days: int) -> dict[str, Any]:
        """Self-exclusion for ``days`` from now; never shortens one running."""
        until = now_ms() + int(days * self._settings.self_exclusion_day_s * 1000)
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                row = await conn.fetchrow(
                    """INSERT INTO spend_limits (user_id, excluded_until) VALUES ($1, $2)
                       ON CONFLICT (user_id) DO UPDATE SET
                           excluded_until = greatest(spend_limits.excluded_until, $2),
                           version = spend_limits.version + 1, updated_at = now()
                       RETURNING *""",
                    user_id,
                    until,
                )
        except _DB_ERRORS as exc:
            raise Unavailable("self-exclusion is unavailable; nothing was changed") from exc
        assert row is not None
        await self._publish(user_id, row)
        return {"excluded_until": row["excluded_until"]}

    async def check_purchase(self, user_id: str) -> None:
        """SelfExcluded while her self-exclusion runs: before a payment is
        taken (credit.lua refuses the credit too)."""
        row = await self._row(user_id)
        until = None if row is None else row["excluded_until"]
        if until is not None and until > now_ms():
            raise SelfExcluded(
                "you excluded yourself from buying until then; nothing was charged",
                until=int(until),
            )

    async def spendable(self, user_id: str) -> int:
        """What she may spend now: her balance, within every window's
        remaining tokens; 0 while excluded (a private show ends there)."""
        balance = await self._economy.balance(user_id)
        view = await self.view(user_id)
        if view["excluded_until"] is not None:
            return 0
        left: list[int] = [
            w["remaining"] for w in view["windows"].values() if w["remaining"] is not None
        ]
        return min([balance, *left])

    async def cached(self, user_id: str, *fields: str) -> tuple[list[Any], list[Any]]:
        """``fields`` of her limits hash after `v`, and her counters (`t`
        first), loaded when missing (a batch of hellos: Economy.hello_state):
        at hello, as her balance is, so that her spends need no Postgres (a
        spend on a full connection pool still goes through)."""
        return await self._cached(user_id, *fields)

    async def spent_total(self, user_id: str) -> int:
        """Tokens she has spent in all (the counters' `t`)."""
        _, spent = await self._cached(user_id)
        return int(spent[0])

    async def reality_check_min(self, user_id: str) -> int | None:
        """Her reality-check period (minutes), None: off. Reads her limits
        hash alone (loading only the row), so a session of a fan who never
        asked for reality checks never sums her ledger."""
        key = self._keys.limits(user_id)
        for _ in range(LOAD_ATTEMPTS_MAX):
            try:
                version, minutes = await self._redis.hmget(key, ["v", "rc"])
            except _REDIS_ERRORS as exc:
                raise Unavailable("spending limits are unavailable") from exc
            if version is not None:
                return None if minutes is None else int(minutes)
            await self.load(user_id, counters=False)
        raise Unavailable("spending limits could not be loaded")
