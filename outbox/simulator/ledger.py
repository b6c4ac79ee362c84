"""What the simulated Recrypt has executed (per idempotency key) and what it answered.

Plain records and bookkeeping, no serving: it must not import ``grpc`` or the rest of
``outbox.simulator``. ``Ledger`` is not thread-safe on its own; the server holds its lock.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any


@dataclass(frozen=True)
class LedgerEntry:
    """One write that took effect (at most one per idempotency key)."""

    key: str
    method: str
    request: dict[str, Any]
    at: datetime
    response: dict[str, Any]


@dataclass(frozen=True)
class CallRecord:
    """One call as received and answered; ``had_apikey`` only says whether a key was sent
    (never the key); ``traceparent`` is the W3C trace context the caller sent, if any."""

    method: str
    key: str | None
    code: str
    at: datetime
    had_apikey: bool
    executed: bool = False
    traceparent: str | None = None  # the call's ``traceparent`` metadata, as received


class Ledger:
    """The writes that took effect, in order, and every call received."""

    def __init__(self) -> None:
        self.entries: list[LedgerEntry] = []
        self.calls: list[CallRecord] = []
        self._executed: dict[str, int] = {}

    def has(self, key: str) -> bool:
        return key in self._executed

    def record(self, entry: LedgerEntry) -> None:
        """``entry`` took effect; the caller has checked ``has(entry.key)`` under its lock."""
        self._executed[entry.key] = self._executed.get(entry.key, 0) + 1
        self.entries.append(entry)

    def executions(self, key: str) -> int:
        return self._executed.get(key, 0)

    def executed_keys(self) -> set[str]:
        return set(self._executed)

    def call_count(self, method: str | None = None, since: datetime | None = None) -> int:
        """Calls received for ``method`` (all: ``None``) at or after ``since``."""
        return sum(
            1
            for c in self.calls
            if (method is None or c.method == method) and (since is None or c.at >= since)
        )
