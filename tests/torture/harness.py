"""The torture harness: one seeded run of writers, daemons, faults and crashes, then checks.

``run_torture(url, seed, duration_s)`` does, all at once, for ``duration_s`` seconds:

- a **writer** thread inserts rows of every kind, by plain SQL and by ``outbox.enqueue``:
  transfers and orders, lanes, ``not_before``, ``expires_at``, bad rows (unknown method,
  payload that does not parse, uppercase key), transfers over the simulator's limit, and
  *doomed* rows whose key a row-specific fault answers with a parking code;
- a **chaos** thread, from one ``random.Random(seed)``, injects every fault of the guide's
  table (executed-then-errored included), opens rollover, maintenance and wrong-key windows,
  SIGKILLs and restarts daemons, cuts the database connections (or locks the SQLite file),
  restarts the simulator mid-call and, when asked, the PostgreSQL server.

Then it calms everything, waits until the table converges and checks the promise (the
``Report`` lists every violation). Row-specific faults are kept ahead of the general ones by
construction: general faults (``ChaosFault``) never match a doomed key, so a doomed row gets
exactly its parking answer and never executes, and the set of parked rows is known exactly.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from random import Random
from typing import Any

import grpc
import sqlalchemy as sa
from google.protobuf import json_format

import outbox
from outbox.database import make_engine
from outbox.descriptors import Catalog, build_request
from outbox.errors import DuplicateKeyError
from outbox.simulator import PLACE_ORDER, TRANSFER, Fault, Simulator

API_KEY = "torture-secret-api-key-5d2e"
WRONG_KEY = "rotated-elsewhere-key-0000"
DEADLINE_S = 1.0  # [recrypt] deadline
LEASE_S = 2.0  # [worker] lease: the reaper resends a dead worker's rows after this
MAX_UNKNOWN = 50  # [retry] max_unknown_attempts: random unknowns never exhaust it
WRITES = frozenset({TRANSFER, PLACE_ORDER})
UNKNOWN_METHOD = "/recrypt.wallet.v1.Wallet/TeleportFunds"
FINAL = {"committed", "cancelled", "expired"}
C = grpc.StatusCode

#: Row-specific parking faults: (kind, code, message, the park_reason it must produce).
DOOMS: tuple[tuple[str, grpc.StatusCode, str, str], ...] = (
    ("precondition", C.FAILED_PRECONDITION, "compliance question pending", "precondition"),
    ("object_limit", C.RESOURCE_EXHAUSTED, "open order limit 100 reached", "object_limit"),
    ("not_found", C.NOT_FOUND, "method removed: use v2", "method_removed"),
    ("unimplemented", C.UNIMPLEMENTED, "not implemented for this account", "rejected"),
    ("invalid_argument", C.INVALID_ARGUMENT, "account closed", "rejected"),
    ("out_of_range", C.OUT_OF_RANGE, "amount out of range", "rejected"),
)
BAD_KINDS = ("bad_method", "bad_payload", "bad_key")

#: General faults: (kind, code, message, execute first). None as execute: chosen at random.
GENERAL: tuple[tuple[str, grpc.StatusCode, str, bool | None], ...] = (
    ("unavailable_vgw_db", C.UNAVAILABLE, "vgw-db: rollover in progress", False),
    ("executed_unavailable_vgw_db", C.UNAVAILABLE, "vgw-db: rollover in progress", True),
    ("deadline_vgw_db", C.DEADLINE_EXCEEDED, "vgw-db transaction timed out", False),
    ("executed_deadline_vgw_db", C.DEADLINE_EXCEEDED, "vgw-db transaction timed out", True),
    ("unavailable_transport", C.UNAVAILABLE, "connection reset by peer", None),
    ("deadline_transport", C.DEADLINE_EXCEEDED, "upstream timeout", None),
    ("unknown", C.UNKNOWN, "unexpected error", None),
    ("internal", C.INTERNAL, "internal error", None),
    ("aborted", C.ABORTED, "transaction aborted", None),
    ("cancelled", C.CANCELLED, "cancelled upstream", None),
    ("data_loss", C.DATA_LOSS, "data loss", None),
    ("rate_limited", C.RESOURCE_EXHAUSTED, "rate limit exceeded, slow down", False),
    (
        "permission_denied",
        C.PERMISSION_DENIED,
        "maintenance mode, see https://x.com/RecryptCS",
        False,
    ),
    ("unauthenticated", C.UNAUTHENTICATED, "Session key", False),
    ("client_deadline", C.OK, "", False),  # answered after the client's deadline: executed
)


# --------------------------------------------------------------------------- simulator parts


@dataclass(eq=False)
class ChaosFault(Fault):
    """A general fault: switchable (a window ends with ``active = False``), never on a doomed key.

    ``spared`` is the harness's live set of doomed keys, so a doomed row only ever gets its own
    parking answer (plus gate answers, which never execute).
    """

    spared: Collection[str] = field(default_factory=frozenset)
    active: bool = True

    def matches(self, path: str, key: str | None) -> bool:
        return self.active and key not in self.spared and super().matches(path, key)


class RestartableSimulator(Simulator):
    """The simulator, restartable on the same port with its ledger kept.

    Works around ``Simulator.stop`` setting ``_stopped`` for good: after a restart, ``delay``
    and ``hang`` faults would otherwise be no-ops (reported as a simulator bug).
    """

    def start(self, listen: str = "127.0.0.1:0", *, tls: tuple[bytes, bytes] | None = None) -> int:
        self._stopped.clear()
        return super().start(listen, tls=tls)


# --------------------------------------------------------------------------- rows


@dataclass
class RowSpec:
    """One row as the writer wrote it, and what the end state must be."""

    index: int
    key: str
    method: str
    payload: Any  # the stored value (a dict), or raw text that is not JSON
    kind: str
    via: str  # "sql" or "api"
    lane: str | None = None
    not_before: datetime | None = None
    expires_at: datetime | None = None
    park: str | None = None  # the park_reason the row must end with; None: it must commit


@dataclass
class Report:
    seed: int
    db: str
    rows: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    kills: int = 0
    restarts: int = 0
    conn_cuts: int = 0
    sim_restarts: int = 0
    pg_restarts: int = 0
    violations: list[str] = field(default_factory=list)
    duration: float = 0.0
    states: Counter[str] = field(default_factory=Counter)
    extra: Counter[str] = field(default_factory=Counter)

    def line(self) -> str:
        faults = ", ".join(f"{k}: {n}" for k, n in sorted(self.faults.items()))
        states = " ".join(f"{k}={n}" for k, n in sorted(self.states.items()))
        extra = " ".join(f"{k}={n}" for k, n in sorted(self.extra.items()))
        return (
            f"torture: seed={self.seed} db={self.db} rows={self.rows} faults={{{faults}}} "
            f"kills={self.kills} restarts={self.restarts} conn_cuts={self.conn_cuts} "
            f"sim_restarts={self.sim_restarts} pg_restarts={self.pg_restarts} "
            f"violations={len(self.violations)} duration={self.duration:.0f}s "
            f"[{states} {extra}]"
        )


def backend_of(url: str) -> str:
    name = sa.engine.make_url(url).get_backend_name()
    return "mariadb" if name in ("mysql", "mariadb") else name


def utcnow() -> datetime:
    return datetime.now(UTC)


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.1) -> bool:
    """Poll an observable state until it holds or ``timeout`` passes."""
    pause = threading.Event()
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        pause.wait(interval)
    return predicate()


# --------------------------------------------------------------------------- the database


def _with_decimals(payload: dict[str, Any]) -> dict[str, Any]:
    """What an application passes to ``enqueue``: amounts as ``Decimal`` (stored as strings)."""
    decimals = ("amount", "quantity", "limitPrice")
    return {k: Decimal(v) if k in decimals else v for k, v in payload.items()}


class Database:
    """The run's database: writes (plain SQL and the Python API), connection cuts, reads."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.backend = backend_of(url)
        self.engine = make_engine(url)

    def dispose(self) -> None:
        self.engine.dispose()

    def _stamp(self, at: datetime) -> str:
        """A timestamp as a plain-SQL writer spells it (README: zone on PostgreSQL only)."""
        text = at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
        return text + "+00" if self.backend == "postgresql" else text

    def insert(self, spec: RowSpec, timeout: float = 120.0) -> None:
        """Insert ``spec`` in its own transaction; a cut connection is retried (once in).

        A failure can hide a commit (the connection died after COMMIT reached the server), so
        after every failure the key is looked up before trying again.
        """
        end = time.monotonic() + timeout
        pause = threading.Event()
        while True:
            try:
                with self.engine.begin() as conn:
                    if spec.via == "api":
                        outbox.enqueue(
                            conn,
                            spec.method,
                            _with_decimals(spec.payload),
                            key=spec.key,
                            lane=spec.lane,
                            not_before=spec.not_before,
                            expires_at=spec.expires_at,
                            reference=f"torture-{spec.index}",
                        )
                    else:
                        self._insert_sql(conn, spec)
                return
            except (sa.exc.DBAPIError, DuplicateKeyError):
                if self.exists(spec.key, end):
                    return
                if time.monotonic() > end:
                    raise
                pause.wait(0.2)

    def _insert_sql(self, conn: sa.Connection, spec: RowSpec) -> None:
        payload = spec.payload if isinstance(spec.payload, str) else json.dumps(spec.payload)
        conn.execute(
            sa.text(
                "INSERT INTO outbox_messages (idempotency_key, method, payload, lane, "
                "not_before, expires_at, reference) "
                "VALUES (:key, :method, :payload, :lane, :not_before, :expires_at, :ref)"
            ),
            {
                "key": spec.key,
                "method": spec.method,
                "payload": payload,
                "lane": spec.lane,
                "not_before": self._stamp(spec.not_before) if spec.not_before else None,
                "expires_at": self._stamp(spec.expires_at) if spec.expires_at else None,
                "ref": f"torture-{spec.index}",
            },
        )

    def exists(self, key: str, until: float) -> bool:
        pause = threading.Event()
        while True:
            try:
                with self.engine.connect() as conn:
                    found = conn.execute(
                        sa.text("SELECT 1 FROM outbox_messages WHERE idempotency_key = :k"),
                        {"k": key},
                    ).first()
                return found is not None
            except sa.exc.DBAPIError:
                if time.monotonic() > until:
                    raise
                pause.wait(0.2)

    def rows(self) -> dict[str, dict[str, Any]]:
        """Every row by key, with what the checks read."""
        with self.engine.connect() as conn:
            result = conn.execute(
                sa.text(
                    "SELECT idempotency_key, state, park_reason, maybe_executed, attempts, "
                    "lane, last_code, last_message FROM outbox_messages ORDER BY id"
                )
            )
            return {row.idempotency_key: dict(row._mapping) for row in result}

    def unknown_attempts(self, key: str) -> int:
        """Attempts of the row whose outcome was unknown (not rollover retries), from history."""
        with self.engine.connect() as conn:
            found = conn.execute(
                sa.text(
                    "SELECT COUNT(*) FROM outbox_attempts a JOIN outbox_messages m "
                    "ON m.id = a.message_id WHERE m.idempotency_key = :k AND "
                    "(a.message LIKE 'outcome unknown%' OR a.code = 'LEASE_EXPIRED')"
                ),
                {"k": key},
            ).scalar_one()
        return int(found)

    def try_rows(self) -> dict[str, dict[str, Any]] | None:
        try:
            return self.rows()
        except sa.exc.DBAPIError:
            return None

    def cut(self, rng: Random, hold: Callable[[float], None]) -> str:
        """Cut the daemons' connections (SQLite: hold the write lock a moment)."""
        if self.backend == "postgresql":
            with self.engine.connect() as conn:
                done = conn.execute(
                    sa.text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                    )
                ).all()
                conn.commit()
            return f"terminated {len(done)}"
        if self.backend == "mariadb":
            with self.engine.connect() as conn:
                ids = conn.execute(
                    sa.text(
                        "SELECT id FROM information_schema.processlist "
                        "WHERE db = DATABASE() AND id <> CONNECTION_ID()"
                    )
                ).scalars()
                killed = 0
                for conn_id in list(ids):
                    with contextlib.suppress(sa.exc.DBAPIError):  # it may have left already
                        conn.exec_driver_sql(f"KILL {int(conn_id)}")
                        killed += 1
            return f"killed {killed}"
        path = sa.engine.make_url(self.url).database
        assert path
        locker = sqlite3.connect(path, timeout=30, isolation_level=None)
        try:
            locker.execute("BEGIN EXCLUSIVE")
            seconds = rng.uniform(0.3, 3.0)
            hold(seconds)
            locker.execute("ROLLBACK")
        finally:
            locker.close()
        return f"locked {seconds:.1f}s"


# --------------------------------------------------------------------------- daemons


@dataclass
class Slot:
    index: int
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None
    generation: int = 0
    started: bool = False  # "event=started" seen: signal handlers are installed
    start_failures: int = 0


class Daemons:
    """``outbox run`` processes, one log file per process."""

    def __init__(self, config: Path, workdir: Path, count: int, report: Report) -> None:
        self.config = config
        self.workdir = workdir
        self.slots = [Slot(i) for i in range(count)]
        self.report = report
        self.env = os.environ | {"RECRYPT_API_KEY": API_KEY}
        self.env.pop("OUTBOX_DATABASE_URL", None)
        self.lock = threading.Lock()

    def start(self, slot: Slot) -> None:
        slot.generation += 1
        slot.started = False
        slot.log = self.workdir / f"daemon{slot.index}-{slot.generation}.log"
        with slot.log.open("ab") as out:
            slot.proc = subprocess.Popen(
                [sys.executable, "-m", "outbox.cli", "--config", str(self.config), "run"],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env,
            )

    def is_started(self, slot: Slot) -> bool:
        if not slot.started and slot.log is not None and slot.proc is not None:
            slot.started = slot.proc.poll() is None and "event=started" in slot.log.read_text(
                errors="replace"
            )
        return slot.started

    def running(self) -> list[Slot]:
        return [s for s in self.slots if s.proc is not None and s.proc.poll() is None]

    def kill(self, slot: Slot) -> None:
        assert slot.proc is not None
        slot.proc.send_signal(signal.SIGKILL)
        slot.proc.wait(timeout=30)
        slot.proc = None
        self.report.kills += 1

    def reload(self) -> int:
        """SIGHUP every daemon whose handlers are installed (before that, SIGHUP kills)."""
        sent = 0
        for slot in self.running():
            if self.is_started(slot):
                assert slot.proc is not None
                slot.proc.send_signal(signal.SIGHUP)
                sent += 1
        return sent

    def check(self) -> None:
        """A daemon that exited by itself: a violation once started; else a start failure.

        Either way it is started again (as systemd would).
        """
        for slot in self.slots:
            proc = slot.proc
            if proc is None or proc.poll() is None:
                continue
            tail = _tail(slot.log)
            if slot.started:
                self.report.violations.append(
                    f"daemon {slot.index} (generation {slot.generation}) exited by itself "
                    f"with {proc.returncode}: {tail}"
                )
            else:
                slot.start_failures += 1
                self.report.extra["start_failures"] += 1
                if slot.start_failures > 20:
                    self.report.violations.append(
                        f"daemon {slot.index} crash-loops at start: {tail}"
                    )
                    slot.proc = None
                    continue
            self.start(slot)
            self.report.restarts += 1

    def stop_all(self) -> None:
        for slot in self.running():
            assert slot.proc is not None
            slot.proc.send_signal(signal.SIGTERM)
        for slot in self.slots:
            if slot.proc is None:
                continue
            try:
                code = slot.proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                slot.proc.kill()
                code = slot.proc.wait()
            if code != 0:
                self.report.violations.append(
                    f"daemon {slot.index} exited {code} on SIGTERM: {_tail(slot.log)}"
                )
            slot.proc = None

    def kill_all(self) -> None:
        for slot in self.slots:
            if slot.proc is not None and slot.proc.poll() is None:
                slot.proc.kill()
                slot.proc.wait()


def _tail(log: Path | None, lines: int = 8) -> str:
    if log is None or not log.exists():
        return "(no log)"
    return " | ".join(log.read_text(errors="replace").splitlines()[-lines:])


def write_config(workdir: Path, url: str, target: str) -> Path:
    path = workdir / "outbox.toml"
    path.write_text(
        f"""
[database]
url = "{url}"
[recrypt]
target = "{target}"
tls = false
deadline = {DEADLINE_S}
[worker]
batch_size = 20
max_in_flight = 20
poll_interval = 0.2
lease = {LEASE_S}
[retry]
initial_backoff = 0.1
max_backoff = 2.0
jitter = 0.3
max_unknown_attempts = {MAX_UNKNOWN}
[maintenance]
probe_interval = 1.0
unauthenticated_probe_interval = 1.0
rollover_window = ""
[metrics]
listen = ""
[retention]
days = 0
"""
    )
    return path


# --------------------------------------------------------------------------- the writer


class Writer:
    """Generates and inserts rows; every doomed key is spared by the general faults first."""

    def __init__(
        self,
        rng: Random,
        db: Database,
        sim: Simulator,
        doomed: set[str],
        report: Report,
        lanes: int,
    ) -> None:
        self.rng = rng
        self.db = db
        self.sim = sim
        self.doomed = doomed
        self.report = report
        self.specs: list[RowSpec] = []
        self.lanes = [f"lane-{rng.randrange(16**6):06x}-{i}" for i in range(lanes)]
        self.blocked_lane = self.lanes[0]  # gets a doomed row after a few rows
        self.lane_counts: Counter[str] = Counter()
        # Each kind of special row at least once, early, then at random.
        self.todo = [f"doom:{d[0]}" for d in DOOMS] + list(BAD_KINDS) + ["over_limit"]
        rng.shuffle(self.todo)
        self.error: str | None = None

    def key(self) -> str:
        return str(uuid.UUID(int=self.rng.getrandbits(128), version=4))

    def _transfer(self, account: str | None = None, amount: str | None = None) -> dict[str, Any]:
        rng = self.rng
        snake = rng.random() < 0.3
        body: dict[str, Any] = {
            "from_account" if snake else "fromAccount": account or f"acct-{rng.randrange(50)}",
            "to_account" if snake else "toAccount": f"supplier-{rng.randrange(50)}",
            "amount": amount or f"{rng.randrange(1, 9999)}.{rng.randrange(100):02d}",
            "currency": rng.choice(["AUD", "USD", "BTC"]),
        }
        if rng.random() < 0.2:
            body["memo"] = rng.choice(["Überweisung ✓", "invoice 17", "日本 transfer", ""])
        return body

    def _order(self) -> dict[str, Any]:
        rng = self.rng
        body: dict[str, Any] = {
            "account": f"trader-{rng.randrange(10)}",
            "market": rng.choice(["BTC-AUD", "ETH-AUD"]),
            "side": rng.choice(["SIDE_BUY", "SIDE_SELL"]),
            "quantity": f"0.{rng.randrange(1, 99):02d}",
        }
        if rng.random() < 0.5:
            body |= {"type": "ORDER_TYPE_LIMIT", "limitPrice": f"{rng.randrange(100, 99999)}.00"}
        else:
            body["type"] = "ORDER_TYPE_MARKET"
        return body

    def next_spec(self, now: datetime) -> RowSpec:  # noqa: PLR0912 (one branch per kind)
        rng = self.rng
        now = now.replace(microsecond=0)  # plain SQL writes whole seconds
        index = len(self.specs)
        via = "api" if rng.random() < 0.5 else "sql"
        if self.todo and rng.random() < 0.25:
            special = self.todo.pop()
        else:
            special = rng.choices(
                ["plain", "lane", "not_before", "expires", "doom", "bad", "over_limit"],
                [40, 30, 8, 6, 5, 3, 2],
            )[0]
            if special == "doom":
                special = f"doom:{rng.choice(DOOMS)[0]}"
            elif special == "bad":
                special = rng.choice(BAD_KINDS)
        method = TRANSFER if rng.random() < 0.7 else PLACE_ORDER
        payload = self._transfer() if method == TRANSFER else self._order()
        spec = RowSpec(index, self.key(), method, payload, "plain", via)
        if special == "lane":
            lane = rng.choice(self.lanes)
            self.lane_counts[lane] += 1
            spec.lane, spec.kind, spec.method = lane, "lane", TRANSFER
            spec.payload = self._transfer(account=lane)
            if lane == self.blocked_lane and self.lane_counts[lane] == 4:
                spec.kind = f"doom:{rng.choice(DOOMS)[0]}"
            elif rng.random() < 0.1:
                spec.not_before = now + timedelta(seconds=rng.randint(1, 4))
        elif special == "not_before":
            spec.kind, spec.not_before = "not_before", now + timedelta(seconds=rng.randint(1, 6))
        elif special == "expires":
            spec.kind, spec.expires_at = "expires", now + timedelta(seconds=rng.randint(1, 8))
        elif special.startswith("doom:"):
            spec.kind = special
        elif special in BAD_KINDS:
            spec.kind, spec.via, spec.park = special, "sql", "bad_row"
            if special == "bad_method":
                spec.method = UNKNOWN_METHOD
            elif special == "bad_key":
                spec.key = spec.key.upper()
            elif self.db.backend == "sqlite":
                spec.payload = '{"fromAccount": "acme", "amount": '  # not JSON at all
            else:  # JSON columns refuse non-JSON: JSON that does not parse into the request
                spec.payload = {"fromAccount": 5, "toAccount": "b", "amount": 12.5}
        elif special == "over_limit":
            spec.kind, spec.method, spec.park = "over_limit", TRANSFER, "precondition"
            spec.payload = self._transfer(amount=f"{rng.randrange(10001, 99999)}.00")
        if spec.kind.startswith("doom:"):
            name = spec.kind.removeprefix("doom:")
            _kind, code, message, reason = next(d for d in DOOMS if d[0] == name)
            spec.park = reason
            self.doomed.add(spec.key)  # before the fault and the row exist
            self.sim.inject(Fault(code, message, keys=frozenset({spec.key})))
        return spec

    def add(self, now: datetime) -> None:
        spec = self.next_spec(now)
        self.db.insert(spec)
        self.specs.append(spec)
        self.report.rows += 1
        if spec.kind.startswith("doom:"):
            self.report.faults[spec.kind.removeprefix("doom:")] += 1
        elif spec.kind in (*BAD_KINDS, "over_limit"):
            self.report.faults[spec.kind] += 1

    def run(self, stop: threading.Event, until: float, rate: float) -> None:
        try:
            while not stop.is_set() and time.monotonic() < until:
                burst = self.rng.randint(1, 8)
                for _ in range(burst):
                    self.add(utcnow())
                stop.wait(self.rng.expovariate(rate / burst))
            while self.todo and not stop.is_set():  # every special kind at least once
                self.add(utcnow())
        except Exception:
            self.error = traceback.format_exc()


# --------------------------------------------------------------------------- chaos


class Chaos:
    """The chaos thread's actions; windows and restarts end by scheduled undo actions."""

    def __init__(
        self,
        rng: Random,
        sim: RestartableSimulator,
        port: int,
        db: Database,
        daemons: Daemons,
        doomed: set[str],
        report: Report,
        pg_restart: list[str] | None,
    ) -> None:
        self.rng = rng
        self.sim = sim
        self.port = port
        self.db = db
        self.daemons = daemons
        self.doomed = doomed
        self.report = report
        self.pg_restart = pg_restart
        self.general: list[ChaosFault] = []
        self.undo: list[tuple[float, str, Callable[[], None]]] = []
        self.sim_down = False
        self.windows: Counter[str] = Counter()  # open windows per kind
        self.pause = threading.Event()
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
        self.sim.set_api_keys([WRONG_KEY])
        self.report.faults["wrong_key_window"] += 1
        self.note("wrong-key window opens")

        def end() -> None:
            self.windows["wrong_key"] -= 1
            if not self.windows["wrong_key"]:
                self.sim.set_api_keys([API_KEY])
                self.report.extra["reloads"] += self.daemons.reload()

        self.later(self.rng.uniform(0.5, 3.0), "wrong_key_window", end)

    def kill(self) -> None:
        running = self.daemons.running()
        if not running:
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
        self.sim.wait_for(lambda _s: hold.hits >= 1, timeout=3.0)
        hold.active = False
        self.sim.stop(grace=0)
        self.sim_down = True
        self.report.sim_restarts += 1
        self.note(f"simulator stopped with {hold.hits} held calls")

        self.later(self.rng.uniform(0.2, 2.0), "simulator start", self.start_sim)

    def start_sim(self) -> None:
        """The simulator again on its port (retried: the port may linger a moment)."""
        listen = f"127.0.0.1:{self.port}"
        if not wait_until(lambda: _try_start(self.sim, listen), timeout=15, interval=0.2):
            self.report.violations.append(f"harness: the simulator cannot listen on {listen}")
        self.sim_down = False

    def reload(self) -> None:
        self.report.extra["reloads"] += self.daemons.reload()

    def restart_postgres(self) -> None:
        assert self.pg_restart is not None
        self.note("postgres restart")
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
        self.run_due(everything=True)
        for fault in self.general:
            if fault.times is None:
                fault.active = False
        self.sim.set_maintenance(False)
        self.sim.set_api_keys([API_KEY])
        if self.sim_down:
            self.start_sim()

    def run(self, stop: threading.Event, until: float) -> None:
        rng = self.rng
        start = time.monotonic()
        span = max(until - start, 1.0)
        actions: dict[str, tuple[Callable[[], None], int]] = {
            "fault": (self.fault, 40),
            "kill": (self.kill, 10),
            "cut": (self.cut, 7),
            "sim_restart": (self.restart_sim, 3),
            "rollover": (self.rollover_window, 3),
            "maintenance": (self.maintenance_window, 3),
            "wrong_key": (self.wrong_key_window, 2),
            "reload": (self.reload, 3),
        }
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


def _try_start(sim: Simulator, listen: str) -> bool:
    try:
        sim.start(listen=listen)
    except OSError:
        return False
    return True


# --------------------------------------------------------------------------- the run


def expected_request(spec: RowSpec, catalog: Catalog) -> dict[str, Any]:
    method = catalog.submittable(spec.method)
    request = build_request(method, spec.payload, spec.key)
    result: dict[str, Any] = json_format.MessageToDict(request, preserving_proto_field_name=True)
    return result


def settled(specs: list[RowSpec], rows: dict[str, dict[str, Any]]) -> list[str]:
    """Keys not yet where they can stay: not final, parked, nor pending behind a parked row."""
    parked_lanes: set[str] = set()
    waiting = []
    for spec in specs:
        row = rows.get(spec.key)
        if row is None:
            waiting.append(spec.key)
            continue
        state = row["state"]
        if state == "parked" and spec.lane:
            parked_lanes.add(spec.lane)
        if state in FINAL or state == "parked":
            continue
        if state == "pending" and spec.lane in parked_lanes:
            continue
        waiting.append(spec.key)
    return waiting


def check(  # noqa: PLR0912 (one branch per promise)
    specs: list[RowSpec],
    rows: dict[str, dict[str, Any]],
    sim: Simulator,
    catalog: Catalog,
) -> list[str]:
    """The five promises; returns one line per violation."""
    bad: list[str] = []
    ledger = {entry.key: entry for entry in sim.ledger}
    order = [entry.key for entry in sim.ledger]
    executed = sim.executed_keys()
    ours = {s.key for s in specs}
    blocked: set[str] = set()  # lanes with an (expected) parked row
    behind: Counter[str] = Counter()  # lane rows held behind an unexpectedly parked row
    stuck: set[str] = set()  # lanes with an unexpectedly parked row

    for spec in specs:
        row = rows.get(spec.key)
        runs = sim.executions(spec.key)
        label = f"row {spec.index} {spec.key} ({spec.kind}, {spec.via}, lane={spec.lane})"
        if row is None:
            bad.append(f"{label}: lost (not in the table)")
            continue
        state, reason, maybe = row["state"], row["park_reason"], bool(row["maybe_executed"])
        seen = f"{state}/{reason} maybe_executed={maybe} executions={runs} last={row['last_code']}"
        if runs > 1:
            bad.append(f"{label}: executed {runs} times")
        if spec.lane in stuck and state == "pending" and not runs:
            behind[spec.lane] += 1  # a consequence, reported once per lane below
            continue
        if spec.lane and spec.lane in blocked:
            if state != "pending" or runs:
                bad.append(f"{label}: behind a parked row, must stay pending unexecuted: {seen}")
            continue
        if spec.park is not None:
            if spec.lane:
                blocked.add(spec.lane)
            if state != "parked" or reason != spec.park or runs:
                bad.append(f"{label}: must be parked {spec.park} unexecuted, is {seen}")
            continue
        if spec.kind == "expires":
            fine = (
                (state == "committed" and runs == 1)
                or (state == "expired" and runs == 0)
                or (state == "parked" and reason == "expired_unknown" and maybe)
            )
            if not fine:
                bad.append(f"{label}: expiring row ended {seen}")
        elif state == "parked" and reason == "unknown_outcome":
            unknown = row.get("unknown_attempts", row["attempts"])
            if spec.lane:
                stuck.add(spec.lane)
            bad.append(
                f"{label}: parked unknown_outcome after {row['attempts']} attempts of which only "
                f"{unknown} had an unknown outcome (limit {MAX_UNKNOWN}): rollover (vgw-db) "
                f"retries count toward max_unknown_attempts; {seen}"
            )
        elif state != "committed" or runs != 1:
            if state == "parked" and spec.lane:
                stuck.add(spec.lane)
            bad.append(f"{label}: must be committed once, is {seen}: {row['last_message']}")
        if runs and spec.key in ledger:
            entry = ledger[spec.key]
            if entry.method != spec.method:
                bad.append(f"{label}: executed as {entry.method}")
            if entry.request != expected_request(spec, catalog):
                bad.append(f"{label}: executed with another payload: {entry.request}")
            if spec.not_before and entry.at < spec.not_before:
                bad.append(f"{label}: executed at {entry.at} before not_before {spec.not_before}")

    bad += [
        f"lane {lane}: {n} rows held pending behind its unexpectedly parked row"
        for lane, n in sorted(behind.items())
    ]
    strangers = executed - ours
    if strangers:
        bad.append(f"keys executed that no row has: {sorted(strangers)[:5]}")
    sent = {c.key for c in sim.calls if c.key is not None}
    for spec in specs:
        if spec.kind in BAD_KINDS and ({spec.key, spec.key.lower()} & sent):
            bad.append(f"bad row {spec.index} {spec.key} ({spec.kind}) was sent")
    for lane in {s.lane for s in specs if s.lane}:
        keys = [s.key for s in specs if s.lane == lane]
        want = [k for k in keys if k in executed]
        got = [k for k in order if k in set(keys)]
        if got != want:
            bad.append(f"lane {lane} executed out of order: {got} != {want}")
    return bad


def postgres_restart_command() -> list[str]:
    versions = sorted(os.listdir("/etc/postgresql"), key=lambda v: int(v) if v.isdigit() else 0)
    return ["pg_ctlcluster", "--skip-systemctl-redirect", versions[-1], "main", "restart"]


def run_torture(
    url: str,
    seed: int,
    duration_s: float,
    *,
    workdir: Path,
    daemons: int | None = None,
    restart_postgres: bool = False,
    settle_s: float = 120.0,
    rate: float = 8.0,
    initial_rows: int = 30,
    lanes: int = 4,
) -> Report:
    """One torture run against the migrated, empty database at ``url``; see the module doc."""
    began = time.monotonic()
    backend = backend_of(url)
    report = Report(seed=seed, db=backend)
    print(f"torture: seed={seed} db={backend} duration={duration_s:g}s workdir={workdir}")
    root = Random(seed)
    writer_rng, chaos_rng = Random(root.getrandbits(64)), Random(root.getrandbits(64))
    count = daemons if daemons is not None else (1 if backend == "sqlite" else 2)
    catalog = Catalog.load()
    doomed: set[str] = set()
    sim = RestartableSimulator(api_keys=[API_KEY])
    port = sim.start()
    db = Database(url)
    pool = Daemons(write_config(workdir, url, sim.target), workdir, count, report)
    writer = Writer(writer_rng, db, sim, doomed, report, lanes)
    chaos = Chaos(
        chaos_rng,
        sim,
        port,
        db,
        pool,
        doomed,
        report,
        postgres_restart_command() if restart_postgres and backend == "postgresql" else None,
    )
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

        removed = [0]

        def converged() -> bool:
            pool.check()
            rows = db.try_rows()
            if rows is None:
                return False
            # NOT_FOUND stops a method until a reload: the operator reloads after each one.
            now_removed = sum(1 for r in rows.values() if r["park_reason"] == "method_removed")
            if now_removed > removed[0]:
                removed[0] = now_removed
                report.extra["reloads"] += pool.reload()
            return not settled(writer.specs, rows)

        if not wait_until(converged, settle_s, interval=0.25):
            rows = db.try_rows() or {}
            stuck = settled(writer.specs, rows)
            report.violations.append(
                f"did not converge in {settle_s:g}s: {len(stuck)} rows open, e.g. "
                + "; ".join(f"{k}: {rows.get(k)}" for k in stuck[:5])
            )
        pool.stop_all()
        sim.stop(grace=1.0)
        rows = db.rows()
        for row in rows.values():
            if row["park_reason"] == "unknown_outcome":
                row["unknown_attempts"] = db.unknown_attempts(row["idempotency_key"])
        report.states = Counter(r["state"] for r in rows.values())
        report.extra["maybe_executed"] = sum(1 for r in rows.values() if r["maybe_executed"])
        report.extra["blocked"] = sum(
            1 for r in rows.values() if r["state"] == "pending" and r["lane"]
        )
        report.extra["calls"] = len(sim.calls)
        report.extra["fault_hits"] = sum(f.hits for f in chaos.general)
        report.extra["executed_errored"] = sum(
            1 for c in sim.calls if c.executed and c.code != "OK"
        )
        report.violations += check(writer.specs, rows, sim, catalog)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
        pool.kill_all()
        sim.stop()
        db.dispose()
        (workdir / "chaos.log").write_text("\n".join(chaos.log) + "\n")
    report.duration = time.monotonic() - began
    return report
