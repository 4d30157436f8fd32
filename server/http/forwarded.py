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
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from starlette.types import ASGIApp, Receive, Scope, Send

# The scope key that says a trusted proxy forwarded the request (it sent
# X-Forwarded-Proto or X-Forwarded-Host): the browser then reached this server
# through the proxy's host and port, not the server's own.
FORWARDED_SCOPE_KEY = "tokenchat.forwarded"
# The scope key holding the host (and port) the browser used, per the proxy.
FORWARDED_HOST_SCOPE_KEY = "tokenchat.forwarded_host"

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


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


class ForwardedHeaders:
    """ASGI middleware: the X-Forwarded-* of trusted peers, applied to the scope."""

    def __init__(self, app: ASGIApp, networks: Sequence[Network]) -> None:
        self.app = app
        self.networks = tuple(networks)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket") and self.networks:
            client = scope.get("client")
            if client and is_trusted(client[0], self.networks):
                scope = self._applied(scope)
        await self.app(scope, receive, send)

    def _applied(self, scope: Scope) -> Scope:
        found = dict(scope["headers"])  # the last of each name; these appear once
        scope = dict(scope)
        forwarded = False
        proto = found.get(b"x-forwarded-proto")
        if proto is not None:
            value = first_value(proto).lower()
            if value in ("http", "https"):
                websocket = scope["type"] == "websocket"
                scope["scheme"] = {"http": "ws", "https": "wss"}[value] if websocket else value
                forwarded = True
        host = found.get(b"x-forwarded-host")
        if host is not None and first_value(host):
            scope[FORWARDED_HOST_SCOPE_KEY] = first_value(host)
            forwarded = True
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
