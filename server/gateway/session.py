"""One WebSocket connection: its protocol state, its limits, its commands.

States: CONNECTED (only `hello` is accepted, within the hello timeout) ->
AUTHENTICATED (every command) -> CLOSING. Commands of one session run one at a
time, in the order they arrived, and each gets exactly one reply.

Joining a room is the delicate part: the session starts buffering the room's
live events, makes sure the node is subscribed, reads history, sends the
reply, then flushes the buffer minus what history already held. So a member
sees every event once, in order, across the join.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import orjson
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from tokenchat.protocol import (
    Balance,
    Ban,
    BuyTicket,
    Clear,
    CloseCode,
    Command,
    ErrorCode,
    Hello,
    Join,
    Kick,
    Leave,
    Mute,
    Ping,
    PostMedia,
    PrivateAccept,
    PrivateDecline,
    PrivateEnd,
    PrivateRequest,
    ProtocolError,
    RequestAccept,
    RequestCancel,
    RequestDecline,
    RequestDeliver,
    RequestList,
    RequestOffer,
    RoomHistory,
    Say,
    ShowCancel,
    ShowEnd,
    ShowStart,
    Slow,
    Unban,
    Unmute,
    codec_for,
    decode_command,
    events,
)
from tokenchat.protocol.codec import Codec
from tokenchat.protocol.limits import PRIVATE_ROOM_PREFIX

from .. import metrics
from ..auth import Identity, verify_token
from ..catalog.directory import RoomInfo
from ..economy.actions import BY_COMMAND, TICKET, Action, SpendContext
from ..errors import Forbidden, LimitExceeded, NotFound, NotInRoom, ServiceError
from ..ratelimit import TokenBucket
from .hub import encoded_event, event_show, is_show_time
from .rooms import History, Offset, parse_offset

if TYPE_CHECKING:
    from .node import Node

log = logging.getLogger(__name__)

Reply = dict[str, Any]
NO_SHOWS: frozenset[str] = frozenset()


class Session:
    # Slots, not an instance dict: one Session per connection, ~10,000 idle
    # ones per process (docs/benchmarks.md, idle), and a dict of 20 fields
    # costs about 1 KiB more per session than its slots.
    __slots__ = (
        "_after_reply",
        "_bucket",
        "_busy",
        "_catching_up",
        "_closing",
        "_draining",
        "_held_balance",
        "_held_dms",
        "_history_ends",
        "_joining",
        "_last_dm",
        "_reality_task",
        "_seen_shows",
        "_strikes",
        "codec",
        "id",
        "identity",
        "node",
        "rooms",
        "ws",
    )

    def __init__(self, node: Node, ws: ServerConnection) -> None:
        self.node = node
        self.ws = ws
        self.codec: Codec = codec_for(ws.subprotocol)
        self.id = secrets.token_urlsafe(12)
        self.identity: Identity | None = None
        self.rooms: set[str] = set()
        settings = node.settings
        self._bucket = TokenBucket(settings.commands_per_s, settings.commands_burst)
        self._strikes = 0
        # Live events of rooms being joined, held until the join reply is sent.
        self._joining: dict[str, list[tuple[Offset | None, bytes]]] = {}
        # Rooms whose join reply is out but whose history reached further than
        # the events this node has received so far: pub/sub runs on another
        # connection than the history read, so an event can be in the history
        # before its live copy arrives. Until that copy arrives, live events
        # at or before the history's last offset are dropped here.
        self._catching_up: dict[str, Offset] = {}
        self._after_reply: Callable[[], None] | None = None
        # Rooms joined with `since` whose missed events took more than one
        # page: the newest event the pages run to, where the live events sent
        # since the join reply begin (docs/protocol.md, "Paging history").
        # None until the first such join: most sessions never page.
        self._history_ends: dict[str, Offset] | None = None
        # The last DM delivered here: a DM seen both live and in the inbox
        # (around a hello or a reconnect of pub/sub) is delivered once.
        self._last_dm: Offset | None = None
        # While `hello` runs, pushes from the user's channel wait here, so that
        # nothing reaches the client before its welcome, and the stored DMs
        # read during hello and the live ones merge in offset order.
        self._held_dms: list[tuple[Offset, bytes]] | None = None
        self._held_balance = False
        # Ticket shows whose show-time events this session may get: the
        # user holds a ticket (seen at join, or bought here). The room's
        # model sees her own shows without one (``sees``). The shared empty
        # frozenset until the first ticket: most sessions never hold one, and
        # an empty set is 216 bytes of every idle session.
        self._seen_shows: frozenset[str] = NO_SHOWS
        self._busy = False
        self._draining = False
        # Sends `reality_check` events while the session lives (hello on).
        self._reality_task: asyncio.Task[None] | None = None
        self._closing = False

    # --- what the hub needs ---------------------------------------------------
    @property
    def connection(self) -> ServerConnection:
        return self.ws

    @property
    def binary(self) -> bool:
        return self.codec.binary

    def sees(self, room: str, show: str | None) -> bool:
        """Whether this session may get an event posted during ``show`` in
        ``room`` (a room's id is its model's)."""
        if show is None or show in self._seen_shows:
            return True
        return self.identity is not None and self.identity.user_id == room

    def _visible(self, room: str, frame: bytes) -> bool:
        return not is_show_time(frame) or self.sees(room, event_show(frame))

    def buffer_event(self, room: str, offset: Offset | None, frame: bytes) -> None:
        history_end = self._catching_up.get(room)
        if history_end is not None:
            if (offset is None or offset > history_end) and self._visible(room, frame):
                self._push(frame)
            if offset is not None and offset >= history_end:
                del self._catching_up[room]
                self.node.hub.join_finished(room, self)
            return
        held = self._joining.get(room)
        if held is None:
            return
        if len(held) >= self.node.settings.join_buffer_events_max:
            self.close_too_slow()
            return
        held.append((offset, frame))

    def write_buffer_bytes(self) -> int:
        transport = self.ws.transport
        return 0 if transport is None else transport.get_write_buffer_size()

    def push_balance(self, frame: bytes) -> None:
        """A balance event for this session alone, not awaited."""
        if self._held_dms is not None:
            self._held_balance = True
        elif not self._closing:
            self._push(frame)

    def push_live(self, frame: bytes) -> None:
        """A `live` event (a followed model went live), not awaited."""
        if not self._closing:
            self._push(frame)

    def push_dm(self, offset: Offset, frame: bytes) -> None:
        if self._held_dms is not None:
            self._held_dms.append((offset, frame))
            return
        if self._closing or (self._last_dm is not None and offset <= self._last_dm):
            return
        self._last_dm = offset
        self._push(frame)

    def close_too_slow(self) -> None:
        """Stop delivering to this session at once, and close it with 4008."""
        if self._closing:
            return
        for room in self.rooms:
            self.node.hub.remove(room, self)
        self._joining.clear()
        self._catching_up.clear()
        self._close_soon(CloseCode.TOO_SLOW, "too slow: write buffer over its limit")

    # --- lifecycle --------------------------------------------------------------
    async def run(self) -> None:
        metrics.SESSIONS.inc()
        try:
            self.node.register(self)
            if await self._authenticate():
                await self._serve()
        except ConnectionClosed:
            pass
        finally:
            await self._cleanup()
            metrics.SESSIONS.dec()

    def drain(self) -> None:
        """Server shutdown: finish the command in flight, then close with 1012."""
        self._draining = True
        if not self._busy:
            self._close_soon(CloseCode.SERVICE_RESTART, "server restarting")

    async def _authenticate(self) -> bool:
        deadline = asyncio.get_running_loop().time() + self.node.settings.hello_timeout_s
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    data = await self.ws.recv()
            except TimeoutError:
                await self._close(CloseCode.UNAUTHENTICATED, "no hello in time")
                return False
            command = await self._admit(data)
            if command is None:
                continue
            if not isinstance(command, Hello):
                await self._send_error(command.id, ErrorCode.UNAUTHENTICATED, "send hello first")
                continue
            outcome = await self._hello(command)
            if outcome is not None:
                return outcome
            # A backend was away: the session stays, the client may try again.

    async def _hello(self, command: Hello) -> bool | None:
        """True: welcomed. False: refused and closed. None: try again."""
        node = self.node
        self._held_dms, self._held_balance = [], False
        try:
            identity = verify_token(
                node.settings.jwt_secret, command.token, ttl_max_s=node.settings.token_ttl_max_s
            )
            # With the hellos that arrive together (gateway/admission.py): the
            # user upsert, platform bans, the sessions-per-user limit, the
            # subscription to her channel, then her balance, limits and
            # counters, and stored DMs. A refused hello is offline again.
            self.identity = identity
            admitted = await node.admission.admit(self, identity)
        except ServiceError as exc:
            self._held_dms = None
            self.identity = None
            await self._send({**self._error(command.id, exc.code, exc.message), **exc.fields})
            if exc.code is ErrorCode.UNAUTHENTICATED:
                await self._close(CloseCode.UNAUTHENTICATED, exc.message)
                return False
            if exc.code is ErrorCode.BANNED:
                await self._close(CloseCode.FORBIDDEN, "banned from the platform")
                return False
            return None
        balance, stored = admitted.balance, admitted.stored_dms
        metrics.count_command("hello", "ok")
        await self._send(
            events.welcome(command.id, identity.user_id, identity.role, balance, self.id)
        )
        # DMs stored while no session was open, and those that came live
        # during hello, once each, in order.
        held, self._held_dms = self._held_dms or [], None
        merged = dict(held)
        merged.update((parse_offset(offset), event) for offset, event in stored)
        for position in sorted(merged):
            self.push_dm(position, merged[position])
        # A DM at or before the cursor was delivered before this hello read
        # the inbox; on a Redis Cluster its live copy, forwarded over the
        # cluster bus, may still arrive after the welcome: it is not shown.
        if admitted.inbox_cursor is not None:
            floor = parse_offset(admitted.inbox_cursor)
            if self._last_dm is None or self._last_dm < floor:
                self._last_dm = floor
        if stored:
            node.dms_delivered(identity.user_id, stored[-1][0])
        # Reality checks, if the fan asked for them (PUT /v1/me/limits).
        self._reality_task = asyncio.create_task(
            self._reality_checks(identity.user_id, admitted.spent_total, admitted.reality_check_min)
        )
        node.keep(self._reality_task)
        if self._held_balance:
            # Pushed during hello: the welcome may be older or newer than
            # them, so send the balance as it is now.
            self._held_balance = False
            node.spawn(self._push_current_balance(identity.user_id))
        return True

    async def _push_current_balance(self, user_id: str) -> None:
        try:
            balance = await self.node.balance_of(user_id)
        except ServiceError:
            return
        self.push_balance(orjson.dumps(events.balance_event(balance)))

    async def _serve(self) -> None:
        async for data in self.ws:
            if self._draining:
                break
            await self._handle(data)
            if self._draining:
                break
        if self._draining:
            await self._close(CloseCode.SERVICE_RESTART, "server restarting")

    async def _handle(self, data: str | bytes) -> None:
        arrived_s = time.perf_counter()
        command = await self._admit(data)
        if command is None:
            return
        self._busy = True
        try:
            reply = await self._execute(command)
        finally:
            self._busy = False
        await self._send(reply)
        metrics.time_command(command.TYPE, time.perf_counter() - arrived_s)
        if self._after_reply is not None:
            after, self._after_reply = self._after_reply, None
            after()

    async def _execute(self, command: Command) -> Reply:
        kind = command.TYPE
        handler = _HANDLERS.get(type(command))
        if handler is None:  # hello again, or a command with no handler here
            metrics.count_command(kind, ErrorCode.BAD_REQUEST)
            return self._error(command.id, ErrorCode.BAD_REQUEST, f"'{kind}' is not valid now")
        try:
            fields = await handler(self, command)
        except ServiceError as exc:
            metrics.count_command(kind, exc.code)
            # SPEND_LIMIT's window, SELF_EXCLUDED's until, a moderation
            # refusal's until: fields of the reply.
            return {**self._error(command.id, exc.code, exc.message), **exc.fields}
        except Exception:
            # A bug: log it here, tell the client nothing about it.
            log.exception("command %s failed", kind)
            metrics.count_command(kind, ErrorCode.INTERNAL)
            return self._error(command.id, ErrorCode.INTERNAL, "internal error")
        metrics.count_command(kind, "ok")
        return events.ok(command.id, **fields)

    async def _admit(self, data: str | bytes) -> Command | None:
        """The frame's command if it is valid and within the rate, else None.

        Every frame counts against the rate, garbage included: decoding and
        answering it costs the server as much as a valid command does.
        """
        allowed = self._bucket.take()
        try:
            command: Command | None = decode_command(self.codec, data)
            refused: ProtocolError | None = None
        except ProtocolError as exc:
            command, refused = None, exc
        re = command.id if command is not None else refused.re if refused else None
        if not allowed:
            self._strikes += 1
            metrics.count_command("any", ErrorCode.RATE_LIMITED)
            if self._strikes > self.node.settings.rate_limit_strikes_max:
                await self._close(CloseCode.RATE_LIMITED, "rate limited past tolerance")
            else:
                await self._send_error(re, ErrorCode.RATE_LIMITED, "too many commands")
            return None
        self._strikes = 0
        if refused is not None:
            metrics.count_command("invalid", refused.code)
            await self._send_error(refused.re, refused.code, refused.message)
        return command

    async def _cleanup(self) -> None:
        self._closing = True
        if self._reality_task is not None:
            self._reality_task.cancel()
        self._joining.clear()
        self._catching_up.clear()
        rooms, self.rooms = self.rooms, set()
        for room in rooms:
            self.node.hub.remove(room, self)
            self.node.room_left(room)
            if self.identity is not None and room == self.identity.user_id:
                self.node.model_departed(room)
        self.node.unregister(self)

    # --- commands -----------------------------------------------------------------
    async def _join(self, command: Join) -> Reply:
        room_id = command.room
        since = command.since
        info: RoomInfo | None
        if room_id.startswith(PRIVATE_ROOM_PREFIX):  # a private show's room
            assert self.identity is not None
            info = await self.node.privates.room(room_id, self.identity.user_id)
        else:
            info = await self.node.directory.room(room_id)
        if info is None:
            raise NotFound(f"no room '{room_id}'")
        is_new = room_id not in self.rooms
        if is_new and len(self.rooms) >= self.node.settings.rooms_per_session_max:
            raise LimitExceeded(
                f"at most {self.node.settings.rooms_per_session_max} rooms per session"
            )
        self._joining[room_id] = []
        self._catching_up.pop(room_id, None)
        self.node.hub.join_started(room_id, self)
        if is_new:
            self.rooms.add(room_id)
        try:
            await self.node.subscribe_room(room_id)
            # After subscribing: a ban committed later reaches this node as
            # news and removes the session; one committed before is read here.
            rules = await self.node.moderation.check_join(room_id, self._user())
            viewers = await self.node.room_joined(room_id)
            store = self.node.rooms
            history = await (store.latest(room_id) if since is None else store.page(room_id, since))
            show, ticket = await self._shows_of(room_id, history.events)
            goal = await self._goal_of(room_id)
        except BaseException:
            self._joining.pop(room_id, None)
            self.node.hub.join_finished(room_id, self)
            if is_new:
                self.rooms.discard(room_id)
                self.node.hub.remove(room_id, self)
                self.node.room_left(room_id)
            raise
        # Live events begin after `end`: the pages up to it come by `history`.
        end = history.end
        self.node.hub.joined_at(room_id, end)
        self._after_reply = lambda: self._flush_joined(room_id, end)
        self._page_to(room_id, end if history.more else None)
        if is_new and room_id == self._user():  # the model in her own room
            self.node.model_arrived(room_id)
        moderation = {**rules.settings_wire(), "moderators": sorted(rules.moderators)}
        # While a ticket show runs, show-time tips may have crowned the king:
        # like the `king` event then, he is for those who see the show.
        walled = show is not None and show.get("state") == "running" and not ticket
        return {
            "room": {
                **info.to_wire(viewers),
                "show": show,
                "king": None if walled else await self._king_of(room_id),
                "moderation": moderation,
                "goal": goal,
            },
            "ticket": ticket,
            "history": self._history_events(room_id, history.events),
            "recovered": history.recovered,
            **_paging_fields(history),
        }

    def _history_events(self, room: str, events: list[tuple[bytes, bytes]]) -> list[Any]:
        """The events of a history read this session may see, for its reply:
        to a JSON session their stored JSON as it is (``orjson.Fragment``,
        written into the reply without a decode and an encode per event, most
        of a page's cost: docs/benchmarks.md), to a msgpack one decoded."""
        visible = [frame for _, frame in events if self._visible(room, frame)]
        if self.codec.binary:
            return [orjson.loads(frame) for frame in visible]
        return [orjson.Fragment(frame) for frame in visible]

    def _page_to(self, room: str, end: Offset | None) -> None:
        """Remember (``end``) or forget (None) where ``room``'s pages end."""
        if end is not None:
            if self._history_ends is None:
                self._history_ends = {}
            self._history_ends[room] = end
        elif self._history_ends is not None:
            self._history_ends.pop(room, None)

    async def _history(self, command: RoomHistory) -> Reply:
        """The page after ``since``: up to where the join's live events
        began while a join's pages remain, else up to the room's newest."""
        room = command.room
        if room not in self.rooms:
            raise NotInRoom(f"join room '{room}' first")
        until = None if self._history_ends is None else self._history_ends.get(room)
        page = await self.node.rooms.page(room, command.since, until)
        if not page.more:
            self._page_to(room, None)
        await self._learn_shows(room, page.events)
        return {
            "room": room,
            "history": self._history_events(room, page.events),
            "recovered": page.recovered,
            **_paging_fields(page),
        }

    async def _goal_of(self, room: str) -> dict[str, Any] | None:
        """The room's tip goal for `join` (None when it has none). With Redis
        or Postgres away the join still succeeds, naming none: the next
        `goal` event brings it."""
        if room.startswith(PRIVATE_ROOM_PREFIX):
            return None
        try:
            return await self.node.goals.current(room)
        except ServiceError as exc:
            log.warning("room %s joined without its goal: %s", room, exc.message)
            return None

    async def _shows_of(
        self, room: str, history: list[tuple[bytes, bytes]]
    ) -> tuple[dict[str, Any] | None, bool]:
        """The room's current show and whether the user holds a ticket to
        it; on the way, learn which shows of ``history`` the user may see.

        With Postgres or a show's state away, the join still succeeds, shut
        rather than open: no current show is named, and a show whose ticket
        could not be checked stays unseen (its events left out)."""
        user = self._user()
        try:
            current = await self.node.shows.current(room)
        except ServiceError as exc:
            log.warning("room %s joined without its show: %s", room, exc.message)
            current = None
        await self._learn_shows(room, history, None if current is None else current["show"])
        if current is None:
            return None, False
        return current, user == room or current["show"] in self._seen_shows

    async def _learn_shows(
        self, room: str, history: list[tuple[bytes, bytes]], current: str | None = None
    ) -> None:
        """Learn which shows of ``history`` (and ``current``) the user holds
        a ticket to; a show whose ticket could not be checked stays unseen."""
        user = self._user()
        shows = self.node.shows
        wanted = {event_show(frame) for _, frame in history if is_show_time(frame)}
        if current is not None:
            wanted.add(current)
        for show_id in wanted:
            unknown = show_id is not None and show_id not in self._seen_shows and user != room
            if not unknown or show_id is None:
                continue
            try:
                if await shows.holds_ticket(show_id, user):
                    self._seen_shows = self._seen_shows | {show_id}
            except ServiceError as exc:
                log.warning("ticket to %s not checked: %s", show_id, exc.message)

    async def _king_of(self, room: str) -> dict[str, Any] | None:
        """The room's king for the join reply; with Postgres away the join
        still succeeds, naming none (the next king event corrects it)."""
        try:
            return await self.node.standing.king(room)
        except ServiceError as exc:
            log.warning("room %s joined without its king: %s", room, exc.message)
            return None

    def _flush_joined(self, room: str, last: Offset | None) -> None:
        held = self._joining.pop(room, None)
        if self._closing or room not in self.rooms:
            return
        for offset, frame in held or ():
            if (offset is None or last is None or offset > last) and self._visible(room, frame):
                self._push(frame)
        received = self.node.hub.last_offset(room)
        if last is not None and (received is None or received < last):
            self._catching_up[room] = last
            return
        # From here on the room's broadcasts reach this session directly.
        self.node.hub.join_finished(room, self)

    async def _leave(self, command: Leave) -> Reply:
        if command.room not in self.rooms:
            raise NotInRoom(f"not in room '{command.room}'")
        self.rooms.discard(command.room)
        self._joining.pop(command.room, None)
        self._catching_up.pop(command.room, None)
        self._page_to(command.room, None)
        self.node.hub.remove(command.room, self)
        self.node.room_left(command.room)
        if command.room == self._user():
            self.node.model_departed(command.room)
        return {}

    async def _say(self, command: Say) -> Reply:
        if command.room not in self.rooms:
            raise NotInRoom(f"join room '{command.room}' first")
        assert self.identity is not None
        user = self.identity.user_id
        await self.node.moderation.check_say(command.room, user)
        tier = await self.node.standing.tiers.of(user)
        event = events.message_event_body(command.room, user, command.text, tier)
        return {"offset": await self.node.rooms.append(command.room, event, poster=user)}

    async def _post_media(self, command: PostMedia) -> Reply:
        """A model shows her locked media in her room: its descriptor, never
        its content, goes into the room's history like a message."""
        assert self.identity is not None
        user_id = self.identity.user_id
        if command.room != user_id:
            raise Forbidden("a model posts media in her own room only")
        if await self.node.directory.room(command.room) is None:
            raise NotFound(f"no room '{command.room}'")
        info = await self.node.media.info(command.media)
        if info.owner != user_id:
            raise NotFound(f"no media '{command.media}' of yours")
        event = events.media_event_body(command.room, user_id, info.descriptor(), command.text)
        # As a chat line: during her ticket show, only ticket holders see it.
        return {"offset": await self.node.rooms.append(command.room, event, poster=user_id)}

    async def _balance(self, command: Balance) -> Reply:
        assert self.identity is not None
        return {"balance": await self.node.balance_of(self.identity.user_id)}

    async def _ping(self, command: Ping) -> Reply:
        return {}

    # --- custom requests (server/economy/requests.py) ---------------------------------
    def _user(self) -> str:
        assert self.identity is not None
        return self.identity.user_id

    async def _request_offer(self, command: RequestOffer) -> Reply:
        return await self.node.requests.offer(
            self._user(), command.model, command.text, command.amount, command.key
        )

    async def _request_accept(self, command: RequestAccept) -> Reply:
        return await self.node.requests.accept(self._user(), command.request)

    async def _request_deliver(self, command: RequestDeliver) -> Reply:
        return await self.node.requests.deliver(
            self._user(), command.request, command.text, command.media
        )

    async def _request_decline(self, command: RequestDecline) -> Reply:
        return await self.node.requests.decline(self._user(), command.request)

    async def _request_cancel(self, command: RequestCancel) -> Reply:
        return await self.node.requests.cancel(self._user(), command.request)

    async def _request_list(self, command: RequestList) -> Reply:
        return {"requests": await self.node.requests.list_for(self._user())}

    # --- private shows (server/economy/privates.py) -----------------------------------
    async def _private_request(self, command: PrivateRequest) -> Reply:
        return await self.node.privates.request(
            self._user(), command.model, command.rate, command.key
        )

    async def _private_accept(self, command: PrivateAccept) -> Reply:
        return await self.node.privates.accept(self._user(), command.show)

    async def _private_decline(self, command: PrivateDecline) -> Reply:
        return await self.node.privates.decline(self._user(), command.show)

    async def _private_end(self, command: PrivateEnd) -> Reply:
        return await self.node.privates.end(self._user(), command.show)

    # --- ticket shows (server/economy/shows.py) -----------------------------------------
    async def _buy_ticket(self, command: BuyTicket) -> Reply:
        reply = await self._spend(TICKET, command)
        self._seen_shows = self._seen_shows | {command.show}
        # The user's other sessions (any node) see the show from now on too.
        self.node.spawn(self.node.ticket_bought(self._user(), command.show))
        return reply

    def see_show(self, show: str) -> None:
        """The user holds a ticket to ``show`` (bought in another session)."""
        self._seen_shows = self._seen_shows | {show}

    async def _show_start(self, command: ShowStart) -> Reply:
        return await self.node.shows.start(self._user(), command.show)

    async def _show_end(self, command: ShowEnd) -> Reply:
        return await self.node.shows.end(self._user(), command.show)

    async def _show_cancel(self, command: ShowCancel) -> Reply:
        return await self.node.shows.cancel(self._user(), command.show)

    # --- moderation (server/catalog/moderation.py) -----------------------------------
    def remove_from_room(self, room: str, frame: bytes) -> None:
        """Kicked or banned (news from any node): out of the room at once,
        then told why with ``frame`` (a ``removed`` event)."""
        if self._closing or room not in self.rooms:
            return
        self.rooms.discard(room)
        self._joining.pop(room, None)
        self._catching_up.pop(room, None)
        self._page_to(room, None)
        self.node.hub.remove(room, self)
        self.node.room_left(room)
        self._push(frame)

    def close_banned(self) -> None:
        """Banned from the platform: closed at once with 4003."""
        if self._closing:
            return
        for room in self.rooms:
            self.node.hub.remove(room, self)
        self._joining.clear()
        self._catching_up.clear()
        self._close_soon(CloseCode.FORBIDDEN, "banned from the platform")

    def _moderator(self) -> Identity:
        assert self.identity is not None
        return self.identity

    async def _mute(self, command: Mute) -> Reply:
        return await self.node.moderation.restrict(
            self._moderator(), command.room, command.user, "mute", command.seconds
        )

    async def _unmute(self, command: Unmute) -> Reply:
        return await self.node.moderation.lift(
            self._moderator(), command.room, command.user, "mute"
        )

    async def _kick(self, command: Kick) -> Reply:
        return await self.node.moderation.kick(self._moderator(), command.room, command.user)

    async def _ban(self, command: Ban) -> Reply:
        return await self.node.moderation.restrict(
            self._moderator(), command.room, command.user, "ban", command.seconds
        )

    async def _unban(self, command: Unban) -> Reply:
        return await self.node.moderation.lift(self._moderator(), command.room, command.user, "ban")

    async def _clear(self, command: Clear) -> Reply:
        return await self.node.moderation.clear(self._moderator(), command.room, command.user)

    async def _slow(self, command: Slow) -> Reply:
        return await self.node.moderation.slow(self._moderator(), command.room, command.seconds)

    async def _spend(self, action: Action, command: Command) -> Reply:
        """A paid command: its action's serve step (preconditions, then Economy)."""
        assert self.identity is not None and action.serve is not None
        context = SpendContext(
            self.identity.user_id,
            self.rooms,
            self.node.directory.room,
            self.node.economy,
            self.node.media,
        )
        return await action.serve(context, command)

    # --- reality checks (server/economy/limits.py) ------------------------------
    async def _reality_checks(
        self, user_id: str, spent_at_hello: int, minutes_at_hello: int | None
    ) -> None:
        """Every `reality_check_min` minutes: a `reality_check` event with
        the time this session has been online and what she spent since it
        opened (her counters' total, so spends from other sessions, HTTP and
        a private show's meter count too). The first check comes a period
        after she turned them on (or after the hello). Looks again for the
        setting every reality_check_poll_s while none is due."""
        settings = self.node.settings
        limits = self.node.economy.limits
        started = last = time.monotonic()
        # Her counters' total as the session opened (read by the hello, with
        # her limits): a baseline taken only when the session noticed a new
        # setting would leave out what she spent before it noticed.
        spent_before: int | None = spent_at_hello
        enabled = False
        # The hello read her period too: the first pass needs no Redis (a
        # reconnect storm would otherwise cost two more reads per session).
        first_pass = True
        while not self._closing:
            try:
                if spent_before is None:
                    spent_before = await limits.spent_total(user_id)
                if first_pass:
                    minutes, first_pass = minutes_at_hello, False
                else:
                    minutes = await limits.reality_check_min(user_id)
                if minutes is not None and not enabled:
                    enabled, last = True, time.monotonic()  # a period from now
            except ServiceError:
                minutes = None
            if minutes is None or spent_before is None:
                await asyncio.sleep(settings.reality_check_poll_s)
                continue
            due = last + minutes * settings.reality_check_minute_s - time.monotonic()
            if due > 0:
                await asyncio.sleep(min(due, settings.reality_check_poll_s))
                continue
            try:
                spent = await limits.spent_total(user_id) - spent_before
            except ServiceError:
                spent = None
            last = time.monotonic()
            if spent is not None:
                self._push(
                    orjson.dumps(events.reality_check_event(int(last - started), spent, minutes))
                )

    # --- output -------------------------------------------------------------------
    def _push(self, frame: bytes) -> None:
        """Write an event JSON frame without waiting (same path as broadcasts)."""
        binary = self.codec.binary
        encoded = encoded_event(f"session {self.id}", frame, binary=binary)
        if encoded is not None:
            self.node.hub.writer.send((self.ws,), encoded, binary=binary)

    async def _send(self, message: Reply) -> None:
        await self.ws.send(self.codec.encode(message), text=not self.codec.binary)

    def _error(self, re: int | str | None, code: ErrorCode, message: str) -> Reply:
        metrics.ERRORS.labels(code).inc()
        return events.error(re, code, message)

    async def _send_error(self, re: int | str | None, code: ErrorCode, message: str) -> None:
        await self._send(self._error(re, code, message))

    async def _close(self, code: CloseCode, reason: str) -> None:
        self._closing = True
        metrics.CLOSES.labels(int(code)).inc()
        await self.ws.close(code, reason)

    def _close_soon(self, code: CloseCode, reason: str) -> None:
        task = asyncio.create_task(self._close(code, reason))
        self.node.keep(task)


# What runs each command once the session is welcomed: one table for every
# session, built once, rather than a dict of bound methods per session (that
# was ~3 KiB of every idle session, docs/benchmarks.md, idle).
Handler = Callable[[Session, Any], Awaitable[Reply]]


def _spend_handler(action: Action) -> Handler:
    async def spend(session: Session, command: Any) -> Reply:
        return await session._spend(action, command)

    return spend


def _paging_fields(read: History) -> Reply:
    """``more``, and with it ``next``: the offset to page on from, the last
    event the page covered (shown or not: an event of a ticket show the user
    cannot see is left out of ``history``, but the next page starts after it)."""
    if not read.more:
        return {"more": False}
    return {"more": True, "next": read.events[-1][0].decode()}


_HANDLERS: dict[type[Any], Handler] = {
    Join: Session._join,
    RoomHistory: Session._history,
    Leave: Session._leave,
    Say: Session._say,
    Balance: Session._balance,
    Ping: Session._ping,
    PostMedia: Session._post_media,
    RequestOffer: Session._request_offer,
    RequestAccept: Session._request_accept,
    RequestDeliver: Session._request_deliver,
    RequestDecline: Session._request_decline,
    RequestCancel: Session._request_cancel,
    RequestList: Session._request_list,
    PrivateRequest: Session._private_request,
    PrivateAccept: Session._private_accept,
    PrivateDecline: Session._private_decline,
    PrivateEnd: Session._private_end,
    # Paid commands, from the paid-action registry.
    **{command_type: _spend_handler(action) for command_type, action in BY_COMMAND.items()},
    # Ticket shows: a ticket goes through the registry too, and lets this
    # session see the show's events at once.
    BuyTicket: Session._buy_ticket,
    ShowStart: Session._show_start,
    ShowEnd: Session._show_end,
    ShowCancel: Session._show_cancel,
    # Moderation (server/catalog/moderation.py).
    Mute: Session._mute,
    Unmute: Session._unmute,
    Kick: Session._kick,
    Ban: Session._ban,
    Unban: Session._unban,
    Clear: Session._clear,
    Slow: Session._slow,
}
