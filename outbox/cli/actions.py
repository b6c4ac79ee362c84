"""``outbox requeue`` and ``outbox cancel``: an operator's actions on one row, each recorded in
the row's history with who acted and why."""

from __future__ import annotations

import getpass
import os
import socket
from collections.abc import Callable
from typing import Any

import click

from outbox.cli.app import Outbox, main, pass_outbox
from outbox.clock import utcnow


def default_actor() -> str:
    """Who acts: the sudo caller if any, else the login name; with the host."""
    user = os.environ.get("SUDO_USER")
    if not user:
        try:
            user = getpass.getuser()
        except (OSError, KeyError):
            user = "unknown"
    return f"{user}@{socket.gethostname()}"


def _non_empty(_ctx: click.Context, _param: click.Parameter, value: str) -> str:
    if not value.strip():
        raise click.BadParameter("must say why (it is recorded in the row's history)")
    return value.strip()


def operator_options(command: Callable[..., Any]) -> Callable[..., Any]:
    command = click.option(
        "--actor", default=default_actor, show_default="user@host", help="Recorded as who acted."
    )(command)
    return click.option(
        "--reason", required=True, callback=_non_empty, help="Why (recorded in the history)."
    )(command)


@main.command()
@click.argument("key")
@operator_options
@pass_outbox
def requeue(obj: Outbox, key: str, reason: str, actor: str) -> None:
    """Send a parked row again (parked -> pending), with the same key."""
    row = obj.store().requeue(key, actor, reason, utcnow())
    click.echo(f"{row.idempotency_key} requeued by {actor}: now {row.state}")


@main.command()
@click.argument("key")
@operator_options
@click.option("--force", is_flag=True, help="Also cancel a row that may have executed.")
@pass_outbox
def cancel(obj: Outbox, key: str, reason: str, actor: str, force: bool) -> None:
    """Cancel a pending or parked row; refuses one that may have executed unless --force."""
    row = obj.store().cancel(key, actor, reason, utcnow(), force)
    click.echo(f"{row.idempotency_key} cancelled by {actor}: now {row.state}")
