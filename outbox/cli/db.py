"""``outbox db``: ``upgrade`` migrates to head, ``current`` says where it is, ``roles`` prints
the SQL an administrator runs to create the database roles."""

from __future__ import annotations

import click
from sqlalchemy.engine import make_url

from outbox import migrate, roles
from outbox.cli.app import Outbox, fail, main, pass_outbox, shown_url


@main.group()
def db() -> None:
    """The schema: `db upgrade` migrates to head, `db current` says where it is."""


@db.command("upgrade")
@pass_outbox
def db_upgrade(obj: Outbox) -> None:
    """Migrate the database to the newest schema (creates a SQLite file if needed)."""
    engine = obj.engine(create=True)
    migrate.upgrade(engine)
    click.echo(f"{shown_url(obj.url)} is at revision {migrate.current(engine)} (head)")


@db.command("current")
@pass_outbox
def db_current(obj: Outbox) -> None:
    """Show the database's schema revision and the head this version needs; exit 1 off head."""
    engine = obj.engine()
    found, wanted = migrate.current(engine), migrate.head()
    click.echo(f"database: {shown_url(obj.url)}")
    click.echo(f"current:  {found or 'none (no outbox tables)'}")
    click.echo(f"head:     {wanted}")
    click.echo("at head:  " + ("yes" if found == wanted else "no: run `outbox db upgrade`"))
    migrate.ensure_at_head(engine)  # off head: one line saying what to do, exit 1


@db.command("roles")
@click.option("--print", "print_sql", is_flag=True, help="Print the SQL (required).")
@click.option("--grants", is_flag=True, help="Step 2: the grants, to run after `db upgrade`.")
@click.option(
    "--backend",
    type=click.Choice(sorted(roles.BACKENDS)),
    help="Default: the config's database URL.",
)
@click.option("--database", help="The outbox database's name. Default: the config's.")
@click.option("--prefix", default="outbox", show_default=True, help="Roles are PREFIX_owner, …")
@click.option("--host", default="%", show_default=True, help="MariaDB: the accounts' host.")
@pass_outbox
def db_roles(
    obj: Outbox,
    *,
    print_sql: bool,
    grants: bool,
    backend: str | None,
    database: str | None,
    prefix: str,
    host: str,
) -> None:
    """Print the SQL creating the owner, daemon, writer, reader and operator roles.

    Step 1 (this) before the first `db upgrade`, step 2 (--grants) after each one; an
    administrator runs both with psql or mariadb (docs/operations.md, "Database roles").
    """
    if not print_sql:
        fail("pass --print: the SQL is run by an administrator, e.g. `… --print | psql`")
    url = make_url(obj.url) if backend is None or database is None else None
    source = "--backend" if backend else "the [database] url"
    backend = backend or (url.get_backend_name() if url else "")
    names = roles.RoleNames(database or (url.database if url else None) or "", prefix, host)
    click.echo(roles.script(backend, names, grants=grants, source=source), nl=False)
