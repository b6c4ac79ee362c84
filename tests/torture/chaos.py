"""The chaos loop: from one ``random.Random(seed)``, every fault and seam at random, then calm.

``Chaos`` holds the injectors, each a module of its own: ``faults.Faults`` (the guide's table,
its windows, kills, cuts, simulator and PostgreSQL restarts, SIGHUP), ``seams.Seams`` (issue
9: outages mid-call, lane races, poison rows, method edits, key reuse, reloads, cancels),
``lanes.LaneHeads`` (issue 11: parked lane heads finished by an operator or by hand) and
``answers.Answers`` (issue 10: refused methods, "failed to connect" after executing, vgw-db
storms). ``run`` injects every action at least once, at a random moment, and otherwise picks
them by weight; ``calm`` ends every window and hands each injector its quiet moment.

Must not import the checks (``promises``) nor the run's phases (``harness``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Collection
from random import Random

from tests.torture.answers import Answers
from tests.torture.daemons import Daemons
from tests.torture.database import Database
from tests.torture.faults import GENERAL, Faults, Timeline
from tests.torture.lanes import LaneHeads
from tests.torture.seams import Seams
from tests.torture.simulator import TortureSimulator
from tests.torture.vocabulary import MAX_UNKNOWN, Report, wait_until
from tests.torture.writers import Writer

Action = Callable[[], None]
#: The actions every run must take at least once, each at a (monotonic) moment.
Musts = list[tuple[float, Action]]


class Chaos:
    """The chaos thread: its injectors, their actions by name and weight, the loop, the calm."""

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
        self.rng, self.daemons = rng, daemons
        self.without = set(without)
        self.timeline = Timeline()
        later, note = self.timeline.later, self.timeline.note
        self.faults = Faults(
            rng, sim, port, db, daemons, writer.doomed, report, pg_restart, self.timeline,
            self._burst, max_unknown,
        )  # fmt: skip
        self.seams = Seams(
            rng, sim, db, daemons, writer, writer.doomed, report, later, note, self.quiet
        )
        self.heads = LaneHeads(rng, sim, db, writer, report, later, note)
        self.answers = Answers(
            rng, sim, db, daemons, writer, writer.doomed, report, later, note, self.quiet,
            self.faults.general, self.faults.budget,
        )  # fmt: skip

    def _burst(self, count: int) -> None:
        self.seams.burst(count)  # the seams come after the faults: a method, not ``seams.burst``

    @property
    def log(self) -> list[str]:
        return self.timeline.log

    def quiet(self) -> bool:
        """No window open, the simulator up, a daemon running: calls can flow."""
        return self.faults.quiet()

    def actions(self) -> dict[str, tuple[Action, int]]:
        """Every chaos action with its weight (but those the run is ``without``)."""
        actions = {
            **self.faults.actions(),
            **self.seams.actions(),
            **self.heads.actions(),
            **self.answers.actions(),
        }
        return {name: a for name, a in actions.items() if name not in self.without}

    def musts(self, actions: dict[str, tuple[Action, int]], start: float, span: float) -> Musts:
        """Every action and every general fault at least once, at a random moment; the
        PostgreSQL restarts (if asked) spread over the run."""
        rng = self.rng
        must: Musts = [(start + rng.uniform(0.05, 0.8) * span, fn) for fn, _w in actions.values()]
        must += [
            (start + rng.uniform(0.0, 0.8) * span, lambda k=g[0]: self.faults.fault(k))
            for g in GENERAL
        ]
        if self.faults.pg_restart is not None:
            count = max(1, int(span // 180))
            must += [
                (start + (i + rng.uniform(0.2, 0.7)) * span / count, self.faults.restart_postgres)
                for i in range(count)
            ]
        must.sort(key=lambda m: m[0])
        return must

    def run(self, stop: threading.Event, until: float) -> None:
        """Until ``until`` (or ``stop``): the due undo actions, a look at the daemons, then the
        next action that must happen, or one picked by weight."""
        rng = self.rng
        start = time.monotonic()
        span = max(until - start, 1.0)
        self.answers.start(start + 0.4 * span)
        actions = self.actions()
        must = self.musts(actions, start, span)
        names = list(actions)
        weights = [w for _fn, w in actions.values()]
        while not stop.is_set() and time.monotonic() < until:
            self.timeline.run_due()
            self.daemons.check()
            if must and must[0][0] <= time.monotonic():
                must.pop(0)[1]()
            else:
                actions[rng.choices(names, weights)[0]][0]()
            stop.wait(rng.uniform(0.05, 0.6))
        for _at, fn in must:  # whatever the clock left over
            fn()

    def calm(self) -> None:
        """End every window, restart what is down. Faults with a count stay until used up
        (each injected fault really answers some call), as do the row-specific ones."""
        self.heads.polling = False  # its lanes wait for the daemons (``heads.calm``)
        self.timeline.run_due(everything=True)
        self.faults.calm()
        # Seams waiting for a quiet moment get it now (each waits a bounded number of times).
        for _ in range(10):
            if not self.timeline.undo:
                break
            self.daemons.check()
            wait_until(self.quiet, 30)
            self.timeline.run_due(everything=True)
        self.seams.calm()  # after the simulator is back: an edit waits for a send
        if "refusal" not in self.without:
            self.answers.calm()
