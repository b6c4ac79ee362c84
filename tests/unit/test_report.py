"""Reconciliation's aggregation (``outbox.report``): exact decimals, no double counting, and
amounts that are not plain decimal strings counted as unreadable, never guessed."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from outbox.report import (
    HEADER,
    FieldPath,
    FinishedRow,
    MethodFields,
    aggregate,
    plain_decimal,
    read_amount,
    report_json,
    table_rows,
)
from outbox.vocabulary import REPORT_STATES, ReportColumn

TRANSFER = "/recrypt.wallet.v1.Wallet/Transfer"
CANCEL = "/recrypt.market.v1.Market/CancelOrder"
FIELDS = {TRANSFER: MethodFields(FieldPath((("amount",),)), FieldPath((("currency",),)))}
T0 = datetime(2026, 11, 23, 9, 0, tzinfo=UTC)
RANGE = (T0 - timedelta(days=10), T0 + timedelta(days=10))
STATES = ["committed", "parked", "expired", "cancelled"]


def row(amount: object, state: str = "committed", *, maybe: bool = False, **kw) -> FinishedRow:
    payload = json.dumps({"amount": amount, "currency": kw.pop("currency", "AUD")})
    return FinishedRow(kw.pop("at", T0), kw.pop("method", TRANSFER), state, maybe, payload)


def test_one_line_per_day_method_currency_with_each_state_and_in_doubt() -> None:
    rows = [
        row("10.00"),
        row("5", "committed"),
        row("7.25", "parked", maybe=True),
        row("1.10", "cancelled", maybe=True),
        row("3", "expired"),
        row("2", "committed", currency="BTC"),
        row("4", "committed", at=T0 + timedelta(days=1)),
    ]
    report = aggregate(rows, FIELDS, *RANGE)
    first = report.lines[0]
    assert (first.day.isoformat(), first.currency) == ("2026-11-23", "AUD")
    cells = {c: (first.cells[c].count, first.cells[c].amount) for c in ReportColumn}
    assert cells == {
        ReportColumn.COMMITTED: (2, Decimal("15.00")),
        ReportColumn.PARKED: (1, Decimal("7.25")),
        ReportColumn.EXPIRED: (1, Decimal("3")),
        ReportColumn.CANCELLED: (1, Decimal("1.10")),
        ReportColumn.IN_DOUBT: (2, Decimal("8.35")),
    }
    assert first.rows == 5
    assert [(ln.day.day, ln.currency) for ln in report.lines] == [
        (23, "AUD"),
        (23, "BTC"),
        (24, "AUD"),
    ]
    assert report.totals(ReportColumn.COMMITTED)[(TRANSFER, "AUD")] == Decimal("19.00")


def test_committed_is_never_in_doubt_and_open_rows_are_left_out() -> None:
    report = aggregate(
        [row("1", "committed", maybe=True), row("9", "pending"), row("9", "inflight")],
        FIELDS,
        *RANGE,
    )
    (line,) = report.lines
    assert line.cells[ReportColumn.IN_DOUBT].count == 0
    assert line.rows == 1


@pytest.mark.parametrize(
    "amount",
    [10.5, 10, "1e3", " 10", "10.", ".5", "1,000.00", "NaN", "Infinity", "", None, "0x10", "٣"],
)
def test_an_amount_that_is_not_a_plain_decimal_string_is_unreadable(amount) -> None:
    (line,) = aggregate([row(amount, "parked")], FIELDS, *RANGE).lines
    assert line.unreadable == 1
    assert line.cells[ReportColumn.PARKED].count == 1  # the row is counted in its state
    assert line.cells[ReportColumn.PARKED].amount == 0  # its amount in no sum


@pytest.mark.parametrize(
    "payload",
    ["{not json", "[1]", '"text"', None, '{"amount": "5"}', '{"amount": "5", "currency": 7}'],
)
def test_a_payload_without_a_readable_amount_and_currency_is_unreadable(payload) -> None:
    assert read_amount(payload, FIELDS[TRANSFER])[2] is False


def test_a_method_without_fields_is_counted_not_summed() -> None:
    (line,) = aggregate([row("x", method=CANCEL)], FIELDS, *RANGE).lines
    assert (line.measured, line.unreadable, line.rows) == (False, 0, 1)
    _header, values_row = table_rows(aggregate([row("x", method=CANCEL)], FIELDS, *RANGE))
    values = dict(zip(HEADER, values_row, strict=True))
    assert values["committed_count"] == "1"
    assert values["committed_amount"] == ""


def test_nested_fields_in_either_json_spelling() -> None:
    path = FieldPath((("money",), ("unit_amount", "unitAmount")))
    fields = MethodFields(path, FieldPath((("money",), ("currency",))))
    payload = json.dumps({"money": {"unitAmount": "12.30", "currency": "EUR"}})
    assert read_amount(payload, fields) == (Decimal("12.30"), "EUR", True)
    payload = json.dumps({"money": {"unit_amount": "1", "currency": "EUR"}})
    assert read_amount(payload, fields) == (Decimal("1"), "EUR", True)


def test_csv_values_are_fixed_point_exactly_as_summed() -> None:
    rows = [row("0.00000001"), row("1000000000000000000000000000000.10")]
    lines = list(table_rows(aggregate(rows, FIELDS, *RANGE)))
    assert lines[0] == list(HEADER)
    values = dict(zip(HEADER, lines[1], strict=True))
    assert values["committed_amount"] == "1000000000000000000000000000000.10000001"
    assert "E" not in "".join(lines[1]) and "," not in values["committed_amount"]
    doc = report_json(aggregate(rows, FIELDS, *RANGE))
    assert doc["lines"][0]["committed_amount"] == "1000000000000000000000000000000.10000001"
    assert doc["lines"][0]["committed_count"] == 2


def test_plain_decimal_is_strict() -> None:
    assert plain_decimal("-3.50") == Decimal("-3.50")
    assert plain_decimal("1" * 41) is None  # longer than any amount: a mistake, not a sum


decimals = st.decimals(
    min_value=Decimal("-1e12"), max_value=Decimal("1e12"), places=8, allow_nan=False
)
rows_strategy = st.lists(
    st.tuples(
        st.one_of(decimals.map(lambda d: format(d, "f")), st.just(1.5), st.just("1e2")),
        st.sampled_from(STATES),
        st.booleans(),
        st.sampled_from(["AUD", "BTC"]),
        st.integers(min_value=0, max_value=3),
    ),
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(rows_strategy)
def test_state_columns_split_the_rows_exactly(spec) -> None:
    rows = [row(a, s, maybe=m, currency=c, at=T0 + timedelta(days=d)) for a, s, m, c, d in spec]
    report = aggregate(rows, FIELDS, *RANGE)
    readable = [(a, s, m) for a, s, m, _c, _d in spec if isinstance(a, str) and "e" not in a]
    # counts: every row in exactly one state column
    assert sum(ln.rows for ln in report.lines) == len(rows)
    assert sum(ln.unreadable for ln in report.lines) == len(rows) - len(readable)
    # sums: the state columns add up to the sum over all readable rows, exactly
    total = sum(
        (Fraction(ln.cells[c].amount) for ln in report.lines for c in REPORT_STATES), Fraction(0)
    )
    assert total == sum((Fraction(Decimal(a)) for a, _s, _m in readable), Fraction(0))
    # in doubt: exactly the maybe-executed rows that are not committed
    doubt = sum(
        (Fraction(ln.cells[ReportColumn.IN_DOUBT].amount) for ln in report.lines), Fraction(0)
    )
    expected = sum(
        (Fraction(Decimal(a)) for a, s, m in readable if m and s != "committed"), Fraction(0)
    )
    assert doubt == expected
