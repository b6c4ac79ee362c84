"""The ``outbox`` group: its context object (``Outbox``), its one error line, ``fail``.

Every error this package raises on purpose (and an unreachable database) becomes one line
``error: …`` on stderr with exit 1, never a traceback; click's usage errors exit 2.

The configuration is loaded lazily, so ``simulator`` and ``demo`` need none, and only ``run``
reads the Recrypt API key: every other command works with the key file absent or unreadable
(an operator's account, a monitoring probe). Nothing here ever prints the key.

Command modules import this one; it imports none of them, nor grpc, rich or the daemon.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, NoReturn

import click
import sqlalchemy as sa
from sqlalchemy.engine import Engine, make_url

from outbox import migrate
from outbox.config import Config, load
from outbox.database import make_engine, normalise_url
from outbox.errors import OutboxError
from outbox.logs import describe_error
from outbox.store import Store
from outbox.tracing import operator_action


class InputError(OutboxError):
    """A command-line value that parses but cannot be used (bad JSON, naive time)."""


class Outbox:
    """What the commands share: the config path, and the config/engine/store made on demand."""

    def __init__(self, config_path: str | None) -> None:
        self.config_path = config_path
        self._config: Config | None = None
        self._engine: Engine | None = None

    @property
    def config(self) -> Config:
        if self._config is None:
            self._config = load(self.config_path, with_key=False)  # only `run` reads the key
        return self._config

    @property
    def url(self) -> str:
        return self.config.database.url

    def engine(self, *, create: bool = False) -> Engine:
        """The engine; unless ``create``, a missing SQLite file is an error, not a new file."""
        if self._engine is None:
            _refuse_missing_sqlite(self.url, create)
            self._engine = make_engine(self.url)
        return self._engine

    def store(self) -> Store:
        """A store on a schema at head (else: run ``outbox db upgrade``). Its operator
        actions, the CLI's and the console's, make spans when ``OTEL_*`` asks for them."""
        engine = self.engine()
        migrate.ensure_at_head(engine)
        return Store(engine, actions=operator_action)

    def shown_url(self) -> str | None:
        """The database URL without its password, once the config has loaded."""
        return shown_url(self.url) if self._config is not None else None

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()


def _refuse_missing_sqlite(url: str, create: bool) -> None:
    parsed = normalise_url(url)  # a bad URL: one line naming [database] url
    if create or parsed.get_backend_name() != "sqlite":
        return
    if parsed.database and parsed.database != ":memory:" and not Path(parsed.database).exists():
        raise OutboxError(
            f"no database at {shown_url(url)} (the file does not exist): run `outbox db upgrade` "
            "to create it, or point OUTBOX_DATABASE_URL / --config at the outbox database"
        )


def shown_url(url: str) -> str:
    """The URL as it may be shown: never with its password."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except sa.exc.ArgumentError:
        return "(an unparsable URL)"


def describe_failure(exc: BaseException, obj: Outbox | None) -> str:
    """One line for an OutboxError, or a database error naming the URL (not the password)."""
    if isinstance(exc, OutboxError):
        return str(exc)
    reason = describe_error(exc)  # a database may quote a row's value: never shown
    if not isinstance(exc, sa.exc.SQLAlchemyError):
        return f"{type(exc).__name__}: {reason}"
    where = obj.shown_url() if obj is not None else None
    return f"database {where}: {reason}" if where else f"database: {reason}"


class OutboxGroup(click.Group):
    """Turns expected failures of any subcommand into one ``error: …`` line and exit 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (OutboxError, sa.exc.DBAPIError) as exc:
            obj = ctx.obj if isinstance(ctx.obj, Outbox) else None
            fail(describe_failure(exc, obj))


def fail(message: str, code: int = 1) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


@click.group(cls=OutboxGroup)
@click.option(
    "--config",
    "config_path",
    envvar="OUTBOX_CONFIG",
    type=click.Path(dir_okay=False),
    default=None,
    help="TOML config file (env OUTBOX_CONFIG); without it: defaults plus env overrides.",
)
@click.version_option(package_name="recrypt-outbox")
@click.pass_context
def main(ctx: click.Context, config_path: str | None) -> None:
    """recrypt-outbox: a transactional outbox for the Recrypt gRPC API."""
    ctx.obj = Outbox(config_path)
    ctx.call_on_close(ctx.obj.close)


pass_outbox = click.make_pass_decorator(Outbox)
