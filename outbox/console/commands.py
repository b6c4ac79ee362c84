"""``outbox console``: serve the web console; ``outbox console user add|list|remove``.

Importable without the ``console`` extra: its libraries are imported when a command runs,
and their absence is one line naming ``pip install 'recrypt-outbox[console]'``. The config is
loaded without the API key (the console never needs it). Imports click and the outbox's
config; never gRPC.
"""

from __future__ import annotations

import getpass
import importlib
import sys
from types import ModuleType
from typing import Any

import click

from outbox.config import Config, load
from outbox.errors import OutboxError
from outbox.report import FieldMap

EXTRA_HINT = "pip install 'recrypt-outbox[console]'"
NEEDED = ("starlette", "jinja2", "uvicorn", "argon2", "itsdangerous", "python_multipart")
MIN_PASSWORD = 12


class ConsoleExtraMissing(OutboxError):
    """The console's libraries are not installed."""


def require_extra() -> None:
    """Fail with one line when any of the console's libraries is missing."""
    for name in NEEDED:
        try:
            importlib.import_module(name)
        except ImportError:
            raise ConsoleExtraMissing(
                f"the console needs the 'console' extra ({name} is not installed): {EXTRA_HINT}"
            ) from None


def _console_modules() -> tuple[ModuleType, ModuleType]:
    require_extra()
    settings = importlib.import_module("outbox.console.settings")
    users = importlib.import_module("outbox.console.users")
    return settings, users


def _config_path(ctx: click.Context) -> str | None:
    path: str | None = getattr(ctx.find_root().obj, "config_path", None)
    return path


def _settings(ctx: click.Context) -> Any:
    settings, _users = _console_modules()
    path = _config_path(ctx)
    return settings.resolve(load(path, with_key=False), path)


@click.group(invoke_without_command=True)
@click.pass_context
def console(ctx: click.Context) -> None:
    """The operator's web console (README, "The console"); without a subcommand: serve it."""
    if ctx.invoked_subcommand is None:
        _serve(ctx)


def _serve(ctx: click.Context) -> None:
    settings = _settings(ctx)
    app = importlib.import_module("outbox.console.app")
    store = ctx.find_root().obj.store()
    if not settings.users_file.exists() and not settings.proxy_header:
        click.echo(
            f"warning: no users yet ({settings.users_file}): add one with "
            "`outbox console user add NAME --role operator`",
            err=True,
        )
    click.echo(f"outbox console on http://{settings.host}:{settings.port}/", err=True)
    app.serve(store, settings, _report_fields(ctx.find_root().obj.config))


def _report_fields(config: Config) -> FieldMap:
    """Where each method's amount sits, for the Report page: the protos' marks and
    ``[report]`` (a name that does not exist fails here, at start)."""
    from outbox.descriptors import Catalog  # noqa: PLC0415 (protobuf loads only when serving)

    return Catalog.report_field_map(config)


@console.group()
def user() -> None:
    """The console's users (a JSON file of argon2 hashes, mode 0600)."""


def read_password(name: str) -> str:
    """From standard input: twice, hidden, on a terminal; one line when piped."""
    if sys.stdin.isatty():
        first = getpass.getpass(f"password for {name}: ")
        if getpass.getpass("again: ") != first:
            raise OutboxError("the two passwords differ; nothing was written")
        password = first
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if len(password) < MIN_PASSWORD:
        raise OutboxError(f"the password is shorter than {MIN_PASSWORD} characters")
    return password


@user.command("add")
@click.argument("name")
@click.option(
    "--role", type=click.Choice(["viewer", "operator"]), required=True, help="what the user may do"
)
@click.option(
    "--no-password",
    is_flag=True,
    help="known only through [console] trusted_proxy_header: no password login",
)
@click.pass_context
def user_add(ctx: click.Context, name: str, role: str, no_password: bool) -> None:
    """Add NAME (or change its role and password); the password is read from standard input."""
    settings = _settings(ctx)
    _settings_module, users = _console_modules()
    users.check_name(name)
    digest = "" if no_password else users.hash_password(read_password(name))
    known = users.read_users(settings.users_file)
    known[name] = users.User(name, users.Role(role), digest)
    users.write_users(settings.users_file, known)
    click.echo(f"{name}: {role}, in {settings.users_file}")


@user.command("list")
@click.pass_context
def user_list(ctx: click.Context) -> None:
    """Each user and role (never a hash)."""
    settings = _settings(ctx)
    _settings_module, users = _console_modules()
    for found in users.read_users(settings.users_file).values():
        login = "password" if found.hash else "proxy header only"
        click.echo(f"{found.name}\t{found.role.value}\t{login}")


@user.command("remove")
@click.argument("name")
@click.pass_context
def user_remove(ctx: click.Context, name: str) -> None:
    """Remove NAME: its sessions end at their next request."""
    settings = _settings(ctx)
    _settings_module, users = _console_modules()
    known = users.read_users(settings.users_file)
    if known.pop(name, None) is None:
        raise OutboxError(f"no console user {name} in {settings.users_file}")
    users.write_users(settings.users_file, known)
    click.echo(f"{name}: removed from {settings.users_file}")
