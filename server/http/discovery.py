"""HTTP routes of discovery, profiles, follows and notifications (issue #13).

The room listing and a model's profile are public reads (like the room list
before them); following and notifications need a session token.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from tokenchat.protocol.limits import USER_ID_RE

from ..auth import Identity
from ..discovery import (
    FOLLOWS_PAGE_DEFAULT,
    FOLLOWS_PAGE_MAX,
    NOTIFICATIONS_PAGE_DEFAULT,
    NOTIFICATIONS_PAGE_MAX,
    QUERY_LEN_MAX,
    ROOMS_PAGE_DEFAULT,
    ROOMS_PAGE_MAX,
    SORTS,
    TAG_RE,
    RoomCursor,
    check_profile,
    page_cursor,
)
from ..errors import BadRequest, NotFound

if TYPE_CHECKING:
    from ..gateway.node import Node


def discovery_routes(
    node: Node,
    identity_of: Callable[..., Identity],
    limit_creates: Callable[[Identity], None],
) -> list[BaseRoute]:
    from .api import json_body, query_int

    discovery = node.discovery

    def model_path(request: Request, name: str) -> str:
        value = request.path_params[name]
        if not USER_ID_RE.fullmatch(value):
            raise NotFound(f"no model '{value[:64]}'")
        return str(value)

    async def rooms(request: Request) -> Response:
        """GET /v1/rooms?sort=&tag=&q=&cursor=&limit= (sort: viewers by default)."""
        params = request.query_params
        sort = params.get("sort", "viewers")
        if sort not in SORTS:
            raise BadRequest(f"query parameter 'sort' must be one of {', '.join(SORTS)}")
        tag = params.get("tag") or None
        if tag is not None and not TAG_RE.fullmatch(tag):
            raise BadRequest("query parameter 'tag' must be a tag (a-z, 0-9, '-')")
        q = params.get("q") or None
        if q is not None and len(q) > QUERY_LEN_MAX:
            raise BadRequest(f"query parameter 'q' must be at most {QUERY_LEN_MAX} characters")
        raw_cursor = params.get("cursor") or None
        cursor = None if raw_cursor is None else RoomCursor.parse(raw_cursor, sort)
        limit = query_int(request, "limit", ROOMS_PAGE_DEFAULT, 1, ROOMS_PAGE_MAX)
        return JSONResponse(await discovery.rooms(node.rooms.viewers, sort, tag, q, cursor, limit))

    async def put_profile(request: Request) -> Response:
        identity = identity_of(request, "model")
        profile = check_profile(await json_body(request))
        await node.directory.touch_user(identity)
        return JSONResponse(await discovery.set_profile(identity.user_id, profile))

    async def model(request: Request) -> Response:
        """A model's profile with her prices (dm, private) and her tip menu."""
        model_id = model_path(request, "model")
        profile = await discovery.profile(model_id)
        prices = {"dm": await node.economy.dm_price(model_id)}
        prices.update(await node.privates.prices(model_id))
        profile["prices"] = prices
        profile["menu"] = await node.economy.menu(model_id)
        return JSONResponse(profile)

    async def follow(request: Request) -> Response:
        identity = identity_of(request)
        model_id = model_path(request, "model")
        if request.method == "PUT":
            # A follow creates a row and fans a model's live events out to one
            # more user: rate-limited like every create (429 past it).
            limit_creates(identity)
            await node.directory.touch_user(identity)
            await discovery.follow(identity.user_id, model_id)
        else:
            await discovery.unfollow(identity.user_id, model_id)
        return JSONResponse({"model": model_id, "following": request.method == "PUT"})

    async def follows(request: Request) -> Response:
        identity = identity_of(request)
        cursor = request.query_params.get("cursor", "")
        if cursor and not USER_ID_RE.fullmatch(cursor):
            raise BadRequest("query parameter 'cursor' must be a cursor a previous page gave")
        limit = query_int(request, "limit", FOLLOWS_PAGE_DEFAULT, 1, FOLLOWS_PAGE_MAX)
        return JSONResponse(await discovery.follows(identity.user_id, cursor, limit))

    async def notifications(request: Request) -> Response:
        identity = identity_of(request)
        raw = request.query_params.get("cursor")
        cursor = page_cursor(raw, digits_max=18) if raw else None
        limit = query_int(request, "limit", NOTIFICATIONS_PAGE_DEFAULT, 1, NOTIFICATIONS_PAGE_MAX)
        return JSONResponse(await discovery.notifications(identity.user_id, cursor, limit))

    return [
        Route("/v1/rooms", rooms),
        Route("/v1/me/profile", put_profile, methods=["PUT"]),
        Route("/v1/models/{model}", model),
        Route("/v1/me/follows/{model}", follow, methods=["PUT", "DELETE"]),
        Route("/v1/me/follows", follows),
        Route("/v1/me/notifications", notifications),
    ]
