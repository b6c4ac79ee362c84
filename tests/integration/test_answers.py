"""Answers decided from what Recrypt really said (issue 10): no silent loops, no guesses."""

from __future__ import annotations

import grpc
import pytest
import sqlalchemy as sa

import outbox
from outbox.simulator import TRANSFER, Fault

C = grpc.StatusCode


def enqueue(engine: sa.Engine, n: int = 1) -> list[str]:
    with engine.begin() as conn:
        return [
            outbox.enqueue(
                conn,
                TRANSFER,
                {"fromAccount": "a", "toAccount": "b", "amount": f"{i + 1}.00", "currency": "AUD"},
            )
            for i in range(n)
        ]


def test_a_deadline_exceeded_vgw_db_storm_ends_parked_for_a_human(
    engine, store, sim, make_dispatcher, clock
) -> None:
    (key,) = enqueue(engine)
    sim.inject(Fault(C.DEADLINE_EXCEEDED, "vgw-db"))
    dispatcher = make_dispatcher(max_unknown_attempts=5)
    for _ in range(10):  # more rounds than the bound: it must stop by itself
        dispatcher.run_once()
        clock.advance(600)
    view = store.get(key)
    assert (view.state, view.park_reason, view.maybe_executed) == (
        "parked",
        "unknown_outcome",
        True,
    )
    assert sim.call_count(TRANSFER) == 5


@pytest.mark.parametrize("text", ["429 Too Many Requests", "rate limit exceeded, retry in 1s"])
def test_rate_limit_text_with_digits_throttles_and_parks_nothing(
    engine, store, sim, make_dispatcher, text
) -> None:
    keys = enqueue(engine, 3)
    sim.inject(Fault(C.RESOURCE_EXHAUSTED, text, times=3))
    make_dispatcher().run_once()
    views = [store.get(k) for k in keys]
    assert {(v.state, v.attempts, v.park_reason) for v in views} == {("pending", 0, None)}


def test_a_server_saying_failed_to_connect_after_executing_is_an_unknown_outcome(
    engine, store, sim, make_dispatcher
) -> None:
    """gRPC's own "never connected" words, sent by a server (or proxy) that executed the call:
    the row may have executed, so it must never be handed back as never sent."""
    (key,) = enqueue(engine)
    text = (
        "failed to connect to all addresses; last error: UNKNOWN: ipv4:10.0.0.1:443: "
        "Failed to connect to remote host: Connection refused"
    )
    sim.inject(Fault(C.UNAVAILABLE, text, execute=True, times=1))
    make_dispatcher().run_once()
    view = store.get(key)
    assert key in sim.executed_keys()
    assert (view.state, view.attempts, view.maybe_executed) == ("pending", 1, True)


def test_no_connection_sends_nothing_and_says_why(engine, store, catalog, clock) -> None:
    """A target nobody listens on: the batch is never started; the row waits untouched."""
    from outbox.client import GrpcClient
    from outbox.config import RecryptConfig
    from tests.integration.conftest import build_dispatcher

    (key,) = enqueue(engine)
    client = GrpcClient(RecryptConfig(target="127.0.0.1:9", tls=False, deadline=1.0), "k")
    dispatcher = build_dispatcher(store, catalog, clock, client)
    try:
        dispatcher.run_once()
    finally:
        client.close()
    view = store.get(key)
    assert (view.state, view.attempts, view.maybe_executed) == ("pending", 0, False)
    assert view.last_code == "UNAVAILABLE" and "nothing was sent" in (view.last_message or "")
    assert dispatcher.gates.view(clock()).gate == "unreachable"


@pytest.mark.parametrize(("amount", "plain"), [("0.00000050", "0.00000050"), ("5E+3", "5000")])
def test_a_decimal_amount_is_written_plain_and_commits(
    engine, store, sim, make_dispatcher, amount, plain
) -> None:
    import json
    from decimal import Decimal

    payload = {"fromAccount": "a", "toAccount": "b", "amount": Decimal(amount), "currency": "AUD"}
    with engine.begin() as conn:
        key = outbox.enqueue(conn, TRANSFER, payload)
    assert json.loads(store.get(key).payload)["amount"] == plain
    make_dispatcher().run_once()
    assert store.get(key).state == "committed"


def test_a_method_the_key_may_not_call_is_held_not_looped(
    engine, store, sim, make_dispatcher, clock
) -> None:
    """PERMISSION_DENIED for one method while MaintenanceCheck says there is no maintenance
    (a read-only key used for PlaceOrder): that method is held; the others go on."""
    from outbox.simulator import PLACE_ORDER

    transfers = enqueue(engine, 3)
    order = {
        "account": "A",
        "market": "BTC-AUD",
        "type": "ORDER_TYPE_LIMIT",
        "quantity": "1",
        "limit_price": "10.00",
    }
    with engine.begin() as conn:
        orders = [outbox.enqueue(conn, PLACE_ORDER, order) for _ in range(3)]
    sim.inject(Fault(C.PERMISSION_DENIED, "permission denied", methods=frozenset({PLACE_ORDER})))
    dispatcher = make_dispatcher()
    for _ in range(20):  # six minutes of cycles and probes
        dispatcher.run_once()
        dispatcher.probe()
        clock.advance(18)
    assert {store.get(k).state for k in transfers} == {"committed"}
    # the first batch, then one re-probe after [maintenance] unauthenticated_probe_interval
    # (300 s): held, not looped (before: a full batch refused after every probe)
    assert sim.call_count(PLACE_ORDER) == 6
    assert {(store.get(k).state, store.get(k).attempts) for k in orders} == {("pending", 0)}
    view = dispatcher.gates.view(clock())
    assert (view.gate, view.refused_methods) == ("open", (PLACE_ORDER,))

    dispatcher.gates.reset(clock())  # SIGHUP: try again at once
    sim.clear_faults()
    dispatcher.run_once()
    assert {store.get(k).state for k in orders} == {"committed"}


def test_a_key_grpc_would_refuse_locally_is_a_configuration_error_not_unknown_outcomes() -> None:
    """Before: INTERNAL "Invalid metadata" on every call, and every row parked
    ``unknown_outcome`` with ``maybe_executed`` though nothing left the host."""
    from outbox.client import GrpcClient
    from outbox.config import RecryptConfig
    from outbox.errors import ConfigError

    with pytest.raises(ConfigError, match="printable ASCII"):
        GrpcClient(RecryptConfig(target="127.0.0.1:9", tls=False), "ké€y")


def test_already_exists_at_the_first_attempt_is_recorded_apart(
    engine, store, sim, make_dispatcher
) -> None:
    """Someone used the key before this row was ever sent: committed, but said so."""
    first, second = enqueue(engine, 2)
    sim.inject(Fault(C.ALREADY_EXISTS, "idempotency_key already used", keys=frozenset({first})))
    sim.inject(Fault(C.UNAVAILABLE, "vgw-db", execute=True, keys=frozenset({second}), times=1))
    dispatcher = make_dispatcher()
    told: list[str] = []
    dispatcher.observe(lambda _c, _a, o: told.append(o.line.decision))
    dispatcher.run_once()  # first: ALREADY_EXISTS at once; second: executed, unknown answer
    sim.clear_faults()
    dispatcher.clock.advance(600)  # type: ignore[attr-defined]
    dispatcher.run_once()  # second: ALREADY_EXISTS after its own unknown attempt
    assert [h.decision for h in store.history(first)] == ["commit_key_used_before"]
    assert [h.decision for h in store.history(second)] == ["retry", "commit"]
    assert sorted(told) == ["commit", "commit_key_used_before", "retry"]
