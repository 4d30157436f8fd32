"""The ledger writer's cache of accounts known to exist (``KnownAccounts``):
a batch whose accounts it knows skips making them, and a cache that is
wrong (an account it remembers is not in Postgres) costs one refused
attempt, never an entry: the writer forgets, and the retry makes it. Against
real Redis and Postgres."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import asyncpg
import pytest

from tests.conftest import Http, Running, pg
from tokenchat.server.ledger.writer import KnownAccounts, LedgerWriter

pytestmark = pytest.mark.timeout(60)


def test_only_user_and_escrow_accounts_not_yet_known_are_made() -> None:
    known = KnownAccounts(limit=3)
    batch = ["u:bob", "u:alice", "esc:goal:g1", "sys:mint", "u:bob"]
    assert known.unknown(batch) == ["u:bob", "u:alice", "esc:goal:g1", "u:bob"]
    known.remember(["u:bob", "u:alice"])
    assert known.unknown(batch) == ["esc:goal:g1"]
    # Past its limit it starts afresh rather than grow.
    known.remember(["esc:goal:g1", "u:carol"])
    assert known.unknown(["u:bob", "u:carol"]) == ["u:bob"]
    known.forget()
    assert known.unknown(["u:carol"]) == ["u:carol"]


async def test_an_account_wrongly_known_costs_one_attempt(
    start_server: Callable[..., Awaitable[Running]],
) -> None:
    running = await start_server(ledger_enabled=0, durability="redis")  # the only writer
    node = running.node
    http = Http(running)
    writer = LedgerWriter(node.settings, node.pool, node.economy, "test")
    try:
        await http.credit("bob", 100)
        assert await writer.step(block=False) == 1
        # Known now: bob's next credit does not make the account again.
        await http.credit("bob", 5)
        assert await writer.step(block=False) == 1

        # carol is "known" but not in Postgres (a database restored from a
        # backup older than the writer's memory).
        writer._accounts.remember(["u:carol"])
        credited = await http.credit("carol", 7)
        with pytest.raises(asyncpg.ForeignKeyViolationError):
            await writer.step(block=False)
        assert await writer.step(block=False) == 1, "the retry makes carol's account"
    finally:
        await writer.close()

    rows = await pg(
        node.settings, "SELECT id, balance FROM accounts WHERE id IN ('u:bob', 'u:carol')"
    )
    assert {row["id"]: row["balance"] for row in rows} == {"u:bob": 105, "u:carol": 7}
    ledger = await pg(
        node.settings, "SELECT id FROM ledger_transactions WHERE id = $1", credited["tx"]
    )
    assert len(ledger) == 1
    result = await http.reconcile()
    assert result["ok"] is True, result
