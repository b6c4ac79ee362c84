"""Health: which background job keeps failing (and what to log), and the monitoring verdict.

Pure: no I/O, no SQLAlchemy, grpc, click or rich; ``now`` is always given. Of the project it
imports only ``outbox.vocabulary``: never ``outbox.store`` (whose row types import this module,
and which may not know ``outbox.gates``), ``outbox.gates`` or ``outbox.config``; it reads their
objects through the small protocols below, and is handed the gates that send nothing.

Job health: the daemon tells it each job's result; it answers with the one log line to write,
if any: the first failure at once, then at most one line per job every
``FAILURE_LOG_INTERVAL`` seconds with how often it failed meanwhile, and the recovery once.
A database outage that fails every poll therefore logs a line a minute, not one a poll.
``failing()`` is what ``/readyz``, the metrics and the heartbeat row (so ``outbox check`` and
``outbox status``, separate processes) report: jobs whose last ``KEEPS_FAILING_RUNS`` runs or
more all failed.

The verdict (``judge``): what ``outbox check`` answers (Nagios: OK, WARNING, CRITICAL) from the
status, the ``[check]`` thresholds and the rows retrying; the oldest-due age and a worker's
liveness, which ``outbox status``, the check and the daemon's gauges share.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from outbox.vocabulary import GateState, State

FAILURE_LOG_INTERVAL = 60.0  # seconds between two log lines about one job still failing
KEEPS_FAILING_RUNS = 2  # failed runs in a row before a job is reported as failing

#: Recording answers: a job inside the dispatch job, reported on its own.
RECORD = "record"
#: Every job health reports on: the daemon's services (``outbox.services``) and ``record``.
#: Metric series derive from this; a test holds every service's name to it.
JOBS = (
    "dispatch",
    RECORD,
    "probe",
    "maintenance",
    "renew",
    "reaper",
    "expirer",
    "lane-keeper",
    "heartbeat",
    "table",
    "retention",
)

#: What an operator does when a job keeps failing; any other job gets ``GENERIC_ADVICE``.
JOB_ADVICE = {
    RECORD: "answers Recrypt gave are kept in memory and their rows stay in flight: check the "
    "database and the daemon role's grants (INSERT on outbox_attempts, USAGE on its sequence); "
    "runbook section 5, A job that keeps failing",
    "dispatch": "nothing is claimed or sent: check the database (outbox db current) and the "
    "daemon's log",
    "heartbeat": "check the database (outbox db current) and UPDATE on outbox_workers",
    "reaper": "rows with an expired lease are not released: check the database and the "
    "daemon role's grants",
}
GENERIC_ADVICE = (
    "see the daemon's log (event=job_failed) and the runbook section 5, A job that keeps failing"
)


def advice(job: str) -> str:
    return JOB_ADVICE.get(job, GENERIC_ADVICE)


def lasted(seconds: float) -> str:
    """How long something has lasted, at least: ``45 s``, ``12 min`` (under 3 h), ``3.5 h``."""
    if seconds < 60:
        return f"{max(seconds, 0.0):.0f} s"
    if seconds < 3 * 3600:
        return f"{seconds // 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def n_rows(n: int) -> str:
    return f"{n} row" if n == 1 else f"{n} rows"


def expired_lease_note(
    count: int, oldest: datetime | None, now: datetime, grace: float
) -> str | None:
    """What to say of rows in flight whose lease ran out over ``grace`` seconds ago (the
    reaper releases them within half a lease: past a whole one, it is not working)."""
    if not count or oldest is None or (now - oldest).total_seconds() < grace:
        return None
    return (
        f"{n_rows(count)} in flight with a lease expired {lasted((now - oldest).total_seconds())} "
        "ago, not released: look for event=job_failed job=reaper in the daemon's log (or "
        "start a daemon if none is live); they are resent with the same key"
    )


def failure_note(failure: JobFailure, now: datetime, where: str = "") -> str:
    """One job failing, with what to do: ``job record failing on w1 for 2 min (40 runs): …``."""
    for_how_long = lasted((now - failure.since).total_seconds())
    return (
        f"job {failure.job} failing{where} for {for_how_long} ({failure.runs} runs): "
        f"{failure.error}; {advice(failure.job)}"
    )


@dataclass(frozen=True)
class JobFailure:
    """A job failing since ``since``, ``runs`` runs in a row, the last with ``error``."""

    job: str
    since: datetime
    runs: int
    error: str


@dataclass(frozen=True)
class LogLine:
    """One line to log: ``event`` (job_failed, job_still_failing, job_recovered) and fields."""

    event: str
    fields: dict[str, Any]
    error: bool = True  # ERROR, else INFO


@dataclass
class _Streak:
    since: datetime
    error: str
    runs: int = 0
    logged_at: datetime | None = None
    unlogged: int = 0  # failures since the last line about this job


@dataclass
class JobHealth:
    """Each job's current failure streak (thread-safe: jobs run in a pool)."""

    log_interval: float = FAILURE_LOG_INTERVAL
    _streaks: dict[str, _Streak] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def failed(self, job: str, now: datetime, error: str) -> LogLine | None:
        with self._lock:
            streak = self._streaks.setdefault(job, _Streak(now, error))
            streak.runs += 1
            streak.unlogged += 1
            streak.error = error
            if streak.logged_at is None:
                return self._logged(
                    streak, now, LogLine("job_failed", {"job": job, "error": error})
                )
            if (now - streak.logged_at).total_seconds() < self.log_interval:
                return None
            fields = {
                "job": job,
                "failures": streak.unlogged,
                "since": streak.since.isoformat(),
                "error": error,
            }
            return self._logged(streak, now, LogLine("job_still_failing", fields))

    def succeeded(self, job: str, now: datetime) -> LogLine | None:
        with self._lock:
            streak = self._streaks.pop(job, None)
        if streak is None:
            return None
        after = round((now - streak.since).total_seconds(), 3)
        fields = {"job": job, "failures": streak.runs, "after_s": after}
        return LogLine("job_recovered", fields, error=False)

    def failing(self) -> tuple[JobFailure, ...]:
        """Jobs failing ``KEEPS_FAILING_RUNS`` runs in a row or more, by name."""
        with self._lock:
            return tuple(
                JobFailure(job, s.since, s.runs, s.error)
                for job, s in sorted(self._streaks.items())
                if s.runs >= KEEPS_FAILING_RUNS
            )

    @staticmethod
    def _logged(streak: _Streak, now: datetime, line: LogLine) -> LogLine:
        streak.logged_at, streak.unlogged = now, 0
        return line


# --------------------------------------------------------------------------- what judge reads


class Limits(Protocol):
    """The ``[check]`` thresholds (``outbox.config.CheckConfig``)."""

    @property
    def parked_warning(self) -> int: ...
    @property
    def parked_critical(self) -> int: ...
    @property
    def oldest_due_warning(self) -> float: ...
    @property
    def oldest_due_critical(self) -> float: ...
    @property
    def heartbeat_stale(self) -> float: ...
    @property
    def rollover_warning(self) -> float: ...
    @property
    def maintenance_warning(self) -> float: ...
    @property
    def retrying_warning(self) -> float: ...
    @property
    def attempts_warning(self) -> int: ...


class Worker(Protocol):
    """A worker's heartbeat row (``outbox.store.WorkerView``)."""

    @property
    def worker_id(self) -> str: ...
    @property
    def last_beat_at(self) -> datetime: ...
    @property
    def stopped_at(self) -> datetime | None: ...
    @property
    def gate(self) -> str: ...
    @property
    def gate_reason(self) -> str | None: ...
    @property
    def gate_since(self) -> datetime | None: ...
    @property
    def refused_methods(self) -> tuple[str, ...]: ...
    @property
    def failing_jobs(self) -> tuple[JobFailure, ...]: ...


class HeldThing(Protocol):
    """A lane or method an operator held (``outbox.store.Hold``)."""

    @property
    def kind(self) -> str: ...
    @property
    def value(self) -> str: ...
    @property
    def actor(self) -> str: ...
    @property
    def reason(self) -> str: ...
    @property
    def held_at(self) -> datetime: ...


class Status(Protocol):
    """The table and the workers (``outbox.store.StatusView``)."""

    @property
    def holds(self) -> Sequence[HeldThing]: ...

    @property
    def counts(self) -> Mapping[str, int]: ...
    @property
    def oldest_due_at(self) -> datetime | None: ...
    @property
    def parked_by_reason(self) -> Mapping[str, int]: ...
    @property
    def workers(self) -> Sequence[Worker]: ...
    @property
    def leases_expired(self) -> int: ...
    @property
    def oldest_lease_expired_at(self) -> datetime | None: ...


class Retrying(Protocol):
    """Pending rows a human should look at (``outbox.store.RetryingView``)."""

    @property
    def rows(self) -> int: ...
    @property
    def long(self) -> int: ...
    @property
    def first_due_at(self) -> datetime | None: ...
    @property
    def many(self) -> int: ...
    @property
    def most_attempts(self) -> int: ...
    @property
    def code(self) -> str | None: ...
    @property
    def code_rows(self) -> int: ...
    @property
    def message(self) -> str | None: ...


@dataclass(frozen=True)
class Rules:
    """What the verdict is judged against: the ``[check]`` thresholds, the ``[worker]`` lease
    (rows in flight whose lease expired longer ago are not being released), and the gates under
    which nothing is sent (``outbox.gates.SENDS_NOTHING``)."""

    limits: Limits
    lease: float
    sends_nothing: Collection[str]


# --------------------------------------------------------------------------- shared measures


#: A worker's liveness, as ``outbox status`` shows it (``stale``: no heartbeat lately, dead?).
LIVE, STALE, STOPPED = "live", "stale", "stopped"
#: Gates ``judge`` times against a ``[check]`` threshold. Any other closed gate warns at once.
TIMED_GATES = (GateState.ROLLOVER, GateState.MAINTENANCE)
CHECK_MESSAGE_WIDTH = 160  # characters of a row's last message in the check line
REFUSED_ADVICE = (
    "check the API key's permissions (key_access in the protos, recrypt.net/api), "
    "then systemctl reload outbox"
)


def liveness(worker: Worker, now: datetime, stale_after: float) -> str:
    """``live``, ``stale`` (no heartbeat for ``stale_after`` s: dead?) or ``stopped``."""
    if worker.stopped_at is not None:
        return STOPPED
    return LIVE if (now - worker.last_beat_at).total_seconds() <= stale_after else STALE


def oldest_due_age(oldest_due_at: datetime | None, now: datetime) -> float | None:
    """Seconds the oldest due row has waited (never below 0); None when no row is due."""
    if oldest_due_at is None:
        return None
    return max(0.0, (now - oldest_due_at).total_seconds())


def gate_age(live: Sequence[Worker], gate: str, now: datetime) -> float | None:
    """Seconds the longest-closed live worker in ``gate`` has had it closed; None if none is
    in it; ``math.inf`` if one does not say since when (a daemon older than migration 0006)."""
    ages = [
        math.inf if w.gate_since is None else (now - w.gate_since).total_seconds()
        for w in live
        if w.gate == gate
    ]
    return max(ages, default=None)


# --------------------------------------------------------------------------- words


def short_method(method: str) -> str:
    """``/recrypt.wallet.v1.Wallet/Transfer`` → ``Wallet/Transfer``."""
    service, _, name = method.rpartition("/")
    return f"{service.rpartition('.')[2]}/{name}" if service else method


def method_names(methods: Iterable[str], most: int = 5) -> str:
    """``Market/PlaceOrder, Wallet/Transfer`` (sorted; ``and N more`` past ``most``)."""
    names = sorted(set(methods))
    more = f" and {len(names) - most} more" if len(names) > most else ""
    return ", ".join(short_method(name) for name in names[:most]) + more


def clip(value: str | None, width: int) -> str:
    """One line of at most ``width`` characters (``…`` where it was cut)."""
    value = " ".join((value or "").split())
    return value if len(value) <= width else value[: width - 1] + "…"


def reasons(by_reason: Mapping[str, int]) -> str:
    """``limit=3, account=1``: most first, then by name."""
    ordered = sorted(by_reason.items(), key=lambda item: (-item[1], item[0]))
    return ", ".join(f"{reason}={n}" for reason, n in ordered)


def threshold(seconds: float) -> str:
    """A configured duration as written: ``3 min`` when whole minutes, else ``90.5 s``."""
    return f"{seconds / 60:g} min" if seconds >= 60 and seconds % 60 == 0 else f"{seconds:g} s"


# --------------------------------------------------------------------------- the verdict


OK, WARNING, CRITICAL = 0, 1, 2


@dataclass(frozen=True)
class Verdict:
    level: int
    summary: str

    def line(self) -> str:
        return f"{('OK', 'WARNING', 'CRITICAL')[self.level]}: {self.summary}"


def judge(view: Status, rules: Rules, now: datetime, retrying: Retrying | None = None) -> Verdict:
    """The monitoring verdict from the status and the rules.

    Besides the counts, it warns on what the guide says a human must look at (``attention``),
    each with what to do; those are warnings, never critical.
    """
    live = [w for w in view.workers if liveness(w, now, rules.limits.heartbeat_stale) == LIVE]
    alarms = broken(view, live, rules.lease, now)
    notes = attention(live, retrying, rules, now) + hold_notes(view.holds, now)
    if alarms or _critical(view, live, rules.limits, now):
        level = CRITICAL
    elif notes or _warning(view, live, rules.limits, now):
        level = WARNING
    else:
        level = OK
    return Verdict(level, "; ".join([check_summary(view, now, live), *alarms, *notes]))


def _critical(view: Status, live: Sequence[Worker], c: Limits, now: datetime) -> bool:
    """Too many parked rows, a due row waiting too long, rows and nobody to send them, or a
    worker whose API key Recrypt refuses."""
    return (
        view.counts.get(State.PARKED, 0) >= max(c.parked_critical, 1)
        or (oldest_due_age(view.oldest_due_at, now) or 0.0) >= c.oldest_due_critical
        or (not live and _waiting(view) > 0)
        or any(w.gate == GateState.UNAUTHENTICATED for w in live)
    )


def _warning(view: Status, live: Sequence[Worker], c: Limits, now: datetime) -> bool:
    """Parked rows, a due row waiting, or a live worker's gate closed (other than timed)."""
    return (
        view.counts.get(State.PARKED, 0) >= max(c.parked_warning, 1)
        or (oldest_due_age(view.oldest_due_at, now) or 0.0) >= c.oldest_due_warning
        or any(w.gate not in (GateState.OPEN, *TIMED_GATES) for w in live)
    )


def _waiting(view: Status) -> int:
    return view.counts.get(State.PENDING, 0) + view.counts.get(State.INFLIGHT, 0)


def broken(view: Status, live: Sequence[Worker], lease: float, now: datetime) -> list[str]:
    """What is broken now (critical), each with what to do: a job that keeps failing on a live
    worker, rows in flight whose lease ran out over a lease ago (issue 12)."""
    alarms = [failure_note(f, now, f" on {w.worker_id}") for w in live for f in w.failing_jobs]
    expired = expired_lease_note(view.leases_expired, view.oldest_lease_expired_at, now, lease)
    return alarms + ([expired] if expired else [])


def check_summary(view: Status, now: datetime, live: Sequence[Worker]) -> str:
    """``3 parked (limit=3); oldest due row 12 s; 1 live worker (gate open)``."""
    parked = view.counts.get(State.PARKED, 0)
    parts = [f"{parked} parked" + (f" ({reasons(view.parked_by_reason)})" if parked else "")]
    oldest = oldest_due_age(view.oldest_due_at, now)
    parts.append("no due rows" if oldest is None else f"oldest due row {oldest:.0f} s")
    gates = sorted({w.gate for w in live})
    if live:
        noun = "worker" if len(live) == 1 else "workers"
        label = "gate" if len(gates) == 1 else "gates"
        parts.append(f"{len(live)} live {noun} ({label} {', '.join(gates)})")
    else:
        parts.append(f"no live worker ({_waiting(view)} rows pending or in flight)")
    return "; ".join(parts)


# --------------------------------------------------------------------------- attention


def attention(
    live: Sequence[Worker], retrying: Retrying | None, rules: Rules, now: datetime
) -> list[str]:
    """What a human must look at, one sentence each, with what to do (issue 10)."""
    limits = rules.limits
    notes = [
        _rollover_note(live, limits, now),
        _maintenance_note(live, limits, now),
        _refused_note(live),
    ]
    closed = _closed_notes(live, rules.sends_nothing, now)
    return closed + [n for n in notes if n] + _retrying_notes(retrying, limits, now)


def held_names(holds: Iterable[HeldThing]) -> str:
    """``lane acc-1, method Market/PlaceOrder``."""
    return ", ".join(
        f"{h.kind} {short_method(h.value) if h.kind == 'method' else h.value}" for h in holds
    )


def hold_notes(holds: Sequence[HeldThing], now: datetime) -> list[str]:
    """Lanes and methods an operator held: their rows are not sent until released."""
    return [
        f"{held_names([h])} held by {h.actor} for {lasted((now - h.held_at).total_seconds())}: "
        f"{h.reason} (its rows are not sent; `outbox release {h.kind} {h.value} --reason …`)"
        for h in holds
    ]


def _closed_notes(
    live: Sequence[Worker], sends_nothing: Collection[str], now: datetime
) -> list[str]:
    """Gates under which nothing is sent, other than the timed ones: say why, and what to do
    (the worker's gate reason says both)."""
    return [
        f"gate {w.gate} on {w.worker_id} "
        + (f"for {lasted((now - w.gate_since).total_seconds())}" if w.gate_since else "")
        + f": {w.gate_reason or 'see outbox status'}"
        for w in live
        if w.gate in sends_nothing and w.gate not in TIMED_GATES
    ]


def _rollover_note(live: Sequence[Worker], c: Limits, now: datetime) -> str | None:
    closed = gate_age(live, GateState.ROLLOVER, now)
    if closed is None or closed < c.rollover_warning:
        return None
    how_long = (
        "since an unknown time"
        if closed == math.inf
        else f"for {lasted(closed)}, over {threshold(c.rollover_warning)}"
    )
    return f"rollover (UNAVAILABLE vgw-db) {how_long}: check recrypt.net for a notice"


def _maintenance_note(live: Sequence[Worker], c: Limits, now: datetime) -> str | None:
    closed = gate_age(live, GateState.MAINTENANCE, now)
    if closed is None or closed < c.maintenance_warning:
        return None
    paused = "for an unknown time" if closed == math.inf else lasted(closed)
    return f"Recrypt maintenance (PERMISSION_DENIED): paused {paused}; see https://x.com/RecryptCS"


def _refused_note(live: Sequence[Worker]) -> str | None:
    held = [method for w in live for method in w.refused_methods]
    if not held:
        return None
    return (
        f"Recrypt refused {method_names(held)} outside maintenance (PERMISSION_DENIED), "
        f"held: {REFUSED_ADVICE}"
    )


def _retrying_notes(r: Retrying | None, c: Limits, now: datetime) -> list[str]:
    if r is None:
        return []
    notes = []
    if r.long:
        first = r.first_due_at
        oldest = f" (oldest {lasted((now - first).total_seconds())})" if first else ""
        since = f"retrying over {threshold(c.retrying_warning)} since first due"
        notes.append(f"{n_rows(r.long)} {since}{oldest}")
    if r.many:
        notes.append(
            f"{n_rows(r.many)} with {c.attempts_warning} or more attempts (most {r.most_attempts})"
        )
    if r.rows:
        notes += [_answer(r), "see outbox list --state pending"]
    return notes


def _answer(r: Retrying) -> str:
    """The commonest last answer among the rows, with the start of one's message."""
    said = r.code or "no code"
    if r.message:
        said += f' "{clip(r.message, CHECK_MESSAGE_WIDTH)}"'
    if r.rows == 1:
        return f"its last answer: {said}"
    if r.code_rows == r.rows:
        return f"rows keep getting the same answer: {said}"
    return f"commonest last answer ({r.code_rows} of {r.rows} rows): {said}"
