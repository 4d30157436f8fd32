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
import platform
from importlib.metadata import PackageNotFoundError, version

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
# From a command's frame read to its reply written, by command type: the
# latency a client sees, less the network. Buckets from 0.5 ms (a say on an
# idle node) to 5 s (a spend waiting on the ledger in durability `ledger`).
COMMAND_SECONDS = Histogram(
    "tokenchat_command_duration_seconds",
    "From a command's arrival to its reply, by command type (valid commands only)",
    ["type"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
# Hellos admitted together (server/gateway/admission.py): 1 on a quiet node,
# up to hello_batch_max (500) in a reconnect storm.
HELLO_BATCH_SIZE = Histogram(
    "tokenchat_hello_batch_size",
    "Hellos admitted by one batch (one upsert, one SUBSCRIBE, one balance read)",
    buckets=(1, 2, 5, 10, 25, 50, 100, 250, 500),
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
OUTBOX_DEPTH = Gauge(
    "tokenchat_ledger_outbox_entries",
    "Entries in the Redis outbox not yet written to Postgres, as the ledger writer last"
    " read it (after each batch, and at least every blocking read)",
    multiprocess_mode="livemax",
)
RECONCILE_MISMATCHES = Gauge(
    "tokenchat_reconcile_mismatches",
    "Mismatches the last reconcile found (Redis against Postgres, postings against"
    " balances, the books' sum); -1 before any reconcile ran in this process",
    multiprocess_mode="livemax",
)
RECONCILE_MISMATCHES.set(-1)
LEDGER_LAG = Histogram(
    "tokenchat_ledger_lag_seconds",
    "From a transaction's commit in Redis to its commit in Postgres",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)

# The delivery relay (server/economy/relay.py), on every gateway node in
# delivery mode `relay`.
RELAYED = Counter(
    "tokenchat_relay_deliveries_total",
    "Delivery entries the relay moved into their room (duplicates included)",
)
RELAY_DUPLICATES = Counter(
    "tokenchat_relay_duplicates_total",
    "Delivery entries found delivered already (a dead relay's claimed entry)",
)
RELAY_PARKED = Counter(
    "tokenchat_relay_parked_total",
    "Delivery entries parked after their room refused them RELAY_ATTEMPTS_MAX times"
    " in a row (retried apart; reconcile is not ok while any is parked)",
)
RELAY_LAG = Histogram(
    "tokenchat_relay_lag_seconds",
    "From a relayed spend's commit in Redis to its events' delivery into the room",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0, 30.0),
)
RELAY_OLDEST = Gauge(
    "tokenchat_relay_oldest_pending_seconds",
    "Age of the oldest delivery entry not yet delivered, as the relay last read it"
    " (0: none); reconcile and /readyz report it past TOKENCHAT_RELAY_LAG_MAX_S",
    multiprocess_mode="livemax",
)

# The DM archive (server/catalog/dms.py), exposed where the archiver runs:
# `tokenchat ledger`, or `serve` with TOKENCHAT_LEDGER_ENABLED=1.
DM_ARCHIVED = Counter(
    "tokenchat_dm_archived_total",
    "DM archive entries copied into Postgres (dms) and acknowledged",
)
DM_ARCHIVE_DEPTH = Gauge(
    "tokenchat_dm_archive_entries",
    "DMs in the Redis archive stream not yet in Postgres, as the DM archiver last"
    " read it (after each batch, and at least every blocking read)",
    multiprocess_mode="livemax",
)

# The standing projector (server/standing.py): how far its watermark is
# behind the ledger, set after each pass on every node that runs it. A
# transaction holding an xid anywhere on the Postgres server holds the
# projector's horizon back (kings, tiers and trending wait; leaderboards do
# not), and this is the age of the oldest ledger row it is waiting on.
STANDING_BEHIND = Gauge(
    "tokenchat_standing_behind_seconds",
    "Age of the oldest committed ledger row the standing projector has not folded"
    " (its recorded_at to now, Postgres clock), as of the last pass; 0 when caught up",
    multiprocess_mode="livemax",
)

WORKER_REPLACEMENTS = Counter(
    "tokenchat_worker_replacements_total",
    "Gateway workers started by `serve --workers N` to replace one that died",
)


# Label children by label values: ``labels()`` takes a lock and builds a key
# on every call (about half of a counted command's metrics cost). Bounded:
# command types and results are the protocol's, a few dozen each.
_command_counts: dict[tuple[str, str], Counter] = {}
_command_timers: dict[str, Histogram] = {}


def count_command(kind: str, result: str) -> None:
    """One command of type ``kind`` answered with ``result`` (ok or a code)."""
    child = _command_counts.get((kind, result))
    if child is None:
        child = _command_counts[(kind, result)] = COMMANDS.labels(kind, result)
    child.inc()


def time_command(kind: str, seconds: float) -> None:
    child = _command_timers.get(kind)
    if child is None:
        child = _command_timers[kind] = COMMAND_SECONDS.labels(kind)
    child.observe(seconds)


def _version() -> str:
    try:
        return version("tokenchat")
    except PackageNotFoundError:  # run from a checkout that is not installed
        return "unknown"


BUILD_INFO = Gauge(
    "tokenchat_build_info",
    "Always 1; its labels name the running tokenchat and Python",
    ["version", "python"],
    multiprocess_mode="livemax",
)
BUILD_INFO.labels(_version(), platform.python_version()).set(1)


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


# --- read back by the admin page (GET /v1/admin/stats) ----------------------------------
def sample(name: str, labels: dict[str, str] | None = None) -> float:
    """One sample of this process's metrics (every worker's when they share a
    folder), as a scrape would read it; 0 when it has not been observed yet."""
    value = _registry().get_sample_value(name, labels or {})
    return 0.0 if value is None else float(value)
