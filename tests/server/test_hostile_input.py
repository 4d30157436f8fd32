"""Property test (issue #9): whatever values the codecs let through, sent
through tip and dm (WebSocket, both subprotocols) and credit and refund
(HTTP), every command gets a reply that is not a server failure, and
afterwards the books close: reconcile is ok, nothing pending, nothing parked.

Hypothesis runs in a worker thread and hands each example to the test's event
loop, where the server and its clients live.
"""

from __future__ import annotations

import asyncio
import json
import operator
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import Http, Running, token
from tokenchat.client_demo.client import Client

pytestmark = pytest.mark.timeout(180)

# A few hundred examples in all, and a deadline on the whole run, so the
# suite stays fast; each example is one command against the real server.
EXAMPLES_MAX = 300
RUN_DEADLINE_S = 60.0
REPLY_TIMEOUT_S = 10.0
# Codes a hostile command may be answered with; never INTERNAL or UNAVAILABLE.
REFUSALS = {
    "BAD_REQUEST",
    "NOT_FOUND",
    "NOT_IN_ROOM",
    "FORBIDDEN",
    "INSUFFICIENT_FUNDS",
    "PRICE_CHANGED",
    "CONFLICT",
}

# Strings a codec lets through, and the ones it should not: NUL, control
# characters, DEL, line separators, a BOM, astral characters, what looks like
# an escape, lone surrogates (JSON writes them as \ud800 escapes, msgpack as
# their 3-byte "UTF-8"; both codecs must refuse them).
NASTY = ["\x00", "k\x00x", "\x01\x1f", "\x7f", "\u2028", "\ufeff", "\U0001f600", "\\u0000"]
SURROGATES = ["\ud800", "a\udfffb"]
texts = (
    st.text(max_size=20)
    | st.sampled_from(NASTY + SURROGATES)
    | st.builds(operator.add, st.text(max_size=8), st.sampled_from(NASTY + SURROGATES))
)
numbers = (
    st.integers(min_value=-(2**70), max_value=2**70)
    | st.sampled_from([0, 1, -1, 10**6, 10**6 + 1, 2**63, 2**64 - 1])
    | st.floats()
    | st.booleans()
)
values = st.recursive(
    st.none() | numbers | texts,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=8,
)
# Printable ASCII keys: short ones repeat (duplicates and conflicts), UUIDs
# seldom do (so that spends go through).
keys = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=8) | (
    st.uuids().map(str)
)
# A valid key with a poison in it, as often as a valid one.
hostile_keys = st.sampled_from(
    (keys, st.builds(operator.add, keys, st.sampled_from(NASTY + SURROGATES)))
).flatmap(lambda chosen: chosen)


@dataclass(frozen=True)
class KnownTx:
    """A transaction acknowledged earlier in the run (picked when sent)."""

    index: int


def maybe(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly a valid value (three times in four), else anything. (Not
    ``one_of``: it flattens the many branches of ``values`` and would pick
    ``valid`` seldom.)"""
    return st.sampled_from((valid, valid, valid, values)).flatmap(lambda chosen: chosen)


# Fields are mostly valid so that many commands move money; `values` holds
# None, which the server reads as a missing field.
tip = st.fixed_dictionaries(
    {
        "room": maybe(st.just("alice")),
        "amount": maybe(st.integers(1, 3)),
        "key": maybe(hostile_keys),
    },
    optional={"text": texts | values},
)
dm = st.fixed_dictionaries(
    {"to": maybe(st.just("alice")), "text": texts | values, "key": maybe(hostile_keys)},
    optional={"max_price": maybe(st.integers(0, 2))},
)
credit = st.fixed_dictionaries(
    {
        "user": maybe(st.sampled_from(["bob", "carol"])),
        "amount": maybe(st.integers(1, 5)),
        "key": maybe(hostile_keys),
    },
)
refund = st.fixed_dictionaries(
    {"tx": maybe(st.builds(KnownTx, st.integers(0, 1000))), "key": maybe(hostile_keys)},
)
commands = (
    st.tuples(st.just("tip"), st.sampled_from(["json", "msgpack"]), tip)
    | st.tuples(st.just("dm"), st.sampled_from(["json", "msgpack"]), dm)
    | st.tuples(st.just("credit"), st.just("http"), credit)
    | st.tuples(st.just("refund"), st.just("http"), refund)
)


def json_frame(obj: dict[str, Any]) -> str:
    # The standard library writes what orjson will not: integers past 64
    # bits, NaN, and lone surrogates (as \ud800 escapes).
    return json.dumps(obj, ensure_ascii=True)


def msgpack_frame(obj: dict[str, Any]) -> bytes | None:
    """msgpack of obj, lone surrogates as their 3 bytes; None past 64 bits."""
    try:
        packed: bytes = msgpack.packb(obj, use_bin_type=True, unicode_errors="surrogatepass")
    except (OverflowError, ValueError):
        return None
    return packed


_T = TypeVar("_T")


class Run:
    """The server side of the run: clients, acknowledged transactions."""

    def __init__(self, running: Running, clients: dict[str, Client]) -> None:
        self.running = running
        self.clients = clients
        self.txs: list[str] = []
        self.next_id = 1
        self.accepted: Counter[str] = Counter()  # commands answered ok, by type

    def resolve(self, fields: dict[str, Any]) -> dict[str, Any]:
        tx = fields.get("tx")
        if isinstance(tx, KnownTx):
            fields = {**fields, "tx": self.txs[tx.index % len(self.txs)] if self.txs else "none"}
        return fields

    async def ws(self, command: str, codec: str, fields: dict[str, Any]) -> None:
        client = self.clients[codec]
        command_id = self.next_id
        self.next_id += 1
        frame_obj = {**fields, "type": command, "id": command_id}
        frame = json_frame(frame_obj) if codec == "json" else msgpack_frame(frame_obj)
        if frame is None:  # msgpack cannot write it: the JSON door takes it instead
            client, frame = self.clients["json"], json_frame(frame_obj)
        await client.send_raw(frame)
        reply = await self._reply(client, command_id)
        if reply["type"] == "ok":
            self.accepted[command] += 1
            self.txs.append(reply["tx"])
        else:
            assert reply["code"] in REFUSALS, (fields, reply)

    async def _reply(self, client: Client, command_id: int) -> dict[str, Any]:
        async with asyncio.timeout(REPLY_TIMEOUT_S):
            while True:
                event = await client.events.get()
                if event["type"] in ("ok", "error") and event.get("re") in (command_id, None):
                    return event

    async def http(self, command: str, fields: dict[str, Any]) -> None:
        path = "/v1/admin/credits" if command == "credit" else "/v1/admin/refunds"
        headers = {
            "Authorization": f"Bearer {token('ops', 'admin')}",
            "Content-Type": "application/json",
        }
        async with httpx.AsyncClient(base_url=self.running.http_url, timeout=30) as http:
            response = await http.post(path, content=json_frame(fields), headers=headers)
        reply = response.json()
        if response.status_code == 200:
            self.accepted[command] += 1
            if command == "refund" and not reply.get("duplicate"):
                self.txs.remove(fields["tx"])  # refunded: do not pick it again
            return
        assert response.status_code < 500, (fields, reply)
        assert reply["error"]["code"] in REFUSALS, (fields, reply)


def on_loop(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, _T]) -> _T:
    return asyncio.run_coroutine_threadsafe(coro, loop).result(REPLY_TIMEOUT_S * 4)


async def test_hostile_values_never_break_the_books(
    start_server: Callable[..., Awaitable[Running]],
) -> None:
    # Rate limits off: this is one client sending hundreds of commands at once.
    running = await start_server(commands_per_s=100_000.0, commands_burst=100_000)
    http = Http(running)
    host = await running.client("alice", "model")
    await host.call("join", room="alice")
    status, _ = await http.call("PUT", "/v1/me/prices", "alice", "model", dm=1)
    assert status == 200
    await http.credit("bob", 1_000_000, key="seed")
    clients = {}
    for codec in ("json", "msgpack"):
        clients[codec] = await running.client("bob", subprotocol=f"tokenchat.v1.{codec}")
        await clients[codec].call("join", room="alice")
    run = Run(running, clients)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + RUN_DEADLINE_S

    @settings(
        max_examples=EXAMPLES_MAX,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(commands)
    def send(example: tuple[str, str, dict[str, Any]]) -> None:
        if loop.time() > deadline:
            return  # the run's time is up: the remaining examples pass unsent
        command, door, fields = example
        if door == "http":
            on_loop(loop, run.http(command, run.resolve(fields)))
        else:
            on_loop(loop, run.ws(command, door, fields))

    await asyncio.to_thread(send)
    # The run moved money through every door, or it proved little.
    assert all(run.accepted[command] > 0 for command in ("tip", "dm", "credit", "refund")), (
        run.accepted
    )

    for client in clients.values():
        assert not client.closed, "a malformed frame never closes the session"
        await client.close()
    await host.close()
    result = await http.reconcile()
    assert result["ok"] is True, result
    assert result["pending"] == 0 and result["rejected"] == 0, result
    assert result["mismatches"] == [], result
