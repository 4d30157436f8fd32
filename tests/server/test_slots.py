"""Every Lua script touches one Redis Cluster slot (issue #16, part 2).

A script on a cluster runs on the node of its first key, and Redis refuses
(CROSSSLOT, or "non local key" halfway through) one whose keys span slots.
These tests record the KEYS of every script call the server makes while it
serves each paid action and its own traffic (hello, chat, presence, the
ledger writer), and check that they hash to one slot (CRC16 of the hash
tag, redis-py's ``key_slot``), except a paid action's declared
``delivery_keys``: on a cluster its delivery goes through the relay
(docs/architecture.md, "Redis Cluster").
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from importlib import resources
from typing import Any

import pytest
from PIL import Image
from redis.commands.core import AsyncScript
from redis.crc import key_slot

from tests.conftest import Http, Running
from tokenchat.server.catalog.media import Upload
from tokenchat.server.discovery import _PRESENCE_LUA
from tokenchat.server.economy import relay
from tokenchat.server.economy.actions import ACTIONS, Action
from tokenchat.server.economy.batcher import LuaScript, ScriptBatcher
from tokenchat.server.economy.economy import MenuItem
from tokenchat.server.economy.scripts import HISTORY_LIB, MONEY_LIB, script_source
from tokenchat.server.errors import ServiceError

# Prepended to scripts, never run alone.
LIBS = {MONEY_LIB, HISTORY_LIB}


def _slot(key: Any) -> int:
    return key_slot(key if isinstance(key, bytes) else str(key).encode())


class Recorder:
    """(script name, keys) of every script call, by either way the server
    calls scripts: a ``ScriptBatcher`` or redis-py's ``register_script``."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[Any]]] = []
        # Each script as written, and after the history library (room_event,
        # relay_deliver: scripts.lua_script's libs).
        self._by_source = {}
        for name in _script_names():
            if name not in LIBS:
                self._by_source[script_source(name)] = name
                self._by_source[f"{script_source(HISTORY_LIB)}\n{script_source(name)}"] = name
        # The one script written inline (a model's presence in her room).
        self._by_source[_PRESENCE_LUA] = "discovery presence"
        self._by_sha = {
            hashlib.sha1(source.encode()).hexdigest(): name
            for source, name in self._by_source.items()
        }

    def batcher_call(self, script: LuaScript, keys: Sequence[Any]) -> None:
        self.calls.append((script.name, list(keys)))

    def raw_calls(self, commands: Sequence[Sequence[Any]]) -> None:
        """EVALSHA commands sent as they are (the delivery relay's pipeline)."""
        for command in commands:
            if str(command[0]).upper() == "EVALSHA":
                sha = command[1].decode() if isinstance(command[1], bytes) else str(command[1])
                count = int(command[2])
                self.calls.append(
                    (self._by_sha.get(sha, "<unknown>"), list(command[3 : 3 + count]))
                )

    def registered_call(self, script: AsyncScript, keys: Sequence[Any]) -> None:
        source = script.script.decode() if isinstance(script.script, bytes) else script.script
        self.calls.append((self._by_source.get(source, "<unknown>"), list(keys)))


def _script_names() -> list[str]:
    folder = resources.files("tokenchat.server.economy").joinpath("lua")
    return sorted(p.name.removesuffix(".lua") for p in folder.iterdir() if p.name.endswith(".lua"))


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> Iterator[Recorder]:
    recorder = Recorder()
    call = ScriptBatcher.call
    run = AsyncScript.__call__

    async def recording_call(
        self: ScriptBatcher, script: LuaScript, keys: Sequence[Any], args: Sequence[Any]
    ) -> Any:
        recorder.batcher_call(script, keys)
        return await call(self, script, keys, args)

    async def recording_run(
        self: AsyncScript, keys: Sequence[Any] = (), args: Sequence[Any] = (), client: Any = None
    ) -> Any:
        recorder.registered_call(self, keys)
        return await run(self, keys=keys, args=args, client=client)

    send = relay.send_pipeline

    async def recording_send(redis: Any, commands: Sequence[Sequence[Any]]) -> list[Any]:
        recorder.raw_calls(commands)
        return await send(redis, commands)

    monkeypatch.setattr(relay, "send_pipeline", recording_send)
    monkeypatch.setattr(ScriptBatcher, "call", recording_call)
    monkeypatch.setattr(AsyncScript, "__call__", recording_run)
    yield recorder


async def _attempt(call: Any) -> None:
    """Run an economy call for its script's keys: a refusal is fine here."""
    with contextlib.suppress(ServiceError):
        await call


async def _every_paid_action(server: Running, http: Http) -> None:
    node = server.node
    economy = node.economy
    system = "sys:test"
    model = await server.client("alice", "model")
    fan = await server.client("bob")
    await model.call("join", room="alice")
    await fan.call("join", room="alice")
    await http.credit("bob", 500)  # credit
    await fan.call("say", room="alice", text="hi")  # room_event
    tip = await fan.call("tip", room="alice", amount=5, key="t1")  # tip
    await economy.set_menu("alice", [MenuItem(None, "wave", 3)])
    (item,) = await economy.menu("alice")
    await fan.call("tip", room="alice", item=item["id"], key="t2")  # tip_item
    await fan.call("dm", to="alice", text="psst", key="d1")  # dm
    picture = io.BytesIO()
    Image.new("RGB", (8, 8)).save(picture, "PNG")
    media = await node.media.create(
        "alice", Upload(picture, len(picture.getvalue())), 3, "teaser", None
    )
    await fan.call("unlock", media=media.id, key="u1")  # unlock
    await economy.refund(tip["tx"], initiator=system, key="r1")  # refund
    escrow = f"esc:test:{uuid.uuid4().hex[:8]}"
    for key in ("h1", "h2"):  # hold, then release and escrow_refund of it
        await economy.hold(
            "bob", escrow, 4, subject="s", key=key, request=key, meta={}, initiator=system
        )
    await _attempt(economy.release(escrow, "alice", initiator=system, key="rel", meta={}))
    await _attempt(economy.escrow_refund(escrow, "bob", initiator=system, key="er", meta={}))
    await _attempt(economy.payout(escrow, initiator=system, key="p", meta={}))
    await _attempt(
        economy.meter("bob", escrow, "alice", 1, initiator=system, key="m", request="m", meta={})
    )
    # A ticket show (show_state, show_load, ticket, ticket_refund), a goal
    # (goal_state, an all-or-nothing one's goal_refund) and a private show
    # (the lease, user events, the meter).
    show = await node.shows.create("alice", "show", 5, int(time.time() * 1000) + 60_000, 60)
    await fan.call("buy_ticket", room="alice", show=show["show"], key="tk")
    await _attempt(node.shows.start("alice", show["show"]))
    await _attempt(node.shows.cancel("alice", show["show"]))
    await _attempt(economy.ticket_refund(show["show"], "bob", initiator=system, key="tr"))
    await node.goals.set("alice", "goal", 1000, None, True)
    await fan.call("tip", room="alice", amount=2, key="t3")
    await _attempt(node.goals.delete("alice"))
    await node.privates.set_prices("alice", 1, 60)
    private = await node.privates.request("bob", "alice", 1, "pv")
    await _attempt(node.privates.accept("alice", private["show"]))
    await _attempt(node.privates.end("bob", private["show"]))
    await _attempt(economy.goal_refund(escrow, "bob", 1, initiator=system, key="gr", goal="g"))
    await _attempt(
        economy.clawback("bob", 1, kind="chargeback", initiator=system, key="c", meta={})
    )
    await node.rooms.node_beat(node.id, 30_000)  # node_beat (also at every heartbeat)
    await node.sweeper.sweep_once()  # lease (also the private meter's)
    await http.reconcile()
    for client in (model, fan):
        await client.close()
    # A deleted account: her lines out of histories (clear), her DMs out of
    # inboxes and the archive stream (dm_forget), her balance forfeited.
    status, _ = await http.call("DELETE", "/v1/me", "bob", confirm="bob")
    assert status == 200


# Per delivery mode (TOKENCHAT_DELIVERY): the scripts whose keys cross
# slots, all on a single Redis only, and the scripts that mode never calls.
# `script` (a single Redis): a tip's and a menu tip's delivery (the room's
# history and show marker) and a ticket's (a running show's marker), all
# declared `delivery_keys`, and show_state.lua's write of the room's marker
# beside the show's hash; the relay's scripts are not called. `relay` (what
# a Redis Cluster runs): none crosses, every script is called.
CROSSING = {"script": {"tip", "tip_item", "ticket", "show_state"}, "relay": set()}
NOT_CALLED = {"script": {"relay_deliver", "show_marker"}, "relay": set()}


@pytest.mark.parametrize("delivery", ["script", "relay"])
async def test_every_script_call_keeps_to_one_slot_but_declared_deliveries(
    start_server: Callable[..., Awaitable[Running]], recorder: Recorder, delivery: str
) -> None:
    server = await start_server(delivery=delivery)
    await _every_paid_action(server, Http(server))
    by_sha: dict[str, Action] = {action.script.sha: action for action in ACTIONS}
    by_name = {action.name: action for action in by_sha.values()}
    called: set[str] = set()
    crossing: dict[str, set[str]] = {}
    spanning: dict[str, list[Any]] = {}  # scripts of no action, keys of two slots
    for label, keys in recorder.calls:
        name = label.removesuffix(" (relay)")  # an action's relay-mode variant
        called.add(name)
        action = by_name.get(name)
        if action is not None:
            money = [
                key
                for key, key_name in zip(keys, action.all_keys, strict=True)
                if key_name not in action.delivery_keys
            ]
            delivered = [
                key
                for key, key_name in zip(keys, action.all_keys, strict=True)
                if key_name in action.delivery_keys
            ]
            assert len({_slot(key) for key in money}) == 1, (name, money)
            # The delivery's keys are one slot too: the room's, for the relay.
            assert len({_slot(key) for key in delivered}) <= 1, (name, delivered)
            if delivered and {_slot(delivered[0])} != {_slot(money[0])}:
                crossing.setdefault(name, set()).update(str(k) for k in delivered)
        elif len({_slot(key) for key in keys}) > 1:
            spanning[name] = keys
    crossing.update({name: {str(k) for k in keys} for name, keys in spanning.items()})
    assert "<unknown>" not in called
    # Every paid action ran, and the scripts of the server's own traffic.
    assert {action.name for action in ACTIONS} <= called, sorted(
        {action.name for action in ACTIONS} - called
    )
    expected = set(_script_names()) - LIBS - NOT_CALLED[delivery]
    missing = expected - called
    # Which scripts no call above reached (listed in the failure).
    assert not missing, sorted(missing)
    assert set(crossing) == CROSSING[delivery], crossing
