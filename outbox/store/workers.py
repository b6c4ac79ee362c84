"""Workers' beats (``outbox_workers``): each daemon's row, what its gates say, when it stopped.

Used by the daemon's heartbeat and by retention (``purge_workers``); ``views.list_workers``
reads them. Imports SQLAlchemy, ``outbox.schema`` and the store's rows only.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy.engine import Connection

from outbox.schema import workers
from outbox.store.rows import WorkerBeat, failures_json


def heartbeat(conn: Connection, beat: WorkerBeat, now: datetime) -> None:
    values = {
        "host": beat.host,
        "pid": beat.pid,
        "version": beat.version,
        "started_at": beat.started_at,
        "last_beat_at": now,
        "gate": beat.gate,
        "gate_reason": beat.gate_reason,
        "failing_jobs": failures_json(beat.failing_jobs),
        "gate_until": beat.gate_until,
        "gate_since": beat.gate_since,
        "refused_methods": ",".join(beat.refused_methods) or None,
        "stopped_at": None,
    }
    done = conn.execute(
        workers.update().where(workers.c.worker_id == beat.worker_id).values(**values)
    )
    if done.rowcount == 0:
        conn.execute(workers.insert().values(worker_id=beat.worker_id, **values))


def worker_stopped(conn: Connection, worker_id: str, now: datetime) -> None:
    conn.execute(
        workers.update()
        .where(workers.c.worker_id == worker_id)
        .values(stopped_at=now, last_beat_at=now, gate="stopped")
    )


def purge_workers(conn: Connection, silent_since: datetime) -> int:
    """Delete workers whose last beat (or stop) is older than ``silent_since``: stopped
    long ago, or dead without a stop. Live workers beat every few seconds."""
    done = conn.execute(workers.delete().where(workers.c.last_beat_at < silent_since))
    return int(done.rowcount)
