"""The ledger writer, the DM archiver and reconcile on their own, without a gateway.

``tokenchat ledger`` and ``tokenchat reconcile`` need Redis (the outbox, the hot
balances), Postgres (the ledger) and the economy's epoch and fence (a writer
checks that the Redis dataset is the one its entries came from, and a Redis
that went back in time is rebuilt from the ledger before anything else).
``tokenchat ledger`` also copies the DM archive stream into Postgres
(``DmArchive``, the same pattern as the outbox), so that no gateway worker
spends its CPU on it. ``LedgerStack`` holds exactly that: no hub, broker,
sessions or rooms.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import asyncpg
from redis.asyncio import Redis

from .. import redis_client
from ..catalog.dms import DmArchive
from ..config import Settings
from ..db import create_pool
from ..economy.economy import Economy
from ..keys import Keys
from .writer import LedgerWriter


@dataclass(frozen=True)
class LedgerStack:
    settings: Settings
    redis: Redis
    pool: asyncpg.Pool
    writer_pool: asyncpg.Pool
    keys: Keys
    economy: Economy
    writer: LedgerWriter
    dm_archive: DmArchive

    @classmethod
    async def connect(cls, settings: Settings) -> LedgerStack:
        # The same pools a gateway node opens: the economy's reads (balances
        # loaded or rebuilt) never wait behind the writer's batches.
        redis = redis_client.connect(
            settings,
            max_connections=settings.redis_pool_max,
            socket_timeout_s=settings.redis_timeout_s,
        )
        pool = await create_pool(
            settings.database_url,
            settings.database_schema,
            min_size=0,
            max_size=settings.database_pool_max,
            timeout_s=settings.database_timeout_s,
        )
        try:
            writer_pool = await create_pool(
                settings.database_url,
                settings.database_schema,
                min_size=0,
                max_size=settings.ledger_pool_max,
                timeout_s=settings.database_timeout_s,
            )
        except BaseException:
            await pool.close()
            await redis.aclose()
            raise
        keys = Keys(settings.redis_prefix)
        economy = Economy(redis, pool, keys, settings)
        # A consumer name of its own in the outbox's group, like a node's id.
        consumer = secrets.token_hex(8)
        writer = LedgerWriter(settings, writer_pool, economy, consumer=consumer)
        economy.rebuild_with(writer.drain)
        # The DM archiver's inserts share the economy's pool, never the
        # writer's: a burst of DMs cannot delay a ledger batch. Its Redis
        # client is its own, opened at its first read.
        dm_archive = DmArchive(settings, pool, consumer=consumer)
        return cls(settings, redis, pool, writer_pool, keys, economy, writer, dm_archive)

    async def close(self) -> None:
        await self.writer.close()
        await self.dm_archive.close()
        await self.redis.aclose()
        await self.pool.close()
        await self.writer_pool.close()
