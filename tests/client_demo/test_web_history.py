"""The demo page catches up on more than a page of missed history (issue #16
part 6), in Chromium (see test_web.py for the set-up): the fan's connection
drops and stays down while the room gets 150 lines (a page is 100); once it
reconnects, the page re-joins with `since`, reads the rest with `history`
until `more` is false, and shows every line once, in order, the live ones
after."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson

from tests.client_demo import test_web as web
from tokenchat.protocol.limits import HISTORY_PAGE_LEN

if TYPE_CHECKING:
    from playwright.async_api import Browser

# The browser fixture of test_web.py, shared.
browser = web.browser
MISSED = HISTORY_PAGE_LEN + 50  # more than a page, fewer than the page's 200 lines kept


async def test_a_reconnect_after_missing_more_than_a_page_shows_every_line(
    start_server: web.StartServer, browser: Browser
) -> None:
    from playwright.async_api import expect

    running = await web.start_dev(start_server, commands_per_s=10_000.0, commands_burst=10_000)
    base = running.http_url
    errors = web.PageErrors()
    _, fan = await web.open_page(browser, errors, "fan", web.DESKTOP)
    sent: list[dict[str, Any]] = []
    fan.on("websocket", lambda ws: ws.on("framesent", lambda p: sent.append(orjson.loads(p))))
    mia = await running.client("mia", "model")
    await mia.call("join", room="mia")
    await mia.call("say", room="mia", text="before")
    await web.sign_in(fan, base, "ana", "fan")
    await fan.locator('.room-item[data-room="mia"]').click()
    await expect(fan.locator("#room-title")).to_have_text("mia")
    await expect(fan.locator("#chat")).to_contain_text("before")

    # The connection drops, and the page does not reconnect until told to.
    await fan.evaluate(
        """() => {
            const conn = window.tokenchat.conn;
            window.reopen = conn.open.bind(conn);
            conn.open = () => {};
            conn.drop();
        }"""
    )
    await expect(fan.locator("#conn-status")).not_to_have_text("Online")
    for n in range(MISSED):
        await mia.call("say", room="mia", text=f"away {n}")
    sent.clear()
    await fan.evaluate(
        "() => { const conn = window.tokenchat.conn; conn.open = window.reopen; conn.open(); }"
    )
    await expect(fan.locator("#conn-status")).to_have_text("Online")
    await expect(fan.locator("#chat")).to_contain_text(f"Caught up {MISSED} messages")
    await mia.call("say", room="mia", text="back live")
    await expect(fan.locator("#chat")).to_contain_text("back live")
    lines = await fan.locator("#chat .line .text").all_inner_texts()
    away = [line for line in lines if line.startswith("away ")]
    assert away == [f"away {n}" for n in range(MISSED)]  # every one, once, in order
    assert lines.index("back live") > lines.index(f"away {MISSED - 1}")
    pages = [frame for frame in sent if frame.get("type") == "history"]
    assert pages and all(frame["room"] == "mia" for frame in pages), sent
    await mia.close()
    assert errors.seen == []
