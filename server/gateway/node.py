"""A node: one gateway process's shared state and the tasks that keep it.

It wires Redis, Postgres, the broker, the hub and the directory together, the
way centrifuge's ``node.go`` does, and owns the background work: the node
heartbeat, coalesced presence, and gap filling after a pub/sub reconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import asyncpg
import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError

from tokenchat.protocol import events

from .. import bus, redis_client
from ..aio import pause, reraise_if_cancelled
from ..catalog.directory import Directory
from ..catalog.dms import Blocks, DmArchive
from ..catalog.forgetting import Forgetting
from ..catalog.media import LocalDiskStore, MediaCatalog
from ..catalog.moderation import Moderation, decode_news
from ..catalog.reports import Reports
from ..config import Settings
from ..db import create_pool
from ..discovery import Discovery
from ..economy.closing import AccountClosing
from ..economy.deadlines import Sweeper
from ..economy.economy import Economy
from ..economy.goals import Goals
from ..economy.payouts import Payouts
from ..economy.privates import Privates
from ..economy.relay import Relay
from ..economy.requests import Requests
from ..economy.shows import Shows
from ..errors import LimitExceeded, Unavailable
from ..keys import Keys
from ..ledger.confirmations import Confirmations
from ..ledger.history import History
from ..ledger.writer import LedgerWriter
from ..standing import Standing
from .admission import Admission
from .broker import RedisBroker
from .hub import Hub
from .rooms import RoomStore, complete_event, parse_offset
from .session import Session

log = logging.getLogger(__name__)

# Subscribe/unsubscribe decisions for one room are serialized; rooms hash to
# one of this many locks, so the lock table never grows with the room count.
ROOM_LOCK_STRIPES = 256
# Seconds between two cancellations of a background loop that has not
# stopped yet at close: a pass that swallowed the first one (see aio.pause)
# is interrupted again soon enough that a shutdown stays within its grace.
LOOP_RECANCEL_S = 1.0
# On close, background tasks (session closes take up to the close timeout)
# get this long before they are cancelled.
TASKS_GRACE_S = 6.0
# After a pub/sub reconnect, a failed read of what was missed is tried again
# after this long, doubling up to the max: the first read right after an
# outage often fails, on a pooled connection that died with it (redis-py 8
# hands idle connections out without checking that they are still open).
GAP_RETRY_DELAY_MIN_S = 0.05
GAP_RETRY_DELAY_MAX_S = 1.0
# A room's live events are held while its gap is read; after this long
# without a successful read the gap is given up and live delivery resumes:
# a room silent for longer would cost its members more than the lost events.
GAP_FILL_DEADLINE_S = 10.0


class Node:
    def __init__(
        self,
        settings: Settings,
        redis: Redis,
        pool: asyncpg.Pool,
        node_id: str | None = None,
        *,
        ledger_pool: asyncpg.Pool | None = None,
    ) -> None:
        self.settings = settings
        self.id = node_id or secrets.token_hex(8)
        self.redis = redis
        self.pool = pool
        # The writer's own connections (see Settings.ledger_pool_max).
        self.ledger_pool = pool if ledger_pool is None else ledger_pool
        self.keys = Keys(settings.redis_prefix)
        self.rooms = RoomStore(
            redis,
            self.keys,
            settings.history_len,
            settings.history_age_s,
            settings.redis_timeout_s,
        )
        self.directory = Directory(pool, redis, self.keys)
        # Locked media, stored on the local disk (an object store implements
        # the same MediaStore interface).
        self.media = MediaCatalog(
            pool, redis, self.keys, LocalDiskStore(Path(settings.media_dir)), settings
        )
        self.hub = Hub()
        self.confirmations = (
            Confirmations(pool, settings.ledger_ack_timeout_s)
            if settings.durability == "ledger"
            else None
        )
        self.economy = Economy(
            redis,
            pool,
            self.keys,
            settings,
            self.confirmations,
            absent_users=self.directory.absent_users,
            media=self.media,
        )
        self.ledger = LedgerWriter(settings, self.ledger_pool, self.economy, consumer=self.id)
        self.economy.rebuild_with(self.ledger.drain)
        # The delivery relay (server/economy/relay.py): every node runs one
        # consumer in delivery mode `relay`, where rooms are served.
        self.relay = Relay(settings, consumer=self.id)
        # Custom requests, and the deadline sweeper every node runs (one at a
        # time sweeps: the holder of its Redis lease).
        self.requests = Requests(pool, redis, self.keys, settings, self.economy)
        self.sweeper = Sweeper(pool, redis, self.keys, settings)
        self.requests.register(self.sweeper)
        # Private shows: their deadlines in the same sweeper; their meter in
        # every node, each show billed by the node holding its lease.
        self.privates = Privates(pool, redis, self.keys, settings, self.economy)
        self.privates.register(self.sweeper)
        self.shows = Shows(pool, redis, self.keys, settings, self.economy, self.rooms.append)
        self.shows.register(self.sweeper)
        # Receipts and DMs (issue #12 sections 6 and 7): the ledger's history,
        # the DM archive (its reads; its copying loop runs where the ledger
        # writer runs, see start), blocks that dm.lua reads, and the report queue.
        self.history = History(pool, settings.payout_cents_per_token)
        self.dm_archive = DmArchive(settings, pool, consumer=self.id)
        self.blocks = Blocks(settings, pool, redis)
        self.economy.blocks_loader = self.blocks.load
        self.reports = Reports(pool)
        # Leaderboards, kings and tiers (server/standing.py): its projector
        # runs on every node; king events go out as room events.
        # A king may be crowned by show-time tips: the event is for those who
        # see the show (rooms.append, show_time).
        self.standing = Standing(
            pool,
            redis,
            self.keys,
            settings,
            functools.partial(self.rooms.append, poster=None, show_time=True),
        )
        self.economy.tier_of = self.standing.tiers.of
        # Moderation: rules in Postgres, a copy here kept current by the
        # moderation channel (server/catalog/moderation.py).
        self.moderation = Moderation(pool, redis, self.keys, settings, self.economy.balance)
        # Tip goals: counted by tips in Redis, closed and settled here.
        self.goals = Goals(pool, redis, self.keys, settings, self.economy, self.rooms.append)
        self.goals.register(self.sweeper)
        # Payouts (issue #13 section 1): versioned rules, requests held in
        # escrow and settled by admins (or the sweeper), earnings, liabilities.
        # Receipts value a model's earnings at the rule in force at the time.
        self.payouts = Payouts(pool, settings, self.economy)
        self.payouts.register(self.sweeper)
        self.history.rate_at = self.payouts.rate_at_ms
        # Deleted accounts: their open escrows settled before the forfeiture,
        # and a credit arriving later forfeited by the sweeper.
        self.closing = AccountClosing(
            pool, self.economy, self.requests, self.shows, self.privates, self.goals, self.payouts
        )
        self.sweeper.every_sweep(self.closing.forfeit_late_credits)
        # ...and forgotten on the WebSocket side (rooms' histories, kings,
        # DM inboxes): by the deletion, or by the sweeper if that failed.
        self.forgetting = Forgetting(pool, redis, self.keys, self.standing, self.moderation)
        self.sweeper.every_sweep(self.forgetting.sweep)
        # Discovery, follows and live notifications (server/discovery.py).
        self.discovery = Discovery(pool, redis, self.keys, settings)
        self._commits_channel = self.keys.ledger_commits()
        self.broker = RedisBroker(
            redis,
            self._on_broker_message,
            self._on_broker_reconnect,
            control_channel=f"{self.keys.node(self.id)}:control",
            timeout_s=settings.redis_timeout_s,
            # Room channels: sharded (SSUBSCRIBE; the scripts SPUBLISH).
            sharded=lambda channel: self.keys.channel_room(channel) is not None,
        )
        self.sessions: set[Session] = set()
        # Hellos that arrive together share their round trips (a restart).
        self.admission = Admission(self)
        # Set when the process starts to shut down: /readyz answers 503 so a
        # load balancer stops sending new connections here.
        self.draining = False
        self._user_sessions: dict[str, set[Session]] = {}
        self._subscribed: set[str] = set()  # rooms
        self._subscribed_users: set[str] = set()
        self._room_locks = [asyncio.Lock() for _ in range(ROOM_LOCK_STRIPES)]
        self._presence_local_dirty: set[str] = set()
        self._presence_stale: set[str] = set()
        self._presence_sent: dict[str, int] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loops: list[asyncio.Task[None]] = []
        self._gap_filler: asyncio.Task[None] | None = None

    @classmethod
    async def connect(cls, settings: Settings) -> Node:
        redis = redis_client.connect(
            settings,
            max_connections=settings.redis_pool_max,
            socket_timeout_s=settings.redis_timeout_s,
        )
        pool = await create_pool(
            settings.database_url,
            settings.database_schema,
            min_size=settings.database_pool_min,
            max_size=settings.database_pool_max,
            timeout_s=settings.database_timeout_s,
        )
        try:
            ledger_pool = await create_pool(
                settings.database_url,
                settings.database_schema,
                min_size=0,
                max_size=settings.ledger_pool_max,
                timeout_s=settings.database_timeout_s,
            )
        except BaseException:
            await pool.close()
            raise
        return cls(settings, redis, pool, ledger_pool=ledger_pool)

    async def start(self) -> None:
        # Before any loop runs: the sweeper's restore_markers (Shows) and the
        # spends pick their scripts and keys by the mode, and `auto` would
        # read as `script` on a cluster until this settled it (CROSSSLOT).
        relay = await self.economy.resolve_delivery() == "relay"
        await self._heartbeat_once()
        await self.broker.start()
        if self.confirmations is not None:
            await self.broker.subscribe(self._commits_channel)
        await self.broker.subscribe(self.moderation.channel)
        await self.broker.subscribe(self.discovery.channel)
        try:
            await self.moderation.load_platform_bans()
        except Unavailable as exc:  # hello loads them once Postgres answers
            log.warning("platform bans not loaded at start: %s", exc.message)
        self._loops = [
            asyncio.create_task(self._heartbeat_forever(), name="node-heartbeat"),
            asyncio.create_task(self._presence_forever(), name="node-presence"),
            asyncio.create_task(self._sweep_slow_forever(), name="node-slow-sweep"),
            asyncio.create_task(self.sweeper.run(), name="deadline-sweeper"),
            asyncio.create_task(self.privates.run_meter(), name="private-meter"),
            asyncio.create_task(self.standing.run(), name="standing-projector"),
            asyncio.create_task(self.discovery.run(), name="live-jobs"),
        ]
        if relay:
            self._loops.append(asyncio.create_task(self.relay.run(), name="delivery-relay"))
        if self.settings.ledger_enabled:
            # The DM archiver goes with the writer: in `serve` only when it
            # writes the ledger too (dev, one process), otherwise in
            # `tokenchat ledger` (LedgerStack). Copying DMs cost the gateway
            # about a fifth of its CPU per DM (docs/benchmarks.md).
            self._loops.append(asyncio.create_task(self.ledger.run(), name="ledger-writer"))
            self._loops.append(asyncio.create_task(self.dm_archive.run(), name="dm-archive"))

    async def close(self) -> None:
        # A loop whose cancellation a library swallowed stops at its next
        # pause (aio.pause); one caught inside a longer call is cancelled
        # again, so that close never waits on a loop for ever.
        pending = set(self._loops)
        while pending:
            for task in pending:
                task.cancel()
            _, pending = await asyncio.wait(pending, timeout=LOOP_RECANCEL_S)
        for task in self._loops:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        # Fire-and-forget work (closes, unsubscribes) gets a moment to finish,
        # then is cancelled: nothing it does may hold the process open.
        if self._tasks:
            _, pending = await asyncio.wait(list(self._tasks), timeout=TASKS_GRACE_S)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        await self.broker.close()
        await self.ledger.close()
        await self.relay.close()
        await self.dm_archive.close()
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            await self.rooms.node_beat(self.id, 0)  # dead from now: its counts go
        await self.redis.aclose()
        await self.pool.close()
        if self.ledger_pool is not self.pool:
            await self.ledger_pool.close()

    def keep(self, task: asyncio.Task[Any]) -> None:
        """Hold a reference to a fire-and-forget task until it is done."""
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        self.keep(asyncio.create_task(coro))

    # --- sessions -----------------------------------------------------------------
    def register(self, session: Session) -> None:
        self.sessions.add(session)

    def unregister(self, session: Session) -> None:
        self.sessions.discard(session)
        if session.identity is not None:
            self.user_offline(session, session.identity.user_id)

    async def ticket_bought(self, user_id: str, show: str) -> None:
        """Tell the user's sessions on every node that they hold a ticket to
        ``show`` (bus kind T). Best effort: a session that misses it sees
        the show from its next join, which reads the ticket."""
        try:
            await self.redis.publish(
                self.keys.user_channel(user_id), bus.TicketBought(show).encode()
            )
        except (RedisError, OSError) as exc:
            log.warning("ticket of %s to %s not announced: %s", user_id, show, exc)

    def user_offline(self, session: Session, user_id: str) -> None:
        sessions = self._user_sessions.get(user_id)
        if sessions is not None:
            sessions.discard(session)
            if not sessions:
                del self._user_sessions[user_id]
                self.spawn(self._unsubscribe_user_if_offline(user_id))
                # Their running private show, if any, pauses (grace).
                self.spawn(self.privates.away(user_id))

    async def balance_of(self, user_id: str) -> int:
        return await self.economy.balance(user_id)

    # --- users: DMs and balance pushes ---------------------------------------------------
    def user_online_many(self, admitted: list[tuple[Session, str]]) -> dict[Session, LimitExceeded]:
        """Route each user's channel (DMs, balance pushes) to her session, for
        a batch of hellos, within the sessions-per-user limit.
        Returns the sessions refused by the limit (the others are online)."""
        refused: dict[Session, LimitExceeded] = {}
        limit = self.settings.sessions_per_user_max
        for session, user_id in admitted:
            sessions = self._user_sessions.setdefault(user_id, set())
            if len(sessions) >= limit:
                refused[session] = LimitExceeded(f"at most {limit} sessions per user on one server")
                continue
            sessions.add(session)
        return refused

    async def subscribe_users(self, user_ids: list[str]) -> None:
        """The user channels of a batch of hellos: one SUBSCRIBE for
        every user channel this node is not on yet, confirmed before it
        returns. Raises ``Unavailable`` (the callers take their sessions
        offline again)."""
        wanted = sorted({u for u in user_ids if u not in self._subscribed_users})
        if not wanted:
            return
        channels = [self.keys.user_channel(user_id) for user_id in wanted]
        # The same striped locks as the unsubscribe of a user gone offline,
        # taken in index order (no one else holds two), so no unsubscribe of
        # one of these channels runs between the check and the SUBSCRIBE.
        stripes = sorted({hash(channel) % ROOM_LOCK_STRIPES for channel in channels})
        async with contextlib.AsyncExitStack() as stack:
            for stripe in stripes:
                await stack.enter_async_context(self._room_locks[stripe])
            missing = [u for u in wanted if u not in self._subscribed_users]
            if not missing:
                return
            try:
                await self.broker.subscribe_many([self.keys.user_channel(u) for u in missing])
            except (RedisError, OSError, TimeoutError) as exc:
                raise Unavailable("your message channel is unavailable") from exc
            self._subscribed_users.update(missing)

    async def _unsubscribe_user_if_offline(self, user_id: str) -> None:
        channel = self.keys.user_channel(user_id)
        async with self._room_lock(channel):
            if user_id in self._user_sessions or user_id not in self._subscribed_users:
                return
            self._subscribed_users.discard(user_id)
            try:
                await self.broker.unsubscribe(channel)
            except (RedisError, OSError, TimeoutError):
                log.warning("could not unsubscribe from %s", channel)

    async def pending_dms(self, user_id: str) -> list[tuple[bytes, bytes]]:
        """(offset, event JSON) of the DMs not yet delivered to any session."""
        try:
            cursor: Any = await self.redis.get(self.keys.inbox_cursor(user_id))
            start = b"(" + cursor if cursor else b"-"
            rows: Any = await self.redis.xrange(
                self.keys.inbox(user_id), min=start, count=self.settings.inbox_len
            )
        except (RedisError, OSError) as exc:
            raise Unavailable("your inbox is unavailable") from exc
        return [(offset, fields[b"e"]) for offset, fields in rows]

    def dms_delivered(self, user_id: str, offset: bytes) -> None:
        self.spawn(self._set_inbox_cursor(user_id, offset))

    async def _set_inbox_cursor(self, user_id: str, offset: bytes) -> None:
        try:
            await self.redis.set(self.keys.inbox_cursor(user_id), offset)
        except (RedisError, OSError):
            log.warning("could not record DM delivery for %s; they may see it again", user_id)

    def _on_user_message(self, user_id: str, message: bus.Message) -> None:
        sessions = self._user_sessions.get(user_id)
        if not sessions:
            return
        if isinstance(message, bus.BalanceChanged):
            frame = orjson.dumps(events.balance_event(message.balance))
            for session in sessions:
                session.push_balance(frame)
        elif isinstance(message, bus.TicketBought):
            for session in sessions:
                session.see_show(message.show)
        elif isinstance(message, bus.DirectMessage):
            position = parse_offset(message.offset)
            for session in sessions:
                session.push_dm(position, message.event)
            self.dms_delivered(user_id, message.offset)
        else:
            _misplaced(message, f"user {user_id}'s channel")

    # --- live notifications (server/discovery.py) -----------------------------------
    def model_arrived(self, model: str) -> None:
        """The model joined her own room: maybe she goes live (not awaited)."""
        self.spawn(self.discovery.arrived(model))

    def model_departed(self, model: str) -> None:
        self.spawn(self.discovery.departed(model))

    async def _deliver_live(self, body: bytes) -> None:
        """Push `live` to this node's connected followers of the model: one
        query per chunk of local users, and a loop turn per live_push_chunk."""
        try:
            news = orjson.loads(body)
            model, ts_ms = str(news["model"]), int(news["ts"])
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            log.warning("dropped a malformed live payload")
            return
        local = list(self._user_sessions)
        if not local:
            return
        followers = await self.discovery.local_followers(model, local)
        frame = orjson.dumps(events.live_event(model, ts_ms))
        chunk = self.settings.live_push_chunk
        for n, user_id in enumerate(followers, 1):
            for session in self._user_sessions.get(user_id, ()):
                session.push_live(frame)
            if n % chunk == 0:
                await asyncio.sleep(0)

    # --- rooms ----------------------------------------------------------------------
    def _room_lock(self, room: str) -> asyncio.Lock:
        return self._room_locks[hash(room) % ROOM_LOCK_STRIPES]

    async def subscribe_room(self, room: str) -> None:
        """Make sure this node receives the room's events (idempotent)."""
        async with self._room_lock(room):
            if room in self._subscribed:
                return
            try:
                await self.broker.subscribe(self.keys.room_channel(room))
            except (RedisError, OSError, TimeoutError) as exc:
                raise Unavailable("room events are unavailable") from exc
            self._subscribed.add(room)

    async def room_joined(self, room: str) -> int:
        """Publish this node's new count for the room; return its viewers."""
        try:
            await self.rooms.publish_presence_changed(room, self.id, self.hub.count(room))
            (viewers,) = await self.rooms.viewers([room])
        except (RedisError, OSError) as exc:
            raise Unavailable("room presence is unavailable") from exc
        self._presence_local_dirty.discard(room)
        return viewers

    def room_left(self, room: str) -> None:
        self._presence_local_dirty.add(room)
        if self.hub.count(room) == 0:
            self.spawn(self._unsubscribe_if_empty(room))

    async def _unsubscribe_if_empty(self, room: str) -> None:
        async with self._room_lock(room):
            if self.hub.count(room) or room not in self._subscribed:
                return
            self._subscribed.discard(room)
            self._presence_sent.pop(room, None)
            try:
                await self.broker.unsubscribe(self.keys.room_channel(room))
            except (RedisError, OSError, TimeoutError):
                log.warning("could not unsubscribe from room %s", room)

    # --- broker callbacks -------------------------------------------------------------
    def _on_broker_message(self, channel: str, payload: bytes) -> None:
        try:
            message = bus.decode(payload)
        except bus.MalformedPayload as exc:
            log.warning("dropped a payload on %s: %s", channel, exc)
            return
        if channel == self._commits_channel:
            if self.confirmations is not None:
                self.confirmations.on_message(message)
            return
        if channel == self.moderation.channel:
            if isinstance(message, bus.ModerationChanged):
                self._on_moderation(message)
            else:
                _misplaced(message, "the moderation channel")
            return
        if channel == self.discovery.channel:
            if isinstance(message, bus.LiveNews):
                self.spawn(self._deliver_live(message.body))
            else:
                _misplaced(message, "the live channel")
            return
        room = self.keys.channel_room(channel)
        if room is None:
            user_id = self.keys.channel_user(channel)
            if user_id is not None:
                self._on_user_message(user_id, message)
            return
        if isinstance(message, bus.RoomEvent):
            offset = message.offset
            self.hub.deliver_event(room, offset, complete_event(message.body, offset))
        elif isinstance(message, bus.PresenceChanged):
            self._presence_stale.add(room)
        else:
            _misplaced(message, f"room {room}'s channel")

    def _on_broker_reconnect(self) -> None:
        # Called before any message of the new connection is handled: from
        # here on, live room events wait until the missed ones are delivered.
        for room in self.hub.rooms():
            self.hub.hold(room)
        if self._gap_filler is not None:
            # Its history reads may predate this outage; the new one redoes
            # every room still held.
            self._gap_filler.cancel()
        self._gap_filler = asyncio.create_task(self._fill_gaps(), name="node-gap-filler")
        self.keep(self._gap_filler)
        if self.confirmations is not None:
            # Commits published while pub/sub was away were not heard.
            self.spawn(self.confirmations.recheck())
        # So were moderation changes: the rules are read again from Postgres.
        self.moderation.forget_all()
        self.spawn(self._reload_platform_bans())

    async def _reload_platform_bans(self) -> None:
        """HTTP reads the platform bans without waiting: read them again now
        (a hello that finds them missing reads them itself)."""
        try:
            await self.moderation.load_platform_bans()
        except Unavailable as exc:
            log.warning("platform bans not reloaded: %s", exc.message)

    # --- moderation (server/catalog/moderation.py) ---------------------------------------
    def _on_moderation(self, message: bus.ModerationChanged) -> None:
        news = decode_news(message)
        if news is None:
            log.warning("dropped a malformed moderation payload")
            return
        self.moderation.on_news(news)
        op, room, user = news.get("op"), news.get("room"), news.get("user")
        if not isinstance(user, str):
            return
        if op == "removed" and isinstance(room, str):
            until = news.get("until")
            reason = "banned" if news.get("reason") == "banned" else "kicked"
            frame = orjson.dumps(
                events.removed_event(room, reason, until if isinstance(until, int) else None)
            )
            for session in list(self._user_sessions.get(user, ())):
                session.remove_from_room(room, frame)
        elif op == "clear" and isinstance(room, str):
            everything = news.get("all") is True  # a deleted account (Moderation.forget_user)
            self.hub.deliver_transient(
                room, orjson.dumps(events.clear_event(room, user, everything))
            )
        elif op == "platform" and news.get("banned"):
            for session in list(self._user_sessions.get(user, ())):
                session.close_banned()

    async def _fill_gaps(self) -> None:
        """Deliver what was published while pub/sub was down, from history."""
        deadline = asyncio.get_running_loop().time() + GAP_FILL_DEADLINE_S
        for room in self.hub.held_rooms():
            missed = await self._retry_until(deadline, f"room {room}", self._missed_events, room)
            self.hub.fill_gap(room, missed or [])
            self._presence_stale.add(room)
        for user_id in list(self._user_sessions):
            pending = await self._retry_until(
                deadline, f"DMs of {user_id}", self.pending_dms, user_id
            )
            sessions = self._user_sessions.get(user_id)
            if not pending or not sessions:
                continue
            for offset, event in pending:
                for session in sessions:
                    session.push_dm(parse_offset(offset), event)
            self.dms_delivered(user_id, pending[-1][0])

    async def _missed_events(self, room: str) -> list[tuple[bytes, bytes]]:
        """(offset, frame) of the room's events after the last one delivered."""
        async with self._room_lock(room):
            if room not in self._subscribed:
                return []  # a first join is under way and reads history itself
            # Redis confirms the resubscription before the read: an event
            # published before the confirmation is in the history read, one
            # after it comes on the channel.
            await self.broker.subscribe(self.keys.room_channel(room))
        return await self.rooms.after(room, self.hub.refill_since(room))

    async def _retry_until(
        self,
        deadline: float,
        what: str,
        read: Callable[[str], Awaitable[list[tuple[bytes, bytes]]]],
        key: str,
    ) -> list[tuple[bytes, bytes]] | None:
        """``read(key)``, tried again after failures until ``deadline``;
        None if it never succeeded."""
        loop = asyncio.get_running_loop()
        delay_s = GAP_RETRY_DELAY_MIN_S
        while True:
            try:
                return await read(key)
            except (Unavailable, RedisError, OSError, TimeoutError) as exc:
                reraise_if_cancelled(exc)
                if loop.time() + delay_s > deadline:
                    log.warning("could not fill the gap of %s: %s", what, exc)
                    return None
            await pause(delay_s)
            delay_s = min(delay_s * 2, GAP_RETRY_DELAY_MAX_S)

    # --- slow consumers ---------------------------------------------------------------------
    async def _sweep_slow_forever(self) -> None:
        while True:
            await pause(self.settings.slow_check_interval_s)
            self._sweep_slow()

    def _sweep_slow(self) -> None:
        """Close (4008) every session whose unsent bytes passed the limit."""
        limit = self.settings.write_buffer_max_bytes
        for session in [s for s in self.sessions if s.write_buffer_bytes() > limit]:
            session.close_too_slow()

    # --- heartbeat and presence ----------------------------------------------------------
    async def _heartbeat_once(self) -> None:
        await self.rooms.node_beat(self.id, int(self.settings.node_ttl_s * 1000))

    async def _heartbeat_forever(self) -> None:
        # Three beats per TTL: one lost beat never makes a live node look dead.
        while True:
            await pause(self.settings.node_ttl_s / 3)
            try:
                await self._heartbeat_once()
            except (RedisError, OSError) as exc:
                reraise_if_cancelled(exc)
                log.warning("node heartbeat failed: %s", exc)

    async def _presence_forever(self) -> None:
        while True:
            await pause(self.settings.presence_interval_s)
            try:
                await self._presence_tick()
            except (RedisError, OSError) as exc:
                reraise_if_cancelled(exc)
                log.warning("presence update failed: %s", exc)

    async def _presence_tick(self) -> None:
        dirty, self._presence_local_dirty = self._presence_local_dirty, set()
        for room in dirty:
            try:
                await self.rooms.publish_presence_changed(room, self.id, self.hub.count(room))
            except (RedisError, OSError):
                self._presence_local_dirty.add(room)
                raise
        stale = [room for room in self._presence_stale if self.hub.count(room)]
        self._presence_stale.clear()
        if not stale:
            return
        for room, viewers in zip(stale, await self.rooms.viewers(stale), strict=True):
            if self._presence_sent.get(room) != viewers:
                self._presence_sent[room] = viewers
                frame = orjson.dumps(events.presence_event(room, viewers))
                self.hub.deliver_transient(room, frame)


def _misplaced(message: bus.Message, where: str) -> None:
    """A well-formed payload of a kind that channel does not carry."""
    log.warning("dropped a %s payload on %s", type(message).__name__, where)
