"""Tip menus through the clients: the Python library (``get_menu``,
``put_menu``, ``Session.tip_item``) and the terminal client (``/menu``,
``/item``), against a running server."""

from __future__ import annotations

import pytest

from tests.client_demo.test_cli import Chat
from tests.conftest import Http, Running, token
from tokenchat.client_demo.cli import format_event
from tokenchat.client_demo.client import CommandError, HttpError, Session, get_menu, put_menu


async def test_the_library_reads_menus_and_tips_items(server: Running) -> None:
    http = Http(server)
    saved = await put_menu(
        server.http_url, token("alice", "model"), [{"label": "Dance", "price": 7}]
    )
    assert await get_menu(server.http_url, "alice") == saved
    with pytest.raises(HttpError) as refused:
        await put_menu(server.http_url, token("bob"), [])
    assert refused.value.code == "FORBIDDEN" and refused.value.status == 403
    with pytest.raises(HttpError) as unknown:
        await get_menu(server.http_url, "nobody")
    assert unknown.value.code == "NOT_FOUND"
    await http.credit("bob", 20)
    session = await Session.connect(server.ws_url, token("bob"))
    try:
        await session.join("alice")
        (item,) = saved
        reply = await session.tip_item("alice", item["id"], "yay", max_price=7)
        assert reply["price"] == 7 and reply["balance"] == 13
        event = await session.next_event("tip")
        assert event["item"] == {"id": item["id"], "label": "Dance"} and event["amount"] == 7
        await put_menu(
            server.http_url,
            token("alice", "model"),
            [{"id": item["id"], "label": "Dance", "price": 8}],
        )
        with pytest.raises(CommandError) as changed:
            await session.tip_item("alice", item["id"], max_price=7)
        assert changed.value.code == "PRICE_CHANGED"
    finally:
        await session.close()


async def test_the_terminal_client_lists_a_menu_and_tips_an_item(server: Running) -> None:
    http = Http(server)
    model_token = token("alice", "model")
    await put_menu(
        server.http_url,
        model_token,
        [{"label": "Dance", "price": 10}, {"label": "Song", "price": 4}],
    )
    model = await server.client("alice", "model")
    await model.call("join", room="alice")
    await http.credit("bob", 100)
    chat = await Chat.signed_in(server, "bob", room="alice")
    try:
        await chat.expect("* joined alice")
        await chat.send("/menu")
        await chat.expect("  1. Dance: 10 tokens", "  2. Song: 4 tokens")
        await chat.send("/item 2 for you")
        await chat.expect(
            "* tipped 4 for Song in alice; balance 96", "[alice] bob tipped 4 for Song: for you"
        )
        event = await model.next_event("tip")
        assert event["item"]["label"] == "Song" and event["amount"] == 4
        # The model raises a price after bob's client showed it: refused, and
        # the next /item shows the menu again before tipping.
        items = await get_menu(server.http_url, "alice")
        await put_menu(server.http_url, model_token, [{**items[0], "price": 12}, items[1]])
        await chat.send("/item 1")
        await chat.expect("error PRICE_CHANGED: the price is now 12 tokens")
        await chat.send("/item 1")
        await chat.expect("  1. Dance: 12 tokens", "* tipped 12 for Dance in alice; balance 84")
        await chat.send("/item 9")
        await chat.expect("error: no item 9 on alice's menu")
        await chat.send("/item x")
        await chat.expect("usage: /item N [TEXT]")
        await chat.send("/menu nobody")
        await chat.expect("error NOT_FOUND:")
        await chat.send("/quit")
        assert await chat.exit_code() == 0
    finally:
        await chat.kill()
        await model.close()
    assert (await http.call("GET", "/v1/me", "bob"))[1]["balance"] == 84


def test_a_menu_tip_line_names_the_item() -> None:
    event = {
        "type": "tip",
        "room": "a",
        "from": "b",
        "amount": 5,
        "text": "",
        "item": {"id": "i_1", "label": "Dance"},
    }
    assert format_event(event) == "[a] b tipped 5 for Dance"
