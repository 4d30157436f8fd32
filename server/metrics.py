"""Prometheus metrics of a gateway process.

With ``--workers N`` every worker writes to ``PROMETHEUS_MULTIPROC_DIR`` (set
by the parent before the workers start) and ``/metrics`` on any worker
aggregates all of them, so a scrape sees the whole machine.

With ``TOKENCHAT_METRICS_PORT`` set, ``serve_on_port`` answers scrapes on that
port instead (in the parent when there are workers), from the same registry
``render`` uses, and the public HTTP port no longer serves ``/metrics``.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
    start_http_server,
)

SESSIONS = Gauge(
    "tokenchat_sessions_open",
    "WebSocket sessions open (authenticated or not)",
    multiprocess_mode="livesum",
)
COMMANDS = Counter(
    "tokenchat_commands_total", "Commands handled, by type and result", ["type", "result"]
)
DELIVERIES = Counter("tokenchat_deliveries_total", "Events written to member connections")
ERRORS = Counter("tokenchat_errors_total", "Error replies sent, by code", ["code"])
CLOSES = Counter(
    "tokenchat_session_closes_total", "Sessions closed by the server, by code", ["code"]
)
FANOUT_LATENCY = Histogram(
    "tokenchat_fanout_latency_seconds",
    "From an event's commit in Redis to its write to this node's members",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)

LEDGER_WRITTEN = Counter("tokenchat_ledger_entries_total", "Outbox entries written to Postgres")
LEDGER_REJECTED = Counter(
    "tokenchat_ledger_rejected_total", "Outbox entries Postgres refused (see ledger_rejected)"
)
LEDGER_REJECTED_ROWS = Gauge(
    "tokenchat_ledger_rejected_rows",
    "Rows in ledger_rejected (parked entries waiting for an operator): counted by"
    " reconcile and GET /v1/admin/ledger/rejected, raised by each parking",
    multiprocess_mode="livemax",
)
LEDGER_LAG = Histogram(
    "tokenchat_ledger_lag_seconds",
    "From a transaction's commit in Redis to its commit in Postgres",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)

WORKER_REPLACEMENTS = Counter(
    "tokenchat_worker_replacements_total",
    "Gateway workers started by `serve --workers N` to replace one that died",
)


def _registry() -> CollectorRegistry:
    """This process's metrics, or every worker's when they share a folder."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return registry
    return REGISTRY


def render() -> tuple[bytes, str]:
    """The exposition text of this process, or of all workers when shared."""
    return generate_latest(_registry()), CONTENT_TYPE_LATEST


def serve_on_port(host: str, port: int) -> None:
    """Answer scrapes on ``host:port`` from a thread (never the event loop).

    Call it after ``PROMETHEUS_MULTIPROC_DIR`` is set when there are workers:
    the registry is chosen here, once."""
    start_http_server(port, addr=host, registry=_registry())
