"""The demo page's transactions, receipts, DM history and blocking in
Chromium (see test_web.py for the set-up): a fan buys tokens, tips and pays
for a DM; each side opens a receipt (the fan's money value at her average
purchase price, the model's earnings at the payout rate); the model opens
the conversation and sees its history, then blocks the fan, whose next DM is
refused with nothing charged."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tests.client_demo import test_web as web
from tests.conftest import Http, eventually

if TYPE_CHECKING:
    from playwright.async_api import Browser

# The browser fixture of test_web.py, shared.
browser = web.browser


async def test_receipts_dm_history_and_blocking_in_two_browsers(
    start_server: web.StartServer, browser: Browser
) -> None:
    from playwright.async_api import expect

    running = await web.start_dev(start_server, payment_provider="fake")
    base = running.http_url
    errors = web.PageErrors()
    model_context = await browser.new_context(viewport=web.DESKTOP, locale="en-US")  # type: ignore[arg-type]
    fan_context = await browser.new_context(viewport=web.DESKTOP, locale="en-US")  # type: ignore[arg-type]
    model = await model_context.new_page()
    fan = await fan_context.new_page()
    errors.watch("model", model)
    errors.watch("fan", fan)

    await web.sign_in(model, base, "mia", "model")
    await expect(model.locator("#price-dm")).to_have_value("0")  # loaded: then edited
    await model.get_by_label("Price of a private message").fill("5")
    await model.get_by_role("button", name="Save prices").click()
    await expect(model.locator(".toast.success").last).to_contain_text("Prices saved")

    # The fan buys the smallest bundle (100 tokens for $9.99), tips 10 and DMs.
    await web.sign_in(fan, base, "ana", "fan")
    await fan.get_by_role("button", name="Buy tokens").click()
    await fan.get_by_role("button", name="Buy 100").click()
    await expect(fan.locator("#balance")).to_have_text("100")
    await fan.locator('.room-item[data-room="mia"]').click()
    await expect(fan.locator("#room-title")).to_have_text("mia")
    await fan.evaluate("document.querySelector('.tip-quick[data-amount=\"10\"]').click()")
    await expect(fan.locator("#balance")).to_have_text("90")
    await fan.get_by_role("button", name="Message mia privately").click()
    await expect(fan.locator("#dm-price")).to_contain_text("costs 5 tokens")
    await expect(fan.locator("#dm-history-note")).to_contain_text("No earlier messages with mia")
    await fan.get_by_label("Private message", exact=True).fill("hello from ana")
    await fan.get_by_role("button", name="Send for 5 tokens").click()
    await fan.get_by_role("button", name="Pay 5 and send").click()
    await expect(fan.locator("#balance")).to_have_text("85")
    await expect(model.locator("#dms .dm.in")).to_contain_text("hello from ana")

    async def drained() -> bool:
        node = running.node
        return await node.ledger.drain(5.0) == 0 and await node.dm_archive.drain(5.0) == 0

    await eventually(drained, timeout_s=15)

    # The fan's transactions, newest first; the tip's receipt values it at
    # her average purchase price: 10 x 999/100 cents = $1.00.
    await fan.locator("#tx-refresh").click()
    rows = fan.locator("#tx-list .tx")
    await expect(rows).to_have_count(3)
    await expect(rows.nth(0)).to_contain_text("Private message · mia")
    await expect(rows.nth(0)).to_contain_text("-5")
    await expect(rows.nth(1)).to_contain_text("Tip in mia")
    await expect(rows.nth(2)).to_contain_text("Purchase")
    await expect(rows.nth(2)).to_contain_text("+100")
    await rows.nth(1).locator("button").click()
    receipt = fan.locator("#receipt")
    await expect(receipt).to_be_visible()
    await expect(receipt).to_contain_text("10 tokens")
    await expect(receipt).to_contain_text("$1.00 at your average purchase price")
    await expect(receipt).not_to_contain_text("You earn")
    await web.shoot(fan, "fan-desktop-receipt")

    # The model's side of the same tip: what she earns at the payout rate (5 cents).
    await model.locator("#tx-refresh").click()
    tip_row = model.locator("#tx-list .tx").filter(has_text="Tip in mia")
    await expect(tip_row).to_contain_text("+10")
    await tip_row.locator("button").click()
    await expect(model.locator("#receipt")).to_contain_text("You earn$0.50 at 5¢ a token")
    await expect(model.locator("#receipt")).not_to_contain_text("Money value")

    # The model opens the conversation: its history loads, oldest first.
    await model.get_by_role("button", name="Reply to ana").click()
    history = model.locator("#dm-history .dm")
    await expect(history).to_have_count(1)
    await expect(history.first).to_contain_text("hello from ana")
    await expect(history.first).to_contain_text("5 tokens")

    # She blocks ana: ana's next DM is refused, nothing charged, nothing delivered.
    await model.get_by_role("button", name="Block ana").click()
    await expect(model.locator(".toast.success").last).to_contain_text("ana can no longer")
    await expect(model.get_by_role("button", name="Unblock ana")).to_be_visible()
    await fan.get_by_label("Private message", exact=True).fill("are you there?")
    await fan.get_by_role("button", name="Send for 5 tokens").click()
    await fan.get_by_role("button", name="Pay 5 and send").click()
    await expect(fan.locator(".toast.error").last).to_contain_text("does not take your DMs")
    await expect(fan.locator("#balance")).to_have_text("85")
    await expect(model.locator("#dms .dm.in")).to_have_count(1)
    await expect(model.locator("#balance")).to_have_text("15")
    await web.shoot(model, "model-desktop-dm-history")

    # The fan reports her; the admin queue has it.
    fan.once("dialog", lambda dialog: dialog.accept("ignores me"))
    await fan.get_by_role("button", name="Report").click()
    await expect(fan.locator(".toast.success").last).to_contain_text("Reported mia")
    status, queue = await Http(running).call("GET", "/v1/admin/reports", "ops", "admin")
    assert status == 200 and [(r["user"], r["reason"]) for r in queue["reports"]] == [
        ("mia", "ignores me")
    ]
    assert errors.seen == []
    await fan_context.close()
    await model_context.close()
