"""``outbox report``: reconciliation for finance (counts and sums of amounts per day, method
and currency, by final state; ``outbox.report`` computes it).

A table for people, ``--csv`` for finance (decimal strings exactly as summed, no exponent,
no thousands separator), ``--json`` for scripts. The field map comes from the protos' marks
or ``[report]``, checked before any row is read.
"""

from __future__ import annotations

import csv
import re
import sys
from datetime import UTC, date, datetime

import click
from rich.table import Column, Table
from rich.text import Text

from outbox.cli.app import InputError, Outbox, main, pass_outbox
from outbox.cli.output import emit_json
from outbox.cli.parse import parse_time
from outbox.cli.render import console, text
from outbox.clock import utcnow
from outbox.health import short_method
from outbox.report import (
    FieldMap,
    Line,
    Report,
    build_report,
    decimal_text,
    report_json,
    table_rows,
)
from outbox.vocabulary import ReportColumn

_DAY = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
IN_DOUBT_NOTE = (
    "in doubt: the parked and cancelled rows that may have executed at Recrypt (already "
    "counted in their state): Recrypt's statement holds committed, plus some of these"
)
UNREADABLE_NOTE = "unreadable: rows whose amount is no plain decimal string (in no sum)"


@main.command()
@click.option("--since", required=True, help="Start (inclusive): a UTC day 2030-01-31 or a time.")
@click.option("--until", help="End (exclusive): a UTC day or a time; default: now.")
@click.option("--csv", "as_csv", is_flag=True, help="CSV for finance on stdout.")
@click.option("--json", "as_json", is_flag=True, help="One JSON document for scripts.")
@pass_outbox
def report(obj: Outbox, *, since: str, until: str | None, as_csv: bool, as_json: bool) -> None:
    """Rows finished in a range, per UTC day, method and currency: count and sum of amounts
    by final state (committed, parked, expired, cancelled) and in doubt."""
    if as_csv and as_json:
        raise InputError("--csv and --json: choose one")
    start, end = parse_day("--since", since), parse_day("--until", until) if until else utcnow()
    if end <= start:
        raise InputError(f"--until ({end.isoformat()}) must be after --since ({start.isoformat()})")
    made = build_report(obj.store(), start, end, field_map(obj))
    if as_csv:
        csv.writer(sys.stdout, lineterminator="\n").writerows(table_rows(made))
    elif as_json:
        emit_json(report_json(made))
    else:
        print_report(made)


def field_map(obj: Outbox) -> FieldMap:
    """Where each method's amount and currency sit: the protos' marks and ``[report]``."""
    from outbox.descriptors import Catalog  # noqa: PLC0415 (protobuf loads only when needed)

    return Catalog.report_field_map(obj.config)


def parse_day(option: str, value: str) -> datetime:
    """``2030-01-31`` is that day's midnight UTC; anything else a time with a zone."""
    if _DAY.fullmatch(value):
        try:
            return datetime.combine(date.fromisoformat(value), datetime.min.time(), UTC)
        except ValueError:
            raise InputError(f"{option} {value!r} is not a day of the calendar") from None
    parsed = parse_time(option, value)
    assert parsed is not None  # a value was given
    return parsed


def print_report(made: Report) -> None:
    out = console()
    out.print(f"rows finished from {made.since.isoformat()} until {made.until.isoformat()} (UTC)")
    if not made.lines:
        out.print("no rows finished in this range")
        return
    table = Table(*_HEADINGS[3:])
    for heading in reversed(_HEADINGS[:3]):  # day, method, currency: never wrapped
        table.columns.insert(0, Column(heading, no_wrap=True))
    for line in made.lines:
        table.add_row(*_cells(line))
    out.print(table)
    out.print(IN_DOUBT_NOTE)
    if any(line.unreadable for line in made.lines):
        out.print(UNREADABLE_NOTE)


_HEADINGS = ("day", "method", "currency", *(c.value.replace("_", " ") for c in ReportColumn))


def _cells(line: Line) -> list[Text | str]:
    cells: list[Text | str] = [line.day.isoformat(), short_method(line.method), text(line.currency)]
    for column in ReportColumn:
        cell = line.cells[column]
        shown = (
            f"{decimal_text(cell.amount)} ({cell.count})" if line.measured else f"({cell.count})"
        )
        cells.append(shown if cell.count else "-")
    if line.unreadable:
        cells[2] = text(f"{line.currency} ({line.unreadable} unreadable)")
    return cells
