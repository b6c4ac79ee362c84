"""What to do for a row, in the runbook's words (docs/operations.md §6, one entry per reason).

A test holds each entry's heading equal to the runbook's ``### `reason`: …`` heading, and
every ``ParkReason`` to an entry: a new reason without advice fails there. Imports only the
vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

from outbox.vocabulary import ParkReason

RUNBOOK_SECTION = "docs/operations.md §6"


@dataclass(frozen=True)
class Advice:
    heading: str  # the text after "### `reason`: " in the runbook
    steps: tuple[str, ...]


ADVICE: dict[ParkReason, Advice] = {
    ParkReason.PRECONDITION: Advice(
        "FAILED_PRECONDITION",
        (
            "A compliance question is waiting: log in to recrypt.net (the account in the "
            "payload), answer it, then requeue.",
            "Or the account's transaction limit was exceeded: ask Recrypt support to raise it "
            "and requeue, or cancel and have the application enqueue smaller transfers under "
            "new keys (nothing executed, so this is safe).",
        ),
    ),
    ParkReason.OBJECT_LIMIT: Advice(
        "RESOURCE_EXHAUSTED whose message is a number",
        (
            "The account holds as many objects of this kind as its limit allows (the number "
            "is the limit). Free some at Recrypt (cancel stale orders) or ask support to "
            "raise the limit, then requeue.",
        ),
    ),
    ParkReason.METHOD_REMOVED: Advice(
        "NOT_FOUND",
        (
            "Recrypt removed this API. Update proto_path to Recrypt's current protos.",
            "Have the application write the intent for the replacement API under a new key "
            "(NOT_FOUND means the call did not execute), cancel this row, then restart the "
            "daemon.",
        ),
    ),
    ParkReason.REJECTED: Advice(
        "INVALID_ARGUMENT, OUT_OF_RANGE, UNIMPLEMENTED",
        (
            "Recrypt refused the request as written; retrying cannot help. Fix the data in "
            "the application, enqueue it again under a new key, then cancel this row.",
            "If maybe_executed is set, check on recrypt.net first (as for unknown_outcome).",
        ),
    ),
    ParkReason.BAD_ROW: Advice(
        "the row can never be sent as written",
        (
            "Nothing of this row was sent. Fix the writer, enqueue the intent correctly under "
            "a new key, and cancel this row.",
            "If the protos were wrong instead, fix proto_path, restart, then requeue.",
        ),
    ),
    ParkReason.PAYLOAD_CHANGED: Advice(
        "the method or payload was edited after the first send",
        (
            "Find out who changed the row, and why.",
            "Put the original method and payload back and requeue; or cancel (with force if "
            "maybe_executed, after checking on recrypt.net) and enqueue the new payload under "
            "a new key.",
        ),
    ),
    ParkReason.KEY_REUSED: Advice(
        "the key belongs to a row that retention purged",
        (
            "Requeueing cannot help (it parks again). Fix the writer that reused the key, "
            "enqueue the intent under a new key if still wanted, and cancel this row.",
        ),
    ),
    ParkReason.UNKNOWN_OUTCOME: Advice(
        "too many attempts with an unknown outcome",
        (
            "Recrypt may or may not have executed it: look on recrypt.net (the account in the "
            "payload) for the transfer or order, by amount, counterparty and the time of the "
            "first call.",
            "It happened, or it did not and should: requeue (the resend uses the same key).",
            "It did not happen and should not any more: cancel with force.",
        ),
    ),
    ParkReason.EXPIRED_UNKNOWN: Advice(
        "`expires_at` passed after an attempt that may have executed",
        (
            "Check on recrypt.net as for unknown_outcome.",
            "It happened: requeue (its expires_at is cleared, it commits on ALREADY_EXISTS).",
            "It did not and should not any more: cancel with force. It must still happen: "
            "cancel, then enqueue it again under a new key with a new expires_at.",
        ),
    ),
}

#: What to do for a row that is not parked, by state.
STATE_ADVICE: dict[str, str] = {
    "pending": "Waiting to be sent (or retried). Nothing to do unless it waits too long: "
    "see the Overview's gates. A pending row can be cancelled.",
    "inflight": "A call is in flight: wait for it to finish before acting.",
    "committed": "Done: Recrypt executed it once.",
    "cancelled": "Cancelled by an operator: see the history for who and why.",
    "expired": "Its expires_at passed before any attempt could have executed: nothing happened.",
}


def advice_for(state: str, park_reason: str | None) -> tuple[str, tuple[str, ...]]:
    """(heading, steps) for a row in ``state`` (and ``park_reason`` when parked)."""
    if state == "parked":
        try:
            entry = ADVICE[ParkReason(park_reason or "")]
        except ValueError:
            return "parked", (f"See {RUNBOOK_SECTION}.",)
        return f"{park_reason}: {entry.heading}", entry.steps
    return state, (STATE_ADVICE.get(state, f"See {RUNBOOK_SECTION}."),)
