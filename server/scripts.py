"""Lua scripts: one file each under ``lua/``, loaded once per client.

redis-py's ``Script`` runs EVALSHA and, on NOSCRIPT (Redis restarted or
flushed its script cache), loads the script and retries, also inside
pipelines; so a restart of Redis never surfaces as an error here.
"""

from __future__ import annotations

from importlib import resources

from redis.asyncio import Redis
from redis.commands.core import AsyncScript

from .batcher import LuaScript

SCRIPT_NAMES = ("room_event", "viewers")


def script_source(name: str) -> str:
    return resources.files("server").joinpath("lua", f"{name}.lua").read_text("utf-8")


class Scripts:
    """The registered scripts of one Redis client, as attributes."""

    room_event: AsyncScript
    viewers: AsyncScript

    def __init__(self, redis: Redis) -> None:
        for name in SCRIPT_NAMES:
            setattr(self, name, redis.register_script(script_source(name)))


def lua_script(name: str) -> LuaScript:
    """A script for the batcher; money scripts get ``money_lib.lua`` first."""
    source = script_source(name)
    if name in MONEY_SCRIPT_NAMES:
        source = script_source("money_lib") + "\n" + source
    return LuaScript(name, source)


MONEY_SCRIPT_NAMES = ("tip", "dm", "credit", "spend", "refund")
