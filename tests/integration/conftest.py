"""Fixtures for dispatcher tests: a simulator on loopback, an injected clock, a dispatcher."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy.engine import Engine

from outbox.backoff import Backoff
from outbox.client import GrpcClient
from outbox.config import RecryptConfig
from outbox.descriptors import Catalog
from outbox.dispatcher import Dispatcher, DispatchSettings
from outbox.gates import Gates
from outbox.simulator import Simulator
from outbox.store import Store

API_KEY = "test-key"


class Clock:
    """A clock tests move by hand."""

    def __init__(self, start: datetime | None = None) -> None:
        self.now = start or datetime(2026, 11, 23, 9, 0, tzinfo=UTC)  # a Monday

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture(scope="session")
def catalog() -> Catalog:
    return Catalog.load()


@pytest.fixture
def sim(catalog: Catalog) -> Iterator[Simulator]:
    simulator = Simulator(catalog, api_keys=[API_KEY])
    simulator.start()
    yield simulator
    simulator.stop()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(engine: Engine) -> Store:
    return Store(engine)


DispatcherFactory = Callable[..., Dispatcher]


def build_dispatcher(
    store: Store,
    catalog: Catalog,
    clock: Clock,
    client: GrpcClient,
    *,
    worker_id: str = "w1",
    batch_size: int = 50,
    max_unknown_attempts: int = 5,
    lease: float = 30.0,
    gates: Gates | None = None,
) -> Dispatcher:
    """A dispatcher with a jitter-free backoff and seeded randomness, on the injected clock."""
    backoff = Backoff(initial=1.0, maximum=180.0, multiplier=2.0, jitter=0.0)
    return Dispatcher(
        store,
        client,
        catalog,
        gates or Gates(backoff, batch_size, rng=random.Random(0)),
        worker_id=worker_id,
        settings=DispatchSettings(
            batch_size=batch_size,
            lease=lease,
            backoff=backoff,
            max_unknown_attempts=max_unknown_attempts,
        ),
        clock=clock,
        rng=random.Random(0),
    )


@pytest.fixture
def make_dispatcher(
    store: Store, sim: Simulator, catalog: Catalog, clock: Clock
) -> Iterator[DispatcherFactory]:
    clients: list[GrpcClient] = []

    def make(
        worker_id: str = "w1",
        *,
        api_key: str = API_KEY,
        deadline: float = 5.0,
        **options: Any,
    ) -> Dispatcher:
        client = GrpcClient(RecryptConfig(target=sim.target, tls=False, deadline=deadline), api_key)
        clients.append(client)
        return build_dispatcher(store, catalog, clock, client, worker_id=worker_id, **options)

    yield make
    for client in clients:
        client.close()
