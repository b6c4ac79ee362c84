"""The torture run's database: writes (plain SQL, the Python API, raw sqlite3), outages, reads.

Outages (``refusing``) are the database saying no while the daemons hold answers to record:

- PostgreSQL: ``ALTER DATABASE … ALLOW_CONNECTIONS false`` and ``pg_terminate_backend`` of
  every session on the database, from an admin session on the ``postgres`` database; undone
  with ``ALLOW_CONNECTIONS true`` (also by ``restore``, should the harness fail in between).
- MariaDB: every session on the test database except the harness's own is ``KILL``ed, again
  and again, while the outage lasts.
- SQLite: an exclusive lock on the file for as long as the outage lasts.

Part of the world (``world``): must not import the chaos, the writers nor the checks.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from random import Random
from typing import Any

import sqlalchemy as sa

import outbox
from outbox.clock import utcnow
from outbox.database import make_engine, normalise_url
from outbox.filters import RowFilter
from outbox.schema import tombstones
from outbox.store import Store
from tests.torture.vocabulary import OPEN, RowSpec, backend_of

ROW_COLUMNS = (
    "id, idempotency_key, method, state, park_reason, maybe_executed, attempts, "
    "unknown_attempts, lane, last_code, last_message, response"
)


def with_decimals(payload: dict[str, Any]) -> dict[str, Any]:
    """What an application passes to ``enqueue``: amounts as ``Decimal`` (stored as strings)."""
    decimals = ("amount", "quantity", "limitPrice")
    return {k: Decimal(v) if k in decimals else v for k, v in payload.items()}


def _lenient_text(raw: bytes) -> str:
    """SQLite text that is not UTF-8 (poison rows), readable by the harness all the same."""
    return raw.decode("utf-8", "surrogateescape")


def text_key(raw: Any) -> str:
    """A key (or other text) as the harness names it: text, or bytes decoded leniently."""
    return _lenient_text(bytes(raw)) if isinstance(raw, (bytes, bytearray, memoryview)) else raw


class Database:
    """The run's database: writes, connection cuts, outages, retention, reads."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.backend = backend_of(url)
        self.engine = make_engine(url)
        self.store = Store(self.engine)
        self._lock = threading.Lock()
        self._disturbing = 0  # cuts and outages under way
        self._calm_from = 0.0  # when the last one ended (monotonic)
        if self.backend == "sqlite":
            sa.event.listen(self.engine, "connect", _lenient_sqlite)

    def dispose(self) -> None:
        self.engine.dispose()

    @property
    def path(self) -> str:
        path = sa.engine.make_url(self.url).database
        assert path
        return path

    @property
    def name(self) -> str:
        name = sa.engine.make_url(self.url).database
        assert name
        return name

    def _stamp(self, at: datetime) -> str:
        """A timestamp as a plain-SQL writer spells it (README: zone on PostgreSQL only)."""
        text = at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
        return text + "+00" if self.backend == "postgresql" else text

    # ---- writes

    def insert(self, spec: RowSpec, timeout: float = 120.0) -> None:
        """Insert ``spec`` in its own transaction; a cut connection is retried (once in).

        A failure can hide a commit (the connection died after COMMIT reached the server), so
        after every failure the key is looked up before trying again. The same failure twice
        while the harness disturbs nothing is the database (or ``enqueue``) refusing the row:
        ``spec.refused`` says why, and the checks decide whether that was allowed.
        """
        end = time.monotonic() + timeout
        pause = threading.Event()
        last: str | None = None
        while True:
            began = time.monotonic()
            try:
                with self.engine.begin() as conn:
                    self.write(conn, spec)
                break
            except (sa.exc.DBAPIError, outbox.OutboxError) as exc:
                if self.exists(spec.key, end):
                    break
                why = _why(exc)
                if not self.calm_since(began):
                    why = None
                elif why == last or isinstance(exc, outbox.BadRowError):
                    spec.refused = why
                    return
                last = why
                if time.monotonic() > end:
                    raise
                pause.wait(0.2)
        spec.visible_at = utcnow()

    @contextlib.contextmanager
    def disturbed(self) -> Iterator[None]:
        """Around anything that cuts the harness's own sessions too (cuts, outages, restarts)."""
        with self._lock:
            self._disturbing += 1
        try:
            yield
        finally:
            with self._lock:
                self._disturbing -= 1
                self._calm_from = time.monotonic()

    def calm_since(self, began: float) -> bool:
        """Nothing disturbed the database between ``began`` and now."""
        with self._lock:
            return not self._disturbing and self._calm_from < began

    def write(self, conn: sa.Connection, spec: RowSpec) -> None:
        """The INSERT of ``spec`` on ``conn``, inside the caller's transaction."""
        if spec.via == "api":
            outbox.enqueue(
                conn,
                spec.method,
                with_decimals(spec.payload),
                key=spec.key,
                lane=spec.lane,
                not_before=spec.not_before,
                expires_at=spec.expires_at,
                reference=f"torture-{spec.index}",
            )
        else:
            self._insert_sql(conn, spec)

    def insert_raw(self, spec: RowSpec, values: tuple[Any, Any, Any], as_text: bool) -> str | None:
        """SQLite: INSERT (key, method, payload) with the sqlite3 module, bytes as given.

        ``as_text``: bytes values are stored as TEXT (``CAST(? AS TEXT)``, text that is not
        UTF-8), else as BLOBs. Returns None if accepted, else why not.
        """
        cast = "CAST(? AS TEXT)" if as_text else "?"
        marks = ", ".join(cast if isinstance(v, bytes) else "?" for v in values)
        conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        try:
            conn.execute(
                "INSERT INTO outbox_messages (idempotency_key, method, payload, reference) "
                f"VALUES ({marks}, ?)",
                (*values, f"torture-{spec.index}"),
            )
        except sqlite3.DatabaseError as exc:
            return f"{type(exc).__name__}: {exc}"
        finally:
            conn.close()
        spec.visible_at = utcnow()
        return None

    def _insert_sql(self, conn: sa.Connection, spec: RowSpec) -> None:
        payload = spec.payload if isinstance(spec.payload, str) else json.dumps(spec.payload)
        conn.execute(
            sa.text(
                "INSERT INTO outbox_messages (idempotency_key, method, payload, lane, "
                "not_before, expires_at, reference, traceparent) "
                "VALUES (:key, :method, :payload, :lane, :not_before, :expires_at, :ref, :tp)"
            ),
            {
                "key": spec.key,
                "method": spec.method,
                "payload": payload,
                "lane": spec.lane,
                "not_before": self._stamp(spec.not_before) if spec.not_before else None,
                "expires_at": self._stamp(spec.expires_at) if spec.expires_at else None,
                "ref": f"torture-{spec.index}",
                "tp": traceparent_for(spec.index),
            },
        )

    def set_method(self, key: str, method: str) -> int:
        """An application editing a row behind the outbox's back (plain SQL UPDATE)."""
        with self.engine.begin() as conn:
            done = conn.execute(
                sa.text("UPDATE outbox_messages SET method = :m WHERE idempotency_key = :k"),
                {"m": method, "k": key},
            )
        return int(done.rowcount)

    def cancel_by_hand(self, key: str) -> int:
        """A careless operator finishing a row with plain SQL: no settle, no history line."""
        with self.engine.begin() as conn:
            done = conn.execute(
                sa.text(
                    "UPDATE outbox_messages SET state = 'cancelled' WHERE idempotency_key = :k"
                ),
                {"k": key},
            )
        return int(done.rowcount)

    def waiting_behind_finished(self, lane: str) -> list[int]:
        """Ids of ``lane``'s rows marked waiting (``lane_behind``) with no open row before them:
        nothing would send them until a LaneKeeper ran (``outbox.store.heads``)."""
        query = sa.text(
            "SELECT w.id FROM outbox_messages w WHERE w.lane = :lane AND w.lane_behind = TRUE "
            "AND w.state = 'pending' AND NOT EXISTS (SELECT 1 FROM outbox_messages e "
            "WHERE e.lane = w.lane AND e.state IN :open AND e.id < w.id) ORDER BY w.id"
        ).bindparams(sa.bindparam("open", expanding=True))
        with self.engine.connect() as conn:
            return [
                int(i) for i in conn.execute(query, {"lane": lane, "open": sorted(OPEN)}).scalars()
            ]

    def exists(self, key: str, until: float) -> bool:
        pause = threading.Event()
        while True:
            try:
                with self.engine.connect() as conn:
                    found = conn.execute(
                        sa.text("SELECT 1 FROM outbox_messages WHERE idempotency_key = :k"),
                        {"k": key},
                    ).first()
                return found is not None
            except sa.exc.DBAPIError:
                if time.monotonic() > until:
                    raise
                pause.wait(0.2)

    # ---- reads

    def rows(self) -> dict[str, dict[str, Any]]:
        """Every row by key, with what the checks read."""
        with self.engine.connect() as conn:
            result = conn.execute(sa.text(f"SELECT {ROW_COLUMNS} FROM outbox_messages ORDER BY id"))
            rows = [dict(row._mapping) for row in result]
            forced = self._forced_cancels(conn)
        found = {}
        for row in rows:
            row["idempotency_key"] = key = text_key(row["idempotency_key"])
            row["forced"] = row["id"] in forced
            row["response"] = _json_value(row["response"])
            found[key] = row
        return found

    @staticmethod
    def _forced_cancels(conn: sa.Connection) -> set[int]:
        """Rows an operator cancelled with ``--force`` (the history's ``cancel_forced``)."""
        result = conn.execute(
            sa.text("SELECT message_id FROM outbox_attempts WHERE decision = 'cancel_forced'")
        )
        return {int(row[0]) for row in result}

    def rows_of(self, keys: Iterable[str]) -> dict[str, dict[str, Any]]:
        """Some rows by key (as ``rows``, without the response and the forced cancels)."""
        wanted = sorted(set(keys))
        if not wanted:
            return {}
        query = sa.text(
            f"SELECT {ROW_COLUMNS} FROM outbox_messages WHERE idempotency_key IN :keys"
        ).bindparams(sa.bindparam("keys", expanding=True))
        with self.engine.connect() as conn:
            result = conn.execute(query, {"keys": wanted})
            return {text_key(r._mapping["idempotency_key"]): dict(r._mapping) for r in result}

    def unshowable(self, rows: dict[str, dict[str, Any]]) -> dict[str, str]:
        """The rows ``outbox show`` cannot read: what ``Store.get`` and ``history`` raised. A key
        that is not even text (bytes a writer stored on SQLite) cannot be typed: such a row is
        reached through ``outbox list``, which must read every row (``"<list>"``)."""
        found: dict[str, str] = {}
        try:
            self.store.list_rows(RowFilter(), limit=100_000)
        except Exception as exc:
            found["<list>"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        for key in rows:
            if not _is_text(key):
                continue
            try:
                self.store.get(key)
                self.store.history(key)
            except Exception as exc:
                found[key] = f"{type(exc).__name__}: {str(exc)[:200]}"
        return found

    def history(self) -> dict[str, list[dict[str, Any]]]:
        """Every history line a Recrypt answer left (kind ``call``), and every lease expiry,
        by key, in order."""
        with self.engine.connect() as conn:
            result = conn.execute(
                sa.text(
                    "SELECT m.idempotency_key AS k, a.code, a.decision, a.message "
                    "FROM outbox_attempts a JOIN outbox_messages m ON m.id = a.message_id "
                    "WHERE a.kind = 'call' OR a.code = 'LEASE_EXPIRED' ORDER BY a.id"
                )
            )
            lines: dict[str, list[dict[str, Any]]] = {}
            for row in result:
                line = dict(row._mapping)
                lines.setdefault(text_key(line.pop("k")), []).append(line)
        return lines

    def workers(self, pids: Collection[int]) -> dict[int, tuple[str, set[str]]]:
        """Each running daemon (by process id): its gate and the methods it holds as refused,
        as its last heartbeat says (one is written at every gate change)."""
        with self.engine.connect() as conn:
            result = conn.execute(
                sa.text(
                    "SELECT pid, gate, refused_methods FROM outbox_workers WHERE stopped_at IS NULL"
                )
            )
            return {
                int(pid): (str(gate), set(str(refused).split(",")) if refused else set())
                for pid, gate, refused in result
                if pid in pids
            }

    def try_rows(self) -> dict[str, dict[str, Any]] | None:
        try:
            return self.rows()
        except sa.exc.DBAPIError:
            return None

    def cancelled_by_client(self) -> int:
        """History lines of calls our own client cancelled (a closed channel: a reload)."""
        with self.engine.connect() as conn:
            found = conn.execute(
                sa.text(
                    "SELECT COUNT(*) FROM outbox_attempts WHERE code = 'CANCELLED' "
                    "AND message LIKE '%Channel closed%'"
                )
            ).scalar_one()
        return int(found)

    def claimed(self, key: str) -> bool:
        """Whether a daemon has claimed the row with ``key`` at least once (the fingerprint is
        stored at the first claim; a finished row was claimed or finished by hand)."""
        with self.engine.connect() as conn:
            found = conn.execute(
                sa.text(
                    "SELECT COUNT(*) FROM outbox_messages WHERE idempotency_key = :key "
                    "AND (payload_fingerprint IS NOT NULL OR state <> 'pending')"
                ),
                {"key": key},
            ).scalar_one()
        return int(found) > 0

    def inflight_in_lane(self, lane: str) -> int:
        with self.engine.connect() as conn:
            found = conn.execute(
                sa.text(
                    "SELECT COUNT(*) FROM outbox_messages WHERE lane = :lane AND state = 'inflight'"
                ),
                {"lane": lane},
            ).scalar_one()
        return int(found)

    # ---- retention

    def purge_finished(self, batch: int = 500) -> list[dict[str, Any]]:
        """An operator's retention run over every finished row; returns the rows it deleted.

        The rows are read just before the purge: a row that finished in between is returned
        with ``state`` ``purged`` (deleted, its final state unseen).
        """
        before = {row["id"]: row for row in self.rows().values()}
        began = utcnow()
        older_than = began + timedelta(days=1)
        while self.store.purge_finished(older_than=older_than, batch=batch, now=began) >= batch:
            pass
        after = {row["id"] for row in self.rows().values()}
        gone = [before[i] for i in sorted(before) if i not in after]
        for row in gone:
            if row["state"] not in ("committed", "cancelled", "expired"):
                row["state"] = "purged"
        seen = {row["idempotency_key"] for row in before.values()}
        return gone + [_unseen(k) for k in self._buried_since(began) if k not in seen]

    def _buried_since(self, began: datetime) -> list[str]:
        """Keys purged (given a tombstone) since ``began``."""
        query = sa.select(tombstones.c.idempotency_key).where(tombstones.c.purged_at >= began)
        with self.engine.connect() as conn:
            return [text_key(key) for key in conn.execute(query).scalars()]

    # ---- cuts and outages

    def cut(self, rng: Random, hold: Callable[[float], None]) -> str:
        """Cut the daemons' connections (SQLite: hold the write lock a moment)."""
        with self.disturbed():
            return self._cut(rng, hold)

    def _cut(self, rng: Random, hold: Callable[[float], None]) -> str:
        if self.backend == "postgresql":
            with self.engine.connect() as conn:
                done = conn.execute(
                    sa.text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                    )
                ).all()
                conn.commit()
            return f"terminated {len(done)}"
        if self.backend == "mariadb":
            with self.engine.connect() as conn:
                return f"killed {_kill_sessions(conn)}"
        seconds = rng.uniform(0.3, 3.0)
        with self._sqlite_locked():
            hold(seconds)
        return f"locked {seconds:.1f}s"

    @contextlib.contextmanager
    def refusing(self) -> Iterator[dict[str, int]]:
        """An outage for as long as the block runs; yields counters (sessions ended)."""
        with self.disturbed():
            if self.backend == "postgresql":
                with self._pg_refusing() as counts:
                    yield counts
            elif self.backend == "mariadb":
                with self._mariadb_refusing() as counts:
                    yield counts
            else:
                with self._sqlite_locked():
                    yield {}

    def _admin(self, database: str | None = None) -> sa.Engine:
        url = normalise_url(self.url)
        if database is not None:
            url = url.set(database=database)
        return sa.create_engine(url, isolation_level="AUTOCOMMIT", poolclass=sa.NullPool)

    @contextlib.contextmanager
    def _pg_refusing(self) -> Iterator[dict[str, int]]:
        counts = {"terminated": 0}
        admin = self._admin("postgres")
        try:
            with admin.connect() as conn:
                conn.exec_driver_sql(f'ALTER DATABASE "{self.name}" ALLOW_CONNECTIONS false')
                try:
                    for _ in range(2):  # a session that was starting up gets the second one
                        counts["terminated"] += _pg_terminate(conn, self.name)
                        time.sleep(0.05)
                    yield counts
                finally:
                    self.restore(admin)
        finally:
            admin.dispose()

    def restore(self, admin: sa.Engine | None = None) -> None:
        """Let sessions in again (PostgreSQL); retried, as the server may be restarting."""
        if self.backend != "postgresql":
            return
        engine = admin or self._admin("postgres")
        end = time.monotonic() + 60
        while True:
            try:
                with engine.connect() as conn:
                    conn.exec_driver_sql(f'ALTER DATABASE "{self.name}" ALLOW_CONNECTIONS true')
                break
            except sa.exc.DBAPIError:
                if time.monotonic() > end:
                    raise
                time.sleep(0.5)
        if admin is None:
            engine.dispose()

    @contextlib.contextmanager
    def _mariadb_refusing(self) -> Iterator[dict[str, int]]:
        counts = {"killed": 0}
        done = threading.Event()
        admin = self._admin()

        def killer() -> None:
            with admin.connect() as conn:
                while not done.is_set():  # as fast as it goes: a reconnect gets milliseconds
                    counts["killed"] += _kill_sessions(conn)
                    done.wait(0.001)

        thread = threading.Thread(target=killer, name="torture-mariadb-outage", daemon=True)
        thread.start()
        try:
            yield counts
        finally:
            done.set()
            thread.join(timeout=30)
            admin.dispose()

    @contextlib.contextmanager
    def _sqlite_locked(self) -> Iterator[None]:
        locker = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        try:
            locker.execute("BEGIN EXCLUSIVE")
            try:
                yield
            finally:
                locker.execute("ROLLBACK")
        finally:
            locker.close()


def _unseen(key: str) -> dict[str, Any]:
    """A row retention purged before the harness read it (inserted and finished between the
    read and the purge): ``purged``, its final state unseen."""
    row: dict[str, Any] = dict.fromkeys(ROW_COLUMNS.split(", "))
    return row | {"idempotency_key": key, "state": "purged", "maybe_executed": False}


def _lenient_sqlite(dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.text_factory = _lenient_text


def _why(exc: Exception) -> str:
    """One line saying why a write failed."""
    orig = getattr(exc, "orig", None) or exc
    text = str(orig).strip().splitlines()[0] if str(orig).strip() else ""
    return f"{type(orig).__name__}: {text[:200]}"


def _json_value(raw: Any) -> Any:
    """A JSON column as a value: drivers hand back decoded JSON or its text."""
    if isinstance(raw, (bytes, bytearray)):
        raw = raw.decode("utf-8", "replace")
    if isinstance(raw, str):
        try:
            return json.loads(raw)
        except ValueError:
            return raw
    return raw


def _pg_terminate(conn: sa.Connection, name: str) -> int:
    done = conn.execute(
        sa.text(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = :db AND pid <> pg_backend_pid()"
        ),
        {"db": name},
    ).all()
    return len(done)


def _kill_sessions(conn: sa.Connection) -> int:
    """MariaDB: KILL every session on this database but ``conn``'s own; returns how many."""
    ids = conn.execute(
        sa.text(
            "SELECT id FROM information_schema.processlist "
            "WHERE db = DATABASE() AND id <> CONNECTION_ID()"
        )
    ).scalars()
    killed = 0
    for conn_id in list(ids):
        with contextlib.suppress(sa.exc.DBAPIError):  # it may have left already
            conn.exec_driver_sql(f"KILL {int(conn_id)}")
            killed += 1
    return killed


def _is_text(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


#: What plain-SQL writers put in the trace-context column: nothing, a W3C traceparent, or text
#: that is none (a daemon ignores it: it only joins a valid writer's trace).
NOT_TRACEPARENTS = ("00-zz", "\n00-" + "0" * 51, "é" * 40, "x" * 128, "00-" + "0" * 32 + "-" * 20)


def traceparent_for(index: int) -> str | None:
    """Row ``index``'s traceparent column, in turn none, a valid one, or one that is not."""
    turn = index % 3
    if turn == 0:
        return None
    if turn == 1:
        return f"00-{index:032x}-{index + 1:016x}-01"
    return NOT_TRACEPARENTS[index % len(NOT_TRACEPARENTS)]
