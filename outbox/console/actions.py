"""The console's actions on one row: requeue and cancel (operators only, with a reason).

Each POST carries the session's CSRF token; the actor recorded in the row's history is the
authenticated user (``NAME@console``), never a name the form could claim. Under ``[console]
dual_control`` a forced cancel of a row that may have executed becomes a request a second
operator decides (``approvals_page``). Imports Starlette, the store and the console's own modules.
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
from outbox.errors import OperatorActionError, RowNotFoundError
from outbox.store import BulkResult

MAX_REASON = 500


def actor_of(request: Request) -> str:
    return f"{user_of(request).name}@console"


async def operator_form(request: Request) -> tuple[FormData, str]:
    """The form and its reason, once CSRF, the operator role and the reason are checked."""
    form = await request.form()
    check_csrf(request.session, form.get("csrf"))
    if not user_of(request).may_act:
        raise HTTPException(403, "viewers cannot act: ask an operator")
    reason = str(form.get("reason", "")).strip()
    if not reason:
        raise HTTPException(400, "a reason is required: say why, it goes in the history")
    return form, reason[:MAX_REASON]


async def _done(request: Request, key: str, message: str) -> Response:
    request.session["flash"] = message
    return RedirectResponse(request.url_for("row").include_query_params(key=key), 303)


async def _refused(request: Request, key: str, error: str) -> Response:
    scope = dict(request.scope, method="GET", query_string=urlencode({"key": key}).encode())
    again = Request(scope, request.receive)
    return await run_in_threadpool(partial(pages.row, again, error, 409))


async def requeue(request: Request) -> Response:
    form, reason = await operator_form(request)
    key, store = str(form.get("key", "")), console_of(request).store
    try:
        row = await run_in_threadpool(store.requeue, key, actor_of(request), reason, utcnow())
    except (OperatorActionError, RowNotFoundError) as exc:
        return await _refused(request, key, str(exc))
    return await _done(request, key, f"requeued by {actor_of(request)}: now {row.state}")


def cancelled_message(result: BulkResult, actor: str) -> str:
    if result.requested:
        number = result.requested[0][1]
        return f"cancel requested by {actor} (request #{number}): a second operator must approve"
    return f"cancelled by {actor}: now cancelled"


async def cancel(request: Request) -> Response:
    form, reason = await operator_form(request)
    key, console, actor = str(form.get("key", "")), console_of(request), actor_of(request)
    run = partial(
        console.store.cancel_keys,
        [key],
        actor,
        reason,
        utcnow(),
        force=form.get("force") == "yes",
        dual_control=console.settings.dual_control,
    )
    result = await run_in_threadpool(run)
    if result.skipped:
        why = result.skipped[0].why.replace("--force", "force")
        return await _refused(request, key, f"row {key} {why}")
    return await _done(request, key, cancelled_message(result, actor))
