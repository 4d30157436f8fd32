"""Postgres CPU per tip of the ledger writer's own backend, and of the
standing projector's.

``ledger_write`` counts every Postgres process on the machine, which on a
shared machine is mostly other people's work. This runs the ledger writer's
statements themselves (``_NEW_ACCOUNTS`` then ``_WRITE_BATCH``, from the checkout
it runs in, with that checkout's migrations) on one connection, ``--batch``
tips per committed transaction, and reads that connection's backend CPU from
``/proc/<pid>/stat``: nothing else on the machine is counted. Then, where the
checkout has the standing projector (migration 0022), it folds what was
written in passes of ``--pass`` ledger transactions on the same connection
and reports that backend CPU per tip too: the part of standing that used to
run inside the writer's statement (migration 0013's trigger).

The tips are the tips benchmark's shape: 200 fans in 20 rooms, amount 1.
``--existing N`` writes and folds N tips first, unmeasured: a ledger in use
is not empty, and a check whose cost grows with the table (0023's reference
checks did, migration 0028) only shows against one that is not.
Uses TOKENCHAT_DATABASE_URL (the local default) under a schema of its own,
removed afterwards. It needs the backend on this machine (/proc).

    python -m loadtests.ledger_backend --batch 50 --tips 10000 --pass 1000
    python -m loadtests.ledger_backend --up-to 22    # without migration 0023
    python -m loadtests.ledger_backend --batch 50 --existing 100000
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import orjson

from tokenchat.server.config import Settings
from tokenchat.server.db import load_migrations, migrate
from tokenchat.server.ledger.writer import _NEW_ACCOUNTS, _WRITE_BATCH

try:  # the writer's cache of accounts known to exist (absent in older checkouts)
    from tokenchat.server.ledger.writer import KnownAccounts
except ImportError:  # pragma: no cover - an older checkout: every batch makes its accounts
    KnownAccounts = None  # type: ignore[assignment,misc]

FANS = 200
ROOMS = 20
FAN_CREDIT = 10**12  # tokens: no tip is refused for funds
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# Tips per transaction (and per projector pass) of the unmeasured --existing
# rows: the writer's largest batch, so filling a big ledger takes seconds.
EXISTING_BATCH = 1000


def backend_cpu_s(pid: int) -> float:
    """User plus system CPU of one process, in seconds (10 ms resolution)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def batch_args(round_no: int, size: int, now_ms: int) -> list[object]:
    """The writer statement's arguments for ``size`` tips."""
    ids = [f"tx{round_no}-{i}" for i in range(size)]
    fans = [f"u:fan{(round_no * size + i) % FANS}" for i in range(size)]
    rooms = [f"model{(round_no * size + i) % FANS % ROOMS}" for i in range(size)]
    posting_tx: list[str] = []
    posting_account: list[str] = []
    posting_amount: list[int] = []
    for tx, fan, room in zip(ids, fans, rooms, strict=True):
        posting_tx += [tx, tx]
        posting_account += [fan, f"u:{room}"]
        posting_amount += [-1, 1]
    return [
        ids,
        ["tip"] * size,
        fans,
        [f"k{round_no}-{i}" for i in range(size)],
        [None] * size,
        [orjson.dumps({"room": room, "amount": 1}).decode() for room in rooms],
        ['{"ok":true}'] * size,
        [orjson.dumps({"room": room}).decode() for room in rooms],
        [now_ms] * size,
        [f"{now_ms}-{round_no * size + i}" for i in range(size)],
        posting_tx,
        posting_account,
        posting_amount,
        "bench-epoch",
        "bench-writer",
        now_ms,
        round_no,
    ]


async def project_all(conn: asyncpg.Connection, per_pass: int) -> int:
    """Fold everything written, the way Standing._project_batch does."""
    from tokenchat.server.standing import _PROJECT_LEDGER

    folded = 0
    while True:
        async with conn.transaction():
            mark = await conn.fetchrow(
                """SELECT writer_xid::text AS writer_xid, tx_id,
                          pg_snapshot_xmin(pg_current_snapshot())::text AS horizon
                   FROM standing_watermark FOR UPDATE"""
            )
            assert mark is not None
            count: int = await conn.fetchval(
                _PROJECT_LEDGER, mark["writer_xid"], mark["tx_id"], mark["horizon"], per_pass
            )
        folded += count
        if count < per_pass:
            return folded


async def apply_up_to(conn: asyncpg.Connection, schema: str, version: int) -> None:
    """The checkout's migrations 1..version only (to compare one migration's
    effect with the same code), each in a transaction as db.migrate does."""
    await conn.execute(f'CREATE SCHEMA "{schema}"')
    await conn.execute(f'SET search_path TO "{schema}"')
    for migration in load_migrations():
        if migration.version > version:
            break
        async with conn.transaction():
            await conn.execute(migration.sql)


async def measure(
    batch: int, tips: int, per_pass: int, up_to: int | None, existing: int = 0
) -> dict[str, Any]:
    """Write ``tips`` in batches of ``batch`` and fold them, after ``existing``
    written and folded unmeasured; the backend's CPU per tip of each (us; the
    projector's None where the checkout has none, NaN where another client's
    open transaction held the fold back)."""
    settings = Settings()
    schema = f"ledger_backend_{uuid.uuid4().hex[:8]}"
    # jit off, as the server's pool has it (tokenchat.server.db.create_pool).
    conn = await asyncpg.connect(settings.database_url, server_settings={"jit": "off"})
    try:
        if up_to is None:
            await migrate(settings.database_url, schema)
        else:
            await apply_up_to(conn, schema, up_to)
        await conn.execute(f'SET search_path TO "{schema}"')
        pid: int = await conn.fetchval("SELECT pg_backend_pid()")
        accounts = [f"u:fan{i}" for i in range(FANS)] + [f"u:model{i}" for i in range(ROOMS)]
        await conn.execute(_NEW_ACCOUNTS, accounts)
        await conn.execute("UPDATE accounts SET balance = $1 WHERE id LIKE 'u:fan%'", FAN_CREDIT)
        new_accounts = await conn.prepare(_NEW_ACCOUNTS)
        statement = await conn.prepare(_WRITE_BATCH)
        now_ms = int(time.time() * 1000)
        projects = await conn.fetchval("SELECT to_regclass('standing_watermark') IS NOT NULL")

        known = KnownAccounts() if KnownAccounts is not None else None

        async def write(first_round: int, rounds: int, size: int) -> None:
            for round_no in range(first_round, first_round + rounds):
                args = batch_args(round_no, size, now_ms)
                # As LedgerWriter._write: the batch's accounts the writer does
                # not know yet made (none new here, each looked up), then the
                # batch, in one transaction.
                accounts: list[str] = args[11]  # type: ignore[assignment]
                new = known.unknown(accounts) if known is not None else accounts
                async with conn.transaction():
                    if new:
                        await new_accounts.fetch(new)
                    await statement.fetch(*args)
                if known is not None:
                    known.remember(new)

        # Unmeasured: the ledger as it stands before (rounds of size
        # EXISTING_BATCH; the measured rounds' numbers come after theirs, so
        # the ids differ), folded, so the projector's figure is its own.
        existing_rounds = -(-existing // EXISTING_BATCH)
        await write(0, existing_rounds, EXISTING_BATCH)
        if projects:
            await project_all(conn, EXISTING_BATCH)
        first = existing_rounds * EXISTING_BATCH // batch + 1
        rounds = tips // batch
        cpu_before, wall_before = backend_cpu_s(pid), time.perf_counter()
        await write(first, rounds, batch)
        written = rounds * batch
        cpu = backend_cpu_s(pid) - cpu_before
        wall = time.perf_counter() - wall_before
        figures: dict[str, Any] = {
            "batch": batch,
            "tips": written,
            "existing": existing_rounds * EXISTING_BATCH,
            "writer_us_per_tip": cpu / written * 1e6,
            "writer_wall_us_per_tip": wall / written * 1e6,
            "projector_us_per_tip": None,
            "projector_pass": per_pass,
            "folded": 0,
        }
        if projects:
            cpu_before = backend_cpu_s(pid)
            folded = await project_all(conn, per_pass)
            cpu = backend_cpu_s(pid) - cpu_before
            figures["folded"] = folded
            figures["projector_us_per_tip"] = cpu / folded * 1e6 if folded else math.nan
        return figures
    finally:
        await conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
        await conn.close()


async def run(batch: int, tips: int, per_pass: int, up_to: int | None, existing: int) -> None:
    figures = await measure(batch, tips, per_pass, up_to, existing)
    line = (
        f"batch {batch}: {figures['tips']} tips after {figures['existing']}, writer backend"
        f" {figures['writer_us_per_tip']:.0f} us CPU per tip"
        f" ({figures['writer_wall_us_per_tip']:.0f} us wall)"
    )
    projector = figures["projector_us_per_tip"]
    if projector is None:
        line += ", projector: none (the standing trigger runs in the writer's statement)"
    elif math.isnan(projector):
        line += ", projector: nothing folded (another client's open transaction held it)"
    else:
        line += (
            f", projector {projector:.0f} us CPU per tip"
            f" ({figures['folded']} in passes of {per_pass})"
        )
    print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=50, help="tips per writer transaction")
    parser.add_argument("--tips", type=int, default=10_000)
    parser.add_argument(
        "--pass", dest="per_pass", type=int, default=1000, help="ledger rows per projector pass"
    )
    parser.add_argument(
        "--up-to",
        type=int,
        default=None,
        help="apply the migrations up to this version only (default: all)",
    )
    parser.add_argument(
        "--existing",
        type=int,
        default=0,
        help="tips written and folded before the measured ones, unmeasured (default 0)",
    )
    args = parser.parse_args()
    asyncio.run(run(args.batch, args.tips, args.per_pass, args.up_to, args.existing))


if __name__ == "__main__":
    main()
