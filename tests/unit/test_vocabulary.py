"""Every word that crosses a boundary is defined once, and the runbook knows each of them."""

from __future__ import annotations

from pathlib import Path

from outbox.gates import GATE_STATES
from outbox.policy import Action, ParkReason
from outbox.vocabulary import HistoryDecision, HistoryKind

RUNBOOK = (Path(__file__).resolve().parents[2] / "docs" / "operations.md").read_text()


def test_every_action_is_a_history_decision() -> None:
    assert {a.value for a in Action} <= {d.value for d in HistoryDecision}


def test_the_runbook_explains_every_history_word() -> None:
    missing = [w for w in (*HistoryDecision, *HistoryKind) if f"`{w}`" not in RUNBOOK]
    assert not missing, f"docs/operations.md does not explain {missing}"


def test_the_runbook_has_a_section_for_every_park_reason() -> None:
    missing = [r for r in ParkReason if f"### `{r}`" not in RUNBOOK]
    assert not missing, f"docs/operations.md section 6 lacks {missing}"


def test_the_runbook_names_every_gate_state() -> None:
    missing = [g for g in GATE_STATES if f"`{g}`" not in RUNBOOK]
    assert not missing, f"docs/operations.md does not name the gate states {missing}"
