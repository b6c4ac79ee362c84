"""The writers: rows of every kind, by plain SQL and by ``outbox.enqueue``, at a steady rate.

Rows the chaos thread writes (lane races, poison, method edits, key reuse) are registered
here too (``register``), so ``specs`` is every row the run wrote or tried to write.
Must not import the chaos nor the checks.
"""

from __future__ import annotations

import itertools
import threading
import time
import traceback
import uuid
from collections import Counter
from datetime import datetime, timedelta
from random import Random
from typing import Any

from outbox.clock import utcnow
from outbox.simulator import PLACE_ORDER, TRANSFER, Fault, Simulator
from tests.torture.database import Database
from tests.torture.faults import DOOMS
from tests.torture.vocabulary import BAD_KINDS, UNKNOWN_METHOD, Report, RowSpec


def new_key(rng: Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def transfer_payload(
    rng: Random, account: str | None = None, amount: str | None = None
) -> dict[str, Any]:
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


def order_payload(rng: Random) -> dict[str, Any]:
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


def payload_for(rng: Random, method: str) -> dict[str, Any]:
    return transfer_payload(rng) if method == TRANSFER else order_payload(rng)


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
        self.indexes = itertools.count()
        self.lock = threading.Lock()
        self.lanes = [f"lane-{rng.randrange(16**6):06x}-{i}" for i in range(lanes)]
        self.blocked_lane = self.lanes[0]  # gets a doomed row after a few rows
        self.lane_counts: Counter[str] = Counter()
        # Each kind of special row at least once, early, then at random.
        self.todo = [f"doom:{d[0]}" for d in DOOMS] + list(BAD_KINDS) + ["over_limit"]
        rng.shuffle(self.todo)
        self.error: str | None = None

    def spec(self, key: str, method: str, payload: Any, kind: str, via: str) -> RowSpec:
        """A new row spec with the next index (any thread)."""
        return RowSpec(next(self.indexes), key, method, payload, kind, via)

    def register(self, spec: RowSpec) -> None:
        """Record a row written (or refused) by any thread."""
        with self.lock:
            self.specs.append(spec)
            self.report.rows += 1

    def next_spec(self, now: datetime) -> RowSpec:
        """The next row: its kind (each special kind at least once, early), method, key and
        payload, then what its kind changes; a doomed row's fault is injected before it exists."""
        rng = self.rng
        now = now.replace(microsecond=0)  # plain SQL writes whole seconds
        via = "api" if rng.random() < 0.5 else "sql"
        special = self._kind()
        method = TRANSFER if rng.random() < 0.7 else PLACE_ORDER
        spec = self.spec(new_key(rng), method, payload_for(rng, method), "plain", via)
        self._shape(spec, special, now)
        if spec.kind.startswith("doom:"):
            self._doom(spec)
        return spec

    def _kind(self) -> str:
        rng = self.rng
        if self.todo and rng.random() < 0.25:
            return self.todo.pop()
        special = rng.choices(
            ["plain", "lane", "not_before", "expires", "doom", "bad", "over_limit"],
            [40, 30, 8, 6, 5, 3, 2],
        )[0]
        if special == "doom":
            return f"doom:{rng.choice(DOOMS)[0]}"
        if special == "bad":
            return rng.choice(BAD_KINDS)
        return special

    def _shape(self, spec: RowSpec, special: str, now: datetime) -> None:
        """What a kind changes in a plain row."""
        rng = self.rng
        if special == "lane":
            self._lane(spec, now)
        elif special == "not_before":
            spec.kind, spec.not_before = "not_before", now + timedelta(seconds=rng.randint(1, 6))
        elif special == "expires":
            spec.kind, spec.expires_at = "expires", now + timedelta(seconds=rng.randint(1, 8))
        elif special.startswith("doom:"):
            spec.kind = special
        elif special in BAD_KINDS:
            self._bad(spec, special)
        elif special == "over_limit":
            spec.kind, spec.method, spec.park = "over_limit", TRANSFER, "precondition"
            spec.payload = transfer_payload(rng, amount=f"{rng.randrange(10001, 99999)}.00")

    def _lane(self, spec: RowSpec, now: datetime) -> None:
        """A transfer of a lane; the blocked lane's fourth row is doomed."""
        rng = self.rng
        lane = rng.choice(self.lanes)
        self.lane_counts[lane] += 1
        spec.lane, spec.kind, spec.method = lane, "lane", TRANSFER
        spec.payload = transfer_payload(rng, account=lane)
        if lane == self.blocked_lane and self.lane_counts[lane] == 4:
            spec.kind = f"doom:{rng.choice(DOOMS)[0]}"
        elif rng.random() < 0.1:
            spec.not_before = now + timedelta(seconds=rng.randint(1, 4))

    def _bad(self, spec: RowSpec, kind: str) -> None:
        """A bad row, by plain SQL: it must park ``bad_row``."""
        spec.kind, spec.via, spec.park = kind, "sql", "bad_row"
        if kind == "bad_method":
            spec.method = UNKNOWN_METHOD
        elif kind == "bad_key":
            spec.key = spec.key.upper()
        elif self.db.backend == "sqlite":
            spec.payload = '{"fromAccount": "acme", "amount": '  # not JSON at all
        else:  # JSON columns refuse non-JSON: JSON that does not parse into the request
            spec.payload = {"fromAccount": 5, "toAccount": "b", "amount": 12.5}

    def _doom(self, spec: RowSpec) -> None:
        """The row's parking fault, its key spared by the general faults first."""
        name = spec.kind.removeprefix("doom:")
        _kind, code, message, reason = next(d for d in DOOMS if d[0] == name)
        spec.park = reason
        self.doomed.add(spec.key)  # before the fault and the row exist
        self.sim.inject(Fault(code, message, keys=frozenset({spec.key})))

    def add(self, now: datetime) -> None:
        spec = self.next_spec(now)
        self.db.insert(spec)
        self.register(spec)
        if spec.kind.startswith("doom:"):
            self.report.faults[spec.kind.removeprefix("doom:")] += 1
        elif spec.kind in (*BAD_KINDS, "over_limit"):
            self.report.faults[spec.kind] += 1
        if spec.refused is not None:
            self.report.extra["refused_at_insert"] += 1

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
