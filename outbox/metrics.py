"""Prometheus metrics and the small HTTP server behind ``/metrics``, ``/healthz``, ``/readyz``.

Labels only ever take values from fixed, small sets (gRPC code names, outcome names, row
states, gate names). A key, a payload, an account or the API key would make every series
unique (a cardinality bomb) and would leak data to whoever scrapes: any value outside the
fixed set is counted under ``other`` instead.

The metrics live in their own ``CollectorRegistry`` (not prometheus_client's global one), so
a test, or two daemons in one process, can each build a ``Metrics`` without name clashes.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable, Iterable, Mapping
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import cast
from urllib.parse import urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.metrics import Counter, Gauge, Histogram

from outbox import __version__
from outbox.config import is_loopback
from outbox.errors import ConfigError
from outbox.gates import GATE_STATES, SENDS_NOTHING
from outbox.health import JOBS
from outbox.logs import kv, redact
from outbox.vocabulary import Code, GateState, HoldKind, ParkReason, RowOutcome, State

log = logging.getLogger("outbox.metrics")

OTHER = "other"
# Every label set comes from the vocabulary: every member has a series, so an alert can fire
# on each (tests/unit/test_vocabulary.py checks it against a rendered registry).
CODES: tuple[str, ...] = tuple(Code)
_CODE_SET = frozenset(CODES)
OUTCOMES: tuple[str, ...] = tuple(RowOutcome)
STATES: tuple[str, ...] = tuple(State)
GATES = GATE_STATES
PARK_REASONS: tuple[str, ...] = tuple(ParkReason)
HOLD_KINDS: tuple[str, ...] = tuple(HoldKind)
# A Recrypt call takes milliseconds when healthy and up to the deadline (10 s) when not.
SUBMIT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# A row waits milliseconds behind a healthy daemon, minutes through a rollover, hours through
# maintenance or a parked lane: the buckets span all three.
WAIT_BUCKETS = (
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
    1800.0, 3600.0, 4 * 3600.0, 24 * 3600.0,
)  # fmt: skip

# serve_forever() notices stop() this often: a quick shutdown for ten cheap wake-ups a second.
SHUTDOWN_POLL_SECONDS = 0.1

Readiness = Callable[[], tuple[bool, str]]


def _fixed(value: str, allowed: Iterable[str]) -> str:
    """``value`` if it is one of ``allowed``, else ``other``: labels never carry free text."""
    return value if value in allowed else OTHER


class Metrics:
    """Every metric the daemon exports, in a registry of its own (``self.registry``)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = CollectorRegistry() if registry is None else registry
        self._declare_calls(self.registry)
        self._declare_table(self.registry)
        self._declare_daemon(self.registry)
        self._declare_workers(self.registry)
        self._calls: dict[tuple[str, str], Histogram] = {}
        self.know_methods(())  # until the daemon knows its catalog: every method is "other"
        self._init_series()

    def _declare_calls(self, r: CollectorRegistry) -> None:
        """What Recrypt answered and what each answer did."""
        self.attempts = Counter(
            "outbox_attempts", "Recrypt calls answered, by gRPC code name", ["code"], registry=r
        )
        self.outcomes = Counter(
            "outbox_outcomes", "What each attempt did to its row", ["outcome"], registry=r
        )
        self.submit_seconds = Histogram(
            "outbox_submit_seconds",
            "Recrypt call latency, by method (gRPC path) and gRPC code name",
            ["method", "code"],
            buckets=SUBMIT_BUCKETS,
            registry=r,
        )
        self.to_first_send = Histogram(
            "outbox_enqueue_to_first_send_seconds",
            "From a row becoming due (its insertion, or not_before when later) to its first send",
            ["method"],
            buckets=WAIT_BUCKETS,
            registry=r,
        )
        self.to_committed = Histogram(
            "outbox_enqueue_to_committed_seconds",
            "From a row becoming due (its insertion, or not_before when later) to its commit "
            "being recorded",
            ["method"],
            buckets=WAIT_BUCKETS,
            registry=r,
        )
        self.key_used_before = Counter(
            "outbox_key_used_before",
            "Rows committed on ALREADY_EXISTS at their very first attempt: the key was used "
            "at Recrypt before (check on recrypt.net)",
            registry=r,
        )

    def _declare_table(self, r: CollectorRegistry) -> None:
        """The outbox table as the status job sees it."""
        self.rows = Gauge("outbox_rows", "Outbox rows by state", ["state"], registry=r)
        self.oldest_due = Gauge(
            "outbox_oldest_due_seconds",
            "Age of the oldest due pending row (0 when none is due)",
            registry=r,
        )
        self.parked = Gauge("outbox_parked_rows", "Rows waiting for an operator", registry=r)
        self.parked_by_reason = Gauge(
            "outbox_parked_rows_by_reason",
            "Rows waiting for an operator, by park reason (docs/operations.md §6 per reason)",
            ["reason"],
            registry=r,
        )
        self.lanes_blocked = Gauge(
            "outbox_lanes_blocked", "Lanes held up behind a parked row", registry=r
        )
        self.holds = Gauge(
            "outbox_holds",
            "Lanes and methods an operator held (`outbox hold`): their rows are not sent",
            ["kind"],
            registry=r,
        )

    def _declare_daemon(self, r: CollectorRegistry) -> None:
        """The daemon itself: its gate, its jobs, its version."""
        self.gate = Gauge(
            "outbox_gate", "1 for the dispatcher's current gate", ["gate"], registry=r
        )
        self.up = Gauge("outbox_up", "1 while the daemon runs", ["version"], registry=r)
        self.methods_refused = Gauge(
            "outbox_methods_refused",
            "Methods held because Recrypt refused them (PERMISSION_DENIED) outside maintenance: "
            "check the API key's permissions",
            registry=r,
        )
        self.unrecorded = Gauge(
            "outbox_unrecorded_answers",
            "Answers received and kept in memory because the database refused to record them",
            registry=r,
        )
        self.last_cycle = Gauge(
            "outbox_last_cycle_timestamp_seconds",
            "Unix time the last dispatch cycle finished",
            registry=r,
        )
        self.job_failing = Gauge(
            "outbox_job_failing",
            "1 while a background job keeps failing (outbox check and the log say why)",
            ["job_name"],  # not "job": Prometheus owns that label (the scrape job)
            registry=r,
        )
        self.leases_expired = Gauge(
            "outbox_leases_expired_rows",
            "Rows in flight whose lease has run out (the reaper releases them; if this stays "
            "above 0, it cannot)",
            registry=r,
        )
        self.sending_blocked = Gauge(
            "outbox_sending_blocked",
            "1 while the gate lets nothing be sent (unreachable, rollover, maintenance, "
            "unauthenticated)",
            registry=r,
        )

    def _declare_workers(self, r: CollectorRegistry) -> None:
        """Liveness: this daemon's last heartbeat, and the workers the table says went silent."""
        self.heartbeat = Gauge(
            "outbox_heartbeat_timestamp_seconds",
            "Unix time this daemon last recorded its heartbeat in outbox_workers",
            registry=r,
        )
        self.workers_silent = Gauge(
            "outbox_workers_silent",
            "Workers not stopped whose last heartbeat is older than [check] heartbeat_stale "
            "(dead without stopping, or cut off from the database)",
            registry=r,
        )

    def _init_series(self) -> None:
        """Every labelled series exists at 0, so rate() and alerts see it before any event."""
        # The children, looked up once: ``labels()`` per row cost ~5 µs of a row's CPU.
        self._attempts = {code: self.attempts.labels(code=code) for code in (*CODES, OTHER)}
        self._outcomes = {o: self.outcomes.labels(outcome=o) for o in (*OUTCOMES, OTHER)}
        for state in STATES:
            self.rows.labels(state=state).set(0)
        for reason in (*PARK_REASONS, OTHER):
            self.parked_by_reason.labels(reason=reason).set(0)
        self.set_holds(())
        self.set_gate(GateState.OPEN)
        self.set_failing(())
        self.up.labels(version=__version__).set(1)

    def know_methods(self, methods: Iterable[str]) -> None:
        """The gRPC paths a ``method`` label may take (the catalog's); any other is ``other``.
        Their latency series start at 0, so a quantile shows before the first row."""
        self._methods = frozenset(methods)
        # the children, looked up once, as for the other per-row metrics
        named = (*self._methods, OTHER)
        self._first_sends = {m: self.to_first_send.labels(method=m) for m in named}
        self._commits = {m: self.to_committed.labels(method=m) for m in named}

    def observe_call(self, code: str, seconds: float, method: str = OTHER) -> None:
        """One answered call: its gRPC code name (``"OK"``, ``"UNAVAILABLE"``…), its method's
        path and its latency."""
        self._attempts.get(code, self._attempts[OTHER]).inc()
        self._call(method, code).observe(max(seconds, 0.0))

    def _call(self, method: str, code: str) -> Histogram:
        """The (method, code) child, looked up once: series only for pairs that happened."""
        labels = (_fixed(method, self._methods), _fixed(code, _CODE_SET))
        child = self._calls.get(labels)
        if child is None:  # at most (methods + 1) x (codes + 1) children
            child = self._calls[labels] = self.submit_seconds.labels(*labels)
        return child

    def observe_waited(
        self, method: str, *, first_send: float | None, committed: float | None
    ) -> None:
        """A row's waits, in seconds since it became due: to its first send, to its commit
        (each None when this outcome is not that moment)."""
        if first_send is not None:
            self._first_sends.get(method, self._first_sends[OTHER]).observe(max(first_send, 0.0))
        if committed is not None:
            self._commits.get(method, self._commits[OTHER]).observe(max(committed, 0.0))

    def observe_outcome(self, outcome: str) -> None:
        """One row outcome: committed, retry, parked, handed_back or lost."""
        self._outcomes.get(outcome, self._outcomes[OTHER]).inc()

    def set_gate(self, gate: str) -> None:
        """The current gate gets 1, the others 0 (an unknown name sets them all to 0)."""
        for name in GATES:
            self.gate.labels(gate=name).set(1 if name == gate else 0)
        self.sending_blocked.set(1 if gate in SENDS_NOTHING else 0)

    def set_failing(self, jobs: Iterable[str]) -> None:
        """The jobs failing now get 1, the others 0."""
        failing = {_fixed(job, JOBS) for job in jobs}
        for job in (*JOBS, OTHER):
            self.job_failing.labels(job_name=job).set(1 if job in failing else 0)

    def set_table(
        self,
        counts: Mapping[str, int],
        oldest_due_seconds: float | None,
        parked: int,
        lanes_blocked: int,
        parked_by_reason: Mapping[str, int] | None = None,
    ) -> None:
        """The table as ``Store.status`` sees it; a state missing from ``counts`` is 0."""
        for state in STATES:
            self.rows.labels(state=state).set(counts.get(state, 0))
        self.oldest_due.set(max(oldest_due_seconds or 0.0, 0.0))
        self.parked.set(parked)
        self._set_parked_by_reason(parked_by_reason or {})
        self.lanes_blocked.set(lanes_blocked)

    def _set_parked_by_reason(self, by_reason: Mapping[str, int]) -> None:
        """Each reason's count; a reason outside the vocabulary (an old row's) counts as other."""
        totals = dict.fromkeys((*PARK_REASONS, OTHER), 0)
        for reason, count in by_reason.items():
            totals[_fixed(reason, PARK_REASONS)] += count
        for reason, count in totals.items():
            self.parked_by_reason.labels(reason=reason).set(count)

    def set_holds(self, kinds: Iterable[str]) -> None:
        """How many lanes and methods are held now (one kind per hold)."""
        counts = dict.fromkeys(HOLD_KINDS, 0)
        for kind in kinds:
            if kind in counts:
                counts[kind] += 1
        for kind, count in counts.items():
            self.holds.labels(kind=kind).set(count)

    def cycle_done(self, now_ts: float) -> None:
        """A dispatch cycle finished at Unix time ``now_ts`` (alert when this goes stale)."""
        self.last_cycle.set(now_ts)

    def render(self) -> bytes:
        """The text exposition format, as served on ``/metrics``."""
        return generate_latest(self.registry)


def parse_listen(listen: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> (host, port); anything else is a ConfigError."""
    host, sep, port = listen.strip().rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(
            f'[metrics] listen = {listen!r} is not host:port: use e.g. "127.0.0.1:9464" '
            '("[::1]:9464" for IPv6, port 0 for any free port), or "" to disable metrics'
        )
    return host, int(port)


class _Server(ThreadingHTTPServer):
    """The HTTP server, carrying what its request handlers need."""

    daemon_threads = True  # a stuck scrape never holds up the daemon's exit

    def __init__(self, address: tuple[str, int], metrics: Metrics, ready: Readiness) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6  # a [v6] literal
        self.metrics = metrics
        self.ready = ready
        super().__init__(address, _Handler)


_TEXT = "text/plain; charset=utf-8"


class _Handler(BaseHTTPRequestHandler):
    server_version = "outbox"  # not "BaseHTTP/0.6 Python/3.x": no version fingerprinting
    sys_version = ""
    timeout = 10  # a client that connects and sends nothing frees its thread

    def do_GET(self) -> None:
        app = cast(_Server, self.server)
        path = urlsplit(self.path).path
        if path == "/metrics":
            self._reply(HTTPStatus.OK, app.metrics.render(), CONTENT_TYPE_LATEST)
        elif path == "/healthz":
            self._reply(HTTPStatus.OK, b"ok\n")
        elif path == "/readyz":
            ok, reason = _readiness(app.ready)
            status = HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE
            self._reply(status, (reason + "\n").encode("utf-8"))
        else:
            self._reply(HTTPStatus.NOT_FOUND, b"not found: try /metrics, /healthz or /readyz\n")

    def _reply(
        self, status: HTTPStatus, body: bytes, ctype: str = "text/plain; charset=utf-8"
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        """Scrapes every 15 s are not events: no access log."""


def _readiness(ready: Readiness) -> tuple[bool, str]:
    """The injected check; one that raises means "not ready", never a 500 with a traceback."""
    try:
        ok, reason = ready()
    except Exception as exc:
        log.warning(kv("readiness_check_failed", error=f"{type(exc).__name__}: {exc}"))
        return False, f"readiness check failed: {type(exc).__name__}"
    return ok, redact(" ".join(reason.split())) or ("ready" if ok else "not ready")


class HealthServer:
    """``/metrics``, ``/healthz`` and ``/readyz`` on ``[metrics] listen``, in a daemon thread.

    ``/healthz`` answers 200 while the process can answer at all (liveness);
    ``/readyz`` asks ``ready()`` (e.g. database reachable, key not refused) and answers 200
    or 503 with its reason. The listen string is checked here, so a bad one fails at start.
    """

    def __init__(self, listen: str, metrics: Metrics, ready: Readiness) -> None:
        self.host, self._port = parse_listen(listen)
        self.metrics = metrics
        self._ready = ready
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        if not is_loopback(self.host):
            log.warning(
                kv(
                    "metrics_exposed",
                    listen=listen,
                    effect="metrics and health are reachable beyond this host; "
                    "firewall the port or listen on 127.0.0.1",
                )
            )

    @property
    def port(self) -> int:
        """The bound port once started (useful with port 0), else the configured one."""
        return self._port

    def start(self) -> None:
        """Bind and serve; a port in use is a ConfigError naming ``[metrics] listen``."""
        with self._lock:
            if self._server is not None:
                return
            try:
                server = _Server((self.host, self._port), self.metrics, self._ready)
            except OSError as exc:
                raise ConfigError(
                    f"[metrics] listen = {self.host}:{self._port}: cannot listen ({exc.strerror}): "
                    'pick a free port or address, or set listen = "" to disable metrics'
                ) from exc
            self._server = server
            self._port = int(server.server_address[1])
            self._thread = threading.Thread(
                target=server.serve_forever,
                args=(SHUTDOWN_POLL_SECONDS,),
                name="outbox-metrics",
                daemon=True,
            )
            self._thread.start()
        log.info(kv("metrics_listening", host=self.host, port=self._port))

    def stop(self) -> None:
        """Stop serving and close the socket; safe to call twice, or before start()."""
        with self._lock:
            server, thread = self._server, self._thread
            self._server = self._thread = None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(timeout=5)
