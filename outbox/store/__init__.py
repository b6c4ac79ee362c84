"""The store: every SQL statement of the outbox lives in this package, as named operations.

Each state transition is one guarded UPDATE: the expected state (and, for a claimed row, the
lease owner) is in the WHERE clause, and the affected row count tells a stale worker that it
lost the row instead of letting it overwrite a newer outcome (River's ``…IfRunning`` pattern).
The store knows rows and states; it never knows gRPC.

``Store`` is the index of the operations, grouped by caller; each module implements one group:

- ``claims``: the dispatcher's claim; ``record`` and ``transitions``: its outcomes
- ``heads``: lane heads (which row of a lane may be claimed)
- ``sweeps``: the reaper, the expirer and retention; ``workers``: the daemons' beats
- ``operator``: requeue, cancel, approve and reject; ``bulk``: the same on many rows;
  ``approvals``: dual control's requests; ``holds``: held lanes and methods
- ``views``: reading; ``selection``: filters, pages, finding a row; ``plans``: EXPLAIN
- ``report``: reconciliation's streamed read of finished rows (``outbox report``)
- ``enqueue``: writers' inserts; ``history``: history lines; ``tx``: transactions, retries
- ``rows``: the data the operations take and return; ``listener``: PostgreSQL wake-ups

The store may import ``outbox.schema``, ``outbox.payload``, ``outbox.errors``,
``outbox.vocabulary``, ``outbox.clock``, ``outbox.health``, ``outbox.logs``,
``outbox.backoff``, ``outbox.filters``, ``outbox.operations`` and ``outbox.report`` (its
records); never gRPC, the dispatcher, the daemon or the CLI.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from functools import partial

from sqlalchemy.engine import Engine

from outbox.filters import RowFilter
from outbox.operations import ActionScope, ActionTrace, untraced
from outbox.report import FinishedRow
from outbox.store import (
    approvals,
    bulk,
    claims,
    console_views,
    holds,
    operator,
    plans,
    selection,
    sweeps,
    views,
    workers,
)
from outbox.store import heads as lane_heads
from outbox.store import record as recording
from outbox.store import report as reconciliation
from outbox.store.enqueue import enqueue_row, new_key
from outbox.store.operator import Act
from outbox.store.rows import (
    Approval,
    BulkResult,
    Claim,
    Committed,
    HandedBack,
    Held,
    HistoryLine,
    Hold,
    NewRow,
    Outcome,
    Parked,
    Retry,
    RetryingView,
    RowPage,
    RowView,
    Skipped,
    StatusView,
    WorkerBeat,
    WorkerView,
)
from outbox.store.selection import AmbiguousRowError
from outbox.store.tx import lock_lane, read, retry_transient, transient, write
from outbox.vocabulary import OperatorAction, State

__all__ = [
    "AmbiguousRowError",
    "Approval",
    "BulkResult",
    "Claim",
    "Committed",
    "HandedBack",
    "Held",
    "HistoryLine",
    "Hold",
    "NewRow",
    "Outcome",
    "Parked",
    "Retry",
    "RetryingView",
    "RowFilter",
    "RowPage",
    "RowView",
    "Skipped",
    "StatusView",
    "Store",
    "WorkerBeat",
    "WorkerView",
    "enqueue_row",
    "lock_lane",
    "new_key",
    "retry_transient",
]

_transient = transient  # its name before the split (tests/unit/test_payload.py)


class Store:
    """Named operations over one engine. Each public method is one transaction; those that
    write are run again when they lost a lock race (``tx.write``)."""

    def __init__(self, engine: Engine, *, actions: ActionScope = untraced) -> None:
        """``actions`` opens a span around each operator action (the CLI gives
        ``outbox.tracing.operator_action``); the store itself knows no tracing."""
        self.engine = engine
        self.dialect = engine.dialect.name
        self._claimer = claims.Claimer(engine)
        self._holds = holds.HoldsCache(self.holds)
        self._actions = actions

    # ---- the dispatcher: claims and outcomes (claims.py, record.py)

    def claim_due(
        self,
        worker: str,
        batch: int,
        lease: float,
        now: datetime,
        *,
        exclude_methods: Collection[str] = (),
        exclude_lanes: Collection[str] = (),
    ) -> list[Claim]:
        """Up to ``batch`` due rows, claimed under a lease for ``worker`` (``claims``), none
        of ``exclude_methods`` (gates, holds) nor of ``exclude_lanes`` (holds)."""
        return self._claimer.claim_due(
            worker, batch, lease, now, exclude_methods=exclude_methods, exclude_lanes=exclude_lanes
        )

    def held(self) -> Held:
        """The lanes and methods operators hold, for the claim: read at most every
        ``holds.HOLDS_MAX_AGE`` seconds (well within one poll); changes are logged."""
        return self._holds.current()

    def record(self, outcomes: Sequence[Outcome], now: datetime) -> list[Outcome]:
        """Record a batch of outcomes; returns those whose row was lost to another worker."""
        return recording.record(self.engine, outcomes, now)

    def renew_leases(self, worker: str, ids: Collection[int], lease: float, now: datetime) -> int:
        """Extend the lease of rows this worker still holds (long calls)."""
        return write(self.engine, recording.renew_leases, worker, ids, lease, now) if ids else 0

    def hand_back(self, worker: str, ids: Collection[int], now: datetime) -> int:
        """Rows this worker claimed and never sent go back to pending untouched."""
        return write(self.engine, recording.hand_back, worker, ids, now) if ids else 0

    def record_late_answers(self, late: Sequence[Outcome], now: datetime) -> None:
        """Answers for rows this worker lost: history lines, a late OK commits."""
        write(self.engine, recording.record_late_answers, late, now)

    # ---- the follower (record.py)

    def record_stream_event(self, key: str, event: HistoryLine, now: datetime) -> bool:
        """Attach a server stream's event to the row with that key; False: no such row."""
        return write(self.engine, recording.record_stream_event, key, event, now)

    # ---- the lane keeper (heads.py)

    def sort_lanes(self, limit: int = lane_heads.SORT_LIMIT) -> int:
        """Sort up to ``limit`` laned rows no daemon has sorted yet (each claim does it too)."""
        return write(self.engine, lane_heads.sort_new_rows, limit)

    def settle_lanes(self) -> int:
        """Release the first waiting row of every lane whose earlier rows were all finished
        outside the daemon (``heads.settle_waiting_lanes``); how many."""
        return write(self.engine, lane_heads.settle_waiting_lanes)

    # ---- the reaper, the expirer, retention (sweeps.py, workers.py)

    def release_expired_leases(
        self, now: datetime, limit: int = 500, *, max_unknown_attempts: int = 10
    ) -> list[str]:
        """Rows whose lease ran out: resent (their keys are returned), or parked."""
        release = sweeps.release_expired_leases
        return write(self.engine, release, now, limit, max_unknown_attempts=max_unknown_attempts)

    def expire_due(self, now: datetime, limit: int = 500) -> tuple[int, int]:
        """Pending rows past ``expires_at``: (expired, parked)."""
        return write(self.engine, sweeps.expire_due, now, limit)

    def purge_finished(
        self, older_than: datetime, batch: int, *, now: datetime | None = None
    ) -> int:
        """Delete one batch of finished rows, leaving a tombstone per key."""
        return write(self.engine, sweeps.purge_finished, older_than, batch, now=now)

    def purge_tombstones(self, older_than: datetime, batch: int) -> int:
        """Delete one batch of tombstones of keys purged before ``older_than``."""
        return write(self.engine, sweeps.purge_tombstones, older_than, batch)

    def purge_workers(self, silent_since: datetime) -> int:
        """Delete workers silent since before ``silent_since``."""
        return write(self.engine, workers.purge_workers, silent_since)

    # ---- the daemon's heartbeat (workers.py, views.py)

    def heartbeat(self, beat: WorkerBeat, now: datetime) -> None:
        write(self.engine, workers.heartbeat, beat, now)

    def worker_stopped(self, worker_id: str, now: datetime) -> None:
        write(self.engine, workers.worker_stopped, worker_id, now)

    def database_now(self) -> datetime:
        """The database server's clock (UTC): the one clock every daemon shares."""
        return read(self.engine, views.database_now)

    # ---- operators (operator.py, bulk.py, approvals.py, holds.py)

    def requeue(self, key: str, actor: str, reason: str, now: datetime) -> RowView:
        """parked → pending, same key, due now; its unknown outcomes are counted afresh."""
        with self._acting(OperatorAction.REQUEUE, actor, ("key",)) as action:
            write(self.engine, operator.requeue, key, actor, reason, now)
            action.counts["acted"] = 1
        return self.get(key)

    def cancel(
        self,
        key: str,
        actor: str,
        reason: str,
        now: datetime,
        force: bool,
        *,
        dual_control: bool = False,
    ) -> RowView:
        """pending/parked → cancelled. Refuses a row that may have executed unless ``force``;
        under ``dual_control`` a forced one becomes a request (``approve``, ``reject``)."""
        cancel = operator.cancel
        with self._acting(OperatorAction.CANCEL, actor, ("key",)) as action:
            write(
                self.engine, cancel, key, actor, reason, now, force=force, dual_control=dual_control
            )
            row = self.get(key)  # under dual control a forced cancel is only requested
            action.counts["acted" if row.state == State.CANCELLED else "requested"] = 1
        return row

    def requeue_keys(
        self, keys: Sequence[str], actor: str, reason: str, now: datetime, *, dry_run: bool = False
    ) -> BulkResult:
        """``requeue`` of each key; a row that cannot be requeued is skipped, with why."""
        act = Act("requeue", actor, reason, now)
        return self._bulk(act, ("keys",), dry_run, partial(bulk.by_keys, self.engine, keys, act))

    def cancel_keys(
        self,
        keys: Sequence[str],
        actor: str,
        reason: str,
        now: datetime,
        *,
        force: bool = False,
        dual_control: bool = False,
        dry_run: bool = False,
    ) -> BulkResult:
        """``cancel`` of each key; a row that cannot be cancelled is skipped, with why."""
        act = Act("cancel", actor, reason, now, force, dual_control)
        return self._bulk(act, ("keys",), dry_run, partial(bulk.by_keys, self.engine, keys, act))

    def requeue_matching(
        self, wanted: RowFilter, actor: str, reason: str, now: datetime, *, dry_run: bool = False
    ) -> BulkResult:
        """Requeue every parked row matching ``wanted``, in batches (``bulk``)."""
        act = Act("requeue", actor, reason, now)
        run = partial(bulk.by_filter, self.engine, wanted, act)
        return self._bulk(act, tuple(wanted.given()), dry_run, run)

    def cancel_matching(
        self,
        wanted: RowFilter,
        actor: str,
        reason: str,
        now: datetime,
        *,
        force: bool = False,
        dual_control: bool = False,
        dry_run: bool = False,
    ) -> BulkResult:
        """Cancel every pending or parked row matching ``wanted``, in batches (``bulk``)."""
        act = Act("cancel", actor, reason, now, force, dual_control)
        run = partial(bulk.by_filter, self.engine, wanted, act)
        return self._bulk(act, tuple(wanted.given()), dry_run, run)

    def approve(self, approval_id: int, actor: str, reason: str, now: datetime) -> Approval:
        """Dual control: a second, different operator approves; the action is carried out."""
        with self._acting(OperatorAction.APPROVE, actor, ("approval",)) as action:
            done = write(self.engine, operator.approve, approval_id, actor, reason, now)
            action.counts["acted"] = 1
        return done

    def reject(self, approval_id: int, actor: str, reason: str, now: datetime) -> Approval:
        """Dual control: a second, different operator rejects; the row stays as it is."""
        with self._acting(OperatorAction.REJECT, actor, ("approval",)):
            return write(self.engine, operator.reject, approval_id, actor, reason, now)

    def approvals(self, *, open_only: bool = True) -> list[Approval]:
        """Dual control's requests, newest first (open ones only, unless told)."""
        return read(self.engine, approvals.list_requests, open_only=open_only)

    def hold(self, kind: str, value: str, actor: str, reason: str, now: datetime) -> Hold:
        """Hold a lane or a method (``vocabulary.HoldKind``): no daemon claims its rows."""
        with self._acting(OperatorAction.HOLD, actor, (kind,)):
            made = write(self.engine, holds.add, Hold(kind, value, actor, reason, now))
        self._holds.forget()
        return made

    def release(self, kind: str, value: str, actor: str, reason: str) -> Hold:
        """Release a hold; returns the hold released."""
        with self._acting(OperatorAction.RELEASE, actor, (kind,)):
            gone = write(self.engine, holds.remove, kind, value, actor, reason)
        self._holds.forget()
        return gone

    @contextmanager
    def _acting(
        self, action: OperatorAction, actor: str, selection: tuple[str, ...]
    ) -> Iterator[ActionTrace]:
        """Around one operator action: its span when traced (filter names, never values)."""
        trace = ActionTrace(action, actor, selection)
        with self._actions(trace):
            yield trace

    def _bulk(
        self, act: Act, selection: tuple[str, ...], dry_run: bool, run: Callable[..., BulkResult]
    ) -> BulkResult:
        """A bulk action (``run(dry_run=…)``); a dry run only reads, and makes no span."""
        if dry_run:
            preview: BulkResult = run(dry_run=True)
            return preview
        with self._acting(OperatorAction(act.action), act.actor, selection) as action:
            result: BulkResult = run(dry_run=False)
            action.counts.update(bulk.counts(result))
        return result

    def holds(self) -> list[Hold]:
        return read(self.engine, holds.list_holds)

    # ---- reading: the CLI, the gauges, ``outbox check`` (views.py)

    def get(self, key: str) -> RowView:
        return read(self.engine, views.get, key)

    def history(self, key: str) -> list[HistoryLine]:
        return read(self.engine, views.history, key)

    def find_row(self, text: str) -> RowView:
        """The row ``text`` names: its key in any case, a unique key prefix (8+ characters)
        or a reference; several: ``selection.AmbiguousRowError`` with the candidates."""
        return read(self.engine, selection.find_row, text)

    def list_rows(
        self, wanted: RowFilter | None = None, *, after: int | None = None, limit: int = 50
    ) -> RowPage:
        """A page of rows matching ``wanted``, newest first, below the keyset cursor
        ``after``; with the total matching and the next page's cursor."""
        return read(self.engine, selection.list_rows, wanted or RowFilter(), after, limit)

    def count_rows(self, wanted: RowFilter | None = None) -> int:
        return read(self.engine, selection.count_rows, wanted or RowFilter())

    def status(self, now: datetime) -> StatusView:
        return read(self.engine, views.status, now)

    def list_workers(self) -> list[WorkerView]:
        return read(self.engine, views.list_workers)

    def retrying(self, due_before: datetime, attempts: int) -> RetryingView:
        """Pending rows answered long ago or attempted many times (``views.retrying``)."""
        return read(self.engine, views.retrying, due_before, attempts)

    # ---- finance: reconciliation (report.py)

    def finished_rows(
        self, since: datetime, until: datetime, *, chunk: int = reconciliation.CHUNK
    ) -> Iterator[FinishedRow]:
        """Rows committed, parked, expired or cancelled in ``[since, until)`` (by
        ``updated_at``), streamed in chunks: ``outbox.report.build_report`` reads them."""
        return reconciliation.finished_rows(self.engine, since, until, chunk)

    def explain_finished_rows(self, since: datetime, until: datetime) -> str:
        """The database's plan for ``finished_rows`` (docs/scaling.md quotes PostgreSQL's)."""
        sql = plans.written(self.engine, reconciliation.finished_query(since, until))
        return plans.explain(self.engine, sql, analyze=False)

    # ---- plans, for tests and ops (plans.py)

    def claim_sql(self, batch: int, now: datetime) -> str:
        """The claim's row selection as this database runs it, values written in."""
        return plans.claim_sql(self.engine, batch, now)

    def oldest_due_sql(self, now: datetime) -> str:
        """The "oldest due" gauge's query (``status``), values written in."""
        return plans.oldest_due_sql(self.engine, now)

    def explain_claim(self, batch: int, now: datetime, *, analyze: bool = False) -> str:
        """The database's plan for the claim's row selection (``plans.explain``)."""
        return plans.explain(self.engine, self.claim_sql(batch, now), analyze=analyze)

    def explain_oldest_due(self, now: datetime, *, analyze: bool = False) -> str:
        """The database's plan for the "oldest due" gauge (as ``explain_claim``)."""
        return plans.explain(self.engine, self.oldest_due_sql(now), analyze=analyze)

    def explain_expired_leases(self, now: datetime) -> str:
        """The database's plan for the expired-lease count (``status``, the gauges)."""
        return plans.explain(self.engine, plans.expired_leases_sql(self.engine, now), analyze=False)

    def explain_retrying(self, due_before: datetime, attempts: int) -> str:
        """The database's plan for ``retrying`` (all three databases), for tests and ops."""
        sql = plans.retrying_sql(self.engine, due_before, attempts)
        return plans.explain(self.engine, sql, analyze=False)

    # ---- the console (outbox/console/): pages over many rows

    def find_rows(self, wanted: console_views.RowFilter, limit: int = 50) -> console_views.RowPage:
        """One page of rows matching ``wanted``, by keyset (the console's Rows page)."""
        return read(self.engine, console_views.find_rows, wanted, limit)

    def activity(self, start: datetime, minutes: int) -> console_views.Activity:
        """Committed / parked / retried history lines per minute since ``start``."""
        return read(self.engine, console_views.activity, start, minutes)

    def blocked_lanes(self, limit: int = 100) -> list[console_views.BlockedLane]:
        """Each lane held by a parked row: that row, and how many rows wait behind it."""
        return read(self.engine, console_views.blocked_lanes, limit)
