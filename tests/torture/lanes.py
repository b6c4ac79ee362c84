"""The lane-head seams of issue 11, as chaos actions; each is counted in ``report.faults``.

Each makes a lane of its own whose first row, the head, parks: its key is answered
FAILED_PRECONDITION (as the writer's ``doom:precondition`` rows are), and rows of the lane
wait behind it. Once the head is parked, more rows are written; then the head is finished
while other writers (threads of their own) add rows to the lane at that very moment, so the
daemons' sorting of new rows (``outbox.store.heads``) races the finish:

- ``lane_unblock``: an operator cancels the head through ``Store.cancel`` (as ``outbox
  cancel`` does), or requeues it through ``Store.requeue`` with its fault cleared, so that it
  commits. The first of a run does both (two lanes), later ones either.
- ``head_by_hand``: the head is cancelled by plain SQL (``UPDATE … SET state = 'cancelled'``,
  as a careless operator would): nothing settles its lane. The daemons' ``LaneKeeper``
  releases such a lane within ``LANE_KEEPER_INTERVAL`` (a minute, a module constant: longer
  than a CI run); the harness runs ``LaneKeeper(store).run_once`` itself right after the
  edit, standing in for the daemon's minute.

Then (after a requeue: once the head has committed) the lane is read: a row marked waiting
(``lane_behind``) with no open row before it waits behind a finished row, and nothing but a
LaneKeeper run would ever send it: a violation (``found``). At the end, ``promises`` wants every
row of the lane sent once, in id order, and none left pending (``RowSpec.unblocked``).

Injected by ``chaos``: must not import the chaos loop nor the checks (``promises``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from random import Random

import sqlalchemy as sa

from outbox.clock import utcnow
from outbox.errors import OperatorActionError
from outbox.services import LaneKeeper
from tests.torture.database import Database
from tests.torture.faults import DOOMS, ChaosFault
from tests.torture.seams import Later, insert_logged, lane_row
from tests.torture.simulator import TortureSimulator
from tests.torture.vocabulary import POLL_S, Report, RowSpec, wait_until
from tests.torture.writers import Writer

OPERATOR_WAYS = ("cancel", "requeue")  # lane_unblock; head_by_hand is "sql"
PRECONDITION = next(d for d in DOOMS if d[0] == "precondition")
ACTOR = "torture@chaos"
TRIES = 40  # looks for a parked (or committed) head, POLL_S apart; then it is calm's
CALM_S = 30.0  # in the calm: how long a head may take to park, or to commit once requeued
#: What had just happened when a lane was found waiting behind a finished row.
AFTER = {
    "cancel": "right after Store.cancel of its parked head",
    "requeue": "once its requeued head had committed",
    "sql": "after its head was cancelled by hand and a LaneKeeper run followed",
}


@dataclass(eq=False)
class HeadedLane:
    """A lane of these seams: its head, the fault that parks it, and how it is finished."""

    name: str
    head: RowSpec
    fault: ChaosFault
    how: str  # "cancel", "requeue" or "sql"
    refused: bool = False  # the store refused the operator (the head may have executed)
    kept: bool = False  # by hand: the harness's LaneKeeper run is done
    checked: bool = False


class LaneHeads:
    """The lane-head seams; ``actions()`` gives them to the chaos thread with their weights."""

    def __init__(
        self,
        rng: Random,
        sim: TortureSimulator,
        db: Database,
        writer: Writer,
        report: Report,
        later: Later,
        note: Callable[[str], None],
    ) -> None:
        self.rng = rng
        self.sim = sim
        self.db = db
        self.writer = writer
        self.report = report
        self.later = later
        self.note = note
        self.found: list[str] = []
        self.lanes: list[HeadedLane] = []
        self.ways = list(OPERATOR_WAYS)  # the first lane_unblock does each
        self.polling = True  # False from the calm on: ``calm`` waits for what is left

    def actions(self) -> dict[str, tuple[Callable[[], None], int]]:
        return {"lane_unblock": (self.lane_unblock, 2), "head_by_hand": (self.head_by_hand, 2)}

    def lane_unblock(self) -> None:
        ways, self.ways = self.ways or [self.rng.choice(OPERATOR_WAYS)], []
        for how in ways:
            self._block(how)

    def head_by_hand(self) -> None:
        self._block("sql")

    # ---- a lane behind a parked head

    def _block(self, how: str) -> None:
        name = f"head-{how}-{self.rng.randrange(16**6):06x}"
        head = lane_row(self.rng, self.writer, name, "lane_head")
        _kind, code, message, head.park = PRECONDITION
        self.writer.doomed.add(head.key)  # general faults spare it: it parks, never executes
        fault = ChaosFault(code, message, keys=frozenset({head.key}))
        self.sim.inject(fault)
        self._write([head, *self._rows(name, self.rng.randint(2, 4))])
        lane = HeadedLane(name, head, fault, how)
        self.lanes.append(lane)
        self.note(f"lane {name}: head row {head.index} {head.key} parks, then {how}")
        self._poll(lane, "parked", self._finish, TRIES)

    def _rows(self, name: str, count: int) -> list[RowSpec]:
        return [lane_row(self.rng, self.writer, name, "behind_head") for _ in range(count)]

    def _write(self, specs: list[RowSpec]) -> None:
        for spec in specs:
            self.db.insert(spec)
            self.writer.register(spec)

    def _head_state(self, lane: HeadedLane) -> str | None:
        try:
            row = self.db.rows_of([lane.head.key]).get(lane.head.key)
        except sa.exc.DBAPIError:
            return None
        return None if row is None else str(row["state"])

    def _poll(
        self, lane: HeadedLane, state: str, then: Callable[[HeadedLane], None], tries: int
    ) -> None:
        """``then(lane)`` once its head is ``state``, looked for ``tries`` times (then ``calm``)."""
        if self._head_state(lane) == state:
            then(lane)
        elif tries > 1 and self.polling:
            retry = lambda: self._poll(lane, state, then, tries - 1)  # noqa: E731
            self.later(POLL_S, f"lane {lane.name} {state}?", retry)

    # ---- the finish, raced by writers

    def _finish(self, lane: HeadedLane) -> None:
        """The head is parked: more rows, then the finish while other writers add rows."""
        if lane.head.unblocked or lane.refused:
            return
        self._write(self._rows(lane.name, self.rng.randint(1, 3)))
        racing = self._rows(lane.name, self.rng.randint(2, 3))
        go = threading.Event()
        writers = [threading.Thread(target=self._race, args=(go, s), daemon=True) for s in racing]
        for thread in writers:
            thread.start()
        lane.fault.active = lane.how != "requeue"  # requeued, the next send commits
        go.set()
        finished = self._finish_head(lane)
        for thread in writers:
            thread.join(timeout=130)
        for spec in racing:
            self.writer.register(spec)
        if not finished:
            lane.fault.active = True
            if not lane.refused:
                self._poll(lane, "parked", self._finish, TRIES)
            return
        lane.head.unblocked = lane.how
        self.report.faults["head_by_hand" if lane.how == "sql" else "lane_unblock"] += 1
        self.report.extra[f"lane_head_{lane.how}"] += 1
        if lane.how == "requeue":
            self._poll(lane, "committed", self._check, TRIES)
        else:
            self._check(lane)

    def _race(self, go: threading.Event, spec: RowSpec) -> None:
        go.wait()
        insert_logged(self.db, spec, self.note)

    def _finish_head(self, lane: HeadedLane) -> bool:
        key, now = lane.head.key, utcnow()
        try:
            if lane.how == "cancel":
                self.db.store.cancel(key, ACTOR, "torture: unblock its lane", now, False)
            elif lane.how == "requeue":
                self.db.store.requeue(key, ACTOR, "torture: precondition cleared", now)
            else:
                self.db.cancel_by_hand(key)
        except OperatorActionError as exc:  # e.g. maybe_executed: it stays parked
            lane.refused = True
            self.report.extra["lane_head_refused"] += 1
            self.note(f"lane {lane.name}: {lane.how} of its head refused: {exc}")
            return False
        except sa.exc.DBAPIError as exc:
            self.note(f"lane {lane.name}: {lane.how} of its head failed: {type(exc).__name__}")
            return False
        self.note(f"lane {lane.name}: head {lane.how} done")
        return True

    # ---- the lane moves on

    def _check(self, lane: HeadedLane) -> None:
        """No row of the lane waits (``lane_behind``) with no open row before it."""
        try:
            if lane.how == "sql" and not lane.kept:
                self._keep(lane)
            stuck = self.db.waiting_behind_finished(lane.name)
        except sa.exc.DBAPIError as exc:
            self.note(f"lane {lane.name}: check failed ({type(exc).__name__})")
            if self.polling:
                self.later(POLL_S, f"lane {lane.name} check", lambda: self._check(lane))
            return
        lane.checked = True
        if stuck:
            self.found.append(
                f"lane {lane.name}: rows {stuck} wait behind a finished row {AFTER[lane.how]}: "
                "marked waiting (lane_behind) with no open row before them, they would be sent "
                "only by a LaneKeeper run (a minute later, or never without one)"
            )

    def _keep(self, lane: HeadedLane) -> None:
        """By hand: the daemons' LaneKeeper run (once a minute there), made here at once."""
        held = self.db.waiting_behind_finished(lane.name)
        self.report.extra["by_hand_held"] += len(held)  # only a LaneKeeper releases these
        LaneKeeper(self.db.store).run_once(utcnow())
        lane.kept = True
        self.note(f"lane {lane.name}: LaneKeeper run, {len(held)} rows were held")

    def calm(self) -> None:
        """After the chaos, every daemon up: every head finished (once parked), every lane
        checked (a requeued head once it committed)."""
        for lane in self.lanes:
            if not (lane.head.unblocked or lane.refused):
                if wait_until(self._head_is(lane, "parked"), CALM_S):
                    self._finish(lane)
                else:
                    self.note(f"lane {lane.name}: its head never parked")
            if not lane.head.unblocked or lane.checked:
                continue
            if lane.how != "requeue" or wait_until(self._head_is(lane, "committed"), CALM_S):
                self._check(lane)

    def _head_is(self, lane: HeadedLane, state: str) -> Callable[[], bool]:
        return lambda: self._head_state(lane) == state
