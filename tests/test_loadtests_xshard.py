"""The cross-shard transfer prototype (loadtests/xshard.py) against two real
Redis servers of the test's own: a transfer applies once under retries, a dead
coordinator's transfer is voided or finished by the recovery, every shard's
ledger entries balance and match its balances, and the reconcile catches
money that one shard made."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from loadtests import xshard
from loadtests.xshard import Shard

FUNDS = 1_000  # tokens each payer starts with
PAYERS = ("u:fan1", "u:fan2", "u:fan3")
PAYEE = "u:model"
SHORT_TIMEOUT_MS = 1  # a pending transfer past its deadline at once
PAST_EVERY_DEADLINE_MS = 10**15  # ms since the epoch: year 33658


@pytest.fixture
async def shards(tmp_path: Path) -> AsyncIterator[tuple[Shard, Shard]]:
    """Shards a (the payers') and b (the payee's), each its own server."""
    from tokenchat.server.devstack.embedded import EmbeddedRedis

    servers = [EmbeddedRedis(tmp_path / name) for name in ("a", "b")]
    urls = [await asyncio.to_thread(server.start) for server in servers]
    a, b = Shard("a", Redis.from_url(urls[0])), Shard("b", Redis.from_url(urls[1]))
    try:
        for payer in PAYERS:
            await a.redis.set(a.balance(payer), FUNDS)
        yield a, b
    finally:
        await a.redis.aclose()
        await b.redis.aclose()
        for server in servers:
            await asyncio.to_thread(server.stop)


async def ledger_sums(shard: Shard) -> Counter[str]:
    """Each account's sum over the shard's outbox entries; every entry's
    postings sum to zero (asserted)."""
    sums: Counter[str] = Counter()
    for _, fields in await shard.redis.xrange(shard.outbox):
        parts = fields[b"postings"].decode().split()
        amounts = [int(x) for x in parts[1::2]]
        assert sum(amounts) == 0, parts
        for account, amount in zip(parts[0::2], amounts, strict=True):
            sums[account] += amount
    return sums


async def assert_books(a: Shard, b: Shard, settled: bool = True) -> None:
    """Every balance is its starting funds plus its ledger postings; no
    balance of a user below zero; the shards reconcile (and, once nothing is
    in flight, A's out:b is exactly B's in:a)."""
    for shard, start in ((a, dict.fromkeys(PAYERS, FUNDS)), (b, {})):
        sums = await ledger_sums(shard)
        for account in set(sums) | set(start):
            balance = await shard.read_balance(account)
            assert balance == start.get(account, 0) + sums[account], (shard.name, account)
            if account.startswith("u:"):
                assert balance >= 0
    result = await xshard.reconcile(a, b)
    assert result.ok, result
    if settled:
        assert result.in_flight == 0
        assert result.out_balance == -result.in_balance
        assert await a.read_balance("pending") == 0


async def test_a_transfer_retried_and_raced_applies_once(shards: tuple[Shard, Shard]) -> None:
    a, b = shards
    tx = xshard.transfer_id("u:fan1", "key-1")
    outcomes = await asyncio.gather(
        *(xshard.transfer(a, b, tx, "u:fan1", PAYEE, 7) for _ in range(5))
    )
    assert set(outcomes) == {"settled"}
    # A retry after it settled: answered, nothing moves.
    assert await xshard.transfer(a, b, tx, "u:fan1", PAYEE, 7) == "settled"
    assert await a.read_balance("u:fan1") == FUNDS - 7
    assert await b.read_balance(PAYEE) == 7
    assert await a.redis.xlen(a.outbox) == 2  # pending, post
    assert await b.redis.xlen(b.outbox) == 1  # credit
    await assert_books(a, b)


async def test_a_short_balance_moves_nothing(shards: tuple[Shard, Shard]) -> None:
    a, b = shards
    tx = xshard.transfer_id("u:fan1", "too-much")
    assert await xshard.transfer(a, b, tx, "u:fan1", PAYEE, FUNDS + 1) == "INSUFFICIENT_FUNDS"
    assert await a.read_balance("u:fan1") == FUNDS
    assert await a.redis.xlen(a.outbox) == 0
    await assert_books(a, b)


async def test_a_dead_coordinators_pending_transfer_is_voided_after_its_deadline(
    shards: tuple[Shard, Shard],
) -> None:
    a, b = shards
    tx = xshard.transfer_id("u:fan1", "crash-after-pending")
    reply = await xshard.pending(a, b, tx, "u:fan1", PAYEE, 5, xshard.PENDING_TIMEOUT_MS)
    assert reply == ["STATE", "pending"]
    assert await a.read_balance("u:fan1") == FUNDS - 5  # reserved
    # Before its deadline its coordinator may still post it: left alone.
    assert await xshard.recover(a, {"b": b}) == {"voided": 0, "credited": 0, "waiting": 1}
    counts = await xshard.recover(a, {"b": b}, now_ms=PAST_EVERY_DEADLINE_MS)
    assert counts == {"voided": 1, "credited": 0, "waiting": 0}
    assert await a.read_balance("u:fan1") == FUNDS
    # The coordinator wakes up and posts: too late, nothing is credited.
    assert await xshard.resolve(a, tx, "u:fan1", "b", "post", "coordinator") == "voided"
    assert await xshard.transfer(a, b, tx, "u:fan1", PAYEE, 5) == "voided"
    assert await b.read_balance(PAYEE) == 0
    await assert_books(a, b)


async def test_a_post_after_the_deadline_voids(shards: tuple[Shard, Shard]) -> None:
    a, b = shards
    tx = xshard.transfer_id("u:fan2", "slow")
    await xshard.pending(a, b, tx, "u:fan2", PAYEE, 3, SHORT_TIMEOUT_MS)
    await asyncio.sleep(0.05)
    assert await xshard.resolve(a, tx, "u:fan2", "b", "post", "coordinator") == "voided"
    assert await a.read_balance("u:fan2") == FUNDS
    await assert_books(a, b)


async def test_a_posted_transfer_is_credited_by_the_recovery(shards: tuple[Shard, Shard]) -> None:
    a, b = shards
    tx = xshard.transfer_id("u:fan1", "crash-after-post")
    await xshard.pending(a, b, tx, "u:fan1", PAYEE, 9, xshard.PENDING_TIMEOUT_MS)
    assert await xshard.resolve(a, tx, "u:fan1", "b", "post", "coordinator") == "posted"
    # In flight: A has sent 9 that B has not received; the books still reconcile.
    await assert_books(a, b, settled=False)
    assert (await xshard.reconcile(a, b)).in_flight == 9
    assert await xshard.recover(a, {"b": b}) == {"voided": 0, "credited": 1, "waiting": 0}
    assert await xshard.recover(a, {"b": b}) == {"voided": 0, "credited": 0, "waiting": 0}
    assert await b.read_balance(PAYEE) == 9
    await assert_books(a, b)


async def test_a_credit_run_twice_by_coordinator_and_recovery_counts_once(
    shards: tuple[Shard, Shard],
) -> None:
    a, b = shards
    tx = xshard.transfer_id("u:fan3", "crash-after-credit")
    await xshard.pending(a, b, tx, "u:fan3", PAYEE, 4, xshard.PENDING_TIMEOUT_MS)
    await xshard.resolve(a, tx, "u:fan3", "b", "post", "coordinator")
    assert (await xshard.credit(b, a, tx, PAYEE, 4))[0] == "OK"
    # The coordinator died before settling; the recovery credits again.
    assert await xshard.recover(a, {"b": b}) == {"voided": 0, "credited": 1, "waiting": 0}
    assert await b.read_balance(PAYEE) == 4
    await assert_books(a, b)


async def test_reconcile_catches_a_credit_nobody_posted(shards: tuple[Shard, Shard]) -> None:
    a, b = shards
    await xshard.credit(b, a, "x-forged", PAYEE, 50)
    result = await xshard.reconcile(a, b)
    assert not result.ok
    assert result.credited_not_posted == ["x-forged"]


async def test_random_crashes_then_recovery_keep_every_invariant(
    shards: tuple[Shard, Shard],
) -> None:
    """Transfers whose coordinator stops after a random step (or never),
    some retried, then one recovery past every deadline: every transfer is
    settled or voided, tokens are neither made nor lost, and the books hold."""
    a, b = shards
    rng = random.Random(16)
    expected_payee = 0
    for number in range(60):
        payer = rng.choice(PAYERS)
        amount = rng.randint(1, 40)
        tx = xshard.transfer_id(payer, f"k{number}")
        stop_after = rng.choice(("pending", "post", "credit", "none"))
        reply = await xshard.pending(a, b, tx, payer, PAYEE, amount, xshard.PENDING_TIMEOUT_MS)
        if reply[0] != "STATE":
            continue  # short of funds: nothing moved
        posted = False
        if stop_after != "pending":
            posted = await xshard.resolve(a, tx, payer, "b", "post", "coordinator") == "posted"
            if stop_after != "post":
                await xshard.credit(b, a, tx, PAYEE, amount)
                if stop_after == "none":
                    await xshard.settle(a, tx)
        if posted:
            expected_payee += amount
        if rng.random() < 0.3:  # the fan's client retries the same tip
            await xshard.pending(a, b, tx, payer, PAYEE, amount, xshard.PENDING_TIMEOUT_MS)
    await assert_books(a, b, settled=False)
    await xshard.recover(a, {"b": b}, now_ms=PAST_EVERY_DEADLINE_MS)
    assert await a.redis.zcard(a.unsettled) == 0
    assert await b.read_balance(PAYEE) == expected_payee
    payers_total = sum([await a.read_balance(p) for p in PAYERS])
    assert payers_total + expected_payee == FUNDS * len(PAYERS)
    await assert_books(a, b)
