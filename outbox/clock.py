"""The one wall clock. Services take a ``clock`` argument defaulting to ``utcnow``; tests inject
their own. Pure: no I/O beyond reading the time."""

from __future__ import annotations

from datetime import UTC, datetime


def utcnow() -> datetime:
    """Now, timezone-aware in UTC: the only form of time that crosses a boundary."""
    return datetime.now(UTC)
