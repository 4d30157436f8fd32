"""The local side of fan-out: room -> the sessions of this process in it.

``deliver_event`` is synchronous: an event is encoded once per format and
framed into every member's protocol buffer without awaiting any of them,
through per-room lists of connections kept ready between membership changes.
The bytes reach the sockets once per event-loop iteration (``FrameWriter``):
a member of a busy room gets every event of the iteration in one write
instead of one write system call per event.

Members whose ``join`` is still reading history are kept apart: they get the
event in their join buffer instead, and move to the lists when the join
reply is out. Members that stop reading are found by the node's periodic
sweep of write buffers (``Node._sweep_slow``), not here: checking every member
on every event cost more than the delivery itself.

The hub also drops any room event at or before the last offset it delivered
for that room. After a pub/sub reconnect, a room's live events are held until
the node has read what the room missed from history (``hold``, ``fill_gap``):
the missed events go out first, then the held ones, and an event found both in
history and on the channel reaches the members once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from typing import Protocol

import orjson
from websockets.asyncio.connection import Connection
from websockets.protocol import State

from tokenchat.protocol import json_to_msgpack

from .. import metrics
from .rooms import Offset, parse_offset

log = logging.getLogger(__name__)


class FrameWriter:
    """Event frames for many connections, written to the sockets once per
    event-loop iteration.

    Frames go into each connection's own protocol buffer (``send_text`` /
    ``send_binary`` of the websockets Sans-I/O protocol), the buffer its
    replies and pings go through as well, so order on a connection is the
    order of the calls: a reply sent before the flush carries the events
    framed before it. The flush runs as the next callback of the loop, so an
    event waits at most for the rest of the current iteration; in return a
    connection that gets several events in one iteration (a busy room, a tip
    with its balance push) costs one ``transport.write`` instead of several,
    and on a loaded server the system calls were the larger part of fan-out
    (py-spy: ``send_data`` 19 % of the server in the tips benchmark).
    """

    def __init__(self) -> None:
        self._pending: dict[Connection, None] = {}
        self._scheduled = False

    def send(self, connections: Iterable[Connection], frame: bytes, *, binary: bool) -> int:
        """Frame ``frame`` for every open connection; return how many."""
        sent = 0
        pending = self._pending
        for connection in connections:
            protocol = connection.protocol
            if protocol.state is not State.OPEN:
                continue  # closing: the library would refuse the frame
            if binary:
                protocol.send_binary(frame)
            else:
                protocol.send_text(frame)
            pending[connection] = None
            sent += 1
        if sent and not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)
        return sent

    def _flush(self) -> None:
        self._scheduled = False
        pending, self._pending = self._pending, {}
        for connection in pending:
            chunks = connection.protocol.data_to_send()
            if not chunks:
                continue  # a send of the connection's own already wrote them
            if all(chunks):
                try:
                    connection.transport.writelines(chunks)
                except Exception as exc:  # a transport closed under us: skip it
                    log.debug("event frames not written: %s", exc)
                continue
            # An empty chunk asks for end-of-file (the closing handshake is
            # done); the library knows how to do that, so hand them back.
            connection.protocol.writes[:0] = chunks
            connection.send_data()


class Member(Protocol):
    """What the hub needs of a session."""

    @property
    def connection(self) -> Connection: ...
    @property
    def binary(self) -> bool: ...
    def buffer_event(self, room: str, offset: Offset | None, frame: bytes) -> None: ...
    def sees(self, room: str, show: str | None) -> bool: ...


class _Room:
    __slots__ = ("_binary", "_text", "held", "joining", "members")

    def __init__(self) -> None:
        self.members: dict[Member, None] = {}
        self.joining: dict[Member, None] = {}
        # (offset, frame) of the live events that came while the node fills
        # the room's gap after a pub/sub reconnect; None when not filling.
        self.held: list[tuple[bytes, bytes]] | None = None
        self._text: list[Connection] | None = None
        self._binary: list[Connection] | None = None

    def changed(self) -> None:
        self._text = self._binary = None

    def connections(self) -> tuple[list[Connection], list[Connection]]:
        if self._text is None or self._binary is None:
            ready = [m for m in self.members if m not in self.joining]
            self._text = [m.connection for m in ready if not m.binary]
            self._binary = [m.connection for m in ready if m.binary]
        return self._text, self._binary


class Hub:
    def __init__(self) -> None:
        self._rooms: dict[str, _Room] = {}
        self._last_offset: dict[str, Offset] = {}
        # Per room, where live delivery began for its first member here (the
        # end of that join's history read; (0, 0): the room had no event):
        # a refill after a pub/sub outage reads from it while no live event
        # has been delivered yet (``refill_since``).
        self._join_floor: dict[str, Offset] = {}
        self.writer = FrameWriter()

    def join_started(self, room: str, member: Member) -> None:
        """Member of the room from now on; its events are held until
        ``join_finished``."""
        state = self._rooms.get(room)
        if state is None:
            state = self._rooms[room] = _Room()
        state.members[member] = None
        state.joining[member] = None
        state.changed()

    def join_finished(self, room: str, member: Member) -> None:
        state = self._rooms.get(room)
        if state is not None and state.joining.pop(member, 0) is None:
            state.changed()

    def remove(self, room: str, member: Member) -> None:
        state = self._rooms.get(room)
        if state is None or member not in state.members:
            return
        del state.members[member]
        state.joining.pop(member, None)
        state.changed()
        if not state.members:
            del self._rooms[room]
            self._last_offset.pop(room, None)
            self._join_floor.pop(room, None)

    def count(self, room: str) -> int:
        state = self._rooms.get(room)
        return 0 if state is None else len(state.members)

    def rooms(self) -> list[str]:
        return list(self._rooms)

    def last_offset(self, room: str) -> Offset | None:
        return self._last_offset.get(room)

    def joined_at(self, room: str, end: Offset | None) -> None:
        """A member's join read the room's history up to ``end`` (None: the
        room had no event); the first one's is the room's join floor."""
        if room in self._rooms:
            self._join_floor.setdefault(room, end or (0, 0))

    def refill_since(self, room: str) -> str | None:
        """Where a refill of the room's missed events starts: after the last
        event delivered, or, none yet, after the first join's history. None:
        unknown (no member here); the newest events then."""
        position = self._last_offset.get(room) or self._join_floor.get(room)
        return None if position is None else f"{position[0]}-{position[1]}"

    def hold(self, room: str) -> None:
        """Hold the room's live events until ``fill_gap``: pub/sub is back and
        the events it missed must reach the members before the new ones."""
        state = self._rooms.get(room)
        if state is not None and state.held is None:
            state.held = []

    def held_rooms(self) -> list[str]:
        return [room for room, state in self._rooms.items() if state.held is not None]

    def fill_gap(self, room: str, missed: list[tuple[bytes, bytes]]) -> None:
        """Deliver ``missed`` (from history, oldest first), then the live events
        held since ``hold``, each once and in offset order; stop holding."""
        state = self._rooms.get(room)
        if state is None or state.held is None:
            return  # its members all left meanwhile: nobody is owed the gap
        held, state.held = state.held, None
        # Whatever was published before the history read is in `missed`, and
        # what came after has a greater offset: history first, then the held
        # ones, is offset order, and `deliver_event` drops what both hold.
        for offset, frame in missed:
            self.deliver_event(room, offset, frame)
        for offset, frame in held:
            self.deliver_event(room, offset, frame)

    def deliver_event(self, room: str, offset: bytes, frame: bytes) -> None:
        """A room event (JSON) with its offset, once, in offset order."""
        state = self._rooms.get(room)
        if state is None:
            return
        if state.held is not None:
            state.held.append((offset, frame))
            return
        position = parse_offset(offset)
        last = self._last_offset.get(room)
        if last is not None and position <= last:
            return
        self._last_offset[room] = position
        self._send(room, state, position, frame)
        metrics.FANOUT_LATENCY.observe(max(0.0, time.time() - position[0] / 1000))

    def deliver_transient(self, room: str, frame: bytes) -> None:
        """An event with no offset (presence): not ordered, not stored."""
        state = self._rooms.get(room)
        if state is not None:
            self._send(room, state, None, frame)

    def _send(self, room: str, state: _Room, position: Offset | None, frame: bytes) -> None:
        if frame.find(SHOW_MARK, max(0, len(frame) - SHOW_MARK_TAIL)) >= 0:
            # Posted during a ticket show (room_event.lua, tip.lua): only
            # to the members who see it. One search of the frame's tail per
            # event (not per member) keeps a room without a show on the path
            # below, untouched.
            self._send_show_time(room, state, position, frame)
            return
        # The lists are taken before the joining members see the event: one
        # of them may finish its join on this very event (and must not get it
        # a second time through the lists).
        text, binary = state.connections()
        joining = list(state.joining)
        checked = encoded_event(f"room {room}", frame, binary=False)
        if checked is None:
            return
        sent = 0
        if text:
            sent += self.writer.send(text, frame, binary=False)
        if binary:
            packed = encoded_event(f"room {room}", frame, binary=True)
            if packed is not None:
                sent += self.writer.send(binary, packed, binary=True)
        for member in joining:
            member.buffer_event(room, position, frame)
        metrics.DELIVERIES.inc(sent)

    def _send_show_time(
        self, room: str, state: _Room, position: Offset | None, frame: bytes
    ) -> None:
        show = event_show(frame)
        joining = list(state.joining)
        text: list[Connection] = []
        binary: list[Connection] = []
        for member in state.members:
            if member not in state.joining and member.sees(room, show):
                (binary if member.binary else text).append(member.connection)
        checked = encoded_event(f"room {room}", frame, binary=False)
        if checked is None:
            return
        sent = 0
        if text:
            sent += self.writer.send(text, frame, binary=False)
        if binary:
            packed = encoded_event(f"room {room}", frame, binary=True)
            if packed is not None:
                sent += self.writer.send(binary, packed, binary=True)
        # A joining member filters its buffer when its join is answered (it
        # learns there which shows it sees).
        for member in joining:
            member.buffer_event(room, position, frame)
        metrics.DELIVERIES.inc(sent)


# The field room_event.lua and tip.lua add to an event posted during a
# ticket show. JSON escapes a `"` inside a string, so these bytes appear in
# a frame only as that field, never inside a chat line's text.
SHOW_MARK = b'"in_show":"'
# The scripts add the field last, and the gateway adds only `offset` and
# `ts` after it (complete_event): the field starts within this many bytes
# of the frame's end (37 for the field, at most 80 for offset and ts), so
# the live path searches the tail only, whatever the length of the text.
SHOW_MARK_TAIL = 160


def is_show_time(frame: bytes) -> bool:
    """Whether a complete room event was posted during a ticket show."""
    return frame.find(SHOW_MARK, max(0, len(frame) - SHOW_MARK_TAIL)) >= 0


def event_show(frame: bytes) -> str | None:
    """The show a room event was posted during (its ``in_show``), or None."""
    at = frame.find(SHOW_MARK)
    if at < 0:
        return None
    start = at + len(SHOW_MARK)
    end = frame.find(b'"', start)
    return frame[start:end].decode() if end > start else None


def encoded_event(where: str, frame: bytes, *, binary: bool) -> bytes | None:
    """The event JSON ``frame`` for members of one codec (msgpack when
    ``binary``), or None when it does not parse as a JSON object. Events come
    from our own scripts, but a program writing straight to our Redis can
    publish anything: it must reach no member, and it must not stop the
    pub/sub reader that delivers every other event. The check is one parse
    per event (the msgpack re-encoding parses anyway), not per member."""
    try:
        if binary:
            return json_to_msgpack(frame)
        if isinstance(orjson.loads(frame), dict):
            return frame
    except (ValueError, TypeError, OverflowError):
        pass
    log.error("dropped an event for %s: not a JSON object", where)
    return None
