"""The Report page: what finance reconciles against Recrypt's statements (``outbox report``).

Per UTC day, method and currency, the count and the sum of the amounts by final state, and the
rows in doubt; the same table as the CLI (``outbox.report``), and the same CSV. Read-only: a
viewer may see it. Imports Starlette, the store and the pure report; never gRPC.
"""

from __future__ import annotations

import csv
import io
from datetime import UTC, date, datetime, timedelta

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from outbox.console.context import console_of, render
from outbox.report import Report, build_report, decimal_text, table_rows
from outbox.vocabulary import ReportColumn

DEFAULT_DAYS = 7


def _day(request: Request, name: str, default: date) -> date:
    value = request.query_params.get(name) or None
    if value is None:
        return default
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise HTTPException(400, f"{name}: write a UTC day as 2026-11-23") from None


def _range(request: Request) -> tuple[datetime, datetime]:
    """``[since, until]`` as whole UTC days, until inclusive; default: the last seven days."""
    today = datetime.now(UTC).date()
    since = _day(request, "since", today - timedelta(days=DEFAULT_DAYS - 1))
    until = _day(request, "until", today)
    if until < since:
        raise HTTPException(400, "until: the last day must not be before the first")
    start = datetime.combine(since, datetime.min.time(), UTC)
    return start, datetime.combine(until + timedelta(days=1), datetime.min.time(), UTC)


def _report(request: Request) -> Report:
    console = console_of(request)
    since, until = _range(request)
    return build_report(console.store, since, until, console.report_fields)


def report(request: Request) -> Response:
    made = _report(request)
    context = {
        "report": made,
        "columns": list(ReportColumn),
        "amount": decimal_text,
        "since": made.since.date().isoformat(),
        "until": (made.until - timedelta(days=1)).date().isoformat(),
    }
    return render(request, "report.html", context)


def report_csv(request: Request) -> Response:
    """The same lines as ``outbox report --csv``: decimals exactly as summed."""
    made = _report(request)
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(table_rows(made))
    name = f"outbox-report-{made.since.date()}-{(made.until - timedelta(days=1)).date()}.csv"
    headers = {"Content-Disposition": f'attachment; filename="{name}"'}
    return Response(out.getvalue(), media_type="text/csv; charset=utf-8", headers=headers)
