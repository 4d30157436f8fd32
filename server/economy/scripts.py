"""Lua scripts: one file each under ``lua/``, run through a ``ScriptBatcher``
(EVALSHA in a per-tick pipeline; NOSCRIPT answered by loading and retrying).

Money scripts share ``money_lib.lua``, prepended to each: Redis scripts
cannot include one another, and each must stay one atomic call.
"""

from __future__ import annotations

from importlib import resources

from .batcher import LuaScript

MONEY_SCRIPT_NAMES = ("tip", "dm", "credit", "spend", "refund")


def script_source(name: str) -> str:
    return (
        resources.files("tokenchat.server.economy")
        .joinpath("lua", f"{name}.lua")
        .read_text("utf-8")
    )


def lua_script(name: str, *, retry_safe: bool) -> LuaScript:
    """The script ``name``; money scripts get ``money_lib.lua`` first.

    ``retry_safe``: a second run of the same call changes nothing (money
    scripts: the idempotency key), so the batcher may send it again.
    """
    source = script_source(name)
    if name in MONEY_SCRIPT_NAMES:
        source = script_source("money_lib") + "\n" + source
    return LuaScript(name, source, retry_safe=retry_safe)
