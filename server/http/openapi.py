"""The HTTP API as an OpenAPI 3.1 document, served at ``GET /openapi.json``
and rendered at ``GET /docs`` (server/http/apidocs.py).

One row of ``OPERATIONS`` per (method, path) the app routes; the test
tests/server/test_apidocs.py keeps the two sets equal, and checks real
replies against the schemas. Bodies and replies are described by the fields
docs/protocol.md ("HTTP API") promises, each object left open to fields it
does not name (a newer server may add some; clients ignore them). Request
fields reuse the WebSocket contract's rules (protocol/commands.py
``WireField.schema``), as the handlers check them with the same ``WireField``.
Shapes both protocols share (a show, a goal, a media descriptor) come from
protocol/schema.py, under the same component names as in /asyncapi.json.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Final

from tokenchat.protocol import ErrorCode
from tokenchat.protocol.commands import (
    AMOUNT,
    EPOCH_MS,
    GOAL_TARGET,
    GOAL_TITLE,
    KEY,
    PAYMENT_REF,
    SHOW_MIN_S,
    SHOW_TITLE,
    TX_ID,
)
from tokenchat.protocol.schema import (
    ANY,
    BOOLEAN,
    INTEGER,
    MS,
    SHARED_SCHEMAS,
    STRING,
    TOKENS,
    USER_ID,
    Schema,
    array,
    const,
    nullable,
    obj,
    ref,
    wire,
)

OPENAPI_VERSION: Final = "3.1.0"
# The JSON Schema dialect of OpenAPI 3.1's own schema objects.
JSON_SCHEMA_DIALECT: Final = "https://spec.openapis.org/oas/3.1/dialect/base"
# Who may call an operation: None is anyone; "user" any authenticated role.
Who = str | None


def page(name: str, items: Schema = ANY) -> Schema:
    """A list and the cursor of its next page (null on the last)."""
    return obj({name: array(items)}, {"next": ANY, "next_cursor": ANY})


@dataclasses.dataclass(frozen=True)
class Operation:
    method: str
    path: str
    who: Who
    summary: str
    reply: Schema = dataclasses.field(default_factory=lambda: {"type": "object"})
    body: Schema | None = None
    status: int = 200
    query: tuple[str, ...] = ()
    # A reply that is not JSON: its media type.
    media_type: str = "application/json"
    # Other statuses whose body is not an error: {status: (why, schema)}.
    also: tuple[tuple[int, str, Schema], ...] = ()
    tag: str = ""


PRICES: Final = obj({}, {"dm": TOKENS, "tip_min": TOKENS, "private_rate": TOKENS})
MENU: Final = obj(
    {"user": USER_ID, "items": array(obj({"id": STRING, "label": STRING, "price": TOKENS}))}
)
CREDIT: Final = obj({"balance": TOKENS, "tx": STRING}, {"duplicate": BOOLEAN})
ROOM_SETTINGS: Final = obj(
    {"room": USER_ID, "slow_s": INTEGER, "chat_requires": STRING, "chat_min_balance": TOKENS}
)
MEDIA: Final = obj({"media": ref("media_descriptor")}, {"owner": USER_ID})
LIMITS_BODY: Final = obj(
    {}, {k: nullable(INTEGER) for k in ("daily", "weekly", "monthly", "reality_check_min")}
)
BLOCK: Final = obj({"user": USER_ID, "blocked": BOOLEAN})
FOLLOW: Final = obj({"model": USER_ID, "following": BOOLEAN})
SHOW: Final = ref("show")
READINESS: Final = obj(
    {"ok": BOOLEAN},
    {"redis": ANY, "postgres": ANY, "draining": BOOLEAN, "relay_behind": BOOLEAN},
)

OPERATIONS: Final[tuple[Operation, ...]] = (
    # --- health and operations -------------------------------------------------------
    Operation("GET", "/healthz", None, "Liveness", obj({"ok": BOOLEAN}), tag="health"),
    Operation(
        "GET",
        "/readyz",
        None,
        "Readiness: 200 when Redis and Postgres answer and the process is not draining",
        READINESS,
        also=((503, "a backend does not answer, or the process is draining", READINESS),),
        tag="health",
    ),
    Operation(
        "GET",
        "/metrics",
        None,
        "Prometheus metrics (only while TOKENCHAT_METRICS_PORT is 0)",
        {"type": "string"},
        media_type="text/plain",
        tag="health",
    ),
    # --- pages and documents ---------------------------------------------------------
    Operation("GET", "/", None, "The demo page", {"type": "string"}, media_type="text/html"),
    Operation("GET", "/admin", None, "The admin page", {"type": "string"}, media_type="text/html"),
    Operation("GET", "/openapi.json", None, "This document", {"type": "object"}),
    Operation("GET", "/asyncapi.json", None, "The WebSocket protocol (AsyncAPI 3.0)"),
    Operation(
        "GET", "/docs", None, "This document, rendered", {"type": "string"}, media_type="text/html"
    ),
    Operation(
        "GET",
        "/v1/config",
        None,
        "Where the demo page finds the gateway",
        obj({"ws_url": STRING, "dev_mode": BOOLEAN}),
    ),
    Operation(
        "POST",
        "/v1/dev/token",
        None,
        "A demo token (dev mode only; fan or model)",
        obj({"token": STRING}),
        body=obj({"user": USER_ID, "role": {"enum": ["fan", "model"]}}),
        tag="dev",
    ),
    # --- the caller --------------------------------------------------------------------
    Operation(
        "GET",
        "/v1/me",
        "user",
        "The caller and their balance",
        obj({"user": obj({"id": USER_ID, "role": STRING}), "balance": TOKENS}),
        tag="me",
    ),
    Operation(
        "DELETE",
        "/v1/me",
        "user",
        "Delete the caller's account (their balance is forfeited)",
        obj({"deleted": BOOLEAN, "pseudonym": STRING, "forfeited": TOKENS}),
        body=obj({"confirm": USER_ID}),
        tag="me",
    ),
    Operation(
        "GET",
        "/v1/me/export",
        "user",
        "The caller's data (JSON, streamed)",
        {"type": "object"},
        tag="me",
    ),
    Operation(
        "PUT",
        "/v1/me/prices",
        "model",
        "Set the model's prices",
        PRICES,
        body=obj(
            {},
            {"dm": INTEGER, "tip_min": INTEGER, "private_rate": INTEGER, "private_min_s": INTEGER},
        ),
        tag="me",
    ),
    Operation(
        "PUT",
        "/v1/me/menu",
        "model",
        "Replace the model's tip menu",
        MENU,
        body=obj({"items": array(obj({"label": STRING, "price": INTEGER}, {"id": STRING}))}),
        tag="me",
    ),
    Operation(
        "GET",
        "/v1/me/requests",
        "user",
        "The caller's custom requests",
        obj({"requests": array(ref("custom_request"))}),
        tag="me",
    ),
    Operation(
        "GET",
        "/v1/me/privates",
        "user",
        "The caller's private shows",
        obj({"privates": array(ref("private_show"))}),
        tag="me",
    ),
    Operation(
        "PUT",
        "/v1/me/room",
        "model",
        "The model's room chat settings",
        ROOM_SETTINGS,
        body=obj({}, {"slow_s": INTEGER, "chat_requires": STRING, "chat_min_balance": INTEGER}),
        tag="moderation",
    ),
    Operation(
        "GET",
        "/v1/me/moderators",
        "model",
        "The model's moderators",
        obj({"room": USER_ID, "moderators": array(USER_ID)}),
        tag="moderation",
    ),
    Operation(
        "PUT",
        "/v1/me/moderators",
        "model",
        "Replace the model's moderators",
        obj({"room": USER_ID, "moderators": array(USER_ID)}),
        body=obj({"users": array(USER_ID)}),
        tag="moderation",
    ),
    Operation("GET", "/v1/me/limits", "user", "The caller's spending limits", tag="limits"),
    Operation(
        "PUT",
        "/v1/me/limits",
        "user",
        "Set spending limits and reality checks",
        body=LIMITS_BODY,
        tag="limits",
    ),
    Operation(
        "POST",
        "/v1/me/self-exclusion",
        "user",
        "Exclude oneself for some days",
        obj({"excluded_until": MS}),
        body=obj({"days": INTEGER}),
        tag="limits",
    ),
    Operation(
        "GET",
        "/v1/me/transactions",
        "user",
        "The caller's transactions",
        page("transactions"),
        query=("kind", "before", "limit"),
        tag="history",
    ),
    Operation(
        "GET",
        "/v1/me/transactions/{tx}",
        "user",
        "A receipt",
        obj({"tx": STRING, "kind": STRING, "ts": MS}),
        tag="history",
    ),
    Operation(
        "GET",
        "/v1/me/dms",
        "user",
        "DM history with one user",
        page("messages"),
        query=("with", "before", "limit"),
        tag="history",
    ),
    Operation(
        "GET",
        "/v1/me/blocks",
        "user",
        "Users whose DMs the caller refuses",
        obj({"blocks": array(obj({"user": USER_ID}))}),
        tag="history",
    ),
    Operation("PUT", "/v1/me/blocks/{user}", "user", "Block a user's DMs", BLOCK, tag="history"),
    Operation("DELETE", "/v1/me/blocks/{user}", "user", "Unblock", BLOCK, tag="history"),
    Operation(
        "POST",
        "/v1/reports",
        "user",
        "Report a user",
        obj({"id": ANY, "user": USER_ID, "reason": STRING, "state": STRING}),
        body=obj({"user": USER_ID, "reason": STRING}, {"message": ANY}),
        status=201,
        tag="history",
    ),
    # --- shows, goals, standing -------------------------------------------------------
    Operation(
        "POST",
        "/v1/me/shows",
        "model",
        "Schedule a ticket show",
        SHOW,
        body=obj(
            {
                "title": wire(SHOW_TITLE),
                "price": wire(AMOUNT),
                "starts_at": wire(EPOCH_MS),
                "min_s": wire(SHOW_MIN_S),
            }
        ),
        status=201,
        tag="shows",
    ),
    *(
        Operation(
            "POST",
            f"/v1/me/shows/{{show}}/{step}",
            "model",
            f"{step.title()} a show",
            obj({"show": STRING, "state": STRING}),
            tag="shows",
        )
        for step in ("start", "end", "cancel")
    ),
    Operation(
        "GET",
        "/v1/rooms/{room}/shows",
        None,
        "A room's shows",
        obj({"shows": array(SHOW)}),
        tag="shows",
    ),
    Operation(
        "POST",
        "/v1/rooms/{room}/shows/{show}/tickets",
        "fan",
        "Buy a ticket",
        body=obj({"key": wire(KEY)}),
        tag="shows",
    ),
    Operation(
        "PUT",
        "/v1/me/goal",
        "model",
        "Set the room's tip goal",
        obj({"goal": ref("goal")}),
        body=obj(
            {"title": wire(GOAL_TITLE), "target": wire(GOAL_TARGET)},
            {"deadline": nullable(wire(EPOCH_MS)), "all_or_nothing": BOOLEAN},
        ),
        tag="goals",
    ),
    Operation(
        "DELETE",
        "/v1/me/goal",
        "model",
        "Delete the room's tip goal",
        obj({"goal": ref("goal"), "settled": ANY}),
        tag="goals",
    ),
    Operation(
        "GET",
        "/v1/rooms/{room}/goal",
        None,
        "A room's tip goal",
        obj({"room": USER_ID, "goal": nullable(ref("goal"))}),
        tag="goals",
    ),
    Operation(
        "GET",
        "/v1/rooms/{room}/leaderboard",
        None,
        "A room's top tippers",
        obj({"room": USER_ID, "window": STRING, "as_of": MS, "entries": array(ANY)}),
        query=("window",),
        tag="standing",
    ),
    Operation(
        "GET",
        "/v1/tiers",
        None,
        "The tiers",
        obj({"window_s": INTEGER, "tiers": array(obj({"tier": INTEGER, "name": STRING}))}),
        tag="standing",
    ),
    # --- discovery ---------------------------------------------------------------------
    Operation(
        "GET",
        "/v1/rooms",
        None,
        "Live rooms",
        page("rooms"),
        query=("sort", "tag", "q", "cursor", "limit"),
        tag="discovery",
    ),
    Operation("PUT", "/v1/me/profile", "model", "Set the model's profile", tag="discovery"),
    Operation("GET", "/v1/models/{model}", None, "A model's profile", tag="discovery"),
    Operation("PUT", "/v1/me/follows/{model}", "user", "Follow a model", FOLLOW, tag="discovery"),
    Operation("DELETE", "/v1/me/follows/{model}", "user", "Unfollow", FOLLOW, tag="discovery"),
    Operation(
        "GET",
        "/v1/me/follows",
        "user",
        "Models the caller follows",
        query=("cursor", "limit"),
        tag="discovery",
    ),
    Operation(
        "GET",
        "/v1/me/notifications",
        "user",
        "The caller's notifications",
        query=("cursor", "limit"),
        tag="discovery",
    ),
    # --- prices, menus, purchases -----------------------------------------------------
    Operation("GET", "/v1/users/{user_id}/prices", None, "A user's prices", PRICES, tag="prices"),
    Operation("GET", "/v1/users/{user_id}/menu", None, "A user's tip menu", MENU, tag="prices"),
    Operation(
        "GET",
        "/v1/bundles",
        None,
        "Token bundles",
        obj(
            {
                "bundles": array(
                    obj(
                        {
                            "id": STRING,
                            "tokens": TOKENS,
                            "price_cents": INTEGER,
                            "discount_pct": INTEGER,
                        }
                    )
                )
            }
        ),
        tag="payments",
    ),
    Operation(
        "POST",
        "/v1/purchases",
        "fan",
        "Buy a bundle (idempotent on payment_ref)",
        obj({"balance": TOKENS, "tx": STRING, "bundle": STRING, "tokens": TOKENS}),
        body=obj({"bundle": STRING, "payment_ref": wire(PAYMENT_REF)}),
        tag="payments",
    ),
    Operation(
        "POST",
        "/v1/payments/webhook",
        None,
        "The payment provider's signed events",
        obj({"event": ANY}),
        body={"type": "object"},
        tag="payments",
    ),
    # --- locked media ------------------------------------------------------------------
    Operation(
        "POST",
        "/v1/media",
        "model",
        "Upload locked media (multipart: file, price, preview?, preview_text?)",
        MEDIA,
        tag="media",
    ),
    Operation("GET", "/v1/media/{media_id}", None, "Describe media", MEDIA, tag="media"),
    Operation(
        "PUT",
        "/v1/media/{media_id}",
        "model",
        "Set its price",
        MEDIA,
        body=obj({"price": INTEGER}),
        tag="media",
    ),
    Operation(
        "GET",
        "/v1/media/{media_id}/url",
        "user",
        "A signed URL of the content",
        obj({"url": STRING, "expires_at": MS}),
        tag="media",
    ),
    Operation(
        "GET",
        "/v1/media/{media_id}/content",
        None,
        "The content (a signed URL; Range gives 206)",
        {"type": "string", "description": "the bytes uploaded, with their media type"},
        query=("exp", "sig"),
        media_type="*/*",
        also=((206, "the part a Range header asked for", {"type": "string"}),),
        tag="media",
    ),
    Operation(
        "GET",
        "/v1/media/{media_id}/preview",
        None,
        "The preview thumbnail",
        {"type": "string", "contentMediaType": "image/jpeg"},
        media_type="image/jpeg",
        tag="media",
    ),
    # --- payouts -----------------------------------------------------------------------
    Operation("GET", "/v1/payout-rule", "user", "The payout rule in force", tag="payouts"),
    Operation(
        "GET",
        "/v1/me/payout-method",
        "model",
        "The model's payout method",
        obj({"verified": BOOLEAN, "method": ANY, "rule": ANY}),
        tag="payouts",
    ),
    Operation(
        "PUT",
        "/v1/me/payout-method",
        "model",
        "Set the payout method",
        obj({"verified": BOOLEAN, "method": ANY, "rule": ANY}),
        body=obj({"type": {"enum": ["bank", "paypal"]}}),
        tag="payouts",
    ),
    Operation(
        "GET",
        "/v1/me/payouts",
        "model",
        "The model's payouts",
        obj({"payouts": array(ANY)}),
        tag="payouts",
    ),
    Operation(
        "POST",
        "/v1/me/payouts",
        "model",
        "Request a payout (200 with duplicate on a retry)",
        body=obj({"tokens": INTEGER, "key": wire(KEY)}),
        status=201,
        also=((200, "a retry (`duplicate`: true)", {"type": "object"}),),
        tag="payouts",
    ),
    Operation(
        "GET",
        "/v1/me/earnings",
        "model",
        "The model's earnings",
        obj({"model": USER_ID, "kinds": {"type": "object"}, "total": ANY}),
        query=("from", "to"),
        tag="payouts",
    ),
    # --- admin -------------------------------------------------------------------------
    Operation(
        "POST",
        "/v1/admin/credits",
        "admin",
        "Grant tokens (idempotent on key)",
        CREDIT,
        body=obj({"user": USER_ID, "amount": wire(AMOUNT), "key": wire(KEY)}),
        tag="admin",
    ),
    Operation(
        "POST",
        "/v1/admin/refunds",
        "admin",
        "Reverse a spend (idempotent on key)",
        obj({"balance": TOKENS, "tx": STRING, "refunds": STRING}, {"duplicate": BOOLEAN}),
        body=obj({"tx": wire(TX_ID), "key": wire(KEY)}),
        tag="admin",
    ),
    Operation(
        "GET",
        "/v1/admin/refunds",
        "admin",
        "Refunds, newest first",
        obj({"refunds": array(ANY)}),
        query=("limit",),
        tag="admin",
    ),
    Operation(
        "GET",
        "/v1/admin/reconcile",
        "admin",
        "Compare Redis with the ledger",
        obj(
            {"ok": BOOLEAN, "pending": INTEGER, "mismatches": array(ANY)},
            {
                # The relay's delivery stream (docs/economy.md, "Delivery relay").
                "deliveries": obj(
                    {
                        "pending": INTEGER,
                        "oldest_s": {"type": "number"},
                        "behind": BOOLEAN,
                        "parked": INTEGER,
                    }
                )
            },
        ),
        tag="admin",
    ),
    Operation(
        "GET",
        "/v1/admin/ledger/rejected",
        "admin",
        "Parked ledger entries",
        obj({"total": INTEGER, "items": array(ANY)}),
        query=("limit",),
        tag="admin",
    ),
    Operation(
        "POST",
        "/v1/admin/bans/{user}",
        "admin",
        "Ban a user from the platform",
        obj({"user": USER_ID, "until": nullable(MS)}),
        body=obj({}, {"seconds": INTEGER, "reason": STRING}),
        tag="admin",
    ),
    Operation(
        "DELETE",
        "/v1/admin/bans/{user}",
        "admin",
        "Lift a platform ban",
        obj({"user": USER_ID}),
        tag="admin",
    ),
    Operation(
        "GET",
        "/v1/admin/audit",
        "admin",
        "The audit log",
        page("entries"),
        query=("limit", "before"),
        tag="admin",
    ),
    Operation("GET", "/v1/admin/stats", "admin", "Live counters", tag="admin"),
    Operation(
        "GET",
        "/v1/admin/users",
        "admin",
        "Find users by id prefix",
        obj({"prefix": STRING, "users": array(ANY)}),
        query=("prefix", "limit"),
        tag="admin",
    ),
    Operation(
        "GET",
        "/v1/admin/users/{user}",
        "admin",
        "A user: balance and standing",
        obj({"user": ANY, "balance": ANY}),
        tag="admin",
    ),
    Operation(
        "GET",
        "/v1/admin/users/{user}/transactions",
        "admin",
        "A user's transactions",
        page("transactions"),
        query=("kind", "before", "limit"),
        tag="admin",
    ),
    Operation(
        "GET",
        "/v1/admin/flags",
        "admin",
        "Chargeback flags",
        page("flags"),
        query=("before", "limit", "user"),
        tag="admin",
    ),
    Operation(
        "POST",
        "/v1/admin/flags/{flag}/resolve",
        "admin",
        "Resolve a chargeback flag (once; `already` on a repeat)",
        obj({"state": const("resolved")}, {"already": BOOLEAN, "resolution": ANY}),
        body=obj({}, {"resolution": ANY}),
        tag="admin",
    ),
    Operation(
        "GET",
        "/v1/admin/reports",
        "admin",
        "Reports",
        page("reports"),
        query=("state", "before", "limit"),
        tag="admin",
    ),
    Operation(
        "POST",
        "/v1/admin/reports/{report}/resolve",
        "admin",
        "Resolve a report",
        body=obj({}, {"resolution": ANY}),
        tag="admin",
    ),
    Operation("GET", "/v1/admin/payout-rules", "admin", "Payout rules", tag="admin"),
    Operation(
        "POST",
        "/v1/admin/payout-rules",
        "admin",
        "Add a payout rule",
        body=obj({"cents_per_token": ANY, "min_payout_tokens": INTEGER}, {"effective_at": ANY}),
        status=201,
        tag="admin",
    ),
    Operation("POST", "/v1/admin/users/{user}/verify", "admin", "Verify a model", tag="admin"),
    Operation(
        "DELETE", "/v1/admin/users/{user}/verify", "admin", "Withdraw a verification", tag="admin"
    ),
    Operation(
        "GET",
        "/v1/admin/payouts",
        "admin",
        "Payouts",
        obj({"payouts": array(ANY)}),
        query=("state",),
        tag="admin",
    ),
    Operation("POST", "/v1/admin/payouts/{id}/approve", "admin", "Approve a payout", tag="admin"),
    Operation(
        "POST",
        "/v1/admin/payouts/{id}/reject",
        "admin",
        "Reject a payout",
        body=obj({}, {"reason": ANY}),
        tag="admin",
    ),
    Operation("GET", "/v1/admin/liabilities", "admin", "What the platform owes", tag="admin"),
)

# Error statuses (docs/protocol.md, "HTTP API"): every operation may answer
# these; the body is always ERROR. A test checks that every status of
# server/errors.py is here.
ERROR_STATUSES: Final = {
    "400": "BAD_REQUEST: a field missing or invalid, or a body that is not a JSON object",
    "401": "UNAUTHENTICATED: no Bearer token, or a bad or expired one",
    "403": "FORBIDDEN, BANNED or SELF_EXCLUDED",
    "404": "NOT_FOUND",
    "409": "CONFLICT, INSUFFICIENT_FUNDS, PRICE_CHANGED, NOT_IN_ROOM or SPEND_LIMIT",
    "410": "CURSOR_EXPIRED: a GET /v1/rooms cursor whose ranking is no longer kept",
    "429": "RATE_LIMITED or LIMIT_EXCEEDED",
    "503": "UNAVAILABLE: a backend is down; nothing was done",
    "500": "INTERNAL: a bug; the message has no details",
}
ERROR: Final = obj(
    {
        "error": obj(
            {"code": {"enum": [code.value for code in ErrorCode]}, "message": STRING},
            {
                "until": nullable(MS),
                "window": STRING,
                "remaining": TOKENS,
                "resets_at": MS,
            },
        )
    }
)
_PATH_PARAM_RE: Final = re.compile(r"\{([a-z_]+)\}")


def _operation(op: Operation) -> Schema:
    described: Schema = {
        "operationId": _operation_id(op),
        "summary": op.summary,
        "tags": [op.tag or "pages"],
        "responses": {
            str(op.status): {
                "description": "done",
                "content": {op.media_type: {"schema": op.reply}},
            },
            **{
                status: {"description": text, "$ref": "#/components/responses/Error"}
                for status, text in ERROR_STATUSES.items()
            },
            **{
                str(status): {"description": why, "content": {op.media_type: {"schema": schema}}}
                for status, why, schema in op.also
            },
        },
    }
    if op.who is not None:
        described["security"] = [{"bearer": []}]
        if op.who != "user":
            described["description"] = f"Needs a token with the role `{op.who}`."
    parameters = [
        {"name": name, "in": "path", "required": True, "schema": STRING}
        for name in _PATH_PARAM_RE.findall(op.path)
    ]
    parameters += [{"name": name, "in": "query", "schema": STRING} for name in op.query]
    if parameters:
        described["parameters"] = parameters
    if op.body is not None:
        described["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": op.body}},
        }
    return described


def _operation_id(op: Operation) -> str:
    words = re.sub(r"[^A-Za-z0-9]+", "_", op.path).strip("_") or "index"
    return f"{op.method.lower()}_{words}"


def openapi_document() -> Schema:
    """The HTTP API as an OpenAPI 3.1 document (JSON-ready)."""
    paths: dict[str, dict[str, Schema]] = {}
    for op in OPERATIONS:
        paths.setdefault(op.path, {})[op.method.lower()] = _operation(op)
    return {
        "openapi": OPENAPI_VERSION,
        "jsonSchemaDialect": JSON_SCHEMA_DIALECT,
        "info": {
            "title": "tokenchat HTTP API",
            "version": "v1",
            "description": (
                "JSON over HTTP; `Authorization: Bearer JWT` (the tokens of the WebSocket "
                '`hello`). Errors are `{"error": {"code", "message"}}` with the codes '
                "of the WebSocket protocol (GET /asyncapi.json). docs/protocol.md is the "
                "prose reference."
            ),
        },
        "servers": [{"url": "/"}],
        "paths": paths,
        "components": {
            "schemas": {**SHARED_SCHEMAS, "Error": ERROR},
            "responses": {
                "Error": {
                    "description": "An error",
                    "content": {"application/json": {"schema": ref("Error")}},
                }
            },
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
            },
        },
    }
