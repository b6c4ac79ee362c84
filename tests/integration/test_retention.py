"""Retention: ``Store.purge_finished`` deletes old finished rows in batches, never open ones.

Rows are put in every state through the store's own operations (so they carry attempt
history, as real rows do), and their ``updated_at`` is then moved with plain UPDATEs where a
test needs a row to look older or newer than the cutoff.
"""

from __future__ import annotations

import threading
from collections import Counter
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.engine import Engine

import outbox
from outbox.schema import attempts, messages
from outbox.services import WORKER_KEEP_DAYS, Retention, RetentionSettings
from outbox.simulator import TRANSFER
from outbox.store import Claim, Committed, HistoryLine, Parked, Store, WorkerBeat

DAY = timedelta(days=1)


def _enqueue(engine: Engine, n: int, **options: object) -> list[str]:
    with engine.begin() as conn:
        return [
            outbox.enqueue(
                conn,
                TRANSFER,
                {"fromAccount": "a", "toAccount": "b", "amount": f"{i + 1}.00"},
                **options,  # type: ignore[arg-type]
            )
            for i in range(n)
        ]


def _claim(store: Store, keys: list[str], at: datetime) -> list[Claim]:
    """Claim exactly ``keys`` (they are the only due rows) at time ``at``."""
    claims = store.claim_due("retention-test", len(keys) + 10, 60.0, at)
    assert sorted(c.idempotency_key for c in claims) == sorted(keys)
    return claims


def _commit(store: Store, keys: list[str], at: datetime) -> None:
    claims = _claim(store, keys, at)
    call = HistoryLine("call", "commit", "OK", "committed", 3.0)
    assert store.record([Committed(c, call, {"transferId": "t"}) for c in claims], at) == []


def _park(store: Store, keys: list[str], at: datetime) -> None:
    claims = _claim(store, keys, at)
    call = HistoryLine("call", "park", "FAILED_PRECONDITION", "over the limit", 3.0)
    assert store.record([Parked(c, call, "precondition") for c in claims], at) == []


def _set_updated_at(engine: Engine, keys: list[str], at: datetime) -> None:
    with engine.begin() as conn:
        conn.execute(
            messages.update().where(messages.c.idempotency_key.in_(keys)).values(updated_at=at)
        )


def _ids(engine: Engine, keys: list[str]) -> dict[str, int]:
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(messages.c.idempotency_key, messages.c.id).where(
                messages.c.idempotency_key.in_(keys)
            )
        ).all()
    return {k: i for k, i in rows}


def _history_counts(engine: Engine) -> Counter[int]:
    with engine.connect() as conn:
        ids = conn.execute(sa.select(attempts.c.message_id)).scalars().all()
    return Counter(ids)


def _states(engine: Engine) -> dict[str, str]:
    with engine.connect() as conn:
        rows = conn.execute(sa.select(messages.c.idempotency_key, messages.c.state)).all()
    return {k: s for k, s in rows}


def test_purge_removes_old_finished_rows_and_their_history_in_batches(engine: Engine) -> None:
    store = Store(engine)
    now = datetime.now(UTC)
    cutoff = now - 30 * DAY
    old, ancient, recent = now - 60 * DAY, now - 400 * DAY, now - 29 * DAY

    # Each group is created alone (the claims below take every due row).
    old_committed = _enqueue(engine, 3)
    _commit(store, old_committed, old)
    new_committed = _enqueue(engine, 2)
    _commit(store, new_committed, recent)
    ancient_parked = _enqueue(engine, 2)
    _park(store, ancient_parked, ancient)  # very old, but waiting for a human: kept
    old_inflight = _enqueue(engine, 1)
    _claim(store, old_inflight, old)  # a stuck claim: the reaper's business, not retention's

    old_cancelled = _enqueue(engine, 2)
    new_cancelled = _enqueue(engine, 1)
    for key in old_cancelled:
        store.cancel(key, "ops@test", "not needed", old, force=False)
    for key in new_cancelled:
        store.cancel(key, "ops@test", "not needed", recent, force=False)

    old_expired = _enqueue(engine, 2, expires_at=old - DAY)
    assert store.expire_due(old) == (2, 0)

    # A finished row updated just after the cutoff stays; plain UPDATEs for the edge cases.
    edge_committed = _enqueue(engine, 1)
    _commit(store, edge_committed, old)
    _set_updated_at(engine, edge_committed, cutoff + timedelta(minutes=1))

    # Pending rows (last: they stay due): one requeued long ago (it has history), one
    # untouched for a year.
    old_pending = _enqueue(engine, 1)
    _park(store, old_pending, ancient)
    store.requeue(old_pending[0], "ops@test", "fixed", old)
    old_pending += _enqueue(engine, 1)
    _set_updated_at(engine, old_pending[1:], ancient)

    purged_keys = old_committed + old_cancelled + old_expired
    kept_keys = (
        new_committed + new_cancelled + edge_committed + ancient_parked + old_inflight + old_pending
    )
    assert _states(engine) == {
        **dict.fromkeys(old_committed + new_committed + edge_committed, "committed"),
        **dict.fromkeys(old_cancelled + new_cancelled, "cancelled"),
        **dict.fromkeys(old_expired, "expired"),
        **dict.fromkeys(ancient_parked, "parked"),
        **dict.fromkeys(old_inflight, "inflight"),
        **dict.fromkeys(old_pending, "pending"),
    }
    purged_ids = set(_ids(engine, purged_keys).values())
    kept_ids = set(_ids(engine, kept_keys).values())
    history = _history_counts(engine)
    assert all(history[i] >= 1 for i in purged_ids)  # every purged row had history to purge
    assert history[_ids(engine, old_pending[:1])[old_pending[0]]] == 2  # parked, requeued

    results = []
    while (purged := store.purge_finished(cutoff, batch=2)) > 0:
        results.append(purged)
        assert len(results) <= 10, results  # it must terminate
    assert results == [2, 2, 2, 1]  # 7 rows, at most 2 per call

    assert _states(engine).keys() == set(kept_keys)
    after = _history_counts(engine)
    assert not purged_ids & after.keys()  # no orphaned attempt rows
    assert {i: after[i] for i in kept_ids} == {i: history[i] for i in kept_ids}
    assert store.purge_finished(cutoff, batch=2) == 0


def test_purge_of_nothing_due_is_zero_and_touches_nothing(engine: Engine) -> None:
    store = Store(engine)
    now = datetime.now(UTC)
    keys = _enqueue(engine, 3)
    _commit(store, keys, now - DAY)  # finished, but younger than the cutoff
    assert store.purge_finished(now - 30 * DAY, batch=100) == 0
    assert set(_states(engine).values()) == {"committed"}
    assert len(_states(engine)) == 3


# --------------------------------------------------------------------------- workers (issue 12)


def _worker(store: Store, worker_id: str, beat_at: datetime, *, stopped: bool = False) -> None:
    store.heartbeat(WorkerBeat(worker_id, "h", 1, "0.1.0", beat_at - DAY), beat_at)
    if stopped:
        store.worker_stopped(worker_id, beat_at)


def test_retention_purges_workers_stopped_or_silent_longer_than_the_default(
    engine: Engine,
) -> None:
    store, now = Store(engine), datetime.now(UTC)
    old = now - timedelta(days=WORKER_KEEP_DAYS) - timedelta(minutes=1)
    recent = now - timedelta(days=WORKER_KEEP_DAYS) + timedelta(minutes=10)
    _worker(store, "stopped-long-ago", old, stopped=True)
    _worker(store, "silent-long-ago", old)
    _worker(store, "stopped-recently", recent, stopped=True)
    _worker(store, "live", now)

    Retention(store, RetentionSettings(30, 100, 400, 3600), threading.Event()).run_once(now)

    assert sorted(w.worker_id for w in store.list_workers()) == ["live", "stopped-recently"]


def test_workers_are_purged_even_when_rows_are_kept_for_ever(engine: Engine) -> None:
    store, now = Store(engine), datetime.now(UTC)
    _worker(store, "gone", now - timedelta(days=WORKER_KEEP_DAYS + 1), stopped=True)
    Retention(store, RetentionSettings(0, 100, 0, 3600), threading.Event()).run_once(now)
    assert store.list_workers() == []
