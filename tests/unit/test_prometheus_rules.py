"""The shipped alert rules (packaging/prometheus/outbox-rules.yml, issue 15): promtool accepts
them, each alert fires and stays silent as tests/promtool/outbox-rules.test.yml says, and each
says its severity, what it means and which runbook heading to read."""

from __future__ import annotations

import re
import subprocess
from typing import Any

import yaml

from outbox.gates import GATE_STATES
from outbox.vocabulary import GateState
from tests.shipped_monitoring import RULE_TESTS, RULES, RUNBOOK, alert_rules, promtool

RUNBOOK_BASE = "https://github.com/recrypt/recrypt-outbox/blob/main/docs/operations.md#"
SEVERITIES = {"page", "ticket"}


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)


def test_promtool_accepts_the_rules() -> None:
    done = run(promtool(), "check", "rules", str(RULES))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in done.stdout


def test_every_alert_fires_and_stays_silent_as_its_promtool_tests_say() -> None:
    done = run(promtool(), "test", "rules", str(RULE_TESTS))
    assert done.returncode == 0, done.stdout + done.stderr


def _cases() -> list[dict[str, Any]]:
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    return [case for test in tests for case in test.get("alert_rule_test", ())]


def test_every_alert_has_a_case_that_fires_and_one_that_stays_silent() -> None:
    fires = {c["alertname"] for c in _cases() if c.get("exp_alerts")}
    silent = {c["alertname"] for c in _cases() if c.get("exp_alerts") == []}
    names = {rule["alert"] for rule in alert_rules()}
    assert names - fires == set(), "no case shows these firing"
    assert names - silent == set(), "no case shows these silent"
    assert (fires | silent) - names == set(), "cases for alerts the rules do not have"


def test_every_firing_case_checks_the_labels_and_annotations_it_expects() -> None:
    for case in _cases():
        for alert in case.get("exp_alerts") or ():
            assert alert["exp_labels"]["severity"] in SEVERITIES, case["alertname"]
            assert set(alert["exp_annotations"]) == {"summary", "description", "runbook_url"}


def test_every_alert_has_a_severity_a_summary_a_description_and_a_runbook() -> None:
    for rule in alert_rules():
        name = rule["alert"]
        assert rule["labels"]["severity"] in SEVERITIES, name
        notes = rule["annotations"]
        assert notes["summary"].strip() and "First:" in notes["description"], name
        assert notes["runbook_url"].startswith(RUNBOOK_BASE), name


def github_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives the headings: lower case, punctuation dropped (``-`` and
    ``_`` kept), spaces to ``-``, ``-1``, ``-2``… on repeats; code blocks are not headings."""
    anchors: set[str] = set()
    fenced = False
    for line in markdown.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        heading = None if fenced else re.match(r"#{1,6} +(.+?) *#*$", line)
        if heading is None:
            continue
        slug = re.sub(r"[^\w\- ]", "", heading.group(1).lower()).replace(" ", "-")
        repeat = 0
        while (slug if repeat == 0 else f"{slug}-{repeat}") in anchors:
            repeat += 1
        anchors.add(slug if repeat == 0 else f"{slug}-{repeat}")
    return anchors


def test_github_anchors_follow_githubs_rules() -> None:
    text = "# A `b`: C_D\n```\n# not a heading\n```\n## Metrics\n### Metrics\n"
    assert github_anchors(text) == {"a-b-c_d", "metrics", "metrics-1"}


def test_every_runbook_link_is_a_heading_of_operations_md() -> None:
    anchors = github_anchors(RUNBOOK.read_text())
    for rule in alert_rules():
        anchor = rule["annotations"]["runbook_url"].removeprefix(RUNBOOK_BASE)
        assert anchor in anchors, f"{rule['alert']}: no heading #{anchor} in docs/operations.md"


def test_every_gate_that_closes_has_an_alert() -> None:
    closing = set(GATE_STATES) - {GateState.OPEN}
    alerted = {g for rule in alert_rules() for g in re.findall(r'gate="(\w+)"', rule["expr"])}
    assert alerted == closing


def test_the_runbook_lists_every_alert() -> None:
    text = RUNBOOK.read_text()
    for rule in alert_rules():
        assert f"`{rule['alert']}`" in text, rule["alert"]
