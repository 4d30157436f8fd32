"""What the postings' foreign keys guaranteed, checked once per statement
since migration 0023, against a real Postgres: a posting naming a ledger
transaction or an account that does not exist is refused with
foreign_key_violation and nothing is written; accounts cannot be deleted;
a second refund of one transaction is still refused (the partial unique
index on `reverses`)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest

from tokenchat.server.config import Settings


@pytest.fixture
async def conn(settings: Settings) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(settings.database_url)
    await connection.execute(f'SET search_path TO "{settings.database_schema}"')
    await connection.execute(
        """INSERT INTO accounts (id, kind, balance) VALUES
               ('u:bob', 'user', 100), ('u:alice', 'user', 0)"""
    )
    try:
        yield connection
    finally:
        await connection.close()


async def _transaction(
    conn: asyncpg.Connection, tx: str, kind: str = "tip", reverses: str | None = None
) -> None:
    await conn.execute(
        """INSERT INTO ledger_transactions
               (id, kind, initiator, idem_key, reverses, request, reply, applied_ms, outbox_id)
           VALUES ($1, $2, 'u:bob', $1, $3, '{}', '{}', 0, $1)""",
        tx,
        kind,
        reverses,
    )


async def _counts(conn: asyncpg.Connection) -> tuple[int, int]:
    row = await conn.fetchrow(
        """SELECT (SELECT count(*) FROM ledger_transactions) AS txs,
                  (SELECT count(*) FROM ledger_postings) AS postings"""
    )
    assert row is not None
    return row["txs"], row["postings"]


async def test_a_posting_naming_no_account_is_refused(conn: asyncpg.Connection) -> None:
    with pytest.raises(asyncpg.ForeignKeyViolationError) as refused:
        async with conn.transaction():
            await _transaction(conn, "tx1")
            await conn.execute(
                """INSERT INTO ledger_postings (tx_id, account_id, amount)
                   VALUES ('tx1', 'u:bob', -5), ('tx1', 'u:nobody', 5)"""
            )
    assert refused.value.constraint_name == "ledger_postings_account_id_fkey"
    assert "u:nobody" in str(refused.value)
    assert await _counts(conn) == (0, 0)


async def test_a_posting_naming_no_transaction_is_refused(conn: asyncpg.Connection) -> None:
    with pytest.raises(asyncpg.ForeignKeyViolationError) as refused:
        await conn.execute(
            """INSERT INTO ledger_postings (tx_id, account_id, amount)
               VALUES ('tx-none', 'u:bob', -5), ('tx-none', 'u:alice', 5)"""
        )
    assert refused.value.constraint_name == "ledger_postings_tx_id_fkey"
    assert await _counts(conn) == (0, 0)


async def test_balanced_postings_naming_both_are_taken(conn: asyncpg.Connection) -> None:
    async with conn.transaction():
        await _transaction(conn, "tx1")
        await conn.execute(
            """INSERT INTO ledger_postings (tx_id, account_id, amount)
               VALUES ('tx1', 'u:bob', -5), ('tx1', 'u:alice', 5)"""
        )
    assert await _counts(conn) == (1, 2)
    # Unbalanced is still refused first, with check_violation (0005).
    with pytest.raises(asyncpg.CheckViolationError):
        async with conn.transaction():
            await _transaction(conn, "tx2")
            await conn.execute(
                """INSERT INTO ledger_postings (tx_id, account_id, amount)
                   VALUES ('tx2', 'u:bob', -5)"""
            )
    assert await _counts(conn) == (1, 2)


async def test_accounts_are_never_deleted(conn: asyncpg.Connection) -> None:
    """The key used to refuse deleting an account a posting names; now no
    account is deleted, named or not."""
    for statement in (
        "DELETE FROM accounts WHERE id = 'u:alice'",
        "DELETE FROM accounts",
        "TRUNCATE accounts CASCADE",
    ):
        with pytest.raises(asyncpg.RaiseError, match="append-only"):
            await conn.execute(statement)
    assert await conn.fetchval("SELECT count(*) FROM accounts WHERE id LIKE 'u:%'") == 2


async def test_one_refund_per_transaction(conn: asyncpg.Connection) -> None:
    await _transaction(conn, "tx1")
    await _transaction(conn, "r1", "refund", "tx1")
    with pytest.raises(asyncpg.UniqueViolationError):
        await _transaction(conn, "r2", "refund", "tx1")
    # What the writer relies on: ON CONFLICT DO NOTHING skips the second.
    inserted = await conn.fetchval(
        """WITH i AS (
               INSERT INTO ledger_transactions
                   (id, kind, initiator, idem_key, reverses, request, reply, applied_ms,
                    outbox_id)
               VALUES ('r3', 'refund', 'u:bob', 'r3', 'tx1', '{}', '{}', 0, 'r3')
               ON CONFLICT DO NOTHING RETURNING 1)
           SELECT count(*) FROM i"""
    )
    assert inserted == 0
