"""The daemon: APScheduler drives small jobs around the dispatcher; signals stop or reload it.

Jobs (each a short function, safe to run late or twice):

- ``dispatch``: drain due rows (every ``[worker] poll_interval``, or at once on a wake-up)
- ``probe``: while maintenance or a refused key closes the gate, call Core.MaintenanceCheck
- ``maintenance``: poll Core.MaintenanceCheck (``[maintenance] probe_interval``) to learn
  whether rollover downtime is scheduled this week and whether maintenance mode is on
- ``renew``: extend the lease of rows whose calls are still in flight (long calls)
- ``reaper``: hand back rows whose lease ran out; expire rows past ``expires_at``
- ``heartbeat``: record this worker and its gate in ``outbox_workers``
- ``retention``: purge finished rows older than ``[retention] days``

SIGTERM/SIGINT: stop claiming, let the cycle in flight finish, hand back what is still held,
exit 0. A second SIGTERM exits at once (rows held are resent later with the same key: safe).
SIGHUP: reload the config and API key and reopen the gate.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import random
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from types import FrameType
from typing import Any

import sqlalchemy as sa
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler

from outbox import __version__
from outbox.client import Answer, GrpcClient
from outbox.config import Config, load
from outbox.database import make_engine
from outbox.descriptors import Catalog
from outbox.dispatcher import Dispatcher, DispatchSettings
from outbox.follower import StreamFollower
from outbox.gates import Gates, GateView
from outbox.logs import kv, register_secret
from outbox.metrics import HealthServer, Metrics
from outbox.migrate import ensure_at_head
from outbox.policy import Backoff
from outbox.store import Claim, Committed, HandedBack, Outcome, Parked, Retry, Store, WorkerBeat
from outbox.store.listener import Listener
from outbox.systemd import Notifier

log = logging.getLogger("outbox.daemon")

HEARTBEAT_SECONDS = 5.0
SHUTDOWN_GRACE = 20.0  # seconds in-flight calls may take on SIGTERM before they are cancelled
SHUTDOWN_SLACK = 15.0  # then at most this long to hand back and close, or exit regardless
MAX_PIPELINES = 4  # dispatch cycles in parallel: max_in_flight // batch_size, at most this
TABLE_SECONDS = 15.0  # how often the table gauges (rows by state, oldest due) are refreshed


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_worker_id() -> str:
    return f"{socket.gethostname()[:40]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def backoff_from(config: Config) -> Backoff:
    r = config.retry
    return Backoff(r.initial_backoff, r.max_backoff, r.multiplier, r.jitter)


def gates_from(config: Config, rng: random.Random | None = None) -> Gates:
    return Gates(
        backoff_from(config),
        config.worker.max_in_flight,
        unauthenticated_probe=config.maintenance.unauthenticated_probe_interval,
        maintenance_probe=config.maintenance.probe_interval,
        window=config.maintenance.window(),
        hold_methods=config.maintenance.hold_methods,
        rng=rng,
    )


def settings_from(config: Config) -> DispatchSettings:
    batch = min(config.worker.batch_size, config.worker.max_in_flight)
    return DispatchSettings(
        batch_size=batch,
        pipelines=max(1, min(MAX_PIPELINES, config.worker.max_in_flight // batch)),
        lease=config.worker.lease,
        backoff=backoff_from(config),
        max_unknown_attempts=config.retry.max_unknown_attempts,
    )


class Daemon:
    """One worker process: a dispatcher, its jobs, and their lifecycle."""

    def __init__(
        self,
        config: Config,
        config_path: str | None = None,
        *,
        clock: Callable[[], datetime] = utcnow,
        notifier: Notifier | None = None,
    ) -> None:
        self.config = config
        self.notifier = notifier or Notifier.from_env()
        self.metrics = Metrics()
        self._db_error: str | None = None
        self._last_ping = 0.0
        self.config_path = config_path
        self.clock = clock
        self.worker_id = new_worker_id()
        self.started_at = clock()
        self.stopping = threading.Event()
        self._reload = threading.Event()
        self._woken = threading.Event()
        self._idle = threading.Event()  # no dispatch cycle under way
        self._idle.set()
        self._shutdown_done = threading.Event()
        self.engine = make_engine(config.database.url)
        ensure_at_head(self.engine)
        self.store = Store(self.engine)
        self.catalog = Catalog.load(config.recrypt.proto_path or None)
        api_key = config.require_api_key().get_secret_value()
        register_secret(api_key)
        self.gates = gates_from(config)
        self.gates.subscribe(self._gate_changed)
        self.client = GrpcClient(config.recrypt, api_key)
        self.dispatcher = Dispatcher(
            self.store,
            self.client,
            self.catalog,
            self.gates,
            worker_id=self.worker_id,
            settings=settings_from(config),
            clock=clock,
        )
        self.dispatcher.observe(_log_outcome)
        self.dispatcher.observe(self._count_outcome)
        self.dispatcher.after_cycle(self._cycle_done)
        self.follower = self._follower() if config.streams.accounts else None
        self.listener = self._listener()
        listen = config.metrics.listen
        self.health = HealthServer(listen, self.metrics, self.readiness) if listen else None
        self.scheduler = BackgroundScheduler(
            timezone=UTC,
            executors={"default": ThreadPoolExecutor(4)},
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
        )

    # ---- lifecycle

    def start(self) -> None:
        for name, job, seconds, at_once in self._jobs():
            # next_run_time=None would add the job *paused*: leave it out to run on schedule.
            first = {"next_run_time": datetime.now(UTC)} if at_once else {}
            self.scheduler.add_job(
                self._guard(job, name), "interval", seconds=seconds, id=name, **first
            )
        if self.health is not None:
            self.health.start()
        self.scheduler.start()
        if self.follower is not None:
            self.follower.start()
        if self.listener is not None:
            self.listener.start()
        self.metrics.set_gate(self.gates.view(self.clock()).gate)
        recrypt = self.config.recrypt
        log.info(
            kv(
                "started",
                worker=self.worker_id,
                version=__version__,
                target=recrypt.target,
                tls=recrypt.tls,
            )
        )
        # Last: the schema check, protos and key were all loaded in __init__ (a failure there
        # exits non-zero before READY, and systemd reports a failed start).
        self.notifier.ready(f"dispatching to {recrypt.target}")

    def _jobs(self) -> list[tuple[str, Callable[[], Any], float, bool]]:
        """(id, function, interval in seconds, run at start) of every scheduled job."""
        w, m = self.config.worker, self.config.maintenance
        jobs: list[tuple[str, Callable[[], Any], float, bool]] = [
            ("dispatch", self._dispatch, w.poll_interval, True),
            ("probe", self.dispatcher.probe, min(1.0, w.poll_interval), False),
            ("maintenance", self.dispatcher.check_maintenance, m.probe_interval, True),
            ("renew", self._renew, w.lease / 3, False),
            ("reaper", self._reap, max(w.lease / 2, 0.05), True),
            ("heartbeat", self._heartbeat, HEARTBEAT_SECONDS, True),
            ("table", self._table, TABLE_SECONDS, True),
        ]
        if self.config.retention.days > 0:
            jobs.append(("retention", self._retention, self.config.retention.interval, False))
        return jobs

    def run(self) -> int:
        """Run in the foreground until SIGTERM/SIGINT; returns the exit code."""
        self._install_signals()
        self.start()
        while not self.stopping.wait(0.2):
            if self._reload.is_set():
                self._reload.clear()
                self.notifier.reloading()
                try:
                    self.reload()
                finally:
                    self.notifier.ready()
        self.shutdown()
        return 0

    def wake(self) -> None:
        """Run the dispatch job now (a row was inserted); a drain under way goes round again."""
        self._woken.set()
        if not self.stopping.is_set() and self.scheduler.running:
            self.scheduler.modify_job("dispatch", next_run_time=datetime.now(UTC))

    def shutdown(self) -> None:
        """Stop claiming, let the cycle in flight finish, hand back what is still held."""
        self.stopping.set()
        self._exit_if_stuck(SHUTDOWN_GRACE + SHUTDOWN_SLACK)
        self.notifier.stopping("stopping: finishing in-flight calls, handing back the rest")
        if self.follower is not None:
            self.follower.stop(timeout=5.0)
        if self.listener is not None:
            self.listener.stop()
        self._finish_in_flight()
        self.scheduler.shutdown(wait=True)
        handed = self._hand_back()
        self.client.close()
        self.engine.dispose()
        log.info(kv("stopped", worker=self.worker_id, handed_back=handed))
        if self.health is not None:
            self.health.stop()
        self.notifier.close()
        self._shutdown_done.set()

    def _hand_back(self) -> int | None:
        """Release what this worker still holds; if the database fails us now, the reaper
        releases it after one lease, and we still exit cleanly."""
        try:
            handed = self.store.hand_back_all(self.worker_id, self.clock())
            self.store.worker_stopped(self.worker_id, self.clock())
        except sa.exc.SQLAlchemyError as exc:
            log.error(
                kv(
                    "hand_back_failed",
                    error=type(exc).__name__,
                    then="rows come back after one lease",
                )
            )
            return None
        return handed

    def _exit_if_stuck(self, seconds: float) -> None:
        """The stop timeout is a promise: if shutdown hangs, show where, and exit 0 anyway.

        Exiting with rows still claimed is safe: the reaper hands them back after one lease
        and they are resent with the same key.
        """
        done = self._shutdown_done

        def watch() -> None:
            if not done.wait(seconds):
                log.error(kv("shutdown_stuck", after_s=seconds, then="exiting; leases expire"))
                faulthandler.dump_traceback(all_threads=True)
                os._exit(0)

        threading.Thread(target=watch, name="outbox-shutdown-watch", daemon=True).start()

    def _finish_in_flight(self) -> None:
        """Let the calls in flight finish, within a bound; then cancel them.

        A cancelled call's outcome is unknown: it is recorded as such (``maybe_executed``) and
        resent later with the same key, which is safe.
        """
        grace = min(SHUTDOWN_GRACE, self.config.recrypt.deadline)
        self.notifier.extend_timeout(grace + 10)
        if not self._idle.wait(grace):
            log.warning(
                kv("cancel_in_flight", after_s=grace, rows=len(self.dispatcher.inflight_ids()))
            )
            self.client.close()
            self._idle.wait(10)

    def readiness(self) -> tuple[bool, str]:
        """For /readyz: cheap, no query per probe (the heartbeat job tracks the database)."""
        if self.stopping.is_set():
            return False, "stopping"
        if self._db_error:
            return False, self._db_error
        view = self.gates.view(self.clock())
        if view.gate == "unauthenticated":
            return False, "halted: API key refused; fix the key, then systemctl reload outbox"
        return True, f"ready: gate {view.gate}"

    def reload(self) -> None:
        """SIGHUP: re-read the config file and API key; reopen the gate; keep the work."""
        try:
            fresh = load(self.config_path)
            api_key = fresh.require_api_key().get_secret_value()
            register_secret(api_key)
            client = GrpcClient(fresh.recrypt, api_key)
        except Exception as exc:  # a bad reload keeps the running config
            log.error(kv("reload_failed", error=str(exc), then="keeping the running config"))
            return
        old = self.client
        self.client = self.dispatcher.client = client
        old.close()
        self.config = fresh
        self.gates.reset(self.clock())
        log.info(kv("reloaded", worker=self.worker_id))
        self.wake()

    # ---- jobs

    def _dispatch(self) -> None:
        self._idle.clear()
        try:
            while not self.stopping.is_set():
                self._woken.clear()
                self.dispatcher.drain(self.stopping)
                if not self._woken.is_set():
                    return
        finally:
            self._idle.set()

    def _renew(self) -> None:
        ids = self.dispatcher.inflight_ids()
        if ids:
            self.store.renew_leases(self.worker_id, ids, self.config.worker.lease, self.clock())

    def _reap(self) -> None:
        now = self.clock()
        for key in self.store.release_expired_leases(now):
            log.warning(kv("lease_expired", key=key, action="resend with the same key"))
        expired, parked = self.store.expire_due(now)
        if expired or parked:
            log.info(kv("expired", expired=expired, parked_unknown=parked))

    def _heartbeat(self) -> None:
        view = self.gates.view(self.clock())
        beat = WorkerBeat(
            self.worker_id,
            socket.gethostname(),
            os.getpid(),
            __version__,
            self.started_at,
            view.gate,
            _gate_reason(view),
            view.until,
        )
        try:
            self.store.heartbeat(beat, self.clock())
        except Exception:
            self._db_error = "database unreachable"  # fixed text: never the URL
            raise
        self._db_error = None

    def _table(self) -> None:
        now = self.clock()
        view = self.store.status(now)
        age = (now - view.oldest_due_at).total_seconds() if view.oldest_due_at else None
        parked = view.counts.get("parked", 0)
        self.metrics.set_table(view.counts, age, parked, len(view.blocked_lanes))
        gate = self.gates.view(now)
        self.notifier.status(
            f"gate {gate.gate}; pending {view.counts.get('pending', 0)}; parked {parked}"
            + (f"; {gate.reason}" if gate.reason else "")
        )

    def _cycle_done(self) -> None:
        """After each dispatch cycle, in the dispatching thread: a hung cycle stops the pings."""
        now = time.monotonic()
        self.metrics.cycle_done(time.time())
        interval = self.notifier.watchdog_interval
        if interval is not None and now - self._last_ping >= interval:  # already WatchdogSec/2
            self._last_ping = now
            self.notifier.watchdog()

    def _count_outcome(self, _claim: Claim, answer: Answer | None, outcome: Outcome) -> None:
        if answer is not None:
            self.metrics.observe_call(answer.code.name, answer.duration_ms / 1000.0)
        self.metrics.observe_outcome(_OUTCOME_NAMES[type(outcome)])

    def _listener(self) -> Listener | None:
        """LISTEN/NOTIFY wake-ups on PostgreSQL (``[worker] notify``); others poll."""
        if self.engine.dialect.name != "postgresql" or not self.config.worker.notify:
            return None
        return Listener(self.engine.url, self.wake, backoff_from(self.config))

    def _follower(self) -> StreamFollower:
        return StreamFollower(
            lambda: self.client,  # read at every reconnect: a reload's new key is used
            self.catalog,
            self.store,
            self.config.streams.accounts,
            self.config.streams.method,
            backoff_from(self.config),
            clock=self.clock,
        )

    def _retention(self) -> None:
        cutoff = self.clock() - timedelta(days=self.config.retention.days)
        total = 0
        while not self.stopping.is_set():
            purged = self.store.purge_finished(cutoff, self.config.retention.batch_size)
            total += purged
            if purged < self.config.retention.batch_size:
                break
        if total:
            log.info(kv("purged", rows=total, older_than=cutoff.isoformat()))

    def _guard(self, job: Callable[[], Any], name: str) -> Callable[[], None]:
        """A job that fails logs one line and runs again next time; it never kills the daemon."""

        def run() -> None:
            try:
                job()
            except Exception as exc:
                log.error(kv("job_failed", job=name, error=f"{type(exc).__name__}: {exc}"))

        return run

    def _gate_changed(self, view: GateView) -> None:
        until = view.until.isoformat() if view.until else None
        level = logging.INFO if view.gate == "open" else logging.WARNING
        log.log(level, kv("gate_changed", gate=view.gate, until=until, reason=view.reason))
        self.metrics.set_gate(view.gate)
        if self.scheduler.running and not self.stopping.is_set():
            self.scheduler.modify_job("heartbeat", next_run_time=datetime.now(UTC))

    def _install_signals(self) -> None:
        def on_term(signum: int, _frame: FrameType | None) -> None:
            if self.stopping.is_set():
                log.warning(kv("exit_now", signal=signal.Signals(signum).name))
                os._exit(0)
            log.info(kv("stopping", signal=signal.Signals(signum).name))
            self.stopping.set()

        def on_hup(_signum: int, _frame: FrameType | None) -> None:
            self._reload.set()

        signal.signal(signal.SIGTERM, on_term)
        signal.signal(signal.SIGINT, on_term)
        signal.signal(signal.SIGHUP, on_hup)


def _log_outcome(claim: Claim, answer: Answer | None, outcome: Outcome) -> None:
    fields: dict[str, Any] = {
        "key": claim.idempotency_key,
        "method": claim.method,
        "code": answer.code.name if answer else None,
        "attempt": claim.attempts + 1,
        "duration_ms": f"{answer.duration_ms:.1f}" if answer else None,
    }
    match outcome:
        case Committed():
            log.info(kv("committed", **fields))
        case Retry():
            log.info(
                kv(
                    "retry_scheduled",
                    **fields,
                    at=outcome.at.isoformat(),
                    maybe_executed=outcome.maybe_executed,
                )
            )
        case Parked():
            log.warning(
                kv(
                    "parked",
                    **fields,
                    reason=outcome.reason,
                    why=outcome.call.message if outcome.call else None,
                )
            )
        case HandedBack():
            log.info(kv("handed_back", **fields))


def _gate_reason(view: GateView) -> str | None:
    """What ``outbox status`` shows of this worker's gate, removed and held methods included."""
    parts = [view.reason] if view.reason else []
    if view.removed_methods:
        parts.append(
            "not sending removed methods (NOT_FOUND) until reload: "
            + ", ".join(view.removed_methods)
        )
    if view.held_methods:
        parts.append("rollover window, holding: " + ", ".join(view.held_methods))
    return "; ".join(parts) or None


_OUTCOME_NAMES: dict[type, str] = {
    Committed: "committed",
    Retry: "retry",
    Parked: "parked",
    HandedBack: "handed_back",
}
