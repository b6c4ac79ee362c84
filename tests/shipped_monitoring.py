"""The alert rules and the Grafana dashboard the project ships (packaging/prometheus,
packaging/grafana), read once for the tests that check them: their PromQL, the metric names it
reads, and promtool (Debian's `prometheus` package; `.ci/run` installs it). Without promtool
the tests that need it fail when ``CI`` is true and skip otherwise, like the browser tests."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "packaging" / "prometheus" / "outbox-rules.yml"
RULE_TESTS = ROOT / "tests" / "promtool" / "outbox-rules.test.yml"
DASHBOARD = ROOT / "packaging" / "grafana" / "outbox.json"
RUNBOOK = ROOT / "docs" / "operations.md"
IN_CI = os.environ.get("CI", "").lower() in ("true", "1")

# A metric name in PromQL: ours (outbox_…), or Prometheus's own per-target `up`.
_METRIC = re.compile(r"\b(?:outbox_[a-z_]+|up)\b")
PROMETHEUS_OWN = frozenset({"up"})
# What Grafana substitutes before a query reaches Prometheus, with values PromQL accepts.
_GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$instance": ".*"}


def promtool() -> str:
    """The promtool executable; skips the test without one, or fails it in CI."""
    found = shutil.which("promtool")
    if found:
        return found
    message = (
        "no promtool: apt-get install --no-install-recommends prometheus "
        "(Debian's package, as .ci/run does)"
    )
    if IN_CI:
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def alert_rules() -> list[dict[str, Any]]:
    """Every alerting rule in the shipped rules file, across its groups."""
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def panels() -> list[dict[str, Any]]:
    """The dashboard's panels, those inside collapsed rows included."""
    top = dashboard()["panels"]
    return [p for panel in top for p in (panel, *panel.get("panels", ())) if p["type"] != "row"]


def dashboard_exprs() -> list[str]:
    """Every PromQL query of the dashboard: its panels' targets and its variables' queries."""
    exprs = [target["expr"] for panel in panels() for target in panel["targets"]]
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            exprs.append(variable["definition"])
    return exprs


def as_promql(expr: str) -> str:
    """A dashboard query as Prometheus receives it: Grafana's variables substituted, and
    Grafana's own ``label_values(selector, label)`` (a variable's values) as its selector."""
    for variable, value in _GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    return re.sub(r"^label_values\((.+),\s*\w+\)$", r"\1", expr.strip())


def metric_names(exprs: list[str]) -> set[str]:
    """The metric names the expressions read (label names and values never match)."""
    names: set[str] = set()
    for expr in exprs:
        without_strings = re.sub(r'"[^"]*"', '""', expr)
        names.update(_METRIC.findall(without_strings))
    return names
