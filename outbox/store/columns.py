"""SQL pieces several operations share: writers' text as written, states written out, times.

Imports SQLAlchemy and ``outbox.schema`` only.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler

from outbox.schema import DUE_NOW, State, UTCDateTime, messages

m = messages

#: ``due_at`` of a row due from its insertion (``outbox.schema.DUE_NOW``), as a time.
DUE_NOW_AT = datetime.fromisoformat(DUE_NOW).replace(tzinfo=UTC)
#: Written out, not bound: PostgreSQL's generic plan for a bound state cannot use the
#: partial index on pending rows (``ix_outbox_messages_due``).
PENDING: sa.ColumnElement[str] = sa.literal_column(f"'{State.PENDING.value}'", sa.String())
INFLIGHT: sa.ColumnElement[str] = sa.literal_column(f"'{State.INFLIGHT.value}'", sa.String())


class as_written(sa.sql.expression.FunctionElement[Any]):
    """A writer's text column as the database holds it, converted to text in Python.

    SQLite stores any bytes in a text column, and its driver fails the whole fetch (quoting
    the value) on one that is not UTF-8; so SQLite hands over the bytes (``CAST … AS BLOB``)
    and ``read_text`` decodes them row by row. The other databases refuse such values at
    INSERT and hand over text.
    """

    type = sa.types.NullType()
    inherit_cache = True
    name = "as_written"


@compiles(as_written)
def _as_written_text(element: as_written, compiler: SQLCompiler, **kw: Any) -> str:
    return compiler.process(element.clauses, **kw)


@compiles(as_written, "sqlite")
def _as_written_blob(element: as_written, compiler: SQLCompiler, **kw: Any) -> str:
    return f"CAST({compiler.process(element.clauses, **kw)} AS BLOB)"


def aware(value: Any) -> Any:
    """A time as aware UTC; a stored value that is not a time is returned as text, as stored.

    Aggregates (min) bypass the column type on some drivers, so times may arrive as naive
    datetimes or as text. A value that is no time at all (an SQLite row written before
    migration 0005, MariaDB's zero date) is shown as it is rather than crash the caller.
    """
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            return value
    if isinstance(value, datetime):
        return UTCDateTime().process_result_value(value, None)  # type: ignore[arg-type]
    return value if value is None else str(value)


def first_due() -> sa.ColumnElement[Any]:
    """When a row first became due: the later of its insertion and ``not_before``."""
    return sa.case((m.c.not_before > m.c.created_at, m.c.not_before), else_=m.c.created_at)
