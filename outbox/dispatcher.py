"""The dispatcher: claim due rows → send each with its key → record what the answer means.

It never writes SQL (the store does) and never interprets a status code itself (the policy
does). One ``run_once`` is one cycle; the daemon's scheduler calls ``drain`` when a poll is due
or a wake-up arrives.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import grpc
from google.protobuf import message

from outbox import policy
from outbox.client import Answer, RecryptClient
from outbox.descriptors import Catalog, Method, build_request, response_to_json
from outbox.errors import BadRowError
from outbox.gates import Gates, gate_rank
from outbox.payload import check_key, parse_payload
from outbox.policy import Action, Backoff, Decision, Gate
from outbox.store import Call, Claim, Committed, HandedBack, Outcome, Parked, Retry, Store

log = logging.getLogger("outbox.dispatcher")

MAINTENANCE_CHECK = "/recrypt.core.v1.Core/MaintenanceCheck"


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class DispatchSettings:
    batch_size: int = 100
    lease: float = 60.0
    backoff: Backoff = field(default_factory=Backoff)
    max_unknown_attempts: int = 10
    maintenance_check: str = MAINTENANCE_CHECK
    pipelines: int = 1  # cycles run in parallel by drain(): calls in flight while others record


@dataclass
class CycleReport:
    """What one cycle did, for logs, metrics and tests."""

    claimed: int = 0
    outcomes: list[Outcome] = field(default_factory=list)
    lost: list[Outcome] = field(default_factory=list)


Observer = Callable[[Claim, Answer | None, Outcome], None]


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
    ) -> None:
        self.store = store
        self.client = client
        self.catalog = catalog
        self.gates = gates
        self.worker_id = worker_id
        self.settings = settings
        self.clock = clock
        self._rng = rng or random.Random()
        self._observers: list[Observer] = []
        self._cycle_hooks: list[Callable[[], None]] = []
        self._inflight: set[int] = set()
        self._inflight_lock = threading.Lock()
        self.cycles = 0  # completed cycles: the daemon's watchdog reads it

    def after_cycle(self, hook: Callable[[], None]) -> None:
        """Called after every cycle, from the thread doing the work (the systemd watchdog)."""
        self._cycle_hooks.append(hook)

    def observe(self, observer: Observer) -> None:
        """Called once per recorded outcome (logging and metrics hook here)."""
        self._observers.append(observer)

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
        now = self.clock()
        report = CycleReport()
        granted = self.gates.acquire(now, self.settings.batch_size)
        try:
            if granted > 0:
                self._cycle(granted, now, report)
        finally:
            self.gates.release(granted)
        with self._inflight_lock:
            self.cycles += 1
        for hook in self._cycle_hooks:
            hook()
        return report

    def _cycle(self, granted: int, now: datetime, report: CycleReport) -> None:
        claims = self.store.claim_due(
            self.worker_id,
            granted,
            self.settings.lease,
            now,
            exclude_methods=self.gates.excluded_methods(now),
        )
        report.claimed = len(claims)
        if not claims:
            return
        log.debug("event=claimed worker=%s rows=%d", self.worker_id, len(claims))
        self._hold([c.id for c in claims], add=True)
        try:
            report.outcomes = self._send(claims)
            report.lost = self.store.record(report.outcomes, self.clock())
        finally:
            self._hold([c.id for c in claims], add=False)
        self._report_lost(report.lost)

    def inflight_ids(self) -> list[int]:
        """Rows this worker holds right now (the lease renewer extends them)."""
        with self._inflight_lock:
            return sorted(self._inflight)

    def _hold(self, ids: list[int], *, add: bool) -> None:
        with self._inflight_lock:
            if add:
                self._inflight.update(ids)
            else:
                self._inflight.difference_update(ids)

    def _send(self, claims: Sequence[Claim]) -> list[Outcome]:
        outcomes: list[Outcome] = []
        ready: list[tuple[Claim, Method, message.Message]] = []
        for claim in claims:
            try:
                ready.append((claim, *self._prepare(claim)))
            except BadRowError as exc:
                outcomes.append(self._bad_row(claim, exc))
        log.debug("event=sent worker=%s rows=%d", self.worker_id, len(ready))
        replies = self.client.send_all([(method, request) for _c, method, request in ready])
        decided = [
            (claim, method, answer, policy.decide(answer.code, answer.message))
            for (claim, method, _request), answer in zip(ready, replies, strict=True)
        ]
        self._fold_gates(decided)
        outcomes += [
            self._decide(claim, answer, decision) for claim, _m, answer, decision in decided
        ]
        return outcomes

    def _prepare(self, claim: Claim) -> tuple[Method, message.Message]:
        """Every check that can fail before a call: a failure parks the row, never crashes."""
        key = check_key(claim.idempotency_key)
        if claim.payload_changed:
            raise BadRowError(
                "payload changed after the first send: re-using a key with a different payload "
                "is undefined at Recrypt; restore the original payload and requeue, or cancel "
                "and enqueue the new payload under a new key",
                reason=policy.ParkReason.PAYLOAD_CHANGED,
            )
        method = self.catalog.submittable(claim.method)
        return method, build_request(method, parse_payload(claim.payload), key)

    def _bad_row(self, claim: Claim, exc: BadRowError) -> Outcome:
        outcome = Parked(
            claim,
            Call("system", "parked", None, str(exc)),
            reason=exc.reason,
            counts_attempt=False,
        )
        log.debug("bad row %s: %s", claim.id, exc)
        self._emit(claim, None, outcome)
        return outcome

    def _fold_gates(self, decided: Sequence[tuple[Claim, Method, Answer, Decision]]) -> None:
        """One gate update per batch: the calls of a batch ran together, so they count once."""
        strongest, message = Gate.NONE, ""
        for _claim, method, answer, decision in decided:
            if decision.gate == Gate.METHOD_REMOVED:
                self.gates.remove_method(method.path)
            elif gate_rank(decision.gate) > gate_rank(strongest):
                strongest, message = decision.gate, answer.message
        if decided:
            self.gates.on_answer(strongest, self.clock(), message)

    def _decide(self, claim: Claim, answer: Answer, decision: Decision) -> Outcome:
        outcome = self._outcome(claim, answer, decision)
        self._emit(claim, answer, outcome)
        return outcome

    def _outcome(self, claim: Claim, answer: Answer, decision: Decision) -> Outcome:
        text = decision.explanation + (
            f"; Recrypt said: {answer.message}" if answer.message else ""
        )
        call = Call("call", decision.action.value, answer.code.name, text, answer.duration_ms)
        attempts = claim.attempts + int(decision.counts_attempt)
        unknown = claim.unknown_attempts + int(decision.bounded)  # only unknown outcomes count
        match decision.action:
            case Action.COMMIT:
                response = response_to_json(answer.response) if answer.response else None
                return Committed(claim, call, response)
            case Action.RETRY if decision.bounded and unknown >= self.settings.max_unknown_attempts:
                parked = policy.unknown_outcome_exhausted(unknown)
                call = Call(
                    "call",
                    "park",
                    answer.code.name,
                    f"{parked.explanation}; {text}",
                    answer.duration_ms,
                )
                return Parked(claim, call, str(parked.park_reason), maybe_executed=True)
            case Action.RETRY:
                delay = self.settings.backoff.delay(attempts, self._rng)
                at = self.clock() + timedelta(seconds=delay)
                return Retry(
                    claim,
                    call,
                    at,
                    maybe_executed=decision.maybe_executed,
                    unknown_outcome=decision.bounded,
                )
            case Action.PARK:
                reason = str(decision.park_reason or policy.ParkReason.REJECTED)
                return Parked(claim, call, reason, maybe_executed=decision.maybe_executed)
        return HandedBack(claim, call)

    def _emit(self, claim: Claim, answer: Answer | None, outcome: Outcome) -> None:
        for observer in self._observers:
            observer(claim, answer, outcome)

    def _report_lost(self, lost: Sequence[Outcome]) -> None:
        for outcome in lost:
            log.warning(
                "event=lost_row key=%s worker=%s: another worker owns the row now (our lease "
                "expired); our outcome was not recorded and theirs stands",
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
        ok = answer.code == grpc.StatusCode.OK and not _field(answer.response, "maintenance_mode")
        gate = policy.decide(answer.code, answer.message).gate
        self.gates.on_probe(ok, self.clock(), gate if gate != Gate.NONE else None, answer.message)
        return ok

    def check_maintenance(self) -> Answer | None:
        """The scheduled poll: is rollover downtime scheduled this week, is maintenance on?"""
        answer = self._maintenance_check()
        if answer is None:
            return None
        now = self.clock()
        if answer.code != grpc.StatusCode.OK:
            gate = policy.decide(answer.code, answer.message).gate
            if gate in (Gate.MAINTENANCE, Gate.UNAUTHENTICATED):
                self.gates.on_answer(gate, now, answer.message)
            return answer
        response = answer.response
        window = _window(_field(response, "rollover_start"), _field(response, "rollover_end"))
        self.gates.on_schedule(bool(_field(response, "rollover_scheduled")), window)
        if _field(response, "maintenance_mode"):
            self.gates.on_answer(Gate.MAINTENANCE, now, str(_field(response, "notice") or ""))
        return answer

    def _maintenance_check(self) -> Answer | None:
        try:
            method = self.catalog.method(self.settings.maintenance_check)
        except BadRowError:
            log.error("event=maintenance_check_missing method=%s", self.settings.maintenance_check)
            return None
        return self.client.start(method, method.request_class()).wait()


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
