"""What each answer from Recrypt means: one table, read side by side with the guide's.

The table maps (gRPC status code, message) to a ``Decision``. It is pure: no I/O, no clock.
The dispatcher applies decisions; the store records them. Each decision carries the sentence
written into ``last_message`` and the attempt history, so an operator never has to guess.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

# Action, Gate and ParkReason are defined in the vocabulary; ``__all__`` keeps them importable here.
from outbox.vocabulary import Action, Code, Gate, ParkReason

__all__ = [
    "KEY_USED_BEFORE_TEXT",
    "NOT_SENT",
    "TABLE",
    "Action",
    "Code",
    "Decision",
    "Gate",
    "Matcher",
    "ParkReason",
    "StatusName",
    "decide",
    "unknown_outcome_exhausted",
]


@dataclass(frozen=True)
class Decision:
    action: Action
    explanation: str
    maybe_executed: bool = False  # the call may have taken effect at Recrypt
    counts_attempt: bool = True
    park_reason: ParkReason | None = None
    gate: Gate = Gate.NONE
    bounded: bool = False  # unknown outcome: park after [retry] max_unknown_attempts


Matcher = Callable[[str], bool]


def _any(_message: str) -> bool:
    return True


def _vgw_db(message: str) -> bool:
    return "vgw-db" in message.lower()


def _number(message: str) -> bool:
    # The guide's row is "a number": the message IS the limit ("100"). Any other text, digits
    # or not ("429 Too Many Requests", "retry in 1s"), is the next row: rate limiting.
    return re.fullmatch(r"\s*\d+\s*", message) is not None


_UNKNOWN = Decision(
    Action.RETRY,
    "outcome unknown (the call may have executed); resending with the same key is safe",
    maybe_executed=True,
    bounded=True,
)

#: (code, message matcher, decision), first match wins: the guide's table, in its order.
TABLE: tuple[tuple[Code, Matcher, Decision], ...] = (
    (Code.OK, _any, Decision(Action.COMMIT, "committed: Recrypt answered OK")),
    (
        Code.ALREADY_EXISTS,
        _any,
        Decision(Action.COMMIT, "committed: key already used at Recrypt, the effect happened once"),
    ),
    (
        Code.UNAUTHENTICATED,
        _any,
        Decision(
            Action.HAND_BACK,
            "API key refused (UNAUTHENTICATED 'Session key'): check the key and its IP "
            "allow-list at recrypt.net/api, then reload the daemon (SIGHUP)",
            counts_attempt=False,
            gate=Gate.UNAUTHENTICATED,
        ),
    ),
    (
        Code.UNAVAILABLE,
        _vgw_db,
        Decision(
            Action.RETRY,
            "rollover maintenance (UNAVAILABLE vgw-db): retrying with the same key and backoff",
            maybe_executed=True,
            gate=Gate.ROLLOVER,
        ),
    ),
    (
        Code.PERMISSION_DENIED,
        _any,
        Decision(
            Action.HAND_BACK,
            "Recrypt is in maintenance mode (PERMISSION_DENIED): dispatch paused, "
            "see https://x.com/RecryptCS",
            counts_attempt=False,
            gate=Gate.MAINTENANCE,
        ),
    ),
    (
        Code.DEADLINE_EXCEEDED,
        _vgw_db,
        Decision(
            Action.RETRY,
            "transaction timed out inside Recrypt (DEADLINE_EXCEEDED vgw-db), most likely "
            "rolled back; resending with the same key is safe. The guide says this should "
            "never occur under normal operation: it counts toward [retry] "
            "max_unknown_attempts, and the row is parked for a human if it keeps happening",
            maybe_executed=True,
            bounded=True,
        ),
    ),
    (
        Code.NOT_FOUND,
        _any,
        Decision(
            Action.PARK,
            "Recrypt deprecated and removed this API (NOT_FOUND): the method is no longer "
            "sent; rewrite the row for the replacement API, then cancel this one",
            park_reason=ParkReason.METHOD_REMOVED,
            gate=Gate.METHOD_REMOVED,
        ),
    ),
    (
        Code.FAILED_PRECONDITION,
        _any,
        Decision(
            Action.PARK,
            "Recrypt refused (FAILED_PRECONDITION): answer the compliance question on the "
            "website, or ask support to raise the transaction limit; then requeue",
            park_reason=ParkReason.PRECONDITION,
        ),
    ),
    (
        Code.RESOURCE_EXHAUSTED,
        _number,
        Decision(
            Action.PARK,
            "object limit reached (RESOURCE_EXHAUSTED; the number is the limit): free or "
            "raise the limit at Recrypt, then requeue",
            park_reason=ParkReason.OBJECT_LIMIT,
        ),
    ),
    (
        Code.RESOURCE_EXHAUSTED,
        _any,
        Decision(
            Action.HAND_BACK,
            "rate limited (RESOURCE_EXHAUSTED): dispatcher throttled, resending with the same key",
            counts_attempt=False,
            gate=Gate.RATE_LIMITED,
        ),
    ),
    *(
        (
            code,
            _any,
            Decision(
                Action.PARK,
                f"Recrypt rejected the request ({code.name}): retrying cannot help; fix the "
                "payload and enqueue it again under a new key, then cancel this row",
                park_reason=ParkReason.REJECTED,
            ),
        )
        for code in (Code.UNIMPLEMENTED, Code.INVALID_ARGUMENT, Code.OUT_OF_RANGE)
    ),
    # Transport failures, client deadlines and the guide's "should not be possible" codes.
    *((code, _any, _UNKNOWN) for code in (Code.UNAVAILABLE, Code.DEADLINE_EXCEEDED)),
    *(
        (code, _any, _UNKNOWN)
        for code in (Code.UNKNOWN, Code.INTERNAL, Code.ABORTED, Code.CANCELLED)
    ),
    (Code.DATA_LOSS, _any, _UNKNOWN),
)


#: A call that never started: the channel had no connection (refused, DNS, TLS handshake) or
#: was closed. Judged by the client from the channel, never from an answer's text: a server
#: can answer "failed to connect" after executing, and that is an unknown outcome.
NOT_SENT = Decision(
    Action.HAND_BACK,
    "could not connect to Recrypt (network or TLS; the request was never sent): backing off; "
    "check the network path, [recrypt] target and ca_file",
    counts_attempt=False,
    gate=Gate.UNREACHABLE,
)


class StatusName(Protocol):
    """A status code read by its name: ``grpc.StatusCode`` or ``Code`` (no gRPC import here)."""

    @property
    def name(self) -> str: ...


def _rows_by_code() -> dict[str, tuple[tuple[Matcher, Decision], ...]]:
    return {code.name: tuple((m, d) for c, m, d in TABLE if c == code) for code in Code}


_BY_CODE = _rows_by_code()


def decide(code: StatusName, message: str) -> Decision:
    """The decision for one answer. Every status code has a row; unknown ones are unknowns."""
    for matches, decision in _BY_CODE.get(code.name, ()):
        if matches(message or ""):
            return decision
    return _UNKNOWN


def unknown_outcome_exhausted(unknown: int) -> Decision:
    return Decision(
        Action.PARK,
        f"outcome unknown for {unknown} attempts: check on recrypt.net whether the "
        "transaction with this idempotency key happened, then requeue (same key, safe) "
        "or cancel --force",
        maybe_executed=True,
        park_reason=ParkReason.UNKNOWN_OUTCOME,
    )


#: Why ALREADY_EXISTS on a row's very first attempt is recorded apart
#: (``HistoryDecision.KEY_USED_BEFORE``; a metric counts them).
KEY_USED_BEFORE_TEXT = (
    "ALREADY_EXISTS on the very first attempt: this key was used at Recrypt before this row "
    "was sent (by another system, a copy of this row, or a row purged from this outbox); "
    "committed, but check on recrypt.net that the transaction with this key is the one this "
    "row meant"
)
