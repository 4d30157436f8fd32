"""Prototype: a tip whose payer and payee live on two money shards, as a
two-phase transfer (docs/scaling.md, "Past one money shard").

Not wired into the server: it is the write-up's argument made executable,
tested against two real Redis servers (tests/test_loadtests_xshard.py), and
timed by ``python -m loadtests.xshard`` (Redis CPU per transfer on each
shard, beside a one-shard tip's). Modelled on TigerBeetle's two-phase
transfers (https://docs.tigerbeetle.com/coding/two-phase-transfers/): a
*pending* transfer reserves the amount, and is then *posted* or *voided*,
at most once, or voided when its timeout passes.

One transfer, id ``T`` (derived from the tip's initiator and idempotency
key, so a retried tip is the same transfer), from payer P on shard A to
payee Q on shard B. Every key of a shard carries that shard's hash tag, so
each script touches one slot. Accounts on A: P, ``pending`` (what pending
transfers reserve) and ``out:B`` (what A has sent to B); on B: Q and
``in:A`` (what B has received from A; it goes negative, mirroring
``out:B``). Each step is one script on one shard, appends its ledger entry
to that shard's outbox in the outbox's format (postings summing to zero),
and records the transfer's state in the same call:

1. ``pending`` on A: P -> ``pending``; T's record: pending, with a deadline.
   Refused if P's balance is short (nothing written). Again with the same T:
   the record's state, nothing moves.
2. ``post`` on A: ``pending`` -> ``out:B``; record: posted. Only from
   pending and before the deadline (after it, the call voids instead).
3. ``credit`` on B: ``in:A`` -> Q, once per T (B's applied set). Called only
   for a T that A says is posted.
4. ``settle`` on A: record: settled (out of the recovery's set).

``void`` on A: ``pending`` -> P; record: voided. Only from pending. The
coordinator calls it when it gives up; ``recover`` calls it for every
pending transfer past its deadline, re-runs ``credit`` (idempotent) and
``settle`` for every posted one. A's record decides: posted and voided
exclude each other in one Redis, so a transfer is credited iff it was posted.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import math
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis

# --- bounds and units -------------------------------------------------------
# A pending transfer not posted by then is voided by the recovery: the
# longest a payer's tokens stay reserved by a coordinator that died. A few
# seconds cover a retried credit round trip; minutes would let a crash hold
# a fan's tokens visibly.
PENDING_TIMEOUT_MS = 30_000  # ms
RECORD_TTL_S = 86_400  # s: a settled or voided record answers retries for a day, as idem does
RECOVER_BATCH = 500  # transfers per recovery pass (ZRANGE page)

_LIB = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
-- One ledger entry, in the outbox's format (money_lib.lua outbox_add).
local function entry(outbox, tx, kind, postings, meta)
  return redis.call('XADD', outbox, '*', 'tx', tx, 'kind', kind, 'initiator', 'xshard',
    'key', tx, 'request', '', 'reply', '', 'postings', postings, 'meta', meta)
end
"""

# KEYS: record, payer balance, pending, unsettled zset, outbox
# ARGV: id, amount, payer account, payee account, payee shard, timeout ms
PENDING = (
    _LIB
    + """
local state = redis.call('HGET', KEYS[1], 'state')
if state then return {'STATE', state} end
local amount = tonumber(ARGV[2])
local balance = tonumber(redis.call('GET', KEYS[2]) or '0')
if balance < amount then return {'INSUFFICIENT_FUNDS', balance} end
local deadline = now_ms() + tonumber(ARGV[6])
redis.call('DECRBY', KEYS[2], amount)
redis.call('INCRBY', KEYS[3], amount)
redis.call('HSET', KEYS[1], 'state', 'pending', 'amount', amount, 'payer', ARGV[3],
  'payee', ARGV[4], 'shard', ARGV[5], 'deadline', deadline)
redis.call('ZADD', KEYS[4], deadline, ARGV[1])
entry(KEYS[5], ARGV[1], 'xfer_pending', ARGV[3] .. ' ' .. (-amount) .. ' pending ' .. amount,
  '{"payee":"' .. ARGV[4] .. '","shard":"' .. ARGV[5] .. '"}')
return {'STATE', 'pending'}
"""
)

# KEYS: record, payer balance, pending, out account, unsettled zset, outbox
# ARGV: id, 'post' | 'void' (what the caller asks for), who asks, record ttl s
RESOLVE = (
    _LIB
    + """
local r = redis.call('HMGET', KEYS[1], 'state', 'amount', 'payer', 'shard', 'deadline')
local state, amount = r[1], tonumber(r[2])
if not state then return {'UNKNOWN'} end
if state ~= 'pending' then return {'STATE', state} end
local want = ARGV[2]
-- Past its deadline a pending transfer can only be voided (TigerBeetle's
-- timeout): a post that comes too late voids it instead.
if want == 'post' and now_ms() > tonumber(r[5]) then want = 'void' end
redis.call('DECRBY', KEYS[3], amount)
if want == 'post' then
  redis.call('INCRBY', KEYS[4], amount)
  redis.call('HSET', KEYS[1], 'state', 'posted')
  entry(KEYS[6], ARGV[1], 'xfer_post',
    'pending ' .. (-amount) .. ' out:' .. r[4] .. ' ' .. amount, '{}')
  return {'STATE', 'posted'}
end
redis.call('INCRBY', KEYS[2], amount)
redis.call('HSET', KEYS[1], 'state', 'voided')
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('ZREM', KEYS[5], ARGV[1])
entry(KEYS[6], ARGV[1], 'xfer_void', 'pending ' .. (-amount) .. ' ' .. r[3] .. ' ' .. amount,
  '{"by":"' .. ARGV[3] .. '"}')
return {'STATE', 'voided'}
"""
)

# KEYS: applied marker, payee balance, in account, outbox
# ARGV: id, amount, payee account, payer shard, marker ttl s
CREDIT = (
    _LIB
    + """
if redis.call('SET', KEYS[1], ARGV[2], 'NX', 'EX', ARGV[5]) == false then
  return {'DUP', redis.call('GET', KEYS[1])}
end
local amount = tonumber(ARGV[2])
redis.call('DECRBY', KEYS[3], amount)
local balance = redis.call('INCRBY', KEYS[2], amount)
entry(KEYS[4], ARGV[1], 'xfer_credit',
  'in:' .. ARGV[4] .. ' ' .. (-amount) .. ' ' .. ARGV[3] .. ' ' .. amount, '{}')
return {'OK', balance}
"""
)

# KEYS: record, unsettled zset. ARGV: id, record ttl
SETTLE = """
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= 'posted' then return {'STATE', state or 'unknown'} end
redis.call('HSET', KEYS[1], 'state', 'settled')
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('ZREM', KEYS[2], ARGV[1])
return {'STATE', 'settled'}
"""


def transfer_id(initiator: str, key: str) -> str:
    """The same tip (initiator, idempotency key) is the same transfer."""
    return "x" + hashlib.sha256(f"{initiator}\n{key}".encode()).hexdigest()[:24]


@dataclasses.dataclass(frozen=True)
class Shard:
    """One money shard: a Redis primary and the hash tag of its keys."""

    name: str
    # redis.asyncio.Redis, bytes replies; its stubs' return unions (str, list,
    # tuple...) would need a cast at every read here.
    redis: Any
    scripts: dict[str, Any] = dataclasses.field(default_factory=dict)  # source -> Script

    def key(self, *parts: str) -> str:
        return f"xs:{{{self.name}}}:" + ":".join(parts)

    def balance(self, account: str) -> str:
        return self.key("bal", account)

    async def read_balance(self, account: str) -> int:
        return int(await self.redis.get(self.balance(account)) or 0)

    @property
    def outbox(self) -> str:
        return self.key("outbox")

    @property
    def unsettled(self) -> str:
        return self.key("unsettled")


async def _call(shard: Shard, script: str, keys: list[str], args: list[Any]) -> list[Any]:
    # EVALSHA, loaded on first use (redis-py's Script), as the server's scripts are.
    if script not in shard.scripts:
        shard.scripts[script] = shard.redis.register_script(script)
    reply: list[Any] = await shard.scripts[script](keys=keys, args=args)
    return [x.decode() if isinstance(x, bytes) else x for x in reply]


async def pending(
    a: Shard, b: Shard, tx: str, payer: str, payee: str, amount: int, timeout_ms: int
) -> list[Any]:
    return await _call(
        a,
        PENDING,
        [a.key("xfer", tx), a.balance(payer), a.balance("pending"), a.unsettled, a.outbox],
        [tx, amount, payer, payee, b.name, timeout_ms],
    )


async def resolve(a: Shard, tx: str, payer: str, payee_shard: str, want: str, by: str) -> str:
    reply = await _call(
        a,
        RESOLVE,
        [
            a.key("xfer", tx),
            a.balance(payer),
            a.balance("pending"),
            a.balance(f"out:{payee_shard}"),
            a.unsettled,
            a.outbox,
        ],
        [tx, want, by, RECORD_TTL_S],
    )
    return str(reply[-1])


async def credit(b: Shard, a: Shard, tx: str, payee: str, amount: int) -> list[Any]:
    return await _call(
        b,
        CREDIT,
        [b.key("applied", tx), b.balance(payee), b.balance(f"in:{a.name}"), b.outbox],
        [tx, amount, payee, a.name, RECORD_TTL_S],
    )


async def settle(a: Shard, tx: str) -> str:
    reply = await _call(a, SETTLE, [a.key("xfer", tx), a.unsettled], [tx, RECORD_TTL_S])
    return str(reply[-1])


async def transfer(
    a: Shard,
    b: Shard,
    tx: str,
    payer: str,
    payee: str,
    amount: int,
    timeout_ms: int = PENDING_TIMEOUT_MS,
) -> str:
    """The coordinator's four steps; each is safe to run again. Returns the
    transfer's outcome: settled, voided, or the payer's refusal."""
    reply = await pending(a, b, tx, payer, payee, amount, timeout_ms)
    if reply[0] != "STATE":
        return str(reply[0])
    state = str(reply[1])
    if state == "pending":
        state = await resolve(a, tx, payer, b.name, "post", "coordinator")
    if state == "posted":
        await credit(b, a, tx, payee, amount)
        state = await settle(a, tx)
    return state


async def recover(
    a: Shard, shards: dict[str, Shard], *, now_ms: int | None = None
) -> dict[str, int]:
    """Finish what a dead coordinator left on ``a``: void the pending
    transfers past their deadline, credit and settle the posted ones. Safe to
    run at any time, beside live coordinators, and again."""
    counts = {"voided": 0, "credited": 0, "waiting": 0}
    if now_ms is None:
        # A's clock, which set the deadlines: no two clocks are compared.
        seconds, micros = await a.redis.time()
        now_ms = seconds * 1000 + micros // 1000
    now = now_ms
    start = 0
    while True:
        ids = await a.redis.zrange(a.unsettled, start, start + RECOVER_BATCH - 1, withscores=True)
        if not ids:
            return counts
        start += len(ids)
        for raw, deadline in ids:
            tx = raw.decode()
            fields = await a.redis.hgetall(a.key("xfer", tx))
            record = {k.decode(): v.decode() for k, v in fields.items()}
            state = record.get("state")
            if state == "pending":
                if deadline > now:
                    counts["waiting"] += 1  # its coordinator may still post it
                    continue
                if (
                    await resolve(a, tx, record["payer"], record["shard"], "void", "recovery")
                    == "voided"
                ):
                    counts["voided"] += 1
                    start -= 1  # it left the set
                    continue
                state = "posted"  # posted meanwhile by its coordinator
            if state == "posted":
                b = shards[record["shard"]]
                await credit(b, a, tx, record["payee"], int(record["amount"]))
                if await settle(a, tx) == "settled":
                    counts["credited"] += 1
                    start -= 1


@dataclasses.dataclass
class Reconciled:
    """Shard pair (a -> b): what A says it sent against what B says it received."""

    out_balance: int  # A's out:B
    in_balance: int  # B's in:A (negative)
    in_flight: int  # posted on A, not yet settled (their credit may not have run)
    credited_not_posted: list[str]  # ids B applied that A never posted: money made

    @property
    def ok(self) -> bool:
        """Balanced once the in-flight credits run, and nothing made."""
        return (
            not self.credited_not_posted
            and 0 <= self.out_balance + self.in_balance <= self.in_flight
        )


async def reconcile(a: Shard, b: Shard) -> Reconciled:
    """A's out:B and B's in:A differ by at most the posted, unsettled
    transfers' amounts; and every transfer B applied, A posted."""
    out_balance = await a.read_balance(f"out:{b.name}")
    in_balance = await b.read_balance(f"in:{a.name}")
    in_flight = 0
    for raw in await a.redis.zrange(a.unsettled, 0, -1):
        fields = await a.redis.hmget(a.key("xfer", raw.decode()), "state", "amount", "shard")
        if fields[0] == b"posted" and fields[2] == b.name.encode():
            in_flight += int(fields[1])
    made: list[str] = []
    async for key in b.redis.scan_iter(match=b.key("applied", "*"), count=1000):
        tx = key.decode().rsplit(":", 1)[1]
        state = await a.redis.hget(a.key("xfer", tx), "state")
        if state not in (b"posted", b"settled"):
            made.append(tx)
    return Reconciled(out_balance, in_balance, in_flight, made)


# ============================================================================
# python -m loadtests.xshard: Redis CPU per cross-shard transfer
# ============================================================================


async def time_transfers(transfers: int, pipeline: int, redis_server: str) -> dict[str, float]:
    """``transfers`` transfers between two redis-servers of our own,
    ``pipeline`` of them at once (each its four steps in turn): each shard's
    CPU per transfer."""
    from loadtests.capacity import start_redis

    servers = [start_redis(redis_server, aof=True) for _ in range(2)]
    try:
        a = Shard("a", Redis.from_url(servers[0].url))
        b = Shard("b", Redis.from_url(servers[1].url))
        payers = [f"u:fan{i}" for i in range(pipeline)]
        for payer in payers:
            await a.redis.set(a.balance(payer), transfers)
        cpu_a, cpu_b = servers[0].cpu_s(), servers[1].cpu_s()
        started = time.monotonic()
        for round_no in range(transfers // pipeline):
            outcomes = await asyncio.gather(
                *(
                    transfer(a, b, transfer_id(payer, str(round_no)), payer, "u:model0", 1)
                    for payer in payers
                )
            )
            if any(outcome != "settled" for outcome in outcomes):
                raise RuntimeError(f"a transfer did not settle: {set(outcomes)}")
        wall = time.monotonic() - started
        done = transfers // pipeline * pipeline
        figures = {
            "transfers": float(done),
            "a_us_per_transfer": (servers[0].cpu_s() - cpu_a) / done * 1e6,
            "b_us_per_transfer": (servers[1].cpu_s() - cpu_b) / done * 1e6,
            "wall_us_per_transfer": wall / done * 1e6,
        }
        result = await reconcile(a, b)
        if not result.ok or result.out_balance != done:
            raise RuntimeError(f"not reconciled: {result}")
        await a.redis.aclose()
        await b.redis.aclose()
        return figures
    finally:
        for server in servers:
            server.stop()


def main(argv: Sequence[str] | None = None) -> int:
    import shutil

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--transfers", type=int, default=5000)
    parser.add_argument("--pipeline", type=int, default=100, help="transfers at once")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--redis-server", default=shutil.which("redis-server") or "redis-server")
    args = parser.parse_args(argv)
    rows = [
        asyncio.run(time_transfers(args.transfers, args.pipeline, args.redis_server))
        for _ in range(args.runs)
    ]
    for name in ("a_us_per_transfer", "b_us_per_transfer", "wall_us_per_transfer"):
        values = [row[name] for row in rows]
        finite = [v for v in values if not math.isnan(v)]
        print(
            f"{name}: {statistics.median(finite):.1f}"
            f" ({min(finite):.1f}-{max(finite):.1f}) over {len(rows)} runs"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
