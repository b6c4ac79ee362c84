"""Log lines never carry row data, even when the database quotes it in an error."""

from __future__ import annotations

import json
import logging
import sqlite3

import sqlalchemy as sa

from outbox.logs import _JsonFormatter, describe_error, kv

SECRET = '{"memo": "SECRET-PAYLOAD-42", "amount": "1.00"}'


def test_a_database_error_quoting_a_value_is_logged_without_it() -> None:
    orig = sqlite3.OperationalError(
        f"Could not decode to UTF-8 column 'payload' with text '{SECRET}"
    )
    exc = sa.exc.OperationalError("SELECT …", {}, orig)
    text = describe_error(exc)
    assert "SECRET" not in text and "OperationalError" in text and "Could not decode" in text


def test_postgres_style_detail_lines_are_dropped_and_quotes_elided() -> None:
    orig = ValueError('invalid input syntax for type json: "SECRET-PAYLOAD-42"\nDETAIL: Token')
    text = describe_error(orig)
    assert "SECRET" not in text and "DETAIL" not in text
    assert text.startswith("ValueError: invalid input syntax for type json")


def test_a_plain_connection_error_keeps_its_words() -> None:
    orig = ConnectionRefusedError("connection refused")
    assert describe_error(orig) == "ConnectionRefusedError: connection refused"


# --------------------------------------------------------------------------- JSON lines (issue 12)


def _json_line(message: str) -> dict[str, object]:

    record = logging.LogRecord("outbox.test", logging.INFO, __file__, 1, message, None, None)
    return json.loads(_JsonFormatter().format(record))  # type: ignore[no-any-return]


def test_json_logs_keep_numbers_and_booleans_typed() -> None:
    doc = _json_line(kv("x", rows=3, after_s=1.5, tls=False, ok=True, none=None, word="3 rows"))
    assert doc["rows"] == 3 and doc["after_s"] == 1.5
    assert doc["tls"] is False and doc["ok"] is True
    assert doc["word"] == "3 rows" and "none" not in doc


def test_json_logs_keep_strings_that_look_like_numbers_as_strings() -> None:
    doc = _json_line(kv("x", key="00012", amount="10.00", code="true", duration_ms="12.5"))
    # amounts are decimal strings, and a string given stays a string
    assert doc["key"] == "00012" and doc["amount"] == "10.00" and doc["code"] == "true"
    assert doc["duration_ms"] == "12.5"


def test_text_logs_show_booleans_and_numbers_plainly() -> None:
    assert kv("x", rows=3, tls=False, s="a b") == 'event=x rows=3 tls=false s="a b"'


def test_a_hand_written_line_with_spaces_keeps_its_words() -> None:
    doc = _json_line("event=record_failed rows=2 then=answers kept in memory error=X")
    assert doc["rows"] == 2 and doc["then"] == "answers kept in memory" and doc["error"] == "X"
