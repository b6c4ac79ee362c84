"""What the checks read: what happened at Recrypt and in the table at the end of a run.

- ``Span``, ``Probe``: one call with a key, one ``MaintenanceCheck``, as the simulator saw them.
- ``RefusalWindow``, ``Reload``: a method the harness had Recrypt refuse, a SIGHUP it sent.
- ``Observed``: all of that, plus when the harness SIGKILLed each daemon.
- ``Table``: the rows at the end, those retention purged, and the attempt history.

Must not import the world (simulator, database, daemons) nor the chaos: it is data.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import cached_property
from typing import Any, Protocol

from outbox.descriptors import Catalog
from outbox.simulator import LedgerEntry
from tests.torture.vocabulary import DEADLINE_S, FINAL, RowSpec


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


class Simulated(Protocol):
    """What ``Observed.of`` reads from the simulator."""

    @property
    def ledger(self) -> list[LedgerEntry]: ...

    @property
    def spans(self) -> list[Span]: ...

    @property
    def probes(self) -> list[Probe]: ...


@dataclass
class Observed:
    """What happened at Recrypt, and what the harness did to it and to the daemons.

    ``killed_at``: when the harness SIGKILLed which daemon (by API key); ``reloads``: the
    SIGHUPs it sent; ``sim_stops``: when the simulator was down; ``windows``: the methods it
    had Recrypt refuse (PERMISSION_DENIED outside maintenance), and when.
    """

    ledger: list[LedgerEntry]
    spans: list[Span] = field(default_factory=list)
    killed_at: dict[str, datetime] = field(default_factory=dict)
    probes: list[Probe] = field(default_factory=list)
    reloads: list[Reload] = field(default_factory=list)
    sim_stops: list[tuple[datetime, datetime]] = field(default_factory=list)
    windows: list[RefusalWindow] = field(default_factory=list)

    @classmethod
    def of(cls, sim: Simulated, killed_at: dict[str, datetime]) -> Observed:
        return cls(sim.ledger, sim.spans, dict(killed_at), sim.probes)

    @cached_property
    def counts(self) -> Counter[str]:
        return Counter(entry.key for entry in self.ledger)

    @cached_property
    def entries(self) -> dict[str, LedgerEntry]:
        """The first effect of each key."""
        first: dict[str, LedgerEntry] = {}
        for entry in self.ledger:
            first.setdefault(entry.key, entry)
        return first

    @cached_property
    def position(self) -> dict[str, int]:
        """Each executed key's place in the order of effects."""
        return {key: i for i, key in enumerate(self.entries)}

    @cached_property
    def first_call(self) -> dict[str, datetime]:
        first: dict[str, datetime] = {}
        for span in self.spans:
            if span.key not in first or span.start < first[span.key]:
                first[span.key] = span.start
        return first

    @cached_property
    def by_key(self) -> dict[str, list[Span]]:
        found: dict[str, list[Span]] = defaultdict(list)
        for span in self.spans:
            found[span.key].append(span)
        return found

    def executions(self, key: str) -> int:
        return self.counts[key]


@dataclass
class Table:
    """The rows at the end, by key, the rows retention purged (by key, oldest first), and the
    attempt history of the rows still there: each answer recorded, each lease expiry (by key,
    in order; ``code``, ``decision``, ``message``)."""

    rows: dict[str, dict[str, Any]]
    purged: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    history: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    #: rows ``outbox show`` could not read (``Store.get``/``history`` raised): key -> error
    unshowable: dict[str, str] = field(default_factory=dict)

    def row(self, spec: RowSpec) -> dict[str, Any] | None:
        gone = self.purged.get(spec.key, [])
        if spec.reused_from is None:
            return gone[0] if gone else self.rows.get(spec.key)
        live = self.rows.get(spec.key)
        if live is not None:
            return live
        return gone[1] if len(gone) > 1 else None


def in_id_order(specs: Iterable[RowSpec], table: Table) -> list[RowSpec]:
    """Specs by their row's id (insertion order), those without a row last."""

    def place(spec: RowSpec) -> tuple[float, int]:
        row = table.row(spec)
        return (float(row["id"]) if row and row.get("id") is not None else float("inf"), spec.index)

    return sorted(specs, key=place)


def settled(specs: list[RowSpec], table: Table) -> list[str]:
    """Keys not yet where they can stay: not final, parked, nor pending behind a parked row."""
    parked_lanes: set[str] = set()
    waiting = []
    for spec in in_id_order(specs, table):
        if spec.refused is not None:
            continue
        row = table.row(spec)
        if row is None:
            waiting.append(spec.key)
            continue
        state = row["state"]
        if state == "parked" and spec.lane:
            parked_lanes.add(spec.lane)
        if state in FINAL or state in ("parked", "purged"):
            continue
        if state == "pending" and spec.lane in parked_lanes:
            continue
        waiting.append(spec.key)
    return waiting


@dataclass
class Evidence:
    """Everything a promise reads: the row specs (in id order), the table, what happened at
    Recrypt, the method catalog and the daemons' ``[retry] max_unknown_attempts``."""

    specs: list[RowSpec]
    table: Table
    observed: Observed
    catalog: Catalog
    max_unknown: int

    def runs(self, spec: RowSpec) -> int:
        """How often ``spec``'s row executed at Recrypt. A reused key executed for the row it
        first belonged to, never for this one."""
        return self.observed.executions(spec.key) if spec.reused_from is None else 0

    def written(self) -> Iterator[tuple[RowSpec, dict[str, Any]]]:
        """Each row the database accepted and the table has (purged ones included)."""
        for spec in self.specs:
            row = self.table.row(spec) if spec.refused is None else None
            if row is not None:
                yield spec, row

    def standing(self) -> Iterator[tuple[RowSpec, dict[str, Any]]]:
        """``written`` but those retention purged before their final state was read."""
        return ((spec, row) for spec, row in self.written() if row["state"] != "purged")

    def seen(self, spec: RowSpec, row: dict[str, Any]) -> str:
        """Where a row ended, for a violation line."""
        state, reason, maybe = row["state"], row["park_reason"], bool(row["maybe_executed"])
        runs = self.runs(spec)
        return f"{state}/{reason} maybe_executed={maybe} executions={runs} last={row['last_code']}"
