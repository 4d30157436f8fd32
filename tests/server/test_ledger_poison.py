"""Poisoned input against the ledger (issue #9): what Postgres cannot store is
refused at the door, and an outbox entry Postgres refuses anyway is parked
(escaped, in ``ledger_rejected``) while the rest of its batch is written.

The poisoned entries are XADDed straight into the outbox, as a money script
with a hole in its checks would write them, between good entries of the same
batch.
"""

from __future__ import annotations

import codecs
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import orjson
import pytest
from redis.asyncio import Redis

from tests.conftest import Http, Running, pg
from tokenchat.server.gateway.node import Node
from tokenchat.server.ledger.writer import LedgerWriter, escape_text

pytestmark = pytest.mark.timeout(60)

DRAIN_TIMEOUT_S = 10.0


def tip_fields(**changes: str) -> dict[str, str]:
    """A tip entry as tip.lua writes it (bob tips alice 1), with changes."""
    tx = uuid.uuid4().hex
    fields = {
        "tx": tx,
        "kind": "tip",
        "initiator": "bob",
        "key": f"k-{tx}",
        "request": '["tip",{"amount":1,"room":"alice","text":""}]',
        "reply": orjson.dumps({"balance": 0, "tx": tx, "offset": "1-0"}).decode(),
        "postings": "u:bob -1 u:alice 1",
        "meta": '{"room":"alice"}',
    }
    return {**fields, **changes}


# Each poison, and what Postgres (or the reader) refuses in it.
POISONS: dict[str, dict[str, str]] = {
    "NUL in the key (text)": {"key": "k\x00x"},
    "NUL in the initiator (text)": {"initiator": "b\x00b"},
    "the escape \\u0000 in meta (jsonb)": {"meta": '{"room":"\\u0000"}'},
    "a NUL byte in reply (jsonb)": {"reply": '{"tx":"\x00"}'},
    "a kind the ledger does not know (CHECK)": {"kind": "gift"},
    "a key over 200 characters (CHECK)": {"key": "k" * 201},
    "an amount beyond 64 bits": {"postings": f"u:bob -{2**64} u:alice {2**64}"},
    "postings that are not pairs (unreadable)": {"postings": "u:bob -1 u:alice"},
    "meta that is not JSON": {"meta": "{"},
}


async def xadd(redis: Redis, node: Node, fields: dict[str, str]) -> str:
    entry_id = await redis.xadd(node.keys.outbox(), fields)  # type: ignore[arg-type]
    return entry_id.decode()


async def drain_with_own_writer(node: Node, **overrides: Any) -> None:
    writer = LedgerWriter(node.settings.replace(**overrides), node.pool, node.economy, "test")
    try:
        assert await writer.drain(DRAIN_TIMEOUT_S) == 0
    finally:
        await writer.close()


async def ledger_ids(running: Running) -> set[str]:
    return {
        row["id"] for row in await pg(running.node.settings, "SELECT id FROM ledger_transactions")
    }


async def test_poisoned_entries_are_parked_and_the_rest_of_the_batch_lands(
    start_server: Callable[..., Awaitable[Running]], redis: Redis
) -> None:
    running = await start_server(ledger_enabled=0, durability="redis")  # the only writer
    node = running.node
    http = Http(running)
    host = await running.client("alice", "model")
    await host.call("join", room="alice")
    fan = await running.client("bob")
    await fan.call("join", room="alice")
    good = {(await http.credit("bob", 100))["tx"]}
    good.add((await fan.call("tip", room="alice", amount=1, key="before"))["tx"])
    poisoned: dict[str, str] = {}
    for name, changes in POISONS.items():
        poisoned[await xadd(redis, node, tip_fields(**changes))] = name
        # A good entry after each poison, in the same batch: bisection must
        # write them, in order (carol spends what she was credited just before).
        carol = f"carol{len(poisoned)}"
        good.add((await http.credit(carol, 5))["tx"])
        good.add((await fan.call("tip", room="alice", amount=1, key=f"after-{carol}"))["tx"])

    await drain_with_own_writer(node)

    assert await ledger_ids(running) == good, "every good entry landed, none of the poisoned"
    rows = await pg(node.settings, "SELECT outbox_id, reason, entry::text FROM ledger_rejected")
    assert {row["outbox_id"] for row in rows} == set(poisoned), [r["reason"] for r in rows]
    by_id = {row["outbox_id"]: orjson.loads(row["entry"]) for row in rows}
    nul_key = next(i for i, name in poisoned.items() if name.startswith("NUL in the key"))
    assert by_id[nul_key]["key"] == "k\\x00x", "stored escaped"
    assert codecs.decode(by_id[nul_key]["key"], "unicode_escape") == "k\x00x", "and reversibly"

    # Reconcile counts them (and says the books are not closed); Redis and
    # Postgres agree on every balance, as the poisons moved nothing in Redis.
    result = await http.reconcile()
    assert result["rejected"] == len(POISONS) and result["ok"] is False, result
    assert result["pending"] == 0 and result["mismatches"] == [], result

    # The endpoint lists them, newest first, bounded by ?limit=.
    status, listed = await http.call("GET", "/v1/admin/ledger/rejected", "ops", "admin")
    assert status == 200, listed
    assert listed["total"] == len(POISONS)
    assert {item["outbox_id"] for item in listed["items"]} == set(poisoned)
    item = next(item for item in listed["items"] if item["outbox_id"] == nul_key)
    assert item["entry"]["key"] == "k\\x00x" and item["tx"] == item["entry"]["tx"]
    assert "CharacterNotInRepertoire" in item["reason"] and item["recorded_at"]
    recorded = [item["recorded_at"] for item in listed["items"]]
    assert recorded == sorted(recorded, reverse=True)
    status, two = await http.call("GET", "/v1/admin/ledger/rejected?limit=2", "ops", "admin")
    assert status == 200 and len(two["items"]) == 2 and two["total"] == len(POISONS)

    # The metrics count them.
    async with httpx.AsyncClient(base_url=running.http_url) as client:
        text = (await client.get("/metrics")).text
    assert f"tokenchat_ledger_rejected_rows {float(len(POISONS))}" in text
    assert "tokenchat_ledger_rejected_total" in text

    # The writer goes on: later spends land, and a re-delivered poison is not
    # parked twice.
    later = (await fan.call("tip", room="alice", amount=1, key="later"))["tx"]
    await drain_with_own_writer(node)
    assert later in await ledger_ids(running)
    assert len(await pg(node.settings, "SELECT 1 FROM ledger_rejected")) == len(POISONS)
    await fan.close()
    await host.close()


async def test_the_running_writer_parks_a_poison_and_keeps_going(
    start_server: Callable[..., Awaitable[Running]], redis: Redis
) -> None:
    """The writer inside `serve` (its run loop, not drain) is not stalled."""
    running = await start_server(ledger_block_ms=100)
    node = running.node
    http = Http(running)
    poison = await xadd(redis, node, tip_fields(key="k\x00x"))
    credit = await http.credit("bob", 10)
    result = await http.reconcile()
    assert result["pending"] == 0 and result["rejected"] == 1, result
    assert credit["tx"] in await ledger_ids(running)
    rows = await pg(node.settings, "SELECT outbox_id FROM ledger_rejected")
    assert [row["outbox_id"] for row in rows] == [poison]


async def test_the_rejected_list_is_for_admins_and_bounded(server: Running) -> None:
    http = Http(server)
    status, reply = await http.call("GET", "/v1/admin/ledger/rejected", "bob", "fan")
    assert status == 403, reply
    for limit in ["0", "1001", "-1", "x", "1e3", "9" * 5000]:
        status, reply = await http.call(
            "GET", f"/v1/admin/ledger/rejected?limit={limit}", "ops", "admin"
        )
        assert status == 400 and reply["error"]["code"] == "BAD_REQUEST", (limit, reply)
        assert "'limit'" in reply["error"]["message"]
    status, reply = await http.call("GET", "/v1/admin/ledger/rejected", "ops", "admin")
    assert (status, reply) == (200, {"total": 0, "items": []})


@pytest.mark.parametrize(
    "text",
    ["k\x00x", "\x00", "plain", "a\\b", "tab\there", "é", "\U0001f600", "\ud800", "\x7f", ""],
)
def test_escape_text_is_printable_ascii_and_reversible(text: str) -> None:
    escaped = escape_text(text)
    assert escaped.isascii() and (escaped == "" or escaped.isprintable())
    assert codecs.decode(escaped, "unicode_escape") == text


# --- refused at the door --------------------------------------------------------------------

BAD_KEYS = ["k\x00x", "\x00", "k\n", "k\x7f", "kä", "k" * 65, ""]


@pytest.mark.parametrize("subprotocol", ["tokenchat.v1.json", "tokenchat.v1.msgpack"])
async def test_ws_keys_are_printable_ascii(
    start_server: Callable[..., Awaitable[Running]], redis: Redis, subprotocol: str
) -> None:
    running = await start_server(ledger_enabled=0, durability="redis")
    node = running.node
    http = Http(running)
    host = await running.client("alice", "model")
    await host.call("join", room="alice")
    await http.call("PUT", "/v1/me/prices", "alice", "model", dm=1)
    await http.credit("bob", 10)
    fan = await running.client("bob", subprotocol=subprotocol)
    await fan.call("join", room="alice")
    before = int(await redis.xlen(node.keys.outbox()))
    for key in BAD_KEYS:
        for command, fields in [("tip", {"room": "alice", "amount": 1}), ("dm", {"to": "alice"})]:
            reply = await fan.request(command, key=key, text="hi", **fields)
            assert reply["type"] == "error" and reply["code"] == "BAD_REQUEST", reply
            assert reply["message"].startswith("field 'key' must be 1 to 64 printable ASCII")
    assert int(await redis.xlen(node.keys.outbox())) == before, "nothing moved"
    assert (await fan.call("balance"))["balance"] == 10
    await fan.close()
    await host.close()


async def test_http_identifiers_are_printable_ascii(
    start_server: Callable[..., Awaitable[Running]], redis: Redis
) -> None:
    running = await start_server(ledger_enabled=0, durability="redis")  # the outbox shows all
    node = running.node
    http = Http(running)
    await http.credit("bob", 10)
    before = int(await redis.xlen(node.keys.outbox()))
    for key in BAD_KEYS:
        status, reply = await http.call(
            "POST", "/v1/admin/credits", "ops", "admin", user="bob", amount=1, key=key
        )
        assert status == 400 and "field 'key'" in reply["error"]["message"], reply
        status, reply = await http.call(
            "POST", "/v1/admin/refunds", "ops", "admin", tx=uuid.uuid4().hex, key=key
        )
        assert status == 400 and "field 'key'" in reply["error"]["message"], reply
        status, reply = await http.call(
            "POST", "/v1/admin/refunds", "ops", "admin", tx=key, key="r1"
        )
        assert status == 400 and "field 'tx'" in reply["error"]["message"], reply
    for ref in ["p\x00", "p\n", "pé", "p" * 129, ""]:
        status, reply = await http.call(
            "POST", "/v1/purchases", "bob", bundle="fan", payment_ref=ref
        )
        assert status == 400 and "field 'payment_ref'" in reply["error"]["message"], reply
    assert int(await redis.xlen(node.keys.outbox())) == before, "nothing moved"
    status, me = await http.call("GET", "/v1/me", "bob")
    assert me["balance"] == 10
    assert await pg(node.settings, "SELECT 1 FROM purchases") == []


async def test_other_client_text_kept_in_postgres_refuses_nul(server: Running) -> None:
    """Beyond the ledger: every text a client sends that Postgres keeps (a
    profile, a payout method, a payout's rejection reason) is refused with
    BAD_REQUEST when Postgres could not store it, not answered 503 by a
    store that refused it."""
    http = Http(server)
    await server.client("alice", "model")
    iban = "DE89370400440532013000"  # the standard example: valid check digits
    refused = [
        ("PUT", "/v1/me/profile", "alice", "model", {"display_name": "a\x00b"}, "display_name"),
        ("PUT", "/v1/me/profile", "alice", "model", {"bio": "\x00"}, "bio"),
        (
            "PUT",
            "/v1/me/payout-method",
            "alice",
            "model",
            {"type": "bank", "holder": "A\x00", "iban": iban},
            "holder",
        ),
        (
            "PUT",
            "/v1/me/payout-method",
            "alice",
            "model",
            {"type": "paypal", "email": "a\x00b@example.com"},
            "email",
        ),
        (
            "POST",
            "/v1/admin/payouts/po_000000000000000000000000/reject",
            "ops",
            "admin",
            {"reason": "no\x00docs"},
            "reason",
        ),
    ]
    for method, path, sub, role, body, field in refused:
        status, reply = await http.call(method, path, sub, role, **body)
        assert status == 400 and reply["error"]["code"] == "BAD_REQUEST", (path, body, reply)
        assert f"field '{field}'" in reply["error"]["message"], reply
    # The same fields without the NUL are taken: only the NUL was refused.
    status, reply = await http.call(
        "PUT", "/v1/me/profile", "alice", "model", display_name="a b", bio="hi\tthere"
    )
    assert status == 200, reply
    status, reply = await http.call(
        "PUT", "/v1/me/payout-method", "alice", "model", type="bank", holder="A", iban=iban
    )
    assert status == 200, reply
