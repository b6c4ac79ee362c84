"""One line per event, ``key=value`` for the journal or JSON by config.

Events are logged as ``log.info("…", extra={"event": "committed", "key": …})``-free plain calls:
the message itself is ``event=NAME k=v …``, so any handler shows it usefully. The API key is
never passed to a logger; ``redact`` guards the one place a secret could slip in (exceptions).
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any

_SECRETS: set[str] = set()


MIN_SECRET_LENGTH = 8  # a shorter value would mangle ordinary text; real API keys are long


def register_secret(value: str | None) -> None:
    """Replace ``value`` by ``***`` in every log line: a last line of defence."""
    if value and len(value) >= MIN_SECRET_LENGTH:
        _SECRETS.add(value)


def redact(text: str) -> str:
    for secret in _SECRETS:
        text = text.replace(secret, "***")
    return text


def kv(event: str, **fields: Any) -> str:
    """``event=NAME k=v …`` with values quoted when they hold spaces."""
    parts = [f"event={event}"]
    for name, value in fields.items():
        if value is None:
            continue
        text = str(value)
        if not text or any(c in text for c in ' "='):
            text = json.dumps(text, ensure_ascii=False)
        parts.append(f"{name}={text}")
    return " ".join(parts)


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.fromtimestamp(record.created, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        line = f"{stamp} {record.levelname.lower()} {record.name} {record.getMessage()}"
        if record.exc_info:
            line += " exc=" + json.dumps(self.formatException(record.exc_info))
        return redact(line)


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        message = record.getMessage()
        if message.startswith("event="):
            doc |= _parse_kv(message)
        else:
            doc["msg"] = message
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return redact(json.dumps(doc, ensure_ascii=False, default=str))


def _parse_kv(message: str) -> dict[str, Any]:
    import shlex  # noqa: PLC0415

    out: dict[str, Any] = {}
    try:
        tokens = shlex.split(message)
    except ValueError:
        return {"msg": message}
    for token in tokens:
        name, _, value = token.partition("=")
        out[name] = value
    return out


def setup(level: str = "INFO", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter() if fmt == "json" else _TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # "skipped: maximum number of running instances" is our design (one dispatch at a time).
    logging.getLogger("apscheduler").setLevel(logging.ERROR)
    logging.getLogger("alembic").setLevel(logging.WARNING)


_QUOTED = re.compile(r"""'[^']*'|"[^"]*"|'[^']*$|"[^"]*$""")
ERROR_TEXT_LIMIT = 200


def describe_error(exc: BaseException) -> str:
    """An error for a log line: its type, the database's code, and the first line of its text
    with every quoted run elided. Databases quote the offending value ("… with text '{"memo":
    …'", "Token "x" is invalid"): a log line must never carry row data."""
    orig = getattr(exc, "orig", None)
    cause = orig if orig is not None else exc
    args = getattr(cause, "args", None) or (None,)
    code = getattr(cause, "sqlstate", None) or (args[0] if isinstance(args[0], int) else None)
    head = str(cause).strip().splitlines()
    first = _QUOTED.sub("'…'", head[0]) if head else ""
    coded = f" [{code}]" if code else ""
    return f"{type(cause).__name__}{coded}: {first[:ERROR_TEXT_LIMIT]}"
