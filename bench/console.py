"""The console on a large table: ``python -m bench.console --url … [--rows 2000000]``.

Issue 14's target: the Rows page and the Overview answer in under 200 ms on 2,000,000 rows.

1. (Re)creates and migrates the database, then fills it with set-based SQL (PostgreSQL
   ``generate_series``, MariaDB's SEQUENCE engine ``seq_1_to_N``): ~96 % committed, pending
   rows (due, scheduled for tomorrow, in lanes), parked rows with every park reason (a few
   holding a lane), cancelled, expired, ``maybe_executed``; created over the last ``--hours``
   (a week by default, id order), each row's history (1 to 3 lines, ~1.3 on average) at its
   creation, so the Overview's chart (last 3 h) has the newest rows' lines. Then ANALYZE.
   ``--keep`` reuses a database already filled with as many rows (migrating it to head).
2. Serves the console in this process (uvicorn on 127.0.0.1, a free port), logs in, and
   times each page warm: ``--requests`` requests after two unmeasured ones; p50/p95/max in ms.

It takes ``fresh_database`` from ``bench/__main__.py`` and the console's server in a thread
from ``tests/console/harness.py``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import sqlalchemy as sa

from bench.__main__ import fresh_database
from outbox import migrate
from outbox.console.app import make_app
from outbox.console.settings import ConsoleSettings
from outbox.console.users import Role, User, hash_password, write_users
from outbox.database import make_engine, normalise_url
from outbox.store import Store
from outbox.vocabulary import ParkReason
from tests.console.harness import serving_app

TRANSFER = "/recrypt.wallet.v1.Wallet/Transfer"
PLACE_ORDER = "/recrypt.market.v1.Market/PlaceOrder"
CANCEL_ORDER = "/recrypt.market.v1.Market/CancelOrder"
PAYLOAD = '{"amount": "125.00", "currency": "AUD", "fromAccount": "acme-ops", "toAccount": "s-7"}'
PASSWORD = "bench password, not a secret"
SECRET = "bench-session-secret-that-is-long-enough"
TARGET_MS = 200.0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.console", description=__doc__)
    parser.add_argument(
        "--url",
        default="postgresql://postgres@127.0.0.1:5432/outbox_bench_console",
        help="database to (re)create: PostgreSQL or MariaDB",
    )
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--hours", type=float, default=168.0, help="rows created over this span")
    parser.add_argument("--requests", type=int, default=20, help="timed requests per page")
    parser.add_argument("--keep", action="store_true", help="reuse a filled database")
    parser.add_argument("--only", default="", help="comma-separated page names to time")
    return parser.parse_args()


# --------------------------------------------------------------------------- the table


def _sql(dialect: str) -> dict[str, str]:
    """The dialect's pieces of the fill: numbers 1..N as ``i``, a key, times."""
    if dialect == "postgresql":
        return {
            "numbers": "generate_series(1, {n}) AS s(i)",
            "key": "gen_random_uuid()::text",
            "created": "now() - (({n} - i) * {seconds}::float8 / {n}) * interval '1 second'",
            "tomorrow": "now() + interval '1 day'",
            "plus": "{t} + interval '{s} second'",
            "lane": "'acct-' || MOD(i / 200, 37)",
            "text": "'{p}' || i",
        }
    return {
        "numbers": "(SELECT seq AS i FROM seq_1_to_{n}) AS s",
        "key": "uuid()",
        "created": "UTC_TIMESTAMP(6) - INTERVAL (({n} - i) * {micros} DIV {n}) MICROSECOND",
        "tomorrow": "UTC_TIMESTAMP(6) + INTERVAL 1 DAY",
        "plus": "{t} + INTERVAL {s} SECOND",
        "lane": "CONCAT('acct-', MOD(i DIV 200, 37))",
        "text": "CONCAT('{p}', i)",
    }


def _mix(sql: dict[str, str]) -> dict[str, str]:
    """Each column of a generated row, from ``r = i % 200`` (0.5 % steps)."""
    reasons = [r.value for r in ParkReason]
    by_reason = " ".join(f"WHEN {n} THEN '{v}'" for n, v in enumerate(reasons))
    div = "/" if "||" in sql["lane"] else "DIV"
    return {
        "state": "CASE WHEN r < 190 OR r > 197 THEN 'committed' WHEN r <= 192 THEN 'pending' "
        "WHEN r IN (193, 194, 197) THEN 'parked' WHEN r = 195 THEN 'cancelled' "
        "ELSE 'expired' END",
        "park_reason": "CASE WHEN r = 193 THEN 'precondition' WHEN r = 197 THEN "
        f"'unknown_outcome' WHEN r = 194 THEN CASE MOD(i {div} 200, {len(reasons)}) {by_reason} "
        "END END",
        "maybe_executed": f"(r = 197 OR (r = 195 AND MOD(i {div} 200, 5) = 0))",
        "method": f"CASE WHEN MOD(i, 10) < 6 THEN '{TRANSFER}' WHEN MOD(i, 10) < 9 THEN "
        f"'{PLACE_ORDER}' ELSE '{CANCEL_ORDER}' END",
        "lane": f"CASE WHEN r = 192 OR (r = 193 AND MOD(i {div} 200, 500) = 0) THEN "
        f"{sql['lane']} END",
        "reference": f"CASE WHEN MOD(i, 10) < 6 THEN {sql['text'].format(p='inv-')} ELSE "
        f"{sql['text'].format(p='ord-')} END",
        "not_before": f"CASE WHEN r = 191 THEN {sql['tomorrow']} END",
        "attempts": "CASE WHEN r IN (190, 191, 192) THEN 0 WHEN r IN (193, 194, 197) THEN 3 "
        "ELSE 1 END",
        "last_code": "CASE WHEN r < 190 OR r > 197 THEN 'OK' WHEN r = 193 THEN "
        "'FAILED_PRECONDITION' WHEN r = 197 THEN 'UNKNOWN' WHEN r = 194 THEN "
        "'INVALID_ARGUMENT' END",
    }


def fill_messages(engine: sa.Engine, n: int, hours: float) -> None:
    sql = _sql(engine.dialect.name)
    seconds = int(hours * 3600)
    created = sql["created"].format(n=n, seconds=seconds, micros=seconds * 1_000_000)
    mix = _mix(sql)
    later = sql["plus"].format(t="created_at", s=2)
    statement = (
        "INSERT INTO outbox_messages (idempotency_key, payload, created_at, "
        f"{', '.join(mix)}) SELECT {sql['key']}, '{PAYLOAD}', created_at, "
        f"{', '.join(mix.values())} "
        f"FROM (SELECT i, MOD(i, 200) AS r, {created} AS created_at FROM "
        f"{sql['numbers'].format(n=n)}) AS g"
    )
    with engine.begin() as conn:
        conn.exec_driver_sql(statement)
        conn.exec_driver_sql(
            f"UPDATE outbox_messages SET updated_at = {later}, committed_at = CASE WHEN "
            f"state = 'committed' THEN {later} END WHERE state <> 'pending'"
        )


def fill_history(engine: sa.Engine) -> None:
    """One line for each row that was tried (its decision), a retry before it on every
    7th row and every parked row, a second one on every 13th row."""
    sql = _sql(engine.dialect.name)
    decision = (
        "CASE state WHEN 'committed' THEN 'commit' WHEN 'parked' THEN 'park' WHEN 'cancelled' "
        "THEN 'cancel' WHEN 'expired' THEN 'expired' ELSE 'retry' END"
    )
    kind = (
        "CASE state WHEN 'cancelled' THEN 'operator' WHEN 'expired' THEN 'system' ELSE 'call' END"
    )
    retry = ("'call'", "'UNAVAILABLE'", "'retry'")
    lines = [
        (sql["plus"].format(t="created_at", s=2), kind, "last_code", decision, "attempts > 0"),
        (sql["plus"].format(t="created_at", s=1), *retry, "MOD(id, 7) = 0 OR state = 'parked'"),
        (sql["plus"].format(t="created_at", s=0), *retry, "MOD(id, 13) = 0"),
    ]
    with engine.begin() as conn:
        for at, kinds, code, decided, where in lines:
            conn.exec_driver_sql(
                "INSERT INTO outbox_attempts (message_id, at, kind, actor, code, decision, "
                f"duration_ms) SELECT id, {at}, {kinds}, 'bench:1:worker', {code}, {decided}, "
                f"9.0 FROM outbox_messages WHERE {where} ORDER BY id"
            )


def analyze(engine: sa.Engine) -> None:
    """Fresh statistics (and, on PostgreSQL, a visibility map for index-only scans)."""
    if engine.dialect.name == "postgresql":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("VACUUM ANALYZE outbox_messages")
            conn.exec_driver_sql("VACUUM ANALYZE outbox_attempts")
        return
    with engine.connect() as conn:
        conn.exec_driver_sql("ANALYZE TABLE outbox_messages, outbox_attempts").all()


def prepared(args: argparse.Namespace) -> sa.Engine:
    """The database, migrated to head and filled with ``--rows`` rows."""
    if args.keep:
        engine = make_engine(normalise_url(args.url))
        migrate.upgrade(engine)
        with engine.connect() as conn:
            have = conn.exec_driver_sql("SELECT count(*) FROM outbox_messages").scalar_one()
        if have == args.rows:
            analyze(engine)
            return engine
        engine.dispose()
    engine = fresh_database(args.url)
    began = time.perf_counter()
    fill_messages(engine, args.rows, args.hours)
    fill_history(engine)
    print(f"  filled in {time.perf_counter() - began:.0f} s", flush=True)
    analyze(engine)
    return engine


# --------------------------------------------------------------------------- the console


@contextmanager
def serving(store: Store, tmp: Path) -> Iterator[str]:
    """The console's base URL, served by uvicorn on a free loopback port until exit."""
    users = tmp / "users.json"
    write_users(users, {"bench": User("bench", Role.VIEWER, hash_password(PASSWORD))})
    settings = ConsoleSettings(users, tmp / "secret", "127.0.0.1", 0, "", False, ())
    with serving_app(make_app(store, settings, SECRET)) as url:
        yield url


def logged_in(base_url: str) -> httpx.Client:
    client = httpx.Client(base_url=base_url, follow_redirects=False, timeout=120)
    page = client.get("/login").text
    marker = 'name="csrf" value="'
    start = page.index(marker) + len(marker)
    token = page[start : page.index('"', start)]
    answer = client.post("/login", data={"name": "bench", "password": PASSWORD, "csrf": token})
    if answer.status_code != 303:
        raise RuntimeError(f"login failed: {answer.status_code}")
    return client


def samples(engine: sa.Engine) -> dict[str, str]:
    """Values the pages are asked for: a deep keyset cursor, a key prefix, a parked key, a
    one-hour window a day ago."""
    with engine.connect() as conn:
        top = conn.exec_driver_sql("SELECT max(id) FROM outbox_messages").scalar_one()
        key = conn.exec_driver_sql(
            "SELECT idempotency_key FROM outbox_messages WHERE id = "
            f"(SELECT min(id) FROM outbox_messages WHERE id >= {top // 3} AND state = 'parked')"
        ).scalar_one()
        day_ago = conn.exec_driver_sql(
            f"SELECT created_at FROM outbox_messages WHERE id = {top - top // 7}"
        ).scalar_one()
    since = day_ago.strftime("%Y-%m-%dT%H:%M")
    until = day_ago.replace(hour=(day_ago.hour + 1) % 24).strftime("%Y-%m-%dT%H:%M")
    return {"deep": str(top // 2), "key": key, "prefix": key[:4], "since": since, "until": until}


def pages(s: dict[str, str]) -> list[tuple[str, str, dict[str, str]]]:
    """(name, path, query) of each page timed."""
    return [
        ("overview", "/", {}),
        ("overview (htmx refresh)", "/", {"hx": "1"}),
        ("rows", "/rows", {}),
        ("rows, deep page (keyset)", "/rows", {"after": s["deep"]}),
        ("rows, oldest first", "/rows", {"order": "oldest"}),
        ("rows state=parked", "/rows", {"state": "parked"}),
        ("rows parked + precondition", "/rows", {"state": "parked", "park_reason": "precondition"}),
        ("rows parked + key_reused", "/rows", {"state": "parked", "park_reason": "key_reused"}),
        ("rows state=pending", "/rows", {"state": "pending"}),
        ("rows method=Market/CancelOrder", "/rows", {"method": "Market/CancelOrder"}),
        ("rows reference=inv-1234…", "/rows", {"reference": "inv-1234"}),
        ("rows key prefix", "/rows", {"key_prefix": s["prefix"]}),
        ("rows one hour a day ago", "/rows", {"since": s["since"], "until": s["until"]}),
        ("rows maybe_executed", "/rows", {"maybe_executed": "yes"}),
        ("rows lane=acct-5", "/rows", {"lane": "acct-5"}),
        ("row (one parked row)", "/row", {"key": s["key"]}),
        ("lanes", "/lanes", {}),
    ]


def timed(client: httpx.Client, path: str, query: dict[str, str], count: int) -> list[float]:
    headers = {"HX-Request": "true"} if query.pop("hx", None) else {}
    took = []
    for n in range(count + 2):
        began = time.perf_counter()
        answer = client.get(path, params=query, headers=headers)
        if answer.status_code != 200:
            raise RuntimeError(f"{path} {query}: {answer.status_code} {answer.text[:200]}")
        if n >= 2:  # the first two warm the caches and the templates
            took.append((time.perf_counter() - began) * 1000)
    return sorted(took)


def summary(took: list[float]) -> tuple[float, float, float]:
    p95 = took[min(len(took) - 1, round(0.95 * len(took)) - 1)]
    return statistics.median(took), p95, took[-1]


def main() -> None:
    args = parse_args()
    print(f"database {normalise_url(args.url).render_as_string(hide_password=True)}", flush=True)
    engine = prepared(args)
    wanted = set(filter(None, args.only.split(",")))
    print(f"{'page':34} {'p50 ms':>8} {'p95 ms':>8} {'max ms':>8}")
    with tempfile.TemporaryDirectory() as tmp, serving(Store(engine), Path(tmp)) as url:
        client = logged_in(url)
        for name, path, query in pages(samples(engine)):
            if wanted and name.split(" ")[0] not in wanted:
                continue
            p50, p95, top = summary(timed(client, path, query, args.requests))
            mark = "" if p95 < TARGET_MS else "  over 200 ms"
            print(f"{name:34} {p50:8.1f} {p95:8.1f} {top:8.1f}{mark}", flush=True)
    print(f"reproduce: python -m bench.console {' '.join(sys.argv[1:])}".rstrip())


if __name__ == "__main__":
    main()
