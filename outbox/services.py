"""The daemon's background work, one small service each: settings, a schedule, ``run_once(now)``.

Every service gets what it needs when it is built (in ``outbox.daemon``, the composition root)
and keeps it: a reload hands a service new settings explicitly or leaves it alone, so nothing
changes under a running job. ``now`` always comes from the daemon's one clock.

| service        | every                          | does                                          |
|----------------|--------------------------------|-----------------------------------------------|
| dispatch       | ``[worker] poll_interval``     | drain due rows (a wake-up runs it at once)    |
| probe          | 1 s (while a gate needs one)   | Core.MaintenanceCheck: is Recrypt back?       |
| maintenance    | ``[maintenance] probe_interval``| rollover schedule and maintenance mode       |
| renew          | lease / 3                      | extend the leases of calls still in flight    |
| reaper         | lease / 2                      | release (or park) rows whose lease ran out    |
| expirer        | lease / 2                      | expire rows past ``expires_at``               |
| heartbeat      | 5 s                            | this worker, its gate, and the clock check    |
| table          | 15 s                           | gauges: rows by state, oldest due             |
| retention      | ``[retention] interval``       | purge finished rows, old tombstones, old      |
|                |                                | workers (``WORKER_KEEP_DAYS``)                |
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from outbox.dispatcher import Dispatcher
from outbox.logs import kv
from outbox.store import Store, WorkerBeat

log = logging.getLogger("outbox.daemon")

HEARTBEAT_SECONDS = 5.0
TABLE_SECONDS = 15.0  # how often the table gauges (rows by state, oldest due) are refreshed
REAPER_BATCH = 500  # rows released or expired per transaction
LANE_KEEPER_INTERVAL = 60.0  # how often lanes with waiting rows are settled (safety net)
#: Workers stopped, or silent (dead), longer than this are purged from ``outbox_workers`` by the
#: retention job, so ``outbox status`` lists the workers of the last week, not every one ever.
WORKER_KEEP_DAYS = 7.0


class Service(Protocol):
    """What the daemon schedules: a name, an interval, whether to run at start, one step."""

    @property
    def name(self) -> str: ...
    @property
    def interval(self) -> float: ...
    @property
    def at_start(self) -> bool: ...

    def run_once(self, now: datetime) -> None: ...


@dataclass
class Dispatch:
    """Drain due rows; a wake-up (NOTIFY, reload) during a drain makes it go round again."""

    dispatcher: Dispatcher
    stopping: threading.Event
    interval: float
    allowed: Callable[[], bool] = lambda: True  # False while this host's clock is off
    name: str = "dispatch"
    at_start: bool = True

    def __post_init__(self) -> None:
        self.woken = threading.Event()
        self.idle = threading.Event()  # no drain under way
        self.idle.set()

    def run_once(self, now: datetime) -> None:
        if not self.allowed():
            self.dispatcher.flush()  # answers already received are still recorded
            return
        self.idle.clear()
        try:
            while not self.stopping.is_set():
                self.woken.clear()
                self.dispatcher.drain(self.stopping)
                if not self.woken.is_set():
                    return
        finally:
            self.idle.set()


@dataclass
class Probe:
    """While maintenance or a refused key closes the gate, ask Core.MaintenanceCheck."""

    dispatcher: Dispatcher
    interval: float
    name: str = "probe"
    at_start: bool = False

    def run_once(self, now: datetime) -> None:
        self.dispatcher.probe()


@dataclass
class MaintenancePoll:
    """Learn whether rollover downtime is scheduled this week and whether maintenance is on."""

    dispatcher: Dispatcher
    interval: float
    name: str = "maintenance"
    at_start: bool = True

    def run_once(self, now: datetime) -> None:
        self.dispatcher.check_maintenance()


@dataclass
class LeaseRenewer:
    """Extend the leases of rows whose calls (or unrecorded answers) this worker holds."""

    store: Store
    worker_id: str
    held: Callable[[], list[int]]
    lease: float
    name: str = "renew"
    at_start: bool = False

    @property
    def interval(self) -> float:
        return self.lease / 3

    def run_once(self, now: datetime) -> None:
        ids = self.held()
        if ids:
            self.store.renew_leases(self.worker_id, ids, self.lease, now)


@dataclass
class Reaper:
    """Rows whose lease ran out: resent with the same key, or parked past the unknown bound."""

    store: Store
    lease: float
    max_unknown_attempts: int
    allowed: Callable[[], bool] = lambda: True  # False while this host's clock is off
    name: str = "reaper"
    at_start: bool = True

    @property
    def interval(self) -> float:
        return max(self.lease / 2, 0.05)

    def run_once(self, now: datetime) -> None:
        if not self.allowed():
            return
        released = self.store.release_expired_leases(
            now, limit=REAPER_BATCH, max_unknown_attempts=self.max_unknown_attempts
        )
        for key in released:
            log.warning(kv("lease_expired", key=key, action="resend with the same key"))


@dataclass
class LaneKeeper:
    """The safety net of lane heads: a lane whose earlier rows were finished by hand (outside
    the daemon, which settles a lane whenever it finishes a row) moves on within a minute."""

    store: Store
    interval: float = LANE_KEEPER_INTERVAL
    name: str = "lane-keeper"
    at_start: bool = True

    def run_once(self, now: datetime) -> None:
        released = self.store.settle_lanes()
        if released:
            log.warning(
                kv(
                    "lanes_released",
                    rows=released,
                    why="the rows they waited behind were finished outside the daemon",
                    action="finish rows with outbox cancel/requeue, not by hand",
                )
            )


@dataclass
class Expirer:
    """Pending rows past ``expires_at``: expired, or parked if an attempt may have executed."""

    store: Store
    interval: float
    allowed: Callable[[], bool] = lambda: True  # False while this host's clock is off
    name: str = "expirer"
    at_start: bool = True

    def run_once(self, now: datetime) -> None:
        if not self.allowed():  # a clock running ahead would expire rows early
            return
        expired, parked = self.store.expire_due(now, limit=REAPER_BATCH)
        if expired or parked:
            log.info(kv("expired", expired=expired, parked_unknown=parked))


@dataclass
class Heartbeat:
    """Record this worker and its gate in ``outbox_workers``; check the clock while at it."""

    store: Store
    beat: Callable[[], WorkerBeat]
    on_result: Callable[[Exception | None], None]
    clock_check: ClockCheck | None = None
    interval: float = HEARTBEAT_SECONDS
    name: str = "heartbeat"
    at_start: bool = True

    def run_once(self, now: datetime) -> None:
        try:
            self.store.heartbeat(self.beat(), now)
            if self.clock_check is not None:
                self.clock_check.run_once(now)
        except Exception as exc:
            self.on_result(exc)
            raise
        self.on_result(None)


@dataclass(frozen=True)
class RetentionSettings:
    days: float
    batch_size: int
    tombstone_days: float
    interval: float


@dataclass
class Retention:
    """Purge finished rows older than ``days`` (each leaves a tombstone; ``days`` 0: none),
    then old tombstones, then workers stopped or silent for ``WORKER_KEEP_DAYS``."""

    store: Store
    settings: RetentionSettings
    stopping: threading.Event
    name: str = "retention"
    at_start: bool = False

    @property
    def interval(self) -> float:
        return self.settings.interval

    def run_once(self, now: datetime) -> None:
        settings = self.settings

        def rows(cutoff: datetime, batch: int) -> int:
            return self.store.purge_finished(cutoff, batch, now=now)

        purged = self._purge(rows, now - timedelta(days=settings.days)) if settings.days > 0 else 0
        tombs = 0
        if settings.tombstone_days > 0:  # 0: tombstones are kept for ever
            cutoff = now - timedelta(days=settings.tombstone_days)
            tombs = self._purge(self.store.purge_tombstones, cutoff)
        gone = self.store.purge_workers(now - timedelta(days=WORKER_KEEP_DAYS))
        if purged or tombs or gone:
            log.info(
                kv(
                    "purged",
                    rows=purged,
                    tombstones=tombs,
                    workers=gone,
                    older_than_days=settings.days,
                )
            )

    def _purge(self, purge: Callable[[datetime, int], int], cutoff: datetime) -> int:
        total = 0
        while not self.stopping.is_set():
            done = purge(cutoff, self.settings.batch_size)
            total += done
            if done < self.settings.batch_size:
                break
        return total


class ClockSkewError(Exception):
    """This host's clock and the database's disagree by more than leases can tolerate."""


@dataclass
class ClockCheck:
    """Leases are judged on each host's clock: refuse to reap or claim when it is off.

    A host whose clock runs ahead would reap calls still in flight on another host; one that
    runs behind keeps leases alive too long. The skew to the database's clock (the one clock
    every daemon shares) must stay under ``max_skew`` seconds.
    """

    measure: Callable[[datetime], float]  # seconds the database's clock is ahead of ``now``
    max_skew: float
    skew: float = 0.0
    name: str = "clock"

    @property
    def ok(self) -> bool:
        return abs(self.skew) <= self.max_skew

    def run_once(self, now: datetime) -> None:
        was_ok = self.ok
        self.skew = self.measure(now)
        if was_ok and not self.ok:
            log.error(kv("clock_skew", **self._fields(), then="not claiming or reaping"))
        elif self.ok and not was_ok:
            log.info(kv("clock_skew_fixed", skew_s=round(self.skew, 3)))

    def require(self, now: datetime) -> None:
        """At start: refuse to run with a skewed clock."""
        self.run_once(now)
        if not self.ok:
            raise ClockSkewError(self.message())

    def message(self) -> str:
        ahead = "behind" if self.skew > 0 else "ahead of"
        return (
            f"this host's clock is {abs(self.skew):.1f} s {ahead} the database's; leases allow "
            f"at most {self.max_skew:.1f} s (a quarter of [worker] lease): another daemon "
            "could resend calls still in flight. Fix time sync on this host (timedatectl; "
            "chronyc tracking), then start again"
        )

    def _fields(self) -> dict[str, float]:
        return {"skew_s": round(self.skew, 3), "max_s": round(self.max_skew, 3)}
