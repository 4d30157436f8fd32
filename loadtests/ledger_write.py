"""Postgres CPU per ledger entry, the ledger writer alone.

Makes N tips in Redis (durability `redis`, no writer running), then lets one
``LedgerWriter`` drain the outbox in batches of ``--batch`` and reports the
entries per second and the CPU the PostgreSQL processes spent per entry (from
/proc, so it counts every Postgres process on the machine: run it on a quiet
one). Small batches are what the `ledger` durability mode writes at moderate
load; 1,000 is the writer's largest. Uses the Redis and Postgres of
TOKENCHAT_REDIS_URL / TOKENCHAT_DATABASE_URL (the local defaults), under a
prefix and schema of its own that it removes afterwards.

    python -m loadtests.ledger_write --batch 50 --tips 10000
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import time

from loadtests.harness.processes import remove_state, ticks_by_name
from tokenchat.server.config import Settings
from tokenchat.server.db import migrate
from tokenchat.server.gateway.node import Node
from tokenchat.server.ledger.writer import LedgerWriter

FANS = 200
FAN_CREDIT = 1_000_000  # tokens: no tip is refused for funds
TIPS_IN_FLIGHT = 1000  # made concurrently, so the batcher pipelines them
DRAIN_TIMEOUT_S = 300.0


def postgres_cpu_s() -> float:
    """CPU seconds used so far by every process named postgres."""
    return sum(ticks_by_name("postgres").values()) / os.sysconf("SC_CLK_TCK")


async def measure(batch: int, tips: int) -> None:
    tag = secrets.token_hex(3)
    settings = Settings.from_env(
        redis_prefix=f"ledger-write:{tag}:",
        database_schema=f"ledger_write_{tag}",
        jwt_secret=secrets.token_urlsafe(32),
        durability="redis",
        ledger_enabled=0,
        ledger_batch_max=batch,
    )
    await migrate(settings.database_url, settings.database_schema)
    node = await Node.connect(settings)
    fans = [f"fan{i}" for i in range(FANS)]
    try:
        await asyncio.gather(
            *(node.economy.credit(f, FAN_CREDIT, initiator="u:ops", key=f"c-{f}") for f in fans)
        )
        for start in range(0, tips, TIPS_IN_FLIGHT):
            await asyncio.gather(
                *(
                    node.economy.tip(fans[i % FANS], "alice", "alice", 1, "", f"k{i}", 1)
                    for i in range(start, min(tips, start + TIPS_IN_FLIGHT))
                )
            )
        writer = LedgerWriter(settings, node.pool, node.economy, "ledger-write")
        cpu_before, started = postgres_cpu_s(), time.monotonic()
        left = await writer.drain(DRAIN_TIMEOUT_S)
        cpu_s, wall_s = postgres_cpu_s() - cpu_before, time.monotonic() - started
        await writer.close()
        entries = tips + FANS
        print(
            f"batch {batch}: {entries} entries in {wall_s:.2f} s ({entries / wall_s:,.0f}/s), "
            f"Postgres {1e6 * cpu_s / entries:.0f} us per entry, {left} left"
        )
    finally:
        await node.close()
        await remove_state(
            settings.redis_url,
            settings.redis_prefix,
            settings.database_url,
            settings.database_schema,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=50, help="entries per writer transaction")
    parser.add_argument("--tips", type=int, default=10_000)
    args = parser.parse_args()
    asyncio.run(measure(args.batch, args.tips))


if __name__ == "__main__":
    main()
