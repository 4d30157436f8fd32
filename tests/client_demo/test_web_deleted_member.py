"""A member who deletes her account, seen from the model's demo page in
Chromium (see test_web.py for the set-up): the fan chats and tips in the
model's room, then deletes her account on her page; the model's page drops
every line of hers (the chat line and the tip: the room's history no longer
holds them, server/catalog/forgetting.py) and says she left, and a page
opening the room afterwards shows none of them either."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tests.client_demo import test_web as web
from tests.conftest import Http

if TYPE_CHECKING:
    from playwright.async_api import Browser

# The browser fixture of test_web.py, shared.
browser = web.browser


async def test_a_deleted_fans_lines_leave_the_models_page(
    start_server: web.StartServer, browser: Browser
) -> None:
    from playwright.async_api import expect

    running = await web.start_dev(start_server)
    base = running.http_url
    errors = web.PageErrors()
    _, model = await web.open_page(browser, errors, "model", web.DESKTOP)
    fan_context, fan = await web.open_page(browser, errors, "fan", web.PHONE)

    await web.sign_in(model, base, "mia", "model")
    await web.sign_in(fan, base, "ana", "fan")
    await Http(running).credit("ana", 50)
    await expect(fan.locator("#balance")).to_have_text("50")
    await fan.locator('.room-item[data-room="mia"]').click()
    await expect(fan.locator("#room-title")).to_have_text("mia")
    await fan.locator("#say-text").fill("hello mia")
    await fan.locator("#say-text").press("Enter")
    await fan.evaluate("document.querySelector('.tip-quick[data-amount=\"10\"]').click()")
    await expect(model.locator("#chat .line", has_text="hello mia")).to_be_visible()
    await expect(model.locator("#chat .line.tip", has_text="ana")).to_be_visible()
    await model.locator("#say-text").fill("thanks all")
    await model.locator("#say-text").press("Enter")
    await expect(model.locator("#chat .line", has_text="thanks all")).to_be_visible()
    # Her tip crowns her once the standing projector has seen it (about 1 s
    # later). Wait for that: a deletion before it would leave the projector to
    # crown her pseudonym afterwards, a `king` note after the deletion's note.
    await expect(model.locator("#room-king")).to_have_text("♛ ana")

    await fan.get_by_role("button", name="Delete my account").click()
    await fan.locator("#confirm-ok").click()
    await expect(fan.locator("#signin")).to_be_visible()

    # The model's page: every line of hers gone, her own kept, a note why.
    await expect(model.locator("#chat .line", has_text="hello mia")).to_have_count(0)
    await expect(model.locator("#chat .line.tip")).to_have_count(0)
    await expect(model.locator("#chat .line", has_text="thanks all")).to_be_visible()
    await expect(model.locator("#chat .note").last).to_have_text("ana deleted their account.")
    await web.shoot(model, "model-desktop-deleted-member")

    # A page opening the room afterwards: none of her lines, nor her name.
    other = await fan_context.new_page()
    errors.watch("other", other)
    await web.sign_in(other, base, "bo", "fan")
    await other.locator('.room-item[data-room="mia"]').click()
    await expect(other.locator("#chat .line", has_text="thanks all")).to_be_visible()
    await expect(other.locator("#chat")).not_to_contain_text("ana")
    assert errors.seen == []
