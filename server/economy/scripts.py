"""Lua scripts: one file each under ``lua/``, run through a ``ScriptBatcher``
(EVALSHA in a per-tick pipeline; NOSCRIPT answered by loading and retrying).

Money scripts (one per paid action, server/economy/actions.py) share
``money_lib.lua`` (and ``history_lib.lua``), prepended to each: Redis scripts cannot include one
another, and each must stay one atomic call. They name their keys and
arguments (``KEY.payer_balance``, ``ARG.amount``); ``money_script`` turns
those names into ``KEYS[n]``/``ARGV[n]`` from the action's declaration, so
the order exists in one place. The other scripts (room_event, viewers,
load_balance) index ``KEYS``/``ARGV`` themselves.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from importlib import resources

from .batcher import LuaScript

MONEY_LIB = "money_lib"
# history_add, the one XADD to a room's history (and its trim): prepended to
# every money script and to the plain scripts that ask for it (room_event).
HISTORY_LIB = "history_lib"

# `KEY.<name>` and `ARG.<name>` in a money script. The lookbehind keeps
# `XKEY.a` or `t.KEY.a` from counting; `KEYS[` and `ARGV[` do not match.
NAME_RE = re.compile(r"(?<![\w.])(KEY|ARG)\.([A-Za-z_]\w*)")
# Positional access, which a money script must not use (its order would be a
# second copy of the declaration's).
POSITIONAL_RE = re.compile(r"(?<![\w.])(KEYS|ARGV)\s*\[")


def history_trim(history_len: int, history_age_s: float) -> dict[str, int]:
    """history_add's bounds as its callers pass them: events, milliseconds."""
    return {"history_len": history_len, "history_age_ms": round(history_age_s * 1000)}


def script_source(name: str) -> str:
    return (
        resources.files("tokenchat.server.economy")
        .joinpath("lua", f"{name}.lua")
        .read_text("utf-8")
    )


def lua_script(name: str, *, retry_safe: bool, libs: Sequence[str] = ()) -> LuaScript:
    """The script ``name`` as written (a script that is not a paid action's),
    after the library files ``libs`` (e.g. ``HISTORY_LIB``).

    ``retry_safe``: a second run of the same call changes nothing, so the
    batcher may send it again.
    """
    source = "\n".join(script_source(part) for part in (*libs, name))
    return LuaScript(name, source, retry_safe=retry_safe)


def money_script(
    name: str, keys: Sequence[str], args: Sequence[str], *, relay: bool = False
) -> LuaScript:
    """``money_lib.lua`` then ``lua/<name>.lua``, with each ``KEY.<k>`` and
    ``ARG.<a>`` replaced by its position in ``keys``/``args``.

    ``relay``: the delivery mode's variant (money_lib's ``RELAY``): the same
    source, whose room events go into the {eco} delivery stream instead of
    the room (docs/economy.md, "Delivery relay").

    Raises ValueError on a name the declaration lacks and on a raw
    ``KEYS[``/``ARGV[``. Retry-safe: the idempotency key makes a second run
    of the same call a duplicate.
    """
    mode = f"local RELAY = {'true' if relay else 'false'}\n"
    source = mode + "\n".join(script_source(part) for part in (HISTORY_LIB, MONEY_LIB, name))
    positional = POSITIONAL_RE.search(strip_comments(source))
    if positional:
        raise ValueError(f"{name}.lua (or money_lib) indexes {positional.group(1)}: use names")
    positions = {
        "KEY": {key: f"KEYS[{i}]" for i, key in enumerate(keys, 1)},
        "ARG": {arg: f"ARGV[{i}]" for i, arg in enumerate(args, 1)},
    }

    def bind(match: re.Match[str]) -> str:
        table, field = match.group(1), match.group(2)
        try:
            return positions[table][field]
        except KeyError:
            raise ValueError(f"{name}.lua (or money_lib) uses undeclared {table}.{field}") from None

    label = f"{name} (relay)" if relay else name
    return LuaScript(label, NAME_RE.sub(bind, source), retry_safe=True)


def strip_comments(source: str) -> str:
    """Lua source without its ``--`` line comments (the scripts here have no
    block comments and no ``--`` inside strings)."""
    return "\n".join(line.split("--", 1)[0] for line in source.splitlines())


def names_used(source: str) -> tuple[set[str], set[str]]:
    """The key and argument names a money script's code (not its comments) uses."""
    keys: set[str] = set()
    args: set[str] = set()
    for table, field in NAME_RE.findall(strip_comments(source)):
        (keys if table == "KEY" else args).add(field)
    return keys, args
