"""HTTP routes of receipts, DM history, blocks and reports (issue #12
sections 6 and 7; shapes in docs/protocol.md, "Receipts and history").

- ``GET /v1/me/transactions?kind=&before=&limit=``: the caller's side of
  their ledger transactions, newest first, paged by an opaque cursor.
- ``GET /v1/me/transactions/{tx}``: a receipt, for its parties and admins.
- ``GET /v1/me/dms?with=USER&before=&limit=``: a DM conversation.
- ``GET /v1/me/blocks``, ``PUT``/``DELETE /v1/me/blocks/{user}``.
- ``POST /v1/reports``; ``GET /v1/admin/reports``,
  ``POST /v1/admin/reports/{id}/resolve``.
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from tokenchat.protocol.commands import TX_ID
from tokenchat.protocol.limits import USER_ID_RE

from ..auth import Identity
from ..catalog.dms import parse_cursor
from ..catalog.reports import STATES
from ..economy.actions import BY_KIND
from ..errors import BadRequest, NotFound
from ..gateway.node import Node
from .api import JSONResponse, json_body, query_int

IdentityOf = Callable[..., Identity]
LimitCreates = Callable[[Identity], None]
# The largest report id a path or cursor may name (bigserial).
REPORT_ID_MAX = 2**63 - 1


def history_routes(
    node: Node, identity_of: IdentityOf, limit_creates: LimitCreates
) -> list[BaseRoute]:
    settings = node.settings

    def page_limit(request: Request) -> int:
        return query_int(
            request, "limit", settings.history_page_default, 1, settings.history_page_max
        )

    async def transactions(request: Request) -> Response:
        identity = identity_of(request)
        kind = request.query_params.get("kind") or None
        # The ledger's kinds, as the registry names their owners (actions.BY_KIND).
        if kind is not None and kind not in BY_KIND:
            raise BadRequest(f"query parameter 'kind' must be one of {sorted(BY_KIND)}")
        before = parse_cursor(request.query_params.get("before"))
        limit = page_limit(request)
        return JSONResponse(await node.history.transactions(identity.user_id, kind, before, limit))

    async def receipt(request: Request) -> Response:
        identity = identity_of(request)
        tx = request.path_params["tx"]
        if not TX_ID.accept(tx):
            raise NotFound(f"no transaction '{tx[:64]}' of yours")
        return JSONResponse(
            await node.history.receipt(identity.user_id, tx, admin=identity.role == "admin")
        )

    async def dms(request: Request) -> Response:
        identity = identity_of(request)
        other = request.query_params.get("with", "")
        if not USER_ID_RE.fullmatch(other):
            raise BadRequest("query parameter 'with' must be a user id")
        before = parse_cursor(request.query_params.get("before"))
        limit = page_limit(request)
        return JSONResponse(
            await node.dm_archive.conversation(identity.user_id, other, before, limit)
        )

    async def blocks(request: Request) -> Response:
        identity = identity_of(request)
        return JSONResponse({"blocks": await node.blocks.list_for(identity.user_id)})

    async def block(request: Request) -> Response:
        identity = identity_of(request)
        limit_creates(identity)
        await node.directory.touch_user(identity)
        return JSONResponse(await node.blocks.block(identity.user_id, request.path_params["user"]))

    async def unblock(request: Request) -> Response:
        identity = identity_of(request)
        return JSONResponse(
            await node.blocks.unblock(identity.user_id, request.path_params["user"])
        )

    async def report(request: Request) -> Response:
        identity = identity_of(request)
        limit_creates(identity)
        body = await json_body(request)
        await node.directory.touch_user(identity)
        filed = await node.reports.file(
            identity.user_id, body.get("user"), body.get("message"), body.get("reason")
        )
        return JSONResponse(filed, status_code=201)

    async def admin_reports(request: Request) -> Response:
        identity_of(request, "admin")
        state = request.query_params.get("state", "open")
        if state not in STATES:
            raise BadRequest(f"query parameter 'state' must be one of {list(STATES)}")
        before = request.query_params.get("before")
        cursor = None if not before else query_int(request, "before", 0, 1, REPORT_ID_MAX)
        return JSONResponse(await node.reports.queue(state, cursor, page_limit(request)))

    async def resolve(request: Request) -> Response:
        identity = identity_of(request, "admin")
        raw = request.path_params["report"]
        if not (raw.isascii() and raw.isdigit() and len(raw) <= 18):
            raise NotFound(f"no report '{raw[:32]}'")
        body = await json_body(request)
        return JSONResponse(
            await node.reports.resolve(int(raw), identity.user_id, body.get("resolution"))
        )

    return [
        Route("/v1/me/transactions", transactions),
        Route("/v1/me/transactions/{tx}", receipt),
        Route("/v1/me/dms", dms),
        Route("/v1/me/blocks", blocks),
        Route("/v1/me/blocks/{user}", block, methods=["PUT"]),
        Route("/v1/me/blocks/{user}", unblock, methods=["DELETE"]),
        Route("/v1/reports", report, methods=["POST"]),
        Route("/v1/admin/reports", admin_reports),
        Route("/v1/admin/reports/{report}/resolve", resolve, methods=["POST"]),
    ]
