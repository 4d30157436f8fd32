"""HTTP routes of standing (issue #12): a room's leaderboard and the tiers.

Both are public reads, like the room list: who supports a model is shown in
her room to anyone who joins it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from tokenchat.protocol.limits import USER_ID_RE

from ..errors import NotFound

if TYPE_CHECKING:
    from ..gateway.node import Node


def standing_routes(node: Node) -> list[BaseRoute]:
    async def leaderboard(request: Request) -> Response:
        room = request.path_params["room"]
        if not USER_ID_RE.fullmatch(room) or await node.directory.room(room) is None:
            raise NotFound(f"no room '{room}'")
        window = request.query_params.get("window", "12h")
        return JSONResponse(await node.standing.leaderboard(room, window))

    async def tiers(request: Request) -> Response:
        return JSONResponse(node.standing.tier_names())

    return [
        Route("/v1/rooms/{room}/leaderboard", leaderboard),
        Route("/v1/tiers", tiers),
    ]
