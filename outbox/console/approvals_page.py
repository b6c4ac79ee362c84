"""The Approvals page (dual control, ``[console] dual_control = true``): the open requests to
cancel a row that may have executed, and a second, different operator's approve or reject
(a reason each, CSRF on every POST). The requester is shown no button, and a request they
post themselves is refused (403) before the store's own refusal.
Imports Starlette, the store and the console's own modules; never gRPC.
"""

from __future__ import annotations

from functools import partial

from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from outbox.clock import utcnow
from outbox.console.actions import actor_of, operator_form
from outbox.console.context import console_of, render
from outbox.errors import OperatorActionError, RowNotFoundError
from outbox.store import Approval

#: Decided requests the page shows below the open ones.
RECENT = 20


def approvals(request: Request, error: str | None = None, status: int = 200) -> Response:
    every = console_of(request).store.approvals(open_only=False)
    context = {
        "open": [a for a in every if a.decision is None],
        "decided": [a for a in every if a.decision is not None][:RECENT],
        "me": actor_of(request),
        "error": error,
    }
    return render(request, "approvals.html", context, status)


def _request_of(request: Request, number: int) -> Approval:
    """The open request ``number``; refused (403) when it is the actor's own."""
    found = [a for a in console_of(request).store.approvals() if a.id == number]
    if not found:
        raise HTTPException(404, f"no open approval request #{number}")
    if found[0].requested_by == actor_of(request):
        raise HTTPException(403, "dual control: a request is decided by a different operator")
    return found[0]


async def _decide(request: Request, approving: bool) -> Response:
    form, reason = await operator_form(request)
    number = str(form.get("id", ""))
    if not number.isdigit():
        raise HTTPException(400, "id: a request's number")
    await run_in_threadpool(_request_of, request, int(number))
    store, actor = console_of(request).store, actor_of(request)
    decide = store.approve if approving else store.reject
    try:
        done = await run_in_threadpool(decide, int(number), actor, reason, utcnow())
    except (OperatorActionError, RowNotFoundError) as exc:
        again = Request(dict(request.scope, method="GET"), request.receive)
        return await run_in_threadpool(partial(approvals, again, str(exc), 409))
    request.session["flash"] = f"request #{done.id} {done.decision} by {actor}"
    return RedirectResponse(request.url_for("approvals"), 303)


async def approve(request: Request) -> Response:
    return await _decide(request, approving=True)


async def reject(request: Request) -> Response:
    return await _decide(request, approving=False)
