"""The command line in an incident (issue 14 point 4): list says "N of M" and pages by
cursor, filters as printed, show finds a row by prefix or reference, requeue/cancel act on
keys or a filter (preview, confirmation, --yes, --json), the OS user acts, holds, dual
control. In process (CliRunner), on SQLite, PostgreSQL and MariaDB."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy.engine import Engine

from outbox.cli import actions
from tests.integration.test_cli import CANCEL_ORDER, Cli, park


@pytest.fixture
def cli(db_url: str) -> Cli:
    return Cli(db_url)


def test_list_says_how_many_match_and_pages_by_cursor(cli: Cli, engine: Engine) -> None:
    keys = [cli.enqueue("--reference", "inv-1") for _ in range(5)]
    first = cli.json("list", "--reference", "inv-1", "--limit", "2")
    assert (first["total"], len(first["rows"])) == (5, 2)
    second = cli.json(
        "list", "--reference", "inv-1", "--limit", "2", "--after", first["next_cursor"]
    )
    shown = [r["idempotency_key"] for r in first["rows"] + second["rows"]]
    assert shown == keys[::-1][:4]

    out = cli.invoke("list", "--limit", "2", COLUMNS="200").stdout
    assert "2 of 5 rows, newest first" in out
    assert f"--after {first['next_cursor']}" in out


def test_list_filters_by_the_method_as_printed(cli: Cli, engine: Engine) -> None:
    cli.enqueue()
    order = cli.enqueue(method=CANCEL_ORDER, payload={"account": "A", "order_id": "o-1"})
    park(engine, order, maybe_executed=False, reason="method_removed")
    listed = cli.json("list", "--method", "Market/CancelOrder")
    assert [r["idempotency_key"] for r in listed["rows"]] == [order]
    assert cli.json("list", "--park-reason", "method_removed", "--state", "parked")["total"] == 1


def test_show_takes_a_prefix_any_case_or_a_reference(cli: Cli) -> None:
    key = cli.enqueue("--reference", "order-77")
    assert cli.json("show", key[:10].upper())["row"]["idempotency_key"] == key
    assert cli.json("show", "order-77")["row"]["idempotency_key"] == key
    other = cli.enqueue("--reference", "order-77")
    refused = cli.invoke("show", "order-77", code=1)
    assert key in refused.stderr and other in refused.stderr and "matches 2" in refused.stderr


def test_a_filter_action_previews_and_needs_yes_outside_a_terminal(
    cli: Cli, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = [cli.enqueue() for _ in range(3)]
    for key in keys:
        park(engine, key, maybe_executed=False)
    why = ("--reason", "compliance answered (OPS-1)")

    dry = cli.json("requeue", "--park-reason", "precondition", "--dry-run", *why)
    assert (dry["dry_run"], dry["matched"], dry["acted"]) == (True, 3, [])
    refused = cli.invoke("requeue", "--park-reason", "precondition", *why, code=1)
    assert "would requeue 3 rows" in refused.stderr and "--yes" in refused.stderr

    monkeypatch.setattr(actions, "interactive", lambda: True)
    declined = cli.invoke("requeue", "--park-reason", "precondition", *why, input="n\n", code=1)
    assert "requeue 3 rows matching park_reason=precondition?" in declined.stderr
    assert cli.json("list", "--state", "parked")["total"] == 3

    done = cli.json("requeue", "--park-reason", "precondition", "--yes", *why)
    assert sorted(done["acted"]) == sorted(keys) and done["skipped"] == []
    assert done["actor"].startswith("root@") or "@" in done["actor"]


def test_requeue_and_cancel_take_several_keys_and_report_each(cli: Cli, engine: Engine) -> None:
    parked, pending = cli.enqueue(), cli.enqueue()
    park(engine, parked, maybe_executed=False)
    result = cli.invoke("requeue", parked, pending, "--reason", "again", code=0)
    assert f"{parked} requeued by" in result.stdout
    assert f"skipped {pending}: is pending, not parked" in result.stderr
    assert "requeued 1, skipped 1" in result.stdout

    done = cli.json("cancel", parked, pending, "--reason", "obsolete")
    assert sorted(done["acted"]) == sorted([parked, pending])


def test_actor_is_the_os_user_and_cannot_be_typed_in(cli: Cli) -> None:
    key = cli.enqueue()
    refused = cli.invoke("cancel", key, "--reason", "x", "--actor", "mallory", code=2)
    assert "--actor is no longer accepted" in refused.stderr
    cli.invoke("cancel", key, "--reason", "obsolete", SUDO_USER="carol")
    (line,) = cli.json("show", key)["history"]
    assert line["actor"].startswith("carol@")


def test_dual_control_needs_a_second_operator(cli: Cli, engine: Engine, tmp_path: Path) -> None:
    config = tmp_path / "outbox.toml"
    config.write_text("[console]\ndual_control = true\n")
    cli.env["OUTBOX_CONFIG"] = str(config)
    key = cli.enqueue()
    park(engine, key, maybe_executed=True)

    asked = cli.invoke(
        "cancel", key, "--force", "--reason", "not on recrypt.net", SUDO_USER="alice"
    )
    assert "cancel requested as #" in asked.stdout
    assert cli.json("show", key)["row"]["state"] == "parked"
    (request,) = cli.json("approvals")["approvals"]
    same = cli.invoke("approve", str(request["id"]), "--reason", "ok", SUDO_USER="alice", code=1)
    assert "second, different operator" in same.stderr

    cli.invoke("approve", str(request["id"]), "--reason", "checked", SUDO_USER="bob")

    shown = cli.json("show", key)
    assert shown["row"]["state"] == "cancelled"
    assert [h["decision"] for h in shown["history"]] == ["cancel_requested", "cancel_approved"]
    assert [h["actor"].split("@")[0] for h in shown["history"]] == ["alice", "bob"]


def test_hold_release_and_holds_are_shown_in_status_and_check(cli: Cli) -> None:
    cli.invoke("hold", "lane", "acc-1", "--reason", "reconciling", SUDO_USER="alice")
    cli.invoke("hold", "method", "Market/PlaceOrder", "--reason", "market halted")
    (lane, method) = sorted(cli.json("holds")["holds"], key=lambda h: h["kind"])
    assert (lane["value"], lane["reason"]) == ("acc-1", "reconciling")
    assert method["value"] == "/recrypt.market.v1.Market/PlaceOrder"
    assert [h["value"] for h in cli.json("status")["holds"]] == ["acc-1", method["value"]]
    assert "lane acc-1 held by alice@" in cli.invoke("status").stdout
    assert "method Market/PlaceOrder held by" in cli.invoke("check", code=1).stdout

    cli.invoke("release", "lane", "acc-1", "--reason", "done")
    again = cli.invoke("release", "lane", "acc-1", "--reason", "done", code=1)
    assert "is not held" in again.stderr
    assert [h["kind"] for h in cli.json("holds")["holds"]] == ["method"]
