"""Error and close codes of wire contract v1 (DESIGN.md section 3), and the
one exception the protocol layer raises::

    Exception
     └── ProtocolError     (code: ErrorCode, message, re)
                           a frame that cannot be decoded or is not a valid
                           command: BAD_REQUEST or UNKNOWN_COMMAND

The server answers a ``ProtocolError`` with an ``error`` reply and keeps the
session open; the session's own exception tree lives in ``tokenchat.server.errors``.
"""

import enum


class ErrorCode(enum.StrEnum):
    """The ``code`` of an ``error`` reply. Each value equals its name, so the
    wire text is the same in every language and in logs."""

    UNAUTHENTICATED = "UNAUTHENTICATED"
    FORBIDDEN = "FORBIDDEN"
    BAD_REQUEST = "BAD_REQUEST"  # malformed frame, missing or invalid field
    UNKNOWN_COMMAND = "UNKNOWN_COMMAND"
    NOT_FOUND = "NOT_FOUND"
    NOT_IN_ROOM = "NOT_IN_ROOM"
    INSUFFICIENT_FUNDS = "INSUFFICIENT_FUNDS"
    PRICE_CHANGED = "PRICE_CHANGED"  # `max_price` given and exceeded; nothing charged
    CONFLICT = "CONFLICT"  # idempotency key reused with different fields
    RATE_LIMITED = "RATE_LIMITED"
    LIMIT_EXCEEDED = "LIMIT_EXCEEDED"  # a spending cap
    # A fan's own spending limit: `window`, `remaining`, `resets_at` (ms).
    SPEND_LIMIT = "SPEND_LIMIT"
    # A fan's self-exclusion runs: `until` (ms); purchases answer HTTP 403.
    SELF_EXCLUDED = "SELF_EXCLUDED"
    BANNED = "BANNED"
    MUTED = "MUTED"
    # Moderation (issue #12): a chat line sooner than the room's slow mode
    # allows. MUTED, BANNED and SLOW_MODE carry `until` (ms since the epoch;
    # absent: permanent).
    SLOW_MODE = "SLOW_MODE"
    # A listing's cursor (GET /v1/rooms) names a ranking no longer kept:
    # read the first page again. HTTP only (410).
    CURSOR_EXPIRED = "CURSOR_EXPIRED"
    UNAVAILABLE = "UNAVAILABLE"  # a backend is down: nothing was charged
    INTERNAL = "INTERNAL"  # a bug; the message never carries details


class CloseCode(enum.IntEnum):
    """WebSocket close codes the server sends.

    1000-1015 are RFC 6455 section 7.4.1 codes; 4000-4999 are reserved for
    applications (RFC 6455 section 7.4.2) and here mirror HTTP statuses.

    Whether a client should reconnect (the split centrifuge documents too):

    - reconnectable: GOING_AWAY, INTERNAL_ERROR, SERVICE_RESTART (1012, the
      server is restarting) and TOO_SLOW (4008, the client fell behind; it
      reconnects and fills the gap with ``join`` ``since``), with backoff;
      RATE_LIMITED (4029) only after a backoff of several seconds.
    - terminal: UNAUTHENTICATED (4001) and FORBIDDEN (4003) will repeat on a
      retry with the same token, so a client must not retry until it has a
      new token. MESSAGE_TOO_BIG (1009) will repeat if the client resends the
      same frame.
    """

    NORMAL = 1000
    GOING_AWAY = 1001
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    SERVICE_RESTART = 1012
    UNAUTHENTICATED = 4001
    FORBIDDEN = 4003
    TOO_SLOW = 4008
    RATE_LIMITED = 4029


class ProtocolError(Exception):
    """A frame the protocol layer rejects. ``re`` is the command's ``id`` when
    it could be read from the frame, so the ``error`` reply can carry it."""

    def __init__(self, code: ErrorCode, message: str, *, re: int | str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.re = re

    def __repr__(self) -> str:
        return f"ProtocolError({self.code.value}, {self.message!r}, re={self.re!r})"
