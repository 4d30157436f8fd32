"""The demo page when a deletion must wait (issue #13 section 4) in
Chromium (see test_web.py for the set-up): a fan with a request the model
accepted is told her account was not deleted and what it waits for; once
the model declined it, the deletion goes through and the model sees her
refund in the books."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tests.client_demo import test_web as web
from tests.conftest import Http, eventually

if TYPE_CHECKING:
    from playwright.async_api import Browser

# The browser fixture of test_web.py, shared.
browser = web.browser


async def test_a_deletion_waiting_for_an_escrow_says_so_in_two_browsers(
    start_server: web.StartServer, browser: Browser
) -> None:
    from playwright.async_api import expect

    running = await web.start_dev(start_server)
    base = running.http_url
    errors = web.PageErrors()
    model_context, model = await web.open_page(browser, errors, "model", web.DESKTOP)
    fan_context, fan = await web.open_page(browser, errors, "fan", web.DESKTOP)
    await web.sign_in(model, base, "mia", "model")
    await web.sign_in(fan, base, "ana", "fan")
    http = Http(running)
    await http.credit("ana", 100)
    await expect(fan.locator("#balance")).to_have_text("100")
    # ana's offer, accepted by mia (their other sessions, over the protocol).
    ana = await running.client("ana")
    mia = await running.client("mia", "model")
    offer = await ana.call("request_offer", model="mia", text="a song", amount=30, key="o1")
    await mia.call("request_accept", request=offer["request"])

    await fan.get_by_role("button", name="Delete my account").click()
    await fan.locator("#confirm-ok").click()
    refused = fan.locator(".toast.error").last
    await expect(refused).to_contain_text("Your account was not deleted")
    await expect(refused).to_contain_text("a request the model accepted")
    await expect(refused).to_contain_text("closing by")
    await expect(fan.locator("#me-name")).to_have_text("ana")  # still signed in
    await web.shoot(fan, "fan-desktop-deletion-waits")

    # Declined: the escrow closed (ana refunded), and the deletion goes through.
    await mia.call("request_decline", request=offer["request"])
    status, me = await http.call("GET", "/v1/me", "ana")
    assert status == 200 and me["balance"] == 100
    await fan.get_by_role("button", name="Delete my account").click()
    await fan.locator("#confirm-ok").click()
    await expect(fan.locator(".toast.success").last).to_contain_text("Your account was deleted")
    await expect(fan.locator("#signin")).to_be_visible()

    async def drained() -> bool:
        return await running.node.ledger.drain(5.0) == 0

    # The model's books: the request's hold and refund, the fan a pseudonym.
    await eventually(drained, timeout_s=15)
    await model.locator("#tx-refresh").click()
    await expect(model.locator("#balance")).to_have_text("0")
    await expect(model.locator("#tx-list")).not_to_contain_text("ana")
    assert (await http.reconcile())["ok"] is True
    # Chromium logs the refused DELETE's 409 as a console error: the one
    # expected, and nothing else.
    assert [e for e in errors.seen if "status of 409" not in e] == []
    assert len(errors.seen) == 1, errors.seen
    await mia.close()
    await fan_context.close()
    await model_context.close()
