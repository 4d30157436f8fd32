"""The local side of fan-out: room -> the sessions of this process in it.

``deliver`` is synchronous: an event is encoded once per format and written
into every member's transport buffer without awaiting any of them (the
websockets library's ``broadcast``). A member whose unsent bytes are past the
limit is not written to; it is closed with 4008 and leaves the room, and the
rest of the room never waits for it.

The hub also drops any room event at or before the last offset it delivered
for that room, which makes gap filling after a pub/sub reconnect safe to
overlap with live delivery.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Protocol

from websockets.asyncio.connection import Connection
from websockets.asyncio.server import broadcast

from protocol import json_to_msgpack

from . import metrics
from .rooms import Offset, parse_offset


class Member(Protocol):
    """What the hub needs of a session."""

    @property
    def connection(self) -> Connection: ...
    @property
    def binary(self) -> bool: ...
    def buffering(self, room: str) -> bool: ...
    def buffer_event(self, room: str, offset: Offset | None, frame: bytes) -> None: ...
    def write_buffer_bytes(self) -> int: ...
    def close_too_slow(self) -> None: ...


class Hub:
    def __init__(self, write_buffer_max_bytes: int) -> None:
        self._write_buffer_max_bytes = write_buffer_max_bytes
        self._rooms: dict[str, dict[Member, None]] = {}
        self._last_offset: dict[str, Offset] = {}

    def add(self, room: str, member: Member) -> None:
        self._rooms.setdefault(room, {})[member] = None

    def remove(self, room: str, member: Member) -> None:
        members = self._rooms.get(room)
        if members is None:
            return
        members.pop(member, None)
        if not members:
            del self._rooms[room]
            self._last_offset.pop(room, None)

    def count(self, room: str) -> int:
        return len(self._rooms.get(room, ()))

    def rooms(self) -> list[str]:
        return list(self._rooms)

    def last_offset(self, room: str) -> Offset | None:
        return self._last_offset.get(room)

    def deliver_event(self, room: str, offset: bytes, frame: bytes) -> None:
        """A room event (JSON) with its offset, once, in offset order."""
        members = self._rooms.get(room)
        if not members:
            return
        position = parse_offset(offset)
        last = self._last_offset.get(room)
        if last is not None and position <= last:
            return
        self._last_offset[room] = position
        self._send(room, members, position, frame)
        ts_ms = position[0]
        metrics.FANOUT_LATENCY.observe(max(0.0, time.time() - ts_ms / 1000))

    def deliver_transient(self, room: str, frame: bytes) -> None:
        """An event with no offset (presence): not ordered, not stored."""
        members = self._rooms.get(room)
        if members:
            self._send(room, members, None, frame)

    def _send(
        self, room: str, members: Iterable[Member], position: Offset | None, frame: bytes
    ) -> None:
        text_conns: list[Connection] = []
        binary_conns: list[Connection] = []
        too_slow: list[Member] = []
        for member in members:
            if member.buffering(room):
                member.buffer_event(room, position, frame)
            elif member.write_buffer_bytes() > self._write_buffer_max_bytes:
                too_slow.append(member)
            elif member.binary:
                binary_conns.append(member.connection)
            else:
                text_conns.append(member.connection)
        if text_conns:
            broadcast(text_conns, frame, text=True)
        if binary_conns:
            broadcast(binary_conns, json_to_msgpack(frame))
        metrics.DELIVERIES.inc(len(text_conns) + len(binary_conns))
        for member in too_slow:
            member.close_too_slow()
