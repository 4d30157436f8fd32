"""The second tips baseline: tips the way most people would build them.

python-socketio's ``AsyncServer`` (ASGI, served by uvicorn on uvloop), its
``AsyncRedisManager`` for room broadcasts through Redis pub/sub (redis-py),
and an asyncpg pool with one Postgres transaction per tip. Nothing in it is
tokenchat's: it is what a developer would write in an afternoon from the
libraries' documentation, kept honest:

- authentication once per connection: a JWT (PyJWT, HS256) in the Socket.IO
  ``auth`` payload, with the room to enter;
- a ``tip`` event ``{"room", "amount", "key", "text"?}`` with an ack; the
  payload is validated (amount 1-1,000,000, key 1-64 characters, text at most
  255), the sender must be in the room;
- money: one transaction per tip, in this order: ``INSERT`` the tip row
  (the ledger: sender, key, room, amount) ``ON CONFLICT (sender, key) DO
  NOTHING``; ``UPDATE accounts SET balance = balance - amount WHERE user_id
  = sender AND balance >= amount`` (the balance check and the debit in one
  statement: atomic under concurrency, no read-then-write race); the room
  owner's account credited; ``COMMIT``. A refused debit rolls the
  transaction back (its tip row too, so a refused tip does not burn its
  key). A key seen before with the same fields answers the original tip with
  ``"duplicate": true`` and charges nothing; with other fields ``CONFLICT``.
  ``CHECK (balance >= 0)`` backs the ``WHERE`` up;
- after the commit: ``emit("tip", event, room=room)`` through Redis to every
  member of the room, then the ack ``{"type": "ok", "balance", "tx",
  "offset"}`` (like tokenchat's default ``ledger`` durability, a tip is
  acknowledged once it is committed in Postgres).

What it does not do, and tokenchat does: deliver the event atomically with
the charge (a Redis failure after the commit loses the event of a paid tip),
hot balances in Redis, a double-entry ledger with postings and a balanced
check, batching of concurrent tips, rate limits, history, and everything
else of the contract. So it is a floor for what a tip costs, not a rival.

``loadtests.tips`` runs it beside tokenchat in every run (the ``socketio``
column, unless ``--no-peer``), driven by the same fans (``TipFan``) speaking
Engine.IO v4 / Socket.IO v5 over the websocket, the same number of fans in
the same rooms, one tip in flight each; ``python -m loadtests.bench`` reports
the ratio as ``tips_peer``. The server is started as
``python -m loadtests.tips_peer --serve PORT ...`` (see ``start_server``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import sys
import time
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any, cast

import orjson

from loadtests.harness.client import CONNECT_TIMEOUT_S, HOST, SIO_PATH
from loadtests.harness.processes import (
    SETUP_TIMEOUT_S,
    Server,
    drop_schema,
    free_port,
    raise_open_files_limit,
    run_load_process,
    tcp_answers,
)
from loadtests.harness.stats import Stats

if TYPE_CHECKING:
    from loadtests.tips import FanWorkerSpec, TipFan, TipsBench

# --- the baseline's contract ----------------------------------------------------
# The Engine.IO v4 websocket endpoint (no long-polling first), as fanout_peer.
# Its own pub/sub channel on the shared Redis, under the benchmark's prefix.
SIO_CHANNEL_PREFIX = "tokenchat-bench-tips-socketio-"
# The same bounds as tokenchat's tip (DESIGN.md section 3), so that a hostile
# payload gets the same answer.
AMOUNT_MAX = 1_000_000  # tokens
KEY_LEN_MAX = 64  # characters
TEXT_LEN_MAX = 255  # characters
ROOM_LEN_MAX = 64  # characters (a room id is its owner's user id)
# asyncpg's own default pool size: what an application gets without tuning.
PG_POOL_MAX = 10  # connections
# A tip whose transaction cannot get a connection or finish in this long is
# answered UNAVAILABLE (rolled back: nothing moved), not left hanging.
PG_COMMAND_TIMEOUT_S = 10.0
PG_ACQUIRE_TIMEOUT_S = 10.0
SCHEMA_SUFFIX = "_sio"  # the baseline's Postgres schema: the benchmark's, suffixed

SCHEMA_SQL = """
CREATE TABLE accounts (
    user_id text PRIMARY KEY,
    balance bigint NOT NULL CHECK (balance >= 0)
);
CREATE TABLE tips (
    id bigserial PRIMARY KEY,
    sender text NOT NULL,
    key text NOT NULL,
    room text NOT NULL,
    amount bigint NOT NULL CHECK (amount > 0),
    text text NOT NULL DEFAULT '',
    created_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (sender, key)
);
"""


# ============================================================================
# The server
# ============================================================================


class _Refused(Exception):
    """A tip refused inside its transaction: rolled back, nothing moved."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def _error(code: str, message: str) -> dict[str, Any]:
    return {"type": "error", "code": code, "message": message}


def _tip_fields(data: Any) -> tuple[str, int, str, str] | str:
    """(room, amount, key, text) of a tip payload, or what is wrong with it."""
    if not isinstance(data, dict):
        return "the payload must be an object"
    room, amount, key, text = (
        data.get("room"),
        data.get("amount"),
        data.get("key"),
        data.get("text", ""),
    )
    if not isinstance(room, str) or not 1 <= len(room) <= ROOM_LEN_MAX:
        return f"room must be a string of 1-{ROOM_LEN_MAX} characters"
    if not isinstance(amount, int) or isinstance(amount, bool) or not 1 <= amount <= AMOUNT_MAX:
        return f"amount must be an integer of 1-{AMOUNT_MAX}"
    if not isinstance(key, str) or not 1 <= len(key) <= KEY_LEN_MAX:
        return f"key must be a string of 1-{KEY_LEN_MAX} characters"
    if not isinstance(text, str) or len(text) > TEXT_LEN_MAX:
        return f"text must be a string of at most {TEXT_LEN_MAX} characters"
    return room, amount, key, text


def serve(
    port: int, redis_url: str, channel: str, database_url: str, schema: str, secret: str
) -> None:
    import asyncpg
    import jwt
    import socketio
    import uvicorn

    from tokenchat.server.aio import tune_gc

    manager = socketio.AsyncRedisManager(redis_url, channel=channel)
    sio = socketio.AsyncServer(async_mode="asgi", client_manager=manager)
    users: dict[str, str] = {}  # sid -> the user its token named
    pools: list[asyncpg.Pool] = []

    async def startup() -> None:
        pools.append(
            await asyncpg.create_pool(
                database_url,
                max_size=PG_POOL_MAX,
                command_timeout=PG_COMMAND_TIMEOUT_S,
                server_settings={"search_path": schema},
            )
        )

    async def shutdown() -> None:
        for pool in pools:
            await pool.close()

    async def connect(sid: str, environ: dict[str, Any], auth: Any = None) -> None:
        if not isinstance(auth, dict) or not isinstance(auth.get("token"), str):
            raise socketio.exceptions.ConnectionRefusedError("UNAUTHENTICATED: no token")
        try:
            claims = jwt.decode(auth["token"], secret, algorithms=["HS256"])
        except jwt.InvalidTokenError as exc:
            raise socketio.exceptions.ConnectionRefusedError(f"UNAUTHENTICATED: {exc}") from None
        room = auth.get("room")
        if not isinstance(claims.get("sub"), str) or not isinstance(room, str) or not room:
            raise socketio.exceptions.ConnectionRefusedError("BAD_REQUEST: sub and room needed")
        users[sid] = claims["sub"]
        await sio.enter_room(sid, room)

    async def disconnect(sid: str, *args: Any) -> None:
        users.pop(sid, None)

    async def charge(
        conn: Any, user: str, room: str, amount: int, key: str, text: str
    ) -> tuple[int, int, bool]:
        """(tip id, the sender's balance after it, duplicate) in one transaction."""
        async with conn.transaction():
            tip_id = await conn.fetchval(
                "INSERT INTO tips (sender, key, room, amount, text) VALUES ($1, $2, $3, $4, $5)"
                " ON CONFLICT (sender, key) DO NOTHING RETURNING id",
                user, key, room, amount, text,
            )  # fmt: skip
            if tip_id is None:
                # The key was used: the same tip again is answered as it was.
                first = await conn.fetchrow(
                    "SELECT id, room, amount, text FROM tips WHERE sender = $1 AND key = $2",
                    user, key,
                )  # fmt: skip
                if (first["room"], first["amount"], first["text"]) != (room, amount, text):
                    raise _Refused("CONFLICT", "this key was used for another tip")
                balance = await conn.fetchval(
                    "SELECT balance FROM accounts WHERE user_id = $1", user
                )
                return int(first["id"]), int(balance or 0), True
            balance = await conn.fetchval(
                "UPDATE accounts SET balance = balance - $2"
                " WHERE user_id = $1 AND balance >= $2 RETURNING balance",
                user, amount,
            )  # fmt: skip
            if balance is None:
                raise _Refused("INSUFFICIENT_FUNDS", "balance too low")
            await conn.execute(
                "INSERT INTO accounts (user_id, balance) VALUES ($1, $2) ON CONFLICT (user_id)"
                " DO UPDATE SET balance = accounts.balance + EXCLUDED.balance",
                room, amount,
            )  # fmt: skip
            return int(tip_id), int(balance), False

    async def tip(sid: str, data: Any) -> dict[str, Any]:
        fields = _tip_fields(data)
        if isinstance(fields, str):
            return _error("BAD_REQUEST", fields)
        room, amount, key, text = fields
        user = users.get(sid)
        if user is None or room not in sio.rooms(sid):
            return _error("NOT_IN_ROOM", "join the room first")
        if room == user:
            return _error("FORBIDDEN", "no tipping yourself")
        try:
            async with pools[0].acquire(timeout=PG_ACQUIRE_TIMEOUT_S) as conn:
                tip_id, balance, duplicate = await charge(conn, user, room, amount, key, text)
        except _Refused as refused:
            return _error(refused.code, str(refused))
        except (asyncpg.PostgresError, OSError, TimeoutError):
            return _error("UNAVAILABLE", "the database did not answer; nothing was charged")
        offset = str(tip_id)
        if not duplicate:
            event = {"type": "tip", "room": room, "from": user, "amount": amount, "text": text,
                     "offset": offset, "ts": int(time.time() * 1000)}  # fmt: skip
            # The money moved: a failed broadcast loses the event, not the tip.
            with contextlib.suppress(Exception):
                await sio.emit("tip", event, room=room)
        reply = {"type": "ok", "balance": balance, "tx": offset, "offset": offset}
        if duplicate:
            reply["duplicate"] = True
        return reply

    sio.on("connect", connect)
    sio.on("disconnect", disconnect)
    sio.on("tip", tip)
    app = socketio.ASGIApp(sio, on_startup=startup, on_shutdown=shutdown)
    tune_gc()  # as tokenchat's processes do, so that the comparison is of servers
    uvicorn.run(app, host=HOST, port=port, loop="uvloop", log_level="warning", lifespan="on")


# ============================================================================
# Its state: a Postgres schema of its own
# ============================================================================


def peer_schema(bench: TipsBench) -> str:
    return bench.schema + SCHEMA_SUFFIX


async def create_state(database_url: str, schema: str, balances: dict[str, int]) -> None:
    """A fresh schema with the fans' balances (the room owners start at 0)."""
    import asyncpg

    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE; CREATE SCHEMA "{schema}"')
        await conn.execute(f'SET search_path TO "{schema}"; {SCHEMA_SQL}')
        await conn.copy_records_to_table(
            "accounts", records=list(balances.items()), schema_name=schema
        )
    finally:
        await conn.close()


async def check_state(database_url: str, schema: str, funded: dict[str, int]) -> dict[str, Any]:
    """What the books say after a run: tips, tokens moved, and whether they
    add up (every fan's balance = its funding - its tips; every owner's =
    the tips in its room; none negative; the total unchanged)."""
    import asyncpg

    conn = await asyncpg.connect(database_url, server_settings={"search_path": schema})
    try:
        tips = int(await conn.fetchval("SELECT count(*) FROM tips"))
        balances = {
            r["user_id"]: int(r["balance"]) for r in await conn.fetch("SELECT * FROM accounts")
        }
        spent = {
            r["sender"]: int(r["s"])
            for r in await conn.fetch("SELECT sender, sum(amount) AS s FROM tips GROUP BY sender")
        }
        earned = {
            r["room"]: int(r["s"])
            for r in await conn.fetch("SELECT room, sum(amount) AS s FROM tips GROUP BY room")
        }
    finally:
        await conn.close()
    mismatches = [
        user
        for user, balance in balances.items()
        if balance != funded.get(user, 0) - spent.get(user, 0) + earned.get(user, 0)
    ]
    return {
        "tips": tips,
        "negative": sum(1 for b in balances.values() if b < 0),
        "mismatches": mismatches[:10],
        "conserved": sum(balances.values()) == sum(funded.values()),
    }


# ============================================================================
# The fans' side: TipFan over Engine.IO
# ============================================================================


def _sio_fan_class() -> Callable[[int, Stats, str, str, str], TipFan]:
    """``SioTipFan``, made on first use: it subclasses ``loadtests.tips.TipFan``,
    and ``loadtests.tips`` imports this module only inside functions."""
    from loadtests.tips import TipFan

    class SioTipFan(TipFan):
        """A ``TipFan`` speaking Engine.IO v4 / Socket.IO v5: ``0`` open,
        ``40{auth}`` connect (refused: ``44``), ``2``/``3`` ping/pong, a tip
        ``42<id>["tip",{...}]`` acked by ``43<id>[{...}]``, events
        ``42["tip",{...}]``. The ack's object is what tokenchat would reply,
        so ``TipFan`` reads it as it reads tokenchat's."""

        path = SIO_PATH

        def __init__(
            self, port: int, conn_stats: Stats, user_id: str, room: str, token: str
        ) -> None:
            super().__init__(port, conn_stats, user_id, room)
            self._subprotocol = None
            self._auth = orjson.dumps({"token": token, "room": room})
            self.joined: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def connection_lost(self, exc: Exception | None) -> None:
            if not self.joined.done():
                self.joined.set_exception(ConnectionError("connection closed"))
            super().connection_lost(exc)

        def tip_frame(self, head: bytes, seq: int) -> bytes:
            # The tokenchat command as the event's data; the ack id is seq.
            return b'42%d["tip",%s%s-%d"}]' % (seq, head, self._nonce, seq)

        def _on_text(self, buf: bytearray, start: int, end: int, now_ns: int) -> None:
            if end - start == 1 and buf[start] == ord("2"):
                self.send_text(b"3")  # Engine.IO ping from the server
                return
            if not self.joined.done():
                if buf.startswith(b"40", start):
                    self.joined.set_result(None)
                elif buf.startswith(b"44", start):
                    self.joined.set_exception(ConnectionError(bytes(buf[start:end]).decode()))
                elif buf.startswith(b"0", start):
                    self.send_text(b"40" + self._auth)
                return
            if buf.startswith(b"43", start):
                # 43<id>[{...}]: the object between the brackets is the reply.
                bracket = buf.find(b"[", start, end)
                if bracket > 0:
                    super()._on_text(buf, bracket + 1, end - 1, now_ns)
                return
            super()._on_text(buf, start, end, now_ns)  # an event: counted

    return SioTipFan


async def open_sio_fan(spec: FanWorkerSpec, conn_stats: Stats, index: int) -> TipFan:
    """A fan connected to the socketio baseline, authenticated and in its room."""
    from loadtests.tips import fan_id, model_id
    from tokenchat.server.auth import issue_token

    user_id, room = fan_id(index), model_id(index % spec.rooms)
    token = issue_token(spec.jwt_secret, user_id, "fan")
    factory = _sio_fan_class()
    loop = asyncio.get_running_loop()
    fan: Any = None
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            _, fan = await loop.create_connection(
                lambda: factory(spec.port, conn_stats, user_id, room, token), HOST, spec.port
            )
            await fan.opened
            await fan.joined
    except BaseException:
        if fan is not None:
            fan.close()
        raise
    return cast("TipFan", fan)


def peer_fan_worker_main(spec: FanWorkerSpec, conn: Connection) -> None:
    from loadtests.tips import fan_worker_async

    run_load_process(lambda: fan_worker_async(spec, conn, open_sio_fan), conn, spec.cpus)


# ============================================================================
# A run, from the tips benchmark
# ============================================================================


def start_server(bench: TipsBench) -> Server:
    settings = bench.settings()
    port = free_port()
    argv = [
        "-m", "loadtests.tips_peer", "--serve", str(port),
        "--redis-url", settings.redis_url,
        "--channel", SIO_CHANNEL_PREFIX + bench.redis_prefix,
        "--database-url", settings.database_url,
        "--schema", peer_schema(bench),
    ]  # fmt: skip
    # The secret through the environment, not the command line (ps shows argv).
    server = bench._spawn(
        "socketio", argv, dict(bench.env, TIPS_PEER_JWT_SECRET=bench.jwt_secret), port
    )
    bench._wait_ready(server, lambda: tcp_answers(port))
    return server


def run_peer(bench: TipsBench, number: int) -> list[dict[str, Any]]:
    """One full-rate phase of the fans against the socketio baseline; its row,
    with the books checked against the acks (``row["ledger"]``)."""
    from loadtests import tips

    args = bench.args
    database_url = bench.settings().database_url
    schema = peer_schema(bench)
    funded = {tips.fan_id(i): tips.FUND_TOKENS for i in range(args.fans)}
    bench.peer_started = True  # from now on there may be a schema to drop
    asyncio.run(create_state(database_url, schema, funded))
    server = start_server(bench)
    conns: list[Connection] = []
    try:
        context = multiprocessing.get_context("spawn")
        procs = min(args.load_procs, args.fans)
        for w in range(procs):
            spec = tips.FanWorkerSpec(
                port=server.ws_port,
                fan_indexes=tuple(range(w, args.fans, procs)),
                rooms=args.rooms,
                jwt_secret=bench.jwt_secret,
                cpus=bench.loadgen_cpus,
                connect_concurrency=max(1, tips.CONNECT_CONCURRENCY_TOTAL // procs),
            )
            conns.append(bench._start_worker(context, peer_fan_worker_main, spec, f"sio-fans-{w}"))
        ready = bench._gather(conns, "ready", SETUP_TIMEOUT_S + CONNECT_TIMEOUT_S, server)
        connected = sum(int(value) for value in ready)
        if connected != args.fans:
            raise RuntimeError(f"only {connected} of {args.fans} fans connected to socketio")
        heads = tips._prepare_tip(bench, 0)
        row = bench._phase(conns, server, number, "full", 0.0, None, kind="socketio", heads=heads)
        for conn in conns:
            conn.send(("stop", None))
        bench._stop_workers()
    finally:
        bench._stop_workers()
        for conn in conns:
            conn.close()
        server.stop()
    try:
        books = asyncio.run(check_state(database_url, schema, funded))
    finally:
        asyncio.run(drop_schema(database_url, schema))
    acked = row["acked_total"] - row["duplicates"]
    row["ledger"] = {
        "reconcile_ok": not books["negative"] and not books["mismatches"] and books["conserved"],
        "reconcile": books,
        "ledger_tips": books["tips"],
        "acked_tips": acked,
    }
    return [row]


# ============================================================================
# Command line: the server process
# ============================================================================


def main(argv: Sequence[str] | None = None) -> int:
    import os

    parser = argparse.ArgumentParser(
        prog="python -m loadtests.tips_peer",
        description="Serve the socketio + asyncpg tips baseline (loadtests.tips starts it).",
    )
    parser.add_argument("--serve", type=int, metavar="PORT", required=True)
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--channel", required=True, help="its Redis pub/sub channel")
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--schema", required=True, help="made by create_state")
    args = parser.parse_args(argv)
    secret = os.environ.get("TIPS_PEER_JWT_SECRET", "")
    if not secret:
        parser.error("TIPS_PEER_JWT_SECRET must hold the JWT secret")
    raise_open_files_limit()
    serve(args.serve, args.redis_url, args.channel, args.database_url, args.schema, secret)
    return 0


if __name__ == "__main__":
    sys.exit(main())
