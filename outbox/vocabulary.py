"""The words that cross a boundary, each defined once: what the attempt history says.

Pure: no I/O, no gRPC, no SQL, so the store, the dispatcher, the CLI and the docs' tests can
all derive from it. Row states live in ``outbox.schema.State``, gates and park reasons in
``outbox.policy`` (and ``outbox.gates.GATE_STATES``).
"""

from __future__ import annotations

import enum


class HistoryKind(enum.StrEnum):
    """Who wrote an attempt-history line."""

    CALL = "call"  # one Recrypt call and its answer
    SYSTEM = "system"  # the daemon without a call: a bad row, a lease expiry, an expiry
    OPERATOR = "operator"  # requeue or cancel, with who and why
    STREAM = "stream"  # an update from a server stream (the decision is the update's name)


class HistoryDecision(enum.StrEnum):
    """What a history line decided. The first four are ``policy.Action``'s values."""

    COMMIT = "commit"  # OK or ALREADY_EXISTS: committed
    RETRY = "retry"  # resend later with the same key
    PARK = "park"  # a human must act
    HAND_BACK = "hand_back"  # back to pending untouched, no attempt counted
    KEY_USED_BEFORE = "commit_key_used_before"  # ALREADY_EXISTS at the very first attempt
    LATE_ANSWER = "late_answer"  # an answer that came after this worker had lost the row
    LEASE_EXPIRED = "lease_expired"  # the reaper released a row whose worker went silent
    EXPIRED = "expired"  # expires_at passed before any attempt could have executed
    REQUEUE = "requeue"  # an operator sent a parked row again
    CANCEL = "cancel"  # an operator cancelled a row that cannot have executed
    CANCEL_FORCED = "cancel_forced"  # an operator cancelled a row that may have executed
