"""The ledger projector of standing (migration 0022) against real Redis and
Postgres: each committed ledger row is folded into the sums once, even with
two projectors at once and a re-run; a row committed ahead of an older
transaction still open waits for it instead of being skipped, and the
leaderboard shows it meanwhile; a ledger that already held data keeps its
history counted once through the migration."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import orjson
import pytest
from prometheus_client import REGISTRY
from redis.asyncio import Redis

from tests.conftest import Http, Running, pg
from tokenchat.server.config import Settings
from tokenchat.server.db import load_migrations, migrate
from tokenchat.server.keys import Keys
from tokenchat.server.standing import Standing

PROJECTOR_VERSION = 22
# How long a test waits for the projector to reach the ledger's newest row:
# the horizon waits for whatever else runs on the shared Postgres server.
FOLD_TIMEOUT_S = 10.0


@pytest.fixture
async def server(start_server: Any) -> Running:
    # The node's own pass runs once at start, then not again within a test:
    # the test calls project() itself and sees exactly what it folded.
    running: Running = await start_server(standing_interval_s=3600.0)
    return running


async def _tips(server: Running, bob: int, *amounts: int) -> list[str]:
    alice = await server.client("alice", "model")
    fan = await server.client("bob")
    await Http(server).credit("bob", bob)
    await fan.call("join", room="alice")
    txs = [
        (await fan.call("tip", room="alice", amount=amount, key=f"k{i}"))["tx"]
        for i, amount in enumerate(amounts)
    ]
    assert await server.node.ledger.drain(10.0) == 0
    await alice.close()
    await fan.close()
    return txs


async def _fold_all(standing: Standing, conn: asyncpg.Connection) -> int:
    """Project until the watermark is the newest ledger row; return how many
    were folded. Not one call: the Postgres server is shared (other tests),
    and another client's transaction still open holds the horizon back for
    a moment, as it would in production."""
    folded = 0
    async with asyncio.timeout(FOLD_TIMEOUT_S):
        while True:
            folded += await standing.project()
            behind = await conn.fetchval(
                """SELECT EXISTS (SELECT FROM ledger_transactions l, standing_watermark w
                                  WHERE l.writer_xid IS NOT NULL
                                    AND (l.writer_xid, l.id) > (w.writer_xid, w.tx_id))"""
            )
            if not behind:
                return folded
            await asyncio.sleep(0.02)


@pytest.fixture
async def db(settings: Settings) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(settings.database_url)
    await conn.execute(f'SET search_path TO "{settings.database_schema}"')
    try:
        yield conn
    finally:
        await conn.close()


async def _sums(settings: Settings) -> tuple[int, int, int]:
    rows = await pg(
        settings,
        """SELECT (SELECT coalesce(sum(tokens), 0) FROM standing_room_hourly
                   WHERE room = 'alice' AND user_id = 'bob')::bigint AS hourly,
                  (SELECT coalesce(sum(tokens), 0) FROM standing_room_total
                   WHERE room = 'alice' AND user_id = 'bob')::bigint AS total,
                  (SELECT coalesce(sum(tokens), 0) FROM standing_user_hourly
                   WHERE user_id = 'bob')::bigint AS spent""",
    )
    return rows[0]["hourly"], rows[0]["total"], rows[0]["spent"]


async def _board(server: Running, window: str) -> list[tuple[str, int]]:
    status, reply = await Http(server).call("GET", f"/v1/rooms/alice/leaderboard?window={window}")
    assert status == 200, reply
    return [(e["user"], e["tokens"]) for e in reply["entries"]]


async def test_two_projectors_and_a_rerun_count_each_row_once(
    server: Running, settings: Settings, db: asyncpg.Connection
) -> None:
    await _tips(server, 100, 10, 20, 5)
    standing = server.node.standing
    # Two at once (one folds, the other finds the watermark locked), then
    # until nothing is left, then again with nothing new.
    folded = sum(await asyncio.gather(standing.project(), standing.project()))
    folded += await _fold_all(standing, db)
    assert await standing.project() == 0
    # The three tips, and the credit unless the node's first pass took it.
    assert folded in (3, 4), folded
    assert await _sums(settings) == (35, 35, 35)
    mark = await pg(settings, "SELECT writer_xid::text AS x, tx_id FROM standing_watermark")
    newest = await pg(
        settings,
        """SELECT writer_xid::text AS x, id FROM ledger_transactions
           ORDER BY writer_xid DESC, id DESC LIMIT 1""",
    )
    assert (mark[0]["x"], mark[0]["tx_id"]) == (newest[0]["x"], newest[0]["id"])
    assert await _board(server, "12h") == [("bob", 35)]
    assert await _board(server, "all") == [("bob", 35)]


async def test_a_row_committed_ahead_of_an_open_transaction_waits_for_it(
    server: Running, settings: Settings, db: asyncpg.Connection
) -> None:
    """Writers commit out of xid order. A tip committed while an older
    transaction is still open is not folded past it (it would be skipped if
    that one then committed a ledger row), and the leaderboard shows the tip
    all the same."""
    older = await asyncpg.connect(settings.database_url)
    try:
        transaction = older.transaction()
        await transaction.start()
        await older.fetchval("SELECT pg_current_xact_id()")  # it holds an xid now
        await _tips(server, 100, 30)
        await server.node.standing.project()
        assert await _sums(settings) == (0, 0, 0)
        # Read from the sums plus the rows after the watermark: current.
        assert await _board(server, "12h") == [("bob", 30)]
        assert await _board(server, "all") == [("bob", 30)]
        await transaction.commit()
    finally:
        await older.close()
    assert await _fold_all(server.node.standing, db) == 2  # the credit and the tip
    assert await _sums(settings) == (30, 30, 30)
    assert await _board(server, "all") == [("bob", 30)]


async def test_refund_pending_and_projected_read_the_same(
    server: Running, settings: Settings, db: asyncpg.Connection
) -> None:
    """A refund subtracts from its tip's room and hour, whether the
    leaderboard finds it in the sums or after the watermark."""
    txs = await _tips(server, 100, 40, 7)
    await _fold_all(server.node.standing, db)
    status, reply = await Http(server).call(
        "POST", "/v1/admin/refunds", "ops", "admin", tx=txs[0], key="r1"
    )
    assert status == 200, reply
    assert await server.node.ledger.drain(10.0) == 0
    before = (await _board(server, "12h"), await _board(server, "all"))
    assert before == ([("bob", 7)], [("bob", 7)])
    assert await _fold_all(server.node.standing, db) == 1
    assert (await _board(server, "12h"), await _board(server, "all")) == before
    assert await _sums(settings) == (7, 7, 7)


async def _apply(conn: asyncpg.Connection, schema: str, up_to: int) -> None:
    """Apply migrations 1..up_to the way db.migrate does."""
    await conn.execute(f'CREATE SCHEMA "{schema}"')
    await conn.execute(f'SET search_path TO "{schema}"')
    await conn.execute(
        """CREATE TABLE schema_migrations (
               version integer PRIMARY KEY, name text NOT NULL,
               applied_at timestamptz NOT NULL DEFAULT now())"""
    )
    for migration in load_migrations():
        if migration.version > up_to:
            break
        async with conn.transaction():
            await conn.execute(migration.sql)
            await conn.execute(
                "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                migration.version,
                migration.name,
            )


async def _ledger_tip(conn: asyncpg.Connection, tx: str, amount: int) -> None:
    """A tip of bob's in alice's room, written as the ledger writer would."""
    async with conn.transaction():
        await conn.execute(
            """INSERT INTO accounts (id, kind, balance) VALUES ('u:bob', 'user', 1000),
               ('u:alice', 'user', 0) ON CONFLICT DO NOTHING"""
        )
        await conn.execute(
            """INSERT INTO ledger_transactions
                   (id, kind, initiator, idem_key, request, reply, meta, applied_ms, outbox_id)
               VALUES ($1, 'tip', 'u:bob', $1, '{}', '{}', $2::jsonb,
                       (extract(epoch FROM now()) * 1000)::bigint, $1)""",
            tx,
            orjson.dumps({"room": "alice"}).decode(),
        )
        await conn.execute(
            """INSERT INTO ledger_postings (tx_id, account_id, amount)
               VALUES ($1, 'u:bob', $2), ($1, 'u:alice', -$2::bigint)""",
            tx,
            -amount,
        )


async def test_migration_keeps_a_ledger_with_data_counted_once(settings: Settings) -> None:
    """A database at 0021 with tips the trigger projected: 0022 applies,
    history is not projected again, and later tips are."""
    assert load_migrations()[PROJECTOR_VERSION - 1].name == "standing_projector"
    schema = f"t_m_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(settings.database_url)
    redis = Redis.from_url(settings.redis_url)
    pool: asyncpg.Pool | None = None
    try:
        await _apply(conn, schema, PROJECTOR_VERSION - 1)
        await _ledger_tip(conn, "tx-old-1", 11)
        await _ledger_tip(conn, "tx-old-2", 4)
        hourly = "SELECT coalesce(sum(tokens), 0) FROM standing_room_hourly WHERE room = 'alice'"
        assert await conn.fetchval(hourly) == 15  # by 0013's trigger
        assert await migrate(settings.database_url, schema) == [
            m.version for m in load_migrations() if m.version >= PROJECTOR_VERSION
        ]
        assert (
            await conn.fetchval("SELECT count(*) FROM ledger_transactions WHERE writer_xid IS NULL")
            == 2
        )
        pool = await asyncpg.create_pool(
            settings.database_url,
            min_size=1,
            max_size=2,
            server_settings={"search_path": schema},
        )
        own = settings.replace(database_schema=schema)
        standing = Standing(pool, redis, Keys(own.redis_prefix), own, _no_publish)
        assert await standing.project() == 0  # history stays as the trigger left it
        await _ledger_tip(conn, "tx-new-1", 6)
        assert await conn.fetchval(hourly) == 15  # no trigger any more
        assert await _fold_all(standing, conn) == 1
        assert await standing.project() == 0
        assert await conn.fetchval(hourly) == 21
        # A row without the writer's xid would never be projected: refused.
        with pytest.raises(asyncpg.CheckViolationError):
            await conn.execute(
                """INSERT INTO ledger_transactions
                       (id, kind, initiator, idem_key, request, reply, applied_ms, outbox_id,
                        writer_xid)
                   VALUES ('tx-x', 'credit', 'u:bob', 'x', '{}', '{}', 0, 'x', NULL)"""
            )
    finally:
        if pool is not None:
            await pool.close()
        await conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
        await conn.close()
        await redis.aclose()


async def _no_publish(room: str, event: dict[str, Any]) -> str:
    raise AssertionError(f"no king event expected here: {room} {event}")


async def test_batches_resume_inside_one_writer_transaction(
    settings: Settings, db: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer's batch is many ledger rows of one xid; batches of the
    projector end anywhere in it and the next one resumes after the last id
    folded (the watermark is (writer_xid, id)), so nothing is skipped or
    folded twice."""
    from tokenchat.server import standing as standing_module

    monkeypatch.setattr(standing_module, "LEDGER_PROJECT_BATCH_MAX", 2)
    async with db.transaction():  # one transaction: one writer_xid for all five
        for number, amount in enumerate((1, 2, 3, 4, 5)):
            await _ledger_tip(db, f"tx-{number}", amount)
    assert await db.fetchval("SELECT count(DISTINCT writer_xid) FROM ledger_transactions") == 1
    pool = await asyncpg.create_pool(
        settings.database_url,
        min_size=1,
        max_size=2,
        server_settings={"search_path": settings.database_schema},
    )
    redis = Redis.from_url(settings.redis_url)
    try:
        standing = Standing(pool, redis, Keys(settings.redis_prefix), settings, _no_publish)
        assert await _fold_all(standing, db) == 5  # 2 + 2 + 1
        assert await standing.project() == 0
        assert await _sums(settings) == (15, 15, 15)
    finally:
        await pool.close()
        await redis.aclose()


async def test_behind_seconds_rises_while_a_transaction_holds_the_horizon_then_falls(
    server: Running, settings: Settings, db: asyncpg.Connection
) -> None:
    """tokenchat_standing_behind_seconds: a transaction that holds an xid
    keeps the projector from folding a tip committed after it began; the
    gauge grows with the tip's age, and drops to 0 once it ends."""
    standing = server.node.standing
    await _fold_all(standing, db)
    assert await standing.behind_s() == 0.0
    assert REGISTRY.get_sample_value("tokenchat_standing_behind_seconds") == 0.0
    older = await asyncpg.connect(settings.database_url)
    try:
        transaction = older.transaction()
        await transaction.start()
        await older.fetchval("SELECT pg_current_xact_id()")  # it holds an xid now
        await _tips(server, 100, 30)
        await standing.project()
        first = REGISTRY.get_sample_value("tokenchat_standing_behind_seconds")
        assert first is not None and first >= 0.0
        await asyncio.sleep(1.0)
        await standing.project()
        later = REGISTRY.get_sample_value("tokenchat_standing_behind_seconds")
        assert later is not None and later >= first + 1.0, (first, later)
        assert await _sums(settings) == (0, 0, 0)  # still held back
        await transaction.commit()
    finally:
        await older.close()
    await _fold_all(standing, db)
    await standing.project()
    assert REGISTRY.get_sample_value("tokenchat_standing_behind_seconds") == 0.0
    assert await _sums(settings) == (30, 30, 30)
