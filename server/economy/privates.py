"""Private shows billed per minute: a fan's request, the model's answer, the
meter, and the end, on the escrow foundation of custom requests.

States (the row in ``private_shows``, migration 0011)::

    requested --accept (model)--> accepted --minimum held--> running --> ended
        |  +--decline (model)--> declined                        ^
        |  +--accept timeout---> expired                         |
        +--private_end (fan)--> ended (cancelled)      end, zero balance,
                                                        disconnect grace

Money (docs/economy.md, "Private shows"), charged so far = floor(rate x
billable seconds / 60):

- At the start the minimum, floor(rate x min_s / 60), is held in the show's
  escrow ``esc:private:<id>`` (initiator ``sys:private``, key
  ``start:<id>``). Accept is state first (``accepted``, with a
  ``private.start`` deadline), then the hold, then ``running``: a crash
  between them is finished by the sweeper, and one accepted show per model
  (a unique index) means one running show per model.
- Every ``private_tick_s`` billable seconds, tick ``n`` charges
  C(n x P) - C((n-1) x P) by the ``meter`` script (escrow first, then the
  fan; key ``meter:<id>:<n>``). The amount depends only on the show and n, so
  a tick replayed after a crash, by this node or another, is the same call
  and a duplicate: no period is charged twice, and none is skipped (the row's
  ``ticks`` says which comes next).
- The meter runs in the node holding the show's Redis lease
  (``Keys.private_lease``; ``lua/lease.lua``). Each tick runs under the row's
  lock (SELECT ... FOR UPDATE), so a tick and an end never interleave, and
  the row's update commits after the money: a crash between them rolls the
  row back and the next tick replays the money as a duplicate.
- The end is state first: ``ended`` with the billable seconds then
  (``end_s``) and a ``private.settle`` deadline; then settling charges the
  whole periods the row has not counted under their own tick keys (a tick
  whose money landed but whose row update did not is a duplicate there),
  and the last part period, C(end_s) - C(n x P) (key ``meter:<id>:final``), and
  empties the escrow: to the model when the fan ended (or dropped) before
  the minimum (she forfeits it), else back to the fan (key ``settle:<id>``).
  A crash anywhere leaves the deadline, and settling again is duplicates or
  an empty escrow.
- Billing pauses while either side is away (disconnected, within the
  grace): billable seconds are wall-clock seconds since the start less the
  pauses, all read from Postgres's clock, so a node taking the show over
  bills from the same clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from datetime import datetime, timedelta
from typing import Any

import asyncpg
import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError

from tokenchat.protocol import events
from tokenchat.protocol.limits import PRIVATE_ID_RE, PRIVATE_ROOM_PREFIX

from ..aio import pause, raise_if_cancelling, reraise_if_cancelled
from ..catalog.directory import RoomInfo
from ..config import Settings
from ..errors import (
    Conflict,
    EscrowEmpty,
    Forbidden,
    InsufficientFunds,
    NotFound,
    PriceChanged,
    ServiceError,
    Unavailable,
)
from ..keys import Keys
from . import deadlines
from .economy import Economy, escrow_account, fingerprint
from .scripts import script_source

log = logging.getLogger(__name__)

PRIVATE_INITIATOR = "sys:private"
ESCROW_KIND = "private"
EXPIRE = "private.expire"  # a request not answered in time
START = "private.start"  # an accepted show whose minimum is not held yet
GRACE = "private.grace"  # a side away for longer than the grace
SETTLE = "private.settle"  # an ended show whose money has not moved yet
OPEN = ("requested", "accepted", "running")
# The fan is warned when less than this much of her balance is left.
LOW_BALANCE_S = 60  # seconds: the "less than one minute"
# Periods one meter pass charges for one show: a node that took a show over
# after a long outage catches up over a few passes rather than holding the
# row's lock for the whole backlog.
TICKS_PER_PASS_MAX = 100
# Running shows one meter pass looks at: one per model, so this bounds the
# pass's query, not the product (a larger deployment runs more nodes).
RUNNING_SCANNED_MAX = 10_000
# GET /v1/me/privates and `private_list`: the newest this many.
LISTED_MAX = 100

# InterfaceError too: a connection that Postgres closed mid-transaction (its
# process restarting) fails the transaction's exit with it, and the pause
# and resume hooks run as fire-and-forget tasks that must not die of it.
_DB_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, asyncio.TimeoutError)
_COLUMNS = """id, fan, model, rate, min_s, state, held, ticks, end_reason, end_s, charged,
              created_at, expires_at, started_at, settled_at"""
# Billable seconds now: since the start, less the pauses (the current one
# counts up to its start). clock_timestamp(), not now(): a transaction that
# waited for the row's lock must not bill from when it began.
_BILLABLE = """floor(greatest(0, extract(epoch FROM
                 coalesce(paused_since, clock_timestamp()) - started_at) - paused_s))::int"""


def new_show_id() -> str:
    return "p_" + secrets.token_hex(12)


def room_of(show: str) -> str:
    return PRIVATE_ROOM_PREFIX + show


def charged_for(rate: int, seconds: int) -> int:
    """What ``seconds`` of a show at ``rate`` tokens a minute cost: exact to
    the second, rounded down once over the whole show (never per period)."""
    return rate * seconds // 60


def _ms(value: datetime | None) -> int | None:
    return None if value is None else int(value.timestamp() * 1000)


def wire(row: Any, tick_s: int) -> dict[str, Any]:
    """A show as clients see it (listed, and in `private` events)."""
    ended = row["end_s"] is not None
    seconds = row["end_s"] if ended else row["ticks"] * tick_s
    item: dict[str, Any] = {
        "show": row["id"],
        "fan": row["fan"],
        "model": row["model"],
        "rate": row["rate"],
        "min_s": row["min_s"],
        "state": row["state"],
        "seconds": seconds,
        "charged": row["charged"],
        "expires_ms": _ms(row["expires_at"]),
        "created_ms": _ms(row["created_at"]),
        # When its money was settled (null until then): the final figures.
        "settled_ms": _ms(row["settled_at"]),
    }
    if row["state"] in ("accepted", "running"):
        item["room"] = room_of(row["id"])
    if row["end_reason"] is not None:
        item["reason"] = row["end_reason"]
    return item


class Privates:
    """The private-show workflow: commands, the meter, the sweeper's handlers."""

    def __init__(
        self, pool: asyncpg.Pool, redis: Redis, keys: Keys, settings: Settings, economy: Economy
    ) -> None:
        self._pool = pool
        self._redis = redis
        self._keys = keys
        self._settings = settings
        self._economy = economy
        self._tick_s = settings.private_tick_s
        self._user_event = redis.register_script(script_source("user_event"))
        self._lease = redis.register_script(script_source("lease"))
        self._token = secrets.token_hex(16)
        # Shows whose lease this process held at its last meter pass.
        self.driving: set[str] = set()

    def register(self, sweeper: deadlines.Sweeper) -> None:
        sweeper.handle(EXPIRE, self.expire)
        sweeper.handle(START, self.start)
        sweeper.handle(GRACE, self.grace)
        sweeper.handle(SETTLE, self.settle)

    # --- prices ----------------------------------------------------------------------
    async def set_prices(self, model: str, rate: int | None, min_s: int | None) -> dict[str, int]:
        try:
            row = await self._pool.fetchrow(
                """INSERT INTO private_prices (model_id, rate, min_s)
                   VALUES ($1, coalesce($2, 0), coalesce($3, 0))
                   ON CONFLICT (model_id) DO UPDATE
                     SET rate = coalesce($2, private_prices.rate),
                         min_s = coalesce($3, private_prices.min_s), updated_at = now()
                   RETURNING rate, min_s""",
                model,
                rate,
                min_s,
            )
        except _DB_ERRORS as exc:
            raise Unavailable("prices are unavailable") from exc
        assert row is not None
        return {"private_rate": row["rate"], "private_min_s": row["min_s"]}

    async def prices(self, model: str) -> dict[str, int]:
        try:
            row = await self._pool.fetchrow(
                "SELECT rate, min_s FROM private_prices WHERE model_id = $1", model
            )
        except _DB_ERRORS as exc:
            raise Unavailable("prices are unavailable") from exc
        if row is None:
            return {"private_rate": 0, "private_min_s": 0}
        return {"private_rate": row["rate"], "private_min_s": row["min_s"]}

    # --- the fan ---------------------------------------------------------------------
    async def request(self, fan: str, model: str, rate: int, key: str) -> dict[str, Any]:
        """A requested show (nothing charged). Idempotent on the fan's
        ``key``: the same key with the same model and rate answers the
        original show; with other fields, CONFLICT."""
        if fan == model:
            raise Forbidden("you cannot ask yourself for a private show")
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                prior = await conn.fetchrow(
                    """SELECT id, model, agreed_rate, rate, state FROM private_shows
                       WHERE fan = $1 AND request_key = $2""",
                    fan,
                    key,
                )
                if prior is not None:
                    if (prior["model"], prior["agreed_rate"]) != (model, rate):
                        raise Conflict("this key was used with other fields; nothing was asked")
                    return {
                        "show": prior["id"],
                        "state": prior["state"],
                        "rate": prior["rate"],
                        "duplicate": True,
                    }
                role = await conn.fetchval("SELECT role FROM users WHERE id = $1", model)
                if role != "model":
                    raise NotFound(f"no model '{model}'")
                price = await conn.fetchrow(
                    "SELECT rate, min_s FROM private_prices WHERE model_id = $1", model
                )
                if price is None or price["rate"] == 0:
                    raise Forbidden(f"'{model}' does not take private shows")
                if price["rate"] > rate:
                    raise PriceChanged(f"the rate is now {price['rate']} tokens a minute")
                row = await conn.fetchrow(
                    f"""INSERT INTO private_shows (id, fan, model, request_key, agreed_rate,
                                                   rate, min_s, state, expires_at)
                        VALUES ($1, $2, $3, $4, $5, $6, $7, 'requested',
                                now() + $8::float8 * interval '1 second')
                        RETURNING {_COLUMNS}""",
                    new_show_id(),
                    fan,
                    model,
                    key,
                    rate,
                    price["rate"],
                    price["min_s"],
                    self._settings.private_accept_timeout_s,
                )
                assert row is not None  # INSERT ... RETURNING
                await deadlines.schedule(conn, row["id"], EXPIRE, row["expires_at"])
        except asyncpg.UniqueViolationError as exc:  # the same key, concurrently
            raise Conflict("this key is in use by a request being made; retry") from exc
        except _DB_ERRORS as exc:
            raise Unavailable("private shows are unavailable; nothing was asked") from exc
        await self._publish(row)
        return {"show": row["id"], "state": "requested", "rate": row["rate"]}

    # --- the model -------------------------------------------------------------------
    async def accept(self, model: str, show: str) -> dict[str, Any]:
        """State first (accepted, with a start deadline), then the hold."""
        self._check_id(show)
        grace = timedelta(seconds=self._settings.private_settle_grace_s)
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                row = await conn.fetchrow(
                    f"""UPDATE private_shows SET state = 'accepted', expires_at = NULL
                        WHERE id = $1 AND model = $2 AND state = 'requested'
                          AND expires_at > now()
                        RETURNING {_COLUMNS}""",
                    show,
                    model,
                )
                if row is not None:
                    await deadlines.cancel(conn, show, EXPIRE)
                    due = await conn.fetchval("SELECT now()") + grace
                    await deadlines.schedule(conn, show, START, due)
        except asyncpg.UniqueViolationError as exc:
            raise Conflict("you are in a private show already: end it first") from exc
        except _DB_ERRORS as exc:
            raise Unavailable("private shows are unavailable; nothing changed") from exc
        if row is None:
            return await self._refused(show, model, "model", "accepted")
        await self._publish(row)
        try:
            await self.start(show)
        except ServiceError as exc:
            log.warning("show %s accepted, not started yet: %s", show, exc.message)
            return {"show": show, "state": "accepted"}
        row = await self._fetch(show)
        return {"show": show, "state": row["state"], "room": room_of(show)}

    async def decline(self, model: str, show: str) -> dict[str, Any]:
        self._check_id(show)
        row = await self._close_request(show, model, "model", "declined", None)
        if row is None:
            return await self._refused(show, model, "model", "declined")
        await self._publish(row)
        return {"show": show, "state": "declined"}

    # --- either side -----------------------------------------------------------------
    async def end(self, user: str, show: str) -> dict[str, Any]:
        self._check_id(show)
        row = await self._fetch(show)
        if row is None or user not in (row["fan"], row["model"]):
            raise NotFound(f"no show '{show}'")
        side = "fan" if user == row["fan"] else "model"
        if row["state"] == "requested" and side == "fan":
            closed = await self._close_request(show, user, "fan", "ended", "cancelled")
            if closed is not None:
                await self._publish(closed)
                return {"show": show, "state": "ended", "reason": "cancelled", "charged": 0}
            row = await self._fetch(show)
        if row["state"] in ("requested", "declined", "expired"):
            if row["state"] == "requested":
                raise Conflict("decline a request you do not want")
            raise Conflict(f"show '{show}' is {row['state']}")
        if row["state"] == "ended":
            return {**self._ended_reply(row), "duplicate": True}
        ended = await self._end(show, side, None)
        if ended is None:  # ended meanwhile by the other side or the meter
            row = await self._fetch(show)
            return {**self._ended_reply(row), "duplicate": True}
        return self._ended_reply(await self._settle_now(show) or ended)

    def _ended_reply(self, row: Any) -> dict[str, Any]:
        return {
            "show": row["id"],
            "state": row["state"],
            "reason": row["end_reason"],
            "seconds": row["end_s"],
            "charged": row["charged"],
            "settled": row["settled_at"] is not None,
        }

    # --- reading ---------------------------------------------------------------------
    async def list_for(self, user: str) -> list[dict[str, Any]]:
        try:
            rows = await self._pool.fetch(
                f"""(SELECT {_COLUMNS} FROM private_shows WHERE fan = $1
                     ORDER BY created_at DESC LIMIT $2)
                    UNION ALL
                    (SELECT {_COLUMNS} FROM private_shows WHERE model = $1
                     ORDER BY created_at DESC LIMIT $2)
                    ORDER BY created_at DESC, id""",
                user,
                LISTED_MAX,
            )
        except _DB_ERRORS as exc:
            raise Unavailable("private shows are unavailable") from exc
        return [wire(row, self._tick_s) for row in rows]

    async def room(self, room: str, user: str) -> RoomInfo:
        """The private room of a running show, for its fan and its model only
        (anyone else, and any other id: NOT_FOUND)."""
        show = room[len(PRIVATE_ROOM_PREFIX) :]
        row = await self._fetch(show) if PRIVATE_ID_RE.fullmatch(show) else None
        if row is None or user not in (row["fan"], row["model"]) or row["state"] != "running":
            raise NotFound(f"no room '{room}'")
        return RoomInfo(id=room, owner=row["model"], tip_min=0)

    # --- connection and disconnection ------------------------------------------------
    async def away(self, user: str) -> None:
        """The user's last session here closed: billing of their running show
        pauses, and the grace deadline starts. One statement (no explicit
        transaction): it runs as a fire-and-forget task when a session
        closes, possibly as Postgres goes away, and must leave nothing open."""
        try:
            await self._pool.execute(
                """WITH paused AS (
                     UPDATE private_shows SET
                       fan_away_at = CASE WHEN fan = $1
                         THEN coalesce(fan_away_at, clock_timestamp()) ELSE fan_away_at END,
                       model_away_at = CASE WHEN model = $1
                         THEN coalesce(model_away_at, clock_timestamp()) ELSE model_away_at END,
                       paused_since = coalesce(paused_since, clock_timestamp())
                     WHERE (fan = $1 OR model = $1) AND state = 'running'
                     RETURNING id, paused_since)
                   INSERT INTO deadlines (subject, action, due_at)
                   SELECT id, $2, paused_since + $3::float8 * interval '1 second' FROM paused
                   ON CONFLICT (subject, action) DO UPDATE SET due_at = excluded.due_at,
                                                              attempts = 0""",
                user,
                GRACE,
                self._settings.private_grace_s,
            )
        except _DB_ERRORS as exc:
            log.warning("could not pause the shows of %s: %s", user, exc)

    async def back_many(self, users: list[str]) -> None:
        """The users are connected again (a batch of hellos): their side is
        back; billing resumes (the pause added to ``paused_s``) when neither
        side is away. One statement for all of them, as ``away``.
        A show whose fan and model both came back in this batch matches
        twice, and an UPDATE changes a row once: the second pass picks up
        the other side (a show has two), so the common case (no private
        show running) costs one statement that changes nothing."""
        users = sorted(set(users))
        try:
            for _ in range(2):
                resumed = await self._pool.fetchval(
                    """WITH back AS (
                         SELECT DISTINCT ON (s.id) s.id AS show, u.id AS user_id
                         FROM unnest($1::text[]) AS u(id)
                         JOIN private_shows s ON (s.fan = u.id OR s.model = u.id)
                         WHERE s.state = 'running'
                           AND (CASE WHEN s.fan = u.id THEN s.fan_away_at ELSE s.model_away_at END)
                               IS NOT NULL
                         ORDER BY s.id, u.id),
                       resumed AS (
                         UPDATE private_shows p SET
                           fan_away_at = CASE WHEN p.fan = b.user_id
                             THEN NULL ELSE p.fan_away_at END,
                           model_away_at = CASE WHEN p.model = b.user_id
                             THEN NULL ELSE p.model_away_at END,
                           paused_s = p.paused_s + CASE
                             WHEN (CASE WHEN p.fan = b.user_id
                                   THEN p.model_away_at ELSE p.fan_away_at END) IS NULL
                             THEN extract(epoch FROM clock_timestamp() - p.paused_since) ELSE 0 END,
                           paused_since = CASE
                             WHEN (CASE WHEN p.fan = b.user_id
                                   THEN p.model_away_at ELSE p.fan_away_at END) IS NULL
                             THEN NULL ELSE p.paused_since END
                         FROM back b WHERE p.id = b.show
                         RETURNING p.id, p.paused_since),
                       cleared AS (
                         DELETE FROM deadlines d USING resumed r
                         WHERE d.subject = r.id AND d.action = $2 AND r.paused_since IS NULL)
                       SELECT count(*) FROM resumed""",
                    users,
                    GRACE,
                )
                if not resumed:
                    return
        except _DB_ERRORS as exc:
            log.warning("could not resume the shows of %d users: %s", len(users), exc)

    # --- the meter -------------------------------------------------------------------
    async def run_meter(self) -> None:
        """Every ``private_meter_interval_s``: take or renew the lease of each
        running show; bill the shows whose lease this process holds."""
        try:
            while True:
                try:
                    await self.meter_once()
                except Exception as exc:  # a backend away: the next pass tries again
                    reraise_if_cancelled(exc)
                    log.warning("meter pass failed: %s", exc)
                await pause(self._settings.private_meter_interval_s)
        finally:
            await self._give_up_leases()

    async def meter_once(self) -> None:
        try:
            shows = [
                row["id"]
                for row in await self._pool.fetch(
                    "SELECT id FROM private_shows WHERE state = 'running' LIMIT $1",
                    RUNNING_SCANNED_MAX,
                )
            ]
        except _DB_ERRORS as exc:
            log.warning("running shows unreadable: %s", exc)
            return
        ttl_ms = int(self._settings.private_lease_ttl_s * 1000)
        self.driving &= set(shows)
        # Shows are billed private_meter_concurrency at a time: each tick
        # waits on Postgres and Redis in turn, and one after another a node
        # could not keep up with a few hundred shows.
        slots = asyncio.Semaphore(self._settings.private_meter_concurrency)

        async def bill(show: str) -> None:
            async with slots:
                held = await self._lease(
                    keys=[self._keys.private_lease(show)], args=[self._token, ttl_ms]
                )
                if not held:
                    self.driving.discard(show)
                    return
                self.driving.add(show)
                try:
                    await self.tick(show)
                except ServiceError as exc:
                    log.warning("show %s not billed this pass: %s", show, exc.message)

        results = await asyncio.gather(*(bill(show) for show in shows), return_exceptions=True)
        raise_if_cancelling()
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:  # a backend away: the pass logs it, the next one tries again
            raise failures[0]

    async def tick(self, show: str) -> int:
        """Charge every period of the show that is due; returns how many.
        Under the row's lock; the row's update commits after the money."""
        done = 0
        ended: Any = None
        warn: dict[str, Any] | None = None
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                row = await conn.fetchrow(
                    f"""SELECT {_COLUMNS}, low_warned, {_BILLABLE} AS billable
                        FROM private_shows WHERE id = $1 AND state = 'running' FOR UPDATE""",
                    show,
                )
                if row is None:
                    return 0
                rate, period = int(row["rate"]), self._tick_s
                ticks, charged = int(row["ticks"]), int(row["charged"])
                reply: dict[str, Any] | None = None
                while (ticks + 1) * period <= row["billable"] and done < TICKS_PER_PASS_MAX:
                    n = ticks + 1
                    try:
                        amount, paid = await self._charge_tick(row, n)
                    except InsufficientFunds:
                        # The balance runs out within this period: the show
                        # ends at the last second it covers.
                        end_s = await self._affordable_end(row, ticks * period, n * period)
                        ended = await self._end_in(conn, show, "balance", end_s)
                        break
                    reply = paid or reply
                    ticks, charged, done = n, charged + amount, done + 1
                if done:
                    low = False
                    if reply is not None:
                        left = int(reply["balance"]) + int(reply["escrow"])
                        seconds_left = left * 60 // rate
                        low = seconds_left < LOW_BALANCE_S
                        if low and not row["low_warned"]:
                            warn = {"warning": "low_balance", "seconds_left": seconds_left}
                    row = await conn.fetchrow(
                        f"""UPDATE private_shows SET ticks = $2, charged = $3,
                               low_warned = low_warned OR $4
                            WHERE id = $1 RETURNING {_COLUMNS}""",
                        show,
                        ticks,
                        charged,
                        low,
                    )
        except _DB_ERRORS as exc:
            raise Unavailable("private shows are unavailable") from exc
        if ended is not None:
            await self._publish(ended)
            await self._settle_now(show)
        elif done:
            await self._publish(row, fan_extra=warn)
        return done

    async def _charge_tick(self, row: Any, n: int) -> tuple[int, dict[str, Any] | None]:
        """Charge period ``n`` of the show under its own key (a duplicate
        when it was charged before, by a tick or a settle): its amount, and
        the meter's reply (None when the period costs nothing).
        InsufficientFunds when the fan cannot pay it."""
        rate, period = int(row["rate"]), self._tick_s
        amount = charged_for(rate, n * period) - charged_for(rate, (n - 1) * period)
        if amount == 0:
            return 0, None
        return amount, await self._meter(row, amount, f"meter:{row['id']}:{n}")

    async def _meter(self, row: Any, amount: int, key: str) -> dict[str, Any]:
        show = row["id"]
        return await self._economy.meter(
            row["fan"],
            escrow_account(ESCROW_KIND, show),
            row["model"],
            amount,
            initiator=PRIVATE_INITIATOR,
            key=key,
            request=fingerprint("meter", show=show, key=key, amount=amount),
            meta={"show": show},
        )

    async def _affordable_end(self, row: Any, low_s: int, high_s: int) -> int:
        """The last second in [low_s, high_s] that escrow and fan can pay
        for, counting from low_s (what the ticks charged already)."""
        # What she may spend: her balance within her spending limits (a
        # limit reached or a self-exclusion ends the show as an empty
        # balance does: SpendLimit and SelfExcluded are InsufficientFunds).
        fan_balance = await self._economy.limits.spendable(row["fan"])
        escrow = await self._economy.escrow_balance(escrow_account(ESCROW_KIND, row["id"]))
        available = fan_balance + escrow
        rate, paid = int(row["rate"]), charged_for(int(row["rate"]), low_s)
        end_s = low_s
        while end_s < high_s and charged_for(rate, end_s + 1) - paid <= available:
            end_s += 1
        return end_s

    async def _give_up_leases(self) -> None:
        for show in list(self.driving):
            with contextlib.suppress(RedisError, OSError):
                await self._lease(keys=[self._keys.private_lease(show)], args=[self._token, 0])
        self.driving.clear()

    # --- the sweeper's handlers ------------------------------------------------------
    async def expire(self, show: str) -> None:
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                row = await conn.fetchrow(
                    f"""UPDATE private_shows SET state = 'expired', expires_at = NULL
                        WHERE id = $1 AND state = 'requested' AND expires_at <= now()
                        RETURNING {_COLUMNS}""",
                    show,
                )
        except _DB_ERRORS as exc:
            raise Unavailable("private shows are unavailable") from exc
        if row is not None:
            await self._publish(row)

    async def start(self, show: str) -> None:
        """Hold the minimum of an accepted show and set it running; a fan
        who cannot pay the minimum ends it (nothing charged). Idempotent:
        the hold's key is the show's."""
        row = await self._fetch(show)
        if row is None or row["state"] != "accepted":
            await self._drop_deadline(show, START)
            return
        minimum = charged_for(int(row["rate"]), int(row["min_s"]))
        tx: str | None = None
        if minimum > 0:
            try:
                reply = await self._economy.hold(
                    row["fan"],
                    escrow_account(ESCROW_KIND, show),
                    minimum,
                    subject=show,
                    key=f"start:{show}",
                    request=fingerprint("private_start", show=show, amount=minimum),
                    meta={"show": show},
                    initiator=PRIVATE_INITIATOR,
                )
                tx = str(reply["tx"])
            except InsufficientFunds:
                ended = await self._set_state(
                    show,
                    """state = 'ended', end_reason = 'no_funds', end_s = 0,
                       ended_at = now(), settled_at = now()""",
                    "accepted",
                )
                await self._drop_deadline(show, START)
                if ended is not None:
                    await self._publish(ended)
                return
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                started = await conn.fetchrow(
                    f"""UPDATE private_shows SET state = 'running', hold_tx = $2, held = $3,
                           started_at = clock_timestamp()
                        WHERE id = $1 AND state = 'accepted' RETURNING {_COLUMNS}""",
                    show,
                    tx,
                    minimum,
                )
                await deadlines.cancel(conn, show, START)
        except _DB_ERRORS as exc:
            raise Unavailable("private shows are unavailable") from exc
        if started is not None:
            await self._publish(started)

    async def grace(self, show: str) -> None:
        """A side away for longer than the grace ends the show (billed up to
        when it left: billing was paused since)."""
        row = await self._pool.fetchrow(
            """SELECT state, fan_away_at, model_away_at, now() AS now
               FROM private_shows WHERE id = $1""",
            show,
        )
        if row is None or row["state"] != "running":
            return
        grace = timedelta(seconds=self._settings.private_grace_s)
        gone = [
            (at, side)
            for at, side in ((row["fan_away_at"], "fan_left"), (row["model_away_at"], "model_left"))
            if at is not None
        ]
        if not gone:
            return
        first_at, reason = min(gone)
        if first_at + grace > row["now"]:
            async with self._pool.acquire() as conn:
                await deadlines.schedule(conn, show, GRACE, first_at + grace)
            return
        ended = await self._end(show, reason, None)
        if ended is not None:
            await self._settle_now(show)

    async def settle(self, show: str) -> None:
        """Charge an ended show's last part exactly and empty its escrow:
        to the model for a fan's forfeited minimum, else back to the fan.
        Safe to run any number of times, from any process."""
        row = await self._fetch(show)
        if row is None or row["state"] != "ended" or row["settled_at"] is not None:
            await self._drop_deadline(show, SETTLE)
            return
        rate, end_s = int(row["rate"]), int(row["end_s"])
        escrow = escrow_account(ESCROW_KIND, show)
        # The whole periods up to the end go under their tick's own key
        # first: a tick whose money was applied while its row update was not
        # (Postgres away, a crash) is then a duplicate, not charged again
        # inside the final charge, which covers only the last part period.
        ticks = int(row["ticks"])
        while (ticks + 1) * self._tick_s <= end_s:
            try:
                await self._charge_tick(row, ticks + 1)
            except InsufficientFunds:
                break  # the final charge below ends the show where it can pay
            ticks += 1
        billed_s = ticks * self._tick_s
        final = charged_for(rate, max(end_s, billed_s)) - charged_for(rate, billed_s)
        while final > 0:
            try:
                await self._meter(row, final, f"meter:{show}:final")
                break
            except InsufficientFunds:
                # Spent elsewhere since the end: the show ends where it can pay.
                end_s = await self._affordable_end(row, billed_s, end_s)
                final = charged_for(rate, end_s) - charged_for(rate, billed_s)
                await self._set_state(show, "end_s = $2", "ended", end_s)
        charged = charged_for(rate, max(end_s, billed_s))
        # Forfeit only a minimum that bought a running show: a show ended
        # while its minimum was being held (accepted) gives it all back.
        forfeit = (
            row["started_at"] is not None
            and row["end_reason"] in ("fan", "fan_left")
            and end_s < int(row["min_s"])
        )
        # Not `row["held"]`: a hold applied just before the show ended while
        # `accepted` is in the escrow without the row knowing it. An escrow
        # never held into answers EMPTY, and nothing moves.
        if charged_for(int(row["rate"]), int(row["min_s"])) > 0:
            money = self._economy.release if forfeit else self._economy.escrow_refund
            to = row["model"] if forfeit else row["fan"]
            try:
                reply = await money(
                    escrow,
                    to,
                    initiator=PRIVATE_INITIATOR,
                    key=f"settle:{show}",
                    meta={"show": show},
                )
                if forfeit:
                    charged += int(reply["amount"])
            except EscrowEmpty:
                if forfeit:  # moved before, its record lost with Redis
                    charged = max(charged, int(row["held"]))
        if forfeit:
            charged = max(charged, int(row["held"]))
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                settled = await conn.fetchrow(
                    f"""UPDATE private_shows SET settled_at = now(), charged = $2
                        WHERE id = $1 AND settled_at IS NULL RETURNING {_COLUMNS}""",
                    show,
                    charged,
                )
                await deadlines.cancel(conn, show, SETTLE)
        except _DB_ERRORS as exc:
            raise Unavailable("private shows are unavailable") from exc
        if settled is not None:
            await self._publish(settled)

    # --- the state machine -----------------------------------------------------------
    async def _end(self, show: str, reason: str, end_s: int | None) -> Any:
        """Set a running (or accepted) show ended, with its settle deadline;
        None when it was not open any more."""
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                row = await conn.fetchrow(
                    "SELECT state FROM private_shows WHERE id = $1 FOR UPDATE", show
                )
                if row is None or row["state"] not in ("accepted", "running"):
                    return None
                ended = await self._end_in(conn, show, reason, end_s)
        except _DB_ERRORS as exc:
            raise Unavailable("private shows are unavailable; nothing changed") from exc
        await self._publish(ended)
        return ended

    async def _end_in(self, conn: deadlines.Conn, show: str, reason: str, end_s: int | None) -> Any:
        """In the caller's transaction, holding the row's lock. The seconds
        billed are at least what the ticks charged already."""
        grace = timedelta(seconds=self._settings.private_settle_grace_s)
        row = await conn.fetchrow(
            f"""UPDATE private_shows SET state = 'ended', end_reason = $2,
                   end_s = CASE WHEN started_at IS NULL THEN 0
                           ELSE greatest(coalesce($3::int, {_BILLABLE}), ticks * $4) END,
                   ended_at = clock_timestamp(), expires_at = NULL
                WHERE id = $1 RETURNING {_COLUMNS}""",
            show,
            reason,
            end_s,
            self._tick_s,
        )
        for action in (START, GRACE):
            await deadlines.cancel(conn, show, action)
        due = await conn.fetchval("SELECT now()") + grace
        await deadlines.schedule(conn, show, SETTLE, due)
        return row

    async def _settle_now(self, show: str) -> Any:
        """Settle at once (the sweeper does it later if this fails)."""
        try:
            await self.settle(show)
        except ServiceError as exc:
            log.warning("show %s ended, not settled yet: %s", show, exc.message)
            return None
        return await self._fetch(show)

    async def _close_request(
        self, show: str, user: str, party: str, to: str, reason: str | None
    ) -> Any:
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                row = await conn.fetchrow(
                    f"""UPDATE private_shows SET state = $3, expires_at = NULL,
                           end_reason = $4, end_s = CASE WHEN $3 = 'ended' THEN 0 END,
                           ended_at = CASE WHEN $3 = 'ended' THEN now() END,
                           settled_at = CASE WHEN $3 = 'ended' THEN now() END
                        WHERE id = $1 AND {party} = $2 AND state = 'requested'
                        RETURNING {_COLUMNS}""",
                    show,
                    user,
                    to,
                    reason,
                )
                if row is not None:
                    await deadlines.cancel(conn, show, EXPIRE)
        except _DB_ERRORS as exc:
            raise Unavailable("private shows are unavailable; nothing changed") from exc
        return row

    async def _set_state(self, show: str, assignments: str, from_state: str, *args: Any) -> Any:
        try:
            return await self._pool.fetchrow(
                f"""UPDATE private_shows SET {assignments}
                    WHERE id = $1 AND state = '{from_state}' RETURNING {_COLUMNS}""",
                show,
                *args,
            )
        except _DB_ERRORS as exc:
            raise Unavailable("private shows are unavailable") from exc

    async def _refused(self, show: str, user: str, party: str, to: str) -> dict[str, Any]:
        row = await self._fetch(show)
        if row is None or user not in (row["fan"], row["model"]):
            raise NotFound(f"no show '{show}'")
        if row[party] != user:
            raise Forbidden(f"only the {party} can make a show {to}")
        if row["state"] == to or (to == "accepted" and row["state"] == "running"):
            reply: dict[str, Any] = {"show": show, "state": row["state"], "duplicate": True}
            if row["state"] == "running":
                reply["room"] = room_of(show)
            return reply
        raise Conflict(f"show '{show}' is {row['state']}; it cannot become {to}")

    def _check_id(self, show: str) -> None:
        if not PRIVATE_ID_RE.fullmatch(show):
            raise NotFound(f"no show '{show}'")  # another kind of id

    async def _fetch(self, show: str) -> Any:
        try:
            return await self._pool.fetchrow(
                f"SELECT {_COLUMNS} FROM private_shows WHERE id = $1", show
            )
        except _DB_ERRORS as exc:
            raise Unavailable("private shows are unavailable") from exc

    async def _drop_deadline(self, show: str, action: str) -> None:
        try:
            async with self._pool.acquire() as conn:
                await deadlines.cancel(conn, show, action)
        except _DB_ERRORS as exc:
            raise Unavailable("private shows are unavailable") from exc

    async def _publish(self, row: Any, *, fan_extra: dict[str, Any] | None = None) -> None:
        """The `private` event to the fan and the model (inbox and channel,
        as request events). Best effort: a lost event is seen in the next
        one or in the listing."""
        body = {**events.private_event(wire(row, self._tick_s)), "ts": int(time.time() * 1000)}
        for user in (row["fan"], row["model"]):
            event = {**body, **fan_extra} if fan_extra and user == row["fan"] else body
            try:
                await self._user_event(
                    keys=[self._keys.inbox(user)],
                    args=[
                        self._keys.user_channel(user),
                        self._settings.inbox_len,
                        orjson.dumps(event),
                    ],
                )
            except (RedisError, OSError) as exc:
                log.warning("private event to %s lost: %s", user, exc)
