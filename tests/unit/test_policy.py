"""The policy table, row by row, against the guide's error table and SPEC §5."""

from __future__ import annotations

import random

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from outbox.backoff import Backoff
from outbox.policy import NOT_SENT, TABLE, Action, Gate, ParkReason, decide
from outbox.vocabulary import Code

C = grpc.StatusCode

# (code, message, action, gate, park_reason, maybe_executed, counts_attempt)
GUIDE = [
    (C.OK, "", Action.COMMIT, Gate.NONE, None, False, True),
    (C.ALREADY_EXISTS, "idempotency key used", Action.COMMIT, Gate.NONE, None, False, True),
    (C.UNAUTHENTICATED, "Session key", Action.HAND_BACK, Gate.UNAUTHENTICATED, None, False, False),
    (C.UNAVAILABLE, "vgw-db", Action.RETRY, Gate.ROLLOVER, None, True, True),
    (C.PERMISSION_DENIED, "maintenance", Action.HAND_BACK, Gate.MAINTENANCE, None, False, False),
    (C.DEADLINE_EXCEEDED, "vgw-db", Action.RETRY, Gate.NONE, None, True, True),
    (C.NOT_FOUND, "", Action.PARK, Gate.METHOD_REMOVED, ParkReason.METHOD_REMOVED, False, True),
    (C.UNIMPLEMENTED, "", Action.PARK, Gate.NONE, ParkReason.REJECTED, False, True),
    (C.FAILED_PRECONDITION, "limit", Action.PARK, Gate.NONE, ParkReason.PRECONDITION, False, True),
    (C.RESOURCE_EXHAUSTED, "100", Action.PARK, Gate.NONE, ParkReason.OBJECT_LIMIT, False, True),
    (C.RESOURCE_EXHAUSTED, "slow down", Action.HAND_BACK, Gate.RATE_LIMITED, None, False, False),
    (C.INVALID_ARGUMENT, "bad", Action.PARK, Gate.NONE, ParkReason.REJECTED, False, True),
    (C.OUT_OF_RANGE, "bad", Action.PARK, Gate.NONE, ParkReason.REJECTED, False, True),
]
UNKNOWN_OUTCOMES = [
    (C.UNAVAILABLE, "Socket closed"),  # the connection dropped mid-call: unknown
    # gRPC's own words when it could not connect, but a server can send them too (after
    # executing): "never sent" is judged from the channel by the client, never from text
    (C.UNAVAILABLE, "failed to connect to all addresses; last error: UNKNOWN: Tls handshake"),
    (C.DEADLINE_EXCEEDED, "Deadline Exceeded"),
    (C.UNKNOWN, ""),
    (C.INTERNAL, "boom"),
    (C.ABORTED, ""),
    (C.CANCELLED, ""),
    (C.DATA_LOSS, ""),
]


@pytest.mark.parametrize(("code", "message", "action", "gate", "reason", "maybe", "counts"), GUIDE)
def test_guide_row(code, message, action, gate, reason, maybe, counts) -> None:
    decision = decide(code, message)
    assert decision.action == action
    assert decision.gate == gate
    assert decision.park_reason == reason
    assert decision.maybe_executed is maybe
    assert decision.counts_attempt is counts
    assert decision.explanation  # every decision says why, for last_message


@pytest.mark.parametrize(("code", "message"), UNKNOWN_OUTCOMES)
def test_unknown_outcomes_resend_bounded_and_maybe_executed(code, message) -> None:
    decision = decide(code, message)
    assert decision.action == Action.RETRY
    assert decision.maybe_executed
    assert decision.bounded


def test_vgw_db_is_matched_on_the_message_not_only_the_code() -> None:
    assert decide(C.UNAVAILABLE, "VGW-DB").gate == Gate.ROLLOVER
    assert decide(C.UNAVAILABLE, "connection refused").gate == Gate.NONE
    assert decide(C.DEADLINE_EXCEEDED, "vgw-db").bounded  # "should never occur": bounded
    assert decide(C.DEADLINE_EXCEEDED, "client deadline").bounded


@pytest.mark.parametrize(
    "message",
    ["429 Too Many Requests", "rate limit exceeded, retry in 1s", "slow down", "quota 5/s", ""],
)
def test_resource_exhausted_text_is_rate_limiting_even_with_digits(message) -> None:
    decision = decide(C.RESOURCE_EXHAUSTED, message)
    assert (decision.action, decision.gate) == (Action.HAND_BACK, Gate.RATE_LIMITED)


@pytest.mark.parametrize("message", ["100", " 25 ", "1"])
def test_resource_exhausted_that_is_a_number_is_the_object_limit(message) -> None:
    assert decide(C.RESOURCE_EXHAUSTED, message).park_reason == ParkReason.OBJECT_LIMIT


@given(st.sampled_from(list(C)), st.text(max_size=40))
def test_every_code_and_message_has_a_decision(code, message) -> None:
    decision = decide(code, message)
    assert decision.action in set(Action)
    if decision.action == Action.COMMIT:
        assert code in (C.OK, C.ALREADY_EXISTS)


def test_a_call_never_started_is_handed_back_behind_the_unreachable_gate() -> None:
    assert (NOT_SENT.action, NOT_SENT.gate, NOT_SENT.counts_attempt) == (
        Action.HAND_BACK,
        Gate.UNREACHABLE,
        False,
    )
    assert not NOT_SENT.maybe_executed


def test_the_table_has_a_row_for_every_status_code() -> None:
    assert {code.name for code, _m, _d in TABLE} == {c.name for c in C}


def test_the_vocabulary_names_exactly_grpcs_status_codes() -> None:
    """The policy reads codes by name: a gRPC code missing from ``Code`` would be an unknown."""
    assert [c.name for c in Code] == [c.name for c in C]


@pytest.mark.parametrize("code", list(C))
def test_grpc_codes_and_vocabulary_codes_get_the_same_decision(code) -> None:
    for message in ("", "vgw-db", "100", "anything"):
        assert decide(code, message) == decide(Code[code.name], message)


@given(st.integers(min_value=1, max_value=10_000), st.randoms(use_true_random=False))
def test_backoff_is_capped_and_positive(attempt, rng) -> None:
    backoff = Backoff(initial=1.0, maximum=180.0, multiplier=2.0, jitter=0.2)
    delay = backoff.delay(attempt, rng)
    assert 0 < delay <= 180.0


def test_backoff_grows_exponentially_then_caps() -> None:
    backoff = Backoff(initial=1.0, maximum=180.0, multiplier=2.0, jitter=0.0)
    assert [backoff.delay(n) for n in (1, 2, 3, 4)] == [1.0, 2.0, 4.0, 8.0]
    assert backoff.delay(9) == 180.0
    assert backoff.delay(100) == 180.0


def test_backoff_jitter_only_shortens() -> None:
    backoff = Backoff(initial=10.0, maximum=180.0, multiplier=2.0, jitter=0.5)
    rng = random.Random(7)
    delays = [backoff.delay(2, rng) for _ in range(200)]
    assert all(10.0 <= d <= 20.0 for d in delays)
    assert len(set(delays)) > 100  # actually jittered
