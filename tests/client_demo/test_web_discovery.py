"""The discovery grid, the demo page's first screen (issue #13), in Chromium
(see test_web.py for the set-up): a model goes live with her profile; the
fan's page opens on a grid of room cards where her card shows her name,
tags, viewers and the live badge; "Show more" adds the next page without a
card twice; the tag filter keeps her card; the fan follows her from the card
and opens her room from it, and the model sees her viewer."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tests.client_demo import test_web as web
from tests.conftest import Http

if TYPE_CHECKING:
    from playwright.async_api import Browser

# The browser fixture of test_web.py, shared.
browser = web.browser

# app.js ROOMS_PAGE: the cards one page of the grid adds.
ROOMS_PAGE = 24
# Rooms besides mia's: more than one page, so "Show more" has a second one.
OTHER_ROOMS = ROOMS_PAGE + 2


async def test_fan_finds_a_live_model_on_the_grid_follows_and_opens_her_room(
    start_server: web.StartServer, browser: Browser
) -> None:
    from playwright.async_api import expect

    running = await web.start_dev(start_server, discovery_refresh_s=0.1)
    base = running.http_url
    http = Http(running)
    for n in range(OTHER_ROOMS):  # models who never came: rooms, no viewers
        assert (await http.call("GET", "/v1/me", f"room{n:02d}", "model"))[0] == 200
    errors = web.PageErrors()
    model_context, model = await web.open_page(browser, errors, "model", web.DESKTOP)
    fan_context, fan = await web.open_page(browser, errors, "fan", web.DESKTOP)

    # The model signs in (she lands in her own room: live) and saves her profile.
    await web.sign_in(model, base, "mia", "model")
    await model.get_by_label("Display name").fill("Mia Jazz")
    await model.get_by_label("Tags").fill("jazz, piano")
    await model.get_by_role("button", name="Save profile").click()
    await expect(model.locator(".toast").last).to_contain_text("Profile saved")

    # The fan's first screen is the grid: no room open, a page of cards, hers
    # first (the most viewers) with her name, tags, viewers and the live badge.
    await web.sign_in(fan, base, "ana", "fan")
    grid = fan.locator('[data-testid="rooms-grid"]')
    await expect(grid).to_be_visible()
    await expect(fan.locator("#room-open")).to_be_hidden()
    cards = grid.locator(".room-card")
    await expect(cards).to_have_count(ROOMS_PAGE)
    card = grid.locator('.room-card[data-card="mia"]')
    await expect(cards.first).to_have_attribute("data-card", "mia")
    await expect(card).to_have_attribute("data-live", "true")
    await expect(card.locator(".live-badge")).to_have_text("Live")
    await expect(card).to_contain_text("Mia Jazz")
    await expect(card).to_contain_text("#jazz #piano")
    await expect(card).to_contain_text("1 viewer")
    await expect(grid.locator('.room-card[data-card="room00"]')).to_have_attribute(
        "data-live", "false"
    )
    # The cards sit side by side: a grid, not a list.
    first_box = await cards.nth(0).bounding_box()
    second_box = await cards.nth(1).bounding_box()
    assert first_box is not None and second_box is not None
    assert second_box["x"] > first_box["x"] and second_box["y"] == first_box["y"]
    await web.shoot(fan, "discovery-grid-desktop", full_page=True)

    # More: the rest of the rooms, each once; then no more to show.
    await fan.locator('[data-testid="rooms-more"]').click()
    await expect(cards).to_have_count(OTHER_ROOMS + 1)
    await expect(fan.locator('[data-testid="rooms-more"]')).to_be_hidden()
    shown = await cards.evaluate_all("(cards) => cards.map((c) => c.dataset.card)")
    assert sorted(shown) == sorted(["mia", *(f"room{n:02d}" for n in range(OTHER_ROOMS))])

    # The tag filter keeps her card alone.
    await fan.get_by_label("Tag", exact=True).fill("piano")
    await expect(cards).to_have_count(1)
    await expect(cards.first).to_have_attribute("data-card", "mia")

    # Follow from the card: the server has it, and her room's button agrees.
    follow = card.locator('[data-follow="mia"]')
    await expect(follow).to_have_text("Follow")
    await follow.click()
    await expect(follow).to_have_text("Following ✓")
    await expect(follow).to_have_attribute("aria-pressed", "true")
    status, follows = await http.call("GET", "/v1/me/follows", "ana")
    assert status == 200 and [f["model"] for f in follows["follows"]] == ["mia"]

    # Open her room from the card: both see two viewers; the model's own grid
    # column shows her card with the fan counted.
    await card.locator(".room-item").click()
    await expect(fan.locator("#room-title")).to_have_text("mia")
    await expect(fan.locator("#room-follow")).to_have_text("Following ✓")
    await expect(fan.locator("#room-viewers-n")).to_have_text("2")
    await expect(model.locator("#room-viewers-n")).to_have_text("2")
    own_card = model.locator('.room-card[data-card="mia"]')
    await expect(own_card).to_contain_text("your room")
    await expect(own_card).to_contain_text("2 viewers")
    await expect(own_card.locator('[data-follow="mia"]')).to_have_count(0)  # not her own
    await web.shoot(fan, "discovery-room-open-desktop")

    # Back to the grid, on a phone too.
    await fan.get_by_role("button", name="Rooms").click()
    await expect(grid).to_be_visible()
    await expect(fan.locator("#room-open")).to_be_hidden()
    phone_context, phone = await web.open_page(browser, errors, "phone", web.PHONE)
    await web.sign_in(phone, base, "bo", "fan")
    phone_grid = phone.locator('[data-testid="rooms-grid"]')
    await expect(phone_grid.locator('.room-card[data-card="mia"]')).to_contain_text("Mia Jazz")
    await phone.evaluate("window.scrollTo(0, 0)")
    await web.shoot(phone, "discovery-grid-phone")
    assert errors.seen == []
    await phone_context.close()
    await fan_context.close()
    await model_context.close()
