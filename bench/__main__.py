"""The benchmark: ``./dev bench`` (or ``python -m bench --help``).

One command measures, against the simulator on loopback with no faults:

1. the raw gRPC rate: a bare asyncio client (``bench/raw.py``, its own process) at the
   daemon's concurrency;
2. the daemon's drain rate: ``outbox run`` (its own process) draining a backlog;
3. resident memory of the daemon while it drains (sampled from /proc);
4. latency: single rows inserted into an idle outbox, until the simulator executed them;
5. the cost of a claim with 10,000 and with 2,000,000 finished rows in the table;
6. the cost of a claim with a backlog it cannot claim (``--only backlog``): 200,000 rows
   scheduled for tomorrow, or 200,000 rows behind one parked lane head (issue #11);
7. the latency trickle with both backlogs in one table (``--only trickle``), beside the same
   trickle on an empty table in the same run (issue #11);
8. the claim cost with both backlogs while another connection scans the whole table in a loop
   (``--only scan``), beside a claim on an otherwise empty table under the same scan (issue #11);
9. the floor (``--only floor``): CPU per call of gRPC's Python client alone (``bench/floor.py``)
   as sync futures, ``grpc.aio`` and blocking calls in threads: what no daemon can go below;
10. the cost of tracing (``--only drain --tracing``): the drain with tracing off and on (the SDK,
   its batch processor, OTLP/gRPC to a local sink), alternated in one run (``bench/tracing.py``).

The drain prints the daemon's CPU time (user + system, all threads, from /proc) per row sent.

The simulator runs in this process, in its own threads, for both (1) and (2), so the two
rates are measured against the same server in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import sqlalchemy as sa

from outbox import migrate
from outbox.database import make_engine, normalise_url
from outbox.schema import messages
from outbox.simulator import TRANSFER, Simulator
from outbox.store import Store

API_KEY = "bench-key"
PAYLOAD = {"fromAccount": "bench", "toAccount": "b", "amount": "1.00", "currency": "AUD"}


def main() -> None:
    args = parse_args()
    results: dict[str, object] = {"date": datetime.now(UTC).date().isoformat(), "url": args.url}
    with Simulator(api_keys=[API_KEY]) as sim:
        print(f"simulator on {sim.target}; database {shown(args.url)}", flush=True)
        if "raw" in args.only:
            results["raw"] = raw_rate(sim, args.rows, args.concurrency)
            report("raw gRPC rate", results["raw"])
        if "floor" in args.only:
            results["floor"] = floor(sim, args)
            report("gRPC client alone, CPU per call", results["floor"])
        if "drain" in args.only:
            results["drain"] = drain(sim, args)
            report("daemon drain", results["drain"])
        if "drain" in args.only and args.tracing:
            from bench.tracing import overhead  # noqa: PLC0415 (needs the otel extra)

            results["tracing"] = overhead(sim, args, drain)
            report("drain, tracing off vs on", results["tracing"])
        if "latency" in args.only:
            results["latency"] = latency(sim, args)
            report("latency", results["latency"])
    if "claim" in args.only:
        results["claim"] = claim_cost(args)
        report("claim cost", results["claim"])
    if "backlog" in args.only:
        results["backlog"] = backlog_claim_cost(args)
        report("claim cost behind a backlog", results["backlog"])
    if "trickle" in args.only:
        with Simulator(api_keys=[API_KEY]) as sim:
            results["trickle"] = trickle(sim, args)
        report("latency trickle, empty table vs both backlogs", results["trickle"])
    if "scan" in args.only:
        results["scan"] = scanned_claim_cost(args)
        report("claim cost under a full-table scan, empty table vs both backlogs", results["scan"])
    summarise(results, args)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--url",
        default="postgresql://postgres@127.0.0.1:5432/outbox_bench",
        help="database to (re)create; PostgreSQL, MariaDB or sqlite:///FILE",
    )
    parser.add_argument("--rows", type=int, default=20_000, help="backlog drained")
    parser.add_argument("--concurrency", type=int, default=64, help="calls in flight")
    parser.add_argument("--batch", type=int, default=64, help="[worker] batch_size")
    parser.add_argument("--daemons", type=int, default=1, help="daemons draining together")
    parser.add_argument("--latency-samples", type=int, default=200)
    parser.add_argument("--poll-interval", type=float, default=0.1)
    parser.add_argument(
        "--claim-sizes",
        default="10000,2000000",
        help="finished rows in the table for the claim-cost measurement",
    )
    parser.add_argument(
        "--backlog-rows", type=int, default=200_000, help="rows the backlog claim cannot claim"
    )
    parser.add_argument(
        "--only",
        default="raw,drain,latency,claim",
        help="comma-separated subset of raw,floor,drain,latency,claim,backlog,trickle,scan "
        "(floor: CPU per call of the gRPC client alone, by shape; the last three fill "
        "2 x --backlog-rows rows: not default)",
    )
    parser.add_argument(
        "--give-up",
        type=float,
        default=120.0,
        help="seconds after which the trickle and scan runs stop taking samples",
    )
    parser.add_argument(
        "--tracing",
        action="store_true",
        help="also drain with tracing off and on, alternated (bench/tracing.py)",
    )
    parser.add_argument("--tracing-rounds", type=int, default=2, help="drains of each, off/on")
    args = parser.parse_args()
    args.only = set(args.only.split(","))
    return args


# --------------------------------------------------------------------------- measurements


def raw_rate(sim: Simulator, calls: int, concurrency: int) -> dict[str, float]:
    argv = [
        sys.executable,
        "-m",
        "bench.raw",
        "--target",
        sim.target,
        "--api-key",
        API_KEY,
        "--calls",
        str(calls),
        "--concurrency",
        str(concurrency),
    ]
    done = subprocess.run(argv, capture_output=True, text=True, check=True)
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def floor(sim: Simulator, args: argparse.Namespace) -> dict[str, object]:
    """CPU µs per call of gRPC's client alone (``bench/floor.py``), each shape in its own
    process, in batches of ``--batch``, three rounds interleaved: the least of each, and all."""
    runs: dict[str, list[float]] = {}
    for _ in range(3):
        for shape in ("futures", "futures-last-first", "aio", "threads"):
            argv = [sys.executable, "-m", "bench.floor", "--target", sim.target]
            argv += ["--api-key", API_KEY, "--batch", str(args.batch), "--shapes", shape]
            done = subprocess.run(argv, capture_output=True, text=True, check=True)
            result = json.loads(done.stdout.strip().splitlines()[-1])[shape]
            runs.setdefault(shape, []).append(result["cpu_us_per_call"])
    return {shape: {"least": min(cpu), "runs": cpu} for shape, cpu in runs.items()}


def drain(
    sim: Simulator, args: argparse.Namespace, env: dict[str, str] | None = None
) -> dict[str, object]:
    """``--rows`` drained by ``outbox run`` (``env``: more of its environment, e.g. OTEL_*)."""
    engine = fresh_database(args.url)
    keys = insert_backlog(engine, args.rows)
    before = len(sim.ledger)
    with daemon(args, sim, args.daemons, env) as procs:
        sim.wait_for(lambda s: len(s.ledger) > before, timeout=60)
        started, cpu_before, sent_before = time.perf_counter(), cpu_seconds(procs), len(sim.ledger)
        samples = sample_rss(procs[0].pid, lambda: len(sim.ledger) - before >= args.rows, sim)
        elapsed = time.perf_counter() - started
        cpu, sent = cpu_seconds(procs) - cpu_before, len(sim.ledger) - sent_before
    committed = Store(engine).status(datetime.now(UTC)).counts["committed"]
    engine.dispose()
    once = all(sim.executions(k) == 1 for k in random.sample(keys, min(1000, len(keys))))
    return {
        "rows": args.rows,
        "daemons": args.daemons,
        "seconds": round(elapsed, 2),
        "rate": round(args.rows / elapsed, 1),
        "cpu_us_per_row": round(cpu / max(sent, 1) * 1e6, 1),
        "committed": committed,
        "executed_once_sampled": once,
        "rss_mb_peak": max(samples) if samples else None,
        "rss_mb_quartiles": quartiles(samples),
    }


def latency(
    sim: Simulator, args: argparse.Namespace, engine: sa.Engine | None = None
) -> dict[str, object]:
    """Insert → executed for single rows inserted one at a time into ``engine``'s outbox
    (a fresh, empty one by default), for ``--latency-samples`` rows or ``--give-up`` seconds.
    A row not executed within 30 s counts as 30 s."""
    engine = engine or fresh_database(args.url)
    seconds: list[float] = []
    pause = threading.Event()
    with daemon(args, sim):
        sim.wait_for(lambda s: s.call_count() >= 1, timeout=30)  # started: MaintenanceCheck
        pause.wait(1.0)
        give_up = time.monotonic() + args.give_up
        while len(seconds) < args.latency_samples and time.monotonic() < give_up:
            key = str(uuid.uuid4())
            with engine.begin() as conn:
                conn.execute(
                    sa.insert(messages).values(
                        idempotency_key=key, method=TRANSFER, payload=PAYLOAD
                    )
                )
            inserted = time.perf_counter()
            sim.wait_for(lambda s, k=key: s.executions(k) == 1, timeout=30)
            seconds.append(time.perf_counter() - inserted)
            pause.wait(random.uniform(0.01, 0.05))
    engine.dispose()
    ms = sorted(s * 1000 for s in seconds)
    return {
        "samples": len(ms),
        "p50_ms": round(percentile(ms, 50), 1),
        "p90_ms": round(percentile(ms, 90), 1),
        "p99_ms": round(percentile(ms, 99), 1),
        "max_ms": round(ms[-1], 1),
        "poll_interval_ms": args.poll_interval * 1000,
    }


def trickle(sim: Simulator, args: argparse.Namespace) -> dict[str, object]:
    """The latency trickle on an empty table, then on one holding both backlogs."""
    empty = latency(sim, args)
    engine = fresh_database(args.url)
    sorting = fill_backlogs(engine, args.backlog_rows)
    behind = latency(sim, args, engine)
    return {
        "empty": empty,
        "backlogs": behind,
        "backlog_rows": 2 * args.backlog_rows,
        "sort_s": sorting,
        "p50_ratio": round(float(behind["p50_ms"]) / float(empty["p50_ms"]), 2),  # type: ignore[arg-type]
    }


def fill_backlogs(engine: sa.Engine, n: int) -> float:
    """``n`` rows scheduled for tomorrow and ``n`` rows behind one parked lane head, sorted
    as a running daemon's claims sort them; returns the seconds the sorting took."""
    fill_backlog(engine, "scheduled", n)
    fill_backlog(engine, "blocked", n)
    return sort_lanes(engine)


def sort_lanes(engine: sa.Engine) -> float:
    """Sort new lane rows as a running daemon's claims do (a bounded batch each), then let
    PostgreSQL's autovacuum catch up as it would; the seconds the sorting took."""
    store, started = Store(engine), time.perf_counter()
    while store.sort_lanes():
        pass
    sorting = round(time.perf_counter() - started, 2)
    if engine.dialect.name == "postgresql":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("VACUUM ANALYZE outbox_messages")
    return sorting


def claim_cost(args: argparse.Namespace) -> dict[str, object]:
    out: dict[str, object] = {}
    for size in (int(s) for s in args.claim_sizes.split(",")):
        engine = fresh_database(args.url)
        fill_finished(engine, size)
        insert_backlog(engine, 2000)
        with engine.begin() as conn:
            if engine.dialect.name == "postgresql":
                conn.exec_driver_sql("ANALYZE outbox_messages")
        store, timings = Store(engine), []
        for _ in range(30):
            now = datetime.now(UTC)
            started = time.perf_counter()
            claims = store.claim_due("bench", args.batch, 60.0, now)
            timings.append((time.perf_counter() - started) * 1000)
            store.hand_back("bench", [c.id for c in claims], now)
        out[f"{size}_finished_ms_median"] = round(statistics.median(timings), 2)
        engine.dispose()
    sizes = [int(s) for s in args.claim_sizes.split(",")]
    small, large = (out[f"{s}_finished_ms_median"] for s in (sizes[0], sizes[-1]))
    out["ratio"] = round(float(large) / float(small), 2)  # type: ignore[arg-type]
    return out


def backlog_claim_cost(args: argparse.Namespace) -> dict[str, object]:
    """Median ms of a claim of ``--batch`` due rows behind a backlog it cannot claim."""
    out: dict[str, object] = {}
    for kind in ("scheduled", "blocked"):
        engine = fresh_database(args.url)
        fill_backlog(engine, kind, args.backlog_rows)
        insert_backlog(engine, 2000)
        out[f"{kind}_sort_s"] = sort_lanes(engine)
        timings = timed_claims(args.url, args, 20)
        out[f"{kind}_ms_median"] = round(statistics.median(timings), 2)
        out[f"{kind}_ms_max"] = round(max(timings), 2)
        engine.dispose()
    return out


def scanned_claim_cost(args: argparse.Namespace) -> dict[str, object]:
    """Median ms of a claim of ``--batch`` rows while another connection scans the whole
    table in a loop: on an otherwise empty table, then with both backlogs present."""
    out: dict[str, object] = {}
    for case in ("empty", "backlogs"):
        engine = fresh_database(args.url)
        if case == "backlogs":
            out["sort_s"] = fill_backlogs(engine, args.backlog_rows)
        insert_backlog(engine, 2000)
        with full_scans(engine) as scans:
            timings = timed_claims(args.url, args, 20)
        out[f"{case}_ms_median"] = round(statistics.median(timings), 2)
        out[f"{case}_ms_max"] = round(max(timings), 2)
        out[f"{case}_claims"] = len(timings)
        out[f"{case}_scans"] = scans[0]
        engine.dispose()
    ratio = float(out["backlogs_ms_median"]) / float(out["empty_ms_median"])  # type: ignore[arg-type]
    out["ratio"] = round(ratio, 2)
    return out


def timed_claims(url: str, args: argparse.Namespace, count: int) -> list[float]:
    """Milliseconds of up to ``count`` claims (each handed back), within ``--give-up`` s;
    a claim the database stops at ``--give-up`` s counts as that, and ends the run."""
    engine = bounded_engine(url, args.give_up)
    store, timings = Store(engine), []
    give_up = time.monotonic() + args.give_up
    while len(timings) < count and time.monotonic() < give_up:
        now = datetime.now(UTC)
        started = time.perf_counter()
        try:
            claims = store.claim_due("bench", args.batch, 60.0, now)
        except sa.exc.DBAPIError:  # the statement timeout: a claim that never ended
            timings.append(args.give_up * 1000)
            break
        timings.append((time.perf_counter() - started) * 1000)
        store.hand_back("bench", [c.id for c in claims], now)
    engine.dispose()
    return timings


def bounded_engine(url: str, seconds: float) -> sa.Engine:
    """An engine whose statements the database stops after ``seconds``."""
    backend = normalise_url(url).get_backend_name()
    if backend == "postgresql":
        options = f"-c statement_timeout={int(seconds * 1000)}"
        return make_engine(url, connect_args={"options": options})
    engine = make_engine(url)
    if backend in ("mysql", "mariadb"):

        def limit(dbapi_connection: object, _record: object) -> None:
            with dbapi_connection.cursor() as cursor:  # type: ignore[attr-defined]
                cursor.execute(f"SET SESSION max_statement_time = {seconds}")

        sa.event.listen(engine, "connect", limit)
    return engine


#: A query that reads every row of the table (an operator's report), per database.
FULL_SCAN = {
    "postgresql": "SELECT count(*) FROM outbox_messages WHERE payload::text LIKE :pattern",
    "mysql": "SELECT count(*) FROM outbox_messages IGNORE INDEX (PRIMARY) "
    "WHERE CAST(payload AS CHAR) LIKE :pattern",
    "sqlite": "SELECT count(*) FROM outbox_messages WHERE CAST(payload AS TEXT) LIKE :pattern",
}


@contextmanager
def full_scans(engine: sa.Engine) -> Iterator[list[int]]:
    """Full-table scans in a loop on a connection of their own, until the block ends;
    yields a one-item list holding how many scans completed."""
    done, stop = [0], threading.Event()
    statement = sa.text(
        FULL_SCAN[engine.dialect.name if engine.dialect.name != "mariadb" else "mysql"]
    )

    def scan() -> None:
        with engine.connect() as conn:
            while not stop.is_set():
                conn.execute(statement, {"pattern": "%x%"}).scalar()
                conn.rollback()
                done[0] += 1

    worker = threading.Thread(target=scan, name="full-scan", daemon=True)
    worker.start()
    try:
        yield done
    finally:
        stop.set()
        worker.join(timeout=600)


def fill_backlog(engine: sa.Engine, kind: str, n: int) -> None:
    """``n`` rows scheduled for tomorrow, or a parked lane head and ``n`` rows behind it."""
    name = engine.dialect.name
    key = {"postgresql": "gen_random_uuid()::text", "sqlite": "lower(hex(randomblob(16)))"}
    rows = {
        "postgresql": f"FROM generate_series(1, {n})",
        "sqlite": f"FROM (WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s "
        f"WHERE i < {n}) SELECT i FROM s)",
    }
    tomorrow = {
        "postgresql": "now() + interval '1 day'",
        "sqlite": "strftime('%Y-%m-%d %H:%M:%f000', 'now', '+1 day')",
    }
    uuid_sql, from_sql = key.get(name, "uuid()"), rows.get(name, f"FROM seq_1_to_{n}")
    statements = [
        "INSERT INTO outbox_messages (idempotency_key, method, payload, not_before) "
        f"SELECT {uuid_sql}, '{TRANSFER}', '{{}}', "
        f"{tomorrow.get(name, 'UTC_TIMESTAMP(6) + INTERVAL 1 DAY')} {from_sql}"
    ]
    if kind == "blocked":
        statements = [
            "INSERT INTO outbox_messages (idempotency_key, method, payload, lane, state, "
            f"park_reason) VALUES ({uuid_sql}, '{TRANSFER}', '{{}}', 'stuck', 'parked', 'x')",
            "INSERT INTO outbox_messages (idempotency_key, method, payload, lane) "
            f"SELECT {uuid_sql}, '{TRANSFER}', '{{}}', 'stuck' {from_sql}",
        ]
    with engine.begin() as conn:
        for statement in statements:
            conn.exec_driver_sql(statement)
        if name == "postgresql":
            conn.exec_driver_sql("ANALYZE outbox_messages")


# --------------------------------------------------------------------------- helpers


@contextmanager
def daemon(
    args: argparse.Namespace, sim: Simulator, count: int = 1, more: dict[str, str] | None = None
) -> Iterator[list[subprocess.Popen[bytes]]]:
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "bench.toml"
        config.write_text(
            f'[database]\nurl = "{args.url}"\n'
            f'[recrypt]\ntarget = "{sim.target}"\ntls = false\ndeadline = 30.0\n'
            f"[worker]\nbatch_size = {args.batch}\nmax_in_flight = {args.concurrency}\n"
            f"poll_interval = {args.poll_interval}\nlease = 120.0\n"
            f'[metrics]\nlisten = ""\n[maintenance]\nrollover_window = ""\n'
            f'[logging]\nlevel = "WARNING"\n'
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
        env |= {"RECRYPT_API_KEY": API_KEY, **(more or {})}
        env.pop("OUTBOX_DATABASE_URL", None)
        argv = [sys.executable, "-m", "outbox.cli", "--config", str(config), "run"]
        procs = [subprocess.Popen(argv, env=env) for _ in range(count)]
        try:
            yield procs
        finally:
            for proc in procs:
                proc.send_signal(signal.SIGTERM)
            for proc in procs:
                proc.wait(timeout=60)


def sample_rss(pid: int, done: object, sim: Simulator) -> list[float]:
    samples: list[float] = []
    while not sim.wait_for(lambda _s: done(), timeout=0.5):  # type: ignore[operator]
        samples.append(rss_mb(pid))
    samples.append(rss_mb(pid))
    return samples


def cpu_seconds(procs: list[subprocess.Popen[bytes]]) -> float:
    """CPU time (user + system, all threads) the daemons used so far, from /proc/<pid>/stat."""
    ticks = 0
    for proc in procs:
        fields = Path(f"/proc/{proc.pid}/stat").read_text().rpartition(")")[2].split()
        ticks += int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15 of stat(5)
    return ticks / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def fresh_database(url: str) -> sa.Engine:
    parsed = normalise_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        Path(parsed.database or "bench.db").unlink(missing_ok=True)
    else:
        admin_db = "postgres" if backend == "postgresql" else "mysql"
        admin = sa.create_engine(parsed.set(database=admin_db), isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            force = " WITH (FORCE)" if backend == "postgresql" else ""
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {parsed.database}{force}")
            conn.exec_driver_sql(f"CREATE DATABASE {parsed.database}")
        admin.dispose()
    engine = make_engine(parsed)
    migrate.upgrade(engine)
    return engine


def insert_backlog(engine: sa.Engine, n: int) -> list[str]:
    keys = [str(uuid.uuid4()) for _ in range(n)]
    for start in range(0, n, 5000):
        with engine.begin() as conn:
            conn.execute(
                sa.insert(messages),
                [
                    {"idempotency_key": k, "method": TRANSFER, "payload": PAYLOAD}
                    for k in keys[start : start + 5000]
                ],
            )
    return keys


def fill_finished(engine: sa.Engine, n: int) -> None:
    """``n`` committed rows, generated inside the database where it can."""
    if engine.dialect.name == "postgresql":
        with engine.begin() as conn:
            conn.exec_driver_sql(
                "INSERT INTO outbox_messages (idempotency_key, method, payload, state, attempts, "
                "committed_at, updated_at) SELECT gen_random_uuid()::text, "
                f"'{TRANSFER}', '{{}}'::jsonb, 'committed', 1, now(), now() "
                f"FROM generate_series(1, {n})"
            )
        return
    for start in range(0, n, 10_000):
        with engine.begin() as conn:
            conn.execute(
                sa.insert(messages),
                [
                    {
                        "idempotency_key": str(uuid.uuid4()),
                        "method": TRANSFER,
                        "payload": {},
                        "state": "committed",
                        "attempts": 1,
                    }
                    for _ in range(min(10_000, n - start))
                ],
            )


def percentile(sorted_values: list[float], pct: float) -> float:
    index = min(len(sorted_values) - 1, max(0, round(pct / 100 * len(sorted_values)) - 1))
    return sorted_values[index]


def quartiles(samples: list[float]) -> list[float]:
    if not samples:
        return []
    return [
        samples[min(len(samples) - 1, int(q * (len(samples) - 1)))] for q in (0.25, 0.5, 0.75, 1.0)
    ]


def shown(url: str) -> str:
    return normalise_url(url).render_as_string(hide_password=True)


def report(title: str, value: object) -> None:
    print(f"{title}: {json.dumps(value)}", flush=True)


def summarise(results: dict[str, object], args: argparse.Namespace) -> None:
    raw, drained = results.get("raw"), results.get("drain")
    if isinstance(raw, dict) and isinstance(drained, dict):
        ratio = float(drained["rate"]) / float(raw["rate"])
        print(f"drain/raw ratio: {ratio:.2f} (target >= 0.80)")
    if isinstance(drained, dict):
        print(f"daemon: {drained['rate']} rows/s, {drained['cpu_us_per_row']} µs CPU per row")
    argv = " ".join(sys.argv[1:])
    print(f"reproduce: ./dev bench {argv}".rstrip())
    print(json.dumps(results))


if __name__ == "__main__":
    main()
