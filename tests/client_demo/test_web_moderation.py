"""Moderation on the demo page in Chromium (see test_web.py for the set-up):
a model clears a fan's lines from her chat (both pages hide them), mutes
the fan (the fan is told until when), then bans her: the fan's page says so
and closes the room, and opening it again is refused."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tests.client_demo import test_web as web

if TYPE_CHECKING:
    from playwright.async_api import Browser, Page

# The browser fixture of test_web.py, shared.
browser = web.browser


async def moderate(model: Page, user: str, action: str) -> None:
    """Click ``user``'s name in the model's chat, then ``action`` in its menu."""
    from playwright.async_api import expect

    await model.locator("#chat .from.moderatable", has_text=user).last.click()
    menu = model.locator("#mod-menu")
    await expect(menu).to_be_visible()
    await menu.get_by_role("menuitem", name=action, exact=True).click()


async def test_model_clears_mutes_and_bans_a_fan(
    start_server: web.StartServer, browser: Browser
) -> None:
    from playwright.async_api import expect

    running = await web.start_dev(start_server)
    base = running.http_url
    errors = web.PageErrors()
    model_context, model = await web.open_page(browser, errors, "model", web.DESKTOP)
    fan_context, fan = await web.open_page(browser, errors, "fan", web.PHONE)

    await web.sign_in(model, base, "mia", "model")
    await web.sign_in(fan, base, "ana", "fan")
    await fan.locator('.room-item[data-room="mia"]').click()
    await expect(fan.locator("#room-title")).to_have_text("mia")
    for text in ("buy my stuff", "cheap tokens here"):
        await fan.locator("#say-text").fill(text)
        await fan.locator("#say-text").press("Enter")
        await expect(model.locator("#chat .line", has_text=text)).to_be_visible()
    await model.locator("#say-text").fill("welcome all")
    await model.locator("#say-text").press("Enter")
    await expect(fan.locator("#chat .line", has_text="welcome all")).to_be_visible()
    # The model's own name offers no moderation; the fan's page offers none.
    await expect(model.locator("#chat .from.moderatable")).to_have_count(2)
    await expect(fan.locator("#chat .from.moderatable")).to_have_count(0)

    # Clear: both pages hide the fan's lines and keep the model's.
    await moderate(model, "ana", "Clear messages")
    for page in (model, fan):
        await expect(page.locator("#chat .line", has_text="cheap tokens")).to_have_count(0)
        await expect(page.locator("#chat .line", has_text="welcome all")).to_be_visible()
    await expect(fan.locator("#chat .note").last).to_have_text(
        "Your messages were removed by a moderator."
    )
    await expect(model.locator("#chat .note").last).to_have_text(
        "ana's messages were removed by a moderator."
    )

    # Mute: the fan's next line is refused and says until when.
    await fan.locator("#say-text").fill("one more")
    await fan.locator("#say-text").press("Enter")
    await expect(model.locator("#chat .line", has_text="one more")).to_be_visible()
    await moderate(model, "ana", "Mute 5 min")
    await expect(model.locator(".toast.success").last).to_contain_text("Mute 5 min: ana (until")
    await fan.locator("#say-text").fill("am I muted?")
    await fan.locator("#say-text").press("Enter")
    await expect(fan.locator(".toast.error").last).to_contain_text("muted in room 'mia'")
    await expect(fan.locator(".toast.error").last).to_contain_text("(until")
    await web.shoot(model, "model-desktop-moderation")

    # Ban: the fan is out at once, told so; opening the room again is refused.
    await moderate(model, "ana", "Ban 1 h")
    notice = fan.locator("#mod-notice")
    await expect(notice).to_be_visible()
    await expect(notice).to_contain_text("You were banned from mia (until")
    await expect(fan.locator("#room-open")).to_be_hidden()
    await web.shoot(fan, "fan-phone-banned")
    await fan.locator('.room-item[data-room="mia"]').click()
    await expect(fan.locator(".toast.error").last).to_contain_text("banned from room 'mia'")
    await expect(fan.locator("#room-open")).to_be_hidden()
    assert errors.seen == []
    await fan_context.close()
    await model_context.close()
