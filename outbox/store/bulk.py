"""Bulk actions: requeue or cancel every row matching a filter, or a list of keys, in batches
of ``BATCH`` rows, one transaction each, every row through ``operator``'s guarded transition.
A dry run only counts (and names the first rows) what the action would take.

Imports SQLAlchemy (through the store's modules), ``outbox.filters`` and
``outbox.operations`` only.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy.engine import Connection, Engine

from outbox.filters import RowFilter
from outbox.operations import CANCEL_FROM, REQUEUE_FROM
from outbox.store import operator, selection
from outbox.store.operator import Act, Done
from outbox.store.rows import BulkResult, Skipped
from outbox.store.tx import read, write

#: Rows per transaction: locks held briefly, a daemon's claim never waits long.
BATCH = 500
#: A dry run names at most this many of the rows it would take.
SAMPLE = 20


def _states(act: Act) -> frozenset[str]:
    return REQUEUE_FROM if act.action == "requeue" else CANCEL_FROM


def by_filter(engine: Engine, wanted: RowFilter, act: Act, *, dry_run: bool) -> BulkResult:
    """Every row matching ``wanted`` in a state the action takes, newest first."""
    states = _states(act)
    if dry_run:
        matched = read(engine, selection.count_rows, wanted, states)
        first = read(engine, selection.matching_ids, wanted, states, None, SAMPLE)
        return BulkResult(act.action, matched, dry_run=True, sample=[k for _i, k in first])
    done, matched, after = Done(), 0, None
    while selected := read(engine, selection.matching_ids, wanted, states, after, BATCH):
        matched += len(selected)
        _merge(done, write(engine, operator.act_on_ids, selected, wanted, act))
        after = selected[-1][0]
    return _result(act, matched, done)


def by_keys(engine: Engine, keys: Sequence[str], act: Act, *, dry_run: bool) -> BulkResult:
    """The rows with these keys (each once), in batches; a key with no row is skipped."""
    unique = list(dict.fromkeys(keys))
    if dry_run:
        return read(engine, _preview_keys, unique, act)
    done = Done()
    for start in range(0, len(unique), BATCH):
        _merge(done, write(engine, operator.act_on_keys, unique[start : start + BATCH], act))
    return _result(act, len(unique) - _missing(done), done)


def _preview_keys(conn: Connection, keys: list[str], act: Act) -> BulkResult:
    """What the action would do to each row, judged as it would be, nothing written."""
    rows = selection.rows_by_keys(conn, keys)
    found = {row.idempotency_key: row for row in rows}
    take, skipped = [], []
    for key in keys:
        row = found.get(key)
        ruling = act.rule(row) if row is not None else None
        if ruling is None or ruling.decision is None:
            why = ruling.refusal if ruling is not None else operator.NO_ROW
            skipped.append(Skipped(key, str(why)))
        else:
            take.append(key)
    return BulkResult(act.action, len(take), skipped=skipped, dry_run=True, sample=take[:SAMPLE])


def _missing(done: Done) -> int:
    return sum(1 for s in done.skipped if s.why == operator.NO_ROW)


def _merge(total: Done, batch: Done) -> None:
    total.acted += batch.acted
    total.skipped += batch.skipped
    total.requested += batch.requested


def counts(result: BulkResult) -> dict[str, int]:
    """How many rows a bulk action selected, moved, put to a second operator, and skipped."""
    return {
        "matched": result.matched,
        "acted": len(result.acted),
        "requested": len(result.requested),
        "skipped": len(result.skipped),
    }


def _result(act: Act, matched: int, done: Done) -> BulkResult:
    return BulkResult(act.action, matched, done.acted, done.skipped, done.requested)
