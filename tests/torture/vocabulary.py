"""The torture run's words: its settings, the kinds of rows, the row spec and the report.

Pure: every other module of the run imports it; it imports none of them (nor the simulator).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import grpc
import sqlalchemy as sa

from outbox.schema import OPEN_STATES
from outbox.simulator import PLACE_ORDER, TRANSFER

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
BAD_KINDS = ("bad_method", "bad_payload", "bad_key")
#: Park reasons a row whose method was edited after its first send may end with.
EDITED_PARK_REASONS = frozenset({"payload_changed", "method_changed", "bad_row"})
#: The park reason of a row that reuses the key of a purged row (if the INSERT is accepted).
KEY_REUSED = "key_reused"


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
    #: The lane race (``seams``): the key of the later row of its lane that a daemon had
    #: already claimed when this row's late commit had returned. The daemon decided on a
    #: snapshot this harness cannot see, so either may run first; that call's arrival at the
    #: simulator is no bound, as a starved daemon may send long after its claim.
    raced_with: str | None = None


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
    promises: list[str] = field(default_factory=list)  # the promises checked, in order

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

    def promises_line(self) -> str:
        """Which promises the run checked (``promises.PROMISES``)."""
        return f"promises checked ({len(self.promises)}): {', '.join(self.promises)}"


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
