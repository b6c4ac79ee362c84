"""A hypothesis model of the row state machine (SPEC §4), run against the real store.

Several workers claim, record (also with stale claims whose lease was reaped), hand back and
renew; the clock moves; the reaper and the expirer run; operators requeue and cancel. A plain
Python model predicts every answer of the store (which rows a claim returns, which outcomes
are lost, what the reaper and expirer touch, which operator actions are refused) and the
whole table is compared with it after every step, next to the invariants that must hold
whatever the model says: no row lost, committed rows frozen, ``lease_owner`` set iff
inflight, ``maybe_executed`` sticky, parked rows leave only by an operator, one inflight row
per lane and lanes claimed in id order, a row waiting behind its lane only while an earlier
row of its lane is open.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy.engine import Engine

from outbox.errors import OperatorActionError, RowNotFoundError
from outbox.schema import DUE_NOW as SCHEMA_DUE_NOW
from outbox.schema import FINISHED_STATES, OPEN_STATES, State, attempts, messages
from outbox.simulator import TRANSFER
from outbox.store import (
    Claim,
    Committed,
    HandedBack,
    HistoryLine,
    NewRow,
    Outcome,
    Parked,
    Retry,
    Store,
    enqueue_row,
)

WORKERS = ("w1", "w2", "w3")
LANES = (None, None, "lane-a", "lane-b")
LEASE = 30.0
START = datetime(2026, 11, 23, 9, 0, tzinfo=UTC)
#: ``due_at`` of a row with no retry time (``outbox.schema.DUE_NOW``): claimed first.
DUE_NOW = datetime.fromisoformat(SCHEMA_DUE_NOW).replace(tzinfo=UTC)
FINISHED = {s.value for s in FINISHED_STATES}
OPEN = {s.value for s in OPEN_STATES}

# Examples per backend: the whole file stays well under its CI budget on all three databases.
EXAMPLES = {"sqlite": 60, "postgresql": 40, "mariadb": 25}
STEPS = 50
#: (kind, maybe_executed / hand-back with a call, counts_attempt / hand-back with a time, delay)
OUTCOMES = st.tuples(
    st.sampled_from(["commit", "retry", "retry", "park", "park", "hand_back"]),
    st.booleans(),
    st.booleans(),
    st.sampled_from([0, 5, 120]),
)


@dataclass(frozen=True)
class Expected:
    """What the model says one row looks like."""

    id: int
    key: str
    lane: str | None
    expires_at: datetime | None
    state: str = State.PENDING.value
    attempts: int = 0
    maybe_executed: bool = False
    next_attempt_at: datetime | None = None
    lease_owner: str | None = None
    lease_expires_at: datetime | None = None
    park_reason: str | None = None
    committed_at: datetime | None = None
    generation: int = 0  # bumped by every claim: tells the current claim from stale ones


@dataclass(frozen=True)
class Held:
    """A claim a worker got back from ``claim_due`` and has not recorded yet."""

    claim: Claim
    generation: int


def _read_all(engine: Engine) -> dict[int, dict[str, Any]]:
    with engine.connect() as conn:
        rows = conn.execute(sa.select(messages).order_by(messages.c.id)).mappings().all()
    return {row["id"]: dict(row) | {"maybe_executed": bool(row["maybe_executed"])} for row in rows}


def _history_count(engine: Engine, row_id: int) -> int:
    with engine.connect() as conn:
        return conn.execute(
            sa.select(sa.func.count()).where(attempts.c.message_id == row_id)
        ).scalar_one()


def make_machine(engine: Engine) -> type[RuleBasedStateMachine]:
    store = Store(engine)

    class RowStateMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.now = START
            self.model: dict[str, Expected] = {}
            self.held: list[Held] = []
            self.serial = 0
            self.previous: dict[int, dict[str, Any]] = {}
            self.operator_touched: set[int] = set()  # rows a requeue/cancel moved this step

        # ---- setup

        @initialize(lanes=st.lists(st.sampled_from(LANES), max_size=4))
        def empty_tables_then_enqueue(self, lanes: list[str | None]) -> None:
            with engine.begin() as conn:  # one database per test, emptied for each example
                conn.execute(attempts.delete())
                conn.execute(messages.delete())
            for lane in lanes:
                self.enqueue(lane, None)

        # ---- helpers

        def _by_id(self) -> dict[int, Expected]:
            return {row.id: row for row in self.model.values()}

        def _set(self, row: Expected, **changes: Any) -> None:
            self.model[row.key] = replace(row, **changes)

        def _due(self, batch: int) -> list[Expected]:
            """The rows ``claim_due`` must return: the model's reading of the due query, in
            ``due_at`` order (the retry time; rows never retried first), then id order."""
            rows = sorted(self.model.values(), key=lambda r: (r.next_attempt_at or DUE_NOW, r.id))
            due = []
            for row in rows:
                if row.state != State.PENDING:
                    continue
                if row.next_attempt_at is not None and row.next_attempt_at > self.now:
                    continue
                if row.expires_at is not None and row.expires_at <= self.now:
                    continue
                if row.lane is not None and any(
                    r.lane == row.lane and r.id < row.id and r.state in OPEN for r in rows
                ):
                    continue
                due.append(row)
            return due[:batch]

        def _is_current(self, held: Held) -> bool:
            row = self._by_id()[held.claim.id]
            return (
                row.state == State.INFLIGHT
                and row.lease_owner == held.claim.worker
                and row.generation == held.generation
            )

        def _recordable(self) -> list[Held]:
            """Claims whose record has a defined expected result (see the xfail test below).

            Left out: a stale claim of a worker that claimed the same row again since, whose
            record the store cannot tell from the newer claim's (both carry the worker id).
            """
            by_id = self._by_id()
            return [
                h
                for h in self.held
                if self._is_current(h)
                or not (
                    by_id[h.claim.id].state == State.INFLIGHT
                    and by_id[h.claim.id].lease_owner == h.claim.worker
                )
            ]

        # ---- writers

        @rule(
            lane=st.sampled_from(LANES),
            expires_in=st.sampled_from([None, None, 5, 45, 600]),
        )
        def enqueue(self, lane: str | None, expires_in: int | None) -> None:
            self.serial += 1
            key = str(uuid.UUID(int=self.serial))
            expires_at = None if expires_in is None else self.now + timedelta(seconds=expires_in)
            payload = {"fromAccount": "a", "toAccount": "b", "amount": f"{self.serial}.00"}
            with engine.begin() as conn:
                enqueue_row(
                    conn, NewRow(key, TRANSFER, payload, lane=lane, expires_at=expires_at), self.now
                )
                row_id = conn.execute(
                    sa.select(messages.c.id).where(messages.c.idempotency_key == key)
                ).scalar_one()
            self.model[key] = Expected(id=row_id, key=key, lane=lane, expires_at=expires_at)

        # ---- the dispatcher's operations

        @rule(worker=st.sampled_from(WORKERS), batch=st.integers(1, 3))
        def claim(self, worker: str, batch: int) -> None:
            self._claim(worker, batch)

        def _claim(self, worker: str, batch: int) -> list[Held]:
            """``claim_due`` returns exactly the rows the model finds due, in its order."""
            expected = self._due(batch)
            claims = store.claim_due(worker, batch, LEASE, self.now)
            assert [c.id for c in claims] == [r.id for r in expected]
            by_id = self._by_id()
            fresh = []
            for claim in claims:
                row = by_id[claim.id]
                assert claim.worker == worker
                assert claim.idempotency_key == row.key
                assert (claim.attempts, claim.maybe_executed) == (row.attempts, row.maybe_executed)
                assert not claim.payload_changed
                if row.lane is not None:  # a lane is claimed in id order: earlier rows are done
                    earlier = [r for r in by_id.values() if r.lane == row.lane and r.id < row.id]
                    assert all(r.state in FINISHED for r in earlier), (row, earlier)
                generation = row.generation + 1
                self._set(
                    row,
                    state=State.INFLIGHT.value,
                    lease_owner=worker,
                    lease_expires_at=self.now + timedelta(seconds=LEASE),
                    generation=generation,
                )
                fresh.append(Held(claim, generation))
            self.held += fresh
            return fresh

        def _outcome(self, held: Held, choice: tuple[str, bool, bool, int]) -> Outcome:
            kind, maybe, counts, delay = choice
            claim, at = held.claim, self.now + timedelta(seconds=delay)
            call = HistoryLine("call", kind, "CODE", f"{kind} by {claim.worker}")
            if kind == "commit":
                return Committed(claim, call, {"transferId": "t"})
            if kind == "retry":
                return Retry(claim, call, at, maybe_executed=maybe, counts_attempt=counts)
            if kind == "park":
                return Parked(claim, call, "precondition", maybe, counts_attempt=counts)
            return HandedBack(claim, call if maybe else None, at if counts else None)

        def _record(self, batch: list[tuple[Held, tuple[str, bool, bool, int]]]) -> None:
            """One ``record`` call for a batch: checks the lost outcomes, applies the others."""
            for held, _choice in batch:
                self.held.remove(held)
            outcomes = [(held, self._outcome(held, choice), choice) for held, choice in batch]
            current = {id(o) for held, o, _c in outcomes if self._is_current(held)}
            touched = {held.claim.id for held, o, _c in outcomes if id(o) in current}
            untouched = {held.claim.id for held, _o, _c in outcomes} - touched
            before = _read_all(engine)
            history_before = {i: _history_count(engine, i) for i in untouched}

            lost = store.record([o for _h, o, _c in outcomes], self.now)

            # a stale claim's outcome is reported lost and changes nothing
            assert [id(o) for o in lost] == [
                id(o) for _h, o, _c in outcomes if id(o) not in current
            ]
            after = _read_all(engine)
            for row_id in untouched:
                assert after[row_id] == before[row_id]
                assert _history_count(engine, row_id) == history_before[row_id]
            for held, outcome, (kind, maybe, counts, _delay) in outcomes:
                if id(outcome) in current:
                    self._apply(held, outcome, kind, maybe, counts)

        def _apply(
            self, held: Held, outcome: Outcome, kind: str, maybe: bool, counts: bool
        ) -> None:
            row = self._by_id()[held.claim.id]
            released = {"lease_owner": None, "lease_expires_at": None}
            if isinstance(outcome, Committed):
                self._set(
                    row,
                    state=State.COMMITTED.value,
                    attempts=row.attempts + 1,
                    committed_at=self.now,
                    next_attempt_at=None,
                    **released,
                )
            elif isinstance(outcome, Retry):
                self._set(
                    row,
                    state=State.PENDING.value,
                    attempts=row.attempts + int(counts),
                    maybe_executed=row.maybe_executed or maybe,
                    next_attempt_at=outcome.at,
                    **released,
                )
            elif isinstance(outcome, Parked):
                self._set(
                    row,
                    state=State.PARKED.value,
                    attempts=row.attempts + int(counts),
                    maybe_executed=row.maybe_executed or maybe,
                    park_reason="precondition",
                    next_attempt_at=None,
                    **released,
                )
            else:
                assert isinstance(outcome, HandedBack), kind
                self._set(row, state=State.PENDING.value, next_attempt_at=outcome.at, **released)

        @precondition(lambda self: bool(self._recordable()))
        @rule(data=st.data())
        def record(self, data: st.DataObject) -> None:
            """A worker records outcomes of some of its claims, current or stale."""
            worker = data.draw(
                st.sampled_from(sorted({h.claim.worker for h in self._recordable()})),
                label="worker",
            )
            mine = [h for h in self._recordable() if h.claim.worker == worker]
            chosen = data.draw(
                st.lists(st.sampled_from(mine), min_size=1, max_size=3, unique_by=id),
                label="claims",
            )
            self._record([(held, data.draw(OUTCOMES, label="outcome")) for held in chosen])

        @rule(worker=st.sampled_from(WORKERS), batch=st.integers(1, 3), data=st.data())
        def dispatch_cycle(self, worker: str, batch: int, data: st.DataObject) -> None:
            """What one dispatcher cycle does: claim, then record every claim's outcome."""
            fresh = self._claim(worker, batch)
            if fresh:
                self._record([(held, data.draw(OUTCOMES, label="outcome")) for held in fresh])

        @rule(worker=st.sampled_from(WORKERS))
        def renew(self, worker: str) -> None:
            ids = {h.claim.id for h in self.held if h.claim.worker == worker}
            by_id = self._by_id()
            mine = [
                by_id[i]
                for i in ids
                if by_id[i].state == State.INFLIGHT and by_id[i].lease_owner == worker
            ]
            assert store.renew_leases(worker, ids, LEASE, self.now) == (len(mine) if ids else 0)
            for row in mine:
                self._set(row, lease_expires_at=self.now + timedelta(seconds=LEASE))

        @rule(worker=st.sampled_from(WORKERS), data=st.data())
        def hand_back_unsent(self, worker: str, data: st.DataObject) -> None:
            """A stop hands back the rows it never sent (the dispatcher names them)."""
            held = [
                r
                for r in self.model.values()
                if r.state == State.INFLIGHT and r.lease_owner == worker
            ]
            mine = (
                data.draw(st.lists(st.sampled_from(held), unique_by=lambda r: r.id)) if held else []
            )
            assert store.hand_back(worker, [r.id for r in mine], self.now) == len(mine)
            for row in mine:
                self._set(row, state=State.PENDING.value, lease_owner=None, lease_expires_at=None)

        # ---- time, reaper, expirer

        @rule(seconds=st.sampled_from([1, 10, 31, 61, 400]))
        def advance_clock(self, seconds: int) -> None:
            self.now += timedelta(seconds=seconds)

        @rule()
        def reaper(self) -> None:
            expired = sorted(
                (
                    r
                    for r in self.model.values()
                    if r.state == State.INFLIGHT
                    and r.lease_expires_at is not None
                    and r.lease_expires_at < self.now
                ),
                key=lambda r: r.id,
            )
            assert store.release_expired_leases(self.now) == [r.key for r in expired]
            for row in expired:
                self._set(
                    row,
                    state=State.PENDING.value,
                    attempts=row.attempts + 1,
                    maybe_executed=True,
                    lease_owner=None,
                    lease_expires_at=None,
                    next_attempt_at=None,
                )

        @rule()
        def expirer(self) -> None:
            due = [
                r
                for r in self.model.values()
                if r.state == State.PENDING
                and r.expires_at is not None
                and r.expires_at <= self.now
            ]
            unknown = [r for r in due if r.maybe_executed]
            assert store.expire_due(self.now) == (len(due) - len(unknown), len(unknown))
            for row in due:
                if row.maybe_executed:
                    self._set(
                        row,
                        state=State.PARKED.value,
                        park_reason="expired_unknown",
                        next_attempt_at=None,
                    )
                else:
                    self._set(row, state=State.EXPIRED.value, next_attempt_at=None)

        # ---- operators

        def _pick(self, data: st.DataObject, interesting: Callable[[Expected], bool]) -> str:
            """Any row's key, more often one the action can move (and may-have-executed ones)."""
            keys = sorted(self.model)
            good = [k for k in keys if interesting(self.model[k])]
            maybe = [k for k in good if self.model[k].maybe_executed]
            choices = [st.sampled_from(keys)] + [st.sampled_from(g) for g in (good, maybe) if g]
            return data.draw(st.one_of(choices[::-1]), label="key")

        @precondition(lambda self: bool(self.model))
        @rule(data=st.data())
        def requeue(self, data: st.DataObject) -> None:
            key = self._pick(data, lambda r: r.state == State.PARKED)
            row = self.model[key]
            if row.state != State.PARKED:
                with pytest.raises(OperatorActionError, match="only parked rows"):
                    store.requeue(key, "ops@test", "try again", self.now)
                return
            view = store.requeue(key, "ops@test", "try again", self.now)
            assert view.state == State.PENDING
            self.operator_touched.add(row.id)
            self._set(
                row,
                state=State.PENDING.value,
                park_reason=None,
                next_attempt_at=None,
                expires_at=None if row.park_reason == "expired_unknown" else row.expires_at,
            )

        @precondition(lambda self: bool(self.model))
        @rule(data=st.data(), force=st.booleans())
        def cancel(self, data: st.DataObject, force: bool) -> None:
            key = self._pick(data, lambda r: r.state in (State.PENDING, State.PARKED))
            row = self.model[key]
            if row.state not in (State.PENDING, State.PARKED):
                with pytest.raises(OperatorActionError, match="only pending or parked"):
                    store.cancel(key, "ops@test", "not needed", self.now, force)
                return
            if row.maybe_executed and not force:
                with pytest.raises(OperatorActionError, match="may already have executed"):
                    store.cancel(key, "ops@test", "not needed", self.now, force)
                return
            assert store.cancel(key, "ops@test", "not needed", self.now, force).state == "cancelled"
            self.operator_touched.add(row.id)
            self._set(row, state=State.CANCELLED.value, next_attempt_at=None)

        @rule()
        def operator_unknown_key(self) -> None:
            missing = str(uuid.UUID(int=10**6 + self.serial))
            with pytest.raises(RowNotFoundError):
                store.requeue(missing, "ops@test", "why", self.now)
            with pytest.raises(RowNotFoundError):
                store.cancel(missing, "ops@test", "why", self.now, True)

        # ---- invariants, after every step

        @invariant()
        def table_matches_model_and_rules(self) -> None:
            rows = _read_all(engine)
            # no row lost, none invented
            assert len(rows) == len(self.model)
            assert {r["idempotency_key"] for r in rows.values()} == set(self.model)
            valid = {s.value for s in State}
            inflight_lanes: list[str] = []
            for row_id, row in rows.items():
                assert row["state"] in valid
                assert (row["lease_owner"] is None) == (row["state"] != State.INFLIGHT)
                if row["state"] == State.INFLIGHT and row["lane"] is not None:
                    inflight_lanes.append(row["lane"])
                before = self.previous.get(row_id)
                if before is not None:
                    if before["state"] == State.COMMITTED:  # committed rows are frozen
                        frozen = ("state", "committed_at", "attempts", "response", "maybe_executed")
                        assert {k: row[k] for k in frozen} == {k: before[k] for k in frozen}
                    assert row["maybe_executed"] or not before["maybe_executed"]  # sticky
                    if before["state"] == State.PARKED and row["state"] != State.PARKED:
                        assert row_id in self.operator_touched  # only requeue/cancel
                    assert row["attempts"] >= before["attempts"]
                model = self.model[row["idempotency_key"]]
                got = {
                    "state": row["state"],
                    "attempts": row["attempts"],
                    "maybe_executed": row["maybe_executed"],
                    "next_attempt_at": row["next_attempt_at"],
                    "lease_owner": row["lease_owner"],
                    "lease_expires_at": row["lease_expires_at"],
                    "committed_at": row["committed_at"],
                    "expires_at": row["expires_at"],
                    "park_reason": row["park_reason"] if row["state"] == State.PARKED else None,
                }
                want = {
                    "state": model.state,
                    "attempts": model.attempts,
                    "maybe_executed": model.maybe_executed,
                    "next_attempt_at": model.next_attempt_at,
                    "lease_owner": model.lease_owner,
                    "lease_expires_at": model.lease_expires_at,
                    "committed_at": model.committed_at,
                    "expires_at": model.expires_at,
                    "park_reason": model.park_reason if model.state == State.PARKED else None,
                }
                assert got == want, (row_id, got, want)
            # never two inflight rows in one lane
            assert len(inflight_lanes) == len(set(inflight_lanes)), inflight_lanes
            _lane_heads_hold(rows)
            # at most one current claim per row
            current = [h.claim.id for h in self.held if self._is_current(h)]
            assert len(current) == len(set(current))
            self.previous = rows
            self.operator_touched = set()

    return RowStateMachine


def _lane_heads_hold(rows: dict[int, dict[str, Any]]) -> None:
    """A row marked waiting has an earlier open row in its lane: a lane's first open row is
    never left out of the claim (``outbox.store.heads``), and a waiting row is never due."""
    for row_id, row in rows.items():
        if row["lane_behind"]:
            assert row["state"] == State.PENDING and row["due_at"] is None, row
            earlier = [r for i, r in rows.items() if r["lane"] == row["lane"] and i < row_id]
            assert any(r["state"] in OPEN for r in earlier), (row_id, row["lane"], earlier)


def test_row_state_machine(engine: Engine, backend: str) -> None:
    machine = make_machine(engine)
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=EXAMPLES[backend],
            stateful_step_count=STEPS,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )


def test_stale_claim_of_a_worker_that_claimed_the_row_again_is_lost(engine: Engine) -> None:
    store = Store(engine)
    now = START
    key = str(uuid.uuid4())
    with engine.begin() as conn:
        enqueue_row(conn, NewRow(key, TRANSFER, {"amount": "1"}), now)
    [stale] = store.claim_due("w1", 1, LEASE, now)
    now += timedelta(seconds=LEASE + 1)
    assert store.release_expired_leases(now) == [key]
    [fresh] = store.claim_due("w1", 1, LEASE, now)  # the same worker, a newer claim
    park = Parked(
        stale, HistoryLine("call", "park", "FAILED_PRECONDITION", "old answer"), "precondition"
    )
    lost = store.record([park], now)
    assert lost == [park]  # the stale outcome must be the one reported lost ...
    assert store.get(key).state == State.INFLIGHT  # ... and the newer claim must stand
    commit = Committed(fresh, HistoryLine("call", "commit", "OK", "new answer"))
    assert store.record([commit], now) == []
    assert store.get(key).state == State.COMMITTED
