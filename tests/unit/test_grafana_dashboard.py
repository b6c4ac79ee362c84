"""The shipped Grafana dashboard (packaging/grafana/outbox.json, issue 15): JSON Grafana 10
imports, on a templated Prometheus datasource and an ``instance`` variable, every panel with a
query, every query PromQL that promtool parses, and the panels the issue asks for."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import yaml

from tests.shipped_monitoring import (
    DASHBOARD,
    as_promql,
    dashboard,
    dashboard_exprs,
    metric_names,
    panels,
    promtool,
)

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


def test_the_dashboard_is_json_with_a_prometheus_datasource_and_an_instance_variable() -> None:
    json.loads(DASHBOARD.read_text())  # raises on anything but JSON
    board = dashboard()
    assert board["uid"] and board["title"] and board["schemaVersion"] >= 36  # Grafana 10
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    instance = variables["instance"]
    assert instance["datasource"] == DATASOURCE and instance["includeAll"] and instance["multi"]


def test_every_panel_has_a_query_on_the_templated_datasource() -> None:
    found = panels()
    assert len({p["id"] for p in found}) == len(found), "panel ids repeat"
    for panel in found:
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], f"{panel['title']}: no query"
        for target in panel["targets"]:
            assert target["expr"].strip() and target["datasource"] == DATASOURCE, panel["title"]
            assert 'instance=~"$instance"' in target["expr"], panel["title"]


def test_no_two_panels_overlap() -> None:
    taken: dict[tuple[int, int], str] = {}
    for panel in panels():
        g = panel["gridPos"]
        assert g["x"] + g["w"] <= 24, panel["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in taken, f"{panel['title']} overlaps {taken.get((x, y))}"
                taken[(x, y)] = panel["title"]


def test_every_query_is_promql_that_promtool_parses(tmp_path: Path) -> None:
    """Each query, as Grafana sends it, becomes a recording rule for `promtool check rules`."""
    rules = [
        {"record": f"dashboard:query_{n}", "expr": as_promql(expr)}
        for n, expr in enumerate(dashboard_exprs())
    ]
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    done = subprocess.run(
        [promtool(), "check", "rules", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_panels_the_issue_asks_for_are_there() -> None:
    read = metric_names(dashboard_exprs())
    assert {
        "outbox_outcomes_total",  # throughput by outcome
        "outbox_gate",  # gates over time
        "outbox_parked_rows_by_reason",
        "outbox_oldest_due_seconds",
        "outbox_submit_seconds_bucket",  # call latency
        "outbox_enqueue_to_first_send_seconds_bucket",
        "outbox_enqueue_to_committed_seconds_bucket",
        "outbox_heartbeat_timestamp_seconds",  # per-daemon heartbeat age
        "outbox_last_cycle_timestamp_seconds",
        "outbox_workers_silent",
        "outbox_holds",
        "outbox_unrecorded_answers",
    } <= read
    latency = [e for e in dashboard_exprs() if "outbox_submit_seconds_bucket" in e]
    assert {e.split(",")[0] for e in latency} == {
        f"histogram_quantile({q}" for q in ("0.5", "0.95", "0.99")
    }
