"""Gateway hosts simulated on one machine: each ``tokenchat serve`` in a
network namespace of its own, with its own address, all sharing one Redis and
one Postgres that this module starts on the host's side (issue #16, part 1).

::

    10.77.X.1   bridge tcx<pid>b, on the host: Redis, Postgres, the test's clients
      ├─ veth tcx<pid>h0 ── eth0 10.77.X.10 in netns tchosts-<pid>-0: serve :8000/:8001
      ├─ veth tcx<pid>h1 ── eth0 10.77.X.11 in netns tchosts-<pid>-1: serve, ledger
      └─ ...

Every node listens on the same ports (8000 HTTP, 8001 WebSocket) at its own
address, as separate machines would. 127.0.0.1 inside a namespace is that
namespace's own loopback, so Redis and Postgres listen on the bridge's
address, and Postgres admits the bridge's network (``client_network``).
``X`` is the first third octet no interface of this machine uses, chosen
under a lock, so that several runs (a test and the script) can coexist.

Cleanup: ``close`` stops what it started and removes the namespaces, the
links and the temporary folder, and ``leftovers`` lists whatever of this run
is still there (a test asserts it is empty). Every name carries the pid of
the run that made it: ``remove_stale`` (called by every new run) removes the
namespaces, links, servers and folders of runs whose process is gone, so a
run killed with SIGKILL is cleaned up by the next one.

Needs root and ``ip`` (iproute2): ``unavailable_reason`` says why not.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from loadtests.harness.processes import http_answers, http_json
from tokenchat.server.auth import issue_token
from tokenchat.server.devstack.embedded import EmbeddedPostgres, EmbeddedRedis, pid_running

# --- names ---------------------------------------------------------------------
# Namespaces: tchosts-<pid>-<node>; links: tcx<pid>b (the bridge) and
# tcx<pid>h<node> (a veth's host end). A link name has at most 15 characters
# (IFNAMSIZ - 1): "tcx" + a 7-digit pid (Linux pids stop at 4,194,304) + "h"
# + the node's index leaves 4 characters, so NODES_MAX fits with room.
NETNS_PREFIX = "tchosts-"
LINK_PREFIX = "tcx"
TEMP_PREFIX = "tokenchat-hosts-"
_NETNS_RE = re.compile(rf"^{NETNS_PREFIX}(\d+)-(\d+)$")
_LINK_RE = re.compile(rf"^{LINK_PREFIX}(\d+)[bh]\d*$")
_TEMP_RE = re.compile(rf"^{TEMP_PREFIX}(\d+)-")
# The network: 10.77.X.0/24, X free on this machine; the host (bridge) is .1,
# node i is .(NODE_HOST_BASE + i).
NETWORK_PREFIX = "10.77"
NODE_HOST_BASE = 10
# Nodes per run at most: each is a Python server (a few dozen MB and its share
# of the CPUs); 32 is far past what a 2-core machine runs usefully, and far
# inside the /24's addresses and the link names' digits.
NODES_MAX = 32
# Held while a run picks its network and creates its bridge.
LOCK_PATH = Path("/run/tokenchat-hosts.lock")

# Ports inside each namespace: every node has the same, as separate hosts would.
HTTP_PORT = 8000
WS_PORT = 8001

# --- bounds (seconds) -------------------------------------------------------------
IP_TIMEOUT_S = 10.0  # one `ip` call: milliseconds unless the kernel is stuck
MIGRATE_TIMEOUT_S = 60.0  # `tokenchat migrate` on a fresh database
NODE_START_TIMEOUT_S = 60.0  # imports, pools and listeners of a loaded 2-core box
NODE_STOP_TIMEOUT_S = 10.0  # SIGTERM drains sessions for SERVER_SHUTDOWN_GRACE_S
KILL_WAIT_S = 5.0  # after SIGKILL, the kernel reaps at once
POLL_INTERVAL_S = 0.05  # readiness polls
# A node drains its sessions this long on SIGTERM; the test's clients are gone
# by then, so a short grace only bounds a stuck shutdown.
SERVER_SHUTDOWN_GRACE_S = 2.0


def unavailable_reason() -> str | None:
    """Why namespaces cannot be made here (None: they can)."""
    if os.geteuid() != 0:
        return "network namespaces and veth pairs need root (CAP_NET_ADMIN, CAP_SYS_ADMIN)"
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2) to make network namespaces"
    try:
        _ip("netns", "list")
    except (OSError, subprocess.CalledProcessError) as exc:
        return f"`ip netns` does not work here: {exc}"
    return None


def _ip(*args: str) -> str:
    done = subprocess.run(
        ["ip", *args], capture_output=True, text=True, timeout=IP_TIMEOUT_S, check=False
    )
    if done.returncode != 0:
        raise subprocess.CalledProcessError(
            done.returncode, ["ip", *args], done.stdout, done.stderr
        )
    return done.stdout


def _namespaces() -> list[str]:
    return [line.split()[0] for line in _ip("netns", "list").splitlines() if line.strip()]


def _links() -> list[str]:
    names = []
    for line in _ip("-o", "link", "show").splitlines():
        # "7: tcx123h0@if6: <BROADCAST,...": the name ends at "@" or ":".
        names.append(line.split(":", 2)[1].strip().split("@")[0])
    return names


def _namespace_pids(netns: str) -> list[int]:
    with contextlib.suppress(subprocess.CalledProcessError):
        return [int(p) for p in _ip("netns", "pids", netns).split()]
    return []


def _kill_namespace(netns: str) -> None:
    """SIGKILL every process in ``netns``, then delete it (its veth ends go with it)."""
    for pid in _namespace_pids(netns):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + KILL_WAIT_S
    while _namespace_pids(netns) and time.monotonic() < deadline:
        time.sleep(POLL_INTERVAL_S)
    with contextlib.suppress(subprocess.CalledProcessError):
        _ip("netns", "delete", netns)


def _processes_under(folder: Path) -> list[int]:
    """Processes whose command line names ``folder`` (Redis's --dir, Postgres's -D)."""
    found = []
    needle = str(folder).encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if needle in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
    return found


def _kill_all(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + KILL_WAIT_S
    while any(pid_running(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(POLL_INTERVAL_S)


def remove_stale() -> list[str]:
    """Remove what runs whose process is gone left behind: namespaces (and the
    processes in them), links, Redis and Postgres, temporary folders. Returns
    what it removed."""
    removed: list[str] = []
    for netns in _namespaces():
        match = _NETNS_RE.match(netns)
        if match and not pid_running(int(match[1])):
            _kill_namespace(netns)
            removed.append(f"netns {netns}")
    for link in _links():
        match = _LINK_RE.match(link)
        if match and not pid_running(int(match[1])):
            with contextlib.suppress(subprocess.CalledProcessError):
                _ip("link", "delete", link)
            removed.append(f"link {link}")
    for folder in Path(tempfile.gettempdir()).glob(f"{TEMP_PREFIX}*"):
        match = _TEMP_RE.match(folder.name)
        if match and not pid_running(int(match[1])):
            _kill_all(_processes_under(folder))
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(f"folder {folder}")
    return removed


@dataclass
class Node:
    """One gateway host: a namespace, its address, its `serve` process."""

    index: int
    netns: str
    veth: str  # the host's end
    address: str
    log_path: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def ws_url(self) -> str:
        return f"ws://{self.address}:{WS_PORT}/ws"

    @property
    def http_url(self) -> str:
        return f"http://{self.address}:{HTTP_PORT}"

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def kill(self) -> None:
        """SIGKILL the whole process group of this node's `serve`: a host lost."""
        assert self.process is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(KILL_WAIT_S)

    def stop(self) -> None:
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(NODE_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.kill()


class Hosts:
    """N gateway nodes in namespaces, their Redis and Postgres, a ledger
    process; ``close`` (or the ``started`` context manager) removes it all."""

    def __init__(self, nodes: int) -> None:
        if not 1 <= nodes <= NODES_MAX:
            raise ValueError(f"nodes must be 1..{NODES_MAX}, not {nodes}")
        self.count = nodes
        self.pid = os.getpid()
        self.removed_stale = remove_stale()
        self.temp_dir = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{self.pid}-"))
        # PostgreSQL runs as an unprivileged user when we are root.
        self.temp_dir.chmod(0o755)
        self.bridge = f"{LINK_PREFIX}{self.pid}b"
        self.subnet = ""
        self.host_address = ""
        self.nodes: list[Node] = []
        self.jwt_secret = secrets.token_urlsafe(32)
        self.redis_url = ""
        self.database_url = ""
        self.ledger: subprocess.Popen[bytes] | None = None
        self._redis: EmbeddedRedis | None = None
        self._postgres: EmbeddedPostgres | None = None
        self._pids: list[int] = []  # every process started, for ``leftovers``

    # --- network ----------------------------------------------------------------------
    def _make_network(self) -> None:
        LOCK_PATH.parent.mkdir(parents=True, exist_ok=True)
        with open(LOCK_PATH, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            used = _ip("-o", "-4", "addr", "show")
            third = next((x for x in range(256) if f" {NETWORK_PREFIX}.{x}." not in used), None)
            if third is None:
                raise RuntimeError(f"no free {NETWORK_PREFIX}.X.0/24 network on this machine")
            self.subnet = f"{NETWORK_PREFIX}.{third}.0/24"
            self.host_address = f"{NETWORK_PREFIX}.{third}.1"
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("addr", "add", f"{self.host_address}/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
        for index in range(self.count):
            netns = f"{NETNS_PREFIX}{self.pid}-{index}"
            veth = f"{LINK_PREFIX}{self.pid}h{index}"
            address = f"{NETWORK_PREFIX}.{third}.{NODE_HOST_BASE + index}"
            _ip("netns", "add", netns)
            node = Node(index, netns, veth, address, self.temp_dir / f"node-{index}.log")
            self.nodes.append(node)
            _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", netns)
            _ip("link", "set", veth, "master", self.bridge)
            _ip("link", "set", veth, "up")
            _ip("-n", netns, "addr", "add", f"{address}/24", "dev", "eth0")
            _ip("-n", netns, "link", "set", "eth0", "up")
            _ip("-n", netns, "link", "set", "lo", "up")

    # --- backends ---------------------------------------------------------------------
    def _start_backends(self) -> None:
        redis = EmbeddedRedis(self.temp_dir / "backends", host=self.host_address)
        self._redis = redis
        self.redis_url = redis.start()
        postgres = EmbeddedPostgres(
            self.temp_dir / "backends", host=self.host_address, client_network=self.subnet
        )
        self._postgres = postgres
        self.database_url = postgres.start()

    def env(self, **extra: str) -> dict[str, str]:
        """The settings every process of this run reads."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENCHAT_")}
        env.update(
            TOKENCHAT_REDIS_URL=self.redis_url,
            TOKENCHAT_DATABASE_URL=self.database_url,
            TOKENCHAT_JWT_SECRET=self.jwt_secret,
            TOKENCHAT_LOG_LEVEL="WARNING",
            TOKENCHAT_SHUTDOWN_GRACE_S=str(SERVER_SHUTDOWN_GRACE_S),
            # As the tests run servers: dev settings allowed, no real money.
            TOKENCHAT_INSECURE="1",
            **extra,
        )
        return env

    def _in_netns(
        self, node: Node, argv: list[str], env: dict[str, str], log: Path
    ) -> subprocess.Popen[bytes]:
        with open(log, "ab") as out:
            process = subprocess.Popen(
                ["ip", "netns", "exec", node.netns, sys.executable, *argv],
                cwd=self.temp_dir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                # Its own process group: kill -9 of the group is the host lost.
                start_new_session=True,
            )
        self._pids.append(process.pid)
        return process

    # --- nodes ------------------------------------------------------------------------
    def _node_env(self, node: Node) -> dict[str, str]:
        return self.env(
            TOKENCHAT_HOST=node.address,
            TOKENCHAT_HTTP_PORT=str(HTTP_PORT),
            TOKENCHAT_WS_PORT=str(WS_PORT),
            TOKENCHAT_MEDIA_DIR=str(self.temp_dir / f"media-{node.index}"),
            # The ledger writer runs once, as its own process (start_ledger).
            TOKENCHAT_LEDGER_ENABLED="0",
        )

    def migrate(self) -> None:
        """`tokenchat migrate` from the first namespace, across the bridge."""
        node = self.nodes[0]
        process = self._in_netns(
            node, ["-m", "tokenchat.server.cli", "migrate"], self._node_env(node), node.log_path
        )
        try:
            code = process.wait(MIGRATE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(KILL_WAIT_S)
            raise RuntimeError(
                f"migrate took over {MIGRATE_TIMEOUT_S} s:\n{node.log_tail()}"
            ) from None
        if code != 0:
            raise RuntimeError(f"migrate failed ({code}):\n{node.log_tail()}")

    def start_node(self, node: Node) -> None:
        node.process = self._in_netns(
            node, ["-m", "tokenchat.server.cli", "serve"], self._node_env(node), node.log_path
        )

    def wait_ready(self, node: Node) -> None:
        deadline = time.monotonic() + NODE_START_TIMEOUT_S
        while not http_answers(f"{node.http_url}/healthz"):
            if not node.alive:
                raise RuntimeError(f"node {node.index} exited:\n{node.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"node {node.index} not ready:\n{node.log_tail()}")
            time.sleep(POLL_INTERVAL_S)

    def start_ledger(self) -> None:
        """`tokenchat ledger` in the last namespace: the writer lives on a
        host that the scenario does not kill (node 0 is the one killed)."""
        node = self.nodes[-1]
        self.ledger = self._in_netns(
            node,
            ["-m", "tokenchat.server.cli", "ledger", "--metrics-port", "0"],
            self.env(),
            self.temp_dir / "ledger.log",
        )

    def start(self) -> None:
        """Network, Redis and Postgres, migrations, the ledger and every node."""
        self._make_network()
        self._start_backends()
        self.migrate()
        self.start_ledger()
        for node in self.nodes:
            self.start_node(node)
        for node in self.nodes:
            self.wait_ready(node)

    # --- admin ------------------------------------------------------------------------
    def token(self, sub: str, role: str = "fan") -> str:
        return issue_token(self.jwt_secret, sub, role, 3600)

    def admin(self, node: Node, path: str, body: object = None) -> object:
        status, reply = http_json(f"{node.http_url}{path}", self.token("ops", "admin"), body)
        if status != 200:
            raise RuntimeError(f"{path}: {status} {reply}")
        return reply

    # --- the end ----------------------------------------------------------------------
    def close(self) -> None:
        """Stop every process, remove namespaces, links and the folder."""
        for node in self.nodes:
            node.stop()
        if self.ledger is not None and self.ledger.poll() is None:
            self.ledger.terminate()
            try:
                self.ledger.wait(NODE_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.ledger.kill()
                self.ledger.wait(KILL_WAIT_S)
        for server in (self._postgres, self._redis):
            if server is not None:
                server.stop()
        for node in self.nodes:
            _kill_namespace(node.netns)
        with contextlib.suppress(subprocess.CalledProcessError):
            if self.bridge in _links():
                _ip("link", "delete", self.bridge)
        _kill_all(_processes_under(self.temp_dir))
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def leftovers(self) -> list[str]:
        """What of this run still exists after ``close`` (should be nothing)."""
        left = [f"netns {n}" for n in _namespaces() if n.startswith(f"{NETNS_PREFIX}{self.pid}-")]
        left += [f"link {k}" for k in _links() if k.startswith(f"{LINK_PREFIX}{self.pid}")]
        left += [f"process {p}" for p in self._pids if pid_running(p)]
        left += [f"process {p}" for p in _processes_under(self.temp_dir)]
        if self.temp_dir.exists():
            left.append(f"folder {self.temp_dir}")
        return left

    @classmethod
    @contextlib.contextmanager
    def started(cls, nodes: int) -> Iterator[Hosts]:
        """Started hosts, closed after the block whatever happens in it."""
        hosts = cls(nodes)
        try:
            hosts.start()
            yield hosts
        finally:
            hosts.close()
