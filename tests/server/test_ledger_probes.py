"""The ledger's per-batch checks and the standing projector read what a batch
names through the primary keys, never the whole table (migration 0028,
server/standing.py's _STANDING_ROWS), against a real Postgres with a ledger
that holds rows and has no statistics (the state in which the planner used
to read both ledger tables in full for every batch); and the reference
checks keep their errors and their order."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest

from tokenchat.server.config import Settings
from tokenchat.server.standing import _PROJECT_LEDGER

# Ledger rows made before each check: enough that a sequential scan is what
# the planner picked without statistics for 0023's checks and the old
# projector query (each table then spans dozens of pages).
LEDGER_ROWS = 5000


@pytest.fixture
async def conn(settings: Settings) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(settings.database_url, server_settings={"jit": "off"})
    await connection.execute(f'SET search_path TO "{settings.database_schema}"')
    await connection.execute(
        """INSERT INTO accounts (id, kind, balance) VALUES
               ('u:bob', 'user', 1000000), ('u:alice', 'user', 0)"""
    )
    # A first batch on the empty ledger: the trigger's plans are made now
    # and kept for the session (plpgsql caches them, as the writer's long
    # connections keep theirs), so they must not depend on the table's size.
    await connection.execute(
        """INSERT INTO ledger_transactions
               (id, kind, initiator, idem_key, request, reply, applied_ms, outbox_id)
           VALUES ('first', 'tip', 'u:bob', 'first', '{}', '{}', 0, '0-0')"""
    )
    await connection.execute(
        """INSERT INTO ledger_postings (tx_id, account_id, amount)
           VALUES ('first', 'u:bob', -1), ('first', 'u:alice', 1)"""
    )
    # Then a ledger with history, written the way the writer would (one
    # statement per table), and never analyzed.
    await connection.execute(
        """INSERT INTO ledger_transactions
               (id, kind, initiator, idem_key, request, reply, meta, applied_ms, outbox_id)
           SELECT 'old' || i, 'tip', 'u:bob', 'k' || i, '{}', '{}', '{"room": "alice"}',
                  i, '0-' || i
           FROM generate_series(1, $1) i""",
        LEDGER_ROWS,
    )
    await connection.execute(
        """INSERT INTO ledger_postings (tx_id, account_id, amount)
           SELECT 'old' || i, v.account, v.amount
           FROM generate_series(1, $1) i,
                (VALUES ('u:bob', -1), ('u:alice', 1)) v(account, amount)""",
        LEDGER_ROWS,
    )
    try:
        yield connection
    finally:
        await connection.close()


async def _nested_plans(conn: asyncpg.Connection, statement: str, *args: object) -> str:
    """The plans of every statement ``statement`` runs, triggers' included
    (auto_explain, sent to this client), in a transaction rolled back."""
    messages: list[str] = []

    def listen(_: object, message: asyncpg.PostgresLogMessage) -> None:
        messages.append(str(message.message))

    conn.add_log_listener(listen)
    try:
        async with conn.transaction():
            await conn.execute(
                """LOAD 'auto_explain';
                   SET LOCAL auto_explain.log_min_duration = 0;
                   SET LOCAL auto_explain.log_nested_statements = on;
                   SET LOCAL client_min_messages = log"""
            )
            await conn.execute(statement, *args)
            await conn.execute("SET LOCAL client_min_messages = notice")
            raise _RollBack
    except _RollBack:
        pass
    finally:
        conn.remove_log_listener(listen)
    return "\n".join(messages)


class _RollBack(Exception):
    pass


_BATCH = """
WITH t AS (
    INSERT INTO ledger_transactions
        (id, kind, initiator, idem_key, request, reply, applied_ms, outbox_id)
    SELECT 'new' || i, 'tip', 'u:bob', 'n' || i, '{}', '{}', 0, '1-' || i
    FROM generate_series(1, 50) i
)
INSERT INTO ledger_postings (tx_id, account_id, amount)
SELECT 'new' || i, v.account, v.amount
FROM generate_series(1, 50) i, (VALUES ('u:bob', -1), ('u:alice', 1)) v(account, amount)
"""


async def test_the_reference_checks_probe_the_keys(conn: asyncpg.Connection) -> None:
    """A batch of 50 against a ledger of LEDGER_ROWS: the balanced trigger's
    queries look each transaction and account up; none reads a table."""
    plans = await _nested_plans(conn, _BATCH)
    assert "new_postings" in plans  # the trigger's queries were seen
    assert "Index Only Scan using ledger_transactions_pkey" in plans
    assert "Seq Scan on ledger_transactions" not in plans
    assert "Seq Scan on accounts" not in plans
    assert "Seq Scan on ledger_postings" not in plans


async def test_unbalanced_is_refused_before_an_unknown_transaction(
    conn: asyncpg.Connection,
) -> None:
    """One statement with both faults: check_violation (the writer parks
    it) wins over foreign_key_violation (the writer retries it), as in
    0023, whichever transaction comes first."""
    await conn.execute(
        """INSERT INTO ledger_transactions
               (id, kind, initiator, idem_key, request, reply, applied_ms, outbox_id)
           VALUES ('lone', 'tip', 'u:bob', 'lone', '{}', '{}', 0, '2-0')"""
    )
    with pytest.raises(asyncpg.CheckViolationError, match="lone is unbalanced"):
        await conn.execute(
            """INSERT INTO ledger_postings (tx_id, account_id, amount)
               VALUES ('none', 'u:bob', -1), ('none', 'u:alice', 1), ('lone', 'u:bob', -1)"""
        )
    with pytest.raises(asyncpg.ForeignKeyViolationError, match="none"):
        await conn.execute(
            """INSERT INTO ledger_postings (tx_id, account_id, amount)
               VALUES ('none', 'u:bob', -1), ('none', 'u:alice', 1)"""
        )


async def test_the_projector_reads_a_pass_by_its_keys(conn: asyncpg.Connection) -> None:
    """A projector pass over a batch after LEDGER_ROWS folded ones reads the
    batch's postings (and a refund's original) by key."""
    await conn.execute(
        """UPDATE standing_watermark SET writer_xid = (SELECT max(writer_xid) FROM
               ledger_transactions), tx_id = 'old999999'"""
    )
    async with conn.transaction():
        await conn.execute(_BATCH)
    # Past the batch (the next xid to be handed out), not the snapshot's
    # xmin the projector uses: another client's open transaction on this
    # shared server would hold that back and leave nothing to fold.
    horizon = await conn.fetchval("SELECT pg_snapshot_xmax(pg_current_snapshot())::text")
    mark = await conn.fetchrow("SELECT writer_xid::text AS x, tx_id FROM standing_watermark")
    assert mark is not None
    plan = "\n".join(
        row[0]
        for row in await conn.fetch(
            "EXPLAIN " + _PROJECT_LEDGER, mark["x"], mark["tx_id"], horizon, 1000
        )
    )
    assert "ledger_postings_pkey" in plan
    assert "Seq Scan on ledger_postings" not in plan
    assert "Seq Scan on ledger_transactions" not in plan
    folded = await conn.fetchval(_PROJECT_LEDGER, mark["x"], mark["tx_id"], horizon, 1000)
    assert folded == 50
    tokens = await conn.fetchval(
        "SELECT tokens FROM standing_user_hourly WHERE user_id = 'bob' AND hour = 0"
    )
    assert tokens == 50  # the batch only: the older rows are behind the watermark
