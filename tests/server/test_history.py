"""A room's history past 50 events (issue #16 part 6): stored by count and
by age, `join` with `since` in bounded pages with `more`, the `history`
command for the next ones, and live events that begin where the pages end.
Real Redis and Postgres; docs/protocol.md, "Paging history"."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from redis.asyncio import Redis

from tests.conftest import Http, Running, token
from tokenchat.client_demo.client import Client, Session
from tokenchat.protocol.limits import HISTORY_LEN_MAX, HISTORY_PAGE_LEN

StartServer = Callable[..., Awaitable[Running]]
# Room traffic faster than the default 20 commands/s of one session.
UNLIMITED = {"commands_per_s": 10_000.0, "commands_burst": 10_000}


async def model_room(running: Running) -> Client:
    model = await running.client("alice", "model")
    await model.call("join", room="alice")
    return model


async def say_many(client: Client, texts: list[str]) -> list[str]:
    """Say each of ``texts`` in alice's room, in order; their offsets."""
    return [(await client.call("say", room="alice", text=text))["offset"] for text in texts]


def texts_of(events: list[dict[str, Any]]) -> list[str]:
    return [event["text"] for event in events]


async def test_join_without_since_returns_the_newest_50_of_a_longer_history(
    start_server: StartServer, redis: Redis
) -> None:
    running = await start_server(history_len=300, **UNLIMITED)
    model = await model_room(running)
    lines = [f"l{n}" for n in range(120)]
    await say_many(model, lines)
    assert await redis.xlen(running.node.keys.room_history("alice")) == 120  # all kept
    fan = await running.client("bob")
    reply = await fan.call("join", room="alice")
    assert texts_of(reply["history"]) == lines[-HISTORY_LEN_MAX:]
    assert reply["recovered"] is True and reply["more"] is False
    await fan.close()
    await model.close()


async def test_join_since_pages_and_history_reads_up_to_the_live_events(
    start_server: StartServer,
) -> None:
    running = await start_server(history_len=1000, **UNLIMITED)
    model = await model_room(running)
    lines = [f"l{n}" for n in range(250)]
    offsets = await say_many(model, lines)
    fan = await running.client("bob")
    reply = await fan.call("join", room="alice", since=offsets[0])
    assert texts_of(reply["history"]) == lines[1 : 1 + HISTORY_PAGE_LEN]
    assert reply["recovered"] is True and reply["more"] is True
    # Live events flow from the join reply on, while the pages are read:
    # they begin exactly after the last event the pages reach.
    live = [f"live{n}" for n in range(5)]
    await say_many(model, live)
    pages = [reply["history"]]
    while reply["more"]:
        assert reply["next"] == pages[-1][-1]["offset"]  # nothing hidden here
        reply = await fan.call("history", room="alice", since=reply["next"])
        assert reply["room"] == "alice" and reply["recovered"] is True
        assert len(reply["history"]) <= HISTORY_PAGE_LEN
        pages.append(reply["history"])
    assert [len(page) for page in pages] == [100, 100, 49] and "next" not in reply
    paged = [event for page in pages for event in page]
    assert texts_of(paged) == lines[1:]  # none of the live ones: they come live
    received = [(await fan.next_event("message"))["text"] for _ in live]
    assert received == live
    # Once the pages are read, `history` reads up to the room's newest event.
    tail = await fan.call("history", room="alice", since=paged[-1]["offset"])
    assert texts_of(tail["history"]) == live and tail["more"] is False
    await fan.close()
    await model.close()


async def test_a_join_since_with_one_page_or_less_has_no_more(start_server: StartServer) -> None:
    running = await start_server(history_len=1000, **UNLIMITED)
    model = await model_room(running)
    offsets = await say_many(model, [f"l{n}" for n in range(HISTORY_PAGE_LEN + 1)])
    fan = await running.client("bob")
    reply = await fan.call("join", room="alice", since=offsets[0])
    assert len(reply["history"]) == HISTORY_PAGE_LEN and reply["more"] is False
    reply = await fan.call("join", room="alice", since=offsets[-1])
    assert reply["history"] == [] and reply["more"] is False and reply["recovered"] is True
    await fan.close()
    await model.close()


async def test_history_is_for_members_only(start_server: StartServer) -> None:
    running = await start_server(**UNLIMITED)
    model = await model_room(running)
    [offset] = await say_many(model, ["hello"])
    fan = await running.client("bob")
    reply = await fan.request("history", room="alice", since=offset)
    assert reply["type"] == "error" and reply["code"] == "NOT_IN_ROOM"
    await fan.call("join", room="alice")
    assert (await fan.call("history", room="alice", since="0-0"))["history"][0]["text"] == "hello"
    await fan.call("leave", room="alice")
    reply = await fan.request("history", room="alice", since=offset)
    assert reply["code"] == "NOT_IN_ROOM"
    reply = await fan.request("history", room="alice", since="yesterday")
    assert reply["code"] == "BAD_REQUEST" and "'since'" in reply["message"]
    await fan.close()
    await model.close()


async def test_history_since_a_trimmed_offset_is_a_gap(start_server: StartServer) -> None:
    running = await start_server(history_len=5, **UNLIMITED)
    model = await model_room(running)
    offsets = await say_many(model, [str(n) for n in range(10)])
    fan = await running.client("bob")
    await fan.call("join", room="alice")
    reply = await fan.call("history", room="alice", since=offsets[0])
    assert reply["recovered"] is False  # the gap signal, as `join` gives it
    assert texts_of(reply["history"]) == ["5", "6", "7", "8", "9"]  # the oldest kept on
    reply = await fan.call("history", room="alice", since=offsets[7])  # still kept
    assert reply["recovered"] is True and texts_of(reply["history"]) == ["8", "9"]
    await fan.close()
    await model.close()


async def test_a_moderator_clear_of_the_since_event_is_no_gap(start_server: StartServer) -> None:
    running = await start_server(**UNLIMITED)
    model = await model_room(running)
    fan = await running.client("bob")
    await fan.call("join", room="alice")
    carol = await running.client("carol")
    await carol.call("join", room="alice")
    # The history still reaches back past the line cleared: not a trimmed one.
    await say_many(model, ["before"])
    gone = (await carol.call("say", room="alice", text="spam"))["offset"]
    await say_many(model, ["after"])
    await model.call("clear", room="alice", user="carol")
    reply = await fan.call("history", room="alice", since=gone)
    assert reply["recovered"] is True and texts_of(reply["history"]) == ["after"]
    await carol.close()
    await fan.close()
    await model.close()


async def test_tips_keep_the_history_bound_too(start_server: StartServer, redis: Redis) -> None:
    running = await start_server(history_len=5, **UNLIMITED)
    model = await model_room(running)
    fan = await running.client("bob")
    await Http(running).credit("bob", 100)
    await fan.call("join", room="alice")
    for n in range(8):
        await fan.call("tip", room="alice", amount=1, key=f"t{n}")
    key = running.node.keys.room_history("alice")
    assert await redis.xlen(key) == 5  # tip.lua trims with the same history_add
    await fan.close()
    await model.close()


async def test_events_older_than_the_age_leave_the_history(
    start_server: StartServer, redis: Redis
) -> None:
    running = await start_server(history_len=1000, history_age_s=1.0, **UNLIMITED)
    model = await model_room(running)
    old = await say_many(model, [f"old{n}" for n in range(150)])
    key = running.node.keys.room_history("alice")
    assert await redis.xlen(key) == 150  # nothing is older than a second yet
    await asyncio.sleep(1.2)
    [new] = await say_many(model, ["new"])
    # Approximate trimming drops whole stream nodes (at most 100 events or
    # 4 KB each): most old events are gone, the new one stays.
    kept = await redis.xrange(key)
    assert len(kept) < 75 and kept[-1][0].decode() == new
    fan = await running.client("bob")
    reply = await fan.call("join", room="alice", since=old[0])
    assert reply["recovered"] is False and reply["history"][-1]["text"] == "new"
    await fan.close()
    await model.close()


async def test_pages_move_on_past_show_time_events_a_fan_cannot_see(
    start_server: StartServer,
) -> None:
    """A page of events of a ticket show the fan holds no ticket for is an
    empty `history`; `next` still moves on, so paging ends (the Session's)."""
    running = await start_server(history_len=1000, **UNLIMITED)
    model = await model_room(running)
    [before] = await say_many(model, ["before"])
    status, scheduled = await Http(running).call(
        "POST", "/v1/me/shows", "alice", "model",
        title="late show", price=5, starts_at=int(time.time() * 1000), min_s=1,
    )  # fmt: skip
    assert status == 201, scheduled
    await model.call("show_start", show=scheduled["show"])
    hidden = await say_many(model, [f"show {n}" for n in range(HISTORY_PAGE_LEN + 50)])
    carol = await running.client("carol")
    reply = await carol.call("join", room="alice", since=before)
    # The page: the show's `scheduled` and `running` events, then 98 lines she
    # may not see; `next` is the last of those.
    assert [event["type"] for event in reply["history"]] == ["show", "show"]
    assert reply["more"] is True and reply["next"] == hidden[HISTORY_PAGE_LEN - 3]
    page = await carol.call("history", room="alice", since=reply["next"])
    assert page["history"] == [] and page["more"] is False
    await carol.close()
    await asyncio.sleep(1.1)  # the show's min_s
    await model.call("show_end", show=scheduled["show"])
    await say_many(model, ["after"])
    session = await Session.connect(running.ws_url, token("carol"))
    session.rooms["alice"] = before  # as if she had seen it before a reconnect
    await session.join("alice")
    assert (await session.next_event("message"))["text"] == "after"
    await session.close()
    await model.close()


async def test_the_nodes_refill_after_a_pubsub_outage_reads_every_page(
    start_server: StartServer,
) -> None:
    """What a node delivers after its pub/sub connection came back
    (Node._missed_events): everything after the last event it delivered, past
    a page, up to the room's newest."""
    running = await start_server(history_len=1000, **UNLIMITED)
    model = await model_room(running)
    offsets = await say_many(model, [f"l{n}" for n in range(2 * HISTORY_PAGE_LEN + 50)])
    missed = await running.node.rooms.after("alice", offsets[0])
    assert [offset.decode() for offset, _ in missed] == offsets[1:]
    assert len(await running.node.rooms.after("alice", None)) == HISTORY_LEN_MAX
    await model.close()


async def test_a_refill_before_any_live_event_reads_from_the_join_not_the_newest_50(
    start_server: StartServer,
) -> None:
    """A node whose members joined a room and got no live event yet, then
    lost pub/sub while the room got more than 50 events: the refill starts
    where their joins' history ended (the hub's join floor), not at the
    newest 50, so none of the older ones is lost."""
    running = await start_server(history_len=1000, **UNLIMITED)
    model = await model_room(running)  # an empty room: the floor is 0-0
    fan = await running.client("bob")
    await fan.call("join", room="alice")
    running.node.hub.hold("alice")  # pub/sub down: live events held, not delivered
    offsets = await say_many(model, [f"l{n}" for n in range(120)])
    missed = await running.node._missed_events("alice")
    assert [offset.decode() for offset, _ in missed] == offsets
    running.node.hub.fill_gap("alice", missed)
    assert running.node.hub.refill_since("alice") == offsets[-1]
    await fan.close()
    await model.close()


async def test_msgpack_and_json_sessions_get_the_same_pages(start_server: StartServer) -> None:
    """JSON sessions get the stored JSON as it is, msgpack ones decoded: the
    same events either way."""
    running = await start_server(history_len=1000, **UNLIMITED)
    model = await model_room(running)
    offsets = await say_many(model, [f"héllo ✓ {n}" for n in range(HISTORY_PAGE_LEN + 5)])
    replies = []
    for subprotocol in ("tokenchat.v1.json", "tokenchat.v1.msgpack"):
        client = await running.client("bob", subprotocol=subprotocol)
        joined = await client.call("join", room="alice", since=offsets[0])
        page = await client.call("history", room="alice", since=joined["next"])
        replies.append((joined["history"], page["history"]))
        await client.close()
    assert replies[0] == replies[1]
    assert [e["offset"] for e in replies[0][0] + replies[0][1]] == offsets[1:]
    assert replies[0][1][-1]["text"] == f"héllo ✓ {HISTORY_PAGE_LEN + 4}"
    await model.close()


async def test_since_0_0_reads_a_room_from_its_first_event_and_knows_if_it_lost_any(
    start_server: StartServer,
) -> None:
    """A member who joined a room while it was empty has no offset: re-joining
    from "0-0" gets every event, `recovered` true while the room lost none."""
    running = await start_server(history_len=150, **UNLIMITED)
    model = await model_room(running)
    fan = await running.client("bob")
    assert (await fan.call("join", room="alice", since="0-0"))["history"] == []
    await say_many(model, [f"l{n}" for n in range(120)])
    reply = await fan.call("join", room="alice", since="0-0")
    assert reply["recovered"] is True and reply["more"] is True
    page = await fan.call("history", room="alice", since=reply["next"])
    assert texts_of(reply["history"] + page["history"]) == [f"l{n}" for n in range(120)]
    await say_many(model, [f"m{n}" for n in range(40)])  # 160 > 150: the oldest trimmed
    reply = await fan.call("join", room="alice", since="0-0")
    assert reply["recovered"] is False and reply["history"][0]["text"] == "l10"
    await fan.close()
    await model.close()


async def test_relayed_tips_keep_the_history_bound_too(
    start_server: StartServer, redis: Redis
) -> None:
    """Delivery mode `relay`: relay_deliver.lua adds the tips to the room's
    history through the same history_add (count and age)."""
    running = await start_server(delivery="relay", history_len=5, **UNLIMITED)
    model = await model_room(running)
    fan = await running.client("bob")
    await Http(running).credit("bob", 100)
    await fan.call("join", room="alice")
    for n in range(8):
        await fan.call("tip", room="alice", amount=1, key=f"t{n}")
    for _ in range(8):  # each relayed into the room (an age argument missing fails the script)
        await model.next_event("tip", timeout_s=10)
    assert await redis.xlen(running.node.keys.room_history("alice")) == 5
    assert len((await fan.call("join", room="alice"))["history"]) == 5
    await fan.close()
    await model.close()


async def test_since_a_real_offset_after_redis_lost_the_history_is_a_gap(
    start_server: StartServer, redis: Redis
) -> None:
    """The new stream Redis started after losing a room's history lost none
    of its own events, but a `since` from the old one (not "0-0") names an
    event it never held: a gap, as docs/protocol.md's last row says."""
    running = await start_server(history_len=1000, **UNLIMITED)
    model = await model_room(running)
    [seen] = await say_many(model, ["seen before the loss"])
    await redis.delete(running.node.keys.room_history("alice"))  # Redis lost it
    await say_many(model, ["after the loss"])
    fan = await running.client("bob")
    reply = await fan.call("join", room="alice", since=seen)
    assert reply["recovered"] is False and texts_of(reply["history"]) == ["after the loss"]
    await fan.close()
    await model.close()
