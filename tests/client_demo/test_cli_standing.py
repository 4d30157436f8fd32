"""Standing in the terminal client: /leaderboard over HTTP, the king on join
and as it changes, and a sender's tier beside their name."""

from __future__ import annotations

from typing import Any

from tests.client_demo.test_cli import Chat
from tests.conftest import Http, Running, eventually, token
from tokenchat.client_demo.cli import format_event


async def test_leaderboard_king_and_tier_in_the_terminal(start_server: Any) -> None:
    server: Running = await start_server(
        tiers="0:grey,1:blue", standing_interval_s=0.05, tier_cache_ttl_s=0.05
    )
    http = Http(server)
    model = await server.client("alice", "model")
    await model.call("join", room="alice")
    await http.credit("bob", 100)
    chat = await Chat.signed_in(server, "bob", room="alice")
    try:
        await chat.expect("* joined alice")
        await chat.send("/leaderboard")
        await chat.expect("* alice (12h): no tips yet")
        await chat.send("/tip 7 for you")
        await chat.expect("[alice] * king: bob (7 tokens in 12 h)")

        async def blue() -> bool:
            return await server.node.standing.tiers.of("bob") == 1

        await eventually(blue)
        await chat.send("now blue")
        await chat.expect("[alice] bob (tier 1): now blue")
        await chat.send("/leaderboard all")
        await chat.expect("* alice top tippers (all):", "  1. bob (tier 1) 7 tokens")
        await chat.send("/leaderboard year")
        await chat.expect("error: GET leaderboard of alice: HTTP 400 BAD_REQUEST")
    finally:
        await chat.kill()
    # A fan joining later is told the king at once.
    late = await Chat.start("--url", server.ws_url, "--token", token("carol"), "--room", "alice")
    try:
        await late.expect("* king: bob (7 tokens in 12 h)")
    finally:
        await late.kill()


def test_king_and_tier_lines() -> None:
    assert format_event({"type": "king", "room": "a", "king": None}) == "[a] * no king"
    assert (
        format_event({"type": "message", "room": "a", "from": "b", "text": "hi", "tier": 3})
        == "[a] b (tier 3): hi"
    )
    assert format_event({"type": "message", "room": "a", "from": "b", "text": "hi", "tier": 0}) == (
        "[a] b: hi"
    )
