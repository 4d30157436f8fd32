"""The demo page's tip menu in Chromium (see test_web.py for the set-up): a
model edits her menu, a fan sees it as buttons in her room and tips an item,
both see the tip with the item's label; the model raises a price while the
fan's page still shows the old one, and the fan is told the price changed,
charged nothing."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson

from tests.client_demo import test_web as web
from tests.conftest import Http, eventually

if TYPE_CHECKING:
    from playwright.async_api import Browser

# The browser fixture of test_web.py, shared.
browser = web.browser


async def test_model_edits_her_menu_and_a_fan_tips_an_item(
    start_server: web.StartServer, browser: Browser
) -> None:
    from playwright.async_api import expect

    running = await web.start_dev(start_server)
    base = running.http_url
    await Http(running).credit("ana", 1000)
    errors = web.PageErrors()
    model_context = await browser.new_context(viewport=web.PHONE, locale="en-US")  # type: ignore[arg-type]
    fan_context = await browser.new_context(viewport=web.PHONE, locale="en-US")  # type: ignore[arg-type]
    model = await model_context.new_page()
    fan = await fan_context.new_page()
    errors.watch("model", model)
    errors.watch("fan", fan)
    sent: list[dict[str, Any]] = []
    fan.on("websocket", lambda ws: ws.on("framesent", lambda p: sent.append(orjson.loads(p))))

    # The model builds her menu: two items, saved.
    await web.sign_in(model, base, "mia", "model")
    await expect(model.locator("#menu-editor-note")).to_contain_text("No items yet")
    await model.get_by_role("button", name="Add item").click()
    await model.get_by_label("Item 1 label").fill("Dance")
    await model.get_by_label("Item 1 price in tokens").fill("30")
    await model.get_by_role("button", name="Add item").click()
    await model.get_by_label("Item 2 label").fill("Song 🎵")
    await model.get_by_label("Item 2 price in tokens").fill("5")
    await model.get_by_role("button", name="Save menu").click()
    await expect(model.locator(".toast.success").last).to_contain_text("Tip menu saved: 2 items")
    await expect(model.locator("#tip-menu")).to_be_hidden()  # her own room: no buttons

    # The fan opens the room and sees the menu as buttons with prices.
    await web.sign_in(fan, base, "ana", "fan")
    await fan.locator('.room-item[data-room="mia"]').click()
    await expect(fan.locator("#room-title")).to_have_text("mia")
    buttons = fan.locator("#menu-items .menu-item")
    await expect(buttons).to_have_count(2)
    dance = buttons.filter(has_text="Dance")
    await expect(dance).to_contain_text("30 tokens")
    await expect(buttons.filter(has_text="Song 🎵")).to_contain_text("5 tokens")

    # A tip of an item: both see it with the label; the fan's animation names it.
    await dance.click()
    await expect(fan.locator("#balance")).to_have_text("970")
    await expect(fan.locator("#fx .burst-item")).to_have_text("Dance")
    await expect(fan.locator(".toast.success").last).to_contain_text("30 tokens for “Dance”")
    await expect(fan.locator("#chat .line.tip")).to_contain_text("You tipped 30 tokens for Dance")
    await expect(model.locator("#chat .line.tip")).to_contain_text("ana tipped 30 tokens for Dance")
    await expect(model.locator("#earnings .earning.tip")).to_contain_text(
        "+30 tip from ana for Dance"
    )
    await expect(model.locator("#balance")).to_have_text("30")
    tips = [f for f in sent if f.get("type") == "tip"]
    assert len(tips) == 1 and tips[0]["max_price"] == 30 and "amount" not in tips[0], tips
    await web.shoot(fan, "fan-phone-menu")
    await web.shoot(model, "model-phone-menu-editor", full_page=True)

    # The model raises the price; the fan's page still shows 30.
    await model.get_by_label("Item 1 price in tokens").fill("40")
    await model.get_by_role("button", name="Save menu").click()
    await expect(model.locator(".toast.success").last).to_contain_text("Tip menu saved")
    await expect(dance).to_contain_text("30 tokens")
    await dance.click()
    error = fan.locator(".toast.error").last
    await expect(error).to_contain_text("The price changed before the tip for “Dance” went out")
    await expect(error).to_contain_text("now 40 tokens")
    await expect(dance).to_contain_text("40 tokens")  # the page read the menu again
    await expect(fan.locator("#balance")).to_have_text("970")
    await expect(model.locator("#balance")).to_have_text("30")
    # The same item id, kept by the save: the tip at the new price goes through.
    await dance.click()
    await expect(fan.locator("#balance")).to_have_text("930")
    await expect(model.locator("#balance")).to_have_text("70")

    async def drained() -> bool:
        return bool((await Http(running).reconcile())["ok"])

    await eventually(drained, timeout_s=15)
    assert errors.seen == []
    await fan_context.close()
    await model_context.close()
