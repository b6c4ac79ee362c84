"""The torture harness: one seeded run of writers, daemons, faults and crashes, then checks.

``run_torture(url, seed, duration_s)`` does, all at once, for ``duration_s`` seconds:

- a **writer** thread inserts rows of every kind, by plain SQL and by ``outbox.enqueue``:
  transfers and orders, lanes, ``not_before``, ``expires_at``, bad rows (unknown method,
  payload that does not parse, uppercase key), transfers over the simulator's limit, and
  *doomed* rows whose key a row-specific fault answers with a parking code;
- a **chaos** thread, from one ``random.Random(seed)``, injects every fault of the guide's
  table (executed-then-errored included), opens rollover, maintenance and wrong-key windows,
  SIGKILLs and restarts daemons, cuts the database connections (or locks the SQLite file),
  restarts the simulator mid-call and, when asked, the PostgreSQL server; and the seams of
  ``seams``: database outages while answers are in flight, out-of-order lane commits, poison
  rows, method edits, key reuse after retention, reloads mid-call, operator cancels; the
  lane-head seams of ``lanes`` (issue 11): a lane's parked head cancelled or requeued by an
  operator, or cancelled by hand, while writers add rows to the lane; and the
  answers of ``answers`` (issue 10): a method refused outside maintenance (held, released by
  SIGHUP), a server's "failed to connect" after executing, DEADLINE_EXCEEDED vgw-db storms and
  rows doomed by one; rate-limit texts with digits are general faults.

Then it calms everything, waits until the table converges and checks the promise (the
``Report`` lists every violation; ``promises`` says which). Row-specific faults are kept ahead
of the general ones by construction: general faults (``ChaosFault``) never match a doomed key,
so a doomed row gets exactly its parking answer and never executes, and the set of parked
rows is known exactly. General faults whose answers count as unknown outcomes draw on a
per-key budget (``UnknownBudget``, half of ``[retry] max_unknown_attempts``), so only the rows
a storm dooms ever run out of attempts.

Module map: ``world`` (simulator, database, daemons), ``writers``, ``chaos`` (the loop) with
``faults``, ``seams``, ``lanes`` and ``answers`` (what it injects), ``promises`` (the checks,
one function per promise) reading ``observed``. This module holds the run's phases only.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from random import Random
from typing import Any

from outbox.clock import utcnow
from tests.torture.chaos import Chaos
from tests.torture.daemons import Daemons
from tests.torture.database import Database
from tests.torture.observed import Observed, Table, settled
from tests.torture.promises import check, condense, promise_names
from tests.torture.seams import Seams
from tests.torture.vocabulary import MAX_BACKOFF_S, MAX_UNKNOWN, Report, backend_of
from tests.torture.world import World, postgres_restart_command
from tests.torture.writers import Writer

__all__ = ["Report", "Settings", "run_torture"]


@dataclass(frozen=True)
class Settings:
    """How long and how hard one run is (``run_torture``'s keyword arguments)."""

    duration_s: float
    daemons: int | None = None  # default: 1 on SQLite, else 2
    restart_postgres: bool = False
    settle_s: float = 120.0
    stall_s: float = 30.0
    rate: float = 8.0
    initial_rows: int = 30
    lanes: int = 4
    without: Collection[str] = field(default_factory=tuple)
    max_unknown: int = MAX_UNKNOWN
    max_backoff: float = MAX_BACKOFF_S


def run_torture(
    url: str,
    seed: int,
    duration_s: float,
    *,
    workdir: Path,
    daemons: int | None = None,
    restart_postgres: bool = False,
    settle_s: float = 120.0,
    stall_s: float = 30.0,
    rate: float = 8.0,
    initial_rows: int = 30,
    lanes: int = 4,
    without: Collection[str] = (),
    max_unknown: int = MAX_UNKNOWN,
    max_backoff: float = MAX_BACKOFF_S,
) -> Report:
    """One torture run against the migrated, empty database at ``url``; see the module doc.

    ``max_unknown`` and ``max_backoff`` are the daemons' ``[retry]`` settings: a storm-doomed
    row takes about ``max_unknown`` backoffs of ``max_backoff`` to end parked.
    """
    settings = Settings(
        duration_s, daemons, restart_postgres, settle_s, stall_s, rate, initial_rows, lanes,
        tuple(without), max_unknown, max_backoff,
    )  # fmt: skip
    began = time.monotonic()
    # Sessions the harness cuts or kills fail their pool reset: expected, and not worth a trace.
    logging.getLogger("sqlalchemy.pool").setLevel(logging.CRITICAL)
    torture = Torture(url, seed, workdir, settings)
    try:
        torture.run()
    finally:
        torture.close()
    torture.report.duration = time.monotonic() - began
    return torture.report


class Torture:
    """One run: the world, a writer, the chaos; then calm, settle and the promises checked."""

    def __init__(self, url: str, seed: int, workdir: Path, settings: Settings) -> None:
        backend = backend_of(url)
        self.settings, self.workdir = settings, workdir
        self.report = Report(seed=seed, db=backend)
        print(
            f"torture: seed={seed} db={backend} duration={settings.duration_s:g}s workdir={workdir}"
        )
        root = Random(seed)
        writer_rng, chaos_rng = Random(root.getrandbits(64)), Random(root.getrandbits(64))
        count = settings.daemons
        if count is None:
            count = 1 if backend == "sqlite" else 2
        self.world = World.open(
            url, workdir, count, self.report, settings.max_unknown, settings.max_backoff
        )
        w = self.world
        self.writer = Writer(writer_rng, w.db, w.sim, set(), self.report, settings.lanes)
        wanted = settings.restart_postgres and backend == "postgresql"
        restart = postgres_restart_command() if wanted else None
        self.chaos = Chaos(
            chaos_rng, w.sim, w.port, w.db, w.pool, self.writer, self.report, restart,
            settings.without, settings.max_unknown,
        )  # fmt: skip
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []

    def run(self) -> None:
        until = self.rage()
        self.calm()
        self.settle(until)
        self.world.stop()
        finish(self.report, self.world, self.writer, self.chaos, self.settings.max_unknown)

    def rage(self) -> float:
        """Rows first, the daemons started, then the writer and the chaos for the duration
        (the writer stops a little earlier, so its last rows have time to settle)."""
        duration_s = self.settings.duration_s
        for _ in range(self.settings.initial_rows):
            self.writer.add(utcnow())
        self.world.start_daemons()
        until = time.monotonic() + duration_s
        args = (self.stop, until - 0.15 * duration_s, self.settings.rate)
        self.threads = [threading.Thread(target=self.writer.run, args=args)]
        self.threads[0].start()
        self.chaos.run(self.stop, until)
        self.threads[0].join(timeout=180)
        if self.writer.error:
            self.report.violations.append(f"harness: the writer failed: {self.writer.error}")
        return until

    def calm(self) -> None:
        """Every window ends, general faults stop, every daemon runs and reloads."""
        self.chaos.calm()
        self.world.every_daemon_up(self.report)
        self.report.extra["reloads"] += self.world.pool.reload()  # removed methods, halts forgotten
        self.chaos.heads.calm()  # every daemon up: each parked lane head finished, its lane checked

    def settle(self, until: float) -> None:
        """Wait until the table converges; a run that does not is a violation."""
        report, world = self.report, self.world
        converging = Converging(self.writer, world.db, world.pool, self.chaos.seams)
        settling = time.monotonic()
        report.extra["calm_s"] = round(settling - until)
        why = converging.wait(self.settings.settle_s, self.settings.stall_s)
        report.extra["settle_s"] = round(time.monotonic() - settling)
        report.extra["reloads"] += converging.reloads
        if why is not None:
            table = converging.table() or Table({})
            stuck = converging.open
            report.violations.append(
                f"{why}: {len(stuck)} rows open, e.g. "
                + "; ".join(f"{k!r}: {table.rows.get(k)}" for k in stuck[:5])
            )

    def close(self) -> None:
        """After the run or a failure: threads joined, the world closed, the chaos log kept."""
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=60)
        self.world.close()
        (self.workdir / "chaos.log").write_text("\n".join(self.chaos.log) + "\n")


class Converging:
    """The settle phase: wait until every row is where it can stay, or nothing moves.

    Progress is fewer rows open, or more unknown outcomes counted on storm-doomed rows (each
    needs max_unknown_attempts of them, a backoff apart, to end parked).
    """

    def __init__(self, writer: Writer, db: Database, pool: Daemons, seams: Seams) -> None:
        self.writer, self.db, self.pool, self.seams = writer, db, pool, seams
        self.removed = 0
        self.open: list[str] = []
        self.best = ((float("inf"), 0.0), time.monotonic())  # least left to do, and since when
        self.reloads = 0
        self.storms = {s.key for s in writer.specs if s.kind.startswith("storm_doomed")}

    def table(self) -> Table | None:
        rows = self.db.try_rows()
        return None if rows is None else Table(rows, self.seams.purged)

    def done(self) -> bool:
        self.pool.check()
        table = self.table()
        if table is None:
            return False
        # NOT_FOUND stops a method until a reload: the operator reloads after each one.
        removed = sum(1 for r in table.rows.values() if r["park_reason"] == "method_removed")
        if removed > self.removed:
            self.removed = removed
            self.reloads += self.pool.reload()
        self.open = settled(self.writer.specs, table)
        counted = sum(int(table.rows[k]["unknown_attempts"]) for k in self.open if k in self.storms)
        left = (float(len(self.open)), -float(counted))
        if left < self.best[0]:
            self.best = (left, time.monotonic())
        return not self.open

    def stalled(self, seconds: float) -> bool:
        return time.monotonic() - self.best[1] > seconds

    def wait(self, settle_s: float, stall_s: float) -> str | None:
        """None once converged; else why not (in ``settle_s``, or no progress in ``stall_s``)."""
        end = time.monotonic() + settle_s
        while time.monotonic() < end:
            if self.done():
                return None
            if self.stalled(stall_s):
                return f"no row settled for {stall_s:g}s"
            time.sleep(0.25)
        return None if self.done() else f"did not converge in {settle_s:g}s"


def finish(report: Report, world: World, writer: Writer, chaos: Chaos, max_unknown: int) -> None:
    """The figures, then every promise, into ``report``."""
    rows = world.db.rows()
    _figures(report, rows, world, chaos)
    cancelled = world.db.cancelled_by_client()
    report.extra["reload_cancelled"] = cancelled
    report.violations += chaos.seams.found + chaos.heads.found + chaos.answers.found
    doomed = {s.key for s in writer.specs if s.park == "unknown_outcome"}
    report.extra["max_unknown_others"] = max(
        (r["unknown_attempts"] for k, r in rows.items() if k not in doomed), default=0
    )
    if cancelled:
        report.violations.append(
            f"{cancelled} calls in flight were cancelled by the daemon's own client ('Channel "
            "closed!': a reload or stop closed the channel under them) and recorded as unknown "
            "outcomes"
        )
    observed = Observed.of(world.sim, world.pool.killed_at)
    observed.reloads = list(world.pool.reloads)
    observed.sim_stops = [(a, b or utcnow()) for a, b in chaos.faults.sim_stops]
    observed.windows = list(chaos.answers.windows)
    table = Table(rows, chaos.seams.purged, world.db.history(), world.db.unshowable(rows))
    report.promises = promise_names()
    found = check(writer.specs, table, observed, world.catalog, max_unknown)
    report.violations += condense(found)


def _figures(report: Report, rows: dict[str, dict[str, Any]], world: World, chaos: Chaos) -> None:
    """The end state's figures (the report's line shows them)."""
    sim = world.sim
    report.states = Counter(r["state"] for r in rows.values())
    report.extra["maybe_executed"] = sum(1 for r in rows.values() if r["maybe_executed"])
    report.extra["blocked"] = sum(1 for r in rows.values() if r["state"] == "pending" and r["lane"])
    report.extra["calls"] = len(sim.calls)
    report.extra["fault_hits"] = sum(f.hits for f in chaos.faults.general)
    report.extra["executed_errored"] = sum(1 for c in sim.calls if c.executed and c.code != "OK")
