"""The pub/sub payload formats (server/bus.py): every kind round-trips,
garbage is refused with a clear error, what the Lua scripts and the ledger
writer really publish decodes, and a node drops garbage and carries on."""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image
from redis.asyncio import Redis
from redis.asyncio.client import PubSub

from tests.conftest import Http, Running
from tokenchat.protocol import events
from tokenchat.server import bus
from tokenchat.server.catalog.media import Upload
from tokenchat.server.config import Settings
from tokenchat.server.gateway.rooms import complete_event
from tokenchat.server.keys import Keys

# How long a test waits for one payload to arrive on a channel it subscribed to.
PAYLOAD_TIMEOUT_S = 5.0

# --- formats ---------------------------------------------------------------------------

stream_ids = st.builds(
    lambda ms, seq: b"%d-%d" % (ms, seq),
    st.integers(0, 10**20 - 1),
    st.integers(0, 10**20 - 1),
)
json_objects = st.dictionaries(st.text(max_size=8), st.text() | st.integers(-(2**63), 2**63 - 1))
bodies = json_objects.map(orjson.dumps)
tx_ids = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=64)
messages = st.one_of(
    st.builds(bus.RoomEvent, stream_ids, bodies),
    st.just(bus.PRESENCE_CHANGED),
    st.builds(bus.BalanceChanged, st.integers(-(10**19) + 1, 10**19 - 1)),
    st.builds(bus.DirectMessage, stream_ids, bodies),
    st.builds(bus.LedgerCommitted, st.lists(tx_ids, max_size=5).map(tuple)),
    st.builds(bus.LedgerParked, st.lists(tx_ids, max_size=5).map(tuple)),
    st.builds(bus.ModerationChanged, bodies),
    st.builds(bus.TicketBought, tx_ids),
)


@given(messages)
def test_every_kind_round_trips(message: bus.Message) -> None:
    payload = message.encode()
    decoded = bus.decode(payload)
    # NamedTuples of two kinds with equal fields compare equal: check the kind too.
    assert type(decoded) is type(message) and decoded == message
    assert decoded.encode() == payload


def test_the_documented_payloads_decode() -> None:
    assert bus.decode(b'E1712-0 {"type":"message"}') == bus.RoomEvent(
        b"1712-0", b'{"type":"message"}'
    )
    assert bus.decode(b"P") is bus.PRESENCE_CHANGED
    assert bus.decode(b"B-3") == bus.BalanceChanged(-3)
    assert bus.decode(b'D5-1 {"type":"dm"}') == bus.DirectMessage(b"5-1", b'{"type":"dm"}')
    assert bus.decode(b"Cab 12") == bus.LedgerCommitted(("ab", "12"))
    assert bus.decode(b"Rx") == bus.LedgerParked(("x",))
    assert bus.decode(b'M{"op":"rules"}') == bus.ModerationChanged(b'{"op":"rules"}')
    assert bus.decode(b"Tt_0a1b") == bus.TicketBought("t_0a1b")
    # An event body may hold any byte, newlines and spaces included.
    assert bus.decode(b'E1-0 {"a":"x y\nz"}').body == b'{"a":"x y\nz"}'


def test_ids_the_ledger_channel_cannot_carry_are_left_out() -> None:
    """A space separates the ids: an id with one (or empty, or not ASCII)
    would come out as others. No spend waits on such an id."""
    assert bus.LedgerCommitted(("a b", "", "é", "ok")).encode() == b"Cok"
    assert bus.LedgerParked(("a b",)).encode() == b"R"
    assert bus.decode(b"R") == bus.LedgerParked(())


@pytest.mark.parametrize(
    ("payload", "says"),
    [
        (b"", "no known kind letter"),
        (b"hello", "no known kind letter"),
        (b"\xff\xfe", "no known kind letter"),
        (b"E", "expected E<ms-seq> <JSON object>"),
        (b'E1-0{"a":1}', "expected E<ms-seq> <JSON object>"),
        (b"E1-0 not json", "expected E<ms-seq> <JSON object>"),
        (b'E1 {"a":1}', "expected E<ms-seq> <JSON object>"),
        (b'Ex-0 {"a":1}', "expected E<ms-seq> <JSON object>"),
        (b'E123456789012345678901-0 {"a":1}', "expected E<ms-seq>"),
        (b'E1-0 {"a":1', "expected E<ms-seq> <JSON object>"),
        (b"PP", "expected P alone"),
        (b"B", "expected B<integer"),
        (b"B12x", "expected B<integer"),
        (b"B 12", "expected B<integer"),
        (b"B007", "expected B<integer"),
        (b"B-0", "expected B<integer"),
        (b"B12345678901234567890", "expected B<integer"),
        (b"D1-0", "expected D<ms-seq> <JSON object>"),
        (b"C ab", "expected C<tx> <tx>"),
        (b"Cab  cd", "expected C<tx> <tx>"),
        (b"Cab ", "expected C<tx> <tx>"),
        (b"R\xc3\xa9", "expected R<tx> <tx>"),
        (b"M", "expected M<JSON object>"),
        (b"Mop", "expected M<JSON object>"),
        (b"T", "expected T<show id"),
        (b"Tt_1 2", "expected T<show id"),
        (b"T" + b"x" * 65, "expected T<show id"),
    ],
)
def test_garbage_is_refused_saying_what_was_expected(payload: bytes, says: str) -> None:
    with pytest.raises(bus.MalformedPayload, match=r"^(malformed|not a bus payload)") as refused:
        bus.decode(payload)
    assert says in str(refused.value)


def test_a_refusal_quotes_a_bounded_part_of_the_payload() -> None:
    with pytest.raises(bus.MalformedPayload) as refused:
        bus.decode(b"E" + b"x" * 10_000)
    assert len(str(refused.value)) < 200 and str(refused.value).endswith("...")


kinds = st.sampled_from([b"E", b"P", b"B", b"D", b"C", b"R", b""])


@given(st.builds(bytes.__add__, kinds, st.binary(max_size=40)))
def test_anything_decodes_to_itself_or_is_refused(payload: bytes) -> None:
    """Every payload decode accepts is the canonical encoding of what it
    decoded to; everything else is refused, with MalformedPayload only."""
    try:
        message = bus.decode(payload)
    except bus.MalformedPayload:
        return
    assert message.encode() == payload


def test_a_stored_event_completes_to_the_wire_event_the_schema_describes() -> None:
    body = orjson.dumps(events.message_event_body("alice", "bob", "hi"))
    wire = orjson.loads(complete_event(body, b"1712-3"))
    assert wire == events.message_event("alice", "bob", "hi", "1712-3", 1712)


# --- what the producers really publish --------------------------------------------------


@pytest.fixture
async def http(server: Running) -> Http:
    return Http(server)


@pytest.fixture
async def listener(redis: Redis) -> AsyncIterator[PubSub]:
    pubsub = redis.pubsub()
    yield pubsub
    await pubsub.aclose()


async def next_payload(pubsub: PubSub, channel: str, *, presence: bool = False) -> bytes:
    """The next payload published on ``channel``: those on other channels are
    skipped, and presence markers too unless ``presence`` (a node republishes
    its counts when it sees fit). ``king`` room events are skipped as well,
    once they have decoded: the standing projector publishes them within
    ``standing_interval_s`` of a tip or a refund, at a moment the test does not
    choose, so they could land between any two payloads it waits for."""
    async with asyncio.timeout(PAYLOAD_TIMEOUT_S):
        while True:
            message: Any = await pubsub.get_message(ignore_subscribe_messages=True, timeout=None)
            if message is None or message["channel"].decode() != channel:
                continue
            data: bytes = message["data"]
            if not presence and data == bus.PRESENCE_CHANGED.encode():
                continue
            if _is_king_event(data):
                continue
            return data


def _is_king_event(data: bytes) -> bool:
    decoded = bus.decode(data)
    return isinstance(decoded, bus.RoomEvent) and orjson.loads(decoded.body)["type"] == "king"


async def test_what_the_producers_publish_decodes(
    server: Running, http: Http, settings: Settings, listener: PubSub
) -> None:
    keys = Keys(settings.redis_prefix)
    room, model_channel, fan_channel, commits = (
        keys.room_channel("alice"),
        keys.user_channel("alice"),
        keys.user_channel("bob"),
        keys.ledger_commits(),
    )
    model = await server.client("alice", "model")
    fan = await server.client("bob")
    status, _ = await http.call("PUT", "/v1/me/prices", "alice", "model", dm=4)
    assert status == 200
    await listener.subscribe(room, model_channel, fan_channel, commits)

    # The gateway's presence marker (a join), and room_event.lua (a say).
    await model.call("join", room="alice")
    assert bus.decode(await next_payload(listener, room, presence=True)) is bus.PRESENCE_CHANGED
    said = await model.call("say", room="alice", text="hello")
    event = bus.decode(await next_payload(listener, room))
    assert isinstance(event, bus.RoomEvent) and event.offset == said["offset"].encode()
    assert orjson.loads(event.body) == events.message_event_body("alice", "alice", "hello")
    wire = orjson.loads(complete_event(event.body, event.offset))
    assert await model.next_event("message") == wire

    # credit.lua, then the ledger writer's commit of it.
    credit = await http.credit("bob", 20)
    assert bus.decode(await next_payload(listener, fan_channel)) == bus.BalanceChanged(20)
    assert credit["tx"] in await committed_ids(listener, commits, credit["tx"])

    # tip.lua: the tip event in the room, the owner's new balance.
    await fan.call("join", room="alice")
    tip = await fan.call("tip", room="alice", amount=5, key="t1", text="bravo")
    tip_event = bus.decode(await next_payload(listener, room))
    assert isinstance(tip_event, bus.RoomEvent)
    assert tip_event.offset == tip["offset"].encode()
    assert orjson.loads(tip_event.body) == events.tip_event_body(
        "alice", "bob", 5, "bravo", tx=tip["tx"]
    )
    assert bus.decode(await next_payload(listener, model_channel)) == bus.BalanceChanged(5)

    # dm.lua: the DM, then the recipient's new balance.
    dm = await fan.call("dm", to="alice", text="psst", key="d1")
    delivered = bus.decode(await next_payload(listener, model_channel))
    assert isinstance(delivered, bus.DirectMessage)
    assert orjson.loads(delivered.event) == await model.next_event("dm")
    assert orjson.loads(delivered.event)["tx"] == dm["tx"]
    assert bus.decode(await next_payload(listener, model_channel)) == bus.BalanceChanged(9)

    # refund.lua: both sides' balances.
    status, refund = await http.call(
        "POST", "/v1/admin/refunds", "ops", "admin", tx=tip["tx"], key="r1"
    )
    assert status == 200, refund
    assert bus.decode(await next_payload(listener, fan_channel)) == bus.BalanceChanged(
        refund["balance"]
    )
    assert bus.decode(await next_payload(listener, model_channel)) == bus.BalanceChanged(4)

    # post_media (room_event.lua): the media event; unlock.lua: the owner's balance.
    picture = io.BytesIO()
    Image.new("RGB", (8, 8)).save(picture, "PNG")
    media = await server.node.media.create(
        "alice", Upload(picture, len(picture.getvalue())), 3, "teaser", None
    )
    posted = await model.call("post_media", room="alice", media=media.id, text="new")
    shown = bus.decode(await next_payload(listener, room))
    assert isinstance(shown, bus.RoomEvent) and shown.offset == posted["offset"].encode()
    assert orjson.loads(shown.body) == events.media_event_body(
        "alice", "alice", media.descriptor(), "new"
    )
    await fan.call("unlock", media=media.id, key="u1")
    assert bus.decode(await next_payload(listener, model_channel)) == bus.BalanceChanged(7)

    # A tip under a goal: the workflow's goal event (set), then the tip's and
    # the goal's, which money_lib's goal_count builds in Lua: the schema of
    # events.goal_event all the same.
    status, reply = await http.call("PUT", "/v1/me/goal", "alice", "model", title="Toy", target=50)
    assert status == 200, reply
    goal = reply["goal"]
    set_event = bus.decode(await next_payload(listener, room))
    assert isinstance(set_event, bus.RoomEvent)
    assert orjson.loads(set_event.body) == events.goal_event("alice", goal)
    await fan.call("tip", room="alice", amount=2, key="t2")
    assert isinstance(bus.decode(await next_payload(listener, room)), bus.RoomEvent)  # the tip
    counted = bus.decode(await next_payload(listener, room))
    assert isinstance(counted, bus.RoomEvent)
    assert orjson.loads(counted.body) == events.goal_event("alice", {**goal, "progress": 2})
    for client in (model, fan):
        await client.close()


async def committed_ids(pubsub: PubSub, channel: str, tx: str) -> set[str]:
    """The ids of the commit notifications up to the one carrying ``tx``."""
    seen: set[str] = set()
    while tx not in seen:
        message = bus.decode(await next_payload(pubsub, channel))
        assert isinstance(message, bus.LedgerCommitted), message
        seen.update(message.txs)
    return seen


# --- a node and garbage -------------------------------------------------------------------

GARBAGE = [b"", b"hello", b"\xff\xfe", b"E", b"E1-0 not json", b"Ex-1 {}", b"B12x", b"D1-0"]
# Well-formed, but of a kind the channel does not carry.
MISPLACED_ON_ROOM = [b"B5", b'D1-0 {"type":"dm"}', b"Cabc"]
MISPLACED_ON_USER = [b'E1-0 {"type":"message"}', b"P", b"Rabc"]


async def test_a_node_drops_garbage_and_delivers_what_follows(
    server: Running,
    http: Http,
    settings: Settings,
    redis: Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    keys = Keys(settings.redis_prefix)
    model = await server.client("alice", "model")
    await model.call("join", room="alice")
    fan = await server.client("bob")
    await fan.call("join", room="alice")
    with caplog.at_level(logging.WARNING):
        for payload in GARBAGE + MISPLACED_ON_ROOM:
            await redis.publish(keys.room_channel("alice"), payload)
        for payload in GARBAGE + MISPLACED_ON_USER:
            await redis.publish(keys.user_channel("bob"), payload)
        for payload in [*GARBAGE, b"P", b"B1"]:
            await redis.publish(keys.ledger_commits(), payload)
        # Room, user and ledger channels still work: a say, a credit's
        # balance push, a tip (acknowledged once its commit is heard), a DM.
        said = await model.call("say", room="alice", text="still here")
        assert (await fan.next_event("message"))["offset"] == said["offset"]
        await http.credit("bob", 10)
        assert (await fan.next_event("balance"))["balance"] == 10
        tip = await fan.call("tip", room="alice", amount=3, key="t1")
        assert (await model.next_event("tip"))["offset"] == tip["offset"]
        await model.call("dm", to="bob", text="thanks", key="d1")
        assert (await fan.next_event("dm"))["text"] == "thanks"
    dropped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("dropped")]
    sent = 3 * len(GARBAGE) + len(MISPLACED_ON_ROOM) + len(MISPLACED_ON_USER) + 2
    assert len(dropped) == sent, dropped
    assert any("not a bus payload" in line for line in dropped)
    assert any("BalanceChanged payload on room alice" in line for line in dropped)
    assert any("RoomEvent payload on user bob" in line for line in dropped)
    assert any("PresenceChanged payload on the ledger channel" in line for line in dropped)
    for client in (model, fan):
        await client.close()


async def test_an_event_body_that_is_not_json_reaches_no_member(
    server: Running, settings: Settings, redis: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    # A well-framed room event whose body does not parse as a JSON object
    # reaches neither JSON nor msgpack members, and the pub/sub reader goes on
    # to deliver what follows.
    keys = Keys(settings.redis_prefix)
    model = await server.client("alice", "model")
    packer = await server.client("bob", subprotocol="tokenchat.v1.msgpack")
    for client in (model, packer):
        await client.call("join", room="alice")
    said = await model.call("say", room="alice", text="first")
    assert (await packer.next_event("message"))["offset"] == said["offset"]
    ms, _, seq = said["offset"].partition("-")
    with caplog.at_level(logging.ERROR):
        await redis.publish(keys.room_channel("alice"), f"E{ms}-{int(seq) + 1} {{oops}}".encode())
        await asyncio.sleep(0.01)  # the next real offset is of a later millisecond
        after = await model.call("say", room="alice", text="second")
        event = await packer.next_event("message")
    assert event["offset"] == after["offset"] and event["text"] == "second"
    assert (await model.next_event("message"))["text"] == "first"
    assert (await model.next_event("message"))["text"] == "second"
    assert any("not a JSON object" in r.getMessage() for r in caplog.records)
    for client in (model, packer):
        await client.close()
