from __future__ import annotations

from tests.conftest import Running


async def test_hello_join_say(server: Running) -> None:
    model = await server.client("alice", "model")
    fan = await server.client("bob")
    joined = await fan.call("join", room="alice")
    assert joined["room"]["id"] == "alice"
    await model.call("join", room="alice")
    reply = await fan.call("say", room="alice", text="hi")
    event = await model.next_event("message")
    assert event["text"] == "hi" and event["offset"] == reply["offset"]
    await fan.close()
    await model.close()
