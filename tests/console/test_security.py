"""The console's defences over real HTTP (uvicorn on loopback, httpx)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from outbox.store import Store
from tests.console.conftest import csrf_of, logged_in
from tests.console.harness import IMG, PASSWORD, SCRIPT, Seeded, serving, settings_for

PAGES = ["/", "/rows", "/rows?state=parked", "/lanes"]


def test_no_session_is_sent_to_the_login_page_or_refused(base_url: str, seeded: Seeded) -> None:
    with httpx.Client(base_url=base_url) as anonymous:
        for path in [*PAGES, f"/row?key={seeded.marked}"]:
            answer = anonymous.get(path)
            assert answer.status_code == 303 and answer.headers["location"].startswith("/login")
        assert anonymous.get("/", headers={"HX-Request": "true"}).status_code == 401
        for action in ("/row/requeue", "/row/cancel", "/logout"):
            assert anonymous.post(action, data={"key": seeded.precondition}).status_code == 401
        assert anonymous.get("/login").status_code == 200
        assert anonymous.get("/static/htmx.min.js").status_code == 200


def test_a_viewer_reads_but_every_action_is_refused(viewer: httpx.Client, seeded: Seeded) -> None:
    page = viewer.get(f"/row?key={seeded.precondition}").text
    assert "Requeue" not in page and "Cancel row" not in page
    token = csrf_of(page)
    for action in ("/row/requeue", "/row/cancel"):
        answer = viewer.post(
            action, data={"key": seeded.precondition, "reason": "forged", "csrf": token}
        )
        assert answer.status_code == 403, answer.text
    assert "parked" in viewer.get(f"/row?key={seeded.precondition}").text


@pytest.mark.parametrize("token", [None, "", "wrong-token"])
def test_a_post_without_this_sessions_csrf_token_is_refused(
    operator: httpx.Client, seeded: Seeded, token: str | None
) -> None:
    data = {"key": seeded.precondition, "reason": "csrf test"}
    if token is not None:
        data["csrf"] = token
    assert operator.post("/row/requeue", data=data).status_code == 403
    assert operator.post("/logout", data=data).status_code == 403


def test_a_token_of_another_session_is_refused(base_url: str, seeded: Seeded) -> None:
    other = logged_in(base_url, "otto")
    stolen = csrf_of(other.get("/").text)
    mine = logged_in(base_url, "olga")
    data = {"key": seeded.precondition, "reason": "x", "csrf": stolen}
    assert mine.post("/row/requeue", data=data).status_code == 403


def test_the_login_form_needs_its_token(base_url: str) -> None:
    with httpx.Client(base_url=base_url) as client:
        answer = client.post("/login", data={"name": "olga", "password": PASSWORD})
        assert answer.status_code == 403


def test_an_operator_requeues_with_a_reason_recorded_as_the_user(
    operator: httpx.Client, seeded: Seeded, store: Store
) -> None:
    token = csrf_of(operator.get(f"/row?key={seeded.precondition}").text)
    data = {"key": seeded.precondition, "csrf": token, "reason": ""}
    assert operator.post("/row/requeue", data=data).status_code == 400
    data["reason"] = "answered the compliance question"
    answer = operator.post("/row/requeue", data=data)
    assert answer.status_code == 303
    [*_, line] = store.history(seeded.precondition)
    assert (line.actor, line.decision, line.message) == (
        "olga@console",
        "requeue",
        "answered the compliance question",
    )
    page = operator.get(answer.headers["location"]).text
    assert "requeued by olga@console" in page and "answered the compliance question" in page


def test_cancel_of_a_maybe_executed_row_needs_force(
    operator: httpx.Client, seeded: Seeded, store: Store
) -> None:
    token = csrf_of(operator.get(f"/row?key={seeded.unknown}").text)
    data = {"key": seeded.unknown, "csrf": token, "reason": "not on recrypt.net"}
    answer = operator.post("/row/cancel", data=data)
    assert answer.status_code == 409 and "may already have executed" in answer.text
    assert store.get(seeded.unknown).state == "parked"
    answer = operator.post("/row/cancel", data={**data, "force": "yes"})
    assert answer.status_code == 303
    assert store.get(seeded.unknown).state == "cancelled"
    assert store.history(seeded.unknown)[-1].decision == "cancel_forced"


@pytest.mark.parametrize("value", ["' OR 1=1 --", "%", "_", "'; DROP TABLE outbox_messages; --"])
@pytest.mark.parametrize("field", ["method", "lane", "reference", "key_prefix", "state"])
def test_filter_values_with_sql_metacharacters_match_nothing(
    operator: httpx.Client, seeded: Seeded, field: str, value: str
) -> None:
    answer = operator.get("/rows", params={field: value})
    assert answer.status_code == 200
    assert "No row matches." in answer.text
    assert seeded.precondition in operator.get("/rows").text  # the table is still there


def test_a_prefix_filter_matches_only_its_prefix(operator: httpx.Client, seeded: Seeded) -> None:
    page = operator.get("/rows", params={"reference": "invoice-"}).text
    assert seeded.precondition in page and seeded.marked not in page
    page = operator.get("/rows", params={"reference": "<script>"}).text
    assert seeded.marked in page and seeded.precondition not in page


@pytest.mark.parametrize("path", ["/rows", "/rows?state=parked", "/row?key={marked}"])
def test_markup_from_a_row_renders_as_text(
    operator: httpx.Client, seeded: Seeded, path: str
) -> None:
    page = operator.get(path.format(marked=seeded.marked)).text
    assert SCRIPT not in page and "<img" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert IMG not in page and "&lt;img src=x onerror=alert(1)&gt;" in page


def test_security_headers_and_cookie_flags(base_url: str) -> None:
    with httpx.Client(base_url=base_url) as client:
        answer = client.get("/login")
        headers = answer.headers
        assert headers["content-security-policy"].startswith("default-src 'self'")
        assert headers["x-frame-options"] == "DENY"
        assert headers["referrer-policy"] == "no-referrer"
        assert headers["x-content-type-options"] == "nosniff"
        cookie = headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=lax" in cookie and "secure" not in cookie
    with httpx.Client(base_url=base_url) as client:
        behind = client.get("/login", headers={"X-Forwarded-Proto": "https"})
        assert "; secure" in behind.headers["set-cookie"].lower()


def test_logins_are_rate_limited_per_user(base_url: str) -> None:
    with httpx.Client(base_url=base_url) as client:
        token = csrf_of(client.get("/login").text)
        for _ in range(5):
            data = {"name": "otto", "password": "wrong", "csrf": token}
            assert client.post("/login", data=data).status_code == 401
        data = {"name": "otto", "password": PASSWORD, "csrf": token}
        assert client.post("/login", data=data).status_code == 429
        data = {"name": "olga", "password": PASSWORD, "csrf": token}
        assert client.post("/login", data=data).status_code == 303  # another user is not held


def test_login_never_redirects_off_site(base_url: str) -> None:
    with httpx.Client(base_url=base_url) as client:
        token = csrf_of(client.get("/login").text)
        data = {"name": "olga", "password": PASSWORD, "csrf": token, "next": "//evil.example/"}
        assert client.post("/login", data=data).headers["location"] == "/"


def test_a_proxy_header_names_a_known_user_from_loopback(
    store: Store, seeded: Seeded, tmp_path: Path
) -> None:
    settings = settings_for(tmp_path, proxy="X-Forwarded-User")
    with serving(store, settings) as url, httpx.Client(base_url=url) as client:
        assert client.get("/", headers={"X-Forwarded-User": "vera"}).status_code == 200
        assert client.get("/", headers={"X-Forwarded-User": "mallory"}).status_code == 303
        page = client.get(f"/row?key={seeded.marked}", headers={"X-Forwarded-User": "vera"})
        assert "Requeue" not in page.text


def test_the_console_never_loads_the_api_key() -> None:
    import ast

    from outbox.console import commands

    root = Path(commands.__file__).parent
    for module in root.glob("*.py"):
        tree = ast.parse(module.read_text("utf-8"))
        names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
        attributes = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
        assert not {"api_key", "require_api_key"} & (names | attributes), module
        calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)]
        for call in calls:
            if getattr(call.func, "id", None) == "load":
                assert any(k.arg == "with_key" for k in call.keywords), module
