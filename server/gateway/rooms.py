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
from redis.exceptions import RedisError, ResponseError

from tokenchat.protocol.limits import HISTORY_LEN_MAX, HISTORY_PAGE_LEN

from .. import bus
from ..economy.batcher import ScriptBatcher
from ..economy.scripts import HISTORY_LIB, history_trim, lua_script
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


def format_offset(offset: Offset) -> str:
    return f"{offset[0]}-{offset[1]}"


@dataclasses.dataclass(frozen=True, slots=True)
class History:
    """One read of a room's history (a page, or its newest events)."""

    events: list[tuple[bytes, bytes]]  # (offset, wire JSON), oldest first
    # False: the event at `since` is gone (trimmed, or lost with Redis), and
    # so may be some after it; the read starts at the oldest one kept.
    recovered: bool
    # Later events follow, up to `end`: read the next page after the last one.
    more: bool = False
    # The newest event the read covers: where the session's live events take
    # over (None: the room has none).
    end: Offset | None = None


class RoomStore:
    def __init__(
        self, redis: Redis, keys: Keys, history_len: int, history_age_s: float, timeout_s: float
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._history_len = history_len
        self._trim = history_trim(history_len, history_age_s)
        # Lines said at once by many sessions go to Redis in one pipeline.
        self._batcher = ScriptBatcher(redis, timeout_s)
        # Sent twice, a line would be posted twice: no key makes it idempotent.
        self._room_event = lua_script("room_event", retry_safe=False, libs=(HISTORY_LIB,))
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
                [
                    self._trim["history_len"],
                    orjson.dumps(event),
                    account,
                    self._trim["history_age_ms"],
                ],
            )
        except (RedisError, OSError, TimeoutError) as exc:
            raise Unavailable("room state is unavailable") from exc
        if isinstance(offset, list):
            show = offset[1].decode() if isinstance(offset[1], bytes) else str(offset[1])
            raise Forbidden(f"ticket show {show} is on: only ticket holders may post")
        return offset.decode() if isinstance(offset, bytes) else str(offset)

    async def latest(self, room: str) -> History:
        """The room's newest events (at most HISTORY_LEN_MAX: a `join`
        without `since`)."""
        try:
            rows: Any = await self._redis.xrevrange(
                self._keys.room_history(room), count=HISTORY_LEN_MAX
            )
        except (RedisError, OSError) as exc:
            raise Unavailable("room history is unavailable") from exc
        events = [_wire(row) for row in reversed(rows)]
        return History(events, recovered=True, end=parse_offset(events[-1][0]) if events else None)

    async def page(self, room: str, since: str, until: Offset | None = None) -> History:
        """The events after ``since``, oldest first, at most HISTORY_PAGE_LEN,
        up to ``until`` (included; None: the room's newest, read with the
        page in one transaction and returned as ``end``)."""
        key = self._keys.room_history(room)
        # `since` itself (finding it proves nothing after it was trimmed),
        # the page, and one more to know whether more follow.
        count = HISTORY_PAGE_LEN + 2
        last = "+" if until is None else format_offset(until)
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.xrange(key, min=since, max=last, count=count)
                # Its oldest and newest events, how many it holds and how many
                # were ever added; ResponseError when the room has no history.
                pipe.xinfo_stream(key)
                rows, info = await pipe.execute(raise_on_error=False)
        except (RedisError, OSError) as exc:
            raise Unavailable("room history is unavailable") from exc
        if isinstance(rows, Exception):
            raise Unavailable("room history is unavailable") from rows
        stream: dict[str, Any] = {} if isinstance(info, ResponseError) else info
        events = [_wire(row) for row in rows]
        oldest, newest = (stream.get(edge) for edge in ("first-entry", "last-entry"))
        end = until
        if until is None:
            end = parse_offset(newest[0]) if newest else None
        start = parse_offset(since)
        found = bool(events) and parse_offset(events[0][0]) == start
        if found:
            events = events[1:]
        # Trimming takes the oldest events first: `since` is missing but not
        # trimmed when the history still reaches back to it (a `clear` took
        # it); nothing is missed when the room holds nothing at all, or never
        # lost an event (all it was given it holds: a `since` of "0-0" from a
        # member who joined it empty). Only for "0-0": a real `since` older
        # than a stream that never lost an event is from a stream Redis lost
        # (the new one's counters start afresh), so a gap.
        recovered = (
            found
            or not oldest
            or start >= parse_offset(oldest[0])
            or (start == (0, 0) and stream.get("entries-added") == stream.get("length"))
        )
        page = events[:HISTORY_PAGE_LEN]
        return History(page, recovered, more=len(events) > len(page), end=end)

    async def after(self, room: str, since: str | None) -> list[tuple[bytes, bytes]]:
        """Every event after ``since`` up to the room's newest, page by page
        (no ``since``: the newest ones, as ``latest``)."""
        if since is None:
            return (await self.latest(room)).events
        read = await self.page(room, since)
        events = list(read.events)
        # The history holds at most history_len events: so many pages at most.
        for _ in range(self._history_len // HISTORY_PAGE_LEN + 1):
            if not read.more or not events:
                break
            read = await self.page(room, events[-1][0].decode(), read.end)
            events.extend(read.events)
        return events

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
