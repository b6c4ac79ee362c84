"""Dispatcher cycles as fast unit tests: a scripted client, a SQLite file, an injected clock.

Each test scripts what Recrypt answers (``tests.scripted``), runs ``run_once`` and reads the
row, the history, the gate and the requests sent. No thread, no network, no sleep: every
test takes milliseconds. The same decisions against a real gRPC server are tested in
``tests/integration/test_dispatch.py`` (the simulator); these complement them.
"""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import grpc
import pytest
import sqlalchemy as sa
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from sqlalchemy.engine import Engine

import outbox
from outbox import tracing
from outbox.backoff import Backoff
from outbox.database import make_engine
from outbox.descriptors import Catalog
from outbox.dispatcher import MAINTENANCE_CHECK, Dispatcher, DispatchSettings
from outbox.gates import OPEN, Gates
from outbox.store import Store
from outbox.vocabulary import HistoryDecision
from tests.scripted import ScriptedClient, never_started, ok, raising, status

C = grpc.StatusCode
TRANSFER = "/recrypt.wallet.v1.Wallet/Transfer"
START = datetime(2026, 11, 23, 9, 0, tzinfo=UTC)  # a Monday
MAX_UNKNOWN = 3


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


CATALOG = Catalog.load()


@pytest.fixture
def catalog() -> Catalog:
    return CATALOG


@pytest.fixture
def engine(sqlite_url: str) -> Iterator[Engine]:
    made = make_engine(sqlite_url)
    yield made
    made.dispose()


@pytest.fixture
def store(engine: Engine) -> Store:
    return Store(engine)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def client() -> ScriptedClient:
    return ScriptedClient()


@pytest.fixture
def dispatcher(store: Store, client: ScriptedClient, catalog: Catalog, clock: Clock) -> Dispatcher:
    """Jitter-free backoff (1 s, doubling), seeded randomness, the test's clock."""
    backoff = Backoff(initial=1.0, maximum=180.0, multiplier=2.0, jitter=0.0)
    settings = DispatchSettings(
        batch_size=10, lease=30.0, backoff=backoff, max_unknown_attempts=MAX_UNKNOWN
    )
    gates = Gates(backoff, settings.batch_size, rng=random.Random(0))
    return Dispatcher(
        store,
        client,
        catalog,
        gates,
        worker_id="w1",
        settings=settings,
        clock=clock,
        rng=random.Random(0),
    )


def enqueue(engine: Engine, amount: str = "10.00", lane: str | None = None) -> str:
    body = {"fromAccount": "acc-1", "toAccount": "acc-2", "amount": amount, "currency": "AUD"}
    with engine.begin() as conn:
        return outbox.enqueue(conn, TRANSFER, body, lane=lane, catalog=CATALOG)


def codes(store: Store, key: str) -> list[str | None]:
    return [line.code for line in store.history(key) if line.kind == "call"]


# --------------------------------------------------------------------------- answers


def test_ok_commits_with_the_response(engine, store, client, dispatcher) -> None:
    key = enqueue(engine)
    client.on_key(key, ok(transfer_id="t-1", executed_at="2026-11-23T09:00:00Z"))
    report = dispatcher.run_once()
    row = store.get(key)
    assert (report.claimed, row.state, row.attempts, row.lease_owner) == (1, "committed", 1, None)
    assert json.loads(row.response)["transferId"] == "t-1"
    assert client.keys_sent() == [key]
    assert client.sent[0].request.amount == "10.00"
    assert codes(store, key) == ["OK"]


def test_already_exists_after_a_maybe_executed_attempt_commits(
    engine, store, client, dispatcher, clock
) -> None:
    key = enqueue(engine)
    client.on_key(key, status(C.DEADLINE_EXCEEDED), status(C.ALREADY_EXISTS, "key used"))
    dispatcher.run_once()
    assert store.get(key).maybe_executed
    clock.advance(1)
    dispatcher.run_once()
    row = store.get(key)
    assert (row.state, row.last_code) == ("committed", "ALREADY_EXISTS")
    assert codes(store, key) == ["DEADLINE_EXCEEDED", "ALREADY_EXISTS"]
    assert client.keys_sent() == [key, key]


def test_already_exists_on_a_first_attempt_commits_as_key_used_before(
    engine, store, client, dispatcher
) -> None:
    key = enqueue(engine)
    client.on_key(key, status(C.ALREADY_EXISTS, "key used"))
    dispatcher.run_once()
    assert store.get(key).state == "committed"
    assert store.history(key)[-1].decision == HistoryDecision.KEY_USED_BEFORE


def test_unavailable_vgw_db_retries_and_closes_the_rollover_gate(
    engine, store, client, dispatcher, clock
) -> None:
    keys = [enqueue(engine) for _ in range(3)]
    client.then(status(C.UNAVAILABLE, "vgw-db"), status(C.UNAVAILABLE, "vgw-db"))
    client.then(status(C.UNAVAILABLE, "vgw-db"))
    dispatcher.run_once()
    row = store.get(keys[0])
    assert (row.state, row.maybe_executed, row.attempts) == ("pending", True, 1)
    assert row.next_attempt_at == clock.now + timedelta(seconds=1)
    assert dispatcher.gates.view(clock.now).gate == "rollover"
    assert dispatcher.run_once().claimed == 0  # closed until its backoff is over
    clock.advance(180)
    assert dispatcher.run_once().claimed == 1  # then exactly one probe
    assert len(client.sent) == 4
    assert dispatcher.gates.view(clock.now).gate == OPEN  # the probe answered OK


def test_permission_denied_closes_the_maintenance_gate_until_the_probe(
    engine, store, client, dispatcher, clock
) -> None:
    key = enqueue(engine)
    client.on_key(key, status(C.PERMISSION_DENIED, "maintenance mode"))
    client.on_method(MAINTENANCE_CHECK, status(C.PERMISSION_DENIED, "maintenance mode"), ok())
    dispatcher.run_once()
    row = store.get(key)
    assert (row.state, row.attempts, row.maybe_executed) == ("pending", 0, False)
    assert dispatcher.gates.view(clock.now).gate == "maintenance"
    clock.advance(600)
    assert dispatcher.probe() is False  # MaintenanceCheck is refused too: maintenance
    assert dispatcher.run_once().claimed == 0  # nothing is sent while maintenance lasts
    clock.advance(600)
    assert dispatcher.probe() is True
    dispatcher.run_once()
    assert store.get(key).state == "committed"
    assert [s.method for s in client.sent] == [
        TRANSFER,
        MAINTENANCE_CHECK,
        MAINTENANCE_CHECK,
        TRANSFER,
    ]


def test_permission_denied_outside_maintenance_refuses_only_that_method(
    engine, store, client, dispatcher, clock
) -> None:
    key = enqueue(engine)
    client.on_key(key, status(C.PERMISSION_DENIED, "not allowed"))
    client.on_method(MAINTENANCE_CHECK, ok(maintenance_mode=False))
    dispatcher.run_once()
    clock.advance(600)
    assert dispatcher.probe() is True  # Recrypt is up: the key may not call Transfer
    view = dispatcher.gates.view(clock.now)
    assert (view.gate, view.refused_methods) == (OPEN, (TRANSFER,))
    assert dispatcher.run_once().claimed == 0
    assert store.get(key).state == "pending"


def test_failed_precondition_parks_the_row(engine, store, client, dispatcher) -> None:
    key = enqueue(engine)
    client.on_key(key, status(C.FAILED_PRECONDITION, "compliance question pending"))
    dispatcher.run_once()
    row = store.get(key)
    assert (row.state, row.park_reason, row.maybe_executed) == ("parked", "precondition", False)
    assert "compliance question pending" in (row.last_message or "")


def test_unknown_outcomes_retry_then_park_after_the_limit(
    engine, store, client, dispatcher, clock
) -> None:
    key = enqueue(engine)
    client.default = status(C.DEADLINE_EXCEEDED, "deadline")
    for attempt in range(1, MAX_UNKNOWN):
        dispatcher.run_once()
        row = store.get(key)
        assert (row.state, row.maybe_executed, row.attempts) == ("pending", True, attempt)
        clock.advance(60)
    dispatcher.run_once()
    row = store.get(key)
    assert (row.state, row.park_reason, row.maybe_executed) == ("parked", "unknown_outcome", True)
    assert len(client.sent) == MAX_UNKNOWN


# --------------------------------------------------------------------------- the client itself


def test_a_call_never_started_hands_the_row_back_untouched(
    engine, store, client, dispatcher
) -> None:
    key = enqueue(engine)
    client.on_key(key, never_started())
    dispatcher.run_once()
    row = store.get(key)
    assert (row.state, row.attempts, row.maybe_executed) == ("pending", 0, False)


def test_a_client_exception_leaves_the_row_in_flight_for_the_reaper(
    engine, store, client, dispatcher
) -> None:
    key = enqueue(engine)
    client.on_key(key, raising(RuntimeError("client broke")))
    with pytest.raises(RuntimeError, match="client broke"):
        dispatcher.run_once()
    assert store.get(key).state == "inflight"  # the call may have started
    assert dispatcher.inflight_ids() == []


@pytest.fixture
def spans(dispatcher: Dispatcher) -> Iterator[InMemorySpanExporter]:
    """The dispatcher traced into an in-memory exporter (its own provider, not the global)."""
    provider = TracerProvider(shutdown_on_exit=False)
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    dispatcher.tracing = tracing.with_provider(provider)
    yield exporter
    provider.shutdown()


def test_a_client_exception_ends_the_attempt_spans_as_abandoned(
    engine, client, dispatcher, spans
) -> None:
    key = enqueue(engine)
    client.on_key(key, raising(RuntimeError("client broke")))
    with pytest.raises(RuntimeError, match="client broke"):
        dispatcher.run_once()
    (span,) = spans.get_finished_spans()  # ended: no span is left open
    assert [e.name for e in span.events] == ["claimed", "abandoned"]


def test_a_bad_row_has_a_span_that_says_why_without_a_call(
    engine, store, client, dispatcher, spans
) -> None:
    bad = str(uuid.uuid4())
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO outbox_messages (idempotency_key, method, payload) VALUES (:k, :m, :p)"
            ),
            {"k": bad, "m": TRANSFER, "p": '{"amount": "1", "colour": "red"}'},
        )
    good = enqueue(engine)
    dispatcher.run_once()
    by_key = {s.attributes["messaging.message.id"]: s for s in spans.get_finished_spans()}
    parked, sent = by_key[bad], by_key[good]
    assert parked.name == sent.name == TRANSFER[1:]
    assert (parked.status.status_code, parked.status.description) == (StatusCode.ERROR, "bad_row")
    assert "rpc.grpc.status_code" not in parked.attributes
    assert [e.name for e in parked.events] == ["claimed", "parked", "recorded"]
    context = sent.context
    traceparent = f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"
    assert [s.metadata for s in client.sent] == [(("traceparent", traceparent),)]


# --------------------------------------------------------------------------- rows and lanes


def test_a_bad_row_is_parked_while_the_next_row_is_sent(engine, store, client, dispatcher) -> None:
    bad = str(uuid.uuid4())
    with engine.begin() as conn:  # a plain-SQL writer's row with a field Transfer lacks
        conn.execute(
            sa.text(
                "INSERT INTO outbox_messages (idempotency_key, method, payload) VALUES (:k, :m, :p)"
            ),
            {"k": bad, "m": TRANSFER, "p": '{"amount": "1", "colour": "red"}'},
        )
    good = enqueue(engine)
    report = dispatcher.run_once()
    assert report.claimed == 2
    row = store.get(bad)
    assert (row.state, row.park_reason, row.attempts) == ("parked", "bad_row", 0)
    assert "does not parse" in (row.last_message or "")
    assert store.get(good).state == "committed"
    assert client.keys_sent() == [good]


def test_a_lanes_rows_are_sent_one_at_a_time_in_order(engine, store, client, dispatcher) -> None:
    keys = [enqueue(engine, amount=f"{i}.00", lane="acme") for i in range(1, 4)]
    other = enqueue(engine, lane="other")
    assert dispatcher.run_once().claimed == 2  # one row per lane in flight
    dispatcher.run_once()
    dispatcher.run_once()
    assert client.keys_sent() == [keys[0], other, keys[1], keys[2]]
    assert all(store.get(k).state == "committed" for k in [*keys, other])


def test_a_lane_waits_behind_its_retried_row(engine, store, client, dispatcher, clock) -> None:
    first, second = enqueue(engine, lane="acme"), enqueue(engine, lane="acme")
    client.on_key(first, status(C.INTERNAL, "oops"))
    dispatcher.run_once()
    assert dispatcher.run_once().claimed == 0  # the second waits behind the first
    clock.advance(5)
    dispatcher.run_once()
    dispatcher.run_once()
    assert client.keys_sent() == [first, first, second]
    assert [store.get(k).state for k in (first, second)] == ["committed", "committed"]
