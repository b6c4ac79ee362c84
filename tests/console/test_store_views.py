"""The console's store queries on every database (SQLite, PostgreSQL, MariaDB)."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy.engine import Engine

from outbox.store import Store
from outbox.store.console_views import RowFilter
from tests.console.harness import seed, seed_activity


def test_filters_pages_lanes_and_activity(engine: Engine) -> None:
    store = Store(engine)
    seeded = seed(engine)
    seed_activity(store, hours=1)
    found = store.find_rows(RowFilter(state="parked", method="Wallet/Transfer"), limit=2)
    assert len(found.rows) == 2 and found.next_after is not None
    rest = store.find_rows(
        RowFilter(state="parked", method="Wallet/Transfer", after_id=found.next_after), limit=2
    )
    assert [r.idempotency_key for r in rest.rows] == [seeded.precondition]
    assert rest.next_after is None
    for value in ("' OR 1=1 --", "%", "_", "!"):
        assert store.find_rows(RowFilter(reference=value)).rows == []
    assert [r.idempotency_key for r in store.find_rows(RowFilter(reference="<scr")).rows] == [
        seeded.marked
    ]
    assert [r.idempotency_key for r in store.find_rows(RowFilter(maybe_executed=True)).rows] == [
        seeded.unknown
    ]
    [lane] = store.blocked_lanes()
    assert (lane.lane, lane.head.idempotency_key, lane.waiting) == (
        "acme-trading",
        seeded.lane_head,
        1,
    )
    now = store.database_now()
    activity = store.activity(now - timedelta(minutes=61), 62)
    assert sum(activity.series["committed"]) == 60
    assert sum(activity.series["parked"]) >= 4
