"""The wire protocol as a machine-readable document: an AsyncAPI 3.0 document
whose messages carry JSON Schemas, one per command, reply, event and error.

One source of truth each:

- commands: generated from their declarations (``commands.declared_fields``:
  each field's ``WireField.schema``), so a new command or a changed bound is
  in the document as soon as it is declared;
- error codes and close codes: from ``errors.ErrorCode`` and ``CloseCode``;
- events and the result fields of ``ok`` replies: declared here, beside the
  builders' words in events.py and docs/protocol.md ("Events", "Commands"),
  since the builders are functions with nothing to read. The tests check
  every frame a realistic session receives against them.

Every object allows fields it does not name (``additionalProperties`` is left
open): the server ignores fields a command does not declare, and clients
ignore fields an event gains, so either side can be newer (docs/protocol.md,
"Frames"). The schemas use the keywords JSON Schema draft-07 and 2020-12
share (AsyncAPI's default schema format is a superset of draft-07), and name
each other as ``#/components/schemas/NAME`` inside the document.

One rule the schemas cannot carry: the wire's integers are JSON integers, and
``5.0`` is refused (docs/protocol.md, "Frames"), while JSON Schema's
``integer`` admits a number with no fraction. A validator that means to agree
with the server checks ``integer`` strictly (tests/apischema.py does).

Pure, like the rest of protocol/: the server serves the document at
``GET /asyncapi.json``, and docs/asyncapi.json is a copy a test keeps equal.
"""

from typing import Any, Final

from .codec import JSON_SUBPROTOCOL, MSGPACK_SUBPROTOCOL
from .commands import COMMANDS, WireField, declared_fields, ecma_pattern
from .errors import CloseCode, ErrorCode
from .limits import (
    ID_INT_MAX,
    ID_INT_MIN,
    ID_STR_LEN_MAX,
    OFFSET_RE,
    USER_ID_RE,
)

Schema = dict[str, Any]

ASYNCAPI_VERSION: Final = "3.0.0"
# The document's own version: the wire contract's (a change to it is a new one).
PROTOCOL_VERSION: Final = "v1"
# Where a document names another schema (AsyncAPI components).
SCHEMA_REF: Final = "#/components/schemas/"


def ref(name: str) -> Schema:
    return {"$ref": SCHEMA_REF + name}


def nullable(schema: Schema) -> Schema:
    return {"anyOf": [schema, {"type": "null"}]}


def obj(required: dict[str, Schema], optional: dict[str, Schema] | None = None) -> Schema:
    """An object with these fields (and, open, any others)."""
    return {
        "type": "object",
        "properties": {**required, **(optional or {})},
        "required": list(required),
    }


def const(value: str) -> Schema:
    return {"const": value}


def array(items: Schema) -> Schema:
    return {"type": "array", "items": items}


def wire(check: WireField) -> Schema:
    """A field checked by ``check``: its JSON Schema and its words."""
    return {"description": check.describe, **check.schema}


# --- values every frame uses ------------------------------------------------------------
STRING: Final[Schema] = {"type": "string"}
INTEGER: Final[Schema] = {"type": "integer"}
BOOLEAN: Final[Schema] = {"type": "boolean"}
ANY: Final[Schema] = {}
USER_ID: Final = {"type": "string", "pattern": ecma_pattern(USER_ID_RE)}
OFFSET: Final = {"type": "string", "pattern": ecma_pattern(OFFSET_RE)}
TOKENS: Final[Schema] = {"type": "integer", "minimum": 0}  # a balance, price or amount
MS: Final[Schema] = {"type": "integer", "minimum": 0}  # ms since the Unix epoch
COMMAND_ID: Final[Schema] = {
    "anyOf": [
        {"type": "integer", "minimum": ID_INT_MIN, "maximum": ID_INT_MAX},
        {"type": "string", "minLength": 1, "maxLength": ID_STR_LEN_MAX},
    ]
}
TX: Final[Schema] = {"type": "string", "minLength": 1}

# Shapes shared by events, replies and the HTTP API (docs/protocol.md).
SHARED_SCHEMAS: Final[dict[str, Schema]] = {
    "user_id": USER_ID,
    "offset": OFFSET,
    "correlation_id": COMMAND_ID,
    "media_descriptor": obj(
        {"id": STRING, "kind": {"enum": ["image", "video"]}, "price": TOKENS},
        {
            "preview": {
                "oneOf": [
                    obj({"kind": const("image"), "url": STRING}),
                    obj({"kind": const("text"), "text": STRING}),
                ]
            }
        },
    ),
    "king": nullable(obj({"user": USER_ID, "tokens": TOKENS})),
    "goal": obj(
        {
            "id": STRING,
            "title": STRING,
            "target": TOKENS,
            "progress": TOKENS,
            "state": {"enum": ["active", "reached", "failed", "deleted"]},
            "all_or_nothing": BOOLEAN,
            "deadline": nullable(MS),
        }
    ),
    "show": obj(
        {
            "room": USER_ID,
            "show": STRING,
            "title": STRING,
            "state": {"enum": ["scheduled", "running", "ended", "cancelled"]},
            "price": TOKENS,
            "starts_at": MS,
            "min_s": INTEGER,
        },
        {"started_at": nullable(MS), "ended_at": nullable(MS)},
    ),
    "private_show": obj(
        {
            "show": STRING,
            "fan": USER_ID,
            "model": USER_ID,
            "rate": TOKENS,
            "min_s": INTEGER,
            "state": {"enum": ["requested", "accepted", "running", "ended", "declined", "expired"]},
            "seconds": INTEGER,
            "charged": TOKENS,
        },
        {
            "expires_ms": nullable(MS),
            "room": nullable(STRING),
            "reason": nullable(STRING),
            "warning": const("low_balance"),
            "seconds_left": INTEGER,
        },
    ),
    "custom_request": obj(
        {
            "request": STRING,
            "from": USER_ID,
            "to": USER_ID,
            "text": STRING,
            "amount": TOKENS,
            "state": STRING,
            "expires_ms": nullable(MS),
        },
        {"delivery": nullable(obj({"text": STRING}, {"media": nullable(STRING)}))},
    ),
}

# --- events -----------------------------------------------------------------------------
# A room event (stored in the room's history, replayed by `join`) has these.
_ROOM_EVENT: Final[dict[str, Schema]] = {"room": STRING, "offset": OFFSET, "ts": MS}
# ...and, posted while a ticket show ran, the show's id.
_IN_SHOW: Final[dict[str, Schema]] = {"in_show": STRING}

EVENT_SCHEMAS: Final[dict[str, Schema]] = {
    "message": obj({**_ROOM_EVENT, "from": USER_ID, "text": STRING}, {"tier": INTEGER, **_IN_SHOW}),
    "tip": obj(
        {**_ROOM_EVENT, "from": USER_ID, "amount": TOKENS, "text": STRING},
        {
            "tier": INTEGER,
            "item": obj({"id": STRING, "label": STRING}),
            # The tip's transaction (its `ok` reply's `tx`): a client's
            # seen-set de-duplicates by it (docs/protocol.md, "tip").
            "tx": TX,
            **_IN_SHOW,
        },
    ),
    "dm": obj(
        {"from": USER_ID, "text": STRING, "price": TOKENS, "tx": TX, "ts": MS},
        {"tier": INTEGER, "media": ref("media_descriptor")},
    ),
    "media": obj(
        {**_ROOM_EVENT, "from": USER_ID, "media": ref("media_descriptor"), "text": STRING},
        _IN_SHOW,
    ),
    "king": obj({**_ROOM_EVENT, "king": ref("king")}),
    "presence": obj({"room": STRING, "viewers": {"type": "integer", "minimum": 0}}),
    "live": obj({"model": USER_ID, "ts": MS}),
    "balance": obj({"balance": TOKENS}),
    "show": {"allOf": [ref("show"), obj({"offset": OFFSET, "ts": MS})]},
    "goal": obj({**_ROOM_EVENT, "goal": ref("goal")}),
    "request": {"allOf": [ref("custom_request"), obj({"ts": MS})]},
    "clear": obj({"room": STRING, "user": USER_ID}, {"all": {"const": True}}),
    "removed": obj({"room": STRING, "reason": {"enum": ["kicked", "banned"]}}, {"until": MS}),
    "reality_check": obj(
        {"online_s": {"type": "integer", "minimum": 0}, "spent": TOKENS, "every_min": INTEGER}
    ),
    "private": {"allOf": [ref("private_show"), obj({"ts": MS})]},
}
EVENT_SUMMARIES: Final[dict[str, str]] = {
    "message": "A chat line in a room (to every member, the sender included).",
    "tip": "A tip in a room; `item` when a menu item was tipped.",
    "dm": "A private message, to every open session of its recipient.",
    "media": "Locked media shown in a room: its descriptor, never its content.",
    "king": "The room's king (top tipper over the king window) changed.",
    "presence": "The room's session count changed (coalesced, at most one a second).",
    "live": "A model the user follows went live.",
    "balance": "The user's balance, after someone else's action changed it.",
    "show": "A ticket show of the room changed state.",
    "goal": "The room's tip goal was set, progressed, was reached, failed or deleted.",
    "request": "A custom request changed state (to its fan and its model).",
    "clear": (
        "A moderator cleared a user's chat lines (`all`: the user deleted their account, "
        "every line of theirs went): hide them."
    ),
    "removed": "This session was kicked or banned from a room.",
    "reality_check": "Time online and tokens spent, every `every_min` minutes.",
    "private": "A private show changed state or charged a period.",
}

# --- replies ----------------------------------------------------------------------------
_DUPLICATE: Final[dict[str, Schema]] = {"duplicate": BOOLEAN}
_ROOM_USER: Final[dict[str, Schema]] = {"room": STRING, "user": USER_ID}
_REQUEST_STATE: Final[dict[str, Schema]] = {"request": STRING, "state": STRING}
_SETTLED: Final[dict[str, Schema]] = {"settled": ANY}
_SHOW_STATE: Final[dict[str, Schema]] = {"show": STRING, "state": STRING}
_ROOM_FIELD: Final = obj(
    {"id": USER_ID, "owner": USER_ID, "viewers": INTEGER, "tip_min": TOKENS},
    {"show": nullable(ref("show")), "king": ref("king"), "goal": nullable(ref("goal"))},
)
_HISTORY_EVENT: Final = {
    "oneOf": [
        {"allOf": [obj({"type": const(kind)}), ref(f"event_{kind}")]}
        for kind in ("message", "tip", "media", "king", "show", "goal")
    ]
}

# Each command's `ok` result fields: (always there, sometimes there).
RESULT_FIELDS: Final[dict[str, tuple[dict[str, Schema], dict[str, Schema]]]] = {
    "join": (
        {
            "room": _ROOM_FIELD,
            "history": array(_HISTORY_EVENT),
            "recovered": BOOLEAN,
            "more": BOOLEAN,
        },
        # `next`, with `more`: the offset to page on from (history).
        {"ticket": BOOLEAN, "next": OFFSET},
    ),
    "history": (
        {
            "room": USER_ID,
            "history": array(_HISTORY_EVENT),
            "recovered": BOOLEAN,
            "more": BOOLEAN,
        },
        {"next": OFFSET},
    ),
    "leave": ({}, {}),
    "say": ({"offset": OFFSET}, {}),
    "tip": (
        {"balance": TOKENS, "tx": TX},
        {
            # Absent in delivery mode `relay` (docs/protocol.md, "tip"): the
            # tip is not in the room's history yet when it is acknowledged.
            "offset": OFFSET,
            **_DUPLICATE,
            "price": TOKENS,
            "item": obj({"id": STRING, "label": STRING}),
            "goal": ref("goal"),
        },
    ),
    "dm": ({"balance": TOKENS, "price": TOKENS, "tx": TX}, _DUPLICATE),
    "post_media": ({"offset": OFFSET}, {}),
    "unlock": (
        # `url` is null on a retry of an unlock since refunded (revoked).
        {"balance": TOKENS, "tx": nullable(TX), "price": TOKENS, "url": nullable(STRING)},
        {**_DUPLICATE, "already": BOOLEAN},
    ),
    "balance": ({"balance": TOKENS}, {}),
    "ping": ({}, {}),
    "request_offer": ({"request": STRING, "balance": TOKENS, "tx": TX}, _DUPLICATE),
    "request_accept": (_REQUEST_STATE, _DUPLICATE),
    "request_deliver": ({**_REQUEST_STATE, **_SETTLED}, _DUPLICATE),
    "request_decline": ({**_REQUEST_STATE, **_SETTLED}, _DUPLICATE),
    "request_cancel": ({**_REQUEST_STATE, **_SETTLED}, _DUPLICATE),
    "request_list": ({"requests": array(ref("custom_request"))}, {}),
    "private_request": ({**_SHOW_STATE, "rate": TOKENS}, _DUPLICATE),
    "private_accept": ({**_SHOW_STATE, "room": STRING}, _DUPLICATE),
    "private_decline": (_SHOW_STATE, _DUPLICATE),
    # A request withdrawn before it ran was never billed: no `seconds` then.
    "private_end": (
        _SHOW_STATE,
        {**_DUPLICATE, "reason": ANY, "seconds": INTEGER, "charged": TOKENS, **_SETTLED},
    ),
    "buy_ticket": ({}, {**_DUPLICATE, "already": BOOLEAN, "balance": TOKENS, "tx": ANY}),
    "show_start": (_SHOW_STATE, _DUPLICATE),
    "show_end": (_SHOW_STATE, _DUPLICATE),
    "show_cancel": (_SHOW_STATE, _DUPLICATE),
    "mute": ({**_ROOM_USER, "until": MS}, {}),
    "unmute": (_ROOM_USER, {}),
    "kick": (_ROOM_USER, {}),
    "ban": ({**_ROOM_USER, "until": nullable(MS)}, {}),
    "unban": (_ROOM_USER, {}),
    "clear": ({**_ROOM_USER, "removed": {"type": "integer", "minimum": 0}}, {}),
    "slow": (
        {"room": STRING, "slow_s": INTEGER, "chat_requires": STRING, "chat_min_balance": TOKENS},
        {},
    ),
}


def command_schema(type_name: str) -> Schema:
    """The JSON Schema of command ``type_name``, from its declaration."""
    cls = COMMANDS[type_name]
    properties: dict[str, Schema] = {
        "type": const(type_name),
        "id": nullable(ref("correlation_id")),
    }
    required = ["type"]
    for field in declared_fields(type_name):
        if not field.check.schema:
            raise ValueError(f"{type_name}.{field.name}: its WireField has no schema")
        schema = wire(field.check)
        if field.required:
            required.append(field.name)
            properties[field.name] = schema
        else:  # null counts as absent
            properties[field.name] = nullable(schema)
    described: Schema = {"type": "object", "properties": properties, "required": required}
    # A declaration without a docstring gets dataclass's signature (with
    # addresses in it), which is no description.
    if cls.__doc__ and not cls.__doc__.startswith(f"{cls.__name__}("):
        described["description"] = " ".join(cls.__doc__.split())
    return described


def ok_schema(type_name: str) -> Schema:
    """The ``ok`` reply to command ``type_name`` (``welcome`` for hello)."""
    if type_name == "hello":
        return obj(
            {
                "type": const("welcome"),
                "user": obj({"id": USER_ID, "role": {"enum": ["fan", "model", "admin"]}}),
                "balance": TOKENS,
                "session": STRING,
            },
            {"re": ref("correlation_id")},
        )
    # A command declared without its result fields here still gets a
    # document (any ok reply); tests/server/test_apidocs.py asks for them.
    always, sometimes = RESULT_FIELDS.get(type_name, ({}, {}))
    return obj({"type": const("ok"), **always}, {"re": ref("correlation_id"), **sometimes})


def error_schema() -> Schema:
    """The ``error`` reply: its ``code`` from ErrorCode; some codes carry more
    (``until`` of MUTED, BANNED, SLOW_MODE, SELF_EXCLUDED; ``window``,
    ``remaining``, ``resets_at`` of SPEND_LIMIT)."""
    return obj(
        {
            "type": const("error"),
            "code": {"enum": [code.value for code in ErrorCode]},
            "message": STRING,
        },
        {
            "re": ref("correlation_id"),
            "until": nullable(MS),
            "window": STRING,
            "remaining": TOKENS,
            "resets_at": MS,
        },
    )


def event_schema(kind: str) -> Schema:
    """An event's frame: its fields and ``type``, never ``re``."""
    frame = obj({"type": const(kind)})
    frame["not"] = {"required": ["re"]}
    return {"allOf": [frame, ref(f"event_{kind}")]}


def _message(name: str, title: str, summary: str) -> Schema:
    return {"name": name, "title": title, "summary": summary, "payload": ref(name)}


def asyncapi_document() -> Schema:
    """The whole protocol as an AsyncAPI 3.0 document (JSON-ready)."""
    schemas: dict[str, Schema] = dict(SHARED_SCHEMAS)
    messages: dict[str, Schema] = {}
    operations: dict[str, Schema] = {}
    channel = {"$ref": "#/channels/session"}
    schemas["error"] = error_schema()
    messages["error"] = _message("error", "error", "The failure reply to a command.")
    for type_name in COMMANDS:
        command_name, reply_name = f"command_{type_name}", f"reply_{type_name}"
        schemas[command_name] = command_schema(type_name)
        schemas[reply_name] = ok_schema(type_name)
        summary = schemas[command_name].get("description", f"The {type_name} command.")
        messages[command_name] = _message(command_name, type_name, summary)
        reply_type = "welcome" if type_name == "hello" else "ok"
        messages[reply_name] = _message(
            reply_name, f"{reply_type} ({type_name})", f"The {reply_type} reply to {type_name}."
        )
        operations[f"receive_{type_name}"] = {
            "action": "receive",
            "channel": channel,
            "messages": [{"$ref": f"#/channels/session/messages/{command_name}"}],
            "reply": {
                "channel": channel,
                "messages": [
                    {"$ref": f"#/channels/session/messages/{reply_name}"},
                    {"$ref": "#/channels/session/messages/error"},
                ],
            },
        }
    for kind, schema in EVENT_SCHEMAS.items():
        schemas[f"event_{kind}"] = schema
        schemas[f"frame_{kind}"] = event_schema(kind)
        messages[f"frame_{kind}"] = {
            **_message(f"frame_{kind}", kind, EVENT_SUMMARIES[kind]),
            "payload": ref(f"frame_{kind}"),
        }
        operations[f"send_{kind}"] = {
            "action": "send",
            "channel": channel,
            "messages": [{"$ref": f"#/channels/session/messages/frame_{kind}"}],
        }
    return {
        "asyncapi": ASYNCAPI_VERSION,
        "info": {
            "title": "tokenchat WebSocket protocol",
            "version": PROTOCOL_VERSION,
            "description": (
                "One WebSocket session per client at /ws. The first frame is `hello`; "
                "every command gets one reply (`ok`, `welcome` or `error`, with `re` "
                "equal to the command's `id`); events carry no `re`. "
                "docs/protocol.md is the prose reference; this document is generated "
                "from the command declarations in protocol/commands.py."
            ),
        },
        "defaultContentType": "application/json",
        "servers": {
            "gateway": {
                "host": "{host}",
                "protocol": "ws",
                "pathname": "/ws",
                "description": (
                    f"Subprotocols {JSON_SUBPROTOCOL} (text frames, JSON) and "
                    f"{MSGPACK_SUBPROTOCOL} (binary frames, msgpack): the same fields in both."
                ),
                "variables": {
                    "host": {
                        "default": "127.0.0.1:8001",
                        "description": "TOKENCHAT_WS_PORT, or the HTTP port in one-port mode",
                    }
                },
            }
        },
        "channels": {
            "session": {
                "address": "/ws",
                "title": "A client's session",
                "description": "Close codes: "
                + ", ".join(f"{code.value} {code.name}" for code in CloseCode),
                "messages": {name: {"$ref": f"#/components/messages/{name}"} for name in messages},
            }
        },
        "operations": operations,
        "components": {"schemas": schemas, "messages": messages},
    }
