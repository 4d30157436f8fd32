"""The demo page's tip goal in Chromium (see test_web.py for the set-up): a
model sets an all-or-nothing goal in her studio, a fan sees its bar in her
room and tips toward it; both see the progress, the tips held (the model's
balance does not move) until the target is reached and released to her;
the model removes the goal and the fan's bar goes away."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tests.client_demo import test_web as web
from tests.conftest import Http, eventually

if TYPE_CHECKING:
    from playwright.async_api import Browser

# The browser fixture of test_web.py, shared.
browser = web.browser


async def test_model_sets_a_goal_and_a_fan_tips_it_to_reached(
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

    # The model sets an all-or-nothing goal; her own room shows its bar.
    await web.sign_in(model, base, "mia", "model")
    await model.get_by_label("Goal", exact=True).fill("New guitar")
    await model.get_by_label("Target", exact=True).fill("60")
    await model.get_by_role("checkbox", name="All or nothing").check()
    await model.get_by_role("button", name="Set the goal").click()
    await expect(model.locator(".toast.success").last).to_contain_text("Goal “New guitar” set")
    await expect(model.get_by_test_id("goal-progress")).to_have_text("0 / 60")
    await expect(model.get_by_role("button", name="Remove the goal")).to_be_visible()

    # The fan opens her room and sees the bar.
    await web.sign_in(fan, base, "ana", "fan")
    await fan.locator('.room-item[data-room="mia"]').click()
    await expect(fan.locator("#room-title")).to_have_text("mia")
    bar = fan.get_by_test_id("goal-bar")
    await expect(bar).to_contain_text("New guitar")
    await expect(bar).to_contain_text("all or nothing")
    await expect(fan.get_by_test_id("goal-progress")).to_have_text("0 / 60")

    # A tip toward it: both bars move, the tokens are held, not paid yet.
    await fan.get_by_role("button", name="Tip 50 tokens").click()
    await expect(fan.locator("#balance")).to_have_text("950")
    for page in (fan, model):
        await expect(page.get_by_test_id("goal-progress")).to_have_text("50 / 60")
    await expect(model.locator("#balance")).to_have_text("0")
    await web.shoot(fan, "fan-phone-goal")

    # The tip that reaches it: both see it reached, and the model is paid.
    await fan.get_by_role("button", name="Tip 10 tokens").click()
    for page in (fan, model):
        await expect(page.get_by_test_id("goal-progress")).to_have_text("60 / 60")
        await expect(page.get_by_test_id("goal-state")).to_have_text("Reached!")
        await expect(page.locator("#chat")).to_contain_text("Goal “New guitar” reached")
    await expect(model.locator("#balance")).to_have_text("60")
    await web.shoot(model, "model-phone-goal", full_page=True)

    # The model removes it: the fan's bar goes away.
    await model.get_by_role("button", name="Remove the goal").click()
    await expect(model.locator(".toast").last).to_contain_text("Goal removed")
    await expect(fan.get_by_test_id("goal-bar")).to_be_hidden()
    await expect(model.get_by_test_id("goal-bar")).to_be_hidden()
    await expect(fan.locator("#balance")).to_have_text("940")

    async def drained() -> bool:
        return bool((await Http(running).reconcile())["ok"])

    await eventually(drained, timeout_s=15)
    assert errors.seen == []
    await fan_context.close()
    await model_context.close()
