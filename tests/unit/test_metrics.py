"""Metrics scraped over real HTTP from HealthServer and parsed as Prometheus would."""

from __future__ import annotations

import logging
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from outbox import __version__
from outbox.errors import ConfigError
from outbox.metrics import GATES, HealthServer, Metrics


class Readiness:
    """The injected readiness check, flipped by the test."""

    def __init__(self) -> None:
        self.answer: tuple[bool, str] = (True, "ready")

    def __call__(self) -> tuple[bool, str]:
        return self.answer


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
def readiness() -> Readiness:
    return Readiness()


@pytest.fixture
def server(metrics: Metrics, readiness: Readiness) -> Iterator[HealthServer]:
    s = HealthServer("127.0.0.1:0", metrics, readiness)
    s.start()
    yield s
    s.stop()


def get(server: HealthServer, path: str) -> tuple[int, str, str]:
    """(status, content type, body) — HTTP errors are answers here, not exceptions."""
    url = f"http://127.0.0.1:{server.port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as err:
        with err:
            return err.code, err.headers["Content-Type"], err.read().decode()


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples_of(exposition: str) -> Samples:
    """Every sample as {(name, sorted labels): value}, through the Prometheus text parser."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(exposition)
        for s in family.samples
    }


def scrape(server: HealthServer) -> Samples:
    """Every sample ``/metrics`` serves (``samples_of``)."""
    status, ctype, body = get(server, "/metrics")
    assert status == 200
    assert ctype.startswith("text/plain; version=")
    return samples_of(body)


def test_port_zero_binds_a_real_port(server: HealthServer) -> None:
    assert server.port > 0


def test_fresh_metrics_have_every_series_at_zero(server: HealthServer) -> None:
    samples = scrape(server)
    assert samples[("outbox_attempts_total", (("code", "UNAVAILABLE"),))] == 0
    assert samples[("outbox_outcomes_total", (("outcome", "parked"),))] == 0
    assert samples[("outbox_rows", (("state", "pending"),))] == 0
    assert samples[("outbox_gate", (("gate", "open"),))] == 1
    assert samples[("outbox_up", (("version", __version__),))] == 1


TRANSFER = "/recrypt.wallet.v1.Wallet/Transfer"


def test_values_after_observations(metrics: Metrics, server: HealthServer) -> None:
    metrics.know_methods([TRANSFER])
    metrics.observe_call("OK", 0.004, TRANSFER)
    metrics.observe_call("OK", 0.2, TRANSFER)
    metrics.observe_call("UNAVAILABLE", 3.0, TRANSFER)
    metrics.observe_outcome("committed")
    metrics.observe_outcome("committed")
    metrics.observe_outcome("retry")
    metrics.set_gate("maintenance")
    metrics.set_table({"pending": 7, "parked": 2, "committed": 40}, 12.5, 2, 1)
    metrics.cycle_done(1_700_000_000.25)

    samples = scrape(server)
    assert samples[("outbox_attempts_total", (("code", "OK"),))] == 2
    assert samples[("outbox_attempts_total", (("code", "UNAVAILABLE"),))] == 1
    assert samples[("outbox_outcomes_total", (("outcome", "committed"),))] == 2
    assert samples[("outbox_outcomes_total", (("outcome", "retry"),))] == 1
    ok = (("code", "OK"), ("method", TRANSFER))
    unavailable = (("code", "UNAVAILABLE"), ("method", TRANSFER))
    assert samples[("outbox_submit_seconds_count", ok)] == 2
    assert samples[("outbox_submit_seconds_sum", ok)] == pytest.approx(0.204)
    assert samples[("outbox_submit_seconds_bucket", (*ok[:1], ("le", "0.005"), ok[1]))] == 1
    assert samples[("outbox_submit_seconds_bucket", (*ok[:1], ("le", "0.25"), ok[1]))] == 2
    assert samples[("outbox_submit_seconds_count", unavailable)] == 1
    for gate in GATES:
        assert samples[("outbox_gate", (("gate", gate),))] == (gate == "maintenance")
    assert samples[("outbox_rows", (("state", "pending"),))] == 7
    assert samples[("outbox_rows", (("state", "inflight"),))] == 0
    assert samples[("outbox_rows", (("state", "committed"),))] == 40
    assert samples[("outbox_oldest_due_seconds", ())] == 12.5
    assert samples[("outbox_parked_rows", ())] == 2
    assert samples[("outbox_lanes_blocked", ())] == 1
    assert samples[("outbox_last_cycle_timestamp_seconds", ())] == 1_700_000_000.25


def test_parked_rows_are_counted_by_reason(metrics: Metrics, server: HealthServer) -> None:
    by_reason = {"precondition": 3, "unknown_outcome": 1, "a-reason-from-a-newer-version": 2}
    metrics.set_table({"parked": 6}, None, 6, 0, by_reason)

    samples = scrape(server)
    assert samples[("outbox_parked_rows_by_reason", (("reason", "precondition"),))] == 3
    assert samples[("outbox_parked_rows_by_reason", (("reason", "unknown_outcome"),))] == 1
    assert samples[("outbox_parked_rows_by_reason", (("reason", "bad_row"),))] == 0
    assert samples[("outbox_parked_rows_by_reason", (("reason", "other"),))] == 2


def test_labels_never_carry_free_text(metrics: Metrics, server: HealthServer) -> None:
    secret = "key-3f9a-customer-42"
    metrics.observe_call(secret, 0.01)
    metrics.observe_outcome(secret)
    metrics.set_gate(secret)
    metrics.set_table({secret: 5}, None, 0, 0)
    samples = scrape(server)
    assert secret not in get(server, "/metrics")[2]
    assert samples[("outbox_attempts_total", (("code", "other"),))] == 1
    assert samples[("outbox_outcomes_total", (("outcome", "other"),))] == 1
    assert all(samples[("outbox_gate", (("gate", g),))] == 0 for g in GATES)
    assert samples[("outbox_oldest_due_seconds", ())] == 0


def test_two_metrics_objects_do_not_clash() -> None:
    a, b = Metrics(), Metrics()
    a.observe_outcome("parked")
    assert b'outbox_outcomes_total{outcome="parked"} 0.0' in b.render()


def test_healthz(server: HealthServer) -> None:
    assert get(server, "/healthz")[::2] == (200, "ok\n")


def test_readyz_follows_the_injected_check(server: HealthServer, readiness: Readiness) -> None:
    assert get(server, "/readyz")[::2] == (200, "ready\n")
    readiness.answer = (False, "database unreachable")
    assert get(server, "/readyz")[::2] == (503, "database unreachable\n")
    readiness.answer = (False, "halted: API key refused")
    assert get(server, "/readyz")[::2] == (503, "halted: API key refused\n")


def test_readyz_check_that_raises_is_not_ready(metrics: Metrics) -> None:
    def broken() -> tuple[bool, str]:
        raise RuntimeError("boom")

    s = HealthServer("127.0.0.1:0", metrics, broken)
    s.start()
    try:
        status, _, body = get(s, "/readyz")
    finally:
        s.stop()
    assert (status, body) == (503, "readiness check failed: RuntimeError\n")


@pytest.mark.parametrize("path", ["/", "/metricsx", "/favicon.ico"])
def test_unknown_path_is_404(server: HealthServer, path: str) -> None:
    assert get(server, path)[0] == 404


def test_stop_twice_and_before_start(metrics: Metrics, readiness: Readiness) -> None:
    s = HealthServer("127.0.0.1:0", metrics, readiness)
    s.stop()
    s.start()
    port = s.port
    s.stop()
    s.stop()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2)


def test_port_in_use_is_a_config_error(server: HealthServer, metrics: Metrics) -> None:
    other = HealthServer(f"127.0.0.1:{server.port}", metrics, Readiness())
    with pytest.raises(ConfigError, match=r"\[metrics\] listen"):
        other.start()


@pytest.mark.parametrize(
    "listen", ["", "9464", "127.0.0.1", "127.0.0.1:", ":9464", "host:http", "127.0.0.1:70000"]
)
def test_bad_listen_is_a_config_error(metrics: Metrics, listen: str) -> None:
    with pytest.raises(ConfigError, match=r"\[metrics\] listen .*host:port"):
        HealthServer(listen, metrics, Readiness())


def test_ipv6_loopback(metrics: Metrics, readiness: Readiness) -> None:
    s = HealthServer("[::1]:0", metrics, readiness)
    try:
        s.start()
    except ConfigError:
        pytest.skip("no IPv6 loopback here")
    try:
        with urllib.request.urlopen(f"http://[::1]:{s.port}/healthz", timeout=5) as r:
            assert r.status == 200
    finally:
        s.stop()


def test_non_loopback_listen_warns(metrics: Metrics, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="outbox.metrics"):
        HealthServer("0.0.0.0:0", metrics, Readiness())
        HealthServer("localhost:0", metrics, Readiness())
    assert [r.getMessage().split()[0] for r in caplog.records] == ["event=metrics_exposed"]


def test_every_gate_state_has_a_series_at_zero() -> None:
    """The unreachable gate once had no series: during a network outage every series read 0."""
    from outbox.gates import GATE_STATES
    from outbox.policy import Gate

    registry = Metrics().registry
    exported = {
        s.labels["gate"]
        for metric in registry.collect()
        if metric.name == "outbox_gate"
        for s in metric.samples
    }
    whole_api = {str(g) for g in Gate} - {str(Gate.NONE), str(Gate.METHOD_REMOVED)}
    assert exported == set(GATE_STATES) == whole_api | {"open"}


def test_a_call_of_an_unknown_method_or_code_is_counted_under_other(
    metrics: Metrics, server: HealthServer
) -> None:
    """Labels never carry a row's text: a method outside the catalog, or a code name gRPC does
    not have, is ``other``; so is every method before the catalog is known."""
    metrics.observe_call("OK", 0.01, "/evil.Svc/<script>")
    metrics.know_methods([TRANSFER])
    metrics.observe_call("NOT_A_CODE", 0.01, TRANSFER)
    metrics.observe_call("OK", 0.01, "/recrypt.wallet.v1.Wallet/Other")

    samples = scrape(server)
    assert samples[("outbox_submit_seconds_count", (("code", "OK"), ("method", "other")))] == 2
    assert samples[("outbox_submit_seconds_count", (("code", "other"), ("method", TRANSFER)))] == 1
    assert not [k for k in samples if "<script>" in repr(k)]


def test_waits_to_first_send_and_to_commit(metrics: Metrics, server: HealthServer) -> None:
    metrics.know_methods([TRANSFER])
    metrics.observe_waited(TRANSFER, first_send=0.03, committed=None)
    metrics.observe_waited(TRANSFER, first_send=None, committed=90.0)
    metrics.observe_waited("/unknown/Method", first_send=-1.0, committed=None)  # clocks apart

    samples = scrape(server)
    method = (("method", TRANSFER),)
    assert samples[("outbox_enqueue_to_first_send_seconds_count", method)] == 1
    assert samples[("outbox_enqueue_to_first_send_seconds_sum", method)] == pytest.approx(0.03)
    assert samples[("outbox_enqueue_to_committed_seconds_count", method)] == 1
    assert samples[("outbox_enqueue_to_committed_seconds_bucket", (("le", "60.0"), *method))] == 0
    assert samples[("outbox_enqueue_to_committed_seconds_bucket", (("le", "120.0"), *method))] == 1
    other = (("method", "other"),)
    assert samples[("outbox_enqueue_to_first_send_seconds_sum", other)] == 0.0  # never negative
