"""Gateway nodes on separate simulated hosts (network namespaces), one killed
with SIGKILL: one order for every member, tips charged once, its clients back
on the other nodes with nothing missed or twice (loadtests/hosts.py), and
nothing of a run left behind, a crashed run's included
(loadtests/harness/hosts.py)."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from loadtests import hosts as scenario
from loadtests.harness.hosts import (
    LINK_PREFIX,
    NETNS_PREFIX,
    TEMP_PREFIX,
    Hosts,
    remove_stale,
    unavailable_reason,
)
from loadtests.harness.processes import REPO_ROOT

UNAVAILABLE = unavailable_reason()
pytestmark = pytest.mark.skipif(
    UNAVAILABLE is not None,
    reason=f"needs root and `ip netns` to make namespaces and veth pairs: {UNAVAILABLE}",
)

# A small room: 3 nodes x 8 members, 30 events at 20/s; the bound is the
# whole test on a loaded 2-core machine (about 20 s measured here).
NODES = 3
CLIENTS = 8
STALE_START_TIMEOUT_S = 30.0


@pytest.fixture
def hosts() -> Iterator[Hosts]:
    """Started nodes; removed after the test, and checked gone, pass or fail."""
    started = Hosts(NODES)
    try:
        started.start()
        yield started
    finally:
        started.close()
    assert started.leftovers() == []


@pytest.mark.timeout(60)
async def test_a_node_killed_its_clients_recover_on_the_others(hosts: Hosts) -> None:
    assert len({n.address for n in hosts.nodes}) == NODES
    assert all(n.address.startswith(hosts.host_address.rsplit(".", 1)[0]) for n in hosts.nodes)
    assert hosts.redis_url.startswith(f"redis://{hosts.host_address}:")
    outcome = await scenario.run_once(
        hosts, clients=CLIENTS, tippers=1, events_before=10, events_after=20, rate=20.0
    )
    assert not hosts.nodes[0].alive
    assert all(n.alive for n in hosts.nodes[1:])
    assert outcome.problems == []
    # Node 0's clients (and only they) came back, on the other nodes: spread.
    assert len(outcome.back_s) == CLIENTS
    assert 0 < outcome.recovery_s < scenario.RECOVERY_TIMEOUT_S
    assert set(outcome.moved_to) == {1, 2} and sum(outcome.moved_to.values()) == CLIENTS
    # Tips came from every node (node 0's sent again after the kill) and hit
    # the ledger once each.
    assert outcome.tips == outcome.tip_rows >= NODES
    assert outcome.events >= 30


def test_a_crashed_run_is_removed_by_the_next() -> None:
    """A run killed with SIGKILL leaves its namespace (and a process in it),
    its links and its folder; the next run's ``remove_stale`` removes them."""
    crash = textwrap.dedent(
        """
        import os, sys, time
        from loadtests.harness.hosts import Hosts
        hosts = Hosts(1)
        hosts._make_network()
        node = hosts.nodes[0]
        sleeper = hosts._in_netns(
            node, ["-c", "import time; time.sleep(600)"], dict(os.environ), node.log_path
        )
        print(hosts.pid, hosts.temp_dir, sleeper.pid, flush=True)
        time.sleep(600)
        """
    )
    run = subprocess.Popen(
        [sys.executable, "-c", crash], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert run.stdout is not None
        pid_text, folder_text, sleeper_text = run.stdout.readline().split()
    finally:
        run.send_signal(signal.SIGKILL)
        run.wait(STALE_START_TIMEOUT_S)
    pid, folder, sleeper = int(pid_text), Path(folder_text), int(sleeper_text)
    netns = f"{NETNS_PREFIX}{pid}-0"
    assert netns in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert folder.name.startswith(f"{TEMP_PREFIX}{pid}-") and folder.exists()
    assert _running(sleeper)  # the crash left it running, in the namespace

    removed = remove_stale()

    assert f"netns {netns}" in removed
    assert f"link {LINK_PREFIX}{pid}b" in removed
    assert f"folder {folder}" in removed
    assert not folder.exists()
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert f"{LINK_PREFIX}{pid}" not in links
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert netns not in namespaces
    # Killed: gone, or a zombie until whoever inherited it reaps it.
    assert not _running(sleeper)


def _running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"
