"""The row filter's options, shared by ``list``, ``requeue`` and ``cancel``, and the
``--watch`` loop of ``list`` and ``status``.

``--method`` takes the full gRPC path or the ``Service/Method`` form ``list`` prints; times
are ISO 8601 with a zone. The filter itself is ``outbox.filters.RowFilter``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import click

from outbox.cli.parse import parse_time
from outbox.filters import RowFilter
from outbox.schema import State
from outbox.vocabulary import ParkReason

#: (option, RowFilter field, help)
_TEXT = (
    ("--park-reason", "park_reason", "Only parked rows with this reason."),
    ("--method", "method", "A full gRPC path, or Service/Method as `list` prints it."),
    ("--lane", "lane", "Only this lane."),
    ("--reference", "reference", "Only rows with this reference (exactly)."),
    ("--key-prefix", "key_prefix", "Only keys starting with this."),
)
_TIMES = (
    ("--created-since", "created_since", "Created at or after (ISO 8601 UTC)."),
    ("--created-until", "created_until", "Created before."),
    ("--updated-since", "updated_since", "Last changed at or after."),
    ("--updated-until", "updated_until", "Last changed before."),
)
FILTER_FIELDS = ("state", "maybe_executed", *(f for _o, f, _h in _TEXT + _TIMES))


def filter_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """The filter's options, each passed to the command as the RowFilter field's name."""
    for option, name, help_text in reversed(_TEXT + _TIMES):
        kind: Any = click.Choice([r.value for r in ParkReason]) if name == "park_reason" else None
        command = click.option(option, name, type=kind, help=help_text)(command)
    command = click.option(
        "--maybe-executed/--not-maybe-executed",
        "maybe_executed",
        default=None,
        help="Only rows that may (or may not) have executed at Recrypt.",
    )(command)
    states = click.Choice([s.value for s in State])
    return click.option("--state", "state", type=states, help="Only this state.")(command)


def row_filter(options: dict[str, Any]) -> RowFilter:
    """The RowFilter the filter options give (the other options are left alone)."""
    values = {name: options.pop(name, None) for name in FILTER_FIELDS}
    for option, name, _help in _TIMES:
        values[name] = parse_time(option, values[name])
    return RowFilter(**values)


def watch_option(command: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--watch",
        type=click.FloatRange(min=0.5),
        is_flag=False,
        flag_value=2.0,
        default=None,
        metavar="[SECONDS]",
        help="Draw again every SECONDS (default 2) until Ctrl-C.",
    )(command)


def watching(every: float | None, draw: Callable[[], None]) -> None:
    """``draw`` once, or every ``every`` seconds on a cleared screen until Ctrl-C."""
    if every is None:
        draw()
        return
    try:
        while True:
            click.clear()
            draw()
            time.sleep(every)
    except KeyboardInterrupt:
        click.echo("")
