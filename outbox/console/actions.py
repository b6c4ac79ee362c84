"""The console's actions on one row: requeue and cancel (operators only, with a reason).

Each POST carries the session's CSRF token; the actor recorded in the row's history is the
authenticated user (``NAME@console``), never a name the form could claim. Imports Starlette,
the store's errors and the console's own modules.
"""

from __future__ import annotations

from functools import partial
from urllib.parse import urlencode

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from outbox.clock import utcnow
from outbox.console import pages
from outbox.console.context import console_of, user_of
from outbox.console.security import check_csrf
from outbox.console.settings import ConsoleSettings
from outbox.errors import OperatorActionError, RowNotFoundError
from outbox.store import RowView

MAX_REASON = 500
DUAL_CONTROL_REFUSAL = (
    "[console] dual_control is on: cancelling a row that may have executed needs a second "
    "operator to approve it, and this console cannot record such a request yet; ask another "
    "operator, or an administrator with the CLI"
)


def actor_of(request: Request) -> str:
    return f"{user_of(request).name}@console"


async def _checked(request: Request) -> tuple[FormData, str, str]:
    """The form, the row's key and the reason, once CSRF, role and reason are checked."""
    form = await request.form()
    check_csrf(request.session, form.get("csrf"))
    if not user_of(request).may_act:
        raise HTTPException(403, "viewers cannot act on rows: ask an operator")
    key, reason = str(form.get("key", "")), str(form.get("reason", "")).strip()
    if not reason:
        raise HTTPException(400, "a reason is required: say why, it goes in the row's history")
    return form, key, reason[:MAX_REASON]


def dual_control_refusal(settings: ConsoleSettings, row: RowView, force: bool) -> str | None:
    """Why this cancel needs a second operator, or None.

    The hook for issue 14's request → approve flow: instead of refusing, that flow records a
    cancel request here and lets a different operator approve or reject it.
    """
    if settings.dual_control and row.maybe_executed and force:
        return DUAL_CONTROL_REFUSAL
    return None


async def _done(request: Request, key: str, message: str) -> Response:
    request.session["flash"] = message
    return RedirectResponse(request.url_for("row").include_query_params(key=key), 303)


async def _refused(request: Request, key: str, error: str) -> Response:
    scope = dict(request.scope, method="GET", query_string=urlencode({"key": key}).encode())
    again = Request(scope, request.receive)
    return await run_in_threadpool(partial(pages.row, again, error, 409))


async def requeue(request: Request) -> Response:
    _form, key, reason = await _checked(request)
    store = console_of(request).store
    try:
        row = await run_in_threadpool(store.requeue, key, actor_of(request), reason, utcnow())
    except (OperatorActionError, RowNotFoundError) as exc:
        return await _refused(request, key, str(exc))
    return await _done(request, key, f"requeued by {actor_of(request)}: now {row.state}")


async def cancel(request: Request) -> Response:
    form, key, reason = await _checked(request)
    console, force = console_of(request), form.get("force") == "yes"
    try:
        found = await run_in_threadpool(console.store.get, key)
        refusal = dual_control_refusal(console.settings, found, force)
        if refusal:
            return await _refused(request, key, refusal)
        row = await run_in_threadpool(
            console.store.cancel, key, actor_of(request), reason, utcnow(), force
        )
    except (OperatorActionError, RowNotFoundError) as exc:
        return await _refused(request, key, str(exc).replace("--force", "force"))
    return await _done(request, key, f"cancelled by {actor_of(request)}: now {row.state}")
