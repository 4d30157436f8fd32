"""Recovery covers a real outage (issue #16 part 6): a member away for 10 s
from a room at 200 events/s gets every event back, in order, once, through
the Python ``Session``'s reconnect (re-join with ``since``, then ``history``
pages until ``more`` is false, live events held meanwhile)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from tests.conftest import Running, eventually, token
from tokenchat.client_demo.client import Client, Session, offset_order
from tokenchat.protocol.limits import HISTORY_PAGE_LEN

StartServer = Callable[..., Awaitable[Running]]
RATE_PER_S = 200  # events a second in the room, the busy room
AWAY_S = 10.0  # the member's outage
AROUND_S = 1.5  # traffic before the outage and after the return


async def chatter(
    sender: Client, stop: asyncio.Event, said: list[tuple[tuple[int, int], str]]
) -> None:
    """Say lines in alice's room at RATE_PER_S until ``stop``; each
    (offset, text) in ``said``. Paced by the clock, in small concurrent
    batches, so a slow reply does not lower the rate."""
    loop = asyncio.get_running_loop()
    started, sent = loop.time(), 0
    while not stop.is_set():
        due = int((loop.time() - started) * RATE_PER_S) + 1
        texts = [f"m{n}" for n in range(sent, due)]
        sent = due
        replies = await asyncio.gather(
            *(sender.call("say", room="alice", text=text) for text in texts)
        )
        for reply, text in zip(replies, texts, strict=True):
            order = offset_order(reply["offset"])
            assert order is not None
            said.append((order, text))
        await asyncio.sleep(1 / RATE_PER_S)


async def test_a_member_away_10_s_at_200_events_per_s_gets_every_event_once_in_order(
    start_server: StartServer,
) -> None:
    running = await start_server(history_len=4000, commands_per_s=10_000.0, commands_burst=10_000)
    model = await running.client("alice", "model")
    await model.call("join", room="alice")
    sender = await running.client("carol")
    await sender.call("join", room="alice")
    # Bob's first reconnect attempt comes AWAY_S after the drop: the outage.
    bob = await Session.connect(
        running.ws_url,
        token("bob"),
        backoff_min_s=AWAY_S,
        backoff_base_s=AWAY_S,
        backoff_max_s=AWAY_S,
    )
    await bob.join("alice")
    received: list[str] = []
    gaps: list[dict[str, object]] = []

    async def read() -> None:
        async for event in bob:
            if event["type"] == "message":
                received.append(event["text"])
            elif event["type"] == "gap":
                gaps.append(event)

    reader = asyncio.create_task(read())
    stop = asyncio.Event()
    said: list[tuple[tuple[int, int], str]] = []
    talking = asyncio.create_task(chatter(sender, stop, said))
    await asyncio.sleep(AROUND_S)
    assert bob.client is not None and bob.client.ws.transport is not None
    bob.client.ws.transport.abort()  # the network drops: 1006, no close frame
    dropped_at = len(said)
    await asyncio.sleep(AWAY_S + AROUND_S)
    stop.set()
    await talking
    expected = [text for _, text in sorted(said)]

    async def all_in() -> bool:
        return len(received) >= len(expected)

    await eventually(all_in, timeout_s=30)
    await asyncio.sleep(0.2)  # nothing more (a duplicate) arrives after the last
    missed = len(said) - dropped_at
    # At least half the rate on a loaded machine: still 10 pages and more.
    assert missed >= AWAY_S * RATE_PER_S / 2 >= 10 * HISTORY_PAGE_LEN, missed
    assert bob.reconnects == 1 and not gaps
    assert received == expected  # every event, in order, once
    await bob.close()
    await reader
    await sender.close()
    await model.close()
