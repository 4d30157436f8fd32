"""The demo page's standing in Chromium (see test_web.py for the set-up): a
fan tips in a model's room; both pages show her at the top of the room's
leaderboard, the king badge names her, and her chat name, once her spending
put her in a higher tier, is coloured by that tier on the model's page."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tests.client_demo import test_web as web
from tests.conftest import Http, eventually

if TYPE_CHECKING:
    from playwright.async_api import Browser

# The browser fixture of test_web.py, shared.
browser = web.browser


async def test_leaderboard_king_and_tier_colours_on_both_pages(
    start_server: web.StartServer, browser: Browser
) -> None:
    from playwright.async_api import expect

    running = await web.start_dev(
        start_server, tiers="0:grey,1:blue,40:green", standing_interval_s=0.1, tier_cache_ttl_s=0.1
    )
    base = running.http_url
    await Http(running).credit("ana", 1000)
    errors = web.PageErrors()
    model_context = await browser.new_context(viewport=web.DESKTOP, locale="en-US")  # type: ignore[arg-type]
    fan_context = await browser.new_context(viewport=web.DESKTOP, locale="en-US")  # type: ignore[arg-type]
    model = await model_context.new_page()
    fan = await fan_context.new_page()
    errors.watch("model", model)
    errors.watch("fan", fan)
    await web.sign_in(model, base, "mia", "model")
    await web.sign_in(fan, base, "ana", "fan")
    await fan.locator('.room-item[data-room="mia"]').click()
    await expect(fan.locator("#room-title")).to_have_text("mia")

    # Nobody has tipped: an empty board, no king, a grey name.
    await expect(fan.locator("#leaderboard-empty")).to_be_visible()
    await expect(fan.locator("#room-king")).to_be_hidden()
    await fan.locator("#say-text").fill("hello")
    await fan.locator("#say-text").press("Enter")
    await expect(model.locator("#chat .from.tier-0", has_text="ana")).to_be_visible()

    # She tips 50: both boards rank her first, both badges crown her.
    await fan.get_by_role("button", name="Tip 50 tokens").click()
    await expect(fan.locator("#balance")).to_have_text("950")
    for page, name in ((fan, "You"), (model, "ana")):
        await expect(page.locator("#room-king")).to_be_visible()
        await expect(page.locator("#room-king")).to_contain_text(name)
        first = page.locator("#leaderboard-entries .leaderboard-entry").first
        await expect(first).to_contain_text("1.")
        await expect(first).to_contain_text(name)
        await expect(first).to_contain_text("50")

    # Her spending made her green (tier 2): her next line says so to the model.
    async def green() -> bool:
        return await running.node.standing.tiers.of("ana") == 2

    await eventually(green, timeout_s=10)
    await fan.locator("#say-text").fill("I am green now")
    await fan.locator("#say-text").press("Enter")
    line = model.locator("#chat li", has_text="I am green now")
    await expect(line.locator(".from")).to_have_class("from tier-2")
    await expect(model.locator("#leaderboard-entries .from.tier-2")).to_have_text("ana")

    # The window picker reads the other windows.
    await fan.locator("#leaderboard-window").select_option("all")
    await expect(fan.locator("#leaderboard-entries .leaderboard-entry").first).to_contain_text("50")
    await web.shoot(model, "model-leaderboard-desktop")
    assert errors.seen == []
    await fan_context.close()
    await model_context.close()
