"""The dispatcher against the simulator on real databases: claim → send → record."""

from __future__ import annotations

import uuid

import grpc
import pytest
import sqlalchemy as sa

import outbox
from outbox.errors import BadRowError, DuplicateKeyError
from outbox.schema import messages
from outbox.simulator import TRANSFER, Fault

C = grpc.StatusCode


def transfer(amount: str = "10.00", **extra: str) -> dict[str, str]:
    return {
        "fromAccount": "acc-1",
        "toAccount": "acc-2",
        "amount": amount,
        "currency": "AUD",
    } | extra


def enqueue_transfer(engine, amount: str = "10.00", **kwargs) -> str:
    with engine.begin() as conn:
        return outbox.enqueue(conn, TRANSFER, transfer(amount), **kwargs)


# (fault, final state, park_reason, maybe_executed, attempts counted)
GUIDE_ROWS = {
    "ok": (None, "committed", None, False, 1),
    "already_exists": ("execute-before", "committed", None, False, 1),
    "unauthenticated": (Fault(C.UNAUTHENTICATED, "Session key"), "pending", None, False, 0),
    "unavailable_vgw_db": (Fault(C.UNAVAILABLE, "vgw-db"), "pending", None, True, 1),
    "permission_denied": (Fault(C.PERMISSION_DENIED, "maintenance"), "pending", None, False, 0),
    "deadline_vgw_db": (Fault(C.DEADLINE_EXCEEDED, "vgw-db"), "pending", None, True, 1),
    "not_found": (Fault(C.NOT_FOUND, "removed"), "parked", "method_removed", False, 1),
    "unimplemented": (Fault(C.UNIMPLEMENTED, ""), "parked", "rejected", False, 1),
    "failed_precondition": (
        Fault(C.FAILED_PRECONDITION, "compliance question"),
        "parked",
        "precondition",
        False,
        1,
    ),
    "object_limit": (Fault(C.RESOURCE_EXHAUSTED, "100"), "parked", "object_limit", False, 1),
    "rate_limited": (Fault(C.RESOURCE_EXHAUSTED, "slow down"), "pending", None, False, 0),
    "invalid_argument": (Fault(C.INVALID_ARGUMENT, "bad"), "parked", "rejected", False, 1),
    "internal": (Fault(C.INTERNAL, "oops"), "pending", None, True, 1),
}


@pytest.mark.parametrize("row", list(GUIDE_ROWS))
def test_each_guide_row_ends_in_its_decision(row, engine, sim, store, make_dispatcher) -> None:
    fault, state, reason, maybe, counted = GUIDE_ROWS[row]
    key = enqueue_transfer(engine)
    if fault == "execute-before":
        sim.inject(Fault(C.UNAVAILABLE, "vgw-db", execute=True, times=1))
        make_dispatcher().run_once()
        sim.clear_faults()
        with engine.begin() as conn:  # make the row due again at once
            conn.execute(
                sa.update(messages).values(next_attempt_at=None, attempts=0, maybe_executed=False)
            )
    elif fault is not None:
        sim.inject(fault)
    report = make_dispatcher().run_once()
    assert report.claimed == 1
    view = store.get(key)
    assert (view.state, view.park_reason, view.maybe_executed or False) == (state, reason, maybe)
    assert view.attempts == counted
    assert view.last_message  # the reason is written for the operator
    assert view.lease_owner is None
    history = store.history(key)
    assert history[-1].kind == "call"
    if state == "committed":
        assert sim.executions(key) == 1


def test_executed_then_unavailable_is_committed_once(engine, sim, store, make_dispatcher, clock):
    key = enqueue_transfer(engine)
    sim.inject(Fault(C.UNAVAILABLE, "vgw-db", execute=True, times=1))
    dispatcher = make_dispatcher()
    dispatcher.run_once()
    row = store.get(key)
    assert row.state == "pending"
    assert row.maybe_executed
    assert sim.executions(key) == 1
    clock.advance(200)  # past backoff and the dispatcher's rollover gate
    dispatcher.run_once()  # the gate's probe: ALREADY_EXISTS
    row = store.get(key)
    assert row.state == "committed"
    assert row.last_code == "ALREADY_EXISTS"
    assert sim.executions(key) == 1
    assert [h.code for h in store.history(key)] == ["UNAVAILABLE", "ALREADY_EXISTS"]


def test_deadline_vgw_db_executed_then_resent(engine, sim, store, make_dispatcher, clock):
    key = enqueue_transfer(engine)
    sim.inject(Fault(C.DEADLINE_EXCEEDED, "vgw-db", execute=True, times=1))
    dispatcher = make_dispatcher()
    dispatcher.run_once()
    clock.advance(5)
    dispatcher.run_once()
    assert store.get(key).state == "committed"
    assert sim.executions(key) == 1


def test_foreign_writer_plain_sql_rows_are_sent(engine, sim, store, make_dispatcher) -> None:
    key = str(uuid.uuid4())
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO outbox_messages (idempotency_key, method, payload) VALUES (:k, :m, :p)"
            ),
            {"k": key, "m": TRANSFER, "p": '{"fromAccount": "a", "toAccount": "b", "amount": "5"}'},
        )
    make_dispatcher().run_once()
    assert store.get(key).state == "committed"
    assert sim.ledger[0].request["amount"] == "5"
    assert sim.ledger[0].request["idempotency_key"] == key


BAD_ROWS = {
    "unknown_method": ("/recrypt.wallet.v1.Wallet/Teleport", '{"amount": "1"}', "unknown method"),
    "not_json": (TRANSFER, "{not json", "not valid JSON"),
    "wrong_type": (TRANSFER, '{"amount": 10.5}', "does not parse"),
    "unknown_field": (TRANSFER, '{"amount": "1", "colour": "red"}', "does not parse"),
    "array": (TRANSFER, "[1, 2]", "JSON object"),
    "key_mismatch": (TRANSFER, '{"idempotencyKey": "other"}', "differs"),
    "stream_method": ("/recrypt.market.v1.Market/StreamOrderUpdates", "{}", "cannot be sent"),
}


@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_bad_rows_are_parked_and_do_not_block_others(
    case, engine, backend, sim, store, make_dispatcher
) -> None:
    method, payload, says = BAD_ROWS[case]
    bad = str(uuid.uuid4())
    insert = sa.text(
        "INSERT INTO outbox_messages (idempotency_key, method, payload) VALUES (:k, :m, :p)"
    )
    if payload.startswith("{not"):
        # PostgreSQL (jsonb), MariaDB (JSON check) and SQLite (0005's trigger) refuse it at
        # the writer: nothing to park.
        with pytest.raises(sa.exc.DBAPIError), engine.begin() as conn:
            conn.execute(insert, {"k": bad, "m": method, "p": payload})
        return
    with engine.begin() as conn:
        conn.execute(insert, {"k": bad, "m": method, "p": payload})
    good = enqueue_transfer(engine)
    make_dispatcher().run_once()
    row = store.get(bad)
    assert row.state == "parked"
    assert row.park_reason == "bad_row"
    assert says in (row.last_message or "")
    assert row.attempts == 0  # never sent
    assert store.get(good).state == "committed"
    assert sim.executed_keys() == {good}


@pytest.mark.parametrize(
    "key",
    ["6F1C2B44-0C47-4C55-9B65-2F0C7C3A9D10", "{6f1c2b44-0c47-4c55-9b65-2f0c7c3a9d10}", "k-1"],
)
def test_malformed_keys_are_parked_never_rewritten(key, engine, sim, store, make_dispatcher):
    with engine.begin() as conn:
        conn.execute(
            sa.insert(messages).values(idempotency_key=key, method=TRANSFER, payload=transfer())
        )
    make_dispatcher().run_once()
    row = store.get(key)
    assert row.state == "parked"
    assert "lowercase UUID" in (row.last_message or "")
    assert len(sim.calls) == 0


def test_payload_changed_after_first_send_is_parked(engine, sim, store, make_dispatcher, clock):
    key = enqueue_transfer(engine)
    sim.inject(Fault(C.UNAVAILABLE, "vgw-db", times=1))
    dispatcher = make_dispatcher()
    dispatcher.run_once()
    with engine.begin() as conn:
        conn.execute(sa.update(messages).values(payload=transfer("99.00")))
    clock.advance(200)
    dispatcher.run_once()
    row = store.get(key)
    assert row.state == "parked"
    assert row.park_reason == "payload_changed"
    assert sim.executed_keys() == set()
    assert len(sim.calls) == 1  # never re-sent with the new payload


def test_unknown_outcomes_park_after_the_limit(engine, sim, store, make_dispatcher, clock):
    key = enqueue_transfer(engine)
    sim.inject(Fault(C.UNKNOWN, "?"))
    dispatcher = make_dispatcher(max_unknown_attempts=3)
    for _ in range(3):
        dispatcher.run_once()
        clock.advance(600)
    row = store.get(key)
    assert row.state == "parked"
    assert row.park_reason == "unknown_outcome"
    assert row.maybe_executed
    assert row.attempts == 3
    assert "check on recrypt.net" in (row.last_message or "")


def test_stale_worker_cannot_overwrite_newer_outcome(engine, sim, store, clock) -> None:
    from outbox.store import Committed, HistoryLine, Retry

    key = enqueue_transfer(engine)
    [claim_a] = store.claim_due("worker-a", 10, lease=30, now=clock())
    clock.advance(31)
    assert store.release_expired_leases(clock()) == [key]
    row = store.get(key)
    assert (row.state, row.maybe_executed, row.attempts) == ("pending", True, 1)
    [claim_b] = store.claim_due("worker-b", 10, lease=30, now=clock())
    assert store.record([Committed(claim_b, HistoryLine("call", "commit", "OK"))], clock()) == []
    stale = Retry(
        claim_a, HistoryLine("call", "retry", "UNAVAILABLE"), clock(), maybe_executed=True
    )
    assert store.record([stale], clock()) == [stale]  # a lost row, reported
    assert store.get(key).state == "committed"


def test_claims_skip_rows_held_by_another_worker(engine, store, clock) -> None:
    keys = [enqueue_transfer(engine) for _ in range(4)]
    first = store.claim_due("a", 2, lease=30, now=clock())
    second = store.claim_due("b", 10, lease=30, now=clock())
    assert [c.idempotency_key for c in first] == keys[:2]
    assert [c.idempotency_key for c in second] == keys[2:]


def test_enqueue_rollback_leaves_no_row(engine, store) -> None:
    with engine.connect() as conn:
        trans = conn.begin()
        key = outbox.enqueue(conn, TRANSFER, transfer())
        trans.rollback()
    assert store.list_rows().rows == []
    with pytest.raises(Exception, match="no outbox row"):
        store.get(key)


def test_enqueue_on_an_orm_session(engine, store) -> None:
    from sqlalchemy.orm import Session

    with Session(engine) as session, session.begin():
        key = outbox.enqueue(session, TRANSFER, transfer(), reference="order-7", lane="acct-1")
    row = store.get(key)
    assert (row.state, row.reference, row.lane) == ("pending", "order-7", "acct-1")


def test_enqueue_validates_and_refuses_duplicates(engine) -> None:
    from decimal import Decimal

    with engine.begin() as conn, pytest.raises(BadRowError, match="unknown method"):
        outbox.enqueue(conn, "/recrypt.wallet.v1.Wallet/Teleport", {})
    with engine.begin() as conn, pytest.raises(BadRowError, match="amount"):
        outbox.enqueue(conn, TRANSFER, {"amount": 10.5})  # a float is never money
    with engine.begin() as conn:
        key = outbox.enqueue(conn, TRANSFER, {"amount": Decimal("10.50")})
    with engine.begin() as conn, pytest.raises(DuplicateKeyError, match="already in the outbox"):
        outbox.enqueue(conn, TRANSFER, transfer(), key=key)
    with engine.connect() as conn:
        stored = conn.execute(sa.select(sa.cast(messages.c.payload, sa.Text))).scalar_one()
    assert '"10.50"' in stored


def test_maintenance_pauses_and_probe_resumes(engine, sim, store, make_dispatcher, clock):
    keys = [enqueue_transfer(engine) for _ in range(5)]
    sim.set_maintenance(True)
    dispatcher = make_dispatcher(batch_size=2)
    dispatcher.run_once()
    assert dispatcher.gates.view(clock()).gate == "maintenance"
    clock.advance(3600)
    assert dispatcher.run_once().claimed == 0  # paused, however long
    assert dispatcher.probe() is False  # maintenance still on
    sim.set_maintenance(False)
    clock.advance(3600)
    assert dispatcher.probe() is True
    dispatcher.drain()
    rows = [store.get(k) for k in keys]
    assert {r.state for r in rows} == {"committed"}
    assert {r.attempts for r in rows} == {1}  # the refused calls were not counted


def test_wrong_key_halts_without_touching_rows(engine, sim, store, make_dispatcher, clock):
    keys = [enqueue_transfer(engine) for _ in range(3)]
    dispatcher = make_dispatcher(api_key="wrong-key")
    dispatcher.run_once()
    assert dispatcher.gates.view(clock()).gate == "unauthenticated"
    assert dispatcher.run_once().claimed == 0
    assert {store.get(k).state for k in keys} == {"pending"}
    assert {store.get(k).attempts for k in keys} == {0}
    assert sim.executed_keys() == set()


def test_rollover_retries_do_not_count_toward_the_unknown_limit(
    engine, sim, store, make_dispatcher, clock
):
    key = enqueue_transfer(engine)
    dispatcher = make_dispatcher(max_unknown_attempts=3)
    sim.inject(Fault(C.UNAVAILABLE, "vgw-db", times=6))
    sim.inject(Fault(C.UNKNOWN, "?", times=2))  # after the rollover: two unknown outcomes
    for _ in range(8):
        dispatcher.run_once()
        clock.advance(600)
    row = store.get(key)
    assert (row.state, row.attempts) == ("pending", 8)  # 8 attempts, only 2 unknown
    dispatcher.run_once()
    assert store.get(key).state == "committed"
