"""Record first, then tell observers; a row lost to another worker is reported as lost
(issue 9 §1)."""

from __future__ import annotations

import json
import threading

import grpc

from outbox.simulator import TRANSFER, Fault
from tests.integration.test_dispatch import enqueue_transfer

C = grpc.StatusCode
WRITES = frozenset({TRANSFER})  # hold the Transfer, never a MaintenanceCheck probe


def test_observers_hear_of_an_outcome_only_after_it_is_recorded(
    engine, store, sim, make_dispatcher
) -> None:
    key = enqueue_transfer(engine)
    dispatcher = make_dispatcher()
    seen: list[str] = []
    dispatcher.observe(lambda claim, _a, _o: seen.append(store.get(claim.idempotency_key).state))
    dispatcher.run_once()
    assert seen == ["committed"]  # the observer already sees the recorded state
    assert store.get(key).state == "committed"


def test_a_row_lost_to_another_worker_is_reported_lost_never_committed(
    engine, store, sim, make_dispatcher, clock
) -> None:
    key = enqueue_transfer(engine)
    first = make_dispatcher("w1", lease=30.0)
    told: list[str] = []
    lost: list[str] = []
    first.observe(
        lambda _c, _a, o: told.append(type(o).__name__),
        lost=lambda o: lost.append(o.claim.idempotency_key),
    )
    release = threading.Event()
    held = sim.inject(Fault(C.OK, methods=WRITES, hang=release, times=1))
    cycle = threading.Thread(target=first.run_once)
    cycle.start()
    assert sim.wait_for(lambda _s: held.hits == 1)
    clock.advance(31)  # our lease runs out while the call hangs
    assert store.release_expired_leases(clock(), max_unknown_attempts=5) == [key]
    release.set()
    cycle.join(10)

    assert told == [] and lost == [key]
    history = store.history(key)
    assert [h.decision for h in history if h.kind == "call"] == ["late_answer"]


def test_a_late_ok_keeps_its_response_when_another_worker_commits_on_already_exists(
    engine, store, sim, make_dispatcher, clock
) -> None:
    """w1's call executes but its answer comes after w1's lease ran out and w2 resent the row:
    w2 gets ALREADY_EXISTS (no response); the row keeps the response w1 received."""
    key = enqueue_transfer(engine)
    first, second = make_dispatcher("w1", lease=30.0), make_dispatcher("w2", lease=30.0)
    release_first, release_second = threading.Event(), threading.Event()
    held_first = sim.inject(Fault(C.OK, methods=WRITES, hang=release_first, times=1))
    held_second = sim.inject(Fault(C.OK, methods=WRITES, hang=release_second, times=1))
    one = threading.Thread(target=first.run_once)
    one.start()
    assert sim.wait_for(lambda _s: held_first.hits == 1)
    clock.advance(31)
    assert store.release_expired_leases(clock(), max_unknown_attempts=5) == [key]
    two = threading.Thread(target=second.run_once)
    two.start()
    assert sim.wait_for(lambda _s: held_second.hits == 1)
    release_first.set()  # w1's call executes now; its OK reaches w1, who lost the row
    one.join(10)
    release_second.set()  # w2's resend: ALREADY_EXISTS
    two.join(10)

    view = store.get(key)
    (entry,) = sim.ledger
    assert (view.state, view.last_code) == ("committed", "ALREADY_EXISTS")
    assert json.loads(view.response)["transferId"] == entry.response["transfer_id"]
