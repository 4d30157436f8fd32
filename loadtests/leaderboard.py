"""Leaderboard read latency over a ledger of N tips (issue #12's figure).

    python -m loadtests.leaderboard [--rows 100000] [--rooms 10] [--fans 5000] [--reads 200]

Fills a fresh Postgres schema with ``--rows`` tip transactions (two postings
each), spread over the last 8 days, half of them in one "hot" room and the
rest over ``--rooms`` - 1 others, from ``--fans`` fans. They go in as the
ledger writer writes them: batches of 500 inserted into ledger_transactions
and ledger_postings; then the standing projector folds them (migration 0022:
``Standing.project``, as every node's standing loop does), timed apart.
Then it times ``Standing.leaderboard`` (the code behind
``GET /v1/rooms/{room}/leaderboard``) for the hot room in each window,
``--reads`` times each, and for comparison the same top 100 grouped from the
ledger itself. Prints the fill and fold times, the projection's row counts and
p50/p99 per window; the schema is dropped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
import uuid
from typing import Any

import asyncpg
import orjson
from redis.asyncio import Redis

from tokenchat.server.config import Settings
from tokenchat.server.db import create_pool, migrate
from tokenchat.server.keys import Keys
from tokenchat.server.standing import WINDOWS, Standing

BATCH = 500  # transactions per insert, about what a busy ledger writer commits at once
SPREAD_MS = 8 * 24 * 3600 * 1000  # tips over the last 8 days: every window has some

_GROUP_BY_LEDGER = """
SELECT substr(p.account_id, 3) AS user_id, -sum(p.amount) AS tokens
FROM ledger_transactions t JOIN ledger_postings p ON p.tx_id = t.id
WHERE t.kind = 'tip' AND t.meta->>'room' = $1 AND p.amount < 0 AND t.applied_ms >= $2
GROUP BY 1 ORDER BY 2 DESC LIMIT 100
"""


async def fill(conn: Any, rows: int, rooms: int, fans: int) -> float:
    users = [f"fan{i}" for i in range(fans)] + [f"room{i}" for i in range(rooms)]
    await conn.executemany(
        "INSERT INTO users (id, role) VALUES ($1, $2) ON CONFLICT DO NOTHING",
        [(u, "model" if u.startswith("room") else "fan") for u in users],
    )
    await conn.executemany(
        "INSERT INTO accounts (id, kind) VALUES ($1, 'user') ON CONFLICT DO NOTHING",
        [(f"u:{u}",) for u in users],
    )
    now_ms = int(time.time() * 1000)
    rng = random.Random(12)
    started = time.perf_counter()
    for start in range(0, rows, BATCH):
        txs, postings = [], []
        for _ in range(min(BATCH, rows - start)):
            tx = uuid.uuid4().hex
            room = "room0" if rng.random() < 0.5 else f"room{rng.randrange(1, rooms)}"
            fan = f"fan{rng.randrange(fans)}"
            amount = rng.choice((1, 5, 10, 25, 50, 100, 500))
            applied = now_ms - rng.randrange(SPREAD_MS)
            txs.append((tx, f"u:{fan}", tx, orjson.dumps({"room": room}).decode(), applied))
            postings += [(tx, f"u:{fan}", -amount), (tx, f"u:{room}", amount)]
        async with conn.transaction():
            await conn.execute(
                """INSERT INTO ledger_transactions
                       (id, kind, initiator, idem_key, request, reply, meta, applied_ms, outbox_id)
                   SELECT id, 'tip', initiator, key, '{}', '{}', meta::jsonb, applied, id
                   FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bigint[])
                       AS b(id, initiator, key, meta, applied)""",
                *map(list, zip(*txs, strict=True)),
            )
            await conn.execute(
                """INSERT INTO ledger_postings (tx_id, account_id, amount)
                   SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[])""",
                *map(list, zip(*postings, strict=True)),
            )
    return time.perf_counter() - started


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000, help="tip transactions")
    parser.add_argument("--rooms", type=int, default=10)
    parser.add_argument("--fans", type=int, default=5000)
    parser.add_argument("--reads", type=int, default=200, help="reads per window")
    parser.add_argument(
        "--no-projection",
        action="store_true",
        help="fill only, without folding the projection (the ledger's cost alone)",
    )
    args = parser.parse_args()
    schema = f"bench_leaderboard_{uuid.uuid4().hex[:8]}"
    settings = Settings(database_schema=schema, redis_prefix=f"{schema}:")
    await migrate(settings.database_url, schema)
    pool = await create_pool(settings.database_url, schema, min_size=1, max_size=2, timeout_s=30)
    redis: Redis = Redis.from_url(settings.redis_url)
    try:

        async def publish(room: str, event: dict[str, object]) -> str:
            return "0-0"

        standing = Standing(pool, redis, Keys(settings.redis_prefix), settings, publish)
        async with pool.acquire() as conn:
            fill_s = await fill(conn, args.rows, args.rooms, args.fans)
            if args.no_projection:
                print(f"filled {args.rows} tips in {fill_s:.1f} s without the projection")
                return
            started = time.perf_counter()
            while await standing.project():
                pass
            fold_s = time.perf_counter() - started
            counts = {
                table: await conn.fetchval(f"SELECT count(*) FROM {table}")
                for table in (
                    "ledger_transactions",
                    "ledger_postings",
                    "standing_room_hourly",
                    "standing_room_total",
                    "standing_user_hourly",
                )
            }
            await conn.execute("ANALYZE")
        rate = args.rows / fill_s
        print(f"filled {args.rows} tips in {fill_s:.1f} s ({rate:,.0f}/s)")
        print(f"folded into the projection in {fold_s:.1f} s ({args.rows / fold_s:,.0f}/s)")
        print("rows: " + ", ".join(f"{t} {n:,}" for t, n in counts.items()))
        print(f"leaderboard of the hot room (half the tips), {args.reads} reads per window:")
        for window in WINDOWS:
            await standing.leaderboard("room0", window)  # warm
            samples = []
            for _ in range(args.reads):
                started = time.perf_counter()
                board = await standing.leaderboard("room0", window)
                samples.append((time.perf_counter() - started) * 1000)
            print(
                f"  {window:>4}: p50 {statistics.median(samples):.2f} ms, "
                f"p99 {percentile(samples, 0.99):.2f} ms, {len(board['entries'])} entries"
            )
        async with pool.acquire() as conn:
            since = int(time.time() * 1000) - 12 * 3600 * 1000
            samples = []
            for _ in range(max(5, args.reads // 10)):
                started = time.perf_counter()
                await conn.fetch(_GROUP_BY_LEDGER, "room0", since)
                samples.append((time.perf_counter() - started) * 1000)
        print(
            f"  for comparison, GROUP BY over the ledger (12h): p50 "
            f"{statistics.median(samples):.2f} ms, p99 {percentile(samples, 0.99):.2f} ms"
        )
    finally:
        await redis.aclose()
        await pool.close()
        admin = await asyncpg.connect(settings.database_url)
        try:
            await admin.execute(f'DROP SCHEMA "{schema}" CASCADE')
        finally:
            await admin.close()


if __name__ == "__main__":
    asyncio.run(main())
