"""What operators run against: the alert rules and the dashboard in docs/ops
name metrics a live server exposes, promtool accepts the rules, the new
metrics move, and logs can be JSON lines."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import asyncpg
import httpx
import orjson
import pytest

from tests.conftest import token
from tests.server.proc import cli_env, close_all, connect, run_cli, serve, wait_for
from tokenchat.client_demo.client import Client
from tokenchat.server.config import Settings

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "docs" / "ops" / "alerts.yml"
ALERT_TESTS = ROOT / "docs" / "ops" / "alerts.test.yml"
DASHBOARD = ROOT / "docs" / "ops" / "grafana-dashboard.json"
# The series a metric family exposes besides its own name.
SERIES_SUFFIXES = ("_bucket", "_sum", "_count")
METRIC_NAME = re.compile(r"\btokenchat_[a-z_]+\b")


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail(
            "promtool is missing: it comes with Debian's prometheus package "
            "(apt-get install -y --no-install-recommends prometheus; .ci/run installs it)"
        )
    return path


def test_the_alert_rules_pass_promtool() -> None:
    result = subprocess.run(
        [promtool(), "check", "rules", str(ALERTS)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_the_alert_rules_pass_their_unit_tests() -> None:
    result = subprocess.run(
        [promtool(), "test", "rules", str(ALERT_TESTS)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def dashboard_expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    assert exprs, "the dashboard has no queries"
    return exprs


def named_metrics(text: str) -> set[str]:
    names = set(METRIC_NAME.findall(text))
    return {
        next((name[: -len(s)] for s in SERIES_SUFFIXES if name.endswith(s)), name) for name in names
    }


def exposed_families(metrics_text: str) -> set[str]:
    return {
        line.split()[2]
        for line in metrics_text.splitlines()
        if line.startswith("# TYPE tokenchat_")
    }


async def test_every_metric_the_rules_and_dashboard_name_is_exposed_and_moves(
    settings: Settings, tmp_path: Path
) -> None:
    wanted = named_metrics(ALERTS.read_text()) | named_metrics("\n".join(dashboard_expressions()))
    assert {"tokenchat_ledger_outbox_entries", "tokenchat_command_duration_seconds"} <= wanted
    clients: list[Client] = []
    async with serve(settings, tmp_path) as server:
        model = await connect(server, "ops_model", "model")
        clients.append(model)
        await model.call("join", room="ops_model")
        await model.call("say", room="ops_model", text="hello")
        async with httpx.AsyncClient(base_url=server.http_url, timeout=30) as http:
            admin = {"Authorization": f"Bearer {token('ops', 'admin')}"}
            credit = await http.post(
                "/v1/admin/credits",
                json={"user": "ops_fan", "amount": 5, "key": "k"},
                headers=admin,
            )
            assert credit.status_code == 200, credit.text
            reconcile = await http.get("/v1/admin/reconcile", headers=admin)
            assert reconcile.json()["ok"] is True, reconcile.text
        await close_all(clients)

        text = await server.metrics()
        missing = wanted - exposed_families(text)
        assert not missing, f"named in docs/ops but not in /metrics: {sorted(missing)}"

        def sample(name: str) -> float:
            for line in text.splitlines():
                if line.startswith(name + " ") or line.startswith(name + "{"):
                    return float(line.rsplit(" ", 1)[1])
            raise AssertionError(f"no {name} sample in /metrics")

        assert sample('tokenchat_command_duration_seconds_count{type="say"}') == 1
        assert sample('tokenchat_command_duration_seconds_count{type="join"}') == 1
        assert sample("tokenchat_reconcile_mismatches") == 0  # -1 before the reconcile
        build = [line for line in text.splitlines() if line.startswith("tokenchat_build_info{")]
        assert len(build) == 1 and 'version="' in build[0] and build[0].endswith(" 1.0")

        async def outbox_drained() -> bool:
            # Reconcile drained the outbox; the writer's next read reports it.
            current = await server.metrics()
            return any(
                line == "tokenchat_ledger_outbox_entries 0.0" for line in current.splitlines()
            )

        await wait_for("an empty outbox in /metrics", outbox_drained)


async def test_logs_are_json_lines_when_asked(settings: Settings) -> None:
    # A schema of its own, so that migrate has migrations to apply and log.
    schema = f"{settings.database_schema}_logs"
    env = cli_env(settings, TOKENCHAT_DATABASE_SCHEMA=schema)
    try:
        result = await run_cli("--log-format", "json", "migrate", env=env)
    finally:
        conn = await asyncpg.connect(settings.database_url)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert any("applied migration" in orjson.loads(line)["msg"] for line in lines), lines
    for line in lines:
        record = orjson.loads(line)
        assert set(record) >= {"ts", "level", "logger", "pid", "msg"}, record
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", record["ts"])

    refused = await run_cli("migrate", env=cli_env(settings, TOKENCHAT_LOG_FORMAT="xml"))
    assert refused.returncode == 2 and "TOKENCHAT_LOG_FORMAT" in refused.stderr
