"""``outbox enqueue``, ``outbox list`` and ``outbox show``: rows in and rows out.

Each command parses, asks the store, and hands the result to ``render`` (people) or
``output`` (``--json``).
"""

from __future__ import annotations

import click

from outbox.cli.app import Outbox, main, pass_outbox
from outbox.cli.output import emit_json, row_json, show_json
from outbox.cli.parse import parse_payload, parse_time
from outbox.cli.render import console, print_list, print_show
from outbox.schema import State


@main.command()
@click.argument("method")
@click.option("--json", "payload_text", required=True, help="The request as JSON, or @FILE.")
@click.option("--key", help="Idempotency key (a lowercase UUID); default: a new one.")
@click.option("--lane", help="Rows sharing a lane are sent one at a time, in order.")
@click.option("--not-before", help="ISO 8601 UTC time, e.g. 2030-01-31T18:00:00Z.")
@click.option("--expires-at", help="ISO 8601 UTC time after which the row is not sent.")
@click.option("--reference", help="Your own correlation id, shown by list/show.")
@pass_outbox
def enqueue(
    obj: Outbox,
    *,
    method: str,
    payload_text: str,
    key: str | None,
    lane: str | None,
    not_before: str | None,
    expires_at: str | None,
    reference: str | None,
) -> None:
    """Add one outbox row for METHOD (a full gRPC path) and print its key."""
    from outbox.descriptors import Catalog  # noqa: PLC0415 (protobuf loads only when needed)
    from outbox.writer import enqueue as enqueue_row  # noqa: PLC0415

    payload = parse_payload(payload_text)
    times = parse_time("--not-before", not_before), parse_time("--expires-at", expires_at)
    catalog = Catalog.load(obj.config.recrypt.proto_path or None)
    with obj.store().engine.begin() as conn:
        made = enqueue_row(
            conn,
            method,
            payload,
            key=key,
            lane=lane,
            not_before=times[0],
            expires_at=times[1],
            reference=reference,
            catalog=catalog,
        )
    click.echo(made)


@main.command("list")
@click.option("--state", type=click.Choice([s.value for s in State]), help="Only this state.")
@click.option("--method", help="Only this full gRPC path.")
@click.option("--lane", help="Only this lane.")
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON document for scripts.")
@pass_outbox
def list_rows(
    obj: Outbox,
    *,
    state: str | None,
    method: str | None,
    lane: str | None,
    limit: int,
    as_json: bool,
) -> None:
    """List rows, newest first."""
    rows = obj.store().list_rows(state=state, method=method, lane=lane, limit=limit)
    if as_json:
        emit_json({"rows": [row_json(r, with_payload=False) for r in rows]})
    else:
        print_list(console(), rows)


@main.command()
@click.argument("key")
@click.option("--json", "as_json", is_flag=True, help="One JSON document for scripts.")
@pass_outbox
def show(obj: Outbox, key: str, as_json: bool) -> None:
    """Show one row (with payload and response) and its attempt history."""
    store = obj.store()
    row, history = store.get(key), store.history(key)
    if as_json:
        emit_json(show_json(row, history))
    else:
        print_show(console(), row, history)
