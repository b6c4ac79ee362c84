"""The dispatcher: claim due rows → send each with its key → record what the answer means.

It never writes SQL (the store does) and never interprets a status code itself (the policy
does). One ``run_once`` is one cycle; the daemon's scheduler calls ``drain`` when a poll is due
or a wake-up arrives.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

import grpc
from google.protobuf import message

from outbox import policy
from outbox.backoff import Backoff
from outbox.client import Answer, ClientSlot, Metadata, RecryptClient
from outbox.clock import utcnow
from outbox.descriptors import Catalog, Method, build_request, response_to_json
from outbox.errors import BadRowError
from outbox.gates import Gates, gate_rank
from outbox.payload import check_key, parse_payload
from outbox.policy import Action, Decision, Gate
from outbox.store import Claim, Committed, HandedBack, HistoryLine, Outcome, Parked, Retry, Store
from outbox.tracing import Attempt, Tracing
from outbox.vocabulary import HistoryDecision, HistoryKind, RowOutcome, SpanEvent

log = logging.getLogger("outbox.dispatcher")

MAINTENANCE_CHECK = "/recrypt.core.v1.Core/MaintenanceCheck"


@dataclass(frozen=True)
class DispatchSettings:
    batch_size: int = 100
    lease: float = 60.0
    backoff: Backoff = field(default_factory=Backoff)
    max_unknown_attempts: int = 10
    maintenance_check: str = MAINTENANCE_CHECK
    pipelines: int = 1  # cycles run in parallel by drain(): calls in flight while others record
    connect_timeout: float = 5.0  # how long a batch waits for a connection before handing back
    #: answers not yet recorded (database away) above which no new rows are claimed
    max_unrecorded: int | None = None  # None: one batch

    @property
    def unrecorded_limit(self) -> int:
        return self.max_unrecorded if self.max_unrecorded is not None else self.batch_size


@dataclass
class CycleReport:
    """What one cycle did, for logs, metrics and tests."""

    claimed: int = 0
    outcomes: list[Outcome] = field(default_factory=list)  # recorded (ours)
    lost: list[Outcome] = field(default_factory=list)  # another worker owns the row now
    unrecorded: int = 0  # answers kept in memory: the database refused the record


@dataclass(frozen=True)
class Answered:
    """An outcome decided and not yet recorded, with the answer it came from (None: no call)
    and, when traced, the attempt's span (ended once the record is durable, or refused)."""

    outcome: Outcome
    answer: Answer | None
    span: Attempt | None = None


#: What each outcome is called in metrics and spans.
OUTCOME_NAMES: Mapping[type, RowOutcome] = {
    Committed: RowOutcome.COMMITTED,
    Retry: RowOutcome.RETRY,
    Parked: RowOutcome.PARKED,
    HandedBack: RowOutcome.HANDED_BACK,
}


#: Told once per outcome, after it is recorded (``lost``: another worker owned the row).
Observer = Callable[[Claim, Answer | None, Outcome], None]
LostObserver = Callable[[Outcome], None]


class Dispatcher:
    def __init__(
        self,
        store: Store,
        client: RecryptClient,
        catalog: Catalog,
        gates: Gates,
        *,
        worker_id: str,
        settings: DispatchSettings,
        clock: Callable[[], datetime] = utcnow,
        rng: random.Random | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        self.store = store
        self.tracing = tracing or Tracing()  # off: ``tracing.on`` is checked once per batch
        self.clients = ClientSlot(client)
        self.catalog = catalog
        self.gates = gates
        self.worker_id = worker_id
        self.settings = settings
        self.clock = clock
        self._rng = rng or random.Random()
        self._observers: list[Observer] = []
        self._lost_observers: list[LostObserver] = []
        self._cycle_hooks: list[Callable[[], None]] = []
        self._record_hooks: list[Callable[[Exception | None], None]] = []
        self._inflight: set[int] = set()  # claimed by us and not yet recorded
        self._unsent: set[int] = set()  # claimed by us, no call started: safe to hand back
        self._inflight_lock = threading.Lock()
        self._unrecorded: list[Answered] = []  # answers the database refused to record
        self._record_lock = threading.Lock()
        self.cycles = 0  # completed cycles: the daemon's watchdog reads it

    @property
    def client(self) -> RecryptClient:
        """The client new calls use (a reload replaces it through ``clients``)."""
        return self.clients.current

    def after_cycle(self, hook: Callable[[], None]) -> None:
        """Called after every cycle, from the thread doing the work (the systemd watchdog)."""
        self._cycle_hooks.append(hook)

    def after_record(self, hook: Callable[[Exception | None], None]) -> None:
        """Told after each attempt to record answers: the error, or None once recorded. With a
        hook, a refused record is logged by it (the daemon: once, then at a bounded rate)."""
        self._record_hooks.append(hook)

    def observe(self, observer: Observer, lost: LostObserver | None = None) -> None:
        """Called once per recorded outcome (logging and metrics hook here), after the record;
        ``lost`` once per outcome whose row another worker had taken over."""
        self._observers.append(observer)
        if lost is not None:
            self._lost_observers.append(lost)

    # ---- the cycle

    def drain(self, stop: threading.Event | None = None) -> int:
        """Run cycles while full batches keep coming; returns rows claimed in total.

        With ``pipelines`` > 1, that many loops run at once: while one waits for the database,
        the others' calls are in flight. The gate's reservations keep the total in bounds.
        """
        if self.settings.pipelines == 1:
            return self._drain_loop(stop)
        with ThreadPoolExecutor(self.settings.pipelines - 1) as pool:
            others = [
                pool.submit(self._drain_loop, stop) for _ in range(self.settings.pipelines - 1)
            ]
            total = self._drain_loop(stop)
            return total + sum(f.result() for f in others)

    def _drain_loop(self, stop: threading.Event | None) -> int:
        total = 0
        while stop is None or not stop.is_set():
            report = self.run_once()
            total += report.claimed
            if report.claimed < self.settings.batch_size:
                break
        return total

    def run_once(self) -> CycleReport:
        """Record what is still unrecorded; then, while that backlog is small, one batch."""
        report = CycleReport()
        self.flush(report)
        now = self.clock()
        if self.unrecorded() < self.settings.unrecorded_limit:
            granted = self.gates.acquire(now, self.settings.batch_size)
            try:
                if granted > 0:
                    self._cycle(granted, now, report)
            finally:
                self.gates.release(granted)
        report.unrecorded = self.unrecorded()
        with self._inflight_lock:
            self.cycles += 1
        for hook in self._cycle_hooks:
            hook()
        return report

    def _cycle(self, granted: int, now: datetime, report: CycleReport) -> None:
        held = self.store.held()  # operators' holds (`outbox hold`), read at most twice a poll
        claims = self.store.claim_due(
            self.worker_id,
            granted,
            self.settings.lease,
            now,
            exclude_methods=(*self.gates.excluded_methods(now), *held.methods),
            exclude_lanes=held.lanes,
        )
        claimed_ns = time.time_ns()
        report.claimed = len(claims)
        if not claims:
            return
        log.debug("event=claimed worker=%s rows=%d", self.worker_id, len(claims))
        ids = [c.id for c in claims]
        with self._inflight_lock:
            self._inflight.update(ids)
            self._unsent.update(ids)
        try:
            answered = self._send(claims, claimed_ns)
        except Exception:
            self._abandon(ids)
            raise
        self._record(answered, report)

    def _abandon(self, ids: list[int]) -> None:
        """A cycle failed before its answers: hand back what was never sent; the rest (calls
        that may have started) stays ``inflight`` for the reaper, an unknown outcome."""
        with self._inflight_lock:
            unsent = sorted(self._unsent.intersection(ids))
        self._release(ids)
        try:
            self.store.hand_back(self.worker_id, unsent, self.clock())
        except Exception as exc:  # the reaper releases them after one lease
            log.error("event=hand_back_failed rows=%d error=%s", len(unsent), type(exc).__name__)

    def inflight_ids(self) -> list[int]:
        """Rows this worker holds right now (the lease renewer extends them)."""
        with self._inflight_lock:
            return sorted(self._inflight)

    def unsent_ids(self) -> list[int]:
        """Rows claimed by this worker whose call never started: the only ones a stop may
        hand back untouched."""
        with self._inflight_lock:
            return sorted(self._unsent)

    def unrecorded(self) -> int:
        """Answers received and not yet recorded (the database refused them so far)."""
        with self._record_lock:
            return len(self._unrecorded)

    def unrecorded_keys(self) -> list[str]:
        with self._record_lock:
            return [str(a.outcome.claim.idempotency_key) for a in self._unrecorded]

    # ---- recording: record first, then tell observers

    def flush(self, report: CycleReport | None = None) -> bool:
        """Record the answers kept in memory; True when none is left."""
        with self._record_lock:
            backlog, self._unrecorded = self._unrecorded, []
        if backlog:
            self._record(backlog, report or CycleReport())
        return self.unrecorded() == 0

    def _record(self, answered: list[Answered], report: CycleReport) -> None:
        """Record a batch; if the database refuses, keep every answer to record it again."""
        if not answered:
            return
        try:
            lost = self.store.record([a.outcome for a in answered], self.clock())
        except Exception as exc:  # any failure: nothing of this batch is known to be recorded
            self._keep(answered, exc)
            return
        for hook in self._record_hooks:
            hook(None)
        lost_ids = {id(o) for o in lost}
        if self.tracing.on:
            _end_recorded(answered, lost_ids)
        ours = [a for a in answered if id(a.outcome) not in lost_ids]
        self._release([a.outcome.claim.id for a in answered])
        report.outcomes += [a.outcome for a in ours]
        report.lost += lost
        for a in ours:
            self._emit(a.outcome.claim, a.answer, a.outcome)
        self._late(lost)

    def _keep(self, answered: list[Answered], exc: Exception) -> None:
        if self.tracing.on:  # each span ends now, saying so: a later record has none
            answered = _end_unrecorded(answered, type(exc).__name__)
        with self._record_lock:
            self._unrecorded.extend(answered)
            held = len(self._unrecorded)
        for hook in self._record_hooks:
            hook(exc)
        log.log(
            logging.DEBUG if self._record_hooks else logging.ERROR,  # a hook logs it, rate-bound
            "event=record_failed worker=%s rows=%d unrecorded=%d error=%s then=%s",
            self.worker_id,
            len(answered),
            held,
            type(exc).__name__,
            "answers kept in memory and recorded again before any new claim",
        )

    def _release(self, ids: list[int]) -> None:
        with self._inflight_lock:
            self._inflight.difference_update(ids)
            self._unsent.difference_update(ids)

    def _late(self, lost: Sequence[Outcome]) -> None:
        """Answers for rows another worker took over: still evidence of what executed."""
        if not lost:
            return
        for outcome in lost:
            for observer in self._lost_observers:
                observer(outcome)
        self._report_lost(lost)
        try:
            self.store.record_late_answers(lost, self.clock())
        except Exception as exc:  # evidence only: the row itself is in another worker's hands
            log.error(
                "event=late_answer_unrecorded worker=%s rows=%d error=%s",
                self.worker_id,
                len(lost),
                type(exc).__name__,
            )

    # ---- sending

    def _send(self, claims: Sequence[Claim], claimed_ns: int) -> list[Answered]:
        answered: list[Answered] = []
        ready: list[tuple[Claim, Method, message.Message]] = []
        for claim in claims:
            try:
                ready.append((claim, *self._prepare(claim)))
            except BadRowError as exc:
                answered.append(Answered(self._bad_row(claim, exc), None))
        log.debug("event=sent worker=%s rows=%d", self.worker_id, len(ready))
        if not self.tracing.on:
            return answered + self._answers(ready, None)
        spans = self._attempts(claims, ready, claimed_ns)
        try:
            return _traced(answered + self._answers(ready, spans), spans)
        except Exception:  # no span is left open: the cycle is abandoned (``_abandon``)
            _end_all(spans.values(), SpanEvent.ABANDONED)
            raise

    def _answers(
        self, ready: Sequence[tuple[Claim, Method, message.Message]], spans: _Spans | None
    ) -> list[Answered]:
        """Send the calls, decide each answer, fold the batch's gate effect in."""
        metadata = None if spans is None else [spans[c.id].metadata for c, _m, _r in ready]
        with self.clients.use() as client:
            replies = self._send_on(client, ready, metadata)
        decided = [
            (claim, method, answer, _decision(answer))
            for (claim, method, _request), answer in zip(ready, replies, strict=True)
        ]
        gate = self._fold_gates(decided)
        if spans is not None and gate is not None:
            for claim, _m, _a, _d in decided:
                spans[claim.id].event(SpanEvent.GATE_CHANGED, {"outbox.gate": gate})
        return [
            Answered(self._outcome(claim, answer, decision), answer)
            for claim, _m, answer, decision in decided
        ]

    def _attempts(
        self,
        claims: Sequence[Claim],
        ready: Sequence[tuple[Claim, Method, message.Message]],
        claimed_ns: int,
    ) -> _Spans:
        """One span per row attempted, named by its method (when the protos know it)."""
        paths = {claim.id: method.path for claim, method, _r in ready}
        known = self.catalog.methods
        rows = [(c, paths.get(c.id) or (c.method if c.method in known else None)) for c in claims]
        return self.tracing.attempts(rows, claimed_ns, self.worker_id)

    def _send_on(
        self,
        client: RecryptClient,
        ready: Sequence[tuple[Claim, Method, message.Message]],
        metadata: Sequence[Metadata] | None,
    ) -> list[Answer]:
        """Start the calls only on a connected channel: a call never started never executed."""
        if not ready:
            return []
        refused = self._connect(client)
        if refused is not None:
            return [refused] * len(ready)
        with self._inflight_lock:  # from here on each call may have started
            self._unsent.difference_update(c.id for c, _m, _r in ready)
        return client.send_all([(method, request) for _c, method, request in ready], metadata)

    def _connect(self, client: RecryptClient) -> Answer | None:
        """None when the channel is connected; else why not, as a never-started answer.

        Without a connection, Core.MaintenanceCheck (it reads and changes nothing) makes one,
        and its error says why there is none in gRPC's words (a TLS failure names the
        certificate). Whatever it answers, the batch itself was not started.
        """
        if client.wait_ready(self.settings.connect_timeout):
            return None
        probe = self._maintenance_check_on(client)
        if probe is None:  # no MaintenanceCheck in these protos
            return Answer(grpc.StatusCode.UNAVAILABLE, "no connection", None, 0.0, started=False)
        if probe.code == grpc.StatusCode.OK:
            return None
        return Answer(probe.code, probe.message, None, 0.0, started=False)

    def _prepare(self, claim: Claim) -> tuple[Method, message.Message]:
        """Every check that can fail before a call: a failure parks the row, never crashes.

        From the row's readability to its meaning, the first check that fails names the
        row's problem; no message quotes more than a short prefix of the row's data.
        """
        key = _sendable_key(claim)
        method = self.catalog.submittable(claim.method)
        try:
            return method, build_request(method, parse_payload(claim.payload), key)
        except BadRowError:
            raise
        except Exception as exc:  # the protobuf runtime on data nobody foresaw: park the row
            raise BadRowError(
                f"payload cannot be made into a {method.request_class.DESCRIPTOR.full_name} "
                f"({type(exc).__name__}); fix the writer, enqueue the intent again under a new "
                "key, then cancel this row"
            ) from exc

    def _bad_row(self, claim: Claim, exc: BadRowError) -> Outcome:
        outcome = Parked(
            claim,
            HistoryLine(HistoryKind.SYSTEM, HistoryDecision.PARK, None, str(exc)),
            reason=exc.reason,
            counts_attempt=False,
        )
        log.debug("bad row %s: %s", claim.id, exc)
        return outcome

    def _fold_gates(self, decided: Sequence[tuple[Claim, Method, Answer, Decision]]) -> str | None:
        """One gate update per batch: the calls of a batch ran together, so they count once.
        Returns the gate this batch changed the gate to (None: unchanged)."""
        strongest, message = Gate.NONE, ""
        for _claim, method, answer, decision in decided:
            if decision.gate == Gate.METHOD_REMOVED:
                self.gates.remove_method(method.path)
                continue
            if decision.gate == Gate.MAINTENANCE:
                self.gates.method_denied(method.path)  # maintenance, or the key's rights?
            if gate_rank(decision.gate) > gate_rank(strongest):
                strongest, message = decision.gate, answer.message
        if not decided:
            return None
        changed = self.gates.on_answer(strongest, self.clock(), message)
        return changed.gate if changed is not None else None

    def _outcome(self, claim: Claim, answer: Answer, decision: Decision) -> Outcome:
        text = _said(answer, decision)
        call = _call(answer, HistoryDecision(decision.action.value), text)
        match decision.action:
            case Action.COMMIT:
                return _committed(claim, answer, call, text)
            case Action.RETRY:
                return self._retried(claim, answer, decision, text)
            case Action.PARK:
                reason = str(decision.park_reason or policy.ParkReason.REJECTED)
                return Parked(claim, call, reason, maybe_executed=decision.maybe_executed)
        return HandedBack(claim, call)

    def _retried(self, claim: Claim, answer: Answer, decision: Decision, text: str) -> Outcome:
        """A retry at the backoff's next time; parked once unknown outcomes reach the bound
        (only unknown outcomes count towards it)."""
        unknown = claim.unknown_attempts + int(decision.bounded)
        if decision.bounded and unknown >= self.settings.max_unknown_attempts:
            parked = policy.unknown_outcome_exhausted(unknown)
            call = _call(answer, HistoryDecision.PARK, f"{parked.explanation}; {text}")
            return Parked(claim, call, str(parked.park_reason), maybe_executed=True)
        attempts = claim.attempts + int(decision.counts_attempt)
        delay = self.settings.backoff.delay(attempts, self._rng)
        return Retry(
            claim,
            _call(answer, HistoryDecision.RETRY, text),
            self.clock() + timedelta(seconds=delay),
            maybe_executed=decision.maybe_executed,
            unknown_outcome=decision.bounded,
        )

    def _emit(self, claim: Claim, answer: Answer | None, outcome: Outcome) -> None:
        for observer in self._observers:
            observer(claim, answer, outcome)

    def _report_lost(self, lost: Sequence[Outcome]) -> None:
        for outcome in lost:
            log.warning(
                "event=lost_row key=%s worker=%s: another worker owns the row now (our lease "
                "expired); theirs stands; our answer goes into its history as late_answer",
                outcome.claim.idempotency_key,
                self.worker_id,
            )

    # ---- Core.MaintenanceCheck

    def probe(self) -> bool | None:
        """While maintenance or a refused key closes the gate: is Recrypt back? (None: no probe)"""
        if not self.gates.needs_probe(self.clock()):
            return None
        answer = self._maintenance_check()
        if answer is None:  # no such method in the protos: probe with real rows instead
            self.gates.on_probe(True, self.clock())
            return True
        mode = bool(_field(answer.response, "maintenance_mode"))
        ok = answer.code == grpc.StatusCode.OK and not mode
        gate = policy.decide(answer.code, answer.message).gate
        maintenance = mode or answer.code == grpc.StatusCode.PERMISSION_DENIED
        says = True if maintenance else (False if ok else None)
        self.gates.on_probe(
            ok, self.clock(), gate if gate != Gate.NONE else None, answer.message, maintenance=says
        )
        return ok

    def check_maintenance(self) -> Answer | None:
        """The scheduled poll: is rollover downtime scheduled this week, is maintenance on?"""
        answer = self._maintenance_check()
        if answer is None:
            return None
        now = self.clock()
        if answer.code != grpc.StatusCode.OK:
            gate = policy.decide(answer.code, answer.message).gate
            if gate == Gate.MAINTENANCE:
                self.gates.confirm_maintenance()  # even MaintenanceCheck is refused
            if gate in (Gate.MAINTENANCE, Gate.UNAUTHENTICATED):
                self.gates.on_answer(gate, now, answer.message)
            return answer
        response = answer.response
        window = _window(_field(response, "rollover_start"), _field(response, "rollover_end"))
        self.gates.on_schedule(bool(_field(response, "rollover_scheduled")), window)
        if _field(response, "maintenance_mode"):
            self.gates.confirm_maintenance()
            self.gates.on_answer(Gate.MAINTENANCE, now, str(_field(response, "notice") or ""))
        return answer

    def _maintenance_check(self) -> Answer | None:
        with self.clients.use() as client:
            return self._maintenance_check_on(client)

    def _maintenance_check_on(self, client: RecryptClient) -> Answer | None:
        """Core.MaintenanceCheck on ``client``; None when the protos have no such method."""
        try:
            method = self.catalog.method(self.settings.maintenance_check)
        except BadRowError:
            log.error("event=maintenance_check_missing method=%s", self.settings.maintenance_check)
            return None
        return client.start(method, method.request_class()).wait()


_Spans = dict[int, Attempt]  # a batch's attempt spans, by row id


def _traced(answered: list[Answered], spans: _Spans) -> list[Answered]:
    """Each answer with its span, which now carries the status code and a park."""
    traced = []
    for done in answered:
        span, answer, outcome = spans[done.outcome.claim.id], done.answer, done.outcome
        if answer is None:  # no call: the row could not be sent (bad_row, key_reused, …)
            span.unsent(outcome.reason if isinstance(outcome, Parked) else "not sent")
        else:
            span.answered(answer.code.value[0], answer.code.name, answer.started)
        if isinstance(outcome, Parked):
            span.event(SpanEvent.PARKED, {"outbox.park_reason": outcome.reason})
        traced.append(replace(done, span=span))
    return traced


def _end_recorded(answered: Sequence[Answered], lost: set[int]) -> None:
    """The record is durable: each span ends (a row lost to another worker says so)."""
    for done in answered:
        if done.span is None:  # recorded late, after its span ended with record_failed
            continue
        if id(done.outcome) in lost:
            done.span.end(SpanEvent.LOST)
        else:
            outcome = OUTCOME_NAMES[type(done.outcome)]
            done.span.end(SpanEvent.RECORDED, {"outbox.outcome": outcome})


def _end_unrecorded(answered: list[Answered], error: str) -> list[Answered]:
    """The database refused the record: each span ends saying so (its answer is kept in
    memory and recorded later, without a span); the answers without their spans."""
    _end_all((a.span for a in answered if a.span is not None), SpanEvent.RECORD_FAILED, error)
    return [replace(done, span=None) for done in answered]


def _end_all(spans: Iterable[Attempt], event: SpanEvent, error: str = "") -> None:
    attributes = {"error.type": error} if error else None
    for span in spans:
        span.end(event, attributes)


def _sendable_key(claim: Claim) -> str:
    """The row's key, once the row is readable and its key may still be sent."""
    if claim.defect:
        raise BadRowError(claim.defect)
    key = check_key(claim.idempotency_key)
    if claim.key_purged_at is not None:
        raise BadRowError(
            f"idempotency_key was used by an earlier row, purged on "
            f"{claim.key_purged_at:%Y-%m-%d}: Recrypt may still hold that request under "
            "the key, and this row would commit on ALREADY_EXISTS without its effect; "
            "cancel it and enqueue the intent under a new key",
            reason=policy.ParkReason.KEY_REUSED,
        )
    if claim.payload_changed:
        raise BadRowError(
            "method or payload changed after the first send: re-using a key for another "
            "request is undefined at Recrypt; restore the original method and payload and "
            "requeue, or cancel and enqueue the new request under a new key",
            reason=policy.ParkReason.PAYLOAD_CHANGED,
        )
    return key


def _decision(answer: Answer) -> Decision:
    """What an answer means; a call that never started is decided by the client, not text."""
    return policy.decide(answer.code, answer.message) if answer.started else policy.NOT_SENT


def _said(answer: Answer, decision: Decision) -> str:
    """The decision's explanation, and what the other side said."""
    if not answer.message:
        return decision.explanation
    said = "Recrypt said" if answer.started else "gRPC said (nothing was sent)"
    return f"{decision.explanation}; {said}: {answer.message}"


def _call(answer: Answer, decision: HistoryDecision, text: str) -> HistoryLine:
    return HistoryLine(HistoryKind.CALL, decision, answer.code.name, text, answer.duration_ms)


def _committed(claim: Claim, answer: Answer, call: HistoryLine, text: str) -> Committed:
    response = response_to_json(answer.response) if answer.response else None
    if _key_used_before(claim, answer):
        call = _call(
            answer, HistoryDecision.KEY_USED_BEFORE, f"{policy.KEY_USED_BEFORE_TEXT}; {text}"
        )
    return Committed(claim, call, response)


def _key_used_before(claim: Claim, answer: Answer) -> bool:
    """ALREADY_EXISTS on a row's very first attempt: someone used this key before us."""
    return (
        answer.code == grpc.StatusCode.ALREADY_EXISTS
        and claim.attempts == 0
        and not claim.maybe_executed
    )


def _field(response: message.Message | None, name: str) -> object:
    return getattr(response, name, None) if response is not None else None


def _window(start: object, end: object) -> tuple[datetime, datetime] | None:
    """An RFC 3339 window from MaintenanceCheck, or None when absent or unreadable."""
    try:
        first = datetime.fromisoformat(str(start).replace("Z", "+00:00"))
        last = datetime.fromisoformat(str(end).replace("Z", "+00:00"))
    except ValueError:
        return None
    if first.tzinfo is None or last.tzinfo is None:
        return None
    return first, last
