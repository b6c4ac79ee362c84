"""The console's pages: Overview, Rows, Row, Lanes. Each reads through the store only.

Sync handlers (Starlette runs them in its thread pool: the store blocks). A request from
htmx (``HX-Request``) gets only the page's refreshing part. Imports Starlette, the store and
the console's own modules; never gRPC.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from outbox.console.chart import chart
from outbox.console.context import console_of, render
from outbox.console.redact import pretty
from outbox.console.runbook import advice_for
from outbox.errors import RowNotFoundError
from outbox.schema import State
from outbox.store.console_views import RowFilter
from outbox.vocabulary import HistoryKind, HoldKind, ParkReason

CHART_HOURS = 3
PAGE_SIZE = 50
FILTER_TEXT = ("state", "park_reason", "method", "lane", "reference", "key_prefix")
#: The query parameters a filter is made of (the bulk actions carry them in their forms).
FILTER_PARAMS = (*FILTER_TEXT, "since", "until", "maybe_executed")


def _partial(request: Request) -> bool:
    return request.headers.get("hx-request") == "true"


def age(now: datetime, then: datetime | None) -> str:
    """``3 m 12 s`` style, or an empty text."""
    if not isinstance(then, datetime):
        return ""
    seconds = max(int((now - then).total_seconds()), 0)
    hours, rest = divmod(seconds, 3600)
    if hours:
        return f"{hours} h {rest // 60} m"
    return f"{rest // 60} m {rest % 60} s" if rest >= 60 else f"{rest} s"


def overview(request: Request) -> Response:
    store = console_of(request).store
    now = store.database_now()
    start = (now - timedelta(hours=CHART_HOURS)).replace(second=0, microsecond=0)
    status = store.status(now)  # holds included: the Overview shows them beside the gates
    context = {
        "now": now,
        "status": status,
        "chart": chart(store.activity(start, CHART_HOURS * 60 + 1)),
        "age": age,
        "hours": CHART_HOURS,
        "holds": status.holds,
    }
    return render(request, "_overview.html" if _partial(request) else "overview.html", context)


def _time(params: Any, name: str) -> datetime | None:
    value = params.get(name) or None
    if value is None:
        return None
    try:
        found = datetime.fromisoformat(value)
    except ValueError:
        raise HTTPException(400, f"{name}: write a time as 2026-11-23T09:00 (UTC)") from None
    return found if found.tzinfo else found.replace(tzinfo=UTC)


def _int(params: Any, name: str) -> int | None:
    value = params.get(name) or None
    if value is not None and not value.isdigit():
        raise HTTPException(400, f"{name}: a row id (digits)")
    return int(value) if value is not None else None


def row_filter(params: Any) -> RowFilter:
    """The Rows page's query string as a filter (unknown values simply match nothing)."""
    texts = {name: (params.get(name) or None) for name in FILTER_TEXT}
    maybe = params.get("maybe_executed") or None
    return RowFilter(
        **texts,
        since=_time(params, "since"),
        until=_time(params, "until"),
        maybe_executed=None if maybe is None else maybe == "yes",
        oldest_first=params.get("order") == "oldest",
        after_id=_int(params, "after"),
    )


def rows(request: Request) -> Response:
    params = request.query_params
    page = console_of(request).store.find_rows(row_filter(params), PAGE_SIZE)
    kept = {k: v for k, v in params.items() if v and k != "after"}
    context = {
        "page": page,
        "params": kept,
        "states": [s.value for s in State],
        "reasons": [r.value for r in ParkReason],
        "filter_params": {k: v for k, v in kept.items() if k in FILTER_PARAMS},
    }
    return render(request, "_rows.html" if _partial(request) else "rows.html", context)


def row(request: Request, error: str | None = None, status: int = 200) -> Response:
    console = console_of(request)
    key = request.query_params.get("key", "")
    try:
        found = console.store.get(key)
    except RowNotFoundError:
        raise HTTPException(404, "no outbox row has this idempotency key") from None
    history = console.store.history(key)
    redact = console.settings.redact_fields
    heading, steps = advice_for(found.state, found.park_reason)
    context = {
        "row": found,
        "payload": pretty(found.payload, redact),
        "response": pretty(found.response, redact),
        "timeline": [h for h in history if h.kind != HistoryKind.STREAM],
        "stream": [h for h in history if h.kind == HistoryKind.STREAM],
        "advice_heading": heading,
        "advice": steps,
        "dual_control": console.settings.dual_control,
        "holds": [h for h in console.store.holds() if h.value in (found.lane, found.method)],
        "error": error,
    }
    return render(request, "row.html", context, status)


def lanes(request: Request) -> Response:
    store = console_of(request).store
    return render(
        request,
        "lanes.html",
        {
            "now": store.database_now(),
            "lanes": store.blocked_lanes(),
            "age": age,
            "held": {h.value for h in store.holds() if h.kind == HoldKind.LANE},
        },
    )
