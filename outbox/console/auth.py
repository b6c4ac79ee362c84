"""Who is asking: a password login kept in a signed session, or a trusted proxy's header.

``AuthGate`` lets a request through only with a known user (``/login`` and ``/static/`` are
open): otherwise a page is redirected to the login form and anything else answers 401. A proxy
header is believed only from a loopback peer, and only for a name in the users file (which
gives the role). Imports Starlette and the console's own modules.
"""

from __future__ import annotations

import logging
from urllib.parse import quote

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from outbox.console.context import console_of, render
from outbox.console.security import check_csrf, csrf_token, peer_is_loopback
from outbox.console.users import User, UserFile, verify

log = logging.getLogger("outbox.console")
OPEN_PATHS = ("/login", "/static/")
MAX_NAME = 64


def identify(scope: Scope, users: UserFile, proxy_header: str) -> User | None:
    """The user this request speaks for, or None."""
    if proxy_header:
        named = dict(scope.get("headers", [])).get(proxy_header.encode("latin-1"))
        if named is not None and peer_is_loopback(scope):
            return users.get(named.decode("latin-1").strip())
        if named is not None:
            log.warning("event=proxy_header_ignored why=peer_not_loopback")
    name = scope.get("session", {}).get("user")
    return users.get(name) if isinstance(name, str) else None


class AuthGate:
    """Pure ASGI, inside SessionMiddleware: sets ``scope["state"]["user"]`` or refuses."""

    def __init__(self, app: ASGIApp, users: UserFile, proxy_header: str) -> None:
        self.app, self.users, self.proxy_header = app, users, proxy_header

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith(OPEN_PATHS):
            await self.app(scope, receive, send)
            return
        user = identify(scope, self.users, self.proxy_header)
        if user is None:
            await _refusal(scope)(scope, receive, send)
            return
        scope.setdefault("state", {})["user"] = user
        await self.app(scope, receive, send)


def _refusal(scope: Scope) -> Response:
    if scope["method"] in ("GET", "HEAD") and b"hx-request" not in dict(scope["headers"]):
        target = scope["path"] + (
            "?" + scope["query_string"].decode() if scope["query_string"] else ""
        )
        return RedirectResponse(f"/login?next={quote(target, safe='')}", status_code=303)
    return PlainTextResponse("log in first: /login", status_code=401)


def safe_next(target: str | None) -> str:
    """Only a path on this site: never ``//host`` or ``https://…`` (an open redirect)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


async def login_page(request: Request) -> Response:
    csrf_token(request.session)
    return render(request, "login.html", {"next": safe_next(request.query_params.get("next"))})


async def login(request: Request) -> Response:
    form = await request.form()
    check_csrf(request.session, form.get("csrf"))
    name, password = str(form.get("name", ""))[:MAX_NAME], str(form.get("password", ""))
    target = safe_next(str(form.get("next", "")))
    console = console_of(request)
    wait = console.throttle.blocked_for(name)
    if wait:
        message = f"too many failed logins for this user: try again in {wait:.0f} s"
        return render(request, "login.html", {"next": target, "error": message}, 429)
    user = console.users.get(name)
    if not await run_in_threadpool(verify, user, password):
        console.throttle.failed(name)
        log.warning("event=console_login_failed")
        return render(
            request, "login.html", {"next": target, "error": "wrong user or password"}, 401
        )
    console.throttle.succeeded(name)
    request.session.clear()  # a new session (and CSRF token) at each login
    request.session["user"] = name
    log.info("event=console_login user=%s", name)
    return RedirectResponse(target, status_code=303)


async def logout(request: Request) -> Response:
    form = await request.form()
    check_csrf(request.session, form.get("csrf"))
    request.session.clear()
    return RedirectResponse("/login", status_code=303)
