"""The paid-action registry against its scripts, the ledger schema, the
protocol and a real Redis and Postgres: a declaration that disagrees with its
script (a name used but not declared, declared but unused, a refusal with no
error) fails here, not in production."""

from __future__ import annotations

import dataclasses
import io
import re
import time
import typing
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from PIL import Image

from tests.conftest import Http, Running, pg
from tokenchat.protocol import Command
from tokenchat.server.catalog.media import Upload
from tokenchat.server.config import Settings
from tokenchat.server.economy import actions, scripts
from tokenchat.server.economy.actions import (
    ACTIONS,
    BY_COMMAND,
    BY_KIND,
    COMMON_ARGS,
    COMMON_KEYS,
    COMMON_REFUSALS,
    DM,
    ESCROW_REFUND,
    REFUNDABLE_KINDS,
    SPEND_KINDS,
    TIP,
    Action,
    Delivery,
    refusal_error,
)
from tokenchat.server.economy.batcher import LuaScript, ScriptBatcher
from tokenchat.server.economy.scripts import (
    MONEY_LIB,
    money_script,
    names_used,
    script_source,
    strip_comments,
)
from tokenchat.server.errors import BadRequest, Conflict, InsufficientFunds, Unavailable

# Statuses the runner handles itself: success, a duplicate, a balance to
# load, a tip's goal escrow to declare.
RUNNER_STATUSES = {"OK", "DUP", "NOT_LOADED", "GOAL_ESCROW"}
STATUS_RE = re.compile(r"\{\s*'([A-Z_]+)'")


def code_of(name: str) -> str:
    return strip_comments(script_source(name))


def statuses(name: str) -> set[str]:
    """Every status a script's code can return (`{'X'` in its tables)."""
    return set(STATUS_RE.findall(code_of(name)))


@pytest.fixture(params=ACTIONS, ids=lambda action: action.name)
def action(request: pytest.FixtureRequest) -> Action:
    return typing.cast(Action, request.param)


# --- declarations against scripts ----------------------------------------------------


# Prepended to a money script by `only_declared_keys`: every command a script
# sends must name a key the call declared (TIME names none, PUBLISH a
# channel), as Redis Cluster requires: it routes a script by its KEYS.
CHECKED_CALL = """
local checked_declared = {}
for _, k in ipairs(KEYS) do checked_declared[k] = true end
local function checked_call(command, ...)
  local name = string.upper(command)
  local key = select(1, ...)
  if name ~= 'TIME' and name ~= 'PUBLISH' and not checked_declared[key] then
    error('undeclared key ' .. tostring(key) .. ' in ' .. name)
  end
  return redis.call(command, ...)
end
"""


def only_declared_keys(script: LuaScript) -> LuaScript:
    """The script, failing (a Redis error) on any key its call did not declare."""
    assert "redis.pcall" not in script.source
    checked = script.source.replace("redis.call(", "checked_call(")
    return LuaScript(script.name, CHECKED_CALL + checked, retry_safe=script.retry_safe)


def test_money_lib_uses_exactly_the_common_names() -> None:
    keys, args = names_used(script_source(MONEY_LIB))
    assert keys == set(COMMON_KEYS) and args == set(COMMON_ARGS)


def test_each_script_uses_exactly_what_its_action_declares(action: Action) -> None:
    lib_keys, lib_args = names_used(script_source(MONEY_LIB))
    keys, args = names_used(script_source(action.name))
    assert keys | lib_keys == set(action.all_keys), "KEY names used vs declared"
    assert args | lib_args == set(action.all_args), "ARG names used vs declared"
    # Its own names, each used by its own part (money_lib uses only the common ones).
    assert set(action.keys) <= keys and set(action.args) <= args


def test_no_script_indexes_keys_or_argv(action: Action) -> None:
    for name in (MONEY_LIB, action.name):
        source = script_source(name)
        assert "KEYS[" not in source and "ARGV[" not in source, name


def test_the_loaded_script_has_positions_for_every_name(action: Action) -> None:
    source = action.script.source
    assert not re.search(r"(?<![\w.])(KEY|ARG)\.\w", source)
    used = {int(n) for n in re.findall(r"KEYS\[(\d+)\]", source)}
    assert used == set(range(1, len(action.all_keys) + 1))
    used = {int(n) for n in re.findall(r"ARGV\[(\d+)\]", source)}
    assert used == set(range(1, len(action.all_args) + 1))
    # The tip's own part: its first own key is KEYS[3], after idem and outbox;
    # its delivery's trim (ROOM_EVENT_ARGS) comes after its own arguments.
    if action is TIP:
        assert "room_event(KEYS[5], ARGV[14], ARGV[15], KEYS[7]," in source


def test_every_xadd_to_a_room_history_is_history_adds() -> None:
    """One trim for every room event (issue #16 part 6): the only XADDs are
    history_add's and those to other streams (outbox, inboxes, DM log)."""
    lua = Path(scripts.__file__).parent / "lua"
    xadds = {
        path.stem: re.findall(r"XADD', ([\w.\[\]]+)", scripts.strip_comments(path.read_text()))
        for path in lua.glob("*.lua")
    }
    assert {name: keys for name, keys in xadds.items() if keys} == {
        "history_lib": ["key"],
        "money_lib": ["deliveries_key", "KEY.outbox"],  # relay mode's, the outbox
        "dm": ["KEY.inbox", "KEY.dm_log"],
        "user_event": ["KEYS[1]"],  # a user's inbox
    }
    for name in ("room_event", "relay_deliver", "money_lib"):
        assert "history_add(" in scripts.strip_comments(scripts.script_source(name)), name
    for action in actions.ACTIONS:
        room_event = action.delivery is actions.Delivery.ROOM_EVENT
        assert action.all_args[-2:] == actions.ROOM_EVENT_ARGS or not room_event


def test_the_loader_refuses_undeclared_names_and_positions(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with pytest.raises(ValueError, match=r"undeclared ARG\.amount"):
        money_script("tip", TIP.all_keys, tuple(a for a in TIP.all_args if a != "amount"))
    with pytest.raises(ValueError, match=r"undeclared KEY\.history"):
        money_script("tip", tuple(k for k in TIP.all_keys if k != "history"), TIP.all_args)

    def with_raw_keys(name: str) -> str:
        return script_source(name) + ("local x = KEYS[1]\n" if name == "tip" else "")

    monkeypatch.setattr(scripts, "script_source", with_raw_keys)
    with pytest.raises(ValueError, match="indexes KEYS"):
        money_script("tip", TIP.all_keys, TIP.all_args)


def test_every_action_passes_its_user_through_the_one_gate(action: Action) -> None:
    # The per-user check (funds today, spending limits later) runs once per call.
    assert len(re.findall(r"\buser_gate\(", code_of(action.name))) == 1
    assert "INSUFFICIENT_FUNDS" not in code_of(action.name), "funds are the gate's"


def test_every_refusal_a_script_returns_maps_to_an_error(action: Action) -> None:
    returned = (statuses(MONEY_LIB) | statuses(action.name)) - RUNNER_STATUSES
    for status in returned:
        assert status in action.refusals or status in COMMON_REFUSALS, status
        assert not refusal_error(action, status, "7").message.startswith("refused:")
    # Nothing declared that its script never returns.
    assert set(action.refusals) <= statuses(action.name)


def test_common_refusals_are_returned_by_some_script() -> None:
    returned = statuses(MONEY_LIB).union(*(statuses(a.name) for a in ACTIONS))
    assert set(COMMON_REFUSALS) <= returned


def test_refusals_become_the_errors_of_the_contract() -> None:
    tip_min = refusal_error(TIP, "TIP_MIN", "50")
    assert isinstance(tip_min, BadRequest) and "tip_min, 50" in tip_min.message
    funds = refusal_error(TIP, "INSUFFICIENT_FUNDS", "5")
    assert isinstance(funds, InsufficientFunds) and "balance is 5 tokens" in funds.message
    assert isinstance(refusal_error(TIP, "BACKLOG", ""), Unavailable)
    refunded = refusal_error(BY_KIND["refund"], "REFUNDED", "")
    assert isinstance(refunded, Conflict)
    # A status only another action declares is not this one's.
    assert not isinstance(refusal_error(TIP, "REFUNDED", ""), Conflict)


def test_the_kinds_a_script_writes_are_its_declared_kinds(action: Action) -> None:
    code = code_of(action.name)
    literal = set(re.findall(r"outbox_add\('(\w+)'", code))
    if "outbox_add(ARG.kind" in code:  # the caller picks one (credit, purchase)
        assert literal == set() and len(action.kinds) > 1
    else:
        assert literal == set(action.kinds)


# --- declarations against the rest ---------------------------------------------------


def test_call_builds_positions_and_rejects_missing_or_extra_names() -> None:
    keys = {name: f"k:{name}" for name in TIP.all_keys}
    args = {name: f"a:{name}" for name in TIP.all_args}
    script_keys, script_args = TIP.call(keys, args)
    assert script_keys == [f"k:{name}" for name in TIP.all_keys]
    assert script_args[:2] == ["a:request", "a:tx"]
    with pytest.raises(TypeError, match=r"missing \['history'\]"):
        TIP.call({k: v for k, v in keys.items() if k != "history"}, args)
    with pytest.raises(TypeError, match=r"unexpected \['colour'\]"):
        TIP.call(keys, {**args, "colour": "red"})
    with pytest.raises(TypeError, match=r"missing \['amount'\], unexpected \['amonut'\]"):
        TIP.call(keys, {**{k: v for k, v in args.items() if k != "amount"}, "amonut": 1})


def test_a_declaration_cannot_shadow_a_common_name() -> None:
    with pytest.raises(ValueError, match="declared twice"):
        Action(
            name="x",
            kinds=("tip",),
            keys=("idem",),
            args=(),
            refundable=False,
            delivery=Delivery.BALANCE_PUSH,
        )
    with pytest.raises(ValueError, match="delivery keys"):
        Action(
            name="x",
            kinds=("tip",),
            keys=(),
            args=(),
            refundable=False,
            delivery=Delivery.ROOM_EVENT,
            delivery_keys=("history",),
        )


def test_refund_rules_follow_refundable() -> None:
    assert {"tip", "dm", "unlock"} == REFUNDABLE_KINDS
    for kind, action in BY_KIND.items():
        assert (kind in REFUNDABLE_KINDS) is action.refundable
    assert {"tip", "dm", "unlock", "hold", "meter", "ticket"} == SPEND_KINDS


def test_each_kind_has_one_named_owner_whose_rules_every_writer_shares() -> None:
    # Shared kinds name their owner, not whichever action is declared first.
    assert BY_KIND["tip"] is TIP and BY_KIND["escrow_refund"] is ESCROW_REFUND
    assert {a.name for a in ACTIONS if "tip" in a.kinds} == {"tip", "tip_item"}
    assert {a.name for a in ACTIONS if "escrow_refund" in a.kinds} == {
        "escrow_refund",
        "ticket_refund",
        "goal_refund",
    }
    assert set(BY_KIND) == {kind for action in ACTIONS for kind in action.kinds}
    for kind, owner in BY_KIND.items():
        assert kind in owner.kinds
        for action in ACTIONS:
            if kind in action.kinds:
                assert (action.refundable, action.limited) == (owner.refundable, owner.limited)
    # The check refuses an unowned kind, an owner that does not write its
    # kind, and a writer whose rules differ from its kind's owner's.
    owners = dict(BY_KIND)
    with pytest.raises(ValueError, match=r"without an owner \['tip'\]"):
        actions._kind_owners({k: v for k, v in owners.items() if k != "tip"})
    with pytest.raises(ValueError, match="dm owns tip but does not write it"):
        actions._kind_owners({**owners, "tip": DM})
    refundable_hold = dataclasses.replace(actions.HOLD, refundable=True)
    monkeypatched = (*ACTIONS, refundable_hold)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(actions, "ACTIONS", monkeypatched)
        with pytest.raises(ValueError, match="hold writes hold under other rules than hold"):
            actions._kind_owners(owners)


def test_each_paid_command_is_a_protocol_command_with_a_key() -> None:
    assert set(BY_COMMAND) <= set(typing.get_args(Command))
    for command, action in BY_COMMAND.items():
        assert "key" in command.__dataclass_fields__, action.name
        assert action.serve is not None


async def test_every_kind_passes_the_ledgers_kind_check(settings: Settings) -> None:
    conn = await asyncpg.connect(settings.database_url)
    try:
        await conn.execute(f'SET search_path TO "{settings.database_schema}"')
        insert = """INSERT INTO ledger_transactions
            (id, kind, initiator, idem_key, reverses, request, reply, applied_ms, outbox_id)
            VALUES ($1, $2, 'u:ops', $1, $3, '{}', '{}', 1, '1-0')"""
        async with conn.transaction():
            # Rolled back at the end: the postings trigger checks at commit.
            await conn.execute(insert, "original", "credit", None)
            for kind in BY_KIND:
                reverses = "original" if kind == "refund" else None
                await conn.execute(insert, f"t-{kind}", kind, reverses)
            with pytest.raises(asyncpg.CheckViolationError):
                async with conn.transaction():
                    await conn.execute(insert, "t-bogus", "bogus", None)
            # Nothing more: the CHECK names the registry's kinds and `spend`,
            # a kind of old rows that no code writes.
            check = await conn.fetchval(
                """SELECT pg_get_constraintdef(oid) FROM pg_constraint
                   WHERE conname = 'ledger_transactions_kind_check'
                     AND conrelid = 'ledger_transactions'::regclass"""
            )
            assert set(re.findall(r"'(\w+)'", check)) == {*BY_KIND, "spend"}
            raise _Rollback
    except _Rollback:
        pass
    finally:
        await conn.close()


class _Rollback(Exception):
    pass


# --- each action, applied for real -----------------------------------------------------


async def test_each_action_round_trips_through_redis_and_postgres(
    server: Running, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    economy = server.node.economy
    calls: list[tuple[str, list[Any]]] = []
    real_call = ScriptBatcher.call

    async def recording(self: ScriptBatcher, script: LuaScript, keys: Any, args: Any) -> Any:
        calls.append((script.name, list(keys)))
        return await real_call(self, script, keys, args)

    monkeypatch.setattr(ScriptBatcher, "call", recording)
    # Every key each script touches is one its call declared (a key read out
    # of a hash, like a goal's escrow, would fail here).
    for action in ACTIONS:
        monkeypatch.setitem(economy._scripts, action.name, only_declared_keys(action.script))
    http = Http(server)
    credit = await economy.credit("bob", 100, initiator="u:ops", key="c1")
    assert credit["balance"] == 100
    status, _ = await http.call("PUT", "/v1/me/prices", "alice", "model", dm=7)
    assert status == 200
    tip = await economy.tip("bob", "alice", "alice", 30, "hi", "t1", tip_min=1)
    dm = await economy.dm("bob", "alice", "hello", "d1", max_price=7)
    assert (tip["balance"], dm["balance"], dm["price"]) == (70, 63, 7)
    assert (await economy.tip("bob", "alice", "alice", 30, "hi", "t1", 1))["duplicate"]
    status, menu = await http.call(
        "PUT", "/v1/me/menu", "alice", "model", items=[{"label": "Dance", "price": 3}]
    )
    assert status == 200
    item = menu["items"][0]["id"]
    tip_item = await economy.tip_item("bob", "alice", "alice", item, "", "ti1", max_price=3)
    assert tip_item["balance"] == 60 and tip_item["item"] == {"id": item, "label": "Dance"}
    refund = await economy.refund(tip["tx"], initiator="u:ops", key="r1")
    assert refund["balance"] == 90 and refund["refunds"] == tip["tx"]
    with pytest.raises(Conflict, match="not a spend"):
        await economy.refund(credit["tx"], initiator="u:ops", key="r2")
    with pytest.raises(InsufficientFunds):
        await economy.tip("bob", "alice", "alice", 91, "", "t2", 1)
    picture = io.BytesIO()
    Image.new("RGB", (8, 8)).save(picture, "PNG")
    media = await server.node.media.create(
        "alice", Upload(picture, len(picture.getvalue())), 5, "a teaser", None
    )
    unlock = await economy.unlock("bob", media.id, "alice", "u1", max_price=5)
    assert (unlock["balance"], unlock["price"]) == (85, 5)
    # Escrow: two holds, one released to the model, one refunded to the fan;
    # an empty escrow refuses a second release.
    held = [
        await economy.hold(
            "bob", f"esc:test:e{n}", 10, subject=f"e{n}", key=f"h{n}", request="{}", meta={}
        )
        for n in (1, 2)
    ]
    assert [h["balance"] for h in held] == [75, 65] and held[0]["subject"] == "e1"
    release = await economy.release("esc:test:e1", "alice", initiator="sys:test", key="s1", meta={})
    back = await economy.escrow_refund(
        "esc:test:e2", "bob", initiator="sys:test", key="s2", meta={}
    )
    assert (release["amount"], back["amount"], back["balance"]) == (10, 10, 75)
    with pytest.raises(Conflict, match="holds nothing"):
        await economy.release("esc:test:e1", "alice", initiator="sys:test", key="s3", meta={})
    # A private show's meter: the escrow first (10), then the fan (5).
    held.append(
        await economy.hold("bob", "esc:test:e3", 10, subject="e3", key="h3", request="{}", meta={})
    )
    meter = await economy.meter(
        "bob", "esc:test:e3", "alice", 15, initiator="sys:test", key="m1", request="{}", meta={}
    )
    assert (meter["balance"], meter["escrow"], meter["amount"]) == (60, 0, 15)  # 75 - 15

    # A ticket show's ticket and its refund (server/economy/shows.py).
    show = await server.node.shows.create("alice", "a show", 5, int(time.time() * 1000), 60)
    ticket = await economy.ticket("bob", "alice", show["show"], "k1")
    ticket_back = await economy.ticket_refund(show["show"], "bob", initiator="sys:test", key="tr1")
    assert ticket_back["balance"] == ticket["balance"] + 5 and ticket_back["amount"] == 5

    # An all-or-nothing tip goal (server/economy/goals.py): a tip held in its
    # escrow, given back by GOAL_REFUND when the model deletes the goal.
    goal = await server.node.goals.set("alice", "a goal", 1000, None, True)
    goal_tip = await economy.tip("bob", "alice", "alice", 4, "", "g1", 1)
    assert goal_tip["goal"]["progress"] == 4 and goal_tip["balance"] == ticket_back["balance"] - 4
    goal_item_tip = await economy.tip_item("bob", "alice", "alice", item, "", "g2", max_price=3)
    assert goal_item_tip["goal"]["progress"] == 7
    # The goal's escrow is a declared key of both tips' calls.
    escrow_key = server.node.keys.balance(f"esc:goal:{goal['id']}")
    for name in ("tip", "tip_item"):
        assert any(escrow_key in keys for called, keys in calls if called == name), name
    assert (await server.node.goals.delete("alice"))["settled"] is True
    [goal_back] = await pg(
        settings,
        "SELECT id FROM ledger_transactions WHERE idem_key = $1",
        f"goal-refund:{goal['id']}:bob",
    )

    # A payout (server/economy/payouts.py): a hold into its escrow, then the
    # whole escrow to sys:payouts; a second payout of it moves nothing.
    payout_hold = await economy.hold(
        "alice", "esc:test:e4", 6, subject="e4", key="h4", request="{}", meta={}
    )
    payout = await economy.payout("esc:test:e4", initiator="sys:test", key="po1", meta={})
    assert payout["amount"] == 6
    with pytest.raises(Conflict, match="holds nothing"):
        await economy.payout("esc:test:e4", initiator="sys:test", key="po2", meta={})

    # A purchase's clawback (a chargeback, into the mint), then a deleted
    # account's forfeit of the whole rest (server/http/accounts.py).
    clawed = await economy.clawback(
        "bob", 5, kind="chargeback", initiator="sys:payments", key="cb1", meta={}
    )
    assert (clawed["clawed"], clawed["shortfall"]) == (5, 0)
    forfeit = await economy.clawback(
        "bob", 2**52, kind="forfeit", initiator="u:bob", key="f1", meta={}
    )
    assert forfeit["clawed"] == clawed["balance"] and forfeit["balance"] == 0

    rows = await pg(settings, "SELECT id, kind FROM ledger_transactions")
    assert {r["id"]: r["kind"] for r in rows} == {
        payout_hold["tx"]: "hold",
        payout["tx"]: "payout",
        clawed["tx"]: "chargeback",
        forfeit["tx"]: "forfeit",
        goal_tip["tx"]: "tip",
        goal_item_tip["tx"]: "tip",
        goal_back["id"]: "escrow_refund",
        ticket["tx"]: "ticket",
        ticket_back["tx"]: "escrow_refund",
        credit["tx"]: "credit",
        tip["tx"]: "tip",
        dm["tx"]: "dm",
        tip_item["tx"]: "tip",
        refund["tx"]: "refund",
        held[0]["tx"]: "hold",
        held[1]["tx"]: "hold",
        release["tx"]: "release",
        back["tx"]: "escrow_refund",
        held[2]["tx"]: "hold",
        meter["tx"]: "meter",
        unlock["tx"]: "unlock",
    }
    assert (await http.reconcile())["ok"] is True
    # The keys outside the money slot are exactly each action's delivery keys.
    for action in ACTIONS:
        seen = [keys for name, keys in calls if name == action.name]
        assert seen, action.name
        for keys in seen:
            outside = {
                name for name, key in zip(action.all_keys, keys, strict=True) if "{eco}" not in key
            }
            assert outside == set(action.delivery_keys), action.name


async def test_the_benchmarks_tip_call_is_the_servers(settings: Settings, redis: Any) -> None:
    # loadtests/tips.py calls the tip script directly for its baseline.
    from loadtests.tips import TIP_AMOUNT, VirtualFan, goal_hash
    from tokenchat.server.keys import Keys

    script = TIP.script
    fan = VirtualFan(0, 1, settings.redis_prefix, script.sha)
    keys = Keys(settings.redis_prefix)
    await redis.set(keys.balance(f"u:{fan.user_id}"), 10)
    await redis.set(keys.balance("u:bench_model000"), 0)
    await redis.hset(keys.goal("bench_model000"), mapping=goal_hash("bench_model000", False))
    await redis.hset(keys.limits(fan.user_id), "v", 1)  # loaded: no limits
    await redis.hset(keys.spent(fan.user_id), "t", 0)
    sha, *call = fan.call()
    assert sha == script.sha
    # EVAL rather than EVALSHA: another test may flush the shared Redis's scripts.
    result = await redis.execute_command("EVAL", script.source, *call)
    assert result[0] == b"OK", result
    assert int(await redis.get(keys.balance(f"u:{fan.user_id}"))) == 10 - TIP_AMOUNT
    entry = (await redis.xrange(keys.outbox()))[0][1]
    assert entry[b"kind"] == b"tip" and entry[b"initiator"] == f"u:{fan.user_id}".encode()
