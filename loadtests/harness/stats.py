"""Latency recording, percentiles and medians over runs."""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Sequence
from typing import Any

NS_PER_S = 1_000_000_000
NS_PER_MS = 1_000_000
US_PER_S = 1_000_000

# --- latency histogram -----------------------------------------------------------
# Log-spaced buckets, each 2 % wider than the last, from 10 us to ~100 s: a
# percentile is exact to 2 % and memory does not grow with the delivery count.
HIST_MIN_NS = 10_000
HIST_GROWTH = 1.02
HIST_BUCKETS = 820
_INV_LOG_GROWTH = 1.0 / math.log(HIST_GROWTH)

LEDGER_LAG_METRIC = "tokenchat_ledger_lag_seconds"


class Stats:
    """What the members of one load process counted (single-threaded)."""

    def __init__(self) -> None:
        self.window_start_ns = 0
        self.window_end_ns = 0
        self.counting = False
        self.received_total = 0  # benchmark events since "go", any time
        self.received_in_window = 0
        self.hist = [0] * HIST_BUCKETS
        self.errors = 0  # error replies (tokenchat: a `say` refused)
        self.disconnects = 0  # members whose connection ended during the run
        self.setup_retries = 0  # hello/join answered UNAVAILABLE and sent again

    def record(self, now_ns: int, sent_ns: int) -> None:
        self.received_total += 1
        if self.window_start_ns <= now_ns < self.window_end_ns:
            self.received_in_window += 1
            latency_ns = now_ns - sent_ns
            index = 0
            if latency_ns > HIST_MIN_NS:
                index = min(
                    int(math.log(latency_ns / HIST_MIN_NS) * _INV_LOG_GROWTH), HIST_BUCKETS - 1
                )
            self.hist[index] += 1


def hist_percentile_ms(hist: Sequence[int], fraction: float) -> float:
    """The latency (ms) below which ``fraction`` of the samples fall."""
    total = sum(hist)
    if total == 0:
        return math.nan
    rank = fraction * total
    seen = 0
    for index, count in enumerate(hist):
        seen += count
        if seen >= rank:
            # The geometric middle of the bucket.
            return HIST_MIN_NS * math.pow(HIST_GROWTH, index + 0.5) / NS_PER_MS
    return HIST_MIN_NS * math.pow(HIST_GROWTH, HIST_BUCKETS) / NS_PER_MS


def merge_hists(hists: Sequence[Sequence[int]]) -> list[int]:
    """The histograms of several load processes as one."""
    if not hists:
        return [0] * HIST_BUCKETS
    return [sum(column) for column in zip(*hists, strict=True)]


def merge_counts(dicts: Sequence[dict[str, int]]) -> dict[str, int]:
    merged: dict[str, int] = {}
    for counts in dicts:
        for code, count in counts.items():
            merged[code] = merged.get(code, 0) + count
    return merged


# --- Prometheus histograms (the ledger lag of tokenchat's /metrics) --------------


def histogram_quantile(buckets: list[tuple[float, float]], fraction: float) -> float:
    """Prometheus's histogram_quantile: linear within the bucket holding the
    rank; past the last finite bound, that bound (the figure is then "at least")."""
    if not buckets or buckets[-1][1] <= 0:
        return math.nan
    rank = fraction * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (
                count - lower_count
            )
        lower_bound, lower_count = bound, count
    return lower_bound


_BUCKET_LINE = re.compile(LEDGER_LAG_METRIC + r'_bucket\{le="([^"]+)"\} ([0-9.e+-]+)')


def ledger_lag_buckets(metrics_text: str) -> list[tuple[float, float]]:
    """(upper bound s, cumulative count) of the ledger lag histogram."""
    buckets = [
        (float(match.group(1)), float(match.group(2)))
        for match in _BUCKET_LINE.finditer(metrics_text)
    ]
    return sorted(buckets)


def lag_delta(
    before: list[tuple[float, float]], after: list[tuple[float, float]]
) -> list[tuple[float, float]]:
    """The histogram's increase between two scrapes (cumulative buckets)."""
    earlier = dict(before)
    return [(bound, count - earlier.get(bound, 0.0)) for bound, count in after]


# --- over runs --------------------------------------------------------------------


def median(values: Sequence[float | None]) -> float:
    """The median of the figures that were measured (None and NaN left out)."""
    clean = [v for v in values if isinstance(v, int | float) and not math.isnan(v)]
    return statistics.median(clean) if clean else math.nan


def values_of(rows: list[dict[str, Any]], column: str, kind: str, key: str) -> list[float]:
    """``key`` of the rows whose ``column`` is ``kind``, where it was measured."""
    return [
        r[key]
        for r in rows
        if r[column] == kind and isinstance(r.get(key), int | float) and not math.isnan(r[key])
    ]


def median_of(rows: list[dict[str, Any]], column: str, kind: str, key: str) -> float:
    values = values_of(rows, column, kind, key)
    return statistics.median(values) if values else math.nan


def per_run_ratios(
    rows: list[dict[str, Any]], column: str, kind: str, baseline: str, key: str
) -> list[float]:
    """``key`` of each ``kind`` row over that of the baseline row of its run."""
    return [
        t[key] / b[key]
        for t, b in zip(
            [r for r in rows if r[column] == kind],
            [r for r in rows if r[column] == baseline],
            strict=False,
        )
        if b[key]
    ]


def ratio_of_medians(
    rows: list[dict[str, Any]], column: str, kind: str, baseline: str, key: str
) -> float:
    """The median of ``key`` over ``kind`` rows, over that of the baseline rows."""
    base = median_of(rows, column, baseline, key)
    return median_of(rows, column, kind, key) / base if base else math.nan
