"""Lane heads (issue #11): rows behind an earlier open row of their lane are never claim
candidates, and a lane moves on the moment its head is finished.

The claim cost with 200,000 such rows is measured in ``test_claim_cost.py``; here, what the
marks mean for the rows: order kept, nothing left waiting for ever, the race between a
daemon sorting new rows and another finishing the row they wait behind (a real second
transaction on PostgreSQL and MariaDB, its lock wait seen by the server), and the migration.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from outbox import migrate
from outbox.database import make_engine
from outbox.schema import messages
from outbox.services import LaneKeeper
from outbox.store import Committed, HistoryLine, Parked, Store
from outbox.store import heads as lane_heads
from tests.integration.test_lanes import (
    LANE,
    NOW,
    Session,
    blocked_or_done,
    commit_outcome,
    insert_plain,
    observer,  # noqa: F401  (fixtures)
    server_url,  # noqa: F401
    sessions,  # noqa: F401
)

m = messages


def marks(engine: Engine) -> dict[str, tuple[str, bool | None, bool]]:
    """key → (state, lane_behind, due_at set)."""
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(m.c.idempotency_key, m.c.state, m.c.lane_behind, m.c.due_at)
        ).all()
    return {
        key: (state, None if behind is None else bool(behind), due is not None)
        for key, state, behind, due in rows
    }


def park(claim: object) -> Parked:
    call = HistoryLine("call", "parked", "FAILED_PRECONDITION", "insufficient funds")
    return Parked(claim, call, reason="rejected", maybe_executed=False)  # type: ignore[arg-type]


def test_rows_behind_a_parked_head_wait_until_it_is_cancelled_then_go_in_order(
    engine: Engine,
) -> None:
    store = Store(engine)
    with engine.begin() as conn:
        keys = [insert_plain(conn) for _ in range(4)]
        free = insert_plain(conn, lane=None)
    claims = store.claim_due("w", 10, 30, NOW)
    assert {c.idempotency_key for c in claims} == {keys[0], free}
    waiting = marks(engine)
    assert [waiting[k] for k in keys[1:]] == [("pending", True, False)] * 3
    assert waiting[keys[0]][1] is False  # the head, claimed

    head = next(c for c in claims if c.idempotency_key == keys[0])
    store.record([park(head)], NOW)
    assert store.claim_due("w", 10, 30, NOW) == []  # the lane waits on its parked head
    store.cancel(keys[0], "ops", "refunded by hand", NOW, force=False)
    assert marks(engine)[keys[1]] == ("pending", False, True)  # the next row is the head

    sent = []
    for _ in range(3):
        (claim,) = store.claim_due("w", 10, 30, NOW)
        sent.append(claim.idempotency_key)
        store.record([commit_outcome(claim)], NOW)
    assert sent == keys[1:]


def test_an_expired_head_lets_its_lane_move_on(engine: Engine) -> None:
    store = Store(engine)
    with engine.begin() as conn:
        head, behind = insert_plain(conn), insert_plain(conn)
        conn.execute(
            m.update().where(m.c.idempotency_key == head).values(not_before=NOW + timedelta(1))
        )
        conn.execute(m.update().where(m.c.idempotency_key == head).values(expires_at=NOW))
    assert store.sort_lanes() == 2
    assert marks(engine)[behind] == ("pending", True, False)
    assert store.expire_due(NOW) == (1, 0)
    assert [c.idempotency_key for c in store.claim_due("w", 10, 30, NOW)] == [behind]


def test_a_row_finished_while_another_daemon_sorts_its_lane_leaves_no_row_waiting(
    server_url: str,  # noqa: F811
    observer: Engine,  # noqa: F811
    sessions: Callable[[], Session],  # noqa: F811
) -> None:
    """Daemon A sorts a new row R behind the row E in flight; daemon B records E's commit.

    If B's record did not wait for A, B would settle the lane before A's mark was visible,
    and R would wait for ever behind a finished row. A holds E ``FOR SHARE`` while it marks
    R, so B's record waits on the lock (seen in the server) and then finds R waiting.
    """
    store = Store(observer)
    with observer.begin() as conn:
        insert_plain(conn)
    (claim_e,) = store.claim_due("w1", 10, 30, NOW)
    with observer.begin() as conn:
        r = insert_plain(conn)

    a, b = sessions(), sessions()
    with ThreadPoolExecutor(max_workers=1) as pool:
        with a.conn.begin():
            assert lane_heads.sort_new_rows(a.conn) == 1  # R marked waiting behind E
            record = pool.submit(Store(b.engine).record, [commit_outcome(claim_e)], NOW)
            assert blocked_or_done(observer, b, record), "B finished E while A held it"
        assert record.result(timeout=10) == []
    assert marks(observer)[r] == ("pending", False, True)
    assert [c.idempotency_key for c in store.claim_due("w2", 10, 30, NOW)] == [r]


def test_migration_0008_marks_the_rows_behind_each_lanes_first_open_row(
    backend: str, fresh_empty_url: Callable[[str], str]
) -> None:
    engine = make_engine(fresh_empty_url(backend))
    try:
        migrate.upgrade(engine, "0007")
        with engine.begin() as conn:
            done, head, behind = (insert_plain(conn) for _ in range(3))
            other = insert_plain(conn, lane="other")
            conn.execute(m.update().where(m.c.idempotency_key == done).values(state="committed"))
            conn.execute(
                m.update()
                .where(m.c.idempotency_key == head)
                .values(state="parked", park_reason="rejected")
            )
        migrate.upgrade(engine)
        after = marks(engine)
        assert after[done][1] is False and after[head][1] is False and after[other][1] is False
        assert after[behind] == ("pending", True, False)
        assert [c.idempotency_key for c in Store(engine).claim_due("w", 10, 30, NOW)] == [other]
    finally:
        engine.dispose()


def test_a_committed_head_hands_its_lane_to_the_next_row(engine: Engine) -> None:
    store = Store(engine)
    with engine.begin() as conn:
        first, second = insert_plain(conn), insert_plain(conn)
    (claim,) = store.claim_due("w", 10, 30, NOW)
    assert marks(engine)[second] == ("pending", True, False)
    store.record([Committed(claim, HistoryLine("call", "committed", "OK", "ok"), {"id": "1"})], NOW)
    assert marks(engine)[second] == ("pending", False, True)
    assert marks(engine)[first][0] == "committed"
    assert LANE  # the lane every insert_plain row is in


def test_a_head_deleted_by_hand_releases_its_lane_at_the_next_keeper_run(
    engine: Engine,
) -> None:
    """No settle follows a row deleted outside the daemon: the lane keeper's run does."""
    store = Store(engine)
    with engine.begin() as conn:
        head, behind = insert_plain(conn), insert_plain(conn)
    assert store.sort_lanes() == 2
    with engine.begin() as conn:
        conn.execute(m.delete().where(m.c.idempotency_key == head))
    assert store.claim_due("w", 10, 30, NOW) == []
    LaneKeeper(store).run_once(NOW)
    assert [c.idempotency_key for c in store.claim_due("w", 10, 30, NOW)] == [behind]
