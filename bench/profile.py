"""Profile the daemon's hot path: ``python -m bench.profile --target HOST:PORT --url URL``.

A ``Daemon`` built as ``outbox run`` builds it (its observers: the log line, the metrics), no
scheduler: ``dispatcher.drain()`` over a fresh backlog, in this process, under yappi's CPU clock (or
none), against a simulator in another process (``outbox simulator --api-key bench-key``), so
only the daemon's CPU is counted. Prints CPU µs per row and, with ``--profile``, the top
functions by own time and by cumulative time.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from bench.__main__ import API_KEY, fresh_database, insert_backlog
from outbox import config as outbox_config
from outbox import logs
from outbox.daemon import Daemon
from outbox.database import make_engine

try:
    import yappi  # a profiler that reads each thread's CPU clock; not a project dependency
except ImportError:
    yappi = None


def build(url: str, target: str, batch: int, level: str) -> Daemon:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "profile.toml"
        path.write_text(
            f'[database]\nurl = "{url}"\n'
            f'[recrypt]\ntarget = "{target}"\ntls = false\ndeadline = 30.0\n'
            f"[worker]\nbatch_size = {batch}\nmax_in_flight = {batch}\nlease = 120.0\n"
            f'[metrics]\nlisten = ""\n[maintenance]\nrollover_window = ""\n'
        )
        config = outbox_config.load(path, env={"RECRYPT_API_KEY": API_KEY})
    logs.setup(level)
    return Daemon(config, check_clock=False)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", required=True)
    parser.add_argument("--url", default="sqlite:////tmp/outbox_profile.db")
    parser.add_argument("--rows", type=int, default=5_000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--level", default="WARNING", help="log level, as [logging] level")
    parser.add_argument("--profile", action="store_true", help="under yappi (CPU clock)")
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--out", default=None, help="write the stats here (pstat format)")
    parser.add_argument(
        "--fill",
        choices=("yes", "no", "only"),
        default="yes",
        help="no: drain the backlog an earlier --fill only left (under callgrind, so that "
        "filling is not counted)",
    )
    args = parser.parse_args()
    if args.profile and yappi is None:
        parser.error("--profile needs yappi: .venv/bin/pip install yappi")
    if args.fill != "no":
        fresh_database(args.url).dispose()
        engine = make_engine(args.url)
        insert_backlog(engine, args.rows + args.batch)
        engine.dispose()
    if args.fill != "only":
        drain(args)


def drain(args: argparse.Namespace) -> None:
    daemon = build(args.url, args.target, args.batch, args.level)
    daemon.dispatcher.run_once()  # warm-up: connection, statements, first calls
    if args.profile:
        yappi.set_clock_type("cpu")  # each thread's CPU time, not wall time
        yappi.start(builtins=True)
    before, wall = os.times(), time.perf_counter()
    rows = daemon.dispatcher.drain()
    after, wall = os.times(), time.perf_counter() - wall
    if args.profile:
        yappi.stop()
    user, system = after.user - before.user, after.system - before.system
    print(
        f"rows={rows} cpu_us_per_row={(user + system) / rows * 1e6:.1f} "
        f"(user {user / rows * 1e6:.1f}, system {system / rows * 1e6:.1f}) rate={rows / wall:.0f}/s"
    )
    daemon.dispatcher.clients.close()
    daemon.engine.dispose()
    if args.profile:
        report(rows, args.top, args.out)


def report(rows: int, top: int, out: str | None) -> None:
    """The top functions by own and by total CPU, in µs per row."""
    stats = yappi.get_func_stats()
    if out:
        stats.save(out, type="pstat")
    for key, title in (("ttot", "total"), ("tsub", "own")):
        print(f"--- by {title} CPU, µs per row")
        for f in list(stats.sort(key, "desc"))[:top]:
            place = f"{Path(f.module).name}:{f.lineno}({f.name})"
            print(f"{f.ttot / rows * 1e6:9.1f} {f.tsub / rows * 1e6:9.1f} {f.ncall:8d}  {place}")


if __name__ == "__main__":
    main()
