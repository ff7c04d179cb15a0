"""The TLS engine (est/tls/) against hostile peers on 127.0.0.1 (tests/est/hostile_tls.py).

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

import httpx
import pytest
from cryptography import x509

from est_agent.errors import AuthError, EstConnectionError, TlsVerificationError
from est_agent.est.client import EstClient, RetryPolicy
from est_agent.est.tls import EstTransport, StdlibTls, TlsliteTls, policy
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
    monkeypatch.setattr(policy, "TLS12_KEY_EXCHANGES", ("rsa", "ecdhe_rsa"))
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


@pytest.mark.parametrize("tls_max", ["1.2", "1.3"])
def test_server_closing_after_each_answer_is_fine_and_next_request_reconnects(
    dev_pki: DevPki, sim: SimCard, tmp_path: Path, tls_max: str
) -> None:
    # The field's server answers at once, then closes without reading on: a record we send
    # after the request reaches a closed socket, the RST that brings fails our next write,
    # and that used to surface as a refusal (77) or a reset. Several rounds: it is a race.
    version = ssl.TLSVersion.TLSv1_2 if tls_max == "1.2" else ssl.TLSVersion.TLSv1_3
    ctx = hostile.server_context(dev_pki, tls_max=version, tmp=tmp_path)
    rounds = 6
    start = time.monotonic()
    with (
        hostile.SslHttpServer(
            context=ctx,
            mode="close_after_answer",
            pause_s=0.0,
            answer=hostile.cacerts_response(dev_pki),
        ) as server,
        card_client(server.url, dev_pki, sim) as client,
    ):
        # each request notices the previous connection closed: a new one, not an error
        anchors = {client.cacerts().anchor for _ in range(rounds)}
        assert client.transport is not None and client.transport.connections_opened == rounds
    assert hostile.elapsed(start) < 10
    assert anchors == {dev_pki.est_ca.certificate}
    assert server.requests == rounds
    assert sim.bootstrap.signatures == rounds  # one per handshake


def test_request_on_a_connection_the_server_just_dropped_is_sent_again_once(
    dev_pki: DevPki, sim: SimCard, tmp_path: Path
) -> None:
    # RFC 9112 §9.3.1: a GET whose reused keep-alive connection closes before any answer is
    # sent again, once, on a new connection (the client cannot see that close coming).
    ctx = hostile.server_context(dev_pki, tmp=tmp_path)
    with (
        hostile.SslHttpServer(
            context=ctx, mode="drop_second", answer=hostile.cacerts_response(dev_pki)
        ) as server,
        card_client(server.url, dev_pki, sim) as client,
    ):
        client.cacerts()
        client.cacerts()
        assert client.transport is not None and client.transport.connections_opened == 2
    assert server.requests == 3  # the dropped one, and the same request again
    assert sim.bootstrap.signatures == 2


def test_dropped_request_is_not_sent_again_when_pinned(
    dev_pki: DevPki, sim: SimCard, tmp_path: Path
) -> None:
    # Pinned (a CSR bound to this connection is on its way): never a new connection.
    ctx = hostile.server_context(dev_pki, tmp=tmp_path)
    url = "/.well-known/est/cacerts"
    with hostile.SslHttpServer(
        context=ctx, mode="drop_second", answer=hostile.cacerts_response(dev_pki)
    ) as server:
        transport = EstTransport(_tls_for("card", dev_pki, sim), timeout_s=5.0)
        with httpx.Client(transport=transport, base_url=server.url) as http:
            assert http.get(url).status_code == 200
            with transport.pinned(), pytest.raises(EstConnectionError) as info:
                http.get(url)
        assert transport.connections_opened == 1
    assert server.requests == 2
    assert info.value.exit_code == 69
    assert_plain(info.value)


# -- 3. a certificate alert is a refusal; a bare close is transient -----------------------------

# A message names what happened, never a class (ours, tlslite's or httpcore's).
CLASS_NAME = r"\b_?[A-Z][A-Za-z]*(Error|Exception|Timeout|Alert)\b"


def assert_plain(exc: BaseException) -> None:
    import re

    assert not re.search(CLASS_NAME, str(exc)), str(exc)


@pytest.mark.parametrize("with_reset", [False, True], ids=["fin", "rst"])
def test_tls12_bare_close_after_our_certificate_verify_is_transient(
    start_server: Any, dev_pki: DevPki, sim: SimCard, with_reset: bool
) -> None:
    # The relay drops the connection when our ChangeCipherSpec comes, i.e. right after our
    # CertificateVerify: no alert, so no refusal; retried (a new handshake, a new signature).
    from est_agent.testserver.config import TlsMax

    server = start_server(tls_max=TlsMax.TLS1_2)
    start = time.monotonic()
    with hostile.RecordProxy(
        upstream=server.port,
        cut_on_client_type=hostile.CHANGE_CIPHER_SPEC,
        cut_with_reset=with_reset,
    ) as proxy:
        client = card_client(proxy.url, dev_pki, sim, attempts=2)
        with client, pytest.raises(EstConnectionError, match=r"without a TLS alert|reset") as info:
            client.cacerts()
    assert hostile.elapsed(start) < 5
    assert info.value.exit_code == 69  # the client retries EstConnectionError (below)
    assert proxy.cuts == 2  # the retry happened
    assert sim.bootstrap.signatures == 2
    assert_plain(info.value)


@pytest.mark.parametrize("with_reset", [False, True], ids=["fin", "rst"])
def test_tls12_certificate_alert_after_our_certificate_verify_is_a_refusal(
    start_server: Any, dev_pki: DevPki, sim: SimCard, with_reset: bool
) -> None:
    from est_agent.testserver.config import TlsMax

    server = start_server(tls_max=TlsMax.TLS1_2)
    start = time.monotonic()
    with hostile.RecordProxy(
        upstream=server.port,
        cut_on_client_type=hostile.CHANGE_CIPHER_SPEC,
        inject=hostile.alert_record(hostile.ACCESS_DENIED),
        cut_with_reset=with_reset,
    ) as proxy:
        client = card_client(proxy.url, dev_pki, sim, attempts=2)
        with client, pytest.raises(AuthError, match="access_denied") as info:
            client.cacerts()
    assert hostile.elapsed(start) < 5
    assert info.value.exit_code == 77
    assert proxy.cuts == 1  # not retried: a new handshake would cost a signature for nothing
    assert sim.bootstrap.signatures == 1
    assert_plain(info.value)


def test_tls12_alert_then_reset_while_we_still_write_is_a_refusal(
    start_server: Any, dev_pki: DevPki, sim: SimCard
) -> None:
    # What OpenSSL servers do on a certificate they refuse: the alert as soon as our
    # Certificate arrives, then a close with our later records unread (an RST). Our next
    # write may fail before we read: the alert waiting in the socket still decides.
    from est_agent.testserver.config import TlsMax

    server = start_server(tls_max=TlsMax.TLS1_2)
    with hostile.RecordProxy(
        upstream=server.port,
        cut_on_handshake=hostile.CERTIFICATE,
        inject=hostile.alert_record(48),  # unknown_ca
        cut_with_reset=True,
    ) as proxy:
        client = card_client(proxy.url, dev_pki, sim, attempts=2)
        with client, pytest.raises(AuthError, match="unknown_ca") as info:
            client.cacerts()
    assert proxy.cuts == 1
    assert sim.bootstrap.signatures <= 1
    assert_plain(info.value)


@pytest.mark.parametrize("with_reset", [False, True], ids=["fin", "rst"])
def test_tls13_bare_close_right_after_the_handshake_is_transient(
    dev_pki: DevPki, sim: SimCard, tmp_path: Path, with_reset: bool
) -> None:
    # TLS 1.3 (RFC 8446 §4.4.2): the server judges our certificate after our Finished, so a
    # refusal shows up on the first read; a close without an alert there is load shedding.
    ctx = hostile.server_context(dev_pki, tmp=tmp_path)
    start = time.monotonic()
    with hostile.SslHttpServer(
        context=ctx, mode="close_after_handshake", with_reset=with_reset
    ) as server:
        client = card_client(server.url, dev_pki, sim, attempts=2)
        with client, pytest.raises(EstConnectionError) as info:
            client.cacerts()
    assert hostile.elapsed(start) < 5
    assert info.value.exit_code == 69  # the client retries EstConnectionError (below)
    assert server.accepted == 2  # retried
    assert sim.bootstrap.signatures == 2
    assert_plain(info.value)


@pytest.mark.parametrize("tls_max", ["1.2", "1.3"])
def test_server_refusing_our_certificate_with_an_alert_is_auth_error(
    dev_pki: DevPki, sim: SimCard, tmp_path: Path, tls_max: str
) -> None:
    # An OpenSSL server that trusts another CA for clients: unknown_ca, in the handshake
    # (TLS 1.2) or on our first read (TLS 1.3). Not retried.

    version = ssl.TLSVersion.TLSv1_2 if tls_max == "1.2" else ssl.TLSVersion.TLSv1_3
    ctx = hostile.server_context(
        dev_pki,
        tls_max=version,
        client_ca=dev_pki.est_ca.certificate,
        require_client_cert=True,
        tmp=tmp_path,
    )
    start = time.monotonic()
    with hostile.SslHttpServer(context=ctx, answer=hostile.cacerts_response(dev_pki)) as server:
        client = card_client(server.url, dev_pki, sim, attempts=2)
        with client, pytest.raises(AuthError, match="unknown_ca") as info:
            client.cacerts()
    assert hostile.elapsed(start) < 5
    assert info.value.exit_code == 77
    assert server.accepted == 1 and server.requests == 0
    assert sim.bootstrap.signatures == 1
    assert_plain(info.value)


@pytest.mark.parametrize("tls_max", ["1.2", "1.3"])
def test_pem_key_refused_with_an_alert_is_auth_error(
    dev_pki: DevPki, tmp_path: Path, tls_max: str
) -> None:
    # A PEM bootstrap key signs through a SoftwareSigner on the tlslite path, as the workflow
    # does for bootstrap.key = a PEM file (there is no file-key stdlib path).
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    from est_agent.backends.signer import SoftwareSigner
    from tests.testserver.esttls_helpers import bootstrap_credential

    cert_path, key_path, _ = bootstrap_credential(dev_pki, tmp_path)
    key = load_pem_private_key(key_path.read_bytes(), None)
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    version = ssl.TLSVersion.TLSv1_2 if tls_max == "1.2" else ssl.TLSVersion.TLSv1_3
    ctx = hostile.server_context(
        dev_pki,
        tls_max=version,
        client_ca=dev_pki.est_ca.certificate,  # not the bootstrap CA
        require_client_cert=True,
        tmp=tmp_path,
    )
    with (
        hostile.SslHttpServer(context=ctx, answer=hostile.cacerts_response(dev_pki)) as server,
        EstClient(
            server.url,
            trust_anchors=[dev_pki.tls_ca_certificate],
            client_cert_chain=[cert],
            signer=SoftwareSigner(key),  # type: ignore[arg-type]
            retry=RetryPolicy(attempts=2, sleep=Sleeps()),
        ) as client,
        pytest.raises(AuthError, match=r"unknown.ca") as info,
    ):
        client.cacerts()
    assert server.accepted == 1
    assert_plain(info.value)


# -- 4. one deadline per request; card time is not network time ----------------------------------


def _tls_for(path: str, pki: DevPki, card: SimCard) -> TlsliteTls | StdlibTls:
    if path == "card":
        return TlsliteTls((pki.tls_ca_certificate,), (card.bootstrap_cert,), card.bootstrap)
    return StdlibTls((pki.tls_ca_certificate,))


def _get(url: str, tls: TlsliteTls | StdlibTls, timeout_s: float) -> httpx.Response:
    # Per-operation timeouts far above the deadline: only the request deadline can end this.
    transport = EstTransport(tls, timeout_s=timeout_s)
    with httpx.Client(transport=transport, timeout=httpx.Timeout(60.0)) as client:
        return client.get(url + "/.well-known/est/cacerts")


@pytest.mark.parametrize("path", ["card", "stdlib"])
def test_handshake_trickled_one_byte_a_second_is_bounded(
    start_server: Any, dev_pki: DevPki, sim: SimCard, path: str
) -> None:
    server = start_server()
    start = time.monotonic()
    with (
        hostile.RecordProxy(upstream=server.port, trickle_s=1.0) as proxy,
        pytest.raises(EstConnectionError, match="not complete in 2 s") as info,
    ):
        _get(proxy.url, _tls_for(path, dev_pki, sim), timeout_s=2.0)
    assert 1.9 <= hostile.elapsed(start) < 3.5
    assert info.value.exit_code == 69
    assert sim.bootstrap.signatures == 0  # the server's flight never arrived
    assert_plain(info.value)


@pytest.mark.parametrize("part", ["head", "body"])
@pytest.mark.parametrize("path", ["card", "stdlib"])
def test_answer_trickled_one_byte_a_second_is_bounded(
    dev_pki: DevPki, sim: SimCard, tmp_path: Path, path: str, part: str
) -> None:
    ctx = hostile.server_context(dev_pki, tmp=tmp_path)
    start = time.monotonic()
    with (
        hostile.SslHttpServer(
            context=ctx, mode=f"trickle_{part}", answer=hostile.cacerts_response(dev_pki)
        ) as server,
        pytest.raises(EstConnectionError, match="not complete in 2 s") as info,
    ):
        _get(server.url, _tls_for(path, dev_pki, sim), timeout_s=2.0)
    assert 1.9 <= hostile.elapsed(start) < 3.5
    assert server.requests == 1
    assert_plain(info.value)


def test_est_timeout_bounds_a_trickled_answer_through_the_client(
    dev_pki: DevPki, sim: SimCard, tmp_path: Path
) -> None:
    # The field setting: est.timeout_s reaches the transport (EstClient passes it on).
    ctx = hostile.server_context(dev_pki, tmp=tmp_path)
    start = time.monotonic()
    with (
        hostile.SslHttpServer(
            context=ctx, mode="trickle_head", answer=hostile.cacerts_response(dev_pki)
        ) as server,
        card_client(server.url, dev_pki, sim, timeout_s=2.0) as client,
        pytest.raises(EstConnectionError, match="not complete in 2 s") as info,
    ):
        client.cacerts()
    assert 1.9 <= hostile.elapsed(start) < 3.5
    assert info.value.exit_code == 69
    assert_plain(info.value)


class SlowSigner:
    """The card, taking ``delay_s`` for each signature."""

    def __init__(self, inner: Any, delay_s: float) -> None:
        self._inner = inner
        self._delay_s = delay_s

    def public_key(self) -> Any:
        return self._inner.public_key()

    def sign_digest(self, digest: bytes) -> bytes:
        time.sleep(self._delay_s)
        signature: bytes = self._inner.sign_digest(digest)
        return signature


def test_card_time_is_not_counted_against_the_request_deadline(
    start_server: Any, dev_pki: DevPki, sim: SimCard
) -> None:
    server = start_server()
    slow = SlowSigner(sim.bootstrap, 3.0)
    tls = TlsliteTls((dev_pki.tls_ca_certificate,), (sim.bootstrap_cert,), slow)  # type: ignore[arg-type]
    start = time.monotonic()
    response = _get(base_url(server), tls, timeout_s=2.0)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("application/pkcs7-mime")
    assert 3.0 <= hostile.elapsed(start) < 5.5
    assert sim.bootstrap.signatures == 1


def base_url(server: Any) -> str:
    url: str = server.url
    return url.removesuffix("/.well-known/est")
