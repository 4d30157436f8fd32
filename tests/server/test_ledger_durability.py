"""Durability `ledger` (the default): a spend is answered once its ledger row
is committed in Postgres, so Redis losing its data at any moment loses nothing
acknowledged; and a Redis that comes back older than the ledger is rebuilt
from Postgres before it takes another spend.

The tests here start the server without its own ledger writer and run one
themselves, so that they decide when a commit can happen.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from redis.asyncio import Redis

from tests.conftest import Http, Running, eventually, pg
from tokenchat.client_demo.client import Client
from tokenchat.server.gateway.node import Node
from tokenchat.server.keys import Keys
from tokenchat.server.ledger.writer import GROUP, LedgerWriter

pytestmark = pytest.mark.timeout(60)

# A spend waits this long for its row in these tests (production: 5 s).
ACK_TIMEOUT_S = 1.0
# How long a reply may take once a writer runs: one batch, well under this.
COMMITTED_REPLY_S = 5.0


@contextlib.asynccontextmanager
async def writer_running(node: Node, consumer: str = "test-writer") -> AsyncIterator[None]:
    """A ledger writer of the test's own, for as long as the block lasts."""
    writer = LedgerWriter(node.settings, node.pool, node.economy, consumer)
    task = asyncio.create_task(writer.run())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await writer.close()


async def start(start_server: Callable[..., Awaitable[Running]], **settings: object) -> Running:
    overrides: dict[str, object] = {"ledger_ack_timeout_s": ACK_TIMEOUT_S, **settings}
    return await start_server(ledger_enabled=0, durability="ledger", **overrides)


async def room_with_fan(running: Running, http: Http, fan: str, tokens: int) -> Client:
    """The model alice in her room, and ``fan`` credited and joined."""
    host = await running.client("alice", "model")
    await host.call("join", room="alice")
    async with writer_running(running.node):
        await http.credit(fan, tokens, key=f"credit-{fan}")
    client = await running.client(fan)
    await client.call("join", room="alice")
    return client


async def rewind_outbox(redis: Redis, keys: Keys) -> None:
    """Make the drained outbox stream the one a Redis restored from an older
    append-only file holds: its last ID back at 1-0, the writers' group kept.

    XSETID can't move a stream's last ID below the highest ID it ever
    deleted (Redis 7+, Valkey), and the writer deletes what it committed: so
    the stream is made anew.
    """
    assert await redis.xlen(keys.outbox()) == 0, "drain the outbox first"
    await redis.delete(keys.outbox())
    await redis.xgroup_create(keys.outbox(), GROUP, id="0", mkstream=True)
    await redis.execute_command("XSETID", keys.outbox(), "1-0")


async def ledger_ids(running: Running) -> set[str]:
    rows = await pg(running.node.settings, "SELECT id FROM ledger_transactions")
    return {row["id"] for row in rows}


async def test_a_tip_is_answered_only_once_its_row_is_committed(
    start_server: Callable[..., Awaitable[Running]],
) -> None:
    running = await start(start_server)
    fan = await room_with_fan(running, Http(running), "bob", 100)
    tip = asyncio.create_task(fan.request("tip", room="alice", amount=7, key="t1"))
    await asyncio.sleep(ACK_TIMEOUT_S / 2)
    assert not tip.done(), "no writer runs: the tip cannot have been committed"
    async with writer_running(running.node):
        reply = await asyncio.wait_for(tip, COMMITTED_REPLY_S)
    assert reply["type"] == "ok" and reply["balance"] == 93, reply
    assert reply["tx"] in await ledger_ids(running), "answered ok: in the ledger"


async def test_a_wait_that_times_out_is_unavailable_and_a_retry_learns_the_outcome(
    start_server: Callable[..., Awaitable[Running]],
) -> None:
    running = await start(start_server)
    fan = await room_with_fan(running, Http(running), "bob", 100)
    reply = await fan.request("tip", room="alice", amount=7, key="t1")
    assert reply["type"] == "error" and reply["code"] == "UNAVAILABLE", reply
    assert "outcome is unknown" in reply["message"] and "same key" in reply["message"]
    # A retry before the commit waits too: a duplicate cannot be answered ok
    # while the original's row is not in the ledger.
    retry = await fan.request("tip", room="alice", amount=7, key="t1")
    assert retry["type"] == "error" and retry["code"] == "UNAVAILABLE", retry
    async with writer_running(running.node):
        retry = await fan.request("tip", room="alice", amount=7, key="t1")
    assert retry["type"] == "ok" and retry.get("duplicate") is True, retry
    assert retry["balance"] == 93, "charged once"
    assert retry["tx"] in await ledger_ids(running)


async def test_a_duplicate_in_flight_waits_for_the_originals_commit(
    start_server: Callable[..., Awaitable[Running]],
) -> None:
    running = await start(start_server, ledger_ack_timeout_s=10.0)
    http = Http(running)
    fan = await room_with_fan(running, http, "bob", 100)
    other_session = await running.client("bob")
    await other_session.call("join", room="alice")
    first = asyncio.create_task(fan.request("tip", room="alice", amount=5, key="same"))
    await asyncio.sleep(0.2)
    second = asyncio.create_task(other_session.request("tip", room="alice", amount=5, key="same"))
    await asyncio.sleep(0.3)
    assert not first.done() and not second.done()
    async with writer_running(running.node):
        one, two = await asyncio.wait_for(asyncio.gather(first, second), COMMITTED_REPLY_S)
    assert one["type"] == two["type"] == "ok", (one, two)
    assert one["tx"] == two["tx"] and two.get("duplicate") is True
    assert (await fan.call("balance"))["balance"] == 95


async def test_a_free_dm_has_no_row_and_is_answered_at_once(
    start_server: Callable[..., Awaitable[Running]],
) -> None:
    running = await start(start_server)
    fan = await room_with_fan(running, Http(running), "bob", 10)
    reply = await asyncio.wait_for(
        fan.call("dm", to="alice", text="hi", key="d1"), ACK_TIMEOUT_S / 2
    )
    assert reply["price"] == 0


async def test_a_spend_the_ledger_parks_is_answered_so(
    start_server: Callable[..., Awaitable[Running]],
) -> None:
    running = await start(start_server, ledger_ack_timeout_s=10.0)
    node = running.node
    fan = await room_with_fan(running, Http(running), "bob", 100)
    # A constraint of the test's own makes Postgres refuse this one key for
    # its data, as it would a value the door let through by mistake.
    await pg(
        node.settings,
        "ALTER TABLE ledger_transactions ADD CONSTRAINT test_refuse CHECK (idem_key <> 'refused')",
    )
    async with writer_running(node):
        reply = await asyncio.wait_for(
            fan.request("tip", room="alice", amount=3, key="refused"), COMMITTED_REPLY_S
        )
        assert reply["type"] == "error" and reply["code"] == "INTERNAL", reply
        assert "parked" in reply["message"], reply
        ok = await asyncio.wait_for(
            fan.call("tip", room="alice", amount=3, key="fine"), COMMITTED_REPLY_S
        )
    assert ok["tx"] in await ledger_ids(running), "the ledger goes on"
    parked = await pg(node.settings, "SELECT tx_id FROM ledger_rejected")
    assert [row["tx_id"] for row in parked] != []


async def test_a_redis_wipe_loses_no_acknowledged_spend(
    start_server: Callable[..., Awaitable[Running]], private_redis: str
) -> None:
    running = await start(start_server, redis_url=private_redis)
    node = running.node
    fan = await room_with_fan(running, Http(running), "bob", 100)
    async with writer_running(node):
        acked = [await fan.call("tip", room="alice", amount=n, key=f"t{n}") for n in range(1, 6)]
        await node.redis.flushall()
        # Every acknowledged tip survived: the balance comes back from Postgres,
        # and a retried key is answered from the ledger, not charged again.
        assert (await fan.call("balance"))["balance"] == 100 - 15
        retry = await fan.call("tip", room="alice", amount=3, key="t3")
    assert retry.get("duplicate") is True and retry["tx"] == acked[2]["tx"]
    assert (await fan.call("balance"))["balance"] == 85
    assert {reply["tx"] for reply in acked} <= await ledger_ids(running)


async def test_a_redis_older_than_the_ledger_is_rebuilt_before_it_takes_a_spend(
    start_server: Callable[..., Awaitable[Running]], private_redis: str
) -> None:
    running = await start(start_server, redis_url=private_redis)
    node = running.node
    keys = Keys(node.settings.redis_prefix)
    fan = await room_with_fan(running, Http(running), "bob", 100)
    async with writer_running(node):
        lost = await fan.call("tip", room="alice", amount=60, key="spent")
    assert lost["balance"] == 40
    # Redis goes back in time, its epoch unchanged, as when AOF everysec loses
    # its last second: the tip is gone from it (balance, key, outbox position)
    # but not from the ledger; and it forgot its scripts, as a restart does.
    redis: Redis = node.redis
    await redis.set(keys.balance("u:bob"), 100)
    await redis.set(keys.balance("u:alice"), 0)
    await redis.delete(keys.idempotency("u:bob", "spent"))
    await rewind_outbox(redis, keys)
    await redis.script_flush()
    epoch = await redis.get(keys.epoch())

    async with writer_running(node):
        # On the stale balance this would pass; rebuilt from Postgres it cannot.
        again = await fan.request("tip", room="alice", amount=60, key="spent-again")
        assert again["type"] == "error" and again["code"] == "INSUFFICIENT_FUNDS", again
        assert (await fan.call("balance"))["balance"] == 40
        retry = await fan.call("tip", room="alice", amount=60, key="spent")
        assert retry.get("duplicate") is True and retry["tx"] == lost["tx"]
    assert await redis.get(keys.epoch()) != epoch, "rebuilt behind a new epoch"
    result = await Http(running).reconcile()
    assert result["ok"] is True and result["mismatches"] == [], result


async def test_the_writer_does_not_linger_in_ledger_mode(
    start_server: Callable[..., Awaitable[Running]],
) -> None:
    # A linger of 10 s would hold every acknowledgement behind the batch
    # before it; group commit starts the next batch at once.
    running = await start(start_server, ledger_linger_ms=10_000)
    fan = await room_with_fan(running, Http(running), "bob", 100)
    async with writer_running(running.node):
        for n in range(3):
            await asyncio.wait_for(
                fan.call("tip", room="alice", amount=1, key=f"t{n}"), COMMITTED_REPLY_S / 2
            )

    async def drained() -> bool:
        return await running.node.ledger.pending() == 0

    await eventually(drained)
