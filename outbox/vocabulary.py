"""The words that cross a boundary, each defined once.

Row states, what an answer does (actions, gates, park reasons), the gate states an operator
sees, the outcomes the metrics count, the gRPC status code names the policy reads, the Recrypt
methods the daemon calls by itself, and what the attempt history says. Metric label sets, CLI
choices, JSON fields, SQL literals and the runbook's tests derive from these
(``tests/unit/test_vocabulary.py`` fails when a member has no metric series or runbook entry).

Pure: no I/O, no gRPC, no SQL.
"""

from __future__ import annotations

import enum


class State(enum.StrEnum):
    """Row states (SPEC §4). Each says who moves a row out of it."""

    PENDING = "pending"  # waiting to be sent; the dispatcher claims it when due
    INFLIGHT = "inflight"  # claimed under a lease; the dispatcher records the outcome
    COMMITTED = "committed"  # terminal: Recrypt answered OK or ALREADY_EXISTS
    PARKED = "parked"  # waits for a human: `outbox requeue` or `outbox cancel`
    CANCELLED = "cancelled"  # terminal: an operator cancelled it
    EXPIRED = "expired"  # terminal: expires_at passed before any attempt could have executed


OPEN_STATES = (State.PENDING, State.INFLIGHT, State.PARKED)
FINISHED_STATES = (State.COMMITTED, State.CANCELLED, State.EXPIRED)


#: States a row can still leave (the lane waits while one of these is ahead).
OPEN_STATES = (State.PENDING, State.INFLIGHT, State.PARKED)
#: Terminal states: only retention removes such a row.
FINISHED_STATES = (State.COMMITTED, State.CANCELLED, State.EXPIRED)


class Action(enum.StrEnum):
    COMMIT = "commit"  # the effect happened exactly once: row committed
    RETRY = "retry"  # resend later with the same key (attempt counted)
    PARK = "park"  # a human must act: row parked
    HAND_BACK = "hand_back"  # row goes back to pending untouched (no attempt counted)


class Gate(enum.StrEnum):
    """What a whole-API answer does to the dispatcher (SPEC §5; applied by the dispatcher)."""

    NONE = "none"
    ROLLOVER = "rollover"  # UNAVAILABLE vgw-db: the whole dispatcher backs off
    MAINTENANCE = "maintenance"  # PERMISSION_DENIED: pause, probe Core.MaintenanceCheck
    UNAUTHENTICATED = "unauthenticated"  # key refused: halt, re-probe slowly, SIGHUP retries
    RATE_LIMITED = "rate_limited"  # RESOURCE_EXHAUSTED without a number: throttle
    UNREACHABLE = "unreachable"  # our client could not connect (network, TLS): back off
    METHOD_REMOVED = "method_removed"  # NOT_FOUND: stop sending that method


class GateState(enum.StrEnum):
    """The dispatcher's gate as status, logs, ``outbox_workers.gate`` and metrics show it.

    ``open`` sends normally; each other state is the ``Gate`` of the answer that closed it.
    (``Gate.METHOD_REMOVED`` holds one method, never the whole gate.)
    """

    OPEN = "open"
    RATE_LIMITED = Gate.RATE_LIMITED.value
    UNREACHABLE = Gate.UNREACHABLE.value
    ROLLOVER = Gate.ROLLOVER.value
    MAINTENANCE = Gate.MAINTENANCE.value
    UNAUTHENTICATED = Gate.UNAUTHENTICATED.value


class ParkReason(enum.StrEnum):
    """Why a row waits for a human; docs/operations.md says what to do for each."""

    PRECONDITION = "precondition"  # compliance question or transaction limit
    OBJECT_LIMIT = "object_limit"  # RESOURCE_EXHAUSTED with a number
    METHOD_REMOVED = "method_removed"  # NOT_FOUND: the API was deprecated and removed
    REJECTED = "rejected"  # UNIMPLEMENTED / INVALID_ARGUMENT / OUT_OF_RANGE
    BAD_ROW = "bad_row"  # the row's data can never be sent as it is
    PAYLOAD_CHANGED = "payload_changed"  # method or payload edited after the first send
    KEY_REUSED = "key_reused"  # the key of a row retention purged: Recrypt may still hold it
    UNKNOWN_OUTCOME = "unknown_outcome"  # too many attempts whose outcome we cannot know
    EXPIRED_UNKNOWN = "expired_unknown"  # expires_at passed after a maybe-executed attempt


class ReportColumn(enum.StrEnum):
    """The columns of ``outbox report`` (reconciliation), each a count and a sum of amounts.

    The four state columns split a line's rows: each row is in exactly one. ``in_doubt`` is
    not a fifth state but a part of them: rows that may have executed at Recrypt
    (``maybe_executed``) and are not committed (parked or cancelled ones). Never add it to the
    others; docs/operations.md ("Reconciliation") says how finance matches a statement.
    """

    COMMITTED = "committed"  # Recrypt executed it: on Recrypt's statement
    PARKED = "parked"  # waits for a human: not on the statement unless in doubt
    EXPIRED = "expired"  # expires_at passed before any attempt could have executed
    CANCELLED = "cancelled"  # an operator cancelled it
    IN_DOUBT = "in_doubt"  # of the parked and cancelled: may be on the statement


#: The state columns: each finished row falls in exactly one of them.
REPORT_STATES = (
    ReportColumn.COMMITTED,
    ReportColumn.PARKED,
    ReportColumn.EXPIRED,
    ReportColumn.CANCELLED,
)


class RowOutcome(enum.StrEnum):
    """What one answer did to its row, as ``outbox_outcomes_total{outcome}`` counts it."""

    COMMITTED = "committed"
    RETRY = "retry"
    PARKED = "parked"
    HANDED_BACK = "handed_back"
    LOST = "lost"  # the answer came after another worker had taken the row (kept as evidence)


class Code(enum.StrEnum):
    """gRPC's canonical status codes by name, as Recrypt's guide writes them.

    The policy matches on these names, so it needs no gRPC import; ``grpc.StatusCode`` members
    (and these) are read through their ``name``.
    """

    OK = "OK"
    CANCELLED = "CANCELLED"
    UNKNOWN = "UNKNOWN"
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    NOT_FOUND = "NOT_FOUND"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    ABORTED = "ABORTED"
    OUT_OF_RANGE = "OUT_OF_RANGE"
    UNIMPLEMENTED = "UNIMPLEMENTED"
    INTERNAL = "INTERNAL"
    UNAVAILABLE = "UNAVAILABLE"
    DATA_LOSS = "DATA_LOSS"
    UNAUTHENTICATED = "UNAUTHENTICATED"


class RecryptMethod(enum.StrEnum):
    """The Recrypt methods the daemon itself knows by name (every other one comes from a row)."""

    MAINTENANCE_CHECK = "/recrypt.core.v1.Core/MaintenanceCheck"  # the gates' probe
    PLACE_ORDER = "/recrypt.market.v1.Market/PlaceOrder"  # rollover-sensitive by default
    CANCEL_ORDER = "/recrypt.market.v1.Market/CancelOrder"  # rollover-sensitive by default
    STREAM_ORDER_UPDATES = "/recrypt.market.v1.Market/StreamOrderUpdates"  # the follower's


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
    # dual control ([console] dual_control): a forced cancel is a request a second operator decides
    CANCEL_REQUESTED = "cancel_requested"  # an operator asked to cancel a maybe-executed row
    CANCEL_APPROVED = "cancel_approved"  # a second operator approved it: the row was cancelled
    CANCEL_REJECTED = "cancel_rejected"  # a second operator rejected it: the row stays


class HoldKind(enum.StrEnum):
    """What an operator can hold (``outbox hold``): no daemon claims the rows it covers."""

    LANE = "lane"  # every row of one lane
    METHOD = "method"  # every row of one gRPC method (its full path)


class ApprovalAction(enum.StrEnum):
    """Actions that need a second operator under dual control (``outbox_approvals.action``)."""

    CANCEL_FORCED = "cancel_forced"  # cancel a row that may have executed at Recrypt


class ApprovalDecision(enum.StrEnum):
    """How a request for a second operator ended (``outbox_approvals.decision``; NULL: open)."""

    APPROVED = "approved"  # done: the action was carried out
    REJECTED = "rejected"  # not done


class SpanEvent(enum.StrEnum):
    """The events of a send attempt's span (``outbox.tracing``; README, "Tracing")."""

    CLAIMED = "claimed"  # the row was claimed (at the claim's time: the span's start)
    GATE_CHANGED = "gate_changed"  # this batch's answers changed the gate (attribute: the gate)
    PARKED = "parked"  # the attempt parked the row (attribute: the reason)
    RECORDED = "recorded"  # the outcome is durable (attribute: the outcome); the span ends
    LOST = "lost"  # another worker held the row by then: the answer is kept as late_answer
    RECORD_FAILED = "record_failed"  # the database refused the record: answers kept in memory
    ABANDONED = "abandoned"  # the cycle failed before its answers (the reaper resends the row)


class OperatorAction(enum.StrEnum):
    """An operator's action, from the CLI or the console, as its span names it."""

    REQUEUE = "requeue"
    CANCEL = "cancel"
    HOLD = "hold"
    RELEASE = "release"
    APPROVE = "approve"
    REJECT = "reject"
