"""The schema's Alembic history, driven from code (``outbox db upgrade``, the daemon's start check).

There is no alembic.ini: the script directory is ``outbox/_migrations`` in the wheel (or
``migrations/`` in a checkout), and the connection is handed to ``env.py`` through
``config.attributes["connection"]``. Each command runs in one ``engine.begin()`` transaction,
which also makes it work on in-memory SQLite (the same connection the caller's engine pools).
"""

from __future__ import annotations

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import URL, Connection, Engine

from outbox.database import normalise_url
from outbox.errors import SchemaNotReadyError
from outbox.resources import migrations_dir


def alembic_config(url_or_connection: str | URL | Connection) -> Config:
    """A Config for Alembic's ``command`` functions, pointing at the shipped migrations."""
    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    if isinstance(url_or_connection, Connection):
        config.attributes["connection"] = url_or_connection
    else:
        url = normalise_url(url_or_connection).render_as_string(hide_password=False)
        config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))  # ini interpolation
    return config


def upgrade(engine: Engine, revision: str = "head") -> None:
    with engine.begin() as connection:
        command.upgrade(alembic_config(connection), revision)


def downgrade(engine: Engine, revision: str) -> None:
    with engine.begin() as connection:
        command.downgrade(alembic_config(connection), revision)


def stamp(engine: Engine, revision: str = "head") -> None:
    """Record ``revision`` without running anything (for a schema made by other means)."""
    with engine.begin() as connection:
        command.stamp(alembic_config(connection), revision)


def current(engine: Engine) -> str | None:
    """The database's revision, or None when it has never been migrated."""
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def head() -> str:
    revision = ScriptDirectory(str(migrations_dir())).get_current_head()
    if revision is None:
        raise FileNotFoundError(f"no migrations found in {migrations_dir()}")
    return revision


def ensure_at_head(engine: Engine) -> None:
    """Refuse to work on a schema this version of the outbox does not know."""
    found, wanted = current(engine), head()
    if found == wanted:
        return
    raise SchemaNotReadyError(
        f"the database schema is at revision {found or 'none (no outbox tables)'}, "
        f"this version of outbox needs {wanted}: run `outbox db upgrade` "
        "(or upgrade the outbox package if the database is newer)"
    )
