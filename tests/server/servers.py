"""Backends of a test's own, for fault tests: a valkey-server and a PostgreSQL
that the test may kill, stop and restart, never the shared ones on 6379 and
5432 that every other test is using.

Both come from ``tokenchat.server.devstack.embedded`` (the binaries of the ``dev`` extra) and keep
their folder and port across restarts, so a server under test reconnects to
the same URL::

    async with redis_server(tmp_path) as redis, postgres_server(tmp_path) as pg:
        ...                       # redis.url, pg.url
        await redis.kill()        # SIGKILL, as a crash
        await redis.restart()     # same folder (its AOF), same port
        await pg.stop()           # fast shutdown
        await pg.start()

Redis starts with ``appendonly yes`` and ``appendfsync everysec`` unless told
otherwise, so ``kill`` then ``restart`` is an AOF crash recovery.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from tests.server.proc import free_port
from tokenchat.server.db import migrate
from tokenchat.server.devstack.embedded import EmbeddedPostgres, EmbeddedRedis


class RedisServer:
    """A private valkey-server on a fixed port in its own folder."""

    def __init__(self, data_dir: Path, *, appendonly: bool = True) -> None:
        self.port = free_port()
        self._server = EmbeddedRedis(data_dir, port=self.port, appendonly=appendonly)
        self.url = f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self._server.pid

    @property
    def aof_dir(self) -> Path:
        """Valkey's multi-part append-only file: base, increments, manifest."""
        return self._server.redis_dir / "appendonlydir"

    async def start(self) -> str:
        url = await asyncio.to_thread(self._server.start)
        assert url == self.url, (url, self.url)
        return url

    async def kill(self) -> None:
        """SIGKILL: what Redis wrote to its AOF survives, nothing else."""
        await asyncio.to_thread(self._server.kill)

    async def restart(self) -> str:
        """Start again on the same folder (loading the AOF) and port."""
        return await self.start()

    async def stop(self) -> None:
        await asyncio.to_thread(self._server.stop)


class PostgresServer:
    """A private PostgreSQL cluster on a fixed port in its own folder."""

    def __init__(self, data_dir: Path) -> None:
        self.port = free_port()
        self._server = EmbeddedPostgres(data_dir, port=self.port)
        self.url = ""

    async def start(self) -> str:
        self.url = await asyncio.to_thread(self._server.start)
        return self.url

    async def stop(self) -> None:
        """Fast shutdown: open transactions are aborted, connections cut."""
        await asyncio.to_thread(self._server.stop)

    async def migrate(self, schema: str) -> None:
        await migrate(self.url, schema)


@contextlib.asynccontextmanager
async def redis_server(data_dir: Path, *, appendonly: bool = True) -> AsyncIterator[RedisServer]:
    """A started ``RedisServer`` below ``data_dir``, always stopped after."""
    server = RedisServer(data_dir / "private-redis", appendonly=appendonly)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@contextlib.asynccontextmanager
async def postgres_server(data_dir: Path) -> AsyncIterator[PostgresServer]:
    """A started ``PostgresServer`` below ``data_dir``, always stopped after."""
    server = PostgresServer(data_dir / "private-postgres")
    await server.start()
    try:
        yield server
    finally:
        await server.stop()
