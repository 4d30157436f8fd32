"""The token economy under adversity: a ledger writer killed between COMMIT and
XACK, Postgres dying mid-run, Redis losing everything, a bank-style run of
concurrent retried spends, and connections killed in the middle of a command.

Whatever happens, the books must balance: every acknowledged spend is in the
Postgres ledger exactly once, no key is charged twice, a spend answered with an
error moved nothing, and after the writer drains, Redis and Postgres agree.
"""

from __future__ import annotations

import asyncio
import random
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from redis.asyncio import Redis

from tests.conftest import Http, Running, eventually, pg
from tests.proxy import Proxy
from tokenchat.client_demo.client import Client
from tokenchat.server.config import Settings
from tokenchat.server.economy.economy import Economy
from tokenchat.server.gateway.node import Node
from tokenchat.server.keys import Keys
from tokenchat.server.ledger.writer import GROUP, LedgerWriter, RedisReset

pytestmark = pytest.mark.timeout(60)

# Seconds a drain may take; each test needs well under a second of it.
DRAIN_TIMEOUT_S = 10.0
# How long the writer gets to empty the outbox once Postgres is back: its
# retry backoff is at most 5 s, plus a batch or two.
RECOVERY_TIMEOUT_S = 15.0


# --- helpers ------------------------------------------------------------------------------


async def ledger_tx_ids(settings: Settings, *kinds: str) -> list[str]:
    """Every transaction id in the ledger (of the given kinds), with repeats."""
    rows = await pg(
        settings,
        "SELECT id FROM ledger_transactions WHERE cardinality($1::text[]) = 0 OR kind = ANY($1)",
        list(kinds),
    )
    return [row["id"] for row in rows]


async def postgres_balances(settings: Settings) -> dict[str, int]:
    rows = await pg(settings, "SELECT id, balance FROM accounts")
    return {row["id"]: row["balance"] for row in rows}


async def assert_books_balance(settings: Settings) -> dict[str, int]:
    """The ledger's own invariants; returns the Postgres balances."""
    unbalanced = await pg(
        settings,
        """SELECT t.id, count(p.*) AS legs, coalesce(sum(p.amount), 0) AS total
           FROM ledger_transactions t LEFT JOIN ledger_postings p ON p.tx_id = t.id
           GROUP BY t.id HAVING count(p.*) <> 2 OR coalesce(sum(p.amount), 0) <> 0""",
    )
    assert unbalanced == [], "every transaction is two postings summing to zero"
    drifted = await pg(
        settings,
        """SELECT a.id, a.balance, coalesce(sum(p.amount), 0) AS postings
           FROM accounts a LEFT JOIN ledger_postings p ON p.account_id = a.id
           GROUP BY a.id HAVING a.balance <> coalesce(sum(p.amount), 0)""",
    )
    assert drifted == [], "accounts.balance is the sum of the account's postings"
    assert await pg(settings, "SELECT * FROM ledger_rejected") == []
    balances = await postgres_balances(settings)
    assert sum(balances.values()) == 0, balances
    assert all(v >= 0 for k, v in balances.items() if k != "sys:mint"), balances
    return balances


async def assert_reconciled(http: Http) -> dict[str, Any]:
    result = await http.reconcile()
    assert result["ok"] is True and result["pending"] == 0, result
    assert result["mismatches"] == [] and result["rejected"] == 0, result
    return result


async def outbox_len(redis: Redis, settings: Settings) -> int:
    return int(await redis.xlen(Keys(settings.redis_prefix).outbox()))


async def model_and_fans(
    running: Running, http: Http, model: str, fans: dict[str, int], dm_price: int = 0
) -> tuple[Client, dict[str, Client], set[str]]:
    """The model in her room, each fan credited and joined, and the credits' tx ids."""
    host = await running.client(model, "model")
    await host.call("join", room=model)
    if dm_price:
        status, _ = await http.call("PUT", "/v1/me/prices", model, "model", dm=dm_price)
        assert status == 200
    clients = {}
    credits = set()
    for fan, tokens in fans.items():
        credits.add((await http.credit(fan, tokens, key=f"credit-{fan}"))["tx"])
        clients[fan] = await running.client(fan)
        await clients[fan].call("join", room=model)
    return host, clients, credits


async def close_all(*clients: Client) -> None:
    for client in clients:
        await client.close()


# --- 1. a writer killed between COMMIT and XACK -------------------------------------------


class WriterKilled(Exception):
    """Stands for SIGKILL: the process is gone, its entries unacknowledged."""


class KilledBeforeAck(LedgerWriter):
    """Commits its batch to Postgres, then dies before XACK."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.unacked: list[str] = []

    async def _ack(self, ids: list[str], **notify: list[str]) -> None:
        self.unacked += ids
        raise WriterKilled(f"killed before acknowledging {len(ids)} entries")


async def test_writer_killed_between_commit_and_ack_doubles_nothing(
    start_server: Callable[..., Awaitable[Running]], redis: Redis
) -> None:
    # This test is the only writer; spends are acknowledged by Redis (the
    # writer's own guarantees are what it checks).
    running = await start_server(ledger_enabled=0, durability="redis")
    node = running.node
    http = Http(running)
    model, fans, credits = await model_and_fans(running, http, "alice", {"bob": 100}, dm_price=3)
    fan = fans["bob"]
    assert await ledger_tx_ids(node.settings) == [], "nothing is written while no writer runs"
    acked = set(credits)
    assert (await http.credit("bob", 100, key="credit-bob"))["duplicate"] is True
    for n in range(5):
        acked.add((await fan.call("tip", room="alice", amount=n + 1, key=f"t{n}"))["tx"])
    acked.add((await fan.call("dm", to="alice", text="hi", key="d0"))["tx"])
    outbox = node.keys.outbox()
    assert await redis.xlen(outbox) == 7

    # The first writer takes 4 entries, commits them, and dies before XACK.
    first = KilledBeforeAck(
        node.settings.replace(ledger_batch_max=4), node.pool, node.economy, "w1"
    )
    try:
        with pytest.raises(WriterKilled):
            await first.step(block=False)
    finally:
        await first.close()
    assert len(first.unacked) == 4
    assert len(await ledger_tx_ids(node.settings)) == 4, "the batch was committed"
    assert await redis.xlen(outbox) == 7, "and is still in Redis"
    pending = await redis.xpending(outbox, GROUP)
    assert pending["pending"] == 4
    assert pending["consumers"] == [{"name": b"w1", "pending": 4}]

    # A second writer claims those stale entries, writes them again, and dies too.
    second = KilledBeforeAck(node.settings, node.pool, node.economy, "w2")
    try:
        with pytest.raises(WriterKilled):
            await second.step(block=False, claim_idle_ms=0)
    finally:
        await second.close()
    assert sorted(second.unacked) == sorted(first.unacked), "it re-delivered the stale ones"
    assert len(await ledger_tx_ids(node.settings)) == 4, "ON CONFLICT: nothing doubled"

    # Spends go on meanwhile; a healthy writer then drains everything.
    for n in range(5, 8):
        acked.add((await fan.call("tip", room="alice", amount=n + 1, key=f"t{n}"))["tx"])
    third = LedgerWriter(node.settings, node.pool, node.economy, "w3")
    try:
        assert await third.drain(DRAIN_TIMEOUT_S) == 0
    finally:
        await third.close()
    assert await redis.xlen(outbox) == 0
    assert (await redis.xpending(outbox, GROUP))["pending"] == 0
    ids = await ledger_tx_ids(node.settings)
    assert len(ids) == len(set(ids)) == len(acked) and set(ids) == acked
    balances = await assert_books_balance(node.settings)
    spent = sum(range(1, 9)) + 3
    assert balances["u:bob"] == 100 - spent and balances["u:alice"] == spent
    assert balances["sys:mint"] == -100
    assert (await fan.call("balance"))["balance"] == 100 - spent
    await assert_reconciled(http)
    await close_all(fan, model)


async def test_a_live_writer_takes_over_a_dead_writers_entries(
    start_server: Callable[..., Awaitable[Running]], redis: Redis
) -> None:
    running = await start_server(ledger_enabled=0, durability="redis")
    node = running.node
    http = Http(running)
    model, fans, _ = await model_and_fans(running, http, "alice", {"bob": 50})
    for n in range(3):
        await fans["bob"].call("tip", room="alice", amount=5, key=f"t{n}")
    dead = KilledBeforeAck(node.settings, node.pool, node.economy, "dead")
    try:
        with pytest.raises(WriterKilled):
            await dead.step(block=False)
    finally:
        await dead.close()
    assert len(dead.unacked) == 4
    # The run loop (not drain) finds the entries idle past ledger_claim_idle_s.
    live = LedgerWriter(
        node.settings.replace(ledger_claim_idle_s=0.3, ledger_block_ms=100),
        node.pool,
        node.economy,
        "live",
    )
    task = asyncio.create_task(live.run())
    try:
        await eventually(lambda: _empty(redis, node.keys.outbox()), timeout_s=10)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await live.close()
    assert len(await ledger_tx_ids(node.settings)) == 4
    balances = await assert_books_balance(node.settings)
    assert balances["u:bob"] == 35 and balances["u:alice"] == 15
    await assert_reconciled(http)
    await close_all(fans["bob"], model)


async def _empty(redis: Redis, stream: str) -> bool:
    return int(await redis.xlen(stream)) == 0


# --- 2. Postgres away mid-run -------------------------------------------------------------


async def test_postgres_away_spends_go_on_and_the_outbox_catches_up(
    start_server: Callable[..., Awaitable[Running]],
    postgres_proxy: Proxy,
    redis: Redis,
    settings: Settings,
) -> None:
    # Durability `redis`: spends go on while Postgres is away (in `ledger`
    # mode they would wait for it: test_ledger_durability.py).
    running = await start_server(
        database_url=postgres_proxy.url, database_timeout_s=1.0, durability="redis"
    )
    node = running.node
    http = Http(running)
    names = {f"f{i}": 100 for i in range(4)}
    model, fans, acked = await model_and_fans(
        running, http, "alice", {**names, "cold": 100}, dm_price=4
    )
    other_model = await running.client("bea", "model")  # in Postgres; her prices not in Redis
    assert len(acked) == 5
    spent: dict[str, int] = defaultdict(int)
    for fan in [*names, "cold"]:  # loads every balance and price involved
        acked.add((await fans[fan].call("tip", room="alice", amount=3, key="pre-t"))["tx"])
        acked.add((await fans[fan].call("dm", to="alice", text="hi", key="pre-d"))["tx"])
        spent[fan] += 7
    await eventually(lambda: _empty(redis, node.keys.outbox()), timeout_s=RECOVERY_TIMEOUT_S)

    await postgres_proxy.cut()
    during = 0
    for round_ in range(3):
        for fan in names:
            reply = await fans[fan].call("tip", room="alice", amount=2, key=f"t{round_}")
            assert "duplicate" not in reply
            acked.add(reply["tx"])
            reply = await fans[fan].call("dm", to="alice", text="still here", key=f"d{round_}")
            acked.add(reply["tx"])
            spent[fan] += 6
            during += 2
    again = await fans["f0"].call("tip", room="alice", amount=2, key="t0")  # a retry
    assert again["duplicate"] is True
    assert await outbox_len(redis, settings) == during, "the outbox holds what Postgres lacks"
    for fan in names:
        assert (await fans[fan].call("balance"))["balance"] == 100 - spent[fan]

    # A balance Redis does not hold is never taken for zero: nothing moves.
    cold_key = node.keys.balance("u:cold")
    alice_before = await redis.get(node.keys.balance("u:alice"))
    await redis.delete(cold_key)
    refused = await fans["cold"].request("tip", room="alice", amount=1, key="cold-t")
    assert refused["code"] == "UNAVAILABLE", refused
    assert (await fans["cold"].request("balance"))["code"] == "UNAVAILABLE"
    refused = await fans["f1"].request("dm", to="bea", text="hello?", key="to-bea")
    assert refused["code"] == "UNAVAILABLE", refused
    assert await redis.exists(cold_key) == 0, "no balance was made up"
    assert await redis.get(node.keys.balance("u:alice")) == alice_before
    assert (await fans["f1"].call("balance"))["balance"] == 100 - spent["f1"]
    assert await outbox_len(redis, settings) == during

    await postgres_proxy.restore()
    # The writer empties the outbox by itself; no reconcile needed to push it.
    await eventually(lambda: _empty(redis, node.keys.outbox()), timeout_s=RECOVERY_TIMEOUT_S)
    # The refused keys were not burnt.
    acked.add((await fans["cold"].call("tip", room="alice", amount=1, key="cold-t"))["tx"])
    spent["cold"] += 1
    reply = await fans["f1"].call("dm", to="bea", text="hello?", key="to-bea")
    assert reply["price"] == 0 and reply["balance"] == 100 - spent["f1"]
    assert (await fans["cold"].call("balance"))["balance"] == 100 - spent["cold"]
    await assert_reconciled(http)
    ids = await ledger_tx_ids(settings)
    assert len(ids) == len(set(ids)) and set(ids) == acked
    balances = await assert_books_balance(settings)
    for fan in [*names, "cold"]:
        assert balances[f"u:{fan}"] == 100 - spent[fan]
    assert balances["u:alice"] == sum(spent.values())
    await close_all(*fans.values(), model, other_model)


# --- 3. Redis loses everything ------------------------------------------------------------


async def test_redis_flushed_balances_and_keys_come_back_from_postgres(
    start_server: Callable[..., Awaitable[Running]], private_redis: str, settings: Settings
) -> None:
    running = await start_server(redis_url=private_redis, ledger_enabled=0, durability="redis")
    http = Http(running)
    model, _, _ = await model_and_fans(running, http, "alice", {}, dm_price=6)
    credit = await http.credit("bob", 100, key="c1")
    fan = await running.client("bob")
    await fan.call("join", room="alice")
    tip = await fan.call("tip", room="alice", amount=10, key="t1", text="drained")
    dm = await fan.call("dm", to="alice", text="drained", key="d1")
    await assert_reconciled(http)  # drains: these three are durable now
    lost = await fan.call("tip", room="alice", amount=7, key="t2")  # never drained
    assert lost["balance"] == 77

    flusher: Redis = Redis.from_url(private_redis)
    try:
        await flusher.flushall()
    finally:
        await flusher.aclose()

    # The same keys retried: duplicates of the originals, nothing charged twice.
    again = await fan.call("tip", room="alice", amount=10, key="t1", text="drained")
    assert again == {**tip, "re": again["re"], "duplicate": True}
    again = await fan.call("dm", to="alice", text="drained", key="d1")
    assert again == {**dm, "re": again["re"], "duplicate": True}
    assert await http.credit("bob", 100, key="c1") == {**credit, "duplicate": True}
    # Balances are Postgres's: the undrained tip is gone from both sides.
    assert (await fan.call("balance"))["balance"] == 84
    status, me = await http.call("GET", "/v1/me", "bob")
    assert status == 200 and me["balance"] == 84
    assert (await model.call("balance"))["balance"] == 16
    durable = await postgres_balances(settings)
    assert durable["u:bob"] == 84 and durable["u:alice"] == 16
    # The lost key is not a duplicate of anything: it runs (once) now.
    redo = await fan.call("tip", room="alice", amount=7, key="t2")
    assert "duplicate" not in redo and redo["tx"] != lost["tx"] and redo["balance"] == 77
    assert (await fan.call("tip", room="alice", amount=7, key="t2"))["duplicate"] is True
    fresh = await fan.call("tip", room="alice", amount=5, key="t3")
    assert fresh["balance"] == 72
    await assert_reconciled(http)
    ids = await ledger_tx_ids(settings)
    assert sorted(ids) == sorted([credit["tx"], tip["tx"], dm["tx"], redo["tx"], fresh["tx"]])
    balances = await assert_books_balance(settings)
    assert balances["u:bob"] == 72 and balances["u:alice"] == 28
    await close_all(fan, model)


class FlushedMidBatch(Economy):
    """Flushes Redis while a writer's batch is in flight, and reloads a
    balance from Postgres before the batch could commit: the race the writer's
    epoch fence is there for."""

    def __init__(self, node: Node, reload_user: str) -> None:
        super().__init__(node.redis, node.pool, node.keys, node.settings)
        self.calls = 0
        self.reloaded: int | None = None
        self._reload_user = reload_user

    async def epoch(self, *, rebuilding_ok: bool = False) -> str:
        self.calls += 1
        if self.calls == 2:  # the writer's check before COMMIT
            await self._redis.flushall()
            self.reloaded = await self.balance(self._reload_user)
        return await super().epoch(rebuilding_ok=rebuilding_ok)


async def test_a_batch_in_flight_when_redis_is_flushed_is_not_committed(
    start_server: Callable[..., Awaitable[Running]], private_redis: str, settings: Settings
) -> None:
    running = await start_server(redis_url=private_redis, ledger_enabled=0, durability="redis")
    node = running.node
    http = Http(running)
    model, fans, _ = await model_and_fans(running, http, "alice", {"bob": 50})
    await assert_reconciled(http)
    await fans["bob"].call("tip", room="alice", amount=20, key="t1")
    economy = FlushedMidBatch(node, "bob")
    writer = LedgerWriter(node.settings, node.pool, economy, "fenced")
    try:
        with pytest.raises(RedisReset):
            await writer.step(block=False)
    finally:
        await writer.close()
    assert economy.reloaded == 50, "the reload saw Postgres without the tip"
    assert await ledger_tx_ids(settings, "tip") == [], "the batch was rolled back"
    assert (await fans["bob"].call("balance"))["balance"] == 50
    assert (await model.call("balance"))["balance"] == 0
    await fans["bob"].call("tip", room="alice", amount=20, key="t1")  # runs again, once
    await assert_reconciled(http)
    balances = await assert_books_balance(settings)
    assert balances["u:bob"] == 30 and balances["u:alice"] == 20
    await close_all(fans["bob"], model)


# --- 4. a bank-style run ------------------------------------------------------------------

BANK_SEED = 20240607
BANK_FANS = 20
BANK_MODELS = {"m0": 2, "m1": 5, "m2": 9}  # model -> DM price
BANK_OPS_PER_FAN = 30
BANK_SESSIONS_PER_FAN = 2
Op = tuple[str, dict[str, Any], str]  # command, its fields, how it is sent


async def test_bank_run_concurrent_retried_spends_balance_to_the_token(
    start_server: Callable[..., Awaitable[Running]], settings: Settings
) -> None:
    rng = random.Random(BANK_SEED)
    running = await start_server(commands_per_s=1000.0, commands_burst=1000)
    http = Http(running)
    models = {}
    for name, price in BANK_MODELS.items():
        models[name] = await running.client(name, "model")
        await models[name].call("join", room=name)
        status, _ = await http.call("PUT", "/v1/me/prices", name, "model", dm=price)
        assert status == 200
    credits = {f"fan{i:02}": rng.randint(40, 160) for i in range(BANK_FANS)}
    sessions: dict[str, list[Client]] = {}
    for fan, tokens in credits.items():
        await http.credit(fan, tokens, key=f"grant-{fan}")
        sessions[fan] = [await running.client(fan) for _ in range(BANK_SESSIONS_PER_FAN)]
        for session in sessions[fan]:
            for room in BANK_MODELS:
                await session.call("join", room=room)

    # Each fan's plan, drawn up front so the run is the same every time.
    plans: dict[str, list[Op]] = {}
    for fan in credits:
        plan: list[Op] = []
        for n in range(BANK_OPS_PER_FAN):
            model = rng.choice(list(BANK_MODELS))
            if rng.random() < 0.6:
                fields: dict[str, Any] = {
                    "room": model,
                    "amount": rng.randint(1, 25),
                    "text": f"tip {n}",
                }
                command = "tip"
            else:
                fields = {"to": model, "text": f"dm {n}"}
                if rng.random() < 0.5:
                    fields["max_price"] = BANK_MODELS[model]
                command = "dm"
            fields["key"] = f"{fan}-{n}"
            how = rng.choices(["once", "twice", "both-sessions"], [70, 15, 15])[0]
            plan.append((command, fields, how))
        plans[fan] = plan

    replies: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    commands: dict[tuple[str, str], tuple[str, dict[str, Any]]] = {}

    async def lane(fan: str, lane_no: int, ops: list[Op], lane_rng: random.Random) -> None:
        mine, other = sessions[fan][lane_no], sessions[fan][1 - lane_no]
        for command, fields, how in ops:
            commands[(fan, fields["key"])] = (command, fields)
            if how == "once":
                sent = [await mine.request(command, **fields)]
            elif how == "twice":  # the reply was "lost": the client sends it again
                sent = [
                    await mine.request(command, **fields),
                    await mine.request(command, **fields),
                ]
            else:  # a retry from another tab racing the first attempt
                sent = list(
                    await asyncio.gather(
                        mine.request(command, **fields), other.request(command, **fields)
                    )
                )
            replies[(fan, fields["key"])] += sent
            await asyncio.sleep(lane_rng.random() * 0.005)

    lanes = []
    for fan, plan in plans.items():
        for lane_no in range(BANK_SESSIONS_PER_FAN):
            ops = plan[lane_no::BANK_SESSIONS_PER_FAN]
            lanes.append(lane(fan, lane_no, ops, random.Random(rng.random())))
    async with asyncio.timeout(40):
        await asyncio.gather(*lanes)

    # Every key: all refused for lack of funds, or one charge and its duplicates.
    charged: dict[str, tuple[str, str, int]] = {}  # tx -> fan, model, price
    codes: dict[str, int] = defaultdict(int)
    for (fan, key), got in replies.items():
        command, fields = commands[(fan, key)]
        errors = [r for r in got if r["type"] == "error"]
        oks = [r for r in got if r["type"] == "ok"]
        for reply in errors:
            codes[reply["code"]] += 1
            assert reply["code"] == "INSUFFICIENT_FUNDS", reply
        if not oks:
            continue
        assert not errors, f"{key}: one attempt charged, another refused: {got}"
        originals = [r for r in oks if not r.get("duplicate")]
        assert len(originals) == 1, f"{key} was charged {len(originals)} times"
        original = originals[0]
        for dup in oks:
            if dup is not original:
                assert dup == {**original, "re": dup["re"], "duplicate": True}
        codes["ok"] += 1
        codes["duplicate"] += len(oks) - 1
        if command == "tip":
            charged[original["tx"]] = (fan, fields["room"], fields["amount"])
        else:
            assert original["price"] == BANK_MODELS[fields["to"]]
            charged[original["tx"]] = (fan, fields["to"], original["price"])
    assert codes["ok"] > 50 and codes["INSUFFICIENT_FUNDS"] > 20 and codes["duplicate"] > 20
    assert set(codes) == {"ok", "duplicate", "INSUFFICIENT_FUNDS"}
    print(f"bank run: {dict(codes)}")

    expected = {f"u:{fan}": tokens for fan, tokens in credits.items()}
    expected.update({f"u:{model}": 0 for model in BANK_MODELS})
    for fan, model, price in charged.values():
        expected[f"u:{fan}"] -= price
        expected[f"u:{model}"] += price
    assert all(v >= 0 for v in expected.values()), "the server let a fan overspend"
    for fan in credits:
        assert (await sessions[fan][0].call("balance"))["balance"] == expected[f"u:{fan}"]
    for name, client in models.items():
        assert (await client.call("balance"))["balance"] == expected[f"u:{name}"]

    result = await assert_reconciled(http)
    assert result["issued"] == sum(credits.values())
    spends = await ledger_tx_ids(settings, "tip", "dm")
    assert len(spends) == len(set(spends)) and set(spends) == set(charged)
    assert len(await ledger_tx_ids(settings, "credit")) == BANK_FANS
    balances = await assert_books_balance(settings)
    assert balances["sys:mint"] == -sum(credits.values())
    assert {k: v for k, v in balances.items() if k.startswith("u:")} == expected
    await close_all(*models.values(), *(s for fan in sessions.values() for s in fan))


# --- 5. a connection killed mid-command ---------------------------------------------------


async def send_and_abort(client: Client, command: str, *, whole: bool, **fields: Any) -> None:
    """Send a command (or only the first half of its frame), then kill the
    connection without reading the reply."""
    frame = client.codec.encode({"type": command, "id": 1, **fields})
    if whole:
        await client.ws.send(frame, text=True)
    else:
        client.ws.protocol.send_text(frame.encode() if isinstance(frame, str) else frame)
        data = b"".join(client.ws.protocol.data_to_send())
        client.ws.transport.write(data[: len(data) // 2])
    client.ws.transport.abort()
    await client.close()


async def test_connection_killed_mid_command_is_charged_exactly_once(
    start_server: Callable[..., Awaitable[Running]], private_redis: str, settings: Settings
) -> None:
    # Redis may be paused for a second here: no command may time out meanwhile.
    running = await start_server(redis_url=private_redis, redis_timeout_s=10.0)
    http = Http(running)
    model, fans, _ = await model_and_fans(running, http, "alice", {"bob": 1000})
    await fans["bob"].close()
    node = running.node
    bob_balance = node.keys.balance("u:bob")
    rng = random.Random(BANK_SEED)
    outcomes: dict[str, int] = defaultdict(int)
    balance = 1000
    charged: dict[str, str] = {}  # key -> tx

    async def retry(key: str, amount: int) -> dict[str, Any]:
        client = await running.client("bob")
        await client.call("join", room="alice")
        reply = await client.call("tip", room="alice", amount=amount, key=key)
        assert (await client.call("balance"))["balance"] == balance - amount
        await client.close()
        return reply

    # Deterministic: the tip is stuck in a paused Redis when its connection dies.
    client = await running.client("bob")
    await client.call("join", room="alice")
    await node.redis.execute_command("CLIENT", "PAUSE", "2000", "WRITE")  # type: ignore[no-untyped-call]
    frame = client.codec.encode({"type": "tip", "id": 1, "room": "alice", "amount": 9, "key": "p"})
    await client.ws.send(frame, text=True)

    async def tip_in_flight() -> bool:  # the server is handling it; Redis holds it
        return any(
            session._busy
            for session in node.sessions
            if session.identity is not None and session.identity.user_id == "bob"
        )

    await eventually(tip_in_flight, timeout_s=1.5)
    client.ws.transport.abort()
    await client.close()

    async def debited() -> bool:
        return int(await node.redis.get(bob_balance) or 0) == balance - 9

    await eventually(debited, timeout_s=5)  # applied once Redis resumes
    reply = await retry("p", 9)
    assert reply["duplicate"] is True, "the reply was lost, not the tip"
    balance -= 9
    charged["p"] = reply["tx"]

    # Aborted at once: the tip ran or it never did; the retry charges once either
    # way. Half a frame never runs: its retry is the first (fresh) charge.
    for n in range(16):
        amount = rng.randint(1, 20)
        whole = n % 2 == 0
        client = await running.client("bob")
        await client.call("join", room="alice")
        await asyncio.sleep(rng.random() * 0.002)
        await send_and_abort(client, "tip", whole=whole, room="alice", amount=amount, key=f"k{n}")
        reply = await retry(f"k{n}", amount)
        outcome = "duplicate" if reply.get("duplicate") else "fresh"
        outcomes[f"{'whole' if whole else 'half'} frame: {outcome}"] += 1
        balance -= amount
        charged[f"k{n}"] = reply["tx"]
    assert outcomes["half frame: fresh"] == 8, outcomes

    await assert_reconciled(http)
    rows = await pg(settings, "SELECT idem_key, id FROM ledger_transactions WHERE kind = 'tip'")
    assert {row["idem_key"]: row["id"] for row in rows} == charged
    assert len(rows) == len(charged)
    balances = await assert_books_balance(settings)
    assert balances["u:bob"] == balance and balances["u:alice"] == 1000 - balance
    print(f"aborted tips: {dict(outcomes)}")
    await model.close()
