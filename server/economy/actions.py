"""The paid-action registry: one declaration per kind of spend.

An ``Action`` says everything the rest of the server needs to know about a
way of moving tokens: the ledger kinds it writes, its script (``lua/<name>``,
run after ``money_lib.lua``), its KEYS and ARGV by name, its refusals and the
errors they become, whether admins may refund it, the wire command it serves
and how, where it delivers, and what it grants. From these come:

- the scripts' ``KEYS[n]``/``ARGV[n]``: scripts name ``KEY.<k>``/``ARG.<a>``
  and ``Action.script`` binds them to positions (server/economy/scripts.py);
- the positional lists of a call (``Action.call``), for ``Economy`` and the
  tips benchmark alike;
- the session's dispatch of paid commands (``BY_COMMAND``, ``Action.serve``);
- the mapping of a script's refusal to an error (``refusal_error``);
- each ledger kind's owner (``BY_KIND``), whose declaration its rules are
  read from: refunds (``REFUNDABLE_KINDS``), spending limits (``SPEND_KINDS``).

Adding a paid action is a declaration here, its script, an ``Economy``
method naming its keys and arguments, its command, and its tests: see
docs/architecture.md, "Adding a paid action".
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import orjson

from tokenchat.protocol import BuyTicket, Dm, Tip, Unlock

from ..catalog.directory import RoomInfo
from ..errors import (
    BadRequest,
    Conflict,
    EscrowEmpty,
    Forbidden,
    InsufficientFunds,
    NotFound,
    NotInRoom,
    PriceChanged,
    SelfExcluded,
    ServiceError,
    SpendLimit,
    Unavailable,
)
from .batcher import LuaScript
from .scripts import money_script

if TYPE_CHECKING:
    from ..catalog.media import MediaCatalog
    from .economy import Economy

Reply = dict[str, Any]

# What every paid action's script takes first, in this order; money_lib.lua
# uses exactly these (idempotency, outbox bound, outbox entry).
COMMON_KEYS: tuple[str, ...] = ("idem", "outbox")
COMMON_ARGS: tuple[str, ...] = ("request", "tx", "outbox_max", "initiator", "key", "meta")
# What every action delivering a room event takes last (Delivery.ROOM_EVENT):
# its history's trim, which history_add (history_lib.lua) applies to every
# XADD to a room's history. The runner fills them, from the settings.
ROOM_EVENT_ARGS: tuple[str, ...] = ("history_len", "history_age_ms")


class Delivery(enum.Enum):
    """What an applied call delivers, besides the ledger entry."""

    ROOM_EVENT = "room event"  # history XADD and PUBLISH on the room's channel
    USER_INBOX = "user inbox"  # inbox XADD and PUBLISH on the recipient's channel
    BALANCE_PUSH = "balance push only"  # `B<balance>` on user channels


@dataclass(frozen=True, slots=True)
class Refusal:
    """A status a script returns instead of OK: the error it becomes.
    ``message`` may name ``{detail}``, the script's second reply field."""

    error: type[ServiceError]
    message: str

    def to_error(self, detail: str) -> ServiceError:
        return self.error(self.message.format(detail=detail))


# Refusals money_lib.lua returns for every action.
COMMON_REFUSALS: Mapping[str, Refusal] = MappingProxyType(
    {
        "CONFLICT": Refusal(Conflict, "this key was used with other fields; nothing was charged"),
        "INSUFFICIENT_FUNDS": Refusal(
            InsufficientFunds, "the balance is {detail} tokens; nothing was charged"
        ),
        "PRICE_CHANGED": Refusal(
            PriceChanged, "the price is now {detail} tokens; nothing was charged"
        ),
        "BACKLOG": Refusal(
            Unavailable, "the ledger is behind (Postgres away); nothing was charged"
        ),
        # user_gate's, with fields of their own: refusal_error builds them.
        "SPEND_LIMIT": Refusal(SpendLimit, "over a spending limit: {detail}"),
        "SELF_EXCLUDED": Refusal(SelfExcluded, "self-excluded until {detail}"),
    }
)


class SpendContext:
    """What serving a paid command needs from the session that received it."""

    __slots__ = ("economy", "media", "room", "rooms", "user_id")

    def __init__(
        self,
        user_id: str,
        rooms: AbstractSet[str],
        room: Callable[[str], Awaitable[RoomInfo | None]],
        economy: Economy,
        media: MediaCatalog | None = None,
    ) -> None:
        self.user_id = user_id
        self.rooms = rooms  # the rooms the session has joined
        self.room = room  # the catalog's lookup of a room
        self.economy = economy
        self.media = media  # locked media: descriptors and signed URLs


Serve = Callable[[SpendContext, Any], Awaitable[Reply]]


def _always(reply: Mapping[str, Any]) -> bool:
    return True


@dataclass(frozen=True, slots=True, eq=False)
class Action:
    """One kind of spend. ``keys``/``args``: the action's own names, after
    ``COMMON_KEYS``/``COMMON_ARGS`` (``all_keys``/``all_args``)."""

    name: str  # its script: lua/<name>.lua
    kinds: tuple[str, ...]  # the ledger kinds its outbox entries carry
    keys: tuple[str, ...]
    args: tuple[str, ...]
    refundable: bool  # whether POST /v1/admin/refunds may reverse it
    delivery: Delivery
    # Keys outside the `{eco}` money slot: what its delivery writes or reads
    # elsewhere (tip: the room's history and show marker). In delivery mode
    # `relay` (Redis Cluster) the script runs with {eco} stand-ins for them
    # (Economy._room_delivery_keys: the delivery stream, the marker's
    # mirror) and the relay moves the delivery to the room
    # (server/economy/relay.py); empty means the whole call runs in the
    # money slot in every mode.
    delivery_keys: tuple[str, ...] = ()
    # The wire command it serves, and how (``serve``: the preconditions that
    # need no money, then the Economy call); None for HTTP-only actions.
    command: type[Any] | None = None
    serve: Serve | None = None
    # The entitlement an applied call grants, by name (an unlock grants
    # "media", durable like the ledger entry it is derived from); None: it
    # grants nothing.
    grants: str | None = None
    # Its own refusals (status -> error), besides COMMON_REFUSALS.
    refusals: Mapping[str, Refusal] = field(default_factory=lambda: MappingProxyType({}))
    # Whether it spends a user's tokens (the payer): its script passes her
    # through user_gate with ``payer_limits`` and ``payer_spent`` (keys it
    # must declare), so her spending limits and self-exclusion apply and its
    # debits count toward them (docs/economy.md, "Spending limits").
    limited: bool = False
    # Whether a reply stands for a ledger entry (a free DM moves nothing and
    # writes none), so that durability `ledger` waits for its row.
    ledgered: Callable[[Mapping[str, Any]], bool] = _always

    def __post_init__(self) -> None:
        for everything in (self.all_keys, self.all_args):
            if len(set(everything)) != len(everything):
                raise ValueError(f"{self.name}: a name is declared twice in {everything}")
        if not set(self.delivery_keys) <= set(self.keys):
            raise ValueError(f"{self.name}: delivery keys {self.delivery_keys} are not its keys")
        if (self.command is None) != (self.serve is None):
            raise ValueError(f"{self.name}: a command needs a serve step, and the reverse")
        if not self.kinds:
            raise ValueError(f"{self.name}: no ledger kind")
        if self.limited and not {"payer_limits", "payer_spent"} <= set(self.keys):
            raise ValueError(f"{self.name}: a limited spend declares payer_limits, payer_spent")

    @property
    def all_keys(self) -> tuple[str, ...]:
        return (*COMMON_KEYS, *self.keys)

    @property
    def all_args(self) -> tuple[str, ...]:
        return (*COMMON_ARGS, *self.args, *self.delivery_args)

    @property
    def delivery_args(self) -> tuple[str, ...]:
        """The arguments its delivery takes (filled by the runner)."""
        return ROOM_EVENT_ARGS if self.delivery is Delivery.ROOM_EVENT else ()

    @property
    def script(self) -> LuaScript:
        """money_lib.lua + lua/<name>.lua with names bound to positions
        (delivery mode `script`)."""
        return money_script(self.name, self.all_keys, self.all_args)

    @property
    def relayed(self) -> bool:
        """Whether its delivery leaves the money slot (``delivery_keys``), so
        that delivery mode `relay` runs ``relay_script`` with {eco} stand-ins
        for those keys (docs/economy.md, "Delivery relay")."""
        return bool(self.delivery_keys)

    @property
    def relay_script(self) -> LuaScript:
        """The same script in delivery mode `relay`: its room events go into
        the {eco} delivery stream for the relay (money_lib's RELAY)."""
        return money_script(self.name, self.all_keys, self.all_args, relay=True)

    def script_for(self, delivery: str) -> LuaScript:
        """Its script in the resolved delivery mode (`script` or `relay`)."""
        return self.relay_script if delivery == "relay" and self.relayed else self.script

    def call(self, keys: Mapping[str, Any], args: Mapping[str, Any]) -> tuple[list[Any], list[Any]]:
        """The script's KEYS and ARGV, in declaration order, from names.

        A missing or an unexpected name is a programmer error: TypeError.
        """
        return _positional(self.name, "keys", self.all_keys, keys), _positional(
            self.name, "args", self.all_args, args
        )


def _positional(
    action: str, what: str, names: Sequence[str], given: Mapping[str, Any]
) -> list[Any]:
    if len(given) != len(names) or not all(name in given for name in names):
        missing = sorted(set(names) - set(given))
        extra = sorted(set(given) - set(names))
        raise TypeError(f"{action}: {what} missing {missing}, unexpected {extra}")
    return [given[name] for name in names]


# --- serving the paid commands ---------------------------------------------------------


async def _serve_tip(context: SpendContext, command: Tip) -> Reply:
    if command.room not in context.rooms:
        raise NotInRoom(f"join room '{command.room}' first")
    info = await context.room(command.room)
    if info is None:
        raise NotFound(f"no room '{command.room}'")
    if command.item is not None:  # a menu item of the room's owner: TIP_ITEM
        return await context.economy.tip_item(
            context.user_id,
            command.room,
            info.owner,
            command.item,
            command.text,
            command.key,
            command.max_price,
        )
    assert command.amount is not None  # the command's own rule: amount or item
    # tip_min is checked inside the script, after the idempotency key.
    return await context.economy.tip(
        context.user_id,
        command.room,
        info.owner,
        command.amount,
        command.text,
        command.key,
        tip_min=info.tip_min,
    )


async def _serve_dm(context: SpendContext, command: Dm) -> Reply:
    media = None
    if command.media is not None:
        # Only her own: a DM shows what its sender sells, never another's.
        assert context.media is not None
        info = await context.media.info(command.media)
        if info.owner != context.user_id:
            raise NotFound(f"no media '{command.media}' of yours")
        media = info.descriptor()
    return await context.economy.dm(
        context.user_id, command.to, command.text, command.key, command.max_price, media=media
    )


async def _serve_unlock(context: SpendContext, command: Unlock) -> Reply:
    assert context.media is not None
    info = await context.media.info(command.media)  # NotFound, wrong kinds of id included
    reply = await context.economy.unlock(
        context.user_id, info.id, info.owner, command.key, command.max_price
    )
    # A fresh short-lived URL on every answer, duplicates included (the one a
    # first answer carried may have expired by the time a retry comes) but
    # only while the access stands: a retry after a refund revoked it gets none.
    entitled = not reply.get("duplicate") or (
        info.owner == context.user_id or await context.economy.entitled(context.user_id, info.id)
    )
    return {**reply, "url": context.media.signed_url(info.id)["url"] if entitled else None}


# --- the registry ------------------------------------------------------------------------

TIP = Action(
    name="tip",
    kinds=("tip",),
    # goal: the room's tip goal (server/economy/goals.py), in {eco};
    # goal_escrow: an all-or-nothing goal's escrow balance, which takes the
    # tokens instead of the owner (Economy learns it from GOAL_ESCROW).
    keys=(
        "payer_balance",
        "payee_balance",
        "history",
        "room_show",
        "room_channel",
        "goal",
        "goal_escrow",
        "payer_limits",
        "payer_spent",
    ),
    args=(
        "amount",
        "tip_min",
        "payer",
        "payee",
        "room_channel",
        "event",
        "payee_channel",
    ),
    limited=True,
    refundable=True,
    delivery=Delivery.ROOM_EVENT,
    delivery_keys=("history", "room_show", "room_channel"),
    command=Tip,
    serve=_serve_tip,
    refusals=MappingProxyType(
        {
            "TIP_MIN": Refusal(
                BadRequest, "field 'amount' must be at least the room's tip_min, {detail}"
            ),
            "NO_TICKET": Refusal(
                Forbidden, "ticket show {detail} is on: buy a ticket to tip; nothing was charged"
            ),
        }
    ),
)

# A tip of a menu item: the `tip` command with `item` (served by TIP's
# serve step), charged at the item's current price. Its ledger kind is
# `tip`: a menu tip is a tip, refundable alike; its meta names the item.
TIP_ITEM = Action(
    name="tip_item",
    kinds=("tip",),
    keys=(
        "payer_balance",
        "payee_balance",
        "menu",
        "history",
        "room_show",
        "room_channel",
        "goal",
        "goal_escrow",
        "payer_limits",
        "payer_spent",
    ),
    args=(
        "item",
        "max_price",
        "payer",
        "payee",
        "room_channel",
        "event",
        "payee_channel",
    ),
    limited=True,
    refundable=True,
    delivery=Delivery.ROOM_EVENT,
    delivery_keys=("history", "room_show", "room_channel"),
    refusals=MappingProxyType(
        {
            "NO_ITEM": Refusal(NotFound, "no item '{detail}' on the room owner's menu"),
            "NO_TICKET": Refusal(
                Forbidden, "ticket show {detail} is on: buy a ticket to tip; nothing was charged"
            ),
        }
    ),
)

DM = Action(
    name="dm",
    kinds=("dm",),
    # blocks, dm_log: the recipient's blocks and the DM archive stream
    # (server/catalog/dms.py); sender, recipient: the two user ids.
    keys=(
        "payer_balance",
        "payee_balance",
        "prices",
        "inbox",
        "blocks",
        "dm_log",
        "payer_limits",
        "payer_spent",
    ),
    args=(
        "max_price",
        "payer",
        "payee",
        "event",
        "payee_channel",
        "inbox_len",
        "sender",
        "recipient",
        "dm_log_max",
    ),
    limited=True,
    refundable=True,
    delivery=Delivery.USER_INBOX,
    command=Dm,
    serve=_serve_dm,
    refusals=MappingProxyType(
        {"BLOCKED": Refusal(Forbidden, "this user does not take your DMs; nothing was charged")}
    ),
    # A free DM (price 0) is delivered but moves nothing: no ledger entry.
    ledgered=lambda reply: bool(reply["price"]),
)

# Purchases (kind 'purchase', initiator sys:payments) and grants ('credit').
CREDIT = Action(
    name="credit",
    kinds=("credit", "purchase"),
    keys=("payer_balance", "payee_balance", "payee_limits"),
    args=("amount", "payer", "payee", "kind", "payee_channel"),
    refundable=False,
    delivery=Delivery.BALANCE_PUSH,
)

REFUND = Action(
    name="refund",
    kinds=("refund",),
    # revoke/revoke_media: a refunded unlock's entitlement (the fan's hash and
    # the media id); '' and any key for every other kind.
    keys=("payer_balance", "payee_balance", "marker", "revoke"),
    args=(
        "amount",
        "payer",
        "payee",
        "refunds",
        "payer_channel",
        "payee_channel",
        "marker_ttl_s",
        "revoke_media",
    ),
    refundable=False,
    delivery=Delivery.BALANCE_PUSH,
    refusals=MappingProxyType(
        {"REFUNDED": Refusal(Conflict, "this transaction was refunded already")}
    ),
)

# Escrow (docs/economy.md, "Escrow"): one account per held object,
# `esc:<kind>:<id>`. A hold puts a user's tokens in; a release (to the earner)
# or an escrow_refund (back to the payer) takes the WHOLE balance out, so
# nothing leaves an escrow twice. No wire command of their own: a feature's
# workflow (server/economy/requests.py) calls them; the refund rule of
# admins does not apply (a workflow returns escrowed tokens itself).
_EMPTY = MappingProxyType(
    {"EMPTY": Refusal(EscrowEmpty, "the escrow holds nothing: it was released or refunded already")}
)
HOLD = Action(
    name="hold",
    kinds=("hold",),
    keys=("payer_balance", "escrow_balance", "payer_limits", "payer_spent"),
    args=("amount", "payer", "escrow", "subject"),
    limited=True,
    refundable=False,
    delivery=Delivery.BALANCE_PUSH,  # the payer's reply carries its balance: no push
)
RELEASE = Action(
    name="release",
    kinds=("release",),
    keys=("escrow_balance", "payee_balance"),
    args=("escrow", "payee", "payee_channel"),
    refundable=False,
    delivery=Delivery.BALANCE_PUSH,
    refusals=_EMPTY,
)
ESCROW_REFUND = Action(
    name="escrow_refund",
    kinds=("escrow_refund",),
    keys=("escrow_balance", "payer_balance"),
    args=("escrow", "payer", "payer_channel"),
    refundable=False,
    delivery=Delivery.BALANCE_PUSH,
    refusals=_EMPTY,
)

UNLOCK = Action(
    name="unlock",
    kinds=("unlock",),
    keys=("payer_balance", "payee_balance", "media", "entitlement", "payer_limits", "payer_spent"),
    args=("max_price", "payer", "payee", "media_id", "payee_channel"),
    # An admin's refund of an unlock also revokes the access (refund.lua).
    limited=True,
    refundable=True,
    delivery=Delivery.BALANCE_PUSH,
    command=Unlock,
    serve=_serve_unlock,
    grants="media",
    # Media owned already (`already`) is answered without a ledger entry.
    ledgered=lambda reply: not reply.get("already"),
)

# A private show's billing (server/economy/privates.py): one call per
# period, escrow first, then the fan, to the model. No wire command: the
# meter of the node holding the show's lease runs it.
METER = Action(
    name="meter",
    kinds=("meter",),
    keys=("payer_balance", "escrow_balance", "payee_balance", "payer_limits", "payer_spent"),
    args=("amount", "payer", "escrow", "payee", "payer_channel", "payee_channel"),
    limited=True,
    refundable=False,
    delivery=Delivery.BALANCE_PUSH,
)


# Ticket shows (server/economy/shows.py): a ticket is a charge into the
# show's escrow with the ticket recorded in the same call; each ticket is
# refunded on its own (ledger kind escrow_refund), and the release of a show
# that ran its minimum length is RELEASE (the escrow's whole balance).
async def _serve_ticket(context: SpendContext, command: BuyTicket) -> Reply:
    if command.room not in context.rooms:
        raise NotInRoom(f"join room '{command.room}' first")
    return await context.economy.ticket(context.user_id, command.room, command.show, command.key)


TICKET = Action(
    name="ticket",
    kinds=("ticket",),
    keys=("payer_balance", "escrow_balance", "show", "room_show", "payer_limits", "payer_spent"),
    args=("payer", "escrow", "show", "room"),
    limited=True,
    refundable=False,  # a show's workflow refunds its tickets itself
    delivery=Delivery.BALANCE_PUSH,  # the fan's reply carries the balance
    delivery_keys=("room_show",),
    command=BuyTicket,
    serve=_serve_ticket,
    refusals=MappingProxyType(
        {
            "SHOW_CLOSED": Refusal(Conflict, "the show is {detail}: tickets are no longer sold"),
            "NO_SHOW": Refusal(NotFound, "no show '{detail}' in this room"),
        }
    ),
    ledgered=lambda reply: not reply.get("already"),
)
TICKET_REFUND = Action(
    name="ticket_refund",
    kinds=("escrow_refund",),
    keys=("show", "escrow_balance", "payer_balance"),
    args=("escrow", "payer", "payer_channel"),
    refundable=False,
    delivery=Delivery.BALANCE_PUSH,
    refusals=_EMPTY,
)

# Tip goals (server/economy/goals.py): an all-or-nothing goal's tips wait
# in its escrow (tip.lua moves them there); a goal that fails or is deleted
# gives each fan's back in one call per fan (ledger kind escrow_refund); a
# reached one is RELEASE.
GOAL_REFUND = Action(
    name="goal_refund",
    kinds=("escrow_refund",),
    keys=("escrow_balance", "payer_balance"),
    args=("amount", "escrow", "payer", "payer_channel"),
    refundable=False,
    delivery=Delivery.BALANCE_PUSH,
    refusals=_EMPTY,
)

# Payouts (server/economy/payouts.py): a model's request is a HOLD into
# `esc:payout:<id>`; an admin's approval moves the escrow's whole balance to
# `sys:payouts` (ledger kind payout); a rejection is ESCROW_REFUND.
PAYOUT = Action(
    name="payout",
    kinds=("payout",),
    keys=("escrow_balance", "payouts_balance"),
    args=("escrow", "payouts"),
    refundable=False,
    delivery=Delivery.BALANCE_PUSH,  # nothing to push: no user's balance changes
    refusals=_EMPTY,
)

# Payments and accounts (issue #13 section 4): a purchase refunded or charged
# back takes back what is left of its tokens into sys:mint (`chargeback`); a
# deleted account's balance goes to sys:forfeited (`forfeit`). Never more than
# the user holds: the reply says what was taken and what was short.
CLAWBACK = Action(
    name="clawback",
    kinds=("chargeback", "forfeit"),
    keys=("user_balance", "sink_balance"),
    args=("amount", "user", "sink", "kind", "user_channel"),
    refundable=False,
    delivery=Delivery.BALANCE_PUSH,
    # Nothing to take (the user spent it all): no ledger entry to wait for.
    ledgered=lambda reply: bool(reply["clawed"]),
)

ACTIONS: tuple[Action, ...] = (
    TIP,
    DM,
    CREDIT,
    REFUND,
    HOLD,
    RELEASE,
    ESCROW_REFUND,
    UNLOCK,
    METER,
    TIP_ITEM,
    TICKET,
    TICKET_REFUND,
    GOAL_REFUND,
    PAYOUT,
    CLAWBACK,
)
BY_NAME: Mapping[str, Action] = MappingProxyType({action.name: action for action in ACTIONS})


def _kind_owners(owners: Mapping[str, Action]) -> Mapping[str, Action]:
    """Each ledger kind's owner, checked against the declarations: every kind
    an action writes has one owner, which writes it too, and an action
    sharing a kind with its owner agrees with it on the rules that follow
    from a kind (refundable, limited), so that the rules read off the owner
    hold for every row of that kind. Raises ValueError otherwise."""
    written = {kind for action in ACTIONS for kind in action.kinds}
    if set(owners) != written:
        raise ValueError(
            f"kinds without an owner {sorted(written - set(owners))}, "
            f"owners of no kind {sorted(set(owners) - written)}"
        )
    for kind, owner in owners.items():
        if kind not in owner.kinds:
            raise ValueError(f"{owner.name} owns {kind} but does not write it")
        for action in ACTIONS:
            rules = (action.refundable, action.limited)
            if kind in action.kinds and rules != (owner.refundable, owner.limited):
                raise ValueError(f"{action.name} writes {kind} under other rules than {owner.name}")
    return MappingProxyType(dict(owners))


# Each ledger kind's owner, by name: the action whose declaration the kind's
# rules (refunds, spending limits, refusals) are read from. Kinds written by
# more than one action: `tip` (TIP, and a menu tip's TIP_ITEM) and
# `escrow_refund` (ESCROW_REFUND, a ticket's TICKET_REFUND, a goal's
# GOAL_REFUND). The ledger's kind CHECK admits exactly these (and `spend`,
# which no code writes any more: tests/server/test_actions.py).
BY_KIND: Mapping[str, Action] = _kind_owners(
    {
        "tip": TIP,
        "dm": DM,
        "credit": CREDIT,
        "purchase": CREDIT,
        "refund": REFUND,
        "hold": HOLD,
        "release": RELEASE,
        "escrow_refund": ESCROW_REFUND,
        "unlock": UNLOCK,
        "meter": METER,
        "ticket": TICKET,
        "payout": PAYOUT,
        "chargeback": CLAWBACK,
        "forfeit": CLAWBACK,
    }
)
BY_COMMAND: Mapping[type[Any], Action] = MappingProxyType(
    {action.command: action for action in ACTIONS if action.command is not None}
)
# Ledger kinds that spend a user's tokens: the debits her spending limits
# count, and what rebuilds her counters from the ledger.
SPEND_KINDS: frozenset[str] = frozenset(kind for kind, owner in BY_KIND.items() if owner.limited)
# Ledger kinds an admin may refund (each once).
REFUNDABLE_KINDS: frozenset[str] = frozenset(
    kind for kind, owner in BY_KIND.items() if owner.refundable
)


def refusal_error(action: Action, status: str, detail: str) -> ServiceError:
    """The error a script's refusal becomes (``detail``: its second field)."""
    if status == "SPEND_LIMIT":  # user_gate: the window's JSON
        window = _window(detail)
        return SpendLimit(
            f"your {window['window']} spending limit leaves {window['remaining']} tokens;"
            " nothing was charged",
            window=str(window["window"]),
            remaining=int(window["remaining"]),
            resets_at=int(window["resets_at"]),
        )
    if status == "SELF_EXCLUDED":
        return SelfExcluded(
            "you excluded yourself from spending until then; nothing was charged",
            until=int(detail) if detail.isdigit() else 0,
        )
    refusal = action.refusals.get(status) or COMMON_REFUSALS.get(status)
    if refusal is None:  # a script returning what its declaration lacks
        return BadRequest(f"refused: {status}")
    return refusal.to_error(detail)


def _window(detail: str) -> dict[str, Any]:
    """SPEND_LIMIT's detail as user_gate writes it (anything else, a bug,
    still becomes a SPEND_LIMIT, with zeros)."""
    try:
        window = orjson.loads(detail)
        return {k: window[k] for k in ("window", "remaining", "resets_at")}
    except (orjson.JSONDecodeError, TypeError, KeyError):
        return {"window": "unknown", "remaining": 0, "resets_at": 0}
