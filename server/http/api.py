"""The HTTP API (Starlette): health, readiness, metrics, the user's own data and
the demo page (``client_demo/static``, served at ``/`` and ``/static/``).

Errors use the wire codes: ``{"error": {"code", "message"}}`` with the status
that ``errors.ServiceError`` gives each code.
"""

from __future__ import annotations

import importlib.util
import logging
import re
import urllib.parse
from pathlib import Path
from typing import Any

import asyncpg
import orjson
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

from tokenchat.protocol import ErrorCode, WireField
from tokenchat.protocol.commands import (
    AMOUNT,
    EPOCH_MS,
    GOAL_TARGET,
    GOAL_TITLE,
    ITEM_REF,
    KEY,
    MENU_LABEL,
    PAYMENT_REF,
    SHOW_MIN_S,
    SHOW_TITLE,
    TX_ID,
)
from tokenchat.protocol.limits import (
    AMOUNT_MAX,
    AMOUNT_MIN,
    CHAT_MIN_BALANCE_MAX,
    CHAT_REQUIRES,
    MENU_ITEMS_MAX,
    PRIVATE_MIN_S_MAX,
    RESTRICTION_S_MAX,
    SLOW_S_MAX,
    USER_ID_RE,
)

from .. import metrics
from ..auth import TOKEN_TTL_DEFAULT_S, Identity, issue_token, verify_token
from ..catalog.moderation import AUDIT_PAGE_DEFAULT, AUDIT_PAGE_MAX, append_audit
from ..config import Settings
from ..economy.economy import PAYMENTS_INITIATOR, MenuItem, new_tx_id, user_initiator
from ..economy.limits import EXCLUSION_DAYS_MAX, LIMIT_MAX, REALITY_CHECK_MIN_MAX, WINDOW_NAMES
from ..errors import (
    BadRequest,
    Banned,
    Conflict,
    Forbidden,
    NotFound,
    RateLimited,
    ServiceError,
    Unauthenticated,
    Unavailable,
)
from ..gateway.gateway import WS_PATH
from ..gateway.health import HEALTHY, HEALTHZ_PATH, READYZ_PATH, readiness
from ..gateway.node import Node
from ..ledger.pseudonyms import Pseudonyms, pseudonymised
from ..ledger.writer import parked_entries, reconcile
from ..ratelimit import KeyedLimiter
from .forwarded import FORWARDED_HOST_SCOPE_KEY, FORWARDED_SCOPE_KEY, ForwardedHeaders
from .payments import provider_named

log = logging.getLogger(__name__)

# A platform ban's reason, as an admin types it (the column's bound).
BAN_REASON_LEN_MAX = 500  # characters
# Largest request body: every body here is a few small fields.
BODY_SIZE_MAX_BYTES = 16 * 1024
PRICE_MAX = 1_000_000  # tokens, the contract's amount range
# How long a refund or reconcile waits for the outbox to reach Postgres.
DRAIN_TIMEOUT_S = 10.0
# GET /v1/admin/ledger/rejected: rows in one answer (each holds an entry of a
# few KiB at most), by default and at most.
PARKED_LISTED_DEFAULT = 100
PARKED_LISTED_MAX = 1000
# GET /v1/rooms: server/http/discovery.py (issue #13: sorts, filters, pages).


def _demo_page_dir() -> Path:
    """The demo page's files, shipped as data of ``tokenchat.client_demo``.

    ``find_spec`` locates the package's folder without running its code, so the
    server serves the page without importing the client (dependencies point one
    way: client_demo -> protocol, server -> protocol).
    """
    spec = importlib.util.find_spec("tokenchat.client_demo")
    assert spec is not None and spec.submodule_search_locations, "tokenchat.client_demo"
    return Path(next(iter(spec.submodule_search_locations))) / "static"


STATIC_DIR = _demo_page_dir()
# The JavaScript client package (client_demo/js), served at /js/ for the page
# (static/app.js imports /js/tokenchat.js) and for other pages of this origin.
CLIENT_JS_DIR = STATIC_DIR.parent / "js"
# The page loads only its own files and talks to the gateway (another port).
PAGE_HEADERS = {
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": (
        "default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:; "
        "style-src 'self'; script-src 'self'; object-src 'none'; base-uri 'none'; "
        "frame-ancestors 'none'"
    ),
}
# A Host header (or X-Forwarded-Host) that may go into the URL /v1/config names:
# a DNS name or an IPv4 address, or an IPv6 literal in brackets, and a port.
HOST_HEADER_RE = re.compile(
    r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252}))(:[0-9]{1,5})?"
)
# Roles POST /v1/dev/token hands out; admin tokens never come from a web page.
DEV_TOKEN_ROLES = ("fan", "model")
# Host names POST /v1/dev/token answers besides the configured host: a page on
# another origin that rebinds its DNS name to 127.0.0.1 still sends its own
# name as Host, and is refused (DNS rebinding).
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
# Users whose HTTP create rate is tracked at once (memory bound; the least
# recently seen is dropped past it).
CREATE_LIMITED_USERS_MAX = 100_000


class _StaticFiles(StaticFiles):
    """Static files revalidated on every load, so a new version is never stale."""

    def file_response(
        self, full_path: Any, stat_result: Any, scope: Scope, status_code: int = 200
    ) -> Response:
        response = super().file_response(full_path, stat_result, scope, status_code)
        response.headers.update(PAGE_HEADERS)
        return response


class JSONResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def error_response(
    code: ErrorCode, message: str, status: int, fields: dict[str, Any] | None = None
) -> JSONResponse:
    # `fields`: what the error carries besides (SPEND_LIMIT's window, ...).
    error = {"code": code, "message": message, **(fields or {})}
    return JSONResponse({"error": error}, status_code=status)


def create_app(node: Node) -> Starlette:
    provider = provider_named(node.settings.payment_provider)
    creates = KeyedLimiter(
        node.settings.http_creates_per_s,
        node.settings.http_creates_burst,
        CREATE_LIMITED_USERS_MAX,
    )

    def limit_creates(identity: Identity) -> None:
        """Every endpoint that creates something calls this first."""
        if not creates.take(identity.user_id):
            raise RateLimited(
                f"at most {node.settings.http_creates_burst} at once and "
                f"{node.settings.http_creates_per_s:g} per second; try again later"
            )

    def identity_of(request: Request, *roles: str) -> Identity:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated("send Authorization: Bearer <token>")
        identity = verify_token(
            node.settings.jwt_secret, token.strip(), ttl_max_s=node.settings.token_ttl_max_s
        )
        if roles and identity.role not in roles:
            raise Forbidden(f"this needs the role {' or '.join(roles)}")
        # A platform-banned user is refused every call (this node's copy of
        # the bans, kept current by the moderation channel).
        banned = node.moderation.platform_ban_cached(identity.user_id)
        if banned is not False:
            raise Banned("you are banned from this platform", banned)
        return identity

    async def healthz(request: Request) -> Response:
        return JSONResponse(HEALTHY)

    async def readyz(request: Request) -> Response:
        status, body = await readiness(node)
        return JSONResponse(body, status_code=status)

    async def metrics_endpoint(request: Request) -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    async def me(request: Request) -> Response:
        identity = identity_of(request)
        await node.directory.touch_user(identity)
        balance = await node.balance_of(identity.user_id)
        user = {"id": identity.user_id, "role": identity.role}
        return JSONResponse({"user": user, "balance": balance})

    async def my_requests(request: Request) -> Response:
        """The caller's custom requests, as fan and as model, newest first."""
        identity = identity_of(request)
        return JSONResponse({"requests": await node.requests.list_for(identity.user_id)})

    async def my_privates(request: Request) -> Response:
        """The caller's private shows, as fan and as model, newest first."""
        identity = identity_of(request)
        return JSONResponse({"privates": await node.privates.list_for(identity.user_id)})

    # --- ticket shows (server/economy/shows.py) --------------------------------------
    async def create_show(request: Request) -> Response:
        """A model schedules a ticket show in her room."""
        identity = identity_of(request, "model")
        limit_creates(identity)
        body = await json_body(request)
        title: str = wire_field(body, "title", SHOW_TITLE)
        price: int = wire_field(body, "price", AMOUNT)
        starts_at: int = wire_field(body, "starts_at", EPOCH_MS)
        min_s: int = wire_field(body, "min_s", SHOW_MIN_S)
        await node.directory.touch_user(identity)
        show = await node.shows.create(identity.user_id, title, price, starts_at, min_s)
        return JSONResponse(show, status_code=201)

    async def room_shows(request: Request) -> Response:
        room = request.path_params["room"]
        if not USER_ID_RE.fullmatch(room):
            raise NotFound(f"no room '{room}'")
        return JSONResponse({"shows": await node.shows.list_room(room)})

    def show_transition(name: str) -> Any:
        async def transition(request: Request) -> Response:
            identity = identity_of(request, "model")
            show_id = request.path_params["show"]
            move = getattr(node.shows, name)
            return JSONResponse(await move(identity.user_id, show_id))

        return transition

    async def buy_ticket(request: Request) -> Response:
        identity = identity_of(request, "fan")
        body = await json_body(request)
        key: str = wire_field(body, "key", KEY)
        room = request.path_params["room"]
        if not USER_ID_RE.fullmatch(room):
            raise NotFound(f"no room '{room}'")
        await node.directory.touch_user(identity)
        reply = await node.economy.ticket(identity.user_id, room, request.path_params["show"], key)
        return JSONResponse(reply)

    # --- tip goals (server/economy/goals.py) -----------------------------------------
    async def set_goal(request: Request) -> Response:
        """A model sets her room's tip goal: {title, target, deadline?,
        all_or_nothing?}; CONFLICT while one is active."""
        identity = identity_of(request, "model")
        limit_creates(identity)
        body = await json_body(request)
        title: str = wire_field(body, "title", GOAL_TITLE)
        target: int = wire_field(body, "target", GOAL_TARGET)
        deadline = body.get("deadline")
        if deadline is not None and not EPOCH_MS.accept(deadline):
            raise BadRequest(f"field 'deadline' must be {EPOCH_MS.describe}")
        all_or_nothing = body.get("all_or_nothing", False)
        if not isinstance(all_or_nothing, bool):
            raise BadRequest("field 'all_or_nothing' must be true or false")
        await node.directory.touch_user(identity)
        goal = await node.goals.set(identity.user_id, title, target, deadline, all_or_nothing)
        return JSONResponse({"goal": goal})

    async def delete_goal(request: Request) -> Response:
        """The model removes her room's goal; an active all-or-nothing
        goal's held tips go back to their fans."""
        identity = identity_of(request, "model")
        return JSONResponse(await node.goals.delete(identity.user_id))

    async def room_goal(request: Request) -> Response:
        room = request.path_params["room"]
        if not USER_ID_RE.fullmatch(room):
            raise NotFound(f"no room '{room}'")
        if await node.directory.room(room) is None:
            raise NotFound(f"no room '{room}'")
        return JSONResponse({"room": room, "goal": await node.goals.current(room)})

    async def bundles(request: Request) -> Response:
        return JSONResponse({"bundles": bundle_list(node)})

    async def purchase(request: Request) -> Response:
        identity = identity_of(request, "fan")
        limit_creates(identity)
        body = await json_body(request)
        bundle_id = field(body, "bundle", str)
        payment_ref: str = wire_field(body, "payment_ref", PAYMENT_REF)
        bundle = next((b for b in bundle_list(node) if b["id"] == bundle_id), None)
        if bundle is None:
            raise NotFound(f"no bundle '{bundle_id}'")
        await node.directory.touch_user(identity)
        # A self-excluded fan is refused before any payment is taken.
        await node.economy.limits.check_purchase(identity.user_id)
        await provider.confirm(identity.user_id, bundle_id, bundle["price_cents"], payment_ref)
        return JSONResponse(await credit_purchase(identity.user_id, bundle, payment_ref))

    async def credit_purchase(
        user_id: str, bundle: dict[str, Any], payment_ref: str
    ) -> dict[str, Any]:
        """Credit a confirmed payment's bundle once per payment_ref: POST
        /v1/purchases and the provider's `payment.confirmed` webhook alike."""
        bundle_id = bundle["id"]
        tx = await record_purchase(user_id, bundle, payment_ref)
        # The ledger is the lasting record: a payment credited long ago (its
        # Redis idempotency record expired) is answered from it, never again.
        recorded = await ledger_reply(tx)
        if recorded is not None:
            return {**recorded, "duplicate": True, "bundle": bundle_id, "tokens": bundle["tokens"]}
        reply = await node.economy.credit(
            user_id,
            bundle["tokens"],
            initiator=PAYMENTS_INITIATOR,
            key=payment_ref,
            kind="purchase",
            meta={"bundle": bundle_id, "payment_ref": payment_ref, "provider": provider.name},
            tx=tx,
        )
        return {**reply, "bundle": bundle_id, "tokens": bundle["tokens"]}

    async def record_purchase(user_id: str, bundle: dict[str, Any], payment_ref: str) -> str:
        """The purchase's transaction id, recording it once per payment_ref."""
        try:
            async with node.pool.acquire() as conn:
                row = await conn.fetchrow(
                    """INSERT INTO purchases
                           (payment_ref, provider, user_id, bundle, tokens, price_cents, tx_id)
                       VALUES ($1, $2, $3, $4, $5, $6, $7)
                       ON CONFLICT (payment_ref) DO UPDATE SET payment_ref = EXCLUDED.payment_ref
                       RETURNING user_id, bundle, tx_id""",
                    payment_ref,
                    provider.name,
                    user_id,
                    bundle["id"],
                    bundle["tokens"],
                    bundle["price_cents"],
                    new_tx_id(),
                )
        except (asyncpg.PostgresError, OSError, TimeoutError) as exc:
            raise Unavailable("purchases are unavailable; nothing was credited") from exc
        assert row is not None  # RETURNING after an upsert always yields the row
        if row["user_id"] != user_id or row["bundle"] != bundle["id"]:
            raise Conflict("this payment_ref was used for another purchase")
        return str(row["tx_id"])

    async def ledger_reply(tx: str) -> dict[str, Any] | None:
        try:
            reply = await node.pool.fetchval(
                "SELECT reply::text FROM ledger_transactions WHERE id = $1", tx
            )
        except (asyncpg.PostgresError, OSError, TimeoutError) as exc:
            raise Unavailable("the ledger is unavailable; nothing was credited") from exc
        return None if reply is None else dict(orjson.loads(reply))

    async def set_prices(request: Request) -> Response:
        identity = identity_of(request, "model")
        body = await json_body(request)
        dm = optional_int(body, "dm", 0, PRICE_MAX)
        tip_min = optional_int(body, "tip_min", 1, PRICE_MAX)
        # Private shows: tokens a minute (0 = off) and the minimum length.
        private_rate = optional_int(body, "private_rate", 0, PRICE_MAX)
        private_min_s = optional_int(body, "private_min_s", 0, PRIVATE_MIN_S_MAX)
        private = private_rate is not None or private_min_s is not None
        if dm is None and tip_min is None and not private:
            raise BadRequest("send 'dm', 'tip_min', 'private_rate' and/or 'private_min_s'")
        await node.directory.touch_user(identity)
        prices: dict[str, Any] = {}
        if dm is not None or tip_min is not None:
            prices.update(await node.economy.set_prices(identity.user_id, dm, tip_min))
        if private:
            prices.update(
                await node.privates.set_prices(identity.user_id, private_rate, private_min_s)
            )
        node.directory.forget_room(identity.user_id)
        return JSONResponse(prices)

    async def set_menu(request: Request) -> Response:
        """Replace the model's tip menu (see menu_items for the body's rules)."""
        identity = identity_of(request, "model")
        items = menu_items(await json_body(request))
        await node.directory.touch_user(identity)
        saved = await node.economy.set_menu(identity.user_id, items)
        return JSONResponse({"user": identity.user_id, "items": saved})

    async def user_menu(request: Request) -> Response:
        """A user's tip menu, as a tip of one of its items is charged now."""
        user_id = request.path_params["user_id"]
        if not USER_ID_RE.fullmatch(user_id):
            raise BadRequest("the path must name a user id")
        return JSONResponse({"user": user_id, "items": await node.economy.menu(user_id)})

    async def admin_credit(request: Request) -> Response:
        identity = identity_of(request, "admin")
        body = await json_body(request)
        user = field(body, "user", str)
        if not USER_ID_RE.fullmatch(user):
            raise BadRequest("field 'user' must be a user id")
        amount = optional_int(body, "amount", AMOUNT_MIN, AMOUNT_MAX)
        if amount is None:
            raise BadRequest(
                f"field 'amount' must be an integer between {AMOUNT_MIN} and {AMOUNT_MAX}"
            )
        key: str = wire_field(body, "key", KEY)
        reply = await node.economy.credit(
            user,
            amount,
            initiator=user_initiator(identity.user_id),
            key=key,
            meta={"by": identity.user_id},
        )
        if not reply.get("duplicate"):
            await audit_admin(identity, "credit", user, {"amount": amount, "tx": reply.get("tx")})
        return JSONResponse(reply)

    async def admin_refund(request: Request) -> Response:
        identity = identity_of(request, "admin")
        body = await json_body(request)
        tx: str = wire_field(body, "tx", TX_ID)
        key: str = wire_field(body, "key", KEY)
        behind = await drain()
        try:
            reply = await node.economy.refund(
                tx, initiator=user_initiator(identity.user_id), key=key
            )
        except NotFound:
            if behind:  # it may be among the entries not yet in Postgres
                raise Unavailable("the ledger is behind; try the refund again") from None
            raise
        if not reply.get("duplicate"):
            await audit_admin(identity, "refund", None, {"tx": tx, "refund": reply.get("tx")})
        return JSONResponse(reply)

    async def audit_admin(
        identity: Identity, action: str, target: str | None, detail: dict[str, Any]
    ) -> None:
        """The audit row of an admin's money action. The money moved already
        (Redis, then the ledger): a row that cannot be written is logged, and
        the ledger still names the admin (its initiator)."""
        try:
            await append_audit(node.pool, identity.user_id, action, None, target, detail)
        except (asyncpg.PostgresError, OSError, TimeoutError):
            log.warning("audit row of %s by %s not written", action, identity.user_id)

    # --- moderation (server/catalog/moderation.py) ----------------------------------
    async def my_moderators(request: Request) -> Response:
        identity = identity_of(request, "model")
        if request.method == "GET":
            room = identity.user_id
            return JSONResponse(
                {"room": room, "moderators": await node.moderation.moderators(room)}
            )
        body = await json_body(request)
        users = body.get("users")
        most = node.settings.moderators_max
        if (
            not isinstance(users, list)
            or len(users) > most
            or not all(isinstance(u, str) and USER_ID_RE.fullmatch(u) for u in users)
        ):
            raise BadRequest(f"field 'users' must be a list of at most {most} user ids")
        return JSONResponse(await node.moderation.set_moderators(identity, users))

    async def my_room(request: Request) -> Response:
        identity = identity_of(request, "model")
        body = await json_body(request)
        changes: dict[str, Any] = {}
        slow_s = optional_int(body, "slow_s", 0, SLOW_S_MAX)
        if slow_s is not None:
            changes["slow_s"] = slow_s
        requires = body.get("chat_requires")
        if requires is not None:
            if requires not in CHAT_REQUIRES:
                raise BadRequest(f"field 'chat_requires' must be one of {', '.join(CHAT_REQUIRES)}")
            changes["chat_requires"] = requires
        least = optional_int(body, "chat_min_balance", 0, CHAT_MIN_BALANCE_MAX)
        if least is not None:
            changes["chat_min_balance"] = least
        if not changes:
            raise BadRequest("give at least one of slow_s, chat_requires, chat_min_balance")
        await node.directory.touch_user(identity)  # her room exists from her first call
        return JSONResponse(await node.moderation.set_room(identity, changes))

    async def admin_ban(request: Request) -> Response:
        identity = identity_of(request, "admin")
        user = request.path_params["user"]
        if not USER_ID_RE.fullmatch(user):
            raise BadRequest("the path must name a user id")
        if request.method == "DELETE":
            return JSONResponse(await node.moderation.platform_unban(identity, user))
        body = await json_body(request)
        seconds = optional_int(body, "seconds", 1, RESTRICTION_S_MAX)
        reason = body.get("reason", "")
        if not isinstance(reason, str) or len(reason) > BAN_REASON_LEN_MAX or "\x00" in reason:
            raise BadRequest(f"field 'reason' must be a string of at most {BAN_REASON_LEN_MAX}")
        return JSONResponse(await node.moderation.platform_ban(identity, user, seconds, reason))

    async def admin_audit(request: Request) -> Response:
        identity_of(request, "admin")
        limit = query_int(request, "limit", AUDIT_PAGE_DEFAULT, 1, AUDIT_PAGE_MAX)
        # `next` of the previous page: entries older than it.
        before = request.query_params.get("before")
        cursor = None if before is None else query_int(request, "before", 1, 1, 2**62)
        return JSONResponse(await node.moderation.audit(cursor, limit))

    async def admin_reconcile(request: Request) -> Response:
        identity_of(request, "admin")
        try:
            result = await reconcile(
                node.redis,
                node.pool,
                node.keys,
                node.ledger,
                DRAIN_TIMEOUT_S,
                node.settings.relay_lag_max_s,
            )
        except (Exception, TimeoutError) as exc:
            if isinstance(exc, ServiceError):
                raise
            raise Unavailable(f"reconcile needs Redis and Postgres: {exc}") from exc
        return JSONResponse(result)

    async def admin_parked(request: Request) -> Response:
        """Outbox entries the ledger parked (ledger_rejected), newest first."""
        identity_of(request, "admin")
        limit = query_int(request, "limit", PARKED_LISTED_DEFAULT, 1, PARKED_LISTED_MAX)
        try:
            return JSONResponse(await parked_entries(node.pool, limit))
        except (asyncpg.PostgresError, OSError, TimeoutError) as exc:
            raise Unavailable("the ledger is unavailable") from exc

    async def drain() -> int:
        """Entries still not in Postgres after waiting for the writer."""
        try:
            return await node.ledger.drain(DRAIN_TIMEOUT_S)
        except (Exception, TimeoutError) as exc:
            if isinstance(exc, ServiceError):
                raise
            raise Unavailable("the ledger is unavailable") from exc

    # --- the demo page and what it reads ---------------------------------------------
    async def index(request: Request) -> Response:
        return FileResponse(STATIC_DIR / "index.html", headers=PAGE_HEADERS)

    async def client_config(request: Request) -> Response:
        """Where the page finds the gateway (docs/deploy.md, "The page's URL")."""
        return JSONResponse(
            {
                "ws_url": public_ws_url(request, node.settings),
                "dev_mode": bool(node.settings.dev_mode),
            }
        )

    async def user_prices(request: Request) -> Response:
        """A user's DM price: what a `dm` to them costs now (0 = free)."""
        user_id = request.path_params["user_id"]
        if not USER_ID_RE.fullmatch(user_id):
            raise BadRequest("the path must name a user id")
        prices: dict[str, Any] = {"dm": await node.economy.dm_price(user_id)}
        prices.update(await node.privates.prices(user_id))  # private_rate, private_min_s
        return JSONResponse(prices)

    async def dev_token(request: Request) -> Response:
        """A demo token for any fan or model (registered only in dev mode)."""
        # A form post from any web page is a "simple" request that needs no
        # CORS preflight; application/json does, so other origins cannot post.
        content_type = request.headers.get("content-type", "")
        if content_type.partition(";")[0].strip().lower() != "application/json":
            raise BadRequest("send the body as Content-Type: application/json")
        host = request.url.hostname or ""
        if host.lower() not in LOOPBACK_HOSTS | {node.settings.host.lower()}:
            raise Forbidden(f"Host '{host}' is not this server (DNS rebinding?)")
        body = await json_body(request)
        user = field(body, "user", str)
        if not USER_ID_RE.fullmatch(user):
            raise BadRequest("field 'user' must be 1-64 characters of A-Z a-z 0-9 _ . : -")
        role = field(body, "role", str)
        if role == "admin":
            raise Forbidden("the demo page hands out fan and model tokens only")
        if role not in DEV_TOKEN_ROLES:
            raise BadRequest("field 'role' must be 'fan' or 'model'")
        ttl_max_s = node.settings.token_ttl_max_s
        ttl_s = min(TOKEN_TTL_DEFAULT_S, ttl_max_s)
        token = issue_token(node.settings.jwt_secret, user, role, ttl_s, ttl_max_s=ttl_max_s)
        # The user (and a model's room) exists from now on, as after a hello.
        await node.directory.touch_user(
            verify_token(node.settings.jwt_secret, token, ttl_max_s=ttl_max_s)
        )
        return JSONResponse({"token": token})

    # --- spending limits and self-exclusion (server/economy/limits.py) -----------------
    async def get_limits(request: Request) -> Response:
        identity = identity_of(request)
        await node.directory.touch_user(identity)
        return JSONResponse(await node.economy.limits.view(identity.user_id))

    async def put_limits(request: Request) -> Response:
        """Any of daily, weekly, monthly (tokens; null: none) and
        reality_check_min (minutes; null: off); absent fields are kept."""
        identity = identity_of(request)
        body = await json_body(request)
        changes = limit_changes(body)
        await node.directory.touch_user(identity)
        return JSONResponse(await node.economy.limits.set(identity.user_id, changes))

    async def self_exclusion(request: Request) -> Response:
        identity = identity_of(request)
        body = await json_body(request)
        days = optional_int(body, "days", 1, EXCLUSION_DAYS_MAX)
        if days is None:
            raise BadRequest(
                f"field 'days' is required: an integer between 1 and {EXCLUSION_DAYS_MAX}"
            )
        await node.directory.touch_user(identity)
        return JSONResponse(await node.economy.limits.exclude(identity.user_id, days))

    async def service_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ServiceError)
        return error_response(exc.code, exc.message, exc.http_status, exc.fields)

    async def not_found(request: Request, exc: Exception) -> Response:
        return error_response(ErrorCode.NOT_FOUND, f"no route {request.url.path}", 404)

    # Locked media, and receipts, DM history, blocks and reports: modules of
    # their own (they import this one's helpers).
    # The admin page and its own routes (issue #15 item 6).
    # Payment webhooks, chargebacks, data export and account deletion.
    from .accounts import accounts_routes
    from .admin import admin_routes

    # /openapi.json, /asyncapi.json and /docs (issue #15 item 4).
    from .apidocs import apidocs_routes
    from .discovery import discovery_routes
    from .history import history_routes
    from .media import media_routes

    # Payouts, rules, earnings and liabilities (server/economy/payouts.py).
    from .payouts import payout_routes

    # Leaderboards and tiers (server/standing.py).
    from .standing import standing_routes

    routes: list[BaseRoute] = [
        *media_routes(node, identity_of, limit_creates),
        *history_routes(node, identity_of, limit_creates),
        *payout_routes(node, identity_of, limit_creates),
        *standing_routes(node),
        *admin_routes(node, identity_of),
        *discovery_routes(node, identity_of, limit_creates),
        *accounts_routes(node, identity_of, limit_creates, credit_purchase, drain),
        *apidocs_routes(),
        Route("/", index),
        Mount("/static", _StaticFiles(directory=STATIC_DIR), name="static"),
        Mount("/js", _StaticFiles(directory=CLIENT_JS_DIR), name="client_js"),
        Route("/v1/config", client_config),
        Route("/v1/users/{user_id}/prices", user_prices),
        Route("/v1/users/{user_id}/menu", user_menu),
    ]
    if node.settings.dev_mode:
        routes.append(Route("/v1/dev/token", dev_token, methods=["POST"]))
    if not node.settings.metrics_port:  # else served on the internal port only
        routes.append(Route("/metrics", metrics_endpoint))
    app = Starlette(
        middleware=[
            Middleware(
                ForwardedHeaders,
                networks=node.settings.trusted_proxy_networks(),
                rfc7239=node.settings.forwarded_headers == "forwarded",
            )
        ],
        routes=[
            *routes,
            Route(HEALTHZ_PATH, healthz),
            Route(READYZ_PATH, readyz),
            Route("/v1/me", me),
            Route("/v1/me/prices", set_prices, methods=["PUT"]),
            Route("/v1/me/menu", set_menu, methods=["PUT"]),
            Route("/v1/me/requests", my_requests),
            Route("/v1/me/privates", my_privates),
            Route("/v1/me/shows", create_show, methods=["POST"]),
            Route("/v1/me/shows/{show}/start", show_transition("start"), methods=["POST"]),
            Route("/v1/me/shows/{show}/end", show_transition("end"), methods=["POST"]),
            Route("/v1/me/shows/{show}/cancel", show_transition("cancel"), methods=["POST"]),
            Route("/v1/rooms/{room}/shows", room_shows),
            Route("/v1/rooms/{room}/shows/{show}/tickets", buy_ticket, methods=["POST"]),
            Route("/v1/me/goal", set_goal, methods=["PUT"]),
            Route("/v1/me/goal", delete_goal, methods=["DELETE"]),
            Route("/v1/rooms/{room}/goal", room_goal),
            Route("/v1/bundles", bundles),
            Route("/v1/purchases", purchase, methods=["POST"]),
            Route("/v1/admin/credits", admin_credit, methods=["POST"]),
            Route("/v1/admin/refunds", admin_refund, methods=["POST"]),
            Route("/v1/admin/reconcile", admin_reconcile),
            Route("/v1/admin/ledger/rejected", admin_parked),
            Route("/v1/me/moderators", my_moderators, methods=["GET", "PUT"]),
            Route("/v1/me/room", my_room, methods=["PUT"]),
            Route("/v1/admin/bans/{user}", admin_ban, methods=["POST", "DELETE"]),
            Route("/v1/admin/audit", admin_audit),
            Route("/v1/me/limits", get_limits, methods=["GET"]),
            Route("/v1/me/limits", put_limits, methods=["PUT"]),
            Route("/v1/me/self-exclusion", self_exclusion, methods=["POST"]),
        ],
        exception_handlers={ServiceError: service_error, 404: not_found},
    )
    # Views naming other users show a deleted user by her pseudonym only
    # (server/ledger/pseudonyms.py).
    app.router.routes[:] = pseudonymised(Pseudonyms(node.pool), app.router.routes)
    return app


def public_ws_url(request: Request, settings: Settings) -> str:
    """The URL a browser that loaded this request's page dials for the gateway.

    TOKENCHAT_PUBLIC_WS_URL when set. Otherwise the host (and port) the browser
    used: behind a trusted proxy (which sent X-Forwarded-Proto or -Host) and in
    one-port mode the gateway is at /ws on that very host, the proxy routing it;
    a bare two-port server has it on the WebSocket port. wss for a page that
    came over https, so the browser does not refuse a mixed-content socket.
    """
    if settings.public_ws_url:
        return settings.public_ws_url
    scheme = "wss" if request.url.scheme == "https" else "ws"
    netloc = request.scope.get(FORWARDED_HOST_SCOPE_KEY) or request.headers.get("host", "")
    if not HOST_HEADER_RE.fullmatch(netloc):
        netloc = ""  # absent or malformed: fall back to the configured host
    hostname = urllib.parse.urlsplit(f"//{netloc}").hostname if netloc else settings.host
    if request.scope.get(FORWARDED_SCOPE_KEY) or settings.serves_one_port():
        if netloc:
            return f"{scheme}://{netloc}{WS_PATH}"
        port = settings.http_port
    else:
        port = settings.ws_port
    host = hostname or settings.host
    if ":" in host:  # an IPv6 literal
        host = f"[{host.strip('[]')}]"
    return f"{scheme}://{host}:{port}{WS_PATH}"


def bundle_list(node: Node) -> list[dict[str, Any]]:
    """Bundles with their discount against the smallest bundle's token price."""
    bundles = node.settings.bundle_list()
    base = min(bundles, key=lambda b: b[1])
    base_cents_per_token = base[2] / base[1]
    listed = []
    for bundle_id, tokens, cents in bundles:
        full = base_cents_per_token * tokens
        discount = 0 if full == 0 else round(100 * (1 - cents / full))
        listed.append(
            {"id": bundle_id, "tokens": tokens, "price_cents": cents, "discount_pct": discount}
        )
    return listed


async def json_body(request: Request) -> dict[str, Any]:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > BODY_SIZE_MAX_BYTES:
        raise BadRequest(f"the body is over {BODY_SIZE_MAX_BYTES} bytes")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > BODY_SIZE_MAX_BYTES:
            raise BadRequest(f"the body is over {BODY_SIZE_MAX_BYTES} bytes")
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise BadRequest("the body is not JSON") from None
    if not isinstance(value, dict):
        raise BadRequest("the body must be a JSON object")
    return value


def field(body: dict[str, Any], name: str, kind: type) -> Any:
    value = body.get(name)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise BadRequest(f"field '{name}' is required and must be a {kind.__name__}")
    return value


def optional_int(body: dict[str, Any], name: str, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise BadRequest(f"field '{name}' must be an integer between {low} and {high}")
    return value


def menu_items(body: dict[str, Any]) -> list[MenuItem]:
    """The items of a PUT /v1/me/menu body: ``{"items": [{"id"?, "label",
    "price"}]}``, at most MENU_ITEMS_MAX, in the order the page shows them.
    An ``id`` keeps an item of the current menu; each id at most once."""
    items = body.get("items")
    if not isinstance(items, list) or len(items) > MENU_ITEMS_MAX:
        raise BadRequest(f"field 'items' must be a list of at most {MENU_ITEMS_MAX} items")
    checked: list[MenuItem] = []
    for n, item in enumerate(items):
        where = f"items[{n}]"
        if not isinstance(item, dict):
            raise BadRequest(f"{where} must be an object with 'label' and 'price'")
        item_id = item.get("id")
        if item_id is not None and not ITEM_REF.accept(item_id):
            raise BadRequest(f"{where}: field 'id' must be {ITEM_REF.describe}")
        label = item.get("label")
        if not isinstance(label, str) or not MENU_LABEL.accept(label):
            raise BadRequest(f"{where}: field 'label' must be {MENU_LABEL.describe}")
        price = optional_int(item, "price", AMOUNT_MIN, AMOUNT_MAX)
        if price is None:
            raise BadRequest(
                f"{where}: field 'price' must be an integer between {AMOUNT_MIN} and {AMOUNT_MAX}"
            )
        checked.append(MenuItem(item_id, label, price))
    ids = [item.id for item in checked if item.id is not None]
    if len(ids) != len(set(ids)):
        raise BadRequest("an item id is named twice")
    return checked


def query_int(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    # The length first: int() of a long digit string is slow (and refused past 4300).
    digits = len(raw) <= len(str(high)) and raw.isascii() and raw.isdigit()
    if not digits or not low <= int(raw) <= high:
        raise BadRequest(f"query parameter '{name}' must be an integer between {low} and {high}")
    return int(raw)


def wire_field(body: dict[str, Any], name: str, check: WireField) -> Any:
    """A required field checked by the wire contract's own rule (protocol/),
    so HTTP and the WebSocket refuse the same values with the same words."""
    value = body.get(name)
    if value is None:
        raise BadRequest(f"field '{name}' is required and must be {check.describe}")
    if not check.accept(value):
        raise BadRequest(f"field '{name}' must be {check.describe}")
    return value


def limit_changes(body: dict[str, Any]) -> dict[str, int | None]:
    """The changes of a PUT /v1/me/limits body: each window's limit (0 to
    LIMIT_MAX tokens, null: none) and reality_check_min (1 to
    REALITY_CHECK_MIN_MAX, null: off); at least one, nothing else."""
    bounds = {name: (0, LIMIT_MAX) for name in WINDOW_NAMES}
    bounds["reality_check_min"] = (1, REALITY_CHECK_MIN_MAX)
    unknown = sorted(set(body) - set(bounds))
    if unknown:
        raise BadRequest(f"unknown field '{unknown[0]}'; send {', '.join(bounds)}")
    if not body:
        raise BadRequest(f"send any of {', '.join(bounds)}")
    return {name: optional_int(body, name, *bounds[name]) for name in body}
