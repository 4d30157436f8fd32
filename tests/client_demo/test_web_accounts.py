"""The demo page's data export and account deletion in Chromium (see
test_web.py for the set-up): a fan buys tokens and tips a model, exports her
data (the page says what it holds), then deletes her account after the
confirmation; she is signed out and refused, and the model's receipt of her
tip names her by her pseudonym only."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from tests.client_demo import test_web as web
from tests.conftest import Http, eventually
from tokenchat.server import bus

if TYPE_CHECKING:
    from playwright.async_api import Browser

# The browser fixture of test_web.py, shared.
browser = web.browser
# How long a published balance event is given to reach the page (seconds).
STALE_EVENT_WAIT_S = 1.0


async def test_export_and_delete_account_in_two_browsers(
    start_server: web.StartServer, browser: Browser
) -> None:
    from playwright.async_api import expect

    running = await web.start_dev(start_server, payment_provider="fake")
    base = running.http_url
    errors = web.PageErrors()
    model_context = await browser.new_context(viewport=web.DESKTOP, locale="en-US")  # type: ignore[arg-type]
    fan_context = await browser.new_context(
        viewport=web.DESKTOP,  # type: ignore[arg-type]
        locale="en-US",
        accept_downloads=True,
    )
    model = await model_context.new_page()
    fan = await fan_context.new_page()
    errors.watch("model", model)
    errors.watch("fan", fan)

    await web.sign_in(model, base, "mia", "model")
    await web.sign_in(fan, base, "ana", "fan")
    await fan.get_by_role("button", name="Buy tokens").click()
    await fan.get_by_role("button", name="Buy 100").click()
    await expect(fan.locator("#balance")).to_have_text("100")
    await fan.locator('.room-item[data-room="mia"]').click()
    await expect(fan.locator("#room-title")).to_have_text("mia")
    await fan.evaluate("document.querySelector('.tip-quick[data-amount=\"10\"]').click()")
    await expect(fan.locator("#balance")).to_have_text("90")
    await expect(model.locator("#balance")).to_have_text("10")
    # A purchase's balance event that a busy node delivers after the tip's
    # reply: the page shows it, then asks, and settles on the newer figure.
    node = running.node
    await node.redis.publish(node.keys.user_channel("ana"), bus.BalanceChanged(100).encode())
    # Long enough for the event to reach the page (milliseconds when idle);
    # without the check, 100 would stay.
    await asyncio.sleep(STALE_EVENT_WAIT_S)
    await expect(fan.locator("#balance")).to_have_text("90")

    async def drained() -> bool:
        return await running.node.ledger.drain(5.0) == 0

    await eventually(drained, timeout_s=15)

    # The export: a file offered, and a summary of what it holds.
    async with fan.expect_download() as download_info:
        await fan.get_by_role("button", name="Export my data").click()
    download = await download_info.value
    assert download.suggested_filename == "tokenchat-ana.json"
    await expect(fan.locator("#export-summary")).to_contain_text(
        "Exported: 1 purchases, 2 transactions, 0 dms"
    )

    # Deleting asks first; cancelling deletes nothing.
    await fan.get_by_role("button", name="Delete my account").click()
    await expect(fan.locator("#confirm-body")).to_contain_text("90 tokens will be forfeited")
    await fan.locator("#confirm-cancel").click()
    await expect(fan.locator("#me-name")).to_have_text("ana")
    await fan.get_by_role("button", name="Delete my account").click()
    await fan.locator("#confirm-ok").click()
    await expect(fan.locator(".toast.success").last).to_contain_text("Your account was deleted")
    await expect(fan.locator("#signin")).to_be_visible()
    status, reply = await Http(running).call("GET", "/v1/me", "ana")
    assert status == 403 and reply["error"]["code"] == "BANNED"

    # The model keeps her earning; its receipt names the fan by pseudonym.
    await eventually(drained, timeout_s=15)
    await model.locator("#tx-refresh").click()
    tip_row = model.locator("#tx-list .tx").filter(has_text="Tip in mia")
    await expect(tip_row).to_contain_text("+10")
    await tip_row.locator("button").click()
    await expect(model.locator("#receipt")).to_contain_text("del:")
    await expect(model.locator("#receipt")).not_to_contain_text("ana")
    await expect(model.locator("#balance")).to_have_text("10")
    await web.shoot(model, "model-desktop-deleted-fan-receipt")
    assert (await Http(running).reconcile())["ok"] is True
    assert errors.seen == []
    await fan_context.close()
    await model_context.close()
