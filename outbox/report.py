"""Reconciliation for finance: counts and sums of amounts per day, method and currency.

Pure aggregation: ``aggregate`` takes finished rows (``FinishedRow``, as the store streams
them) and the field map (which request field of each method holds the amount and which the
currency: ``outbox.descriptors.Catalog.report_fields`` reads it from the protos' marks or
``[report]``), and returns a ``Report``. ``build_report`` does the same from anything with a
``finished_rows(since, until)`` method (the ``Store``): the CLI and the console call it.

Amounts are ``decimal.Decimal``, never floats, summed in a context that cannot round: an
amount that is not a plain decimal string (``"10.00"``, ``"-3"``; a JSON number, an exponent,
spaces, more than ``MAX_DIGITS`` digits either side of the point) is never guessed: the row
counts in ``unreadable`` and its amount in no sum.

Pure: no I/O, no SQL, no gRPC or protobuf (the descriptors are read in ``outbox.descriptors``
and handed in as plain data).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Context, Decimal, Inexact
from typing import Any, Protocol

from outbox.vocabulary import REPORT_STATES, ReportColumn, State

MAX_DIGITS = 40  # digits before, and after, the point: more is not an amount, it is a mistake
#: Exact for any sum of up to 10**19 amounts of ``MAX_DIGITS`` digits each side; rounding traps.
_EXACT = Context(prec=2 * MAX_DIGITS + 40, traps=[Inexact])
_PLAIN_DECIMAL = re.compile(rf"-?[0-9]{{1,{MAX_DIGITS}}}(\.[0-9]{{1,{MAX_DIGITS}}})?")
_STATE_COLUMN: dict[str, ReportColumn] = {State(c.value).value: c for c in REPORT_STATES}
NO_CURRENCY = ""  # a method without a currency field, or a row whose currency is unreadable


@dataclass(frozen=True)
class FieldPath:
    """Where a value sits in a request's JSON: one step per message level, each step the
    spellings the payload may use (the proto name and the JSON name, e.g. ``unit_amount``
    and ``unitAmount``)."""

    steps: tuple[tuple[str, ...], ...]

    @property
    def dotted(self) -> str:
        return ".".join(step[0] for step in self.steps)

    def find(self, payload: Any) -> Any:
        """The value at this path, or None when any step is missing."""
        value = payload
        for spellings in self.steps:
            if not isinstance(value, dict):
                return None
            for spelling in spellings:
                if spelling in value:
                    value = value[spelling]
                    break
            else:
                return None
        return value


@dataclass(frozen=True)
class MethodFields:
    """Which request fields of one method hold its amount and its currency."""

    amount: FieldPath
    currency: FieldPath | None = None


#: gRPC path → its fields; a method absent here is counted, never summed.
FieldMap = Mapping[str, MethodFields]


@dataclass(frozen=True)
class FinishedRow:
    """One row as the report reads it: when it finished (``updated_at``: the transition that
    put it in its state), its method, state and flag, and its payload as stored (JSON text)."""

    finished_at: datetime
    method: str
    state: str
    maybe_executed: bool
    payload: str | None


@dataclass
class Cell:
    """How many rows, and the sum of their readable amounts."""

    count: int = 0
    amount: Decimal = Decimal(0)

    def add(self, amount: Decimal | None) -> None:
        self.count += 1
        if amount is not None:
            self.amount = _EXACT.add(self.amount, amount)


@dataclass
class Line:
    """One day, method and currency: a cell per ``ReportColumn``, and the unreadable rows."""

    day: date
    method: str
    currency: str
    measured: bool  # the method has an amount field: its sums mean something
    cells: dict[ReportColumn, Cell] = field(
        default_factory=lambda: {c: Cell() for c in ReportColumn}
    )
    unreadable: int = 0

    @property
    def rows(self) -> int:
        """Every row of the line (the state columns split them; ``in_doubt`` is inside)."""
        return sum(self.cells[c].count for c in REPORT_STATES)


@dataclass
class Report:
    """The table: lines sorted by day, method and currency, for ``[since, until)``."""

    since: datetime
    until: datetime
    lines: list[Line]

    def totals(self, column: ReportColumn) -> dict[tuple[str, str], Decimal]:
        """The sum of ``column`` over the whole range, per (method, currency)."""
        found: dict[tuple[str, str], Decimal] = {}
        for line in self.lines:
            key = (line.method, line.currency)
            found[key] = _EXACT.add(found.get(key, Decimal(0)), line.cells[column].amount)
        return found


class FinishedRows(Protocol):
    """What the report reads from: the ``Store``."""

    def finished_rows(self, since: datetime, until: datetime) -> Iterable[FinishedRow]: ...


def build_report(
    source: FinishedRows, since: datetime, until: datetime, fields: FieldMap
) -> Report:
    """The report of rows finished in ``[since, until)``, streamed from ``source``."""
    return aggregate(source.finished_rows(since, until), fields, since, until)


def aggregate(
    rows: Iterable[FinishedRow], fields: FieldMap, since: datetime, until: datetime
) -> Report:
    """Count and sum ``rows`` per day (UTC), method and currency. Rows in a state the report
    does not show (pending, inflight) are left out."""
    lines: dict[tuple[date, str, str], Line] = {}
    for row in rows:
        column = _STATE_COLUMN.get(row.state)
        if column is not None:
            _add(lines, row, column, fields.get(row.method))
    return Report(since, until, [lines[k] for k in sorted(lines)])


def _add(
    lines: dict[tuple[date, str, str], Line],
    row: FinishedRow,
    column: ReportColumn,
    fields: MethodFields | None,
) -> None:
    amount, currency, readable = read_amount(row.payload, fields)
    day = row.finished_at.astimezone(UTC).date()
    key = (day, row.method, currency)
    line = lines.get(key)
    if line is None:
        line = lines[key] = Line(day, row.method, currency, measured=fields is not None)
    line.cells[column].add(amount)
    if row.maybe_executed and column is not ReportColumn.COMMITTED:
        line.cells[ReportColumn.IN_DOUBT].add(amount)
    if not readable:
        line.unreadable += 1


def read_amount(
    payload: str | None, fields: MethodFields | None
) -> tuple[Decimal | None, str, bool]:
    """(amount, currency, readable) of one payload; a method without fields is readable and
    has neither."""
    if fields is None:
        return None, NO_CURRENCY, True
    try:
        body = json.loads(payload) if payload is not None else None
    except (ValueError, RecursionError):
        return None, NO_CURRENCY, False
    currency = _currency(body, fields.currency)
    amount = plain_decimal(fields.amount.find(body))
    return amount, currency or NO_CURRENCY, amount is not None and currency is not None


def _currency(body: Any, path: FieldPath | None) -> str | None:
    """The currency's text; ``NO_CURRENCY`` when the method has none; None: unreadable."""
    if path is None:
        return NO_CURRENCY
    value = path.find(body)
    return value if isinstance(value, str) and value else None


def plain_decimal(value: Any) -> Decimal | None:
    """``value`` as a Decimal when it is a plain decimal string, else None (never guessed)."""
    if type(value) is not str or not _PLAIN_DECIMAL.fullmatch(value):
        return None
    return Decimal(value)


# ---- the table as text (CSV, JSON): decimal strings exactly as summed, never an exponent

HEADER = (
    "day",
    "method",
    "currency",
    *(f"{c.value}_{part}" for c in ReportColumn for part in ("count", "amount")),
    "unreadable_count",
)


def decimal_text(value: Decimal) -> str:
    """``12345.60``: fixed point, no exponent, no thousands separator."""
    return format(value, "f")


def line_values(line: Line) -> list[str]:
    """One line in ``HEADER``'s order; an amount is empty for a method without an amount."""
    values = [line.day.isoformat(), line.method, line.currency]
    for column in ReportColumn:
        cell = line.cells[column]
        values += [str(cell.count), decimal_text(cell.amount) if line.measured else ""]
    return [*values, str(line.unreadable)]


def table_rows(report: Report) -> Iterator[list[str]]:
    """``HEADER`` and then every line, as strings (``outbox report --csv``)."""
    yield list(HEADER)
    for line in report.lines:
        yield line_values(line)


def report_json(report: Report) -> dict[str, Any]:
    """``outbox report --json``: amounts as decimal strings, times as ISO 8601 UTC."""
    return {
        "since": report.since.astimezone(UTC).isoformat(),
        "until": report.until.astimezone(UTC).isoformat(),
        "lines": [
            dict(zip(HEADER, _typed(line_values(line)), strict=True)) for line in report.lines
        ],
    }


def _typed(values: list[str]) -> list[str | int | None]:
    """Counts as numbers, amounts as strings (exact), an absent amount as null."""
    return [
        int(v) if name.endswith("_count") else (v if v or not name.endswith("_amount") else None)
        for name, v in zip(HEADER, values, strict=True)
    ]
