"""The store's data: what writers insert, what a worker holds, outcomes, and operator views."""

from __future__ import annotations

import json
from dataclasses import KW_ONLY, dataclass, field
from datetime import datetime
from typing import Any

from outbox.health import JobFailure
from outbox.vocabulary import GateState


@dataclass(frozen=True)
class NewRow:
    """What a writer puts in the outbox (SPEC §3)."""

    idempotency_key: str
    method: str
    payload: dict[str, Any]
    _: KW_ONLY
    lane: str | None = None
    not_before: datetime | None = None
    expires_at: datetime | None = None
    reference: str | None = None
    traceparent: str | None = None


@dataclass(frozen=True, kw_only=True)
class Claim:
    """A row claimed by one worker under a lease. ``payload`` is the raw text from the table."""

    id: int
    idempotency_key: Any  # as stored: validated by the dispatcher, never trusted
    method: str
    payload: Any
    lane: str | None
    attempts: int
    maybe_executed: bool
    worker: str
    stored_fingerprint: str | None  # set at an earlier claim; None on the first claim
    fingerprint: str  # of the method and payload as claimed now (outbox.payload.fingerprint)
    unknown_attempts: int = 0  # attempts so far whose outcome was unknown
    # Why the row cannot even be read as a request (its text is not UTF-8...): the dispatcher
    # parks it bad_row before anything else. The claim itself never fails on one row's data.
    defect: str | None = None
    # When retention purged an earlier row with this key (a tombstone): the key is spent, and
    # the dispatcher parks the row key_reused before any call.
    key_purged_at: datetime | None = None
    # When the row became due (its insertion, or not_before when later): the latency metrics'
    # start. None when the stored times cannot be read as times.
    due_since: datetime | None = None
    # The writer's trace context as stored: untrusted text, parsed by ``outbox.tracing``.
    traceparent: Any = None

    @property
    def payload_changed(self) -> bool:
        """The method or payload differs from what the key was first sent with."""
        return self.stored_fingerprint is not None and self.stored_fingerprint != self.fingerprint


@dataclass(frozen=True)
class HistoryLine:
    """One line of a row's history (the table ``outbox_attempts``): a Recrypt call and its
    answer, a decision the daemon took without one, an operator's action, a stream update.

    The dispatcher, the sweeps and the operator actions make one without ``at`` and
    ``actor``: the store stamps both from the transaction that writes it. Read back
    (``show``, the console), both are set.
    """

    kind: str  # a vocabulary.HistoryKind
    decision: str  # a vocabulary.HistoryDecision (a stream update: the update's name)
    code: str | None = None
    message: str | None = None
    duration_ms: float | None = None
    _: KW_ONLY
    at: datetime | None = None
    actor: str | None = None


@dataclass(frozen=True)
class Committed:
    claim: Claim
    line: HistoryLine
    response: dict[str, Any] | None = None


@dataclass(frozen=True)
class Retry:
    claim: Claim
    line: HistoryLine
    at: datetime
    maybe_executed: bool
    counts_attempt: bool = True
    unknown_outcome: bool = False  # counts toward [retry] max_unknown_attempts


@dataclass(frozen=True)
class Parked:
    claim: Claim
    line: HistoryLine
    reason: str
    maybe_executed: bool = False
    counts_attempt: bool = True


@dataclass(frozen=True)
class HandedBack:
    """Back to pending untouched: no attempt counted (gates, shutdown)."""

    claim: Claim
    line: HistoryLine | None = None
    at: datetime | None = None


Outcome = Committed | Retry | Parked | HandedBack


@dataclass(frozen=True, kw_only=True)
class RowView:
    """A row as operators see it (CLI, JSON)."""

    id: int
    idempotency_key: str
    method: str
    state: str
    attempts: int
    last_code: str | None
    last_message: str | None
    park_reason: str | None
    maybe_executed: bool
    lane: str | None
    reference: str | None
    not_before: datetime | None
    expires_at: datetime | None
    next_attempt_at: datetime | None
    created_at: datetime | None
    updated_at: datetime | None
    committed_at: datetime | None
    lease_owner: str | None
    payload: Any = None
    response: Any = None
    first_payload: Any = None  # as first claimed, if kept (``outbox show``: what changed)


@dataclass(frozen=True, kw_only=True)
class WorkerView:
    worker_id: str
    host: str
    pid: int
    version: str
    started_at: datetime
    last_beat_at: datetime
    gate: str
    gate_reason: str | None
    gate_until: datetime | None
    stopped_at: datetime | None
    gate_since: datetime | None = None  # when the current gate closed (None: open, or unknown)
    refused_methods: tuple[str, ...] = ()  # held: PERMISSION_DENIED outside maintenance
    failing_jobs: tuple[JobFailure, ...] = ()  # background jobs failing at the last beat


@dataclass(frozen=True)
class WorkerBeat:
    worker_id: str
    host: str
    pid: int
    version: str
    started_at: datetime
    gate: str = GateState.OPEN.value
    gate_reason: str | None = None
    gate_until: datetime | None = None
    gate_since: datetime | None = None  # gates.GateView.since
    refused_methods: tuple[str, ...] = ()  # gates.GateView.refused_methods (full gRPC paths)
    failing_jobs: tuple[JobFailure, ...] = ()  # health.JobHealth.failing()


@dataclass(frozen=True)
class RowPage:
    """One page of ``list_rows``: its rows (newest first), how many rows match in all, and
    the keyset cursor of the next page (None: this is the last)."""

    rows: list[RowView]
    total: int
    next_after: int | None = None
    #: ``total`` is a lower bound: more rows match than ``selection.COUNT_CAP`` (counting them
    #: all would read the whole table on a broad filter).
    more_than_total: bool = False


@dataclass(frozen=True)
class Skipped:
    """A row a bulk action left alone, and why (it moved meanwhile, its state, maybe executed)."""

    key: str
    why: str


@dataclass(frozen=True)
class BulkResult:
    """What ``requeue_matching`` / ``cancel_matching`` (and their by-key forms) did."""

    action: str  # requeue | cancel
    matched: int  # rows the filter or keys selected in a state the action takes
    acted: list[str] = field(default_factory=list)  # keys moved
    skipped: list[Skipped] = field(default_factory=list)
    requested: list[tuple[str, int]] = field(default_factory=list)  # dual control: (key, id)
    dry_run: bool = False
    sample: list[str] = field(default_factory=list)  # a dry run: the first keys it would take


@dataclass(frozen=True)
class Hold:
    """A lane or a method an operator held (``outbox_holds``): no daemon claims its rows."""

    kind: str  # a vocabulary.HoldKind
    value: str
    actor: str
    reason: str
    held_at: datetime


@dataclass(frozen=True)
class Held:
    """What the claim leaves out: the held lanes and methods (``Store.held``)."""

    lanes: frozenset[str] = frozenset()
    methods: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Approval:
    """A request for a second operator (dual control), open until decided."""

    id: int
    idempotency_key: str
    action: str  # a vocabulary.ApprovalAction
    requested_by: str
    reason: str
    requested_at: datetime
    decided_by: str | None = None
    decision: str | None = None  # a vocabulary.ApprovalDecision; None: open
    decided_at: datetime | None = None
    note: str | None = None


@dataclass(frozen=True, kw_only=True)
class StatusView:
    counts: dict[str, int]
    oldest_due_at: datetime | None
    parked_by_reason: dict[str, int]
    blocked_lanes: list[str]
    maybe_executed_open: int
    workers: list[WorkerView] = field(default_factory=list)
    leases_expired: int = 0  # rows in flight whose lease has run out
    oldest_lease_expired_at: datetime | None = None  # the earliest such lease end
    holds: list[Hold] = field(default_factory=list)  # lanes and methods operators held
    approvals_open: int = 0  # dual-control requests waiting for a second operator
    #: States whose count is the database's estimate (``outbox.store.counts``: over 10,000).
    estimated: frozenset[str] = frozenset()


@dataclass(frozen=True, kw_only=True)
class RetryingView:
    """Pending rows a human should look at (``outbox check``): rows Recrypt has answered that
    first became due before a time (``long``), and rows with many attempts (``many``)."""

    rows: int = 0  # in either group, each row once
    long: int = 0
    first_due_at: datetime | None = None  # the earliest first-due time among ``long``
    many: int = 0
    most_attempts: int = 0
    code: str | None = None  # the commonest last_code among ``rows``
    code_rows: int = 0  # how many of them have it
    message: str | None = None  # the start of one of their last messages (bounded)


def failures_json(failures: tuple[JobFailure, ...]) -> str | None:
    """The ``outbox_workers.failing_jobs`` column's text: a JSON list, or NULL for none."""
    if not failures:
        return None
    return json.dumps(
        [
            {"job": f.job, "since": f.since.isoformat(), "runs": f.runs, "error": f.error}
            for f in failures
        ]
    )


def failures_from_json(text: str | None) -> tuple[JobFailure, ...]:
    """``failures_json`` read back."""
    return tuple(
        JobFailure(i["job"], datetime.fromisoformat(i["since"]), int(i["runs"]), i["error"])
        for i in json.loads(text or "[]")
    )
