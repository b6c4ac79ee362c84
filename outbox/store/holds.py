"""Holds (``outbox_holds``): a lane or a method an operator held. The claim leaves their rows
alone (``claims.due_query``'s exclusions); a release deletes the hold. Holds are not per row,
so they are logged (WARNING, with who and why) rather than written to a row's history.

Imports SQLAlchemy, ``outbox.schema``, ``outbox.errors`` and the store's own modules only.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from outbox.errors import OperatorActionError
from outbox.payload import bounded
from outbox.schema import holds as h
from outbox.store.columns import aware
from outbox.store.rows import Held, Hold
from outbox.vocabulary import HoldKind

log = logging.getLogger("outbox.holds")
#: How long a daemon reuses the holds it read (seconds): well within one poll.
HOLDS_MAX_AGE = 0.5
_WHO = h.c.actor.type.length or 255  # type: ignore[attr-defined]


def add(conn: Connection, hold: Hold) -> Hold:
    """Hold a lane or a method; one already held is refused (it names who holds it)."""
    kind, value, actor, reason = hold.kind, hold.value, hold.actor, hold.reason
    HoldKind(kind)  # a ValueError for a kind that is not a word of the vocabulary
    found = _get(conn, kind, value)
    if found is not None:
        raise OperatorActionError(
            f"{kind} {value} is already held by {found.actor} since "
            f"{found.held_at:%Y-%m-%d %H:%M:%S} UTC: {found.reason}"
        )
    hold = replace(hold, actor=bounded(actor, _WHO))
    conn.execute(h.insert().values(**vars(hold)))
    log.warning(
        "event=hold kind=%s value=%s actor=%s reason=%r: no daemon claims its rows until "
        "`outbox release %s %s`",
        kind,
        value,
        actor,
        reason,
        kind,
        value,
    )
    return hold


def remove(conn: Connection, kind: str, value: str, actor: str, reason: str) -> Hold:
    """Release a hold; the hold released is returned (who held it, since when, why)."""
    found = _get(conn, kind, value)
    if found is None:
        raise OperatorActionError(f"{kind} {value} is not held: see `outbox holds`")
    conn.execute(h.delete().where(h.c.kind == kind, h.c.value == value))
    log.warning(
        "event=release kind=%s value=%s actor=%s reason=%r held_by=%s held_since=%s",
        kind,
        value,
        actor,
        reason,
        found.actor,
        found.held_at.isoformat(),
    )
    return found


def list_holds(conn: Connection) -> list[Hold]:
    rows = conn.execute(sa.select(h).order_by(h.c.kind, h.c.value)).all()
    return [_hold(row) for row in rows]


def _get(conn: Connection, kind: str, value: str) -> Hold | None:
    row = conn.execute(sa.select(h).where(h.c.kind == kind, h.c.value == value)).first()
    return None if row is None else _hold(row)


def _hold(row: sa.Row[Any]) -> Hold:
    data = dict(row._mapping)
    return Hold(**(data | {"held_at": aware(data["held_at"])}))


def held(found: list[Hold]) -> Held:
    lanes = frozenset(x.value for x in found if x.kind == HoldKind.LANE)
    return Held(lanes, frozenset(x.value for x in found if x.kind == HoldKind.METHOD))


class HoldsCache:
    """The holds a daemon's claims leave out, read at most every ``HOLDS_MAX_AGE`` seconds
    (one small primary-key read, not one per claim); a change is logged once per process."""

    def __init__(self, fetch: Callable[[], list[Hold]], max_age: float = HOLDS_MAX_AGE) -> None:
        self._fetch, self._max_age = fetch, max_age
        self._held, self._seen = Held(), frozenset[tuple[str, str]]()
        self._read_at = float("-inf")
        self._lock = threading.Lock()

    def current(self) -> Held:
        with self._lock:
            if time.monotonic() - self._read_at >= self._max_age:
                self._refresh(self._fetch())
            return self._held

    def forget(self) -> None:
        """Read again at the next claim (this process added or removed a hold)."""
        with self._lock:
            self._read_at = float("-inf")

    def _refresh(self, found: list[Hold]) -> None:
        self._read_at = time.monotonic()
        seen = frozenset((x.kind, x.value) for x in found)
        for x in found:
            if (x.kind, x.value) not in self._seen:
                log.warning(
                    "event=held kind=%s value=%s actor=%s reason=%r: its rows are not sent",
                    x.kind,
                    x.value,
                    x.actor,
                    x.reason,
                )
        for kind, value in sorted(self._seen - seen):
            log.warning("event=released kind=%s value=%s: its rows are sent again", kind, value)
        self._held, self._seen = held(found), seen
