"""The simulator for staging (issue 12): a control file, re-read when it changes, switches
faults, maintenance, the rollover schedule and the accepted keys while it runs, so a staging
run walks through every gate without restarts. Real loopback gRPC; no mocks."""

from __future__ import annotations

import os
import re
from pathlib import Path

import grpc
import pytest
from click.testing import CliRunner

from outbox.cli import DEFAULT_SIMULATOR_KEY, main
from outbox.descriptors import Catalog
from outbox.simulator import (
    DEFAULT_API_KEYS,
    MAINTENANCE_CHECK,
    TRANSFER,
    Control,
    ControlFile,
    Simulator,
)
from tests.integration.test_simulator import call, key, rpc_error, transfer_body

SC = grpc.StatusCode


def written(path: Path, text: str, stamp: int) -> Path:
    """Write the control file with a distinct mtime (no sleep needed to see the change)."""
    path.write_text(text)
    os.utime(path, (stamp, stamp))
    return path


@pytest.fixture
def control(tmp_path: Path, sim: Simulator) -> tuple[ControlFile, Path]:
    path = written(tmp_path / "control", "", 1)
    made = ControlFile(path, sim)
    assert made.poll() == "applied 0 lines"  # all clear
    return made, path


@pytest.fixture
def channel(sim: Simulator) -> grpc.Channel:
    return grpc.insecure_channel(sim.target)


def test_each_gate_in_turn_without_a_restart(
    control: tuple[ControlFile, Path], channel: grpc.Channel, catalog: Catalog
) -> None:
    watcher, path = control
    transfer = lambda: call(channel, catalog, TRANSFER, transfer_body(key()))  # noqa: E731

    written(path, "fault UNAVAILABLE:vgw-db\n", 2)
    assert watcher.poll() == "applied 1 line"
    assert rpc_error(transfer).code() == SC.UNAVAILABLE

    written(path, "maintenance on\n", 3)
    watcher.poll()
    assert rpc_error(transfer).code() == SC.PERMISSION_DENIED  # the fault above is gone

    written(path, "keys other-key\n", 4)
    watcher.poll()
    assert rpc_error(transfer).code() == SC.UNAUTHENTICATED

    written(path, "rollover 2030-01-01T18:00:00Z 2030-01-01T18:30:00Z\n", 5)
    watcher.poll()
    reply = call(channel, catalog, MAINTENANCE_CHECK)
    assert reply.rollover_scheduled and not reply.maintenance_mode

    written(path, "# all clear\n", 6)
    watcher.poll()
    assert transfer().transfer_id
    assert not call(channel, catalog, MAINTENANCE_CHECK).rollover_scheduled


def test_an_unchanged_file_is_not_applied_again(control: tuple[ControlFile, Path]) -> None:
    watcher, path = control
    written(path, "fault UNAVAILABLE:vgw-db:x1\n", 2)
    assert watcher.poll() == "applied 1 line"
    assert watcher.poll() is None


def test_a_bad_line_names_it_and_keeps_what_runs(
    control: tuple[ControlFile, Path], channel: grpc.Channel, catalog: Catalog
) -> None:
    watcher, path = control
    written(path, "maintenance on\n", 2)
    watcher.poll()
    written(path, "maintenance on\nmaintenance maybe\n", 3)
    said = watcher.poll()
    assert said is not None and said.startswith(f"{path} line 2: ")
    assert "keeping the previous settings" in said
    assert rpc_error(call, channel, catalog, TRANSFER, transfer_body(key())).code() == (
        SC.PERMISSION_DENIED
    )


def test_help_documents_the_default_key_the_fault_grammar_and_the_control_file() -> None:
    out = CliRunner().invoke(main, ["simulator", "--help"], terminal_width=200).output
    assert DEFAULT_API_KEYS[0] in out
    assert "CODE[:MESSAGE][@METHODS][:OPTION]" in out and "execute" in out
    assert "--control" in out and "maintenance on|off" in out


def test_the_cli_names_the_simulators_default_key() -> None:

    assert (DEFAULT_SIMULATOR_KEY,) == DEFAULT_API_KEYS


def test_the_try_it_walk_throughs_control_lines_parse() -> None:
    text = (Path(__file__).parents[2] / "docs" / "try-it.md").read_text()
    lines = re.findall(r"echo '([^']+)' > control", text)
    assert len(lines) >= 4
    for line in lines:
        assert Control.parse(line, "try-it.md").lines == 1
