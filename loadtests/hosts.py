"""Gateway nodes on separate (simulated) hosts, one of them killed: every
member of a room sees one order, tips are charged once, and the clients of
the lost node come back on the others (issue #16, part 1).

    python -m loadtests.hosts --nodes 3 --clients 300 --runs 3

Each run starts ``--nodes`` ``tokenchat serve`` processes, each in a network
namespace of its own with its own address, sharing one Redis and one
Postgres started for the run (``loadtests/harness/hosts.py``; needs root).
Then:

1. ``--clients`` members per node (the project's ``Session``, with
   ``failover_urls``: the other nodes, in an order rotated per client so a
   lost node's clients spread over the rest) join one room; the room's model
   is on the last node. The first ``--tippers`` members of each node hold
   tokens.
2. ``--events-before`` room events (the model's messages, alternating with
   tips from the tippers of every node, at ``--rate`` events/s); every member
   sees them all.
3. ``--events-after`` more at the same rate; two events in, node 0's whole
   process group gets SIGKILL. Its clients reconnect to the other nodes with
   the jittered backoff, re-join with ``since``, and their spends in flight
   are sent again with the same key.
4. Checks: every member's sequence of room events (offsets, in the order its
   ``Session`` delivered them) is the room's history exactly: one order,
   nothing missed, nothing twice, no ``gap``; every acknowledged event is in
   the history; ledger rows of kind ``tip`` = distinct tips acknowledged;
   every tipper's balance = credit - her tips; ``GET /v1/admin/reconcile`` ok.

The figure: ``recovery`` = from the kill to the last of node 0's clients
connected again with its room re-joined (``Session.connected`` after at
least one reconnect), polled every ``RECOVERY_POLL_S``. The runs' median is
what docs/benchmarks.md records.

The events of a run stay within the room history ``join ... since`` recovers
from today (``HISTORY_EVENTS_MAX``), so a member away through the outage can
recover every event it missed.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from loadtests.harness.hosts import Hosts, Node, unavailable_reason
from tokenchat.client_demo.client import Client, Session, SessionClosed, offset_order

ROOM = "model"
# The room history `join` with `since` recovers from (TOKENCHAT_HISTORY_LEN's
# default, the contract's 50): a run posts at most this many events, so a
# member away for the whole outage can still get every one back.
HISTORY_EVENTS_MAX = 50
# Messages and tips a run posts at most: the history's 50 less room for the
# `king` events the tips cause (one per change of the top tipper: a few per
# run, 3 with the defaults).
POSTED_EVENTS_MAX = 40
TIP_AMOUNT = 3  # tokens per tip
CREDIT = 1000  # tokens each tipper gets: far more than a run's tips
# Events sent before the kill in the after-phase, so the kill lands mid-traffic.
EVENTS_BEFORE_KILL = 2
# Sessions connecting (hello + join) at once: a burst like a page of clients
# coming online, without queueing thousands of handshakes on one event loop.
CONNECT_CONCURRENCY = 50
# --- bounds (seconds) --------------------------------------------------------------
# Every member sees every acknowledged event within this; on a loaded 2-core
# machine fan-out to hundreds of local sessions takes well under a second.
SEEN_TIMEOUT_S = 30.0
# Node 0's clients all back; the backoff's ceiling is 10 s (BACKOFF_MAX_S).
RECOVERY_TIMEOUT_S = 30.0
RECOVERY_POLL_S = 0.01  # the figure's resolution
CLIENT_CLOSE_TIMEOUT_S = 10.0

NODES_DEFAULT = 3
CLIENTS_DEFAULT = 300
TIPPERS_DEFAULT = 2
RUNS_DEFAULT = 3
EVENTS_BEFORE_DEFAULT = 10
EVENTS_AFTER_DEFAULT = 30
RATE_DEFAULT = 10.0  # events per second: the model's messages alone stay under 20/s


@dataclass
class Member:
    node: int
    user: str
    session: Session
    offsets: list[str] = field(default_factory=list)  # room events, as delivered
    problems: list[str] = field(default_factory=list)
    back_s: float | None = None  # kill -> connected again, for node 0's clients


@dataclass
class Ack:
    kind: str  # "say" or "tip"
    user: str
    node: int
    offset: str
    tx: str | None = None


@dataclass
class Outcome:
    recovery_s: float
    back_s: list[float]
    events: int
    tips: int
    tip_rows: int
    moved_to: dict[int, int]  # node -> node 0's clients that came back there
    problems: list[str]


async def _record(member: Member) -> None:
    try:
        async for event in member.session:
            kind = event["type"]
            # Every event of the room's stream: messages, tips, and the
            # `king` events the tips cause.
            if event.get("room") == ROOM and event.get("offset") is not None:
                member.offsets.append(str(event["offset"]))
            elif kind in ("gap", "room_lost"):
                member.problems.append(f"{member.user}: {event}")
    except SessionClosed as exc:
        member.problems.append(f"{member.user}: session ended: {exc}")


def _failover(nodes: list[Node], own: int, k: int) -> list[str]:
    """The other nodes' URLs, rotated by ``k``: the clients of a lost node
    spread over the rest rather than all dialling the same next one."""
    others = [n.ws_url for n in nodes if n.index != own]
    shift = k % len(others) if others else 0
    return others[shift:] + others[:shift]


async def run_once(
    hosts: Hosts,
    *,
    clients: int,
    tippers: int,
    events_before: int,
    events_after: int,
    rate: float,
    log: Any = None,
) -> Outcome:
    """One scenario on started ``hosts``; node 0 is killed in it."""
    say = log or (lambda *_: None)
    nodes = hosts.nodes
    if len(nodes) < 2:
        raise ValueError("a failover needs at least 2 nodes")
    if events_before + events_after > POSTED_EVENTS_MAX:
        raise ValueError(f"at most {POSTED_EVENTS_MAX} events per run (the history `since` reads)")
    victim, home = nodes[0], nodes[-1]
    model = await Session.connect(
        home.ws_url, hosts.token(ROOM, "model"), failover_urls=_failover(nodes, home.index, 0)
    )
    members: list[Member] = []
    recorders: list[asyncio.Task[None]] = []
    # The traffic's tasks: each send, and the after-kill phase.
    sends: list[asyncio.Task[None]] = []
    gate = asyncio.Semaphore(CONNECT_CONCURRENCY)

    async def connect(node: Node, k: int) -> Member:
        user = f"n{node.index}-m{k}"
        async with gate:
            session = await Session.connect(
                node.ws_url,
                hosts.token(user),
                failover_urls=_failover(nodes, node.index, k),
            )
            member = Member(node.index, user, session)
            await session.join(ROOM)
        return member

    started = time.monotonic()
    try:
        await model.join(ROOM)
        model_member = Member(home.index, ROOM, model)
        members = [model_member]
        members += await asyncio.gather(*(connect(n, k) for n in nodes for k in range(clients)))
        recorders = [asyncio.create_task(_record(m)) for m in members]
        say(f"{len(members)} members joined in {time.monotonic() - started:.1f} s")
        payers = [m for m in members[1:] if int(m.user.rsplit("m", 1)[1]) < tippers]
        for payer in payers:
            body = {"user": payer.user, "amount": CREDIT, "key": uuid.uuid4().hex}
            await asyncio.to_thread(hosts.admin, home, "/v1/admin/credits", body)

        acks: list[Ack] = []
        turn = 0

        async def send(sender: Member, kind: str) -> None:
            if kind == "say":
                reply = await sender.session.say(ROOM, f"event {len(sends)}")
                acks.append(Ack("say", sender.user, sender.node, reply["offset"]))
            else:
                reply = await sender.session.tip(ROOM, TIP_AMOUNT)
                acks.append(Ack("tip", sender.user, sender.node, reply["offset"], reply["tx"]))

        async def traffic(count: int, kill_after: int | None = None) -> None:
            nonlocal turn
            for j in range(count):
                if kill_after is not None and j == kill_after:
                    kill.set()
                if turn % 2 == 0 or not payers:
                    sender, kind = model_member, "say"
                else:
                    sender, kind = payers[(turn // 2) % len(payers)], "tip"
                turn += 1
                sends.append(asyncio.create_task(send(sender, kind)))
                await asyncio.sleep(1 / rate)

        async def all_seen() -> None:
            await asyncio.gather(*sends)
            want = {a.offset for a in acks}
            await _until_seen(members, want)

        kill = asyncio.Event()
        await traffic(events_before)
        await all_seen()
        say(f"{events_before} events seen by every member")

        after = asyncio.create_task(traffic(events_after, EVENTS_BEFORE_KILL))
        sends.append(after)
        await kill.wait()
        killed_at = time.monotonic()
        victim.kill()
        lost = [m for m in members if m.node == victim.index]
        while waiting := [m for m in lost if m.back_s is None]:
            now = time.monotonic()
            if now - killed_at > RECOVERY_TIMEOUT_S:
                raise TimeoutError(
                    f"{len(waiting)} of node 0's {len(lost)} clients not back "
                    f"{RECOVERY_TIMEOUT_S} s after the kill"
                )
            for m in waiting:
                if m.session.reconnects >= 1 and m.session.connected:
                    m.back_s = now - killed_at
            await asyncio.sleep(RECOVERY_POLL_S)
        back = sorted(m.back_s or 0.0 for m in lost)
        say(f"node 0 killed: its {len(lost)} clients back in {back[-1]:.3f} s")
        await after
        await all_seen()
        return await _check(hosts, members, payers, acks, back)
    finally:
        for task in [*recorders, *sends]:
            task.cancel()
        await asyncio.gather(*recorders, *sends, return_exceptions=True)
        async with asyncio.timeout(CLIENT_CLOSE_TIMEOUT_S):
            await asyncio.gather(*(m.session.close() for m in members), model.close())


async def _check(
    hosts: Hosts, members: list[Member], payers: list[Member], acks: list[Ack], back: list[float]
) -> Outcome:
    problems: list[str] = []
    home = hosts.nodes[-1]
    # The room's stream also holds the `king` events the tips caused, which
    # come (from each node's standing projector) up to ~2 s after their tip:
    # read the history until every member has all of it and it stays so.
    events = await _history(hosts, home)
    async with asyncio.timeout(SEEN_TIMEOUT_S):
        while True:
            await _until_seen(members, {str(e["offset"]) for e in events})
            again = await _history(hosts, home)
            if again == events:
                break
            events = again
    problems += [p for m in members for p in m.problems]
    if len(events) >= HISTORY_EVENTS_MAX:
        # A full history may have dropped the run's first events: the
        # comparison below would not cover them (fewer events or tippers).
        problems.append(f"the room's history is full ({len(events)} events)")
    history = [str(e["offset"]) for e in events]
    acked = {a.offset for a in acks}
    unacked = [e for e in events if e["offset"] not in acked]
    if not acked <= set(history) or any(e["type"] != "king" for e in unacked):
        problems.append(
            f"history {len(history)} events, acknowledged {len(acked)} distinct; "
            f"not acknowledged: {unacked}, acknowledged not in history: {acked - set(history)}"
        )
    if history != sorted(history, key=_order):
        problems.append("history out of offset order")
    for m in members:
        if m.offsets != history:
            twice = len(m.offsets) - len(set(m.offsets))
            missed = len(set(history) - set(m.offsets))
            problems.append(
                f"{m.user} (node {m.node}): {len(m.offsets)} events, {missed} missed, "
                f"{twice} twice, in offset order: {m.offsets == sorted(m.offsets, key=_order)}"
            )
    tips = {a.tx for a in acks if a.kind == "tip"}
    tip_nodes = {a.node for a in acks if a.kind == "tip"}
    if payers and tip_nodes != {n.index for n in hosts.nodes}:
        problems.append(f"tips from nodes {sorted(tip_nodes)} only")
    reconcile = await asyncio.to_thread(hosts.admin, home, "/v1/admin/reconcile")
    assert isinstance(reconcile, dict)
    if not reconcile.get("ok"):
        problems.append(f"reconcile: {reconcile}")
    conn = await asyncpg.connect(hosts.database_url)
    try:
        tip_rows = int(
            await conn.fetchval(
                "SELECT count(*) FROM tokenchat.ledger_transactions WHERE kind = 'tip'"
            )
        )
    finally:
        await conn.close()
    if tip_rows != len(tips):
        problems.append(f"{tip_rows} tip rows in the ledger for {len(tips)} tips")
    for payer in payers:
        mine = {a.tx for a in acks if a.kind == "tip" and a.user == payer.user}
        balance = await payer.session.get_balance()
        if balance != CREDIT - TIP_AMOUNT * len(mine):
            problems.append(f"{payer.user}: balance {balance} after {len(mine)} tips")
    moved: dict[int, int] = {}
    for m in members:
        if m.node == hosts.nodes[0].index:
            where = next(n.index for n in hosts.nodes if n.ws_url == m.session.url)
            moved[where] = moved.get(where, 0) + 1
    return Outcome(
        recovery_s=back[-1] if back else 0.0,
        back_s=back,
        events=len(history),
        tips=len(tips),
        tip_rows=tip_rows,
        moved_to=moved,
        problems=problems,
    )


def _order(offset: str) -> tuple[int, int]:
    return offset_order(offset) or (0, 0)


async def _until_seen(members: list[Member], offsets: set[str]) -> None:
    """Wait until every member has seen every one of ``offsets``."""
    deadline = time.monotonic() + SEEN_TIMEOUT_S
    while behind := [m for m in members if not offsets <= set(m.offsets)]:
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"{len(behind)} members lack some of {len(offsets)} events after "
                f"{SEEN_TIMEOUT_S} s, e.g. {behind[0].user}: {len(behind[0].offsets)} seen"
            )
        await asyncio.sleep(RECOVERY_POLL_S * 10)


async def _history(hosts: Hosts, node: Node) -> list[dict[str, Any]]:
    """The room's stored events, as a new member's ``join`` returns them."""
    reader = await Client.connect(node.ws_url)
    try:
        await reader.hello(hosts.token("auditor"))
        joined = await reader.call("join", room=ROOM)
    finally:
        await reader.close()
    return list(joined["history"])


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m loadtests.hosts", description=__doc__)
    parser.add_argument("--nodes", type=positive_int, default=NODES_DEFAULT)
    parser.add_argument("--clients", type=positive_int, default=CLIENTS_DEFAULT, help="per node")
    parser.add_argument("--tippers", type=int, default=TIPPERS_DEFAULT, help="per node")
    parser.add_argument("--runs", type=positive_int, default=RUNS_DEFAULT)
    parser.add_argument("--events-before", type=positive_int, default=EVENTS_BEFORE_DEFAULT)
    parser.add_argument("--events-after", type=positive_int, default=EVENTS_AFTER_DEFAULT)
    parser.add_argument("--rate", type=float, default=RATE_DEFAULT, help="events per second")
    args = parser.parse_args(argv)
    if args.nodes < 2:
        parser.error("--nodes: a failover needs at least 2")
    if args.events_before + args.events_after > POSTED_EVENTS_MAX:
        parser.error(f"--events-before + --events-after: at most {POSTED_EVENTS_MAX}")
    if args.events_after <= EVENTS_BEFORE_KILL:
        parser.error(f"--events-after: more than {EVENTS_BEFORE_KILL} (the kill comes after those)")
    if not 0 < args.rate <= 100:
        parser.error("--rate: events per second in (0, 100]")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    reason = unavailable_reason()
    if reason is not None:
        print(f"loadtests.hosts: {reason}", file=sys.stderr)
        return 2
    outcomes: list[Outcome] = []
    for run in range(args.runs):
        with Hosts.started(args.nodes) as hosts:
            outcome = asyncio.run(
                run_once(
                    hosts,
                    clients=args.clients,
                    tippers=args.tippers,
                    events_before=args.events_before,
                    events_after=args.events_after,
                    rate=args.rate,
                    log=lambda text, run=run: print(f"run {run}: {text}", flush=True),
                )
            )
        outcomes.append(outcome)
        back = outcome.back_s
        print(
            f"run {run}: recovery {outcome.recovery_s:.3f} s (first client {back[0]:.3f} s, "
            f"median {statistics.median(back):.3f} s), {outcome.events} events, "
            f"{outcome.tips} tips = {outcome.tip_rows} ledger rows, "
            f"node 0's clients moved to {outcome.moved_to}, "
            f"problems: {len(outcome.problems)}",
            flush=True,
        )
        for problem in outcome.problems[:20]:
            print(f"  {problem}")
    recovery = statistics.median(o.recovery_s for o in outcomes)
    print(
        f"{args.nodes} nodes x {args.clients} clients, node 0 killed: last client back "
        f"{recovery:.3f} s after the kill (median of {len(outcomes)} runs: "
        f"{', '.join(f'{o.recovery_s:.3f}' for o in outcomes)})"
    )
    return 1 if any(o.problems for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
