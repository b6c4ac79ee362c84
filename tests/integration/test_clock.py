"""One clock for leases: a daemon whose clock is off from the database's refuses (issue 9 §5)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from outbox.services import ClockSkewError
from outbox.simulator import Simulator
from tests.integration.test_daemon import KEY, daemon_for

LEASE = 60.0  # the default [worker] lease: a quarter of it (15 s) is the skew tolerated


class SkewedClock:
    """This host's clock, ``offset`` seconds off; tests move the offset."""

    def __init__(self, offset: float) -> None:
        self.offset = offset

    def __call__(self) -> datetime:
        return datetime.now(UTC) + timedelta(seconds=self.offset)


@pytest.mark.parametrize("offset", [LEASE, -LEASE])
def test_a_daemon_whose_clock_is_a_lease_off_refuses_to_start(db_url, offset) -> None:
    with Simulator(api_keys=[KEY]) as sim, pytest.raises(ClockSkewError) as refused:
        daemon_for(db_url, sim.target, clock=SkewedClock(offset))
    assert "clock" in str(refused.value) and "timedatectl" in str(refused.value)


def test_a_clock_that_drifts_while_running_stops_claims_and_reaping(db_url) -> None:
    clock = SkewedClock(0.0)
    with Simulator(api_keys=[KEY]) as sim:
        daemon = daemon_for(db_url, sim.target, clock=clock)
        assert daemon.readiness() == (True, "ready: gate open")
        clock.offset = LEASE  # NTP broke: this host now runs a lease ahead
        daemon.clock_check.run_once(clock())
        ready, why = daemon.readiness()
        assert not ready and why.startswith("clock skew")
        gated = [s for s in daemon.services if s.name in ("reaper", "expirer", "dispatch")]
        assert len(gated) == 3
        assert not any(s.allowed() for s in gated)  # type: ignore[attr-defined]
        clock.offset = 0.0
        daemon.clock_check.run_once(clock())
        assert daemon.readiness()[0]
        daemon.engine.dispose()
