"""The admin page (/admin, issue #15 item 6) in Chromium (see test_web.py for
the set-up): an admin signs in with a token, sees the tip counter move after
tips, runs reconcile, finds a fan and her transactions, refunds a tip,
resolves a report and bans the fan from the platform; a fan's token is
refused and the page shows nothing."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tests.client_demo import test_web as web
from tests.conftest import Http, token

if TYPE_CHECKING:
    from playwright.async_api import Browser, Page

# The browser fixture of test_web.py, shared.
browser = web.browser


async def sign_in_admin(page: Page, base: str, jwt: str) -> None:
    await page.goto(base + "/admin")
    await page.get_by_label("Admin token (JWT)").fill(jwt)
    await page.get_by_role("button", name="Sign in", exact=True).click()


async def test_admin_watches_refunds_resolves_and_bans(
    start_server: web.StartServer, browser: Browser
) -> None:
    from playwright.async_api import expect

    running = await web.start_dev(start_server)
    base = running.http_url
    http = Http(running)
    model = await running.client("mia", "model")
    fan = await running.client("ana")
    await http.credit("ana", 100)
    await fan.call("join", room="mia")
    status, report = await http.call(
        "POST", "/v1/reports", "mia", "model", user="ana", reason="spam"
    )
    assert status == 201, report
    errors = web.PageErrors()

    context = await browser.new_context(viewport=web.DESKTOP, locale="en-US")  # type: ignore[arg-type]
    page = await context.new_page()
    errors.watch("admin", page)
    await sign_in_admin(page, base, token("root", "admin"))
    await expect(page.locator("#panels")).to_be_visible()
    await expect(page.locator("#me-name")).to_have_text("root")

    # Live counters: the tip counter moves by the tips made (polled).
    tips = page.locator('[data-stat="tips_total"]')
    await expect(tips).to_have_text(web.re.compile(r"^\d+$"))
    before = int(await tips.inner_text())
    sent = [(await fan.call("tip", room="mia", amount=n, key=f"t{n}"))["tx"] for n in (3, 4, 5)]
    await expect(tips).to_have_text(str(before + 3))
    await expect(page.locator('[data-stat="tips_per_s"]')).not_to_have_text("0")
    await expect(page.locator('[data-stat="sessions"]')).not_to_have_text("0")

    # Reconcile, after the ledger has the tips.
    await page.get_by_role("button", name="Run reconcile").click()
    await expect(page.locator("#reconcile-status")).to_contain_text("Reconcile ok")

    # Find the fan (by a prefix) and her transactions.
    await page.get_by_label("User id or prefix").fill("an")
    await page.get_by_role("button", name="Find", exact=True).click()
    await page.locator("#user-results").get_by_role("button", name="ana", exact=True).click()
    await expect(page.locator("#user-name")).to_have_text("ana")
    await expect(page.locator("#user-balance")).to_have_text("88")
    for tx in sent:
        await expect(page.locator(f'#user-transactions tr[data-tx="{tx}"]')).to_contain_text("tip")

    # Refund the 5-token tip from her history: her balance and the list show it.
    await (
        page.locator(f'#user-transactions tr[data-tx="{sent[2]}"]')
        .get_by_role("button", name="Refund")
        .click()
    )
    await expect(page.locator(".toast.success").last).to_contain_text(f"Refunded {sent[2]}")
    await expect(page.locator("#user-balance")).to_have_text("93")
    await expect(page.locator("#refunds tr", has_text=sent[2])).to_contain_text("root")
    assert (await fan.call("balance"))["balance"] == 93
    # The refunded tip offers no second refund; the others still do.
    refunded = page.locator(f'#user-transactions tr[data-tx="{sent[2]}"]')
    await expect(refunded.get_by_role("button", name="Refund")).to_have_count(0)
    still = page.locator(f'#user-transactions tr[data-tx="{sent[1]}"]')
    await expect(still.get_by_role("button", name="Refund")).to_have_count(1)

    # The report queue: resolve the one open report.
    item = page.locator(f'#reports li[data-report="{report["id"]}"]')
    await expect(item).to_contain_text("mia reported ana")
    await item.get_by_label(f"Resolution of report {report['id']}").fill("warned")
    await item.get_by_role("button", name="Resolve").click()
    await expect(page.locator("#reports")).to_have_text("No open reports.")
    status, resolved = await http.call("GET", "/v1/admin/reports?state=resolved", "ops", "admin")
    assert [(r["id"], r["resolution"], r["resolved_by"]) for r in resolved["reports"]] == [
        (report["id"], "warned", "root")
    ]

    # Ban her from the platform: the page and the audit log say so, and her
    # next call is refused.
    await page.get_by_label("Reason").fill("spam")
    await page.get_by_role("button", name="Ban from platform").click()
    await expect(page.locator("#user-ban")).to_contain_text("Banned from the platform by root")
    await expect(page.locator("#audit tr", has_text="platform_ban")).to_contain_text("ana")
    await expect(page.locator("#audit tr", has_text="refund")).to_contain_text("root")
    status, reply = await http.call("GET", "/v1/me", "ana")
    assert status == 403 and reply["error"]["code"] == "BANNED"
    await web.shoot(page, "admin-desktop", full_page=True)
    assert errors.seen == []

    # A fan's token is refused: the page stays on its sign-in form.
    other = await browser.new_context(viewport=web.PHONE, locale="en-US")  # type: ignore[arg-type]
    refused = await other.new_page()
    await sign_in_admin(refused, base, token("ana2", "fan"))
    await expect(refused.locator("#signin-status")).to_contain_text("Refused")
    await expect(refused.locator("#signin-status")).to_contain_text("role admin")
    await expect(refused.locator("#panels")).to_be_hidden()
    await web.shoot(refused, "admin-phone-refused")
    await other.close()
    await context.close()
    await fan.close()
    await model.close()


async def test_admin_resolves_a_chargeback_flag(
    start_server: web.StartServer, browser: Browser
) -> None:
    """Issue #13: a chargeback flags the fan's account; the admin sees the
    flag with its shortfall, resolves it with a note, and the flag leaves the
    open list while the audit log names her resolution."""
    from playwright.async_api import expect

    from tests.server.test_accounts import SECRET, confirmed, reversed_, webhook

    running = await web.start_dev(
        start_server, payment_provider="fake", payment_webhook_secret=SECRET
    )
    http = Http(running)
    await http.call("GET", "/v1/me", "bob")
    assert (await webhook(running, confirmed("pi_web")))[0] == 200
    status, charged = await webhook(running, reversed_("pi_web"))
    assert status == 200, charged
    status, flags = await http.call("GET", "/v1/admin/flags", "ops", "admin")
    flag_id = flags["flags"][0]["id"]
    errors = web.PageErrors()

    context = await browser.new_context(viewport=web.DESKTOP, locale="en-US")  # type: ignore[arg-type]
    page = await context.new_page()
    errors.watch("admin", page)
    await sign_in_admin(page, running.http_url, token("root", "admin"))
    item = page.locator(f'#flags li[data-flag="{flag_id}"]')
    await expect(item).to_contain_text("bob: chargeback of pi_web")
    await expect(item).to_contain_text(f"shortfall {charged['shortfall']} tokens")
    await item.get_by_label(f"Resolution of flag {flag_id}").fill("card blocked, fan warned")
    await item.get_by_role("button", name="Resolve flag").click()
    await expect(page.locator(".toast.success").last).to_contain_text(f"Flag #{flag_id} resolved")
    await expect(page.locator("#flags")).to_have_text("No open flags.")
    audit_row = page.locator("#audit tr", has_text="flag_resolve")
    await expect(audit_row).to_contain_text("root")
    await expect(audit_row).to_contain_text("card blocked, fan warned")
    await web.shoot(page, "admin-flag-resolved-desktop", full_page=True)
    status, done = await http.call("GET", "/v1/admin/flags?state=resolved", "ops", "admin")
    assert [(f["id"], f["resolution"], f["resolved_by"]) for f in done["flags"]] == [
        (flag_id, "card blocked, fan warned", "root")
    ]
    assert errors.seen == []
    await context.close()
