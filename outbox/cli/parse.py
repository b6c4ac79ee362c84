"""Command-line values the store cannot take as typed: times with a zone, JSON payloads.

A value that parses but cannot be used raises ``InputError`` (one ``error: …`` line, exit 1).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from outbox.cli.app import InputError


def parse_time(option: str, value: str | None) -> datetime | None:
    """ISO 8601 with a zone (``Z`` or ``+00:00``); a naive time is refused, not guessed."""
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise InputError(
            f"{option} {value!r} is not an ISO 8601 time; e.g. 2030-01-31T18:00:00Z"
        ) from None
    if parsed.tzinfo is None:
        raise InputError(f"{option} {value!r} has no time zone: add Z or +00:00: times are UTC")
    return parsed.astimezone(UTC)


def parse_payload(value: str) -> dict[str, Any]:
    """``--json``: inline JSON, or ``@path`` to read it from a file. Numbers stay exact."""
    source = "--json"
    if value.startswith("@"):
        source = f"--json file {value[1:]}"
        value = _read_payload_file(source, Path(value[1:]))
    try:
        payload = json.loads(value)  # a float where a string belongs is protobuf's to refuse
    except json.JSONDecodeError as exc:
        raise InputError(f"{source} is not valid JSON: {exc}") from None
    except RecursionError:
        raise InputError(f"{source} is nested too deeply") from None
    if not isinstance(payload, dict):
        raise InputError(
            f"{source} must be a JSON object (the request in protobuf JSON mapping), "
            f"got {type(payload).__name__}"
        )
    return payload


def _read_payload_file(source: str, path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InputError(f"{source}: cannot read it: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise InputError(f"{source}: is not UTF-8 text") from None
