"""Whole-API conditions and the row lifecycle, on every database, over an injected clock."""

from __future__ import annotations

import threading
from datetime import timedelta

import grpc
import sqlalchemy as sa

import outbox
from outbox.schema import messages
from outbox.simulator import PLACE_ORDER, TRANSFER, Fault

C = grpc.StatusCode
STEP = 0.5  # simulated seconds between dispatch cycles (the daemon's poll interval)


def transfer(memo: str = "", amount: str = "1.00") -> dict[str, str]:
    return {"fromAccount": "a", "toAccount": "b", "amount": amount, "memo": memo}


def enqueue(engine, n: int, **kwargs) -> list[str]:
    with engine.begin() as conn:
        return [outbox.enqueue(conn, TRANSFER, transfer(f"#{i}"), **kwargs) for i in range(n)]


def run_for(dispatcher, clock, seconds: float, *, probe: bool = False) -> None:
    for _ in range(int(seconds / STEP)):
        dispatcher.run_once()
        if probe:
            dispatcher.probe()
        clock.advance(STEP)


def test_rollover_calls_grow_with_log_of_window_not_rows(
    engine, sim, store, make_dispatcher, clock
):
    keys = enqueue(engine, 300)
    dispatcher = make_dispatcher(batch_size=50)
    window = 30 * 60.0
    sim.inject(Fault(C.UNAVAILABLE, "vgw-db"))
    run_for(dispatcher, clock, window)
    calls_in_window = sim.call_count()
    sim.clear_faults()
    for _ in range(2000):
        if dispatcher.run_once().claimed == 0 and store.status(clock()).counts["pending"] == 0:
            break
        clock.advance(STEP)
    # The first batch went out before the gate knew; then one probe per backoff step:
    # 1, 2, 4 ... 128 s, then every 180 s (the cap) for the rest of the 30 minutes.
    assert calls_in_window <= 50 + 8 + window / (180 * 0.8) + 2, calls_in_window
    print(f"\nrollover: rows=300 window_s={window:.0f} calls_in_window={calls_in_window}")
    assert store.status(clock()).counts["committed"] == 300
    assert all(sim.executions(k) == 1 for k in keys)


def test_maintenance_window_parks_nothing_and_counts_nothing(
    engine, sim, store, make_dispatcher, clock
):
    keys = enqueue(engine, 60)
    dispatcher = make_dispatcher(batch_size=20)
    sim.set_maintenance(True)
    run_for(dispatcher, clock, 3600, probe=True)  # an hour of maintenance
    calls_in_window = sim.call_count()
    status = store.status(clock())
    assert status.counts["parked"] == 0
    assert status.counts["pending"] == 60
    sim.set_maintenance(False)
    for _ in range(400):
        dispatcher.probe()
        dispatcher.run_once()
        clock.advance(STEP)
    # probes back off to [maintenance] probe_interval (60 s): about one a minute
    assert calls_in_window <= 20 + 3600 / (60 * 0.8) + 10, calls_in_window
    rows = [store.get(k) for k in keys]
    assert {r.state for r in rows} == {"committed"}
    assert {r.attempts for r in rows} == {1}


def test_rate_limit_throttles_without_counting(engine, sim, store, make_dispatcher, clock):
    keys = enqueue(engine, 10)
    sim.inject(Fault(C.RESOURCE_EXHAUSTED, "rate limit", times=10))
    dispatcher = make_dispatcher(batch_size=10)
    dispatcher.run_once()
    assert dispatcher.gates.view(clock()).gate == "rate_limited"
    assert {store.get(k).attempts for k in keys} == {0}
    run_for(dispatcher, clock, 30)
    assert {store.get(k).state for k in keys} == {"committed"}
    assert {store.get(k).attempts for k in keys} == {1}


def test_not_found_parks_and_stops_sending_that_method(engine, sim, store, make_dispatcher, clock):
    keys = enqueue(engine, 3)
    with engine.begin() as conn:
        order = outbox.enqueue(
            conn,
            PLACE_ORDER,
            {"account": "x", "market": "BTC-AUD", "quantity": "1", "type": "ORDER_TYPE_MARKET"},
        )
    sim.inject(Fault(C.NOT_FOUND, "removed", methods=frozenset({TRANSFER}), times=1))
    dispatcher = make_dispatcher(batch_size=1)
    dispatcher.run_once()
    assert store.get(keys[0]).park_reason == "method_removed"
    assert TRANSFER in dispatcher.gates.view(clock()).removed_methods
    run_for(dispatcher, clock, 5)
    assert store.get(order).state == "committed"
    assert [store.get(k).state for k in keys[1:]] == ["pending", "pending"]
    dispatcher.gates.reset(clock())  # a reload
    run_for(dispatcher, clock, 5)
    assert [store.get(k).state for k in keys[1:]] == ["committed", "committed"]


def test_lanes_send_in_insertion_order_one_at_a_time(engine, sim, store, make_dispatcher, clock):
    with engine.begin() as conn:
        laned = {
            lane: [
                outbox.enqueue(conn, TRANSFER, transfer(f"{lane}#{i}"), lane=lane) for i in range(5)
            ]
            for lane in ("L1", "L2", "L3")
        }
        free = [outbox.enqueue(conn, TRANSFER, transfer(f"free#{i}")) for i in range(5)]
    dispatcher = make_dispatcher(batch_size=50)
    first = dispatcher.run_once()
    assert first.claimed == 3 + 5  # one per lane, and every row without a lane
    for _ in range(10):
        dispatcher.run_once()
    ledger = [entry.key for entry in sim.ledger]
    for keys in laned.values():
        assert [k for k in ledger if k in keys] == keys
    assert set(free) <= set(ledger)


def test_parked_row_blocks_its_lane_until_requeued(engine, sim, store, make_dispatcher, clock):
    with engine.begin() as conn:
        blocked = [
            outbox.enqueue(conn, TRANSFER, transfer(f"#{i}"), lane="acct-9") for i in range(3)
        ]
        other = outbox.enqueue(conn, TRANSFER, transfer("other"), lane="acct-1")
    sim.inject(Fault(C.FAILED_PRECONDITION, "compliance", keys=frozenset({blocked[0]}), times=1))
    dispatcher = make_dispatcher()
    run_for(dispatcher, clock, 5)
    assert store.get(blocked[0]).state == "parked"
    assert [store.get(k).state for k in blocked[1:]] == ["pending", "pending"]
    assert store.get(other).state == "committed"
    assert store.status(clock()).blocked_lanes == ["acct-9"]
    store.requeue(blocked[0], "ops@host", "compliance answered", clock())
    run_for(dispatcher, clock, 5)
    assert [store.get(k).state for k in blocked] == ["committed"] * 3
    assert [e.key for e in sim.ledger if e.key in blocked] == blocked


def test_cancel_unblocks_a_lane(engine, sim, store, make_dispatcher, clock):
    with engine.begin() as conn:
        keys = [outbox.enqueue(conn, TRANSFER, transfer(f"#{i}"), lane="L") for i in range(2)]
    sim.inject(Fault(C.INVALID_ARGUMENT, "bad", keys=frozenset({keys[0]})))
    dispatcher = make_dispatcher()
    run_for(dispatcher, clock, 2)
    store.cancel(keys[0], "ops@host", "bad account", clock(), force=False)
    run_for(dispatcher, clock, 2)
    assert store.get(keys[1]).state == "committed"


def test_not_before_holds_a_row(engine, sim, store, make_dispatcher, clock):
    [later] = enqueue(engine, 1, not_before=clock() + timedelta(minutes=10))
    dispatcher = make_dispatcher()
    run_for(dispatcher, clock, 599)
    assert store.get(later).state == "pending"
    assert sim.call_count() == 0
    run_for(dispatcher, clock, 2)
    assert store.get(later).state == "committed"


def test_expires_at_expires_an_unsent_row(engine, sim, store, make_dispatcher, clock):
    [key] = enqueue(engine, 1, expires_at=clock() + timedelta(seconds=30))
    sim.set_maintenance(True)
    dispatcher = make_dispatcher()
    run_for(dispatcher, clock, 31, probe=True)
    assert store.expire_due(clock()) == (1, 0)
    row = store.get(key)
    assert (row.state, row.maybe_executed) == ("expired", False)


def test_expires_at_after_maybe_executed_parks(engine, sim, store, make_dispatcher, clock):
    [key] = enqueue(engine, 1, expires_at=clock() + timedelta(seconds=30))
    sim.inject(Fault(C.UNAVAILABLE, "vgw-db", execute=True))
    dispatcher = make_dispatcher()
    run_for(dispatcher, clock, 31)
    store.expire_due(clock())
    row = store.get(key)
    assert (row.state, row.park_reason) == ("parked", "expired_unknown")
    assert "unknown outcome" in (row.last_message or "")


def test_long_calls_renew_their_lease(engine, sim, store, make_dispatcher, clock):
    [key] = enqueue(engine, 1)
    release = threading.Event()
    hang = sim.inject(Fault(C.OK, hang=release))
    dispatcher = make_dispatcher(lease=30)
    worker = threading.Thread(target=dispatcher.run_once)
    worker.start()
    try:
        assert sim.wait_for(lambda s: hang.hits == 1, timeout=10)
        [row_id] = dispatcher.inflight_ids()
        clock.advance(25)
        assert store.renew_leases("w1", [row_id], 30, clock()) == 1
        clock.advance(25)  # 50 s after the claim: the old lease would have run out
        assert store.release_expired_leases(clock()) == []
    finally:
        release.set()
        worker.join(10)
    assert store.get(key).state == "committed"
    assert dispatcher.inflight_ids() == []


def test_reaper_resends_a_dead_workers_row_within_one_lease(
    engine, sim, store, make_dispatcher, clock
):
    [key] = enqueue(engine, 1)
    store.claim_due("dead-worker", 10, lease=30, now=clock())  # then it died
    clock.advance(30.5)
    assert store.release_expired_leases(clock()) == [key]
    make_dispatcher().run_once()
    row = store.get(key)
    assert (row.state, row.maybe_executed, row.attempts) == ("committed", True, 2)
    assert [h.decision for h in store.history(key)] == ["lease_expired", "commit"]


def test_plain_sql_update_of_state_is_guarded(engine, store, clock):
    """A row the reaper released cannot be recorded by its old owner."""
    [key] = enqueue(engine, 1)
    [claim] = store.claim_due("old", 1, lease=1, now=clock())
    clock.advance(2)
    store.release_expired_leases(clock())
    with engine.begin() as conn:
        state = conn.execute(sa.select(messages.c.state)).scalar_one()
    assert state == "pending"
    from outbox.store import Committed, HistoryLine

    assert store.record([Committed(claim, HistoryLine("call", "commit", "OK"))], clock())
    assert store.get(key).state == "pending"


def test_rollover_window_spanning_the_start_holds_market_orders(
    engine, sim, store, make_dispatcher, clock
):
    from datetime import UTC, datetime, time

    from outbox.backoff import Backoff
    from outbox.gates import Gates

    clock.now = datetime(2026, 11, 24, 18, 10, tzinfo=UTC)  # Tuesday, inside the window
    gates = Gates(Backoff(), 50, window=(1, time(18, 0), time(18, 30)), hold_methods=(PLACE_ORDER,))
    with engine.begin() as conn:
        order = outbox.enqueue(
            conn,
            PLACE_ORDER,
            {"account": "x", "market": "BTC-AUD", "quantity": "1", "type": "ORDER_TYPE_MARKET"},
        )
    [money] = enqueue(engine, 1)
    dispatcher = make_dispatcher(gates=gates)
    run_for(dispatcher, clock, 60)
    assert store.get(money).state == "committed"  # transfers are not held
    assert store.get(order).state == "pending"  # market orders are
    assert gates.view(clock()).held_methods == (PLACE_ORDER,)
    clock.now = datetime(2026, 11, 24, 18, 30, tzinfo=UTC)
    run_for(dispatcher, clock, 1)
    assert store.get(order).state == "committed"
