"""The demo page's spending limits in Chromium (see test_web.py for the
set-up): a fan sets a daily limit in the limits form, tips within it, is
refused past it (the refusal shown in a toast and kept in the limits card,
nothing charged, the model sees only the tip that went through), gets a
reality check, and excludes herself, after which a tip and a purchase are
refused with SELF_EXCLUDED."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tests.client_demo import test_web as web
from tests.conftest import Http

if TYPE_CHECKING:
    from playwright.async_api import Browser

# The browser fixture of test_web.py, shared.
browser = web.browser


async def test_a_fan_limits_herself_is_refused_past_it_and_takes_a_break(
    start_server: web.StartServer, browser: Browser
) -> None:
    from playwright.async_api import expect

    running = await web.start_dev(
        start_server, reality_check_minute_s=1.0, reality_check_poll_s=0.2
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
    await expect(fan.locator("#balance")).to_have_text("1,000")

    # The fan sets a daily limit of 60 and a reality check every minute.
    card = fan.locator("#limits-card")
    await expect(card.locator('[data-window="daily"]')).to_contain_text("spent 0 tokens, no limit")
    await fan.get_by_label("Per day (UTC)").fill("60")
    await fan.get_by_label("Reality check every").fill("1")
    await fan.get_by_role("button", name="Save limits").click()
    await expect(fan.locator(".toast.success").last).to_contain_text("Limits saved")
    await expect(card.locator('[data-window="daily"]')).to_contain_text(
        "60 tokens left of 60 tokens"
    )

    # A tip of 50 goes through; the next 50 is refused, clearly, and nothing moves.
    await fan.locator('.room-item[data-room="mia"]').click()
    await expect(fan.locator("#room-title")).to_have_text("mia")
    await fan.get_by_role("button", name="Tip 50 tokens").click()
    await expect(fan.locator("#balance")).to_have_text("950")
    await expect(model.locator("#chat")).to_contain_text("50")
    await expect(model.locator("#balance")).to_have_text("50")
    await fan.get_by_role("button", name="Tip 50 tokens").click()
    refusal = "Your daily spending limit leaves 10 tokens until"
    await expect(fan.locator(".toast.error").last).to_contain_text(refusal)
    await expect(fan.locator("#limit-refusal")).to_be_visible()
    await expect(fan.locator("#limit-refusal")).to_contain_text("Nothing was charged")
    await expect(card.locator('[data-window="daily"]')).to_contain_text(
        "spent 50 tokens, 10 tokens left of 60 tokens"
    )
    await expect(fan.locator("#balance")).to_have_text("950")
    await expect(model.locator("#balance")).to_have_text("50")
    await web.shoot(fan, "limits-refused-desktop", full_page=True)

    # A raise waits 24 hours: the card says so.
    await fan.get_by_label("Per day (UTC)").fill("500")
    await fan.get_by_role("button", name="Save limits").click()
    await expect(fan.locator(".toast.success").last).to_contain_text("after 24 hours")
    await expect(card.locator('[data-window="daily"] .pending')).to_contain_text("→ 500 tokens")

    # The reality check arrives.
    await expect(fan.locator("#reality-line")).to_contain_text(
        "50 tokens spent this session", timeout=15_000
    )

    # A break: confirmed, then a tip and a purchase are refused.
    await fan.get_by_label("Days").fill("2")
    await fan.get_by_role("button", name="Exclude me").click()
    await fan.locator("#confirm-ok").click()
    await expect(fan.locator("#exclusion-state")).to_contain_text("You excluded yourself until")
    await fan.get_by_role("button", name="Tip 10 tokens").click()
    await expect(fan.locator(".toast.error").last).to_contain_text(
        "You excluded yourself from spending and buying until"
    )
    await fan.locator("#buy").click()
    await fan.locator("#confirm-ok").click()
    await expect(fan.locator(".toast.error").last).to_contain_text("You excluded yourself")
    await expect(fan.locator("#balance")).to_have_text("950")
    await expect(model.locator("#balance")).to_have_text("50")
    await web.shoot(fan, "limits-excluded-desktop", full_page=True)
    # The browser logs the refused purchase's HTTP 403 itself; nothing else.
    assert [e for e in errors.seen if "status of 403" not in e] == [], errors.seen
    await model_context.close()
    await fan_context.close()
