"""The console in a real browser: log in, filter, open a row, requeue, roles, escaping."""

from __future__ import annotations

import os
from pathlib import Path

from playwright.sync_api import Page, expect

from outbox.store import Store
from tests.console.harness import IMG, PASSWORD, SCRIPT, Seeded

SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "console.png"


def log_in(page: Page, name: str) -> None:
    page.goto("/")
    expect(page).to_have_url("/login?next=%2F")
    page.fill("input[name=name]", name)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    expect(page.locator("h1")).to_have_text("Overview")


def show_parked(page: Page, reason: str) -> None:
    """On the Rows page, filter parked rows by ``reason``, as an operator would."""
    page.click("nav >> text=Rows")
    page.select_option("select[name=state]", "parked")
    page.select_option("select[name=park_reason]", reason)
    page.click("button:text-is('Filter')")


def test_an_operator_filters_opens_and_requeues_a_row(
    page: Page, seeded: Seeded, store: Store
) -> None:
    log_in(page, "olga")
    show_parked(page, "precondition")
    rows = page.locator("table.rows tr")
    expect(rows).to_have_count(3)  # the heading and two precondition rows
    page.click(f"text={seeded.precondition}")
    expect(page.locator("h2", has_text="What to do")).to_contain_text("FAILED_PRECONDITION")
    requeue = page.locator("form[action='/row/requeue']")
    requeue.locator("input[name=reason]").fill("answered the compliance question (OPS-1)")
    requeue.locator("button").click()
    expect(page.locator(".flash")).to_contain_text("requeued by olga@console")
    expect(page.locator(".timeline").first).to_contain_text(
        "answered the compliance question (OPS-1)"
    )
    assert store.get(seeded.precondition).state == "pending"


def test_a_viewer_sees_no_actions_and_a_forged_post_is_refused(
    page: Page, seeded: Seeded, store: Store
) -> None:
    log_in(page, "vera")
    page.goto(f"/row?key={seeded.precondition}")
    expect(page.locator("form.action")).to_have_count(0)
    token = page.locator("input[name=csrf]").first.get_attribute("value")
    answer = page.request.post(
        "/row/requeue",
        form={"key": seeded.precondition, "reason": "forged", "csrf": token or ""},
    )
    assert answer.status == 403
    assert store.get(seeded.precondition).state == "parked"


def test_markup_in_a_row_renders_as_text(page: Page, seeded: Seeded) -> None:
    log_in(page, "olga")  # the fixture fails the test on any dialog
    page.goto(f"/row?key={seeded.marked}")
    expect(page.locator("pre.payload")).to_contain_text(SCRIPT)
    expect(page.locator("table.fields")).to_contain_text(SCRIPT + IMG)
    assert page.locator("main img").count() == 0
    assert page.locator("main script").count() == 0
    page.goto("/rows?reference=%3Cscript%3E")
    expect(page.locator("table.rows")).to_contain_text(SCRIPT + IMG)
    assert page.locator("main img").count() == 0


def test_the_overview_screenshot(page: Page, tmp_path: Path) -> None:
    """Writes docs/console.png when OUTBOX_UPDATE_SCREENSHOT=1 (else a temporary file)."""
    log_in(page, "olga")
    expect(page.locator("svg.chart polyline")).to_have_count(3)
    expect(page.locator("#overview")).to_contain_text("precondition")
    target = SCREENSHOT if os.environ.get("OUTBOX_UPDATE_SCREENSHOT") == "1" else tmp_path / "c.png"
    page.screenshot(path=str(target), full_page=True)
    assert target.stat().st_size > 10_000
