"""The demo page (client_demo/static) and the HTTP endpoints it reads.

The browser test drives Debian's Chromium (/usr/bin/chromium, installed by
.ci/run) with Playwright: a model and a fan in one room, a tip, a paid DM
confirmed at the price shown, a price change refused with PRICE_CHANGED, and
a dropped connection that rejoins with `since`. Screenshots at phone and
desktop width go to test-artifacts/web/.
"""

from __future__ import annotations

import asyncio
import re
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import orjson
import pytest

from tests.conftest import JWT_SECRET, Http, Running, eventually
from tokenchat.server.auth import verify_token
from tokenchat.server.config import Settings

TTL_MAX_S = Settings().token_ttl_max_s

if TYPE_CHECKING:
    from playwright.async_api import Browser, BrowserContext, Page

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "web"
PHONE = {"width": 375, "height": 740}
DESKTOP = {"width": 1280, "height": 860}
EXPECT_TIMEOUT_MS = 10_000

StartServer = Callable[..., Awaitable[Running]]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def start_dev(start_server: StartServer, **overrides: Any) -> Running:
    """A dev-mode server on a known WebSocket port (the page's /v1/config
    names settings.ws_port, and the fixture's port 0 is not one)."""
    return await start_server(dev_mode=1, ws_port=free_port(), **overrides)


# --- the HTTP endpoints ---------------------------------------------------------------


async def test_page_and_static_files_are_served(start_server: StartServer) -> None:
    running = await start_dev(start_server)
    async with httpx.AsyncClient(base_url=running.http_url) as http:
        page = await http.get("/")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        assert "<title>tokenchat</title>" in page.text
        assert "default-src 'self'" in page.headers["content-security-policy"]
        for path, kind in [
            ("/static/app.js", "javascript"),
            ("/js/tokenchat.js", "javascript"),
            ("/static/effects.js", "javascript"),
            ("/static/style.css", "text/css"),
        ]:
            response = await http.get(path)
            assert response.status_code == 200, path
            assert kind in response.headers["content-type"], path
        missing = await http.get("/static/nope.js")
        assert missing.status_code == 404
        assert missing.json()["error"]["code"] == "NOT_FOUND"
        escape = await http.get("/static/../__init__.py")
        assert escape.status_code == 404


async def test_config_names_the_gateway_of_the_host_asked(start_server: StartServer) -> None:
    running = await start_dev(start_server)
    ws_port = running.process.settings.ws_port
    async with httpx.AsyncClient(base_url=running.http_url) as http:
        config = (await http.get("/v1/config")).json()
        assert config == {"ws_url": f"ws://127.0.0.1:{ws_port}/ws", "dev_mode": True}
        other = await http.get("/v1/config", headers={"Host": "chat.example:8000"})
        assert other.json()["ws_url"] == f"ws://chat.example:{ws_port}/ws"


async def test_dev_token_in_dev_mode(start_server: StartServer) -> None:
    running = await start_dev(start_server)
    async with httpx.AsyncClient(base_url=running.http_url) as http:
        reply = await http.post("/v1/dev/token", json={"user": "mia", "role": "model"})
        assert reply.status_code == 200
        identity = verify_token(JWT_SECRET, reply.json()["token"], ttl_max_s=TTL_MAX_S)
        assert (identity.user_id, identity.role) == ("mia", "model")
        # The model's room exists at once, before any hello.
        rooms = (await http.get("/v1/rooms")).json()["rooms"]
        old_shape = ("id", "owner", "viewers", "tip_min")  # issue #13 added fields
        assert [{k: r[k] for k in old_shape} for r in rooms] == [
            {"id": "mia", "owner": "mia", "viewers": 0, "tip_min": 1}
        ]

        admin = await http.post("/v1/dev/token", json={"user": "root", "role": "admin"})
        assert admin.status_code == 403
        assert admin.json()["error"]["code"] == "FORBIDDEN"
        for body in [
            {"user": "bad name", "role": "fan"},
            {"user": "x" * 65, "role": "fan"},
            {"user": "ana", "role": "owner"},
            {"user": "ana"},
            {"role": "fan"},
        ]:
            bad = await http.post("/v1/dev/token", json=body)
            assert bad.status_code == 400, body
            assert bad.json()["error"]["code"] == "BAD_REQUEST"


async def test_dev_token_needs_json_and_this_host(start_server: StartServer) -> None:
    running = await start_dev(start_server)
    async with httpx.AsyncClient(base_url=running.http_url) as http:
        body = orjson.dumps({"user": "mia", "role": "fan"})
        # A form post needs no CORS preflight, so any web page could send one.
        for content_type in ("text/plain", "application/x-www-form-urlencoded", None):
            headers = {"Content-Type": content_type} if content_type else {}
            reply = await http.post("/v1/dev/token", content=body, headers=headers)
            assert reply.status_code == 400, content_type
            assert "application/json" in reply.json()["error"]["message"]
        # DNS rebinding: a page on evil.example resolved to 127.0.0.1 sends its Host.
        reply = await http.post(
            "/v1/dev/token",
            content=body,
            headers={"Content-Type": "application/json", "Host": "evil.example:8000"},
        )
        assert reply.status_code == 403 and reply.json()["error"]["code"] == "FORBIDDEN"
        for host in ("localhost:8000", "127.0.0.1", "[::1]:8000"):
            reply = await http.post(
                "/v1/dev/token",
                content=body,
                headers={"Content-Type": "application/json; charset=utf-8", "Host": host},
            )
            assert reply.status_code == 200, (host, reply.text)


async def test_dev_token_does_not_exist_outside_dev_mode(server: Running) -> None:
    async with httpx.AsyncClient(base_url=server.http_url) as http:
        reply = await http.post("/v1/dev/token", json={"user": "ana", "role": "fan"})
        assert reply.status_code == 404
        assert reply.json()["error"]["code"] == "NOT_FOUND"
        assert (await http.get("/v1/config")).json()["dev_mode"] is False


async def test_rooms_list_viewers_busiest_first(server: Running) -> None:
    http = Http(server)
    for model in ("amy", "bea", "cat"):
        await http.call("GET", "/v1/me", model, "model")
    await http.call("GET", "/v1/me", "fan1")  # a fan has no room
    status, _ = await http.call("PUT", "/v1/me/prices", "cat", "model", tip_min=5)
    assert status == 200
    clients = []
    for sub in ("f1", "f2"):
        client = await server.client(sub)
        await client.request("join", room="cat")
        clients.append(client)
    client = await server.client("f3")
    await client.request("join", room="bea")
    clients.append(client)

    async def listed() -> bool:
        status, body = await http.call("GET", "/v1/rooms")
        old_shape = ("id", "owner", "viewers", "tip_min")  # issue #13 added fields
        rooms = [{k: r[k] for k in old_shape} for r in body.get("rooms", [])]
        return status == 200 and {"rooms": rooms} == {
            "rooms": [
                {"id": "cat", "owner": "cat", "viewers": 2, "tip_min": 5},
                {"id": "bea", "owner": "bea", "viewers": 1, "tip_min": 1},
                {"id": "amy", "owner": "amy", "viewers": 0, "tip_min": 1},
            ]
        }

    await eventually(listed)
    for client in clients:
        await client.close()


async def test_user_prices(server: Running) -> None:
    http = Http(server)
    await http.call("GET", "/v1/me", "mia", "model")
    await http.call("GET", "/v1/me", "ana")
    off = {"private_rate": 0, "private_min_s": 0}  # private shows: off until set
    assert await http.call("GET", "/v1/users/mia/prices") == (200, {"dm": 0, **off})
    assert await http.call("GET", "/v1/users/ana/prices") == (200, {"dm": 0, **off})
    await http.call("PUT", "/v1/me/prices", "mia", "model", dm=7)
    assert await http.call("GET", "/v1/users/mia/prices") == (200, {"dm": 7, **off})
    # From Postgres when the cache does not hold it.
    await server.process.node.redis.delete(server.process.node.keys.prices("mia"))  # type: ignore[union-attr]
    assert await http.call("GET", "/v1/users/mia/prices") == (200, {"dm": 7, **off})
    await http.call("PUT", "/v1/me/prices", "mia", "model", private_rate=30, private_min_s=60)
    assert await http.call("GET", "/v1/users/mia/prices") == (
        200,
        {"dm": 7, "private_rate": 30, "private_min_s": 60},
    )
    status, body = await http.call("GET", "/v1/users/nobody/prices")
    assert status == 404 and body["error"]["code"] == "NOT_FOUND"
    status, body = await http.call("GET", "/v1/users/bad%20id/prices")
    assert status == 400 and body["error"]["code"] == "BAD_REQUEST"


# --- the page in a browser ----------------------------------------------------------------


def chromium_missing() -> bool:
    return not CHROMIUM.exists()


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    if chromium_missing():
        pytest.fail(
            f"{CHROMIUM} is missing: the browser test needs Debian's Chromium "
            "(apt-get update && apt-get install -y chromium; .ci/run installs it)"
        )
    try:
        from playwright.async_api import async_playwright, expect
    except ImportError:
        pytest.fail("the browser test needs Playwright: pip install -e '.[test]'")
    expect.set_options(timeout=EXPECT_TIMEOUT_MS)
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        try:
            yield browser
        finally:
            await browser.close()


class PageErrors:
    """JavaScript errors and console errors of the pages, which fail the test."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def watch(self, name: str, page: Page) -> None:
        page.on("pageerror", lambda exc: self.seen.append(f"{name}: {exc}"))
        page.on(
            "console",
            lambda msg: msg.type == "error" and self.seen.append(f"{name}: {msg.text}"),
        )


async def open_page(
    browser: Browser, errors: PageErrors, name: str, viewport: dict[str, int]
) -> tuple[BrowserContext, Page]:
    """A page in a context of its own (its own sign-in) at ``viewport``, its
    errors watched under ``name``."""
    context = await browser.new_context(viewport=viewport, locale="en-US")  # type: ignore[arg-type]
    page = await context.new_page()
    errors.watch(name, page)
    return context, page


async def sign_in(page: Page, base: str, user: str, role: str) -> None:
    from playwright.async_api import expect

    await page.goto(base + "/")
    await page.get_by_label("Name", exact=True).fill(user)
    await page.get_by_label("Model" if role == "model" else "Fan", exact=True).check()
    await page.get_by_role("button", name="Sign in", exact=True).click()
    await expect(page.locator("#conn-status")).to_have_text("Online")
    await expect(page.locator("#me-name")).to_have_text(user)


def artifacts_dir() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


async def shoot(page: Page, name: str, *, full_page: bool = False) -> None:
    """A screenshot of what the viewport shows (or the whole page), from the top."""
    if full_page:
        await page.evaluate("window.scrollTo(0, 0)")
    await page.screenshot(path=str(artifacts_dir() / f"{name}.png"), full_page=full_page)


async def test_fan_tips_and_pays_for_a_dm_and_the_model_sees_both(
    start_server: StartServer, browser: Browser
) -> None:
    from playwright.async_api import expect

    running = await start_dev(start_server)
    base = running.http_url
    await Http(running).credit("ana", 1000)
    errors = PageErrors()

    model_context = await browser.new_context(viewport=PHONE, locale="en-US")  # type: ignore[arg-type]
    fan_context = await browser.new_context(viewport=PHONE, locale="en-US")  # type: ignore[arg-type]
    model = await model_context.new_page()
    fan = await fan_context.new_page()
    errors.watch("model", model)
    errors.watch("fan", fan)
    sent_frames: list[dict[str, Any]] = []
    fan.on(
        "websocket",
        lambda ws: ws.on(
            "framesent",
            lambda payload: sent_frames.append(orjson.loads(payload)),
        ),
    )

    # The model signs in, lands in her own room and sets her DM price.
    await sign_in(model, base, "mia", "model")
    await expect(model.locator("#room-title")).to_have_text("Your room")
    await expect(model.locator("#price-dm")).to_have_value("0")
    await model.get_by_label("Price of a private message").fill("7")
    await model.get_by_role("button", name="Save prices").click()
    await expect(model.locator(".toast.success").last).to_contain_text("Prices saved")
    await expect(model.locator("#balance")).to_have_text("0")

    # The fan signs in, sees the room live, and opens it.
    await fan.goto(base + "/")
    await expect(fan.get_by_role("button", name="Sign in", exact=True)).to_be_visible()
    await shoot(fan, "signin-dev-phone")
    await sign_in(fan, base, "ana", "fan")
    await shoot(fan, "lobby-phone")
    await expect(fan.locator("#balance")).to_have_text("1,000")
    room_button = fan.locator('.room-item[data-room="mia"]')
    await expect(room_button).to_contain_text("1 viewer")
    await room_button.click()
    await expect(fan.locator("#room-title")).to_have_text("mia")
    await expect(fan.locator("#room-viewers-n")).to_have_text("2")
    await expect(model.locator("#room-viewers-n")).to_have_text("2")

    await fan.get_by_label("Message to the room").fill("hi mia!")
    await fan.get_by_label("Message to the room").press("Enter")
    await expect(model.locator("#chat")).to_contain_text("hi mia!")

    # A quick tip: the fan's balance falls, the model sees it and earns it.
    await fan.get_by_role("button", name="Tip 50 tokens").click()
    await expect(fan.locator("#balance")).to_have_text("950")
    await expect(fan.locator("#fx .burst")).to_have_count(1)
    await shoot(fan, "fan-phone-tip")  # the tip's animation on the stage
    await expect(model.locator("#chat .line.tip")).to_contain_text("ana tipped 50 tokens")
    await expect(model.locator("#earnings .earning.tip")).to_contain_text("+50 tip from ana")
    await expect(model.locator("#balance")).to_have_text("50")

    # A custom tip the fan cannot afford: a clear error, nothing charged.
    await fan.get_by_label("Amount").fill("5000")
    await fan.get_by_role("button", name="Tip", exact=True).click()
    await expect(fan.locator(".toast.error").last).to_contain_text("Not enough tokens")
    await expect(fan.locator("#balance")).to_have_text("950")

    # A paid DM: the price is shown first and confirmed before sending.
    await fan.get_by_role("button", name="Message mia privately").click()
    await expect(fan.locator("#dm-price")).to_contain_text("costs 7 tokens")
    await fan.get_by_label("Private message", exact=True).fill("a private hello")
    await fan.get_by_role("button", name="Send for 7 tokens").click()
    await expect(fan.locator("#confirm")).to_be_visible()
    await expect(fan.locator("#confirm-title")).to_have_text("Send for 7 tokens?")
    await fan.get_by_role("button", name="Pay 7 and send").click()
    await expect(fan.locator("#balance")).to_have_text("943")
    await expect(fan.locator("#dms .dm.out")).to_contain_text("a private hello")
    await expect(model.locator("#dms .dm.in")).to_contain_text("a private hello")
    await expect(model.locator("#dms .dm.in")).to_contain_text("7 tokens")
    await expect(model.locator("#earnings .earning.dm")).to_contain_text(
        "+7 private message from ana"
    )
    await expect(model.locator("#balance")).to_have_text("57")
    await expect(model.locator("#earned-total")).to_have_text("57")
    dms = [f for f in sent_frames if f.get("type") == "dm"]
    assert len(dms) == 1 and dms[0]["max_price"] == 7 and dms[0]["key"]

    # The model raises her price while the fan still sees 7: PRICE_CHANGED.
    await fan.get_by_label("Private message", exact=True).fill("another one")
    await model.get_by_label("Price of a private message").fill("9")
    await model.get_by_role("button", name="Save prices").click()
    await expect(model.locator(".toast.success").last).to_contain_text("private message 9 tokens")
    await fan.get_by_role("button", name="Send for 7 tokens").click()
    await fan.get_by_role("button", name="Pay 7 and send").click()
    await expect(fan.locator(".toast.error").last).to_contain_text("The price changed")
    await expect(fan.locator("#dm-price")).to_contain_text("costs 9 tokens")
    await expect(fan.locator("#balance")).to_have_text("943")

    await shoot(fan, "fan-phone")
    await shoot(fan, "fan-phone-full", full_page=True)
    await model.evaluate("window.scrollTo(0, 0)")
    await shoot(model, "model-phone")
    await shoot(model, "model-phone-full", full_page=True)
    await fan.set_viewport_size(DESKTOP)  # type: ignore[arg-type]
    await model.set_viewport_size(DESKTOP)  # type: ignore[arg-type]
    await shoot(fan, "fan-desktop")
    await shoot(model, "model-desktop")

    # The connection drops right after a tip went out, before its reply could
    # be read. After reconnecting, the page rejoins with `since` (a line said
    # meanwhile fills in) and resends the tip with the same key: charged once.
    sent_frames.clear()
    await fan.evaluate(
        """() => {
            document.querySelector('.tip-quick[data-amount="10"]').click();
            window.tokenchat.conn.drop();
        }"""
    )
    await expect(fan.locator("#conn-status")).not_to_have_text("Online")
    async with await running.client("mia", "model") as mia:
        await mia.request("join", room="mia")
        await mia.request("say", room="mia", text="said while you were away")
    await expect(fan.locator("#conn-status")).to_have_text("Online")
    await expect(fan.locator("#chat")).to_contain_text("said while you were away")
    joins = [f for f in sent_frames if f.get("type") == "join"]
    assert joins and joins[0]["room"] == "mia" and "since" in joins[0], sent_frames
    await expect(fan.locator("#balance")).to_have_text("933")
    await expect(model.locator("#balance")).to_have_text("67")
    await expect(model.locator("#earned-total")).to_have_text("67")
    tips = [f for f in sent_frames if f.get("type") == "tip"]
    assert len(tips) == 2 and tips[0]["key"] == tips[1]["key"], sent_frames
    await expect(model.locator("#chat .line.tip")).to_have_count(2)

    # The ledger agrees with what the pages showed.
    async def drained() -> bool:
        return bool((await Http(running).reconcile())["ok"])

    await eventually(drained, timeout_s=15)
    assert errors.seen == []
    await fan_context.close()
    await model_context.close()


async def test_token_sign_in_and_refused_token(start_server: StartServer, browser: Browser) -> None:
    """Outside dev mode the page takes a pasted token; a bad one signs out clearly."""
    from playwright.async_api import expect

    from tests.conftest import token

    running = await start_server(ws_port=free_port())
    context = await browser.new_context(viewport=PHONE, locale="en-US")  # type: ignore[arg-type]
    page = await context.new_page()
    await page.goto(running.http_url + "/")
    await expect(page.locator("#dev-form")).to_be_hidden()
    await page.get_by_label("Session token (JWT)").fill("not-a-token")
    await page.get_by_role("button", name="Connect").click()
    await expect(page.locator(".toast.error").last).to_contain_text("Sign in again")
    await expect(page.locator("#signin")).to_be_visible()
    await shoot(page, "signin-token-phone")

    await page.get_by_label("Session token (JWT)").fill(token("zoe"))
    await page.get_by_role("button", name="Connect").click()
    await expect(page.locator("#conn-status")).to_have_text("Online")
    await expect(page.locator("#me-name")).to_have_text("zoe")
    await context.close()


async def test_a_custom_request_from_offer_to_delivery_on_both_pages(
    start_server: StartServer, browser: Browser
) -> None:
    from playwright.async_api import expect

    running = await start_dev(start_server)
    base = running.http_url
    await Http(running).credit("ana", 1000)
    errors = PageErrors()
    model_context = await browser.new_context(viewport=DESKTOP, locale="en-US")  # type: ignore[arg-type]
    fan_context = await browser.new_context(viewport=DESKTOP, locale="en-US")  # type: ignore[arg-type]
    model = await model_context.new_page()
    fan = await fan_context.new_page()
    errors.watch("model", model)
    errors.watch("fan", fan)
    await sign_in(model, base, "mia", "model")
    await expect(model.locator("#request-form")).to_be_hidden()  # her own room
    await sign_in(fan, base, "ana", "fan")
    await fan.locator('.room-item[data-room="mia"]').click()
    await expect(fan.locator("#room-title")).to_have_text("mia")

    # The fan offers 100 tokens from mia's room: held at once.
    await fan.get_by_label("What you ask for").fill("a photo by the sea")
    await fan.get_by_label("Offer", exact=True).fill("100")
    await fan.get_by_role("button", name="Offer", exact=True).click()
    await expect(fan.locator("#confirm-title")).to_have_text("Offer 100 tokens?")
    await fan.get_by_role("button", name="Hold 100 and offer").click()
    await expect(fan.locator("#balance")).to_have_text("900")
    fan_item = fan.locator("#requests .request").first
    model_item = model.locator("#requests .request").first
    await expect(fan_item).to_have_attribute("data-state", "offered")
    await expect(fan_item).to_contain_text("To mia")
    await expect(model_item).to_have_attribute("data-state", "offered")
    await expect(model_item).to_contain_text("From ana")
    await expect(model_item).to_contain_text("a photo by the sea")

    # The model accepts, then delivers: both pages follow; she is paid.
    await model_item.get_by_role("button", name="Accept").click()
    await expect(fan_item).to_have_attribute("data-state", "accepted")
    await expect(model_item).to_have_attribute("data-state", "accepted")
    await model_item.get_by_label("Delivery note for ana").fill("sent: sea.jpg")
    await shoot(model, "model-request-desktop")
    await model_item.get_by_role("button", name="Deliver").click()
    await expect(fan_item).to_have_attribute("data-state", "delivered")
    await expect(fan_item).to_contain_text("Delivered: “sent: sea.jpg”")
    await expect(model_item).to_have_attribute("data-state", "delivered")
    await expect(model.locator("#balance")).to_have_text("100")
    await expect(model.locator("#earnings .earning.request")).to_contain_text(
        "+100 custom request from ana"
    )
    await expect(fan.locator("#balance")).to_have_text("900")

    # A second offer, cancelled by the fan: refunded, and the model sees it end.
    await fan.get_by_label("What you ask for").fill("a shout-out")
    await fan.get_by_label("Offer", exact=True).fill("50")
    await fan.get_by_role("button", name="Offer", exact=True).click()
    await fan.get_by_role("button", name="Hold 50 and offer").click()
    await expect(fan.locator("#balance")).to_have_text("850")
    await expect(model.locator("#requests .request")).to_have_count(2)
    await expect(model_item).to_have_attribute("data-state", "offered")
    await shoot(fan, "fan-request-desktop")
    await fan_item.get_by_role("button", name="Cancel").click()
    await expect(fan_item).to_have_attribute("data-state", "cancelled")
    await expect(model_item).to_have_attribute("data-state", "cancelled")
    await expect(fan.locator("#balance")).to_have_text("900")
    # An offer beyond the balance: a clear error, nothing held.
    await fan.get_by_label("What you ask for").fill("a film")
    await fan.get_by_label("Offer", exact=True).fill("5000")
    await fan.get_by_role("button", name="Offer", exact=True).click()
    await fan.get_by_role("button", name="Hold 5000 and offer").click()
    await expect(fan.locator(".toast.error").last).to_contain_text("Not enough tokens")
    await expect(fan.locator("#balance")).to_have_text("900")
    # A reload lists them from the server, in the same states.
    await fan.reload()
    await expect(fan.locator("#requests .request")).to_have_count(2)
    await expect(fan.locator("#requests .request.delivered")).to_have_count(1)

    async def drained() -> bool:
        return bool((await Http(running).reconcile())["ok"])

    await eventually(drained, timeout_s=15)
    assert errors.seen == []
    await fan_context.close()
    await model_context.close()


async def test_a_model_posts_locked_media_and_a_fan_unlocks_it(
    start_server: StartServer, browser: Browser
) -> None:
    import io

    from PIL import Image
    from playwright.async_api import expect

    running = await start_dev(start_server)
    base = running.http_url
    await Http(running).credit("ana", 100)
    errors = PageErrors()
    model_context = await browser.new_context(viewport=DESKTOP, locale="en-US")  # type: ignore[arg-type]
    fan_context = await browser.new_context(viewport=PHONE, locale="en-US")  # type: ignore[arg-type]
    model = await model_context.new_page()
    fan = await fan_context.new_page()
    errors.watch("model", model)
    errors.watch("fan", fan)

    await sign_in(model, base, "mia", "model")
    await expect(model.locator("#room-title")).to_have_text("Your room")
    await sign_in(fan, base, "ana", "fan")
    await fan.locator('.room-item[data-room="mia"]').click()
    await expect(fan.locator("#room-title")).to_have_text("mia")

    # The model uploads a photo at 30 tokens and posts it to her room.
    picture = io.BytesIO()
    Image.new("RGB", (120, 80), (250, 120, 40)).save(picture, "PNG")
    await model.locator("#media-file").set_input_files(
        files=[{"name": "set.png", "mimeType": "image/png", "buffer": picture.getvalue()}]
    )
    await model.get_by_label("Price to unlock").fill("30")
    await model.get_by_label("Caption in your room (optional)").fill("new set")
    await model.get_by_role("button", name="Upload and post").click()
    await expect(model.locator(".toast.success").last).to_contain_text("fans unlock it for 30")
    # Her own card is open; the fan's is locked, with the blurred preview and the price.
    await expect(model.locator("#chat .media-card.open img.content")).to_be_visible()
    card = fan.locator("#chat .media-card")
    await expect(card).to_have_class("media-card locked")
    await expect(card.locator("img.preview")).to_be_visible()
    await expect(fan.locator("#chat .line.media")).to_contain_text("new set")
    await shoot(fan, "fan-phone-locked-media")

    # The fan unlocks it, confirming the price: the card opens, the model earns.
    await card.get_by_role("button", name="Unlock photo for 30 tokens").click()
    await expect(fan.locator("#confirm-title")).to_have_text("Unlock for 30 tokens?")
    await fan.get_by_role("button", name="Pay 30 and unlock").click()
    await expect(fan.locator("#balance")).to_have_text("70")
    opened = fan.locator("#chat .media-card.open img.content")
    await expect(opened).to_be_visible()
    await eventually(
        lambda: opened.evaluate("img => img.complete && img.naturalWidth === 120"), timeout_s=10
    )
    await expect(model.locator("#balance")).to_have_text("30")
    await shoot(fan, "fan-phone-unlocked-media")
    await shoot(model, "model-desktop-media")

    async def drained() -> bool:
        return bool((await Http(running).reconcile())["ok"])

    await eventually(drained, timeout_s=15)
    assert errors.seen == []
    await fan_context.close()
    await model_context.close()


async def test_a_private_show_runs_and_ends_on_both_pages(
    start_server: StartServer, browser: Browser
) -> None:
    from playwright.async_api import expect

    running = await start_dev(
        start_server, private_tick_s=1, private_meter_interval_s=0.1, private_settle_grace_s=0.5
    )
    base = running.http_url
    await Http(running).credit("ana", 1000)
    errors = PageErrors()
    model_context = await browser.new_context(viewport=DESKTOP, locale="en-US")  # type: ignore[arg-type]
    fan_context = await browser.new_context(viewport=DESKTOP, locale="en-US")  # type: ignore[arg-type]
    model = await model_context.new_page()
    fan = await fan_context.new_page()
    errors.watch("model", model)
    errors.watch("fan", fan)

    # The model sets 60 tokens a minute and a 2 s minimum in her studio.
    await sign_in(model, base, "mia", "model")
    await expect(model.locator("#private-form")).to_be_hidden()  # her own room
    await expect(model.locator("#price-private-rate")).to_have_value("0")
    await model.get_by_label("Private show, per minute (0: off)").fill("60")
    await model.get_by_label("Private show minimum").fill("2")
    await model.get_by_role("button", name="Save prices").click()
    await expect(model.locator(".toast.success").last).to_contain_text("Prices saved")

    # The fan sees the rate in her room and requests at it: nothing charged.
    await sign_in(fan, base, "ana", "fan")
    await fan.locator('.room-item[data-room="mia"]').click()
    await expect(fan.locator("#private-price")).to_contain_text("60 tokens a minute")
    await expect(fan.locator("#private-price")).to_contain_text("minimum 2 s")
    await fan.get_by_role("button", name="Request a private show").click()
    await fan.get_by_role("button", name="Request at 60/min").click()
    await expect(fan.locator("#private-show")).to_have_attribute("data-state", "requested")
    await expect(model.locator("#private-show")).to_have_attribute("data-state", "requested")
    await expect(model.locator("#private-who")).to_have_text("From ana")
    await expect(fan.locator("#balance")).to_have_text("1,000")

    # The model accepts: both pages open the private room; the meter runs.
    await model.locator("#private-actions").get_by_role("button", name="Accept").click()
    for page in (fan, model):
        await expect(page.locator("#private-show")).to_have_attribute("data-state", "running")
        await expect(page.locator("#room-title")).to_have_text("Private show")
    await fan.get_by_label("Message to the room").fill("just us")
    await fan.get_by_label("Message to the room").press("Enter")
    await expect(model.locator("#chat")).to_contain_text("just us")
    await expect(model.locator("#tip-form")).to_be_hidden()
    await expect(fan.locator("#tip-form")).to_be_hidden()
    for page in (fan, model):
        await expect(page.locator("#private-seconds")).to_have_text(re.compile(r"^([3-9]|\d\d+)$"))
    await shoot(fan, "fan-private-desktop")
    await shoot(model, "model-private-desktop")

    # The fan ends it: both see the end and the exact charge; she paid it.
    await fan.locator("#private-actions").get_by_role("button", name="End the show").click()
    for page in (fan, model):
        await expect(page.locator("#private-show")).to_have_attribute("data-state", "ended")
        await expect(page.locator("#private-note")).to_contain_text("the fan ended it")
    seconds = int(await fan.locator("#private-seconds").text_content() or "0")
    assert seconds >= 3
    await expect(fan.locator("#private-charged")).to_have_text(str(seconds))
    await expect(model.locator("#private-charged")).to_have_text(str(seconds))
    await expect(fan.locator("#balance")).to_have_text(f"{1000 - seconds:,}")
    await expect(model.locator("#balance")).to_have_text(str(seconds))
    # The private room closes: the fan is back on the discovery grid, the
    # model in her room.
    await expect(fan.locator("#room-open")).to_be_hidden()
    await expect(fan.locator("#rooms")).to_be_visible()
    await expect(model.locator("#room-title")).to_have_text("Your room")

    async def drained() -> bool:
        return bool((await Http(running).reconcile())["ok"])

    await eventually(drained, timeout_s=15)
    assert errors.seen == []
    await fan_context.close()
    await model_context.close()


async def test_a_ticket_show_walls_off_a_fan_until_she_buys_a_ticket(
    start_server: StartServer, browser: Browser
) -> None:
    from playwright.async_api import expect

    running = await start_dev(start_server)
    base = running.http_url
    await Http(running).credit("ana", 1000)
    errors = PageErrors()
    model_context = await browser.new_context(viewport=DESKTOP, locale="en-US")  # type: ignore[arg-type]
    fan_context = await browser.new_context(viewport=DESKTOP, locale="en-US")  # type: ignore[arg-type]
    model = await model_context.new_page()
    fan = await fan_context.new_page()
    errors.watch("model", model)
    errors.watch("fan", fan)
    await sign_in(model, base, "mia", "model")
    await sign_in(fan, base, "ana", "fan")
    await fan.locator('.room-item[data-room="mia"]').click()
    await expect(fan.locator("#room-title")).to_have_text("mia")

    # The model schedules a show: the fan's page announces it with its price.
    await model.get_by_label("Title").fill("Friday night")
    await model.get_by_label("Ticket", exact=True).fill("30")
    await model.get_by_label("Paid after").fill("1")
    await model.get_by_role("button", name="Schedule").click()
    await expect(model.locator("#show-controls")).to_contain_text("Friday night")
    banner = fan.locator("#show-banner")
    await expect(banner).to_be_visible()
    await expect(banner).to_contain_text("Friday night")
    await expect(fan.locator("#show-buy")).to_have_text("Buy a ticket for 30 tokens")

    # On air: the fan without a ticket sees the wall with the price, no chat.
    await model.get_by_role("button", name="Start the show").click()
    wall = fan.locator("#ticket-wall")
    await expect(wall).to_be_visible()
    await expect(wall).to_contain_text("A ticket costs 30 tokens")
    await expect(fan.locator("#chat")).to_be_hidden()
    await expect(fan.locator("#say-form")).to_be_hidden()
    await model.locator("#say-text").fill("before your ticket")
    await model.locator("#say-text").press("Enter")
    await expect(model.locator("#chat")).to_contain_text("before your ticket")
    await shoot(fan, "fan-ticket-wall-desktop")

    # She buys: the wall goes, the chat is there, and the show's lines reach her.
    await fan.locator("#wall-buy").click()
    await expect(wall).to_be_hidden()
    await expect(fan.locator("#balance")).to_have_text("970")
    await expect(fan.locator("#chat")).to_be_visible()
    await expect(fan.locator("#show-ticket")).to_be_visible()
    await model.locator("#say-text").fill("welcome, ticket holders")
    await model.locator("#say-text").press("Enter")
    await expect(fan.locator("#chat")).to_contain_text("welcome, ticket holders")
    await expect(fan.locator("#chat")).not_to_contain_text("before your ticket")
    await fan.locator("#say-text").fill("hello from the show")
    await fan.locator("#say-text").press("Enter")
    await expect(model.locator("#chat")).to_contain_text("hello from the show")
    await shoot(fan, "fan-in-show-desktop")

    # The show ends after its minimum: she is paid, the banner goes.
    await asyncio.sleep(1.0)
    await model.get_by_role("button", name="End the show").click()
    await expect(model.locator("#balance")).to_have_text("30")
    await expect(banner).to_be_hidden()
    await expect(fan.locator("#chat")).to_contain_text("ended")

    async def drained() -> bool:
        return bool((await Http(running).reconcile())["ok"])

    await eventually(drained, timeout_s=15)
    assert errors.seen == []
    await fan_context.close()
    await model_context.close()


async def test_discovery_grid_profile_follow_and_live_toast(
    start_server: StartServer, browser: Browser
) -> None:
    """Issue #13: the model saves her profile; the fan finds her on the
    discovery grid by tag, opens her profile and follows her; the model goes
    away and comes back: the fan's page shows that she is live."""
    from playwright.async_api import expect

    running = await start_dev(start_server, live_away_s=0.5, discovery_refresh_s=0.1)
    base = running.http_url
    await Http(running).call("GET", "/v1/me", "zed", "model")  # another room, no tag
    errors = PageErrors()
    model_context = await browser.new_context(viewport=DESKTOP, locale="en-US")  # type: ignore[arg-type]
    fan_context = await browser.new_context(viewport=DESKTOP, locale="en-US")  # type: ignore[arg-type]
    model = await model_context.new_page()
    fan = await fan_context.new_page()
    errors.watch("model", model)
    errors.watch("fan", fan)
    await sign_in(model, base, "mia", "model")
    await model.get_by_label("Display name").fill("Mia Jazz")
    await model.get_by_label("Bio").fill("Late night piano")
    await model.get_by_label("Tags").fill("jazz, piano")
    await model.get_by_role("button", name="Save profile").click()
    await expect(model.locator(".toast").last).to_contain_text("Profile saved")
    await expect(model.locator("#room-profile")).to_contain_text("Mia Jazz")
    await expect(model.locator("#room-follow")).to_be_hidden()  # not her own room

    # The fan's page opens on the grid; the tag filter keeps only mia.
    await sign_in(fan, base, "ana", "fan")
    grid = fan.locator("#rooms")
    await expect(grid.locator('.room-item[data-room="zed"]')).to_be_visible()
    await fan.get_by_label("Tag", exact=True).fill("jazz")
    await expect(grid.locator('.room-item[data-room="zed"]')).to_have_count(0)
    card = grid.locator('.room-item[data-room="mia"]')
    await expect(card).to_contain_text("Mia Jazz")
    await expect(card).to_contain_text("#piano")
    await fan.get_by_label("Tag", exact=True).fill("rock")
    await expect(grid).to_contain_text("No room matches.")
    await fan.get_by_label("Tag", exact=True).fill("")
    await fan.get_by_label("Search", exact=True).fill("late night")
    await expect(grid.locator(".room-item")).to_have_count(1)
    await fan.get_by_label("Sort", exact=True).select_option("trending")
    await expect(card).to_be_visible()
    await shoot(fan, "fan-discovery-desktop")

    # Her profile, then follow.
    await card.click()
    profile = fan.locator("#room-profile")
    await expect(profile).to_contain_text("Mia Jazz")
    await expect(profile).to_contain_text("Late night piano")
    await expect(profile).to_contain_text("#jazz")
    await fan.locator("#room-follow").click()
    await expect(fan.locator("#room-follow")).to_have_text("Following ✓")
    await expect(profile).to_contain_text("1 follower")

    # The model goes away for longer than live_away_s, and comes back.
    await model_context.close()
    await asyncio.sleep(0.8)
    model_context = await browser.new_context(viewport=DESKTOP, locale="en-US")  # type: ignore[arg-type]
    model = await model_context.new_page()
    errors.watch("model", model)
    await sign_in(model, base, "mia", "model")
    await expect(model.get_by_label("Display name")).to_have_value("Mia Jazz")
    live = fan.locator('[data-testid="live"]')
    await expect(live).to_contain_text("mia is live")
    await shoot(fan, "fan-live-toast-desktop")
    status, notes = await Http(running).call("GET", "/v1/me/notifications", "ana")
    assert status == 200 and [n["model"] for n in notes["notifications"]] == ["mia"]
    await live.click()
    await expect(fan.locator("#room-title")).to_have_text("mia")
    assert errors.seen == []
    await fan_context.close()
    await model_context.close()


async def test_relayed_tips_on_both_pages(start_server: StartServer, browser: Browser) -> None:
    """Delivery mode `relay` (Redis Cluster): a tip is acknowledged without
    an offset and reaches the room through the relay. The fan's page takes
    the reply, the model's shows the tip once and counts it once, by its
    transaction, also when a tip is resent after a drop."""
    from playwright.async_api import expect

    running = await start_dev(start_server, delivery="relay")
    base = running.http_url
    await Http(running).credit("ana", 100)
    errors = PageErrors()
    contexts = [
        await browser.new_context(viewport=PHONE, locale="en-US")  # type: ignore[arg-type]
        for _ in range(2)
    ]
    model, fan = [await context.new_page() for context in contexts]
    errors.watch("model", model)
    errors.watch("fan", fan)
    await sign_in(model, base, "mia", "model")
    await sign_in(fan, base, "ana", "fan")
    await fan.locator('.room-item[data-room="mia"]').click()
    await expect(fan.locator("#room-title")).to_have_text("mia")

    await fan.get_by_role("button", name="Tip 50 tokens").click()
    await expect(fan.locator("#balance")).to_have_text("50")
    await expect(model.locator("#chat .line.tip")).to_contain_text("ana tipped 50 tokens")
    await expect(model.locator("#earned-total")).to_have_text("50")
    # The reply lost to a drop: the page resends with the same key; the
    # model's page still shows and counts the tip once.
    await fan.evaluate(
        """() => {
            document.querySelector('.tip-quick[data-amount="10"]').click();
            window.tokenchat.conn.drop();
        }"""
    )
    await expect(fan.locator("#conn-status")).to_have_text("Online")
    await expect(fan.locator("#balance")).to_have_text("40")
    await expect(model.locator("#chat .line.tip")).to_have_count(2)
    await expect(model.locator("#earned-total")).to_have_text("60")
    await expect(model.locator("#balance")).to_have_text("60")

    async def drained() -> bool:
        return bool((await Http(running).reconcile())["ok"])

    await eventually(drained, timeout_s=15)
    assert errors.seen == []
    for context in contexts:
        await context.close()
