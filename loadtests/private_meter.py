"""The private-show meter's drift across a restart of its gateway process.

    python -m loadtests.private_meter [--duration 300] [--kill-at 150] [--tick 1]

Runs one real private show for ``--duration`` seconds and measures seconds
charged against wall-clock seconds, with the process that meters the show
killed (SIGKILL) and started again at ``--kill-at``:

- ``tokenchat migrate``, then two ``tokenchat serve`` processes on
  127.0.0.1 with their own Redis prefix, Postgres schema and JWT secret
  (``loadtests.harness.processes.Bench``): the *front*, which the fan and
  the model connect to and which never meters (its meter pass runs once an
  hour), and the *meter*, the only process billing shows. Billing periods
  are ``--tick`` seconds, the meter looks every 0.2 s, its lease on the show
  lives ``--lease`` seconds.
- The model sets 60 tokens a minute (1 token a second, so tokens charged
  are seconds charged) and no minimum; the fan, credited enough, requests
  a show; the model accepts.
- Every ``--sample`` seconds it reads from Postgres the show's billed
  seconds (periods charged x tick) and the wall-clock seconds since the
  show started (Postgres's clock, as the meter's), and prints both and the
  drift (wall - billed). At ``--kill-at`` the meter process is killed and a
  new one started at once; the new one takes the show over when the dead
  one's lease expires and charges every period missed.
- At the end the fan ends the show: its final charge is exact to the second,
  and the script prints the end's billed seconds, the wall-clock seconds,
  the tokens charged, and the number of meter transactions and of distinct
  meter keys in the ledger (equal: no period charged twice).

Bounded: every wait has a timeout, the load is two WebSocket clients, and
everything it made (servers, keys, schema) is removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time
import urllib.request
from typing import Any

import asyncpg
import orjson

from loadtests.harness.client import HOST
from loadtests.harness.processes import Bench, Server
from tokenchat.client_demo.client import Client
from tokenchat.server.auth import issue_token

RATE = 60  # tokens a minute: one token a second, so tokens are seconds
CREDIT = 100_000  # tokens: far more than any show here costs
CALL_TIMEOUT_S = 30.0  # one command or HTTP request


def http(method: str, url: str, token: str, body: dict[str, Any] | None = None) -> Any:
    request = urllib.request.Request(
        url,
        method=method,
        data=None if body is None else orjson.dumps(body),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=CALL_TIMEOUT_S) as response:
        return orjson.loads(response.read())


async def sample(conn: asyncpg.Connection, show: str, tick_s: int) -> tuple[float, int, int]:
    """(wall-clock seconds since the start, billed seconds, tokens charged)."""
    row = await conn.fetchrow(
        """SELECT extract(epoch FROM clock_timestamp() - started_at)::float8 AS wall,
                  ticks, charged FROM private_shows WHERE id = $1""",
        show,
    )
    assert row is not None
    return float(row["wall"]), int(row["ticks"]) * tick_s, int(row["charged"])


async def run(args: argparse.Namespace, bench: Bench) -> None:
    common = {
        "TOKENCHAT_PRIVATE_TICK_S": str(args.tick),
        "TOKENCHAT_PRIVATE_LEASE_TTL_S": str(args.lease),
        "TOKENCHAT_PRIVATE_SETTLE_GRACE_S": "2",
        "TOKENCHAT_DEADLINE_SWEEP_INTERVAL_S": "0.5",
    }
    front, front_http = bench.start_serve(**common, TOKENCHAT_PRIVATE_METER_INTERVAL_S="3600")
    meter_env = {**common, "TOKENCHAT_PRIVATE_METER_INTERVAL_S": "0.2"}
    meter, _ = bench.start_serve(**meter_env)
    secret = bench.jwt_secret
    base = f"http://{HOST}:{front_http}"
    ws_url = f"ws://{HOST}:{front.ws_port}/ws"
    model = await Client.connect(ws_url)
    await model.hello(issue_token(secret, "m_private", "model", 3600))
    fan = await Client.connect(ws_url)
    await fan.hello(issue_token(secret, "f_private", "fan", 3600))
    http("PUT", f"{base}/v1/me/prices", issue_token(secret, "m_private", "model", 600),
         {"private_rate": RATE, "private_min_s": 0})  # fmt: skip
    http("POST", f"{base}/v1/admin/credits", issue_token(secret, "ops", "admin", 600),
         {"user": "f_private", "amount": CREDIT, "key": "credit-1"})  # fmt: skip
    show = (await fan.call("private_request", model="m_private", rate=RATE, key="k1"))["show"]
    accepted = await model.call("private_accept", show=show)
    assert accepted["state"] == "running", accepted
    settings = bench.settings()
    conn = await asyncpg.connect(settings.database_url)
    await conn.execute(f'SET search_path TO "{bench.schema}"')
    print(f"show {show}: {RATE} tokens/min, billing period {args.tick} s, lease {args.lease} s")
    print(f"{'wall_s':>8} {'billed_s':>9} {'charged':>8} {'drift_s':>8}  event")
    began = time.monotonic()
    killed = False
    worst_drift = 0.0
    while True:
        elapsed = time.monotonic() - began
        if elapsed >= args.duration:
            break
        event = ""
        if not killed and elapsed >= args.kill_at:
            meter.process.kill()
            meter.process.wait(timeout=10)
            meter, _ = bench.start_serve(**meter_env)
            killed = True
            took = time.monotonic() - began - elapsed
            event = f"meter killed (SIGKILL) and restarted in {took:.1f} s"
        wall, billed, charged = await sample(conn, show, args.tick)
        drift = wall - billed
        worst_drift = max(worst_drift, drift)
        print(f"{wall:8.1f} {billed:9d} {charged:8d} {drift:8.1f}  {event}", flush=True)
        await asyncio.sleep(min(args.sample, max(0.0, args.duration - elapsed)))
    wall, billed, _ = await sample(conn, show, args.tick)
    ended = await fan.call("private_end", show=show)
    txs = await conn.fetch(
        """SELECT idem_key FROM ledger_transactions WHERE kind = 'meter'
           AND meta->>'show' = $1""",
        show,
    )
    # The ledger writer may still be behind by a batch: wait for it briefly.
    for _ in range(50):
        if len(txs) >= billed // args.tick:
            break
        await asyncio.sleep(0.1)
        txs = await conn.fetch(
            "SELECT idem_key FROM ledger_transactions WHERE kind = 'meter' AND meta->>'show' = $1",
            show,
        )
    keys = [row["idem_key"] for row in txs]
    print(
        f"end: wall {wall:.1f} s, billed {ended['seconds']} s, charged {ended['charged']} tokens "
        f"(floor({RATE} x {ended['seconds']} / 60) = {RATE * ended['seconds'] // 60}); "
        f"worst drift while running {worst_drift:.1f} s; meter transactions {len(keys)}, "
        f"distinct keys {len(set(keys))}"
    )
    await conn.close()
    await fan.close()
    await model.close()
    for server in (front, meter):
        stop(server)


def stop(server: Server) -> None:
    if server.process.poll() is None:
        server.process.terminate()
        try:
            server.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.process.kill()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=300.0, help="show length, s")
    parser.add_argument("--kill-at", type=float, default=150.0, help="kill the meter at, s")
    parser.add_argument("--tick", type=int, default=1, help="billing period, whole s")
    parser.add_argument("--lease", type=float, default=3.0, help="meter lease TTL, s")
    parser.add_argument("--sample", type=float, default=10.0, help="sampling interval, s")
    args = parser.parse_args()
    bench = Bench(argparse.Namespace(workers=1, pin=False), "private-meter")
    with bench.closed_after():
        asyncio.run(asyncio.wait_for(run(args, bench), timeout=args.duration + 180))
    return 0


if __name__ == "__main__":
    sys.exit(main())
