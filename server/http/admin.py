"""The admin page (``/admin``, issue #15 item 6) and the admin routes it reads
that no other module serves (shapes in docs/protocol.md, "Admin").

- ``GET /v1/admin/stats``: live counters, from the sources the Prometheus
  metrics read (this process's registry, or every worker's), and Redis.
- ``GET /v1/admin/users?prefix=``: users whose id starts with a prefix.
- ``GET /v1/admin/users/{user}``: one user, their balance and platform ban.
- ``GET /v1/admin/users/{user}/transactions``: their side of the ledger,
  as ``GET /v1/me/transactions`` gives it to them.
- ``GET /v1/admin/refunds``: the newest refunds.

Every data route needs an admin token; the page itself is static and holds
nothing until one is given.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable
from typing import Any

import asyncpg
from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import BaseRoute, Route

from tokenchat.protocol.limits import USER_ID_RE

from .. import metrics
from ..auth import Identity
from ..catalog.dms import parse_cursor
from ..economy.actions import BY_KIND
from ..errors import BadRequest, NotFound, Unavailable
from ..gateway.node import Node
from .api import PAGE_HEADERS, STATIC_DIR, JSONResponse, query_int

IdentityOf = Callable[..., Identity]
ADMIN_PAGE_PATH = "/admin"
# GET /v1/admin/refunds: rows in one answer, by default and at most.
REFUNDS_LISTED_DEFAULT = 50
REFUNDS_LISTED_MAX = 500

_DB_ERRORS = (asyncpg.PostgresError, OSError, asyncio.TimeoutError)

# Rooms whose viewers one GET /v1/admin/stats reads from Redis: a bound on
# the Redis reads of one poll (the page polls every 2 s).
ROOMS_SCANNED_MAX = 1000


class TipRate:
    """Tips a second over the last ``window_s``, from samples of the tip
    counter taken at each read (the counter only ever grows in a process)."""

    def __init__(self, window_s: float) -> None:
        self._window_s = window_s
        self._samples: collections.deque[tuple[float, float]] = collections.deque()

    def observe(self, now: float, total: float) -> float:
        samples = self._samples
        if samples and total < samples[-1][1]:  # a worker restarted: start over
            samples.clear()
        samples.append((now, total))
        # Keep one sample at or past the window's start, so the span covers it.
        while len(samples) > 2 and samples[1][0] <= now - self._window_s:
            samples.popleft()
        first_t, first_total = samples[0]
        span = now - first_t
        return 0.0 if span <= 0 else (total - first_total) / span


def admin_routes(node: Node, identity_of: IdentityOf) -> list[BaseRoute]:
    settings = node.settings
    tip_rate = TipRate(settings.admin_rate_window_s)

    def user_in_path(request: Request) -> str:
        user = str(request.path_params["user"])
        if not USER_ID_RE.fullmatch(user):
            raise BadRequest("the path must name a user id")
        return user

    async def page(request: Request) -> Response:
        return FileResponse(STATIC_DIR / "admin.html", headers=PAGE_HEADERS)

    async def stats(request: Request) -> Response:
        identity_of(request, "admin")
        tips_total = metrics.sample("tokenchat_commands_total", {"type": "tip", "result": "ok"})
        rate = tip_rate.observe(time.monotonic(), tips_total)
        infos = await node.directory.room_infos(ROOMS_SCANNED_MAX)
        try:
            viewers = await node.rooms.viewers([info.id for info in infos])
            outbox = node.keys.outbox()
            async with node.redis.pipeline(transaction=False) as pipe:
                pipe.xlen(outbox)
                pipe.xrange(outbox, count=1)  # the oldest entry not yet in Postgres
                depth, oldest = await pipe.execute()
        except (RedisError, OSError, TimeoutError) as exc:
            raise Unavailable("Redis is unavailable") from exc
        # An entry leaves the outbox when Postgres has it, so the oldest one
        # left is how far the ledger is behind (its id is its ms in Redis).
        lag_s = 0.0
        if oldest:
            oldest_ms = int(oldest[0][0].decode().partition("-")[0])
            lag_s = max(0.0, time.time() - oldest_ms / 1000)
        return JSONResponse(
            {
                "sessions": int(metrics.sample("tokenchat_sessions_open")),
                "rooms": len(infos),
                "rooms_live": sum(1 for count in viewers if count > 0),
                "viewers": sum(viewers),
                "tips_total": int(tips_total),
                "tips_per_s": round(rate, 3),
                "outbox_depth": int(depth),
                "ledger_lag_s": round(lag_s, 3),
                "ledger_written_total": int(metrics.sample("tokenchat_ledger_entries_total")),
                "ledger_rejected_rows": int(metrics.sample("tokenchat_ledger_rejected_rows")),
                "reconcile_mismatches": int(metrics.sample("tokenchat_reconcile_mismatches")),
                "node": node.id,
                "ts": int(time.time() * 1000),
            }
        )

    async def find_users(request: Request) -> Response:
        identity_of(request, "admin")
        prefix = request.query_params.get("prefix", "")
        if not USER_ID_RE.fullmatch(prefix):
            raise BadRequest("query parameter 'prefix' must be the start of a user id")
        limit = query_int(
            request, "limit", settings.admin_users_listed_max, 1, settings.admin_users_listed_max
        )
        try:
            # The exact id first, then the others in id order.
            rows = await node.pool.fetch(
                """SELECT id, role, created_at, seen_at FROM users
                    WHERE starts_with(id, $1)
                    ORDER BY id <> $1, id LIMIT $2""",
                prefix,
                limit,
            )
        except _DB_ERRORS as exc:
            raise Unavailable("users are unavailable") from exc
        return JSONResponse({"prefix": prefix, "users": [_user_wire(row) for row in rows]})

    async def user(request: Request) -> Response:
        identity_of(request, "admin")
        user_id = user_in_path(request)
        try:
            row = await node.pool.fetchrow(
                "SELECT id, role, created_at, seen_at FROM users WHERE id = $1", user_id
            )
            ban = await node.pool.fetchrow(
                """SELECT until, reason, by_user FROM platform_bans
                    WHERE user_id = $1 AND (until IS NULL OR until > now())""",
                user_id,
            )
            ledger_balance = await node.pool.fetchval(
                "SELECT balance FROM accounts WHERE id = $1", f"u:{user_id}"
            )
            open_reports = await node.pool.fetchval(
                "SELECT count(*) FROM reports WHERE reported = $1 AND state = 'open'", user_id
            )
        except _DB_ERRORS as exc:
            raise Unavailable("users are unavailable") from exc
        if row is None:
            raise NotFound(f"no user '{user_id}'")
        banned = None
        if ban is not None:
            until = ban["until"]
            banned = {
                "until": None if until is None else int(until.timestamp() * 1000),
                "reason": ban["reason"],
                "by": ban["by_user"],
            }
        return JSONResponse(
            {
                "user": _user_wire(row),
                # The hot balance (what a spend sees now) and the ledger's,
                # which trails it by the outbox.
                "balance": await node.balance_of(user_id),
                "ledger_balance": int(ledger_balance or 0),
                "platform_ban": banned,
                "open_reports": int(open_reports),
            }
        )

    async def user_transactions(request: Request) -> Response:
        identity_of(request, "admin")
        user_id = user_in_path(request)
        kind = request.query_params.get("kind") or None
        if kind is not None and kind not in BY_KIND:
            raise BadRequest(f"query parameter 'kind' must be one of {sorted(BY_KIND)}")
        before = parse_cursor(request.query_params.get("before"))
        limit = query_int(
            request, "limit", settings.history_page_default, 1, settings.history_page_max
        )
        page = await node.history.transactions(user_id, kind, before, limit)
        return JSONResponse({"user": user_id, **page})

    async def refunds(request: Request) -> Response:
        identity_of(request, "admin")
        limit = query_int(request, "limit", REFUNDS_LISTED_DEFAULT, 1, REFUNDS_LISTED_MAX)
        try:
            rows = await node.pool.fetch(
                """SELECT r.id, r.reverses, r.initiator, r.applied_ms,
                          o.kind AS original_kind,
                          (SELECT coalesce(sum(p.amount), 0) FROM ledger_postings p
                            WHERE p.tx_id = r.id AND p.amount > 0) AS tokens
                     FROM ledger_transactions r
                     JOIN ledger_transactions o ON o.id = r.reverses
                    WHERE r.kind = 'refund'
                    ORDER BY r.applied_ms DESC, r.id DESC LIMIT $1""",
                limit,
            )
        except _DB_ERRORS as exc:
            raise Unavailable("the ledger is unavailable") from exc
        items = [
            {
                "tx": row["id"],
                "reverses": row["reverses"],
                "original_kind": row["original_kind"],
                "tokens": int(row["tokens"]),
                "initiator": row["initiator"],
                "ts": row["applied_ms"],
                # Who asked: an admin's initiator is their account's name.
                "by": row["initiator"][2:] if row["initiator"].startswith("u:") else None,
            }
            for row in rows
        ]
        return JSONResponse({"refunds": items})

    return [
        Route(ADMIN_PAGE_PATH, page),
        Route("/v1/admin/stats", stats),
        Route("/v1/admin/users", find_users),
        Route("/v1/admin/users/{user}", user),
        Route("/v1/admin/users/{user}/transactions", user_transactions),
        Route("/v1/admin/refunds", refunds),
    ]


def _user_wire(row: asyncpg.Record) -> dict[str, Any]:
    return {
        "id": row["id"],
        "role": row["role"],
        "created_at": int(row["created_at"].timestamp() * 1000),
        "seen_at": int(row["seen_at"].timestamp() * 1000),
    }
