"""What the three consumers of a Redis stream group share: the ledger writer
(the outbox), the DM archiver (the DM log) and the delivery relay (the
delivery stream). Each reads with XREADGROUP, takes a dead consumer's
entries with XAUTOCLAIM, and acknowledges only what it handled."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from redis.exceptions import ResponseError

# How long drain() waits after a pass that handled nothing (s): drain is for
# shutdown and tests, where a short poll is cheap.
DRAIN_POLL_S = 0.05


async def create_group(redis: Any, stream: str, group: str) -> None:
    """The group (and the stream) from the start, unless it exists."""
    try:
        await redis.xgroup_create(stream, group, id="0", mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


async def drain(
    step: Callable[..., Awaitable[int]], pending: Callable[[], Awaitable[int]], timeout_s: float
) -> int:
    """Handle until the stream is empty or the time is up; what is left.
    Claims everything (``claim_idle_ms=0``): an entry another consumer holds
    is handled twice at worst, which each consumer makes a no-op (ON
    CONFLICT, the relay's dedupe key, the archive's key)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await pending() == 0:
            return 0
        if await step(block=False, claim_idle_ms=0) == 0:
            await asyncio.sleep(DRAIN_POLL_S)
    return await pending()


class ClaimClock:
    """When to look for a dead consumer's entries: every half claim time
    (an entry idle that long is claimed), not on every read."""

    __slots__ = ("_last",)

    def __init__(self) -> None:
        self._last = 0.0

    def idle_ms(self, claim_idle_s: float, override_ms: int | None) -> int | None:
        """The min-idle time to claim with now, or None: not yet."""
        now = time.monotonic()
        if override_ms is None:
            if now - self._last < claim_idle_s / 2:
                return None
            override_ms = int(claim_idle_s * 1000)
        self._last = now
        return override_ms
