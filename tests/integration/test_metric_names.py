"""The alert rules and the dashboard read only metrics a running daemon exports (issue 15): a
renamed metric, or a typo in a rule, fails here instead of leaving an alert that never fires.
A real daemon on SQLite against the simulator, its /metrics fetched over HTTP."""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from outbox.simulator import Simulator
from tests.integration.test_daemon import KEY, daemon_for
from tests.shipped_monitoring import (
    PROMETHEUS_OWN,
    alert_rules,
    dashboard_exprs,
    metric_names,
)

# The series names each type of family exports (the parser drops a counter's _total).
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}


def scrape(sqlite_url: str) -> str:
    """/metrics of a daemon just started (its table gauges, gate and jobs all declared)."""
    with Simulator(api_keys=[KEY]) as sim:
        daemon = daemon_for(sqlite_url, sim.target, listen="127.0.0.1:0")
        daemon.start()
        try:
            assert daemon.health is not None
            url = f"http://127.0.0.1:{daemon.health.port}/metrics"
            with urllib.request.urlopen(url, timeout=10) as answer:
                return str(answer.read().decode())
        finally:
            daemon.shutdown()
            daemon.engine.dispose()


def exported_names(exposition: str) -> set[str]:
    """Every series name the exposition declares: a histogram ``x`` as x_bucket, x_sum and
    x_count, a counter ``x`` as x_total (series of a labelled family count before any event)."""
    names: set[str] = set()
    for family in text_string_to_metric_families(exposition):
        names.update(family.name + s for s in SUFFIXES.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return names


def test_every_metric_a_rule_or_a_panel_reads_is_exported_by_a_running_daemon(
    sqlite_url: str,
) -> None:
    exported = exported_names(scrape(sqlite_url))
    by_rules = metric_names([rule["expr"] for rule in alert_rules()])
    by_panels = metric_names(dashboard_exprs())
    assert {"outbox_submit_seconds_bucket", "outbox_outcomes_total", "up"} <= by_panels
    assert {"outbox_gate", "outbox_job_failing", "up"} <= by_rules
    assert by_rules - PROMETHEUS_OWN - exported == set(), "rules read what no daemon exports"
    assert by_panels - PROMETHEUS_OWN - exported == set(), "panels read what no daemon exports"
