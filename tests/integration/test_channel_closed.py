"""A call that fails because its channel closed counts as never started only if it never
started (issue 9 §1: shutdown or reload racing a batch)."""

from __future__ import annotations

import threading

import grpc

from outbox.simulator import TRANSFER, Fault
from tests.integration.test_dispatch import enqueue_transfer

C = grpc.StatusCode
WRITES = frozenset({TRANSFER})  # hold the Transfer, never a MaintenanceCheck probe


def test_a_call_on_a_channel_already_closed_goes_back_untouched(
    engine, store, sim, make_dispatcher
) -> None:
    key = enqueue_transfer(engine)
    dispatcher = make_dispatcher()
    dispatcher.client.close()  # a stop closed the channel before this batch's calls started

    dispatcher.run_once()

    view = store.get(key)
    assert (view.state, view.attempts, view.maybe_executed) == ("pending", 0, False)
    assert key not in sim.executed_keys() and sim.call_count(TRANSFER) == 0


def test_a_call_cancelled_in_flight_may_have_executed(engine, store, sim, make_dispatcher) -> None:
    key = enqueue_transfer(engine)
    dispatcher = make_dispatcher()
    release = threading.Event()
    held = sim.inject(Fault(C.OK, methods=WRITES, hang=release, times=1))
    cycle = threading.Thread(target=dispatcher.run_once)
    cycle.start()
    assert sim.wait_for(lambda _s: held.hits == 1)
    dispatcher.clients.close()  # a stop past its grace cancels the call in flight
    cycle.join(10)
    release.set()

    view = store.get(key)
    assert (view.state, view.maybe_executed, view.last_code) == ("pending", True, "CANCELLED")
