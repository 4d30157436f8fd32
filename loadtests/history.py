"""History paging benchmark: what a `history` page costs (issue #16 part 6).

``--trim-cost REDIS_URL`` measures instead what history_add's trimming costs
each room event in Redis (a Redis of its own: INFO commandstats counts every
client's EVALSHA).

After a node is lost, every member it held reconnects and re-joins with
``since``; a member away longer than a page (100 events) reads the rest with
``history`` until ``more`` is false. In a reconnect storm that is the hot
path. This starts ``tokenchat serve`` (``TOKENCHAT_HISTORY_LEN=--events``),
fills one room with ``--events`` chat lines, then ``--clients`` members at
once each re-join from the room's oldest event and page through all of it,
``--rounds`` times:

    python -m loadtests.history --events 4000 --clients 20 --rounds 3

It prints, per page (100 events, ~16 KB of JSON here): the round trip p50
and p99 seen by the clients, pages/s over all clients, and the server's
CPU per page (its process tree's ticks from /proc over the paging, divided
by the pages) and Redis's (the time Redis itself counts in its commands
that read history, INFO commandstats: XRANGE, XINFO STREAM, MULTI, EXEC;
the joins of a round are in it too, one per client, and any other user of
the same Redis); beside it, ``ping``
round trips from the same clients at the same concurrency (the gateway's
floor: no Redis, a tiny reply).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from typing import Any

import orjson

from loadtests.harness.cli import positive_int
from loadtests.harness.client import HOST
from loadtests.harness.processes import Bench, cpu_ticks, process_tree
from tokenchat.client_demo.client import Client
from tokenchat.protocol.limits import HISTORY_PAGE_LEN
from tokenchat.server.auth import issue_token

ROOM = "hist_model"
# Lines posted at once while filling the room: one pipelined batch each.
FILL_BATCH = 200
# A chat line of typical length (~60 characters), as a busy room carries.
LINE = "a line of chat as long as people usually type it, number {}"
TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def percentile_ms(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] * 1000


async def fill(client: Client, events: int) -> str:
    """Post ``events`` lines in the room; the first one's offset."""
    first = ""
    for start in range(0, events, FILL_BATCH):
        texts = [LINE.format(n) for n in range(start, min(events, start + FILL_BATCH))]
        replies = await asyncio.gather(
            *(client.call("say", room=ROOM, text=text) for text in texts)
        )
        first = first or replies[0]["offset"]
    return first


async def page_through(client: Client, since: str, samples: list[float]) -> int:
    """Re-join from ``since`` and read every page; the pages read."""
    reply = await client.call("join", room=ROOM, since=since)
    pages = 0
    while reply["more"]:
        started = time.perf_counter()
        reply = await client.call("history", room=ROOM, since=reply["next"])
        samples.append(time.perf_counter() - started)
        pages += 1
    return pages


async def redis_usec(bench: Bench) -> int:
    """Microseconds Redis spent so far in the commands a history read sends."""
    from redis.asyncio import Redis

    redis = Redis.from_url(bench.settings().redis_url)
    try:
        stats: dict[str, Any] = await redis.info("commandstats")
    finally:
        await redis.aclose()
    return sum(
        int(stats.get(f"cmdstat_{name}", {}).get("usec", 0))
        for name in ("xrange", "xrevrange", "xinfo|stream", "multi", "exec")
    )


async def pings(client: Client, count: int, samples: list[float]) -> None:
    for _ in range(count):
        started = time.perf_counter()
        await client.call("ping")
        samples.append(time.perf_counter() - started)


async def measure(args: argparse.Namespace, bench: Bench, server_pid: int, ws_url: str) -> None:
    secret = bench.jwt_secret
    model = await Client.connect(ws_url)
    await model.hello(issue_token(secret, ROOM, "model"))
    await model.call("join", room=ROOM)
    first = await fill(model, args.events)
    clients = []
    for n in range(args.clients):
        client = await Client.connect(ws_url)
        await client.hello(issue_token(secret, f"hist_fan{n}", "fan"))
        clients.append(client)
    rows: list[dict[str, Any]] = []
    for _ in range(args.rounds):
        samples: list[float] = []
        pids = process_tree(server_pid)
        ticks_before = cpu_ticks(pids) or 0
        redis_before = await redis_usec(bench)
        started = time.perf_counter()
        pages = await asyncio.gather(*(page_through(c, first, samples) for c in clients))
        wall_s = time.perf_counter() - started
        ticks = (cpu_ticks(pids) or 0) - ticks_before
        redis_spent = await redis_usec(bench) - redis_before
        total = sum(pages)
        ping_samples: list[float] = []
        await asyncio.gather(*(pings(c, pages[0], ping_samples) for c in clients))
        rows.append(
            {
                "pages": total,
                "pages_per_s": total / wall_s,
                "p50_ms": percentile_ms(samples, 0.5),
                "p99_ms": percentile_ms(samples, 0.99),
                "cpu_ms_per_page": ticks / TICKS_PER_S * 1000 / total,
                "redis_ms_per_page": redis_spent / 1000 / total,
                "ping_p50_ms": percentile_ms(ping_samples, 0.5),
                "ping_p99_ms": percentile_ms(ping_samples, 0.99),
            }
        )
    for client in [model, *clients]:
        await client.close()
    print(
        f"history pages of {HISTORY_PAGE_LEN} events, {args.events} events in the room, "
        f"{args.clients} clients paging at once, {args.rounds} rounds (medians):"
    )
    for key in rows[0]:
        print(f"  {key:16} {statistics.median(row[key] for row in rows):10.2f}")


def trim_cost(redis_url: str, calls: int) -> None:
    """Redis's own time per ``room_event.lua`` call (INFO commandstats), with
    history_add's trims: the count alone (an age of a day trims nothing) at
    50 and 4,000 events, and an age of 1 s (the age trim removing nodes)."""
    import redis

    from tokenchat.server.economy.scripts import HISTORY_LIB, script_source

    client = redis.Redis.from_url(redis_url)
    script = client.register_script(script_source(HISTORY_LIB) + "\n" + script_source("room_event"))
    event = orjson.dumps({"type": "message", "room": ROOM, "from": "f", "text": LINE.format(0)})
    key, show = "bench:trim-cost:history", "bench:trim-cost:show"
    channel = "bench:trim-cost"  # a key of room_event (SPUBLISH), any slot here

    def evalsha_usec() -> tuple[int, int]:
        stats = client.info("commandstats").get("cmdstat_evalsha", {})
        return int(stats.get("usec", 0)), int(stats.get("calls", 0))

    for length, age_ms in ((50, 86_400_000), (4000, 86_400_000), (4000, 1000)):
        client.delete(key)
        for _ in range(2):  # the first pass fills the stream to its steady state
            pipe = client.pipeline(transaction=False)
            for _ in range(calls):
                script(
                    keys=[key, show, channel],
                    args=[length, event, "", age_ms],
                    client=pipe,
                )
            usec_before, calls_before = evalsha_usec()
            pipe.execute()
            usec_after, calls_after = evalsha_usec()
        per_call = (usec_after - usec_before) / max(1, calls_after - calls_before)
        print(f"  room_event.lua, {length} events, age {age_ms} ms: {per_call:.2f} us in Redis")
    client.delete(key)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=positive_int, default=4000, help="lines in the room")
    parser.add_argument("--clients", type=positive_int, default=20, help="members paging at once")
    parser.add_argument("--rounds", type=positive_int, default=3, help="measured rounds")
    parser.add_argument("--workers", type=positive_int, default=1, help="gateway processes")
    parser.add_argument("--pin", action="store_true", help="the server on a core of its own")
    parser.add_argument(
        "--trim-cost",
        metavar="REDIS_URL",
        help="instead: Redis's time per room event with history_add's trims (a Redis of its own)",
    )
    args = parser.parse_args()
    if args.trim_cost:
        trim_cost(args.trim_cost, 20_000)
        return
    bench = Bench(args, "history")
    with bench.closed_after():
        server, _ = bench.start_serve(TOKENCHAT_HISTORY_LEN=str(args.events))
        ws_url = f"ws://{HOST}:{server.ws_port}/ws"
        asyncio.run(measure(args, bench, server.process.pid, ws_url))


if __name__ == "__main__":
    main()
