"""Reconciliation's read: the rows finished in a time range, streamed (``outbox report``).

One read-only query in one transaction, streamed by a server-side cursor (PostgreSQL:
psycopg's named cursor; MariaDB: an unbuffered ``SSCursor``; SQLite reads as it steps), in
chunks of ``CHUNK`` rows: two million rows never sit in memory at once, and every row is
read from one snapshot (PostgreSQL, MariaDB's REPEATABLE READ), so a row requeued or
cancelled while the report runs is counted once, in one state.

"Finished at" is ``updated_at``: every transition that puts a row in a reported state
(commit, park, expiry, cancel) sets it and nothing touches such a row afterwards but
another transition; ``committed_at`` exists for committed rows only. The range is read on
``ix_outbox_messages_state_updated (state, updated_at)`` (retention's index): PostgreSQL
reads it by a bitmap scan of that index, for one day as for all of two million rows
(``Store.explain_finished_rows``; docs/scaling.md quotes the plan).

Imports SQLAlchemy, ``outbox.schema`` and ``outbox.report``'s records only.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from outbox.report import FinishedRow
from outbox.schema import messages
from outbox.vocabulary import REPORT_STATES

m = messages
CHUNK = 5000  # rows fetched per round trip of the cursor
_STATES = [c.value for c in REPORT_STATES]


def finished_query(since: datetime, until: datetime) -> sa.Select[Any]:
    """Rows in a reported state whose ``updated_at`` is in ``[since, until)``; the payload as
    the JSON text it is stored as (never parsed by the driver: amounts stay exact)."""
    return sa.select(
        m.c.updated_at,
        m.c.method,
        m.c.state,
        m.c.maybe_executed,
        sa.cast(m.c.payload, sa.Text()),
    ).where(m.c.state.in_(_STATES), m.c.updated_at >= since, m.c.updated_at < until)


def finished_rows(
    engine: Engine, since: datetime, until: datetime, chunk: int = CHUNK
) -> Iterator[FinishedRow]:
    """Stream ``finished_query``'s rows; the connection is held until the iterator ends or is
    closed (the report reads it to the end)."""
    with engine.connect() as conn:
        streamed = conn.execution_options(stream_results=True, yield_per=chunk)
        for row in streamed.execute(finished_query(since, until)):
            yield FinishedRow(row[0], row[1], row[2], bool(row[3]), row[4])
        conn.rollback()
