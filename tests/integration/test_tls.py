"""TLS to Recrypt: verified against a CA, never plaintext unless ``tls = false`` says so.

A private CA and server certificates are made per module with ``openssl`` (the
``cryptography`` package is not a dependency, and grpcio does not bring it). The simulator
serves TLS on loopback; the real ``GrpcClient`` and ``Dispatcher`` talk to it.

What an operator sees when the certificate does not verify (gRPC's own words, stored in the
row's ``last_message`` after the policy's explanation, and logged as ``event=retry_scheduled``):

    outcome unknown (the call may have executed); resending with the same key is safe;
    Recrypt said: failed to connect to all addresses; last error: UNKNOWN:
    ipv4:127.0.0.1:PORT: Tls handshake failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL:
    error:1000007d:SSL routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED: unable to get
    local issuer certificate

and, for a certificate whose names do not match the target:

    … last error: UNKNOWN: ipv4:127.0.0.1:PORT: Custom verification check failed with error:
    UNAUTHENTICATED: Hostname Verification Check failed.

Nothing reaches the server's application layer (no call, no API key); the row stays
``pending`` with a retry. The tests assert on the stable parts: "failed to connect" and
``CERTIFICATE_VERIFY_FAILED`` / "Hostname Verification".
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy.engine import Engine

import outbox
from outbox import migrate
from outbox.client import GrpcClient, open_channel
from outbox.config import Config, RecryptConfig, load
from outbox.daemon import Daemon
from outbox.database import make_engine
from outbox.descriptors import Catalog, build_request
from outbox.dispatcher import Dispatcher, DispatchSettings
from outbox.errors import ConfigError
from outbox.simulator import TRANSFER, Simulator
from outbox.store import Store
from tests.integration.conftest import Clock, build_dispatcher

API_KEY = "tls-test-api-key-5d0e"
PAYLOAD = {"fromAccount": "acc-1", "toAccount": "acc-2", "amount": "10.00", "currency": "AUD"}
IN_CI = os.environ.get("CI", "").lower() in ("true", "1")
EC = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
LOCALHOST_SAN = "DNS:localhost,IP:127.0.0.1"


# --------------------------------------------------------------------------- certificates


@dataclass(frozen=True)
class Pair:
    """A PEM certificate chain and its private key, as the simulator takes them."""

    chain: bytes
    key: bytes


@dataclass(frozen=True)
class Pki:
    ca: Path  # the CA that signed ``server`` and ``wrong_name``
    other_ca: Path  # an unrelated CA
    server: Pair  # localhost / 127.0.0.1
    wrong_name: Pair  # other.example only, signed by ``ca``


def _openssl(cwd: Path, *args: str) -> None:
    done = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"openssl {' '.join(args)} failed: {done.stderr}"


def _make_ca(directory: Path, name: str) -> Path:
    _openssl(
        directory,
        "req", "-x509", *EC, "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2",
        "-subj", f"/CN=outbox test {name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    return directory / f"{name}.pem"


def _make_server(directory: Path, name: str, ca: str, san: str, serial: int) -> Pair:
    """A server key and certificate for the names in ``san``, signed by CA ``ca``."""
    common_name = san.split(",", maxsplit=1)[0].partition(":")[2]
    _openssl(
        directory,
        "req", *EC, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={common_name}",
    )  # fmt: skip
    (directory / f"{name}.ext").write_text(
        f"subjectAltName={san}\nbasicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
    )
    _openssl(
        directory,
        "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
        "-set_serial", str(serial), "-days", "2", "-out", f"{name}.pem",
        "-extfile", f"{name}.ext",
    )  # fmt: skip
    return Pair((directory / f"{name}.pem").read_bytes(), (directory / f"{name}.key").read_bytes())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    if shutil.which("openssl") is None:
        message = "openssl is needed to make the test CA (the cryptography package is absent)"
        if IN_CI:
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    directory = tmp_path_factory.mktemp("pki")
    ca = _make_ca(directory, "ca")
    other = _make_ca(directory, "other-ca")
    server = _make_server(directory, "server", "ca", LOCALHOST_SAN, 1001)
    wrong = _make_server(directory, "wrong-name", "ca", "DNS:other.example", 1002)
    return Pki(ca, other, server, wrong)


# --------------------------------------------------------------------------- simulators


@pytest.fixture
def start_sim(catalog: Catalog) -> Iterator[Callable[[Pair | None], Simulator]]:
    """``start_sim(pair)``: a simulator on 127.0.0.1:0, TLS with ``pair`` (None: plaintext)."""
    started: list[Simulator] = []

    def start(pair: Pair | None) -> Simulator:
        sim = Simulator(catalog, api_keys=[API_KEY])
        sim.start("127.0.0.1:0", tls=(pair.chain, pair.key) if pair else None)
        started.append(sim)
        return sim

    yield start
    for sim in started:
        sim.stop()


def port_of(sim: Simulator) -> int:
    return int(sim.target.rpartition(":")[2])


@pytest.fixture
def dispatcher_for(
    store: Store, catalog: Catalog, clock: Clock
) -> Iterator[Callable[..., Dispatcher]]:
    """A Dispatcher on the test database with a real GrpcClient for ``config``."""
    clients: list[GrpcClient] = []

    def make(config: RecryptConfig, *, max_unknown_attempts: int = 1000) -> Dispatcher:
        client = GrpcClient(config, API_KEY)
        clients.append(client)
        return build_dispatcher(
            store,
            catalog,
            clock,
            client,
            worker_id="tls-worker",
            max_unknown_attempts=max_unknown_attempts,
        )

    yield make
    for client in clients:
        client.close()


def enqueue_transfer(engine: Engine) -> str:
    with engine.begin() as conn:
        return outbox.enqueue(conn, TRANSFER, PAYLOAD)


# --------------------------------------------------------------------------- defaults


def test_tls_is_the_default_and_plaintext_needs_tls_false() -> None:
    assert RecryptConfig().tls is True
    assert RecryptConfig().ca_file == ""  # the system trust store
    assert Config().recrypt.tls is True
    assert load(None, env={}).recrypt.tls is True


# --------------------------------------------------------------------------- (1) a good CA


def test_transfer_commits_over_tls_with_the_configured_ca(
    pki, start_sim, engine, store, dispatcher_for
) -> None:
    sim = start_sim(pki.server)
    key = enqueue_transfer(engine)
    config = RecryptConfig(target=f"localhost:{port_of(sim)}", tls=True, ca_file=str(pki.ca))
    report = dispatcher_for(config).run_once()
    assert report.claimed == 1
    row = store.get(key)
    assert (row.state, row.last_code) == ("committed", "OK"), row.last_message
    assert sim.executions(key) == 1
    assert [(c.key, c.had_apikey) for c in sim.calls] == [(key, True)]


# --------------------------------------------------------------------------- (2) a bad chain

BAD_CHAINS = {
    # (server certificate, ca_file, stable part of gRPC's message)
    "system_trust_store": ("server", None, "certificate_verify_failed"),
    "another_ca": ("server", "other_ca", "certificate_verify_failed"),
    "wrong_host_name": ("wrong_name", "ca", "hostname verification"),
}


def _bad_chain_config(pki: Pki, sim: Simulator, ca: str | None) -> RecryptConfig:
    ca_file = str(getattr(pki, ca)) if ca else ""
    return RecryptConfig(target=f"localhost:{port_of(sim)}", tls=True, ca_file=ca_file)


@pytest.mark.parametrize("case", list(BAD_CHAINS))
def test_a_certificate_that_does_not_verify_sends_nothing_and_the_row_waits(
    case, pki, start_sim, engine, store, dispatcher_for, clock
) -> None:
    server, ca, says = BAD_CHAINS[case]
    sim = start_sim(getattr(pki, server))
    key = enqueue_transfer(engine)
    dispatcher = dispatcher_for(_bad_chain_config(pki, sim, ca))
    for _ in range(3):
        assert dispatcher.run_once().claimed == 1
        row = store.get(key)
        # Never connected → handed back untouched, the dispatcher backs off as a whole
        # (gate "unreachable"); never parked, committed, counted or marked maybe_executed.
        assert row.state == "pending"
        assert row.park_reason is None
        assert row.last_code == "UNAVAILABLE"
        assert (row.attempts, row.maybe_executed) == (0, False)
        assert dispatcher.gates.view(clock()).gate == "unreachable"
        message = row.last_message or ""
        assert "failed to connect" in message
        assert says in message.lower(), message
        assert API_KEY not in message
        clock.advance(200)  # past the (capped) backoff: due again
    assert sim.calls == []  # the handshake failed: no request, no key reached the server
    assert sim.executed_keys() == set()


def test_a_certificate_failure_is_not_recorded_as_maybe_executed(
    pki, start_sim, engine, store, dispatcher_for
) -> None:
    sim = start_sim(pki.server)
    key = enqueue_transfer(engine)
    dispatcher_for(_bad_chain_config(pki, sim, "other_ca")).run_once()
    assert store.get(key).state == "pending"
    assert not store.get(key).maybe_executed


def test_a_certificate_failure_never_parks_rows_even_after_many_cycles(
    pki, start_sim, engine, store, dispatcher_for, clock
) -> None:
    sim = start_sim(pki.server)
    key = enqueue_transfer(engine)
    dispatcher = dispatcher_for(
        _bad_chain_config(pki, sim, "other_ca"),
        max_unknown_attempts=DispatchSettings().max_unknown_attempts,
    )
    for _ in range(DispatchSettings().max_unknown_attempts + 2):
        dispatcher.run_once()
        clock.advance(200)
    assert store.get(key).state == "pending"
    assert sim.calls == []


# --------------------------------------------------------------------------- (3) ca_file errors


def test_a_missing_ca_file_is_a_config_error_naming_the_key(tmp_path) -> None:
    missing = tmp_path / "no-such-ca.pem"
    config = RecryptConfig(target="localhost:8443", tls=True, ca_file=str(missing))
    with pytest.raises(ConfigError, match=r"\[recrypt\] ca_file") as raised:
        GrpcClient(config, API_KEY)
    assert str(missing) in str(raised.value)
    assert API_KEY not in str(raised.value)


def test_a_ca_file_without_a_certificate_is_a_config_error(tmp_path) -> None:
    garbage = tmp_path / "not-a-ca.pem"
    garbage.write_text("this is not a PEM bundle\n")
    config = RecryptConfig(target="localhost:8443", tls=True, ca_file=str(garbage))
    with pytest.raises(ConfigError, match=r"\[recrypt\] ca_file"):
        GrpcClient(config, API_KEY).close()


def test_a_reload_with_a_missing_ca_file_keeps_the_running_config(
    tmp_path, sqlite_url, monkeypatch, caplog
) -> None:
    engine = make_engine(sqlite_url)
    migrate.ensure_at_head(engine)
    engine.dispose()
    monkeypatch.setenv("RECRYPT_API_KEY", API_KEY)
    monkeypatch.delenv("OUTBOX_DATABASE_URL", raising=False)
    path = tmp_path / "outbox.toml"
    base = f'[database]\nurl = "{sqlite_url}"\n[metrics]\nlisten = ""\n'
    path.write_text(base + '[recrypt]\ntarget = "127.0.0.1:1"\ntls = false\n')
    daemon = Daemon(load(path), str(path))
    try:
        running = daemon.client
        path.write_text(base + f'[recrypt]\nca_file = "{tmp_path / "missing.pem"}"\n')
        with caplog.at_level(logging.ERROR, logger="outbox.daemon"):
            daemon.reload()  # must not raise
        assert daemon.client is running
        assert "event=reload_failed" in caplog.text
        assert "[recrypt] ca_file" in caplog.text
    finally:
        daemon.client.close()
        daemon.engine.dispose()


# --------------------------------------------------------------------------- (4) no plaintext


def test_a_tls_client_never_speaks_plaintext_to_a_plaintext_server(
    pki, start_sim, engine, store, dispatcher_for
) -> None:
    sim = start_sim(None)  # plaintext on the port
    key = enqueue_transfer(engine)
    config = RecryptConfig(target=f"localhost:{port_of(sim)}", tls=True, ca_file=str(pki.ca))
    dispatcher_for(config).run_once()
    row = store.get(key)
    assert (row.state, row.last_code) == ("pending", "UNAVAILABLE")
    assert "failed to connect" in (row.last_message or "")
    assert not [c for c in sim.calls if c.had_apikey]
    assert sim.calls == []


class RawListener:
    """A TCP listener that records every byte clients send, then closes on them."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.received = bytearray()
        self.connected = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        self.sock.settimeout(0.1)
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(2.0)
                try:
                    chunk = conn.recv(65536)  # the ClientHello: then hang up
                except TimeoutError:
                    chunk = b""
                self.received += chunk
            self.connected.set()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


def test_the_first_bytes_on_the_wire_are_a_tls_handshake_without_the_key(pki, catalog) -> None:
    listener = RawListener()
    config = RecryptConfig(
        target=f"localhost:{listener.port}", tls=True, ca_file=str(pki.ca), deadline=5
    )
    client = GrpcClient(config, API_KEY)
    try:
        method = catalog.submittable(TRANSFER)
        answer = client.call(method, build_request(method, PAYLOAD, str(uuid.uuid4())))
        assert listener.connected.wait(5)
    finally:
        client.close()
        listener.close()
    assert answer.code.name == "UNAVAILABLE"
    data = bytes(listener.received)
    assert data[:1] == b"\x16"  # TLS record type 22: handshake (a ClientHello)
    assert API_KEY.encode() not in data
    assert b"apikey" not in data
    assert b"PRI * HTTP/2.0" not in data  # no cleartext HTTP/2 preface


@pytest.mark.parametrize(
    "target", ["192.0.2.10:8443", "127.evil.example:8443", "127.0.0.1.nip.io:8443"]
)
def test_plaintext_to_a_non_loopback_target_is_flagged(caplog, target) -> None:
    """Loopback is judged from the address, not the spelling (``127.evil.example``)."""
    with caplog.at_level(logging.WARNING):
        open_channel(RecryptConfig(target=target, tls=False)).close()
    assert any("event=plaintext_target" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("target", ["127.0.0.1:1", "127.9.9.9:1", "[::1]:1", "localhost:1"])
def test_plaintext_to_loopback_is_not_flagged(caplog, target) -> None:
    with caplog.at_level(logging.WARNING):
        open_channel(RecryptConfig(target=target, tls=False)).close()
    assert not any("event=plaintext_target" in r.getMessage() for r in caplog.records)


def test_plaintext_to_loopback_is_only_with_tls_false(start_sim, engine, store, dispatcher_for):
    """The simulator case: explicit ``tls = false`` works, and the key goes with it."""
    sim = start_sim(None)
    key = enqueue_transfer(engine)
    dispatcher_for(RecryptConfig(target=sim.target, tls=False)).run_once()
    assert store.get(key).state == "committed"
    assert [c.had_apikey for c in sim.calls] == [True]
