"""``outbox hold``, ``outbox release`` and ``outbox holds``: stop every daemon sending one
lane's or one method's rows (within one poll) until an operator releases it. Holds are kept
with who held what, when and why (``outbox holds``) and logged at WARNING; they are not a
row's history, since they are not per row.
"""

from __future__ import annotations

import click

from outbox.cli.actions import default_actor, operator_options
from outbox.cli.app import InputError, Outbox, main, pass_outbox
from outbox.cli.output import emit_json, plain_json
from outbox.clock import utcnow
from outbox.store import Hold
from outbox.vocabulary import HoldKind

_KINDS = click.Choice([k.value for k in HoldKind])


def _held_value(obj: Outbox, kind: str, value: str) -> str:
    """A lane as given; a method as its full path (``Market/PlaceOrder`` is looked up)."""
    if kind != HoldKind.METHOD or value.startswith("/"):
        return value
    from outbox.descriptors import Catalog  # noqa: PLC0415 (protobuf loads only when needed)

    paths = Catalog.load(obj.config.recrypt.proto_path or None).methods
    found = sorted(p for p in paths if p.endswith(("." + value, "/" + value)))
    if len(found) != 1:
        named = ", ".join(found) or "no method of the protos"
        raise InputError(f"method {value!r} names {named}: give the full gRPC path")
    return found[0]


@main.command()
@click.argument("kind", type=_KINDS)
@click.argument("value")
@operator_options
@pass_outbox
def hold(obj: Outbox, kind: str, value: str, reason: str) -> None:
    """Hold a lane or a method: no daemon claims its rows until `outbox release`."""
    made = obj.store().hold(kind, _held_value(obj, kind, value), default_actor(), reason, utcnow())
    click.echo(
        f"{made.kind} {made.value} held by {made.actor}: no daemon sends its rows "
        f"(within one poll) until `outbox release {made.kind} {made.value} --reason …`"
    )


@main.command()
@click.argument("kind", type=_KINDS)
@click.argument("value")
@operator_options
@pass_outbox
def release(obj: Outbox, kind: str, value: str, reason: str) -> None:
    """Release a held lane or method: its rows are sent again."""
    gone = obj.store().release(kind, _held_value(obj, kind, value), default_actor(), reason)
    click.echo(f"{gone.kind} {gone.value} released (held by {gone.actor} since {_at(gone)})")


@main.command("holds")
@click.option("--json", "as_json", is_flag=True, help="One JSON document for scripts.")
@pass_outbox
def list_holds(obj: Outbox, as_json: bool) -> None:
    """The lanes and methods held now, with who held them, when and why."""
    found = obj.store().holds()
    if as_json:
        emit_json({"holds": [plain_json(h) for h in found]})
        return
    if not found:
        click.echo("nothing held")
    for h in found:
        click.echo(f"{h.kind} {h.value}  held by {h.actor} since {_at(h)}: {h.reason}")


def _at(found: Hold) -> str:
    return f"{found.held_at:%Y-%m-%d %H:%M:%S} UTC"
