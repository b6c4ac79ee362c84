"""What people see: rich tables and lines for ``list``, ``show`` and ``status``.

Row data is never read as rich markup (it may contain ``[...]``): cells go through ``text``.
Plain, unwrapped text when piped. No database access and no click here: the commands fetch,
these functions draw on the console they are given.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from outbox.cli.output import maybe_json, row_json
from outbox.filters import RowFilter
from outbox.health import (
    REFUSED_ADVICE,
    STALE,
    STOPPED,
    clip,
    failure_note,
    hold_notes,
    lasted,
    liveness,
    method_names,
    oldest_due_age,
    reasons,
    short_method,
)
from outbox.operations import payload_diff
from outbox.store import BulkResult, HistoryLine, RowPage, RowView, StatusView, WorkerView

LIST_MESSAGE_WIDTH = 60
MAYBE_MARK = "*"
MAYBE_NOTE = f"{MAYBE_MARK} may have executed at Recrypt (maybe_executed): check before cancel"
ROW_HEADERS = ("key", "state", "method", "att", "lane", "code")
NARROW_MESSAGE_ROOM = 20


def console(*, stderr: bool = False) -> Console:
    """A console on the current stdout (tests swap it); plain, unwrapped text when piped."""
    return Console(highlight=False, stderr=stderr)


def text(value: Any) -> Text:
    """A table cell: never read as rich markup (row data may contain ``[...]``)."""
    return Text("" if value is None else str(value))


def age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


# --------------------------------------------------------------------------- list


def print_list(out: Console, page: RowPage, wanted: RowFilter | None = None) -> None:
    """``outbox list``: the rows, or a line saying none match; "50 of N"; the next page's
    cursor; the maybe-executed note."""
    rows = page.rows
    if not rows:
        out.print("no rows match")
        return
    print_rows(out, rows)
    given = wanted is not None and not wanted.is_empty()
    matched = f" matching {wanted.describe()}" if wanted is not None and given else ""
    total = f"{page.total:,}+" if page.more_than_total else str(page.total)
    out.print(Text(f"{len(rows)} of {total} rows{matched}, newest first"))
    if page.next_after is not None:
        out.print(Text(f"next page: add --after {page.next_after}"))
    if any(row.maybe_executed for row in rows):
        out.print(Text(MAYBE_NOTE))


def print_rows(out: Console, rows: Sequence[RowView]) -> None:
    """One line per row when the terminal is wide enough, else two; full keys (to copy)."""
    cells = [row_cells(row) for row in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(ROW_HEADERS)]
    room = out.width - sum(widths) - 2 * len(widths)
    if room >= NARROW_MESSAGE_ROOM:
        out.print(rows_table(cells, widths, room))
        return
    for key, state, method, att, lane, code, message in cells:
        lane_part = f"  lane {lane}" if lane else ""
        out.print(Text(f"{key}  {state}  {method}  att {att}{lane_part}"), no_wrap=True)
        detail = f"{code}: {message}" if code else message
        if detail:
            out.print(Text(f"    {detail}"), no_wrap=True, overflow="ellipsis")


def rows_table(cells: list[list[str]], widths: list[int], room: int) -> Table:
    table = Table(box=None, pad_edge=False, header_style="bold")
    for name, width in zip(ROW_HEADERS, widths, strict=True):
        table.add_column(name, no_wrap=True, min_width=width)
    table.add_column("last message", no_wrap=True)
    for line in cells:
        table.add_row(*map(text, line[:-1]), text(clip(line[-1], room)))
    return table


def row_cells(row: RowView) -> list[str]:
    """key, state (``*``: maybe executed), method, attempts, lane, code, clipped message."""
    state = row.state + (MAYBE_MARK if row.maybe_executed else "")
    message = clip(row.last_message, LIST_MESSAGE_WIDTH)
    lane, code = clip(row.lane, 20), clip(row.last_code, 20)
    key, method, att = row.idempotency_key, short_method(row.method), str(row.attempts)
    return [key, state, method, att, lane, code, message]


# --------------------------------------------------------------------------- actions

_DONE = {"requeue": ("requeued", "pending"), "cancel": ("cancelled", "cancelled")}


def print_bulk(out: Console, err: Console, result: BulkResult, actor: str) -> None:
    """``requeue``/``cancel``: a line per row acted on, requested or skipped (on ``err``),
    and a count when there were several; a dry run says what it would do."""
    verb, state = _DONE[result.action]
    if result.dry_run:
        out.print(Text(f"dry run: would {result.action} {result.matched} rows (nothing done)"))
        for key in result.sample:
            out.print(Text(f"  {key}"))
    for key in result.acted:
        out.print(Text(f"{key} {verb} by {actor}: now {state}"))
    for key, approval_id in result.requested:
        out.print(
            Text(
                f"{key}: cancel requested as #{approval_id} (dual control): a second operator "
                f"runs `outbox approve {approval_id} --reason …` (or `outbox reject`)"
            )
        )
    for skipped in result.skipped:
        err.print(Text(f"skipped {skipped.key}: {skipped.why}"))
    if len(result.acted) + len(result.skipped) + len(result.requested) > 1:
        out.print(Text(_bulk_counts(result, verb)))


def _bulk_counts(result: BulkResult, verb: str) -> str:
    parts = [f"{verb} {len(result.acted)}", f"skipped {len(result.skipped)}"]
    if result.requested:
        parts.append(f"requested {len(result.requested)}")
    return ", ".join(parts) + f" (of {result.matched} selected)"


# --------------------------------------------------------------------------- show


def print_show(out: Console, row: RowView, history: Sequence[HistoryLine]) -> None:
    """``outbox show``: the row's fields, its payload and response, its history."""
    out.print(row_table(row))
    for title, value in (("payload", row.payload), ("response", row.response)):
        out.print(Text(f"\n{title}:", style="bold"))
        out.print(text(_pretty(value)))
    changed = payload_diff(row.first_payload, row.payload)
    if changed:
        out.print(Text("\npayload changed since it was first sent:", style="bold"))
        for line in changed:
            out.print(text(line))
    out.print(Text("\nhistory:", style="bold"))
    if not history:
        out.print("  (no attempts yet)")
    print_history(out, history)


def _pretty(value: Any) -> str:
    parsed = maybe_json(value)
    if parsed is None or isinstance(parsed, str):
        return "  (none)" if parsed is None else str(parsed)
    return json.dumps(parsed, indent=2, ensure_ascii=False)


def row_table(row: RowView) -> Table:
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    for name, value in row_json(row, with_payload=False).items():
        table.add_row(name, text("-" if value is None else value))
    return table


def print_history(out: Console, history: Iterable[HistoryLine]) -> None:
    """One event per entry: a heading line, then the full message indented (any width)."""
    for line in history:
        at = line.at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S") if line.at else ""
        ms = None if line.duration_ms is None else f"{line.duration_ms:.0f} ms"
        head = (at, line.kind, line.actor, line.code, line.decision, ms)
        out.print(Text("  ".join(part for part in head if part)))
        if line.message:
            out.print(Text(f"    {line.message}"))


# --------------------------------------------------------------------------- status


def print_status(out: Console, view: StatusView, now: datetime, stale_after: float) -> None:
    """``outbox status``: counts, the oldest due row, what needs attention, the workers."""
    counts = (f"{s} {'≈' if s in view.estimated else ''}{n}" for s, n in view.counts.items())
    out.print(Text("  ".join(counts)))
    out.print(Text(f"oldest due row: {age(oldest_due_age(view.oldest_due_at, now))}"))
    for line in attention_lines(view, now):
        out.print(text(line))
    out.print(workers_table(view.workers, now, stale_after) if view.workers else "no workers")
    for line in refused_lines(view.workers):
        out.print(text(line))


def attention_lines(view: StatusView, now: datetime) -> list[str]:
    lines = [
        f"{w.worker_id}: {failure_note(f, now)}"
        for w in view.workers
        if w.stopped_at is None
        for f in w.failing_jobs
    ]
    if view.leases_expired and view.oldest_lease_expired_at is not None:
        oldest = lasted((now - view.oldest_lease_expired_at).total_seconds())
        lines.append(
            f"rows in flight with an expired lease: {view.leases_expired} (oldest {oldest})"
        )
    if view.parked_by_reason:
        lines.append(f"parked by reason: {reasons(view.parked_by_reason)}")
    if view.blocked_lanes:
        lines.append(f"lanes blocked by a parked row: {', '.join(view.blocked_lanes)}")
    if view.maybe_executed_open:
        lines.append(f"open rows that may have executed: {view.maybe_executed_open}")
    lines += hold_notes(view.holds, now)
    if view.approvals_open:
        lines.append(
            f"requests waiting for a second operator: {view.approvals_open} (`outbox approvals`)"
        )
    return lines


def workers_table(workers: Sequence[WorkerView], now: datetime, stale_after: float) -> Table:
    table = Table(box=None, pad_edge=False, header_style="bold")
    for name in ("worker", "version", "beat", "liveness", "gate", "since", "until"):
        table.add_column(name, overflow="fold")
    table.add_column("why", overflow="fold", ratio=1)
    for w in workers:
        table.add_row(*map(text, _worker_cells(w, now, stale_after)))
    return table


def _worker_cells(w: WorkerView, now: datetime, stale_after: float) -> tuple[Any, ...]:
    alive = liveness(w, now, stale_after)
    shown = {STALE: "stale (dead?)"}.get(alive, alive)
    beat = age((now - w.last_beat_at).total_seconds()) + " ago"
    closed = w.gate_since if alive != STOPPED else None
    since = age((now - closed).total_seconds()) if closed else None
    until = w.gate_until.astimezone(UTC).strftime("%H:%M:%S") if w.gate_until else None
    return (w.worker_id, w.version, beat, shown, w.gate, since, until, w.gate_reason)


def refused_lines(workers: Sequence[WorkerView]) -> list[str]:
    """One line per running worker holding methods Recrypt refused outside maintenance."""
    return [
        f"{w.worker_id} holds methods Recrypt refused outside maintenance: "
        f"{method_names(w.refused_methods)}; {REFUSED_ADVICE}"
        for w in workers
        if w.refused_methods and w.stopped_at is None
    ]
