"""The simulator the daemon processes talk to, in the test's own process (its ledger is ours)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from outbox.simulator import Simulator
from tests.e2e.test_process import API_KEY


@pytest.fixture
def sim() -> Iterator[Simulator]:
    simulator = Simulator(api_keys=[API_KEY])
    simulator.start()
    yield simulator
    simulator.stop()
