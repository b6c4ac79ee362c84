"""The seams issue 9 found untested, as chaos actions; each is counted in ``report.faults``.

- ``outage``: the database refuses (``Database.refusing``) while calls are in flight, so their
  answers arrive with nowhere to go; for longer than a poll, and sometimes than a lease; now
  and then a daemon is stopped (SIGTERM) in the middle of it.
- ``lane_race``: two writers on one lane, the earlier INSERT committing after the later row
  was already sent (server databases; SQLite serialises writers, so it cannot happen there).
- ``poison``: rows the database accepts but that cannot be read or sent as written: a lone
  surrogate escape (``\\ud800``), bytes that are not UTF-8 (SQLite, raw ``sqlite3``), a field
  name of 70 kB. Each must end parked ``bad_row`` (or be refused at INSERT) and hold nothing up.
- ``method_edit``: a row's ``method`` changed by plain SQL after its first send, while it
  waits for a retry; the key must never reach a second method.
- ``key_reuse``: a retention run purges finished rows, then a new row reuses a purged
  committed row's key with another payload; ``outbox.enqueue`` must refuse the key and the
  row must never commit.
- ``reload_in_flight``: SIGHUP while calls are held in the simulator.
- ``operator_cancel``: ``cancel`` without ``--force`` of a pending row (it must then never run).

Violations seen while running (rather than in the end state) go to ``found``.

Injected by ``chaos``: must not import the chaos loop nor the checks (``promises``).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from random import Random

import sqlalchemy as sa

import outbox
from outbox.clock import utcnow
from outbox.errors import OperatorActionError
from outbox.simulator import CANCEL_ORDER, PLACE_ORDER, TRANSFER, Fault
from tests.torture.daemons import Daemons, Slot
from tests.torture.database import Database, text_key, with_decimals
from tests.torture.faults import ChaosFault
from tests.torture.simulator import TortureSimulator
from tests.torture.vocabulary import LEASE_S, POLL_S, WRITES, C, Report, RowSpec, wait_until
from tests.torture.writers import Writer, new_key, payload_for, transfer_payload

LONG_NAME = 70_000  # characters in the poison field name: over MariaDB's 64 kB TEXT
Later = Callable[[float, str, Callable[[], None]], None]


def lane_row(rng: Random, writer: Writer, lane: str, kind: str = "lane") -> RowSpec:
    """A new transfer of ``lane`` (not written yet), by plain SQL or ``enqueue`` at random."""
    via = "api" if rng.random() < 0.5 else "sql"
    payload = transfer_payload(rng, account=lane)
    spec = writer.spec(new_key(rng), TRANSFER, payload, kind, via)
    spec.lane = lane
    return spec


def insert_logged(db: Database, spec: RowSpec, note: Callable[[str], None]) -> None:
    """Insert ``spec`` (from a thread of its own); a failure is noted, and reported at the end
    as the row being lost."""
    try:
        db.insert(spec)
    except Exception as exc:  # reported as the row being lost, with this note
        note(f"insert of row {spec.index} failed: {type(exc).__name__}: {exc}")


def poison_kinds(backend: str) -> list[str]:
    """The poison rows worth trying on ``backend`` (each at least once per run)."""
    kinds = ["surrogate", "long_field"]
    if backend == "sqlite":
        kinds += ["bytes_payload", "bytes_method", "bytes_key"]
    return kinds


class Seams:
    """The new fault kinds; ``actions()`` gives them to the chaos thread with their weights."""

    def __init__(
        self,
        rng: Random,
        sim: TortureSimulator,
        db: Database,
        daemons: Daemons,
        writer: Writer,
        doomed: set[str],
        report: Report,
        later: Later,
        note: Callable[[str], None],
        quiet: Callable[[], bool],
    ) -> None:
        self.rng = rng
        self.sim = sim
        self.db = db
        self.daemons = daemons
        self.writer = writer
        self.doomed = doomed
        self.report = report
        self.later = later
        self.note = note
        self.quiet = quiet  # no window open, the simulator up: calls can flow
        self.found: list[str] = []
        self.edits: list[tuple[RowSpec, str, ChaosFault]] = []
        self.poison_todo = poison_kinds(db.backend)
        rng.shuffle(self.poison_todo)
        self.reused: set[str] = set()
        self.purged: dict[str, list[dict[str, object]]] = {}

    def actions(self) -> dict[str, tuple[Callable[[], None], int]]:
        actions: dict[str, tuple[Callable[[], None], int]] = {
            "outage": (self.outage, 7),
            "poison": (self.poison, 2),
            "method_edit": (self.method_edit, 2),
            "key_reuse": (self.key_reuse, 2),
            "reload_in_flight": (self.reload_in_flight, 2),
            "operator_cancel": (self.operator_cancel, 2),
        }
        if self.db.backend != "sqlite":
            actions["lane_race"] = (self.lane_race, 3)
        return actions

    # ---- helpers

    def _slow_calls(self, times: int, delay: float) -> ChaosFault:
        """Hold the next ``times`` write calls ``delay`` seconds in the simulator, then serve."""
        fault = ChaosFault(C.OK, methods=WRITES, times=times, delay=delay)
        fault.spared = self.doomed
        self.sim.inject(fault)
        return fault

    def _arrived(self, fault: Fault, timeout: float = 3.0) -> bool:
        return self.sim.wait_for(lambda _s: fault.hits >= 1, timeout=timeout)

    def _deferred(self, name: str, action: Callable[[int], None], tries: int) -> bool:
        """Not quiet yet: ``action`` is tried again in a moment (``tries`` times at most)."""
        if tries > 1 and not self.quiet():
            self.later(0.5, name, lambda: action(tries - 1))
            return True
        return False

    def burst(self, count: int) -> None:
        """A few fresh rows, so that calls are in flight when the next fault lands."""
        rng = self.rng
        for _ in range(count):
            method = TRANSFER if rng.random() < 0.7 else PLACE_ORDER
            via = "api" if rng.random() < 0.5 else "sql"
            spec = self.writer.spec(new_key(rng), method, payload_for(rng, method), "plain", via)
            self.db.insert(spec)
            self.writer.register(spec)

    def _stoppable(self) -> Slot | None:
        slots = [s for s in self.daemons.running() if self.daemons.is_started(s) and not s.stopping]
        return self.rng.choice(slots) if slots else None

    # ---- outage

    def outage(self, tries: int = 6) -> None:
        """Calls in flight, then the database refuses for a while; sometimes a SIGTERM too.

        It waits (a little) for a quiet moment, when no window holds the calls back.
        """
        if self._deferred("outage", self.outage, tries):
            return
        rng = self.rng
        slow = self._slow_calls(rng.randint(2, 8), rng.uniform(0.2, 0.7))
        self.burst(rng.randint(2, 6))
        in_flight = self._arrived(slow)
        over_lease = rng.random() < 0.4
        seconds = (
            rng.uniform(LEASE_S + 0.5, LEASE_S + 3.0)
            if over_lease
            else rng.uniform(2 * POLL_S, LEASE_S - 0.5)
        )
        slot = self._stoppable() if rng.random() < 0.25 else None
        try:
            with self.db.refusing() as counts:
                if slot is not None:
                    self.daemons.stop(slot)
                time.sleep(seconds)
        except sa.exc.DBAPIError as exc:  # e.g. the server is restarting
            self.note(f"outage failed: {type(exc).__name__}: {exc}")
            return
        finally:
            slow.active = False
        faults = self.report.faults
        faults["db_outage"] += 1
        if over_lease:
            faults["db_outage_over_lease"] += 1
        if slot is not None:
            faults["stop_during_outage"] += 1
        self.report.extra["outage_ms"] += int(seconds * 1000)
        self.report.extra["outage_held_calls"] += slow.hits
        self.note(
            f"outage {seconds:.1f}s in_flight={in_flight} held={slow.hits} {counts} "
            f"stopped={slot.index if slot else None}"
        )

    # ---- lane race

    def lane_race(self, tries: int = 6) -> None:
        """T1 inserts A (lane L) and commits late; T2 inserts B (lane L) and commits first.

        B's call is held in the simulator when A commits, so a daemon that claims A then has
        two rows of L in flight: seen here in the table, and at the end in the simulator. A
        system that serialises the writers of a lane makes T2 wait for T1 instead (counted as
        ``lane_race_serialised``): T2 runs in its own thread, and T1 commits once B was sent
        or T2 has waited a second.
        """
        if self._deferred("lane race", self.lane_race, tries):
            return
        rng = self.rng
        lane = f"race-{rng.randrange(16**6):06x}"
        first, second = (self._lane_row(lane) for _ in range(2))
        hold = self.sim.inject(
            Fault(C.OK, keys=frozenset({second.key}), times=1, delay=rng.uniform(0.5, 0.8))
        )
        writer = threading.Thread(
            target=insert_logged, args=(self.db, second, self.note), daemon=True
        )
        serialised = self._commit_late(first, writer, hold)
        self._raced(first, second)
        arrived = hold.hits >= 1
        if arrived:
            self._watch_lane(lane)
        writer.join(timeout=130)
        for spec in (first, second):
            self.writer.register(spec)
        self.report.faults["lane_race"] += 1
        self.report.extra["lane_race_in_flight"] += int(arrived)
        self.report.extra["lane_race_serialised"] += int(serialised)
        raced = first.raced_with is not None
        self.note(f"lane race {lane}: B held={arrived} serialised={serialised} raced={raced}")

    def _commit_late(self, first: RowSpec, writer: threading.Thread, hold: Fault) -> bool:
        """T1 writes A, starts T2 (``writer``, B) and commits once B was sent or T2 has waited
        a second; True if T2 waited for T1 (the lane's writers serialised)."""
        try:
            with self.db.engine.connect() as t1:
                late = t1.begin()
                self.db.write(t1, first)
                writer.start()
                began = time.monotonic()
                wait_until(lambda: hold.hits >= 1 or time.monotonic() - began > 3.0, 4.0, 0.02)
                serialised = hold.hits == 0 and writer.is_alive()
                late.commit()
            first.visible_at = utcnow()
        except sa.exc.DBAPIError as exc:
            self.note(f"lane race: T1 failed ({type(exc).__name__}); inserting A again")
            serialised = False
            self.db.insert(first)
        return serialised

    def _raced(self, first: RowSpec, second: RowSpec) -> None:
        """Once A is visible: was B already claimed? Then the daemon took B on a snapshot
        without A, and B may run first even if its call reached the simulator after A's commit
        (seen under CPU starvation: claim, then the send 60 ms after A's commit returned)."""
        try:
            if self.db.claimed(second.key):
                first.raced_with = second.key
        except sa.exc.DBAPIError:
            pass  # unknown: the strict check stays

    def _lane_row(self, lane: str) -> RowSpec:
        return lane_row(self.rng, self.writer, lane)

    def _watch_lane(self, lane: str) -> None:
        """While B is held: never two rows of the lane in flight (in the table)."""
        end = time.monotonic() + 1.0
        while time.monotonic() < end:
            try:
                both = self.db.inflight_in_lane(lane)
            except sa.exc.DBAPIError:
                return
            if both > 1:
                self.found.append(
                    f"lane {lane}: {both} rows inflight at once (the earlier row committed "
                    "late, after the later one was claimed)"
                )
                return
            time.sleep(0.05)

    # ---- poison rows

    def poison(self) -> None:
        """Every kind of poison row the first time (each is worth a run), then one at random."""
        kinds = self.poison_todo or [self.rng.choice(poison_kinds(self.db.backend))]
        self.poison_todo = []
        for kind in kinds:
            self._poison(kind)

    def _poison(self, kind: str) -> None:
        spec = self.writer.spec(new_key(self.rng), TRANSFER, None, f"poison_{kind}", "sql")
        spec.park = "bad_row"
        if kind.startswith("bytes_"):
            spec.refused = self._insert_bytes(spec, kind.removeprefix("bytes_"))
        else:
            body = transfer_payload(self.rng)
            if kind == "surrogate":
                text = json.dumps({**body, "memo": "MEMO"}).replace("MEMO", "acme \\ud800")
            else:
                text = json.dumps({**body, "f" * LONG_NAME: 1})
            spec.payload = text
            self.db.insert(spec)
        self.doomed.add(spec.key)
        self.writer.register(spec)
        self.report.faults[spec.kind] += 1
        if spec.refused is not None:
            self.report.extra["poison_refused"] += 1
        self.note(f"poison {spec.kind} {spec.key!r} refused={spec.refused}")

    def _insert_bytes(self, spec: RowSpec, column: str) -> str | None:
        """SQLite: one column holds bytes that are not UTF-8, as TEXT or as a BLOB."""
        payload = json.dumps({**transfer_payload(self.rng), "memo": "cafe"})
        values: list[str | bytes] = [spec.key, spec.method, payload]
        if column == "key":
            values[0] = spec.key.encode()[:-1] + b"\xff"
        elif column == "method":
            values[1] = spec.method.encode().replace(b"Transfer", b"Tr\xe4nsfer")
        else:
            values[2] = payload.encode().replace(b"cafe", b"caf\xe9")  # Latin-1, as old clients
        as_text = self.rng.random() < 0.6
        spec.via, spec.kind = "raw", f"{spec.kind}_{'text' if as_text else 'blob'}"
        spec.key, spec.method, spec.payload = (text_key(v) for v in values)
        return self.db.insert_raw(spec, (values[0], values[1], values[2]), as_text)

    # ---- method edits

    def method_edit(self) -> None:
        """A row whose first sends time out; once sent, its method is changed by SQL."""
        first, second = self.rng.choice([(PLACE_ORDER, CANCEL_ORDER), (CANCEL_ORDER, PLACE_ORDER)])
        payload = {"account": f"trader-{self.rng.randrange(10)}"}  # parses as either request
        via = "api" if self.rng.random() < 0.5 else "sql"
        spec = self.writer.spec(new_key(self.rng), first, payload, "method_edit", via)
        self.doomed.add(spec.key)
        hold = ChaosFault(
            C.DEADLINE_EXCEEDED,
            "upstream timeout",
            keys=frozenset({spec.key}),
            methods=frozenset({first}),
        )
        self.sim.inject(hold)
        self.db.insert(spec)
        self.writer.register(spec)
        self.edits.append((spec, second, hold))
        self.report.faults["method_edit"] += 1
        self.later(self.rng.uniform(0.3, 1.5), f"edit {spec.index}", lambda: self._edit(spec))

    def _sent(self, key: str) -> bool:
        return any(s.key == key for s in self.sim.spans)

    def _edit(self, spec: RowSpec, force: bool = False) -> None:
        if spec.edited_to is not None:
            return
        if not self._sent(spec.key) and not force:
            self.later(0.3, f"edit {spec.index}", lambda: self._edit(spec))
            return
        second = next(m for s, m, _f in self.edits if s is spec)
        try:
            self.db.set_method(spec.key, second)
        except sa.exc.DBAPIError as exc:
            self.note(f"edit {spec.index} failed: {type(exc).__name__}")
            self.later(0.3, f"edit {spec.index}", lambda: self._edit(spec, force))
            return
        spec.edited_to, spec.edited_after_send = second, self._sent(spec.key)
        self.note(
            f"edited {spec.key} {spec.method} -> {second} after_send={spec.edited_after_send}"
        )

    def calm(self) -> None:
        """After the chaos: every edit done; a key reused at least once."""
        self.finish_edits()
        if not self.report.faults["key_reuse"]:
            wait_until(lambda: bool(self._committed_executed()), 10.0, interval=0.5)
            self.key_reuse(tries=1)

    def _committed_executed(self) -> list[str]:
        rows = self.db.try_rows() or {}
        executed = self.sim.executed_keys()
        return [k for k, r in rows.items() if r["state"] == "committed" and k in executed]

    def finish_edits(self) -> None:
        """Calm: edit what is still unedited (after its first send, if it comes in 5 s)."""
        for spec, _second, hold in self.edits:
            if spec.edited_to is None:
                wait_until(lambda s=spec: self._sent(s.key), 5.0)
                self._edit(spec, force=True)
            hold.active = False

    # ---- key reuse

    def key_reuse(self, tries: int = 5) -> None:
        """Retention purges finished rows; a new row takes a purged committed row's key.

        Without a committed row to reuse yet, it tries again a little later.
        """
        try:
            gone = self.db.purge_finished()
        except sa.exc.DBAPIError as exc:
            self.note(f"purge failed: {type(exc).__name__}")
            return
        for row in gone:
            self.purged.setdefault(str(row["idempotency_key"]), []).append(row)
        self.report.extra["purged"] += len(gone)
        done = {str(r["idempotency_key"]) for r in gone if r["state"] == "committed"}
        executed = self.sim.executed_keys()
        candidates = [
            s
            for s in self.writer.specs
            if s.key in done and s.key in executed and s.key not in self.reused
        ]
        if not candidates:
            self.note(f"key reuse: purged {len(gone)}, no committed row to reuse")
            if tries > 1:
                self.later(1.0, "key reuse", lambda: self.key_reuse(tries - 1))
            return
        original = self.rng.choice(candidates)
        self.reused.add(original.key)
        self.doomed.add(original.key)
        self._enqueue_must_refuse(original)
        payload = payload_for(self.rng, original.method)
        spec = self.writer.spec(original.key, original.method, payload, "key_reuse", "sql")
        spec.reused_from = original.index
        self.db.insert(spec)
        self.writer.register(spec)
        self.report.faults["key_reuse"] += 1
        self.note(f"key reuse of row {original.index} {original.key}: refused={spec.refused}")

    def _enqueue_must_refuse(self, original: RowSpec) -> None:
        payload = with_decimals(payload_for(self.rng, original.method))
        try:
            with self.db.engine.connect() as conn:
                tx = conn.begin()
                try:
                    outbox.enqueue(conn, original.method, payload, key=original.key)
                finally:
                    tx.rollback()  # never keep it: the plain-SQL reuse comes next
        except (outbox.OutboxError, sa.exc.DBAPIError) as exc:
            self.note(f"enqueue refused the purged key: {type(exc).__name__}")
            return
        self.found.append(
            f"key reuse: outbox.enqueue accepted the key {original.key} of row "
            f"{original.index}, committed and then purged by retention (it must raise)"
        )

    # ---- reloads and operator cancels

    def reload_in_flight(self, tries: int = 6) -> None:
        if self._deferred("reload in flight", self.reload_in_flight, tries):
            return
        slow = self._slow_calls(self.rng.randint(3, 8), self.rng.uniform(0.4, 0.8))
        self.burst(self.rng.randint(3, 6))
        in_flight = self._arrived(slow)
        sent = self.daemons.reload()
        self.report.faults["reload_in_flight"] += 1
        self.report.extra["reloads"] += sent
        self.note(f"reload with calls in flight={in_flight} held={slow.hits} daemons={sent}")

    def operator_cancel(self) -> None:
        """``outbox cancel`` (no ``--force``) of a pending row; refused if it may have run.

        Half the time a row already waiting (for a retry or its ``not_before``) is tried first;
        then, or if that is refused, a new row due in a few seconds.
        """
        rows = self.db.try_rows() or {}
        pending = [
            s
            for s in self.writer.specs
            if s.kind in ("plain", "not_before")
            and not s.cancelled
            and rows.get(s.key, {}).get("state") == "pending"
        ]
        if pending and self.rng.random() < 0.5 and self._cancel(self.rng.choice(pending)):
            return
        spec = self.writer.spec(
            new_key(self.rng), TRANSFER, transfer_payload(self.rng), "not_before", "api"
        )
        spec.not_before = utcnow() + timedelta(seconds=self.rng.uniform(3.0, 6.0))
        self.db.insert(spec)
        self.writer.register(spec)
        self._cancel(spec)

    def _cancel(self, spec: RowSpec) -> bool:
        try:
            self.db.store.cancel(spec.key, "torture@chaos", "torture: cancel", utcnow(), False)
        except OperatorActionError as exc:
            self.report.extra["cancel_refused"] += 1
            self.note(f"cancel {spec.key} refused: {exc}")
            return False
        except sa.exc.DBAPIError as exc:
            self.note(f"cancel {spec.key} failed: {type(exc).__name__}")
            return False
        spec.cancelled = True
        self.report.faults["operator_cancel"] += 1
        self.note(f"cancelled {spec.key}")
        return True
