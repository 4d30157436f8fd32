"""Session tokens: HS256 JWTs with ``sub``, ``role`` and ``exp`` (DESIGN 3)."""

from __future__ import annotations

import dataclasses
import time
from typing import Literal, cast

import jwt

from protocol.limits import TOKEN_LEN_MAX, USER_ID_RE

from .errors import Unauthenticated

Role = Literal["fan", "model", "admin"]
ROLES: tuple[Role, ...] = ("fan", "model", "admin")
ALGORITHM = "HS256"
# A day: long enough for a demo session, short enough that a leaked token dies.
TOKEN_TTL_DEFAULT_S = 24 * 3600
# Clock skew tolerated between the issuer and this server when checking `exp`.
CLOCK_LEEWAY_S = 5


@dataclasses.dataclass(frozen=True, slots=True)
class Identity:
    user_id: str
    role: Role


def issue_token(secret: str, sub: str, role: str, ttl_s: int = TOKEN_TTL_DEFAULT_S) -> str:
    if not secret:
        raise ValueError("the JWT secret is empty")
    if not USER_ID_RE.fullmatch(sub):
        raise ValueError("sub must be 1-64 characters of A-Z a-z 0-9 _ . : -")
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}")
    if ttl_s <= 0:
        raise ValueError("ttl must be > 0 seconds")
    now = int(time.time())
    claims = {"sub": sub, "role": role, "iat": now, "exp": now + ttl_s}
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


def verify_token(secret: str, token: str) -> Identity:
    """The identity in ``token``, or ``Unauthenticated`` saying what is wrong."""
    if len(token) > TOKEN_LEN_MAX:
        raise Unauthenticated("token too long")
    try:
        claims = jwt.decode(
            token,
            secret,
            algorithms=[ALGORITHM],
            options={"require": ["sub", "role", "exp"]},
            leeway=CLOCK_LEEWAY_S,
        )
    except jwt.ExpiredSignatureError:
        raise Unauthenticated("token expired") from None
    except jwt.InvalidTokenError as exc:
        raise Unauthenticated(f"invalid token: {exc}") from None
    sub, role = claims.get("sub"), claims.get("role")
    if not isinstance(sub, str) or not USER_ID_RE.fullmatch(sub):
        raise Unauthenticated("invalid token: bad sub")
    if role not in ROLES:
        raise Unauthenticated("invalid token: bad role")
    return Identity(sub, cast(Role, role))
