"""What every request handler of the console shares, and how it renders a page.

Imports Starlette, the store's type and the console's own settings; never gRPC.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from starlette.requests import Request
from starlette.responses import Response
from starlette.templating import Jinja2Templates

from outbox.console.security import LoginThrottle, csrf_token
from outbox.console.settings import ConsoleSettings
from outbox.console.users import User, UserFile
from outbox.report import FieldMap
from outbox.store import Store

TEMPLATES = Path(__file__).parent / "templates"


def when(value: object) -> str:
    """A time as ``YYYY-MM-DD HH:MM:SS`` (UTC); a stored non-time as it is; None as ""."""
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    return "" if value is None else str(value)


def _environment() -> jinja2.Environment:
    """Autoescaping on for every template, whatever its name; undefined names fail loudly."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters["when"] = when
    return env


@dataclass
class Console:
    store: Store
    settings: ConsoleSettings
    users: UserFile
    throttle: LoginThrottle
    templates: Jinja2Templates
    report_fields: FieldMap  # where each method's amount and currency sit (the Report page)

    @classmethod
    def make(
        cls, store: Store, settings: ConsoleSettings, report_fields: FieldMap | None = None
    ) -> Console:
        return cls(
            store,
            settings,
            UserFile(settings.users_file),
            LoginThrottle(),
            Jinja2Templates(env=_environment()),
            report_fields or {},
        )


def console_of(request: Request) -> Console:
    found: Console = request.app.state.console
    return found


def user_of(request: Request) -> User:
    """The authenticated user (the gate let the request through, so there is one)."""
    found: User = request.scope["state"]["user"]
    return found


def render(request: Request, name: str, context: dict[str, Any], status: int = 200) -> Response:
    """A template with what every page needs: the user, the CSRF token, a flash message."""
    base = {
        "request": request,
        "user": request.scope.get("state", {}).get("user"),
        "csrf": csrf_token(request.session),
        "flash": request.session.pop("flash", None),
        "error": None,
    }
    return console_of(request).templates.TemplateResponse(
        request, name, {**base, **context}, status_code=status
    )
