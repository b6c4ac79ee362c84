"""Payload text → value, key checks and the fingerprint: pure functions shared by all layers."""

from __future__ import annotations

import hashlib
import json
import uuid
from typing import Any

from outbox.errors import BadRowError


def parse_payload(raw: Any) -> Any:
    """The payload as the database returned it (text, bytes or decoded JSON) to a Python value."""
    if isinstance(raw, (bytes, bytearray)):
        raw = raw.decode("utf-8", errors="replace")
    if isinstance(raw, str):
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise BadRowError(f"payload is not valid JSON: {exc}") from exc
        except RecursionError:
            raise BadRowError("payload JSON is nested too deeply to be a request") from None
    return raw


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def fingerprint(raw: Any) -> str:
    """SHA-256 of the payload in canonical JSON, so a changed payload is caught before a resend.

    A payload that is not JSON is fingerprinted as its text (such a row is parked anyway).
    """
    try:
        text = canonical_json(parse_payload(raw))
    except (BadRowError, RecursionError):
        text = raw if isinstance(raw, str) else repr(raw)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def check_key(key: Any) -> str:
    """The key must be a canonical lowercase UUID; anything else is refused, never rewritten.

    Rewriting (say, lower-casing) could make two distinct rows share one key at Recrypt, and the
    second would then "commit" on ALREADY_EXISTS without its effect.
    """
    if not isinstance(key, str):
        raise BadRowError(f"idempotency_key must be text, got {type(key).__name__}")
    try:
        canonical = str(uuid.UUID(key))
    except ValueError:
        canonical = None
    if canonical != key:
        raise BadRowError(
            f"idempotency_key {key[:64]!r} is not a lowercase UUID (36 characters, e.g. "
            f"{uuid.UUID(int=0)}); enqueue the transfer again under a new key such as "
            "str(uuid.uuid4()), then cancel this row"
        )
    return key
