"""The world under test: the simulated Recrypt, the database and the ``outbox run`` daemons.

``World.open`` starts the simulator, opens the database and writes the daemons' config;
``close`` stops whatever is still running (after a failure too). The chaos acts on these
parts (``faults``, ``seams``, …); the promises never see them, only what they recorded.
Must not import the chaos, the writers nor the checks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from outbox.descriptors import Catalog
from tests.torture.daemons import Daemons, write_config
from tests.torture.database import Database
from tests.torture.simulator import TortureSimulator
from tests.torture.vocabulary import Report, wait_until


@dataclass
class World:
    """The system under test, as one run holds it (``pool``: the daemons)."""

    sim: TortureSimulator
    port: int
    db: Database
    pool: Daemons
    catalog: Catalog

    @classmethod
    def open(
        cls,
        url: str,
        workdir: Path,
        daemons: int,
        report: Report,
        max_unknown: int,
        max_backoff: float,
    ) -> World:
        """The simulator listening, the database open, ``daemons`` daemons ready to start."""
        catalog = Catalog.load()
        sim = TortureSimulator()
        port = sim.start()
        db = Database(url)
        config = write_config(workdir, url, sim.target, max_unknown, max_backoff)
        pool = Daemons(config, workdir, daemons, report, sim.allow_key)
        return cls(sim, port, db, pool, catalog)

    def start_daemons(self) -> None:
        for slot in self.pool.slots:
            self.pool.start(slot)

    def every_daemon_up(self, report: Report) -> None:
        """After the chaos: every daemon started again (each restart counted), and running."""
        self.pool.check()
        for slot in self.pool.slots:
            if slot.proc is None:
                self.pool.start(slot)
                report.restarts += 1
        if not wait_until(lambda: all(self.pool.is_started(s) for s in self.pool.running()), 60):
            report.violations.append("harness: daemons did not start after the chaos")

    def stop(self) -> None:
        """The orderly end: daemons stopped (SIGTERM), the simulator after them."""
        self.pool.stop_all()
        self.sim.stop(grace=1.0)

    def close(self) -> None:
        """Whatever is still running killed, the database let in again and closed."""
        self.pool.kill_all()
        self.sim.stop()
        self.db.restore()
        self.db.dispose()


def postgres_restart_command() -> list[str]:
    versions = sorted(os.listdir("/etc/postgresql"), key=lambda v: int(v) if v.isdigit() else 0)
    return ["pg_ctlcluster", "--skip-systemctl-redirect", versions[-1], "main", "restart"]
