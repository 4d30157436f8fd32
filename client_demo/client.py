"""A small asyncio client for the tokenchat wire protocol.

Two layers:

- ``Client``: one connection, commands matched to replies by ``id``, events
  delivered in order on a queue. Nothing is retried. The server tests use it
  to see exactly what the server does.
- ``Session``: a ``Client`` that reconnects. It keeps the rooms it joined and
  the last offset seen in each; after a connection loss it reconnects with
  exponential backoff and full jitter, says ``hello`` again and re-joins every
  room with ``since``, so the consumer of its events sees every room event
  exactly once, in offset order (docs/protocol.md, "After a reconnect").
  Spends (``tip``, ``dm``) carry an idempotency key generated once per logical
  spend and reused on every retry, so a spend whose reply was lost is charged
  once.

``python -m tokenchat.client_demo.cli`` is a terminal client built on ``Session``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import inspect
import itertools
import json
import random
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from tokenchat.protocol import JSON_SUBPROTOCOL, CloseCode, Codec, ErrorCode, codec_for

# Events held for a caller that is not consuming them; a client that never
# reads its events should not grow without bound either.
EVENT_QUEUE_MAX = 100_000
# How long a command waits for its reply by default.
REPLY_TIMEOUT_S = 10.0


class CommandError(Exception):
    """An ``error`` reply."""

    def __init__(self, reply: dict[str, Any]) -> None:
        super().__init__(f"{reply.get('code')}: {reply.get('message')}")
        self.reply = reply
        self.code: str = reply.get("code", "")


class Client:
    def __init__(self, ws: ClientConnection, codec: Codec) -> None:
        self.ws = ws
        self.codec = codec
        self._ids = itertools.count(1)
        self._waiting: dict[int | str, asyncio.Future[dict[str, Any]]] = {}
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue(EVENT_QUEUE_MAX)
        self.welcome: dict[str, Any] | None = None
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def connect(
        cls, url: str, *, subprotocol: str | None = JSON_SUBPROTOCOL, **kwargs: Any
    ) -> Client:
        protocols = [subprotocol] if subprotocol else None
        ws = await connect(url, subprotocols=protocols, compression=None, **kwargs)  # type: ignore[arg-type]
        return cls(ws, codec_for(ws.subprotocol))

    @property
    def closed(self) -> bool:
        """True once the connection is closed and every frame it brought is queued."""
        return self._reader.done()

    @property
    def close_code(self) -> int | None:
        """The close code received (1006 when the connection dropped without one)."""
        return self.ws.close_code

    @property
    def close_reason(self) -> str | None:
        return self.ws.close_reason

    async def wait_closed(self) -> None:
        """Until the connection is closed and every event it brought is in ``events``."""
        await asyncio.wait([self._reader])

    async def close(self) -> None:
        await self.ws.close()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def send_raw(self, data: str | bytes) -> None:
        await self.ws.send(data)

    async def request(
        self, type_: str, *, timeout_s: float = REPLY_TIMEOUT_S, **fields: Any
    ) -> dict[str, Any]:
        """Send a command and return its reply, ``ok``/``welcome`` or ``error``."""
        command_id = next(self._ids)
        waiter = asyncio.get_running_loop().create_future()
        self._waiting[command_id] = waiter
        try:
            frame = self.codec.encode({"type": type_, "id": command_id, **fields})
            await self.ws.send(frame, text=not self.codec.binary)
            async with asyncio.timeout(timeout_s):
                reply: dict[str, Any] = await waiter
                return reply
        finally:
            self._waiting.pop(command_id, None)

    async def call(self, type_: str, **fields: Any) -> dict[str, Any]:
        """Like ``request`` but raises ``CommandError`` on an error reply."""
        reply = await self.request(type_, **fields)
        if reply["type"] == "error":
            raise CommandError(reply)
        return reply

    async def hello(self, token: str) -> dict[str, Any]:
        self.welcome = await self.call("hello", token=token)
        return self.welcome

    async def next_event(self, type_: str | None = None, timeout_s: float = 5.0) -> dict[str, Any]:
        """The next event (of ``type_``, skipping others)."""
        async with asyncio.timeout(timeout_s):
            while True:
                event = await self.events.get()
                if type_ is None or event["type"] == type_:
                    return event

    async def _read(self) -> None:
        try:
            async for data in self.ws:
                message = self.codec.decode(data)
                assert isinstance(message, dict)
                re = message.get("re")
                if re is not None and message["type"] in ("ok", "error", "welcome"):
                    waiter = self._waiting.get(re)
                    if waiter is not None and not waiter.done():
                        waiter.set_result(message)
                        continue
                if message["type"] == "error" and re is None:
                    # An error for a frame that had no readable id.
                    for waiter in self._waiting.values():
                        if not waiter.done():
                            waiter.set_result(message)
                            break
                    else:
                        self.events.put_nowait(message)
                    continue
                self.events.put_nowait(message)
        except ConnectionClosed:
            pass
        finally:
            for waiter in self._waiting.values():
                if not waiter.done():
                    waiter.set_exception(
                        ConnectionError(f"connection closed (code {self.ws.close_code})")
                    )


# --- the reconnecting session -----------------------------------------------------------

Event = dict[str, Any]
# A token, or a function (sync or async) called before each hello for a fresh one.
TokenSource = str | Callable[[], str] | Callable[[], Awaitable[str]]

# Reconnect backoff, "full jitter": the n-th retry in a row waits a uniform
# random time in [BACKOFF_MIN_S, min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2**n)],
# so clients dropped together (a server restart) do not come back together.
BACKOFF_MIN_S = 0.05
BACKOFF_BASE_S = 0.25
BACKOFF_MAX_S = 10.0
# After a 4029 close (rate limited past tolerance) the server asks for "several seconds".
BACKOFF_RATE_LIMITED_S = 5.0
# A connection that stayed up this long resets the backoff to its first step;
# one dropped sooner keeps climbing (a server that accepts then drops at once
# is not hammered).
STABLE_CONNECTION_S = 5.0
# Opening a connection, hello and re-joining every room, together.
CONNECT_TIMEOUT_S = 15.0
# How many times a spend is sent (the same key each time) before giving up.
SPEND_ATTEMPTS_MAX = 5
# A room's paging sends at most this many `history` commands: a full room's
# history is 100 pages (10,000 events), past the command burst (40) at 20 a
# second, so a page answered RATE_LIMITED (or UNAVAILABLE) is asked again
# after HISTORY_RETRY_S, and twice the pages leaves room for those retries.
HISTORY_ATTEMPTS_MAX = 200
HISTORY_RETRY_S = 0.25  # seconds; 5 commands' worth of the default rate
# Close codes after which reconnecting with the same token and subprotocol would
# fail again (docs/protocol.md, "Close codes").
TERMINAL_CLOSE_CODES = frozenset({int(CloseCode.UNAUTHENTICATED), int(CloseCode.FORBIDDEN)})
# Error codes with which a spend was not applied and may be sent again as is.
SPEND_RETRY_CODES = frozenset({str(ErrorCode.UNAVAILABLE), str(ErrorCode.RATE_LIMITED)})
# The `since` of a room joined before any event was seen in it: every event
# the room holds came after (docs/protocol.md, "After a reconnect").
BEFORE_ANY_OFFSET = "0-0"
ROOM_EVENT_TYPES = frozenset({"message", "tip", "media"})
REPLY_TYPES = frozenset({"ok", "error", "welcome"})


class SessionClosed(ConnectionError):
    """The session is over: closed by its owner, or by the server for good
    (``code`` 4001 unauthenticated, 4003 forbidden), or reconnecting gave up."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class ConnectionLost(ConnectionError):
    """A command got no reply because the connection was lost (or is being
    re-established). It may or may not have been applied; it is not retried."""

    def __init__(self, command: str, detail: str) -> None:
        super().__init__(f"{command!r} got no reply: {detail}")
        self.command = command


class SpendUnconfirmed(ConnectionError):
    """A spend sent ``attempts`` times with ``key`` got no reply (or only
    ``UNAVAILABLE``). Sending it again with the same key is safe: it is
    charged at most once."""

    def __init__(self, command: str, key: str, attempts: int, last: BaseException | None) -> None:
        super().__init__(
            f"{command!r} with key {key!r} not confirmed after {attempts} attempts: {last}"
        )
        self.command = command
        self.key = key
        self.attempts = attempts


def backoff_delay(
    retry: int,
    *,
    min_s: float = BACKOFF_MIN_S,
    base_s: float = BACKOFF_BASE_S,
    max_s: float = BACKOFF_MAX_S,
    rng: random.Random | None = None,
) -> float:
    """Seconds to wait before the ``retry``-th retry in a row (0 for the
    first): exponential backoff with full jitter, bounded by ``min_s`` and
    ``max_s``."""
    ceiling = min(max_s, base_s * 2 ** min(retry, 32))
    return (rng or random).uniform(min_s, max(min_s, ceiling))


def offset_order(offset: object) -> tuple[int, int] | None:
    """A room offset as a sortable key. Offsets are opaque to clients, but
    ordered within a room; this server's are Redis stream ids ``<ms>-<seq>``.
    None when ``offset`` has another form (then it is not de-duplicated)."""
    if not isinstance(offset, str):
        return None
    ms, sep, seq = offset.partition("-")
    if not (sep and ms.isascii() and ms.isdigit() and seq.isascii() and seq.isdigit()):
        return None
    return int(ms), int(seq)


class Session:
    """A reconnecting client: connect, hello, rooms kept across reconnects,
    events as an async iterator, spends retried with their idempotency key.

    ::

        session = await Session.connect("ws://127.0.0.1:8001/ws", token)
        await session.join("alice")
        await session.say("alice", "hi")
        reply = await session.tip("alice", 5, "for the song")
        async for event in session:
            ...

    Events are the server's (``message``, ``tip``, ``dm``, ``presence``,
    ``balance``, ``request``, ``error`` without ``re``) plus these, made here:

    - ``{"type": "reconnecting", "code", "reason", "attempt", "delay_s"}``: the
      connection was lost (``code`` is its close code, None when connecting
      failed) and the session tries again in ``delay_s``;
    - ``{"type": "reconnected", "session", "attempts"}``: connected and said
      hello again; the rooms are re-joined next (their missed events follow);
    - ``{"type": "gap", "room", "since"}``: a re-join (or one of its
      history pages) could not return every event after ``since``
      (``recovered`` false): some were missed; the oldest ones the room
      still keeps follow;
    - ``{"type": "room_lost", "room", "code", "message"}``: a room could not be
      re-joined (e.g. ``NOT_FOUND``); the session is no longer in it;
    - ``{"type": "balance", "balance"}`` after a reconnect, when the welcome's
      balance differs from the last one seen (pushes are not replayed).

    Room events (``message``, ``tip``, ``media``, and any other with an
    ``offset``: ``king``, ``show``, ``goal``) are delivered for the rooms joined
    through ``join`` only, each once, in offset order: ``history`` first
    (every page of it, read with ``history`` while ``more``), then live
    ones. ``dm`` events are delivered as the server sends them; a DM sent to
    a connection that dropped before reading it is not sent again (see
    docs/protocol.md, ``dm``).

    The iterator ends after ``close()``; when the server ends the session for
    good (4001, 4003) it raises ``SessionClosed`` once the events before are
    consumed.

    ``failover_urls``: other gateway nodes of the same deployment (they share
    one Redis, so offsets, balances and idempotency keys hold across them).
    The first connection dials ``url``; every reconnect attempt dials the next
    URL of ``[url, *failover_urls]`` in rotation, after the same jittered
    backoff, so the clients of a node that died spread over the others and a
    node that refuses is skipped at the next attempt. ``url`` is the one the
    session dials (or last dialled).
    """

    def __init__(
        self,
        url: str,
        token: TokenSource,
        *,
        subprotocol: str | None = JSON_SUBPROTOCOL,
        reply_timeout_s: float = REPLY_TIMEOUT_S,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
        backoff_min_s: float = BACKOFF_MIN_S,
        backoff_base_s: float = BACKOFF_BASE_S,
        backoff_max_s: float = BACKOFF_MAX_S,
        reconnect_attempts_max: int | None = None,
        spend_attempts_max: int = SPEND_ATTEMPTS_MAX,
        rng: random.Random | None = None,
        failover_urls: Sequence[str] = (),
        **connect_kwargs: Any,
    ) -> None:
        self.url = url
        # Every URL this session may dial, in the order reconnects rotate through.
        self.urls: tuple[str, ...] = (url, *failover_urls)
        self._url_index = 0
        self.subprotocol = subprotocol
        self.reply_timeout_s = reply_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.backoff_min_s = backoff_min_s
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.reconnect_attempts_max = reconnect_attempts_max
        self.spend_attempts_max = spend_attempts_max
        self._token = token
        self._rng = rng or random.Random()
        self._connect_kwargs = connect_kwargs
        # The rooms joined, each with the last offset seen (None: none yet).
        self.rooms: dict[str, str | None] = {}
        self.client: Client | None = None
        self.welcome: dict[str, Any] | None = None
        self.balance: int | None = None
        self.reconnects = 0
        # None marks the end of the events. Not bounded: the consumer is
        # expected to keep reading (room traffic is bounded by the rooms joined).
        self._events: asyncio.Queue[Event | None] = asyncio.Queue()
        # Set while connected and every room is re-joined; also set once ended,
        # so that waiters wake up and find out.
        self._ready = asyncio.Event()
        self._ended: SessionClosed | None = None
        self._failed = False  # ended by the server or by giving up, not by close()
        self._pump: asyncio.Task[None] | None = None
        self._supervisor: asyncio.Task[None] | None = None
        # Live events of rooms whose join reply is awaited, held until its history is in.
        self._joining: dict[str, list[Event]] = {}

    # --- lifecycle ------------------------------------------------------------------
    @classmethod
    async def connect(cls, url: str, token: TokenSource, **kwargs: Any) -> Session:
        session = cls(url, token, **kwargs)
        await session.start()
        return session

    async def start(self) -> None:
        """Connect and say hello, once: a failure is raised (``SessionClosed``
        for a refused token), not retried. Later losses are retried."""
        client = await self._establish()
        self._supervisor = asyncio.create_task(self._supervise(client))

    async def close(self) -> None:
        """Close the connection and stop reconnecting; the events iterator ends."""
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        client = self.client
        if client is not None:
            await client.close()
            self._detach(client)
        self._end(SessionClosed("session closed"), failed=False)

    async def __aenter__(self) -> Session:
        if self.client is None and self._ended is None:
            await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def connected(self) -> bool:
        """Connected, with every room re-joined."""
        client = self.client
        return (
            self._ready.is_set()
            and self._ended is None
            and client is not None
            and not client.closed
        )

    @property
    def ended(self) -> SessionClosed | None:
        """Why the session is over, or None while it lives."""
        return self._ended

    # --- events -----------------------------------------------------------------------
    def __aiter__(self) -> AsyncIterator[Event]:
        return self.events()

    async def events(self) -> AsyncIterator[Event]:
        """Every event, in order, until the session ends: then the iterator
        stops after ``close()``, or raises ``SessionClosed`` when the server
        ended the session or reconnecting gave up."""
        while (event := await self._next()) is not None:
            yield event
        if self._failed and self._ended is not None:
            raise self._ended

    async def next_event(self, type_: str | None = None, timeout_s: float = 5.0) -> Event:
        """The next event (of ``type_``, skipping others); ``SessionClosed`` at the end."""
        async with asyncio.timeout(timeout_s):
            while (event := await self._next()) is not None:
                if type_ is None or event["type"] == type_:
                    return event
        assert self._ended is not None
        raise self._ended

    async def _next(self) -> Event | None:
        event = await self._events.get()
        if event is None:
            self._events.put_nowait(None)  # the end, for every later reader too
        return event

    # --- commands ---------------------------------------------------------------------
    async def request(
        self, type_: str, *, timeout_s: float | None = None, **fields: Any
    ) -> dict[str, Any]:
        """Send a command once and return its reply (``ok`` or ``error``).

        Waits up to ``timeout_s`` for the connection if it is being
        re-established. Raises ``ConnectionLost`` when the connection is lost
        before the reply (the command is not retried: it may have been
        applied), ``TimeoutError`` when no reply comes in time."""
        timeout = self.reply_timeout_s if timeout_s is None else timeout_s
        client = await self._connection(type_, timeout)
        try:
            return await client.request(type_, timeout_s=timeout, **fields)
        except (ConnectionError, ConnectionClosed) as exc:
            raise ConnectionLost(type_, f"connection lost ({exc})") from exc

    async def call(self, type_: str, **fields: Any) -> dict[str, Any]:
        """Like ``request`` but raises ``CommandError`` on an error reply."""
        reply = await self.request(type_, **fields)
        if reply["type"] == "error":
            raise CommandError(reply)
        return reply

    async def join(self, room: str) -> dict[str, Any]:
        """Join ``room`` and keep it across reconnects. Its ``history`` (the
        events after the last one seen, if it was joined before) goes to the
        events first, then its live events."""
        client = await self._connection("join", self.reply_timeout_s)
        since = (self.rooms.get(room) or BEFORE_ANY_OFFSET) if room in self.rooms else None
        return await self._join(client, room, since)

    async def leave(self, room: str) -> dict[str, Any]:
        """Leave ``room``: it is not re-joined any more, and its late events are
        dropped. Not being in it (``NOT_IN_ROOM``, say after a reconnect) is
        no error."""
        self.rooms.pop(room, None)
        self._joining.pop(room, None)
        reply = await self.request("leave", room=room)
        if reply["type"] == "error" and reply.get("code") != ErrorCode.NOT_IN_ROOM:
            raise CommandError(reply)
        return reply

    async def say(self, room: str, text: str) -> dict[str, Any]:
        return await self.call("say", room=room, text=text)

    async def get_balance(self) -> int:
        balance: int = (await self.call("balance"))["balance"]
        self.balance = balance
        return balance

    async def tip(
        self, room: str, amount: int, text: str = "", *, key: str | None = None
    ) -> dict[str, Any]:
        """Tip ``amount`` in ``room``; the ``ok`` reply (``duplicate`` when an
        earlier attempt had been applied). ``CommandError`` on an error reply,
        ``SpendUnconfirmed`` after ``spend_attempts_max`` attempts without one."""
        return await self._spend("tip", key, room=room, amount=amount, text=text)

    async def tip_item(
        self,
        room: str,
        item: str,
        text: str = "",
        *,
        max_price: int | None = None,
        key: str | None = None,
    ) -> dict[str, Any]:
        """Tip the menu item ``item`` of ``room``'s owner at its current
        price, at most ``max_price`` (``PRICE_CHANGED`` otherwise: pass the
        price you showed); the reply adds ``price`` and ``item``. As ``tip``."""
        fields: dict[str, Any] = {"room": room, "item": item, "text": text}
        if max_price is not None:
            fields["max_price"] = max_price
        return await self._spend("tip", key, **fields)

    async def dm(
        self,
        to: str,
        text: str,
        *,
        max_price: int | None = None,
        key: str | None = None,
        media: str | None = None,
    ) -> dict[str, Any]:
        """Send a private message to ``to`` at their DM price; as ``tip``.
        ``media``: the id of locked media of yours to attach (its descriptor
        goes with the message)."""
        fields: dict[str, Any] = {"to": to, "text": text}
        if max_price is not None:
            fields["max_price"] = max_price
        if media is not None:
            fields["media"] = media
        return await self._spend("dm", key, **fields)

    async def post_media(self, room: str, media: str, text: str = "") -> dict[str, Any]:
        """Show locked media of yours in your room (a ``media`` event)."""
        return await self.call("post_media", room=room, media=media, text=text)

    async def unlock(
        self, media: str, *, max_price: int | None = None, key: str | None = None
    ) -> dict[str, Any]:
        """Buy access to locked media; as ``tip``. The reply's ``url`` is a
        signed path on the HTTP API (``media_url`` gets a new one later);
        ``already`` when it was yours, and nothing was charged."""
        fields: dict[str, Any] = {"media": media}
        if max_price is not None:
            fields["max_price"] = max_price
        return await self._spend("unlock", key, **fields)

    # --- custom requests (docs/protocol.md, "Custom requests") ---------------------------
    async def request_offer(
        self, model: str, text: str, amount: int, *, key: str | None = None
    ) -> dict[str, Any]:
        """Offer ``amount`` to ``model`` for what ``text`` describes, held in
        escrow; the reply's ``request`` is its id. Retried like ``tip``."""
        return await self._spend("request_offer", key, model=model, text=text, amount=amount)

    async def request_accept(self, request: str) -> dict[str, Any]:
        return await self._transition("request_accept", request=request)

    async def request_deliver(
        self, request: str, text: str = "", *, media: str | None = None
    ) -> dict[str, Any]:
        fields: dict[str, Any] = {"request": request, "text": text}
        if media is not None:
            fields["media"] = media
        return await self._transition("request_deliver", **fields)

    async def request_decline(self, request: str) -> dict[str, Any]:
        return await self._transition("request_decline", request=request)

    async def request_cancel(self, request: str) -> dict[str, Any]:
        return await self._transition("request_cancel", request=request)

    async def requests(self) -> list[dict[str, Any]]:
        """The user's requests, as fan and as model, newest first."""
        listed: list[dict[str, Any]] = (await self.call("request_list"))["requests"]
        return listed

    # --- private shows (docs/protocol.md, "Private shows") -----------------------------
    async def private_request(
        self, model: str, rate: int, *, key: str | None = None
    ) -> dict[str, Any]:
        """Ask ``model`` for a private show at ``rate`` tokens a minute (at
        most: PRICE_CHANGED if hers is higher); the reply's ``show`` is its
        id. Nothing is charged until she accepts. Retried like ``tip``."""
        return await self._spend("private_request", key, model=model, rate=rate)

    async def private_accept(self, show: str) -> dict[str, Any]:
        """Start a requested show (the model): the reply's ``room`` is the
        private room, ``p:<show>``, to join."""
        return await self._transition("private_accept", show=show)

    async def private_decline(self, show: str) -> dict[str, Any]:
        return await self._transition("private_decline", show=show)

    async def private_end(self, show: str) -> dict[str, Any]:
        """End a show (either side), or withdraw a request (the fan); the
        reply has the seconds billed and the tokens charged."""
        return await self._transition("private_end", show=show)

    # --- ticket shows (docs/protocol.md, "Ticket shows") ---------------------------------
    async def buy_ticket(self, room: str, show: str, *, key: str | None = None) -> dict[str, Any]:
        """A ticket to ``show`` in ``room`` (joined); ``already: true`` when
        the user holds one (nothing charged). Retried like ``tip``."""
        return await self._spend("buy_ticket", key, room=room, show=show)

    async def show_start(self, show: str) -> dict[str, Any]:
        return await self._transition("show_start", show=show)

    async def show_end(self, show: str) -> dict[str, Any]:
        """End a running show: ``outcome`` says whether it was paid
        (``release``) or refunded (``refund``, ended before ``min_s``)."""
        return await self._transition("show_end", show=show)

    async def show_cancel(self, show: str) -> dict[str, Any]:
        return await self._transition("show_cancel", show=show)

    # --- moderation (docs/protocol.md, "Moderation") ------------------------------------
    # The room's model and her moderators; refusals raise CommandError, whose
    # reply carries `until` (ms) for MUTED, BANNED and SLOW_MODE.
    async def mute(self, room: str, user: str, seconds: int) -> dict[str, Any]:
        return await self.call("mute", room=room, user=user, seconds=seconds)

    async def unmute(self, room: str, user: str) -> dict[str, Any]:
        return await self.call("unmute", room=room, user=user)

    async def kick(self, room: str, user: str) -> dict[str, Any]:
        return await self.call("kick", room=room, user=user)

    async def ban(self, room: str, user: str, seconds: int | None = None) -> dict[str, Any]:
        """``seconds`` None: until unbanned."""
        fields: dict[str, Any] = {"room": room, "user": user}
        if seconds is not None:
            fields["seconds"] = seconds
        return await self.call("ban", **fields)

    async def unban(self, room: str, user: str) -> dict[str, Any]:
        return await self.call("unban", room=room, user=user)

    async def clear(self, room: str, user: str) -> dict[str, Any]:
        return await self.call("clear", room=room, user=user)

    async def slow(self, room: str, seconds: int) -> dict[str, Any]:
        """At most one line per ``seconds`` per member (0: off)."""
        return await self.call("slow", room=room, seconds=seconds)

    async def _transition(self, type_: str, **fields: Any) -> dict[str, Any]:
        """A request transition, retried like a spend: it needs no key, since
        the server answers a repeat of an applied one ``"duplicate": true``."""
        last: BaseException | None = None
        for attempt in range(self.spend_attempts_max):
            if attempt:
                await asyncio.sleep(self._backoff(attempt - 1))
            try:
                client = await self._connection(type_, self.reply_timeout_s)
                reply = await client.request(type_, timeout_s=self.reply_timeout_s, **fields)
            except SessionClosed:
                raise
            except (ConnectionError, ConnectionClosed, TimeoutError) as exc:
                last = exc
                continue
            if reply["type"] == "error":
                if reply.get("code") in SPEND_RETRY_CODES:
                    last = CommandError(reply)
                    continue
                raise CommandError(reply)
            return reply
        subject = str(fields.get("request") or fields.get("show"))
        raise SpendUnconfirmed(type_, subject, self.spend_attempts_max, last)

    async def _spend(self, type_: str, key: str | None, **fields: Any) -> dict[str, Any]:
        """Send a spend until it gets an ``ok`` or a final error, with one key.

        Retried, with the same key and fields: no reply in time, a connection
        lost before the reply (after reconnecting and re-joining), and the
        codes with which nothing was applied (``UNAVAILABLE``, ``RATE_LIMITED``).
        The server answers a retry of an applied spend with its original
        reply plus ``"duplicate": true`` and charges nothing again."""
        key = key or uuid.uuid4().hex
        last: BaseException | None = None
        for attempt in range(self.spend_attempts_max):
            if attempt:
                await asyncio.sleep(self._backoff(attempt - 1))
            try:
                client = await self._connection(type_, self.reply_timeout_s)
                reply = await client.request(
                    type_, key=key, timeout_s=self.reply_timeout_s, **fields
                )
            except SessionClosed:
                raise
            except (ConnectionError, ConnectionClosed, TimeoutError) as exc:
                last = exc
                continue
            if reply["type"] == "error":
                if reply.get("code") in SPEND_RETRY_CODES:
                    last = CommandError(reply)
                    continue
                raise CommandError(reply)
            if not reply.get("duplicate") and isinstance(reply.get("balance"), int):
                # A duplicate carries the balance of its time, not today's.
                self.balance = reply["balance"]
            return reply
        raise SpendUnconfirmed(type_, key, self.spend_attempts_max, last)

    async def _connection(self, command: str, timeout_s: float) -> Client:
        """The current connection, waiting up to ``timeout_s`` for a reconnect."""
        try:
            async with asyncio.timeout(timeout_s):
                while True:
                    if self._ended is not None:
                        raise self._ended
                    client = self.client
                    if self._ready.is_set() and client is not None:
                        if not client.closed:
                            return client
                        # Lost, and the supervisor has not noticed yet.
                        self._ready.clear()
                    await self._ready.wait()
        except TimeoutError:
            raise ConnectionLost(command, f"not connected after {timeout_s} s") from None

    # --- connecting -------------------------------------------------------------------
    async def _establish(self, retry: int = 0) -> Client:
        """Open a connection, say hello, re-join every room; then ready.
        ``retry``: the reconnect attempt, 0 for the first connection."""
        async with asyncio.timeout(self.connect_timeout_s):
            client = await Client.connect(
                self.url, subprotocol=self.subprotocol, **self._connect_kwargs
            )
            try:
                welcome = await self._hello(client)
                self._attach(client, welcome)
                if retry:
                    self.reconnects += 1
                    self._emit(
                        {"type": "reconnected", "session": welcome["session"], "attempts": retry}
                    )
                for room, since in list(self.rooms.items()):
                    await self._rejoin(client, room, since or BEFORE_ANY_OFFSET)
            except BaseException:
                await client.close()
                self._detach(client)
                raise
        self._ready.set()
        return client

    async def _hello(self, client: Client) -> dict[str, Any]:
        token = self._token if isinstance(self._token, str) else self._token()
        if inspect.isawaitable(token):
            token = await token
        assert isinstance(token, str)
        try:
            return await client.hello(token)
        except CommandError as exc:
            if exc.code == ErrorCode.UNAUTHENTICATED:
                raise SessionClosed(
                    f"hello refused: {exc}", int(CloseCode.UNAUTHENTICATED)
                ) from exc
            raise ConnectionError(f"hello refused: {exc}") from exc  # UNAVAILABLE: retried
        except ConnectionError:
            await client.wait_closed()
            if client.close_code in TERMINAL_CLOSE_CODES:
                raise SessionClosed(
                    f"closed by the server: {client.close_code} {client.close_reason}",
                    client.close_code,
                ) from None
            raise

    async def _rejoin(self, client: Client, room: str, since: str | None) -> None:
        try:
            await self._join(client, room, since)
        except CommandError as exc:
            if exc.code in SPEND_RETRY_CODES:
                raise ConnectionError(f"re-joining {room!r}: {exc}") from exc  # try again later
            self.rooms.pop(room, None)
            self._emit(
                {
                    "type": "room_lost",
                    "room": room,
                    "code": exc.code,
                    "message": exc.reply.get("message"),
                }
            )

    async def _join(self, client: Client, room: str, since: str | None) -> dict[str, Any]:
        self._joining[room] = []
        reply: dict[str, Any] | None = None
        caught_up = False
        try:
            fields: dict[str, Any] = {"room": room}
            if since is not None:
                fields["since"] = since
            reply = await self._room_command(client, "join", **fields)
            if reply["type"] == "error":
                raise CommandError(reply)
            self.rooms.setdefault(room, None)
            self._history_page(room, since, reply)
            if reply.get("more"):
                await self._page_history(client, room, str(reply["next"]))
            caught_up = True
            return reply
        finally:
            # History first, then the live events that came after the reply;
            # on an error, the live events of a room this session was in already.
            # Pages left unread: the held live events lie past them, and stay
            # held until the re-join (after the reconnect) replaces them.
            if caught_up or reply is None or reply["type"] == "error":
                held = self._joining.pop(room, [])
                if room in self.rooms:
                    for event in held:
                        self._room_event(room, event)

    async def _room_command(self, client: Client, type_: str, **fields: Any) -> dict[str, Any]:
        """``join`` or ``history`` on ``client``: its reply, ``ConnectionLost``
        when the connection is lost first."""
        try:
            return await client.request(type_, timeout_s=self.reply_timeout_s, **fields)
        except (ConnectionError, ConnectionClosed) as exc:
            raise ConnectionLost(type_, f"connection lost ({exc})") from exc

    def _history_page(self, room: str, since: str | None, reply: dict[str, Any]) -> None:
        """Deliver a page of ``room``'s history (a join's or a ``history``
        reply's); a gap before it when ``since`` was trimmed."""
        if since is not None and reply.get("recovered") is False:
            self._emit({"type": "gap", "room": room, "since": since})
        for event in reply.get("history", []):
            self._room_event(room, event)

    async def _page_history(self, client: Client, room: str, since: str) -> None:
        """Read ``room``'s history page by page from ``since`` (a reply's
        ``next``) until ``more`` is false (docs/protocol.md, "Paging
        history"), while its live events wait in ``_joining``. On a failure
        the connection is closed: the re-join after the reconnect goes on
        from the last event delivered."""
        for _ in range(HISTORY_ATTEMPTS_MAX):
            reply = await self._room_command(client, "history", room=room, since=since)
            if reply["type"] == "error":
                code = reply.get("code")
                if code in SPEND_RETRY_CODES:
                    await asyncio.sleep(HISTORY_RETRY_S)
                    continue
                await client.close()
                raise ConnectionLost("history", f"{code}: {reply.get('message')}")
            self._history_page(room, since, reply)
            if not reply.get("more"):
                return
            since = str(reply["next"])
        await client.close()
        raise ConnectionLost("history", f"still more after {HISTORY_ATTEMPTS_MAX} pages")

    def _attach(self, client: Client, welcome: dict[str, Any]) -> None:
        self.client = client
        self.welcome = welcome
        balance = welcome.get("balance")
        if self.balance is not None and balance != self.balance:
            self._emit({"type": "balance", "balance": balance})
        if isinstance(balance, int):
            self.balance = balance
        self._pump = asyncio.create_task(self._pump_events(client))

    def _detach(self, client: Client) -> None:
        """Stop reading ``client``'s events, after taking those still queued."""
        if self._pump is not None:
            self._pump.cancel()
            self._pump = None
        while not client.events.empty():
            self._accept(client.events.get_nowait())

    async def _pump_events(self, client: Client) -> None:
        while True:
            self._accept(await client.events.get())

    async def _supervise(self, client: Client) -> None:
        loop = asyncio.get_running_loop()
        retry = 0
        while True:
            connected_at = loop.time()
            await client.wait_closed()
            self._ready.clear()
            await client.close()  # the reader may have stopped on a bad frame alone
            self._detach(client)
            code, reason = client.close_code, client.close_reason
            if code in TERMINAL_CLOSE_CODES:
                self._end(SessionClosed(f"closed by the server: {code} {reason}", code))
                return
            if loop.time() - connected_at >= STABLE_CONNECTION_S:
                retry = 0
            while True:
                if self.reconnect_attempts_max is not None and retry >= self.reconnect_attempts_max:
                    self._end(SessionClosed(f"gave up after {retry} reconnect attempts", code))
                    return
                delay = self._backoff(retry)
                if code == CloseCode.RATE_LIMITED:
                    delay = max(delay, BACKOFF_RATE_LIMITED_S)
                retry += 1
                self._next_url()
                self._emit(
                    {
                        "type": "reconnecting",
                        "code": code,
                        "reason": reason,
                        "attempt": retry,
                        "delay_s": round(delay, 3),
                    }
                )
                await asyncio.sleep(delay)
                try:
                    client = await self._establish(retry)
                except SessionClosed as exc:
                    self._end(exc)
                    return
                except (OSError, ConnectionError, ConnectionClosed, InvalidHandshake) as exc:
                    # OSError covers TimeoutError and a refused connection.
                    code, reason = None, str(exc) or type(exc).__name__
                    continue
                break

    def _next_url(self) -> None:
        """The URL the next reconnect attempt dials: the next one in rotation."""
        self._url_index = (self._url_index + 1) % len(self.urls)
        self.url = self.urls[self._url_index]

    def _backoff(self, retry: int) -> float:
        return backoff_delay(
            retry,
            min_s=self.backoff_min_s,
            base_s=self.backoff_base_s,
            max_s=self.backoff_max_s,
            rng=self._rng,
        )

    # --- event routing ------------------------------------------------------------------
    def _accept(self, event: Event) -> None:
        type_ = event.get("type")
        if type_ in ("ok", "welcome") or (type_ == "error" and event.get("re") is not None):
            return  # a late reply to a command given up on (timed out, then retried)
        room = event.get("room")
        # Every room event with an offset is in the room's stream (`king`,
        # `show` and `goal` too, which `join` history replays): de-duplicated
        # across a re-join by its offset, as the JavaScript client does.
        in_stream = type_ in ROOM_EVENT_TYPES or event.get("offset") is not None
        if in_stream and isinstance(room, str):
            held = self._joining.get(room)
            if held is not None:
                held.append(event)
            elif room in self.rooms:
                self._room_event(room, event)
            return  # a room left, or joined outside ``join``
        if type_ == "presence" and room not in self.rooms and room not in self._joining:
            return
        if type_ == "removed" and isinstance(room, str):
            # Kicked or banned: out of the room, and not re-joined on a reconnect.
            self.rooms.pop(room, None)
        if type_ == "balance" and isinstance(event.get("balance"), int):
            self.balance = event["balance"]
        self._emit(event)

    def _room_event(self, room: str, event: Event) -> None:
        """Deliver a room event unless its offset was seen already."""
        offset = event.get("offset")
        order, last = offset_order(offset), offset_order(self.rooms.get(room))
        if order is not None and last is not None and order <= last:
            return
        if isinstance(offset, str):
            self.rooms[room] = offset
        self._emit(event)

    def _emit(self, event: Event) -> None:
        if self._ended is None:
            self._events.put_nowait(event)

    def _end(self, reason: SessionClosed, *, failed: bool = True) -> None:
        if self._ended is not None:
            return
        self._ended = reason
        self._failed = failed
        self._events.put_nowait(None)
        self._ready.set()  # wake the commands waiting for a connection


# --- the HTTP API helpers (the standard library only: no HTTP client dependency) -------

# How long one HTTP call may take: an upload of a large video on a slow link
# takes a while; everything else answers in milliseconds.
MEDIA_HTTP_TIMEOUT_S = 300.0
HTTP_TIMEOUT_S = 10.0


class HttpError(Exception):
    """An HTTP API error: ``status``, ``code`` and ``message`` from its body."""

    def __init__(self, status: int, body: Any) -> None:
        error = body.get("error", {}) if isinstance(body, dict) else {}
        self.status = status
        self.code: str = error.get("code") or str(status)
        self.message: str = error.get("message") or str(body)
        # What the error carries besides code and message (SELF_EXCLUDED's `until`).
        self.fields: dict[str, Any] = {
            k: v for k, v in error.items() if k not in ("code", "message")
        }
        super().__init__(f"HTTP {status} {self.code}: {self.message}")


def _http(
    method: str,
    url: str,
    token: str | None,
    body: bytes | None = None,
    content_type: str | None = None,
    timeout_s: float = HTTP_TIMEOUT_S,
) -> Any:
    """The parsed JSON reply of a 2xx; ``HttpError`` for any other status."""
    headers = {}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    if content_type is not None:
        headers["Content-Type"] = content_type
    request = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        data = exc.read()
        try:
            parsed = json.loads(data)
        except ValueError:
            parsed = data.decode(errors="replace")
        raise HttpError(exc.code, parsed) from None


def _http_json(method: str, url: str, token: str | None, body: Any = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    return _http(method, url, token, data, "application/json" if data is not None else None)


def _multipart(fields: dict[str, str], files: dict[str, tuple[str, bytes]]) -> tuple[bytes, str]:
    """A multipart/form-data body and its Content-Type (RFC 7578)."""
    boundary = uuid.uuid4().hex
    parts: list[bytes] = []
    for name, value in fields.items():
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode()
            + value.encode()
            + b"\r\n"
        )
    for name, (filename, data) in files.items():
        safe = filename.replace('"', "_").replace("\r", "_").replace("\n", "_")
        parts.append(
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; '
                f'filename="{safe}"\r\nContent-Type: application/octet-stream\r\n\r\n'
            ).encode()
            + data
            + b"\r\n"
        )
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


async def upload_media(
    http_url: str,
    token: str,
    content: bytes,
    price: int,
    *,
    filename: str = "upload",
    preview_text: str | None = None,
    preview: bytes | None = None,
) -> dict[str, Any]:
    """Upload a photo or video (a model's token); its descriptor
    ``{id, kind, price, preview}``. The server sniffs the type from the bytes."""
    fields = {"price": str(price)}
    if preview_text is not None:
        fields["preview_text"] = preview_text
    files = {"file": (filename, content)}
    if preview is not None:
        files["preview"] = ("preview", preview)
    body, content_type = _multipart(fields, files)
    url = http_url.rstrip("/") + "/v1/media"
    reply = await asyncio.to_thread(
        _http, "POST", url, token, body, content_type, MEDIA_HTTP_TIMEOUT_S
    )
    media: dict[str, Any] = reply["media"]
    return media


async def media_url(http_url: str, token: str, media: str) -> dict[str, Any]:
    """``{url, expires_at}`` for media you own or unlocked, ``url`` made
    absolute; ``HttpError`` 403 otherwise."""
    from urllib.parse import quote

    base = http_url.rstrip("/")
    reply: dict[str, Any] = await asyncio.to_thread(
        _http, "GET", f"{base}/v1/media/{quote(media, safe='')}/url", token
    )
    return {**reply, "url": base + reply["url"]}


async def get_menu(http_url: str, user: str) -> list[dict[str, Any]]:
    """The tip menu of ``user`` (``GET /v1/users/{user}/menu``): items
    ``{id, label, price}`` in the model's order, at the prices charged now.
    ``HttpError`` (``NOT_FOUND`` for an unknown user)."""
    url = f"{http_url.rstrip('/')}/v1/users/{urllib.parse.quote(user, safe='')}/menu"
    reply = await asyncio.to_thread(_http_json, "GET", url, None)
    return list(reply["items"])


async def put_menu(http_url: str, token: str, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Replace the caller's (a model's) tip menu: ``items`` of ``{id?,
    label, price}``; an ``id`` keeps an item of the current menu. The saved
    items, with their ids. ``HttpError`` on a refusal."""
    url = f"{http_url.rstrip('/')}/v1/me/menu"
    reply = await asyncio.to_thread(_http_json, "PUT", url, token, {"items": items})
    return list(reply["items"])


# --- receipts, DM history, blocks and reports (docs/protocol.md, "Receipts and history") ---


def _query(params: dict[str, Any]) -> str:
    given = {name: value for name, value in params.items() if value is not None}
    return "?" + urllib.parse.urlencode(given) if given else ""


async def transactions(
    http_url: str,
    token: str,
    *,
    kind: str | None = None,
    before: str | None = None,
    limit: int | None = None,
) -> dict[str, Any]:
    """One page of the caller's transactions, newest first: ``{transactions:
    [{tx, kind, ts, amount, counterparty, room?, ...}], next}``; pass
    ``next`` as ``before`` for the older page (None: there is none)."""
    url = f"{http_url.rstrip('/')}/v1/me/transactions" + _query(
        {"kind": kind, "before": before, "limit": limit}
    )
    reply: dict[str, Any] = await asyncio.to_thread(_http_json, "GET", url, token)
    return reply


# --- spending limits and self-exclusion (docs/protocol.md, "Spending limits") ---


async def get_limits(http_url: str, token: str) -> dict[str, Any]:
    """The caller's limits (``GET /v1/me/limits``): ``limits`` in force per
    window, ``pending`` raises ``{to, at}``, ``windows`` with ``limit``,
    ``spent``, ``remaining`` and ``resets_at``, ``excluded_until`` and
    ``reality_check_min``."""
    url = f"{http_url.rstrip('/')}/v1/me/limits"
    reply: dict[str, Any] = await asyncio.to_thread(_http_json, "GET", url, token)
    return reply


async def receipt(http_url: str, token: str, tx: str) -> dict[str, Any]:
    """The receipt of one of the caller's transactions: what, to whom, the
    tokens, ``value`` (the fan's, at their average purchase price) and
    ``earnings`` (the model's, at the payout rate). ``HttpError`` 404 when
    the caller is not a party to it."""
    url = f"{http_url.rstrip('/')}/v1/me/transactions/{urllib.parse.quote(tx, safe='')}"
    reply: dict[str, Any] = await asyncio.to_thread(_http_json, "GET", url, token)
    return reply


async def dm_history(
    http_url: str,
    token: str,
    with_user: str,
    *,
    before: str | None = None,
    limit: int | None = None,
) -> dict[str, Any]:
    """One page of the caller's DM conversation with ``with_user``, newest
    first: ``{with, messages: [{tx, from, to, text, price, ts}], next}``."""
    url = f"{http_url.rstrip('/')}/v1/me/dms" + _query(
        {"with": with_user, "before": before, "limit": limit}
    )
    reply: dict[str, Any] = await asyncio.to_thread(_http_json, "GET", url, token)
    return reply


async def block(http_url: str, token: str, user: str, *, blocked: bool = True) -> dict[str, Any]:
    """Block (or, with ``blocked=False``, unblock) ``user``'s DMs to the
    caller: their ``dm`` is then refused with FORBIDDEN, charging nothing."""
    url = f"{http_url.rstrip('/')}/v1/me/blocks/{urllib.parse.quote(user, safe='')}"
    reply: dict[str, Any] = await asyncio.to_thread(
        _http_json, "PUT" if blocked else "DELETE", url, token
    )
    return reply


async def blocks(http_url: str, token: str) -> list[dict[str, Any]]:
    """The users the caller blocks: ``[{user, since}]``, newest first."""
    url = f"{http_url.rstrip('/')}/v1/me/blocks"
    reply = await asyncio.to_thread(_http_json, "GET", url, token)
    return list(reply["blocks"])


async def report(
    http_url: str, token: str, user: str, reason: str, *, message: str | None = None
) -> dict[str, Any]:
    """Report ``user`` (and, with ``message``, one of their messages: a DM's
    tx or a room event's offset) to the admins' queue."""
    body: dict[str, Any] = {"user": user, "reason": reason}
    if message is not None:
        body["message"] = message
    url = f"{http_url.rstrip('/')}/v1/reports"
    reply: dict[str, Any] = await asyncio.to_thread(_http_json, "POST", url, token, body)
    return reply


async def admin_reports(
    http_url: str,
    token: str,
    *,
    state: str = "open",
    before: str | None = None,
    limit: int | None = None,
) -> dict[str, Any]:
    """An admin's page of the report queue: ``{reports, next}``."""
    url = f"{http_url.rstrip('/')}/v1/admin/reports" + _query(
        {"state": state, "before": before, "limit": limit}
    )
    reply: dict[str, Any] = await asyncio.to_thread(_http_json, "GET", url, token)
    return reply


async def resolve_report(
    http_url: str, token: str, report_id: int, resolution: str | None = None
) -> dict[str, Any]:
    """An admin closes a report (again: answered as it stands, ``already``)."""
    body = {} if resolution is None else {"resolution": resolution}
    url = f"{http_url.rstrip('/')}/v1/admin/reports/{int(report_id)}/resolve"
    reply: dict[str, Any] = await asyncio.to_thread(_http_json, "POST", url, token, body)
    return reply


# --- standing: leaderboards and tiers (docs/protocol.md, "Standing") --------------------
LEADERBOARD_WINDOWS = ("12h", "day", "week", "all")


async def get_leaderboard(http_url: str, room: str, window: str = "12h") -> dict[str, Any]:
    """The top tippers of ``room`` over ``window`` (one of
    ``LEADERBOARD_WINDOWS``): ``{room, window, as_of, entries: [{rank, user,
    tokens, tier}]}``. ``HttpError`` (``BAD_REQUEST``, ``NOT_FOUND``)."""
    query = urllib.parse.urlencode({"window": window})
    url = f"{http_url.rstrip('/')}/v1/rooms/{urllib.parse.quote(room, safe='')}/leaderboard?{query}"
    reply: dict[str, Any] = await asyncio.to_thread(_http_json, "GET", url, None)
    return reply


async def get_tiers(http_url: str) -> list[dict[str, Any]]:
    """The tiers, lowest first: ``[{tier, name, min_tokens}]`` (the integer
    ``tier`` of message, tip and dm events indexes this list)."""
    reply = await asyncio.to_thread(_http_json, "GET", f"{http_url.rstrip('/')}/v1/tiers", None)
    return list(reply["tiers"])


def tier_name(tiers: list[dict[str, Any]], tier: Any) -> str:
    """The name of an event's ``tier`` (``"?"`` for one the list lacks)."""
    if isinstance(tier, int) and 0 <= tier < len(tiers):
        return str(tiers[tier]["name"])
    return "?"


async def put_moderators(http_url: str, token: str, users: list[str]) -> list[str]:
    """Replace the caller's (a model's) moderators; the list now in force."""
    url = f"{http_url.rstrip('/')}/v1/me/moderators"
    reply = await asyncio.to_thread(_http_json, "PUT", url, token, {"users": users})
    return list(reply["moderators"])


async def put_room_settings(http_url: str, token: str, **settings: Any) -> dict[str, Any]:
    """Set the caller's room's ``slow_s``, ``chat_requires`` (none,
    purchased, balance) and ``chat_min_balance``; the settings now in force."""
    url = f"{http_url.rstrip('/')}/v1/me/room"
    reply: dict[str, Any] = await asyncio.to_thread(_http_json, "PUT", url, token, settings)
    return reply


# --- tip goals (docs/protocol.md, "Tip goals") ------------------------------------------------


async def get_goal(http_url: str, room: str) -> dict[str, Any] | None:
    """The room's tip goal (``GET /v1/rooms/{room}/goal``): ``{id, title,
    target, progress, state, all_or_nothing, deadline}``, or None when it has
    none. ``HttpError`` (``NOT_FOUND`` for an unknown room)."""
    url = f"{http_url.rstrip('/')}/v1/rooms/{urllib.parse.quote(room, safe='')}/goal"
    reply = await asyncio.to_thread(_http_json, "GET", url, None)
    goal: dict[str, Any] | None = reply["goal"]
    return goal


async def set_goal(
    http_url: str,
    token: str,
    title: str,
    target: int,
    *,
    deadline_ms: int | None = None,
    all_or_nothing: bool = False,
) -> dict[str, Any]:
    """Set the caller's (a model's) room goal: ``target`` tokens, by
    ``deadline_ms`` (ms since the epoch) if given; ``all_or_nothing`` holds
    the tips in escrow until it is reached (refunded if the deadline passes
    first). ``HttpError`` ``CONFLICT`` while a goal is active."""
    body: dict[str, Any] = {"title": title, "target": target, "all_or_nothing": all_or_nothing}
    if deadline_ms is not None:
        body["deadline"] = deadline_ms
    url = f"{http_url.rstrip('/')}/v1/me/goal"
    reply = await asyncio.to_thread(_http_json, "PUT", url, token, body)
    goal: dict[str, Any] = reply["goal"]
    return goal


async def delete_goal(http_url: str, token: str) -> dict[str, Any]:
    """Remove the caller's room goal: ``{goal, settled}``; an active
    all-or-nothing goal's held tips go back to their fans."""
    url = f"{http_url.rstrip('/')}/v1/me/goal"
    reply: dict[str, Any] = await asyncio.to_thread(_http_json, "DELETE", url, token)
    return reply


async def put_limits(http_url: str, token: str, **changes: int | None) -> dict[str, Any]:
    """Change any of ``daily``, ``weekly``, ``monthly`` (tokens; None: no
    limit) and ``reality_check_min`` (None: off). A lower limit applies at
    once, a higher one (or None) after the server's delay (24 h). Returns
    what ``get_limits`` does; ``HttpError`` on a refusal."""
    url = f"{http_url.rstrip('/')}/v1/me/limits"
    reply: dict[str, Any] = await asyncio.to_thread(_http_json, "PUT", url, token, changes)
    return reply


async def self_exclude(http_url: str, token: str, days: int) -> int:
    """Exclude yourself from spending and buying for ``days`` (it cannot be
    lifted early); when it ends (ms)."""
    url = f"{http_url.rstrip('/')}/v1/me/self-exclusion"
    reply = await asyncio.to_thread(_http_json, "POST", url, token, {"days": days})
    return int(reply["excluded_until"])


# --- payouts (docs/protocol.md, "Payouts") ------------------------------------------------


def _url(http_url: str, path: str) -> str:
    return f"{http_url.rstrip('/')}{path}"


async def payout_rule(http_url: str, token: str) -> dict[str, Any]:
    """The payout rule in force now: ``{rule, cents_per_token,
    min_payout_tokens, effective_ms}`` (rule 0: the server's settings)."""
    reply: dict[str, Any] = await asyncio.to_thread(
        _http_json, "GET", _url(http_url, "/v1/payout-rule"), token
    )
    return reply


async def payout_status(http_url: str, token: str) -> dict[str, Any]:
    """What a payout needs, for the calling model: ``{verified, method,
    rule}`` (``method``: her payout method, its account number masked)."""
    reply: dict[str, Any] = await asyncio.to_thread(
        _http_json, "GET", _url(http_url, "/v1/me/payout-method"), token
    )
    return reply


async def set_payout_method(http_url: str, token: str, **method: Any) -> dict[str, Any]:
    """Set the calling model's payout method: ``type="bank", holder=...,
    iban=...`` or ``type="paypal", email=...``. Answers as payout_status."""
    reply: dict[str, Any] = await asyncio.to_thread(
        _http_json, "PUT", _url(http_url, "/v1/me/payout-method"), token, method
    )
    return reply


async def request_payout(
    http_url: str, token: str, tokens: int, *, key: str | None = None
) -> dict[str, Any]:
    """Ask for ``tokens`` to be paid out: they are held in escrow until an
    admin approves (state ``paid``) or rejects (they come back). Idempotent
    on ``key`` (a retry answers ``duplicate``). Refused: FORBIDDEN (not
    verified, no payout method), BAD_REQUEST (below the minimum),
    INSUFFICIENT_FUNDS; nothing moves then."""
    body = {"tokens": tokens, "key": key or uuid.uuid4().hex}
    reply: dict[str, Any] = await asyncio.to_thread(
        _http_json, "POST", _url(http_url, "/v1/me/payouts"), token, body
    )
    return reply


async def my_payouts(http_url: str, token: str) -> list[dict[str, Any]]:
    """The calling model's payouts, newest first."""
    reply = await asyncio.to_thread(_http_json, "GET", _url(http_url, "/v1/me/payouts"), token)
    return list(reply["payouts"])


async def earnings(
    http_url: str, token: str, *, start: str | int | None = None, end: str | int | None = None
) -> dict[str, Any]:
    """The calling model's earnings statement for [start, end) (epoch ms or
    ISO dates; default: the last 30 days): ``{from, to, kinds: {tip: {tokens,
    cents, count}, ...}, total: {tokens, cents}, rule}``, each earning
    valued at the payout rule in force when it was made."""
    url = _url(http_url, "/v1/me/earnings") + _query({"from": start, "to": end})
    reply: dict[str, Any] = await asyncio.to_thread(_http_json, "GET", url, token)
    return reply


async def admin_payouts(
    http_url: str, token: str, state: str | None = None
) -> list[dict[str, Any]]:
    """Payouts of every model (an admin's token), newest first, of one state."""
    url = _url(http_url, "/v1/admin/payouts") + _query({"state": state})
    reply = await asyncio.to_thread(_http_json, "GET", url, token)
    return list(reply["payouts"])


async def decide_payout(
    http_url: str, token: str, payout: str, *, approve: bool, reason: str | None = None
) -> dict[str, Any]:
    """Approve (tokens to ``sys:payouts``) or reject (tokens back to the
    model) a payout, as an admin. Idempotent: a repeat answers ``duplicate``."""
    action = "approve" if approve else "reject"
    path = f"/v1/admin/payouts/{urllib.parse.quote(payout, safe='')}/{action}"
    body = {} if reason is None else {"reason": reason}
    reply: dict[str, Any] = await asyncio.to_thread(
        _http_json, "POST", _url(http_url, path), token, body
    )
    return reply


async def verify_model(http_url: str, token: str, user: str) -> dict[str, Any]:
    """Mark a model verified (age and identity), as an admin."""
    path = f"/v1/admin/users/{urllib.parse.quote(user, safe='')}/verify"
    reply: dict[str, Any] = await asyncio.to_thread(_http_json, "POST", _url(http_url, path), token)
    return reply


async def add_payout_rule(
    http_url: str,
    token: str,
    cents_per_token: float,
    min_payout_tokens: int,
    effective_at: int | None = None,
) -> dict[str, Any]:
    """Add a payout rule version (an admin's token); ``effective_at``: epoch
    ms, now or later (a rule never takes effect in the past)."""
    body: dict[str, Any] = {
        "cents_per_token": cents_per_token,
        "min_payout_tokens": min_payout_tokens,
    }
    if effective_at is not None:
        body["effective_at"] = effective_at
    reply: dict[str, Any] = await asyncio.to_thread(
        _http_json, "POST", _url(http_url, "/v1/admin/payout-rules"), token, body
    )
    return reply


async def liabilities(http_url: str, token: str) -> dict[str, Any]:
    """The platform's tokens by holder (an admin's token): ``{fans, models,
    escrow, paid_out, system, issued, balanced}``; issued is the sum."""
    reply: dict[str, Any] = await asyncio.to_thread(
        _http_json, "GET", _url(http_url, "/v1/admin/liabilities"), token
    )
    return reply


# --- discovery, profiles, follows and notifications (docs/protocol.md, "Discovery") ---


async def rooms(
    http_url: str,
    *,
    sort: str | None = None,
    tag: str | None = None,
    q: str | None = None,
    cursor: str | None = None,
    limit: int | None = None,
) -> dict[str, Any]:
    """One page of rooms: ``{rooms: [{id, viewers, display_name, tags,
    trending, live, ...}], next_cursor}``; ``sort`` is trending, viewers or
    new. Pass ``next_cursor`` back (same sort) for the next page of the same
    ranking; a cursor idle too long raises ``HttpError`` 410
    ``CURSOR_EXPIRED``: start again without one."""
    url = f"{http_url.rstrip('/')}/v1/rooms" + _query(
        {"sort": sort, "tag": tag, "q": q, "cursor": cursor, "limit": limit}
    )
    reply: dict[str, Any] = await asyncio.to_thread(_http_json, "GET", url, None)
    return reply


async def put_profile(http_url: str, token: str, **profile: Any) -> dict[str, Any]:
    """Set the caller's (a model's) profile: ``display_name``, ``bio``,
    ``tags``, ``avatar`` (an http(s) URL or None), ``online_status``."""
    url = f"{http_url.rstrip('/')}/v1/me/profile"
    reply: dict[str, Any] = await asyncio.to_thread(_http_json, "PUT", url, token, profile)
    return reply


async def model_profile(http_url: str, model: str) -> dict[str, Any]:
    """A model's profile with ``prices`` and ``menu``; ``HttpError`` 404 if none."""
    url = f"{http_url.rstrip('/')}/v1/models/{urllib.parse.quote(model, safe='')}"
    reply: dict[str, Any] = await asyncio.to_thread(_http_json, "GET", url, None)
    return reply


async def follow(http_url: str, token: str, model: str, *, on: bool = True) -> dict[str, Any]:
    """Follow (``on``) or unfollow ``model``; both idempotent."""
    url = f"{http_url.rstrip('/')}/v1/me/follows/{urllib.parse.quote(model, safe='')}"
    reply: dict[str, Any] = await asyncio.to_thread(
        _http_json, "PUT" if on else "DELETE", url, token
    )
    return reply


async def follows(
    http_url: str, token: str, *, cursor: str | None = None, limit: int | None = None
) -> dict[str, Any]:
    """One page of the models the caller follows: ``{follows, next_cursor}``."""
    url = f"{http_url.rstrip('/')}/v1/me/follows" + _query({"cursor": cursor, "limit": limit})
    reply: dict[str, Any] = await asyncio.to_thread(_http_json, "GET", url, token)
    return reply


async def notifications(
    http_url: str, token: str, *, cursor: str | None = None, limit: int | None = None
) -> dict[str, Any]:
    """One page of the caller's notifications, newest first:
    ``{notifications: [{id, kind, model, ts}], next_cursor}``."""
    url = f"{http_url.rstrip('/')}/v1/me/notifications" + _query({"cursor": cursor, "limit": limit})
    reply: dict[str, Any] = await asyncio.to_thread(_http_json, "GET", url, token)
    return reply


# --- payments and accounts (issue #13 section 4; docs/protocol.md, "Payments and accounts")


async def export_data(http_url: str, token: str) -> dict[str, Any]:
    """The caller's data (``GET /v1/me/export``): ``{user, balance,
    purchases, reversals, transactions, dms, blocks, reports, [follows],
    truncated, rows_max}``; a section named in ``truncated`` was cut at
    ``rows_max`` rows."""
    url = f"{http_url.rstrip('/')}/v1/me/export"
    reply: dict[str, Any] = await asyncio.to_thread(_http_json, "GET", url, token)
    return reply


async def delete_account(http_url: str, token: str, user: str) -> dict[str, Any]:
    """Delete the caller's account (``DELETE /v1/me``, ``confirm``: the
    caller's own id): ``{deleted, pseudonym, forfeited, closed}``. Her open
    escrows are settled first (``closed`` counts them by kind), then the
    balance is forfeited, every session is closed and the account is refused
    from then on. ``HttpError`` CONFLICT while an escrow that closes only by
    itself is open: its ``fields["open"]`` lists them (``[{kind, id,
    until}]``), and nothing was deleted."""
    url = f"{http_url.rstrip('/')}/v1/me"
    reply: dict[str, Any] = await asyncio.to_thread(
        _http_json, "DELETE", url, token, {"confirm": user}
    )
    return reply


async def account_flags(
    http_url: str,
    token: str,
    *,
    before: int | None = None,
    limit: int | None = None,
    state: str | None = None,
) -> dict[str, Any]:
    """Accounts flagged by a chargeback (an admin's token): ``{flags: [{id,
    user, reason, payment_ref, shortfall, ts, state, resolution, resolved_by,
    resolved_ts}], next}``; ``state``: open, resolved or all (the default)."""
    url = f"{http_url.rstrip('/')}/v1/admin/flags" + _query(
        {"before": before, "limit": limit, "state": state}
    )
    reply: dict[str, Any] = await asyncio.to_thread(_http_json, "GET", url, token)
    return reply


async def resolve_flag(
    http_url: str, token: str, flag_id: int, resolution: str | None = None
) -> dict[str, Any]:
    """An admin closes an account flag with an optional note (again: answered
    as it stands, ``already``); audited as ``flag_resolve``."""
    body = {} if resolution is None else {"resolution": resolution}
    url = f"{http_url.rstrip('/')}/v1/admin/flags/{int(flag_id)}/resolve"
    reply: dict[str, Any] = await asyncio.to_thread(_http_json, "POST", url, token, body)
    return reply


def webhook_signature(secret: str, body: bytes, timestamp: int) -> str:
    """The ``Payment-Signature`` header a provider sends with ``body``:
    ``t=<unix s>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>``."""
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={digest.hexdigest()}"


async def send_webhook(
    http_url: str, secret: str, event: dict[str, Any], *, timestamp: int | None = None
) -> dict[str, Any]:
    """Post a payment provider's event, signed (what a provider, a test or the
    load test does): ``{"id", "type", "data": {"payment_ref", ...}}``."""
    body = json.dumps(event).encode()
    header = webhook_signature(secret, body, int(time.time()) if timestamp is None else timestamp)
    url = f"{http_url.rstrip('/')}/v1/payments/webhook"

    def post() -> Any:
        request = urllib.request.Request(
            url,
            data=body,
            method="POST",
            headers={"Payment-Signature": header, "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            raise HttpError(exc.code, json.loads(exc.read() or b"{}")) from None

    reply: dict[str, Any] = await asyncio.to_thread(post)
    return reply
