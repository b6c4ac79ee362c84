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
``Report`` lists every violation; ``checks`` says which). Row-specific faults are kept ahead
of the general ones by construction: general faults (``ChaosFault``) never match a doomed key,
so a doomed row gets exactly its parking answer and never executes, and the set of parked
rows is known exactly. General faults whose answers count as unknown outcomes draw on a
per-key budget (``UnknownBudget``, half of ``[retry] max_unknown_attempts``), so only the rows
a storm dooms ever run out of attempts.
"""

from __future__ import annotations

import logging
import os
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection
from datetime import datetime
from pathlib import Path
from random import Random

import sqlalchemy as sa

from outbox.clock import utcnow
from outbox.descriptors import Catalog
from tests.torture.answers import Answers
from tests.torture.checks import Observed, Table, check, condense, expected_request, settled
from tests.torture.daemons import Daemons, write_config
from tests.torture.database import Database
from tests.torture.lanes import LaneHeads
from tests.torture.parts import (
    DEADLINE_S,
    GENERAL,
    MAX_BACKOFF_S,
    MAX_UNKNOWN,
    WRITES,
    C,
    ChaosFault,
    Report,
    RowSpec,
    TortureSimulator,
    UnknownBudget,
    backend_of,
    counts_unknown,
    wait_until,
)
from tests.torture.seams import Seams
from tests.torture.writer import Writer

__all__ = ["Report", "RowSpec", "check", "expected_request", "run_torture"]

# --------------------------------------------------------------------------- chaos


class Chaos:
    """The chaos thread's actions; windows and restarts end by scheduled undo actions."""

    def __init__(
        self,
        rng: Random,
        sim: TortureSimulator,
        port: int,
        db: Database,
        daemons: Daemons,
        writer: Writer,
        report: Report,
        pg_restart: list[str] | None,
        without: Collection[str] = (),
        max_unknown: int = MAX_UNKNOWN,
    ) -> None:
        self.rng = rng
        self.budget = UnknownBudget(max_unknown // 2)
        self.without = set(without)
        self.sim = sim
        self.port = port
        self.db = db
        self.daemons = daemons
        self.doomed = writer.doomed
        self.report = report
        self.pg_restart = pg_restart
        self.general: list[ChaosFault] = []
        self.undo: list[tuple[float, str, Callable[[], None]]] = []
        self.sim_down = False
        self.sim_stops: list[tuple[datetime, datetime | None]] = []  # simulator down, from-to
        self.windows: Counter[str] = Counter()  # open windows per kind
        self.pause = threading.Event()
        self.log: list[str] = []
        self.seams = Seams(
            rng, sim, db, daemons, writer, self.doomed, report, self.later, self.note, self.quiet
        )
        self.heads = LaneHeads(rng, sim, db, writer, report, self.later, self.note)
        self.answers = Answers(
            rng,
            sim,
            db,
            daemons,
            writer,
            self.doomed,
            report,
            self.later,
            self.note,
            self.quiet,
            self.general,
            self.budget,
        )

    def quiet(self) -> bool:
        """No window open, the simulator up, a daemon running: calls can flow."""
        running = [s for s in self.daemons.running() if self.daemons.is_started(s)]
        return not self.sim_down and not any(self.windows.values()) and bool(running)

    def note(self, text: str) -> None:
        self.log.append(f"{time.monotonic():.2f} {text}")

    def later(self, seconds: float, name: str, action: Callable[[], None]) -> None:
        self.undo.append((time.monotonic() + seconds, name, action))

    def run_due(self, everything: bool = False) -> None:
        now = time.monotonic()
        due = [u for u in self.undo if everything or u[0] <= now]
        self.undo = [u for u in self.undo if u not in due]
        for _at, name, action in sorted(due, key=lambda u: u[0]):
            self.note(f"undo {name}")
            action()

    def fault(self, kind: str | None = None) -> None:
        rng = self.rng
        name, code, message, execute = (
            next(g for g in GENERAL if g[0] == kind) if kind else rng.choice(GENERAL)
        )
        if execute is None:
            execute = rng.random() < 0.5
        times = 1 if code == C.UNAUTHENTICATED else rng.randint(1, 6)
        delay = DEADLINE_S + rng.uniform(0.2, 0.8) if name == "client_deadline" else 0.0
        methods = WRITES if code != C.PERMISSION_DENIED else None
        fault = ChaosFault(
            code, message, execute=execute, methods=methods, times=times, delay=delay
        )
        fault.spared = self.doomed
        if counts_unknown(code, message) or name == "client_deadline":
            fault.budget = self.budget
        self.sim.inject(fault)
        self.general.append(fault)
        self.report.faults[name] += 1
        self.note(f"fault {name} x{times} execute={execute}")

    def rollover_window(self) -> None:
        fault = ChaosFault(C.UNAVAILABLE, "vgw-db: weekly rollover")
        fault.spared = self.doomed
        self.sim.inject(fault)
        self.general.append(fault)
        self.windows["rollover"] += 1
        self.report.faults["rollover_window"] += 1
        self.note("rollover window opens")

        def end() -> None:
            self.windows["rollover"] -= 1
            fault.active = False

        self.later(self.rng.uniform(0.5, 3.0), "rollover_window", end)

    def maintenance_window(self) -> None:
        self.windows["maintenance"] += 1
        self.sim.set_maintenance(True)
        self.report.faults["maintenance_window"] += 1
        self.note("maintenance window opens")

        def end() -> None:
            self.windows["maintenance"] -= 1
            if not self.windows["maintenance"]:
                self.sim.set_maintenance(False)

        self.later(self.rng.uniform(0.5, 3.0), "maintenance_window", end)

    def wrong_key_window(self) -> None:
        self.windows["wrong_key"] += 1
        self.sim.refuse_keys(True)
        self.report.faults["wrong_key_window"] += 1
        self.note("wrong-key window opens")

        def end() -> None:
            self.windows["wrong_key"] -= 1
            if not self.windows["wrong_key"]:
                self.sim.refuse_keys(False)
                self.report.extra["reloads"] += self.daemons.reload()

        self.later(self.rng.uniform(0.5, 3.0), "wrong_key_window", end)

    def kill(self, tries: int = 6) -> None:
        """SIGKILL a daemon; none running (one stopping, say): again in a moment."""
        running = [s for s in self.daemons.running() if not s.stopping]
        if not running:
            if tries > 1:
                self.later(0.5, "kill", lambda: self.kill(tries - 1))
            return
        slot = self.rng.choice(running)
        self.daemons.kill(slot)
        self.note(f"kill daemon {slot.index}")

        def restart() -> None:
            self.daemons.start(slot)
            self.report.restarts += 1

        self.later(self.rng.uniform(0.0, 2.0), f"restart daemon {slot.index}", restart)

    def cut(self) -> None:
        try:
            what = self.db.cut(self.rng, self.pause.wait)
        except sa.exc.DBAPIError as exc:  # e.g. the server is restarting
            self.note(f"cut failed: {type(exc).__name__}")
            return
        self.report.conn_cuts += 1
        self.note(f"cut: {what}")

    def restart_sim(self) -> None:
        if self.sim_down:
            return
        # Hold a few calls inside the simulator so the stop lands mid-call.
        hold = ChaosFault(C.OK, execute=True, times=6, delay=0.5, methods=WRITES)
        hold.spared = self.doomed
        self.sim.inject(hold)
        self.seams.burst(self.rng.randint(2, 5))
        self.sim.wait_for(lambda _s: hold.hits >= 1, timeout=3.0)
        hold.active = False
        self.sim.stop(grace=0)
        self.sim_down = True
        self.sim_stops.append((utcnow(), None))
        self.report.sim_restarts += 1
        self.note(f"simulator stopped with {hold.hits} held calls")

        self.later(self.rng.uniform(0.2, 2.0), "simulator start", self.start_sim)

    def start_sim(self) -> None:
        """The simulator again on its port (retried: the port may linger a moment)."""
        listen = f"127.0.0.1:{self.port}"
        if not wait_until(lambda: _try_start(self.sim, listen), timeout=15, interval=0.2):
            self.report.violations.append(f"harness: the simulator cannot listen on {listen}")
        self.sim_down = False
        if self.sim_stops and self.sim_stops[-1][1] is None:
            self.sim_stops[-1] = (self.sim_stops[-1][0], utcnow())

    def reload(self) -> None:
        self.report.extra["reloads"] += self.daemons.reload()

    def restart_postgres(self) -> None:
        assert self.pg_restart is not None
        self.note("postgres restart")
        with self.db.disturbed():
            done = subprocess.run(self.pg_restart, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            self.report.violations.append(
                f"harness: {' '.join(self.pg_restart)} failed: {done.stderr.strip()}"
            )
            return
        self.report.pg_restarts += 1

    def calm(self) -> None:
        """End every window, restart what is down. Faults with a count stay until used up
        (each injected fault really answers some call), as do the row-specific ones."""
        self.heads.polling = False  # its lanes wait for the daemons (``heads.calm``)
        self.run_due(everything=True)
        for fault in self.general:
            if fault.times is None:
                fault.active = False
        self.sim.set_maintenance(False)
        self.sim.refuse_keys(False)
        self.db.restore()
        if self.sim_down:
            self.start_sim()
        # Seams waiting for a quiet moment get it now (each waits a bounded number of times).
        for _ in range(10):
            if not self.undo:
                break
            self.daemons.check()
            wait_until(self.quiet, 30)
            self.run_due(everything=True)
        self.seams.calm()  # after the simulator is back: an edit waits for a send
        if "refusal" not in self.without:
            self.answers.calm()

    def actions(self) -> dict[str, tuple[Callable[[], None], int]]:
        """Every chaos action with its weight (but those the run is ``without``)."""
        actions = {
            "fault": (self.fault, 40),
            "kill": (self.kill, 10),
            "cut": (self.cut, 7),
            "sim_restart": (self.restart_sim, 3),
            "rollover": (self.rollover_window, 3),
            "maintenance": (self.maintenance_window, 3),
            "wrong_key": (self.wrong_key_window, 2),
            "reload": (self.reload, 3),
            **self.seams.actions(),
            **self.heads.actions(),
            **self.answers.actions(),
        }
        return {name: a for name, a in actions.items() if name not in self.without}

    def run(self, stop: threading.Event, until: float) -> None:
        rng = self.rng
        start = time.monotonic()
        span = max(until - start, 1.0)
        self.answers.start(start + 0.4 * span)
        actions = self.actions()
        # Every action and every general fault at least once, at a random moment.
        must: list[tuple[float, Callable[[], None]]] = [
            (start + rng.uniform(0.05, 0.8) * span, fn) for fn, _w in actions.values()
        ]
        must += [
            (start + rng.uniform(0.0, 0.8) * span, lambda k=g[0]: self.fault(k)) for g in GENERAL
        ]
        if self.pg_restart is not None:
            count = max(1, int(span // 180))
            must += [
                (start + (i + rng.uniform(0.2, 0.7)) * span / count, self.restart_postgres)
                for i in range(count)
            ]
        must.sort(key=lambda m: m[0])
        names = list(actions)
        weights = [w for _fn, w in actions.values()]
        while not stop.is_set() and time.monotonic() < until:
            self.run_due()
            self.daemons.check()
            if must and must[0][0] <= time.monotonic():
                must.pop(0)[1]()
            else:
                actions[rng.choices(names, weights)[0]][0]()
            stop.wait(rng.uniform(0.05, 0.6))
        for _at, fn in must:  # whatever the clock left over
            fn()


def _try_start(sim: TortureSimulator, listen: str) -> bool:
    try:
        sim.start(listen=listen)
    except OSError:
        return False
    return True


# --------------------------------------------------------------------------- the run


def postgres_restart_command() -> list[str]:
    versions = sorted(os.listdir("/etc/postgresql"), key=lambda v: int(v) if v.isdigit() else 0)
    return ["pg_ctlcluster", "--skip-systemctl-redirect", versions[-1], "main", "restart"]


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
    began = time.monotonic()
    # Sessions the harness cuts or kills fail their pool reset: expected, and not worth a trace.
    logging.getLogger("sqlalchemy.pool").setLevel(logging.CRITICAL)
    backend = backend_of(url)
    report = Report(seed=seed, db=backend)
    print(f"torture: seed={seed} db={backend} duration={duration_s:g}s workdir={workdir}")
    root = Random(seed)
    writer_rng, chaos_rng = Random(root.getrandbits(64)), Random(root.getrandbits(64))
    count = daemons if daemons is not None else (1 if backend == "sqlite" else 2)
    catalog = Catalog.load()
    sim = TortureSimulator()
    port = sim.start()
    db = Database(url)
    config = write_config(workdir, url, sim.target, max_unknown, max_backoff)
    pool = Daemons(config, workdir, count, report, sim.allow_key)
    writer = Writer(writer_rng, db, sim, set(), report, lanes)
    restart = postgres_restart_command() if restart_postgres and backend == "postgresql" else None
    chaos = Chaos(chaos_rng, sim, port, db, pool, writer, report, restart, without, max_unknown)
    stop = threading.Event()
    threads: list[threading.Thread] = []
    try:
        for _ in range(initial_rows):
            writer.add(utcnow())
        for slot in pool.slots:
            pool.start(slot)
        until = time.monotonic() + duration_s
        threads = [
            threading.Thread(target=writer.run, args=(stop, until - 0.15 * duration_s, rate)),
        ]
        threads[0].start()
        chaos.run(stop, until)
        threads[0].join(timeout=180)
        if writer.error:
            report.violations.append(f"harness: the writer failed: {writer.error}")

        # Calm: every window ends, general faults stop, every daemon runs and reloads.
        chaos.calm()
        pool.check()
        for slot in pool.slots:
            if slot.proc is None:
                pool.start(slot)
                report.restarts += 1
        if not wait_until(lambda: all(pool.is_started(s) for s in pool.running()), 60):
            report.violations.append("harness: daemons did not start after the chaos")
        report.extra["reloads"] += pool.reload()  # removed methods and halts are forgotten
        chaos.heads.calm()  # every daemon up: each parked lane head finished, its lane checked

        converging = Converging(writer, db, pool, chaos.seams)
        settling = time.monotonic()
        report.extra["calm_s"] = round(settling - until)
        why = converging.wait(settle_s, stall_s)
        report.extra["settle_s"] = round(time.monotonic() - settling)
        report.extra["reloads"] += converging.reloads
        if why is not None:
            table = converging.table() or Table({})
            stuck = converging.open
            report.violations.append(
                f"{why}: {len(stuck)} rows open, e.g. "
                + "; ".join(f"{k!r}: {table.rows.get(k)}" for k in stuck[:5])
            )
        pool.stop_all()
        sim.stop(grace=1.0)
        finish(report, db, sim, pool, writer, chaos, catalog, max_unknown)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
        pool.kill_all()
        sim.stop()
        db.restore()
        db.dispose()
        (workdir / "chaos.log").write_text("\n".join(chaos.log) + "\n")
    report.duration = time.monotonic() - began
    return report


def finish(
    report: Report,
    db: Database,
    sim: TortureSimulator,
    pool: Daemons,
    writer: Writer,
    chaos: Chaos,
    catalog: Catalog,
    max_unknown: int = MAX_UNKNOWN,
) -> None:
    """The figures, then every check, into ``report``."""
    rows = db.rows()
    report.states = Counter(r["state"] for r in rows.values())
    report.extra["maybe_executed"] = sum(1 for r in rows.values() if r["maybe_executed"])
    report.extra["blocked"] = sum(1 for r in rows.values() if r["state"] == "pending" and r["lane"])
    report.extra["calls"] = len(sim.calls)
    report.extra["fault_hits"] = sum(f.hits for f in chaos.general)
    report.extra["executed_errored"] = sum(1 for c in sim.calls if c.executed and c.code != "OK")
    cancelled = db.cancelled_by_client()
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
    observed = Observed.of(sim, pool.killed_at)
    observed.reloads = list(pool.reloads)
    observed.sim_stops = [(a, b or utcnow()) for a, b in chaos.sim_stops]
    observed.windows = list(chaos.answers.windows)
    table = Table(rows, chaos.seams.purged, db.history())
    report.violations += condense(check(writer.specs, table, observed, catalog, max_unknown))
