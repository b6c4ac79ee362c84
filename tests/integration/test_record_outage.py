"""An answer, once received, is recorded — whatever the database does (issue 9 §1).

Each test holds a call at the simulator, takes the database away with a real outage
(PostgreSQL: ``ALLOW_CONNECTIONS false`` plus ``pg_terminate_backend``; MariaDB: the daemon's
account locked plus ``KILL``), lets Recrypt answer, and checks what became of the answer.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import grpc
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

import outbox
from outbox.dispatcher import Dispatcher
from outbox.simulator import PLACE_ORDER, Fault, Simulator
from tests.conftest import _admin_engine
from tests.integration.test_daemon import KEY, daemon_for

C = grpc.StatusCode


@pytest.fixture
def db_url(postgres_url: str) -> str:
    """These tests need a real server outage: PostgreSQL (the ``store`` fixture uses it)."""
    return postgres_url


def order() -> dict[str, str]:
    return {
        "account": "A",
        "market": "BTC-AUD",
        "type": "ORDER_TYPE_LIMIT",
        "quantity": "1.5",
        "limit_price": "100.00",
    }


def enqueue_order(url: str) -> str:
    engine = sa.create_engine(make_url(url).set(drivername="postgresql+psycopg"))
    try:
        with engine.begin() as conn:
            return outbox.enqueue(conn, PLACE_ORDER, order())
    finally:
        engine.dispose()


@contextmanager
def postgres_outage(url: str) -> Iterator[None]:
    """Refuse new connections to the test database and end the open ones, until the block ends."""
    name = make_url(url).database
    admin = _admin_engine("postgresql")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        conn.exec_driver_sql(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()",
            (name,),
        )
    try:
        yield
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')


def hold_next_call(sim: Simulator) -> tuple[Fault, threading.Event]:
    release = threading.Event()
    held = Fault(C.OK, methods=frozenset({PLACE_ORDER}), hang=release, times=1)  # not a probe
    return sim.inject(held), release


@contextmanager
def down_after_answers(dispatcher: Dispatcher, sim: Simulator, url: str) -> Iterator[None]:
    """One dispatch cycle whose calls Recrypt answers while PostgreSQL refuses the record;
    the database stays away until the block ends."""
    fault, release = hold_next_call(sim)
    cycle = threading.Thread(target=dispatcher.run_once)
    cycle.start()
    assert sim.wait_for(lambda _s: fault.hits == 1)
    with postgres_outage(url):
        release.set()
        cycle.join(30)
        assert not cycle.is_alive()
        yield


def answered_during_outage(dispatcher: Dispatcher, sim: Simulator, url: str) -> None:
    with down_after_answers(dispatcher, sim, url):
        pass


def order_id(sim: Simulator, key: str) -> str:
    """The order id Recrypt answered for ``key``'s one execution."""
    (entry,) = [e for e in sim.ledger if e.key == key]
    return str(entry.response["order_id"])


def stored_order_id(response: object) -> str | None:
    """The order id in a row's recorded response (JSON text), or None."""
    return json.loads(str(response)).get("orderId") if response is not None else None


def test_an_answer_that_could_not_be_recorded_is_recorded_when_the_database_returns(
    postgres_url, sim, store, make_dispatcher
) -> None:
    key = enqueue_order(postgres_url)
    dispatcher = make_dispatcher()
    answered_during_outage(dispatcher, sim, postgres_url)
    assert dispatcher.unrecorded() == 1  # kept in memory, not thrown away
    assert store.get(key).state == "inflight"

    dispatcher.run_once()  # the database is back: the answer lands first

    view = store.get(key)
    assert (view.state, view.attempts, view.maybe_executed) == ("committed", 1, False)
    assert stored_order_id(view.response) == order_id(sim, key)  # PlaceOrder's order_id kept
    assert dispatcher.unrecorded() == 0
    assert sim.executions(key) == 1


def test_no_claim_while_the_backlog_of_unrecorded_answers_is_full(
    postgres_url, sim, store, make_dispatcher
) -> None:
    keys = [enqueue_order(postgres_url) for _ in range(3)]
    dispatcher = make_dispatcher(batch_size=3)
    with down_after_answers(dispatcher, sim, postgres_url):
        assert dispatcher.unrecorded() == 3
        report = dispatcher.run_once()  # still down: nothing recorded, nothing claimed
        assert (report.claimed, dispatcher.unrecorded()) == (0, 3)
    dispatcher.run_once()
    assert {store.get(k).state for k in keys} == {"committed"}


def test_a_late_answer_for_a_lost_row_is_kept_as_evidence_and_commits_it(
    postgres_url, sim, store, make_dispatcher, clock
) -> None:
    """Our lease ran out while the database was away; the reaper released the row."""
    key = enqueue_order(postgres_url)
    first = make_dispatcher("w1", lease=30.0)
    answered_during_outage(first, sim, postgres_url)
    clock.advance(31)
    assert store.release_expired_leases(clock(), max_unknown_attempts=5) == [key]

    first.run_once()  # the late answer: the row is no longer ours

    view = store.get(key)
    assert view.state == "committed"  # an OK for this very request is proof it executed
    assert stored_order_id(view.response) == order_id(sim, key)
    late = [h for h in store.history(key) if h.decision == "late_answer"]
    assert len(late) == 1 and late[0].code == "OK"
    assert sim.executions(key) == 1


def test_a_row_whose_answer_was_lost_in_an_outage_is_never_handed_back_untouched(
    postgres_url,
) -> None:
    """SIGTERM within the lease after a failed record: the shutdown records the answer."""
    key = enqueue_order(postgres_url)
    with Simulator(api_keys=[KEY]) as sim:
        fault, release = hold_next_call(sim)
        daemon = daemon_for(postgres_url, sim.target)
        daemon.start()
        try:
            assert sim.wait_for(lambda _s: fault.hits == 1, timeout=10)
            with postgres_outage(postgres_url):
                release.set()
                assert sim.wait_for(lambda s: key in s.executed_keys(), timeout=10)
                assert daemon.wait_idle(30)  # the dispatch job gave up recording
        finally:
            daemon.shutdown()
        answered = order_id(sim, key)
    view = daemon_store_view(postgres_url, key)
    assert (view["state"], view["attempts"]) == ("committed", 1)
    assert stored_order_id(view["response"]) == answered


def daemon_store_view(url: str, key: str) -> dict[str, object]:
    from outbox.database import make_engine
    from outbox.store import Store

    engine = make_engine(url)
    try:
        view = Store(engine).get(key)
    finally:
        engine.dispose()
    return {"state": view.state, "attempts": view.attempts, "response": view.response}
