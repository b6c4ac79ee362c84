"""What operators may do to a row, decided as data: which states a requeue or a cancel takes,
when a cancel needs ``--force`` or a second operator (dual control), who may approve, and
what changed in a payload edited after its first send.

The store applies these rulings inside its guarded transitions; the CLI and the console only
show them. Pure: no I/O, no SQL, no gRPC.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

from outbox.vocabulary import HistoryDecision, State

#: The states each action moves a row out of.
REQUEUE_FROM = frozenset({State.PARKED.value})
CANCEL_FROM = frozenset({State.PENDING.value, State.PARKED.value})

MAYBE_EXECUTED_REFUSAL = (
    "may already have executed at Recrypt (maybe_executed): check on recrypt.net whether a "
    "transaction with this idempotency key happened; if it did not, cancel again with "
    "--force; if it did, requeue it (it will commit on ALREADY_EXISTS)"
)


@dataclass(frozen=True)
class Ruling:
    """What an action does to one row: a history decision, or why it does nothing."""

    decision: HistoryDecision | None
    refusal: str | None = None

    @property
    def allowed(self) -> bool:
        return self.decision is not None


def requeue_ruling(state: str) -> Ruling:
    """parked → pending; any other state stays."""
    if state not in REQUEUE_FROM:
        return Ruling(None, f"is {state}, not parked: only parked rows can be requeued")
    return Ruling(HistoryDecision.REQUEUE)


def cancel_ruling(state: str, maybe_executed: bool, *, force: bool, dual_control: bool) -> Ruling:
    """pending/parked → cancelled. A row that may have executed needs ``force``; under dual
    control a forced cancel is a request that a second operator approves or rejects."""
    if state not in CANCEL_FROM:
        wait = " (wait for the call in flight to finish)" if state == State.INFLIGHT else ""
        return Ruling(None, f"is {state}: only pending or parked rows can be cancelled{wait}")
    if not maybe_executed:
        return Ruling(HistoryDecision.CANCEL)
    if not force:
        return Ruling(None, MAYBE_EXECUTED_REFUSAL)
    if dual_control:
        return Ruling(HistoryDecision.CANCEL_REQUESTED)
    return Ruling(HistoryDecision.CANCEL_FORCED)


@dataclass
class ActionTrace:
    """An operator action as its span shows it (``outbox.tracing``): the action, who, the
    NAMES of the filters that selected the rows (never their values: a reference or a lane
    is the customer's text) and, once done, how many rows it took (``counts``)."""

    action: str  # a vocabulary.OperatorAction
    actor: str
    selection: tuple[str, ...]  # filter names, or "key", "keys", "approval", a hold's kind
    counts: dict[str, int] = field(default_factory=dict)


#: Opens an operator action's span around the work; the store calls it, the CLI (for itself
#: and the console) gives ``outbox.tracing.operator_action``. The default traces nothing.
ActionScope = Callable[[ActionTrace], AbstractContextManager[object]]


def untraced(_action: ActionTrace) -> AbstractContextManager[object]:
    return nullcontext()


def person(actor: str) -> str:
    """Who an actor is, whatever host they act from: ``alice@web1`` and ``Alice@web2`` are
    one person (the CLI records ``user@host``; the console its user name)."""
    return actor.rpartition("@")[0].strip().lower() if "@" in actor else actor.strip().lower()


def decider_refusal(requested_by: str, decided_by: str) -> str | None:
    """Dual control: the requester can neither approve nor reject their own request."""
    if person(requested_by) == person(decided_by):
        return (
            f"{decided_by} requested this: a second, different operator must decide it "
            "(dual control)"
        )
    return None


def pretty_json(value: Any) -> str:
    """A payload as indented JSON with sorted keys (text that is not JSON: as it is)."""
    if isinstance(value, str | bytes):
        try:
            value = json.loads(value)
        except ValueError:
            return value if isinstance(value, str) else value.decode("utf-8", "replace")
    return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False)


def payload_diff(first: Any, current: Any) -> list[str]:
    """What changed between the payload as first sent and now, as unified diff lines (empty:
    nothing changed, or the first payload was not kept: a row claimed before migration 0010)."""
    if first is None:
        return []
    before, after = pretty_json(first).splitlines(), pretty_json(current).splitlines()
    diff = difflib.unified_diff(before, after, "first sent", "now", lineterm="", n=2)
    return list(diff)
