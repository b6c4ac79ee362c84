"""Log lines never carry row data, even when the database quotes it in an error."""

from __future__ import annotations

import sqlite3

import sqlalchemy as sa

from outbox.logs import describe_error

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
