"""The stream follower against the simulator on real databases: updates land in row history.

Every wait is on a condition (the follower's counters, the simulator's open streams), never
a sleep: a stream is known to be subscribed only once the simulator counts it open.
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from collections.abc import Callable, Iterator

import grpc
import pytest
from sqlalchemy.engine import Engine

import outbox
from outbox.backoff import Backoff
from outbox.client import GrpcClient
from outbox.config import RecryptConfig
from outbox.descriptors import Catalog, build_request
from outbox.errors import ConfigError
from outbox.follower import StreamFollower
from outbox.simulator import PLACE_ORDER, STREAM_ORDER_UPDATES, Fault, Simulator
from outbox.store import Store
from tests.integration.conftest import API_KEY

C = grpc.StatusCode
ACCOUNT = "acct-1"
ORDER = {
    "account": ACCOUNT,
    "market": "BTC-AUD",
    "side": "SIDE_BUY",
    "type": "ORDER_TYPE_LIMIT",
    "quantity": "0.05",
    "limitPrice": "95000.00",
}
FAST = Backoff(initial=0.01, maximum=0.05, multiplier=2.0, jitter=0.0)
SLOW = Backoff(initial=60.0, maximum=180.0, multiplier=2.0, jitter=0.0)
WAIT = 10.0

FollowerFactory = Callable[..., StreamFollower]


@pytest.fixture
def follower(sim: Simulator, catalog: Catalog, store: Store) -> Iterator[FollowerFactory]:
    """``follower(backoff=…, api_key=…)``: a started follower of ACCOUNT, stopped afterwards."""
    made: list[tuple[StreamFollower, GrpcClient]] = []

    def make(backoff: Backoff = SLOW, api_key: str = API_KEY) -> StreamFollower:
        client = GrpcClient(RecryptConfig(target=sim.target, tls=False), api_key)
        follower = StreamFollower(
            lambda: client,
            catalog,
            store,
            [ACCOUNT],
            STREAM_ORDER_UPDATES,
            backoff,
            rng=random.Random(0),
        )
        made.append((follower, client))
        follower.start()
        return follower

    yield make
    for follower, client in made:
        assert follower.stop(timeout=5)
        client.close()


def enqueue_order(engine: Engine) -> str:
    with engine.begin() as conn:
        return outbox.enqueue(conn, PLACE_ORDER, ORDER)


def place_order(sim: Simulator, catalog: Catalog, key: str) -> str:
    """Place the order at the simulator with ``key``, as the dispatcher would; its order id."""
    method = catalog.method(PLACE_ORDER)
    client = GrpcClient(RecryptConfig(target=sim.target, tls=False), API_KEY)
    try:
        answer = client.call(method, build_request(method, ORDER, key))
    finally:
        client.close()
    assert answer.code == C.OK, answer.message
    assert answer.response is not None
    return str(answer.response.order_id)


def stream_lines(store: Store, key: str) -> list[str]:
    return [f"{h.decision} {h.code} {h.message}" for h in store.history(key) if h.kind == "stream"]


def wait_subscribed(sim: Simulator) -> None:
    assert sim.wait_for(lambda s: s.open_streams == 1, WAIT), "the follower never subscribed"


def test_update_is_recorded_against_the_row(engine, sim, catalog, store, follower) -> None:
    f = follower()
    wait_subscribed(sim)
    key = enqueue_order(engine)
    order_id = place_order(sim, catalog, key)
    assert f.wait_for(lambda x: x.recorded == 1, WAIT)
    history = [h for h in store.history(key) if h.kind == "stream"]
    assert len(history) == 1
    line = history[0]
    assert (line.decision, line.code) == ("order_update", "ORDER_STATUS_OPEN")
    assert line.message is not None
    assert line.message.startswith(f"order {order_id} ORDER_STATUS_OPEN filled 0 at 20")
    assert (f.events, f.unmatched, f.failures, f.reconnects) == (1, 0, 0, 0)
    assert store.get(key).state == "pending"  # the follower never touches the row's state


def test_graceful_end_reconnects_at_once(engine, sim, catalog, store, follower) -> None:
    f = follower(backoff=SLOW)  # a backoff would take a minute: the waits below would fail
    wait_subscribed(sim)
    sim.end_streams()  # the guide: long-lived streams end with OK now and then
    assert f.wait_for(lambda x: x.reconnects == 1, WAIT)
    wait_subscribed(sim)
    key = enqueue_order(engine)
    place_order(sim, catalog, key)
    assert f.wait_for(lambda x: x.recorded == 1, WAIT)
    assert f.failures == 0
    assert len(stream_lines(store, key)) == 1


def test_vgw_db_failure_reconnects_after_backoff(
    engine, sim, catalog, store, follower, caplog
) -> None:
    caplog.set_level(logging.DEBUG, logger="outbox.follower")
    fault = sim.inject(
        Fault(C.UNAVAILABLE, "vgw-db", methods=frozenset({STREAM_ORDER_UPDATES}), times=2)
    )
    f = follower(backoff=FAST)
    assert f.wait_for(lambda x: x.failures == 2 and x.reconnects == 2, WAIT)
    wait_subscribed(sim)
    assert fault.hits == 2
    key = enqueue_order(engine)
    place_order(sim, catalog, key)
    assert f.wait_for(lambda x: x.recorded == 1, WAIT)
    assert f.failures == 2  # the third connection held
    reconnects = [r.getMessage() for r in caplog.records if "stream_reconnect" in r.getMessage()]
    assert len(reconnects) == 2
    assert "after=UNAVAILABLE" in reconnects[0]
    assert "gate=rollover" in reconnects[0]
    assert (reconnects[0].split()[3], reconnects[1].split()[3]) == (
        "delay=0.01",
        "delay=0.02",
    )  # seconds, a number
    assert API_KEY not in caplog.text


def test_stop_is_prompt_during_a_long_backoff(sim, catalog, store, follower) -> None:
    sim.inject(Fault(C.UNAVAILABLE, "vgw-db", methods=frozenset({STREAM_ORDER_UPDATES})))
    f = follower(backoff=SLOW)
    assert f.wait_for(lambda x: x.failures == 1, WAIT)  # now waiting out 60 s
    started = time.monotonic()
    assert f.stop(timeout=2)
    assert time.monotonic() - started < 2
    assert f.alive == 0
    assert f.reconnects == 0
    assert f.stop(timeout=2)  # twice is fine


def test_stop_cancels_a_live_stream_and_is_safe_before_start(sim, catalog, store) -> None:
    client = GrpcClient(RecryptConfig(target=sim.target, tls=False), API_KEY)
    try:
        f = StreamFollower(lambda: client, catalog, store, [ACCOUNT], STREAM_ORDER_UPDATES, SLOW)
        assert f.stop(timeout=1)  # before start
        g = StreamFollower(lambda: client, catalog, store, [ACCOUNT], STREAM_ORDER_UPDATES, SLOW)
        g.start()
        wait_subscribed(sim)
        assert g.stop(timeout=2)
        assert g.alive == 0
        assert sim.wait_for(lambda s: s.open_streams == 0, WAIT)
        assert (g.failures, g.reconnects) == (0, 0)
    finally:
        client.close()


def test_update_for_an_order_outside_the_outbox_is_ignored(
    engine, sim, catalog, store, follower
) -> None:
    f = follower()
    wait_subscribed(sim)
    key = enqueue_order(engine)
    place_order(sim, catalog, str(uuid.uuid4()))  # placed by someone else, not in the outbox
    assert f.wait_for(lambda x: x.unmatched == 1, WAIT)
    assert (f.recorded, f.failures, f.alive) == (0, 0, 1)
    assert stream_lines(store, key) == []
    place_order(sim, catalog, key)  # the follower carries on
    assert f.wait_for(lambda x: x.recorded == 1, WAIT)
    assert len(stream_lines(store, key)) == 1


def test_refused_key_backs_off_and_keeps_trying(sim, catalog, store, follower, caplog) -> None:
    caplog.set_level(logging.INFO, logger="outbox.follower")
    f = follower(backoff=FAST, api_key="wrong-key")
    assert f.wait_for(lambda x: x.failures >= 2 and x.reconnects >= 1, WAIT)
    assert "gate=unauthenticated" in caplog.text
    assert "wrong-key" not in caplog.text


@pytest.mark.parametrize(
    ("path", "why"),
    [(PLACE_ORDER, "not a server-streaming method"), ("/no.Such/Method", "unknown method")],
)
def test_only_server_streams_can_be_followed(catalog, store, path, why) -> None:
    with pytest.raises(ConfigError, match=rf"^\[streams\] method: .*{why}"):
        StreamFollower(lambda: None, catalog, store, [ACCOUNT], path, SLOW)
