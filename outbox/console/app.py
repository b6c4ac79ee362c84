"""The console's ASGI application: routes, middleware, and uvicorn to serve it.

Middleware, outermost first: security headers, the signed session cookie (``HttpOnly``,
``SameSite=Lax``; ``Secure`` added over HTTPS), the authentication gate. Imports Starlette,
uvicorn and the console's modules; never gRPC, never the API key.
"""

from __future__ import annotations

from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from outbox.console import actions, approvals_page, auth, bulk, holds_page, pages, report_page
from outbox.console.context import Console
from outbox.console.security import SecurityHeaders
from outbox.console.settings import ConsoleSettings, session_secret
from outbox.report import FieldMap
from outbox.store import Store

STATIC = Path(__file__).parent / "static"
SESSION_COOKIE = "outbox_console"
SESSION_SECONDS = 12 * 3600  # one shift


async def _http_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return PlainTextResponse(f"{exc.status_code}: {exc.detail}", status_code=exc.status_code)


def routes() -> list[Route | Mount]:
    return [
        Route("/", pages.overview, name="overview"),
        Route("/rows", pages.rows, name="rows"),
        Route("/row", pages.row, name="row"),
        Route("/lanes", pages.lanes, name="lanes"),
        Route("/report", report_page.report, name="report"),
        Route("/report.csv", report_page.report_csv, name="report_csv"),
        Route("/row/requeue", actions.requeue, methods=["POST"], name="requeue"),
        Route("/row/cancel", actions.cancel, methods=["POST"], name="cancel"),
        Route("/rows/selected", bulk.selected, methods=["POST"], name="bulk_selected"),
        Route("/rows/matching/preview", bulk.preview, methods=["POST"], name="bulk_preview"),
        Route("/rows/matching", bulk.matching, methods=["POST"], name="bulk_matching"),
        Route("/holds", holds_page.holds, name="holds"),
        Route("/holds/hold", holds_page.hold, methods=["POST"], name="hold"),
        Route("/holds/release", holds_page.release, methods=["POST"], name="release"),
        Route("/approvals", approvals_page.approvals, name="approvals"),
        Route("/approvals/approve", approvals_page.approve, methods=["POST"], name="approve"),
        Route("/approvals/reject", approvals_page.reject, methods=["POST"], name="reject"),
        Route("/login", auth.login_page, name="login"),
        Route("/login", auth.login, methods=["POST"]),
        Route("/logout", auth.logout, methods=["POST"], name="logout"),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]


def make_app(
    store: Store,
    settings: ConsoleSettings,
    secret: str | None = None,
    report_fields: FieldMap | None = None,
) -> Starlette:
    console = Console.make(store, settings, report_fields)
    middleware = [
        Middleware(SecurityHeaders),
        Middleware(
            SessionMiddleware,
            secret_key=secret or session_secret(settings.secret_file),
            session_cookie=SESSION_COOKIE,
            max_age=SESSION_SECONDS,
            same_site="lax",
        ),
        Middleware(auth.AuthGate, users=console.users, proxy_header=settings.proxy_header),
    ]
    app = Starlette(
        routes=routes(),
        middleware=middleware,
        exception_handlers={HTTPException: _http_error},
    )
    app.state.console = console
    return app


def serve(store: Store, settings: ConsoleSettings, report_fields: FieldMap | None = None) -> None:
    """Run uvicorn until interrupted. No proxy headers: the peer address is the real one
    (``security.served_over_https`` reads ``X-Forwarded-Proto`` from loopback itself)."""
    import uvicorn  # noqa: PLC0415 (only the serving process needs it)

    uvicorn.run(
        make_app(store, settings, report_fields=report_fields),
        host=settings.host,
        port=settings.port,
        proxy_headers=False,
        server_header=False,
        log_level="info",
    )
