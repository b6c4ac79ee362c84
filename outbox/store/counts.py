"""Rows per state on a table of millions: exact up to a limit, the database's estimate above.

``SELECT state, count(*) … GROUP BY state`` reads every row's index entry: 2,000,000 of them
every 15 s for the gauges, and on each Overview (issue 14's benchmark: hundreds of ms). Here
each state reads at most ``EXACT_LIMIT + 1`` entries of ``ix_outbox_messages_state_reason``;
a state with more rows takes the planner's estimate for it (PostgreSQL ``EXPLAIN``'s rows,
from its statistics scaled to the table's current size; MariaDB's index dive), never less
than the exact count read, and is named in ``estimated`` so every reader can say "≈".
SQLite has no estimate: it counts (it is not meant for millions of rows).

Imports SQLAlchemy and the schema only; writes nothing.
"""

from __future__ import annotations

import json
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from outbox.schema import State, messages

m = messages
#: Rows of one state counted exactly, at most; above: the database's estimate.
EXACT_LIMIT = 10_000


def state_counts(conn: Connection, limit: int = EXACT_LIMIT) -> tuple[dict[str, int], set[str]]:
    """Rows per state (every state, 0 for none), and the states whose count is an estimate."""
    exact = conn.execute(counts_query(limit)).one()
    counts = {s.value: int(n) for s, n in zip(State, exact, strict=True)}
    estimated = {state for state, n in counts.items() if n > limit}
    for state in estimated:
        counts[state] = max(counts[state], estimate(conn, sa.select(m.c.id).where(in_state(state))))
    return counts, estimated


def counts_query(limit: int = EXACT_LIMIT) -> sa.Select[Any]:
    """One row: each state's count, read no further than ``limit + 1`` rows."""
    return sa.select(*(_capped(s.value, limit) for s in State))


def in_state(state: str) -> sa.ColumnElement[bool]:
    return m.c.state == sa.literal(state, sa.String())


def _capped(state: str, limit: int) -> sa.Label[Any]:
    """How many rows ``state`` has, reading at most ``limit + 1`` index entries."""
    some = sa.select(sa.literal(1).label("one")).where(in_state(state)).limit(limit + 1)
    return sa.select(sa.func.count()).select_from(some.subquery()).scalar_subquery().label(state)


def estimate(conn: Connection, query: sa.Select[Any]) -> int:
    """The rows the database expects ``query`` to return (SQLite: the exact count)."""
    name = conn.dialect.name
    if name == "sqlite":
        return int(conn.execute(sa.select(sa.func.count()).select_from(query.subquery())).one()[0])
    sql = str(query.compile(dialect=conn.dialect, compile_kwargs={"literal_binds": True}))
    if name == "postgresql":
        plan = conn.exec_driver_sql(f"EXPLAIN (FORMAT JSON) {sql}").scalar_one()
        document = json.loads(plan) if isinstance(plan, str) else plan
        return int(document[0]["Plan"]["Plan Rows"])
    rows = conn.exec_driver_sql(f"EXPLAIN {sql}").mappings().all()
    return int(rows[0]["rows"] or 0)
