"""The demo page's payouts in Chromium (see test_web.py for the set-up): a
fan buys tokens and tips a model; the model, verified by an admin over HTTP,
sees her earnings statement, saves a payout method and requests a payout;
the admin approves it over HTTP (there is no admin page) and the model sees
it paid. The fan sees none of it: no payouts card, her balance untouched."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tests.client_demo import test_web as web
from tests.conftest import Http

if TYPE_CHECKING:
    from playwright.async_api import Browser

# The browser fixture of test_web.py, shared.
browser = web.browser


async def test_model_requests_a_payout_and_sees_it_paid(
    start_server: web.StartServer, browser: Browser
) -> None:
    from playwright.async_api import expect

    running = await web.start_dev(start_server, payment_provider="fake", payout_min_tokens=5)
    base = running.http_url
    http = Http(running)
    errors = web.PageErrors()
    model_context = await browser.new_context(viewport=web.DESKTOP, locale="en-US")  # type: ignore[arg-type]
    fan_context = await browser.new_context(viewport=web.DESKTOP, locale="en-US")  # type: ignore[arg-type]
    model = await model_context.new_page()
    fan = await fan_context.new_page()
    errors.watch("model", model)
    errors.watch("fan", fan)

    await web.sign_in(model, base, "mia", "model")
    await expect(model.locator("#payouts-card")).to_be_visible()
    await expect(model.locator("#payout-status")).to_contain_text("Not verified yet")
    await web.sign_in(fan, base, "ana", "fan")
    await expect(fan.locator("#payouts-card")).to_be_hidden()
    await fan.get_by_role("button", name="Buy tokens").click()
    await fan.get_by_role("button", name="Buy 100").click()
    await expect(fan.locator("#balance")).to_have_text("100")
    await fan.locator('.room-item[data-room="mia"]').click()
    await expect(fan.locator("#room-title")).to_have_text("mia")
    for expected in ("90", "80"):
        await fan.evaluate("document.querySelector('.tip-quick[data-amount=\"10\"]').click()")
        await expect(fan.locator("#balance")).to_have_text(expected)
    await expect(model.locator("#balance")).to_have_text("20")

    # Unverified and with no payout method, she cannot ask yet.
    await expect(model.get_by_role("button", name="Request payout")).to_be_disabled()

    # The admin verifies her (HTTP); she saves a bank account.
    status, _ = await http.call("POST", "/v1/admin/users/mia/verify", "ops", "admin")
    assert status == 200
    await model.get_by_label("Account holder").fill("Mia M")
    await model.get_by_label("IBAN").fill("DE89 3704 0044 0532 0130 00")
    await model.get_by_role("button", name="Save payout method").click()
    await expect(model.locator(".toast.success").last).to_contain_text("Payout method saved")
    await expect(model.locator("#payout-status")).to_contain_text("Verified")
    await expect(model.locator("#payout-status")).to_contain_text("…3000")
    await expect(model.get_by_role("button", name="Request payout")).to_be_enabled()

    # Her statement: 20 tokens of tips at 5 cents.
    await model.locator("#payouts-refresh").click()
    await expect(model.locator('#statement-rows tr[data-kind="tip"]')).to_contain_text("Tips")
    await expect(model.locator('#statement-rows tr[data-kind="tip"]')).to_contain_text("$1.00")
    await expect(model.locator("#statement-tokens")).to_have_text("20")
    await expect(model.locator("#statement-money")).to_have_text("$1.00")

    # She asks for 15: held, her balance 5, the list says requested.
    await model.get_by_label("Tokens", exact=True).fill("15")
    await model.get_by_role("button", name="Request payout").click()
    await expect(model.locator(".toast.success").last).to_contain_text("15 tokens ($0.75)")
    await expect(model.locator("#balance")).to_have_text("5")
    row = model.locator("#payout-list li").first
    await expect(row).to_have_attribute("data-state", "requested")
    await web.shoot(model, "model-desktop-payout-requested")

    # The admin approves over HTTP; her page shows it paid by itself.
    status, listed = await http.call("GET", "/v1/admin/payouts?state=requested", "ops", "admin")
    assert status == 200 and [p["model"] for p in listed["payouts"]] == ["mia"]
    payout_id = listed["payouts"][0]["payout"]
    status, paid = await http.call("POST", f"/v1/admin/payouts/{payout_id}/approve", "ops", "admin")
    assert status == 200 and paid["state"] == "paid", paid
    await expect(row).to_have_attribute("data-state", "paid")
    await expect(row).to_contain_text("paid")
    await expect(model.locator("#balance")).to_have_text("5")
    await web.shoot(model, "model-desktop-payout-paid")

    # The fan's balance is hers alone: untouched by the payout.
    await expect(fan.locator("#balance")).to_have_text("80")
    assert (await http.reconcile())["ok"] is True
    assert errors.seen == []
    await fan_context.close()
    await model_context.close()
