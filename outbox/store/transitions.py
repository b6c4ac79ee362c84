"""The guarded transitions of a claimed row, one statement per kind of outcome.

Each is ``UPDATE … WHERE id AND state = 'inflight' AND lease_owner AND attempts``: a worker
whose claim was taken over (its lease ran out, the reaper released the row, another worker
claimed it) changes nothing, and learns that it lost the row. ``TRANSITIONS`` run with one
parameter set per row (MariaDB, SQLite); ``BATCHED_TRANSITIONS`` take the whole batch as one
JSON document and write the history lines of the rows they changed in the same statement
(PostgreSQL).

Imports SQLAlchemy, ``outbox.schema``, ``outbox.payload`` and the store's own modules only.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.sql import visitors
from sqlalchemy.sql.elements import BindParameter

from outbox.payload import bounded
from outbox.schema import State, UTCDateTime, attempts, messages
from outbox.store.history import history_params
from outbox.store.rows import Claim, Committed, HandedBack, Outcome, Parked, Retry

m = messages
#: What identifies one claim: the row, the worker, the attempts when it was claimed.
Token = tuple[int, str, int]


def claim_token(claim: Claim) -> Token:
    """What identifies one claim: the row, the worker, and the attempts when it was claimed.

    The reaper counts an attempt when it releases a row, so a worker that claims the same row
    again holds a new token, and its outcome for the old claim is reported lost.
    """
    return (claim.id, claim.worker, claim.attempts)


def _guarded(**values: Any) -> sa.Update:
    """``UPDATE … WHERE id AND state = 'inflight' AND lease_owner AND attempts`` (the claim)."""
    released = {
        "lease_owner": None,
        "lease_expires_at": None,
        "updated_at": sa.bindparam("b_now", type_=UTCDateTime()),
        "last_code": sa.bindparam("b_code", type_=sa.String()),
        "last_message": sa.bindparam("b_message", type_=sa.Text()),
    }
    return (
        m.update()
        .where(
            m.c.id == sa.bindparam("b_id"),
            m.c.state == State.INFLIGHT,
            m.c.lease_owner == sa.bindparam("b_owner"),
            m.c.attempts == sa.bindparam("b_attempts"),  # this claim, not a later one
        )
        .values(**released, **values)
    )


_counted = m.c.attempts + sa.bindparam("b_counted", type_=sa.Integer())
#: Once a row may have executed it stays so: the flag is only ever set, never cleared.
_sticky_maybe = sa.or_(m.c.maybe_executed, sa.bindparam("b_maybe", type_=sa.Boolean()))
#: One statement per kind of outcome, compiled once, run with executemany.
TRANSITIONS: dict[type, sa.Update] = {
    Committed: _guarded(
        state=State.COMMITTED,
        committed_at=sa.bindparam("b_now", type_=UTCDateTime()),
        # an ALREADY_EXISTS has no response: keep one a late OK may have left (its evidence)
        response=sa.func.coalesce(
            sa.bindparam("b_response", type_=m.c.response.type), m.c.response
        ),
        attempts=m.c.attempts + 1,
        next_attempt_at=None,
    ),
    Retry: _guarded(
        state=State.PENDING,
        next_attempt_at=sa.bindparam("b_at", type_=UTCDateTime()),
        attempts=_counted,
        unknown_attempts=m.c.unknown_attempts + sa.bindparam("b_unknown", type_=sa.Integer()),
        maybe_executed=_sticky_maybe,
    ),
    Parked: _guarded(
        state=State.PARKED,
        park_reason=sa.bindparam("b_reason", type_=sa.String()),
        next_attempt_at=None,
        attempts=_counted,
        maybe_executed=_sticky_maybe,
    ),
    HandedBack: _guarded(
        state=State.PENDING, next_attempt_at=sa.bindparam("b_at", type_=UTCDateTime())
    ),
}


def transition_params(outcome: Outcome, now: datetime) -> dict[str, Any]:
    """The parameters of ``TRANSITIONS[type(outcome)]`` for one row."""
    call = outcome.line
    params: dict[str, Any] = {
        "b_id": outcome.claim.id,
        "b_owner": outcome.claim.worker,
        "b_attempts": outcome.claim.attempts,
        "b_now": now,
        "b_code": call.code if call else None,
        "b_message": bounded(call.message) if call else None,
    }
    return params | _outcome_params(outcome)


def _outcome_params(outcome: Outcome) -> dict[str, Any]:
    match outcome:
        case Committed():
            return {"b_response": outcome.response}
        case Retry():
            return {
                "b_at": outcome.at,
                "b_counted": int(outcome.counts_attempt),
                "b_maybe": outcome.maybe_executed,
                "b_unknown": int(outcome.unknown_outcome),
            }
        case Parked():
            counted, maybe = outcome.counts_attempt, outcome.maybe_executed
            return {"b_reason": outcome.reason, "b_counted": int(counted), "b_maybe": maybe}
        case HandedBack():
            return {"b_at": outcome.at}
    return {}


# ---- PostgreSQL: a whole batch per statement

#: The history line's own fields in a batched row (its row, time and text come from the
#: transition: ``b_id``, ``b_now``, ``b_code``, ``b_message``, which hold the same values).
_LINE_FIELDS = ("kind", "actor", "decision", "duration_ms")
#: What the UPDATE hands to the history INSERT: the token, the text, the line's own fields.
_KEPT = ("b_id", "b_owner", "b_attempts", "b_code", "b_message", *(f"h_{n}" for n in _LINE_FIELDS))
_NO_OPTIONS: dict[str, Any] = {}


def batched_params(outcome: Outcome, now: datetime) -> dict[str, Any]:
    """One row of a batched transition: its transition's parameters and its history line's."""
    params = transition_params(outcome, now)
    del params["b_now"]  # bound once per batch
    call = outcome.line
    if call is not None:
        line = history_params(outcome.claim.id, now, outcome.claim.worker, call)
        params |= {f"h_{name}": line[name] for name in _LINE_FIELDS}
    return params


def json_rows(rows: Sequence[dict[str, Any]]) -> str:
    return json.dumps(rows, default=_json_time, separators=(",", ":"))


def _json_time(value: Any) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} in a batched transition")


def _batched(statement: sa.Update) -> sa.Select[Any]:
    """``statement`` (one row's guarded transition) for a whole batch on PostgreSQL.

    Each per-row parameter ``b_*`` becomes a column of ``jsonb_to_recordset`` over one JSON
    document; the UPDATE joins the table to it; the history lines of the rows it changed are
    inserted in the same statement; it returns the tokens of those rows.
    """
    binds = {
        b.key: b
        for b in visitors.iterate(statement)
        if isinstance(b, BindParameter) and b.key.startswith("b_") and b.key != "b_now"
    }
    rows = _recordset(binds)

    def column(element: Any, **_kw: Any) -> Any:
        if isinstance(element, BindParameter) and element.key in binds:
            return rows.c[element.key]
        return None

    update = cast(sa.Update, visitors.replacement_traverse(statement, _NO_OPTIONS, column))
    done = update.returning(*(rows.c[k] for k in _KEPT)).cte("done")
    return sa.select(done.c.b_id, done.c.b_owner, done.c.b_attempts).add_cte(_lines(done))


def _recordset(binds: dict[str, BindParameter[Any]]) -> Any:
    """The batch's rows: ``jsonb_to_recordset`` of the JSON document ``b_rows``, one column
    per per-row parameter and per history line field."""
    columns = [sa.column(k, b.type) for k, b in binds.items()]
    columns += [sa.column(f"h_{n}", attempts.c[n].type) for n in _LINE_FIELDS]
    document = sa.cast(sa.bindparam("b_rows", type_=sa.Text()), postgresql.JSONB)
    return (
        sa.func.jsonb_to_recordset(document)
        .table_valued(*columns)
        .render_derived(name="v", with_types=True)
    )


def _lines(done: sa.CTE) -> sa.CTE:
    """The INSERT of the history lines of the rows the UPDATE changed (those with a line)."""
    line = {
        "message_id": done.c.b_id,
        "at": sa.bindparam("b_now", type_=UTCDateTime()),
        "code": done.c.b_code,
        "message": done.c.b_message,
    } | {n: done.c[f"h_{n}"] for n in _LINE_FIELDS}
    lines = attempts.insert().from_select(
        list(line), sa.select(*line.values()).where(done.c.h_kind.is_not(None))
    )
    return lines.cte("lines")


#: ``TRANSITIONS`` for a whole batch, one statement each (PostgreSQL).
BATCHED_TRANSITIONS = {kind: _batched(st) for kind, st in TRANSITIONS.items()}
