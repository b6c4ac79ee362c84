"""The long torture run: ``python -m tests.torture --minutes 10 --db postgresql --seed N``.

Creates its own database (``outbox_torture_<seed>`` on the server, or a file in a temporary
directory for SQLite), migrates it, runs ``harness.run_torture``, prints the figures line and
exits 1 on any violation. The database and logs are kept after a failure.

``--without poison`` (any chaos action names, comma-separated) leaves actions out: a poison
row that stops every claim hides what else is broken, so a run without it shows the rest.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
from pathlib import Path

import sqlalchemy as sa

from outbox import migrate
from outbox.database import make_engine, normalise_url
from tests.torture.harness import run_torture
from tests.torture.vocabulary import backend_of

SERVERS = {
    "postgresql": "postgresql://postgres@127.0.0.1:5432/postgres",
    "mariadb": "mysql://root@127.0.0.1:3306/",
}


def _admin(server: str) -> sa.Engine:
    return sa.create_engine(
        normalise_url(server), isolation_level="AUTOCOMMIT", poolclass=sa.NullPool
    )


def create_database(db: str, seed: int, workdir: Path) -> tuple[str, str | None]:
    """(URL of a fresh migrated database, the server database name to drop or None)."""
    if db == "sqlite":
        url = f"sqlite:///{workdir / 'outbox.db'}"
        name = None
    elif db in SERVERS:
        name = f"outbox_torture_{seed}"
        force = " WITH (FORCE)" if db == "postgresql" else ""
        with _admin(SERVERS[db]).connect() as conn:
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name}{force}")
            conn.exec_driver_sql(f"CREATE DATABASE {name}")
        url = normalise_url(SERVERS[db]).set(database=name).render_as_string(hide_password=False)
    else:  # a URL given as is
        url, name = db, None
    engine = make_engine(url)
    try:
        migrate.upgrade(engine)
    finally:
        engine.dispose()
    return url, name


def drop_database(url: str, name: str) -> None:
    backend = backend_of(url)
    force = " WITH (FORCE)" if backend == "postgresql" else ""
    with _admin(SERVERS[backend]).connect() as conn:
        conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name}{force}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tests.torture", description=__doc__)
    parser.add_argument("--minutes", type=float, default=10.0, help="chaos duration")
    parser.add_argument(
        "--db", default="postgresql", help="sqlite, postgresql, mariadb, or a database URL"
    )
    parser.add_argument("--seed", type=int, default=None, help="replay a run (default: random)")
    parser.add_argument(
        "--restart-postgres",
        action="store_true",
        help="restart the PostgreSQL server mid-run (pg_ctlcluster; never on a shared server)",
    )
    parser.add_argument("--daemons", type=int, default=None, help="default: 1 SQLite, else 2")
    parser.add_argument("--rate", type=float, default=4.0, help="rows per second written")
    parser.add_argument("--keep", action="store_true", help="keep the database and logs")
    parser.add_argument(
        "--without",
        default="",
        metavar="ACTION,...",
        help="leave these chaos actions out (e.g. poison, to see what else breaks when a "
        "poison row stops everything); names as in chaos.Chaos.actions",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(10**6)
    workdir = Path(tempfile.mkdtemp(prefix=f"outbox-torture-{seed}-"))
    url, name = create_database(args.db, seed, workdir)
    report = run_torture(
        url,
        seed,
        args.minutes * 60,
        workdir=workdir,
        daemons=args.daemons,
        restart_postgres=args.restart_postgres,
        rate=args.rate,
        lanes=8,
        settle_s=300.0,
        stall_s=60.0,
        without=[name for name in args.without.split(",") if name],
    )
    for violation in report.violations:
        print(f"VIOLATION: {violation}")
    print(report.promises_line())
    print(report.line())
    if report.violations or args.keep:
        print(f"kept for inspection: {url} and {workdir}")
        return 1 if report.violations else 0
    if name is not None:
        drop_database(url, name)
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
