"""The token economy's hot path: every movement is one Lua script in Redis.

Accounts: a user's is ``u:<user id>``; the system's are ``sys:mint`` (source
of every issued token, the only account that goes below zero),
``sys:payouts`` and ``sys:fees``. A script refuses to touch a balance that is
not loaded (``NOT_LOADED``): this module then loads it from Postgres, behind
the epoch fence of ``load_balance.lua``, and runs the script again. Loading an
account also restores the idempotency records of the recent transactions
that debited it, so a key retried after Redis lost its data is still
answered as a duplicate instead of being charged again.

Idempotency keys belong to an initiator, named in one namespace of its own:
``u:<user id>`` for a user (their spends over the WebSocket, an admin's HTTP
credits and refunds), ``sys:<name>`` for the system (``sys:payments``,
``sys:dev``). No user id can name a system initiator, so no user can take a
key that a purchase needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import asyncpg
import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from tokenchat.protocol import events
from tokenchat.protocol.limits import MENU_ITEMS_MAX, SHOW_ID_RE

from .. import redis_client
from ..catalog.directory import AbsentUsers
from ..config import Settings
from ..errors import (
    Conflict,
    Forbidden,
    NotFound,
    Unavailable,
)
from ..keys import Keys, glob_escape
from ..ledger.confirmations import Confirmations
from .actions import (
    ACTIONS,
    BY_KIND,
    CLAWBACK,
    COMMON_ARGS,
    COMMON_KEYS,
    CREDIT,
    DM,
    ESCROW_REFUND,
    GOAL_REFUND,
    HOLD,
    METER,
    PAYOUT,
    REFUND,
    REFUNDABLE_KINDS,
    RELEASE,
    TICKET,
    TICKET_REFUND,
    TIP,
    TIP_ITEM,
    UNLOCK,
    Action,
    Delivery,
    refusal_error,
)
from .batcher import LuaScript, ScriptBatcher
from .limits import SpendLimits
from .scripts import history_trim, lua_script

if TYPE_CHECKING:
    from ..catalog.media import MediaCatalog

log = logging.getLogger(__name__)

MINT = "sys:mint"
# Where approved payouts go: tokens that left the platform as money.
PAYOUTS = "sys:payouts"
# The system's initiators: purchases, and the `tokenchat dev` seed.
PAYMENTS_INITIATOR = "sys:payments"
DEV_INITIATOR = "sys:dev"
# Where a deleted account's balance goes (ledger kind `forfeit`, migration 0019).
FORFEITED = "sys:forfeited"
IDEMPOTENCY_WINDOW_MS = 24 * 3600 * 1000  # the contract's 24 hours
# Loads per call before giving up: one per hot key a script may find missing
# (a menu tip: the menu, both balances, the room's goal, an all-or-nothing
# goal's escrow and the fan's limits with their counters, one load), plus one
# for a Redis reset racing the load, plus one for a tip learning its room's
# goal escrow (GOAL_ESCROW).
LOAD_ATTEMPTS_MAX = 8
# Rooms whose all-or-nothing goal escrow a process remembers (a key of
# about 60 bytes each, so at most about 1 MB): a room it forgot costs its
# next tip one more script call (GOAL_ESCROW), nothing else.
GOAL_ESCROWS_CACHED_MAX = 10_000
# Idempotency records restored per account load. An account debited more
# often than this in 24 hours keeps only its newest records across a Redis
# reset (the mint, with one debit per purchase, is the account that could).
RESTORED_RECORDS_MAX = 50_000
# A refund marker outlives any retry of the refund (the durable guard is the
# unique `reverses` column in Postgres).
REFUND_MARKER_TTL_S = 30 * 24 * 3600
# The epoch while hot balances are rebuilt from the ledger: loads and spends
# are refused until a fresh epoch replaces it.
REBUILDING = "rebuilding:"
# The rebuild lock outlives a rebuild (a drain of the outbox, at most
# REBUILD_DRAIN_TIMEOUT_S, plus deleting the balance keys); a rebuilder that
# died leaves it to expire, and the next process to check takes over.
REBUILD_LOCK_TTL_S = 120
REBUILD_DRAIN_TIMEOUT_S = 60.0
# Balance keys deleted per UNLINK while rebuilding: bounds one command.
REBUILD_UNLINK_CHUNK = 1000

Drain = Callable[[float], Awaitable[int]]


def user_account(user_id: str) -> str:
    return f"u:{user_id}"


def escrow_account(kind: str, subject: str) -> str:
    """The escrow account of one held object: ``esc:request:r_...``."""
    return f"esc:{kind}:{subject}"


def user_initiator(user_id: str) -> str:
    """The initiator of what a user asks for: the same name as their account."""
    return f"u:{user_id}"


def _check_initiator(initiator: str) -> None:
    # A programmer error, not an operating one: every caller names one of the two.
    assert initiator.startswith(("u:", "sys:")), f"un-namespaced initiator {initiator!r}"


def new_tx_id() -> str:
    return uuid.uuid4().hex


def fingerprint(kind: str, **fields: Any) -> str:
    """What makes two requests "the same" for idempotency (JSON: no newline)."""
    return orjson.dumps([kind, fields], option=orjson.OPT_SORT_KEYS).decode()


_DB_ERRORS = (asyncpg.PostgresError, OSError, asyncio.TimeoutError)
_REDIS_ERRORS = (RedisError, OSError)


class Economy:
    def __init__(
        self,
        redis: Redis,
        pool: asyncpg.Pool,
        keys: Keys,
        settings: Settings,
        confirmations: Confirmations | None = None,
        *,
        absent_users: AbsentUsers | None = None,
        media: MediaCatalog | None = None,
    ) -> None:
        self._redis = redis
        # Shared with the directory, which forgets a user here when it creates them.
        self._absent_users = AbsentUsers() if absent_users is None else absent_users
        self._pool = pool
        self._keys = keys
        self._settings = settings
        # Set in `ledger` durability: every spend waits for its ledger row.
        self._confirmations = confirmations
        self._batcher = ScriptBatcher(redis, settings.redis_timeout_s, on_reset=self._on_reset)
        # Whether this Redis dataset has been checked against the ledger since
        # this process started or last saw Redis restart (see ensure_fresh).
        self._fresh = False
        self._fresh_lock = asyncio.Lock()
        self._drain: Drain | None = None
        # The delivery mode (docs/economy.md, "Delivery relay"): `auto` is
        # resolved by resolve_delivery, once Redis says whether it is a
        # cluster; until then, and on a single Redis, `script`.
        self.delivery = "relay" if settings.delivery == "relay" else "script"
        self._scripts = {action.name: action.script_for(self.delivery) for action in ACTIONS}
        # Every room-event action's history trim (ROOM_EVENT_ARGS).
        self._history_trim = history_trim(settings.history_len, settings.history_age_s)
        self._load_script = lua_script("load_balance", retry_safe=True)
        # Reads only: a second run of the same call changes nothing.
        self._hello_read_script = lua_script("hello_read", retry_safe=True)
        # Locked media: the unlock script's media hash is loaded through it.
        self._media = media
        self._load_entitlements_script = lua_script("load_entitlements", retry_safe=True)
        # Both of its modes write a whole menu of a known version: a repeat
        # changes nothing.
        self._menu_script = lua_script("menu_cache", retry_safe=True)
        # Loads a ticket show's hash when a script finds it missing (set by
        # server/economy/shows.py: the show's row and tickets are its own).
        self.show_loader: Callable[[str], Awaitable[None]] | None = None
        # Loads a user's DM blocks when the dm script finds them missing (set
        # by server/catalog/dms.py, which owns the dm_blocks table).
        self.blocks_loader: Callable[[str], Awaitable[None]] | None = None
        # A user's tier for the events of their tips and DMs (set by the node
        # to its standing's TierCache: memory, at worst one Redis read).
        self.tier_of: Callable[[str], Awaitable[int]] = _tier_zero
        # Tip goals (server/economy/goals.py): loads a room's goal hash when
        # a tip finds it missing, and closes a goal in Postgres once a tip
        # reached it in Redis.
        self.goal_loader: Callable[[str], Awaitable[None]] | None = None
        # Relay mode: a ticket sold during its running show extended the
        # marker's {eco} mirror; this copies it onto the room's marker, which
        # chat lines check (set by server/economy/shows.py).
        self.ticket_granted: Callable[[str, str], Awaitable[None]] | None = None
        self.goal_reached: Callable[[str], Awaitable[None]] | None = None
        # A room's goal hash key -> the balance key of its all-or-nothing
        # goal's escrow, as tips learned it (GOAL_ESCROW): a tip declares
        # every key it writes, and only the hash names this one. Stale
        # entries are harmless: the script checks the key against the hash.
        self._goal_escrows: dict[str, str] = {}
        # Spending limits and self-exclusion: their rows, caches and counters.
        self.limits = SpendLimits(redis, pool, keys, settings, self)

    async def resolve_delivery(self) -> str:
        """Settle `auto` from the deployment: `relay` when Redis is a
        cluster (a room is another slot than the money), else `script`."""
        if self._settings.delivery == "auto":
            if redis_client.is_cluster(self._redis):  # TOKENCHAT_REDIS_CLUSTER
                self.set_delivery("relay")
            else:
                info: dict[str, Any] = await self._redis.info("cluster")
                self.set_delivery("relay" if info.get("cluster_enabled") else "script")
        return self.delivery

    def set_delivery(self, delivery: str) -> None:
        """Run the paid actions' scripts of delivery mode ``delivery``."""
        self.delivery = delivery
        self._scripts = {action.name: action.script_for(delivery) for action in ACTIONS}

    def _room_delivery_keys(self, room: str) -> dict[str, str]:
        """The keys a relayed action's delivery names (``delivery_keys``):
        the room's own, or in relay mode their {eco} stand-ins (the delivery
        stream for the history, the show marker's mirror, and for the
        channel, which script mode SPUBLISHes on and so declares as a key,
        the delivery stream again: relay mode publishes nothing, the relay
        does, in the room's slot)."""
        if self.delivery == "relay":
            return {
                "history": self._keys.deliveries(),
                "room_show": self._keys.room_show_mirror(room),
                "room_channel": self._keys.deliveries(),
            }
        return {
            "history": self._keys.room_history(room),
            "room_show": self._keys.room_show(room),
            "room_channel": self._keys.room_channel(room),
        }

    # --- reads --------------------------------------------------------------------
    async def balance(self, user_id: str) -> int:
        """The user's balance, loading it from Postgres when Redis lacks it."""
        account = user_account(user_id)
        key = self._keys.balance(account)
        for _ in range(LOAD_ATTEMPTS_MAX):
            try:
                value = await self._redis.get(key)
            except _REDIS_ERRORS as exc:
                raise Unavailable("balances are unavailable") from exc
            if value is not None:
                return int(value)
            await self._load(account)
        raise Unavailable("the balance could not be loaded")

    async def hello_state(self, user_ids: list[str], inbox_len: int) -> list[HelloState]:
        """What a batch of hellos reads (``hello_read.lua``: one call for
        all), with what Redis lacked loaded from Postgres side by side: each
        missing balance through the fenced ``load_balance`` (as ``balance``),
        each missing limits hash and counters through ``limits_load`` (in
        ``SpendLimits.cached``). Raises ``Unavailable``."""
        if not user_ids:
            return []
        keys: list[str] = []
        for user_id in user_ids:
            keys += [
                self._keys.balance(user_account(user_id)),
                self._keys.limits(user_id),
                self._keys.spent(user_id),
                self._keys.inbox(user_id),
                self._keys.inbox_cursor(user_id),
            ]
        try:
            rows = await self._batcher.call(self._hello_read_script, keys, [inbox_len])
        except (TimeoutError, *_REDIS_ERRORS) as exc:
            raise Unavailable("balances are unavailable") from exc

        async def completed(user_id: str, row: list[Any]) -> HelloState:
            balance, version, minutes, spent, dms, cursor = row
            if version is None or spent is None:
                limits, counters = await self.limits.cached(user_id, "rc")
                minutes, spent = limits[1], counters[0]
            return HelloState(
                int(balance) if balance is not None else await self.balance(user_id),
                int(spent),
                None if minutes is None else int(minutes),
                [(offset, event) for offset, event in dms],
                cursor or None,
            )

        # Loaded side by side (first hellos, or after a Redis reset): one
        # after another, a batch would take as long as all its hellos did.
        pairs = zip(user_ids, rows, strict=True)
        return list(await asyncio.gather(*(completed(u, row) for u, row in pairs)))

    # --- spends: one method per paid action (actions.py), naming its keys and args ----
    async def tip(
        self, user_id: str, room: str, owner: str, amount: int, text: str, key: str, tip_min: int
    ) -> dict[str, Any]:
        if user_id == owner:
            raise Forbidden("you cannot tip your own room")
        payer, payee = user_account(user_id), user_account(owner)
        tx = new_tx_id()  # named in the event too
        reply = await self._run(
            TIP,
            tx=tx,
            initiator=user_initiator(user_id),
            key=key,
            request=fingerprint("tip", room=room, amount=amount, text=text),
            meta={"room": room},
            keys={
                "payer_balance": self._keys.balance(payer),
                "payee_balance": self._keys.balance(payee),
                **self._room_delivery_keys(room),
                "goal": self._keys.goal(room),
                "goal_escrow": self._goal_escrow(room),
                **self._gate_keys(user_id),
            },
            args={
                "amount": amount,
                "tip_min": tip_min,
                "payer": payer,
                "payee": payee,
                "room_channel": self._keys.room_channel(room),
                "event": orjson.dumps(
                    events.tip_event_body(
                        room, user_id, amount, text, await self.tier_of(user_id), tx
                    )
                ),
                "payee_channel": self._keys.user_channel(owner),
            },
        )
        await self._after_goal_tip(reply)
        return reply

    async def tip_item(
        self,
        user_id: str,
        room: str,
        owner: str,
        item: str,
        text: str,
        key: str,
        max_price: int | None,
    ) -> dict[str, Any]:
        """Tip the owner's menu item ``item`` at its current price."""
        if user_id == owner:
            raise Forbidden("you cannot tip your own room")
        payer, payee = user_account(user_id), user_account(owner)
        tx = new_tx_id()  # named in the event too
        reply = await self._run(
            TIP_ITEM,
            tx=tx,
            initiator=user_initiator(user_id),
            key=key,
            request=fingerprint("tip_item", room=room, item=item, text=text, max_price=max_price),
            meta={"room": room},  # the script adds `item` {id, label}
            keys={
                "payer_balance": self._keys.balance(payer),
                "payee_balance": self._keys.balance(payee),
                "menu": self._keys.menu(owner),
                **self._room_delivery_keys(room),
                "goal": self._keys.goal(room),
                "goal_escrow": self._goal_escrow(room),
                **self._gate_keys(user_id),
            },
            args={
                "item": item,
                "max_price": "" if max_price is None else max_price,
                "payer": payer,
                "payee": payee,
                "room_channel": self._keys.room_channel(room),
                "event": orjson.dumps(
                    events.item_tip_event_body(
                        room, user_id, text, item, await self.tier_of(user_id), tx
                    )
                ),
                "payee_channel": self._keys.user_channel(owner),
            },
        )
        await self._after_goal_tip(reply)
        return reply

    def _goal_escrow(self, room: str) -> str:
        """The balance key of the room's all-or-nothing goal escrow as last
        seen; while none is known, the goal's hash (a key in the same slot,
        which the script then neither reads nor writes as a balance)."""
        goal = self._keys.goal(room)
        return self._goal_escrows.get(goal, goal)

    def _learn_goal_escrow(self, action: Action, keys: list[Any], escrow_key: str) -> None:
        """GOAL_ESCROW: declare the escrow the goal hash names, for this call
        and the room's next tips."""
        goal = str(keys[action.all_keys.index("goal")])
        keys[action.all_keys.index("goal_escrow")] = escrow_key
        self._goal_escrows.pop(goal, None)
        if len(self._goal_escrows) >= GOAL_ESCROWS_CACHED_MAX:
            del self._goal_escrows[next(iter(self._goal_escrows))]  # the oldest
        self._goal_escrows[goal] = escrow_key

    async def _after_goal_tip(self, reply: dict[str, Any]) -> None:
        """A tip that reached its room's goal: the goal workflow closes it in
        Postgres and releases an all-or-nothing goal's escrow. Its failure
        does not fail the tip (the tip moved and was delivered): the
        sweeper's check of active goals (Goals.check_reached) finishes it."""
        goal = reply.get("goal")
        if not goal or goal.get("state") != "reached" or self.goal_reached is None:
            return
        try:
            await self.goal_reached(str(goal["id"]))
        except Exception as exc:
            log.warning("goal %s reached, not closed yet: %s", goal["id"], exc)

    async def dm(
        self,
        user_id: str,
        to: str,
        text: str,
        key: str,
        max_price: int | None,
        *,
        media: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        if user_id == to:
            raise Forbidden("you cannot message yourself")
        payer, payee = user_account(user_id), user_account(to)
        # The attached media is part of what the key names (its id: the
        # descriptor's price may change and a retry is still the same DM).
        fields: dict[str, Any] = {"to": to, "text": text, "max_price": max_price}
        if media is not None:
            fields["media"] = media["id"]
        return await self._run(
            DM,
            initiator=user_initiator(user_id),
            key=key,
            request=fingerprint("dm", **fields),
            meta={"to": to},
            keys={
                "payer_balance": self._keys.balance(payer),
                "payee_balance": self._keys.balance(payee),
                "prices": self._keys.prices(to),
                "inbox": self._keys.inbox(to),
                "blocks": self._keys.blocks(to),
                "dm_log": self._keys.dm_log(),
                **self._gate_keys(user_id),
            },
            args={
                "max_price": "" if max_price is None else max_price,
                "payer": payer,
                "payee": payee,
                # The script appends price, tx and ts: the closing brace goes.
                "event": orjson.dumps(
                    events.dm_event_body(user_id, text, media, await self.tier_of(user_id))
                )[:-1],
                "payee_channel": self._keys.user_channel(to),
                "inbox_len": self._settings.inbox_len,
                "sender": user_id,
                "recipient": to,
                "dm_log_max": self._settings.dm_log_entries_max,
            },
        )

    async def unlock(
        self, user_id: str, media_id: str, owner: str, key: str, max_price: int | None
    ) -> dict[str, Any]:
        """Buy access to locked media (``owner``'s, as the catalog has it):
        charged once per fan, ``already`` when owned, permanent until an
        admin refunds it."""
        payer, payee = user_account(user_id), user_account(owner)
        return await self._run(
            UNLOCK,
            initiator=user_initiator(user_id),
            key=key,
            request=fingerprint("unlock", media=media_id, max_price=max_price),
            meta={"media": media_id},
            keys={
                "payer_balance": self._keys.balance(payer),
                "payee_balance": self._keys.balance(payee),
                "media": self._keys.media(media_id),
                "entitlement": self._keys.entitlements(user_id),
                **self._gate_keys(user_id),
            },
            args={
                "max_price": "" if max_price is None else max_price,
                "payer": payer,
                "payee": payee,
                "media_id": media_id,
                "payee_channel": self._keys.user_channel(owner),
            },
        )

    async def entitled(self, user_id: str, media_id: str) -> bool:
        """Whether the user unlocked the media (and no refund revoked it):
        the Redis cache, loaded from the ledger when Redis lacks it."""
        key = self._keys.entitlements(user_id)
        for _ in range(LOAD_ATTEMPTS_MAX):
            try:
                async with self._redis.pipeline(transaction=True) as pipe:
                    pipe.exists(key)
                    pipe.hexists(key, media_id)
                    loaded, granted = await pipe.execute()
            except _REDIS_ERRORS as exc:
                raise Unavailable("entitlements are unavailable") from exc
            if loaded:
                return bool(granted)
            await self._load_entitlements(user_id)
        raise Unavailable("entitlements could not be loaded")

    async def _load_entitlements(self, user_id: str) -> None:
        """The user's unlocks that no refund reversed, from the ledger, into
        Redis behind the epoch fence (load_entitlements.lua)."""
        for _ in range(LOAD_ATTEMPTS_MAX):
            epoch = await self.epoch()
            try:
                rows = await self._pool.fetch(
                    """SELECT t.meta->>'media' AS media, t.id FROM ledger_transactions t
                       WHERE t.kind = 'unlock' AND t.initiator = $1
                         AND NOT EXISTS (SELECT 1 FROM ledger_transactions r
                                         WHERE r.reverses = t.id)""",
                    user_initiator(user_id),
                )
            except _DB_ERRORS as exc:
                raise Unavailable("the ledger is unavailable; nothing was charged") from exc
            args: list[Any] = [epoch]
            for row in rows:
                args += [row["media"], row["id"]]
            keys = [self._keys.epoch(), self._keys.entitlements(user_id)]
            result = _text(await self._call(self._load_entitlements_script, keys, args))
            if result in ("OK", "EXISTS"):
                return
            log.warning("Redis was reset while loading %s's unlocks; loading again", user_id)
        raise Unavailable("Redis keeps being reset; try again")

    async def credit(
        self,
        user_id: str,
        amount: int,
        *,
        initiator: str,
        key: str,
        kind: str = "credit",
        meta: dict[str, Any] | None = None,
        tx: str | None = None,
    ) -> dict[str, Any]:
        """Issue ``amount`` new tokens to the user (a purchase or a grant)."""
        _check_initiator(initiator)
        assert kind in CREDIT.kinds, f"a credit of kind {kind!r}"
        payee = user_account(user_id)
        return await self._run(
            CREDIT,
            initiator=initiator,
            key=key,
            request=fingerprint(kind, user=user_id, amount=amount),
            meta=meta or {},
            tx=tx,
            keys={
                "payer_balance": self._keys.balance(MINT),
                "payee_balance": self._keys.balance(payee),
                "payee_limits": self._keys.limits(user_id),
            },
            args={
                "amount": amount,
                "payer": MINT,
                "payee": payee,
                "kind": kind,
                "payee_channel": self._keys.user_channel(user_id),
            },
        )

    async def refund(self, tx: str, *, initiator: str, key: str) -> dict[str, Any]:
        """Reverse a refundable spend (REFUNDABLE_KINDS), once. The original
        must be in Postgres."""
        _check_initiator(initiator)
        try:
            payer, payee, amount, media = await self._original_spend(tx, initiator, key)
        except _Duplicate as duplicate:  # this very refund, already in the ledger
            return duplicate.reply
        # A refunded unlock is revoked: the fan paid nothing for it, so it is
        # not theirs (docs/economy.md, "Locked media").
        fan = payer.removeprefix("u:")
        return await self._run(
            REFUND,
            initiator=initiator,
            key=key,
            request=fingerprint("refund", tx=tx),
            meta={"reverses": tx},
            keys={
                "payer_balance": self._keys.balance(payer),
                "payee_balance": self._keys.balance(payee),
                "marker": self._keys.refunded(tx),
                "revoke": self._keys.entitlements(fan),
            },
            args={
                "amount": amount,
                "payer": payer,
                "payee": payee,
                "refunds": tx,
                "payer_channel": self._keys.user_channel(payer.removeprefix("u:")),
                "payee_channel": self._keys.user_channel(payee.removeprefix("u:")),
                "marker_ttl_s": REFUND_MARKER_TTL_S,
                "revoke_media": media or "",
            },
        )

    # --- escrow: one account per held object (actions.py, HOLD/RELEASE/ESCROW_REFUND) ---
    async def hold(
        self,
        user_id: str,
        escrow: str,
        amount: int,
        *,
        subject: str,
        key: str,
        request: str,
        meta: dict[str, Any],
        initiator: str | None = None,
    ) -> dict[str, Any]:
        """Move ``amount`` from the user into ``escrow`` (idempotent on the
        user's ``key``; ``request`` is the fingerprint of what they asked).
        The reply names ``subject``: the original one for a duplicate.
        ``initiator``: the key's owner when the system holds on the user's
        behalf (a private show's minimum, held when the model accepts)."""
        assert escrow.startswith("esc:"), escrow
        if initiator is not None:
            _check_initiator(initiator)
        payer = user_account(user_id)
        return await self._run(
            HOLD,
            initiator=initiator or user_initiator(user_id),
            key=key,
            request=request,
            meta={**meta, "escrow": escrow},
            keys={
                "payer_balance": self._keys.balance(payer),
                "escrow_balance": self._keys.balance(escrow),
                **self._gate_keys(user_id),
            },
            args={"amount": amount, "payer": payer, "escrow": escrow, "subject": subject},
        )

    async def release(
        self, escrow: str, user_id: str, *, initiator: str, key: str, meta: dict[str, Any]
    ) -> dict[str, Any]:
        """Move the escrow's whole balance to the user who earned it.
        ``Conflict`` (EMPTY) when it holds nothing: it moved already."""
        _check_initiator(initiator)
        payee = user_account(user_id)
        return await self._run(
            RELEASE,
            initiator=initiator,
            key=key,
            request=fingerprint("release", escrow=escrow, to=user_id),
            meta={**meta, "escrow": escrow},
            keys={
                "escrow_balance": self._keys.balance(escrow),
                "payee_balance": self._keys.balance(payee),
            },
            args={
                "escrow": escrow,
                "payee": payee,
                "payee_channel": self._keys.user_channel(user_id),
            },
        )

    async def escrow_refund(
        self, escrow: str, user_id: str, *, initiator: str, key: str, meta: dict[str, Any]
    ) -> dict[str, Any]:
        """Move the escrow's whole balance back to the user it came from.
        ``Conflict`` (EMPTY) when it holds nothing: it moved already."""
        _check_initiator(initiator)
        payer = user_account(user_id)
        return await self._run(
            ESCROW_REFUND,
            initiator=initiator,
            key=key,
            request=fingerprint("escrow_refund", escrow=escrow, to=user_id),
            meta={**meta, "escrow": escrow},
            keys={
                "escrow_balance": self._keys.balance(escrow),
                "payer_balance": self._keys.balance(payer),
            },
            args={
                "escrow": escrow,
                "payer": payer,
                "payer_channel": self._keys.user_channel(user_id),
            },
        )

    async def payout(
        self, escrow: str, *, initiator: str, key: str, meta: dict[str, Any]
    ) -> dict[str, Any]:
        """Move the escrow's whole balance to ``sys:payouts`` (an approved
        payout). ``EscrowEmpty`` when it holds nothing: it moved already."""
        _check_initiator(initiator)
        return await self._run(
            PAYOUT,
            initiator=initiator,
            key=key,
            request=fingerprint("payout", escrow=escrow),
            meta={**meta, "escrow": escrow},
            keys={
                "escrow_balance": self._keys.balance(escrow),
                "payouts_balance": self._keys.balance(PAYOUTS),
            },
            args={"escrow": escrow, "payouts": PAYOUTS},
        )

    async def meter(
        self,
        fan: str,
        escrow: str,
        model: str,
        amount: int,
        *,
        initiator: str,
        key: str,
        request: str,
        meta: dict[str, Any],
    ) -> dict[str, Any]:
        """Charge ``amount`` for a private show's period: from ``escrow``
        first, the rest from the fan, to the model (actions.METER)."""
        _check_initiator(initiator)
        payer, payee = user_account(fan), user_account(model)
        return await self._run(
            METER,
            initiator=initiator,
            key=key,
            request=request,
            meta={**meta, "escrow": escrow},
            keys={
                "payer_balance": self._keys.balance(payer),
                "escrow_balance": self._keys.balance(escrow),
                "payee_balance": self._keys.balance(payee),
                **self._gate_keys(fan),
            },
            args={
                "amount": amount,
                "payer": payer,
                "escrow": escrow,
                "payee": payee,
                "payer_channel": self._keys.user_channel(fan),
                "payee_channel": self._keys.user_channel(model),
            },
        )

    # --- ticket shows (server/economy/shows.py) -----------------------------------------
    async def ticket(self, user_id: str, room: str, show_id: str, key: str) -> dict[str, Any]:
        """A ticket to ``show_id`` of ``room``: its price into the show's
        escrow, recorded in the show's hash; ``already`` when the fan holds
        one (nothing charged). An id of another kind, or of a show of
        another room: NotFound."""
        if not SHOW_ID_RE.fullmatch(show_id):
            raise NotFound(f"no show '{show_id}'")
        if user_id == room:
            raise Forbidden("you cannot buy a ticket to your own show")
        payer, escrow = user_account(user_id), escrow_account("show", show_id)
        reply = await self._run(
            TICKET,
            initiator=user_initiator(user_id),
            key=key,
            request=fingerprint("buy_ticket", room=room, show=show_id),
            meta={"show": show_id, "room": room, "fan": user_id, "escrow": escrow},
            keys={
                "payer_balance": self._keys.balance(payer),
                "escrow_balance": self._keys.balance(escrow),
                "show": self._keys.show(show_id),
                "room_show": self._room_delivery_keys(room)["room_show"],
                **self._gate_keys(user_id),
            },
            args={"payer": payer, "escrow": escrow, "show": show_id, "room": room},
        )
        if self.delivery == "relay" and "tx" in reply and self.ticket_granted is not None:
            # Best effort: the sweep's restore_markers copies the mirror too.
            try:
                await self.ticket_granted(room, show_id)
            except Exception as exc:
                log.warning("ticket %s sold; room marker not updated yet: %s", reply["tx"], exc)
        return reply

    async def ticket_refund(
        self, show_id: str, user_id: str, *, initiator: str, key: str
    ) -> dict[str, Any]:
        """Give the user's ticket to ``show_id`` back from its escrow.
        ``EscrowEmpty`` when there is none left to refund."""
        _check_initiator(initiator)
        payer, escrow = user_account(user_id), escrow_account("show", show_id)
        return await self._run(
            TICKET_REFUND,
            initiator=initiator,
            key=key,
            request=fingerprint("ticket_refund", show=show_id, to=user_id),
            meta={"show": show_id, "fan": user_id, "escrow": escrow},
            keys={
                "show": self._keys.show(show_id),
                "escrow_balance": self._keys.balance(escrow),
                "payer_balance": self._keys.balance(payer),
            },
            args={
                "escrow": escrow,
                "payer": payer,
                "payer_channel": self._keys.user_channel(user_id),
            },
        )

    async def goal_refund(
        self, escrow: str, user_id: str, amount: int, *, initiator: str, key: str, goal: str
    ) -> dict[str, Any]:
        """Give ``amount`` of the user's held tips back from a goal's escrow
        (actions.GOAL_REFUND). ``EscrowEmpty`` when the escrow holds less."""
        _check_initiator(initiator)
        payer = user_account(user_id)
        return await self._run(
            GOAL_REFUND,
            initiator=initiator,
            key=key,
            # Not the amount: a retry reads it again and is the same refund.
            request=fingerprint("goal_refund", escrow=escrow, to=user_id),
            meta={"goal": goal, "fan": user_id, "escrow": escrow},
            keys={
                "escrow_balance": self._keys.balance(escrow),
                "payer_balance": self._keys.balance(payer),
            },
            args={
                "amount": amount,
                "escrow": escrow,
                "payer": payer,
                "payer_channel": self._keys.user_channel(user_id),
            },
        )

    async def escrow_balance(self, escrow: str) -> int:
        """An escrow account's balance, loading it from Postgres if needed."""
        key = self._keys.balance(escrow)
        for _ in range(LOAD_ATTEMPTS_MAX):
            try:
                value = await self._redis.get(key)
            except _REDIS_ERRORS as exc:
                raise Unavailable("balances are unavailable") from exc
            if value is not None:
                return int(value)
            await self._load(escrow)
        raise Unavailable("the balance could not be loaded")

    async def _original_spend(
        self, tx: str, initiator: str, key: str
    ) -> tuple[str, str, int, str | None]:
        """Payer, payee and amount of a spend that may be refunded now, and
        the media an unlock granted (None for other kinds)."""
        try:
            async with self._pool.acquire() as conn:
                row = await conn.fetchrow(
                    """SELECT t.kind, t.meta->>'media' AS media, r.id AS refund,
                              r.initiator AS refund_initiator,
                              r.idem_key AS refund_key, r.reply::text AS refund_reply
                       FROM ledger_transactions t
                       LEFT JOIN ledger_transactions r ON r.reverses = t.id
                       WHERE t.id = $1""",
                    tx,
                )
                postings = await conn.fetch(
                    "SELECT account_id, amount FROM ledger_postings WHERE tx_id = $1", tx
                )
        except _DB_ERRORS as exc:
            raise Unavailable("the ledger is unavailable") from exc
        if row is None:
            raise NotFound(f"no transaction '{tx}' in the ledger (yet)")
        if row["kind"] == "refund":
            raise Conflict("a refund cannot be refunded")
        if row["kind"] not in REFUNDABLE_KINDS:
            raise Conflict(f"a {row['kind']} is not a spend and cannot be refunded")
        if row["refund"] is not None:
            if (row["refund_initiator"], row["refund_key"]) == (initiator, key):
                raise _Duplicate({**orjson.loads(row["refund_reply"]), "duplicate": True})
            raise Conflict(f"transaction '{tx}' was refunded already by '{row['refund']}'")
        debits = [p for p in postings if p["amount"] < 0]
        credits = [p for p in postings if p["amount"] > 0]
        if any(p["account_id"].startswith("esc:") for p in credits):
            # A tip held for an all-or-nothing goal: the goal refunds it.
            raise Conflict(f"transaction '{tx}' is held in escrow; its goal refunds it")
        if len(debits) != 1 or len(credits) != 1:
            raise Conflict(f"transaction '{tx}' has {len(postings)} postings; refund it by hand")
        # What the spend granted goes with its refund (its kind's declaration).
        media = row["media"] if BY_KIND[row["kind"]].grants == "media" else None
        return debits[0]["account_id"], credits[0]["account_id"], credits[0]["amount"], media

    # --- prices -------------------------------------------------------------------
    async def set_prices(self, user_id: str, dm: int | None, tip_min: int | None) -> dict[str, int]:
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                if dm is not None:
                    await conn.execute(
                        """INSERT INTO prices (model_id, dm) VALUES ($1, $2)
                           ON CONFLICT (model_id) DO UPDATE SET dm = $2, updated_at = now()""",
                        user_id,
                        dm,
                    )
                if tip_min is not None:
                    await conn.execute(
                        "UPDATE rooms SET tip_min = $2 WHERE id = $1", user_id, tip_min
                    )
                row = await conn.fetchrow(
                    """SELECT coalesce(p.dm, 0) AS dm, r.tip_min
                       FROM rooms r LEFT JOIN prices p ON p.model_id = r.id WHERE r.id = $1""",
                    user_id,
                )
        except _DB_ERRORS as exc:
            raise Unavailable("prices are unavailable") from exc
        if row is None:
            raise NotFound("no room for this user")
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.hset(self._keys.prices(user_id), "dm", row["dm"])
                pipe.hset(self._keys.room_info(user_id), "tip_min", row["tip_min"])
                await pipe.execute()
        except _REDIS_ERRORS as exc:
            # Postgres has the new prices; the caches must not keep the old ones.
            await self._drop_price_caches(user_id)
            raise Unavailable("prices were saved but the cache is unavailable") from exc
        return {"dm": row["dm"], "tip_min": row["tip_min"]}

    async def _drop_price_caches(self, user_id: str) -> None:
        try:
            await self._redis.delete(self._keys.prices(user_id), self._keys.room_info(user_id))
        except _REDIS_ERRORS:
            log.error("stale price cache for %s: Redis unreachable", user_id)

    async def dm_price(self, user_id: str) -> int:
        """What a DM to the user costs now: the price the dm script charges."""
        for _ in range(2):
            try:
                cached = await self._redis.hget(self._keys.prices(user_id), "dm")  # type: ignore[misc]
            except _REDIS_ERRORS as exc:
                raise Unavailable("prices are unavailable") from exc
            if cached is not None:
                return int(cached)
            await self._load_prices(user_id)
        raise Unavailable("prices could not be loaded")

    async def _load_prices(self, user_id: str) -> None:
        if user_id in self._absent_users:
            raise NotFound(f"no user '{user_id}'")
        try:
            row = await self._pool.fetchrow(
                """SELECT coalesce(p.dm, 0) AS dm FROM users u
                   LEFT JOIN prices p ON p.model_id = u.id WHERE u.id = $1""",
                user_id,
            )
        except _DB_ERRORS as exc:
            raise Unavailable("prices are unavailable") from exc
        if row is None:
            self._absent_users.add(user_id)
            raise NotFound(f"no user '{user_id}'")
        # HSETNX: a price update racing this load wins over the older value read here.
        await self._redis.hsetnx(self._keys.prices(user_id), "dm", row["dm"])

    # --- tip menus ------------------------------------------------------------------
    async def set_menu(self, user_id: str, items: list[MenuItem]) -> list[dict[str, Any]]:
        """Replace the model's menu: items naming an id keep it (it must be
        on her menu: NotFound otherwise), the others get new ids. Postgres
        first, then the cache, which is dropped if it cannot be replaced."""
        assert len(items) <= MENU_ITEMS_MAX  # checked with the request
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                # The menus row is the lock: saves of one menu run one at a time.
                version = await conn.fetchval(
                    """INSERT INTO menus (model_id, version) VALUES ($1, 1)
                       ON CONFLICT (model_id) DO UPDATE
                       SET version = menus.version + 1, updated_at = now()
                       RETURNING version""",
                    user_id,
                )
                current = {
                    r["id"]
                    for r in await conn.fetch(
                        "SELECT id FROM menu_items WHERE model_id = $1", user_id
                    )
                }
                for item in items:
                    if item.id is not None and item.id not in current:
                        raise NotFound(f"no item '{item.id}' on your menu")
                saved = [
                    {"id": item.id or new_item_id(), "label": item.label, "price": item.price}
                    for item in items
                ]
                await conn.execute("DELETE FROM menu_items WHERE model_id = $1", user_id)
                await conn.executemany(
                    """INSERT INTO menu_items (id, model_id, label, price, position)
                       VALUES ($1, $2, $3, $4, $5)""",
                    [(i["id"], user_id, i["label"], i["price"], n) for n, i in enumerate(saved)],
                )
        except _DB_ERRORS as exc:
            raise Unavailable("menus are unavailable; the menu was not saved") from exc
        try:
            await self._write_menu("replace", user_id, int(version), saved)
        except Unavailable:
            # Postgres has the new menu; the cache must not keep the old one.
            try:
                await self._redis.delete(self._keys.menu(user_id))
            except _REDIS_ERRORS:
                log.error("stale menu cache for %s: Redis unreachable", user_id)
            raise Unavailable("the menu was saved but the cache is unavailable") from None
        return saved

    async def menu(self, user_id: str) -> list[dict[str, Any]]:
        """The user's menu as the tip_item script sees it (loaded on a miss);
        NotFound for a user who does not exist."""
        for _ in range(2):
            try:
                cached: dict[Any, Any] = await self._redis.hgetall(  # type: ignore[misc]
                    self._keys.menu(user_id)
                )
            except _REDIS_ERRORS as exc:
                raise Unavailable("menus are unavailable") from exc
            if cached:
                return [
                    {
                        "id": item_id,
                        "label": cached[f"l:{item_id}".encode()].decode(),
                        "price": int(cached[f"p:{item_id}".encode()]),
                    }
                    for item_id in cached[b"order"].decode().split()
                ]
            await self._load_menu(user_id)
        raise Unavailable("the menu could not be loaded")

    async def _load_menu(self, user_id: str) -> None:
        """Fill the menu cache from Postgres (a user with no menu gets an
        empty one, so the script can tell "no item" from "not loaded")."""
        if user_id in self._absent_users:
            raise NotFound(f"no user '{user_id}'")
        epoch = await self.epoch()  # before reading Postgres: the load's fence
        try:
            async with self._pool.acquire() as conn:
                row = await conn.fetchrow(
                    """SELECT u.id, coalesce(m.version, 0) AS version FROM users u
                       LEFT JOIN menus m ON m.model_id = u.id WHERE u.id = $1""",
                    user_id,
                )
                rows = await conn.fetch(
                    """SELECT id, label, price FROM menu_items WHERE model_id = $1
                       ORDER BY position""",
                    user_id,
                )
        except _DB_ERRORS as exc:
            raise Unavailable("menus are unavailable; nothing was charged") from exc
        if row is None:
            self._absent_users.add(user_id)
            raise NotFound(f"no user '{user_id}'")
        items = [{"id": r["id"], "label": r["label"], "price": r["price"]} for r in rows]
        # 'EPOCH' (Redis reset meanwhile) writes nothing: the caller's next
        # try finds the menu missing and loads it again.
        await self._write_menu("load", user_id, int(row["version"]), items, epoch)

    async def _write_menu(
        self,
        mode: str,
        user_id: str,
        version: int,
        items: list[dict[str, Any]],
        epoch: str = "",
    ) -> str:
        """menu_cache.lua: 'OK', 'KEPT' or 'EPOCH'."""
        args: list[Any] = [mode, version, epoch, " ".join(i["id"] for i in items)]
        for item in items:
            args += [f"p:{item['id']}", item["price"], f"l:{item['id']}", item["label"]]
        keys = [self._keys.menu(user_id), self._keys.epoch()]
        return _text(await self._call(self._menu_script, keys, args))

    def _gate_keys(self, user_id: str) -> dict[str, str]:
        """The keys a limited spend (Action.limited) passes to user_gate."""
        return {
            "payer_limits": self._keys.limits(user_id),
            "payer_spent": self._keys.spent(user_id),
        }

    # --- payments and accounts (actions.py, CLAWBACK; server/http/accounts.py) ------
    async def clawback(
        self,
        user_id: str,
        amount: int,
        *,
        kind: str,
        initiator: str,
        key: str,
        meta: dict[str, Any],
    ) -> dict[str, Any]:
        """Take back up to ``amount`` tokens from the user, at most what the
        user holds: ``chargeback`` into the mint (a purchase reversed) or
        ``forfeit`` into sys:forfeited (a deleted account). The reply's
        ``clawed`` and ``shortfall`` say how much was taken and how much was
        spent already."""
        _check_initiator(initiator)
        assert kind in CLAWBACK.kinds, f"a clawback of kind {kind!r}"
        sink = MINT if kind == "chargeback" else FORFEITED
        account = user_account(user_id)
        return await self._run(
            CLAWBACK,
            initiator=initiator,
            key=key,
            request=fingerprint(kind, user=user_id, amount=amount),
            meta=meta,
            keys={
                "user_balance": self._keys.balance(account),
                "sink_balance": self._keys.balance(sink),
            },
            args={
                "amount": amount,
                "user": account,
                "sink": sink,
                "kind": kind,
                "user_channel": self._keys.user_channel(user_id),
            },
        )

    # --- running scripts ---------------------------------------------------------------
    async def _run(
        self,
        action: Action,
        *,
        initiator: str,
        key: str,
        request: str,
        meta: dict[str, Any],
        keys: dict[str, Any],
        args: dict[str, Any],
        tx: str | None = None,
    ) -> dict[str, Any]:
        """Apply a paid action's script with its own ``keys`` and ``args``
        (the common ones are filled here); in `ledger` durability, return
        once its ledger row is committed."""
        tx = tx or new_tx_id()
        # The common names are the runner's alone to fill.
        assert keys.keys().isdisjoint(COMMON_KEYS) and args.keys().isdisjoint(COMMON_ARGS)
        assert args.keys().isdisjoint(action.delivery_args)
        keys["idem"] = self._keys.idempotency(initiator, key)
        keys["outbox"] = self._keys.outbox()
        args.update(
            request=request,
            tx=tx,
            outbox_max=self._settings.outbox_entries_max,
            initiator=initiator,
            key=key,
            meta=orjson.dumps(meta),
        )
        if action.delivery is Delivery.ROOM_EVENT:
            args.update(self._history_trim)
        script_keys, script_args = action.call(keys, args)
        confirmations = self._confirmations
        if confirmations is None:
            return await self._apply(action, script_keys, script_args)
        committed = confirmations.expect(tx)
        try:
            reply = await self._apply(action, script_keys, script_args)
            if not action.ledgered(reply):
                return reply
            if not reply.get("duplicate"):
                await confirmations.wait(tx, committed, known_before=False)
                return reply
        finally:
            confirmations.forget(tx, committed)
        # A duplicate waits for the original's row too: a retry must not get
        # an acknowledgement the original could not have had yet.
        original = str(reply["tx"])
        await confirmations.wait(original, confirmations.expect(original), known_before=True)
        return reply

    async def _apply(self, action: Action, keys: list[Any], args: list[Any]) -> dict[str, Any]:
        """Run a paid action's script in Redis, loading what it needs from Postgres."""
        if not self._fresh:
            await self.ensure_fresh()
        script = self._scripts[action.name]
        for _ in range(LOAD_ATTEMPTS_MAX):
            result = await self._call(script, keys, args)
            status = _text(result[0])
            if status == "OK":
                reply: dict[str, Any] = orjson.loads(result[1])
                return reply
            if status == "DUP":
                return {**orjson.loads(result[1]), "duplicate": True}
            if status == "GOAL_ESCROW":  # tips: no write happened; again with its key
                self._learn_goal_escrow(action, keys, _text(result[1]))
                continue
            if status != "NOT_LOADED":
                raise refusal_error(action, status, _text(result[1]) if len(result) > 1 else "")
            missing = _text(result[1])
            if missing.startswith(self._keys.goal_prefix()) and self.goal_loader is not None:
                await self.goal_loader(missing[len(self._keys.goal_prefix()) :])
            elif missing.startswith(self._keys.show_prefix()) and self.show_loader is not None:
                await self.show_loader(missing[len(self._keys.show_prefix()) :])
            elif missing.startswith(self._keys.balance_prefix()):
                await self._load(missing[len(self._keys.balance_prefix()) :])
            elif missing.startswith(self._keys.media_prefix()) and self._media is not None:
                await self._media.load(missing[len(self._keys.media_prefix()) :])
            elif missing.startswith(self._keys.entitlements_prefix()):
                await self._load_entitlements(missing[len(self._keys.entitlements_prefix()) :])
            elif missing.startswith(self._keys.blocks_prefix()) and self.blocks_loader is not None:
                await self.blocks_loader(missing[len(self._keys.blocks_prefix()) :])
            elif missing.startswith(self._keys.limits_prefix()):
                await self.limits.load(missing[len(self._keys.limits_prefix()) :])
            elif missing.startswith(self._keys.spent_prefix()):
                await self.limits.load(missing[len(self._keys.spent_prefix()) :])
            elif missing.startswith(self._keys.menu("")):
                await self._load_menu(missing[len(self._keys.menu("")) :])
            else:
                await self._load_prices(missing[len(self._keys.prices("")) :])
        raise Unavailable("balances could not be loaded; nothing was charged")

    async def _call(self, script: LuaScript, keys: list[Any], args: list[Any]) -> list[Any]:
        try:
            result: list[Any] = await self._batcher.call(script, keys, args)
        except TimeoutError as exc:
            raise Unavailable(
                "Redis did not answer in time; the outcome is unknown: retry with the same key"
            ) from exc
        except _REDIS_ERRORS as exc:
            raise Unavailable("balances are unavailable; nothing was charged") from exc
        return result

    # --- a Redis older than the ledger --------------------------------------------------
    def rebuild_with(self, drain: Drain) -> None:
        """How a rebuild empties the outbox into Postgres (the ledger writer's drain)."""
        self._drain = drain

    async def _on_reset(self) -> None:
        # Redis dropped the connection or forgot its scripts: it may have
        # restarted from an older copy of its data (AOF everysec, a lagging
        # replica promoted). Nothing is sent again until that is ruled out.
        self._fresh = False
        await self.ensure_fresh()

    async def ensure_fresh(self) -> None:
        """Refuse to spend on a Redis that is older than the ledger.

        The ledger writer records, per epoch, the newest outbox entry it has
        committed (ledger_watermarks). A Redis whose outbox has not reached
        that entry has gone back in time with its epoch unchanged: its hot
        balances miss spends that Postgres holds, and would let them be spent
        again. Its balances are then rebuilt from Postgres (``_rebuild``)
        before any spend runs. Checked once per process start and after every
        sign of a Redis restart, not per spend.
        """
        if self._fresh:
            return
        async with self._fresh_lock:
            if self._fresh:
                return
            if await self.behind_ledger():
                await self._rebuild()
            self._fresh = True

    async def behind_ledger(self) -> bool:
        """Whether this Redis dataset is older than what the ledger holds of it."""
        try:
            epoch = await self._redis.get(self._keys.epoch())
            if epoch is None:
                return False  # lost everything: a new epoch, loaded from scratch
            if _text(epoch).startswith(REBUILDING):
                return True  # a rebuild that has not finished (its process died?)
            last = await self._last_generated_id()
            row = await self._pool.fetchrow(
                """SELECT last_ms, last_seq FROM ledger_watermarks WHERE epoch = $1
                   ORDER BY last_ms DESC, last_seq DESC LIMIT 1""",
                _text(epoch),
            )
        except (*_REDIS_ERRORS, *_DB_ERRORS) as exc:
            raise Unavailable("cannot check Redis against the ledger; nothing was charged") from exc
        if row is None:
            return False
        behind = last < (row["last_ms"], row["last_seq"])
        if behind:
            log.error(
                "Redis is older than the ledger: its outbox ends at %d-%d, the ledger "
                "holds %d-%d of this epoch; rebuilding hot balances from Postgres",
                *last,
                row["last_ms"],
                row["last_seq"],
            )
        return behind

    async def _last_generated_id(self) -> tuple[int, int]:
        try:
            info: Any = await self._redis.xinfo_stream(self._keys.outbox())
        except ResponseError as exc:
            if "no such key" in str(exc).lower():
                return (0, 0)
            raise
        ms, _, seq = _text(info["last-generated-id"]).partition("-")
        return (int(ms), int(seq))

    async def _rebuild(self) -> None:
        """Drop every hot balance and reload from Postgres, behind a new epoch.

        Under a lock, the epoch becomes ``rebuilding:...`` (loads and spends
        are refused), every balance key goes, the outbox is drained into
        Postgres (what this older Redis applied but the ledger lacks), and a
        fresh epoch lets balances load again, each with its idempotency
        records, from Postgres.
        """
        if self._drain is None:
            raise Unavailable("Redis is older than the ledger; nothing was charged")
        token = secrets.token_hex(8)
        lock = self._keys.rebuild_lock()
        try:
            if not await self._redis.set(lock, token, nx=True, ex=REBUILD_LOCK_TTL_S):
                raise Unavailable("hot balances are being rebuilt from the ledger; try again")
            await self._redis.set(self._keys.epoch(), REBUILDING + token)
            # Balances, the unlocks an older Redis may lack (a fan would be
            # charged again for media the ledger says is theirs), and the menu
            # caches (a removed item would be tippable again, at an old price).
            hot_prefixes = (
                self._keys.balance_prefix(),
                self._keys.entitlements_prefix(),
                self._keys.menu(""),
                self._keys.goal_prefix(),  # a goal's progress, counted by tips
                # DM blocks: an older Redis may lack a block Postgres holds.
                self._keys.blocks_prefix(),
                # Spending counters an older Redis has behind the ledger
                # would let a fan past her limits; her limits reload too.
                self._keys.spent_prefix(),
                self._keys.limits_prefix(),
            )
            for hot in hot_prefixes:
                await self._unlink_matching(glob_escape(hot) + "*")
            left = await self._drain(REBUILD_DRAIN_TIMEOUT_S)
            if left:
                raise Unavailable(f"rebuilding: {left} outbox entries are not in Postgres yet")
            await self._redis.set(self._keys.epoch(), secrets.token_hex(16))
            log.warning("hot balances rebuilt: they load from Postgres from now on")
        except _REDIS_ERRORS as exc:
            raise Unavailable("Redis failed while rebuilding balances; try again") from exc
        finally:
            with contextlib.suppress(*_REDIS_ERRORS):
                if _text(await self._redis.get(lock) or b"") == token:
                    await self._redis.delete(lock)

    async def _unlink_matching(self, pattern: str) -> None:
        chunk: list[bytes] = []
        async for name in self._redis.scan_iter(match=pattern, count=1000):
            chunk.append(name)
            if len(chunk) >= REBUILD_UNLINK_CHUNK:
                await self._redis.unlink(*chunk)
                chunk = []
        if chunk:
            await self._redis.unlink(*chunk)

    # --- loading balances -------------------------------------------------------------
    async def epoch(self, *, rebuilding_ok: bool = False) -> str:
        """The token of the current Redis dataset, made if Redis has none.

        While balances are rebuilt it is refused (Unavailable), except to the
        ledger writer (``rebuilding_ok``), which drains the outbox meanwhile.
        """
        key = self._keys.epoch()
        try:
            await self._redis.set(key, secrets.token_hex(16), nx=True)
            value = await self._redis.get(key)
        except _REDIS_ERRORS as exc:
            raise Unavailable("balances are unavailable") from exc
        if value is None:  # flushed between the two calls
            raise Unavailable("Redis was reset; try again")
        epoch = _text(value)
        if epoch.startswith(REBUILDING) and not rebuilding_ok:
            self._fresh = False
            raise Unavailable("hot balances are being rebuilt from the ledger; try again")
        return epoch

    async def _load(self, account: str) -> None:
        for _ in range(LOAD_ATTEMPTS_MAX):
            epoch = await self.epoch()
            balance, records = await self._read_account(account)
            keys = [self._keys.epoch(), self._keys.balance(account)]
            args: list[Any] = [epoch, balance]
            now_ms = int(time.time() * 1000)
            for initiator, idem_key, record, applied_ms in records:
                keys.append(self._keys.idempotency(initiator, idem_key))
                args += [record, max(0, (applied_ms + IDEMPOTENCY_WINDOW_MS - now_ms) // 1000)]
            result = _text(await self._call(self._load_script, keys, args))
            if result in ("OK", "EXISTS"):
                return
            log.warning("Redis was reset while loading %s; loading again", account)
        raise Unavailable("Redis keeps being reset; try again")

    async def _read_account(self, account: str) -> tuple[int, list[tuple[str, str, str, int]]]:
        since_ms = int(time.time() * 1000) - IDEMPOTENCY_WINDOW_MS
        try:
            async with self._pool.acquire() as conn:
                balance = await conn.fetchval("SELECT balance FROM accounts WHERE id = $1", account)
                rows = await conn.fetch(
                    """SELECT t.initiator, t.idem_key, t.request, t.reply::text AS reply,
                              t.applied_ms
                       FROM ledger_postings p JOIN ledger_transactions t ON t.id = p.tx_id
                       WHERE p.account_id = $1 AND p.amount < 0 AND t.applied_ms > $2
                       ORDER BY t.applied_ms DESC LIMIT $3""",
                    account,
                    since_ms,
                    RESTORED_RECORDS_MAX,
                )
        except _DB_ERRORS as exc:
            raise Unavailable("the ledger is unavailable; nothing was charged") from exc
        records = [
            (r["initiator"], r["idem_key"], f"{r['request']}\n{r['reply']}", r["applied_ms"])
            for r in rows
        ]
        # An account with no row has no postings: zero is its true balance.
        return int(balance or 0), records


async def _tier_zero(user_id: str) -> int:
    """Without standing (an Economy of its own, as in tools): tier 0."""
    return 0


def new_item_id() -> str:
    """A menu item's id: `i_` and 16 hex digits (limits.ITEM_ID_RE)."""
    return "i_" + secrets.token_hex(8)


@dataclass(frozen=True, slots=True)
class MenuItem:
    """One item of a menu being saved, checked by the HTTP layer; ``id``
    None for a new item."""

    id: str | None
    label: str
    price: int


class _Duplicate(Exception):
    def __init__(self, reply: dict[str, Any]) -> None:
        self.reply = reply


@dataclass(frozen=True, slots=True)
class HelloState:
    """What one hello of a batch read, as its session opened."""

    balance: int
    # Her counters' total (`t`): the baseline of her reality checks.
    spent_total: int
    # Her reality-check period in minutes; None: off.
    reality_check_min: int | None
    # (offset, event JSON) of the DMs stored since her inbox cursor.
    stored_dms: list[tuple[bytes, bytes]]
    # The cursor: the last DM delivered to one of her sessions; None: none.
    inbox_cursor: bytes | None = None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
