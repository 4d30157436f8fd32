"""Commands: what a client asks of the server (DESIGN.md section 3).

A command arrives as one decoded frame and leaves ``parse_command`` as a
frozen dataclass whose every field has been checked against the contract, so
the server never handles an unchecked value. Rules, in the order checked:

1. The frame is an object (a dict).
2. ``id`` is optional: an integer (signed 64-bit; ``true`` is not an integer)
   or a string of 1 to ``ID_STR_LEN_MAX`` characters. Once it has been read,
   every error carries it as ``re``.
3. ``type`` is a string naming a known command, else ``UNKNOWN_COMMAND``.
4. Each field, in declaration order: present and valid, or the error names
   it. An optional field may be absent or null (its default is used).
   Fields the command does not declare are ignored, so a newer client can
   talk to an older server.

Two optional hooks of a declaration: ``WIRE_OPTIONAL`` names positional
fields (no dataclass default) that a frame may leave out, which are then
None; ``wire_error(self) -> str | None`` is a rule across fields, checked
after every field (``tip``: ``amount`` or ``item``), its message answered
``BAD_REQUEST``.

Adding a command (a paid feature, say) is declaring one class: a frozen,
slotted dataclass with a ``TYPE``, ``id`` first, every other field annotated
``Annotated[T, WireField]``, decorated with ``@command``; then adding it to
the ``Command`` union, which static typing cannot do by itself.
"""

import dataclasses
import re
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Annotated, Any, ClassVar, Final, TypeAlias, TypeVar

from .codec import Codec
from .errors import ErrorCode, ProtocolError
from .limits import (
    AMOUNT_MAX,
    AMOUNT_MIN,
    DELIVERY_TEXT_LEN_MAX,
    DM_TEXT_LEN_MAX,
    GOAL_TARGET_MAX,
    GOAL_TITLE_LEN_MAX,
    ID_INT_MAX,
    ID_INT_MIN,
    ID_STR_LEN_MAX,
    ITEM_REF_RE,
    KEY_LEN_MAX,
    MEDIA_REF_LEN_MAX,
    MEDIA_TEXT_LEN_MAX,
    MENU_LABEL_LEN_MAX,
    OBJECT_ID_RE,
    OFFSET_RE,
    PAYMENT_REF_LEN_MAX,
    PRINTABLE_ASCII_RE,
    REQUEST_TEXT_LEN_MAX,
    RESTRICTION_S_MAX,
    SAY_TEXT_LEN_MAX,
    SHOW_MIN_S_MAX,
    SHOW_TITLE_LEN_MAX,
    SLOW_S_MAX,
    TIP_TEXT_LEN_MAX,
    TOKEN_LEN_MAX,
    TX_ID_LEN_MAX,
    USER_ID_RE,
)

# An error message quotes client input (an unknown command name) only this
# far, so an error reply stays small whatever the client sent.
_ECHO_LEN_MAX: Final = 64  # characters

CommandId: TypeAlias = int | str | None


@dataclass(frozen=True, slots=True)
class WireField:
    """How one field is checked as it arrives."""

    describe: str  # completes "field 'x' must be ..."
    accept: Callable[[object], bool]
    # The same rule as a JSON Schema (draft 2020-12 keywords that draft-07
    # shares), for the published protocol schema (protocol/schema.py). Where
    # JSON Schema cannot say all of ``accept`` (UTF-8 bytes, printability),
    # it says less and ``describe`` the rest; ``accept`` stays the authority.
    schema: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def _is_int(value: object) -> typing.TypeGuard[int]:
    # bool is a subclass of int in Python; on the wire `true` is not a number.
    return isinstance(value, int) and not isinstance(value, bool)


def integer(value_min: int, value_max: int) -> WireField:
    return WireField(
        f"an integer between {value_min} and {value_max}",
        lambda value: _is_int(value) and value_min <= value <= value_max,
        {"type": "integer", "minimum": value_min, "maximum": value_max},
    )


def string(len_min: int, len_max: int) -> WireField:
    """A string of len_min..len_max characters (code points)."""
    describe = (
        f"a string of at most {len_max} characters"
        if len_min == 0
        else f"a string of {len_min} to {len_max} characters"
    )
    return WireField(
        describe,
        lambda value: isinstance(value, str) and len_min <= len(value) <= len_max,
        {"type": "string", "minLength": len_min, "maxLength": len_max},
    )


def stored_string(len_min: int, len_max: int) -> WireField:
    """A string of len_min..len_max characters that Postgres can store: no
    NUL (U+0000), which its text and jsonb types refuse. For prose kept in
    Postgres (a custom request's text), unlike chat, which stays in Redis."""
    return WireField(
        f"a string of {len_min} to {len_max} characters, without NUL (U+0000)",
        lambda value: (
            isinstance(value, str) and len_min <= len(value) <= len_max and "\x00" not in value
        ),
        {"type": "string", "minLength": len_min, "maxLength": len_max, "pattern": "^[^\\u0000]*$"},
    )


def utf8_string(bytes_min: int, bytes_max: int) -> WireField:
    """A string whose UTF-8 encoding is bytes_min..bytes_max bytes."""

    def accept(value: object) -> bool:
        # A string never has more characters than UTF-8 bytes, so an overlong
        # one is refused before paying for the encoding.
        if not isinstance(value, str) or len(value) > bytes_max:
            return False
        bytes_len = len(value) if value.isascii() else len(value.encode())
        return bytes_min <= bytes_len <= bytes_max

    # JSON Schema counts characters: at least one byte is at least one
    # character, and at most bytes_max bytes is at most bytes_max characters.
    schema = {"type": "string", "minLength": bytes_min, "maxLength": bytes_max}
    return WireField(f"a string of {bytes_min} to {bytes_max} bytes", accept, schema)


def printable_ascii(len_min: int, len_max: int) -> WireField:
    """A string of len_min..len_max printable ASCII characters (0x20-0x7E):
    an identifier the client chooses, stored in Postgres (limits.py)."""
    return WireField(
        f"{len_min} to {len_max} printable ASCII characters (0x20-0x7E)",
        lambda value: (
            isinstance(value, str)
            and len_min <= len(value) <= len_max
            and PRINTABLE_ASCII_RE.fullmatch(value) is not None
        ),
        {
            "type": "string",
            "minLength": len_min,
            "maxLength": len_max,
            "pattern": ecma_pattern(PRINTABLE_ASCII_RE),
        },
    )


def ecma_pattern(pattern: re.Pattern[str]) -> str:
    """A contract regex as JSON Schema writes it (ECMA-262): limits.py ends
    each in ``\\Z``, which ECMA lacks; its ``$`` (no multiline flag) means
    the same, the very end of the string."""
    source = pattern.pattern
    if not source.endswith("\\Z"):
        raise ValueError(f"pattern {source!r} must end in \\Z (see limits.py)")
    return source[: -len("\\Z")] + "$"


def matching(pattern: re.Pattern[str], describe: str) -> WireField:
    return WireField(
        describe,
        lambda value: isinstance(value, str) and pattern.fullmatch(value) is not None,
        {"type": "string", "pattern": ecma_pattern(pattern)},
    )


USER_ID: Final = matching(USER_ID_RE, "a user id: 1 to 64 characters of A-Z a-z 0-9 _ . : -")
# Each part of a stream id is an unsigned 64-bit integer.
_OFFSET_PART_MAX: Final = 2**64 - 1


def _is_offset(value: object) -> bool:
    if not isinstance(value, str) or OFFSET_RE.fullmatch(value) is None:
        return False
    ms, _, seq = value.partition("-")
    return int(ms) <= _OFFSET_PART_MAX and int(seq) <= _OFFSET_PART_MAX


OFFSET: Final = WireField(
    "an offset, as received in an event (like '1712345678901-0')",
    _is_offset,
    # Each part's bound (2**64 - 1) is past what a pattern says simply.
    {"type": "string", "pattern": ecma_pattern(OFFSET_RE)},
)
AMOUNT: Final = integer(AMOUNT_MIN, AMOUNT_MAX)
PRICE: Final = integer(0, AMOUNT_MAX)
KEY: Final = printable_ascii(1, KEY_LEN_MAX)
# Over HTTP only, but declared here beside KEY so that the rule for
# client-chosen identifiers lives in one place.
PAYMENT_REF: Final = printable_ascii(1, PAYMENT_REF_LEN_MAX)
TX_ID: Final = printable_ascii(1, TX_ID_LEN_MAX)
TOKEN: Final = utf8_string(1, TOKEN_LEN_MAX)
SAY_TEXT: Final = string(1, SAY_TEXT_LEN_MAX)
DM_TEXT: Final = string(1, DM_TEXT_LEN_MAX)
TIP_TEXT: Final = string(0, TIP_TEXT_LEN_MAX)
REQUEST_TEXT: Final = stored_string(1, REQUEST_TEXT_LEN_MAX)
DELIVERY_TEXT: Final = stored_string(0, DELIVERY_TEXT_LEN_MAX)
MEDIA_REF: Final = printable_ascii(1, MEDIA_REF_LEN_MAX)
# Over HTTP only (POST /v1/me/shows), declared here with the other fields.
SHOW_TITLE: Final = stored_string(1, SHOW_TITLE_LEN_MAX)
SHOW_MIN_S: Final = integer(1, SHOW_MIN_S_MAX)
# Milliseconds since the epoch, up to 2**53 - 1 (exact in JavaScript numbers).
EPOCH_MS: Final = integer(0, 2**53 - 1)
# Over HTTP only (PUT /v1/me/goal): a tip goal's title and target.
GOAL_TITLE: Final = stored_string(1, GOAL_TITLE_LEN_MAX)
GOAL_TARGET: Final = integer(1, GOAL_TARGET_MAX)
OBJECT_ID: Final = matching(OBJECT_ID_RE, "an id: 1 to 64 characters of A-Z a-z 0-9 _ -")
MEDIA_TEXT: Final = string(0, MEDIA_TEXT_LEN_MAX)


def label(len_max: int) -> WireField:
    """A short line of text a person reads (a menu item's label): 1..len_max
    characters, each printable (str.isprintable: no control, format or line
    separator characters, which could break a button or forge a log line),
    and not only spaces."""
    return WireField(
        f"1 to {len_max} printable characters, not only spaces",
        lambda value: (
            isinstance(value, str)
            and 1 <= len(value) <= len_max
            and value.isprintable()
            and not value.isspace()
        ),
        # Printability is past JSON Schema's patterns: `describe` says it.
        {"type": "string", "minLength": 1, "maxLength": len_max, "pattern": "\\S"},
    )


# Over HTTP only (PUT /v1/me/menu), declared here so that clients check
# labels by the same rule.
MENU_LABEL: Final = label(MENU_LABEL_LEN_MAX)
# A `tip`'s `item` as a client names it (see limits.ITEM_REF_RE).
ITEM_REF: Final = matching(ITEM_REF_RE, "a menu item id (like 'i_0123456789abcdef')")

# Field types named by what they are; the annotation carries the check.
UserId: TypeAlias = Annotated[str, USER_ID]
ObjectId: TypeAlias = Annotated[str, OBJECT_ID]
Amount: TypeAlias = Annotated[int, AMOUNT]
IdempotencyKey: TypeAlias = Annotated[str, KEY]


@dataclass(frozen=True, slots=True)
class _Schema:
    make: Callable[..., "Command"]
    # (name, check, default); default is dataclasses.MISSING when required
    fields: tuple[tuple[str, WireField, object], ...]
    # The command's rule across fields (``wire_error``), if it has one.
    check: Callable[[Any], str | None] | None = None


_SCHEMAS: dict[str, _Schema] = {}
_CLASSES: dict[str, type["Command"]] = {}

# Every registered command class, by its TYPE.
COMMANDS: Final[Mapping[str, type["Command"]]] = MappingProxyType(_CLASSES)

_C = TypeVar("_C", bound="Command")


def command(cls: type[_C]) -> type[_C]:
    """Register a command class, reading each field's check from its
    annotation. Mistakes in a declaration fail here, at import."""
    if cls.TYPE in _SCHEMAS:
        raise TypeError(f"command type {cls.TYPE!r} is declared twice")
    declared = dataclasses.fields(cls)
    if not declared or declared[0].name != "id":
        raise TypeError(f"{cls.__name__}: the first field must be `id`")
    hints = typing.get_type_hints(cls, include_extras=True)
    fields: list[tuple[str, WireField, object]] = []
    for field in declared[1:]:
        checks = [
            m for m in getattr(hints[field.name], "__metadata__", ()) if isinstance(m, WireField)
        ]
        if len(checks) != 1:
            raise TypeError(f"{cls.__name__}.{field.name}: annotate it Annotated[T, WireField]")
        # WIRE_OPTIONAL: positional fields (no dataclass default) that a
        # frame may leave out all the same; they are None then.
        optional = field.name in getattr(cls, "WIRE_OPTIONAL", ())
        fields.append((field.name, checks[0], None if optional else field.default))
    _SCHEMAS[cls.TYPE] = _Schema(cls, tuple(fields), getattr(cls, "wire_error", None))
    # mypy cannot see that type[_C] is one of the union's members.
    _CLASSES[cls.TYPE] = typing.cast("type[Command]", cls)
    return cls


@command
@dataclass(frozen=True, slots=True)
class Hello:
    """Authenticates the session; the first command of every session."""

    TYPE: ClassVar[str] = "hello"
    id: CommandId
    token: Annotated[str, TOKEN]


@command
@dataclass(frozen=True, slots=True)
class Join:
    """Joins a room; with ``since``, the history after that offset."""

    TYPE: ClassVar[str] = "join"
    id: CommandId
    room: UserId
    since: Annotated[str | None, OFFSET] = None


@command
@dataclass(frozen=True, slots=True)
class RoomHistory:
    """The next page of a joined room's history: the events after ``since``
    (at most HISTORY_PAGE_LEN), with ``more`` when later ones follow."""

    TYPE: ClassVar[str] = "history"
    id: CommandId
    room: UserId
    since: Annotated[str, OFFSET]


@command
@dataclass(frozen=True, slots=True)
class Leave:
    TYPE: ClassVar[str] = "leave"
    id: CommandId
    room: UserId


@command
@dataclass(frozen=True, slots=True)
class Say:
    """A free chat line to a room the sender is a member of."""

    TYPE: ClassVar[str] = "say"
    id: CommandId
    room: UserId
    text: Annotated[str, SAY_TEXT]


@command
@dataclass(frozen=True, slots=True)
class Tip:
    """Tokens to the room's owner, seen by the whole room. Spends: ``key``.

    Either ``amount`` (at least the room's tip_min) or ``item``: a menu item
    of the room's owner, charged at its current price; ``max_price`` (with
    ``item`` only): refuse (PRICE_CHANGED) rather than pay more than this.
    """

    TYPE: ClassVar[str] = "tip"
    # `amount` keeps its place (callers build Tip positionally) but a tip of
    # a menu item leaves it out.
    WIRE_OPTIONAL: ClassVar[tuple[str, ...]] = ("amount",)
    id: CommandId
    room: UserId
    amount: Annotated[int | None, AMOUNT]
    key: IdempotencyKey
    text: Annotated[str, TIP_TEXT] = ""
    item: Annotated[str | None, ITEM_REF] = None
    max_price: Annotated[int | None, PRICE] = None

    def wire_error(self) -> str | None:
        """What is wrong across fields, or None."""
        if self.amount is None and self.item is None:
            return "field 'amount' (or 'item', a menu item) is required"
        if self.amount is not None and self.item is not None:
            return "send 'amount' or 'item', not both: a menu item's price is the amount"
        if self.max_price is not None and self.item is None:
            return "field 'max_price' goes with 'item' (a tip's 'amount' is exact)"
        return None


@command
@dataclass(frozen=True, slots=True)
class Dm:
    """A private message at the recipient's DM price. Spends: ``key``.
    ``max_price``: refuse (PRICE_CHANGED) rather than pay more than this."""

    TYPE: ClassVar[str] = "dm"
    id: CommandId
    to: UserId
    text: Annotated[str, DM_TEXT]
    key: IdempotencyKey
    max_price: Annotated[int | None, PRICE] = None
    # Locked media of the sender's attached to the message: the event carries
    # its descriptor (id, kind, price, preview), never its content.
    media: Annotated[str | None, OBJECT_ID] = None


@command
@dataclass(frozen=True, slots=True)
class PostMedia:
    """A model shows her locked media in her room: a ``media`` event."""

    TYPE: ClassVar[str] = "post_media"
    id: CommandId
    room: UserId
    media: ObjectId
    text: Annotated[str, MEDIA_TEXT] = ""


@command
@dataclass(frozen=True, slots=True)
class Unlock:
    """Buys permanent access to locked media at its current price. Spends:
    ``key``. ``max_price``: refuse (PRICE_CHANGED) rather than pay more."""

    TYPE: ClassVar[str] = "unlock"
    id: CommandId
    media: ObjectId
    key: IdempotencyKey
    max_price: Annotated[int | None, PRICE] = None


@command
@dataclass(frozen=True, slots=True)
class RequestOffer:
    """A custom request to a model, ``amount`` held in escrow until she
    delivers (released to her) or it ends otherwise (refunded). Spends: ``key``."""

    TYPE: ClassVar[str] = "request_offer"
    id: CommandId
    model: UserId
    text: Annotated[str, REQUEST_TEXT]
    amount: Amount
    key: IdempotencyKey


@command
@dataclass(frozen=True, slots=True)
class RequestAccept:
    """The model takes an offered request on (its delivery deadline starts)."""

    TYPE: ClassVar[str] = "request_accept"
    id: CommandId
    request: Annotated[str, OBJECT_ID]


@command
@dataclass(frozen=True, slots=True)
class RequestDeliver:
    """The model delivers an accepted request: the escrow is released to her."""

    TYPE: ClassVar[str] = "request_deliver"
    id: CommandId
    request: Annotated[str, OBJECT_ID]
    text: Annotated[str, DELIVERY_TEXT] = ""
    media: Annotated[str | None, MEDIA_REF] = None


@command
@dataclass(frozen=True, slots=True)
class RequestDecline:
    """The model turns down an offered or accepted request: the fan is refunded."""

    TYPE: ClassVar[str] = "request_decline"
    id: CommandId
    request: Annotated[str, OBJECT_ID]


@command
@dataclass(frozen=True, slots=True)
class RequestCancel:
    """The fan withdraws an offer the model has not accepted: refunded."""

    TYPE: ClassVar[str] = "request_cancel"
    id: CommandId
    request: Annotated[str, OBJECT_ID]


@command
@dataclass(frozen=True, slots=True)
class RequestList:
    """The caller's requests, as fan and as model, newest first."""

    TYPE: ClassVar[str] = "request_list"
    id: CommandId


@command
@dataclass(frozen=True, slots=True)
class PrivateRequest:
    """A fan asks a model for a private show at ``rate`` tokens a minute
    (PRICE_CHANGED if hers is now higher). Nothing is charged until she
    accepts. Idempotent on ``key``."""

    TYPE: ClassVar[str] = "private_request"
    id: CommandId
    model: UserId
    rate: Amount
    key: IdempotencyKey


@command
@dataclass(frozen=True, slots=True)
class BuyTicket:
    """A ticket to a room's ticket show: its price into the show's escrow,
    released to the model once the show has run its minimum length, refunded
    otherwise. A second ticket answers ``already: true``. Spends: ``key``."""

    TYPE: ClassVar[str] = "buy_ticket"
    id: CommandId
    room: UserId
    show: Annotated[str, OBJECT_ID]
    key: IdempotencyKey


@command
@dataclass(frozen=True, slots=True)
class PrivateAccept:
    """The model starts a requested show: the minimum is held, the meter runs."""

    TYPE: ClassVar[str] = "private_accept"
    id: CommandId
    show: Annotated[str, OBJECT_ID]


@command
@dataclass(frozen=True, slots=True)
class ShowStart:
    """The model starts a scheduled show of her room: from now on only she
    and ticket holders get the room's events and may post."""

    TYPE: ClassVar[str] = "show_start"
    id: CommandId
    show: Annotated[str, OBJECT_ID]


@command
@dataclass(frozen=True, slots=True)
class PrivateDecline:
    """The model turns a requested show down: nothing was charged."""

    TYPE: ClassVar[str] = "private_decline"
    id: CommandId
    show: Annotated[str, OBJECT_ID]


@command
@dataclass(frozen=True, slots=True)
class ShowEnd:
    """The model ends her running show: paid if it ran its minimum length,
    every ticket refunded if not."""

    TYPE: ClassVar[str] = "show_end"
    id: CommandId
    show: Annotated[str, OBJECT_ID]


@command
@dataclass(frozen=True, slots=True)
class PrivateEnd:
    """Either side ends a show (or the fan withdraws a request)."""

    TYPE: ClassVar[str] = "private_end"
    id: CommandId
    show: Annotated[str, OBJECT_ID]


@command
@dataclass(frozen=True, slots=True)
class ShowCancel:
    """The model calls off a scheduled or running show: every ticket refunded."""

    TYPE: ClassVar[str] = "show_cancel"
    id: CommandId
    show: Annotated[str, OBJECT_ID]


# --- moderation (issue #12 section 4) ---------------------------------------------
# The room's owner and her moderators (PUT /v1/me/moderators) act on one
# member of the room; docs/protocol.md "Moderation" gives who may act on whom.
RESTRICTION_S: Final = integer(1, RESTRICTION_S_MAX)
SLOW_S: Final = integer(0, SLOW_S_MAX)


@command
@dataclass(frozen=True, slots=True)
class Mute:
    """``user`` may not chat in ``room`` for ``seconds`` (tips still go)."""

    TYPE: ClassVar[str] = "mute"
    id: CommandId
    room: UserId
    user: UserId
    seconds: Annotated[int, RESTRICTION_S]


@command
@dataclass(frozen=True, slots=True)
class Unmute:
    TYPE: ClassVar[str] = "unmute"
    id: CommandId
    room: UserId
    user: UserId


@command
@dataclass(frozen=True, slots=True)
class Kick:
    """``user`` is removed from ``room`` on every node; they may join again."""

    TYPE: ClassVar[str] = "kick"
    id: CommandId
    room: UserId
    user: UserId


@command
@dataclass(frozen=True, slots=True)
class Ban:
    """``user`` is removed from ``room`` and may not join it again, for
    ``seconds`` or, without it, until unbanned."""

    TYPE: ClassVar[str] = "ban"
    id: CommandId
    room: UserId
    user: UserId
    seconds: Annotated[int | None, RESTRICTION_S] = None


@command
@dataclass(frozen=True, slots=True)
class Unban:
    TYPE: ClassVar[str] = "unban"
    id: CommandId
    room: UserId
    user: UserId


@command
@dataclass(frozen=True, slots=True)
class Clear:
    """Removes ``user``'s chat lines from ``room``'s history; every member
    gets a ``clear`` event and hides them."""

    TYPE: ClassVar[str] = "clear"
    id: CommandId
    room: UserId
    user: UserId


@command
@dataclass(frozen=True, slots=True)
class Slow:
    """At most one chat line per ``seconds`` per member (0: off). Tips are
    never slowed."""

    TYPE: ClassVar[str] = "slow"
    id: CommandId
    room: UserId
    seconds: Annotated[int, SLOW_S]


@command
@dataclass(frozen=True, slots=True)
class Balance:
    TYPE: ClassVar[str] = "balance"
    id: CommandId


@command
@dataclass(frozen=True, slots=True)
class Ping:
    TYPE: ClassVar[str] = "ping"
    id: CommandId


Command: TypeAlias = (
    Hello
    | Join
    | RoomHistory
    | Leave
    | Say
    | Tip
    | Dm
    | Balance
    | Ping
    | PostMedia
    | Unlock
    | RequestOffer
    | RequestAccept
    | RequestDeliver
    | RequestDecline
    | RequestCancel
    | RequestList
    | PrivateRequest
    | PrivateAccept
    | PrivateDecline
    | PrivateEnd
    | BuyTicket
    | ShowStart
    | ShowEnd
    | ShowCancel
    | Mute
    | Unmute
    | Kick
    | Ban
    | Unban
    | Clear
    | Slow
)


def _bad(message: str, command_id: CommandId = None) -> ProtocolError:
    return ProtocolError(ErrorCode.BAD_REQUEST, message, re=command_id)


def _quote(text: str) -> str:
    if len(text) > _ECHO_LEN_MAX:
        return repr(text[:_ECHO_LEN_MAX]) + "..."
    return repr(text)


def _parse_id(value: object) -> CommandId:
    if value is None:
        return None
    if isinstance(value, str) and 1 <= len(value) <= ID_STR_LEN_MAX:
        return value
    if _is_int(value) and ID_INT_MIN <= value <= ID_INT_MAX:
        return value
    raise _bad(
        f"field 'id' must be an integer (signed 64-bit) or a string of 1 to "
        f"{ID_STR_LEN_MAX} characters"
    )


def parse_command(obj: object) -> Command:
    """The command in one decoded frame, or ``ProtocolError`` saying which
    field is wrong (BAD_REQUEST) or that the type is unknown (UNKNOWN_COMMAND)."""
    if not isinstance(obj, dict):
        raise _bad("a command must be an object")
    command_id = _parse_id(obj.get("id"))
    type_name = obj.get("type")
    if not isinstance(type_name, str):
        raise _bad("field 'type' must be a string", command_id)
    schema = _SCHEMAS.get(type_name)
    if schema is None:
        raise ProtocolError(
            ErrorCode.UNKNOWN_COMMAND, f"unknown command {_quote(type_name)}", re=command_id
        )
    values: dict[str, object] = {}
    for name, check, default in schema.fields:
        value = obj.get(name)
        if value is None:
            if default is dataclasses.MISSING:
                raise _bad(f"field {name!r} is required and must be {check.describe}", command_id)
            value = default
        elif not check.accept(value):
            raise _bad(f"field {name!r} must be {check.describe}", command_id)
        values[name] = value
    parsed = schema.make(command_id, **values)
    problem = schema.check(parsed) if schema.check is not None else None
    if problem is not None:
        raise _bad(problem, command_id)
    return parsed


def decode_command(codec: Codec, data: bytes | str) -> Command:
    """The command in one frame; ``ProtocolError`` and nothing else if none."""
    return parse_command(codec.decode(data))


def command_to_dict(cmd: Command) -> dict[str, Any]:
    """The wire form of a command, for clients and tests: fields that are
    None (an absent ``id`` or optional field) are left out."""
    wire: dict[str, Any] = {"type": cmd.TYPE}
    for field in dataclasses.fields(cmd):
        value = getattr(cmd, field.name)
        if value is not None:
            wire[field.name] = value
    return wire


@dataclass(frozen=True, slots=True)
class DeclaredField:
    """One field of a command as declared: what protocol/schema.py reads."""

    name: str
    check: WireField
    required: bool


def declared_fields(type_name: str) -> tuple[DeclaredField, ...]:
    """The fields of command ``type_name`` in the order they are checked
    (``id`` and ``type`` excluded): the one declaration the published JSON
    Schema is generated from."""
    return tuple(
        DeclaredField(name, check, default is dataclasses.MISSING)
        for name, check, default in _SCHEMAS[type_name].fields
    )
