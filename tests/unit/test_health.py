"""Job health (issue 12): a job that keeps failing is logged once, then at a bounded rate with
how many times it failed meanwhile; its recovery is logged; ``failing()`` says which job, since
when, and the last error. The monitoring verdict (``judge``): each way it goes WARNING or
CRITICAL, and OK. Pure: an injected ``now``, no sleeps, no database."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from outbox.config import CheckConfig
from outbox.gates import SENDS_NOTHING
from outbox.health import (
    CRITICAL,
    FAILURE_LOG_INTERVAL,
    KEEPS_FAILING_RUNS,
    OK,
    WARNING,
    JobFailure,
    JobHealth,
    Rules,
    Verdict,
    judge,
    oldest_due_age,
)
from outbox.store import RetryingView, StatusView, WorkerView

T0 = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def test_an_outage_of_forty_polls_in_thirty_seconds_logs_one_line() -> None:
    health = JobHealth()
    lines = [health.failed("dispatch", at(i * 0.75), "OperationalError: gone") for i in range(40)]
    said = [line for line in lines if line is not None]
    assert len(said) == 1
    assert said[0].event == "job_failed" and said[0].fields["job"] == "dispatch"
    assert said[0].fields["error"] == "OperationalError: gone"


def test_a_long_outage_repeats_at_a_bounded_rate_with_the_count() -> None:
    health = JobHealth()
    said = []
    for i in range(600):  # ten minutes, one poll a second
        line = health.failed("dispatch", at(i), "OperationalError: gone")
        if line is not None:
            said.append(line)
    assert len(said) <= 600 / FAILURE_LOG_INTERVAL + 1
    repeat = said[1]
    assert repeat.event == "job_still_failing"
    assert repeat.fields["failures"] == FAILURE_LOG_INTERVAL  # since the line before
    assert repeat.fields["since"] == T0.isoformat()


def test_the_recovery_is_logged_once_with_how_long_and_how_often() -> None:
    health = JobHealth()
    for i in range(30):
        health.failed("record", at(i), "OperationalError: gone")
    line = health.succeeded("record", at(31))
    assert line is not None and line.event == "job_recovered"
    assert line.fields["failures"] == 30 and line.fields["after_s"] == 31.0
    assert health.succeeded("record", at(32)) is None  # already fine: nothing to say


def test_a_job_counts_as_failing_after_repeated_failures_with_since_and_last_error() -> None:
    health = JobHealth()
    for i in range(KEEPS_FAILING_RUNS - 1):
        health.failed("reaper", at(i), "first")
    assert health.failing() == ()
    health.failed("reaper", at(10), "ProgrammingError: permission denied for sequence")
    (failure,) = health.failing()
    assert failure.job == "reaper" and failure.since == T0 and failure.runs == KEEPS_FAILING_RUNS
    assert failure.error == "ProgrammingError: permission denied for sequence"
    health.succeeded("reaper", at(11))
    assert health.failing() == ()


def test_each_job_is_judged_on_its_own() -> None:
    health = JobHealth()
    for i in range(KEEPS_FAILING_RUNS):
        health.failed("retention", at(i), "x")
    health.succeeded("dispatch", at(5))
    assert [f.job for f in health.failing()] == ["retention"]


# --------------------------------------------------------------------------- the verdict


def worker(
    name: str = "w1",
    *,
    beat_ago: float = 5,
    gate: str = "open",
    closed_ago: float | None = None,
    stopped: bool = False,
    refused: tuple[str, ...] = (),
    failing: tuple[JobFailure, ...] = (),
) -> WorkerView:
    return WorkerView(
        worker_id=name,
        host="host",
        pid=1,
        version="1",
        started_at=at(-3600),
        last_beat_at=at(-beat_ago),
        gate=gate,
        gate_reason=f"why {gate}" if gate != "open" else None,
        gate_until=None,
        stopped_at=at(-1) if stopped else None,
        gate_since=None if closed_ago is None else at(-closed_ago),
        refused_methods=refused,
        failing_jobs=failing,
    )


def status(
    *workers: WorkerView,
    pending: int = 0,
    parked: int = 0,
    due_ago: float | None = None,
    expired: tuple[int, float] | None = None,
) -> StatusView:
    return StatusView(
        counts={"pending": pending, "inflight": 0, "parked": parked},
        oldest_due_at=None if due_ago is None else at(-due_ago),
        parked_by_reason={"limit": parked} if parked else {},
        blocked_lanes=[],
        maybe_executed_open=0,
        workers=list(workers),
        leases_expired=expired[0] if expired else 0,
        oldest_lease_expired_at=at(-expired[1]) if expired else None,
    )


LIMITS = CheckConfig()  # parked 1/50, oldest due 300/1800 s, stale 60 s, rollover 180 s
RULES = Rules(LIMITS, lease=60.0, sends_nothing=SENDS_NOTHING)


def verdict(view: StatusView, retrying: RetryingView | None = None) -> Verdict:
    return judge(view, RULES, T0, retrying)


def test_a_live_worker_and_nothing_waiting_is_ok() -> None:
    found = verdict(status(worker()))
    assert found.level == OK
    assert found.line() == "OK: 0 parked; no due rows; 1 live worker (gate open)"


def test_no_worker_and_no_rows_is_ok() -> None:
    found = verdict(status(), None)
    assert found == Verdict(
        OK, "0 parked; no due rows; no live worker (0 rows pending or in flight)"
    )


def test_parked_rows_warn_then_go_critical() -> None:
    assert verdict(status(worker(), parked=1)).level == WARNING
    found = verdict(status(worker(), parked=LIMITS.parked_critical))
    assert found.level == CRITICAL
    assert found.summary.startswith(f"{LIMITS.parked_critical} parked (limit=")


def test_an_old_due_row_warns_then_goes_critical() -> None:
    assert verdict(status(worker(), pending=1, due_ago=LIMITS.oldest_due_warning - 1)).level == OK
    found = verdict(status(worker(), pending=1, due_ago=LIMITS.oldest_due_warning))
    assert found.level == WARNING and "oldest due row 300 s" in found.summary
    assert (
        verdict(status(worker(), pending=1, due_ago=LIMITS.oldest_due_critical)).level == CRITICAL
    )


def test_rows_waiting_and_no_live_worker_is_critical() -> None:
    dead = worker(beat_ago=LIMITS.heartbeat_stale + 1)
    found = verdict(status(dead, worker("w2", stopped=True), pending=3))
    assert found.level == CRITICAL
    assert "no live worker (3 rows pending or in flight)" in found.summary


def test_a_refused_api_key_is_critical() -> None:
    assert verdict(status(worker(gate="unauthenticated"))).level == CRITICAL


def test_a_closed_gate_other_than_the_timed_ones_warns_with_its_reason() -> None:
    found = verdict(status(worker(gate="unreachable", closed_ago=45)))
    assert found.level == WARNING
    assert "gate unreachable on w1 for 45 s: why unreachable" in found.summary
    assert verdict(status(worker(gate="rate_limited"))).level == WARNING


def test_a_job_failing_on_a_live_worker_is_critical_on_a_stopped_one_not() -> None:
    failure = JobFailure("heartbeat", at(-120), 8, "OperationalError: gone")
    found = verdict(status(worker(failing=(failure,))))
    assert found.level == CRITICAL
    assert "job heartbeat failing on w1 for 2 min (8 runs): OperationalError: gone" in found.summary
    assert verdict(status(worker(), worker("w2", stopped=True, failing=(failure,)))).level == OK


def test_leases_expired_over_a_lease_ago_are_critical() -> None:
    assert verdict(status(worker(), expired=(2, RULES.lease - 1))).level == OK
    found = verdict(status(worker(), expired=(2, RULES.lease)))
    assert found.level == CRITICAL and "2 rows in flight with a lease expired" in found.summary


def test_a_rollover_warns_past_its_threshold_only() -> None:
    assert verdict(status(worker(gate="rollover", closed_ago=60))).level == OK
    found = verdict(status(worker(gate="rollover", closed_ago=240)))
    assert found.level == WARNING
    assert "rollover (UNAVAILABLE vgw-db) for 4 min, over 3 min" in found.summary


def test_maintenance_warns_at_once_and_never_goes_critical() -> None:
    found = verdict(status(worker(gate="maintenance", closed_ago=30 * 3600)))
    assert found.level == WARNING and "paused 30.0 h" in found.summary


def test_methods_refused_outside_maintenance_warn() -> None:
    found = verdict(status(worker(refused=("/recrypt.wallet.v1.Wallet/Transfer",))))
    assert found.level == WARNING and "Recrypt refused Wallet/Transfer" in found.summary


def test_rows_retrying_long_warn_with_their_answer() -> None:
    retrying = RetryingView(rows=1, long=1, first_due_at=at(-3600), code="UNAVAILABLE")
    found = verdict(status(worker(), pending=1), retrying)
    assert found.level == WARNING
    assert "1 row retrying over 30 min since first due (oldest 60 min)" in found.summary
    assert "its last answer: UNAVAILABLE" in found.summary


def test_the_oldest_due_age_is_never_negative() -> None:
    assert oldest_due_age(None, T0) is None
    assert oldest_due_age(at(5), T0) == 0.0
    assert oldest_due_age(at(-5), T0) == 5.0
