"""Postgres access: the connection pool and versioned migrations.

Migrations are the numbered ``migrations/NNNN_name.sql`` files, applied in
order, each in its own transaction, under an advisory lock so that several
processes running ``tokenchat migrate`` at once apply each file exactly once.
Applying them again is a no-op.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from importlib import resources

import asyncpg

log = logging.getLogger(__name__)

# Any constant works; it only has to be the same for every migrator.
MIGRATION_LOCK_ID = 0x746F6B656E636861  # "tokencha"
_MIGRATION_FILE_RE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


def load_migrations() -> list[Migration]:
    found = []
    for entry in resources.files("tokenchat.server").joinpath("migrations").iterdir():
        match = _MIGRATION_FILE_RE.match(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text("utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    # Numbers are handed out to features developed side by side (0009 may
    # land before 0007): unique and increasing is what applying them needs.
    if len(set(versions)) != len(versions) or (versions and versions[0] != 1):
        raise RuntimeError(f"migrations must be numbered from 1 without repeats, got {versions}")
    return found


async def migrate(dsn: str, schema: str) -> list[int]:
    """Apply the migrations not yet applied; return the versions applied now."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_ID)
        try:
            return await _migrate_locked(conn, schema)
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_ID)
    finally:
        await conn.close()


async def _migrate_locked(conn: asyncpg.Connection, schema: str) -> list[int]:
    quoted = _quote_ident(schema)
    await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {quoted}")
    await conn.execute(f"SET search_path TO {quoted}")
    await conn.execute(
        """CREATE TABLE IF NOT EXISTS schema_migrations (
               version    integer     PRIMARY KEY,
               name       text        NOT NULL,
               applied_at timestamptz NOT NULL DEFAULT now())"""
    )
    done = {row["version"] for row in await conn.fetch("SELECT version FROM schema_migrations")}
    applied = []
    for migration in load_migrations():
        if migration.version in done:
            continue
        async with conn.transaction():
            await conn.execute(migration.sql)
            await conn.execute(
                "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                migration.version,
                migration.name,
            )
        log.info("applied migration %04d_%s", migration.version, migration.name)
        applied.append(migration.version)
    return applied


async def create_pool(
    dsn: str, schema: str, *, min_size: int, max_size: int, timeout_s: float
) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        command_timeout=timeout_s,
        timeout=timeout_s,
        # jit off: tokenchat's statements are short, and a plan whose cost is
        # overestimated (missing or stale statistics: a ledger projector pass
        # was estimated at 1.2M for 1,000 rows) crosses jit_above_cost and
        # spends 0.7 s compiling what runs in 5 ms (docs/benchmarks.md).
        server_settings={"search_path": schema, "application_name": "tokenchat", "jit": "off"},
        reset=_reset,
    )
    assert pool is not None
    return pool


async def _reset(conn: asyncpg.Connection) -> None:
    """What a released connection needs beyond asyncpg's own clean-up: nothing.

    Before calling this, the pool rolls back a transaction left open and drops
    listeners. Its default reset adds ``pg_advisory_unlock_all(); CLOSE ALL;
    UNLISTEN *; RESET ALL``, a round trip on every release: 7 % of the
    server's CPU while it welcomed 10,000 sessions (py-spy). Pooled
    connections here keep no such state (no SET, LISTEN, advisory lock or
    cursor; the schema is a start-up setting, which RESET ALL keeps anyway).
    """


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'
