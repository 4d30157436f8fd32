"""docs/deploy.md, "Backups": a pg_dump restored, Redis emptied, the books agree.

The restore procedure of the docs, run for real: a dump taken while serving,
spends after it, serve stopped, `pg_restore --clean --if-exists`, and then
Redis. Left as it is, Redis holds a spend the restored ledger lost and
`tokenchat reconcile` says so; emptied, as the docs say, every balance
reloads from the restored ledger and reconcile agrees.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
from redis.asyncio import Redis

from tests.conftest import Http, Running
from tests.server.proc import cli_env, run_cli
from tokenchat.server.app import Process
from tokenchat.server.config import Settings

# pg_dump and pg_restore of a test schema take well under a second.
PG_TOOL_TIMEOUT_S = 60.0


@contextlib.asynccontextmanager
async def serving(settings: Settings) -> AsyncIterator[Running]:
    process = Process(settings)
    await process.start()
    try:
        yield Running(process)
    finally:
        await process.stop()


async def pg_tool(*argv: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    async with asyncio.timeout(PG_TOOL_TIMEOUT_S):
        out, err = await proc.communicate()
    assert proc.returncode == 0, (argv, out.decode(), err.decode())


async def reconcile(settings: Settings) -> tuple[int, dict[str, object]]:
    result = await run_cli("reconcile", "--timeout", "10", env=cli_env(settings))
    return result.returncode, orjson.loads(result.stdout)


async def test_a_restored_dump_with_redis_emptied_is_consistent(
    settings: Settings, redis: Redis, tmp_path: Path
) -> None:
    # PostgreSQL's client tools: .ci/run installs them where they are missing.
    assert shutil.which("pg_dump") and shutil.which("pg_restore"), (
        "pg_dump and pg_restore are missing (apt-get install postgresql-client)"
    )
    dump = tmp_path / "tokenchat.dump"
    async with serving(settings) as running:
        http = Http(running)
        first = await http.credit("bob", 10, key="before-dump")
        await pg_tool(
            "pg_dump",
            "--format",
            "custom",
            "--schema",
            settings.database_schema,
            "--file",
            str(dump),
            settings.database_url,
        )
        # Acknowledged (committed: `ledger` durability) after the dump: a
        # restore loses it.
        after = await http.credit("bob", 5, key="after-dump")
        assert after["balance"] == 15
    # Step 1 of the docs: serve (with its writer) is stopped. Step 2: restore.
    await pg_tool(
        "pg_restore",
        "--clean",
        "--if-exists",
        "--dbname",
        settings.database_url,
        str(dump),
    )
    # Without step 3, Redis still counts the lost credit: the books disagree.
    code, result = await reconcile(settings)
    assert code == 1 and result["ok"] is False, result

    # Step 3: empty Redis (here, the deployment's prefix of a shared Redis).
    keys = [key async for key in redis.scan_iter(match=f"{settings.redis_prefix}*", count=1000)]
    assert keys
    await redis.delete(*keys)

    async with serving(settings) as running:
        bob = await running.client("bob")
        try:
            assert (await bob.call("balance"))["balance"] == 10, "the restored books' balance"
        finally:
            await bob.close()
        http = Http(running)
        # The dump's credit is answered from the restored ledger; the lost one
        # is a fresh credit, with a new transaction.
        again = await http.credit("bob", 10, key="before-dump")
        assert again["duplicate"] is True and again["tx"] == first["tx"], again
        lost = await http.credit("bob", 5, key="after-dump")
        assert not lost.get("duplicate") and lost["tx"] != after["tx"], lost
        assert lost["balance"] == 15
    # Step 4: reconcile agrees.
    code, result = await reconcile(settings)
    assert code == 0 and result["ok"] is True, result
