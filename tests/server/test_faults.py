"""Fault tests: a storm of tips while something dies, then the books close.

Each test runs ``tokenchat serve`` against a Redis and a PostgreSQL of its own
(``tests/server/servers.py``), never the shared ones, drives many fans tipping
at once, breaks something in the middle, and ends with the same checks:

- every acknowledged tip is in Postgres exactly once (the clients' tx ids are
  the ledger's tip ids, no more, no fewer);
- every balance is its credit minus its acknowledged tips (the model's is
  their sum), and reconcile finds Redis and Postgres equal with nothing
  pending.

A tip whose outcome the client could not learn (the connection dropped, the
reply timed out, or it was answered UNAVAILABLE) is retried after recovery
with the same key and fields, as a client does, until it is answered ``ok``
(it may be a duplicate of one applied before the fault) or refused for good;
only then is it counted. The tests hold in both durability modes
(``TOKENCHAT_DURABILITY``): in ``redis`` acknowledgements come from Redis, in
``ledger`` from the Postgres commit. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from tests.conftest import JWT_SECRET, token
from tests.server.proc import ServerProcess, serve, wait_for, worker_pids
from tests.server.servers import PostgresServer, RedisServer, postgres_server, redis_server
from tokenchat.client_demo.client import Client, CommandError
from tokenchat.server.config import Settings

pytestmark = pytest.mark.timeout(90)

DURABILITY_MODES = ("redis", "ledger")
SCHEMA = "tokenchat"
ROOM = "alice"  # the model alice's room
FANS = 12
# A fan tips at most once per interval, so the storm lasts as long as the
# fault does rather than as long as the CPU allows, and stops at the cap.
TIP_INTERVAL_S = 0.02
TIPS_PER_FAN_MAX = 1000
# Enough for every tip (at most 5 tokens each): no tip is refused for funds.
CREDIT = 5 * TIPS_PER_FAN_MAX
# The fault comes once this many tips are acknowledged: well into the storm.
FAULT_AFTER_ACKED = FANS * 10
# After the fault the storm goes on until this many more are acknowledged:
# the server recovered while under load, before unknown outcomes are settled.
ACKED_AFTER_FAULT = FANS * 10
# How long Postgres stays down, and Redis after its kill -9.
POSTGRES_DOWN_S = 2.0
REDIS_DOWN_S = 1.0
# A reply slower than this is an unknown outcome (retried after recovery).
REPLY_TIMEOUT_S = 8.0
# How long a fan keeps trying to reconnect, and recovery (retries, drain) may take.
# Recovery takes a few seconds on an idle machine; the margin is for a CI
# machine whose two cores are busy with the rest of the suite (20 s was once
# too short there for the writer to drain after Postgres came back).
RECOVERY_TIMEOUT_S = 60.0
RETRY_INTERVAL_S = 0.2
# Answers that say the outcome is unknown: retry with the same key.
UNKNOWN_CODES = frozenset({"UNAVAILABLE", "INTERNAL"})
SERVER_ENV = {
    # The storm must not trip the per-session rate limit.
    "TOKENCHAT_COMMANDS_PER_S": "1000",
    "TOKENCHAT_COMMANDS_BURST": "1000",
    # A dead worker's unacknowledged outbox entries are taken over after 1 s,
    # not the production 30 s.
    "TOKENCHAT_LEDGER_CLAIM_IDLE_S": "1",
    # A query to a Postgres that is down fails within the reply timeout.
    "TOKENCHAT_DATABASE_TIMEOUT_S": "2",
}


@dataclasses.dataclass(frozen=True)
class Tip:
    fan: str
    key: str
    amount: int

    def fields(self) -> dict[str, Any]:
        return {"room": ROOM, "amount": self.amount, "key": self.key}


@dataclasses.dataclass
class Books:
    """What the clients were told: the only truth a test may compare with."""

    acked: dict[str, tuple[Tip, str]] = dataclasses.field(default_factory=dict)  # key: tx
    unknown: dict[str, Tip] = dataclasses.field(default_factory=dict)
    refused: dict[str, str] = dataclasses.field(default_factory=dict)  # key: code
    lost_replies: int = 0  # tips whose connection or reply was lost

    def record(self, tip: Tip, reply: dict[str, Any]) -> None:
        if reply["type"] == "ok":
            self.unknown.pop(tip.key, None)
            previous = self.acked.get(tip.key)
            assert previous is None or previous[1] == reply["tx"], (tip, previous, reply)
            self.acked[tip.key] = (tip, reply["tx"])
        elif reply.get("code") in UNKNOWN_CODES:
            self.unknown[tip.key] = tip
        else:
            self.unknown.pop(tip.key, None)
            self.refused[tip.key] = reply["code"]

    def spent_by(self, fan: str) -> int:
        return sum(tip.amount for tip, _ in self.acked.values() if tip.fan == fan)


def fan_ids() -> list[str]:
    return [f"fan{i}" for i in range(FANS)]


async def connect_fan(server: ServerProcess, fan: str) -> Client:
    """A session that said hello and joined the room, retried until it works."""
    deadline = time.monotonic() + RECOVERY_TIMEOUT_S
    while True:
        client: Client | None = None
        try:
            client = await Client.connect(server.ws_url, open_timeout=2)
            await client.hello(token(fan))
            await client.call("join", room=ROOM)
            return client
        except (OSError, ConnectionClosed, InvalidHandshake, TimeoutError, CommandError):
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.close()
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(RETRY_INTERVAL_S)


async def send_tip(client: Client, tip: Tip) -> dict[str, Any] | None:
    """The reply, or None when the connection or the reply was lost."""
    try:
        return await client.request("tip", timeout_s=REPLY_TIMEOUT_S, **tip.fields())
    except (ConnectionError, ConnectionClosed, TimeoutError):
        return None


async def storm(server: ServerProcess, books: Books, stop: asyncio.Event) -> None:
    """Every fan tips, one tip at a time, all fans at once, until ``stop``."""

    async def fan_tips(fan: str) -> None:
        client = await connect_fan(server, fan)
        try:
            for n in range(TIPS_PER_FAN_MAX):
                if stop.is_set():
                    return
                await asyncio.sleep(TIP_INTERVAL_S)
                tip = Tip(fan, f"{fan}-{n}", 1 + n % 5)
                reply = await send_tip(client, tip)
                if reply is not None:
                    books.record(tip, reply)
                    continue
                books.unknown[tip.key] = tip
                books.lost_replies += 1
                with contextlib.suppress(Exception):
                    await client.close()
                client = await connect_fan(server, fan)
        finally:
            with contextlib.suppress(Exception):
                await client.close()

    await asyncio.gather(*(fan_tips(fan) for fan in fan_ids()))


async def settle_unknown(server: ServerProcess, books: Books) -> None:
    """Retry every tip of unknown outcome with its key until it is decided."""
    deadline = time.monotonic() + RECOVERY_TIMEOUT_S
    for fan in fan_ids():
        pending = [tip for tip in books.unknown.values() if tip.fan == fan]
        if not pending:
            continue
        client = await connect_fan(server, fan)
        try:
            for tip in pending:
                while tip.key in books.unknown:
                    assert time.monotonic() < deadline, f"{tip} still undecided"
                    reply = await send_tip(client, tip)
                    if reply is None:
                        books.lost_replies += 1
                        with contextlib.suppress(Exception):
                            await client.close()
                        client = await connect_fan(server, fan)
                        continue
                    books.record(tip, reply)
                    if tip.key in books.unknown:
                        await asyncio.sleep(RETRY_INTERVAL_S)
        finally:
            with contextlib.suppress(Exception):
                await client.close()


async def admin(server: ServerProcess, method: str, path: str, **body: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token('ops', 'admin')}"}
    async with httpx.AsyncClient(base_url=server.http_url, timeout=30) as http:
        return await http.request(method, path, headers=headers, json=body or None)


async def wait_ready(server: ServerProcess) -> None:
    async def ready() -> bool:
        with contextlib.suppress(httpx.HTTPError):
            async with httpx.AsyncClient(timeout=2) as http:
                return (await http.get(f"{server.http_url}/readyz")).status_code == 200
        return False

    await wait_for("the server to be ready again", ready, RECOVERY_TIMEOUT_S)


async def check_books(server: ServerProcess, database_url: str, books: Books) -> None:
    """Every acknowledged tip in Postgres once; balances as acknowledged."""
    reconciled: dict[str, Any] = {}

    async def books_close() -> bool:
        nonlocal reconciled
        response = await admin(server, "GET", "/v1/admin/reconcile")
        reconciled = response.json()
        return response.status_code == 200 and reconciled["ok"] and reconciled["pending"] == 0

    await wait_for("reconcile ok with nothing pending", books_close, RECOVERY_TIMEOUT_S)
    assert reconciled["mismatches"] == [], reconciled

    assert not books.unknown, books.unknown
    assert not set(books.acked) & set(books.refused)
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            f'SELECT id, idem_key FROM "{SCHEMA}".ledger_transactions WHERE kind = $1', "tip"
        )
    finally:
        await conn.close()
    ledger_txs = sorted(row["id"] for row in rows)
    acked_txs = sorted(tx for _, tx in books.acked.values())
    assert len(set(acked_txs)) == len(acked_txs), "one tx id acknowledged for two keys"
    assert ledger_txs == acked_txs, (
        f"acknowledged but not in the ledger: {sorted(set(acked_txs) - set(ledger_txs))}; "
        f"in the ledger but never acknowledged: {sorted(set(ledger_txs) - set(acked_txs))}"
    )
    assert len({row["idem_key"] for row in rows}) == len(rows), "a key charged twice"

    model = await Client.connect(server.ws_url, open_timeout=5)
    try:
        await model.hello(token(ROOM, "model"))
        assert (await model.call("balance"))["balance"] == sum(
            tip.amount for tip, _ in books.acked.values()
        )
    finally:
        await model.close()
    for fan in fan_ids():
        client = await Client.connect(server.ws_url, open_timeout=5)
        try:
            await client.hello(token(fan))
            balance = (await client.call("balance"))["balance"]
        finally:
            await client.close()
        assert balance == CREDIT - books.spent_by(fan), fan
    print(
        f"acknowledged {len(books.acked)} tips, refused {len(books.refused)} "
        f"({sorted(set(books.refused.values()))}), {books.lost_replies} replies lost"
    )


@contextlib.asynccontextmanager
async def storm_stack(
    tmp_path: Path, durability: str, *, workers: int
) -> AsyncIterator[tuple[ServerProcess, PostgresServer, RedisServer]]:
    """Private Redis and Postgres, a migrated schema, a serving process, the
    model's room and every fan credited."""
    async with redis_server(tmp_path) as redis, postgres_server(tmp_path) as postgres:
        await postgres.migrate(SCHEMA)
        settings = Settings(
            redis_url=redis.url,
            database_url=postgres.url,
            database_schema=SCHEMA,
            jwt_secret=JWT_SECRET,
        )
        env = {**SERVER_ENV, "TOKENCHAT_DURABILITY": durability}
        async with serve(settings, tmp_path, workers=workers, env=env) as server:
            model = await Client.connect(server.ws_url, open_timeout=5)
            try:
                await model.hello(token(ROOM, "model"))  # creates the room
            finally:
                await model.close()
            for fan in fan_ids():
                credit = await admin(
                    server, "POST", "/v1/admin/credits", user=fan, amount=CREDIT, key=f"c-{fan}"
                )
                assert credit.status_code == 200, credit.text
            yield server, postgres, redis


async def storm_with_fault(server: ServerProcess, fault: Callable[[], Awaitable[None]]) -> Books:
    """Run the storm, break something once enough tips are acknowledged,
    then settle every unknown outcome."""
    books = Books()
    stop = asyncio.Event()
    storming = asyncio.create_task(storm(server, books, stop))
    try:

        def acked_at_least(count: int) -> Callable[[], Awaitable[bool]]:
            async def check() -> bool:
                if storming.done():
                    storming.result()
                    raise AssertionError("the storm ended before the fault was over")
                return len(books.acked) >= count

            return check

        await wait_for("the storm to get going", acked_at_least(FAULT_AFTER_ACKED))
        before = len(books.acked)
        await fault()
        during = len(books.acked) - before
        await wait_for(
            "tips acknowledged after the fault",
            acked_at_least(len(books.acked) + ACKED_AFTER_FAULT),
            RECOVERY_TIMEOUT_S,
        )
        stop.set()
        async with asyncio.timeout(REPLY_TIMEOUT_S * 2):
            await storming
        print(f"{during} tips acknowledged during the fault")
    finally:
        if not storming.done():
            storming.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await storming
    await wait_ready(server)
    await settle_unknown(server, books)
    return books


@pytest.mark.parametrize("durability", DURABILITY_MODES)
async def test_kill_9_one_worker_mid_storm(tmp_path: Path, durability: str) -> None:
    async with storm_stack(tmp_path, durability, workers=2) as (server, postgres, _):
        workers = worker_pids(server)
        assert len(workers) == 2, workers

        async def kill_a_worker() -> None:
            os.kill(workers[0], signal.SIGKILL)

        books = await storm_with_fault(server, kill_a_worker)

        async def replaced() -> bool:
            pids = worker_pids(server)
            return len(pids) == 2 and workers[0] not in pids

        await wait_for("a replacement worker", replaced, RECOVERY_TIMEOUT_S)
        # The kernel spread the fans over both workers, so some lost theirs.
        assert books.lost_replies > 0, "no fan was on the killed worker"
        await check_books(server, postgres.url, books)


@pytest.mark.parametrize("durability", DURABILITY_MODES)
async def test_stop_and_start_postgres_mid_storm(tmp_path: Path, durability: str) -> None:
    async with storm_stack(tmp_path, durability, workers=1) as (server, postgres, _):

        async def restart_postgres() -> None:
            await postgres.stop()
            await asyncio.sleep(POSTGRES_DOWN_S)
            await postgres.start()

        books = await storm_with_fault(server, restart_postgres)
        await check_books(server, postgres.url, books)


async def test_kill_9_an_aof_redis_mid_storm_loses_no_acknowledged_tip(tmp_path: Path) -> None:
    # Durability `ledger`: every acknowledged tip must be in Postgres once,
    # whatever Redis kept. A kill -9 of redis-server keeps what it had written
    # to its AOF (the kernel holds it; only a machine crash loses the last
    # second of everysec), so the restarted Redis is rarely older than the
    # ledger here: that case is made on purpose in test_ledger_durability.py.
    async with storm_stack(tmp_path, "ledger", workers=1) as (server, postgres, redis):

        async def crash_redis() -> None:
            await redis.kill()
            await asyncio.sleep(REDIS_DOWN_S)
            await redis.restart()

        books = await storm_with_fault(server, crash_redis)
        await check_books(server, postgres.url, books)
