"""The payloads published on Redis pub/sub: their one specification.

Every payload is one ASCII letter naming its kind, then the kind's fields:

=====  ================================  ==============  =========================
Kind   Payload                           Channel         Published by
=====  ================================  ==============  =========================
``E``  ``E<offset> <event JSON>``        a room's        ``tip.lua``,
                                                         ``tip_item.lua``,
                                                         ``money_lib.lua``
                                                         (a goal's), and
                                                         ``room_event.lua``
``P``  ``P``                             a room's        ``RoomStore`` (gateway)
``B``  ``B<balance>``                    a user's        every money script
                                                         but ``hold.lua``,
                                                         ``ticket.lua`` and
                                                         ``payout.lua``
``D``  ``D<inbox offset> <event JSON>``  a user's        ``dm.lua``,
                                                         ``user_event.lua``
``C``  ``C<tx> <tx> ...``                ledger:commits  ``LedgerWriter``
``R``  ``R<tx> <tx> ...``                ledger:commits  ``LedgerWriter``
``M``  ``M<JSON object>``                moderation      ``Moderation`` (catalog)
``T``  ``T<show>``                       a user's        ``Session`` (gateway)
``L``  ``L<JSON object>``                live            ``Discovery``
=====  ================================  ==============  =========================

The scripts are in ``server/economy/lua/`` and build their payloads in Lua
(a test runs each one and decodes what it published); the channels are named
in ``server/keys.py``. The fields:

- ``E``, a room event: ``offset`` is its id in the room's history stream
  (``ms-seq``: two decimal numbers of at most 20 digits, a Redis stream id);
  the event JSON is the object stored there, without ``offset`` and ``ts``,
  which subscribers add (``gateway.rooms.complete_event``).
- ``P``: the room's presence changed; subscribers recount its viewers.
- ``B``: the user's balance after someone else's action changed it: tokens,
  a decimal integer as Lua writes it (no sign but a minus, no leading zero)
  of at most 19 digits (Redis keeps it in 64 bits).
- ``D``, a direct message: its id in the recipient's inbox stream (``ms-seq``)
  and the complete ``dm`` event, as stored there.
- ``M``, a moderation change (issue #12): a JSON object with ``op`` and the
  op's fields (``server/catalog/moderation.py``, ``ModerationNews``), on
  the one moderation channel every node subscribes to, so every node hears
  every change (they are rare) and keeps its in-process copy of the rules
  current; Postgres holds the change itself.
- ``T``, a ticket bought: the user now holds a ticket to the ticket show
  ``show`` (printable ASCII without a space, at most 64 bytes), so every
  session of theirs, on every node, lets the show's events through at once,
  not only the session that bought it (after the purchase; a lost ``T``
  costs only that wait until the session's next join).
- ``C`` and ``R``: transactions the ledger committed (or found committed),
  and transactions Postgres refused and the writer parked
  (``server/ledger/confirmations.py`` wakes the spends waiting on them). The
  ids are separated by one space, so an id is printable ASCII without a space;
  ``encode`` leaves out any other id: no spend waits on one (the economy's are
  32 hex digits), and the writer must still publish the others.

A paid action's ``Delivery`` (``server/economy/actions.py``) is one of these:
``ROOM_EVENT`` publishes ``E``, ``USER_INBOX`` publishes ``D``, and every money
script pushes ``B`` to each user other than its caller whose balance it
changed (both sides of a refund, which an admin makes). A new kind is added
here, with its decoder and the node's handler; a node logs and drops a kind
its channel does not carry.

``decode`` never parses the JSON (the node forwards those bytes to clients on
the fanout path), but checks the framing of every field, so a payload that is
none of these (a bug, or another program publishing on the same Redis) is
refused with ``MalformedPayload`` instead of reaching a client or breaking a
node. It does not authenticate: whoever can publish on this Redis can also
publish a well-formed event.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import NamedTuple

# Of a refused payload, this many bytes are quoted in the error: enough to
# recognise it in a log line, without copying a large payload into the log.
QUOTED_BYTES_MAX = 40

_ROOM_EVENT = re.compile(rb"E(\d{1,20}-\d{1,20}) (\{.*\})", re.DOTALL).fullmatch
_DIRECT_MESSAGE = re.compile(rb"D(\d{1,20}-\d{1,20}) (\{.*\})", re.DOTALL).fullmatch
_BALANCE = re.compile(rb"B(0|-?[1-9]\d{0,18})").fullmatch
_TXS = re.compile(rb"[CR]((?:[!-~]+(?: [!-~]+)*)?)").fullmatch
_TX = re.compile(r"[!-~]+").fullmatch
_TICKET = re.compile(rb"T([!-~]{1,64})").fullmatch

# Constructing a NamedTuple through tuple.__new__ skips its Python-level
# __new__: about 80 ns less per room event on the fanout path.
_tuple_new = tuple.__new__


class MalformedPayload(ValueError):
    """A payload that is not one of the kinds in this module's docstring."""


class RoomEvent(NamedTuple):
    """``E``: a room event, as it was appended to the room's history."""

    offset: bytes  # the history stream id, b"ms-seq"
    body: bytes  # a JSON object, without `offset` and `ts`

    def encode(self) -> bytes:
        return b"".join((b"E", self.offset, b" ", self.body))


class PresenceChanged(NamedTuple):
    """``P``: a node's count of sessions in the room changed."""

    def encode(self) -> bytes:
        return b"P"


class BalanceChanged(NamedTuple):
    """``B``: the user's balance, in tokens, after someone else's action."""

    balance: int

    def encode(self) -> bytes:
        return b"B%d" % self.balance


class DirectMessage(NamedTuple):
    """``D``: a DM, as it was appended to the recipient's inbox."""

    offset: bytes  # the inbox stream id, b"ms-seq"
    event: bytes  # the complete `dm` event JSON

    def encode(self) -> bytes:
        return b"".join((b"D", self.offset, b" ", self.event))


class LedgerCommitted(NamedTuple):
    """``C``: transactions whose ledger rows are committed."""

    txs: tuple[str, ...]

    def encode(self) -> bytes:
        return b"C" + _encode_txs(self.txs)


class LedgerParked(NamedTuple):
    """``R``: transactions Postgres refused, parked in ledger_rejected."""

    txs: tuple[str, ...]

    def encode(self) -> bytes:
        return b"R" + _encode_txs(self.txs)


class ModerationChanged(NamedTuple):
    """``M``: a moderation change, a JSON object (server/catalog/moderation.py)."""

    body: bytes

    def encode(self) -> bytes:
        return b"M" + self.body


class TicketBought(NamedTuple):
    """``T``: the user bought a ticket to this ticket show."""

    show: str

    def encode(self) -> bytes:
        return b"T" + self.show.encode("ascii")


class LiveNews(NamedTuple):
    """``L``: a model went live, ``{"model", "ts"}`` (server/discovery.py)."""

    body: bytes

    def encode(self) -> bytes:
        return b"L" + self.body


Message = (
    RoomEvent
    | PresenceChanged
    | BalanceChanged
    | DirectMessage
    | LedgerCommitted
    | LedgerParked
    | ModerationChanged
    | TicketBought
    | LiveNews
)

PRESENCE_CHANGED = PresenceChanged()

_EXPECTED = {
    b"E": "E<ms-seq> <JSON object>",
    b"P": "P alone",
    b"B": "B<integer of at most 19 digits, no leading zero>",
    b"D": "D<ms-seq> <JSON object>",
    b"C": "C<tx> <tx> ..., each tx printable ASCII without a space",
    b"R": "R<tx> <tx> ..., each tx printable ASCII without a space",
    b"M": "M<JSON object>",
    b"T": "T<show id, printable ASCII without a space, at most 64 bytes>",
    b"L": "L<JSON object>",
}


def decode(payload: bytes) -> Message:
    """The message ``payload`` carries; ``MalformedPayload`` if it is none."""
    # Room events first: a node decodes one for every event it fans out.
    match = _ROOM_EVENT(payload)
    if match is not None:
        return _tuple_new(RoomEvent, match.groups())
    kind = payload[:1]
    if kind == b"P":
        if len(payload) == 1:
            return PRESENCE_CHANGED
    elif kind == b"B":
        match = _BALANCE(payload)
        if match is not None:
            return BalanceChanged(int(match[1]))
    elif kind == b"D":
        match = _DIRECT_MESSAGE(payload)
        if match is not None:
            return _tuple_new(DirectMessage, match.groups())
    elif kind == b"M":
        if payload[1:2] == b"{" and payload[-1:] == b"}":
            return ModerationChanged(payload[1:])
    elif kind == b"T":
        match = _TICKET(payload)
        if match is not None:
            return TicketBought(match[1].decode("ascii"))
    elif kind == b"L":
        if payload[1:2] == b"{" and payload[-1:] == b"}":
            return LiveNews(payload[1:])
    elif kind in (b"C", b"R"):
        match = _TXS(payload)
        if match is not None:
            txs = tuple(match[1].decode("ascii").split(" ")) if match[1] else ()
            return LedgerCommitted(txs) if kind == b"C" else LedgerParked(txs)
    raise MalformedPayload(_refusal(payload))


def _refusal(payload: bytes) -> str:
    quoted = repr(payload[:QUOTED_BYTES_MAX]) + ("..." if len(payload) > QUOTED_BYTES_MAX else "")
    expected = _EXPECTED.get(payload[:1])
    if expected is None:
        return f"not a bus payload (no known kind letter): {quoted}"
    return f"malformed {payload[:1].decode()} payload (expected {expected}): {quoted}"


def _encode_txs(txs: Iterable[str]) -> bytes:
    return " ".join(tx for tx in txs if _TX(tx)).encode("ascii")
