"""Redis CPU per room event on a Redis Cluster: sharded against classic pub/sub.

Starts a local cluster of three primaries (tokenchat.server.devstack.cluster),
subscribes one listener per room channel (SSUBSCRIBE on the owning primary
for the sharded run, SUBSCRIBE on one primary for the classic run, as the
broker does), then publishes ``--events`` room events, the way
``room_event.lua`` does (an XADD to the room's history and a publish, in one
script, pipelined by the server's ``ScriptBatcher``), over ``--rooms`` rooms,
once with SPUBLISH and once with PUBLISH. For each run it reads every
primary's CPU (INFO cpu: used_cpu_user + used_cpu_sys) before and after, and
reports the µs of Redis CPU per event on the primary that ran the script
and on the others, with the events/s of the whole run. It waits for every
listener to get every event before it stops the clock.

    python -m loadtests.sharded_publish --events 20000 --rooms 30
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any, cast

from redis.asyncio import Redis, RedisCluster
from redis.crc import key_slot

from tokenchat.server.config import Settings
from tokenchat.server.devstack.cluster import LocalCluster
from tokenchat.server.economy.batcher import LuaScript, ScriptBatcher
from tokenchat.server.keys import Keys
from tokenchat.server.redis_client import connect

# The event's body: a chat line's size.
EVENT = b'{"type":"message","room":"r","from":"fan","text":"hello there","tier":0}'
HISTORY_LEN = 50
# What the run's script does besides publishing: room_event.lua's XADD.
SCRIPT = """
local id = redis.call('XADD', KEYS[1], 'MAXLEN', ARGV[1], '*', 'e', ARGV[2])
redis.call(ARGV[3], KEYS[2], 'E' .. id .. ' ' .. ARGV[2])
return id
"""


async def _cpu_s(client: Redis) -> float:
    info = await client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


async def _listen(client: Redis, channels: list[str], sharded: bool, counts: list[int]) -> None:
    pubsub = client.pubsub()
    if sharded:
        for channel in channels:  # one slot each
            await pubsub.ssubscribe(channel)
    else:
        await pubsub.subscribe(*channels)
    try:
        while True:
            message: Any = await pubsub.get_message(timeout=None)
            if message and message["type"] in ("message", "smessage"):
                counts[0] += 1
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call]


async def run(url: str, events: int, rooms: int, command: str) -> dict[str, Any]:
    settings = Settings(redis_url=url, redis_cluster=1, redis_prefix=f"bench:{command}:")
    keys = Keys(settings.redis_prefix)
    redis = connect(settings, max_connections=8, socket_timeout_s=10.0)
    cluster = cast(RedisCluster, redis)
    await cluster.initialize()
    primaries = {
        node.name: Redis(host=node.host, port=int(node.port)) for node in cluster.get_primaries()
    }
    names = [f"room{i}" for i in range(rooms)]
    channels = [keys.room_channel(room) for room in names]
    sharded = command == "SPUBLISH"
    counts = [0]
    listeners = []
    if sharded:
        by_node: dict[str, list[str]] = {}
        for channel in channels:
            node = cluster.nodes_manager.get_node_from_slot(key_slot(channel.encode()))
            by_node.setdefault(node.name, []).append(channel)
        for name, group in by_node.items():
            listeners.append(asyncio.create_task(_listen(primaries[name], group, True, counts)))
    else:
        first = next(iter(primaries.values()))
        listeners.append(asyncio.create_task(_listen(first, channels, False, counts)))
    await asyncio.sleep(0.5)  # subscribed
    batcher = ScriptBatcher(redis, 10.0)
    script = LuaScript("bench", SCRIPT, retry_safe=False)
    before = {name: await _cpu_s(client) for name, client in primaries.items()}
    owner_events: dict[str, int] = dict.fromkeys(primaries, 0)
    started = time.perf_counter()
    chunk = 500
    for start in range(0, events, chunk):
        calls = []
        for i in range(start, min(start + chunk, events)):
            room = names[i % rooms]
            history, channel = keys.room_history(room), keys.room_channel(room)
            node = cluster.nodes_manager.get_node_from_slot(key_slot(history.encode()))
            owner_events[node.name] += 1
            calls.append(batcher.call(script, [history, channel], [HISTORY_LEN, EVENT, command]))
        await asyncio.gather(*calls)
    while counts[0] < events:  # noqa: ASYNC110 - polling the listeners' count
        await asyncio.sleep(0.01)
    elapsed = time.perf_counter() - started
    after = {name: await _cpu_s(client) for name, client in primaries.items()}
    for task in listeners:
        task.cancel()
    await asyncio.gather(*listeners, return_exceptions=True)
    # Per event: the CPU of the primaries that ran scripts, shared over their
    # events, and of every primary over all events.
    total_cpu = sum(after[n] - before[n] for n in primaries)
    result = {
        "command": command,
        "events_per_s": round(events / elapsed),
        "redis_us_per_event_all_primaries": round(total_cpu / events * 1e6, 1),
        "per_primary_us_per_event": {
            name: round((after[name] - before[name]) / events * 1e6, 1) for name in primaries
        },
        "events_by_owner": owner_events,
    }
    for client in primaries.values():
        await client.aclose()
    await redis.aclose()
    return result


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=20000)
    parser.add_argument("--rooms", type=int, default=30)
    options = parser.parse_args()
    with LocalCluster() as cluster:
        for command in ("SPUBLISH", "PUBLISH"):
            print(await run(cluster.url, options.events, options.rooms, command), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
