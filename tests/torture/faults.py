"""The guide's faults, and the chaos actions that inject them with the crashes.

- The catalogues: ``DOOMS`` (row-specific faults that park a row for a known reason) and
  ``GENERAL`` (every other answer of the guide's table, executed-then-errored included).
- ``ChaosFault``: a general fault, switchable, never on a doomed key; its ``UnknownBudget``.
- ``Faults``: the chaos actions of the guide's table and of crashes: a general fault, the
  rollover, maintenance and wrong-key windows, SIGKILLed daemons, cut connections, the
  simulator restarted mid-call, SIGHUP, and the PostgreSQL server restarted. Windows and
  restarts end by scheduled undo actions (``Later``).

The seams (``seams``, ``lanes``, ``answers``) are faults too, each in a module of its own.
Must not import the chaos loop (``chaos``) nor the checks (``promises``).
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from datetime import datetime
from random import Random

import grpc
import sqlalchemy as sa

from outbox.clock import utcnow
from outbox.simulator import Fault
from tests.torture.daemons import Daemons
from tests.torture.database import Database
from tests.torture.simulator import TortureSimulator
from tests.torture.vocabulary import (
    DEADLINE_S,
    MAX_UNKNOWN,
    WRITES,
    C,
    Report,
    wait_until,
)

#: Row-specific parking faults: (kind, code, message, the park_reason it must produce).
DOOMS: tuple[tuple[str, grpc.StatusCode, str, str], ...] = (
    ("precondition", C.FAILED_PRECONDITION, "compliance question pending", "precondition"),
    ("object_limit", C.RESOURCE_EXHAUSTED, "100", "object_limit"),  # the guide: "a number"
    ("not_found", C.NOT_FOUND, "method removed: use v2", "method_removed"),
    ("unimplemented", C.UNIMPLEMENTED, "not implemented for this account", "rejected"),
    ("invalid_argument", C.INVALID_ARGUMENT, "account closed", "rejected"),
    ("out_of_range", C.OUT_OF_RANGE, "amount out of range", "rejected"),
)
BAD_KINDS = ("bad_method", "bad_payload", "bad_key")

#: gRPC's words for a channel that could not connect, as a server sends them (a proxy or an
#: upstream inside Recrypt) after the call executed: an unknown outcome, never "never sent".
FAILED_TO_CONNECT = (
    "failed to connect to all addresses; last error: UNAVAILABLE: ipv4:10.20.0.7:8443: "
    "Failed to connect to remote host: Connection refused"
)
#: DEADLINE_EXCEEDED vgw-db: counts toward max_unknown_attempts (a storm parks the row).
VGW_DB_DEADLINE = "vgw-db transaction timed out"

#: General faults: (kind, code, message, execute first). None as execute: chosen at random.
GENERAL: tuple[tuple[str, grpc.StatusCode, str, bool | None], ...] = (
    ("unavailable_vgw_db", C.UNAVAILABLE, "vgw-db: rollover in progress", False),
    ("executed_unavailable_vgw_db", C.UNAVAILABLE, "vgw-db: rollover in progress", True),
    ("deadline_vgw_db", C.DEADLINE_EXCEEDED, VGW_DB_DEADLINE, False),
    ("executed_deadline_vgw_db", C.DEADLINE_EXCEEDED, VGW_DB_DEADLINE, True),
    ("server_failed_to_connect", C.UNAVAILABLE, FAILED_TO_CONNECT, True),
    ("unavailable_transport", C.UNAVAILABLE, "connection reset by peer", None),
    ("deadline_transport", C.DEADLINE_EXCEEDED, "upstream timeout", None),
    ("unknown", C.UNKNOWN, "unexpected error", None),
    ("internal", C.INTERNAL, "internal error", None),
    ("aborted", C.ABORTED, "transaction aborted", None),
    ("cancelled", C.CANCELLED, "cancelled upstream", None),
    ("data_loss", C.DATA_LOSS, "data loss", None),
    ("rate_limited", C.RESOURCE_EXHAUSTED, "rate limit exceeded, slow down", False),
    # Digits, but not a bare number: rate limiting all the same, never object_limit.
    ("rate_limited_429", C.RESOURCE_EXHAUSTED, "429 Too Many Requests", False),
    ("rate_limited_retry_in", C.RESOURCE_EXHAUSTED, "rate limit exceeded, retry in 1s", False),
    (
        "permission_denied",
        C.PERMISSION_DENIED,
        "maintenance mode, see https://x.com/RecryptCS",
        False,
    ),
    ("unauthenticated", C.UNAUTHENTICATED, "Session key", False),
    ("client_deadline", C.OK, "", False),  # answered after the client's deadline: executed
)


class UnknownBudget:
    """How many unknown outcomes general faults may give one key: fewer than
    ``[retry] max_unknown_attempts``, so only the rows a storm dooms ever run out of them
    (faults pile up while a gate holds everything back, then land on the few rows sent next).
    Used under the simulator's lock."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.given: Counter[str] = Counter()

    def take(self, key: str | None) -> bool:
        if key is None:
            return True
        if self.given[key] >= self.limit:
            return False
        self.given[key] += 1
        return True


def counts_unknown(code: grpc.StatusCode, message: str) -> bool:
    """Whether the daemon counts this answer toward max_unknown_attempts (README's table)."""
    if code == C.UNAVAILABLE:
        return "vgw-db" not in message
    unknown = (C.DEADLINE_EXCEEDED, C.UNKNOWN, C.INTERNAL, C.ABORTED, C.CANCELLED, C.DATA_LOSS)
    return code in unknown


@dataclass(eq=False)
class ChaosFault(Fault):
    """A general fault: switchable (a window ends with ``active = False``), never on a doomed key.

    ``spared`` is the harness's live set of doomed keys, so a doomed row only ever gets its own
    parking answer (plus gate answers, which never execute). ``budget``: for a fault whose
    answers count as unknown outcomes, the per-key allowance it draws on.
    """

    spared: Collection[str] = field(default_factory=frozenset)
    active: bool = True
    budget: UnknownBudget | None = None

    def matches(self, path: str, key: str | None) -> bool:
        if not (self.active and key not in self.spared and super().matches(path, key)):
            return False
        return self.budget is None or self.budget.take(key)  # taken: first match wins


Later = Callable[[float, str, Callable[[], None]], None]


class Timeline:
    """The chaos thread's scheduled undo actions (a window's end, a daemon's restart), and its
    log (``chaos.log`` in the run's directory)."""

    def __init__(self) -> None:
        self.undo: list[tuple[float, str, Callable[[], None]]] = []
        self.log: list[str] = []

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


class Faults:
    """The chaos actions of the guide's table and of crashes (see the module doc).

    ``burst``: write a few rows at once (``Seams.burst``), so a simulator stop lands mid-call.
    """

    def __init__(
        self,
        rng: Random,
        sim: TortureSimulator,
        port: int,
        db: Database,
        daemons: Daemons,
        doomed: Collection[str],
        report: Report,
        pg_restart: list[str] | None,
        timeline: Timeline,
        burst: Callable[[int], None],
        max_unknown: int = MAX_UNKNOWN,
    ) -> None:
        self.rng, self.sim, self.port, self.db, self.daemons = rng, sim, port, db, daemons
        self.doomed, self.report, self.pg_restart = doomed, report, pg_restart
        self.timeline, self.burst = timeline, burst
        self.budget = UnknownBudget(max_unknown // 2)
        self.general: list[ChaosFault] = []
        self.sim_down = False
        self.sim_stops: list[tuple[datetime, datetime | None]] = []  # simulator down, from-to
        self.windows: Counter[str] = Counter()  # open windows per kind
        self.pause = threading.Event()

    def actions(self) -> dict[str, tuple[Callable[[], None], int]]:
        """These chaos actions with their weights."""
        return {
            "fault": (self.fault, 40),
            "kill": (self.kill, 10),
            "cut": (self.cut, 7),
            "sim_restart": (self.restart_sim, 3),
            "rollover": (self.rollover_window, 3),
            "maintenance": (self.maintenance_window, 3),
            "wrong_key": (self.wrong_key_window, 2),
            "reload": (self.reload, 3),
        }

    def quiet(self) -> bool:
        """No window open, the simulator up, a daemon running: calls can flow."""
        running = [s for s in self.daemons.running() if self.daemons.is_started(s)]
        return not self.sim_down and not any(self.windows.values()) and bool(running)

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
        self.timeline.note(f"fault {name} x{times} execute={execute}")

    def rollover_window(self) -> None:
        fault = ChaosFault(C.UNAVAILABLE, "vgw-db: weekly rollover")
        fault.spared = self.doomed
        self.sim.inject(fault)
        self.general.append(fault)
        self.windows["rollover"] += 1
        self.report.faults["rollover_window"] += 1
        self.timeline.note("rollover window opens")

        def end() -> None:
            self.windows["rollover"] -= 1
            fault.active = False

        self.timeline.later(self.rng.uniform(0.5, 3.0), "rollover_window", end)

    def maintenance_window(self) -> None:
        self.windows["maintenance"] += 1
        self.sim.set_maintenance(True)
        self.report.faults["maintenance_window"] += 1
        self.timeline.note("maintenance window opens")

        def end() -> None:
            self.windows["maintenance"] -= 1
            if not self.windows["maintenance"]:
                self.sim.set_maintenance(False)

        self.timeline.later(self.rng.uniform(0.5, 3.0), "maintenance_window", end)

    def wrong_key_window(self) -> None:
        self.windows["wrong_key"] += 1
        self.sim.refuse_keys(True)
        self.report.faults["wrong_key_window"] += 1
        self.timeline.note("wrong-key window opens")

        def end() -> None:
            self.windows["wrong_key"] -= 1
            if not self.windows["wrong_key"]:
                self.sim.refuse_keys(False)
                self.report.extra["reloads"] += self.daemons.reload()

        self.timeline.later(self.rng.uniform(0.5, 3.0), "wrong_key_window", end)

    def kill(self, tries: int = 6) -> None:
        """SIGKILL a daemon; none running (one stopping, say): again in a moment."""
        running = [s for s in self.daemons.running() if not s.stopping]
        if not running:
            if tries > 1:
                self.timeline.later(0.5, "kill", lambda: self.kill(tries - 1))
            return
        slot = self.rng.choice(running)
        self.daemons.kill(slot)
        self.timeline.note(f"kill daemon {slot.index}")

        def restart() -> None:
            self.daemons.start(slot)
            self.report.restarts += 1

        self.timeline.later(self.rng.uniform(0.0, 2.0), f"restart daemon {slot.index}", restart)

    def cut(self) -> None:
        try:
            what = self.db.cut(self.rng, self.pause.wait)
        except sa.exc.DBAPIError as exc:  # e.g. the server is restarting
            self.timeline.note(f"cut failed: {type(exc).__name__}")
            return
        self.report.conn_cuts += 1
        self.timeline.note(f"cut: {what}")

    def restart_sim(self) -> None:
        if self.sim_down:
            return
        # Hold a few calls inside the simulator so the stop lands mid-call.
        hold = ChaosFault(C.OK, execute=True, times=6, delay=0.5, methods=WRITES)
        hold.spared = self.doomed
        self.sim.inject(hold)
        self.burst(self.rng.randint(2, 5))
        self.sim.wait_for(lambda _s: hold.hits >= 1, timeout=3.0)
        hold.active = False
        self.sim.stop(grace=0)
        self.sim_down = True
        self.sim_stops.append((utcnow(), None))
        self.report.sim_restarts += 1
        self.timeline.note(f"simulator stopped with {hold.hits} held calls")

        self.timeline.later(self.rng.uniform(0.2, 2.0), "simulator start", self.start_sim)

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
        self.timeline.note("postgres restart")
        with self.db.disturbed():
            done = subprocess.run(self.pg_restart, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            self.report.violations.append(
                f"harness: {' '.join(self.pg_restart)} failed: {done.stderr.strip()}"
            )
            return
        self.report.pg_restarts += 1

    def calm(self) -> None:
        """End what the windows changed and start the simulator if it is down. Faults with a
        count stay until used up (each injected fault really answers some call)."""
        for fault in self.general:
            if fault.times is None:
                fault.active = False
        self.sim.set_maintenance(False)
        self.sim.refuse_keys(False)
        self.db.restore()
        if self.sim_down:
            self.start_sim()


def _try_start(sim: TortureSimulator, listen: str) -> bool:
    try:
        sim.start(listen=listen)
    except OSError:
        return False
    return True
