"""Real traffic checked against the published documents: HTTP replies against
/openapi.json and WebSocket frames against /asyncapi.json.

Both documents are built from the code (server/http/openapi.py,
protocol/schema.py), so a test that checks what the server really sent
against them finds a document that lies as surely as a server that drifted.
The conftest's ``Http`` helper checks every reply it gets (so the whole
suite's HTTP traffic is checked); the WebSocket checks run where a test asks
(tests/server/test_apidocs.py drives a session through every command and
event kind).

Each check records which schema it used, so a test can assert that its
traffic used every one (``OPENAPI_USED``, ``ASYNCAPI_USED``).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import Any

import jsonschema
from referencing import Registry
from referencing.jsonschema import DRAFT202012

from tokenchat.client_demo.client import REPLY_TIMEOUT_S, Client
from tokenchat.protocol import Codec, ProtocolError, parse_command
from tokenchat.protocol.schema import asyncapi_document
from tokenchat.server.http.openapi import openapi_document

OPENAPI_URI = "urn:tokenchat:openapi"
ASYNCAPI_URI = "urn:tokenchat:asyncapi"
REPLY_TYPES = frozenset({"ok", "error", "welcome"})

# (method, path template, status) of every reply checked; schema names of
# every WebSocket frame checked.
OPENAPI_USED: set[tuple[str, str, int]] = set()
ASYNCAPI_USED: set[str] = set()


class SchemaMismatch(AssertionError):
    """What the server sent (or the client would send) is not what the
    document says."""


@functools.cache
def documents() -> tuple[dict[str, Any], dict[str, Any], Registry[Any]]:
    openapi, asyncapi = openapi_document(), asyncapi_document()
    registry: Registry[Any] = Registry().with_resources(
        [
            (OPENAPI_URI, DRAFT202012.create_resource(openapi)),
            (ASYNCAPI_URI, DRAFT202012.create_resource(asyncapi)),
        ]
    )
    return openapi, asyncapi, registry


def _is_wire_integer(checker: object, instance: object) -> bool:
    # The wire refuses 5.0 and true where it wants an integer; JSON Schema's
    # `integer` admits 5.0, so the check is made as strict as the server.
    return isinstance(instance, int) and not isinstance(instance, bool)


# Draft 2020-12, with the wire's integers (protocol/schema.py says why).
WireValidator = jsonschema.validators.extend(
    jsonschema.Draft202012Validator,
    type_checker=jsonschema.Draft202012Validator.TYPE_CHECKER.redefine("integer", _is_wire_integer),
)


def _check(uri: str, pointer: str, value: object, what: str) -> None:
    registry = documents()[2]
    validator = WireValidator({"$ref": f"{uri}#{pointer}"}, registry=registry)
    errors = sorted(validator.iter_errors(value), key=lambda e: list(e.absolute_path))
    if errors:
        first = errors[0]
        where = "/".join(str(p) for p in first.absolute_path) or "(top)"
        raise SchemaMismatch(f"{what}: at {where}: {first.message}\n{value!r}"[:2000])


# --- HTTP ---------------------------------------------------------------------------------


@functools.cache
def _templates() -> list[tuple[re.Pattern[str], str]]:
    """Each documented path as a regex matching the paths it names."""
    openapi = documents()[0]
    compiled = []
    for template in openapi["paths"]:
        pattern = re.sub(r"\\\{[a-z_]+\\\}", "[^/]+", re.escape(template))
        compiled.append((re.compile(pattern + r"\Z"), template))
    # Literal paths first: /v1/me/follows before /v1/me/follows/{model}.
    compiled.sort(key=lambda item: item[1].count("{"))
    return compiled


def path_template(path: str) -> str | None:
    bare = path.partition("?")[0]
    for pattern, template in _templates():
        if pattern.fullmatch(bare):
            return template
    return None


def check_http_reply(method: str, path: str, status: int, body: object) -> None:
    """A JSON reply of the HTTP API, against /openapi.json: the status is one
    the operation documents, and the body fits that status's schema. A path
    the document does not name must have been answered 404 or 405."""
    template = path_template(path)
    openapi = documents()[0]
    operation = None if template is None else openapi["paths"][template].get(method.lower())
    if operation is None:
        if status not in (404, 405):
            raise SchemaMismatch(f"{method} {path} is not in /openapi.json but got {status}")
        _check(OPENAPI_URI, "/components/schemas/Error", body, f"{method} {path} {status}")
        return
    assert template is not None
    responses = operation["responses"]
    if str(status) not in responses:
        raise SchemaMismatch(
            f"{method} {template} answered {status}, which /openapi.json does not list "
            f"({', '.join(responses)})"
        )
    OPENAPI_USED.add((method.upper(), template, status))
    response = responses[str(status)]
    if "$ref" in response:  # an error: #/components/responses/Error
        _check(OPENAPI_URI, "/components/schemas/Error", body, f"{method} {path} {status}")
        return
    escaped = template.replace("~", "~0").replace("/", "~1")
    pointer = (
        f"/paths/{escaped}/{method.lower()}/responses/{status}/content/application~1json/schema"
    )
    if "application/json" not in response["content"]:
        return  # not JSON: a page, metrics, media content
    _check(OPENAPI_URI, pointer, body, f"{method} {path} {status}")


# --- WebSocket ----------------------------------------------------------------------------


def check_command(frame: dict[str, Any]) -> None:
    """A command a client sends, against its schema."""
    name = f"command_{frame.get('type')}"
    if name not in documents()[1]["components"]["schemas"]:
        raise SchemaMismatch(f"no command {frame.get('type')!r} in /asyncapi.json")
    ASYNCAPI_USED.add(name)
    _check(ASYNCAPI_URI, f"/components/schemas/{name}", frame, f"command {frame.get('type')}")


def check_reply(command_type: str, reply: dict[str, Any]) -> None:
    """The reply to a command: an ``error``, or the command's own ok/welcome."""
    name = "error" if reply.get("type") == "error" else f"reply_{command_type}"
    ASYNCAPI_USED.add(name)
    _check(ASYNCAPI_URI, f"/components/schemas/{name}", reply, f"reply to {command_type}")


def check_event(frame: dict[str, Any]) -> None:
    """A frame the server pushed: an event (or an error with no ``re``)."""
    kind = frame.get("type")
    if kind == "error":
        check_reply("", frame)
        return
    name = f"frame_{kind}"
    if name not in documents()[1]["components"]["schemas"]:
        raise SchemaMismatch(f"event {kind!r} is not in /asyncapi.json: {frame!r}")
    ASYNCAPI_USED.add(name)
    _check(ASYNCAPI_URI, f"/components/schemas/{name}", frame, f"event {kind}")


# --- the test client, checked -------------------------------------------------------------


class CheckingCodec:
    """A client's codec that checks every pushed frame it decodes (events,
    and errors without ``re``) and keeps what did not fit in ``problems``:
    it runs in the client's reader task, where raising would only stall the
    test, so the fixture that made the client asserts ``problems`` is empty."""

    def __init__(self, inner: Codec, problems: list[str]) -> None:
        self.inner = inner
        self.subprotocol = inner.subprotocol
        self.binary = inner.binary
        self.problems = problems

    def encode(self, obj: Mapping[str, Any]) -> bytes:
        return self.inner.encode(obj)

    def decode(self, data: bytes | str) -> object:
        message = self.inner.decode(data)
        if isinstance(message, dict) and message.get("type") not in REPLY_TYPES:
            try:
                check_event(message)
            except SchemaMismatch as exc:
                self.problems.append(str(exc))
        return message


class CheckedClient(Client):
    """The test client, its traffic checked against /asyncapi.json: each
    reply against the reply schema of the command it answers, each pushed
    frame (through ``CheckingCodec``) against its event's schema, and, with
    ``check_commands``, each command it sends (tests of hostile input send
    invalid ones on purpose, so that is off by default)."""

    check_commands = False

    def watch(self, problems: list[str]) -> CheckedClient:
        self.codec = CheckingCodec(self.codec, problems)
        return self

    async def request(
        self, type_: str, *, timeout_s: float = REPLY_TIMEOUT_S, **fields: Any
    ) -> dict[str, Any]:
        frame = {"type": type_, **fields}
        if self.check_commands:
            check_command(frame)
        reply = await super().request(type_, timeout_s=timeout_s, **fields)
        if reply.get("type") == "error":
            check_reply(type_, reply)
            return reply
        # An invalid command is answered `error`: one that got `ok` was valid,
        # and its reply is checked against that command's reply schema.
        try:
            parse_command(frame)
        except ProtocolError:
            raise SchemaMismatch(f"{frame!r} is not a valid command but got {reply!r}") from None
        check_reply(type_, reply)
        return reply
