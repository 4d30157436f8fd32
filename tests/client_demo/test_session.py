"""The reconnecting ``Session`` against a real server: rooms re-joined with
``since`` after a lost connection, every event once and in order, terminal
close codes, spends retried with their idempotency key."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import pytest

from tests.conftest import Http, Running, eventually, token
from tokenchat.client_demo.client import (
    Client,
    CommandError,
    ConnectionLost,
    Session,
    SessionClosed,
    backoff_delay,
    offset_order,
)
from tokenchat.protocol import JSON_SUBPROTOCOL, MSGPACK_SUBPROTOCOL, Codec

StartServer = Callable[..., Awaitable[Running]]
# Reconnect quickly: the tests wait for reconnects.
FAST = {"backoff_min_s": 0.01, "backoff_base_s": 0.05, "backoff_max_s": 0.2}
# Room traffic faster than the default 20 commands/s of one session.
UNLIMITED = {"commands_per_s": 10_000.0, "commands_burst": 10_000}


async def server_sessions(running: Running, user: str) -> list[Any]:
    node = running.process.node
    assert node is not None
    return [s for s in node.sessions if s.identity is not None and s.identity.user_id == user]


async def close_server_side(running: Running, user: str, code: int, reason: str) -> None:
    sessions = await server_sessions(running, user)
    assert len(sessions) == 1
    await sessions[0].ws.close(code, reason)


def abort(session: Session) -> None:
    """The network drops: no close frame, the client sees 1006."""
    assert session.client is not None and session.client.ws.transport is not None
    session.client.ws.transport.abort()


class LosingReplies:
    """A codec that loses the connection when a reply matching ``lose`` comes
    in: the reply never reaches the caller (the server did the work)."""

    def __init__(self, client: Client, lose: Callable[[Mapping[str, Any]], bool]) -> None:
        self.inner: Codec = client.codec
        self.client = client
        self.lose = lose
        self.binary = self.inner.binary
        self.subprotocol = self.inner.subprotocol
        self.lost: list[Mapping[str, Any]] = []

    def decode(self, data: bytes | str) -> object:
        message = self.inner.decode(data)
        if isinstance(message, dict) and not self.lost and self.lose(message):
            self.lost.append(message)
            assert self.client.ws.transport is not None
            self.client.ws.transport.abort()
            return {"type": "ok"}  # a reply without ``re``: matched to nothing, dropped
        return message

    def encode(self, obj: Mapping[str, Any]) -> bytes:
        return self.inner.encode(obj)


def lose_reply_to(session: Session, command_type: str) -> LosingReplies:
    client = session.client
    assert client is not None
    sent: list[int | str] = []
    inner_encode = client.codec.encode

    def lose(message: Mapping[str, Any]) -> bool:
        return message.get("re") in sent

    codec = LosingReplies(client, lose)

    def encode(obj: Mapping[str, Any]) -> bytes:
        if obj.get("type") == command_type:
            sent.append(obj["id"])
        return inner_encode(obj)

    codec.encode = encode  # type: ignore[method-assign]
    client.codec = codec
    return codec


class RecordingRejoins(Session):
    """Records how many events each re-join (``since`` given) returned."""

    rejoins: list[int]

    async def _join(self, client: Client, room: str, since: str | None) -> dict[str, Any]:
        reply = await super()._join(client, room, since)
        if since is not None:
            self.__dict__.setdefault("rejoins", []).append(len(reply["history"]))
        return reply


async def model_room(running: Running) -> Client:
    model = await running.client("alice", "model")
    await model.call("join", room="alice")
    return model


# --- pure helpers ----------------------------------------------------------------------


def test_backoff_is_full_jitter_within_bounds() -> None:
    rng = random.Random(7)
    for retry in range(40):
        ceiling = min(10.0, 0.25 * 2**retry)
        delays = [
            backoff_delay(retry, min_s=0.05, base_s=0.25, max_s=10.0, rng=rng) for _ in range(200)
        ]
        assert all(0.05 <= d <= max(0.05, ceiling) for d in delays)
        # Jittered: spread over the range, not one value.
        assert max(delays) - min(delays) > (ceiling - 0.05) / 2


def test_offsets_order_numerically() -> None:
    assert offset_order("1700000000000-10") > offset_order("1700000000000-9")  # type: ignore[operator]
    assert offset_order("999-0") < offset_order("1000-0")  # type: ignore[operator]
    assert offset_order("abc") is None and offset_order(None) is None
    assert offset_order("1-2-3") is None and offset_order("\u0661-\u0662") is None


# --- connecting ------------------------------------------------------------------------


@pytest.mark.parametrize("subprotocol", [JSON_SUBPROTOCOL, MSGPACK_SUBPROTOCOL])
async def test_connect_hello_join_say_with_either_subprotocol(
    server: Running, subprotocol: str
) -> None:
    model = await model_room(server)
    await model.call("say", room="alice", text="earlier")
    async with Session(server.ws_url, token("bob"), subprotocol=subprotocol) as session:
        assert session.client is not None and session.client.ws.subprotocol == subprotocol
        assert session.welcome is not None and session.welcome["user"]["id"] == "bob"
        reply = await session.join("alice")
        assert reply["room"]["id"] == "alice"
        assert (await session.next_event("message"))["text"] == "earlier"  # history
        said = await session.say("alice", "hi")
        event = await session.next_event("message")
        assert event["text"] == "hi" and event["offset"] == said["offset"]
        assert session.rooms == {"alice": said["offset"]}
        with pytest.raises(CommandError) as refused:
            await session.join("nobody")
        assert refused.value.code == "NOT_FOUND" and "nobody" not in session.rooms
    with pytest.raises(SessionClosed):
        await session.say("alice", "after close")
    # The events still queued, then the end, without an error.
    assert {event["type"] async for event in session} <= {"presence"}
    await model.close()


async def test_bad_token_is_terminal_without_retrying(server: Running) -> None:
    calls = 0

    def provider() -> str:
        nonlocal calls
        calls += 1
        return "not-a-jwt"

    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(SessionClosed) as closed:
        await Session.connect(server.ws_url, provider, **FAST)
    assert closed.value.code == 4001
    assert calls == 1 and loop.time() - started < 2


async def test_server_closing_4001_or_4003_ends_the_session(server: Running) -> None:
    calls = 0

    def provider() -> str:
        nonlocal calls
        calls += 1
        return token("bob")

    for code in (4001, 4003):
        session = await Session.connect(server.ws_url, provider, **FAST)
        await close_server_side(server, "bob", code, "go away")
        with pytest.raises(SessionClosed) as closed:
            async for _ in session:
                pass
        assert closed.value.code == code
        with pytest.raises(SessionClosed):
            await session.request("ping")
        await asyncio.sleep(0.3)  # several backoff periods: no reconnect happens
        assert session.reconnects == 0 and await server_sessions(server, "bob") == []
        await session.close()
    assert calls == 2


# --- reconnecting ----------------------------------------------------------------------


@pytest.mark.parametrize("subprotocol", [JSON_SUBPROTOCOL, MSGPACK_SUBPROTOCOL])
async def test_every_message_once_in_order_across_reconnects(
    start_server: StartServer, subprotocol: str
) -> None:
    running = await start_server(**UNLIMITED)
    model = await model_room(running)
    await model.call("say", room="alice", text="before")
    hellos = 0

    async def provider() -> str:
        nonlocal hellos
        hellos += 1
        return token("bob")

    session = RecordingRejoins(
        running.ws_url, provider, subprotocol=subprotocol, backoff_min_s=0.1, backoff_base_s=0.1
    )
    await session.start()
    await session.join("alice")
    count = 300
    texts: list[str] = []
    notices: list[dict[str, Any]] = []

    async def consume() -> None:
        async for event in session:
            if event["type"] == "message":
                texts.append(event["text"])
                if len(texts) == count + 1:
                    return
            elif event["type"] in ("reconnecting", "reconnected", "gap"):
                notices.append(event)

    said: list[tuple[tuple[int, int] | None, str]] = []

    async def chatter() -> None:
        # About 100 a second: an outage (>= 0.1 s of backoff) then spans far
        # fewer events than the room's history holds (50), so it must be
        # filled without a gap.
        for start in range(0, count, 5):
            texts_ = [f"m{i}" for i in range(start, start + 5)]
            replies = await asyncio.gather(
                *(model.call("say", room="alice", text=text) for text in texts_)
            )
            said.extend(
                (offset_order(r["offset"]), t) for r, t in zip(replies, texts_, strict=True)
            )
            await asyncio.sleep(0.05)

    consumer = asyncio.create_task(consume())
    talker = asyncio.create_task(chatter())

    async def received(n: int) -> bool:
        return len(texts) >= n

    await eventually(lambda: received(50))
    abort(session)  # the network drops
    await eventually(lambda: received(150))
    await eventually(lambda: asyncio.sleep(0, session.connected))
    await close_server_side(running, "bob", 1012, "server restarting")  # a clean close
    async with asyncio.timeout(15):
        await talker
        await consumer
    said.sort()
    assert texts == ["before"] + [text for _, text in said]
    assert session.reconnects == 2 and hellos == 3
    # Both outages (>= 0.1 s each) were filled from history.
    assert len(session.rejoins) == 2 and all(n > 0 for n in session.rejoins)
    assert [n["type"] for n in notices] == ["reconnecting", "reconnected"] * 2
    assert notices[0]["code"] == 1006 and notices[2]["code"] == 1012
    await session.close()
    await model.close()


async def test_history_lost_while_away_is_marked_as_a_gap(start_server: StartServer) -> None:
    running = await start_server(history_len=5)
    model = await model_room(running)
    session = await Session.connect(
        running.ws_url, token("bob"), backoff_min_s=0.5, backoff_base_s=0.5
    )
    await session.join("alice")
    await model.call("say", room="alice", text="seen")
    assert (await session.next_event("message"))["text"] == "seen"
    abort(session)
    for i in range(8):  # more than the room keeps, while bob is away (>= 0.5 s)
        await model.call("say", room="alice", text=f"away{i}")
    gap = await session.next_event("gap", timeout_s=5)
    assert gap["room"] == "alice"
    texts = [(await session.next_event("message"))["text"] for _ in range(5)]
    assert texts == [f"away{i}" for i in range(3, 8)]  # the newest ones the room kept
    await session.close()
    await model.close()


async def test_command_in_flight_when_the_connection_drops_fails_clearly(
    server: Running,
) -> None:
    model = await model_room(server)
    session = await Session.connect(server.ws_url, token("bob"), **FAST)
    await session.join("alice")
    lose_reply_to(session, "say")
    with pytest.raises(ConnectionLost) as lost:
        await session.say("alice", "hello?")
    assert lost.value.command == "say" and isinstance(lost.value, ConnectionError)
    # The session reconnects by itself, and the next command goes through.
    await session.say("alice", "again")
    texts: list[str] = []
    while len(texts) < 2:
        event = await session.next_event()
        if event["type"] == "message":
            texts.append(event["text"])
    assert texts == ["hello?", "again"]  # the first had been applied: seen once, in order
    assert session.reconnects == 1
    await session.close()
    await model.close()


async def test_left_room_is_not_rejoined(server: Running) -> None:
    model = await model_room(server)
    session = await Session.connect(server.ws_url, token("bob"), **FAST)
    await session.join("alice")
    await session.leave("alice")
    abort(session)
    await session.next_event("reconnected")
    assert session.rooms == {}
    sessions = await server_sessions(server, "bob")
    assert len(sessions) == 1 and sessions[0].rooms == set()
    await session.close()
    await model.close()


# --- spends ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["tip", "dm"])
async def test_spend_whose_reply_was_lost_is_retried_and_charged_once(
    server: Running, kind: str
) -> None:
    http = Http(server)
    model = await model_room(server)
    session = await Session.connect(server.ws_url, token("bob"), **FAST)
    await session.join("alice")
    await http.credit("bob", 100)
    assert (await session.next_event("balance"))["balance"] == 100
    codec = lose_reply_to(session, kind)
    if kind == "tip":
        reply = await session.tip("alice", 7, "thanks")
    else:
        await Http(server).call("PUT", "/v1/me/prices", "alice", "model", dm=7)
        reply = await session.dm("alice", "hi")
    assert codec.lost and codec.lost[0]["type"] == "ok"  # applied, reply lost
    assert reply["duplicate"] is True and reply["tx"] == codec.lost[0]["tx"]
    assert session.reconnects == 1
    assert await session.get_balance() == 93
    if kind == "tip":  # its event was seen once, live or from history after the re-join
        await session.say("alice", "marker")
        seen: list[dict[str, Any]] = []
        while not seen or seen[-1]["type"] != "message":
            event = await session.next_event()
            if event["type"] in ("tip", "message"):
                seen.append(event)
        assert [(e["type"], e.get("amount")) for e in seen] == [("tip", 7), ("message", None)]
    await session.close()
    await model.close()


async def test_tip_cut_off_right_after_sending_is_charged_once(server: Running) -> None:
    http = Http(server)
    model = await model_room(server)
    session = await Session.connect(server.ws_url, token("bob"), **FAST)
    await session.join("alice")
    await http.credit("bob", 100)
    await session.next_event("balance")
    client = session.client
    assert client is not None
    send = client.ws.send

    async def send_then_drop(data: Any, text: bool | None = None) -> None:
        await send(data, text=text)
        client.ws.transport.abort()  # whether the server read it is up to chance

    client.ws.send = send_then_drop  # type: ignore[method-assign,assignment]
    reply = await session.tip("alice", 5)
    assert reply["type"] == "ok" and session.reconnects == 1
    assert await session.get_balance() == 95
    status, me = await http.call("GET", "/v1/me", "alice", "model")
    assert status == 200 and me["balance"] == 5
    await session.close()
    await model.close()


async def test_spend_errors_are_final_and_keys_fresh_per_spend(server: Running) -> None:
    model = await model_room(server)
    session = await Session.connect(server.ws_url, token("bob"), **FAST)
    await session.join("alice")
    with pytest.raises(CommandError) as refused:
        await session.tip("alice", 5)
    assert refused.value.code == "INSUFFICIENT_FUNDS"
    await Http(server).credit("bob", 20)
    first = await session.tip("alice", 5, key="my-key")
    again = await session.tip("alice", 5, key="my-key")  # the caller's own retry
    assert again == {**first, "duplicate": True, "re": again["re"]}
    other = await session.tip("alice", 5)  # a new logical spend: a new key
    assert "duplicate" not in other and other["tx"] != first["tx"]
    assert other["balance"] == 10 and session.balance == 10
    await session.close()
    await model.close()


async def test_server_restart_on_the_same_port(start_server: StartServer) -> None:
    first = await start_server()
    model = await model_room(first)
    session = await Session.connect(first.ws_url, token("bob"), **FAST)
    await session.join("alice")
    await model.call("say", room="alice", text="before the restart")
    assert (await session.next_event("message"))["text"] == "before the restart"
    await model.close()
    await first.process.stop()  # sessions closed with 1012, then connections refused
    assert (await session.next_event("reconnecting"))["code"] == 1012
    await asyncio.sleep(0.3)  # a few refused attempts
    second = await start_server(ws_port=first.process.ws_port)
    model = await model_room(second)
    await model.call("say", room="alice", text="after the restart")
    events: list[dict[str, Any]] = []
    while not events or events[-1].get("text") != "after the restart":
        events.append(await session.next_event(timeout_s=10))
    # Presence (the model joining on the new server) may come at any point.
    kinds = [e["type"] for e in events if e["type"] != "presence"]
    assert kinds[-2:] == ["reconnected", "message"]
    assert any(e["type"] == "reconnecting" and e["code"] is None for e in events)  # refused
    await session.close()
    await model.close()


async def test_failover_urls_rotate_to_another_node(start_server: StartServer) -> None:
    """Two nodes on one Redis: the first stops for good, the session dials the
    next URL of its list, re-joins with ``since`` and misses nothing."""
    first = await start_server()
    second = await start_server()
    model = await model_room(second)
    session = await Session.connect(
        first.ws_url, token("bob"), failover_urls=[second.ws_url], **FAST
    )
    assert session.urls == (first.ws_url, second.ws_url)
    await session.join("alice")
    before = await model.call("say", room="alice", text="before")
    assert (await session.next_event("message"))["offset"] == before["offset"]
    await first.process.stop()
    # Said while the session is away: it comes back with the re-join's history.
    during = await model.call("say", room="alice", text="while away")
    assert (await session.next_event("reconnected", timeout_s=10))["type"] == "reconnected"
    assert session.url == second.ws_url
    after = await model.call("say", room="alice", text="after")
    seen = [(await session.next_event("message"))["offset"] for _ in range(2)]
    assert seen == [during["offset"], after["offset"]]
    await session.close()
    await model.close()


async def test_failover_urls_skip_a_refusing_node(start_server: StartServer) -> None:
    """A URL that refuses costs one attempt: the rotation goes on to the next."""
    running = await start_server()
    model = await model_room(running)
    dead = await start_server()
    dead_url = dead.ws_url
    await dead.process.stop()  # its port now refuses connections
    session = await Session.connect(running.ws_url, token("bob"), failover_urls=[dead_url], **FAST)
    await session.join("alice")
    abort(session)
    # Attempt 1 dials the dead node (refused), attempt 2 the live one again.
    events = [await session.next_event(timeout_s=10)]
    while events[-1]["type"] != "reconnected":
        events.append(await session.next_event(timeout_s=10))
    attempts = [e for e in events if e["type"] == "reconnecting"]
    assert len(attempts) >= 2 and attempts[1]["code"] is None  # the refusal
    assert session.url == running.ws_url
    said = await model.call("say", room="alice", text="still here")
    assert (await session.next_event("message"))["offset"] == said["offset"]
    await session.close()
    await model.close()


async def test_every_room_event_with_an_offset_is_deduplicated() -> None:
    """A ``king`` event (or ``show``, ``goal``) is in the room's stream, and in
    the history a re-join replays: one seen live is not delivered again, and
    it moves the offset the next re-join asks ``since``."""
    session = Session("ws://127.0.0.1:1/ws", "unused")
    session.rooms["alice"] = "5-0"
    king = {"type": "king", "room": "alice", "king": None, "offset": "6-0", "ts": 6}
    session._accept(king)
    session._accept(dict(king))  # the same event again, from a re-join's history
    session._accept({**king, "offset": "4-0"})  # older than the last one seen
    assert session.rooms["alice"] == "6-0"
    assert session._events.qsize() == 1 and session._events.get_nowait() == king
