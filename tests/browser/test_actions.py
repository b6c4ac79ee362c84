"""The console's actions in a real browser (issue 14, point 2): requeue everything matching a
filter after the preview; hold a lane from a row's page and see a real daemon leave it alone
until the release; dual control with two operators in two browser sessions."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from playwright.sync_api import Browser, Page, expect

import outbox
from outbox.simulator import TRANSFER, Simulator
from outbox.store import Store
from tests.browser.conftest import _no_dialog
from tests.browser.test_console import log_in, show_parked
from tests.console.harness import Seeded, serving, settings_for
from tests.integration.test_daemon import KEY, daemon_for
from tests.integration.test_dispatch import transfer

POLL = 0.1


def test_requeue_everything_matching_after_the_preview(
    page: Page, seeded: Seeded, store: Store
) -> None:
    log_in(page, "olga")
    show_parked(page, "precondition")
    expect(page.locator("table.rows tr")).to_have_count(3)
    page.click("text=Requeue all matching…")
    expect(page.locator("h1")).to_contain_text("Preview: requeue")
    expect(page.locator(".matched")).to_have_text("2")
    expect(page.locator("ul.sample li")).to_have_count(2)
    assert store.get(seeded.precondition).state == "parked"  # the preview wrote nothing
    page.fill("form.confirm input[name=reason]", "the compliance hold is lifted (OPS-7)")
    page.click("text=Confirm: requeue 2 rows")
    expect(page.locator(".acted").first).to_have_text("2")
    assert {store.get(k).state for k in (seeded.precondition, seeded.lane_head)} == {"pending"}
    assert store.get(seeded.marked).state == "parked"  # another reason: untouched
    assert store.history(seeded.precondition)[-1].actor == "olga@console"


def _enqueue(store: Store, lane: str) -> str:
    with store.engine.begin() as conn:
        return outbox.enqueue(conn, TRANSFER, transfer("7.00"), lane=lane)


def test_hold_a_lane_and_see_a_daemon_stop_sending_it(
    page: Page, seeded: Seeded, store: Store, sqlite_url: str
) -> None:
    held = _enqueue(store, "acc-9")
    log_in(page, "olga")
    page.goto(f"/row?key={held}")
    page.fill("form.hold-lane input[name=reason]", "reconciling acc-9 with finance")
    page.click("text=Hold lane acc-9")
    expect(page.locator("table.holds")).to_contain_text("reconciling acc-9 with finance")
    with Simulator(api_keys=[KEY]) as sim:
        daemon = daemon_for(sqlite_url, sim.target, poll=POLL)
        daemon.start()
        try:
            free = _enqueue(store, "acc-10")
            assert sim.wait_for(lambda s: free in s.executed_keys(), timeout=10)
            assert held not in sim.executed_keys() and store.get(held).state == "pending"
            page.goto(f"/row?key={held}")
            expect(page.locator(".held")).to_contain_text("lane acc-9 is held by olga@console")
            page.goto("/holds")
            page.fill("table.holds input[name=reason]", "reconciled")
            page.click("table.holds button:text-is('Release')")
            expect(page.locator(".flash")).to_contain_text("released by olga@console")
            assert sim.wait_for(lambda s: held in s.executed_keys(), timeout=10)
        finally:
            daemon.shutdown()


@contextmanager
def _session(browser: Browser, url: str, name: str) -> Iterator[Page]:
    context = browser.new_context(base_url=url, viewport={"width": 1280, "height": 900})
    opened = context.new_page()
    opened.on("dialog", _no_dialog)
    log_in(opened, name)
    try:
        yield opened
    finally:
        context.close()


def test_the_dual_control_flow_with_two_operators(
    browser: Browser, seeded: Seeded, store: Store, tmp_path: Path
) -> None:
    with (
        serving(store, settings_for(tmp_path, dual_control=True)) as url,
        _session(browser, url, "olga") as olga,
        _session(browser, url, "otto") as otto,
    ):
        olga.goto(f"/row?key={seeded.unknown}")
        cancel = olga.locator("form[action='/row/cancel']")
        cancel.locator("input[name=reason]").fill("refunded by hand (FIN-12)")
        cancel.locator("input[name=force]").check()
        cancel.locator("button").click()
        expect(olga.locator(".flash")).to_contain_text("a second operator must approve")
        olga.goto("/approvals")
        expect(olga.locator("tr.approval")).to_contain_text("yours: another operator decides")
        expect(olga.locator("tr.approval button")).to_have_count(0)
        assert store.get(seeded.unknown).state == "parked"

        otto.goto("/approvals")
        otto.fill("tr.approval input[name=reason]", "checked on recrypt.net: refunded")
        otto.click("tr.approval >> text=Approve")
        expect(otto.locator(".flash")).to_contain_text("approved by otto@console")
        expect(otto.locator("table.decided")).to_contain_text("olga@console")
    assert store.get(seeded.unknown).state == "cancelled"
