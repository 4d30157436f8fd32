"""A deleted account on the WebSocket side (issue #13 section 4).

``DELETE /v1/me`` (server/http/accounts.py) pseudonymises every HTTP view;
what members receive over the WebSocket is kept in Redis and Postgres
copies that no view filter passes through. Once her sessions are closed:

- her kingships take her pseudonym, and those rooms get a `king` event
  saying so (``Standing.rename_king``; the projector maps her id from then
  on);
- every event naming her leaves every room's history (chat lines, tips,
  item tips, media posts, `king` events crowning her: clear.lua 'all'), and
  each room where one went gets `clear {room, user}`, as a moderator's clear
  (``Moderation.forget_user``);
- her DMs leave the inboxes they wait in for a hello, and the DM archive
  stream (``dms.forget_sender``).

Then ``deleted_users.forgotten_at`` is set (migration 0024). Each step is
retry-safe, so a deletion whose step failed (a backend away: she is shut out
by then, and cannot ask again) is finished by the sweeper, which forgets
every deleted account whose ``forgotten_at`` is NULL
(``FORGETS_PER_SWEEP_MAX`` a sweep).
"""

from __future__ import annotations

import asyncio
import logging

import asyncpg
from redis.asyncio import Redis

from ..errors import ServiceError, Unavailable
from ..keys import Keys
from ..standing import Standing
from . import dms
from .moderation import Moderation

log = logging.getLogger(__name__)

# Deleted accounts one sweep finishes forgetting at most (a bound on one
# sweep's work: each scans every room's history; more wait for the next).
FORGETS_PER_SWEEP_MAX = 10
_DB_ERRORS = (asyncpg.PostgresError, OSError, asyncio.TimeoutError)


class Forgetting:
    def __init__(
        self,
        pool: asyncpg.Pool,
        redis: Redis,
        keys: Keys,
        standing: Standing,
        moderation: Moderation,
    ) -> None:
        self._pool = pool
        self._redis = redis
        self._keys = keys
        self._standing = standing
        self._moderation = moderation

    async def forget(self, user: str, alias: str) -> None:
        """Every step (module docstring), then the mark; UNAVAILABLE when
        one failed (the sweeper finishes it)."""
        await self._standing.rename_king(user, alias)
        await self._moderation.forget_user(user)
        await dms.forget_sender(self._pool, self._redis, self._keys, user, archived_too=True)
        try:
            await self._pool.execute(
                "UPDATE deleted_users SET forgotten_at = now() WHERE user_id = $1", user
            )
        except _DB_ERRORS as exc:
            raise Unavailable("deleted accounts are unavailable") from exc

    async def sweep(self) -> None:
        """Every sweep: the deleted accounts not forgotten yet."""
        try:
            rows = await self._pool.fetch(
                """SELECT user_id, pseudonym FROM deleted_users
                    WHERE forgotten_at IS NULL ORDER BY user_id LIMIT $1""",
                FORGETS_PER_SWEEP_MAX,
            )
        except _DB_ERRORS as exc:
            raise Unavailable("deleted accounts are unavailable") from exc
        for row in rows:
            try:
                await self.forget(row["user_id"], row["pseudonym"])
            except ServiceError as exc:  # a backend away: the next sweep again
                log.warning("%s not forgotten yet: %s", row["pseudonym"], exc.message)
