"""Lane heads: only a lane's first open row is ever a claim candidate (issue #11, 0008).

A row of a lane may be sent only after every earlier row of its lane is finished. The claim
used to find that out row by row, so 200,000 rows behind one parked head were read and
filtered out on every claim. Now each laned row carries ``lane_behind``:

- NULL: no daemon has sorted it yet (writers leave it NULL). It is a candidate; the claim's
  own lane check (``_lane_free``) still stops it if its lane is busy.
- TRUE: it waits behind an earlier open row of its lane. Its ``due_at`` is NULL, so it is
  outside the claim's range and is never read by a claim.
- FALSE: its lane's head, or a row claimed once.

Two operations keep that true, each inside the caller's transaction:

- ``sort_new_rows`` marks rows no daemon has sorted yet, a bounded number per call.
- ``settle`` runs in every transaction that finishes a laned row (commit, cancel, expiry):
  the lane's first waiting row becomes a candidate when nothing earlier is open any more.
- ``settle_waiting_lanes``, run by the daemon every minute, settles every lane that has a
  waiting row: a row deleted or finished by hand, outside the daemon, holds nothing back for
  longer than that.

The race between them: a sorter sees an earlier row E open and marks R as waiting, while
another transaction finishes E and settles the lane before the mark is visible: R would wait
for ever. So the sorter marks R waiting only while it holds a lock on a row R waits behind:
the rows it sorts are locked ``FOR UPDATE``, and the earlier open row it found ``FOR SHARE``
(rows another transaction holds are skipped, leaving R a candidate). Whoever finishes that
row waits for the sorter's commit, and its settle (a later statement under READ COMMITTED)
sees the mark. SQLite has one writer at a time: no race.
"""

from __future__ import annotations

import functools
from collections.abc import Collection, Sequence
from itertools import groupby
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from outbox.schema import OPEN_STATES, State, messages

m = messages
_OPEN = [s.value for s in OPEN_STATES]
#: Rows sorted per call: bounded, so one burst of writes makes no claim slow (about 40 ms
#: for a full call on PostgreSQL here); 200,000 new rows of one lane are sorted in 40 claims.
SORT_LIMIT = 5_000
#: Seconds between two claims' sorts, unless the last one found rows (a burst is being
#: sorted). An empty sort at every claim cost 35 µs of daemon CPU per row in the drain bench.
SORT_EVERY = 0.25
#: Lanes the periodic settle looks at per run (``settle_waiting_lanes``).
SETTLE_LIMIT = 1_000


def sort_new_rows(conn: Connection, limit: int = SORT_LIMIT) -> int:
    """Mark up to ``limit`` laned rows no daemon has sorted yet; returns how many."""
    rows = conn.execute(_unsorted(conn.dialect.name), {"limit": limit}).all()
    head: list[int] = []
    behind: list[int] = []
    for _lane, group in groupby(rows, key=lambda row: row.lane):
        lane_rows = list(group)
        blocked = _earlier_open_row(conn, lane_rows[0])
        for row in lane_rows:
            (behind if blocked and row.state == State.PENDING else head).append(row.id)
            blocked = blocked or row.state in _OPEN
    _mark(conn, head, behind=False)
    _mark(conn, behind, behind=True)
    return len(rows)


@functools.cache
def _unsorted(dialect: str) -> sa.Select[Any]:
    """The rows no daemon has sorted yet, by lane (built once: it runs before every claim).

    The lane tells lanes apart: SQLite's bytes (its column may hold text that is not UTF-8,
    which its driver cannot fetch as text: that row is parked by the claim), else the text.
    """
    lane = sa.cast(m.c.lane, sa.LargeBinary).label("lane") if dialect == "sqlite" else m.c.lane
    return (
        sa.select(m.c.id, lane, m.c.state)
        .where(m.c.lane_behind.is_(None), m.c.lane.is_not(None))
        .order_by(m.c.lane, m.c.id)
        .limit(sa.bindparam("limit", type_=sa.Integer()))
        .with_for_update(skip_locked=True)
    )


def _earlier_open_row(conn: Connection, row: Any) -> bool:
    """Whether an open row of ``row``'s lane comes before it, locked until the caller commits.

    A row another transaction holds (it may be finishing it, or a writer has not committed
    it yet) is skipped: not finding an earlier row only leaves ``row`` a candidate, which is
    always safe (the claim checks its lane again). A row found is locked ``FOR SHARE``: it
    cannot be finished until the caller commits, and whoever finishes it then sees the mark.
    """
    found = conn.execute(
        sa.select(m.c.id)
        .where(m.c.lane == _lane_of(row.id), m.c.state.in_(_OPEN), m.c.id < row.id)
        .limit(1)
        .with_for_update(read=True, skip_locked=True)
    ).first()
    return found is not None


def _lane_of(row_id: int) -> sa.ScalarSelect[Any]:
    row = m.alias("sorted_row")
    return sa.select(row.c.lane).where(row.c.id == row_id).scalar_subquery()


def _mark(conn: Connection, ids: Sequence[int], *, behind: bool) -> None:
    if ids:
        conn.execute(m.update().where(m.c.id.in_(ids)).values(lane_behind=behind))


def settle(conn: Connection, finished: Collection[int]) -> int:
    """The lanes of the rows ``finished`` (ids) just left the open states: in each, the first
    waiting row becomes a candidate if no earlier row of its lane is open any more.

    Only a lane's first waiting row can be its first open row, so one index lookup per lane
    finds it (``ix_outbox_messages_lane_behind``), whatever waits behind it. One statement.
    Returns the rows released.
    """
    if not finished:
        return 0
    done = m.alias("done")
    lanes = sa.select(done.c.lane).where(done.c.id.in_(list(finished)), done.c.lane.is_not(None))
    return _release_first_waiting(conn, lanes.distinct().subquery("lanes"))


def settle_waiting_lanes(conn: Connection, limit: int = SETTLE_LIMIT) -> int:
    """Every lane with a waiting row (up to ``limit`` lanes), settled: the safety net for a
    row finished outside the daemon (deleted or updated by hand), which no settle followed.
    Reads the waiting rows' index entries, never the table. Returns the rows released."""
    waiting = m.alias("waiting_lanes")
    lanes = sa.select(waiting.c.lane).where(waiting.c.lane_behind.is_(True)).distinct()
    return _release_first_waiting(conn, lanes.limit(limit).subquery("lanes"))


def _release_first_waiting(conn: Connection, lanes: sa.Subquery) -> int:
    waiting, earlier = m.alias("waiting"), m.alias("earlier")
    first_waiting = (
        sa.select(sa.func.min(waiting.c.id))
        .where(waiting.c.lane_behind.is_(True), waiting.c.lane == lanes.c.lane)
        .scalar_subquery()
    )
    released = conn.execute(
        m.update()
        .where(
            m.c.id.in_(sa.select(first_waiting).select_from(lanes)),
            m.c.lane_behind.is_(True),
            ~sa.exists().where(
                earlier.c.lane == m.c.lane, earlier.c.state.in_(_OPEN), earlier.c.id < m.c.id
            ),
        )
        .values(lane_behind=False)
    )
    return int(released.rowcount)
