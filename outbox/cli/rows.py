"""``outbox enqueue``, ``outbox list`` and ``outbox show``: rows in and rows out.

Each command parses, asks the store, and hands the result to ``render`` (people) or
``output`` (``--json``).
"""

from __future__ import annotations

from typing import Any

import click

from outbox.cli.app import InputError, Outbox, main, pass_outbox
from outbox.cli.filtering import filter_options, row_filter, watch_option, watching
from outbox.cli.output import emit_json, page_json, show_json
from outbox.cli.parse import parse_payload, parse_time
from outbox.cli.render import console, print_list, print_show
from outbox.filters import parse_cursor
from outbox.store import AmbiguousRowError


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
@filter_options
@click.option("--after", metavar="CURSOR", help="The next page: the cursor a page printed.")
@click.option("--limit", type=click.IntRange(min=1, max=10_000), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON document for scripts.")
@watch_option
@pass_outbox
def list_rows(
    obj: Outbox,
    /,
    *,
    after: str | None,
    limit: int,
    as_json: bool,
    watch: float | None,
    **options: Any,
) -> None:
    """List rows matching the filters, newest first: a page, and how many match in all."""
    wanted, cursor = row_filter(options), parse_cursor(after)
    if watch is not None and as_json:
        raise InputError("--watch draws for people; scripts poll `outbox list --json` instead")

    def draw() -> None:
        page = obj.store().list_rows(wanted, after=cursor, limit=limit)
        if as_json:
            emit_json(page_json(page))
        else:
            print_list(console(), page, wanted)

    watching(watch, draw)


@main.command()
@click.argument("key")
@click.option("--json", "as_json", is_flag=True, help="One JSON document for scripts.")
@pass_outbox
def show(obj: Outbox, key: str, as_json: bool) -> None:
    """Show one row (payload, response, what changed since first sent) and its history.

    KEY is the idempotency key in any case, a unique start of it (8 characters or more), or
    a reference; when several rows match, they are listed and nothing is shown.
    """
    store = obj.store()
    try:
        row = store.find_row(key)
    except AmbiguousRowError as exc:
        for found in exc.candidates:
            shown = (found.idempotency_key, found.state, found.reference or "")
            click.echo("  " + "  ".join(shown), err=True)
        raise
    history = store.history(row.idempotency_key)
    if as_json:
        emit_json(show_json(row, history))
    else:
        print_show(console(), row, history)
