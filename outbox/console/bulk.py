"""The Rows page's bulk actions (operators only, a reason each, CSRF on every POST):
requeue or cancel the rows ticked, or everything matching the page's filter after a preview
(the count the store's dry run gives, and the first keys) and a confirmation.

The Rows page pages with its own ``console_views.RowFilter`` (a reference prefix, a keyset
cursor, an order); ``bulk_filter`` turns it into the ``outbox.filters.RowFilter`` the store's
bulk actions take. Imports Starlette, the store and the console's own modules; never gRPC.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from outbox.clock import utcnow
from outbox.console.actions import actor_of, operator_form
from outbox.console.context import console_of, render, user_of
from outbox.console.pages import FILTER_PARAMS, row_filter
from outbox.console.security import check_csrf
from outbox.filters import FilterError, RowFilter
from outbox.store import BulkResult
from outbox.store import console_views as views

ACTIONS = ("requeue", "cancel")
#: The most keys one ticked selection may carry (one page of the Rows page is 50).
MAX_SELECTED = 500


def bulk_filter(page: views.RowFilter) -> RowFilter:
    """The Rows page's filter as the store's bulk actions take it. The reference matches
    exactly here (the page matches its start): an action never takes more than was named."""
    return RowFilter(
        state=page.state,
        park_reason=page.park_reason,
        method=page.method,
        lane=page.lane,
        reference=page.reference,
        key_prefix=page.key_prefix,
        created_since=page.since,
        created_until=page.until,
        maybe_executed=page.maybe_executed,
    )


def _action(form: Any) -> str:
    action = str(form.get("action", ""))
    if action not in ACTIONS:
        raise HTTPException(400, "action: requeue or cancel")
    return action


def _matching(form: Any) -> tuple[RowFilter, dict[str, str]]:
    """The filter the form carries (the Rows page's query), refused when empty."""
    params = {k: str(form.get(k)) for k in FILTER_PARAMS if form.get(k)}
    wanted = bulk_filter(row_filter(params))
    if wanted.is_empty():
        raise HTTPException(400, "choose a filter first: the console never acts on every row")
    return wanted, params


def _options(request: Request, form: Any, action: str) -> dict[str, bool]:
    """A cancel's force (ticked) and the console's dual control; a requeue has none."""
    if action == "requeue":
        return {}
    dual = console_of(request).settings.dual_control
    return {"force": form.get("force") == "yes", "dual_control": dual}


async def _perform(request: Request, run: partial[BulkResult], context: dict[str, Any]) -> Response:
    try:
        result = await run_in_threadpool(run)
    except FilterError as exc:
        raise HTTPException(400, str(exc)) from None
    return render(request, "bulk.html", {**context, "result": result, "actor": actor_of(request)})


async def selected(request: Request) -> Response:
    """Requeue or cancel the ticked rows (``key`` repeated)."""
    form, reason = await operator_form(request)
    action, keys = _action(form), [str(k) for k in form.getlist("key")]
    if not 0 < len(keys) <= MAX_SELECTED:
        raise HTTPException(400, f"tick between 1 and {MAX_SELECTED} rows")
    store = console_of(request).store
    method = store.requeue_keys if action == "requeue" else store.cancel_keys
    options = _options(request, form, action)
    act = partial(method, keys, actor_of(request), reason, utcnow(), **options)
    return await _perform(request, act, {"described": None, "params": {}})


async def preview(request: Request) -> Response:
    """What acting on everything matching the filter would take: a dry run, nothing written."""
    form = await request.form()
    _check(request, form)
    action, (wanted, params) = _action(form), _matching(form)
    store = console_of(request).store
    method = store.requeue_matching if action == "requeue" else store.cancel_matching
    run = partial(method, wanted, actor_of(request), "preview", utcnow(), dry_run=True)
    try:
        result = await run_in_threadpool(run)
    except FilterError as exc:
        raise HTTPException(400, str(exc)) from None
    context = {"result": result, "described": wanted.describe(), "params": params, "action": action}
    return render(request, "bulk_preview.html", context)


def _check(request: Request, form: Any) -> None:
    check_csrf(request.session, form.get("csrf"))
    if not user_of(request).may_act:
        raise HTTPException(403, "viewers cannot act: ask an operator")


async def matching(request: Request) -> Response:
    """Act on everything matching the filter (the confirmation of a preview)."""
    form, reason = await operator_form(request)
    action, (wanted, params) = _action(form), _matching(form)
    store = console_of(request).store
    method = store.requeue_matching if action == "requeue" else store.cancel_matching
    act = partial(
        method, wanted, actor_of(request), reason, utcnow(), **_options(request, form, action)
    )
    context = {"described": wanted.describe(), "params": params}
    return await _perform(request, act, context)
