"""Deadlines: every duration in the product that ends by itself, stored in
Postgres and swept under a Redis lease.

A deadline is a row of ``deadlines`` (migration 0009): a subject (``r_...``),
an action (``request.expire``, ``request.settle``; later ``show.*``) and when
it is due. A feature writes its deadlines in the same Postgres transaction
as the state change they belong to (``schedule``, ``cancel``), so a state
never lacks its deadline, and registers one handler per action
(``Sweeper.handle``).

One process at a time sweeps: the one holding the lease (``lua/lease.lua``:
SET NX PX, renewed every sweep by its holder only). Any ``serve`` process may
hold it; when the holder dies, the lease expires and another takes over
within ``deadline_lease_ttl_s``. The lease saves work, it is not what keeps
the money safe: when Redis loses it, two processes may sweep for a moment,
and every handler is idempotent (a compare-and-set on the state in Postgres,
money calls with a deterministic idempotency key that move an escrow's whole
balance), so two sweepers, or a sweeper racing a user, resolve to one
outcome.

A handler returning normally is done: its row is deleted, unless the handler
rescheduled it (a changed ``due_at``). A handler raising is tried again after
``deadline_retry_s``, doubled per failure (capped), so one failing subject
never holds the others back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

import asyncpg
from redis.asyncio import Redis
from redis.exceptions import RedisError

from ..aio import pause, reraise_if_cancelled
from ..config import Settings
from ..keys import Keys
from .scripts import script_source

log = logging.getLogger(__name__)

Handler = Callable[[str], Awaitable[None]]
# A connection of its own or one from a pool: the caller's transaction.
Conn = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy
Job = Callable[[], Awaitable[None]]

# A failed deadline's delay doubles per attempt up to this many times the
# base (5 s -> at most 320 s): a backend away for long is retried often
# enough to recover within minutes of its return.
RETRY_BACKOFF_MAX_FACTOR = 64

_DB_ERRORS = (asyncpg.PostgresError, OSError, asyncio.TimeoutError)


async def schedule(conn: Conn, subject: str, action: str, due_at: datetime) -> None:
    """Set the (subject, action) deadline, replacing an earlier one; call it
    inside the transaction that changes the subject's state."""
    await conn.execute(
        """INSERT INTO deadlines (subject, action, due_at) VALUES ($1, $2, $3)
           ON CONFLICT (subject, action) DO UPDATE SET due_at = $3, attempts = 0""",
        subject,
        action,
        due_at,
    )


async def cancel(conn: Conn, subject: str, action: str) -> None:
    await conn.execute("DELETE FROM deadlines WHERE subject = $1 AND action = $2", subject, action)


class Sweeper:
    """Runs the handlers of due deadlines, in the process holding the lease."""

    def __init__(self, pool: asyncpg.Pool, redis: Redis, keys: Keys, settings: Settings) -> None:
        self._pool = pool
        self._redis = redis
        self._lease_key = keys.deadline_lease()
        self._settings = settings
        self._token = secrets.token_hex(16)
        self._lease = redis.register_script(script_source("lease"))
        self._handlers: dict[str, Handler] = {}
        self._jobs: list[Job] = []
        self.holding = False  # whether this process held the lease at its last try

    def handle(self, action: str, handler: Handler) -> None:
        assert action not in self._handlers, f"two handlers for {action}"
        self._handlers[action] = handler

    def every_sweep(self, job: Job) -> None:
        """Work the lease holder does on each sweep besides due deadlines."""
        self._jobs.append(job)

    async def run(self) -> None:
        """Sweep every ``deadline_sweep_interval_s`` until cancelled."""
        try:
            while True:
                try:
                    await self.sweep_once()
                except Exception as exc:  # a backend away: the next sweep tries again
                    reraise_if_cancelled(exc)
                    log.warning("deadline sweep failed: %s", exc)
                await pause(self._settings.deadline_sweep_interval_s)
        finally:
            await self._give_up()

    async def sweep_once(self) -> int:
        """Take or renew the lease; if held, run what is due. Returns the
        number of deadlines handled."""
        ttl_ms = int(self._settings.deadline_lease_ttl_s * 1000)
        self.holding = bool(await self._lease(keys=[self._lease_key], args=[self._token, ttl_ms]))
        if not self.holding:
            return 0
        for job in self._jobs:
            await job()
        return await self.run_due()

    async def run_due(self) -> int:
        """Handle the deadlines due now (at most ``deadline_batch_max``)."""
        try:
            rows = await self._pool.fetch(
                """SELECT subject, action, due_at, attempts FROM deadlines
                   WHERE due_at <= now() ORDER BY due_at LIMIT $1""",
                self._settings.deadline_batch_max,
            )
        except _DB_ERRORS as exc:
            log.warning("deadlines unreadable: %s", exc)
            return 0
        for row in rows:
            await self._run_one(row)
        return len(rows)

    async def _run_one(self, row: Any) -> None:
        subject, action = row["subject"], row["action"]
        handler = self._handlers.get(action)
        try:
            if handler is None:
                raise LookupError(f"no handler for deadline action {action!r}")
            await handler(subject)
            # Done, unless the handler set a new due time for the same pair.
            await self._pool.execute(
                "DELETE FROM deadlines WHERE subject = $1 AND action = $2 AND due_at = $3",
                subject,
                action,
                row["due_at"],
            )
        except Exception as exc:
            reraise_if_cancelled(exc)
            factor = min(2 ** row["attempts"], RETRY_BACKOFF_MAX_FACTOR)
            delay_s = self._settings.deadline_retry_s * factor
            log.warning(
                "deadline %s %s failed (%s); again in %.0f s", action, subject, exc, delay_s
            )
            # On failure the row stays due, and the next sweep tries again.
            with contextlib.suppress(*_DB_ERRORS):
                await self._pool.execute(
                    """UPDATE deadlines SET attempts = attempts + 1,
                              due_at = now() + $3 * interval '1 second'
                       WHERE subject = $1 AND action = $2""",
                    subject,
                    action,
                    delay_s,
                )

    async def _give_up(self) -> None:
        """On shutdown: free the lease at once rather than after its TTL."""
        if not self.holding:
            return
        self.holding = False
        with contextlib.suppress(RedisError, OSError):  # else it expires by itself
            await self._lease(keys=[self._lease_key], args=[self._token, 0])
