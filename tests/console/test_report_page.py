"""The Report page and its CSV: the same table as ``outbox report``, for viewers too, with
every value from a row escaped."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

import outbox
from outbox.descriptors import Catalog
from outbox.report import FieldMap, build_report, table_rows
from outbox.schema import messages
from outbox.store import Store
from tests.console.conftest import logged_in
from tests.console.harness import IMG, SCRIPT, TRANSFER, Seeded, serving, settings_for


@pytest.fixture
def fields() -> FieldMap:
    return Catalog.load(None).report_fields()


@pytest.fixture
def committed(store: Store, seeded: Seeded) -> list[str]:
    """Two committed transfers today, one in a currency whose name is markup."""
    with store.engine.begin() as conn:
        keys = [
            outbox.enqueue(conn, TRANSFER, _transfer("10.50", "AUD")),
            outbox.enqueue(conn, TRANSFER, _transfer("0.25", SCRIPT + IMG)),
        ]
        conn.execute(
            messages.update()
            .where(messages.c.idempotency_key.in_(keys))
            .values(state="committed", attempts=1, updated_at=datetime.now(UTC))
        )
    return keys


def _transfer(amount: str, currency: str) -> dict[str, str]:
    return {"fromAccount": "a", "toAccount": "b", "amount": amount, "currency": currency}


@pytest.fixture
def served(store: Store, committed: list[str], fields: FieldMap, tmp_path: Path) -> Iterator[str]:
    with serving(store, settings_for(tmp_path), fields) as url:
        yield url


@contextmanager
def session(base_url: str, name: str) -> Iterator[httpx.Client]:
    client = logged_in(base_url, name)
    try:
        yield client
    finally:
        client.close()


def _today_range() -> tuple[datetime, datetime]:
    start = datetime.combine(datetime.now(UTC).date(), datetime.min.time(), UTC)
    return start, start + timedelta(days=1)


def test_the_csv_is_the_reports_table_exactly(served: str, store: Store, fields: FieldMap) -> None:
    today = datetime.now(UTC).date().isoformat()
    with session(served, "vera") as viewer:
        answer = viewer.get("/report.csv", params={"since": today, "until": today})
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/csv")
    expected = list(table_rows(build_report(store, *_today_range(), fields)))
    assert list(csv.reader(io.StringIO(answer.text))) == expected
    assert any(line[2] == "AUD" and "10.50" in line for line in expected)


def test_the_page_shows_each_line_with_its_sums_and_escapes_row_values(served: str) -> None:
    with session(served, "vera") as viewer:
        page = viewer.get("/report").text
    assert "/recrypt.wallet.v1.Wallet/Transfer" in page
    assert "10.50" in page  # committed AUD, summed as a decimal
    assert "0.25" in page
    assert SCRIPT not in page and "<img src=x" not in page
    assert "&lt;script&gt;" in page


def test_no_session_sees_no_report(served: str) -> None:
    answer = httpx.get(f"{served}/report.csv", follow_redirects=False)
    assert answer.status_code in (302, 303, 401)
    assert "AUD" not in answer.text


def test_a_bad_day_is_a_clear_400(served: str) -> None:
    with session(served, "olga") as operator:
        answer = operator.get("/report", params={"since": "yesterday"})
    assert answer.status_code == 400
    assert "2026-11-23" in answer.text


def test_rows_not_finished_are_not_reported(served: str, store: Store) -> None:
    with store.engine.connect() as conn:
        pending = conn.execute(
            sa.select(sa.func.count()).where(messages.c.state == "pending")
        ).scalar_one()
    assert pending  # the seed has a pending row; the report must not count it
    with session(served, "vera") as viewer:
        lines = list(csv.reader(io.StringIO(viewer.get("/report.csv").text)))
    header, body = lines[0], lines[1:]
    counted = sum(
        int(v)
        for line in body
        for k, v in zip(header, line, strict=True)
        if k.endswith("_count") and not k.startswith(("in_doubt", "unreadable"))
    )
    with store.engine.connect() as conn:
        finished = conn.execute(
            sa.select(sa.func.count()).where(messages.c.state.not_in(["pending", "inflight"]))
        ).scalar_one()
    assert counted == finished
