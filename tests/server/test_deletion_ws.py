"""Account deletion on the WebSocket side (issue #13 section 4), against real
Redis, Postgres and a server process: after a fan deletes her account, no
frame a member receives names her id: not the history a `join` replays
(her chat lines, tips and `king` events are out of it), not the room's king
(her pseudonym reigns), not a DM replayed at a hello; members in the rooms
get `clear` for her. Frames are scanned raw, as the socket carries them."""

from __future__ import annotations

import time
from typing import Any

import orjson
import pytest

from tests.conftest import Http, Running, pg, token
from tests.server.test_deletion import Start, delete, drain
from tokenchat.client_demo.client import Client
from tokenchat.protocol.codec import Codec
from tokenchat.server.catalog.moderation import Moderation
from tokenchat.server.errors import Unavailable
from tokenchat.server.standing import HOUR_MS

FAN = "dora"


class Recording:
    """A codec that keeps every raw frame it decodes."""

    def __init__(self, codec: Codec) -> None:
        self._codec = codec
        self.frames: list[bytes] = []
        self.subprotocol = codec.subprotocol
        self.binary = codec.binary

    def decode(self, data: bytes | str) -> object:
        self.frames.append(data.encode() if isinstance(data, str) else bytes(data))
        return self._codec.decode(data)

    def encode(self, obj: Any) -> bytes:
        return self._codec.encode(obj)


async def recorded(server: Running, sub: str) -> tuple[Client, Recording]:
    """``sub``'s connection, every frame from its welcome on recorded."""
    client = await server.client()
    recording = Recording(client.codec)
    client.codec = recording
    await client.hello(token(sub))
    return client, recording


async def king_named(client: Client, user: str) -> dict[str, Any]:
    while True:
        event = await client.next_event("king", timeout_s=15)
        if (event["king"] or {}).get("user") == user:
            return event


async def test_a_deleted_fan_is_in_no_frame_of_a_room_join_nor_a_dm_replay(
    start_server: Start,
) -> None:
    server = await start_server()
    http = Http(server)
    alice = await server.client("alice", "model")
    carol = await server.client("carol", "model")
    fan = await server.client(FAN)
    erin = await server.client("erin")  # a member of both rooms throughout
    gus = await server.client("gus")  # exists, then goes away: DMs wait for him
    await gus.close()
    await http.credit(FAN, 100)
    await http.credit("erin", 100)
    await fan.next_event("balance")
    await alice.call("join", room="alice")
    await carol.call("join", room="carol")
    for member in (fan, erin):
        for room in ("alice", "carol"):
            await member.call("join", room=room)

    # She chats and tips in both rooms; she is king in alice's, erin in carol's.
    await fan.call("say", room="alice", text="hello alice")
    await fan.call("tip", room="alice", amount=10, key="a1", text="for you")
    await fan.call("say", room="carol", text="hello carol")
    await fan.call("tip", room="carol", amount=5, key="c1")
    await erin.call("tip", room="carol", amount=20, key="e1")
    await erin.call("say", room="alice", text="erin stays")
    await fan.call("dm", to="gus", text="psst gus", key="d1")
    await fan.call("dm", to="erin", text="psst erin", key="d2")
    await king_named(alice, FAN)
    await king_named(carol, "erin")
    assert await server.node.dm_archive.drain(10.0) == 0
    # One more DM still in the archive stream at the deletion.
    await fan.call("dm", to="gus", text="psst again", key="d3")
    joined = await (await server.client("henry")).call("join", room="alice")
    assert FAN.encode() in orjson.dumps(joined), "the history did not name her before"

    status, reply = await delete(http, FAN)
    assert status == 200, reply
    alias = reply["pseudonym"]
    await drain(server)

    # Live members are told to hide her lines, in each room she wrote in.
    clears = [await erin.next_event("clear") for _ in range(2)]
    assert {c["room"] for c in clears} == {"alice", "carol"}
    assert all(c["user"] == FAN and c["all"] is True for c in clears), clears
    # ...and alice's room hears of its king under her pseudonym.
    await king_named(alice, alias)

    # A new member joining each room: no frame names her.
    frank, frames = await recorded(server, "frank")
    replies = {room: await frank.call("join", room=room) for room in ("alice", "carol")}
    assert replies["alice"]["room"]["king"] == {"user": alias, "tokens": 10}
    assert replies["carol"]["room"]["king"]["user"] == "erin"
    texts = [e.get("text") for e in replies["alice"]["history"]]
    assert "erin stays" in texts and "hello alice" not in texts, texts
    assert frames.frames, "nothing was recorded"
    for frame in frames.frames:
        assert FAN.encode() not in frame, frame

    # gus, back: the DMs she sent him are not replayed.
    gus, gus_frames = await recorded(server, "gus")
    await gus.call("balance")
    for frame in gus_frames.frames:
        assert FAN.encode() not in frame, frame
    assert await pg(server.process.settings, "SELECT 1 FROM dms WHERE sender = $1", FAN) == []
    inboxes = [server.node.keys.inbox("gus"), server.node.keys.inbox("erin")]
    for inbox in inboxes:
        entries = await server.node.redis.xrange(inbox)
        assert not any(FAN.encode() in v for _, row in entries for v in row.values())
    assert not any(
        FAN.encode() in v
        for _, row in await server.node.redis.xrange(server.node.keys.dm_log())
        for v in row.values()
    )

    forgotten = await pg(
        server.process.settings, "SELECT forgotten_at FROM deleted_users WHERE user_id = $1", FAN
    )
    assert forgotten[0]["forgotten_at"] is not None
    # The projector counting her room again (as after a later tip, or each
    # hour when it recomputes every room: an hour later here, in this very
    # call) keeps her pseudonym: her sums still lead, and no king event.
    await server.node.standing.step(now_ms=int(time.time() * 1000) + HOUR_MS)
    kings = await pg(
        server.process.settings, "SELECT user_id FROM standing_kings WHERE room = 'alice'"
    )
    assert [k["user_id"] for k in kings] == [alias]
    for client in (alice, carol, erin, frank, gus):
        await client.close()


async def test_a_forgetting_cut_short_by_redis_is_finished_by_the_sweeper(
    start_server: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = await start_server()
    http = Http(server)
    alice = await server.client("alice", "model")
    fan = await server.client(FAN)
    await http.credit(FAN, 50)
    await fan.next_event("balance")
    for client in (alice, fan):
        await client.call("join", room="alice")
    await fan.call("say", room="alice", text="soon gone")
    real = Moderation.forget_user

    async def lost(self: Moderation, user: str) -> int:
        raise Unavailable("room history is unavailable")

    monkeypatch.setattr(Moderation, "forget_user", lost)
    status, reply = await delete(http, FAN)
    # The account is deleted (she is shut out and cannot ask again)...
    assert status == 200, reply
    rows = await pg(
        server.process.settings, "SELECT forgotten_at FROM deleted_users WHERE user_id = $1", FAN
    )
    assert rows[0]["forgotten_at"] is None
    history = (await (await server.client("henry")).call("join", room="alice"))["history"]
    assert [e["text"] for e in history if e["type"] == "message"] == ["soon gone"]
    # ...and the next sweep takes her lines out, telling the room.
    monkeypatch.setattr(Moderation, "forget_user", real)
    await server.node.forgetting.sweep()
    assert (await alice.next_event("clear"))["user"] == FAN
    frank, frames = await recorded(server, "frank")
    history = (await frank.call("join", room="alice"))["history"]
    assert not [e for e in history if e["type"] == "message"], history
    assert not any(FAN.encode() in frame for frame in frames.frames)
    rows = await pg(
        server.process.settings, "SELECT forgotten_at FROM deleted_users WHERE user_id = $1", FAN
    )
    assert rows[0]["forgotten_at"] is not None
    # A sweep after that has nothing to do: no second clear.
    await server.node.forgetting.sweep()
    await alice.call("balance")
    assert all(e["type"] != "clear" for e in _queued(alice))
    for client in (alice, frank):
        await client.close()


def _queued(client: Client) -> list[dict[str, Any]]:
    events = []
    while not client.events.empty():
        events.append(client.events.get_nowait())
    return events


async def test_events_naming_her_in_an_offline_models_inbox_are_not_replayed(
    start_server: Start,
) -> None:
    """A custom request's events wait in the model's inbox while she is away
    (the offer, then its cancel by the deletion): her `hello` after the
    deletion replays none of them."""
    server = await start_server()
    http = Http(server)
    ivy = await server.client("ivy", "model")
    await ivy.close()
    fan = await server.client(FAN)
    await http.credit(FAN, 30)
    await fan.next_event("balance")
    await fan.call("request_offer", model="ivy", text="a song", amount=15, key="o1")
    inbox = server.node.keys.inbox("ivy")
    assert any(
        FAN.encode() in v for _, row in await server.node.redis.xrange(inbox) for v in row.values()
    )

    status, reply = await delete(http, FAN)
    assert status == 200 and reply["closed"]["requests"] == 1, reply
    await drain(server)

    ivy, frames = await recorded(server, "ivy")
    await ivy.call("balance")
    assert frames.frames
    for frame in frames.frames:
        assert FAN.encode() not in frame, frame
    await ivy.close()
