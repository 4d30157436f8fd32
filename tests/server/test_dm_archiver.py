"""The DM archiver runs where the ledger writer runs: inside ``serve`` only
when it writes the ledger too (TOKENCHAT_LEDGER_ENABLED=1, dev), otherwise in
``tokenchat ledger``. Real Redis, Postgres and OS processes: a ``serve``
without a writer archives nothing, a ``tokenchat ledger`` beside it archives
every DM, and one killed (SIGKILL) mid-batch, before its insert commits and
again after it commits but before it acknowledges, loses no DM and archives
none twice once another takes over."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
from redis.asyncio import Redis

from tests.conftest import Http, Running, eventually, pg
from tests.server.proc import cli_env
from tokenchat.server.catalog.dms import GROUP
from tokenchat.server.config import Settings
from tokenchat.server.keys import Keys

Start = Callable[..., Awaitable[Running]]

DM_PRICE = 2  # tokens per DM: paid DMs, so the outbox moves money beside them
DMS = 30  # one archiver batch (dm_archive_batch_max is 500)
# How long a `serve` without a writer is watched for archiving anything: two
# of the archiver's blocking reads (dm_archive_block_ms, 1 s by default).
IDLE_WATCH_S = 2.5
# A takeover claims entries idle this long (s): short, so the test is quick.
CLAIM_IDLE_S = "0.3"
# A cold `tokenchat ledger` imports, connects and reads within a few seconds.
PROCESS_WAIT_S = 20.0
# Redis refuses writes this long (ms) while the archiver is killed between
# its commit and its acknowledgement; CLIENT UNPAUSE ends it sooner.
PAUSE_MS = 30_000


@contextlib.asynccontextmanager
async def ledger_process(
    settings: Settings, log_path: Path
) -> AsyncIterator[asyncio.subprocess.Process]:
    """``tokenchat ledger`` as an operator runs it; always killed after."""
    env = cli_env(
        settings,
        TOKENCHAT_DURABILITY=settings.durability,
        TOKENCHAT_DM_ARCHIVE_CLAIM_IDLE_S=CLAIM_IDLE_S,
        TOKENCHAT_METRICS_PORT="0",
    )
    with log_path.open("ab") as log_fh:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tokenchat.server.cli",
            "ledger",
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log_fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield proc
    finally:
        await kill(proc)


async def kill(proc: asyncio.subprocess.Process) -> None:
    """SIGKILL: no cancellation, no cleanup, as a crash or an OOM kill."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGKILL)
    async with asyncio.timeout(5.0):
        await proc.wait()


class DmsLock:
    """A lock on this test's ``dms`` that an archiver's INSERT waits behind,
    taken and released when the test says."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._conn: asyncpg.Connection | None = None

    async def take(self) -> None:
        self._conn = await asyncpg.connect(self._settings.database_url)
        await self._conn.execute(f'SET search_path TO "{self._settings.database_schema}"')
        await self._conn.execute("BEGIN")
        await self._conn.execute("LOCK TABLE dms IN SHARE MODE")

    async def release(self) -> None:
        if self._conn is not None:
            await self._conn.close()  # ends the transaction, and the lock with it
            self._conn = None


async def insert_waiting(settings: Settings) -> bool:
    """An INSERT into this test's ``dms`` waits for the lock (mid-batch)."""
    rows = await pg(
        settings,
        "SELECT count(*) AS n FROM pg_locks WHERE relation = 'dms'::regclass AND NOT granted",
    )
    return int(rows[0]["n"]) > 0


async def archived(settings: Settings) -> list[str]:
    return [row["tx"] for row in await pg(settings, "SELECT tx FROM dms ORDER BY tx")]


async def pending(redis: Redis, stream: str) -> dict[str, Any]:
    info: Any = await redis.xpending(stream, GROUP)
    return {"count": int(info["pending"]), "consumers": len(info["consumers"])}


async def test_only_the_ledger_process_archives_and_a_kill_mid_batch_loses_and_doubles_nothing(
    start_server: Start, settings: Settings, private_redis: str, tmp_path: Path
) -> None:
    # A private Redis: the test pauses its writes (CLIENT PAUSE) further down.
    settings = settings.replace(redis_url=private_redis, durability="redis")
    server = await start_server(redis_url=private_redis, durability="redis", ledger_enabled=0)
    assert "dm-archive" not in {task.get_name() for task in server.node._loops}
    http = Http(server)
    await server.client("alice", "model")
    fan = await server.client("bob")
    await http.credit("bob", DM_PRICE * DMS)
    status, reply = await http.call("PUT", "/v1/me/prices", "alice", "model", dm=DM_PRICE)
    assert status == 200, reply
    sent = sorted(
        [(await fan.call("dm", to="alice", text=f"m{n}", key=f"d{n}"))["tx"] for n in range(DMS)]
    )
    redis: Redis = Redis.from_url(private_redis)
    stream = Keys(settings.redis_prefix).dm_log()
    try:
        # 1. `serve` alone (its writer off): the DMs wait in the stream.
        await asyncio.sleep(IDLE_WATCH_S)
        assert await archived(settings) == []
        assert int(await redis.xlen(stream)) == DMS

        # 2. A `tokenchat ledger` reads the batch and is killed while its
        # INSERT waits: read, not written, not acknowledged.
        lock = DmsLock(settings)
        await lock.take()
        try:
            async with ledger_process(settings, tmp_path / "ledger-1.log") as first:
                await eventually(lambda: insert_waiting(settings), PROCESS_WAIT_S)
                assert await pending(redis, stream) == {"count": DMS, "consumers": 1}
                await kill(first)
        finally:
            await lock.release()
        assert await archived(settings) == []
        assert int(await redis.xlen(stream)) == DMS

        # 3. Another takes the dead one's batch over; Redis refuses writes
        # while its INSERT waits, then the INSERT commits and the archiver is
        # killed before its acknowledgement: written, not acknowledged.
        await lock.take()
        try:
            async with ledger_process(settings, tmp_path / "ledger-2.log") as second:
                await eventually(lambda: insert_waiting(settings), PROCESS_WAIT_S)
                await redis.client_pause(PAUSE_MS, all=False)  # writes only
                try:
                    await lock.release()

                    async def all_written() -> bool:
                        return await archived(settings) == sent

                    await eventually(all_written, PROCESS_WAIT_S)
                    await kill(second)
                finally:
                    await redis.client_unpause()
        finally:
            await lock.release()
        assert await archived(settings) == sent
        # Still there, and still pending: never acknowledged.
        assert int(await redis.xlen(stream)) == DMS
        assert (await pending(redis, stream))["count"] == DMS

        # 4. A third takes over: nothing lost, nothing twice, the stream empty.
        async with ledger_process(settings, tmp_path / "ledger-3.log"):

            async def stream_empty() -> bool:
                return int(await redis.xlen(stream)) == 0

            await eventually(stream_empty, PROCESS_WAIT_S)
        assert await archived(settings) == sent
        assert (await pending(redis, stream))["count"] == 0
        _status, page = await http.call("GET", f"/v1/me/dms?with=alice&limit={DMS}", "bob")
        assert sorted(m["tx"] for m in page["messages"]) == sent
        # The money beside them: each DM charged once, in Redis and the ledger
        # (reconcile drains the outbox first).
        report = await http.reconcile()
        assert report["ok"] is True, report
        rows = await pg(settings, "SELECT count(*) AS n FROM ledger_transactions WHERE kind = 'dm'")
        assert rows[0]["n"] == DMS
        assert (await fan.call("balance"))["balance"] == 0
    finally:
        await redis.aclose()
