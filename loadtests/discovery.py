"""Discovery figures (issue #13): room listing latency and live fan-out time.

    python -m loadtests.discovery [--rooms 10000] [--followers 100000]
                                  [--connected 10000] [--nodes 2] [--reads 200]

In one process, against the real Redis and a fresh Postgres schema (dropped
at the end), with ``--nodes`` started ``Node`` objects (each its own Redis
and Postgres pools, pub/sub and background loops, as ``tokenchat serve``
runs them):

1. ``GET /v1/rooms?sort=trending`` with ``--rooms`` model rooms, each with a
   profile (2 of 12 tags) and tips in the trending window (the standing
   projection's hourly rows, 5 tippers per room): the snapshot rebuild (all
   rooms, their profiles, trending sums and viewers: what a node does in the
   background every ``discovery_refresh_s``) and a request (filter, sort, page of 100), through
   the ASGI app in-process (httpx ASGITransport: routing, JSON, no socket).
   Then stable paging: a first page of 24 that pins its ranking in Redis,
   one with the ranking pinned already, and page 2 read on another node
   (the pin fetched from Redis, then from that node's memory).
2. Live fan-out: one model with ``--followers`` followers, of whom
   ``--connected`` are "connected", spread evenly over the nodes. A connected
   follower is a stand-in session registered with its node (the node's
   ``_user_sessions``) whose ``push_live`` records when the frame reached it:
   what is measured is tokenchat's part (the job row, pub/sub, each node's
   "which of my users follow her" queries and pushes), not 10,000 sockets'
   writes (the fanout benchmark measures those). Reports the time until every
   connected follower had its event, until every notification was stored,
   and the longest stall of each node's event loop meanwhile (a 1 ms ticker).
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
import httpx

from tokenchat.server.config import Settings
from tokenchat.server.db import migrate
from tokenchat.server.gateway.node import Node
from tokenchat.server.http.api import create_app

TAGS = [f"tag{i}" for i in range(12)]
HOUR_MS = 3_600_000


class StandIn:
    """A connected follower's session: records when `live` reached it."""

    __slots__ = ("got", "identity")

    def __init__(self) -> None:
        self.got = 0.0
        self.identity = None

    def push_live(self, frame: bytes) -> None:
        self.got = time.perf_counter()


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def fill(conn: Any, rooms: int, followers: int) -> None:
    rng = random.Random(13)
    models = [f"m{i:05d}" for i in range(rooms)]
    await conn.execute(
        """INSERT INTO users (id, role) SELECT id, 'model' FROM unnest($1::text[]) id""", models
    )
    await conn.execute("INSERT INTO rooms (id) SELECT unnest($1::text[])", models)
    await conn.execute(
        """INSERT INTO profiles (user_id, display_name, bio, tags, online_status)
           SELECT id, 'Model ' || id, 'bio of ' || id, ARRAY[t1, t2], 'online'
           FROM unnest($1::text[], $2::text[], $3::text[]) AS b(id, t1, t2)""",
        models,
        [rng.choice(TAGS) for _ in models],
        [rng.choice(TAGS) for _ in models],
    )
    hour = int(time.time() * 1000) // HOUR_MS
    rows = [
        (m, f"fan{rng.randrange(5000)}", hour, rng.randrange(1, 500))
        for m in models
        for _ in range(5)
    ]
    await conn.execute(
        """INSERT INTO standing_room_hourly (room, user_id, hour, tokens)
           SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[])
           ON CONFLICT DO NOTHING""",
        *map(list, zip(*rows, strict=True)),
    )
    fans = [f"f{i:06d}" for i in range(followers)]
    await conn.execute(
        "INSERT INTO users (id, role) SELECT id, 'fan' FROM unnest($1::text[]) id", fans
    )
    await conn.execute(
        "INSERT INTO follows (follower, model) SELECT id, 'm00000' FROM unnest($1::text[]) id",
        fans,
    )
    await conn.execute("ANALYZE")


async def listing(node: Node, reads: int) -> None:
    transport = httpx.ASGITransport(app=create_app(node))
    async with httpx.AsyncClient(transport=transport, base_url="http://bench") as http:
        rebuild, cached = [], []
        for _ in range(max(5, reads // 10)):
            node.discovery.invalidate()  # force the once-a-second rebuild
            started = time.perf_counter()
            response = await http.get("/v1/rooms?sort=trending")
            rebuild.append((time.perf_counter() - started) * 1000)
            assert response.status_code == 200, response.text
        for n in range(reads):
            query = "?sort=trending" if n % 2 else f"?sort=trending&tag={TAGS[n % 12]}&q=model"
            started = time.perf_counter()
            response = await http.get(f"/v1/rooms{query}")
            cached.append((time.perf_counter() - started) * 1000)
            assert response.status_code == 200 and len(response.json()["rooms"]) > 0
    while node.discovery._rebuild is not None:  # noqa: ASYNC110 - none during the fan-out
        await asyncio.sleep(0.05)
    count = len(node.discovery._snapshot)
    print(f"GET /v1/rooms?sort=trending over {count:,} rooms:")
    print(
        f"  snapshot rebuild (every discovery_refresh_s per node, off the request): p50 "
        f"{statistics.median(rebuild):.1f} ms, p99 {percentile(rebuild, 0.99):.1f} ms"
    )
    print(
        f"  cached request (filter, sort, page of 100, JSON): p50 "
        f"{statistics.median(cached):.2f} ms, p99 {percentile(cached, 0.99):.2f} ms"
    )


async def paging(nodes: list[Node], rounds: int) -> None:
    """Stable pages: a first page that pins its ranking (one SET of every room
    id), the same first page once pinned, and page 2 read on the other node
    (the pin fetched from Redis, then from its memory)."""
    first_node, other_node = nodes[0], nodes[-1]
    apps = [httpx.ASGITransport(app=create_app(node)) for node in (first_node, other_node)]
    async with (
        httpx.AsyncClient(transport=apps[0], base_url="http://bench") as first,
        httpx.AsyncClient(transport=apps[1], base_url="http://bench") as other,
    ):
        assert (await other.get("/v1/rooms?limit=1")).status_code == 200  # its snapshot built
        pinning: list[float] = []
        pinned: list[float] = []
        fetched: list[float] = []
        cached: list[float] = []
        for _ in range(rounds):
            first_node.discovery.invalidate()  # a new snapshot: a new pin
            assert (await first.get("/v1/rooms?limit=1&sort=new")).status_code == 200
            for samples in (pinning, pinned):
                started = time.perf_counter()
                page = (await first.get("/v1/rooms?sort=trending&limit=24")).json()
                samples.append((time.perf_counter() - started) * 1000)
            for samples in (fetched, cached):
                started = time.perf_counter()
                response = await other.get(
                    f"/v1/rooms?sort=trending&limit=24&cursor={page['next_cursor']}"
                )
                samples.append((time.perf_counter() - started) * 1000)
                assert response.status_code == 200, response.text
    print(f"GET /v1/rooms paged (limit 24), p50 / p99 over {rounds} rounds:")
    for label, samples in (
        ("first page, pinning the ranking in Redis", pinning),
        ("first page, ranking pinned already", pinned),
        ("page 2 on the other node, pin read from Redis", fetched),
        ("page 2 again there, pin in its memory", cached),
    ):
        print(f"  {label}: {statistics.median(samples):.2f} / {percentile(samples, 0.99):.2f} ms")


async def fanout(nodes: list[Node], followers: int, connected: int) -> None:
    stand_ins: list[StandIn] = []
    fans = [f"f{i:06d}" for i in range(followers)]
    for n, fan in enumerate(random.Random(14).sample(fans, connected)):
        stand_in = StandIn()
        nodes[n % len(nodes)]._user_sessions[fan] = {stand_in}  # type: ignore[arg-type]
        stand_ins.append(stand_in)
    stalls = [0.0] * len(nodes)
    stop = asyncio.Event()

    async def ticker(i: int) -> None:  # all nodes share this loop: one ticker suffices
        last = time.perf_counter()
        while not stop.is_set():
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            stalls[i] = max(stalls[i], now - last - 0.001)
            last = now

    tick = asyncio.create_task(ticker(0))
    await asyncio.sleep(0.05)
    started = time.perf_counter()
    job = await nodes[0].discovery.go_live("m00000", int(time.time() * 1000))
    stored_s = time.perf_counter() - started
    async with asyncio.timeout(60):
        while any(s.got == 0.0 for s in stand_ins):  # noqa: ASYNC110 - polling stand-ins
            await asyncio.sleep(0.005)
    delivered_s = max(s.got for s in stand_ins) - started
    stop.set()
    await tick
    async with nodes[0].pool.acquire() as conn:
        stored = await conn.fetchval("SELECT count(*) FROM notifications WHERE job = $1", job)
    print(
        f"live fan-out, {followers:,} followers, {connected:,} connected over {len(nodes)} nodes:"
    )
    print(f"  every connected follower had `live`: {delivered_s * 1000:.0f} ms after go_live")
    print(
        f"  {stored:,} notifications stored (batches of "
        f"{nodes[0].settings.live_batch_followers:,}): {stored_s * 1000:.0f} ms"
    )
    print(f"  longest event-loop stall meanwhile: {max(stalls) * 1000:.1f} ms")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rooms", type=int, default=10_000)
    parser.add_argument("--followers", type=int, default=100_000)
    parser.add_argument("--connected", type=int, default=10_000)
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--reads", type=int, default=200)
    args = parser.parse_args()
    schema = f"bench_discovery_{uuid.uuid4().hex[:8]}"
    settings = Settings(database_schema=schema, redis_prefix=f"{schema}:", jwt_secret="x" * 32)
    await migrate(settings.database_url, schema)
    nodes: list[Node] = []
    try:
        admin = await asyncpg.connect(
            settings.database_url, server_settings={"search_path": schema}
        )
        try:
            await fill(admin, args.rooms, args.followers)
        finally:
            await admin.close()
        for _ in range(args.nodes):
            node = await Node.connect(settings)
            await node.start()
            nodes.append(node)
        await listing(nodes[0], args.reads)
        await paging(nodes, max(5, args.reads // 4))
        await fanout(nodes, args.followers, args.connected)
    finally:
        for node in nodes:
            node._user_sessions.clear()
            await node.close()
        admin = await asyncpg.connect(settings.database_url)
        try:
            await admin.execute(f'DROP SCHEMA "{schema}" CASCADE')
        finally:
            await admin.close()


if __name__ == "__main__":
    asyncio.run(main())
