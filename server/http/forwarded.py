"""What a trusted reverse proxy says about the request it forwarded.

Behind nginx, Caddy or a PaaS router the server sees the proxy's address, the
proxy's scheme (plain HTTP) and whatever Host the proxy chose. The proxy says
what the browser used in ``X-Forwarded-Proto``, ``X-Forwarded-Host`` and
``X-Forwarded-For``. Anyone can send those headers, so they are applied only
when the peer is in ``TOKENCHAT_TRUSTED_PROXIES``: the scheme and the client
address in the scope, and the public host under ``FORWARDED_HOST_SCOPE_KEY``,
so ``GET /v1/config`` names ``wss://public.host/ws``.

The ``Host`` header itself is left as it came: a browser on this machine is a
trusted peer too (127.0.0.1), and a page whose DNS name was rebound to
127.0.0.1 may send any X-Forwarded-Host it likes; the dev token endpoint's
Host check must keep seeing the name that page really used.

This replaces uvicorn's ``proxy_headers``, which believes the same peers for
the scheme and the client address but ignores ``X-Forwarded-Host``.

RFC 7239 ``Forwarded`` (``proto=``, ``host=``, ``for=``) is read instead of
X-Forwarded-* when ``TOKENCHAT_FORWARDED_HEADERS=forwarded``, from the same
trusted peers. One family, never both: a proxy passes the family it does not
write from the client untouched (nginx and Caddy pass ``Forwarded``), so
whichever took precedence could be a client's. Its elements are walked from
the nearest proxy while ``for=`` names a trusted proxy; the element reached
was written by the proxy the browser talked to, and its ``proto``, ``host``
and ``for`` apply (elements a client put in front of it are never reached).
A header that does not parse is ignored whole, as if absent.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence

from starlette.types import ASGIApp, Receive, Scope, Send

# The scope key that says a trusted proxy forwarded the request (it sent
# X-Forwarded-Proto or X-Forwarded-Host): the browser then reached this server
# through the proxy's host and port, not the server's own.
FORWARDED_SCOPE_KEY = "tokenchat.forwarded"
# The scope key holding the host (and port) the browser used, per the proxy.
FORWARDED_HOST_SCOPE_KEY = "tokenchat.forwarded_host"

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# RFC 7239 section 4 (with RFC 7230's token and quoted-string): a forwarded-
# pair is token "=" (token / quoted-string). Linear: the quoted-string's two
# alternatives never match the same character.
_TCHARS = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_QUOTED = r'"(?:[\t\x20\x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t\x20-\x7e\x80-\xff])*"'
_PAIR = re.compile(rf"[ \t]*({_TCHARS})=({_TCHARS}|{_QUOTED})[ \t]*")
_SEPARATOR = re.compile(r"[ \t]*([;,])")
_UNESCAPE = re.compile(r"\\(.)")
# A node (section 6): an IPv4 address, a bracketed IPv6 address, "unknown"
# or an obfuscated identifier, each with an optional port or obfuscated port.
_NODE = re.compile(
    r"(?P<ip>[0-9.]+|\[[0-9A-Fa-f:.]+\]|unknown|_[A-Za-z0-9._-]+)"
    r"(?::(?P<port>[0-9]{1,5}|_[A-Za-z0-9._-]+))?"
)
# Elements one header may list: a chain of proxies is a handful of hops; more
# is not a proxy's doing, and the walk below stays short.
FORWARDED_ELEMENTS_MAX = 32


def first_value(raw: bytes) -> str:
    """The first of a comma-separated list: the value the outermost proxy set
    (a chain of proxies appends, each its own)."""
    return raw.decode("latin-1").split(",", 1)[0].strip()


def is_trusted(host: str, networks: Sequence[Network]) -> bool:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False  # a Unix socket path or a name: not an address we trust
    return any(address in network for network in networks)


def parse_forwarded(raw: str) -> list[dict[str, str]] | None:
    """The elements of a ``Forwarded`` value, outermost first, each a dict of
    lower-cased parameter to unquoted value; None when it does not parse (or
    repeats a parameter in an element, or lists more than
    FORWARDED_ELEMENTS_MAX elements): the caller ignores it whole."""
    elements: list[dict[str, str]] = [{}]
    position = 0
    while True:
        pair = _PAIR.match(raw, position)
        if pair is not None:
            name = pair.group(1).lower()
            value = pair.group(2)
            if value.startswith('"'):
                value = _UNESCAPE.sub(r"\1", value[1:-1])
            if name in elements[-1]:
                return None  # section 4: a parameter once per element
            elements[-1][name] = value
            position = pair.end()
        separator = _SEPARATOR.match(raw, position)
        if separator is None:
            break
        position = separator.end()
        if separator.group(1) == ",":
            if len(elements) >= FORWARDED_ELEMENTS_MAX:
                return None
            elements.append({})
    if raw[position:].strip(" \t"):
        return None  # something that is neither a pair nor a separator
    # Empty list elements (", ,") are allowed by RFC 7230's list rule.
    return [element for element in elements if element]


def node_of(value: str) -> tuple[str, int] | None:
    """A ``for=`` node as a scope client: (address or identifier, port or 0);
    None when it is no node (an unbracketed IPv6 address, a name)."""
    match = _NODE.fullmatch(value)
    if match is None:
        return None
    host = match.group("ip")
    if host.startswith("["):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return None
    elif host[0].isdigit():
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            return None
    port = match.group("port")
    if port is None or not port.isdigit():
        return host, 0  # none, or obfuscated
    if int(port) > 65535:
        return None
    return host, int(port)


class ForwardedHeaders:
    """ASGI middleware: the X-Forwarded-* of trusted peers, applied to the scope."""

    def __init__(self, app: ASGIApp, networks: Sequence[Network], rfc7239: bool = False) -> None:
        self.app = app
        self.networks = tuple(networks)
        # Read RFC 7239 Forwarded instead of X-Forwarded-* (never both).
        self.rfc7239 = rfc7239

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket") and self.networks:
            client = scope.get("client")
            if client and is_trusted(client[0], self.networks):
                scope = self._rfc7239_applied(scope) if self.rfc7239 else self._applied(scope)
        await self.app(scope, receive, send)

    def _applied(self, scope: Scope) -> Scope:
        found = dict(scope["headers"])  # the last of each name; these appear once
        scope = dict(scope)
        proto = found.get(b"x-forwarded-proto")
        host = found.get(b"x-forwarded-host")
        forwarded = _proto_and_host_applied(
            scope,
            first_value(proto) if proto is not None else "",
            first_value(host) if host is not None else "",
        )
        addresses = found.get(b"x-forwarded-for")
        if addresses is not None:
            # The nearest address that is not a trusted proxy is the client.
            hops = [hop.strip() for hop in addresses.decode("latin-1").split(",") if hop.strip()]
            for hop in reversed(hops):
                if not is_trusted(hop, self.networks):
                    scope["client"] = (hop, 0)
                    break
        scope[FORWARDED_SCOPE_KEY] = forwarded
        return scope

    def _rfc7239_applied(self, scope: Scope) -> Scope:
        # Every Forwarded field, in order: several fields are one list.
        fields = [value for name, value in scope["headers"] if name == b"forwarded"]
        elements = parse_forwarded(b",".join(fields).decode("latin-1")) if fields else None
        scope = dict(scope)
        scope[FORWARDED_SCOPE_KEY] = False
        if not elements:
            return scope  # absent or malformed: as if no proxy had said anything
        # From the nearest proxy back while its client was a trusted proxy
        # too: the element reached is the one the browser's proxy wrote.
        index = len(elements) - 1
        while index > 0:
            node = node_of(elements[index].get("for", ""))
            if node is None or not is_trusted(node[0], self.networks):
                break
            index -= 1
        element = elements[index]
        client = node_of(element["for"]) if "for" in element else None
        if "for" in element and client is None:
            return scope  # a for= that is no node: the header is malformed
        if client is not None:
            scope["client"] = client
        scope[FORWARDED_SCOPE_KEY] = _proto_and_host_applied(
            scope, element.get("proto", ""), element.get("host", "")
        )
        return scope


def _proto_and_host_applied(scope: Scope, proto: str, host: str) -> bool:
    """Apply a trusted proxy's scheme and host (either may be "": not said)
    to ``scope``, as both header families give them; True when either was."""
    forwarded = False
    proto = proto.lower()
    if proto in ("http", "https"):
        websocket = scope["type"] == "websocket"
        scope["scheme"] = {"http": "ws", "https": "wss"}[proto] if websocket else proto
        forwarded = True
    if host:
        # Checked where it is used (api.py's ws_url refuses a malformed one).
        scope[FORWARDED_HOST_SCOPE_KEY] = host
        forwarded = True
    return forwarded
