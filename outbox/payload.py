"""Payload text → value, key checks, the fingerprint and bounded text: pure functions shared by
all layers. None of them ever quotes more than a short prefix of a row's data.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from decimal import Decimal
from typing import Any, overload

from outbox.errors import BadRowError

#: Characters of one stored message (last_message, a history line): MariaDB's TEXT holds
#: 65,535 bytes, and an operator reads a few lines, not a payload.
MESSAGE_LIMIT = 4000
#: Characters of one run of row data (a field name, a value, a method) quoted in a message.
QUOTE_LIMIT = 80
#: Characters of a whole error message built from row data.
BRIEF_LIMIT = 600
_LONG_RUN = re.compile(rf"[^\s\"']{{{QUOTE_LIMIT + 1},}}")


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


def fingerprint(method: Any, payload: Any) -> str:
    """SHA-256 binding a key to one request: the method, a newline, the payload's canonical JSON.

    Stored at the first claim and compared before every resend, so neither the method nor the
    payload can change under a key that may have executed. It never raises: a value that is
    not text or not JSON is hashed as it is (such a row is parked anyway). PostgreSQL computes
    the same binding in SQL over ``payload::text`` (``outbox.store.claims.build_claim``).
    """
    digest = hashlib.sha256(_bytes(method))
    digest.update(b"\n")
    digest.update(_canonical_bytes(payload))
    return digest.hexdigest()


def _bytes(value: Any) -> bytes:
    """Text as UTF-8 (a lone surrogate too: ``surrogatepass`` never raises); bytes as they are."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    return str(value).encode("utf-8", "surrogatepass")


def _canonical_bytes(raw: Any) -> bytes:
    if isinstance(raw, (bytes, bytearray)):
        try:
            raw = bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            return bytes(raw)
    try:
        return _bytes(canonical_json(parse_payload(raw)))
    except (BadRowError, RecursionError, TypeError, ValueError):
        return _bytes(raw)


def read_text(value: Any, column: str) -> tuple[Any, str | None]:
    """A writer's text column as the store read it, as text: ``(text, None)``, or a placeholder
    and the defect that parks the row when the bytes are not UTF-8 (SQLite stores any bytes).

    The placeholder quotes nothing: claims reach logs, and the bytes may hold a payload.
    """
    if not isinstance(value, (bytes, bytearray)):
        return value, None
    try:
        return bytes(value).decode("utf-8"), None
    except UnicodeDecodeError as exc:
        defect = (
            f"{column} is not valid UTF-8 text (byte 0x{value[exc.start]:02x} at offset "
            f"{exc.start} of {len(value)}): a writer stored bytes, not text; fix the writer, "
            "enqueue the intent again under a new key, then cancel this row"
        )
        return f"<{len(value)} bytes, not UTF-8>", defect


def check_text(value: Any) -> None:
    """Every string of a request must be UTF-8: refuse a lone UTF-16 surrogate.

    ``JSON.stringify`` writes one as ``\\ud83d`` for a string cut inside an emoji; it is valid
    JSON, but no protobuf string can hold it (and protobuf's C runtime fails on one in a field
    name with a SystemError rather than a parse error).
    """
    try:
        json.dumps(value, ensure_ascii=False, default=str).encode("utf-8")
    except UnicodeEncodeError:
        raise BadRowError(
            "payload holds a lone UTF-16 surrogate (a \\ud800-\\udfff escape without its "
            "pair, as JSON.stringify writes for a string cut inside an emoji): it can never be "
            "sent as UTF-8; fix the writer, enqueue the intent again under a new key, then "
            "cancel this row"
        ) from None
    except (RecursionError, ValueError):
        return  # too deep or circular: building the request says so


@overload
def bounded(text: str, limit: int = MESSAGE_LIMIT) -> str: ...
@overload
def bounded(text: None, limit: int = MESSAGE_LIMIT) -> None: ...
def bounded(text: str | None, limit: int = MESSAGE_LIMIT) -> str | None:
    """``text`` cut to ``limit`` characters with a marker, and storable in every database.

    The store passes every message it writes through here (last_message, history lines,
    actors, operators' reasons): NUL, which PostgreSQL text refuses, and lone surrogates,
    which have no UTF-8 form, are escaped.
    """
    if text is None:
        return None
    if len(text) > limit:
        marker = f" … ({len(text) - limit} characters cut)"
        text = text[: max(limit - len(marker), 0)] + marker
    text = text.replace("\x00", "\\x00")
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def brief(text: str) -> str:
    """An error message that quotes row data, made short: each run of more than
    ``QUOTE_LIMIT`` characters without a space or quote (a 70 kB field name) keeps its first
    ``QUOTE_LIMIT``, and the whole message is cut at ``BRIEF_LIMIT``.
    """
    cut = _LONG_RUN.sub(
        lambda run: f"{run[0][:QUOTE_LIMIT]}…(+{len(run[0]) - QUOTE_LIMIT} characters)", text
    )
    return bounded(cut, BRIEF_LIMIT)


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


def plain_decimal(value: Decimal) -> str:
    """A decimal as Recrypt's plain decimal string: never an exponent, never NaN or infinity.

    ``str(Decimal("0.00000050"))`` is ``"5.0E-7"`` and ``str(Decimal("5E+3"))`` is ``"5E+3"``;
    Recrypt would reject both. Trailing zeros are kept: they are the amount's precision.
    """
    if not value.is_finite():
        raise BadRowError(f"amount {value} is not a number: write a finite decimal amount")
    return format(value, "f")
