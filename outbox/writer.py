"""``outbox.enqueue``: the Python writers' API, on the caller's own connection and transaction.

A row is checked against the same protos the daemon sends with: ``proto_path`` (argument),
else ``[recrypt] proto_path`` of the config file named by ``OUTBOX_CONFIG`` (the daemon's
config; its API key is never read), else the bundled Recrypt model. Each is compiled once
per process.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping
from dataclasses import replace
from datetime import datetime
from decimal import Decimal
from functools import cache
from typing import Any

from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from outbox.clock import utcnow
from outbox.config import load
from outbox.descriptors import Catalog, build_request
from outbox.errors import BadRowError
from outbox.payload import check_key, plain_decimal
from outbox.store import NewRow, enqueue_row, new_key
from outbox.tracing import current_traceparent


@cache
def _catalog(proto_path: str) -> Catalog:
    """The catalog at ``proto_path`` ("" for the bundled model), compiled once."""
    return Catalog.load(proto_path or None)


@cache
def _configured_proto_path(config_path: str) -> str:
    return load(config_path, with_key=False).recrypt.proto_path


def catalog_for(proto_path: str | os.PathLike[str] | None = None) -> Catalog:
    """The protos ``enqueue`` checks rows against (see the module's docstring)."""
    if proto_path is not None:
        return _catalog(os.fspath(proto_path))
    config_path = os.environ.get("OUTBOX_CONFIG")
    return _catalog(_configured_proto_path(config_path) if config_path else "")


def enqueue(
    conn: Connection | Session,
    method: str,
    payload: Mapping[str, Any],
    *,
    key: str | uuid.UUID | None = None,
    lane: str | None = None,
    not_before: datetime | None = None,
    expires_at: datetime | None = None,
    reference: str | None = None,
    catalog: Catalog | None = None,
    proto_path: str | os.PathLike[str] | None = None,
    serialise_lane: bool = True,
) -> str:
    """Insert one outbox row inside the caller's transaction and return its idempotency key.

    The method and payload are checked against the descriptors first: ``catalog`` if given,
    else the protos at ``proto_path``, else ``[recrypt] proto_path`` of the config named by
    ``OUTBOX_CONFIG``, else the bundled Recrypt model; so a row that could never be sent is
    refused here with ``BadRowError`` rather than parked later. ``key`` may be a ``uuid.UUID``.
    ``Decimal`` values are stored as decimal strings, never floats. A key already in the outbox
    raises ``DuplicateKeyError``. A rollback of the caller's transaction leaves no row.

    With a ``lane``, the lane's writer lock is held until the caller's transaction ends, so a
    second writer of the lane waits for this one to commit and the lane's rows are sent in
    commit order (README, "Lanes"). Enqueue into one lane per transaction, or always lock
    lanes in the same order, or two writers can deadlock. ``serialise_lane=False`` skips the
    lock: then a row committed late may be sent after a later row of its lane.
    """
    key = _key_of(key)
    body = _decimals_to_strings(dict(payload))
    found = (catalog or catalog_for(proto_path)).submittable(method)
    build_request(found, body, key)  # raises BadRowError naming what does not parse
    _require_aware(not_before=not_before, expires_at=expires_at)
    row = NewRow(key, method, body, lane=lane, reference=reference)
    row = replace(row, not_before=not_before, expires_at=expires_at)
    row = replace(row, traceparent=current_traceparent())  # the caller's span, if any
    enqueue_row(conn, row, utcnow(), serialise_lane=serialise_lane)
    return key


def _key_of(key: str | uuid.UUID | None) -> str:
    """The row's key: the caller's, checked and lowercase, or a new one."""
    key = str(key) if isinstance(key, uuid.UUID) else key  # str() is the lowercase form
    return check_key(key) if key is not None else new_key()


def _require_aware(**times: datetime | None) -> None:
    for name, value in times.items():
        if value is not None and value.tzinfo is None:
            raise BadRowError(f"{name} must be an aware datetime (UTC), got a naive one")


def _decimals_to_strings(value: Any) -> Any:
    if isinstance(value, Decimal):
        return plain_decimal(value)
    if isinstance(value, dict):
        return {k: _decimals_to_strings(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decimals_to_strings(v) for v in value]
    return value
