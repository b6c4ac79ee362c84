"""Where each kind of row must end, and what is wrong when it does not.

``end_problem`` reads one row against its spec: a plain row commits once; a doomed row parks
for its fault's reason unexecuted; an expiring row commits once or expires unexecuted (or
parks ``expired_unknown`` when it may have executed); and the rows of the seams each end as
their seam says (a reused key, a method edit, an operator's cancel or requeue, a vgw-db storm,
a server's "failed to connect" after executing). Used by the promise
``every_row_ends_where_its_kind_says`` (``promises``). Pure: reads data, imports no world.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from tests.torture.observed import Span
from tests.torture.vocabulary import EDITED_PARK_REASONS, KEY_REUSED, RowSpec


def end_problem(  # noqa: PLR0911 (one answer per kind of row)
    spec: RowSpec,
    row: dict[str, Any],
    runs: int,
    seen: str,
    spans: list[Span],
    history: list[dict[str, Any]],
    max_unknown: int,
) -> str | None:
    """What is wrong with where ``spec``'s row ended, or None.

    ``spans``: the calls with its key at the simulator; ``history``: its recorded answers.
    """
    state, reason = row["state"], row["park_reason"]
    if spec.reused_from is not None:
        return _reuse_end(spec, state, reason, seen)
    if spec.kind == "method_edit":
        return _edit_end(spec, state, reason, runs, seen)
    if spec.cancelled or spec.unblocked is not None:
        return _operator_end(spec, state, runs, seen)
    if spec.kind.startswith("storm_doomed"):
        return _storm_end(spec, row, runs, seen, spans, history, max_unknown)
    if spec.kind.startswith("failed_to_connect"):
        return _failed_to_connect_end(spec, row, runs, seen)
    if spec.park is not None:
        return _doomed_end(spec, row, runs, seen)
    if spec.kind == "expires":
        return _expiring_end(row, runs, seen)
    return _plain_end(row, runs, seen, spans, max_unknown)


def _doomed_end(spec: RowSpec, row: dict[str, Any], runs: int, seen: str) -> str | None:
    """A row whose fault (or bad content) calls for a park: parked for that reason, unexecuted."""
    if row["state"] != "parked" or row["park_reason"] != spec.park or runs:
        return f"must be parked {spec.park} unexecuted, is {seen}: {row['last_message']}"
    return None


def _expiring_end(row: dict[str, Any], runs: int, seen: str) -> str | None:
    """Committed once, or expired unexecuted, or parked ``expired_unknown`` if it may have run."""
    state, reason, maybe = row["state"], row["park_reason"], bool(row["maybe_executed"])
    fine = (
        (state == "committed" and runs == 1)
        or (state == "expired" and runs == 0)
        or (state == "parked" and reason == "expired_unknown" and maybe)
    )
    return None if fine else f"expiring row ended {seen}"


def _plain_end(
    row: dict[str, Any], runs: int, seen: str, spans: list[Span], max_unknown: int
) -> str | None:
    """A row no fault dooms: committed once. Parked ``object_limit`` or ``unknown_outcome``
    says which general fault was misread."""
    state, reason = row["state"], row["park_reason"]
    if state == "parked" and reason == "object_limit":
        answers = sorted({s.message for s in spans if s.code == "RESOURCE_EXHAUSTED"})
        return (
            f"parked object_limit, but Recrypt's RESOURCE_EXHAUSTED answers to it were {answers}, "
            "none a bare number: any other text, digits or not, is rate limiting (handed back, "
            f"throttled, no attempt counted); {seen}"
        )
    if state == "parked" and reason == "unknown_outcome":
        unknown = row.get("unknown_attempts", "?")
        return (
            f"parked unknown_outcome after {row['attempts']} attempts ({unknown} counted as "
            f"unknown outcomes; limit {max_unknown}) although no storm doomed it: only unknown "
            f"outcomes (not rollover retries nor gate hand-backs) count; {seen}"
        )
    if state != "committed" or runs != 1:
        return f"must be committed once, is {seen}: {row['last_message']}"
    return None


def _operator_end(spec: RowSpec, state: str, runs: int, seen: str) -> str | None:
    """A row an operator finished. Cancelled (no ``--force``), it stays cancelled unexecuted;
    a parked lane head requeued with its fault cleared commits once; one cancelled (through
    the store or by hand) stays cancelled unexecuted."""
    if spec.unblocked is None:
        if state != "cancelled" or runs:
            return f"cancelled by an operator (no --force), must stay cancelled unexecuted: {seen}"
        return None
    if spec.unblocked == "requeue":
        if state != "committed" or runs != 1:
            return f"parked lane head requeued (fault cleared): must be committed once, is {seen}"
        return None
    if state != "cancelled" or runs:
        return (
            f"parked lane head cancelled ({spec.unblocked}): must stay cancelled unexecuted, "
            f"is {seen}"
        )
    return None


def _storm_end(
    spec: RowSpec,
    row: dict[str, Any],
    runs: int,
    seen: str,
    spans: list[Span],
    history: list[dict[str, Any]],
    max_unknown: int,
) -> str | None:
    """DEADLINE_EXCEEDED vgw-db on every call: parked ``unknown_outcome`` with maybe_executed
    after exactly max_unknown_attempts unknown outcomes; executed once if the storm executes
    its first call, else never."""
    storms = [s for s in spans if s.code == "DEADLINE_EXCEEDED" and "vgw-db" in s.message]
    counted = [line for line in history if _counted_unknown(line)]
    what = f"DEADLINE_EXCEEDED vgw-db on every call ({len(storms)} calls so answered)"
    if row["state"] != "parked" or row["park_reason"] != "unknown_outcome":
        return (
            f"{what}: must end parked unknown_outcome after max_unknown_attempts ({max_unknown}) "
            f"unknown outcomes, is {seen}: {row['last_message']}"
        )
    if not row["maybe_executed"]:
        return f"{what}: parked unknown_outcome without maybe_executed: {seen}"
    if len(counted) != max_unknown:
        return (
            f"{what}: parked unknown_outcome after {len(counted)} unknown outcomes in its history "
            f"(answers and lease expiries), not exactly max_unknown_attempts={max_unknown}: {seen}"
        )
    if len(storms) > max_unknown:
        return f"{what}: more calls than max_unknown_attempts={max_unknown}, so some went uncounted"
    executes = spec.kind == "storm_doomed_executed" and bool(storms)
    if runs != int(executes):
        return f"{what}: executed {runs} times, its storm executes {int(executes)}: {seen}"
    return None


def _counted_unknown(line: dict[str, Any]) -> bool:
    """A history line that counts toward max_unknown_attempts: an unknown outcome answered
    (kept for a retry, or the one that parked the row), or a lease expiry."""
    if line["code"] == "LEASE_EXPIRED":
        return True
    if line["decision"] not in ("retry", "park"):
        return False
    unknown = ("DEADLINE_EXCEEDED", "UNKNOWN", "INTERNAL", "ABORTED", "CANCELLED", "DATA_LOSS")
    if line["code"] == "UNAVAILABLE":  # but vgw-db: a rollover, retried without counting
        return "vgw-db" not in (said(line["message"]) or "")
    return line["code"] in unknown


def _failed_to_connect_end(spec: RowSpec, row: dict[str, Any], runs: int, seen: str) -> str | None:
    """Executed, then "failed to connect" from the server: an unknown outcome. It commits on
    ALREADY_EXISTS (maybe_executed), or, expiring meanwhile, parks ``expired_unknown``."""
    state, reason, maybe = row["state"], row["park_reason"], bool(row["maybe_executed"])
    if spec.kind == "failed_to_connect_expires":
        fine = (state == "expired" and not runs) or (
            state == "parked" and reason == "expired_unknown" and maybe and runs <= 1
        )
        if fine:
            return None
        return (
            "executed, then answered UNAVAILABLE 'failed to connect …' by the server until it "
            f"expired: must end parked expired_unknown (maybe_executed), is {seen}"
        )
    if state != "committed" or runs != 1 or not maybe:
        return (
            "executed, then answered UNAVAILABLE 'failed to connect …' by the server, then "
            f"ALREADY_EXISTS: must be committed once with maybe_executed, is {seen}: "
            f"{row['last_message']}"
        )
    return None


def _reuse_end(spec: RowSpec, state: str, reason: str | None, seen: str) -> str | None:
    """A new row under a purged committed row's key: refused, or parked ``key_reused``."""
    if state == "committed":
        return (
            f"reuses the key of purged committed row {spec.reused_from} with another payload "
            f"and ended committed (Recrypt's ALREADY_EXISTS was for the old row: this payload "
            f"never executed); it must be refused at INSERT or parked {KEY_REUSED}: {seen}"
        )
    if state != "parked" or reason != KEY_REUSED:
        return (
            f"reuses the key of purged row {spec.reused_from}: must be parked {KEY_REUSED}: {seen}"
        )
    return None


def _edit_end(spec: RowSpec, state: str, reason: str | None, runs: int, seen: str) -> str | None:
    """A row whose method was edited after its first send: parked, never executed."""
    if spec.edited_after_send and (state != "parked" or reason not in EDITED_PARK_REASONS):
        return (
            f"method edited {spec.method} -> {spec.edited_to} after the first send: must be "
            f"parked ({' or '.join(sorted(EDITED_PARK_REASONS))}), is {seen}"
        )
    if state != "parked" or runs:
        return f"method-edit row must end parked unexecuted, is {seen}"
    return None


def said(message: str | None) -> str | None:
    """What Recrypt said in a history line (None: no answer from Recrypt, e.g. never sent)."""
    marker = "; Recrypt said: "
    at = (message or "").find(marker)
    return None if at < 0 else (message or "")[at + len(marker) :]


def clock(at: datetime | None) -> str:
    """A moment as a violation line shows it."""
    return at.strftime("%H:%M:%S.%f")[:-3] if at else "?"
