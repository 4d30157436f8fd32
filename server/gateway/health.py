"""Liveness and readiness, answered alike on the HTTP port (``http_api``) and
the WebSocket port (``gateway``), so a load balancer may probe either.

``/healthz`` says the process runs. ``/readyz`` says it should get traffic:
both backends answer and the process is not draining after SIGTERM; in
delivery mode `relay` it also says whether the relay is behind
(``relay_behind``: the oldest pending delivery is older than
TOKENCHAT_RELAY_LAG_MAX_S).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any

from redis.exceptions import RedisError

from ..economy.relay import deliveries_state

if TYPE_CHECKING:
    from .node import Node

HEALTHZ_PATH = "/healthz"
READYZ_PATH = "/readyz"
# /readyz gives each backend this long to answer before calling it down.
READY_CHECK_TIMEOUT_S = 1.0

HEALTHY: dict[str, Any] = {"ok": True}


async def readiness(node: Node) -> tuple[int, dict[str, Any]]:
    """(HTTP status, body) of ``GET /readyz``: 200 when ready, else 503."""
    checks = {"redis": False, "postgres": False}
    # Twice: the first ping after Redis came back may meet a pooled
    # connection that died with the old server; that is not "not ready".
    for _ in range(2):
        try:
            async with asyncio.timeout(READY_CHECK_TIMEOUT_S):
                checks["redis"] = bool(await node.redis.ping())
            break
        except (RedisError, OSError, TimeoutError):
            pass
    try:
        async with asyncio.timeout(READY_CHECK_TIMEOUT_S):
            checks["postgres"] = await node.pool.fetchval("SELECT 1") == 1
    except (Exception, TimeoutError):  # any failure means "not ready"
        pass
    draining = node.draining
    ready = all(checks.values()) and not draining
    body: dict[str, Any] = {"ok": ready, **checks, "draining": draining}
    if node.economy.delivery == "relay" and checks["redis"]:
        # Reported, not a reason for 503: the relay is every node's, and a
        # node taken out of the balancer would not deliver any sooner.
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            async with asyncio.timeout(READY_CHECK_TIMEOUT_S):
                state = await deliveries_state(node.redis, node.keys, node.settings.relay_lag_max_s)
            body["relay_behind"] = state["behind"]
    return (200 if ready else 503), body
