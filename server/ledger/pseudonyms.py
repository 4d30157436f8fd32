"""A deleted user's id, wherever a view would show it, becomes her pseudonym.

The ledger is append-only (migration 0002's triggers), so a deleted user's
id stays in it: as a posting's account (``u:<id>``), an initiator, and as a
value in transactions' meta (the ``room`` of a tip, the ``to`` of a DM, the
``from``/``to`` of a request, the ``fan`` of a ticket refund...). Workflow
rows that the books still need (requests, private shows, payouts) keep it
too, referencing ``users``. None of them is rewritten; what is shown is.

``Pseudonyms.scrub`` takes a view's JSON value and replaces every string
that IS a deleted user's id, or her account ``u:<id>``, by her pseudonym
(``deleted_users``, migration 0019), wherever it is the value of a field
that names a user (``USER_FIELDS``: ``room``, ``to``, ``from``, ``model``,
``fan``, ``counterparty``, ``initiator``, a posting's ``account``...), or a
string in a list under one. Only there: a user may be called ``tip`` or
``paid``, and a ``kind`` or a ``state`` must stay what it is. Exact matches
only: free text a user wrote is not searched (the account's own texts are
deleted with it: server/http/accounts.py).

``pseudonymised`` wraps the routes of the views that show other users' ids
(``PSEUDONYMISED_PATHS``) so every reply they give goes through ``scrub``:
one indexed lookup per reply, of the strings it holds, bounded by the reply.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

import asyncpg
import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from ..errors import Unavailable

_DB_ERRORS = (asyncpg.PostgresError, OSError, asyncio.TimeoutError)
USER_ACCOUNT_PREFIX = "u:"
# A user id is at most 64 characters (the contract), its account 66: longer
# strings are never looked up.
CANDIDATE_LEN_MAX = 66

# The JSON views that may name another user (docs/protocol.md, "Deleted
# accounts"): the ledger's (transactions, receipts, the admin's user views,
# refunds), the workflows' (requests, private shows, payouts), discovery,
# standing, follows and notifications, moderation and reports.
PSEUDONYMISED_PATHS = frozenset(
    {
        "/v1/me/transactions",
        "/v1/me/transactions/{tx}",
        "/v1/me/requests",
        "/v1/me/privates",
        "/v1/me/payouts",
        "/v1/me/follows",
        "/v1/me/notifications",
        "/v1/me/earnings",
        "/v1/me/moderators",
        "/v1/me/blocks",
        "/v1/me/dms",
        "/v1/rooms",
        "/v1/rooms/{room}/leaderboard",
        "/v1/rooms/{room}/shows",
        "/v1/rooms/{room}/goal",
        "/v1/models/{model}",
        "/v1/admin/users",
        "/v1/admin/users/{user}",
        "/v1/admin/users/{user}/transactions",
        "/v1/admin/refunds",
        "/v1/admin/payouts",
        "/v1/admin/reports",
        "/v1/admin/audit",
        "/v1/admin/flags",
        "/v1/admin/stats",
    }
)


# The fields whose value is a user (or a room, which is its model's id, or a
# ledger account or initiator, `u:<id>`) in the views below, meta included.
USER_FIELDS = frozenset(
    {
        "id",
        "user",
        "user_id",
        "users",
        "room",
        "owner",
        "model",
        "fan",
        "to",
        "from",
        "counterparty",
        "initiator",
        "account",
        "by",
        "by_user",
        "decided_by",
        "reporter",
        "reported",
        "sender",
        "recipient",
        "follower",
        "blocked",
        "blocker",
        "king",
        "target",
        "actor",
        "party",
        "payer",
        "payee",
        "members",
        "moderators",
    }
)


class Pseudonyms:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def aliases(self, users: Iterable[str]) -> dict[str, str]:
        """Deleted users among ``users`` and their pseudonyms."""
        wanted = sorted(set(users))
        if not wanted:
            return {}
        try:
            rows = await self._pool.fetch(
                "SELECT user_id, pseudonym FROM deleted_users WHERE user_id = ANY($1::text[])",
                wanted,
            )
        except _DB_ERRORS as exc:
            raise Unavailable("pseudonyms are unavailable") from exc
        return {row["user_id"]: row["pseudonym"] for row in rows}

    async def scrub(self, value: Any, seen: dict[str, str | None] | None = None) -> Any:
        """``value`` with every deleted user's id (or account) replaced by her
        pseudonym; ``value`` itself when it names none. ``seen``: what earlier
        calls of one stream looked up already (an export's rows), so each
        string is looked up once."""
        strings: set[str] = set()
        _collect(value, strings)
        users = {s.removeprefix(USER_ACCOUNT_PREFIX) for s in strings}
        if seen is None:
            aliases = await self.aliases(users)
        else:
            new = users - seen.keys()
            found = await self.aliases(new)
            seen.update({user: found.get(user) for user in new})
            aliases = {user: alias for user in users if (alias := seen[user]) is not None}
        if not aliases:
            return value
        accounts = {USER_ACCOUNT_PREFIX + user: alias for user, alias in aliases.items()}
        return _replace(value, aliases | accounts)


def _collect(value: Any, into: set[str], named: bool = False) -> None:
    """The strings of ``value`` that are a user field's (``named``: under
    one), to look up."""
    if isinstance(value, str):
        if named and len(value) <= CANDIDATE_LEN_MAX:
            into.add(value)
    elif isinstance(value, dict):
        for key, item in value.items():
            _collect(item, into, key in USER_FIELDS)
    elif isinstance(value, list):
        for item in value:
            _collect(item, into, named)


def _replace(value: Any, aliases: dict[str, str], named: bool = False) -> Any:
    if isinstance(value, str):
        return aliases.get(value, value) if named else value
    if isinstance(value, dict):
        return {k: _replace(v, aliases, k in USER_FIELDS) for k, v in value.items()}
    if isinstance(value, list):
        return [_replace(item, aliases, named) for item in value]
    return value


def pseudonymised(pseudonyms: Pseudonyms, routes: list[BaseRoute]) -> list[BaseRoute]:
    """``routes`` with those of ``PSEUDONYMISED_PATHS`` answering through
    ``Pseudonyms.scrub`` (JSON replies only; others pass as they are)."""
    return [
        _wrapped(pseudonyms, route)
        if isinstance(route, Route) and route.path in PSEUDONYMISED_PATHS
        else route
        for route in routes
    ]


def _wrapped(pseudonyms: Pseudonyms, route: Route) -> Route:
    endpoint = route.endpoint

    async def scrubbed(request: Request) -> Response:
        response: Response = await endpoint(request)
        # A streamed reply has no body to read here: it passes as it is.
        body = getattr(response, "body", None)
        if response.media_type != "application/json" or not body:
            return response
        data = orjson.loads(body)
        clean = await pseudonyms.scrub(data)
        if clean is data:
            return response
        headers = {
            name: value
            for name, value in response.headers.items()
            if name not in ("content-length", "content-type")
        }
        return Response(
            orjson.dumps(clean),
            status_code=response.status_code,
            headers=headers,
            media_type="application/json",
        )

    methods = None if route.methods is None else sorted(route.methods - {"HEAD"})
    return Route(route.path, scrubbed, methods=methods, name=route.name)
