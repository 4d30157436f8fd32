"""The gateway against real Redis, Postgres and WebSocket clients."""

from __future__ import annotations

import asyncio
import time

import msgpack
import orjson
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.conftest import JWT_SECRET, Running, eventually, token
from tokenchat.client_demo.client import Client, CommandError
from tokenchat.server.auth import issue_token


async def close_code(client: Client, timeout_s: float = 5.0) -> int | None:
    async with asyncio.timeout(timeout_s):
        await client.ws.wait_closed()
    return client.ws.close_code


# --- authentication -------------------------------------------------------------------


async def test_hello_welcomes_with_user_balance_and_session(server: Running) -> None:
    client = await server.client()
    welcome = await client.hello(token("bob"))
    assert welcome["type"] == "welcome"
    assert welcome["re"] == 1
    assert welcome["user"] == {"id": "bob", "role": "fan"}
    assert welcome["balance"] == 0
    assert isinstance(welcome["session"], str) and welcome["session"]
    await client.close()


async def test_bad_token_is_unauthenticated_then_closed_4001(server: Running) -> None:
    client = await server.client()
    reply = await client.request("hello", token="not-a-jwt")
    assert reply["type"] == "error" and reply["code"] == "UNAUTHENTICATED"
    assert await close_code(client) == 4001


async def test_token_signed_with_another_secret_is_refused(server: Running) -> None:
    client = await server.client()
    forged = issue_token("another-secret-" + "y" * 32, "mallory", "admin")
    reply = await client.request("hello", token=forged)
    assert reply["code"] == "UNAUTHENTICATED"
    assert await close_code(client) == 4001


async def test_expired_token_is_refused(server: Running) -> None:
    import jwt

    expired = jwt.encode(
        {"sub": "bob", "role": "fan", "exp": int(time.time()) - 60}, JWT_SECRET, "HS256"
    )
    client = await server.client()
    reply = await client.request("hello", token=expired)
    assert reply["code"] == "UNAUTHENTICATED" and "expired" in reply["message"]
    assert await close_code(client) == 4001


async def test_missing_token_is_bad_request_and_session_stays(server: Running) -> None:
    client = await server.client()
    reply = await client.request("hello")
    assert reply["code"] == "BAD_REQUEST" and "token" in reply["message"]
    await client.hello(token("bob"))
    await client.close()


async def test_command_before_hello_is_unauthenticated_and_session_stays(
    server: Running,
) -> None:
    client = await server.client()
    reply = await client.request("join", room="alice")
    assert reply["code"] == "UNAUTHENTICATED"
    await client.hello(token("bob"))
    assert (await client.call("ping"))["type"] == "ok"
    await client.close()


async def test_no_hello_in_time_closes_4001(start_server: object) -> None:
    running: Running = await start_server(hello_timeout_s=0.3)  # type: ignore[operator]
    client = await running.client()
    assert await close_code(client) == 4001


async def test_second_hello_is_refused(server: Running) -> None:
    client = await server.client("bob")
    reply = await client.request("hello", token=token("bob"))
    assert reply["code"] == "BAD_REQUEST"
    await client.close()


# --- commands ---------------------------------------------------------------------------


@pytest.mark.cluster
async def test_join_returns_room_history_and_viewers(server: Running) -> None:
    model = await server.client("alice", "model")
    await model.call("join", room="alice")
    await model.call("say", room="alice", text="welcome")
    fan = await server.client("bob")
    reply = await fan.call("join", room="alice")
    assert reply["room"] == {
        "id": "alice",
        "owner": "alice",
        "viewers": 2,
        "tip_min": 1,
        "show": None,
        "king": None,
        # Moderation (docs/protocol.md): the room's chat settings and moderators.
        "moderation": {
            "slow_s": 0,
            "chat_requires": "none",
            "chat_min_balance": 0,
            "moderators": [],
        },
        "goal": None,  # the room's tip goal (test_goals.py)
    }
    assert reply["ticket"] is False
    assert [e["text"] for e in reply["history"]] == ["welcome"]
    event = reply["history"][0]
    assert event["type"] == "message" and event["from"] == "alice" and event["room"] == "alice"
    assert isinstance(event["ts"], int) and abs(event["ts"] / 1000 - time.time()) < 60
    assert reply["recovered"] is True
    await fan.close()
    await model.close()


async def test_join_unknown_room_or_a_fans_id_is_not_found(server: Running) -> None:
    await (await server.client("carol")).close()  # carol is a fan: no room
    fan = await server.client("bob")
    for room in ("nobody", "carol"):
        with pytest.raises(CommandError) as caught:
            await fan.call("join", room=room)
        assert caught.value.code == "NOT_FOUND"
    await fan.close()


async def test_rooms_per_session_is_limited(start_server: object) -> None:
    running: Running = await start_server(rooms_per_session_max=2)  # type: ignore[operator]
    for model in ("m1", "m2", "m3"):
        await (await running.client(model, "model")).close()
    fan = await running.client("bob")
    await fan.call("join", room="m1")
    await fan.call("join", room="m2")
    await fan.call("join", room="m2")  # joining again is not a new room
    with pytest.raises(CommandError) as caught:
        await fan.call("join", room="m3")
    assert caught.value.code == "LIMIT_EXCEEDED"
    await fan.call("leave", room="m1")
    await fan.call("join", room="m3")
    await fan.close()


@pytest.mark.cluster
async def test_say_reaches_every_member_sender_included(server: Running) -> None:
    model = await server.client("alice", "model")
    fans = [await server.client(f"fan{i}") for i in range(3)]
    for client in [model, *fans]:
        await client.call("join", room="alice")
    reply = await fans[0].call("say", room="alice", text="hello room")
    for client in [model, *fans]:
        event = await client.next_event("message")
        assert event == {
            "type": "message",
            "room": "alice",
            "from": "fan0",
            "text": "hello room",
            "tier": 0,
            "offset": reply["offset"],
            "ts": int(reply["offset"].split("-")[0]),
        }
    for client in [model, *fans]:
        await client.close()


async def test_say_and_leave_need_membership(server: Running) -> None:
    await (await server.client("alice", "model")).close()
    fan = await server.client("bob")
    for command in ("say", "leave"):
        fields = {"room": "alice", "text": "x"} if command == "say" else {"room": "alice"}
        reply = await fan.request(command, **fields)
        assert reply["code"] == "NOT_IN_ROOM"
    await fan.call("join", room="alice")
    await fan.call("leave", room="alice")
    reply = await fan.request("say", room="alice", text="x")
    assert reply["code"] == "NOT_IN_ROOM"
    await fan.close()


async def test_left_member_receives_nothing_more(server: Running) -> None:
    model = await server.client("alice", "model")
    fan = await server.client("bob")
    await model.call("join", room="alice")
    await fan.call("join", room="alice")
    await fan.call("leave", room="alice")
    await model.call("say", room="alice", text="after")
    await model.next_event("message")
    await model.call("ping")
    await asyncio.sleep(0.1)
    assert all(e["type"] != "message" for e in drain(fan))
    await fan.close()
    await model.close()


def drain(client: Client) -> list[dict[str, object]]:
    out = []
    while not client.events.empty():
        out.append(client.events.get_nowait())
    return out


async def test_balance_and_ping(server: Running) -> None:
    client = await server.client("bob")
    assert await client.call("balance") == {"type": "ok", "re": 2, "balance": 0}
    assert await client.call("ping") == {"type": "ok", "re": 3}
    await client.close()


async def test_text_over_limit_names_the_field(server: Running) -> None:
    await (await server.client("alice", "model")).close()
    fan = await server.client("bob")
    await fan.call("join", room="alice")
    reply = await fan.request("say", room="alice", text="x" * 1001)
    assert reply["code"] == "BAD_REQUEST" and "'text'" in reply["message"]
    await fan.call("say", room="alice", text="x" * 1000)
    await fan.close()


async def test_unknown_command_keeps_id_and_session(server: Running) -> None:
    client = await server.client("bob")
    await client.send_raw(orjson.dumps({"type": "teleport", "id": "t-1"}).decode())
    event = await client.next_event("error")
    assert event["re"] == "t-1" and event["code"] == "UNKNOWN_COMMAND"
    await client.call("ping")
    await client.close()


# --- bad input --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "frame",
    ["{not json", "[]", '"hello"', "null", '{"type": 5}', '{"id": 1}', "\x00\xff", ""],
)
async def test_malformed_json_is_bad_request_and_session_stays(server: Running, frame: str) -> None:
    client = await server.client("bob")
    await client.send_raw(frame)
    event = await client.next_event("error")
    assert event["code"] == "BAD_REQUEST"
    await client.call("ping")
    await client.close()


@pytest.mark.parametrize(
    "frame",
    [
        b"\xc1",  # a byte msgpack never uses
        b"\x93\x01\x02\x03",  # an array, not a map
        msgpack.packb({"type": "ping"}) + b"\x00",  # trailing data
        msgpack.packb({1: 2}),  # a non-string key
        msgpack.packb({"type": "say", "room": "alice", "text": b"bytes"}),
        b"\xdd\xff\xff\xff\xff",  # an array header claiming 4 billion items
    ],
)
async def test_malformed_msgpack_is_bad_request_and_session_stays(
    server: Running, frame: bytes
) -> None:
    client = await server.client("bob", subprotocol="tokenchat.v1.msgpack")
    await client.send_raw(frame)
    event = await client.next_event("error")
    assert event["code"] == "BAD_REQUEST"
    await client.call("ping")
    await client.close()


async def test_oversized_frame_closes_only_that_session_1009(server: Running) -> None:
    model = await server.client("alice", "model")
    await model.call("join", room="alice")
    big = await server.client("bob")
    await big.call("join", room="alice")
    await big.send_raw("x" * (64 * 1024 + 1))
    assert await close_code(big) == 1009
    await model.call("say", room="alice", text="still here")
    assert (await model.next_event("message"))["text"] == "still here"
    await model.close()


async def test_unsupported_subprotocol_is_refused(server: Running) -> None:
    with pytest.raises(Exception):  # noqa: B017 - the handshake or the session fails
        async with connect(server.ws_url, subprotocols=["chat.v9"]) as ws:  # type: ignore[list-item]
            await ws.recv()


async def test_wrong_path_is_404(server: Running) -> None:
    with pytest.raises(Exception, match="404"):
        async with connect(server.ws_url.replace("/ws", "/nope")):
            pass


async def test_no_subprotocol_means_json(server: Running) -> None:
    async with connect(server.ws_url) as ws:
        await ws.send(orjson.dumps({"type": "hello", "id": 1, "token": token("bob")}).decode())
        reply = orjson.loads(await ws.recv())
        assert reply["type"] == "welcome"


# --- msgpack end to end ------------------------------------------------------------------


async def test_msgpack_and_json_members_see_the_same_events(server: Running) -> None:
    model = await server.client("alice", "model")
    packer = await server.client("bob", subprotocol="tokenchat.v1.msgpack")
    assert packer.ws.subprotocol == "tokenchat.v1.msgpack"
    await model.call("join", room="alice")
    await packer.call("join", room="alice")
    await packer.call("say", room="alice", text="héllo ✓")
    from_json = await model.next_event("message")
    from_msgpack = await packer.next_event("message")
    assert from_json == from_msgpack and from_json["text"] == "héllo ✓"
    await model.close()
    await packer.close()


# --- ordering, history, recovery -----------------------------------------------------------


@pytest.mark.cluster
async def test_burst_from_several_senders_is_seen_in_one_order(start_server: object) -> None:
    running: Running = await start_server(commands_per_s=1000.0, commands_burst=1000)  # type: ignore[operator]
    model = await running.client("alice", "model")
    senders = [await running.client(f"s{i}") for i in range(4)]
    watchers = [
        await running.client(f"w{i}", subprotocol=p)
        for i, p in enumerate(["tokenchat.v1.json", "tokenchat.v1.msgpack", "tokenchat.v1.json"])
    ]
    members = [model, *senders, *watchers]
    for client in members:
        await client.call("join", room="alice")
    per_sender = 40

    async def burst(client: Client, name: str) -> None:
        for n in range(per_sender):
            await client.call("say", room="alice", text=f"{name}-{n}")

    await asyncio.gather(*(burst(s, f"s{i}") for i, s in enumerate(senders)))
    total = per_sender * len(senders)
    seen = []
    for client in members:
        texts = []
        offsets = []
        while len(texts) < total:
            event = await client.next_event("message")
            texts.append(event["text"])
            offsets.append(tuple(int(p) for p in event["offset"].split("-")))
        assert offsets == sorted(offsets) and len(set(offsets)) == total
        seen.append(texts)
    assert all(texts == seen[0] for texts in seen)
    for i in range(len(senders)):  # each sender's own lines stay in its order
        own = [t for t in seen[0] if t.startswith(f"s{i}-")]
        assert own == [f"s{i}-{n}" for n in range(per_sender)]
    for client in members:
        await client.close()


async def test_history_keeps_the_last_50(start_server: object) -> None:
    running: Running = await start_server(commands_per_s=1000.0, commands_burst=1000)  # type: ignore[operator]
    model = await running.client("alice", "model")
    await model.call("join", room="alice")
    for n in range(60):
        await model.call("say", room="alice", text=str(n))
    fan = await running.client("bob")
    reply = await fan.call("join", room="alice")
    assert [e["text"] for e in reply["history"]] == [str(n) for n in range(10, 60)]
    await fan.close()
    await model.close()


@pytest.mark.cluster
async def test_join_since_recovers_the_gap_after_a_reconnect(server: Running) -> None:
    model = await server.client("alice", "model")
    await model.call("join", room="alice")
    fan = await server.client("bob")
    await fan.call("join", room="alice")
    await model.call("say", room="alice", text="before")
    last_seen = (await fan.next_event("message"))["offset"]
    await fan.close()
    for text in ("missed 1", "missed 2"):
        await model.call("say", room="alice", text=text)
    again = await server.client("bob")
    reply = await again.call("join", room="alice", since=last_seen)
    assert [e["text"] for e in reply["history"]] == ["missed 1", "missed 2"]
    assert reply["recovered"] is True
    await model.call("say", room="alice", text="live")
    assert (await again.next_event("message"))["text"] == "live"
    await again.close()
    await model.close()


async def test_join_since_a_trimmed_offset_is_not_recovered(start_server: object) -> None:
    running: Running = await start_server(history_len=5)  # type: ignore[operator]
    model = await running.client("alice", "model")
    await model.call("join", room="alice")
    first = (await model.call("say", room="alice", text="0"))["offset"]
    for n in range(1, 10):
        await model.call("say", room="alice", text=str(n))
    fan = await running.client("bob")
    reply = await fan.call("join", room="alice", since=first)
    assert reply["recovered"] is False
    assert [e["text"] for e in reply["history"]] == ["5", "6", "7", "8", "9"]
    latest = reply["history"][-1]["offset"]
    reply = await fan.call("join", room="alice", since=latest)
    assert reply == {**reply, "history": [], "recovered": True}
    await fan.close()
    await model.close()


async def test_join_since_rejects_impossible_offsets(server: Running) -> None:
    await (await server.client("alice", "model")).close()
    fan = await server.client("bob")
    for since in ("abc", "1-2-3", "99999999999999999999-0", ""):
        reply = await fan.request("join", room="alice", since=since)
        assert reply["code"] == "BAD_REQUEST" and "'since'" in reply["message"]
    await fan.close()


@pytest.mark.cluster
async def test_events_during_a_join_are_neither_lost_nor_doubled(start_server: object) -> None:
    running: Running = await start_server(commands_per_s=1000.0, commands_burst=1000)  # type: ignore[operator]
    model = await running.client("alice", "model")
    await model.call("join", room="alice")
    stop = asyncio.Event()
    sent: list[str] = []

    async def chatter() -> None:
        n = 0
        while not stop.is_set():
            await model.call("say", room="alice", text=str(n))
            sent.append(str(n))
            n += 1

    task = asyncio.create_task(chatter())
    joiners = []
    for i in range(5):
        await asyncio.sleep(0.02)
        client = await running.client(f"j{i}")
        reply = await client.call("join", room="alice")
        joiners.append((client, [e["text"] for e in reply["history"]]))
    await asyncio.sleep(0.05)
    stop.set()
    await task
    for client, texts in joiners:
        while texts[-1] != sent[-1]:
            texts.append((await client.next_event("message"))["text"])
        start = int(texts[0])
        assert texts == [str(n) for n in range(start, start + len(texts))]
        await client.close()
    await model.close()


# --- slow consumers and rate limits ------------------------------------------------------


async def test_member_that_stops_reading_is_closed_4008_others_keep_receiving(
    start_server: object,
) -> None:
    running: Running = await start_server(  # type: ignore[operator]
        write_buffer_max_bytes=256 * 1024, commands_per_s=100000.0, commands_burst=100000
    )
    model = await running.client("alice", "model")
    await model.call("join", room="alice")
    reader = await running.client("bob")
    await reader.call("join", room="alice")
    # A raw client that reads its replies, then stops reading: TCP fills up.
    slow = await connect(running.ws_url, max_queue=1, compression=None)
    await slow.send(orjson.dumps({"type": "hello", "id": 1, "token": token("slow")}).decode())
    await slow.recv()
    await slow.send(orjson.dumps({"type": "join", "id": 2, "room": "alice"}).decode())
    await slow.recv()
    text = "z" * 1000
    sent = 0

    async def slow_is_gone() -> bool:
        return b'code="4008"' in (await metrics_text(running)).encode()

    deadline = time.monotonic() + 30
    while not await slow_is_gone():
        assert time.monotonic() < deadline, "the slow member was never closed"
        await asyncio.gather(*(model.call("say", room="alice", text=text) for _ in range(200)))
        sent += 200
    received = 0
    while received < sent:
        await reader.next_event("message")
        received += 1
    # The slow client finds the close frame once it reads again.
    with pytest.raises(ConnectionClosed) as closed:
        async with asyncio.timeout(10):
            while True:
                await slow.recv()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4008
    await reader.close()
    await model.close()


async def metrics_text(running: Running) -> str:
    import httpx

    async with httpx.AsyncClient() as http:
        return (await http.get(running.http_url + "/metrics")).text


async def test_rate_limit_answers_then_closes_4029(start_server: object) -> None:
    running: Running = await start_server(  # type: ignore[operator]
        commands_per_s=1.0, commands_burst=3, rate_limit_strikes_max=5
    )
    client = await running.client("bob")  # hello takes one of the burst of 3
    replies = [await client.request("ping") for _ in range(2)]
    assert all(r["type"] == "ok" for r in replies)
    codes = []
    for _ in range(5):
        codes.append((await client.request("ping"))["code"])
    assert codes == ["RATE_LIMITED"] * 5
    await client.send_raw(orjson.dumps({"type": "ping", "id": 99}).decode())
    assert await close_code(client) == 4029


# --- presence ------------------------------------------------------------------------------


@pytest.mark.cluster
async def test_presence_is_pushed_and_coalesced(start_server: object) -> None:
    running: Running = await start_server(presence_interval_s=0.5)  # type: ignore[operator]
    model = await running.client("alice", "model")
    await model.call("join", room="alice")
    fans = [await running.client(f"f{i}") for i in range(5)]
    for fan in fans:
        await fan.call("join", room="alice")
    started = time.monotonic()
    seen = []
    while not seen or seen[-1]["viewers"] != 6:
        seen.append(await model.next_event("presence"))
    assert time.monotonic() - started < 2.0
    assert len(seen) <= 3, "five joins within a tick coalesce into few presence events"
    assert seen[-1] == {"type": "presence", "room": "alice", "viewers": 6}
    for fan in fans:
        await fan.close()
    event = await model.next_event("presence")
    while event["viewers"] != 1:
        event = await model.next_event("presence")
    await model.close()


# --- HTTP ------------------------------------------------------------------------------------


async def test_http_health_ready_metrics_and_me(server: Running) -> None:
    import httpx

    async with httpx.AsyncClient(base_url=server.http_url) as http:
        assert (await http.get("/healthz")).json() == {"ok": True}
        ready = await http.get("/readyz")
        assert ready.status_code == 200 and ready.json()["ok"] is True
        missing = await http.get("/v1/me")
        assert missing.status_code == 401
        assert missing.json()["error"]["code"] == "UNAUTHENTICATED"
        me = await http.get("/v1/me", headers={"Authorization": f"Bearer {token('bob')}"})
        assert me.json() == {"user": {"id": "bob", "role": "fan"}, "balance": 0}
        client = await server.client("carol")
        await client.call("ping")
        text = (await http.get("/metrics")).text
        assert "tokenchat_sessions_open 1.0" in text
        assert 'tokenchat_commands_total{result="ok",type="ping"}' in text
        assert "tokenchat_fanout_latency_seconds_bucket" in text
        await client.close()
        nowhere = await http.get("/v1/nowhere")
        assert nowhere.status_code == 404 and nowhere.json()["error"]["code"] == "NOT_FOUND"


async def test_session_count_drops_when_clients_leave(server: Running) -> None:
    clients = [await server.client(f"u{i}") for i in range(3)]
    for client in clients:
        await client.close()

    async def none_open() -> bool:
        return "tokenchat_sessions_open 0.0" in await metrics_text(server)

    await eventually(none_open)


async def test_sessions_per_user_are_limited(start_server: object) -> None:
    running: Running = await start_server(sessions_per_user_max=2)  # type: ignore[operator]
    tabs = [await running.client("bob") for _ in range(2)]
    third = await running.client()
    reply = await third.request("hello", token=token("bob"))
    assert reply["code"] == "LIMIT_EXCEEDED"
    await tabs[0].close()

    async def admitted() -> bool:
        return (await third.request("hello", token=token("bob")))["type"] == "welcome"

    await eventually(admitted)
    for client in (tabs[1], third):
        await client.close()


async def test_a_session_keeps_no_handshake_headers_and_still_works(server: Running) -> None:
    # Idle memory (docs/benchmarks.md): the library would keep the opening
    # handshake's headers for the connection's life; the gateway drops them
    # once read, and nothing later needs them.
    client = await server.client()
    welcome = await client.hello(token("bob"))
    (session,) = [s for s in server.node.sessions if s.id == welcome["session"]]
    assert session.ws.request is not None and session.ws.response is not None
    assert list(session.ws.request.headers.raw_items()) == []
    assert list(session.ws.response.headers.raw_items()) == []
    assert session.ws.subprotocol == "tokenchat.v1.json"
    assert (await client.call("ping"))["type"] == "ok"
    await client.close()
