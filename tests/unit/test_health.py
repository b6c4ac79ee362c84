"""Job health (issue 12): a job that keeps failing is logged once, then at a bounded rate with
how many times it failed meanwhile; its recovery is logged; ``failing()`` says which job, since
when, and the last error. Pure: an injected ``now``, no sleeps."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from outbox.health import FAILURE_LOG_INTERVAL, KEEPS_FAILING_RUNS, JobHealth

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
