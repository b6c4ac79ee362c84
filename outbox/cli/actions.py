"""``outbox requeue`` and ``outbox cancel`` (one row, several keys, or every row matching a
filter), and dual control's ``approve``, ``reject`` and ``approvals``: an operator's actions,
each recorded in the row's history with who acted (the OS user, ``user@host``) and why.

A filter action previews how many rows it takes and asks before acting on a terminal; a
script must say ``--yes`` (or ``--dry-run`` to only preview).
"""

from __future__ import annotations

import getpass
import os
import pwd
import socket
import sys
from collections.abc import Callable
from typing import Any

import click

from outbox.cli.app import InputError, Outbox, fail, main, pass_outbox
from outbox.cli.filtering import filter_options, row_filter
from outbox.cli.output import bulk_json, emit_json, plain_json
from outbox.cli.render import console, print_bulk
from outbox.clock import utcnow
from outbox.filters import RowFilter
from outbox.store import BulkResult, Store

ACTOR_REMOVED = (
    "--actor is no longer accepted: who acted is recorded as your OS user (user@host), "
    "which nobody can type in for someone else; run the command as yourself"
)


def default_actor() -> str:
    """Who acts: the OS account running the command (under sudo, the account that ran
    sudo), with the host. Not an option: an operator cannot act in someone else's name."""
    try:
        user = pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        user = getpass.getuser()
    if os.getuid() == 0 and os.environ.get("SUDO_USER"):
        user = os.environ["SUDO_USER"]  # set by sudo for root; only root could fake it
    return f"{user}@{socket.gethostname()}"


def _non_empty(_ctx: click.Context, _param: click.Parameter, value: str) -> str:
    if not value.strip():
        raise click.BadParameter("must say why (it is recorded in the row's history)")
    return value.strip()


def _no_actor(_ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    if value is not None:
        raise click.BadParameter(ACTOR_REMOVED)


def operator_options(command: Callable[..., Any]) -> Callable[..., Any]:
    command = click.option(
        "--actor", hidden=True, expose_value=False, callback=_no_actor, help=ACTOR_REMOVED
    )(command)
    return click.option(
        "--reason", required=True, callback=_non_empty, help="Why (recorded in the history)."
    )(command)


def bulk_options(command: Callable[..., Any]) -> Callable[..., Any]:
    command = click.option("--json", "as_json", is_flag=True, help="One JSON document.")(command)
    command = click.option("--yes", is_flag=True, help="Act on a filter without asking.")(command)
    command = click.option("--dry-run", is_flag=True, help="Only say what would be done.")(command)
    return filter_options(operator_options(command))


@main.command()
@click.argument("keys", nargs=-1)
@bulk_options
@pass_outbox
def requeue(obj: Outbox, /, keys: tuple[str, ...], **options: Any) -> None:
    """Send parked rows again (parked -> pending), with the same key: KEY... or a filter."""
    _run(obj, keys, options, _requeue)


@main.command()
@click.argument("keys", nargs=-1)
@bulk_options
@click.option("--force", is_flag=True, help="Also cancel rows that may have executed.")
@pass_outbox
def cancel(obj: Outbox, /, keys: tuple[str, ...], force: bool, **options: Any) -> None:
    """Cancel pending or parked rows (KEY... or a filter); refuses one that may have executed
    unless --force, which under [console] dual_control asks a second operator instead."""
    dual = obj.config.console.dual_control
    _run(obj, keys, options, _cancel(force=force, dual_control=dual))


#: (store, keys or a filter, actor, reason, dry run) → what was done
Action = Callable[[Store, "tuple[str, ...] | RowFilter", str, str, bool], BulkResult]


def _requeue(store: Store, which: Any, actor: str, reason: str, dry: bool) -> BulkResult:
    if isinstance(which, RowFilter):
        return store.requeue_matching(which, actor, reason, utcnow(), dry_run=dry)
    return store.requeue_keys(which, actor, reason, utcnow(), dry_run=dry)


def _cancel(*, force: bool, dual_control: bool) -> Action:
    def cancel_rows(store: Store, which: Any, actor: str, reason: str, dry: bool) -> BulkResult:
        opts = {"force": force, "dual_control": dual_control, "dry_run": dry}
        if isinstance(which, RowFilter):
            return store.cancel_matching(which, actor, reason, utcnow(), **opts)
        return store.cancel_keys(which, actor, reason, utcnow(), **opts)

    return cancel_rows


def _run(obj: Outbox, keys: tuple[str, ...], options: dict[str, Any], action: Action) -> None:
    wanted = row_filter(options)
    if keys and not wanted.is_empty():
        raise InputError("give KEY... or filter options, not both")
    if not keys and wanted.is_empty():
        raise InputError("give KEY... or at least one filter option (e.g. --park-reason)")
    store, actor, reason = obj.store(), default_actor(), options["reason"]
    which: Any = keys or wanted
    dry = options["dry_run"]
    if not keys and not dry and not options["yes"]:
        _confirm(action(store, which, actor, reason, True), wanted)
    result = action(store, which, actor, reason, dry)
    _report(result, actor, options["as_json"])


def interactive() -> bool:
    """May the command ask? Only on a terminal (tests replace it)."""
    return sys.stdin.isatty()


def _confirm(preview: BulkResult, wanted: RowFilter) -> None:
    """A filter action's preview, then a question on a terminal; a script needs --yes."""
    what = f"{preview.action} {preview.matched} rows matching {wanted.describe()}"
    if preview.matched == 0:
        return
    if not interactive():
        fail(f"would {what}: add --yes to act without asking (or --dry-run to preview)")
    if not click.confirm(f"{what}?", default=False, err=True):
        fail("nothing done")


def _report(result: BulkResult, actor: str, as_json: bool) -> None:
    if as_json:
        emit_json(bulk_json(result) | {"actor": actor})
    else:
        print_bulk(console(), console(stderr=True), result, actor)
    if not result.dry_run and result.skipped and not (result.acted or result.requested):
        sys.exit(1)


# --------------------------------------------------------------------------- dual control


@main.command()
@click.argument("approval_id", metavar="ID", type=int)
@operator_options
@click.option("--json", "as_json", is_flag=True, help="One JSON document.")
@pass_outbox
def approve(obj: Outbox, approval_id: int, reason: str, as_json: bool) -> None:
    """Dual control: approve request ID (a different operator from the one who asked); the
    action is carried out and recorded in the row's history."""
    done = obj.store().approve(approval_id, default_actor(), reason, utcnow())
    _decided(done, as_json)


@main.command()
@click.argument("approval_id", metavar="ID", type=int)
@operator_options
@click.option("--json", "as_json", is_flag=True, help="One JSON document.")
@pass_outbox
def reject(obj: Outbox, approval_id: int, reason: str, as_json: bool) -> None:
    """Dual control: reject request ID; the row stays as it is (the history says so)."""
    done = obj.store().reject(approval_id, default_actor(), reason, utcnow())
    _decided(done, as_json)


def _decided(done: Any, as_json: bool) -> None:
    if as_json:
        emit_json(plain_json(done))
        return
    click.echo(
        f"request #{done.id} ({done.action} {done.idempotency_key}, asked by "
        f"{done.requested_by}) {done.decision} by {done.decided_by}"
    )


@main.command()
@click.option("--all", "show_all", is_flag=True, help="Decided requests too.")
@click.option("--json", "as_json", is_flag=True, help="One JSON document.")
@pass_outbox
def approvals(obj: Outbox, show_all: bool, as_json: bool) -> None:
    """Dual control's requests waiting for a second operator, newest first."""
    found = obj.store().approvals(open_only=not show_all)
    if as_json:
        emit_json({"approvals": [plain_json(a) for a in found]})
        return
    if not found:
        click.echo("no open requests" if not show_all else "no requests")
    for a in found:
        state = (a.decision and f"{a.decision} by {a.decided_by}") or "open"
        click.echo(
            f"#{a.id}  {a.action}  {a.idempotency_key}  asked by {a.requested_by} at "
            f"{a.requested_at:%Y-%m-%d %H:%M:%S} UTC: {a.reason}  [{state}]"
        )
