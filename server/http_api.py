"""The HTTP API (Starlette): health, readiness, metrics and the user's own data.

Errors use the wire codes: ``{"error": {"code", "message"}}`` with the status
that ``errors.ServiceError`` gives each code.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from redis.exceptions import RedisError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from protocol import ErrorCode

from . import metrics
from .auth import Identity, verify_token
from .errors import ServiceError, Unauthenticated
from .node import Node

# /readyz gives each backend this long to answer before calling it down.
READY_CHECK_TIMEOUT_S = 1.0


class JSONResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def error_response(code: ErrorCode, message: str, status: int) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


def create_app(node: Node) -> Starlette:
    def identity_of(request: Request) -> Identity:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated("send Authorization: Bearer <token>")
        return verify_token(node.settings.jwt_secret, token.strip())

    async def healthz(request: Request) -> Response:
        return JSONResponse({"ok": True})

    async def readyz(request: Request) -> Response:
        checks = {"redis": False, "postgres": False}
        try:
            async with asyncio.timeout(READY_CHECK_TIMEOUT_S):
                checks["redis"] = bool(await node.redis.ping())
        except (RedisError, OSError, TimeoutError):
            pass
        try:
            async with asyncio.timeout(READY_CHECK_TIMEOUT_S):
                checks["postgres"] = await node.pool.fetchval("SELECT 1") == 1
        except (Exception, TimeoutError):  # any failure means "not ready"
            pass
        ready = all(checks.values())
        return JSONResponse({"ok": ready, **checks}, status_code=200 if ready else 503)

    async def metrics_endpoint(request: Request) -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    async def me(request: Request) -> Response:
        identity = identity_of(request)
        await node.directory.touch_user(identity)
        balance = await node.balance_of(identity.user_id)
        user = {"id": identity.user_id, "role": identity.role}
        return JSONResponse({"user": user, "balance": balance})

    async def service_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ServiceError)
        return error_response(exc.code, exc.message, exc.http_status)

    async def not_found(request: Request, exc: Exception) -> Response:
        return error_response(ErrorCode.NOT_FOUND, f"no route {request.url.path}", 404)

    return Starlette(
        routes=[
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            Route("/metrics", metrics_endpoint),
            Route("/v1/me", me),
        ],
        exception_handlers={ServiceError: service_error, 404: not_found},
    )
