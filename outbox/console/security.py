"""The console's defences that are not about who you are: headers, CSRF, login throttling.

- Every response carries a CSP of ``default-src 'self'`` (no inline script or style runs),
  ``X-Frame-Options: DENY``, ``Referrer-Policy: no-referrer`` and ``nosniff``; pages are not
  cached. A cookie set over HTTPS (TLS, or a loopback proxy's ``X-Forwarded-Proto: https``
  that uvicorn believes) gets ``Secure``.
- CSRF: a random token kept in the signed session; every POST must echo it (``csrf``).
- Login: at most ``LOGIN_FAILURES`` failures per user name per ``LOGIN_WINDOW`` seconds.
Imports Starlette and the config's loopback test.
"""

from __future__ import annotations

import secrets
import time
from collections import deque
from collections.abc import MutableMapping
from typing import Any

from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from outbox.config import is_loopback

CSP = (
    "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; "
    "form-action 'self'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cross-Origin-Opener-Policy": "same-origin",
}
LOGIN_FAILURES = 5
LOGIN_WINDOW = 300.0
CSRF_FIELD = "csrf"


class SecurityHeaders:
    """Pure ASGI: adds ``HEADERS`` (and ``Secure`` on cookies over HTTPS) to every response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        https = served_over_https(scope)

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                _add_headers(MutableHeaders(scope=message), https, scope["path"])
            await send(message)

        await self.app(scope, receive, with_headers)


def peer_is_loopback(scope: Scope) -> bool:
    """The TCP peer (uvicorn runs without proxy_headers: this is never a forwarded address)."""
    client = scope.get("client")
    return client is not None and is_loopback(str(client[0]))


def served_over_https(scope: Scope) -> bool:
    """TLS here, or a proxy on this host saying it took the request over HTTPS."""
    if scope.get("scheme") == "https":
        return True
    forwarded = dict(scope.get("headers", [])).get(b"x-forwarded-proto", b"")
    return peer_is_loopback(scope) and forwarded.strip().lower() == b"https"


def _add_headers(headers: MutableHeaders, https: bool, path: str) -> None:
    for name, value in HEADERS.items():
        headers[name] = value
    if not path.startswith("/static/"):
        headers["Cache-Control"] = "no-store"
    if https:
        cookies = headers.getlist("set-cookie")
        del headers["set-cookie"]
        for cookie in cookies:
            secure = "secure" in cookie.lower().split("; ")
            headers.append("set-cookie", cookie if secure else cookie + "; secure")


def csrf_token(session: MutableMapping[str, Any]) -> str:
    """The session's token, made on first use."""
    token = session.get(CSRF_FIELD)
    if not isinstance(token, str) or not token:
        token = session[CSRF_FIELD] = secrets.token_urlsafe(32)
    return token


def check_csrf(session: MutableMapping[str, Any], sent: object) -> None:
    """403 unless ``sent`` is this session's token."""
    expected = session.get(CSRF_FIELD)
    if not (isinstance(expected, str) and expected and isinstance(sent, str)):
        raise HTTPException(403, "missing CSRF token: reload the page and try again")
    if not secrets.compare_digest(expected.encode(), sent.encode()):
        raise HTTPException(403, "wrong CSRF token: reload the page and try again")


class LoginThrottle:
    """Failures per user name in a sliding window (in memory: one console process)."""

    def __init__(self, limit: int = LOGIN_FAILURES, window: float = LOGIN_WINDOW) -> None:
        self.limit, self.window = limit, window
        self._failures: dict[str, deque[float]] = {}

    def _recent(self, name: str, now: float) -> deque[float]:
        failures = self._failures.setdefault(name, deque())
        while failures and failures[0] <= now - self.window:
            failures.popleft()
        return failures

    def blocked_for(self, name: str, now: float | None = None) -> float:
        """Seconds until ``name`` may try again; 0 when it may now."""
        now = time.monotonic() if now is None else now
        failures = self._recent(name, now)
        return failures[0] + self.window - now if len(failures) >= self.limit else 0.0

    def failed(self, name: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self._recent(name, now).append(now)

    def succeeded(self, name: str) -> None:
        self._failures.pop(name, None)
