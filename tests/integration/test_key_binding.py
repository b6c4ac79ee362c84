"""A key is bound to exactly one request (issue 9, part B).

- The fingerprint stored before the first send covers the method and the payload, so neither
  can change under a key whose call may have executed; migration 0004 rebinds the
  fingerprints of open rows stored by the payload-only formula.
- Retention leaves a tombstone per purged key, so the key cannot be used again for a new
  intent (which would "commit" on ALREADY_EXISTS and never happen).
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

import outbox
from outbox import migrate
from outbox.config import load
from outbox.database import make_engine
from outbox.errors import ConfigError, DuplicateKeyError
from outbox.schema import messages, tombstones
from outbox.simulator import CANCEL_ORDER, PLACE_ORDER, TRANSFER, Fault
from outbox.store import Store

GOOD = {"fromAccount": "acc-1", "toAccount": "acc-2", "amount": "1.00", "currency": "AUD"}
DAY = timedelta(days=1)
INSERT = sa.text(
    "INSERT INTO outbox_messages (idempotency_key, method, payload) VALUES (:k, :m, :p)"
)


def _key() -> str:
    return str(uuid.uuid4())


def _insert(engine: Engine, key: str, method: str, payload: dict[str, Any]) -> None:
    with engine.begin() as conn:
        conn.execute(INSERT, {"k": key, "m": method, "p": json.dumps(payload)})


# --------------------------------------------------------------------------- method + payload


def test_a_method_edited_after_a_send_that_may_have_executed_is_parked(
    engine: Engine, store: Store, sim: Any, make_dispatcher: Callable[..., Any], clock: Any
) -> None:
    """The payload ``{"account": …}`` is a valid CancelOrder and a valid PlaceOrder request."""
    key = _key()
    _insert(engine, key, CANCEL_ORDER, {"account": "acc-1"})
    sim.inject(Fault(grpc.StatusCode.UNKNOWN, "?", times=1))
    dispatcher = make_dispatcher()
    dispatcher.run_once()
    assert (store.get(key).state, store.get(key).maybe_executed) == ("pending", True)
    with engine.begin() as conn:
        conn.execute(
            messages.update().where(messages.c.idempotency_key == key).values(method=PLACE_ORDER)
        )
    calls = len(sim.calls)
    clock.advance(600)
    dispatcher.run_once()
    row = store.get(key)
    assert (row.state, row.park_reason, row.maybe_executed) == ("parked", "payload_changed", True)
    assert "method or payload changed after the first send" in (row.last_message or "")
    assert len(sim.calls) == calls  # never sent to the other RPC


# --------------------------------------------------------------------------- migration 0004


def _old_fingerprints(conn: sa.Connection, backend: str) -> dict[int, str]:
    """Each row's fingerprint by the payload-only formula of revisions 0001-0003."""
    if backend == "postgresql":
        rows = conn.execute(
            sa.text(
                "SELECT id, encode(sha256(convert_to(payload::text, 'UTF8')), 'hex') "
                "FROM outbox_messages"
            )
        ).all()
        return dict(rows)
    rows = conn.execute(sa.text("SELECT id, payload FROM outbox_messages")).all()
    canonical = {
        i: json.dumps(json.loads(p), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        for i, p in rows
    }
    return {i: hashlib.sha256(text.encode()).hexdigest() for i, text in canonical.items()}


def test_migration_0004_rebinds_the_fingerprints_of_open_rows(
    backend: str, fresh_empty_url: Callable[[str], str], clock: Any
) -> None:
    engine = make_engine(fresh_empty_url(backend))
    migrate.upgrade(engine, "0003")
    kept, edited, unclaimed, done = (_key() for _ in range(4))
    for key in (kept, edited, unclaimed, done):
        _insert(engine, key, TRANSFER, GOOD)
    with engine.begin() as conn:
        old = _old_fingerprints(conn, backend)
        ids = dict(conn.execute(sa.text("SELECT idempotency_key, id FROM outbox_messages")).all())
        for key in (kept, edited, done):  # as the 0003 daemon stored them at the first claim
            conn.execute(
                sa.text("UPDATE outbox_messages SET payload_fingerprint = :f WHERE id = :i"),
                {"f": old[ids[key]], "i": ids[key]},
            )
        conn.execute(  # an operator edited this one after its first send
            sa.text("UPDATE outbox_messages SET payload = :p WHERE id = :i"),
            {"p": json.dumps(GOOD | {"amount": "2.00"}), "i": ids[edited]},
        )
        conn.execute(
            sa.text("UPDATE outbox_messages SET state = 'committed' WHERE id = :i"),
            {"i": ids[done]},
        )
    with engine.connect() as conn:
        now_old = _old_fingerprints(conn, backend)  # the edited payload's, too
    for step in ("head", "0003", "head"):  # down and up again: the binding survives both ways
        if step == "head":
            migrate.upgrade(engine)
        else:
            migrate.downgrade(engine, step)
        with engine.connect() as conn:
            stored = dict(
                conn.execute(sa.text("SELECT id, payload_fingerprint FROM outbox_messages")).all()
            )
        if step == "0003":  # the payload-only formula again; the edited row still never matches
            assert stored[ids[kept]] == old[ids[kept]]
            assert stored[ids[edited]] not in (old[ids[edited]], now_old[ids[edited]])
        else:  # rebound to method + payload; the edited row can never match
            assert stored[ids[kept]] not in (None, old[ids[kept]])
            assert set(stored[ids[edited]]) - set("0123456789abcdef")
        assert stored[ids[unclaimed]] is None
        assert stored[ids[done]] == old[ids[done]]  # finished rows are left alone
    claims = {c.idempotency_key: c for c in Store(engine).claim_due("w1", 10, 30.0, clock())}
    assert set(claims) == {kept, edited, unclaimed}
    assert not claims[kept].payload_changed
    assert claims[edited].payload_changed
    assert not claims[unclaimed].payload_changed
    engine.dispose()


# --------------------------------------------------------------------------- tombstones


def _commit_and_purge(
    engine: Engine, store: Store, make_dispatcher: Callable[..., Any], clock: Any
) -> str:
    with engine.begin() as conn:
        key = outbox.enqueue(conn, TRANSFER, GOOD)
    make_dispatcher().run_once()
    assert store.get(key).state == "committed"
    with engine.begin() as conn:
        conn.execute(
            messages.update()
            .where(messages.c.idempotency_key == key)
            .values(updated_at=clock() - 60 * DAY)
        )
    assert store.purge_finished(clock() - 30 * DAY, 100, now=clock()) == 1
    return key


def test_a_purged_key_is_refused_at_enqueue(
    engine: Engine, store: Store, make_dispatcher: Callable[..., Any], clock: Any
) -> None:
    key = _commit_and_purge(engine, store, make_dispatcher, clock)
    with (
        pytest.raises(DuplicateKeyError, match=r"purged on 2026-11-23.*new key"),
        engine.begin() as conn,
    ):
        outbox.enqueue(conn, TRANSFER, GOOD | {"amount": "99.00"}, key=key)


def test_a_plain_sql_row_with_a_purged_key_is_parked_before_any_call(
    engine: Engine, store: Store, sim: Any, make_dispatcher: Callable[..., Any], clock: Any
) -> None:
    """It used to "commit" on ALREADY_EXISTS: the new intent silently never happened."""
    key = _commit_and_purge(engine, store, make_dispatcher, clock)
    _insert(engine, key, TRANSFER, GOOD | {"amount": "99.00"})
    good = _key()
    _insert(engine, good, TRANSFER, GOOD)
    calls = len(sim.calls)
    make_dispatcher().run_once()
    row = store.get(key)
    assert (row.state, row.park_reason, row.attempts) == ("parked", "key_reused", 0)
    assert "purged on 2026-11-23" in (row.last_message or "")
    assert store.get(good).state == "committed"
    assert len(sim.calls) == calls + 1  # only the good row was sent

    # Cancelled and purged again: the first tombstone (the key's first use) stays.
    store.cancel(key, "ops@test", "reused a purged key", clock(), force=False)
    clock.advance(90 * 86400)
    assert store.purge_finished(clock() - 30 * DAY, 100, now=clock()) == 2  # and the good row
    with engine.connect() as conn:
        stones = conn.execute(sa.select(tombstones).order_by(tombstones.c.purged_at)).all()
    assert [(s.idempotency_key, s.final_state) for s in stones] == [
        (key, "committed"),
        (good, "committed"),
    ]
    assert stones[0].purged_at == datetime(2026, 11, 23, 9, 0, tzinfo=UTC)
    assert stones[0].fingerprint is not None


def test_tombstones_are_purged_in_batches_after_their_own_horizon(
    engine: Engine, store: Store, make_dispatcher: Callable[..., Any], clock: Any
) -> None:
    keys = [_commit_and_purge(engine, store, make_dispatcher, clock) for _ in range(3)]
    assert store.purge_tombstones(clock() - DAY, batch=2) == 0
    clock.advance(400 * 86400)
    assert [store.purge_tombstones(clock() - 399 * DAY, batch=2) for _ in range(3)] == [2, 1, 0]
    with engine.begin() as conn:  # the horizon passed: the key is free again
        outbox.enqueue(conn, TRANSFER, GOOD, key=keys[0])


def test_tombstone_days_must_outlast_the_rows(tmp_path: Any) -> None:
    path = tmp_path / "outbox.toml"
    path.write_text("[retention]\ndays = 30\ntombstone_days = 7\n")
    with pytest.raises(ConfigError, match=r"\[retention\] tombstone_days"):
        load(path, env={})
    path.write_text("[retention]\ndays = 30\n")
    assert load(path, env={}).retention.tombstone_days == 400
