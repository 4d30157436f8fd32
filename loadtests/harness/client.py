"""The minimal WebSocket client of the load processes (RFC 6455).

It speaks RFC 6455 only as far as the measured servers need: one handshake,
masked client frames, unfragmented unmasked server frames, ping answered with
pong. Reading a frame costs little more than the system call that brings it,
so that the server, not the load generator, sets the rate. It is a measuring
instrument, not a general client.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import secrets
import time
from collections.abc import Callable
from typing import Any, Literal, cast

import orjson

from loadtests.harness.stats import Stats

# Which server a member talks to: tokenchat, or the scenario's baseline.
Kind = Literal["tokenchat", "baseline"]
KINDS: tuple[Kind, ...] = ("tokenchat", "baseline")

HOST = "127.0.0.1"
# Engine.IO v4 straight over a websocket: the Socket.IO baselines' path.
SIO_PATH = "/socket.io/?EIO=4&transport=websocket"
JSON_SUBPROTOCOL = "tokenchat.v1.json"

CONNECT_TIMEOUT_S = 15.0  # one member's connect + handshake + hello + join
# hello/join answered UNAVAILABLE are sent again, this many times in all, after
# a delay doubling from this one: a loaded machine (or a Redis pool briefly
# exhausted by the connect burst) should slow the set-up, not abort the run.
SETUP_ATTEMPTS_MAX = 4  # attempts
SETUP_RETRY_DELAY_S = 0.2
HANDSHAKE_MAX_BYTES = 16 * 1024  # of the server's HTTP 101 response

# RFC 6455 section 1.3: the server proves it read the key by hashing it with this.
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
OP_TEXT = 0x1
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA


class SenderState:
    """The send window of one sending member."""

    def __init__(self, index: int, window: int) -> None:
        self.index = index
        self.window = window
        self.tag = b"@S%d@" % index  # follows the timestamp in its texts
        self.in_flight = 0
        self.sent = 0
        self.lost = 0
        self.slot_free = asyncio.Event()

    def release(self) -> None:
        if self.in_flight > 0:
            self.in_flight -= 1
        self.slot_free.set()


class HandshakeError(Exception):
    pass


def _mask(payload: bytes, key: bytes) -> bytes:
    """RFC 6455 section 5.3: XOR with the 4-byte key, repeated."""
    length = len(payload)
    if length == 0:
        return payload
    stream = (key * (length // 4 + 1))[:length]
    masked = int.from_bytes(payload, "big") ^ int.from_bytes(stream, "big")
    return masked.to_bytes(length, "big")


class Member(asyncio.Protocol):
    """One member's connection: handshake, then frames scanned as they come.

    Frames that carry a benchmark timestamp are counted in ``stats``; during
    set-up, JSON replies are matched to the waiting request by ``re``.
    """

    # The request target of the opening handshake.
    path = "/ws"

    def __init__(
        self,
        port: int,
        subprotocol: str | None,
        stats: Stats,
        sender: SenderState | None = None,
    ) -> None:
        self._port = port
        self._subprotocol = subprotocol
        self._stats = stats
        self.sender = sender
        self._key = base64.b64encode(secrets.token_bytes(16))
        self._buf = bytearray()
        self._open = False
        self.transport: asyncio.Transport | None = None
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}

    # --- asyncio.Protocol ---------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCPTransport has the Transport API without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        lines = [
            f"GET {self.path} HTTP/1.1",
            f"Host: {HOST}:{self._port}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {self._key.decode()}",
            "Sec-WebSocket-Version: 13",
        ]
        if self._subprotocol:
            lines.append(f"Sec-WebSocket-Protocol: {self._subprotocol}")
        self.transport.write(("\r\n".join(lines) + "\r\n\r\n").encode())

    def connection_lost(self, exc: Exception | None) -> None:
        if self._stats.counting:
            self._stats.disconnects += 1
        failure = ConnectionError("connection closed")
        if not self.opened.done():
            self.opened.set_exception(failure)
        for waiter in self._waiting.values():
            if not waiter.done():
                waiter.set_exception(failure)
        if self.sender is not None:
            self.sender.slot_free.set()

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        if not self._open and not self._finish_handshake():
            return
        # One clock read per read(): every frame in it arrived at this moment.
        now_ns = time.monotonic_ns()
        pos = 0
        size = len(buf)
        while size - pos >= 2:
            length = buf[pos + 1] & 0x7F
            if length < 126:
                start = pos + 2
            elif length == 126:
                start = pos + 4
                if start > size:
                    break
                length = int.from_bytes(buf[pos + 2 : start], "big")
            else:
                start = pos + 10
                if start > size:
                    break
                length = int.from_bytes(buf[pos + 2 : start], "big")
            end = start + length
            if end > size:
                break
            opcode = buf[pos] & 0x0F
            if opcode == OP_TEXT:
                self._on_text(buf, start, end, now_ns)
            elif opcode == OP_PING:
                self._send_frame(OP_PONG, bytes(buf[start:end]))
            elif opcode == OP_CLOSE:
                self.close()
                return
            pos = end
        if pos:
            del buf[:pos]

    # --- frames -------------------------------------------------------------------
    def _finish_handshake(self) -> bool:
        buf = self._buf
        head_end = buf.find(b"\r\n\r\n")
        if head_end < 0:
            if len(buf) > HANDSHAKE_MAX_BYTES:
                self._fail(HandshakeError("handshake response too large"))
            return False
        head = bytes(buf[:head_end]).decode("latin-1").split("\r\n")
        del buf[: head_end + 4]
        headers = {}
        for line in head[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        accept = base64.b64encode(hashlib.sha1(self._key + WS_GUID).digest()).decode()
        if " 101 " not in head[0] + " " or headers.get("sec-websocket-accept") != accept:
            self._fail(HandshakeError(f"handshake refused: {head[0]!r}"))
            return False
        self._open = True
        if not self.opened.done():  # its waiter may have given up (a timeout)
            self.opened.set_result(None)
        return True

    def _on_text(self, buf: bytearray, start: int, end: int, now_ns: int) -> None:
        if self._waiting:
            # Set-up: a reply (a `join` reply holds history, whose texts carry
            # the markers of an earlier run: it is not a delivery).
            reply = orjson.loads(bytes(buf[start:end]))
            re = reply.get("re") if isinstance(reply, dict) else None
            waiter = self._waiting.get(re) if isinstance(re, int) else None
            if waiter is not None and not waiter.done():
                waiter.set_result(reply)
            return
        marker = buf.find(b"@T", start, end)
        if marker >= 0:
            stamp_end = buf.find(b"@", marker + 2, end)
            self._stats.record(now_ns, int(buf[marker + 2 : stamp_end]))
            sender = self.sender
            if sender is not None and buf[stamp_end : stamp_end + len(sender.tag)] == sender.tag:
                sender.release()
            return
        # Replies to `say` are `ok` (ignored) or an error, which frees the slot
        # its message would have freed.
        if buf.find(b'"type":"error"', start, end) >= 0:
            self._stats.errors += 1
            if self.sender is not None:
                self.sender.release()

    def _send_frame(self, opcode: int, payload: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        length = len(payload)
        header = bytearray([0x80 | opcode])
        # RFC 6455 section 5.1: a client masks every frame it sends.
        if length < 126:
            header.append(0x80 | length)
        elif length < 1 << 16:
            header.append(0x80 | 126)
            header += length.to_bytes(2, "big")
        else:
            header.append(0x80 | 127)
            header += length.to_bytes(8, "big")
        key = secrets.token_bytes(4)
        header += key
        self.transport.write(bytes(header) + _mask(payload, key))

    def send_text(self, payload: bytes) -> None:
        self._send_frame(OP_TEXT, payload)

    async def request(self, command: dict[str, Any]) -> dict[str, Any]:
        """Send a command and wait for its reply (the caller bounds the wait)."""
        command_id = command["id"]
        assert isinstance(command_id, int)
        waiter: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[command_id] = waiter
        try:
            self.send_text(orjson.dumps(command))
            return await waiter
        finally:
            del self._waiting[command_id]

    def _fail(self, exc: Exception) -> None:
        if not self.opened.done():
            self.opened.set_exception(exc)
        self.close()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def open_member(
    kind: Kind,
    port: int,
    stats: Stats,
    *,
    user_id: str,
    role: str,
    jwt_secret: str,
    room: str | None = None,
    sender: SenderState | None = None,
    protocol: Callable[[], Member] | None = None,
) -> Member:
    """A connected member; for tokenchat, authenticated and, with ``room``, in it.

    ``protocol`` makes the connection's ``Member`` (a subclass with a scenario
    of its own); by default a plain one, holding ``sender``'s window."""
    loop = asyncio.get_running_loop()
    subprotocol = JSON_SUBPROTOCOL if kind == "tokenchat" else None
    factory = protocol or (lambda: Member(port, subprotocol, stats, sender))
    member: Member | None = None
    step = "connect"
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            _, member = await loop.create_connection(factory, HOST, port)
            step = "handshake"
            await member.opened
            if kind == "tokenchat":
                step = "hello"
                token = _token(jwt_secret, user_id, role)
                await _command(member, stats, {"type": "hello", "token": token}, "welcome")
                if room is not None:
                    step = "join"
                    await _command(member, stats, {"type": "join", "room": room}, "ok")
    except BaseException as exc:
        if member is not None:
            member.close()
        if isinstance(exc, TimeoutError):
            raise TimeoutError(f"{user_id}: {step} took over {CONNECT_TIMEOUT_S} s") from None
        raise
    return member


async def _command(
    member: Member, stats: Stats, command: dict[str, Any], expected: str
) -> dict[str, Any]:
    """A set-up command; UNAVAILABLE ("a backend is down, nothing was done") is
    retried a few times, as a real client would, and counted."""
    for attempt in range(SETUP_ATTEMPTS_MAX):
        reply = await member.request({**command, "id": attempt + 1})
        if reply.get("type") == expected:
            return reply
        if reply.get("code") != "UNAVAILABLE" or attempt + 1 == SETUP_ATTEMPTS_MAX:
            break
        stats.setup_retries += 1
        await asyncio.sleep(SETUP_RETRY_DELAY_S * 2**attempt)
    raise RuntimeError(f"{command['type']} refused: {reply}")


def _token(jwt_secret: str, user_id: str, role: str) -> str:
    from tokenchat.server.auth import issue_token

    return issue_token(jwt_secret, user_id, role)
