"""Tip goals through the clients: the Python library (``set_goal``,
``get_goal``, ``delete_goal``, the `goal` events of a ``Session``) and the
terminal client (``/setgoal``, ``/goal``, ``/delgoal``, goal lines), against
a running server."""

from __future__ import annotations

import pytest

from tests.client_demo.test_cli import Chat
from tests.conftest import Http, Running, token
from tokenchat.client_demo.cli import format_event, parse_setgoal
from tokenchat.client_demo.client import HttpError, Session, delete_goal, get_goal, set_goal


async def test_the_library_sets_reads_and_deletes_a_goal(server: Running) -> None:
    model_token = token("alice", "model")
    await (await server.client("alice", "model")).close()  # her room exists once she says hello
    await Http(server).credit("bob", 50)
    session = await Session.connect(server.ws_url, token("bob"))
    try:
        joined = await session.join("alice")
        assert joined["room"]["goal"] is None
        assert await get_goal(server.http_url, "alice") is None
        goal = await set_goal(server.http_url, model_token, "Guitar", 30, all_or_nothing=True)
        assert (await session.next_event("goal"))["goal"]["id"] == goal["id"]
        with pytest.raises(HttpError) as busy:
            await set_goal(server.http_url, model_token, "Other", 5)
        assert busy.value.code == "CONFLICT" and busy.value.status == 409
        with pytest.raises(HttpError) as fan:
            await set_goal(server.http_url, token("bob"), "Mine", 5)
        assert fan.value.code == "FORBIDDEN"
        reply = await session.tip("alice", 12)
        assert reply["goal"]["progress"] == 12 and reply["balance"] == 38
        event = await session.next_event("goal")
        assert event["goal"]["progress"] == 12
        assert (await get_goal(server.http_url, "alice") or {})["progress"] == 12
        deleted = await delete_goal(server.http_url, model_token)
        assert deleted["goal"]["state"] == "deleted" and deleted["settled"] is True
        assert await session.get_balance() == 50  # the held tip came back
        with pytest.raises(HttpError) as unknown:
            await get_goal(server.http_url, "nobody")
        assert unknown.value.code == "NOT_FOUND"
    finally:
        await session.close()


async def test_the_terminal_client_sets_shows_and_reaches_a_goal(server: Running) -> None:
    await Http(server).credit("bob", 100)
    model = await Chat.signed_in(server, "alice", "model", room="alice")
    await model.expect("* joined alice")  # her room exists once she said hello
    fan = await Chat.signed_in(server, "bob", room="alice")
    try:
        await fan.expect("* joined alice")
        await model.send("/setgoal --aon 10 New shoes")
        await model.expect("* goal New shoes: 0/10 (active, all or nothing)")
        await fan.expect("[alice] goal New shoes: 0/10 (active, all or nothing)")
        await fan.send("/tip 4")
        await fan.expect("[alice] goal New shoes: 4/10 (active, all or nothing)")
        await fan.send("/goal")
        await fan.expect("* goal New shoes: 4/10 (active, all or nothing)")
        await fan.send("/tip 6")
        await model.expect("[alice] goal New shoes: 10/10 (reached, all or nothing)")
        await model.send("/setgoal x")
        await model.expect("usage: /setgoal")
        await model.send("/delgoal")
        await model.expect("* goal New shoes: 10/10 (deleted, all or nothing)")
        await model.send("/delgoal")
        await model.expect("error NOT_FOUND:")
        await fan.send("/goal")
        await fan.expect("* alice has no goal")
        for chat in (model, fan):
            await chat.send("/quit")
            assert await chat.exit_code() == 0
    finally:
        await model.kill()
        await fan.kill()
    # Reached: the held tips were released to the model, once.
    assert (await Http(server).call("GET", "/v1/me", "alice", "model"))[1]["balance"] == 10


def test_goal_lines_and_the_setgoal_syntax() -> None:
    goal = {"title": "Toy", "progress": 3, "target": 9, "state": "failed"}
    event = {"type": "goal", "room": "a", "goal": goal}
    assert format_event(event) == "[a] goal Toy: 3/9 (failed)"
    assert parse_setgoal("--aon --in 60 100 A big goal") == (100, "A big goal", 60, True)
    assert parse_setgoal("5 t") == (5, "t", None, False)
    for bad in ("", "5", "x t", "--in x 5 t", "--what 5 t"):
        assert parse_setgoal(bad) is None, bad
