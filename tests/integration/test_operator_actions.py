"""Operators' actions on the store (issue 14): requeue after unknown outcomes, filters and
keyset pages, bulk actions through the guarded transition, holds, dual control, the payload
as first sent. On SQLite, PostgreSQL and MariaDB."""

from __future__ import annotations

import grpc

import outbox
from outbox.simulator import TRANSFER, Fault

C = grpc.StatusCode


def transfer(amount: str = "10.00") -> dict[str, str]:
    return {"fromAccount": "acc-1", "toAccount": "acc-2", "amount": amount, "currency": "AUD"}


def enqueue_transfer(engine, amount: str = "10.00", **kwargs) -> str:
    with engine.begin() as conn:
        return outbox.enqueue(conn, TRANSFER, transfer(amount), **kwargs)


# --------------------------------------------------------------------------- unknown outcomes


def test_a_requeue_gives_max_unknown_attempts_further_unknown_outcomes(
    engine, sim, store, make_dispatcher, clock
) -> None:
    """Before: the unknown count survived the requeue, so the next unknown answer parked the
    row at once and its message said "4 attempts" with a limit of 3."""
    key = enqueue_transfer(engine)
    sim.inject(Fault(C.UNKNOWN, "?"))
    dispatcher = make_dispatcher(max_unknown_attempts=3)
    for _ in range(3):
        dispatcher.run_once()
        clock.advance(600)
    assert store.get(key).park_reason == "unknown_outcome"
    store.requeue(key, "alice@ops", "checked recrypt.net: not there", clock())
    for sent in range(1, 4):
        dispatcher.run_once()
        clock.advance(600)
        row = store.get(key)
        if sent < 3:
            assert row.state == "pending", (sent, row.last_message)
    assert (row.state, row.park_reason, row.attempts) == ("parked", "unknown_outcome", 6)
    assert "outcome unknown for 3 attempts" in (row.last_message or "")
