"""The terminal client's /export and /deleteaccount against a running server
(issue #13 section 4)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.client_demo.test_cli import Chat
from tests.conftest import Http, Running, token


async def test_export_and_delete_account_in_the_terminal(server: Running, tmp_path: Path) -> None:
    http = Http(server)
    await server.client("alice", "model")
    await http.credit("bob", 50)
    chat = await Chat.start(
        "--url",
        server.ws_url,
        "--token",
        token("bob"),
        "--room",
        "alice",
        "--http",
        server.http_url,
    )
    try:
        await chat.expect("joined alice")
        await chat.send("/tip 7 thanks")
        await chat.expect("balance")
        await server.node.ledger.drain(10.0)
        target = tmp_path / "bob.json"
        await chat.send(f"/export {target}")
        await chat.expect("export of bob: balance 43; purchases 0, reversals 0, transactions 2")
        await chat.expect(f"written to {target}")
        data = json.loads(target.read_text())
        assert {t["kind"] for t in data["transactions"]} == {"credit", "tip"}

        await chat.send("/deleteaccount alice")  # not the caller's id: refused
        await chat.expect("BAD_REQUEST")
        await chat.send("/deleteaccount bob")
        await chat.expect("account deleted: 43 tokens forfeited; the books name you del:")
    finally:
        await chat.kill()
    status, reply = await http.call("GET", "/v1/me", "bob")
    assert status == 403 and reply["error"]["code"] == "BANNED"
    assert (await http.reconcile())["ok"] is True


async def test_deleteaccount_lists_open_escrows_then_closes_the_others(server: Running) -> None:
    http = Http(server)
    model = await server.client("alice", "model")
    fan = await server.client("bob")
    await http.credit("bob", 50)
    accepted = await fan.call("request_offer", model="alice", text="a", amount=10, key="o1")
    await model.call("request_accept", request=accepted["request"])
    chat = await Chat.start(
        "--url", server.ws_url, "--token", token("bob"), "--http", server.http_url
    )
    try:
        await chat.expect("balance")
        await chat.send("/deleteaccount bob")
        await chat.expect("escrows that close by themselves")
        await chat.expect(f"request {accepted['request']}, closes by ")
        # The model declines it (bob is refunded); a new offer is cancelled
        # by the deletion itself, and forfeited with the rest.
        await model.call("request_decline", request=accepted["request"])
        await fan.call("request_offer", model="alice", text="b", amount=5, key="o2")
        await chat.send("/deleteaccount bob")
        await chat.expect("closed first: 1 requests")
        assert "account deleted: 50 tokens forfeited" in chat.lines[-1]
    finally:
        await chat.kill()
    assert (await http.reconcile())["ok"] is True
    await model.close()
