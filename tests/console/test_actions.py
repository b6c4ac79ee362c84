"""The console's bulk actions, holds and dual control over real HTTP (issue 14, point 2):
operators only, CSRF on every POST, the preview's count is what the action takes, and a
request is decided by a different operator only."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from outbox import tracing
from outbox.filters import RowFilter
from outbox.store import Store
from tests.console.conftest import csrf_of, logged_in
from tests.console.harness import Seeded, serving, settings_for

POSTS = [
    "/rows/selected",
    "/rows/matching/preview",
    "/rows/matching",
    "/holds/hold",
    "/holds/release",
    "/approvals/approve",
    "/approvals/reject",
]
FORM = {
    "action": "requeue",
    "state": "parked",
    "reason": "test",
    "kind": "lane",
    "value": "acme-trading",
    "id": "1",
}


@pytest.mark.parametrize("path", POSTS)
def test_a_viewer_is_refused_every_new_action(
    viewer: httpx.Client, seeded: Seeded, path: str
) -> None:
    token = csrf_of(viewer.get("/rows").text)
    answer = viewer.post(path, data={**FORM, "key": seeded.precondition, "csrf": token})
    assert answer.status_code == 403, answer.text


@pytest.mark.parametrize("path", POSTS)
def test_a_missing_or_wrong_csrf_token_is_refused(
    operator: httpx.Client, store: Store, seeded: Seeded, path: str
) -> None:
    for token in ({}, {"csrf": "forged"}):
        answer = operator.post(path, data={**FORM, "key": seeded.precondition, **token})
        assert answer.status_code == 403, answer.text
    assert store.get(seeded.precondition).state == "parked" and not store.holds()


def test_the_rows_page_offers_the_bulk_actions_to_an_operator_only(
    operator: httpx.Client, viewer: httpx.Client
) -> None:
    page = operator.get("/rows", params={"state": "parked"}).text
    assert "Requeue selected" in page and "Requeue all matching" in page
    page = viewer.get("/rows", params={"state": "parked"}).text
    assert "Requeue selected" not in page and "all matching" not in page


def test_requeue_the_rows_ticked(operator: httpx.Client, store: Store, seeded: Seeded) -> None:
    token = csrf_of(operator.get("/rows").text)
    keys = [seeded.precondition, seeded.marked, seeded.pending]
    data = {"csrf": token, "action": "requeue", "reason": "fixed upstream", "key": keys}
    answer = operator.post("/rows/selected", data=data)
    assert answer.status_code == 200, answer.text
    assert {store.get(k).state for k in keys[:2]} == {"pending"}
    assert "2</strong> of" in answer.text and "1 skipped" in answer.text
    assert store.history(seeded.precondition)[-1].actor == "olga@console"


def test_the_preview_count_is_what_the_action_takes(
    operator: httpx.Client, store: Store, seeded: Seeded
) -> None:
    wanted = {"state": "parked", "park_reason": "precondition"}
    page = operator.get("/rows", params=wanted).text
    preview = operator.post(
        "/rows/matching/preview", data={**wanted, "csrf": csrf_of(page), "action": "requeue"}
    )
    assert preview.status_code == 200, preview.text
    count = store.count_rows(RowFilter(state="parked", park_reason="precondition"))
    assert count == 2 and f'class="matched">{count}<' in preview.text
    assert store.get(seeded.precondition).state == "parked"  # a preview writes nothing
    confirm = {**wanted, "csrf": csrf_of(preview.text), "action": "requeue", "reason": "fixed"}
    done = operator.post("/rows/matching", data=confirm)
    assert done.status_code == 200 and f'class="acted">{count}<' in done.text
    assert {store.get(k).state for k in (seeded.precondition, seeded.lane_head)} == {"pending"}
    assert store.get(seeded.marked).state == "parked"


def test_acting_on_every_row_or_on_nothing_is_refused(operator: httpx.Client) -> None:
    token = csrf_of(operator.get("/rows").text)
    data = {"csrf": token, "action": "cancel", "reason": "all"}
    assert operator.post("/rows/matching/preview", data=data).status_code == 400
    assert operator.post("/rows/matching", data=data).status_code == 400
    assert operator.post("/rows/selected", data=data).status_code == 400  # nothing ticked
    wrong = {**data, "method": "Transfer"}  # the bulk filter wants Service/Method
    answer = operator.post("/rows/matching/preview", data=wrong)
    assert answer.status_code == 400 and "Service/Method" in answer.text


def test_hold_and_release_a_lane(operator: httpx.Client, store: Store, seeded: Seeded) -> None:
    token = csrf_of(operator.get("/lanes").text)
    hold = {"csrf": token, "kind": "lane", "value": "acme-trading", "reason": "reconciling"}
    assert operator.post("/holds/hold", data=hold).status_code == 303
    assert [(h.value, h.actor) for h in store.holds()] == [("acme-trading", "olga@console")]
    for page in ("/holds", "/", f"/row?key={seeded.lane_head}"):
        assert "reconciling" in operator.get(page).text
    assert operator.post("/holds/hold", data=hold).status_code == 409  # already held
    assert operator.post("/holds/hold", data={**hold, "reason": " "}).status_code == 400
    method = {**hold, "kind": "method", "value": "Wallet/Transfer"}
    assert operator.post("/holds/hold", data=method).status_code == 400  # a full path only
    assert operator.post("/holds/release", data={**hold, "reason": "done"}).status_code == 303
    assert not store.holds()


def test_dual_control_same_operator_cannot_approve(
    store: Store, seeded: Seeded, tmp_path: Path
) -> None:
    with serving(store, settings_for(tmp_path, dual_control=True)) as url:
        olga, otto = logged_in(url, "olga"), logged_in(url, "otto")
        token = csrf_of(olga.get(f"/row?key={seeded.unknown}").text)
        data = {"key": seeded.unknown, "csrf": token, "reason": "refunded", "force": "yes"}
        answer = olga.post("/row/cancel", data=data)
        assert answer.status_code == 303 and store.get(seeded.unknown).state == "parked"
        (request,) = store.approvals()
        assert request.requested_by == "olga@console"

        page = olga.get("/approvals").text
        assert "refunded" in page and "Approve" not in page
        forged = {"csrf": csrf_of(page), "id": str(request.id), "reason": "me too"}
        assert olga.post("/approvals/approve", data=forged).status_code == 403
        assert store.get(seeded.unknown).state == "parked"

        page = otto.get("/approvals").text
        assert "Approve" in page
        decide = {"csrf": csrf_of(page), "id": str(request.id), "reason": "checked"}
        assert otto.post("/approvals/approve", data=decide).status_code == 303
    assert store.get(seeded.unknown).state == "cancelled"
    assert [h.decision for h in store.history(seeded.unknown)][-2:] == [
        "cancel_requested",
        "cancel_approved",
    ]


def test_dual_control_reject_leaves_the_row(store: Store, seeded: Seeded, tmp_path: Path) -> None:
    with serving(store, settings_for(tmp_path, dual_control=True)) as url:
        olga, otto = logged_in(url, "olga"), logged_in(url, "otto")
        token = csrf_of(olga.get("/rows").text)
        data = {"csrf": token, "action": "cancel", "reason": "r", "force": "yes"}
        answer = olga.post("/rows/selected", data={**data, "key": [seeded.unknown]})
        assert "requested (dual control)" in answer.text
        (request,) = store.approvals()
        page = otto.get("/approvals").text
        decide = {"csrf": csrf_of(page), "id": str(request.id), "reason": "not refunded"}
        assert otto.post("/approvals/reject", data=decide).status_code == 303
    assert store.get(seeded.unknown).state == "parked" and not store.approvals()
    assert store.history(seeded.unknown)[-1].decision == "cancel_rejected"


def test_a_forced_cancel_without_dual_control_cancels(
    operator: httpx.Client, store: Store, seeded: Seeded
) -> None:
    token = csrf_of(operator.get(f"/row?key={seeded.unknown}").text)
    data = {"key": seeded.unknown, "csrf": token, "reason": "gone", "force": "yes"}
    assert operator.post("/row/cancel", data=data).status_code == 303
    assert store.get(seeded.unknown).state == "cancelled" and not store.approvals()


def test_a_console_action_makes_its_span_with_the_console_user(
    store: Store, seeded: Seeded, tmp_path: Path
) -> None:
    """``outbox console`` serves the CLI's store (``Outbox.store()``), whose operator actions
    make spans: here with an in-memory exporter, the user as the actor, no reason text."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    traced = Store(store.engine, actions=tracing.with_provider(provider).action)
    with serving(traced, settings_for(tmp_path)) as url:
        operator = logged_in(url, "olga")
        token = csrf_of(operator.get("/rows").text)
        data = {"csrf": token, "action": "requeue", "reason": "WHY-console"}
        answer = operator.post("/rows/selected", data=data | {"key": [seeded.precondition]})
        operator.close()
    assert answer.status_code == 200, answer.text
    (span,) = exporter.get_finished_spans()
    attributes = dict(span.attributes or {})
    assert (span.name, attributes["outbox.actor"]) == ("outbox requeue", "olga@console")
    assert attributes["outbox.rows.acted"] == 1
    assert not [v for v in attributes.values() if "WHY" in str(v)]
