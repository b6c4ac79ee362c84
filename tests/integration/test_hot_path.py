"""The hot path's database work (issue #11, part 2): what one batch costs in statements.

Each batch of answers is recorded in a fixed number of statements whatever its size (on
PostgreSQL one guarded UPDATE per kind of outcome over arrays, not one parameter set per row),
and a claim runs a statement built once. The money rules themselves (a stale worker learns it
lost the row, every kind of outcome lands with its history line) are checked on every database.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from outbox.database import make_engine
from outbox.schema import attempts, messages
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
    new_key,
)
from outbox.vocabulary import HistoryDecision, HistoryKind

NOW = datetime(2026, 11, 23, 9, 0, tzinfo=UTC)
METHOD = "/recrypt.wallet.v1.Wallet/Transfer"


def _fill(engine: Engine, n: int) -> None:
    with engine.begin() as conn:
        for _ in range(n):
            payload = {"fromAccount": "a", "toAccount": "b", "amount": "1.00"}
            enqueue_row(conn, NewRow(new_key(), METHOD, payload), NOW)


def _call(decision: HistoryDecision, code: str) -> HistoryLine:
    return HistoryLine(HistoryKind.CALL, decision, code, f"Recrypt said {code}", 1.5)


def _mixed(claims: list[Claim]) -> list[Outcome]:
    """Every kind of outcome: commits (one without a response), a retry, a park, a hand-back."""
    later = NOW + timedelta(seconds=30)
    committed = [
        Committed(c, _call(HistoryDecision.COMMIT, "OK"), {"transactionId": f"t{c.id}"})
        for c in claims[:-4]
    ]
    return [
        *committed,
        Committed(claims[-4], _call(HistoryDecision.COMMIT, "ALREADY_EXISTS"), None),
        Retry(claims[-3], _call(HistoryDecision.RETRY, "UNAVAILABLE"), later, maybe_executed=True),
        Parked(claims[-2], _call(HistoryDecision.PARK, "INVALID_ARGUMENT"), "rejected"),
        HandedBack(claims[-1], None, later),
    ]


@contextmanager
def _statements(engine: Engine) -> Iterator[list[tuple[str, bool]]]:
    """Every statement sent to the database meanwhile, and whether it was an executemany."""
    seen: list[tuple[str, bool]] = []

    def listen(_c: Any, _cur: Any, statement: str, _p: Any, _ctx: Any, many: bool) -> None:
        seen.append((statement, many))

    sa.event.listen(engine, "before_cursor_execute", listen)
    try:
        yield seen
    finally:
        sa.event.remove(engine, "before_cursor_execute", listen)


def test_a_mixed_batch_lands_whole_and_a_stale_claim_is_reported_lost(engine: Engine) -> None:
    _fill(engine, 12)
    store = Store(engine)
    claims = store.claim_due("w1", 12, 60.0, NOW)
    stale = claims[0]
    with engine.begin() as conn:  # the reaper released it and another worker holds it now
        conn.execute(
            sa.update(messages)
            .where(messages.c.id == stale.id)
            .values(lease_owner="w2", attempts=messages.c.attempts + 1)
        )
    lost = store.record(_mixed(claims), NOW)
    assert [o.claim.id for o in lost] == [stale.id]
    with engine.connect() as conn:
        rows = {r.id: r for r in conn.execute(sa.select(messages)).all()}
        lines = conn.execute(sa.select(attempts.c.message_id, attempts.c.code)).all()
    assert rows[stale.id].state == "inflight" and rows[stale.id].lease_owner == "w2"
    assert [rows[c.id].state for c in claims[1:]] == ["committed"] * 8 + [
        "pending",
        "parked",
        "pending",
    ]
    assert rows[claims[1].id].response == {"transactionId": f"t{claims[1].id}"}
    assert rows[claims[-4].id].response is None
    assert rows[claims[-3].id].maybe_executed and rows[claims[-3].id].attempts == 1
    assert rows[claims[-2].id].park_reason == "rejected"
    assert rows[claims[-1].id].attempts == 0 and rows[claims[-1].id].lease_owner is None
    assert sorted(lines) == sorted((c.id, o.line.code) for c, o in _pairs(claims) if o.line)


def _pairs(claims: list[Claim]) -> list[tuple[Claim, Outcome]]:
    return [(o.claim, o) for o in _mixed(claims) if o.claim.id != claims[0].id]


def test_postgresql_records_a_batch_in_one_statement_per_kind(postgres_url: str) -> None:
    engine = make_engine(postgres_url)
    try:
        _fill(engine, 64)
        store = Store(engine)
        outcomes = _mixed(store.claim_due("w1", 64, 60.0, NOW))
        with _statements(engine) as seen:
            assert store.record(outcomes, NOW) == []
    finally:
        engine.dispose()
    sent = [s for s, _many in seen if not s.startswith("select pg_catalog.version")]
    assert not [s for s, many in seen if many], "no per-row parameter sets (executemany)"
    assert len(sent) <= 5, sent  # 4 kinds of outcome + their history lines


def test_postgresql_claims_with_a_statement_built_once(postgres_url: str) -> None:
    engine = make_engine(postgres_url)
    executed: list[object] = []

    def listen(_conn: Any, statement: object, *_args: Any) -> None:
        executed.append(statement)

    try:
        _fill(engine, 4)
        store = Store(engine)
        sa.event.listen(engine, "before_execute", listen)
        first = store.claim_due("w1", 2, 60.0, NOW)
        second = store.claim_due("w2", 2, 30.0, NOW + timedelta(seconds=1))
    finally:
        engine.dispose()
    assert len(first) == len(second) == 2 and not {c.id for c in first} & {c.id for c in second}
    assert second[0].worker == "w2"
    claims = [s for s in executed if isinstance(s, sa.Update)]  # (lane sorting selects too)
    assert len(claims) == 2 and claims[0] is claims[1]
