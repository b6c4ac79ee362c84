"""Which rows an operator means: one filter for ``outbox list``, the bulk actions
(``outbox requeue --park-reason …``) and the console, and the keyset cursor of its pages.

A filter is data; the store turns it into bound parameters (never text built from a value).
Pure: no I/O, no SQL, no gRPC.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import datetime

from outbox.errors import OutboxError


class FilterError(OutboxError):
    """A filter or cursor an operator gave that cannot be used (says which and why)."""


@dataclass(frozen=True)
class RowFilter:
    """Rows matching every criterion given; None leaves a criterion out.

    ``method`` is a full gRPC path (``/recrypt.market.v1.Market/PlaceOrder``) or the short
    form ``outbox list`` prints (``Market/PlaceOrder``); ``reference`` matches exactly;
    ``key_prefix`` is the start of an idempotency key; times bound ``created_at`` and
    ``updated_at`` (since: at or after; until: before).
    """

    state: str | None = None
    park_reason: str | None = None
    method: str | None = None
    lane: str | None = None
    reference: str | None = None
    key_prefix: str | None = None
    created_since: datetime | None = None
    created_until: datetime | None = None
    updated_since: datetime | None = None
    updated_until: datetime | None = None
    maybe_executed: bool | None = None

    def given(self) -> dict[str, object]:
        """The criteria given, by name (for a preview line, a log, a JSON document)."""
        return {f.name: v for f in fields(self) if (v := getattr(self, f.name)) is not None}

    def is_empty(self) -> bool:
        return not self.given()

    def describe(self) -> str:
        """``state=parked park_reason=precondition``: what a preview says it matched."""
        items = self.given().items()
        shown = (f"{k}={v.isoformat() if isinstance(v, datetime) else v}" for k, v in items)
        return " ".join(shown) or "every row"


def method_pattern(method: str) -> tuple[bool, str]:
    """(exact, text): a full path matches exactly; a short form (``Market/PlaceOrder``, or
    ``recrypt.market.v1.Market/PlaceOrder``) matches the end of a path after a dot or slash."""
    if method.startswith("/"):
        return True, method
    if "/" not in method:
        raise FilterError(
            f"--method {method!r}: give the full gRPC path (/pkg.Service/Method) "
            "or Service/Method as `outbox list` prints it"
        )
    return False, method


def parse_cursor(text: str | None) -> int | None:
    """``--after CURSOR``: the cursor ``list`` printed (a row id)."""
    if text is None:
        return None
    if not text.isdigit():
        raise FilterError(f"--after {text!r} is not a cursor `outbox list` printed")
    return int(text)
