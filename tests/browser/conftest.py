"""Browser tests: Playwright driving Debian's Chromium (/usr/bin/chromium, `.ci/run` installs
it); Playwright's own browser downloads are never used. Without Chromium the tests fail when
``CI`` is true and skip otherwise."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from outbox.database import make_engine
from outbox.store import Store
from tests.console.harness import Seeded, seed, seed_activity, serving, settings_for

CHROMIUM = os.environ.get("OUTBOX_TEST_CHROMIUM", "/usr/bin/chromium")
IN_CI = os.environ.get("CI", "").lower() in ("true", "1")


def _require_chromium() -> str:
    if Path(CHROMIUM).is_file() or shutil.which(CHROMIUM):
        return CHROMIUM
    message = f"no Chromium at {CHROMIUM}: apt-get install -y chromium (as .ci/run does)"
    if IN_CI:
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def browser() -> Iterator[object]:
    path = _require_chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=path, args=["--no-sandbox"])
        yield launched
        launched.close()


@pytest.fixture
def store(sqlite_url: str) -> Iterator[Store]:
    engine = make_engine(sqlite_url)
    yield Store(engine)
    engine.dispose()


@pytest.fixture
def seeded(store: Store) -> Seeded:
    found = seed(store.engine)
    seed_activity(store)
    return found


@pytest.fixture
def base_url(store: Store, seeded: Seeded, tmp_path: Path) -> Iterator[str]:
    with serving(store, settings_for(tmp_path)) as url:
        yield url


@pytest.fixture
def page(browser: object, base_url: str) -> Iterator[object]:
    from playwright.sync_api import Browser

    assert isinstance(browser, Browser)
    context = browser.new_context(base_url=base_url, viewport={"width": 1280, "height": 900})
    opened = context.new_page()
    opened.on("dialog", _no_dialog)
    yield opened
    context.close()


def _no_dialog(dialog: object) -> None:
    pytest.fail(f"a dialog opened: a script from a row ran ({dialog})")
