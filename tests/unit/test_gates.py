"""The gate, over an injected clock: no sleeps."""

from __future__ import annotations

import random
import threading
import time as clock_time
from datetime import UTC, datetime, time, timedelta

from outbox.backoff import Backoff
from outbox.gates import Gates
from outbox.policy import Gate

T0 = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)  # a Tuesday


def gates(**kwargs) -> Gates:
    backoff = Backoff(initial=1.0, maximum=180.0, multiplier=2.0, jitter=0.0)
    return Gates(backoff, 64, rng=random.Random(1), **kwargs)


def test_open_gate_allows_max_in_flight() -> None:
    assert gates().allowance(T0) == 64


def test_rollover_backs_off_then_sends_one_probe_at_a_time() -> None:
    g = gates()
    g.on_answer(Gate.ROLLOVER, T0, "vgw-db")
    assert g.allowance(T0) == 0
    assert g.allowance(T0 + timedelta(seconds=1)) == 1  # the probe
    g.on_answer(Gate.ROLLOVER, T0 + timedelta(seconds=1))  # probe failed: wait 2 s
    assert g.allowance(T0 + timedelta(seconds=2.5)) == 0
    assert g.allowance(T0 + timedelta(seconds=3)) == 1
    g.on_answer(Gate.NONE, T0 + timedelta(seconds=3))  # probe succeeded: open, ramping up
    ramp = []
    for _ in range(8):
        ramp.append(g.allowance(T0 + timedelta(seconds=3)))
        g.on_answer(Gate.NONE, T0 + timedelta(seconds=3))
    assert ramp == [1, 2, 4, 8, 16, 32, 64, 64]
    assert g.view(T0 + timedelta(seconds=3)).gate == "open"


def test_rollover_calls_grow_with_log_of_window() -> None:
    g = gates()
    now, calls, window_end = T0, 0, T0 + timedelta(minutes=30)
    g.on_answer(Gate.ROLLOVER, now, "vgw-db")
    while now < window_end:
        if g.allowance(now):
            calls += 1
            g.on_answer(Gate.ROLLOVER, now, "vgw-db")
        now += timedelta(seconds=0.5)
    # 1,2,4,...,128 s then 180 s steps: about 8 + 1800/180 probes, not one per row
    assert calls <= 20


def test_maintenance_pauses_until_a_probe_succeeds() -> None:
    g = gates(maintenance_probe=60.0)
    g.on_answer(Gate.MAINTENANCE, T0, "maintenance")
    assert g.allowance(T0 + timedelta(hours=5)) == 0
    assert not g.needs_probe(T0)
    assert g.needs_probe(T0 + timedelta(seconds=5))
    g.on_probe(False, T0 + timedelta(seconds=5))
    assert not g.needs_probe(T0 + timedelta(seconds=6))
    g.on_probe(True, T0 + timedelta(seconds=20))
    assert g.allowance(T0 + timedelta(seconds=20)) == 64


def test_unauthenticated_halts_and_reload_reopens() -> None:
    g = gates(unauthenticated_probe=300.0)
    g.on_answer(Gate.UNAUTHENTICATED, T0, "Session key")
    assert g.view(T0).gate == "unauthenticated"
    assert g.allowance(T0 + timedelta(seconds=299)) == 0
    assert not g.needs_probe(T0 + timedelta(seconds=299))
    assert g.needs_probe(T0 + timedelta(seconds=300))
    g.reset(T0 + timedelta(seconds=10))
    assert g.allowance(T0 + timedelta(seconds=10)) == 64


def test_weaker_gate_does_not_override_stronger() -> None:
    g = gates()
    g.on_answer(Gate.UNAUTHENTICATED, T0)
    g.on_answer(Gate.ROLLOVER, T0)
    assert g.view(T0).gate == "unauthenticated"


def test_rate_limit_halves_then_recovers() -> None:
    g = gates()
    g.on_answer(Gate.RATE_LIMITED, T0)
    later = T0 + timedelta(seconds=2)
    assert g.allowance(later) == 32
    g.on_answer(Gate.NONE, later)
    assert g.allowance(later) == 64


def test_removed_method_is_excluded_until_reset() -> None:
    g = gates()
    g.remove_method("/x.v1.S/M")
    assert "/x.v1.S/M" in g.excluded_methods(T0)
    g.reset(T0)
    assert g.excluded_methods(T0) == ()


def test_rollover_window_holds_configured_methods_in_utc() -> None:
    held = ("/recrypt.market.v1.Market/PlaceOrder",)
    g = gates(window=(1, time(18, 0), time(18, 30)), hold_methods=held)
    tuesday = datetime(2026, 11, 24, tzinfo=UTC)
    assert g.excluded_methods(tuesday.replace(hour=17, minute=59)) == ()
    assert g.excluded_methods(tuesday.replace(hour=18, minute=0)) == held
    assert g.excluded_methods(tuesday.replace(hour=18, minute=29)) == held
    assert g.excluded_methods(tuesday.replace(hour=18, minute=30)) == ()
    assert g.excluded_methods(tuesday.replace(hour=18) + timedelta(days=1)) == ()


def test_recrypt_saying_no_rollover_this_week_releases_the_window() -> None:
    held = ("/recrypt.market.v1.Market/PlaceOrder",)
    g = gates(window=(1, time(18, 0), time(18, 30)), hold_methods=held)
    in_window = datetime(2026, 11, 24, 18, 10, tzinfo=UTC)
    g.on_schedule(False)
    assert g.excluded_methods(in_window) == ()
    g.on_schedule(True)
    assert g.excluded_methods(in_window) == held


def test_a_reported_window_outside_the_configured_one_is_held() -> None:
    held = ("/recrypt.market.v1.Market/PlaceOrder",)
    g = gates(window=(1, time(18, 0), time(18, 30)), hold_methods=held)
    start = datetime(2026, 11, 26, 3, 0, tzinfo=UTC)  # a Thursday
    g.on_schedule(True, (start, start + timedelta(minutes=20)))
    assert g.excluded_methods(start + timedelta(minutes=5)) == held
    assert g.excluded_methods(start + timedelta(minutes=25)) == ()


def test_status_text_names_removed_and_held_methods() -> None:
    from outbox.daemon import _gate_reason

    held = ("/recrypt.market.v1.Market/PlaceOrder",)
    g = gates(window=(1, time(18, 0), time(18, 30)), hold_methods=held)
    g.remove_method("/recrypt.wallet.v1.Wallet/Transfer")
    text = _gate_reason(g.view(datetime(2026, 11, 24, 18, 5, tzinfo=UTC))) or ""
    assert "removed methods (NOT_FOUND) until reload: /recrypt.wallet.v1.Wallet/Transfer" in text
    assert "rollover window, holding: /recrypt.market.v1.Market/PlaceOrder" in text
    assert _gate_reason(gates().view(T0)) is None


def test_a_halted_gate_learns_of_maintenance_from_its_probe() -> None:
    g = gates(unauthenticated_probe=300.0, maintenance_probe=60.0)
    g.on_answer(Gate.UNAUTHENTICATED, T0, "Session key")
    g.on_probe(False, T0 + timedelta(seconds=300), Gate.MAINTENANCE, "maintenance mode")
    view = g.view(T0 + timedelta(seconds=300))
    assert view.gate == "maintenance"
    assert view.until is not None and view.until < T0 + timedelta(seconds=400)


class _YieldingLock:
    """A lock that lets the other thread run each time it is released: any gap between two
    critical sections that should have been one becomes a race that happens every time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def __enter__(self) -> None:
        self._lock.acquire()

    def __exit__(self, *_exc: object) -> None:
        self._lock.release()
        clock_time.sleep(0.0005)  # hand the GIL to the other loop


def test_two_loops_never_both_take_the_single_rollover_probe() -> None:
    g = gates()
    g._lock = _YieldingLock()  # type: ignore[assignment]
    g.on_answer(Gate.ROLLOVER, T0, "vgw-db")
    probe_time = T0 + timedelta(seconds=1)
    grants: list[int] = []
    start = threading.Barrier(2)

    def loop() -> None:
        start.wait(timeout=5)
        grants.append(g.acquire(probe_time, 50))

    loops = [threading.Thread(target=loop) for _ in range(2)]
    for t in loops:
        t.start()
    for t in loops:
        t.join(5)
    assert sorted(grants) == [0, 1]  # exactly one probe between the two loops


def test_a_refusal_from_an_earlier_pause_never_holds_a_method_later() -> None:
    """Found by the torture suite: a Transfer refused before a reload was held, with a
    PlaceOrder refusal, after the reload, though no Transfer had been refused since."""
    g = gates()
    g.method_denied("/w/Transfer")
    g.on_answer(Gate.MAINTENANCE, T0, "maintenance")
    g.reset(T0)  # SIGHUP
    g.method_denied("/m/PlaceOrder")
    g.on_answer(Gate.MAINTENANCE, T0, "denied")
    g.on_probe(True, T0 + timedelta(seconds=5), maintenance=False)
    assert g.view(T0 + timedelta(seconds=5)).refused_methods == ("/m/PlaceOrder",)
