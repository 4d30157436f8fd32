"""Session tokens: HS256 JWTs with ``sub``, ``role`` and ``exp`` (DESIGN 3)."""

from __future__ import annotations

import dataclasses
import time
from typing import Literal, cast

import jwt

from tokenchat.protocol.limits import TOKEN_LEN_MAX, USER_ID_RE

from .errors import Unauthenticated

Role = Literal["fan", "model", "admin"]
ROLES: tuple[Role, ...] = ("fan", "model", "admin")
ALGORITHM = "HS256"
# A day: long enough for a demo session, short enough that a leaked token dies.
TOKEN_TTL_DEFAULT_S = 24 * 3600
# The default cap on a token's lifetime (TOKENCHAT_TOKEN_TTL_MAX_S).
TOKEN_TTL_MAX_DEFAULT_S = 7 * 24 * 3600
# Clock skew tolerated between the issuer and this server when checking `exp`.
CLOCK_LEEWAY_S = 5
# RFC 7518 section 3.2: an HS256 key must be at least as long as the hash
# output (256 bits). A shorter one can be brute-forced offline from any token.
JWT_SECRET_BYTES_MIN = 32


@dataclasses.dataclass(frozen=True, slots=True)
class Identity:
    user_id: str
    role: Role


def issue_token(
    secret: str,
    sub: str,
    role: str,
    ttl_s: int = TOKEN_TTL_DEFAULT_S,
    *,
    ttl_max_s: int = TOKEN_TTL_MAX_DEFAULT_S,
) -> str:
    if len(secret.encode()) < JWT_SECRET_BYTES_MIN:
        raise ValueError(f"the JWT secret must be at least {JWT_SECRET_BYTES_MIN} bytes")
    if not USER_ID_RE.fullmatch(sub):
        raise ValueError("sub must be 1-64 characters of A-Z a-z 0-9 _ . : -")
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}")
    if not 0 < ttl_s <= ttl_max_s:
        raise ValueError(f"ttl must be 1 to {ttl_max_s} seconds (TOKENCHAT_TOKEN_TTL_MAX_S)")
    now = int(time.time())
    claims = {"sub": sub, "role": role, "iat": now, "exp": now + ttl_s}
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


def verify_token(secret: str, token: str, *, ttl_max_s: int) -> Identity:
    """The identity in ``token``, or ``Unauthenticated`` saying what is wrong.

    ``exp`` must be an integer (PyJWT also takes a float) no further than
    ``ttl_max_s`` from now: a token cannot grant itself a long life."""
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
    exp = claims["exp"]
    if not isinstance(exp, int) or isinstance(exp, bool):
        raise Unauthenticated("invalid token: exp must be an integer")
    if exp - time.time() > ttl_max_s + CLOCK_LEEWAY_S:
        raise Unauthenticated(f"invalid token: it expires more than {ttl_max_s} s from now")
    sub, role = claims.get("sub"), claims.get("role")
    if not isinstance(sub, str) or not USER_ID_RE.fullmatch(sub):
        raise Unauthenticated("invalid token: bad sub")
    if role not in ROLES:
        raise Unauthenticated("invalid token: bad role")
    return Identity(sub, cast(Role, role))
