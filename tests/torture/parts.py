"""The torture run's vocabulary: settings, faults, row specs, the report and the simulator.

Everything here is shared by the harness (``harness``), the seams it injects (``seams``), the
database it drives (``database``) and the checks it runs at the end (``checks``).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import grpc
import sqlalchemy as sa
from google.protobuf import json_format

from outbox.schema import OPEN_STATES
from outbox.simulator import MAINTENANCE_CHECK, PLACE_ORDER, TRANSFER, Fault, Simulator

API_KEY = "torture-secret-api-key-5d2e"
WRONG_KEY = "rotated-elsewhere-key-0000"
DEADLINE_S = 1.0  # [recrypt] deadline
LEASE_S = 2.0  # [worker] lease: the reaper resends a dead worker's rows after this
POLL_S = 0.2  # [worker] poll_interval
MAX_UNKNOWN = 50  # [retry] max_unknown_attempts: random unknowns never exhaust it
MAX_BACKOFF_S = 2.0  # [retry] max_backoff
#: [maintenance] unauthenticated_probe_interval: how long a method refused outside maintenance
#: is held. Longer than the maintenance probe's first wait (1 s), so a daemon that resends a
#: refused method at every probe (looping) is told apart from one that holds it.
HOLD_S = 2.0
WRITES = frozenset({TRANSFER, PLACE_ORDER})
UNKNOWN_METHOD = "/recrypt.wallet.v1.Wallet/TeleportFunds"
FINAL = {"committed", "cancelled", "expired"}
OPEN = frozenset(state.value for state in OPEN_STATES)  # pending, inflight, parked
C = grpc.StatusCode

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

#: Park reasons a row whose method was edited after its first send may end with.
EDITED_PARK_REASONS = frozenset({"payload_changed", "method_changed", "bad_row"})
#: The park reason of a row that reuses the key of a purged row (if the INSERT is accepted).
KEY_REUSED = "key_reused"


# --------------------------------------------------------------------------- simulator parts


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


@dataclass(frozen=True)
class Span:
    """One call with a key as the simulator saw it: arrival, answer, and who sent it.

    ``answered`` is False when the caller had stopped waiting (its deadline passed, it went
    away, or the server stopped): such an answer never reached the daemon. ``caller`` is the
    API key the call carried; each daemon process gets its own (``Daemons.start``).
    """

    key: str
    method: str
    start: datetime
    end: datetime
    code: str
    executed: bool
    answered: bool
    caller: str | None
    request: dict[str, Any]
    message: str = ""  # the status message answered (empty for OK)

    @property
    def until(self) -> datetime:
        """When the caller stopped waiting at the latest: the answer, or its deadline."""
        return min(self.end, self.start + timedelta(seconds=DEADLINE_S))


@dataclass(frozen=True)
class Probe:
    """One ``Core.MaintenanceCheck`` as the simulator answered it, and who asked.

    ``maintenance``: the answer said maintenance mode (or refused the check for it).
    """

    caller: str | None
    at: datetime
    code: str
    maintenance: bool
    answered: bool = True  # False: the caller had stopped waiting

    @property
    def clear(self) -> bool:
        """OK and no maintenance, heard: a daemon told this holds the methods it saw refused."""
        return self.code == "OK" and not self.maintenance and self.answered


class TortureSimulator(Simulator):
    """The simulator, restartable on the same port with its ledger kept, recording spans.

    - ``start`` clears ``_stopped`` (older simulators set it for good on ``stop``, so ``delay``
      and ``hang`` faults became no-ops after a restart).
    - Every unary call with a key leaves a ``Span`` (``spans``): ``CallRecord`` has only the
      answer's time, not the arrival, nor whether the caller still waited, nor who called.
    - API keys: one per daemon process (``allow_key``), all refused during a wrong-key window
      (``refuse_keys``).
    - Every ``Core.MaintenanceCheck`` leaves a ``Probe`` (``probes``), with who asked.
    """

    def __init__(self) -> None:
        super().__init__(api_keys=[API_KEY])
        self._local = threading.local()
        self._spans: list[Span] = []
        self._probes: list[Probe] = []
        self._daemon_keys = {API_KEY}
        self._refusing = False

    def start(self, listen: str = "127.0.0.1:0", *, tls: tuple[bytes, bytes] | None = None) -> int:
        self._stopped.clear()
        return super().start(listen, tls=tls)

    @property
    def spans(self) -> list[Span]:
        with self._cond:
            return list(self._spans)

    @property
    def probes(self) -> list[Probe]:
        with self._cond:
            return list(self._probes)

    def allow_key(self, key: str) -> None:
        with self._cond:
            self._daemon_keys.add(key)
        self._apply_keys()

    def refuse_keys(self, refusing: bool) -> None:
        with self._cond:
            self._refusing = refusing
        self._apply_keys()

    def _apply_keys(self) -> None:
        with self._cond:
            self.set_api_keys([WRONG_KEY] if self._refusing else sorted(self._daemon_keys))

    def _serve_unary(self, method: Any, request: Any, context: grpc.ServicerContext) -> Any:
        self._local.start = self._clock()
        self._local.request = request
        return super()._serve_unary(method, request, context)

    def _record_call(
        self, path: str, key: str | None, outcome: Any, context: grpc.ServicerContext
    ) -> None:
        super()._record_call(path, key, outcome, context)
        start, self._local.start = getattr(self._local, "start", None), None
        caller = next(
            (str(v) for k, v in context.invocation_metadata() or () if k == "apikey"), None
        )
        if path == MAINTENANCE_CHECK:
            said = bool(getattr(outcome.response, "maintenance_mode", False))
            refused = outcome.code == C.PERMISSION_DENIED
            heard = context.is_active() and not self._stopped.is_set()
            probe = Probe(caller, self._clock(), outcome.code.name, said or refused, heard)
            with self._cond:
                self._probes.append(probe)
        if key is None or start is None:
            return
        request = json_format.MessageToDict(self._local.request, preserving_proto_field_name=True)
        span = Span(
            key,
            path,
            start,
            self._clock(),
            outcome.code.name,
            bool(outcome.executed),
            context.is_active() and not self._stopped.is_set(),  # a stop drops the answer
            caller,
            request,
            outcome.message if outcome.code != C.OK else "",
        )
        with self._cond:
            self._spans.append(span)


@dataclass
class RefusalWindow:
    """A method refused (PERMISSION_DENIED with ``message``) while maintenance is off."""

    method: str
    message: str
    start: datetime
    end: datetime | None = None


@dataclass(frozen=True)
class Reload:
    """A SIGHUP the harness sent, and to which daemons (their API keys)."""

    at: datetime
    callers: frozenset[str]


# --------------------------------------------------------------------------- rows and report


@dataclass
class RowSpec:
    """One row as the harness wrote it (or tried to), and what the end state must be.

    ``visible_at``: when its INSERT's commit had returned (an upper bound of when a daemon could
    first see it). ``refused``: the database refused the INSERT (allowed for poison rows and key
    reuse), with why. ``cancelled``: an operator cancel (without ``--force``) succeeded.
    """

    index: int
    key: str
    method: str
    payload: Any  # the stored value (a dict), or raw text that is not JSON
    kind: str
    via: str  # "sql", "api" or "raw" (the sqlite3 module)
    lane: str | None = None
    not_before: datetime | None = None
    expires_at: datetime | None = None
    park: str | None = None  # the park_reason the row must end with; None: it must commit
    visible_at: datetime | None = None
    refused: str | None = None
    cancelled: bool = False
    edited_to: str | None = None  # method edits: the method the row was changed to
    edited_after_send: bool = False
    reused_from: int | None = None  # key reuse: the index of the purged row whose key this is
    #: A parked lane head finished by an operator (``lanes``): "cancel" or "requeue" (through
    #: the store) or "sql" (an UPDATE by hand). Its lane must then move on.
    unblocked: str | None = None


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


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.1) -> bool:
    """Poll an observable state until it holds or ``timeout`` passes."""
    pause = threading.Event()
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        pause.wait(interval)
    return predicate()
