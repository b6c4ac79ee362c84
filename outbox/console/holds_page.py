"""The Holds page: which lanes and methods no daemon claims (who held them, why, since when),
and the operator's hold and release (a reason each, CSRF on every POST, the actor the
authenticated user). Every daemon honours a hold within one poll (``Store.held``).
Imports Starlette, the store and the console's own modules; never gRPC.
"""

from __future__ import annotations

from functools import partial

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from outbox.clock import utcnow
from outbox.console.actions import actor_of, operator_form
from outbox.console.context import console_of, render
from outbox.errors import OperatorActionError
from outbox.vocabulary import HoldKind

MAX_VALUE = 255


def holds(request: Request, error: str | None = None, status: int = 200) -> Response:
    found = console_of(request).store.holds()
    context = {"holds": found, "kinds": [k.value for k in HoldKind], "error": error}
    return render(request, "holds.html", context, status)


def _target(form: FormData) -> tuple[str, str]:
    """The form's kind and value: a lane's name, or a method's full gRPC path."""
    kind, value = str(form.get("kind", "")), str(form.get("value", "")).strip()
    if kind not in {k.value for k in HoldKind}:
        raise HTTPException(400, "kind: lane or method")
    if not value or len(value) > MAX_VALUE:
        raise HTTPException(400, "value: the lane's name or the method's full path")
    if kind == HoldKind.METHOD and not value.startswith("/"):
        raise HTTPException(400, "a method is held by its full path: /pkg.Service/Method")
    return kind, value


async def _after(request: Request, message: str) -> Response:
    request.session["flash"] = message
    return RedirectResponse(request.url_for("holds"), 303)


async def _refused(request: Request, error: str) -> Response:
    again = Request(dict(request.scope, method="GET"), request.receive)
    return await run_in_threadpool(partial(holds, again, error, 409))


async def hold(request: Request) -> Response:
    form, reason = await operator_form(request)
    (kind, value), actor = _target(form), actor_of(request)
    store = console_of(request).store
    try:
        await run_in_threadpool(store.hold, kind, value, actor, reason, utcnow())
    except OperatorActionError as exc:
        return await _refused(request, str(exc))
    return await _after(request, f"{kind} {value} held by {actor}: no daemon claims its rows")


async def release(request: Request) -> Response:
    form, reason = await operator_form(request)
    (kind, value), actor = _target(form), actor_of(request)
    store = console_of(request).store
    try:
        await run_in_threadpool(store.release, kind, value, actor, reason)
    except OperatorActionError as exc:
        return await _refused(request, str(exc))
    return await _after(request, f"{kind} {value} released by {actor}")
