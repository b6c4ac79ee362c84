"""The daemon: the composition root. It builds the services (``outbox.services``) around one
dispatcher and one clock, has APScheduler run each service's ``run_once(now)``, and handles
signals.

SIGTERM/SIGINT: stop claiming, let the calls in flight finish (within a bound), record every
answer received, hand back only the rows never sent, exit 0. Rows whose answer could still not
be recorded stay ``inflight``; the reaper resends them after one lease (same key: safe). A
second SIGTERM exits at once.
SIGHUP: reload ``[recrypt]`` and the API key (new calls use the new channel; the old one closes
once its calls are answered) and reopen the gate. Nothing else is reloaded: each other service
keeps the settings it was built with, and a reload that changes them says so in the log.
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
from datetime import UTC, datetime
from types import FrameType
from typing import Any

import sqlalchemy as sa
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler

from outbox import __version__
from outbox.backoff import Backoff
from outbox.client import Answer, GrpcClient
from outbox.clock import utcnow
from outbox.config import Config, load
from outbox.database import make_engine
from outbox.descriptors import Catalog
from outbox.dispatcher import OUTCOME_NAMES, Dispatcher, DispatchSettings
from outbox.errors import ConfigError
from outbox.follower import StreamFollower
from outbox.gates import SENDS_NOTHING, Gates, GateView
from outbox.health import (
    RECORD,
    STALE,
    JobHealth,
    expired_lease_note,
    failure_note,
    held_names,
    liveness,
    oldest_due_age,
)
from outbox.logs import describe_error, kv, register_secret
from outbox.metrics import HealthServer, Metrics
from outbox.migrate import ensure_at_head
from outbox.services import (
    ClockCheck,
    Dispatch,
    Expirer,
    Heartbeat,
    LaneKeeper,
    LeaseRenewer,
    MaintenancePoll,
    Probe,
    Reaper,
    Retention,
    RetentionSettings,
    Service,
)
from outbox.store import Claim, Committed, HandedBack, Outcome, Parked, Retry, Store, WorkerBeat
from outbox.store.listener import Listener
from outbox.systemd import Notifier
from outbox.tracing import Tracing, from_env
from outbox.vocabulary import GateState, HistoryDecision, RowOutcome, State

log = logging.getLogger("outbox.daemon")

SHUTDOWN_GRACE = 20.0  # seconds in-flight calls may take on SIGTERM before they are cancelled
SHUTDOWN_SLACK = 15.0  # then at most this long to record, hand back and close, or exit anyway
SHUTDOWN_FLUSH = 8.0  # of the slack: how long a stop keeps trying to record kept answers
MAX_PIPELINES = 4  # dispatch cycles in parallel: max_in_flight // batch_size, at most this
MAX_SKEW_FRACTION = 0.25  # of the lease: the clock skew to the database a daemon tolerates
TABLE_SECONDS = 15.0  # how often the table gauges (rows by state, oldest due) are refreshed
REFUSED_TEXT = (
    "refused (PERMISSION_DENIED while Recrypt is not in maintenance): the API key may not call "
    "these methods; check its permissions (the protos' key_access option, and recrypt.net/api), "
    "then systemctl reload outbox; re-probed every [maintenance] "
    "unauthenticated_probe_interval. Holding: "
)
#: What a SIGHUP applies (all of ``[recrypt]`` but ``proto_path``, and the key); any other
#: section changed in the file needs a restart, and the reload says so.
RELOADED_SECTIONS = ("recrypt",)
#: Sections the daemon only checks at start: ``outbox report`` reads them itself, each run.
UNUSED_SECTIONS = ("report",)


def new_worker_id() -> str:
    return f"{socket.gethostname()[:40]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def backoff_from(config: Config) -> Backoff:
    retry = config.retry
    return Backoff(retry.initial_backoff, retry.max_backoff, retry.multiplier, retry.jitter)


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
        connect_timeout=min(config.recrypt.deadline, 5.0),
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
        check_clock: bool = True,  # off only for tests that simulate time with ``clock``
        tracing: Tracing | None = None,  # default: as the OTEL_* variables say (README, Tracing)
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.clock = clock
        self.notifier = notifier or Notifier.from_env()
        self.tracing = tracing if tracing is not None else from_env()
        self.tracing.retarget(config.recrypt.target)
        self._init_state()
        self._open_store(check_clock)
        self.catalog = Catalog.load(config.recrypt.proto_path or None)
        self.metrics.know_methods(self.catalog.methods)
        Catalog.report_field_map(config, self.catalog)  # a bad [report] fails at start
        self.gates = gates_from(config)
        self.gates.subscribe(self._gate_changed)
        self.dispatcher = self._dispatcher()
        self.services = self._services()
        self.dispatch = next(s for s in self.services if isinstance(s, Dispatch))
        self.follower = self._follower() if config.streams.accounts else None
        self.listener = self._listener()
        listen = config.metrics.listen
        self.health = HealthServer(listen, self.metrics, self.readiness) if listen else None
        self.scheduler = BackgroundScheduler(
            timezone=UTC,
            executors={"default": ThreadPoolExecutor(4)},
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
        )

    def _init_state(self) -> None:
        """What the daemon observes of itself: metrics, job health, stop and reload signals."""
        self.metrics = Metrics()
        self.jobs = JobHealth()  # which job keeps failing: /readyz, the metrics, the heartbeat
        self._expired: tuple[int, datetime | None] = (0, None)  # leases run out (table job)
        self._db_error: str | None = None
        self._last_ping = 0.0
        self.worker_id = new_worker_id()
        self.started_at = self.clock()
        self.stopping = threading.Event()
        self._reload = threading.Event()
        self._shutdown_done = threading.Event()

    def _open_store(self, check_clock: bool) -> None:
        """The database at the head migration, and this host's clock close to the database's."""
        self.engine = make_engine(self.config.database.url)
        ensure_at_head(self.engine)
        self.store = Store(self.engine)
        lease = self.config.worker.lease
        max_skew = lease * MAX_SKEW_FRACTION if check_clock else float("inf")
        self.clock_check = ClockCheck(self._skew, max_skew)
        self.clock_check.require(self.clock())

    def _dispatcher(self) -> Dispatcher:
        """The dispatcher on a gRPC client with the API key, and who hears of its outcomes."""
        api_key = self.config.require_api_key().get_secret_value()
        register_secret(api_key)
        dispatcher = Dispatcher(
            self.store,
            GrpcClient(self.config.recrypt, api_key),
            self.catalog,
            self.gates,
            worker_id=self.worker_id,
            settings=settings_from(self.config),
            clock=self.clock,
            tracing=self.tracing,
        )
        dispatcher.observe(_log_outcome)
        dispatcher.observe(self._count_outcome, lost=self._count_lost)
        dispatcher.after_cycle(self._cycle_done)
        dispatcher.after_record(lambda exc: self._job_result(RECORD, exc))
        return dispatcher

    # ---- lifecycle

    def start(self) -> None:
        for service in self.services:
            # next_run_time=None would add the job *paused*: leave it out to run on schedule.
            first = {"next_run_time": utcnow()} if service.at_start else {}
            self.scheduler.add_job(
                self._guard(service),
                "interval",
                seconds=service.interval,
                id=service.name,
                **first,
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

    def _services(self) -> list[Service]:
        """Every background service, each with the settings it keeps until a restart."""
        config, dispatcher, store = self.config, self.dispatcher, self.store
        worker = config.worker
        clock_ok = lambda: self.clock_check.ok  # noqa: E731
        services: list[Service] = [
            Dispatch(dispatcher, self.stopping, worker.poll_interval, allowed=clock_ok),
            Probe(dispatcher, min(1.0, worker.poll_interval)),
            MaintenancePoll(dispatcher, config.maintenance.probe_interval),
            LeaseRenewer(store, self.worker_id, dispatcher.inflight_ids, worker.lease),
            Reaper(store, worker.lease, config.retry.max_unknown_attempts, allowed=clock_ok),
            Expirer(store, max(worker.lease / 2, 0.05), allowed=clock_ok),
            LaneKeeper(store),
            Heartbeat(store, self._beat, self._db_result, self.clock_check),
            _TableGauges(self, TABLE_SECONDS),
        ]
        kept = config.retention  # days 0 keeps rows for ever; old workers are purged all the same
        settings = RetentionSettings(kept.days, kept.batch_size, kept.tombstone_days, kept.interval)
        services.append(Retention(store, settings, self.stopping))
        return services

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
        self.dispatch.woken.set()
        if not self.stopping.is_set() and self.scheduler.running:
            self.scheduler.modify_job("dispatch", next_run_time=utcnow())

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no dispatch cycle is under way (tests, and the stop)."""
        return self.dispatch.idle.wait(timeout)

    def shutdown(self) -> None:
        """Stop claiming, let the calls in flight finish, record every answer, hand back
        only the rows never sent."""
        self.stopping.set()
        self._exit_if_stuck(SHUTDOWN_GRACE + SHUTDOWN_SLACK)
        self.notifier.stopping("stopping: finishing in-flight calls, recording their answers")
        if self.follower is not None:
            self.follower.stop(timeout=5.0)
        if self.listener is not None:
            self.listener.stop()
        self._finish_in_flight()
        self.scheduler.shutdown(wait=True)
        self._flush_answers(SHUTDOWN_FLUSH)
        handed = self._hand_back()
        self.dispatcher.clients.close()
        self.engine.dispose()
        self.tracing.close()  # export the spans still buffered
        log.info(kv("stopped", worker=self.worker_id, handed_back=handed))
        if self.health is not None:
            self.health.stop()
        self.notifier.close()
        self._shutdown_done.set()

    def _flush_answers(self, seconds: float) -> None:
        """Record the answers the database refused so far, trying for up to ``seconds``.

        What still cannot be recorded stays ``inflight``: the reaper resends those rows after
        one lease with the same key (ALREADY_EXISTS commits them; the response is then lost,
        so the keys are logged here).
        """
        give_up = time.monotonic() + seconds
        while not self.dispatcher.flush() and time.monotonic() < give_up:
            time.sleep(0.5)  # the database is away: try again shortly, within the bound
        if self.dispatcher.unrecorded():
            log.error(
                kv(
                    "answers_unrecorded_at_stop",
                    keys=",".join(self.dispatcher.unrecorded_keys()),
                    then="rows stay inflight; the reaper resends them after one lease",
                )
            )

    def _hand_back(self) -> int | None:
        """Release the rows this worker claimed and never sent; if the database fails us now,
        the reaper releases them after one lease, and we still exit cleanly."""
        try:
            unsent = self.dispatcher.unsent_ids()
            handed = self.store.hand_back(self.worker_id, unsent, self.clock())
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
        self.notifier.extend_timeout(grace + SHUTDOWN_FLUSH + 10)
        if not self.wait_idle(grace):
            log.warning(
                kv("cancel_in_flight", after_s=grace, rows=len(self.dispatcher.inflight_ids()))
            )
            self.dispatcher.clients.close()
            self.wait_idle(10)

    def readiness(self) -> tuple[bool, str]:
        """For /readyz: cheap, no query per probe (the heartbeat and table jobs read the
        database). Not ready while a job keeps failing, rows in flight have leases long run
        out, or the gate lets nothing be sent."""
        now = self.clock()
        problem = self._not_ready(now)
        return (False, problem) if problem else (True, f"ready: gate {self.gates.view(now).gate}")

    def _not_ready(self, now: datetime) -> str | None:
        if self.stopping.is_set():
            return "stopping"
        if self._db_error:
            return self._db_error
        if not self.clock_check.ok:
            return "clock skew: " + self.clock_check.message()
        lease = self.config.worker.lease
        expired = expired_lease_note(*self._expired, now, lease)
        return self._failing_text(now) or expired or self._gate_problem(now)

    def _gate_problem(self, now: datetime) -> str | None:
        view = self.gates.view(now)
        if view.gate in SENDS_NOTHING:
            return f"gate {view.gate}: nothing is sent; {view.reason}"
        if view.refused_methods:
            return REFUSED_TEXT + ", ".join(view.refused_methods)
        return None

    def _failing_text(self, now: datetime) -> str | None:
        failing = self.jobs.failing()
        if not failing:
            return None
        notes = [failure_note(f, now) for f in failing]
        since = ", ".join(f"job {f.job} failing since {f.since.isoformat()}" for f in failing)
        return f"{since}: " + "; ".join(notes)

    @property
    def client(self) -> GrpcClient:
        return self.dispatcher.client  # type: ignore[return-value]

    def reload(self) -> None:
        """SIGHUP: ``[recrypt]`` and the API key; reopen the gate; keep the work.

        New calls use the new client at once; the old channel closes when its last call is
        answered, so no call in flight is cancelled. Other sections are not applied: each
        service keeps its settings, and a change to them is logged as needing a restart.
        """
        try:
            fresh = load(self.config_path)
            _check_reloadable(fresh, self.config)
            api_key = fresh.require_api_key().get_secret_value()
            register_secret(api_key)
            client = GrpcClient(fresh.recrypt, api_key)
        except Exception as exc:  # a bad reload keeps the running config
            log.error(kv("reload_failed", error=str(exc), then="keeping the running config"))
            return
        self.dispatcher.clients.replace(client)
        self.tracing.retarget(fresh.recrypt.target)
        ignored = _changed_sections(self.config, fresh, RELOADED_SECTIONS)
        recrypt = fresh.recrypt
        if recrypt.proto_path != self.config.recrypt.proto_path:  # compiled once, at start
            ignored.append("recrypt.proto_path")
            recrypt = recrypt.model_copy(update={"proto_path": self.config.recrypt.proto_path})
        self.config = self.config.model_copy(update={"recrypt": recrypt})
        self.gates.reset(self.clock())
        if ignored:
            log.warning(
                kv("reload_needs_restart", sections=",".join(ignored), then="restart to apply")
            )
        log.info(kv("reloaded", worker=self.worker_id, applied=",".join(RELOADED_SECTIONS)))
        self.wake()

    # ---- what the services call back

    def _skew(self, _now: datetime) -> float:
        """Seconds the database's clock is ahead of this host's (round trip halved)."""
        before = self.clock()
        database = self.store.database_now()
        after = self.clock()
        return (database - (before + (after - before) / 2)).total_seconds()

    def _beat(self) -> WorkerBeat:
        view = self.gates.view(self.clock())
        return WorkerBeat(
            self.worker_id,
            socket.gethostname(),
            os.getpid(),
            __version__,
            self.started_at,
            view.gate,
            _gate_reason(view),
            view.until,
            gate_since=view.since,
            refused_methods=view.refused_methods,
            failing_jobs=self.jobs.failing(),
        )

    def _db_result(self, error: Exception | None) -> None:
        """The heartbeat's result: the database's reachability, and the beat's time."""
        self._db_error = "database unreachable" if error is not None else None  # never the URL
        if error is None:
            self.metrics.heartbeat.set(time.time())

    def table_gauges(self) -> None:
        now = self.clock()
        view = self.store.status(now)
        age = oldest_due_age(view.oldest_due_at, now)
        parked = view.counts.get("parked", 0)
        self.metrics.set_table(
            view.counts, age, parked, len(view.blocked_lanes), view.parked_by_reason
        )
        stale_after = self.config.check.heartbeat_stale
        silent = [w for w in view.workers if liveness(w, now, stale_after) == STALE]
        self.metrics.workers_silent.set(len(silent))
        self._expired = (view.leases_expired, view.oldest_lease_expired_at)
        self.metrics.leases_expired.set(view.leases_expired)
        self.metrics.set_holds(h.kind for h in view.holds)
        gate = self.gates.view(now)
        self.metrics.methods_refused.set(len(gate.refused_methods))
        self.notifier.status(
            f"gate {gate.gate}; pending {view.counts.get(State.PENDING, 0)}; parked {parked}"
            + (f"; {gate.reason}" if gate.reason else "")
            + (f"; held: {held_names(view.holds)}" if view.holds else "")
        )

    def _cycle_done(self) -> None:
        """After each dispatch cycle, in the dispatching thread: a hung cycle stops the pings."""
        now = time.monotonic()
        self.metrics.cycle_done(time.time())
        self.metrics.unrecorded.set(self.dispatcher.unrecorded())
        interval = self.notifier.watchdog_interval
        if interval is not None and now - self._last_ping >= interval:  # already WatchdogSec/2
            self._last_ping = now
            self.notifier.watchdog()

    def _count_outcome(self, claim: Claim, answer: Answer | None, outcome: Outcome) -> None:
        if answer is not None:
            self.metrics.observe_call(answer.code.name, answer.duration_ms / 1000.0, claim.method)
        self.metrics.observe_outcome(OUTCOME_NAMES[type(outcome)])
        if outcome.line is not None and outcome.line.decision == HistoryDecision.KEY_USED_BEFORE:
            self.metrics.key_used_before.inc()
        if claim.due_since is not None:
            self._observe_waits(claim, claim.due_since.timestamp(), answer, outcome)

    def _observe_waits(
        self, claim: Claim, due: float, answer: Answer | None, outcome: Outcome
    ) -> None:
        """How long the row waited: to its first send (the first claim's call, once per row)
        and to its commit (now: the commit is recorded when observers hear of it)."""
        sent_at = answer.sent_at if answer is not None and answer.started else None
        first = claim.stored_fingerprint is None  # the row's first claim
        to_send = sent_at - due if first and sent_at is not None else None
        to_commit = self.clock().timestamp() - due if isinstance(outcome, Committed) else None
        if to_send is not None or to_commit is not None:
            self.metrics.observe_waited(claim.method, first_send=to_send, committed=to_commit)

    def _count_lost(self, _outcome: Outcome) -> None:
        self.metrics.observe_outcome(RowOutcome.LOST)

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

    def _guard(self, service: Service) -> Callable[[], None]:
        """A service that fails runs again next time; it never kills the daemon, and its health
        (``outbox.health``) is reported. Each run gets ``now`` from the daemon's one clock."""

        def run() -> None:
            try:
                service.run_once(self.clock())
            except Exception as exc:
                self._job_result(service.name, exc)
            else:
                self._job_result(service.name, None)

        return run

    def _job_result(self, job: str, error: Exception | None) -> None:
        """A job's run: a failure is logged once, then at a bounded rate; a recovery once."""
        now = self.clock()
        if error is None:
            line = self.jobs.succeeded(job, now)
        else:
            line = self.jobs.failed(job, now, describe_error(error))
        if line is not None:
            log.log(logging.ERROR if line.error else logging.INFO, kv(line.event, **line.fields))
        self.metrics.set_failing(f.job for f in self.jobs.failing())

    def _gate_changed(self, view: GateView) -> None:
        until = view.until.isoformat() if view.until else None
        level = logging.INFO if view.gate == GateState.OPEN else logging.WARNING
        log.log(level, kv("gate_changed", gate=view.gate, until=until, reason=view.reason))
        self.metrics.set_gate(view.gate)
        self.metrics.methods_refused.set(len(view.refused_methods))
        if self.scheduler.running and not self.stopping.is_set():
            self.scheduler.modify_job("heartbeat", next_run_time=utcnow())

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


class _TableGauges:
    """Refresh the table gauges (rows by state, oldest due) and systemd's STATUS line."""

    name = "table"
    at_start = True

    def __init__(self, daemon: Daemon, interval: float) -> None:
        self._daemon = daemon
        self.interval = interval

    def run_once(self, now: datetime) -> None:
        self._daemon.table_gauges()


def _check_reloadable(fresh: Config, running: Config) -> None:
    """A reload applies ``[recrypt]`` under the running ``[worker]``: the lease must still
    outlive a call, or another worker may resend a row still in flight."""
    if fresh.recrypt.deadline >= running.worker.lease:
        raise ConfigError(
            f"[recrypt] deadline ({fresh.recrypt.deadline:g} s) must stay shorter than the "
            f"running [worker] lease ({running.worker.lease:g} s); a new lease needs a restart"
        )


def _changed_sections(running: Config, fresh: Config, applied: tuple[str, ...]) -> list[str]:
    """Sections a reload would change but does not apply (they need a restart)."""
    skipped = ("api_key", *applied, *UNUSED_SECTIONS)
    names = [n for n in type(running).model_fields if n not in skipped]
    return [n for n in names if getattr(running, n) != getattr(fresh, n)]


def _log_outcome(claim: Claim, answer: Answer | None, outcome: Outcome) -> None:
    if not log.isEnabledFor(logging.WARNING if isinstance(outcome, Parked) else logging.INFO):
        return  # no line, so no formatting: ~25 µs a row at level = "WARNING"
    fields: dict[str, Any] = {
        "key": claim.idempotency_key,
        "method": claim.method,
        "code": answer.code.name if answer else None,
        "attempt": claim.attempts + 1,
        "duration_ms": round(answer.duration_ms, 1) if answer else None,
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
                    why=outcome.line.message if outcome.line else None,
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
    if view.refused_methods:
        parts.append(REFUSED_TEXT + ", ".join(view.refused_methods))
    return "; ".join(parts) or None
