"""The server's exception tree. Each class maps to one wire code and one HTTP
status, here and nowhere else::

    ServiceError                 (code, http_status)
     ├── Unauthenticated         UNAUTHENTICATED   401
     ├── Forbidden               FORBIDDEN         403
     ├── NotFound                NOT_FOUND         404
     ├── NotInRoom               NOT_IN_ROOM       409
     ├── BadRequest              BAD_REQUEST       400
     ├── Conflict                CONFLICT          409
     │    └── EscrowEmpty        CONFLICT          409  (nothing left to
     │                                                    release or refund)
     ├── InsufficientFunds       INSUFFICIENT_FUNDS 409
     │    ├── SpendLimit         SPEND_LIMIT       409  (the fan's own limit;
     │    │                                              fields window,
     │    │                                              remaining, resets_at)
     │    └── SelfExcluded       SELF_EXCLUDED     403  (fields until)
     ├── PriceChanged            PRICE_CHANGED     409
     ├── RateLimited             RATE_LIMITED      429
     ├── LimitExceeded           LIMIT_EXCEEDED    429
     ├── Restricted              (moderation: carries `until`, ms or None)
     │    ├── Banned             BANNED            403
     │    ├── Muted              MUTED             403
     │    └── SlowMode           SLOW_MODE         429
     ├── CursorExpired           CURSOR_EXPIRED    410  (a listing's cursor
     │                                                   outlived its ranking)
     └── Unavailable             UNAVAILABLE       503  (a backend is down;
                                                         nothing was changed)

Frames the protocol layer rejects raise ``protocol.ProtocolError`` instead;
anything else escaping a command handler is a bug, answered ``INTERNAL``
without details.
"""

from __future__ import annotations

from typing import ClassVar

from tokenchat.protocol import ErrorCode


class ServiceError(Exception):
    code: ClassVar[ErrorCode] = ErrorCode.INTERNAL
    http_status: ClassVar[int] = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
        # Fields the error reply carries besides code and message (SPEND_LIMIT's
        # window, a moderation refusal's until), on WebSocket and HTTP alike.
        self.fields: dict[str, object] = {}


class Unauthenticated(ServiceError):
    code = ErrorCode.UNAUTHENTICATED
    http_status = 401


class Forbidden(ServiceError):
    code = ErrorCode.FORBIDDEN
    http_status = 403


class NotFound(ServiceError):
    code = ErrorCode.NOT_FOUND
    http_status = 404


class NotInRoom(ServiceError):
    code = ErrorCode.NOT_IN_ROOM
    http_status = 409


class BadRequest(ServiceError):
    code = ErrorCode.BAD_REQUEST
    http_status = 400


class Conflict(ServiceError):
    code = ErrorCode.CONFLICT
    http_status = 409


class EscrowEmpty(Conflict):
    """A release or escrow_refund found its escrow empty: the money moved
    already (the escrow workflows treat this as done, not as a failure)."""


class InsufficientFunds(ServiceError):
    code = ErrorCode.INSUFFICIENT_FUNDS
    http_status = 409


class PriceChanged(ServiceError):
    code = ErrorCode.PRICE_CHANGED
    http_status = 409


class RateLimited(ServiceError):
    code = ErrorCode.RATE_LIMITED
    http_status = 429


class LimitExceeded(ServiceError):
    code = ErrorCode.LIMIT_EXCEEDED
    http_status = 429


class CursorExpired(ServiceError):
    code = ErrorCode.CURSOR_EXPIRED
    http_status = 410


class Unavailable(ServiceError):
    code = ErrorCode.UNAVAILABLE
    http_status = 503


class Restricted(ServiceError):
    """A moderation refusal: it says when the restriction ends (``until``,
    ms since the epoch; None: permanent, and left out of the reply)."""

    def __init__(self, message: str, until_ms: int | None) -> None:
        super().__init__(message)
        self.until_ms = until_ms
        if until_ms is not None:
            self.fields = {"until": until_ms}


class Banned(Restricted):
    code = ErrorCode.BANNED
    http_status = 403


class Muted(Restricted):
    code = ErrorCode.MUTED
    http_status = 403


class SlowMode(Restricted):
    code = ErrorCode.SLOW_MODE
    http_status = 429


# Subclasses of InsufficientFunds: whoever copes with a fan who cannot pay
# (a private show's meter ends the show at what she can pay) copes with these
# alike; the wire code says which.
class SpendLimit(InsufficientFunds):
    """A spend over one of the fan's own limits: what that window has left."""

    code = ErrorCode.SPEND_LIMIT
    http_status = 409

    def __init__(self, message: str, *, window: str, remaining: int, resets_at: int) -> None:
        super().__init__(message)
        self.fields = {"window": window, "remaining": remaining, "resets_at": resets_at}


class SelfExcluded(InsufficientFunds):
    """A spend or purchase during the fan's self-exclusion."""

    code = ErrorCode.SELF_EXCLUDED
    http_status = 403

    def __init__(self, message: str, *, until: int) -> None:
        super().__init__(message)
        self.fields = {"until": until}
