"""Property test: hostile menus and hostile item tips. Whatever values the
JSON codec lets through, PUT /v1/me/menu answers 200 or a 4xx refusal (never
a server failure), what it saved is what GET reads back, a refused PUT
changes nothing, and `tip` with hostile `item`/`max_price` values (both
subprotocols) gets a reply that is not a server failure; the books close.
Hypothesis runs in a worker thread, as in test_hostile_input.py."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import Http, Running, token
from tests.server.test_hostile_input import (
    REFUSALS,
    REPLY_TIMEOUT_S,
    json_frame,
    maybe,
    msgpack_frame,
    on_loop,
    texts,
    values,
)

pytestmark = pytest.mark.timeout(180)

EXAMPLES_MAX = 80  # each example is a request against the real server
RUN_DEADLINE_S = 25.0  # the whole run, so the suite stays fast

labels = maybe(
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=40)
)
prices = maybe(st.integers(min_value=1, max_value=1_000_000))


def mostly_absent(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """None (absent) three times in four, else ``strategy``."""
    return st.sampled_from((st.none(), st.none(), st.none(), strategy)).flatmap(lambda s: s)


# `<kept>`: the id of an item saved before (kept), replaced when sent.
items = st.lists(
    st.fixed_dictionaries(
        {"label": labels, "price": prices, "id": mostly_absent(st.just("<kept>") | values)}
    ),
    max_size=4,
)
menus = st.fixed_dictionaries({"items": maybe(items)})
# `<saved>`: an item of the menu saved last (its first), replaced when sent.
item_refs = maybe(st.sampled_from(["<saved>", "<saved>", "i_0123456789abcdef"]))
tips = st.fixed_dictionaries(
    {
        "room": st.just("alice"),
        "item": item_refs,
        "key": st.uuids().map(str),
        "max_price": mostly_absent(st.integers(0, 100) | values),
        "amount": mostly_absent(values),
        "text": mostly_absent(texts),
    }
)
actions = st.tuples(st.just("put"), menus) | st.tuples(st.sampled_from(["json", "msgpack"]), tips)


async def test_hostile_menus_and_item_tips_never_break_anything(
    start_server: Callable[..., Awaitable[Running]],
) -> None:
    running = await start_server(commands_per_s=100_000.0, commands_burst=100_000)
    http = Http(running)
    host = await running.client("alice", "model")
    await host.call("join", room="alice")
    await http.credit("bob", 1_000_000, key="seed")
    clients = {}
    for codec in ("json", "msgpack"):
        clients[codec] = await running.client("bob", subprotocol=f"tokenchat.v1.{codec}")
        await clients[codec].call("join", room="alice")
    saved: list[dict[str, Any]] = []
    outcomes: Counter[str] = Counter()
    ids = iter(range(1, 10**9))

    async def put(body: dict[str, Any]) -> None:
        if isinstance(body.get("items"), list):
            kept = iter(saved)
            body = {
                "items": [
                    {**i, "id": next(kept, {"id": "i_0000000000000000"})["id"]}
                    if isinstance(i, dict) and i.get("id") == "<kept>"
                    else i
                    for i in body["items"]
                ]
            }
        headers = {
            "Authorization": f"Bearer {token('alice', 'model')}",
            "Content-Type": "application/json",
        }
        async with httpx.AsyncClient(base_url=running.http_url, timeout=30) as client:
            response = await client.put("/v1/me/menu", content=json_frame(body), headers=headers)
        reply = response.json()
        assert response.status_code in (200, 400, 404), (body, reply)
        if response.status_code == 200:
            saved[:] = reply["items"]
            outcomes["put ok"] += 1
        else:
            assert reply["error"]["code"] in ("BAD_REQUEST", "NOT_FOUND"), reply
            outcomes["put refused"] += 1
        status, read = await http.call("GET", "/v1/users/alice/menu")
        assert status == 200 and read["items"] == saved, (body, read)

    async def tip(codec: str, fields: dict[str, Any]) -> None:
        if fields["item"] == "<saved>":
            fields = {**fields, "item": saved[0]["id"] if saved else "i_0000000000000000"}
        client = clients[codec]
        command_id = next(ids)
        frame_obj = {**fields, "type": "tip", "id": command_id}
        frame = json_frame(frame_obj) if codec == "json" else msgpack_frame(frame_obj)
        if frame is None:
            client, frame = clients["json"], json_frame(frame_obj)
        await client.send_raw(frame)
        async with asyncio.timeout(REPLY_TIMEOUT_S):
            while True:
                reply = await client.events.get()
                if reply["type"] in ("ok", "error") and reply.get("re") in (command_id, None):
                    break
        if reply["type"] == "ok":
            outcomes["tip ok"] += 1
        else:
            assert reply["code"] in REFUSALS, (fields, reply)
            outcomes[f"tip {reply['code']}"] += 1

    loop = asyncio.get_running_loop()
    deadline = loop.time() + RUN_DEADLINE_S

    @settings(
        max_examples=EXAMPLES_MAX,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(actions)
    def send(example: tuple[str, dict[str, Any]]) -> None:
        if loop.time() > deadline:
            return
        door, fields = example
        on_loop(loop, put(fields) if door == "put" else tip(door, fields))

    await asyncio.to_thread(send)
    assert outcomes["put ok"] and outcomes["put refused"], outcomes
    # After all that, a plain item tip still goes through, on both doors.
    await put({"items": [{"label": "Last", "price": 1}]})
    for codec in ("json", "msgpack"):
        before = outcomes["tip ok"]
        await tip(codec, {"room": "alice", "item": "<saved>", "key": f"last-{codec}"})
        assert outcomes["tip ok"] == before + 1, outcomes
    for client in clients.values():
        assert not client.closed
        await client.close()
    await host.close()
    result = await http.reconcile()
    assert result["ok"] is True and result["rejected"] == 0, result
