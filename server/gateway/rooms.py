"""A room's state in Redis: its event history, its order, its presence.

Events are stored as JSON without ``offset`` and ``ts``; both come from the
stream id (``ms-seq``), so the stored form and the published form (``E`` in
server/bus.py) need no second write, and ``complete_event`` is the one place
that adds them.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError

from .. import bus
from ..economy.batcher import ScriptBatcher
from ..economy.scripts import lua_script
from ..errors import Forbidden, Unavailable
from ..keys import Keys

Offset = tuple[int, int]

# A node whose heartbeat ran out is remembered this long (ms) in the nodes'
# set, so that viewer counts remove its sessions from every room they read
# meanwhile (a day: a room read less often keeps a stale field, never
# counted); the set holds the ids of a day's restarts, a few hundred bytes.
NODE_REMEMBERED_MS = 24 * 3600 * 1000


def parse_offset(offset: str | bytes) -> Offset:
    text = offset.decode() if isinstance(offset, bytes) else offset
    ms, _, seq = text.partition("-")
    return int(ms), int(seq)


def complete_event(body: bytes, offset: bytes) -> bytes:
    """The wire JSON of a stored event: its body plus `offset` and `ts`."""
    ms = offset.partition(b"-")[0]
    return b"".join((body[:-1], b',"offset":"', offset, b'","ts":', ms, b"}"))


@dataclasses.dataclass(frozen=True, slots=True)
class History:
    events: list[tuple[bytes, bytes]]  # (offset, wire JSON), oldest first
    recovered: bool


class RoomStore:
    def __init__(self, redis: Redis, keys: Keys, history_len: int, timeout_s: float) -> None:
        self._redis = redis
        self._keys = keys
        self._history_len = history_len
        # Lines said at once by many sessions go to Redis in one pipeline.
        self._batcher = ScriptBatcher(redis, timeout_s)
        # Sent twice, a line would be posted twice: no key makes it idempotent.
        self._room_event = lua_script("room_event", retry_safe=False)
        self._viewers = lua_script("viewers", retry_safe=True)  # a count
        self._nodes_read = lua_script("nodes_read", retry_safe=True)
        self._node_beat = lua_script("node_beat", retry_safe=True)

    async def append(
        self,
        room: str,
        event: dict[str, Any],
        poster: str | None = None,
        *,
        show_time: bool = False,
    ) -> str:
        """Store and publish ``event`` (without offset/ts); returns its offset.

        ``poster``: the user posting it. While a ticket show runs in the
        room, only its model and ticket holders may (Forbidden otherwise),
        and the event is marked with the show (``in_show``). None: the
        server's own event (a `show` event), never marked, unless
        ``show_time``: it comes of what happened during the show (a `king`
        crowned by show-time tips), so only those who see the show get it."""
        account = ("*" if show_time else "") if poster is None else f"u:{poster}"
        try:
            offset = await self._batcher.call(
                self._room_event,
                [
                    self._keys.room_history(room),
                    self._keys.room_show(room),
                    self._keys.room_channel(room),
                ],
                [self._history_len, orjson.dumps(event), account],
            )
        except (RedisError, OSError, TimeoutError) as exc:
            raise Unavailable("room state is unavailable") from exc
        if isinstance(offset, list):
            show = offset[1].decode() if isinstance(offset[1], bytes) else str(offset[1])
            raise Forbidden(f"ticket show {show} is on: only ticket holders may post")
        return offset.decode() if isinstance(offset, bytes) else str(offset)

    async def history(self, room: str, since: str | None) -> History:
        """The last events, or those after ``since`` and whether none is missing."""
        key = self._keys.room_history(room)
        try:
            if since is None:
                rows: Any = await self._redis.xrevrange(key, count=self._history_len)
                return History([_wire(row) for row in reversed(rows)], recovered=True)
            # Inclusive of `since`: finding it proves nothing after it was trimmed.
            rows = await self._redis.xrange(key, min=since, count=self._history_len + 1)
        except (RedisError, OSError) as exc:
            raise Unavailable("room history is unavailable") from exc
        events = [_wire(row) for row in rows]
        if events and events[0][0].decode() == since:
            return History(events[1:], recovered=True)
        # Nothing at or after `since`: nothing was missed. Otherwise the event
        # at `since` was trimmed (or the history was lost), and some may be too.
        return History(events[-self._history_len :], recovered=not events)

    async def publish_presence_changed(self, room: str, node_id: str, sessions: int) -> None:
        presence = self._keys.room_presence(room)
        async with self._redis.pipeline(transaction=False) as pipe:
            if sessions > 0:
                pipe.hset(presence, node_id, sessions)
            else:
                pipe.hdel(presence, node_id)
            pipe.spublish(self._keys.room_channel(room), bus.PRESENCE_CHANGED.encode())
            await pipe.execute()

    async def node_beat(self, node_id: str, ttl_ms: int) -> None:
        """``node_id`` lives for ``ttl_ms`` more (0: it leaves now)."""
        await self._batcher.call(
            self._node_beat, [self._keys.nodes()], [node_id, ttl_ms, NODE_REMEMBERED_MS]
        )

    async def viewers(self, rooms: list[str]) -> list[int]:
        # The nodes first (their set is a key of its own slot), then each
        # room's count over them: one slot per script, on a cluster too.
        live, dead = await self._batcher.call(self._nodes_read, [self._keys.nodes()], [])
        nodes = [len(live), *live, *dead]
        counts = await asyncio.gather(
            *(
                self._batcher.call(self._viewers, [self._keys.room_presence(room)], nodes)
                for room in rooms
            )
        )
        return [int(n) for n in counts]


def _wire(row: tuple[bytes, dict[bytes, bytes]]) -> tuple[bytes, bytes]:
    offset, fields = row
    return offset, complete_event(fields[b"e"], offset)
