"""One line per event, ``key=value`` for the journal or JSON by config.

Events are logged as ``log.info("…", extra={"event": "committed", "key": …})``-free plain calls:
the message itself is ``event=NAME k=v …``, so any handler shows it usefully. The API key is
never passed to a logger; ``redact`` guards the one place a secret could slip in (exceptions).
"""

from __future__ import annotations

import json
import logging
import math
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
    """``event=NAME k=v …``: numbers and booleans bare (``rows=3 tls=false``), strings quoted
    when they hold spaces or read like a number or boolean, so the JSON format can tell the
    two apart (``amount="10.00"`` stays a string; amounts are never numbers)."""
    parts = [f"event={event}"]
    for name, value in fields.items():
        if value is not None:
            parts.append(f"{name}={_value_text(value)}")
    return " ".join(parts)


def _value_text(value: Any) -> str:
    kind = type(value)
    if kind is str:  # the common case first (keys, methods, code names): one regex
        return value if _bare(value) else json.dumps(value, ensure_ascii=False)
    if kind is int or (kind is float and math.isfinite(value)):
        return repr(value)  # what json.dumps writes, without its machinery
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return json.dumps(value)  # NaN/inf as JSON's NaN/Infinity: read back as numbers
    text = str(value)
    return text if _bare(text) else json.dumps(text, ensure_ascii=False)


def _bare(text: str) -> bool:
    """Whether ``text`` reads back as itself unquoted: not empty, no space, quote, ``=`` or
    backslash, and not a number or boolean (``_literal``)."""
    if _BARE.fullmatch(text) is None or text in ("true", "false"):
        return False
    return _NUMBER.fullmatch(text) is None


def _literal(text: str) -> bool | int | float | None:
    """A bare ``kv`` value that is a JSON number or boolean, else None."""
    if text in ("true", "false"):
        return text == "true"
    if not _NUMBER.fullmatch(text):
        return None
    number: int | float = json.loads(text)
    return number


_NUMBER = re.compile(r"-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?|-?Infinity|NaN")
#: A value written bare: not empty, no space, quote, ``=`` or backslash.
_BARE = re.compile(r'[^ "=\\]+')


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
    """``kv``'s line back into fields: quoted values are strings, bare numbers and booleans
    keep their type, anything else is a string."""
    out: dict[str, Any] = {}
    rest, name = message, "msg"
    while rest.strip():
        found = _FIELD.match(rest)
        if found is None:  # a word after an unquoted value with spaces: part of that value
            word, _, rest = rest.strip().partition(" ")
            out[name] = f"{out.get(name, '')} {word}".strip()
            continue
        name, quoted, bare = found.groups()
        if quoted is not None:
            out[name] = json.loads(quoted)
        else:
            literal = _literal(bare)
            out[name] = bare if literal is None else literal
        rest = rest[found.end() :]
    return out


_FIELD = re.compile(r'\s*([^\s=]+)=(?:("(?:[^"\\]|\\.)*")|(\S*))')


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
