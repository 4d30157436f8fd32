"""The terminal client's /payoutmethod, /payout, /payouts and /earnings
against a running server (issue #13 section 1); an admin approves by HTTP."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from tests.client_demo.test_cli import Chat
from tests.conftest import Http, Running, token


async def test_payout_method_request_list_and_earnings_in_the_terminal(
    start_server: Callable[..., Awaitable[Running]],
) -> None:
    server = await start_server(payout_min_tokens=10)
    http = Http(server)
    fan = await server.client("bob")
    await http.credit("bob", 100)
    chat = await Chat.start(
        "--url",
        server.ws_url,
        "--token",
        token("alice", "model"),
        "--room",
        "alice",
        "--http",
        server.http_url,
    )
    try:
        await chat.expect("joined alice")
        await fan.call("join", room="alice")
        await fan.call("tip", room="alice", amount=40, key="t1")
        await chat.send("/payout 20")
        await chat.expect("error: HTTP 403 FORBIDDEN")  # not verified yet
        status, _ = await http.call("POST", "/v1/admin/users/alice/verify", "ops", "admin")
        assert status == 200
        await chat.send('/payoutmethod bank "Alice A" DE89370400440532013000')
        await chat.expect("payout method: bank Alice A …3000; verified: yes; rule: 5.0 cents")
        await chat.send("/payout 5")
        await chat.expect("error: HTTP 400 BAD_REQUEST")  # below the minimum
        await chat.send("/payout 20")
        line = (await chat.expect("* payout po_"))[0]
        assert "20 tokens ($1.00) requested; balance 20" in line
        payout_id = line.split()[2].rstrip(":")
        status, paid = await http.call(
            "POST", f"/v1/admin/payouts/{payout_id}/approve", "ops", "admin"
        )
        assert status == 200 and paid["state"] == "paid"
        await chat.send("/payouts")
        await chat.expect(f"{payout_id}: 20 tokens ($1.00) paid")
        await chat.send("/earnings")
        await chat.expect("  tip: 40 tokens, $2.00", "earnings: 40 tokens, $2.00")
        await chat.send("/earnings yesterday")
        await chat.expect("error: HTTP 400 BAD_REQUEST")
    finally:
        await chat.kill()
        await fan.close()
