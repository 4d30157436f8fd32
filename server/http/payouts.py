"""HTTP routes of payouts (issue #13 section 1 and the verification and
payout method of section 4; shapes in docs/protocol.md, "Payouts").

- ``GET /v1/payout-rule``: the rule in force now (anyone signed in).
- ``GET``/``POST /v1/admin/payout-rules``: every version; add one.
- ``POST``/``DELETE /v1/admin/users/{user}/verify``: an admin (un)verifies a model.
- ``GET``/``PUT /v1/me/payout-method``: what a payout needs, and her method.
- ``POST``/``GET /v1/me/payouts``: ask for a payout; her payouts.
- ``GET /v1/admin/payouts?state=``; ``POST /v1/admin/payouts/{id}/approve``
  and ``/reject``.
- ``GET /v1/me/earnings?from=&to=``: her earnings statement.
- ``GET /v1/admin/liabilities``: tokens by holder, adding up with the mint.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from tokenchat.protocol.commands import KEY
from tokenchat.protocol.limits import USER_ID_RE

from ..auth import Identity
from ..economy.payouts import (
    CENTS_PER_TOKEN_MAX,
    LISTED_STATES,
    MIN_PAYOUT_TOKENS_MAX,
    PAYOUT_TOKENS_MAX,
    REASON_LEN_MAX,
    check_method,
    parse_time,
)
from ..errors import BadRequest, NotFound, ServiceError, Unavailable
from ..gateway.node import Node
from .api import DRAIN_TIMEOUT_S, JSONResponse, json_body, optional_int, wire_field

IdentityOf = Callable[..., Identity]
LimitCreates = Callable[[Identity], None]
# effective_ms: epoch milliseconds up to the year 9999.
EPOCH_MS_MAX = 253_402_300_799_999


def payout_routes(
    node: Node, identity_of: IdentityOf, limit_creates: LimitCreates
) -> list[BaseRoute]:
    payouts = node.payouts

    async def current_rule(request: Request) -> Response:
        identity_of(request)
        rules = await payouts.rules()
        return JSONResponse(rules["current"])

    async def rules(request: Request) -> Response:
        identity_of(request, "admin")
        return JSONResponse(await payouts.rules())

    async def add_rule(request: Request) -> Response:
        identity = identity_of(request, "admin")
        body = await json_body(request)
        rate = body.get("cents_per_token")
        if (
            not isinstance(rate, int | float)
            or isinstance(rate, bool)
            or not 0 <= rate <= CENTS_PER_TOKEN_MAX
        ):
            raise BadRequest(
                f"field 'cents_per_token' must be a number between 0 and {CENTS_PER_TOKEN_MAX}"
            )
        if round(float(rate), 4) != float(rate):
            raise BadRequest("field 'cents_per_token' has at most 4 decimals")
        minimum = optional_int(body, "min_payout_tokens", 1, MIN_PAYOUT_TOKENS_MAX)
        if minimum is None:
            raise BadRequest(
                f"field 'min_payout_tokens' must be an integer between 1 and "
                f"{MIN_PAYOUT_TOKENS_MAX}"
            )
        effective = optional_int(body, "effective_at", 0, EPOCH_MS_MAX)
        if "effective_at" in body and body["effective_at"] is not None and effective is None:
            raise BadRequest("field 'effective_at' must be epoch milliseconds")
        rule = await payouts.add_rule(identity.user_id, float(rate), minimum, effective)
        return JSONResponse(rule, status_code=201)

    async def verify(request: Request) -> Response:
        identity = identity_of(request, "admin")
        user = request.path_params["user"]
        if not USER_ID_RE.fullmatch(user):
            raise NotFound(f"no user '{user}'")
        if request.method == "DELETE":
            return JSONResponse(await payouts.unverify(user))
        return JSONResponse(await payouts.verify(identity.user_id, user))

    async def payout_method(request: Request) -> Response:
        identity = identity_of(request, "model")
        await node.directory.touch_user(identity)
        if request.method == "PUT":
            method = check_method(await json_body(request))
            await payouts.set_method(identity.user_id, method)
        return JSONResponse(await payouts.status(identity.user_id))

    async def my_payouts(request: Request) -> Response:
        identity = identity_of(request, "model")
        if request.method == "GET":
            return JSONResponse({"payouts": await payouts.list_for(identity.user_id)})
        limit_creates(identity)
        body = await json_body(request)
        tokens = optional_int(body, "tokens", 1, PAYOUT_TOKENS_MAX)
        if tokens is None:
            raise BadRequest(f"field 'tokens' must be an integer between 1 and {PAYOUT_TOKENS_MAX}")
        key: str = wire_field(body, "key", KEY)
        await node.directory.touch_user(identity)
        reply = await payouts.request(identity.user_id, tokens, key)
        return JSONResponse(reply, status_code=200 if reply.get("duplicate") else 201)

    async def admin_payouts(request: Request) -> Response:
        identity_of(request, "admin")
        state = request.query_params.get("state") or None
        if state is not None and state not in LISTED_STATES:
            raise BadRequest(f"query parameter 'state' must be one of {list(LISTED_STATES)}")
        return JSONResponse({"payouts": await payouts.list_all(state)})

    async def approve(request: Request) -> Response:
        identity = identity_of(request, "admin")
        return JSONResponse(await payouts.approve(identity.user_id, request.path_params["id"]))

    async def reject(request: Request) -> Response:
        identity = identity_of(request, "admin")
        reason: Any = None
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > 0:  # the reason is optional, and so is a body
            reason = (await json_body(request)).get("reason")
        # Kept in Postgres, which refuses NUL in text: refused here instead.
        if reason is not None and (
            not isinstance(reason, str) or len(reason) > REASON_LEN_MAX or "\x00" in reason
        ):
            raise BadRequest(
                f"field 'reason' must be text of at most {REASON_LEN_MAX} characters, "
                "without NUL (U+0000)"
            )
        return JSONResponse(
            await payouts.reject(identity.user_id, request.path_params["id"], reason)
        )

    async def earnings(request: Request) -> Response:
        identity = identity_of(request, "model")
        start = parse_time(request.query_params.get("from"), "from")
        end = parse_time(request.query_params.get("to"), "to")
        await drain()  # the statement reads the ledger: what Redis applied first
        return JSONResponse(await payouts.earnings(identity.user_id, start, end))

    async def liabilities(request: Request) -> Response:
        identity_of(request, "admin")
        pending = await drain()
        reply = await payouts.liabilities()
        return JSONResponse({**reply, "pending": pending})

    async def drain() -> int:
        try:
            return await node.ledger.drain(DRAIN_TIMEOUT_S)
        except (Exception, TimeoutError) as exc:
            if isinstance(exc, ServiceError):
                raise
            raise Unavailable("the ledger is unavailable") from exc

    return [
        Route("/v1/payout-rule", current_rule),
        Route("/v1/admin/payout-rules", rules, methods=["GET"]),
        Route("/v1/admin/payout-rules", add_rule, methods=["POST"]),
        Route("/v1/admin/users/{user}/verify", verify, methods=["POST", "DELETE"]),
        Route("/v1/me/payout-method", payout_method, methods=["GET", "PUT"]),
        Route("/v1/me/payouts", my_payouts, methods=["GET", "POST"]),
        Route("/v1/admin/payouts", admin_payouts),
        Route("/v1/admin/payouts/{id}/approve", approve, methods=["POST"]),
        Route("/v1/admin/payouts/{id}/reject", reject, methods=["POST"]),
        Route("/v1/me/earnings", earnings),
        Route("/v1/admin/liabilities", liabilities),
    ]
