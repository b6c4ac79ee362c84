"""Holds (issue 14): a real daemon against the simulator leaves a held lane's or method's rows
alone while it sends the others, and sends them after the release. The hold is made by
another store (another process, as `outbox hold` is), on SQLite, PostgreSQL and MariaDB."""

from __future__ import annotations

import time

import outbox
from outbox.database import make_engine
from outbox.simulator import PLACE_ORDER, TRANSFER, Simulator
from outbox.store import Store
from tests.integration.test_daemon import KEY, daemon_for
from tests.integration.test_dispatch import transfer

ORDER = {
    "account": "A",
    "market": "BTC-AUD",
    "type": "ORDER_TYPE_LIMIT",
    "quantity": "1",
    "limit_price": "10.00",
}
POLL = 0.1


def _enqueue(engine, method: str, payload: dict[str, str], lane: str | None = None) -> str:
    with engine.begin() as conn:
        return outbox.enqueue(conn, method, payload, lane=lane)


def _sent(sim: Simulator, keys: list[str], timeout: float = 10.0) -> bool:
    return sim.wait_for(lambda s: set(keys) <= s.executed_keys(), timeout=timeout)


def test_a_held_lane_is_not_sent_until_released(db_url: str) -> None:
    engine = make_engine(db_url)
    operator = Store(engine)
    operator.hold("lane", "acc-1", "alice@h", "reconciling acc-1", operator.database_now())
    with Simulator(api_keys=[KEY]) as sim:
        daemon = daemon_for(db_url, sim.target, poll=POLL)
        daemon.start()
        try:
            held = [_enqueue(engine, TRANSFER, transfer(f"{i}.00"), "acc-1") for i in (1, 2)]
            free = [_enqueue(engine, TRANSFER, transfer(f"{i}.00"), "acc-2") for i in (3, 4)]
            assert _sent(sim, free)
            time.sleep(10 * POLL)
            assert not set(held) & sim.executed_keys()
            assert {operator.get(k).state for k in held} == {"pending"}

            operator.release("lane", "acc-1", "bob@h", "reconciled")
            assert _sent(sim, held)
        finally:
            daemon.shutdown()
    engine.dispose()


def test_a_held_method_is_not_sent_until_released(db_url: str) -> None:
    engine = make_engine(db_url)
    with Simulator(api_keys=[KEY]) as sim:
        daemon = daemon_for(db_url, sim.target, poll=POLL)
        daemon.start()
        try:
            operator = Store(engine)
            operator.hold(
                "method", PLACE_ORDER, "alice@h", "market halted", operator.database_now()
            )
            time.sleep(1.0)  # the daemon's holds are at most half a second old
            orders = [_enqueue(engine, PLACE_ORDER, ORDER) for _ in range(2)]
            transfers = [_enqueue(engine, TRANSFER, transfer())]
            assert _sent(sim, transfers)
            time.sleep(10 * POLL)
            assert not set(orders) & sim.executed_keys()
            assert sim.call_count(PLACE_ORDER) == 0

            operator.release("method", PLACE_ORDER, "bob@h", "market open")
            assert _sent(sim, orders)
        finally:
            daemon.shutdown()
    engine.dispose()
