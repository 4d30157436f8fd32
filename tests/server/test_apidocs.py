"""The machine-readable APIs (issue #15 item 4): /openapi.json, /asyncapi.json
and /docs.

- Both documents are valid (against the OpenAPI 3.1 and AsyncAPI 3.0
  specifications' own schemas; every AsyncAPI payload a valid JSON Schema
  whose references resolve), and the copies in docs/ equal what is served.
- The document cannot drift from the app: its (method, path) set equals the
  app's routes, and each command schema accepts exactly what the command's
  declaration accepts.
- Real replies fit: one server is driven through every documented HTTP
  operation (each answer checked by the conftest's ``Http`` helper, which
  checks the whole suite's traffic too), and one realistic session sends
  every command (through the Python client's ``Session``, so what the client
  sends is checked) and receives every event kind, each frame checked; the
  tests then assert that every schema was used.
- /docs renders in Chromium from vendored files, under the page's CSP.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import orjson
import pytest
from openapi_spec_validator import validate as validate_openapi
from PIL import Image
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT7
from starlette.routing import Route

from tests import apischema
from tests.apischema import (
    ASYNCAPI_USED,
    OPENAPI_USED,
    CheckedClient,
    CheckingCodec,
    SchemaMismatch,
    WireValidator,
    check_command,
    check_http_reply,
    path_template,
)
from tests.client_demo.test_web import PageErrors, artifacts_dir, browser, chromium_missing
from tests.conftest import Http, Running, token
from tokenchat.client_demo import client as client_module
from tokenchat.client_demo.client import Session
from tokenchat.protocol import COMMANDS, codec_for
from tokenchat.protocol.commands import declared_fields
from tokenchat.protocol.schema import RESULT_FIELDS, asyncapi_document
from tokenchat.server.errors import ServiceError
from tokenchat.server.http.api import create_app
from tokenchat.server.http.apidocs import write_documents
from tokenchat.server.http.openapi import ERROR_STATUSES, OPERATIONS, openapi_document
from tokenchat.server.http.payments import sign_webhook

__all__ = ["browser"]  # the Chromium fixture of the demo page's tests

Start = Callable[..., Awaitable[Running]]
DOCS = Path(__file__).resolve().parents[2] / "docs"
VENDORED = Path(__file__).resolve().parents[2] / "client_demo" / "static" / "vendor" / "swagger-ui"
SWAGGER_UI_VERSION = "5.35.0"
WEBHOOK_SECRET = "whsec_apidocs_0123456789abcdef"
IBAN = "DE89370400440532013000"
# Timers short enough that a test sees each periodic event within a second.
FAST = {
    "dev_mode": 1,
    "payment_provider": "fake",
    "payment_webhook_secret": WEBHOOK_SECRET,
    "reality_check_minute_s": 1.0,
    "reality_check_poll_s": 0.1,
    "private_tick_s": 1,
    "private_meter_interval_s": 0.1,
    "live_away_s": 0.3,
    "live_job_interval_s": 0.05,
    "payout_min_tokens": 10,
    "standing_interval_s": 0.1,
}


# --- the documents ------------------------------------------------------------------------


def test_openapi_document_is_valid_openapi_3_1() -> None:
    document = openapi_document()
    validate_openapi(document)  # raises on the first violation of the 3.1 schema
    assert document["openapi"] == "3.1.0"


def _refs(node: object) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [r for value in node.values() for r in _refs(value)]
    if isinstance(node, list):
        return [r for value in node for r in _refs(value)]
    return []


def _resolve(document: dict[str, Any], pointer: str) -> object:
    assert pointer.startswith("#/"), pointer
    node: Any = document
    for part in pointer[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


ASYNCAPI_SPEC = Path(__file__).resolve().parent / "schemas" / "asyncapi-3.0.0.json"
ASYNCAPI_SPEC_SHA256 = "d4571a420e6ffb7fcc7066c95a6db1202f299a3c51daa103d0706bf30f95e626"


def test_asyncapi_document_is_valid_asyncapi_3_0() -> None:
    """Against the specification's own JSON Schema (tests/server/schemas/README.md)."""
    raw = ASYNCAPI_SPEC.read_bytes()
    assert hashlib.sha256(raw).hexdigest() == ASYNCAPI_SPEC_SHA256, "the vendored copy changed"
    spec = json.loads(raw)
    # Each definition names itself by its $id; references go by those ids.
    registry: Registry[Any] = Registry().with_resources(
        (definition["$id"], Resource.from_contents(definition, default_specification=DRAFT7))
        for definition in spec["definitions"].values()
        if isinstance(definition, dict) and "$id" in definition
    )
    validator = jsonschema.Draft7Validator(spec, registry=registry)
    document = asyncapi_document()
    problems = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(document)]
    assert not problems, problems[:5]
    # The check can fail: an operation whose action is neither send nor receive.
    document["operations"]["send_tip"]["action"] = "shout"
    assert not validator.is_valid(document)


def test_asyncapi_document_is_consistent() -> None:
    document = asyncapi_document()
    assert document["asyncapi"] == "3.0.0"
    for name, schema in document["components"]["schemas"].items():
        # AsyncAPI's default schema format is a superset of draft-07; these
        # use only what draft-07 and 2020-12 share, so both must accept them.
        jsonschema.Draft7Validator.check_schema(schema)
        jsonschema.Draft202012Validator.check_schema(schema)
        assert name.replace("_", "").isalnum(), name
    for pointer in _refs(document):
        _resolve(document, pointer)  # KeyError names a dangling reference
    channel = document["channels"]["session"]["messages"]
    for operation in document["operations"].values():
        messages = operation["messages"] + operation.get("reply", {}).get("messages", [])
        for message in messages:
            assert message["$ref"].split("/")[-1] in channel
    commands = {n for n in document["components"]["schemas"] if n.startswith("command_")}
    assert commands == {f"command_{t}" for t in COMMANDS}


def test_every_command_has_its_result_fields_declared() -> None:
    assert set(RESULT_FIELDS) | {"hello"} == set(COMMANDS), (
        "declare the ok reply's fields of each command in protocol/schema.py RESULT_FIELDS"
    )


def test_the_copies_in_docs_are_current(tmp_path: Path) -> None:
    write_documents(tmp_path)
    for name in ("openapi.json", "asyncapi.json"):
        fresh = (tmp_path / name).read_text()
        kept = (DOCS / name).read_text() if (DOCS / name).exists() else ""
        assert kept == fresh, (
            f"docs/{name} is stale: python -m tokenchat.server.http.apidocs docs/ rewrites it"
        )


# Values each field's schema and its WireField must agree on (none of them in
# the gaps the schema admits to: UTF-8 byte counts, printability).
CANDIDATES: list[object] = [
    None,
    True,
    0,
    1,
    -1,
    5.0,
    999_999,
    1_000_000,
    1_000_001,
    86_400,
    86_401,
    3600,
    2**53,
    "",
    " ",
    "a",
    "alice",
    "al ice",
    "m_abc-DEF_123",
    "i_0123456789abcdef",
    "1712345678901-0",
    "17-",
    "x" * 64,
    "x" * 65,
    "x" * 255,
    "x" * 256,
    "x" * 1000,
    "x" * 1001,
    "nul\x00",
    "ü",
    "a.b:c-d_e",
    ["a"],
    {"a": 1},
]


@pytest.mark.parametrize("type_name", sorted(COMMANDS))
def test_each_command_schema_accepts_what_its_declaration_accepts(type_name: str) -> None:
    for field in declared_fields(type_name):
        validator = WireValidator(dict(field.check.schema))
        for value in CANDIDATES:
            if value is None:
                continue  # absence: the `required` list, checked below
            by_schema = validator.is_valid(value)
            assert by_schema == field.check.accept(value), (type_name, field.name, value)
    frame = {"type": type_name, "id": 1}
    required = [f.name for f in declared_fields(type_name) if f.required]
    schema = asyncapi_document()["components"]["schemas"][f"command_{type_name}"]
    assert sorted(schema["required"]) == sorted(["type", *required])
    if required:
        with pytest.raises(SchemaMismatch):
            check_command(frame)


async def test_the_documented_operations_are_the_apps_routes_and_no_more(
    start_server: Start,
) -> None:
    # Dev mode on and no metrics port: the app routes every operation.
    server = await start_server(dev_mode=1, metrics_port=0)
    routed: set[tuple[str, str]] = set()
    for route in create_app(server.node).routes:
        if isinstance(route, Route):  # not the /static mount: files, not operations
            routed |= {(method, route.path) for method in route.methods or () if method != "HEAD"}
    documented = {(op.method, op.path) for op in OPERATIONS}
    assert len(documented) == len(OPERATIONS), "an operation is listed twice"
    assert documented == routed


# --- serving them -------------------------------------------------------------------------


async def test_documents_and_docs_page_are_served(server: Running) -> None:
    async with httpx.AsyncClient(base_url=server.http_url, timeout=30) as http:
        openapi = await http.get("/openapi.json")
        asyncapi = await http.get("/asyncapi.json")
        docs = await http.get("/docs")
        bundle = await http.get("/static/vendor/swagger-ui/swagger-ui-bundle.js")
        licence = await http.get("/static/vendor/swagger-ui/LICENSE")
    assert openapi.status_code == 200 and openapi.json() == openapi_document()
    assert openapi.headers["content-type"] == "application/json"
    assert asyncapi.status_code == 200 and asyncapi.json() == asyncapi_document()
    assert docs.status_code == 200 and docs.headers["content-type"].startswith("text/html")
    csp = docs.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "default-src 'self'" in csp
    assert bundle.status_code == 200 and len(bundle.content) > 1_000_000
    assert licence.status_code == 200 and "Apache License" in licence.text
    # Nothing from another origin: no CDN, and every asset a path of ours.
    assert not re.search(r"""(src|href)=["'](https?:)?//""", docs.text), docs.text
    version = json.loads((VENDORED / "package.json").read_text())["version"]
    assert version == SWAGGER_UI_VERSION
    assert SWAGGER_UI_VERSION in (VENDORED / "README.md").read_text()


async def test_docs_page_renders_every_operation_in_chromium(
    start_server: Start, browser: Any
) -> None:
    assert not chromium_missing()
    server = await start_server()
    page = await browser.new_page()
    errors = PageErrors()
    errors.watch("docs", page)
    blocked: list[str] = []
    page.on("requestfailed", lambda request: blocked.append(request.url))
    outside: list[str] = []
    page.on(
        "request",
        lambda request: (
            None if request.url.startswith(server.http_url) else outside.append(request.url)
        ),
    )
    await page.goto(server.http_url + "/docs")
    from playwright.async_api import expect

    operations = page.locator(".opblock")
    await expect(operations.first).to_be_visible()
    await expect(page.locator(".info .title")).to_contain_text("tokenchat HTTP API")
    assert await operations.count() == len(OPERATIONS)
    await page.locator(".opblock-summary-path", has_text="/v1/purchases").first.click()
    await expect(page.locator(".opblock-body").first).to_be_visible()
    await page.screenshot(path=str(artifacts_dir() / "docs.png"))
    assert not errors.seen, errors.seen  # CSP refusals are console errors
    assert not blocked and not outside, (blocked, outside)


# --- HTTP: every operation, its reply checked ---------------------------------------------


def png(width: int = 32, height: int = 32) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 90)).save(out, "PNG")
    return out.getvalue()


class Raw:
    """Calls Http.call cannot make (multipart, signed, not JSON), each reply
    checked against /openapi.json all the same."""

    def __init__(self, server: Running) -> None:
        self.base = server.http_url

    async def call(
        self, method: str, path: str, sub: str | None = None, role: str = "fan", **kwargs: Any
    ) -> httpx.Response:
        headers = kwargs.pop("headers", {})
        if sub is not None:
            headers["Authorization"] = f"Bearer {token(sub, role)}"
        async with httpx.AsyncClient(base_url=self.base, timeout=30) as http:
            response = await http.request(method, path, headers=headers, **kwargs)
        template = path_template(path)
        assert template is not None, path
        operation = openapi_document()["paths"][template][method.lower()]
        documented = operation["responses"][str(response.status_code)]["content"]
        media_type = response.headers["content-type"].partition(";")[0]
        assert media_type in documented or "*/*" in documented, (path, media_type, documented)
        if media_type == "application/json":
            check_http_reply(method, path, response.status_code, response.json())
        else:
            OPENAPI_USED.add((method, template, response.status_code))
        return response


async def webhook(raw: Raw, event: dict[str, Any]) -> None:
    """The payment provider's signed event."""
    body = orjson.dumps(event)
    hook = await raw.call(
        "POST",
        "/v1/payments/webhook",
        content=body,
        headers={
            "Payment-Signature": sign_webhook(WEBHOOK_SECRET, body, int(time.time())),
            "Content-Type": "application/json",
        },
    )
    assert hook.status_code == 200, hook.text


async def ok(
    http: Http, method: str, path: str, sub: str | None = None, role: str = "fan", **body: Any
) -> Any:
    status, reply = await http.call(method, path, sub, role, **body)
    assert status in (200, 201), (method, path, status, reply)
    return reply


async def test_every_operation_answers_as_documented(start_server: Start) -> None:
    OPENAPI_USED.clear()
    server = await start_server(**FAST)
    http, raw = Http(server), Raw(server)
    # Pages, documents, health.
    for path in ("/", "/admin", "/docs", "/metrics"):
        assert (await raw.call("GET", path)).status_code == 200
    for path in ("/healthz", "/readyz", "/openapi.json", "/asyncapi.json", "/v1/config"):
        await ok(http, "GET", path)
    # Http.call's `role` is the caller's: the body's goes as JSON here.
    minted = await raw.call("POST", "/v1/dev/token", json={"user": "zed", "role": "fan"})
    assert minted.status_code == 200, minted.text
    # The cast: alice (model), bob and carol (fans), ops (admin).
    for user, role in (("alice", "model"), ("bob", "fan"), ("carol", "fan")):
        await ok(http, "GET", "/v1/me", user, role)
    bundles = await ok(http, "GET", "/v1/bundles")
    await ok(http, "GET", "/v1/tiers")
    await ok(http, "PUT", "/v1/me/prices", "alice", "model", dm=2, private_rate=60)
    await ok(http, "PUT", "/v1/me/menu", "alice", "model", items=[{"label": "song", "price": 7}])
    await ok(http, "GET", "/v1/users/alice/prices")
    await ok(http, "GET", "/v1/users/alice/menu")
    await ok(http, "PUT", "/v1/me/profile", "alice", "model", display_name="Alice", tags=["jazz"])
    await ok(http, "GET", "/v1/models/alice")
    await ok(http, "GET", "/v1/rooms")
    await ok(http, "PUT", "/v1/me/follows/alice", "bob")
    await ok(http, "GET", "/v1/me/follows", "bob")
    await ok(http, "GET", "/v1/me/notifications", "bob")
    await ok(http, "DELETE", "/v1/me/follows/alice", "bob")
    # Money in.
    await http.credit("bob", 1000)
    bundle = bundles["bundles"][0]["id"]
    await ok(
        http, "POST", "/v1/purchases", "bob", bundle=bundle, payment_ref="pi_" + uuid.uuid4().hex
    )
    event = {
        "id": f"evt_{uuid.uuid4().hex}",
        "type": "payment.confirmed",
        "data": {
            "payment_ref": "pi_" + uuid.uuid4().hex,
            "user": "carol",
            "bundle": bundle,
            "amount_cents": bundles["bundles"][0]["price_cents"],
        },
    }
    await webhook(raw, event)
    # She spends some, then the payment is charged back: a flag for the shortfall.
    carol = await server.client("carol")
    await carol.call("join", room="alice")
    await carol.call("tip", room="alice", amount=5, key="carol-tip")
    chargeback = {
        "id": f"evt_{uuid.uuid4().hex}",
        "type": "payment.charged_back",
        "data": {"payment_ref": event["data"]["payment_ref"]},
    }
    await webhook(raw, chargeback)
    flags = await ok(http, "GET", "/v1/admin/flags", "ops", "admin")
    flag = flags["flags"][0]["id"]
    await ok(http, "POST", f"/v1/admin/flags/{flag}/resolve", "ops", "admin", resolution="ok")
    # The room: chat settings, moderators, a goal, shows.
    await ok(http, "PUT", "/v1/me/room", "alice", "model", slow_s=0)
    await ok(http, "GET", "/v1/me/moderators", "alice", "model")
    await ok(http, "PUT", "/v1/me/moderators", "alice", "model", users=["carol"])
    await ok(http, "PUT", "/v1/me/goal", "alice", "model", title="Piano", target=100)
    await ok(http, "GET", "/v1/rooms/alice/goal")
    await ok(http, "DELETE", "/v1/me/goal", "alice", "model")
    starts_at = int(time.time() * 1000) + 60_000
    shows = []
    for _ in range(2):
        show = await ok(
            http, "POST", "/v1/me/shows", "alice", "model",
            title="Late set", price=5, starts_at=starts_at, min_s=1,
        )  # fmt: skip
        shows.append(show["show"])
    await ok(http, "GET", "/v1/rooms/alice/shows")
    await ok(http, "POST", f"/v1/rooms/alice/shows/{shows[0]}/tickets", "bob", key="t1")
    await ok(http, "POST", f"/v1/me/shows/{shows[0]}/start", "alice", "model")
    await ok(http, "POST", f"/v1/me/shows/{shows[0]}/end", "alice", "model")
    await ok(http, "POST", f"/v1/me/shows/{shows[1]}/cancel", "alice", "model")
    # A tip and a DM over the WebSocket, then their receipts and a refund.
    bob = await server.client("bob")
    await bob.call("join", room="alice")
    tip = await bob.call("tip", room="alice", amount=5, key="tip-1")
    await bob.call("dm", to="alice", text="hi", key="dm-1")
    await ok(http, "GET", "/v1/rooms/alice/leaderboard")
    await ok(http, "GET", "/v1/me/transactions", "bob")
    await ok(http, "GET", f"/v1/me/transactions/{tip['tx']}", "bob")
    await ok(http, "GET", "/v1/me/dms?with=alice", "bob")
    await ok(http, "POST", "/v1/admin/refunds", "ops", "admin", tx=tip["tx"], key="r1")
    await ok(http, "GET", "/v1/admin/refunds", "ops", "admin")
    await ok(http, "GET", "/v1/me/requests", "bob")
    await ok(http, "GET", "/v1/me/privates", "bob")
    # Blocks and reports.
    await ok(http, "PUT", "/v1/me/blocks/carol", "bob")
    await ok(http, "GET", "/v1/me/blocks", "bob")
    await ok(http, "DELETE", "/v1/me/blocks/carol", "bob")
    report = await ok(http, "POST", "/v1/reports", "bob", user="carol", reason="spam")
    await ok(http, "GET", "/v1/admin/reports", "ops", "admin")
    await ok(http, "POST", f"/v1/admin/reports/{report['id']}/resolve", "ops", "admin")
    # Limits (self-exclusion on a fan of its own: it blocks her purchases).
    await ok(http, "GET", "/v1/me/limits", "bob")
    await ok(http, "PUT", "/v1/me/limits", "bob", daily=500)
    await ok(http, "POST", "/v1/me/self-exclusion", "dave", days=1)
    # Media.
    uploaded = await raw.call(
        "POST", "/v1/media", "alice", "model",
        files={"file": ("a.png", png(), "image/png")}, data={"price": "3"},
    )  # fmt: skip
    assert uploaded.status_code == 200, uploaded.text
    media = uploaded.json()["media"]["id"]
    await ok(http, "GET", f"/v1/media/{media}")
    await ok(http, "PUT", f"/v1/media/{media}", "alice", "model", price=4)
    signed = await ok(http, "GET", f"/v1/media/{media}/url", "alice", "model")
    assert (await raw.call("GET", signed["url"])).status_code == 200
    assert (await raw.call("GET", f"/v1/media/{media}/preview")).status_code == 200
    # Payouts.
    await ok(http, "POST", "/v1/admin/users/alice/verify", "ops", "admin")
    await ok(
        http,
        "PUT",
        "/v1/me/payout-method",
        "alice",
        "model",
        type="bank",
        holder="Alice A",
        iban=IBAN,
    )
    await ok(http, "GET", "/v1/me/payout-method", "alice", "model")
    await ok(http, "GET", "/v1/payout-rule", "alice", "model")
    await ok(http, "GET", "/v1/admin/payout-rules", "ops", "admin")
    await ok(
        http,
        "POST",
        "/v1/admin/payout-rules",
        "ops",
        "admin",
        cents_per_token=5,
        min_payout_tokens=1,
    )
    await bob.call("tip", room="alice", amount=50, key="tip-2")
    first = await ok(http, "POST", "/v1/me/payouts", "alice", "model", tokens=20, key="p1")
    second = await ok(http, "POST", "/v1/me/payouts", "alice", "model", tokens=20, key="p2")
    await ok(http, "GET", "/v1/me/payouts", "alice", "model")
    await ok(http, "GET", "/v1/admin/payouts", "ops", "admin")
    await ok(http, "POST", f"/v1/admin/payouts/{first['payout']}/approve", "ops", "admin")
    await ok(http, "POST", f"/v1/admin/payouts/{second['payout']}/reject", "ops", "admin")
    await ok(http, "GET", "/v1/me/earnings", "alice", "model")
    await ok(http, "GET", "/v1/admin/liabilities", "ops", "admin")
    await ok(http, "DELETE", "/v1/admin/users/alice/verify", "ops", "admin")
    # Operators.
    for path in (
        "/v1/admin/reconcile",
        "/v1/admin/ledger/rejected",
        "/v1/admin/audit",
        "/v1/admin/stats",
        "/v1/admin/users?prefix=a",
        "/v1/admin/users/bob",
        "/v1/admin/users/bob/transactions",
        "/v1/admin/flags",
    ):
        await ok(http, "GET", path, "ops", "admin")
    await ok(http, "GET", "/v1/me", "erin")  # a user exists once seen
    await ok(http, "POST", "/v1/admin/bans/erin", "ops", "admin", seconds=60)
    await ok(http, "DELETE", "/v1/admin/bans/erin", "ops", "admin")
    # The account's end.
    await ok(http, "GET", "/v1/me/export", "carol")
    await ok(http, "DELETE", "/v1/me", "carol", confirm="carol")
    # Some errors, each in the shape the document gives every error.
    assert (await http.call("GET", "/v1/me"))[0] == 401
    assert (await http.call("GET", "/v1/admin/stats", "bob"))[0] == 403
    assert (await http.call("PUT", "/v1/me/limits", "bob", daily=-1))[0] == 400
    assert (await http.call("GET", "/v1/nowhere"))[0] == 404
    # Every operation was called and answered with its documented success.
    answered = {(m, p) for m, p, status in OPENAPI_USED if status < 300}
    missing = sorted({(op.method, op.path) for op in OPERATIONS} - answered)
    assert not missing, missing


def test_every_error_status_the_server_uses_is_documented() -> None:
    def statuses(cls: type[ServiceError]) -> set[int]:
        found = {cls.http_status}
        for sub in cls.__subclasses__():
            found |= statuses(sub)
        return found

    assert {str(status) for status in statuses(ServiceError)} <= set(ERROR_STATUSES)


def test_a_reply_the_document_does_not_allow_is_caught() -> None:
    # The check itself can fail: an undocumented status, a missing field.
    with pytest.raises(SchemaMismatch):
        check_http_reply("GET", "/v1/me", 201, {"user": {"id": "a", "role": "fan"}, "balance": 1})
    with pytest.raises(SchemaMismatch):
        check_http_reply("GET", "/v1/me", 200, {"user": {"id": "a", "role": "fan"}})
    with pytest.raises(SchemaMismatch):
        check_http_reply("GET", "/v1/me", 401, {"error": {"code": "NOPE", "message": "x"}})


# --- WebSocket: every command and event kind ----------------------------------------------


class SessionClient(CheckedClient):
    """The connection the Python client's Session opens, with every command
    it sends checked too (it sends no invalid ones on purpose)."""

    check_commands = True
    problems: list[str] = []

    def __init__(self, ws: Any, codec: Any) -> None:
        super().__init__(ws, CheckingCodec(codec, SessionClient.problems))


@pytest.fixture
def session_clients(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Sessions (client_demo.client.Session) connect through SessionClient."""
    SessionClient.problems = []
    monkeypatch.setattr(client_module, "Client", SessionClient)
    yield SessionClient.problems
    assert not SessionClient.problems, SessionClient.problems


async def next_of(session: Session, kind: str, timeout_s: float = 5.0) -> dict[str, Any]:
    return dict(await session.next_event(kind, timeout_s=timeout_s))


async def test_a_session_sends_every_command_and_gets_every_event(
    start_server: Start, session_clients: list[str]
) -> None:
    ASYNCAPI_USED.clear()
    server = await start_server(**FAST)
    http = Http(server)
    await ok(http, "GET", "/v1/me", "alice", "model")
    await ok(http, "PUT", "/v1/me/prices", "alice", "model", dm=1, private_rate=60)
    menu = await ok(
        http, "PUT", "/v1/me/menu", "alice", "model", items=[{"label": "song", "price": 3}]
    )
    await ok(http, "PUT", "/v1/me/follows/alice", "bob")
    bob = await Session.connect(server.ws_url, token("bob"))
    alice = await Session.connect(server.ws_url, token("alice", "model"))
    carol_client = await server.client("carol")
    assert isinstance(carol_client, CheckedClient)
    carol_client.check_commands = True
    await http.credit("bob", 1000)
    await next_of(bob, "balance")
    await ok(http, "PUT", "/v1/me/limits", "bob", reality_check_min=1)
    await alice.join("alice")  # she goes live: `live` to her followers
    await next_of(bob, "live")
    await bob.join("alice")
    await carol_client.call("join", room="alice")
    await carol_client.call("history", room="alice", since="0-0")  # a page: none missed yet
    await next_of(alice, "presence")
    # Chat, tips, king, goal.
    await ok(http, "PUT", "/v1/me/goal", "alice", "model", title="Piano", target=100)
    await bob.say("alice", "hello")
    await next_of(alice, "message")
    await bob.tip("alice", 5, text="for you")
    await next_of(alice, "tip")
    await next_of(alice, "goal")  # published by the tip's own script
    await next_of(alice, "king")  # by the standing projector, after the ledger
    await bob.tip_item("alice", menu["items"][0]["id"])
    await bob.dm("alice", "hi there")
    await next_of(alice, "dm")
    assert await bob.get_balance() > 0
    await bob.call("ping")
    # Media.
    uploaded = await Raw(server).call(
        "POST", "/v1/media", "alice", "model",
        files={"file": ("a.png", png(), "image/png")}, data={"price": "3"},
    )  # fmt: skip
    media = uploaded.json()["media"]["id"]
    await alice.post_media("alice", media, "new photo")
    await next_of(bob, "media")
    await bob.unlock(media)
    # Custom requests: delivered, declined, cancelled; listed.
    for ending in ("deliver", "decline", "cancel"):
        offered = await bob.request_offer("alice", f"a song to {ending}", 5)
        request_id = offered["request"]
        if ending == "deliver":
            await alice.request_accept(request_id)
            await alice.request_deliver(request_id, "done")
        elif ending == "decline":
            await alice.request_decline(request_id)
        else:
            await bob.request_cancel(request_id)
    await next_of(bob, "request")
    await bob.requests()
    # Private shows: declined, then accepted and ended.
    asked = await bob.private_request("alice", 60)
    await alice.private_decline(asked["show"])
    asked = await bob.private_request("alice", 60)
    await alice.private_accept(asked["show"])
    await next_of(bob, "private")
    await bob.private_end(asked["show"])
    # Ticket shows: bought, started, ended; another cancelled.
    starts_at = int(time.time() * 1000) + 60_000
    shows = [
        (await ok(http, "POST", "/v1/me/shows", "alice", "model",
                  title="Set", price=5, starts_at=starts_at, min_s=1))["show"]
        for _ in range(2)
    ]  # fmt: skip
    await bob.buy_ticket("alice", shows[0])
    await alice.show_start(shows[0])
    await next_of(bob, "show")
    await alice.show_end(shows[0])
    await alice.show_cancel(shows[1])
    # Moderation, on carol.
    await alice.mute("alice", "carol", 60)
    await alice.unmute("alice", "carol")
    await alice.slow("alice", 0)
    await carol_client.call("say", room="alice", text="spam")
    await alice.clear("alice", "carol")
    await next_of(bob, "clear")
    await alice.kick("alice", "carol")
    await carol_client.next_event("removed")
    await carol_client.call("join", room="alice")
    await alice.ban("alice", "carol", 60)
    await alice.unban("alice", "carol")
    await bob.leave("alice")
    # Errors, as replies: an unknown room, a frame that is no command.
    assert (await carol_client.request("join", room="nobody"))["type"] == "error"
    await next_of(bob, "reality_check")
    await bob.close()
    await alice.close()
    await carol_client.close()
    schemas = asyncapi_document()["components"]["schemas"]
    wanted = {n for n in schemas if n.split("_")[0] in ("command", "reply", "frame")} | {"error"}
    assert not sorted(wanted - ASYNCAPI_USED), sorted(wanted - ASYNCAPI_USED)


async def test_a_frame_the_document_does_not_allow_is_caught() -> None:
    with pytest.raises(SchemaMismatch):
        apischema.check_event({"type": "tip", "room": "a", "from": "b", "amount": -1})
    with pytest.raises(SchemaMismatch):
        apischema.check_event({"type": "no_such_event"})
    with pytest.raises(SchemaMismatch):
        apischema.check_reply("tip", {"type": "ok", "re": 1, "balance": 5})
    with pytest.raises(SchemaMismatch):
        check_command({"type": "tip", "room": "alice", "amount": 0, "key": "k"})
    problems: list[str] = []
    codec = CheckingCodec(codec_for(None), problems)
    codec.decode(b'{"type": "balance", "balance": "many"}')
    assert problems and "balance" in problems[0]
