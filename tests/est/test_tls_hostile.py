"""The TLS engine (est/tls.py) against hostile peers on 127.0.0.1 (tests/est/hostile_tls.py).

One section per field report: the card signs only for a server that has proved it holds its
certificate's key; no empty TLS record after a request; a certificate-refusal alert is a
refusal but a bare close is transient; one deadline per request, card time excluded; error
texts that name what happened. Every test bounds its wall time.
"""

from __future__ import annotations

import socket
import ssl
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from est_agent.errors import TlsVerificationError
from est_agent.est import tls as tls_module
from est_agent.est.client import EstClient, RetryPolicy
from est_agent.est.tls import StdlibTls
from est_agent.testserver import DevPki
from tests.est import hostile_tls as hostile
from tests.est.card_helpers import SimCard

pytestmark = pytest.mark.integration


class Sleeps:
    """Injected sleep for the retry policy: records, never waits."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


def card_client(
    url: str, pki: DevPki, card: SimCard, *, attempts: int = 1, **options: Any
) -> EstClient:
    options.setdefault("timeout_s", 10.0)
    return EstClient(
        url,
        trust_anchors=[pki.tls_ca_certificate],
        client_cert_chain=[card.bootstrap_cert],
        signer=card.bootstrap,
        retry=RetryPolicy(attempts=attempts, sleep=Sleeps()),
        **options,
    )


@pytest.fixture
def rsa_credential(dev_pki: DevPki) -> tuple[x509.Certificate, Any]:
    return hostile.rsa_server_credential(dev_pki.directory)


# -- 1. the card signs only after the server proved it holds its key ---------------------------

S = hostile.Suite
TLS12, TLS13 = (3, 3), (3, 4)
# Every TLS 1.2 suite the client offers (written out: these are the expected values).
OFFERED_TLS12 = [
    S("TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384", TLS12, "ecdhe_ecdsa", "aes256gcm", "aead"),
    S("TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256", TLS12, "ecdhe_ecdsa", "aes128gcm", "aead"),
    S("TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384", TLS12, "ecdhe_rsa", "aes256gcm", "aead"),
    S("TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256", TLS12, "ecdhe_rsa", "aes128gcm", "aead"),
    S("TLS_DHE_RSA_WITH_AES_256_GCM_SHA384", TLS12, "dhe_rsa", "aes256gcm", "aead"),
    S("TLS_DHE_RSA_WITH_AES_128_GCM_SHA256", TLS12, "dhe_rsa", "aes128gcm", "aead"),
    S(
        "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256",
        TLS12,
        "ecdhe_ecdsa",
        "chacha20-poly1305",
        "aead",
    ),
    S(
        "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256",
        TLS12,
        "ecdhe_rsa",
        "chacha20-poly1305",
        "aead",
    ),
    S("TLS_DHE_RSA_WITH_CHACHA20_POLY1305_SHA256", TLS12, "dhe_rsa", "chacha20-poly1305", "aead"),
    S("TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA384", TLS12, "ecdhe_ecdsa", "aes256", "sha384"),
    S("TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA256", TLS12, "ecdhe_ecdsa", "aes128", "sha256"),
    S("TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA384", TLS12, "ecdhe_rsa", "aes256", "sha384"),
    S("TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA256", TLS12, "ecdhe_rsa", "aes128", "sha256"),
    S("TLS_DHE_RSA_WITH_AES_256_CBC_SHA256", TLS12, "dhe_rsa", "aes256", "sha256"),
    S("TLS_DHE_RSA_WITH_AES_128_CBC_SHA256", TLS12, "dhe_rsa", "aes128", "sha256"),
]
OFFERED_TLS13 = [
    S("TLS_AES_256_GCM_SHA384", TLS13, "", "aes256gcm", "aead"),
    S("TLS_AES_128_GCM_SHA256", TLS13, "", "aes128gcm", "aead"),
    S("TLS_CHACHA20_POLY1305_SHA256", TLS13, "", "chacha20-poly1305", "aead"),
]
# The handshakes to try: each TLS 1.2 suite with the certificate type it needs, each TLS 1.3
# suite with the EC certificate, and TLS 1.3 with the RSA certificate (RSA-PSS signature).
HANDSHAKES = [(s, "ec" if "ECDSA" in s.name else "rsa") for s in OFFERED_TLS12] + [
    *[(s, "ec") for s in OFFERED_TLS13],
    (OFFERED_TLS13[1], "rsa"),
]


def _credential(
    pki: DevPki, kind: str, rsa_credential: tuple[x509.Certificate, Any]
) -> tuple[x509.Certificate, Any]:
    if kind == "rsa":
        return rsa_credential
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(pki.server_key_path.read_bytes(), None)
    return hostile.server_certificate(pki), key


def _suite_id(case: tuple[hostile.Suite, str]) -> str:
    suite, kind = case
    return f"{suite.name}-{kind}"


@pytest.mark.parametrize("case", HANDSHAKES, ids=_suite_id)
def test_impostor_with_the_real_certificate_gets_no_card_signature(
    dev_pki: DevPki,
    sim: SimCard,
    rsa_credential: tuple[x509.Certificate, Any],
    case: tuple[hostile.Suite, str],
) -> None:
    # The impostor presents the real server's valid chain but holds another key: its signature
    # (ServerKeyExchange in TLS 1.2, CertificateVerify in TLS 1.3) cannot verify, and that is
    # checked before the card is asked for our CertificateVerify.
    suite, kind = case
    cert, _ = _credential(dev_pki, kind, rsa_credential)
    apdus = sim.transport.stats.apdus
    start = time.monotonic()
    with (
        hostile.TlsliteServer(chain=(cert,), key=hostile.other_key(kind), suite=suite) as server,
        card_client(server.url, dev_pki, sim, attempts=2) as client,
        pytest.raises(TlsVerificationError, match="decrypt_error") as info,
    ):
        client.cacerts()
    assert hostile.elapsed(start) < 5
    assert info.value.exit_code == 76
    assert sim.transport.stats.apdus == apdus  # the card was not even addressed
    assert sim.bootstrap.signatures == 0
    # The impostor got as far as signing with this suite, and our client refused the signature.
    assert server.outcomes == [("alert", "decrypt_error")]


@pytest.mark.parametrize("case", HANDSHAKES, ids=_suite_id)
def test_genuine_server_gets_one_card_signature_per_suite(
    dev_pki: DevPki,
    sim: SimCard,
    rsa_credential: tuple[x509.Certificate, Any],
    case: tuple[hostile.Suite, str],
) -> None:
    # The control of the impostor test: with the certificate's own key the same suite
    # completes, and the card signs once.
    suite, kind = case
    cert, key = _credential(dev_pki, kind, rsa_credential)
    start = time.monotonic()
    with (
        hostile.TlsliteServer(
            chain=(cert,), key=key, suite=suite, answer=hostile.cacerts_response(dev_pki)
        ) as server,
        card_client(server.url, dev_pki, sim) as client,
    ):
        assert client.cacerts().anchor == dev_pki.est_ca.certificate
    assert hostile.elapsed(start) < 5
    assert server.outcomes == [("ok", suite.name)]
    assert sim.bootstrap.signatures == 1


def test_static_rsa_only_server_gets_a_handshake_failure_and_no_signature(
    dev_pki: DevPki, sim: SimCard, rsa_credential: tuple[x509.Certificate, Any]
) -> None:
    # The field report: a copy of the real certificate, no key, TLS_RSA_WITH_AES_128_GCM_SHA256.
    cert, _ = rsa_credential
    suite = S("TLS_RSA_WITH_AES_128_GCM_SHA256", TLS12, "rsa", "aes128gcm", "aead")
    apdus = sim.transport.stats.apdus
    start = time.monotonic()
    with (
        hostile.TlsliteServer(chain=(cert,), key=hostile.other_key("rsa"), suite=suite) as server,
        card_client(server.url, dev_pki, sim, attempts=2) as client,
        pytest.raises(TlsVerificationError, match="handshake") as info,
    ):
        client.cacerts()
    assert hostile.elapsed(start) < 5
    assert info.value.exit_code == 76
    assert sim.transport.stats.apdus == apdus
    assert sim.bootstrap.signatures == 0
    assert server.outcomes == [("alert", "insufficient_security")]  # no suite in common


def test_static_rsa_is_refused_even_if_it_were_offered(
    dev_pki: DevPki,
    sim: SimCard,
    rsa_credential: tuple[x509.Certificate, Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Defence in depth: with static RSA wrongly added to the offer, the client still refuses
    # the suite when the server picks it, before sending its certificate.
    monkeypatch.setattr(tls_module, "_TLS12_KEY_EXCHANGES", ("rsa", "ecdhe_rsa"))
    cert, _ = rsa_credential
    suite = S("TLS_RSA_WITH_AES_128_GCM_SHA256", TLS12, "rsa", "aes128gcm", "aead")
    apdus = sim.transport.stats.apdus
    with (
        hostile.TlsliteServer(chain=(cert,), key=hostile.other_key("rsa"), suite=suite) as server,
        card_client(server.url, dev_pki, sim) as client,
        pytest.raises(TlsVerificationError, match=r"TLS_RSA_WITH_AES_128_GCM_SHA256.*9325"),
    ):
        client.cacerts()
    assert sim.transport.stats.apdus == apdus
    assert server.outcomes == [("alert", "handshake_failure")]


def _client_hello_suites(record: bytes) -> list[int]:
    """The cipher_suites of a ClientHello record (RFC 8446 §4.1.2)."""
    assert record[0] == hostile.HANDSHAKE and record[5] == 1  # handshake, client_hello
    at = 5 + 4 + 2 + 32  # record header, handshake header, legacy_version, random
    at += 1 + record[at]  # legacy_session_id
    length = int.from_bytes(record[at : at + 2], "big")
    raw = record[at + 2 : at + 2 + length]
    return [int.from_bytes(raw[i : i + 2], "big") for i in range(0, len(raw), 2)]


@pytest.mark.parametrize("tls_max", ["1.2", "1.3"])
def test_client_hello_offers_signed_key_exchanges_aead_first(
    dev_pki: DevPki, sim: SimCard, tls_max: str
) -> None:
    hostile.tlslite()
    from tlslite.constants import CipherSuite

    hellos: list[bytes] = []

    class HelloCatcher(hostile.Peer):
        def handle(self, conn: socket.socket) -> None:
            conn.settimeout(5)
            data = b""
            while len(data) < 5 or len(data) < 5 + int.from_bytes(data[3:5], "big"):
                data += conn.recv(65536)
            hellos.append(data)
            conn.sendall(hostile.alert_record(40))  # handshake_failure

    with (
        HelloCatcher() as catcher,
        card_client(catcher.url, dev_pki, sim, tls_max=tls_max) as client,
        pytest.raises(TlsVerificationError, match="handshake_failure"),
    ):
        client.cacerts()
    names = [CipherSuite.ietfNames[s] for s in _client_hello_suites(hellos[0])]
    expected = [s.name for s in OFFERED_TLS12]
    if tls_max == "1.3":
        expected = [s.name for s in OFFERED_TLS13] + expected
    assert names == ["TLS_EMPTY_RENEGOTIATION_INFO_SCSV", *expected]
    assert sim.bootstrap.signatures == 0


# -- 1b. the stdlib path: (EC)DHE + AEAD only under TLS 1.2 -------------------------------------


def test_stdlib_context_offers_only_ecdhe_dhe_aead_under_tls12(dev_pki: DevPki) -> None:
    ctx = StdlibTls((dev_pki.tls_ca_certificate,)).context()
    tls12 = [c for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.2"]
    assert tls12
    assert {c["kea"] for c in tls12} == {"kx-ecdhe", "kx-dhe"}
    assert all(c["aead"] for c in tls12)
    assert {c["auth"] for c in tls12} <= {"auth-rsa", "auth-ecdsa"}
    tls13 = {c["name"] for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.3"}
    assert tls13 == {
        "TLS_AES_256_GCM_SHA384",
        "TLS_AES_128_GCM_SHA256",
        "TLS_CHACHA20_POLY1305_SHA256",
    }


def test_stdlib_path_refuses_a_static_rsa_only_server(
    dev_pki: DevPki, rsa_credential: tuple[x509.Certificate, Any], tmp_path: Path
) -> None:
    cert, key = rsa_credential
    ctx = hostile.server_context(
        dev_pki,
        cert=cert,
        key=key,
        tls_max=ssl.TLSVersion.TLSv1_2,
        ciphers="AES128-GCM-SHA256",
        tmp=tmp_path,
    )
    start = time.monotonic()
    with (
        hostile.SslHttpServer(context=ctx, answer=hostile.cacerts_response(dev_pki)) as server,
        EstClient(
            server.url,
            trust_anchors=[dev_pki.tls_ca_certificate],
            retry=RetryPolicy(attempts=2, sleep=Sleeps()),
        ) as client,
        pytest.raises(TlsVerificationError, match="handshake") as info,
    ):
        client.cacerts()
    assert hostile.elapsed(start) < 5
    assert info.value.exit_code == 76
    assert server.requests == 0
    assert any("no shared cipher" in e for e in server.handshake_errors)


def test_stdlib_path_still_talks_ecdhe_rsa_gcm(
    dev_pki: DevPki, rsa_credential: tuple[x509.Certificate, Any], tmp_path: Path
) -> None:
    # The control: the same RSA server with an (EC)DHE + AEAD suite is fine.
    cert, key = rsa_credential
    ctx = hostile.server_context(
        dev_pki,
        cert=cert,
        key=key,
        tls_max=ssl.TLSVersion.TLSv1_2,
        ciphers="ECDHE-RSA-AES128-GCM-SHA256",
        tmp=tmp_path,
    )
    with (
        hostile.SslHttpServer(context=ctx, answer=hostile.cacerts_response(dev_pki)) as server,
        EstClient(server.url, trust_anchors=[dev_pki.tls_ca_certificate]) as client,
    ):
        assert client.cacerts().anchor == dev_pki.est_ca.certificate
    assert server.requests == 1


# -- 2. no empty TLS record after a request ----------------------------------------------------


def test_one_application_data_record_per_request(
    start_server: Any, dev_pki: DevPki, sim: SimCard
) -> None:
    # TLS 1.2 shows record types on the wire (RFC 5246 §6.2.1): after the handshake every
    # client application_data record is one request head; an empty record (the HTTP layer's
    # zero-length write of the end of a GET) would be one more per request.
    from est_agent.testserver.config import TlsMax

    server = start_server(tls_max=TlsMax.TLS1_2)
    with hostile.RecordProxy(upstream=server.port) as proxy:
        with card_client(proxy.url, dev_pki, sim) as client:
            client.cacerts()
            assert client.csrattrs() is None
            client.cacerts()
            assert client.transport is not None and client.transport.connections_opened == 1
        proxy.close()  # waits for the relay: every record the client sent is counted
    data = [length for kind, length in proxy.client_records if kind == hostile.APPLICATION_DATA]
    assert len(data) == 3
    assert min(data) > 24  # 24 = AES-GCM's explicit nonce + tag: an empty record's size
