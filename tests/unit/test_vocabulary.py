"""Every word that crosses a boundary is defined once; each has a metric series where it is
counted, and the runbook explains it. A new member without either fails here."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from outbox.gates import _RANK, GATE_STATES, SENDS_NOTHING
from outbox.health import JOBS
from outbox.metrics import Metrics
from outbox.vocabulary import (
    Action,
    Code,
    Gate,
    GateState,
    HistoryDecision,
    HistoryKind,
    HoldKind,
    ParkReason,
    RowOutcome,
    State,
)

RUNBOOK = (Path(__file__).resolve().parents[2] / "docs" / "operations.md").read_text()

#: (metric, label, the vocabulary whose every member must have a series)
SERIES = [
    ("outbox_rows", "state", State),
    ("outbox_gate", "gate", GateState),
    ("outbox_parked_rows_by_reason", "reason", ParkReason),
    ("outbox_attempts_total", "code", Code),
    ("outbox_outcomes_total", "outcome", RowOutcome),
    ("outbox_job_failing", "job_name", JOBS),
    ("outbox_holds", "kind", HoldKind),
]


def _series(metric: str, label: str) -> set[str]:
    text = Metrics().render().decode()
    return set(re.findall(rf'^{metric}\{{{label}="([^"]+)"\}}', text, re.M))


@pytest.mark.parametrize(("metric", "label", "words"), SERIES, ids=[s[0] for s in SERIES])
def test_every_member_has_a_metric_series_from_the_start(metric, label, words) -> None:
    missing = {str(w) for w in words} - _series(metric, label)
    assert not missing, f"{metric} has no series for {sorted(missing)}"


def test_every_action_is_a_history_decision() -> None:
    assert {a.value for a in Action} <= {d.value for d in HistoryDecision}


def test_every_gate_that_closes_the_whole_api_is_a_gate_state() -> None:
    per_method = {Gate.NONE, Gate.METHOD_REMOVED}
    assert {g.value for g in Gate} - {g.value for g in per_method} == set(GATE_STATES) - {"open"}
    assert set(_RANK) == set(GATE_STATES)
    assert set(SENDS_NOTHING) < set(GATE_STATES)


def test_the_runbook_explains_every_history_word() -> None:
    missing = [w for w in (*HistoryDecision, *HistoryKind) if f"`{w}`" not in RUNBOOK]
    assert not missing, f"docs/operations.md does not explain {missing}"


def test_the_runbook_has_a_section_for_every_park_reason() -> None:
    missing = [r for r in ParkReason if f"### `{r}`" not in RUNBOOK]
    assert not missing, f"docs/operations.md section 6 lacks {missing}"


def test_the_runbook_names_every_gate_state() -> None:
    missing = [g for g in GATE_STATES if f"`{g}`" not in RUNBOOK]
    assert not missing, f"docs/operations.md does not name the gate states {missing}"


def test_the_runbook_names_every_row_state_and_outcome() -> None:
    missing = [w for w in (*State, *RowOutcome) if f"`{w}`" not in RUNBOOK]
    assert not missing, f"docs/operations.md does not name {missing}"
