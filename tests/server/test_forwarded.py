"""RFC 7239 ``Forwarded`` from trusted proxies (server/http/forwarded.py):
read only when TOKENCHAT_FORWARDED_HEADERS=forwarded, walked from the nearest
proxy, hostile and malformed values ignored (never a 500)."""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest

from tests.conftest import Running
from tokenchat.server.config import Settings
from tokenchat.server.http.forwarded import (
    FORWARDED_ELEMENTS_MAX,
    FORWARDED_HOST_SCOPE_KEY,
    FORWARDED_SCOPE_KEY,
    ForwardedHeaders,
    Network,
    node_of,
    parse_forwarded,
)

PROXIES: list[Network] = [
    ipaddress.ip_network("10.0.0.0/8"),
    ipaddress.ip_network("fd00::/8"),
]


async def scope_after(
    headers: list[tuple[str, str]],
    *,
    peer: str = "10.0.0.1",
    rfc7239: bool = True,
    kind: str = "http",
) -> dict[str, Any]:
    """The scope the app behind the middleware sees for a request from
    ``peer`` with ``headers``."""
    seen: dict[str, Any] = {}

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.update(scope)

    middleware = ForwardedHeaders(app, PROXIES, rfc7239=rfc7239)
    scope = {
        "type": kind,
        "scheme": "ws" if kind == "websocket" else "http",
        "client": (peer, 50000),
        "headers": [(name.lower().encode(), value.encode("latin-1")) for name, value in headers],
    }

    async def receive() -> Any:
        raise AssertionError("not read")

    async def send(message: Any) -> None:
        raise AssertionError("not sent")

    await middleware(scope, receive, send)
    return seen


def test_parse_follows_rfc_7239_section_4() -> None:
    assert parse_forwarded("for=192.0.2.60;proto=http;by=203.0.113.43") == [
        {"for": "192.0.2.60", "proto": "http", "by": "203.0.113.43"}
    ]
    # Parameter names are case-insensitive; quoted values are unquoted.
    assert parse_forwarded('For="[2001:db8:cafe::17]:4711"') == [
        {"for": "[2001:db8:cafe::17]:4711"}
    ]
    assert parse_forwarded("for=192.0.2.43, for=198.51.100.17") == [
        {"for": "192.0.2.43"},
        {"for": "198.51.100.17"},
    ]
    # A comma or semicolon inside quotes belongs to the value; \\ escapes.
    assert parse_forwarded('host="a,b;c", for="x\\"y"') == [{"host": "a,b;c"}, {"for": 'x"y'}]
    assert parse_forwarded(" , for=_hidden ,") == [{"for": "_hidden"}]  # empty elements


@pytest.mark.parametrize(
    "raw",
    [
        "for=1.2.3.4;for=5.6.7.8",  # a parameter twice in one element
        "for=1.2.3.4 junk",
        "for = 1.2.3.4",
        'for="unterminated',
        "for=[::1]",  # brackets are not token characters: must be quoted
        "proto=https;host=a b",
        "for=1\x00",
        ", ".join(["for=10.0.0.1"] * (FORWARDED_ELEMENTS_MAX + 1)),
    ],
)
def test_parse_refuses_what_is_not_the_grammar(raw: str) -> None:
    assert parse_forwarded(raw) is None


def test_nodes() -> None:
    assert node_of("192.0.2.60") == ("192.0.2.60", 0)
    assert node_of("192.0.2.60:8080") == ("192.0.2.60", 8080)
    assert node_of("[2001:db8::1]:4711") == ("2001:db8::1", 4711)
    assert node_of("unknown") == ("unknown", 0)
    assert node_of("_hidden:_port") == ("_hidden", 0)
    for bad in ("2001:db8::1", "999.1.1.1", "[zz]", "evil.example", "1.2.3.4:99999", ""):
        assert node_of(bad) is None, bad


async def test_a_trusted_proxys_forwarded_sets_scheme_host_and_client() -> None:
    scope = await scope_after(
        [("Forwarded", 'for="[2001:db8::7]:4711";proto=HTTPS;host="chat.example.com:8443"')]
    )
    assert scope["scheme"] == "https"
    assert scope[FORWARDED_HOST_SCOPE_KEY] == "chat.example.com:8443"
    assert scope["client"] == ("2001:db8::7", 4711)
    assert scope[FORWARDED_SCOPE_KEY] is True
    websocket = await scope_after([("Forwarded", "proto=https")], kind="websocket")
    assert websocket["scheme"] == "wss"
    # Obfuscated: the proxy hides the client, and says so.
    hidden = await scope_after([("Forwarded", "for=_k7f2;proto=http")])
    assert hidden["client"] == ("_k7f2", 0) and hidden["scheme"] == "http"


async def test_the_walk_stops_at_the_browsers_proxy() -> None:
    """A client may send a Forwarded of its own through a proxy that appends:
    its elements come first and are never reached."""
    chain = (
        "for=203.0.113.9;proto=http;host=evil.example, "  # the client's own
        "for=198.51.100.20;proto=https;host=chat.example.com, "  # the edge proxy
        'for="[fd00::5]";proto=http;host=internal'  # an inner trusted proxy
    )
    scope = await scope_after([("Forwarded", chain)])
    assert scope["client"] == ("198.51.100.20", 0)
    assert scope["scheme"] == "https"
    assert scope[FORWARDED_HOST_SCOPE_KEY] == "chat.example.com"
    # Two Forwarded fields are one list, in order.
    split = await scope_after(
        [
            ("Forwarded", "for=198.51.100.20;proto=https"),
            ("Forwarded", "for=10.1.2.3;proto=http"),
        ]
    )
    assert split["client"] == ("198.51.100.20", 0) and split["scheme"] == "https"
    # Every hop trusted (a browser inside the proxies' network): the first.
    inside = await scope_after([("Forwarded", "for=10.9.9.9;proto=https, for=10.1.1.1")])
    assert inside["client"] == ("10.9.9.9", 0) and inside["scheme"] == "https"


@pytest.mark.parametrize(
    "value",
    [
        "for=1.2.3.4;;;proto=https junk",
        "for=nonsense.example;proto=https",  # a for= that is no node
        'for="[not:an:address:zz]";proto=https',
        "proto=https;proto=http",
        "for=" + "9" * 10_000,
        '"',
        "",
    ],
)
async def test_malformed_forwarded_is_ignored_whole(value: str) -> None:
    scope = await scope_after([("Forwarded", value), ("X-Forwarded-Proto", "https")])
    assert scope["scheme"] == "http"
    assert scope["client"] == ("10.0.0.1", 50000)
    assert FORWARDED_HOST_SCOPE_KEY not in scope
    assert scope[FORWARDED_SCOPE_KEY] is False


async def test_unknown_protos_are_not_applied() -> None:
    scope = await scope_after([("Forwarded", "proto=javascript;for=198.51.100.1")])
    assert scope["scheme"] == "http" and scope[FORWARDED_SCOPE_KEY] is False
    assert scope["client"] == ("198.51.100.1", 0)


async def test_an_untrusted_peer_and_the_other_family_are_ignored() -> None:
    forwarded = [("Forwarded", "for=198.51.100.1;proto=https;host=evil.example")]
    untrusted = await scope_after(forwarded, peer="203.0.113.50")
    assert untrusted["scheme"] == "http" and untrusted["client"] == ("203.0.113.50", 50000)
    assert FORWARDED_HOST_SCOPE_KEY not in untrusted
    # X-Forwarded-* mode (the default): a client's Forwarded passed through
    # by nginx or Caddy is not read.
    x_mode = await scope_after(forwarded, rfc7239=False)
    assert x_mode["scheme"] == "http" and x_mode["client"] == ("10.0.0.1", 50000)
    assert x_mode[FORWARDED_SCOPE_KEY] is False
    # Forwarded mode: a client's X-Forwarded-* passed through is not read.
    f_mode = await scope_after([("X-Forwarded-Proto", "https"), ("X-Forwarded-For", "1.2.3.4")])
    assert f_mode["scheme"] == "http" and f_mode["client"] == ("10.0.0.1", 50000)


def test_settings_refuse_an_unknown_family() -> None:
    with pytest.raises(ValueError, match="TOKENCHAT_FORWARDED_HEADERS"):
        Settings(forwarded_headers="both")


async def ws_url(running: Running, **headers: str) -> str:
    async with httpx.AsyncClient(timeout=5.0) as http:
        response = await http.get(running.http_url + "/v1/config", headers=headers)
    assert response.status_code == 200, response.text
    url: str = response.json()["ws_url"]
    return url


async def test_config_behind_a_forwarded_proxy(
    start_server: Callable[..., Awaitable[Running]],
) -> None:
    """End to end: the test client is 127.0.0.1, a trusted peer by default."""
    running = await start_server(forwarded_headers="forwarded")
    header = 'for="[2001:db8::9]";proto=https;host="chat.example.com"'
    assert await ws_url(running, Forwarded=header) == "wss://chat.example.com/ws"
    ws_port = running.process.ws_port
    bare = f"ws://127.0.0.1:{ws_port}/ws"
    # Malformed, or the X-Forwarded family: as if nothing were forwarded.
    assert await ws_url(running, Forwarded='proto=https;host="chat') == bare
    assert await ws_url(running, Forwarded="host=a/ b") == bare
    assert await ws_url(running, **{"X-Forwarded-Proto": "https"}) == bare
    # A host value that parses but is no host is not echoed into the URL.
    assert await ws_url(running, Forwarded='proto=https;host="evil/ x"') == (
        f"wss://127.0.0.1:{running.process.http_port}/ws"
    )


async def test_config_ignores_forwarded_from_an_untrusted_peer(
    start_server: Callable[..., Awaitable[Running]],
) -> None:
    running = await start_server(forwarded_headers="forwarded", trusted_proxies="10.0.0.0/8")
    header = "proto=https;host=evil.example"
    assert await ws_url(running, Forwarded=header) == (
        f"ws://127.0.0.1:{running.process.ws_port}/ws"
    )
