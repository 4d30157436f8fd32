"""The load processes' pipe to their parent (loadtests/harness/processes.py)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import os
import struct
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection
from multiprocessing.reduction import ForkingPickler
from pathlib import Path
from typing import Any

import pytest

from loadtests import evening, tips, tips_peer
from loadtests.harness.processes import REPO_ROOT, recv_from_parent, run_on_uvloop
from loadtests.tips import TipsBench
from tests.conftest import DATABASE_URL, REDIS_URL

# Far over a pipe's buffer (64 KiB on Linux): a phase of the tips benchmark
# with thousands of frame heads (--action unlock or buy_ticket) is this big.
MESSAGE_BYTES = 1024 * 1024
RECV_TIMEOUT_S = 30.0
# Between the two halves of the message: the child has read the first half
# and finds the pipe empty meanwhile, as on a busy machine.
HALVES_GAP_S = 0.3


def send_in_two_halves(conn: Connection, message: object) -> None:
    """``conn.send(message)``, written as Connection frames it (a 4-byte
    length, then the pickle) in two writes with a pause between."""
    data = bytes(ForkingPickler.dumps(message))
    frame = struct.pack("!i", len(data)) + data
    half = len(frame) // 2
    for chunk in (frame[:half], frame[half:]):
        view = memoryview(chunk)
        while view:
            view = view[os.write(conn.fileno(), view) :]
        time.sleep(HALVES_GAP_S)


def test_recv_from_parent_reads_a_message_larger_than_the_pipe() -> None:
    """The event loop makes the pipe non-blocking; a message that arrives in
    several writes must still be read whole, not fail half read (EAGAIN)."""
    parent_end, child_end = multiprocessing.Pipe()
    message = ("phase", b"x" * MESSAGE_BYTES)
    received: list[object] = []

    async def child() -> None:
        received.append(await recv_from_parent(child_end, RECV_TIMEOUT_S))
        received.append(await recv_from_parent(child_end, RECV_TIMEOUT_S))

    # The parent's send blocks until the child has read most of it: a thread.
    sender = threading.Thread(
        target=lambda: [send_in_two_halves(parent_end, message), parent_end.send(("stop", None))]
    )
    sender.start()
    try:
        run_on_uvloop(child)
    finally:
        sender.join(RECV_TIMEOUT_S)
        parent_end.close()
        child_end.close()
    assert received == [message, ("stop", None)]


# ============================================================================
# The socketio + asyncpg tips baseline (loadtests/tips_peer.py)
# ============================================================================

# One Engine.IO/Socket.IO exchange of the tests below: a reply or event.
SIO_REPLY_TIMEOUT_S = 10.0
# Tips sent at once by a fan whose balance covers half of them.
CONCURRENT_TIPS = 20
PEER_FUND_TOKENS = 10  # the concurrent fan's balance: half the tips


@pytest.fixture
def backends(monkeypatch: pytest.MonkeyPatch) -> None:
    """The harness reads its servers from the environment: the tests' own."""
    monkeypatch.setenv("TOKENCHAT_REDIS_URL", REDIS_URL)
    monkeypatch.setenv("TOKENCHAT_DATABASE_URL", DATABASE_URL)


def tips_bench(*extra: str) -> TipsBench:
    """A tips benchmark of 4 fans in 2 rooms, one short run."""
    argv = [
        "--fans",
        "4",
        "--rooms",
        "2",
        "--load-procs",
        "1",
        "--duration",
        "1",
        "--warmup",
        "0.5",
        "--runs",
        "1",
    ]
    return TipsBench(tips.parse_args([*argv, *extra]))


class SioClient:
    """Socket.IO v5 over a plain websocket: connect with ``auth``, emit with
    an ack id, collect the events that arrive meanwhile."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.next_id = 0
        self.acks: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.events: list[list[Any]] = []
        self.reader: asyncio.Task[None] | None = None

    @classmethod
    async def connect(cls, port: int, auth: dict[str, Any]) -> SioClient | str:
        """The client, in its room; or the server's refusal (``44...``)."""
        from websockets.asyncio.client import connect

        ws = await connect(f"ws://127.0.0.1:{port}{tips_peer.SIO_PATH}")
        opening = await asyncio.wait_for(ws.recv(), SIO_REPLY_TIMEOUT_S)
        assert str(opening).startswith("0{")
        await ws.send("40" + json.dumps(auth))
        answer = str(await asyncio.wait_for(ws.recv(), SIO_REPLY_TIMEOUT_S))
        if not answer.startswith("40"):
            await ws.close()
            return answer
        client = cls(ws)
        client.reader = asyncio.create_task(client.read())
        return client

    async def read(self) -> None:
        async for frame in self.ws:
            text = str(frame)
            if text == "2":
                await self.ws.send("3")
            elif text.startswith("43"):
                bracket = text.index("[")
                self.acks.pop(int(text[2:bracket])).set_result(json.loads(text[bracket:])[0])
            elif text.startswith("42"):
                self.events.append(json.loads(text[2:]))

    async def tip(self, data: Any) -> dict[str, Any]:
        self.next_id += 1
        ack: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.acks[self.next_id] = ack
        await self.ws.send(f"42{self.next_id}" + json.dumps(["tip", data]))
        return await asyncio.wait_for(ack, SIO_REPLY_TIMEOUT_S)

    async def close(self) -> None:
        await self.ws.close()
        if self.reader is not None:
            with contextlib.suppress(Exception):
                await self.reader


async def peer_exchanges(port: int, secret: str) -> dict[str, Any]:
    """Concurrent tips past the balance, retries, conflicts, hostile
    payloads and a stranger's token against the baseline; what came back."""
    from tokenchat.server.auth import issue_token

    room, other_room = tips.model_id(0), tips.model_id(1)
    poor_token = issue_token(secret, tips.fan_id(0), "fan")
    rich_token = issue_token(secret, tips.fan_id(1), "fan")
    poor = await SioClient.connect(port, {"token": poor_token, "room": room})
    rich = await SioClient.connect(port, {"token": rich_token, "room": room})
    assert isinstance(poor, SioClient) and isinstance(rich, SioClient)
    out: dict[str, Any] = {}
    try:
        replies = await asyncio.gather(
            *(poor.tip({"room": room, "amount": 1, "key": f"k{i}"}) for i in range(CONCURRENT_TIPS))
        )
        out["concurrent"] = [r.get("code", r["type"]) for r in replies]
        out["balances"] = sorted(r["balance"] for r in replies if r["type"] == "ok")
        ok_key = next(f"k{i}" for i, r in enumerate(replies) if r["type"] == "ok")
        out["retry"] = await poor.tip({"room": room, "amount": 1, "key": ok_key})
        out["conflict"] = await poor.tip({"room": room, "amount": 2, "key": ok_key})
        refused_key = next(f"k{i}" for i, r in enumerate(replies) if r["type"] == "error")
        out["refused_key_again"] = await poor.tip({"room": room, "amount": 1, "key": refused_key})
        hostile: list[Any] = [
            {"room": room, "amount": 0, "key": "h"},
            {"room": room, "amount": -1, "key": "h"},
            {"room": room, "amount": True, "key": "h"},
            {"room": room, "amount": "1", "key": "h"},
            {"room": room, "amount": 1.5, "key": "h"},
            {"room": room, "amount": 1_000_001, "key": "h"},
            {"room": room, "amount": 1, "key": ""},
            {"room": room, "amount": 1, "key": "k" * 65},
            {"room": room, "amount": 1, "key": "h", "text": "t" * 256},
            {"room": room, "amount": 1},
            ["not", "an", "object"],
        ]
        out["hostile"] = [(await rich.tip(data)).get("code") for data in hostile]
        out["not_in_room"] = await rich.tip({"room": other_room, "amount": 1, "key": "x"})
        out["rich"] = await rich.tip({"room": room, "amount": 5, "key": "a", "text": "hi"})
        await asyncio.sleep(0.5)  # the broadcast comes back through Redis
        out["poor_events"] = [e for e in poor.events if e[0] == "tip"]
        out["stranger"] = await SioClient.connect(
            port, {"token": issue_token("another-secret-" + "y" * 32, "x", "fan"), "room": room}
        )
    finally:
        await poor.close()
        await rich.close()
    return out


def test_socketio_baseline_moves_exactly_what_it_acks(backends: None) -> None:
    """The baseline is honest: a balance check and debit that hold under
    concurrency (never negative), idempotent keys, refused input moving
    nothing, the tip broadcast to the room; its books add up."""
    bench = tips_bench()
    funded = {tips.fan_id(0): PEER_FUND_TOKENS, tips.fan_id(1): 1000}
    schema = tips_peer.peer_schema(bench)
    with bench.closed_after():
        bench.peer_started = True
        asyncio.run(tips_peer.create_state(DATABASE_URL, schema, funded))
        server = tips_peer.start_server(bench)
        out = asyncio.run(peer_exchanges(server.ws_port, bench.jwt_secret))
        server.stop()
        books = asyncio.run(tips_peer.check_state(DATABASE_URL, schema, funded))
    assert sorted(out["concurrent"]).count("ok") == PEER_FUND_TOKENS
    assert out["concurrent"].count("INSUFFICIENT_FUNDS") == CONCURRENT_TIPS - PEER_FUND_TOKENS
    assert out["balances"] == list(range(PEER_FUND_TOKENS))
    assert out["retry"]["duplicate"] is True and out["retry"]["balance"] == 0
    assert out["conflict"]["code"] == "CONFLICT"
    assert out["refused_key_again"]["code"] == "INSUFFICIENT_FUNDS"
    assert out["hostile"] == ["BAD_REQUEST"] * 11
    assert out["not_in_room"]["code"] == "NOT_IN_ROOM"
    assert out["rich"]["type"] == "ok" and out["rich"]["balance"] == 995
    assert [e[1]["amount"] for e in out["poor_events"] if e[1]["from"] == tips.fan_id(1)] == [5]
    assert isinstance(out["stranger"], str) and out["stranger"].startswith("44")
    # Postgres: the acked tips and nothing else, no balance below 0, the
    # model holds exactly what was tipped to her.
    assert books == {"tips": PEER_FUND_TOKENS + 1, "negative": 0, "mismatches": [],
                     "conserved": True}  # fmt: skip


def test_tips_fans_drive_the_socketio_baseline(backends: None) -> None:
    """``run_peer``: the tips benchmark's fans (over Engine.IO) tip the
    baseline at full rate; every acked tip is a row, none is unanswered."""
    bench = tips_bench()
    with bench.closed_after():
        [row] = tips_peer.run_peer(bench, 1)
    assert row["kind"] == "socketio"
    assert row["per_s"] > 0 and row["acked_total"] > 0
    assert row["errors"] == {} and row["unanswered"] == 0 and row["duplicates"] == 0
    assert row["ledger"]["reconcile_ok"], row["ledger"]
    assert row["ledger"]["ledger_tips"] == row["ledger"]["acked_tips"] == row["acked_total"]
    assert row["events_per_s"] > 0  # the tips came back to the room's fans
    assert row["cpu_main_pct"] is not None and row["postgres_us_per_op"] is not None


# ============================================================================
# The evening scenario (loadtests/locust_evening.py, loadtests/evening.py)
# ============================================================================

EVENING_TIMEOUT_S = 300  # migrate, locust's start, 20 s of load, reconcile
# Seconds of load: every class must get to its money rows (a tipper is funded,
# says hello, joins, then tips after its think time). 8 s once left a loaded CI
# machine with no tip at all.
EVENING_RUN_S = 20


@pytest.mark.timeout(EVENING_TIMEOUT_S)
def test_evening_runs_every_kind_of_user_and_balances(backends: None, tmp_path: Path) -> None:
    """A short evening with every class present: the money rows ran, none
    failed, and the ledger reconciles afterwards."""
    out = tmp_path / "evening.json"
    code = evening.main(
        ["--users", "16", "--spawn-rate", "16", "--run-time", str(EVENING_RUN_S), "--models", "2",
         "--weights", "2,1,1,1,1", "--json", str(out),
         # A busy machine answers a burst of hellos in seconds, not ms: the
         # test is of the scenario and the books, not of the ramp-up's tail.
         "--reply-timeout", "30"]
    )  # fmt: skip
    result = json.loads(out.read_text())["scenarios"]["evening"]
    rows = {(r["type"], r["name"]): r for r in result["rows"]}
    assert result["failures"] == [] and result["locust_errors"] == [], result
    assert result["reconcile_ok"], result["reconcile"]
    assert code == 0
    for name in ("hello", "join", "say", "tip", "dm"):
        assert rows[("WS", name)]["requests"] > 0, (name, sorted(rows))
    assert rows[("POST", "POST /v1/admin/credits (fund)")]["requests"] > 0


def test_evening_refuses_an_unbounded_run() -> None:
    """Headless without --run-time, too many users, or a remote server: no run."""
    for extra, said in (
        ([], "needs --run-time"),
        (["-t", "5s", "-u", "100000"], "EVENING_USERS_MAX"),
        (["-t", "5s", "--tc-allow-remote"], "127.0.0.1 only"),
    ):
        done = subprocess.run(
            [sys.executable, "-m", "locust", "-f", str(evening.LOCUSTFILE), "--headless",
             "--host", "http://127.0.0.1:9", *extra],
            cwd=REPO_ROOT, env=dict(os.environ, TOKENCHAT_JWT_SECRET="s" * 32),
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode != 0 and said in done.stderr + done.stdout, (extra, done.stderr)
