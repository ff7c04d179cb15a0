"""Fingerprint-only bootstrap of the TLS trust anchor (RFC 7030 §4.1.1), end to end: the real
CLI and Agent, a virtual SIM whose every connect and APDU is counted (tests/linkwrap.py), and
the in-process EST test server over TLS, which records per request which TLS client
certificate (if any) its connection presented."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from est_agent.config import load_config
from est_agent.errors import ConfigError, EstResponseError, TlsVerificationError
from est_agent.testserver import AuthMode, DevPki, EstTestServer, ServerCertCa
from est_agent.testserver.server import RequestRecord
from est_agent.transport.base import CardTransport
from est_agent.workflow.agent import Agent, Outcome
from est_agent.workflow.anchors import AnchorStore, Source
from tests.conftest import Run
from tests.connect_proxy import ConnectProxy
from tests.linkwrap import wrapped_reader_scheme
from tests.workflow.conftest import Device
from tests.workflow.test_enroll_renew import certificate_on_sim
from tests.workflow.test_run_lock import REPO, agent_argv, needs_unshare, read_only_argv

pytestmark = pytest.mark.integration

def stored_anchors(state_dir: Path) -> list[tuple[x509.Certificate, Source]]:
    """The current anchors of the trust-anchor store (workflow/anchors.py) as read back."""
    held = AnchorStore(state_dir).load(())
    return [(a.certificate, a.source) for a in held.stored.current]


def fingerprint(cert: x509.Certificate) -> str:
    return hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()


class _Touches(CardTransport):
    """Records every connect and APDU header of the link it wraps; at the first connect, what
    the EST server had answered by then (``server_before_card``)."""

    def __init__(self, inner: CardTransport, log: CardLog) -> None:
        super().__init__()
        self.inner, self.log = inner, log

    @property
    def description(self) -> str:
        return self.inner.description

    def _connect(self) -> None:
        if self.log.server is not None and self.log.server_before_card is None:
            self.log.server_before_card = list(self.log.server.requests)
        self.log.touches.append("connect")
        self.inner.connect()

    def _transmit(self, apdu: bytes) -> bytes:
        self.log.touches.append(apdu[:4].hex())
        return self.inner.transmit(apdu)

    def _close(self) -> None:
        self.inner.close()


class CardLog:
    def __init__(self) -> None:
        self.touches: list[str] = []
        self.server: EstTestServer | None = None
        self.server_before_card: list[RequestRecord] | None = None

    @property
    def apdus(self) -> int:
        return sum(1 for t in self.touches if t != "connect")


@pytest.fixture
def card() -> Iterator[CardLog]:
    log = CardLog()
    with wrapped_reader_scheme("sim", lambda inner: _Touches(inner, log)):
        yield log


def fingerprint_config(
    device: Device, server: EstTestServer, dev_pki: DevPki, pin: str, **extra: str
) -> None:
    device.write_config(
        server, dev_pki, est__trust_anchor='""', est__cacerts_fingerprint=f'"{pin}"', **extra
    )


def provisional(record: RequestRecord) -> bool:
    return record.client_certificate is None


# --- the happy path ---------------------------------------------------------------------------


def test_bootstrap_by_fingerprint_enrolls_remembers_the_root_and_the_next_run_uses_it(
    device: Device,
    start_server: Callable[..., EstTestServer],
    dev_pki: DevPki,
    cli: Run,
    card: CardLog,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # The server's TLS certificate comes from the EST CA that /cacerts serves: the root the
    # fingerprint names authenticates the server too.
    server = start_server(server_cert_ca=ServerCertCa.EST_CA)
    root = dev_pki.est_ca.certificate
    fingerprint_config(device, server, dev_pki, fingerprint(root))
    card.server = server

    started = time.monotonic()
    code, out, err = cli("enroll", "--config", str(device.config), "--json")
    elapsed = time.monotonic() - started
    assert code == 0, err
    assert json.loads(out)["outcome"] == "enrolled"
    assert elapsed < 15.0
    with capsys.disabled():
        print(f"\nbootstrap: enroll by fingerprint in {elapsed:.2f} s")

    # Before the card was first opened the server had answered exactly one request: the
    # provisional GET /cacerts, on connection 1, with no client certificate and no credentials.
    est = "/.well-known/est"
    assert card.server_before_card == [
        RequestRecord("GET", f"{est}/cacerts", 200, None, 1, client_certificate=None)
    ]
    # Then enrollment on new, verified connections authenticated by the SIM's bootstrap
    # certificate; nothing else went over an unauthenticated connection.
    later = server.requests[1:]
    assert later and all(r.connection >= 2 for r in later)
    assert {r.client_certificate for r in later} == {"bootstrap"}
    assert [r.path.rsplit("/", 1)[1] for r in later if r.method == "POST"] == ["simpleenroll"]
    assert card.apdus > 0

    # The root is remembered in the anchor store, and it is the EST CA's own certificate.
    assert stored_anchors(device.state_dir) == [(root, Source.BOOTSTRAP)]
    assert certificate_on_sim(device.sim, "op-a").issuer == root.subject

    # The next run uses it: no provisional connection at all (every request of the renewal
    # comes with the enrolled certificate), and it renews.
    before = len(server.requests)
    code, out, err = cli("renew", "--force", "--config", str(device.config), "--json")
    assert code == 0, err
    assert json.loads(out)["outcome"] == "renewed"
    renewal = server.requests[before:]
    assert renewal and not any(provisional(r) for r in renewal)
    assert {r.client_certificate for r in renewal} == {"est"}
    assert "provisional" not in err


def test_with_an_injected_clock_the_renewal_when_due_uses_the_remembered_anchor(
    device: Device,
    start_server: Callable[..., EstTestServer],
    dev_pki: DevPki,
    card: CardLog,
) -> None:
    server = start_server(server_cert_ca=ServerCertCa.EST_CA)
    fingerprint_config(device, server, dev_pki, fingerprint(dev_pki.est_ca.certificate))
    config = load_config(device.config)
    now = datetime.now(UTC)
    card.server = server
    first = Agent(config, clock=lambda: now).enroll()
    assert first.outcome is Outcome.ENROLLED and first.notes == ()
    assert first.renew_at is not None
    assert card.server_before_card is not None and len(card.server_before_card) == 1
    assert sum(provisional(r) for r in server.requests) == 1

    # a day before the certificate is due: nothing to do, no network at all
    before = len(server.requests)
    idle = Agent(config, clock=lambda: first.renew_at - timedelta(days=1)).run()
    assert idle.outcome is Outcome.NOT_DUE
    assert len(server.requests) == before
    # once due: renewed over connections verified with the remembered root, none provisional
    renewed = Agent(config, clock=lambda: first.renew_at + timedelta(minutes=1)).run()
    assert renewed.outcome is Outcome.RENEWED
    assert renewed.serial != first.serial
    assert server.requests[before:]
    assert not any(provisional(r) for r in server.requests[before:])


@pytest.mark.parametrize("stale", ["another-root", "garbage", "fifo"])
def test_a_remembered_anchor_that_is_not_the_pinned_root_is_not_used(
    device: Device,
    start_server: Callable[..., EstTestServer],
    dev_pki: DevPki,
    cli: Run,
    stale: str,
) -> None:
    # The remembered file is another root (the configuration was re-provisioned with another
    # fingerprint), garbage, or a FIFO (never opened): not trusted; the run bootstraps again
    # and replaces it.
    server = start_server(server_cert_ca=ServerCertCa.EST_CA)
    root = dev_pki.est_ca.certificate
    fingerprint_config(device, server, dev_pki, fingerprint(root))
    device.state_dir.mkdir()
    copy = device.state_dir / "anchors-a.json"
    if stale == "another-root":
        AnchorStore(device.state_dir).adopt(dev_pki.tls_ca_certificate)
        said = (
            "the stored trust anchor is not the root est.cacerts_fingerprint names:"
            " bootstrapping again"
        )
    elif stale == "garbage":
        copy.write_bytes(b'{"format": 1, "sequence": 1, "anchors": "not a list"}')
        said = "the trust-anchor store is damaged: bootstrapping the trust anchor again"
    else:
        os.mkfifo(copy)
        said = "the trust-anchor store is damaged: bootstrapping the trust anchor again"

    started = time.monotonic()
    code, _out, err = cli("enroll", "--config", str(device.config), "--json")
    assert time.monotonic() - started < 15.0
    assert code == 0, err
    assert said in err
    assert provisional(server.requests[0])
    assert stored_anchors(device.state_dir) == [(root, Source.BOOTSTRAP)]


# --- refusals before the card is touched -----------------------------------------------------


def test_wrong_fingerprint_stops_76_naming_both_before_any_apdu(
    device: Device,
    start_server: Callable[..., EstTestServer],
    dev_pki: DevPki,
    cli: Run,
    card: CardLog,
) -> None:
    server = start_server(server_cert_ca=ServerCertCa.EST_CA)
    pin = fingerprint(dev_pki.bootstrap_ca.certificate)  # some other CA's fingerprint
    fingerprint_config(device, server, dev_pki, pin)

    started = time.monotonic()
    code, _out, err = cli("enroll", "--config", str(device.config))
    elapsed = time.monotonic() - started
    assert code == 76, err
    assert elapsed < 10.0
    assert "EstResponseError" in err
    assert pin in err and fingerprint(dev_pki.est_ca.certificate) in err
    assert "Traceback" not in err
    assert card.touches == []  # not even opened
    assert [(r.path.rsplit("/", 1)[1], r.client_certificate) for r in server.requests] == [
        ("cacerts", None)
    ]
    assert not device.state_dir.exists() or not list(device.state_dir.glob("anchors-*"))

    with pytest.raises(EstResponseError, match=r"no EST CA root from /cacerts matches"):
        Agent(load_config(device.config)).enroll()
    assert card.touches == []


def test_fingerprint_matches_but_the_tls_server_does_not_chain_to_it_stops_76_before_any_apdu(
    device: Device,
    start_server: Callable[..., EstTestServer],
    dev_pki: DevPki,
    cli: Run,
    card: CardLog,
) -> None:
    # /cacerts serves the dev PKI's EST CA (whose fingerprint is pinned), but the TLS server's
    # certificate comes from another CA (the dev TLS CA): whoever answered is not a server
    # that root authenticates, and its /cacerts is not believed.
    server = start_server(server_cert_ca=ServerCertCa.TLS_CA)
    fingerprint_config(device, server, dev_pki, fingerprint(dev_pki.est_ca.certificate))

    started = time.monotonic()
    with pytest.raises(TlsVerificationError) as info:
        Agent(load_config(device.config)).enroll()
    elapsed = time.monotonic() - started
    assert elapsed < 10.0
    assert info.value.exit_code == 76
    text = str(info.value)
    assert "EST server certificate for '127.0.0.1' refused" in text
    assert "does not chain to the /cacerts root that matches est.cacerts_fingerprint" in text
    assert card.touches == []
    assert not device.state_dir.exists() or not list(device.state_dir.glob("anchors-*"))
    assert [(r.method, r.client_certificate) for r in server.requests] == [("GET", None)]

    code, _out, err = cli("enroll", "--config", str(device.config))
    assert code == 76, err
    assert "TlsVerificationError" in err and "does not chain to the /cacerts root" in err
    assert card.touches == []


def test_the_provisional_connection_sends_no_credentials_even_when_some_are_configured(
    device: Device,
    start_server: Callable[..., EstTestServer],
    dev_pki: DevPki,
    cli: Run,
    card: CardLog,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The server wants the SIM's certificate and HTTP Basic for enrollment: both go on the
    # verified connection only; connection 1 carries GET /cacerts with neither.
    server = start_server(
        server_cert_ca=ServerCertCa.EST_CA,
        auth=AuthMode.CERT_AND_BASIC,
        basic=("device", "pw-for-bootstrap-test"),
    )
    monkeypatch.setenv("EST_TEST_PASSWORD", "pw-for-bootstrap-test")
    fingerprint_config(
        device,
        server,
        dev_pki,
        fingerprint(dev_pki.est_ca.certificate),
        est__basic_username='"device"',
        est__basic_password_env='"EST_TEST_PASSWORD"',
    )
    card.server = server
    code, _out, err = cli("enroll", "--config", str(device.config), "--json")
    assert code == 0, err
    first = [r for r in server.requests if r.connection == 1]
    assert [(r.method, r.path.rsplit("/", 1)[1]) for r in first] == [("GET", "cacerts")]
    assert (first[0].client_certificate, first[0].authorization) == (None, None)
    posts = [r for r in server.requests if r.method == "POST"]
    assert [(r.status, r.authorization, r.client_certificate) for r in posts] == [
        (200, "basic", "bootstrap")
    ]
    assert card.server_before_card == first


def test_bootstrap_goes_through_the_configured_proxy_too(
    device: Device,
    start_server: Callable[..., EstTestServer],
    dev_pki: DevPki,
    cli: Run,
    card: CardLog,
) -> None:
    server = start_server(server_cert_ca=ServerCertCa.EST_CA)
    with ConnectProxy() as proxy:
        fingerprint_config(
            device,
            server,
            dev_pki,
            fingerprint(dev_pki.est_ca.certificate),
            est__proxy=f'"http://127.0.0.1:{proxy.port}"',
        )
        card.server = server
        started = time.monotonic()
        code, _out, err = cli("enroll", "--config", str(device.config), "--json")
        elapsed = time.monotonic() - started
    assert code == 0, err
    assert elapsed < 20.0
    # one tunnel per TLS connection the server saw: the provisional one first
    connections = sorted({r.connection for r in server.requests})
    assert len(proxy.tunnels) == len(connections) >= 2
    assert all(t.target == f"127.0.0.1:{server.port}" and t.status == 200 for t in proxy.tunnels)
    assert card.server_before_card is not None and len(card.server_before_card) == 1
    assert provisional(card.server_before_card[0])


def test_unreachable_server_during_bootstrap_is_69_before_any_apdu(
    device: Device,
    start_server: Callable[..., EstTestServer],
    dev_pki: DevPki,
    cli: Run,
    card: CardLog,
) -> None:
    server = start_server(server_cert_ca=ServerCertCa.EST_CA)
    fingerprint_config(
        device, server, dev_pki, fingerprint(dev_pki.est_ca.certificate), est__timeout_s="2"
    )
    server.close()  # nothing listens on the port any more
    started = time.monotonic()
    code, _out, err = cli("enroll", "--config", str(device.config))
    elapsed = time.monotonic() - started
    assert code == 69, err
    assert elapsed < 10.0  # the retries' waits are bounded too (renewal.retry_cap_s, budget)
    assert card.touches == []


# --- configuration ------------------------------------------------------------------------------


def test_no_anchor_and_no_fingerprint_is_78_before_any_apdu(
    device: Device,
    start_server: Callable[..., EstTestServer],
    dev_pki: DevPki,
    cli: Run,
    card: CardLog,
) -> None:
    server = start_server()
    device.write_config(server, dev_pki, est__trust_anchor='""', est__cacerts_fingerprint='""')
    code, _out, err = cli("enroll", "--config", str(device.config))
    assert code == 78, err
    assert "est.trust_anchor: required unless est.cacerts_fingerprint is set" in err
    assert card.touches == []
    assert server.requests == []


def test_fingerprint_only_configuration_is_accepted_at_load_time(
    device: Device, start_server: Callable[..., EstTestServer], dev_pki: DevPki
) -> None:
    server = start_server()
    pin = fingerprint(dev_pki.est_ca.certificate)
    device.write_config(
        server, dev_pki, est__trust_anchor='""', est__cacerts_fingerprint=f'"{pin.upper()}"'
    )
    config = load_config(device.config)
    assert config.est.trust_anchor is None
    assert config.est.cacerts_fingerprint == bytes.fromhex(pin)
    # outside a run there is no anchor to use yet: refused, never an unverified connection
    with pytest.raises(ConfigError, match="no anchor was bootstrapped"):
        Agent(config)._trust_anchors(backend=None)  # type: ignore[arg-type]


# --- a state directory that cannot remember -------------------------------------------------


@needs_unshare
def test_read_only_state_dir_enrolls_says_it_could_not_remember_and_bootstraps_again(
    device: Device,
    start_server: Callable[..., EstTestServer],
    dev_pki: DevPki,
) -> None:
    server = start_server(server_cert_ca=ServerCertCa.EST_CA)
    fingerprint_config(device, server, dev_pki, fingerprint(dev_pki.est_ca.certificate))
    device.state_dir.mkdir()

    def run(command: str) -> dict[str, object]:
        argv = read_only_argv(
            device.state_dir, *agent_argv(command, "--json", "--config", str(device.config))
        )
        started = time.monotonic()
        proc = subprocess.run(
            argv, cwd=REPO, capture_output=True, text=True, timeout=60, check=False
        )
        assert time.monotonic() - started < 30.0
        assert proc.returncode == 0, proc.stderr
        assert "Traceback" not in proc.stderr
        result: dict[str, object] = json.loads(proc.stdout)
        return result

    result = run("enroll")
    assert result["outcome"] == "enrolled"
    not_remembered = (
        f"cannot write anchor store {device.state_dir / 'anchors-a.json'}: Read-only file system:"
        " the bootstrapped trust anchor is not remembered (the next run bootstraps again)"
    )
    notes = result["notes"]
    assert isinstance(notes, list) and not_remembered in notes, notes
    assert list(device.state_dir.iterdir()) == []
    assert sum(provisional(r) for r in server.requests) == 1

    # the next run (nothing due) bootstraps again first: one more provisional /cacerts
    again = run("run")
    assert again["outcome"] == "not-due"
    assert sum(provisional(r) for r in server.requests) == 2
    assert list(device.state_dir.iterdir()) == []
