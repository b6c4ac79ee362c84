"""Job health: which background job keeps failing, since when, with what error; and what to log.

Pure (no I/O, ``now`` is given). The daemon tells it each job's result; it answers with the
one log line to write, if any: the first failure at once, then at most one line per job every
``FAILURE_LOG_INTERVAL`` seconds with how often it failed meanwhile, and the recovery once.
A database outage that fails every poll therefore logs a line a minute, not one a poll.

``failing()`` is what ``/readyz``, the metrics and the heartbeat row (so ``outbox check`` and
``outbox status``, separate processes) report: jobs whose last ``KEEPS_FAILING_RUNS`` runs or
more all failed.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

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
