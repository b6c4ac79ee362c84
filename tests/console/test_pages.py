"""The console's pages over HTTP: filters, keyset pages, the overview, lanes."""

from __future__ import annotations

import re

import httpx

from tests.console.harness import Seeded


def test_rows_page_by_keyset(operator: httpx.Client, seeded: Seeded) -> None:
    page = operator.get("/rows", params={"order": "oldest"}).text
    assert page.index(seeded.precondition) < page.index(seeded.pending)
    assert "Next" not in page  # six rows fit on one page


def test_method_filter_takes_the_full_path_or_its_tail(
    operator: httpx.Client, seeded: Seeded
) -> None:
    for method in ("Market/PlaceOrder", "/recrypt.market.v1.Market/PlaceOrder"):
        page = operator.get("/rows", params={"method": method}).text
        assert seeded.lane_head in page and seeded.precondition not in page


def test_maybe_executed_and_time_filters(operator: httpx.Client, seeded: Seeded) -> None:
    page = operator.get("/rows", params={"maybe_executed": "yes"}).text
    assert seeded.unknown in page and seeded.precondition not in page
    assert "No row matches." in operator.get("/rows", params={"since": "2999-01-01"}).text
    assert operator.get("/rows", params={"since": "yesterday"}).status_code == 400


def test_overview_and_its_htmx_part(operator: httpx.Client) -> None:
    page = operator.get("/").text
    assert "<svg" in page and re.search(
        r'href="/rows\?state=parked&amp;park_reason=precondition"', page
    )
    part = operator.get("/", headers={"HX-Request": "true"}).text
    assert part.startswith('<div id="overview"') and "<html" not in part


def test_lanes_page_shows_the_head_and_the_rows_behind(
    operator: httpx.Client, seeded: Seeded
) -> None:
    page = operator.get("/lanes").text
    assert "acme-trading" in page and seeded.lane_head in page
    assert re.search(r"<td>1</td>\s*<td>", page)  # one row waits behind the head
