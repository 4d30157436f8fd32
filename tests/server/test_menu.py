"""Tip menus (issue #11, section 1): PUT /v1/me/menu and GET
/v1/users/{id}/menu over HTTP, `tip` with `item` over the WebSocket, against
the real Redis and Postgres: prices charged as they are now, refusals that
move nothing, retries, the cache after Redis loses it, and the ledger."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import pytest
from redis.asyncio import Redis

from tests.conftest import Http, Running, eventually, pg
from tests.server import test_ledger_durability as durability
from tokenchat.client_demo.client import Client
from tokenchat.protocol.limits import ITEM_ID_RE, MENU_ITEMS_MAX
from tokenchat.server.config import Settings
from tokenchat.server.keys import Keys


@pytest.fixture
async def http(server: Running) -> Http:
    return Http(server)


async def put_menu(http: Http, items: list[dict[str, Any]], model: str = "alice") -> Any:
    status, reply = await http.call("PUT", "/v1/me/menu", model, "model", items=items)
    assert status == 200, reply
    return reply["items"]


async def room_with_fan(server: Running, http: Http, tokens: int) -> tuple[Client, Client]:
    model = await server.client("alice", "model")
    await model.call("join", room="alice")
    fan = await server.client("bob")
    await fan.call("join", room="alice")
    if tokens:
        await http.credit("bob", tokens)
        assert (await fan.next_event("balance"))["balance"] == tokens
    return model, fan


def without_re(reply: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in reply.items() if k != "re"}


async def balances(http: Http, *users: str) -> list[int]:
    found = []
    for user in users:
        _, me = await http.call("GET", "/v1/me", user)
        found.append(me["balance"])
    return found


# --- the menu over HTTP ------------------------------------------------------------------


async def test_put_then_get_keeps_order_and_ids(http: Http) -> None:
    saved = await put_menu(
        http, [{"label": "Dance", "price": 50}, {"label": "Song 🎵", "price": 7}]
    )
    assert [(i["label"], i["price"]) for i in saved] == [("Dance", 50), ("Song 🎵", 7)]
    assert all(ITEM_ID_RE.fullmatch(i["id"]) for i in saved)
    status, read = await http.call("GET", "/v1/users/alice/menu")  # anyone, no token
    assert status == 200 and read == {"user": "alice", "items": saved}
    # Named ids are kept, new items get new ids, left-out items go.
    dance, song = saved
    again = await put_menu(
        http, [{"label": "New", "price": 3}, {"id": dance["id"], "label": "Dance!", "price": 60}]
    )
    assert again[1] == {"id": dance["id"], "label": "Dance!", "price": 60}
    assert again[0]["id"] not in (dance["id"], song["id"])
    _, read = await http.call("GET", "/v1/users/alice/menu")
    assert read["items"] == again
    assert await put_menu(http, []) == []
    _, read = await http.call("GET", "/v1/users/alice/menu")
    assert read["items"] == []


async def test_menus_of_users_without_one_and_of_nobody(http: Http) -> None:
    await http.call("GET", "/v1/me", "bob")  # bob exists, as a fan
    status, read = await http.call("GET", "/v1/users/bob/menu")
    assert status == 200 and read["items"] == []
    status, read = await http.call("GET", "/v1/users/nobody/menu")
    assert status == 404 and read["error"]["code"] == "NOT_FOUND"
    status, read = await http.call("GET", "/v1/users/bad%20id/menu")
    assert status == 400


BAD_BODIES: list[Any] = [
    {},
    {"items": "x"},
    {"items": [{"label": "x", "price": 1}] * (MENU_ITEMS_MAX + 1)},
    {"items": [5]},
    {"items": [{"price": 5}]},
    {"items": [{"label": "", "price": 5}]},
    {"items": [{"label": "   ", "price": 5}]},
    {"items": [{"label": "x" * 41, "price": 5}]},
    {"items": [{"label": "two\nlines", "price": 5}]},
    {"items": [{"label": "nul\x00", "price": 5}]},
    {"items": [{"label": "bidi\u202e", "price": 5}]},
    {"items": [{"label": 7, "price": 5}]},
    {"items": [{"label": "x"}]},
    {"items": [{"label": "x", "price": 0}]},
    {"items": [{"label": "x", "price": -1}]},
    {"items": [{"label": "x", "price": 1.5}]},
    {"items": [{"label": "x", "price": "5"}]},
    {"items": [{"label": "x", "price": True}]},
    {"items": [{"label": "x", "price": 1_000_001}]},
    {"items": [{"label": "x", "price": 1, "id": 5}]},
    {"items": [{"label": "x", "price": 1, "id": "has space"}]},
]


@pytest.mark.parametrize("body", BAD_BODIES)
async def test_bad_menus_are_refused_and_change_nothing(http: Http, body: Any) -> None:
    saved = await put_menu(http, [{"label": "Keep", "price": 5}])
    status, reply = await http.call("PUT", "/v1/me/menu", "alice", "model", **body)
    assert status == 400 and reply["error"]["code"] == "BAD_REQUEST", reply
    _, read = await http.call("GET", "/v1/users/alice/menu")
    assert read["items"] == saved


async def test_menu_puts_need_a_model_and_own_ids(http: Http) -> None:
    status, reply = await http.call("PUT", "/v1/me/menu", "bob", "fan", items=[])
    assert status == 403 and reply["error"]["code"] == "FORBIDDEN"
    status, reply = await http.call("PUT", "/v1/me/menu", items=[])
    assert status == 401
    (carol_item,) = await put_menu(http, [{"label": "Hers", "price": 5}], model="carol")
    mine = await put_menu(http, [{"label": "Mine", "price": 5}])
    for other in (carol_item["id"], "i_0000000000000000", "u:alice"):
        status, reply = await http.call(
            "PUT", "/v1/me/menu", "alice", "model", items=[{"id": other, "label": "x", "price": 1}]
        )
        assert status == 404 and reply["error"]["code"] == "NOT_FOUND", other
    twice = [{"id": mine[0]["id"], "label": "x", "price": 1}] * 2
    status, reply = await http.call("PUT", "/v1/me/menu", "alice", "model", items=twice)
    assert status == 400
    _, read = await http.call("GET", "/v1/users/alice/menu")
    assert read["items"] == mine
    _, read = await http.call("GET", "/v1/users/carol/menu")
    assert read["items"] == [carol_item]


async def test_a_body_over_the_limit_is_refused(http: Http) -> None:
    items = [{"label": "x" * 40, "price": 1, "pad": "y" * 400}] * MENU_ITEMS_MAX
    status, reply = await http.call("PUT", "/v1/me/menu", "alice", "model", items=items)
    assert status == 400 and "bytes" in reply["error"]["message"]


# --- tipping an item ------------------------------------------------------------------------


async def test_tip_an_item_charges_its_price_and_names_it(server: Running, http: Http) -> None:
    dance, _ = await put_menu(
        http, [{"label": "Dance", "price": 30}, {"label": "Song", "price": 5}]
    )
    model, fan = await room_with_fan(server, http, 100)
    reply = await fan.call("tip", room="alice", item=dance["id"], key="m1", text="go!")
    item = {"id": dance["id"], "label": "Dance"}
    assert reply["balance"] == 70 and reply["price"] == 30 and reply["item"] == item
    for member in (model, fan):
        event = await member.next_event("tip")
        assert event["item"] == item and event["amount"] == 30 and event["from"] == "bob"
        assert event["text"] == "go!" and event["offset"] == reply["offset"]
    assert (await model.next_event("balance"))["balance"] == 30
    # A later member sees it in the room's history, item included.
    late = await server.client("carol")
    joined = await late.call("join", room="alice")
    assert joined["history"][-1]["item"] == item
    for client in (model, fan, late):
        await client.close()


async def test_labels_reach_the_event_and_the_ledger_as_written(
    server: Running, http: Http, settings: Settings
) -> None:
    # The script decodes and re-encodes the event and the meta (cjson): any
    # printable label comes out as it went in.
    label = 'é ☃ 🎵 "q" / \\ <b>'
    (item,) = await put_menu(http, [{"label": label, "price": 2}])
    model, fan = await room_with_fan(server, http, 10)
    reply = await fan.call("tip", room="alice", item=item["id"], key="u1", text='ü "x"')
    assert reply["item"]["label"] == label
    event = await model.next_event("tip")
    assert event["item"]["label"] == label and event["text"] == 'ü "x"'

    async def committed() -> bool:
        return bool(
            await pg(settings, "SELECT 1 FROM ledger_transactions WHERE id = $1", reply["tx"])
        )

    await eventually(committed)
    (row,) = await pg(
        settings,
        "SELECT meta->'item'->>'label' AS label FROM ledger_transactions WHERE id = $1",
        reply["tx"],
    )
    assert row["label"] == label
    await model.close()
    await fan.close()


async def test_the_price_charged_is_the_current_one(server: Running, http: Http) -> None:
    (item,) = await put_menu(http, [{"label": "Dance", "price": 10}])
    model, fan = await room_with_fan(server, http, 100)
    await put_menu(http, [{"id": item["id"], "label": "Dance", "price": 12}])
    # The fan's page showed 10: with max_price 10 nothing moves.
    refused = await fan.request("tip", room="alice", item=item["id"], key="p1", max_price=10)
    assert refused["code"] == "PRICE_CHANGED" and "now 12 tokens" in refused["message"]
    assert await balances(http, "bob", "alice") == [100, 0]
    # The key was not burnt; without max_price (or with 12) it pays 12.
    reply = await fan.call("tip", room="alice", item=item["id"], key="p1", max_price=12)
    assert reply["price"] == 12 and reply["balance"] == 88
    # A lower price is charged as it is, max_price being a ceiling.
    await put_menu(http, [{"id": item["id"], "label": "Dance", "price": 4}])
    reply = await fan.call("tip", room="alice", item=item["id"], key="p2", max_price=12)
    assert reply["price"] == 4 and reply["balance"] == 84
    await model.close()
    await fan.close()


async def test_item_refusals_move_nothing(server: Running, http: Http) -> None:
    (item,) = await put_menu(http, [{"label": "Dance", "price": 50}])
    (carols,) = await put_menu(http, [{"label": "Hers", "price": 1}], model="carol")
    model, fan = await room_with_fan(server, http, 20)
    cases: list[tuple[dict[str, Any], str]] = [
        ({"item": item["id"]}, "INSUFFICIENT_FUNDS"),
        ({"item": "i_0000000000000000"}, "NOT_FOUND"),
        ({"item": carols["id"]}, "NOT_FOUND"),  # another model's item
        ({"item": "u:bob"}, "NOT_FOUND"),  # an id of another kind
        ({"item": "0123456789abcdef0123456789abcdef"}, "NOT_FOUND"),  # a tx id
        ({"item": item["id"], "amount": 5}, "BAD_REQUEST"),
        ({"amount": 5, "max_price": 5}, "BAD_REQUEST"),
        ({}, "BAD_REQUEST"),
        ({"item": "a b"}, "BAD_REQUEST"),
        ({"item": "x" * 65}, "BAD_REQUEST"),
        ({"item": 5}, "BAD_REQUEST"),
        ({"item": item["id"], "max_price": -1}, "BAD_REQUEST"),
        ({"item": item["id"], "max_price": "50"}, "BAD_REQUEST"),
    ]
    for fields, code in cases:
        reply = await fan.request("tip", room="alice", key="k", **fields)
        assert reply["code"] == code, (fields, reply)
    # Not in the room, or the room's own model: refused before any money.
    outsider = await server.client("dave")
    reply = await outsider.request("tip", room="alice", item=item["id"], key="k")
    assert reply["code"] == "NOT_IN_ROOM"
    reply = await model.request("tip", room="alice", item=item["id"], key="k")
    assert reply["code"] == "FORBIDDEN"
    assert await balances(http, "bob", "alice") == [20, 0]
    # A removed item is gone for tips too.
    await put_menu(http, [])
    await http.credit("bob", 100)
    reply = await fan.request("tip", room="alice", item=item["id"], key="k")
    assert reply["code"] == "NOT_FOUND"
    assert await balances(http, "bob", "alice") == [120, 0]
    for client in (model, fan, outsider):
        await client.close()


async def test_a_retry_is_a_duplicate_and_other_fields_conflict(
    server: Running, http: Http
) -> None:
    dance, song = await put_menu(
        http, [{"label": "Dance", "price": 10}, {"label": "Song", "price": 5}]
    )
    model, fan = await room_with_fan(server, http, 100)
    first = await fan.call("tip", room="alice", item=dance["id"], key="r1", max_price=10)
    # The model raises the price, then removes the item: the retry still
    # answers its first reply, and charges nothing.
    await put_menu(http, [{"id": dance["id"], "label": "Dance", "price": 99}])
    again = await fan.call("tip", room="alice", item=dance["id"], key="r1", max_price=10)
    assert without_re(again) == {**without_re(first), "duplicate": True}
    await put_menu(http, [])
    again = await fan.call("tip", room="alice", item=dance["id"], key="r1", max_price=10)
    assert without_re(again) == {**without_re(first), "duplicate": True}
    for fields in (
        {"item": song["id"]},
        {"item": dance["id"]},  # no max_price this time
        {"item": dance["id"], "max_price": 10, "text": "other"},
        {"amount": 10},  # a plain tip with a menu tip's key
    ):
        reply = await fan.request("tip", room="alice", key="r1", **fields)
        assert reply["code"] == "CONFLICT", fields
    assert await balances(http, "bob", "alice") == [90, 10]
    await model.close()
    await fan.close()


async def test_the_menu_comes_back_from_postgres_after_redis_loses_it(
    server: Running, http: Http, settings: Settings, redis: Redis
) -> None:
    dance, _ = await put_menu(
        http, [{"label": "Dance", "price": 10}, {"label": "Song", "price": 5}]
    )
    model, fan = await room_with_fan(server, http, 100)
    await fan.call("tip", room="alice", item=dance["id"], key="f1")
    # Redis forgets everything of this test (a FLUSH, for this test's keys).
    await server.node.ledger.drain(10.0)
    keys = [k async for k in redis.scan_iter(match=f"{settings.redis_prefix}*")]
    await redis.delete(*keys)
    assert not await redis.exists(Keys(settings.redis_prefix).menu("alice"))
    reply = await fan.call("tip", room="alice", item=dance["id"], key="f2", max_price=10)
    assert reply["price"] == 10 and reply["balance"] == 80
    assert reply["item"] == {"id": dance["id"], "label": "Dance"}
    _, read = await http.call("GET", "/v1/users/alice/menu")
    assert [i["label"] for i in read["items"]] == ["Dance", "Song"]
    # And a retry of the tip before the loss is still a duplicate.
    again = await fan.call("tip", room="alice", item=dance["id"], key="f1")
    assert again["duplicate"] is True and again["balance"] == 90
    assert await balances(http, "bob", "alice") == [80, 20]
    await model.close()
    await fan.close()


async def test_an_older_save_never_overwrites_a_newer_cache(
    server: Running, http: Http, settings: Settings, redis: Redis
) -> None:
    await put_menu(http, [{"label": "One", "price": 1}])
    await put_menu(http, [{"label": "Two", "price": 2}])
    key = Keys(settings.redis_prefix).menu("alice")
    assert await redis.hget(key, "v") == b"2"
    economy = server.node.economy
    old = [{"id": "i_1", "label": "Old", "price": 9}]
    # A save whose cache write comes late (version 1) is kept out.
    assert await economy._write_menu("replace", "alice", 1, old) == "KEPT"
    # A load that read Postgres before the save is kept out too.
    epoch = await economy.epoch()
    assert await economy._write_menu("load", "alice", 0, [], epoch) == "KEPT"
    _, read = await http.call("GET", "/v1/users/alice/menu")
    assert [i["label"] for i in read["items"]] == ["Two"]
    # A load that read Postgres before Redis lost its data (and the save it
    # held) writes nothing: its epoch is gone.
    await redis.delete(key, Keys(settings.redis_prefix).epoch())
    assert await economy._write_menu("load", "alice", 1, old, epoch) == "EPOCH"
    assert not await redis.exists(key)
    _, read = await http.call("GET", "/v1/users/alice/menu")
    assert [i["label"] for i in read["items"]] == ["Two"]


async def test_ledger_rows_name_the_item_and_reconcile(
    server: Running, http: Http, settings: Settings
) -> None:
    (item,) = await put_menu(http, [{"label": "Dance", "price": 25}])
    model, fan = await room_with_fan(server, http, 100)
    reply = await fan.call("tip", room="alice", item=item["id"], key="l1")
    await put_menu(http, [])  # the item goes; the ledger still names it

    async def committed() -> bool:
        return bool(
            await pg(settings, "SELECT 1 FROM ledger_transactions WHERE id = $1", reply["tx"])
        )

    await eventually(committed)
    (row,) = await pg(
        settings,
        "SELECT kind, meta::text AS meta FROM ledger_transactions WHERE id = $1",
        reply["tx"],
    )
    assert row["kind"] == "tip"
    assert orjson.loads(row["meta"]) == {
        "room": "alice",
        "item": {"id": item["id"], "label": "Dance"},
    }
    postings = await pg(
        settings, "SELECT account_id, amount FROM ledger_postings WHERE tx_id = $1", reply["tx"]
    )
    assert {(p["account_id"], p["amount"]) for p in postings} == {("u:bob", -25), ("u:alice", 25)}
    assert (await http.reconcile())["ok"] is True
    # A menu tip is a tip: an admin may refund it.
    status, refund = await http.call(
        "POST", "/v1/admin/refunds", "ops", "admin", tx=reply["tx"], key="rf1"
    )
    assert status == 200 and refund["balance"] == 100
    await model.close()
    await fan.close()


async def test_a_redis_older_than_the_ledger_forgets_its_menus_too(
    start_server: Callable[..., Awaitable[Running]], private_redis: str
) -> None:
    running = await durability.start(start_server, redis_url=private_redis)
    node = running.node
    keys = Keys(node.settings.redis_prefix)
    http = Http(running)
    fan = await durability.room_with_fan(running, http, "bob", 100)
    (old,) = await put_menu(http, [{"label": "Old", "price": 1}])
    async with durability.writer_running(node):
        await fan.call("tip", room="alice", item=old["id"], key="i1")
    (new,) = await put_menu(http, [{"label": "New", "price": 5}])
    # Redis goes back in time (see test_ledger_durability): its outbox behind
    # the ledger, its scripts forgotten, and the menu it held then.
    redis: Redis = node.redis
    await redis.delete(keys.menu("alice"))
    epoch = await node.economy.epoch()
    assert await node.economy._write_menu("load", "alice", 1, [old], epoch) == "OK"
    await durability.rewind_outbox(redis, keys)
    await redis.script_flush()
    async with durability.writer_running(node):
        gone = await fan.request("tip", room="alice", item=old["id"], key="i2")
        assert gone["code"] == "NOT_FOUND", gone
        reply = await fan.call("tip", room="alice", item=new["id"], key="i3")
    assert reply["price"] == 5 and reply["item"]["label"] == "New"
    assert (await http.reconcile())["ok"] is True


async def test_item_tips_over_msgpack_and_with_no_menu(server: Running, http: Http) -> None:
    model = await server.client("alice", "model")
    await model.call("join", room="alice")
    fan = await server.client("bob", subprotocol="tokenchat.v1.msgpack")
    await fan.call("join", room="alice")
    await http.credit("bob", 10)
    # alice never saved a menu: every item is NOT_FOUND, and nothing moves.
    reply = await fan.request("tip", room="alice", item="i_0123456789abcdef", key="n1")
    assert reply["code"] == "NOT_FOUND" and "menu" in reply["message"]
    (item,) = await put_menu(http, [{"label": "Wave 👋", "price": 3}])
    reply = await fan.call("tip", room="alice", item=item["id"], key="n1", max_price=3)
    assert reply["item"] == {"id": item["id"], "label": "Wave 👋"} and reply["balance"] == 7
    event = await fan.next_event("tip")
    assert event["item"]["label"] == "Wave 👋" and event["amount"] == 3
    assert await balances(http, "bob", "alice") == [7, 3]
    await model.close()
    await fan.close()
