"""Token bucket: ``rate_per_s`` sustained, ``burst`` at once."""

from __future__ import annotations

import time


class TokenBucket:
    __slots__ = ("_burst", "_rate_per_s", "_stamp", "_tokens")

    def __init__(self, rate_per_s: float, burst: int) -> None:
        if rate_per_s <= 0 or burst < 1:
            raise ValueError("rate_per_s must be > 0 and burst >= 1")
        self._rate_per_s = rate_per_s
        self._burst = float(burst)
        self._tokens = float(burst)
        self._stamp = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self._tokens = min(self._burst, self._tokens + (now - self._stamp) * self._rate_per_s)
        self._stamp = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


class KeyedLimiter:
    """One ``TokenBucket`` per key (a user id), for at most ``keys_max`` keys.

    Past the bound, the least recently used bucket is dropped: its key starts
    again with a full burst, which costs at most one burst per eviction, and
    the memory stays bounded whatever the number of keys seen."""

    __slots__ = ("_buckets", "_burst", "_keys_max", "_rate_per_s")

    def __init__(self, rate_per_s: float, burst: int, keys_max: int) -> None:
        if keys_max < 1:
            raise ValueError("keys_max must be >= 1")
        TokenBucket(rate_per_s, burst)  # refuses a bad rate or burst now, not later
        self._rate_per_s = rate_per_s
        self._burst = burst
        self._keys_max = keys_max
        # Insertion order is recency: a key used is moved to the end.
        self._buckets: dict[str, TokenBucket] = {}

    def take(self, key: str) -> bool:
        bucket = self._buckets.pop(key, None)
        if bucket is None:
            while len(self._buckets) >= self._keys_max:
                del self._buckets[next(iter(self._buckets))]
            bucket = TokenBucket(self._rate_per_s, self._burst)
        self._buckets[key] = bucket
        return bucket.take()

    def __len__(self) -> int:
        return len(self._buckets)
