"""Operators' actions on the store (issue 14): requeue after unknown outcomes, filters and
keyset pages, bulk actions through the guarded transition, holds, dual control, the payload
as first sent. On SQLite, PostgreSQL and MariaDB."""

from __future__ import annotations

from datetime import UTC, datetime

import grpc
import pytest

import outbox
from outbox.errors import OperatorActionError, RowNotFoundError
from outbox.filters import RowFilter
from outbox.operations import payload_diff
from outbox.schema import messages
from outbox.simulator import TRANSFER, Fault
from outbox.store import AmbiguousRowError, operator, selection

C = grpc.StatusCode
NOW = datetime(2026, 11, 23, 9, 0, tzinfo=UTC)


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


# --------------------------------------------------------------------------- filters, pages


def park(engine, key: str, reason: str = "precondition", *, maybe: bool = False) -> None:
    with engine.begin() as conn:
        conn.execute(
            messages.update()
            .where(messages.c.idempotency_key == key)
            .values(state="parked", park_reason=reason, maybe_executed=maybe)
        )


def test_a_filter_pages_by_keyset_and_counts_all_matching(engine, store) -> None:
    keys = [enqueue_transfer(engine, reference=f"order-{i % 2}") for i in range(7)]
    for key in keys[:5]:
        park(engine, key)
    wanted = RowFilter(state="parked", park_reason="precondition", reference="order-0")

    first = store.list_rows(wanted, limit=2)
    second = store.list_rows(wanted, after=first.next_after, limit=2)

    expected = [k for i, k in enumerate(keys[:5]) if i % 2 == 0][::-1]  # newest first
    assert first.total == second.total == 3 == store.count_rows(wanted)
    assert [r.idempotency_key for r in first.rows + second.rows] == expected
    assert second.next_after is None


def test_the_short_method_form_matches_and_wildcards_match_only_themselves(engine, store):
    key = enqueue_transfer(engine)
    assert [
        r.idempotency_key for r in store.list_rows(RowFilter(method="Wallet/Transfer")).rows
    ] == [key]
    assert store.list_rows(RowFilter(method=TRANSFER)).total == 1
    assert store.list_rows(RowFilter(method="Wallet/Trans%")).total == 0
    assert store.list_rows(RowFilter(reference="' OR 1=1 --")).total == 0
    assert store.list_rows(RowFilter(key_prefix=key[:8])).total == 1
    assert store.list_rows(RowFilter(key_prefix="%")).total == 0


def test_find_row_takes_any_case_a_unique_prefix_or_a_reference(engine, store) -> None:
    key = enqueue_transfer(engine, reference="inv-7")
    other = enqueue_transfer(engine, reference="inv-7")
    assert store.find_row(key.upper()).idempotency_key == key
    assert store.find_row(key[:13]).idempotency_key == key
    with pytest.raises(AmbiguousRowError) as found:
        store.find_row("inv-7")
    assert {r.idempotency_key for r in found.value.candidates} == {key, other}
    with pytest.raises(RowNotFoundError):
        store.find_row(key[:7])  # too short to be a prefix


# --------------------------------------------------------------------------- bulk actions


def test_requeue_matching_acts_on_every_row_of_the_filter_with_who_and_why(engine, store):
    keys = [enqueue_transfer(engine) for _ in range(4)]
    for key in keys[:3]:
        park(engine, key)
    park(engine, keys[3], "rejected")
    wanted = RowFilter(park_reason="precondition")

    preview = store.requeue_matching(wanted, "alice@h", "limit raised", NOW, dry_run=True)
    assert (preview.matched, preview.acted) == (3, [])
    assert store.get(keys[0]).state == "parked"

    done = store.requeue_matching(wanted, "alice@h", "limit raised", NOW)

    assert sorted(done.acted) == sorted(keys[:3]) and done.skipped == []
    assert store.get(keys[3]).state == "parked"
    (line,) = store.history(keys[0])
    assert (line.actor, line.message, line.decision) == ("alice@h", "limit raised", "requeue")


def test_a_row_that_moved_meanwhile_is_skipped_not_overwritten(engine, store) -> None:
    keys = [enqueue_transfer(engine) for _ in range(2)]
    for key in keys:
        park(engine, key)
    wanted = RowFilter(park_reason="precondition")
    selected = store.engine.connect()
    with selected:
        ids = selection.matching_ids(selected, wanted, {"parked"}, None, 10)
    park(engine, keys[0], "rejected")  # another operator's action, after the selection

    act = operator.Act("requeue", "bob@h", "bulk", NOW)
    with engine.begin() as conn:
        done = operator.act_on_ids(conn, ids, wanted, act)

    assert done.acted == [keys[1]]
    assert [(s.key, s.why) for s in done.skipped] == [(keys[0], operator.MOVED)]
    assert store.get(keys[0]).park_reason == "rejected"


def test_cancel_keys_skips_what_it_may_not_cancel_and_says_why(engine, store) -> None:
    pending, maybe, done_key = (enqueue_transfer(engine) for _ in range(3))
    park(engine, maybe, maybe=True)
    store.cancel(done_key, "a@h", "x", NOW, False)

    done = store.cancel_keys([pending, maybe, done_key, "nope"], "a@h", "dup", NOW)

    assert done.acted == [pending]
    why = {s.key: s.why for s in done.skipped}
    assert "maybe_executed" in why[maybe] and "cancelled" in why[done_key]
    assert why["nope"] == "no such row"


# --------------------------------------------------------------------------- dual control


def test_dual_control_a_forced_cancel_waits_for_a_second_operator(engine, store) -> None:
    key = enqueue_transfer(engine)
    park(engine, key, "unknown_outcome", maybe=True)

    asked = store.cancel_keys(
        [key], "alice@h1", "never executed", NOW, force=True, dual_control=True
    )
    ((_key, request),) = asked.requested
    assert store.get(key).state == "parked"
    assert [a.id for a in store.approvals()] == [request]
    with pytest.raises(OperatorActionError, match="second, different operator"):
        store.approve(request, "Alice@h2", "me again", NOW)

    approved = store.approve(request, "bob@h3", "checked on recrypt.net", NOW)

    assert (approved.decision, approved.decided_by) == ("approved", "bob@h3")
    assert store.get(key).state == "cancelled"
    assert [h.decision for h in store.history(key)] == ["cancel_requested", "cancel_approved"]
    assert store.approvals() == []


def test_a_rejected_request_leaves_the_row(engine, store) -> None:
    key = enqueue_transfer(engine)
    park(engine, key, maybe=True)
    store.cancel(key, "alice@h", "dup", NOW, True, dual_control=True)
    (request,) = store.approvals()

    store.reject(request.id, "bob@h", "it did execute: requeue instead", NOW)

    assert store.get(key).state == "parked"
    assert [h.decision for h in store.history(key)] == ["cancel_requested", "cancel_rejected"]
    with pytest.raises(OperatorActionError, match="already rejected"):
        store.approve(request.id, "carol@h", "late", NOW)


# --------------------------------------------------------------------------- holds, payload


def test_holds_are_kept_with_who_and_why_and_released(store) -> None:
    store.hold("lane", "acc-1", "alice@h", "reconciling acc-1", NOW)
    with pytest.raises(OperatorActionError, match="already held by alice@h"):
        store.hold("lane", "acc-1", "bob@h", "again", NOW)
    (held,) = store.holds()
    assert (held.kind, held.value, held.actor, held.reason) == (
        "lane",
        "acc-1",
        "alice@h",
        "reconciling acc-1",
    )
    assert store.held().lanes == {"acc-1"}
    store.release("lane", "acc-1", "bob@h", "done")
    assert store.holds() == [] and store.held().lanes == frozenset()


def test_the_payload_as_first_sent_is_kept_and_diffed(engine, sim, store, make_dispatcher):
    key = enqueue_transfer(engine)
    sim.inject(Fault(C.UNAVAILABLE, "vgw-db"))
    make_dispatcher().run_once()
    with engine.begin() as conn:
        conn.execute(messages.update().values(payload=transfer("99.00")))

    row = store.get(key)

    diff = payload_diff(row.first_payload, row.payload)
    assert '-  "amount": "10.00",' in diff and '+  "amount": "99.00",' in diff


def test_a_broad_page_counts_no_further_than_the_cap(engine, store, monkeypatch) -> None:
    """``outbox list`` says "3 of 3+" rather than count a whole large table; actions count all."""
    for _ in range(5):
        enqueue_transfer(engine)
    monkeypatch.setattr(selection, "COUNT_CAP", 3)

    page = store.list_rows(RowFilter(), limit=2)

    assert (page.total, page.more_than_total, len(page.rows)) == (3, True, 2)
    assert store.count_rows(RowFilter()) == 5
    narrow = store.list_rows(RowFilter(state="pending"), limit=10)
    assert (narrow.total, narrow.more_than_total) == (3, True)
    monkeypatch.setattr(selection, "COUNT_CAP", 10)
    assert (store.list_rows(RowFilter(), limit=2).total, store.list_rows().more_than_total) == (
        5,
        False,
    )
