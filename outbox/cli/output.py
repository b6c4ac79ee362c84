"""The JSON documents of ``--json``: exactly one on stdout, datetimes as ISO 8601 UTC.

Pure shaping of the store's views (and ``click.echo``); no tables, no database access.
"""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import click

from outbox.health import liveness, oldest_due_age
from outbox.operations import payload_diff
from outbox.store import BulkResult, HistoryLine, RowPage, RowView, StatusView


def emit_json(document: dict[str, Any]) -> None:
    click.echo(json.dumps(document, indent=2, ensure_ascii=False, default=_json_default))


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return iso(value)
    if isinstance(value, Decimal):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return plain_json(value)
    raise TypeError(f"cannot encode {type(value).__name__} as JSON")


def iso(value: datetime | None) -> str | None:
    return None if value is None else value.astimezone(UTC).isoformat()


def maybe_json(value: Any) -> Any:
    """Payload/response as a JSON value when the stored text is valid JSON, else as it is."""
    if not isinstance(value, str | bytes):
        return value
    try:
        return json.loads(value)
    except ValueError:
        return value


def row_json(row: RowView, *, with_payload: bool = True) -> dict[str, Any]:
    """The one JSON form of a row (``list``, ``show``): datetimes as ISO 8601 UTC."""
    data = plain_json(row)
    if with_payload:
        data["payload"], data["response"] = maybe_json(row.payload), maybe_json(row.response)
        data["first_payload"] = maybe_json(row.first_payload)
    else:
        del data["payload"], data["response"], data["first_payload"]
    return data


def page_json(page: RowPage) -> dict[str, Any]:
    """``outbox list --json``: the rows, how many match in all, the next page's cursor."""
    rows = [row_json(r, with_payload=False) for r in page.rows]
    cursor = None if page.next_after is None else str(page.next_after)
    document = {"rows": rows, "total": page.total, "next_cursor": cursor}
    return {**document, "total_is_a_lower_bound": page.more_than_total}


def bulk_json(result: BulkResult) -> dict[str, Any]:
    """``outbox requeue|cancel --json``: what was done, skipped (and why) or requested."""
    data = plain_json(result)
    data["skipped"] = [{"key": s.key, "why": s.why} for s in result.skipped]
    data["requested"] = [{"key": k, "approval_id": i} for k, i in result.requested]
    return data


def plain_json(item: Any) -> dict[str, Any]:
    """A dataclass's fields by name, datetimes as ISO 8601 UTC."""
    fields = {f.name: getattr(item, f.name) for f in dataclasses.fields(item)}
    return {k: iso(v) if isinstance(v, datetime) else v for k, v in fields.items()}


def show_json(row: RowView, history: list[HistoryLine]) -> dict[str, Any]:
    """``outbox show --json``."""
    changed = payload_diff(row.first_payload, row.payload)
    history_json = [plain_json(h) for h in history]
    return {"row": row_json(row), "history": history_json, "payload_diff": changed}


def status_json(view: StatusView, now: datetime, stale_after: float) -> dict[str, Any]:
    """``outbox status --json``."""
    workers = [
        plain_json(w)
        | {
            "liveness": liveness(w, now, stale_after),
            "beat_age_seconds": round((now - w.last_beat_at).total_seconds(), 3),
        }
        for w in view.workers
    ]
    expired = view.oldest_lease_expired_at
    return {
        "counts": view.counts,
        "counts_estimated": sorted(view.estimated),
        "oldest_due_age_seconds": oldest_due_age(view.oldest_due_at, now),
        "leases_expired": view.leases_expired,
        "oldest_lease_expired_age_seconds": (now - expired).total_seconds() if expired else None,
        "parked_by_reason": view.parked_by_reason,
        "blocked_lanes": view.blocked_lanes,
        "maybe_executed_open": view.maybe_executed_open,
        "holds": [plain_json(h) for h in view.holds],
        "approvals_open": view.approvals_open,
        "workers": workers,
    }
