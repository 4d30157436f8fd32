"""Session tokens: the secret's length, `exp`'s type and its cap (pure)."""

from __future__ import annotations

import time

import jwt
import pytest

from tokenchat.server.auth import issue_token, verify_token
from tokenchat.server.errors import Unauthenticated

SECRET = "k" * 32
DAY_S = 24 * 3600
WEEK_S = 7 * DAY_S


def _signed(**claims: object) -> str:
    return jwt.encode({"sub": "bob", "role": "fan", **claims}, SECRET, "HS256")


def test_a_token_within_the_cap_is_accepted() -> None:
    token = _signed(exp=int(time.time()) + DAY_S)
    assert verify_token(SECRET, token, ttl_max_s=WEEK_S).user_id == "bob"


SOON = int(time.time()) + 60


@pytest.mark.parametrize("exp", [SOON + 0.5, float(SOON), str(SOON), True])
def test_exp_must_be_an_integer(exp: object) -> None:
    # PyJWT itself accepts a float exp (and refuses the string); this is ours.
    with pytest.raises(Unauthenticated):
        verify_token(SECRET, _signed(exp=exp), ttl_max_s=WEEK_S)


def test_exp_beyond_the_cap_is_refused() -> None:
    far = _signed(exp=int(time.time()) + WEEK_S + 3600)
    with pytest.raises(Unauthenticated, match=f"more than {WEEK_S} s from now"):
        verify_token(SECRET, far, ttl_max_s=WEEK_S)
    # The same token is fine where the operator allows longer tokens.
    assert verify_token(SECRET, far, ttl_max_s=2 * WEEK_S).role == "fan"


def test_issuing_refuses_a_short_secret_and_a_ttl_over_the_cap() -> None:
    with pytest.raises(ValueError, match="at least 32 bytes"):
        issue_token("k" * 31, "bob", "fan")
    with pytest.raises(ValueError, match="ttl must be 1 to"):
        issue_token(SECRET, "bob", "fan", WEEK_S + 1, ttl_max_s=WEEK_S)
    token = issue_token(SECRET, "bob", "fan", WEEK_S, ttl_max_s=WEEK_S)
    assert verify_token(SECRET, token, ttl_max_s=WEEK_S).user_id == "bob"
