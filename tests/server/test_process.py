"""Process-level tests: the real ``tokenchat`` command as an operator runs it.

Each test starts ``python -m tokenchat.server.cli ...`` as a subprocess against the real
Redis and Postgres (isolated by the ``settings`` fixture's key prefix and
schema) and talks to it over TCP only: WebSocket clients, HTTP, and Redis to
look at what the processes left there.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import jwt
import orjson
import pytest
from redis.asyncio import Redis
from websockets.exceptions import ConnectionClosed

from tests.conftest import DATABASE_URL, JWT_SECRET, token
from tests.server.proc import (
    ServerProcess,
    children_of,
    cli_env,
    close_all,
    close_code,
    connect,
    free_port,
    node_ids,
    pid_alive,
    run_cli,
    serve,
    wait_for,
    worker_pids,
)
from tokenchat.client_demo.client import Client
from tokenchat.server.app import (
    WORKER_RESTART_DELAY_MAX_S,
    WORKER_RESTART_DELAY_MIN_S,
    restart_delay_s,
)
from tokenchat.server.auth import TOKEN_TTL_DEFAULT_S, Identity, verify_token
from tokenchat.server.config import Settings
from tokenchat.server.errors import Unauthenticated

pytestmark = pytest.mark.timeout(60)
# The default cap on a token's life, as the server under test applies it.
TTL_MAX_S = Settings().token_ttl_max_s

ROOM = "alice"  # the model alice's room
SERVICE_RESTART = 1012
HISTORY_LEN = 50  # events a room's history keeps (the contract)


def presence_key(settings: Settings) -> str:
    return f"{settings.redis_prefix}room:{{{ROOM}}}:presence"


def history_key(settings: Settings) -> str:
    return f"{settings.redis_prefix}room:{{{ROOM}}}:history"


def offset_order(offset: str) -> tuple[int, int]:
    ms, _, seq = offset.partition("-")
    return int(ms), int(seq)


async def presence(redis: Redis, settings: Settings) -> dict[str, int]:
    """The room's presence hash: node id -> sessions that node has in the room."""
    raw: dict[bytes, bytes] = await redis.hgetall(presence_key(settings))  # type: ignore[assignment]
    return {node.decode(): int(count) for node, count in raw.items()}


async def history(redis: Redis, settings: Settings) -> dict[str, dict[str, Any]]:
    """offset -> stored event body, for the room's whole history stream."""
    rows: list[tuple[bytes, dict[bytes, bytes]]] = await redis.xrange(history_key(settings))  # type: ignore[assignment]
    return {offset.decode(): orjson.loads(fields[b"e"]) for offset, fields in rows}


async def join_and_locate(
    client: Client, redis: Redis, settings: Settings, before: dict[str, int]
) -> tuple[str, dict[str, int]]:
    """Join the room; return the id of the node serving ``client`` (the one
    whose count in the presence hash went up by one) and the new hash."""
    joined = await client.call("join", room=ROOM)
    assert joined["room"]["id"] == ROOM
    after = await presence(redis, settings)
    changed = {n for n in before.keys() | after.keys() if before.get(n, 0) != after.get(n, 0)}
    assert len(changed) == 1, (before, after)
    (node,) = changed
    assert after[node] == before.get(node, 0) + 1, (before, after)
    return node, after


def sessions_open(metrics_text: str) -> float:
    for line in metrics_text.splitlines():
        if line.startswith("tokenchat_sessions_open "):
            return float(line.split()[1])
    raise AssertionError(f"no tokenchat_sessions_open in /metrics:\n{metrics_text}")


async def wait_for_nodes(redis: Redis, settings: Settings, count: int) -> set[str]:
    async def enough() -> bool:
        return len(await node_ids(redis, settings.redis_prefix)) == count

    await wait_for(f"{count} node heartbeats", enough)
    return await node_ids(redis, settings.redis_prefix)


# --- 1. --workers 2: two processes, one room, one order -------------------------------

FANS = 20
SENDERS = 3
MESSAGES_PER_SENDER = 30


async def test_two_workers_share_ports_and_deliver_one_room_in_one_order(
    settings: Settings, redis: Redis, tmp_path: Path
) -> None:
    clients: list[Client] = []
    async with serve(settings, tmp_path, workers=2) as server:
        try:
            nodes = await wait_for_nodes(redis, settings, 2)
            assert len(worker_pids(server)) == 2, children_of(server.pid)

            # alice says hello first: that creates her room.
            alice = await connect(server, ROOM, "model")
            clients.append(alice)
            node_of: dict[Client, str] = {}
            node_of[alice], seen = await join_and_locate(alice, redis, settings, {})
            for i in range(FANS):
                fan = await connect(server, f"fan{i}")
                clients.append(fan)
                node_of[fan], seen = await join_and_locate(fan, redis, settings, seen)

            for client in clients:
                assert client.welcome is not None and client.welcome["type"] == "welcome"
                assert client.welcome["session"]
            assert len({c.welcome["session"] for c in clients if c.welcome}) == len(clients)
            # Two processes served them: the kernel spread the connections over
            # both listening sockets of the shared port.
            assert set(node_of.values()) == nodes, (node_of, nodes)
            assert len(seen) == 2 and sum(seen.values()) == FANS + 1, seen
            # /metrics on either worker aggregates both.
            assert sessions_open(await server.metrics()) == FANS + 1

            by_node: dict[str, list[Client]] = {}
            for fan in clients[1:]:
                by_node.setdefault(node_of[fan], []).append(fan)
            first, second = sorted(by_node.values(), key=len, reverse=True)
            senders = [first[0], second[0], first[1]]  # both workers send
            assert len({node_of[s] for s in senders}) == 2

            # Each sender pipelines its whole burst; the three run at once.
            says = [
                [
                    asyncio.create_task(sender.call("say", room=ROOM, text=f"s{i}-{n}"))
                    for n in range(MESSAGES_PER_SENDER)
                ]
                for i, sender in enumerate(senders)
            ]
            acked = [[r["offset"] for r in await asyncio.gather(*tasks)] for tasks in says]
            total = SENDERS * MESSAGES_PER_SENDER
            acked_all = {offset for offsets in acked for offset in offsets}
            assert len(acked_all) == total
            for offsets in acked:  # one session's commands run in order
                assert offsets == sorted(offsets, key=offset_order)

            async def receive(client: Client) -> list[dict[str, Any]]:
                return [await client.next_event("message", timeout_s=10) for _ in range(total)]

            async with asyncio.timeout(30):
                received = await asyncio.gather(*(receive(c) for c in clients))

            reference = [event["offset"] for event in received[0]]
            assert set(reference) == acked_all
            order = [offset_order(offset) for offset in reference]
            assert all(a < b for a, b in itertools.pairwise(order)), reference
            for client, events in zip(clients, received, strict=True):
                assert [e["offset"] for e in events] == reference, node_of[client]
            sender_ids = {
                f"s{i}": s.welcome["user"]["id"] for i, s in enumerate(senders) if s.welcome
            }
            for event in received[0]:
                assert event["room"] == ROOM
                assert event["from"] == sender_ids[event["text"].split("-")[0]]
                assert event["ts"] == offset_order(event["offset"])[0]
            for i in range(SENDERS):
                texts = [e["text"] for e in received[0] if e["text"].startswith(f"s{i}-")]
                assert texts == [f"s{i}-{n}" for n in range(MESSAGES_PER_SENDER)]

            # Once: nothing more arrives.
            await asyncio.sleep(0.2)
            for client in clients:
                while not client.events.empty():
                    assert client.events.get_nowait()["type"] != "message"
        finally:
            await close_all(clients)


# --- 2. graceful shutdown --------------------------------------------------------------


async def pause_writes(redis: Redis, ms: int) -> None:
    await redis.execute_command("CLIENT", "PAUSE", str(ms), "WRITE")  # type: ignore[no-untyped-call]


async def unpause(redis: Redis) -> None:
    await redis.execute_command("CLIENT", "UNPAUSE")  # type: ignore[no-untyped-call]


async def test_sigterm_finishes_commands_in_flight_then_closes_1012(
    settings: Settings, private_redis: str, tmp_path: Path
) -> None:
    settings = settings.replace(redis_url=private_redis)
    grace_s = 5.0
    env = {
        "TOKENCHAT_SHUTDOWN_GRACE_S": str(grace_s),
        # The pause below must not turn into UNAVAILABLE replies.
        "TOKENCHAT_REDIS_TIMEOUT_S": "10",
        # While Redis is paused the only writes waiting on it must be the says:
        # presence settles fast before the pause, heartbeats are far apart.
        "TOKENCHAT_PRESENCE_INTERVAL_S": "0.05",
        "TOKENCHAT_NODE_TTL_S": "300",
    }
    redis: Redis = Redis.from_url(private_redis)
    clients: list[Client] = []
    try:
        async with serve(settings, tmp_path, env=env) as server:
            alice = await connect(server, ROOM, "model")
            clients.append(alice)
            await alice.call("join", room=ROOM)
            idle = [await connect(server, f"idle{i}") for i in range(2)]
            busy = [await connect(server, f"busy{i}") for i in range(3)]
            clients += idle + busy
            for fan in idle + busy:
                await fan.call("join", room=ROOM)
            lurker = await connect(server)  # connected, no hello yet
            clients.append(lurker)
            await asyncio.sleep(0.3)  # the joins' presence updates are done

            # Hold every Redis write (the say script included) so the says below
            # are deterministically in flight when SIGTERM arrives.
            await pause_writes(redis, 8000)
            try:
                says = [
                    asyncio.create_task(
                        fan.request("say", room=ROOM, text=f"in flight {i}", timeout_s=15)
                    )
                    for i, fan in enumerate(busy)
                ]

                async def says_waiting_on_redis() -> bool:
                    # The server pipelines the says of one event-loop tick, so
                    # they may wait on one connection or on several.
                    info: dict[str, Any] = await redis.info("clients")
                    return int(info["blocked_clients"]) >= 1

                await wait_for("the says to reach Redis", says_waiting_on_redis, 5.0)
                await asyncio.sleep(0.2)  # and every one of them is sent
                assert not any(task.done() for task in says)
                server.send_signal(signal.SIGTERM)
                stopped_at = time.monotonic()
                # Sessions with nothing in flight are closed at once.
                for client in [alice, *idle, lurker]:
                    assert await close_code(client, 3.0) == SERVICE_RESTART
                # Sessions with a command in flight stay open until it is done.
                await asyncio.sleep(0.2)
                assert not any(task.done() for task in says)
                assert all(fan.ws.close_code is None for fan in busy)
            finally:
                await unpause(redis)

            async with asyncio.timeout(10):
                replies = await asyncio.gather(*says)
            # The reply came before the close (else the client fails the request).
            for reply in replies:
                assert reply["type"] == "ok", reply
            for fan in busy:
                assert await close_code(fan, 3.0) == SERVICE_RESTART

            assert await server.wait_exit(grace_s) == 0, server.log()
            elapsed = time.monotonic() - stopped_at
            assert elapsed < grace_s, f"exit took {elapsed:.1f} s"
            assert "still open after" not in server.log()

            stored = await history(redis, settings)
            for i, reply in enumerate(replies):
                assert stored[reply["offset"]]["text"] == f"in flight {i}"
            # The node took its heartbeat key with it.
            assert await node_ids(redis, settings.redis_prefix) == set()
    finally:
        await close_all(clients)
        await redis.aclose()


async def test_sigterm_to_parent_stops_both_workers(
    settings: Settings, redis: Redis, tmp_path: Path
) -> None:
    grace_s = 5.0
    env = {
        "TOKENCHAT_SHUTDOWN_GRACE_S": str(grace_s),
    }
    clients: list[Client] = []
    async with serve(settings, tmp_path, workers=2, env=env) as server:
        try:
            nodes = await wait_for_nodes(redis, settings, 2)
            workers = worker_pids(server)
            assert len(workers) == 2, children_of(server.pid)

            alice = await connect(server, ROOM, "model")
            clients.append(alice)
            node_of: dict[Client, str] = {}
            node_of[alice], seen = await join_and_locate(alice, redis, settings, {})
            fans: list[Client] = []

            # Connect until both workers have at least two fans (almost always
            # at once; the kernel picks the worker by a hash of the ports).
            def fans_per_node() -> list[int]:
                counts = {node: 0 for node in nodes}
                for fan in fans:
                    counts[node_of[fan]] += 1
                return list(counts.values())

            while len(fans) < 8 or min(fans_per_node()) < 2:
                assert len(fans) < 16, seen  # 16 x 3 says still fit in history
                fan = await connect(server, f"fan{len(fans)}")
                fans.append(fan)
                clients.append(fan)
                node_of[fan], seen = await join_and_locate(fan, redis, settings, seen)

            # Every fan sends a few says without waiting, and SIGTERM follows
            # at once: each say is either acknowledged or never applied.
            says = {
                f"last {i}-{k}": asyncio.create_task(
                    fan.request("say", room=ROOM, text=f"last {i}-{k}", timeout_s=10)
                )
                for i, fan in enumerate(fans)
                for k in range(3)
            }
            assert len(says) <= HISTORY_LEN  # so history holds every one of them
            await asyncio.sleep(0)  # let the first frames go out
            server.send_signal(signal.SIGTERM)
            stopped_at = time.monotonic()

            async with asyncio.timeout(10):
                outcomes = dict(
                    zip(
                        says,
                        await asyncio.gather(*says.values(), return_exceptions=True),
                        strict=True,
                    )
                )
            for client in clients:
                assert await close_code(client, grace_s) == SERVICE_RESTART

            assert await server.wait_exit(grace_s + 2) == 0, server.log()
            elapsed = time.monotonic() - stopped_at
            assert elapsed < grace_s, f"exit took {elapsed:.1f} s"
            for pid in workers:
                assert not pid_alive(pid), f"worker {pid} outlived its parent"
            # Both workers closed their node cleanly (heartbeat keys removed).
            assert await node_ids(redis, settings.redis_prefix) == set()
            assert "still open after" not in server.log()

            stored = await history(redis, settings)
            stored_texts = {event["text"]: offset for offset, event in stored.items()}
            acknowledged = 0
            for text, outcome in outcomes.items():
                if isinstance(outcome, BaseException):
                    assert isinstance(outcome, ConnectionError | ConnectionClosed), outcome
                    assert text not in stored_texts, f"{text!r} applied but not acknowledged"
                else:
                    assert outcome["type"] == "ok", outcome
                    assert stored_texts.get(text) == outcome["offset"], text
                    acknowledged += 1
            print(f"acknowledged {acknowledged} of {len(outcomes)} says before the close")
        finally:
            await close_all(clients)


async def test_a_killed_worker_is_replaced_and_the_other_keeps_serving(
    settings: Settings, redis: Redis, tmp_path: Path
) -> None:
    clients: list[Client] = []
    async with serve(settings, tmp_path, workers=2) as server:
        try:
            await wait_for_nodes(redis, settings, 2)
            before = worker_pids(server)
            assert len(before) == 2, children_of(server.pid)
            alice = await connect(server, ROOM, "model")
            clients.append(alice)
            node_of: dict[Client, str] = {}
            node_of[alice], seen = await join_and_locate(alice, redis, settings, {})
            fans: list[Client] = []
            while len(set(node_of.values())) < 2:
                assert len(fans) < 16, seen
                fan = await connect(server, f"fan{len(fans)}")
                fans.append(fan)
                clients.append(fan)
                node_of[fan], seen = await join_and_locate(fan, redis, settings, seen)

            # Which pid serves which node: the node of the killed worker stops
            # its heartbeat, so the survivors' node is the one still beating
            # after the kill. Kill the worker that does not serve alice.
            victim_node = next(n for n in set(node_of.values()) if n != node_of[alice])
            survivors = [c for c in clients if node_of[c] != victim_node]
            doomed = [c for c in clients if node_of[c] == victim_node]
            victim = served_nodes(server)[victim_node]
            assert victim in before
            os.kill(victim, signal.SIGKILL)
            for client in doomed:
                assert await close_code(client, 5.0) != SERVICE_RESTART

            # The survivors never noticed: still connected, still served.
            for client in survivors:
                assert client.ws.close_code is None
            reply = await survivors[-1].call("say", room=ROOM, text="still here")
            event = await alice.next_event("message", timeout_s=5)
            assert event["offset"] == reply["offset"]

            async def replaced() -> bool:
                pids = worker_pids(server)
                return len(pids) == 2 and victim not in pids

            await wait_for("a replacement worker", replaced, timeout_s=15)
            (replacement,) = set(worker_pids(server)) - set(before)
            assert server.returncode is None, "the parent kept running"

            # The replacement serves: new connections reach it and talk to
            # alice on the survivor.
            async def replacement_serving() -> bool:
                return replacement in served_nodes(server).values()

            await wait_for("the replacement to serve", replacement_serving)
            new_node = next(n for n, pid in served_nodes(server).items() if pid == replacement)
            newcomers: list[Client] = []
            node = ""
            while node != new_node:
                assert len(newcomers) < 16, seen
                fan = await connect(server, f"new{len(newcomers)}")
                newcomers.append(fan)
                clients.append(fan)
                node, seen = await join_and_locate(fan, redis, settings, seen)
            reply = await fan.call("say", room=ROOM, text="from the replacement")
            event = await alice.next_event("message", timeout_s=5)
            assert event["text"] == "from the replacement"
            assert "replacing it in" in server.log()
            assert metric_value(await server.metrics(), "tokenchat_worker_replacements_total") == 1
        finally:
            await close_all(clients)


async def test_workers_that_cannot_start_back_off_and_sigterm_still_stops_the_parent(
    settings: Settings, tmp_path: Path
) -> None:
    # Nothing listens on this Redis port: every worker dies while starting.
    settings = settings.replace(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    http_port, ws_port = free_port(), free_port()
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log_fh:
        proc = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "tokenchat.server.cli", "serve", "--workers", "2"),
            *("--http-port", str(http_port), "--ws-port", str(ws_port)),
            env=cli_env(settings, TMPDIR=str(tmp_path), TOKENCHAT_REDIS_TIMEOUT_S="0.5"),
            stdin=subprocess.DEVNULL,
            stdout=log_fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = ServerProcess(proc, http_port, ws_port, log_path)
    try:
        watch_s = 6.0

        async def second_crash_in_a_row() -> bool:
            return "(crash 2 in a row)" in server.log()

        await wait_for("a second crash in a row", second_crash_in_a_row, timeout_s=watch_s * 2)
        await asyncio.sleep(watch_s - 2.0)
        assert server.returncode is None, "the parent gave up:\n" + server.log()
        # Backoff, not a tight loop: delays of 1, 2, 4 s... allow a handful of
        # starts per worker place in the whole run, not dozens.
        starts = server.log().count("starting a replacement")
        assert 2 <= starts <= 2 * 5, server.log()

        # A signal during a backoff stops the parent, and no worker outlives it.
        server.send_signal(signal.SIGTERM)
        await server.wait_exit(settings.shutdown_grace_s + 5)
        assert worker_pids(server) == []
    finally:
        await server.kill_group()


def test_replacement_backoff_doubles_per_crash_in_a_row_up_to_its_cap() -> None:
    assert restart_delay_s(0) == WORKER_RESTART_DELAY_MIN_S  # died in service
    delays = [restart_delay_s(n) for n in range(1, 12)]
    assert delays[0] == 2 * WORKER_RESTART_DELAY_MIN_S
    assert all(b == min(2 * a, WORKER_RESTART_DELAY_MAX_S) for a, b in itertools.pairwise(delays))
    assert delays[-1] == WORKER_RESTART_DELAY_MAX_S
    assert restart_delay_s(10_000) == WORKER_RESTART_DELAY_MAX_S


def served_nodes(server: ServerProcess) -> dict[str, int]:
    """node id -> pid, from each worker's "serving: ... (node N, pid P)" log line."""
    return {node: int(pid) for node, pid in re.findall(r"\(node (\w+), pid (\d+)\)", server.log())}


def metric_value(metrics_text: str, name: str) -> float:
    for line in metrics_text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"no {name} in /metrics:\n{metrics_text}")


# --- 3-5. the other CLI commands --------------------------------------------------------


@pytest.mark.parametrize("secret", [None, ""], ids=["unset", "empty"])
async def test_serve_without_jwt_secret_refuses_to_start(
    settings: Settings, tmp_path: Path, secret: str | None
) -> None:
    env = cli_env(settings)
    del env["TOKENCHAT_JWT_SECRET"]
    if secret is not None:
        env["TOKENCHAT_JWT_SECRET"] = secret
    http_port, ws_port = free_port(), free_port()
    result = await run_cli(
        "serve",
        "--http-port",
        str(http_port),
        "--ws-port",
        str(ws_port),
        env=env,
        cwd=tmp_path,
        timeout_s=15,
    )
    assert result.returncode != 0
    assert "TOKENCHAT_JWT_SECRET" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr, result.stderr


async def test_token_prints_a_jwt_the_server_accepts(tmp_path: Path) -> None:
    env = cli_env(TOKENCHAT_JWT_SECRET=JWT_SECRET)
    result = await run_cli("token", "bob", "--role", "model", env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout
    token = lines[0].strip()
    assert verify_token(JWT_SECRET, token, ttl_max_s=TTL_MAX_S) == Identity("bob", "model")
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["exp"] - claims["iat"] == TOKEN_TTL_DEFAULT_S
    with pytest.raises(Unauthenticated):
        verify_token("another-secret-" + "y" * 32, token, ttl_max_s=TTL_MAX_S)


async def test_token_without_secret_fails_clearly(tmp_path: Path) -> None:
    # tmp_path has no .tokenchat/jwt_secret from a `tokenchat dev` run.
    result = await run_cli("token", "bob", env=cli_env(), cwd=tmp_path)
    assert result.returncode != 0
    assert "TOKENCHAT_JWT_SECRET" in result.stderr, result.stderr
    assert result.stdout == ""


async def test_migrate_applies_then_reports_up_to_date(tmp_path: Path) -> None:
    schema = f"m_{uuid.uuid4().hex[:12]}"
    env = cli_env(TOKENCHAT_DATABASE_URL=DATABASE_URL, TOKENCHAT_DATABASE_SCHEMA=schema)
    conn = await asyncpg.connect(DATABASE_URL)
    try:
        first = await run_cli("migrate", env=env, cwd=tmp_path)
        assert first.returncode == 0, first.stderr
        assert "applied migrations" in first.stdout, first.stdout
        second = await run_cli("migrate", env=env, cwd=tmp_path)
        assert second.returncode == 0, second.stderr
        assert "up to date" in second.stdout, second.stdout

        users = await conn.fetchval("SELECT to_regclass($1)::text", f"{schema}.users")
        assert users is not None
        versions = await conn.fetch(f'SELECT version FROM "{schema}".schema_migrations')
        assert versions, "no migration recorded"
    finally:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await conn.close()


async def test_procfile_shape_serve_without_writer_and_ledger_alone_with_metrics(
    settings: Settings, tmp_path: Path
) -> None:
    """As the Procfile deploys it: `serve` with TOKENCHAT_LEDGER_ENABLED=0, and
    `tokenchat ledger --metrics-port P` moving what was spent into Postgres, and
    `tokenchat reconcile` finding the books equal."""
    metrics_port = free_port()
    env = cli_env(settings)
    ledger_log = (tmp_path / "ledger.log").open("wb")
    ledger = await asyncio.create_subprocess_exec(
        sys.executable,
        *("-m", "tokenchat.server.cli", "ledger", "--metrics-port", str(metrics_port)),
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=ledger_log,
        stderr=subprocess.STDOUT,
    )
    clients: list[Client] = []
    try:
        async with serve(settings, tmp_path, env={"TOKENCHAT_LEDGER_ENABLED": "0"}) as server:
            async with httpx.AsyncClient(base_url=server.http_url, timeout=5) as http:
                credit = await http.post(
                    "/v1/admin/credits",
                    json={"user": "bob", "amount": 10, "key": "procfile"},
                    headers={"Authorization": f"Bearer {token('ops', 'admin')}"},
                )
                assert credit.status_code == 200, credit.text
            alice = await connect(server, ROOM, "model")
            bob = await connect(server, "bob")
            clients += [alice, bob]
            await alice.call("join", room=ROOM)
            await bob.call("join", room=ROOM)
            reply = await bob.call("tip", room=ROOM, amount=3, key="t1")
            assert reply["balance"] == 7

            async def ledger_metric() -> float:
                async with httpx.AsyncClient(timeout=2) as http:
                    text = (await http.get(f"http://127.0.0.1:{metrics_port}/metrics")).text
                for line in text.splitlines():
                    if line.startswith("tokenchat_ledger_entries_total "):
                        return float(line.split()[1])
                return 0.0

            # The credit and the tip, written by the ledger process alone.
            async def both_written() -> bool:
                return await ledger_metric() >= 2

            await wait_for("the ledger process to write 2 entries", both_written, timeout_s=15)
            rows = await _ledger_rows(settings)
            assert sorted(rows) == ["credit", "tip"]
            serve_metrics = await server.metrics()
            assert "tokenchat_ledger_entries_total 0.0" in serve_metrics or (
                "tokenchat_ledger_entries_total" not in serve_metrics
            ), "serve wrote ledger entries though its writer is off"
            # `tokenchat reconcile`, like the writer, runs without a gateway.
            reconciled = await run_cli("reconcile", "--timeout", "10", env=env)
            assert reconciled.returncode == 0, reconciled.stdout + reconciled.stderr
            assert json.loads(reconciled.stdout)["ok"] is True
        ledger.send_signal(signal.SIGTERM)
        async with asyncio.timeout(10):
            assert await ledger.wait() == 0
    finally:
        await close_all(clients)
        if ledger.returncode is None:
            ledger.kill()
            await ledger.wait()
        ledger_log.close()


async def _ledger_rows(settings: Settings) -> list[str]:
    conn = await asyncpg.connect(DATABASE_URL)
    try:
        rows = await conn.fetch(
            f'SELECT kind FROM "{settings.database_schema}".ledger_transactions'
        )
    finally:
        await conn.close()
    return [row["kind"] for row in rows]


# --- production guards ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "reason"),
    [
        ({"TOKENCHAT_DEV_MODE": "1"}, "dev mode is on"),
        ({"TOKENCHAT_PAYMENT_PROVIDER": "fake"}, "the payment provider is 'fake'"),
    ],
    ids=["dev-mode", "fake-payments"],
)
async def test_serve_refuses_insecure_settings_unless_told(
    settings: Settings, tmp_path: Path, setting: dict[str, str], reason: str
) -> None:
    ports = ("--http-port", str(free_port()), "--ws-port", str(free_port()))
    result = await run_cli("serve", *ports, env=cli_env(settings, **setting), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "refusing to serve" in result.stderr and reason in result.stderr, result.stderr
    assert "TOKENCHAT_INSECURE=1" in result.stderr and "--insecure" in result.stderr
    assert "Traceback" not in result.stderr, result.stderr

    # --insecure passes the guard: this start fails later, for another reason
    # (shared ports need fixed ports), which proves the guard let it through.
    env = cli_env(settings, **setting)
    unshareable = ("--workers", "2", "--http-port", "0", "--ws-port", "0")
    result = await run_cli("serve", "--insecure", *unshareable, env=env, cwd=tmp_path)
    assert result.returncode == 2 and "needs fixed ports" in result.stderr, result.stderr

    # TOKENCHAT_INSECURE=1 serves (serve() waits for /readyz to answer 200).
    async with serve(settings, tmp_path, env={**setting, "TOKENCHAT_INSECURE": "1"}) as server:
        assert server.returncode is None


async def test_token_ttl_over_the_cap_is_refused(tmp_path: Path) -> None:
    env = cli_env(TOKENCHAT_JWT_SECRET=JWT_SECRET, TOKENCHAT_TOKEN_TTL_MAX_S="3600")
    result = await run_cli("token", "bob", "--ttl", "3601", env=env, cwd=tmp_path)
    assert result.returncode == 2 and "TOKENCHAT_TOKEN_TTL_MAX_S" in result.stderr
    assert result.stdout == ""
    result = await run_cli("token", "bob", "--ttl", "3600", env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    short = cli_env(TOKENCHAT_JWT_SECRET="too-short")
    result = await run_cli("token", "bob", env=short, cwd=tmp_path)
    assert result.returncode == 2 and "at least 32 bytes" in result.stderr


async def test_metrics_on_an_internal_port_aggregate_the_workers(
    settings: Settings, redis: Redis, tmp_path: Path
) -> None:
    metrics_port = free_port()
    env = {"TOKENCHAT_METRICS_PORT": str(metrics_port)}
    clients: list[Client] = []
    async with serve(settings, tmp_path, workers=2, env=env) as server:
        try:
            await wait_for_nodes(redis, settings, 2)
            clients += [await connect(server, f"fan{i}") for i in range(12)]
            url = f"http://127.0.0.1:{metrics_port}/metrics"

            async def all_counted() -> bool:
                async with httpx.AsyncClient(timeout=2) as http:
                    return sessions_open((await http.get(url)).text) == 12

            # The parent serves the port and has no session of its own: the
            # count is the sum of both workers' files.
            await wait_for("12 sessions on the metrics port", all_counted)
            async with httpx.AsyncClient(base_url=server.http_url, timeout=5) as http:
                public = await http.get("/metrics")
                assert public.status_code == 404, "metrics still served on the public port"
        finally:
            await close_all(clients)
