"""The terminal client's /history, /receipt, /dms, /block and /report against
a running server (issue #12 sections 6 and 7)."""

from __future__ import annotations

from tests.client_demo.test_cli import Chat
from tests.conftest import Http, Running


async def test_history_receipt_dms_block_and_report_in_the_terminal(server: Running) -> None:
    http = Http(server)
    model = await server.client("alice", "model")
    await http.credit("bob", 50)
    status, _ = await http.call("PUT", "/v1/me/prices", "alice", "model", dm=2)
    assert status == 200
    chat = await Chat.signed_in(server, "bob", room="alice")
    try:
        await chat.expect("joined alice")
        await chat.send("/tip 7 thanks")
        await chat.expect("balance")
        await chat.send("/dm --max 2 alice hello there")
        await chat.expect("DM sent to alice")
        assert (await model.next_event("dm"))["text"] == "hello there"
        await server.node.ledger.drain(10.0)
        await server.node.dm_archive.drain(10.0)

        await chat.send("/history")
        lines = await chat.expect("1. dm -2 alice", "2. tip -7 alice (alice)")
        tx = lines[1].rsplit(" ", 1)[1]
        await chat.send("/receipt 2")
        await chat.expect(f"receipt {tx}: tip of 7 tokens from bob to alice (room alice)")
        await chat.send("/history tip")
        await chat.expect("1. tip -7 alice")
        await chat.send("/dms alice")
        await chat.expect("[dm bob -> alice] (2 tokens) hello there")

        status, _ = await http.call("PUT", "/v1/me/blocks/bob", "alice", "model")
        assert status == 200
        await chat.send("/dm --max 2 alice again")
        await chat.expect("error FORBIDDEN")
        await chat.send("/block alice")
        await chat.expect("alice's DMs are refused")
        await chat.send("/blocks")
        await chat.expect("blocked: alice")
        await chat.send("/unblock alice")
        await chat.expect("alice's DMs are taken again")
        await chat.send("/report alice rude words")
        await chat.expect("reported alice (report ")
        await chat.send("/receipt nope")
        await chat.expect("error: HTTP 404 NOT_FOUND")
    finally:
        await chat.kill()
        await model.close()
