"""Fixtures for the console's HTTP tests: a seeded SQLite database and a served console."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from outbox.database import make_engine
from outbox.store import Store
from tests.console.harness import PASSWORD, Seeded, seed, serving, settings_for


@pytest.fixture
def store(sqlite_url: str) -> Iterator[Store]:
    engine = make_engine(sqlite_url)
    yield Store(engine)
    engine.dispose()


@pytest.fixture
def seeded(store: Store) -> Seeded:
    return seed(store.engine)


@pytest.fixture
def base_url(store: Store, seeded: Seeded, tmp_path: Path) -> Iterator[str]:
    with serving(store, settings_for(tmp_path)) as url:
        yield url


def csrf_of(page: str) -> str:
    marker = 'name="csrf" value="'
    start = page.index(marker) + len(marker)
    return page[start : page.index('"', start)]


def logged_in(base_url: str, name: str) -> httpx.Client:
    client = httpx.Client(base_url=base_url, follow_redirects=False, timeout=10)
    token = csrf_of(client.get("/login").text)
    answer = client.post("/login", data={"name": name, "password": PASSWORD, "csrf": token})
    assert answer.status_code == 303, answer.text
    return client


@pytest.fixture
def operator(base_url: str) -> Iterator[httpx.Client]:
    client = logged_in(base_url, "olga")
    yield client
    client.close()


@pytest.fixture
def viewer(base_url: str) -> Iterator[httpx.Client]:
    client = logged_in(base_url, "vera")
    yield client
    client.close()
