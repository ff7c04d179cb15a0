"""EstClient against the real test EST server over real TLS on 127.0.0.1, keys in a virtual SIM.

Every TLS client authentication here signs through tlslite-ng: on the (in-process) virtual
SIM, or with a PEM key through a SoftwareSigner; the stdlib path is server-only. The
card-signature and APDU counters prove the two properties the issue insists on: one card
signature per full handshake (plus one per CSR), and none at all when the server fails
verification.
"""

from __future__ import annotations

import base64
import json
import socket
import ssl
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from est_agent.csr import CsrBuilder
from est_agent.errors import (
    AuthError,
    EnrollmentPending,
    EstConnectionError,
    EstRejectedError,
    EstResponseError,
    TlsVerificationError,
)
from est_agent.est.client import EstClient, RetryPolicy
from est_agent.est.messages import challenge_password_value
from est_agent.est.tls import ChannelBinding
from est_agent.testserver import DevPki, EstTestServer
from est_agent.testserver.config import AuthMode, Fault, TlsMax
from est_agent.testserver.issuer import Profile
from tests.est.card_helpers import OP_KEY_A, OP_KEY_B, SimCard, build_csr, raw_subject_and_san
from tests.testserver.esttls_helpers import bootstrap_credential

pytestmark = pytest.mark.integration

StartServer = Callable[..., EstTestServer]
# The project's CSR builder, as the enrollment workflow will use it.
DEVICE_CSR = (
    CsrBuilder()
    .subject([(NameOID.COMMON_NAME, "device-8988247000001234567")])
    .subject_alt_names([x509.DNSName("device-1.example")])
    .eku_client_auth()
)


class Sleeps:
    """Injected sleep for the retry policy: records, never waits."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


def card_client(
    server: EstTestServer,
    pki: DevPki,
    card: SimCard,
    *,
    cert: x509.Certificate | None = None,
    signer: object = None,
    **options: object,
) -> EstClient:
    options.setdefault("retry", RetryPolicy(attempts=3, sleep=Sleeps()))
    options.setdefault("timeout_s", 10.0)
    return EstClient(
        server.url.removesuffix("/.well-known/est"),
        trust_anchors=[pki.tls_ca_certificate],
        client_cert_chain=[cert or card.bootstrap_cert],
        signer=signer or card.bootstrap,  # type: ignore[arg-type]
        **options,  # type: ignore[arg-type]
    )


def base_url(server: EstTestServer) -> str:
    return server.url.removesuffix("/.well-known/est")


def issued_log(server: EstTestServer) -> list[dict[str, object]]:
    path = server.config.issuance_log
    assert path is not None
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


# -- first enrollment and re-enrollment with card keys ------------------------------------------


@pytest.mark.parametrize("tls_max", [TlsMax.TLS1_2, TlsMax.TLS1_3])
def test_enroll_and_reenroll_with_card_keys(
    start_server: StartServer, dev_pki: DevPki, sim: SimCard, tls_max: TlsMax
) -> None:
    server = start_server(tls_max=tls_max)
    op_a = sim.new_key(OP_KEY_A)
    bindings: list[ChannelBinding | None] = []

    def csr_a(binding: ChannelBinding | None) -> bytes:
        bindings.append(binding)
        return DEVICE_CSR.build(op_a)

    stats = sim.transport.stats
    apdus_before = stats.apdus
    op_a.sign_digest(bytes(32))  # what one card signature costs on this link
    per_signature = stats.apdus - apdus_before
    op_a.signatures = 0
    apdus_before = stats.apdus
    with card_client(server, dev_pki, sim) as client:
        enrolled = client.simpleenroll(csr_a)
        assert client.transport.connections_opened == 1
    # one card signature for the TLS handshake (bootstrap key), one for the CSR (op key)
    assert sim.bootstrap.signatures == 1
    assert op_a.signatures == 1
    assert stats.apdus - apdus_before == 2 * per_signature  # the card did nothing else
    cert = enrolled.certificate
    assert cert.public_key() == op_a.public_key()
    cert.verify_directly_issued_by(dev_pki.est_ca.certificate)
    (binding,) = bindings
    assert binding is not None
    expected_kind = "tls-unique" if tls_max is TlsMax.TLS1_2 else "tls-exporter"
    assert (binding.kind, len(binding.value)) == (
        expected_kind,
        12 if tls_max is TlsMax.TLS1_2 else 32,
    )

    # Re-enroll: TLS authenticated by the issued certificate and its card key (RFC 7030
    # §4.2.2), rekey into slot 03 with the same raw Subject and SAN.
    op_b = sim.new_key(OP_KEY_B)
    renewal_csr = CsrBuilder().copy_from_certificate(cert).eku_client_auth()
    with card_client(server, dev_pki, sim, cert=cert, signer=op_a) as client:
        renewed = client.simplereenroll(lambda _b: renewal_csr.build(op_b))
    assert op_a.signatures == 2  # the CSR earlier + this handshake
    assert op_b.signatures == 1
    assert renewed.certificate.public_key() == op_b.public_key()
    assert renewed.certificate.subject == cert.subject
    assert raw_subject_and_san(renewed.certificate) == raw_subject_and_san(cert)
    assert [e["operation"] for e in issued_log(server)] == ["simpleenroll", "simplereenroll"]


def test_one_connection_carries_cacerts_csrattrs_and_enroll(
    start_server: StartServer, dev_pki: DevPki, sim: SimCard
) -> None:
    server = start_server()
    op_a = sim.new_key(OP_KEY_A)
    with card_client(server, dev_pki, sim) as client:
        ca = client.cacerts()
        assert ca.anchor == dev_pki.est_ca.certificate
        assert client.csrattrs() is None  # server default: 204
        client.simpleenroll(lambda _b: build_csr(op_a))
        assert client.transport.connections_opened == 1
    assert sim.bootstrap.signatures == 1


@pytest.mark.parametrize("tampered", [False, True])
def test_pop_tls_unique(
    start_server: StartServer, dev_pki: DevPki, sim: SimCard, tampered: bool
) -> None:
    server = start_server(tls_max=TlsMax.TLS1_2, pop_required=True)
    op_a = sim.new_key(OP_KEY_A)

    def csr(binding: ChannelBinding | None) -> bytes:
        assert binding is not None and binding.kind == "tls-unique"
        value = binding.value
        if tampered:
            value = bytes([value[0] ^ 1]) + value[1:]
        return DEVICE_CSR.challenge_password(challenge_password_value(value)).build(op_a)

    with card_client(server, dev_pki, sim, tls_max="1.2") as client:
        if tampered:
            with pytest.raises(EstRejectedError, match="PoP failed"):
                client.simpleenroll(csr)
        else:
            assert client.simpleenroll(csr).certificate.public_key() == op_a.public_key()
    assert issued_log(server) == [] if tampered else len(issued_log(server)) == 1


@pytest.mark.parametrize("tampered", [False, True])
def test_pop_tls_exporter_under_tls13(
    start_server: StartServer, dev_pki: DevPki, sim: SimCard, tampered: bool
) -> None:
    # RFC 9266 under TLS 1.3 with client authentication: the server takes OpenSSL's exporter
    # secret; the agent's value must be the RFC 8446 §7.1/§7.5 one (tlslite-ng 0.8.2's own
    # exporter differs once the client's Certificate is in its transcript).
    started = time.monotonic()
    server = start_server(tls_max=TlsMax.TLS1_3, pop_required=True)
    op_a = sim.new_key(OP_KEY_A)

    def csr(binding: ChannelBinding | None) -> bytes:
        assert binding is not None and binding.kind == "tls-exporter"
        assert (binding.tls_version, len(binding.value)) == ("TLSv1.3", 32)
        value = binding.value
        if tampered:
            value = bytes([value[0] ^ 1]) + value[1:]
        return DEVICE_CSR.challenge_password(challenge_password_value(value)).build(op_a)

    with card_client(server, dev_pki, sim) as client:
        if tampered:
            with pytest.raises(EstRejectedError, match=r"PoP failed.*tls-exporter") as info:
                client.simpleenroll(csr)
            assert info.value.exit_code == 76
        else:
            assert client.simpleenroll(csr).certificate.public_key() == op_a.public_key()
    assert len(issued_log(server)) == (0 if tampered else 1)
    assert sim.bootstrap.signatures == 1  # one handshake; a refused PoP is not retried
    assert time.monotonic() - started < 15


def test_retry_on_new_connection_signs_the_csr_again(
    start_server: StartServer, dev_pki: DevPki, sim: SimCard
) -> None:
    # The first enroll answer is a 500 (the server then closes the connection): the retry
    # runs on a new TLS connection (second handshake signature) with a freshly bound CSR.
    server = start_server(
        tls_max=TlsMax.TLS1_2, pop_required=True, fault=Fault.HTTP_500, fault_times=1
    )
    op_a = sim.new_key(OP_KEY_A)
    seen: list[bytes] = []

    def csr(binding: ChannelBinding | None) -> bytes:
        assert binding is not None
        seen.append(binding.value)
        return build_csr(op_a, challenge_password=challenge_password_value(binding.value))

    sleeps = Sleeps()
    with card_client(
        server, dev_pki, sim, tls_max="1.2", retry=RetryPolicy(attempts=3, sleep=sleeps)
    ) as client:
        client.simpleenroll(csr)
        assert client.transport.connections_opened == 2
    assert len(seen) == 2 and seen[0] != seen[1]
    assert sim.bootstrap.signatures == 2  # one per handshake
    assert op_a.signatures == 2  # one per CSR
    assert len(sleeps.calls) == 1


# -- authentication, labels, pending ------------------------------------------------------------


@pytest.mark.parametrize(
    ("credentials", "outcome"),
    [(("dev", "s3cret"), None), (None, AuthError), (("dev", "wrong"), AuthError)],
)
def test_basic_auth(
    start_server: StartServer,
    dev_pki: DevPki,
    sim: SimCard,
    credentials: tuple[str, str] | None,
    outcome: type[Exception] | None,
) -> None:
    server = start_server(auth=AuthMode.CERT_AND_BASIC, basic=("dev", "s3cret"))
    op_a = sim.new_key(OP_KEY_A)
    with card_client(server, dev_pki, sim, basic_auth=credentials) as client:
        if outcome is None:
            client.simpleenroll(lambda _b: build_csr(op_a))
            assert issued_log(server)[0]["auth"] == "cert+basic"
        else:
            with pytest.raises(outcome, match="401"):
                client.simpleenroll(lambda _b: build_csr(op_a))
            assert issued_log(server) == []


def test_basic_only_server_with_server_only_tls(start_server: StartServer, dev_pki: DevPki) -> None:
    # Stdlib path, no client certificate: Basic inside the verified TLS session only.
    server = start_server(
        auth=AuthMode.BASIC,
        basic=("dev", "s3cret"),
        default_profile=Profile(validity_s=3600, ekus=()),
    )
    key = ec.generate_private_key(ec.SECP256R1())
    from est_agent.backends.signer import SoftwareSigner

    with EstClient(
        base_url(server),
        trust_anchors=[dev_pki.tls_ca_certificate],
        basic_auth=("dev", "s3cret"),
        require_client_auth_eku=False,
    ) as client:
        result = client.simpleenroll(lambda _b: build_csr(SoftwareSigner(key)))
    assert result.certificate.public_key() == key.public_key()


def test_labels(start_server: StartServer, dev_pki: DevPki, sim: SimCard) -> None:
    server = start_server(labels={"short": Profile(validity_s=120)})
    op_a = sim.new_key(OP_KEY_A)
    with card_client(server, dev_pki, sim, label="short") as client:
        cert = client.simpleenroll(lambda _b: build_csr(op_a)).certificate
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == timedelta(seconds=120)
    assert issued_log(server)[0]["label"] == "short"
    with (
        card_client(server, dev_pki, sim, label="nope") as client,
        pytest.raises(EstRejectedError, match="404"),
    ):
        client.simpleenroll(lambda _b: build_csr(op_a))


def test_202_is_pending_with_retry_after(
    start_server: StartServer, dev_pki: DevPki, sim: SimCard
) -> None:
    server = start_server(manual_approval_s=30)
    op_a = sim.new_key(OP_KEY_A)
    with card_client(server, dev_pki, sim) as client, pytest.raises(EnrollmentPending) as info:
        client.simpleenroll(lambda _b: build_csr(op_a))
    assert 25 <= info.value.retry_after_s <= 30


# -- every fault switch -------------------------------------------------------------------------

FAULTS: dict[Fault, tuple[type[Exception], str]] = {
    Fault.HTTP_500: (EstConnectionError, "500"),
    Fault.DROP_MID_BODY: (EstConnectionError, "incomplete|closed|Error"),
    Fault.SLOW_BODY: (EstConnectionError, "not complete"),
    Fault.GARBAGE_BASE64: (EstResponseError, "base64|DER"),
    Fault.NOT_PKCS7: (EstResponseError, "PKCS#7|ContentInfo"),
    Fault.WRONG_KEY: (EstResponseError, "public key"),
    Fault.FOREIGN_CA: (EstResponseError, "chain"),
    Fault.EXPIRED_CERT: (EstResponseError, "not valid now"),
    Fault.OVERSIZE_BODY: (EstResponseError, "cap"),
    Fault.WRONG_CONTENT_TYPE: (EstResponseError, "Content-Type"),
}


# Faults after which the enrollment still succeeds: tests/est/test_client_hostile.py.
CONNECTION_FAULTS = {Fault.CLOSE_AFTER_RESPONSE, Fault.DROP_AFTER_RESPONSE}


def test_every_fault_is_covered() -> None:
    assert set(FAULTS) | CONNECTION_FAULTS == set(Fault)


@pytest.mark.parametrize("fault", list(FAULTS), ids=lambda f: f.value)
def test_fault_gives_typed_error(
    start_server: StartServer, dev_pki: DevPki, sim: SimCard, fault: Fault
) -> None:
    server = start_server(fault=fault, slow_body_s=3.0)
    op_a = sim.new_key(OP_KEY_A)
    error, message = FAULTS[fault]
    sleeps = Sleeps()
    results = []
    with (
        card_client(
            server, dev_pki, sim, timeout_s=1.0, retry=RetryPolicy(attempts=2, sleep=sleeps)
        ) as client,
        pytest.raises(error, match=message) as info,
    ):
        results.append(client.simpleenroll(lambda _b: build_csr(op_a)))
    assert results == []
    transient = isinstance(info.value, EstConnectionError)
    assert len(sleeps.calls) == (1 if transient else 0)  # only transient errors are retried


# -- server verification before any card signature ----------------------------------------------


def _expect_refused_without_signature(client: EstClient, sim: SimCard, match: str) -> None:
    apdus = sim.transport.stats.apdus
    with client, pytest.raises(TlsVerificationError, match=match):
        client.cacerts()
    assert sim.bootstrap.signatures == 0
    assert sim.transport.stats.apdus == apdus  # the card was not even addressed


@pytest.mark.parametrize("tls_max", [TlsMax.TLS1_2, TlsMax.TLS1_3])
def test_untrusted_server_ca_gets_no_card_signature(
    start_server: StartServer, dev_pki: DevPki, sim: SimCard, tls_max: TlsMax
) -> None:
    server = start_server(tls_max=tls_max)
    client = EstClient(
        base_url(server),
        trust_anchors=[dev_pki.est_ca.certificate],  # not the TLS CA
        client_cert_chain=[sim.bootstrap_cert],
        signer=sim.bootstrap,
        retry=RetryPolicy(attempts=3, sleep=Sleeps()),
    )
    _expect_refused_without_signature(client, sim, "refused")


@pytest.mark.parametrize("tls_max", [TlsMax.TLS1_2, TlsMax.TLS1_3])
def test_wrong_hostname_gets_no_card_signature(
    start_server: StartServer, dev_pki: DevPki, sim: SimCard, tls_max: TlsMax
) -> None:
    server = start_server(tls_max=tls_max)
    client = EstClient(
        base_url(server),
        trust_anchors=[dev_pki.tls_ca_certificate],
        client_cert_chain=[sim.bootstrap_cert],
        signer=sim.bootstrap,
        tls_server_name="est.example.org",  # not in the server's SAN
    )
    _expect_refused_without_signature(client, sim, "subjectAltName")


@pytest.fixture
def tls11_server(dev_pki: DevPki) -> Iterator[int]:
    """A TLS 1.1-only server (Python ssl at security level 0) on 127.0.0.1."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with warnings.catch_warnings():  # TLS 1.1 is deprecated: that is the point
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    ctx.load_cert_chain(dev_pki.server_cert_path, dev_pki.server_key_path)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(5)
    alerts: list[str] = []

    def serve() -> None:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        with conn:
            try:
                ctx.wrap_socket(conn, server_side=True)
            except (ssl.SSLError, OSError) as exc:
                alerts.append(str(exc))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    listener.close()
    thread.join(timeout=5)
    # The server really spoke TLS 1.1 only: it refused the client's TLS 1.2+ hello, on the
    # version or (the client offering no suite TLS 1.1 can carry: no SHA-1 MAC) the ciphers.
    assert alerts
    assert "version" in alerts[0].lower() or "no shared cipher" in alerts[0].lower()


def test_tls11_server_is_refused_without_card_signature(
    tls11_server: int, dev_pki: DevPki, sim: SimCard
) -> None:
    client = EstClient(
        f"https://127.0.0.1:{tls11_server}",
        trust_anchors=[dev_pki.tls_ca_certificate],
        client_cert_chain=[sim.bootstrap_cert],
        signer=sim.bootstrap,
    )
    _expect_refused_without_signature(client, sim, "handshake")


def test_stdlib_path_refuses_untrusted_server(start_server: StartServer, dev_pki: DevPki) -> None:
    server = start_server()
    with (
        EstClient(base_url(server), trust_anchors=[dev_pki.est_ca.certificate]) as client,
        pytest.raises(TlsVerificationError, match="refused"),
    ):
        client.cacerts()


# -- a PEM bootstrap key (the workflow's SoftwareSigner for bootstrap.key = a PEM file) ---------


def test_pem_key_enrollment_with_tls_unique_pop(
    start_server: StartServer, dev_pki: DevPki, tmp_path: Path
) -> None:
    server = start_server(tls_max=TlsMax.TLS1_2, pop_required=True)
    cert_path, key_path, key = bootstrap_credential(dev_pki, tmp_path)
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    from est_agent.backends.signer import SoftwareSigner

    signer = SoftwareSigner(key)
    tls_signer = SoftwareSigner(load_pem_private_key(key_path.read_bytes(), None))  # type: ignore[arg-type]

    def csr(binding: ChannelBinding | None) -> bytes:
        assert binding is not None and binding.kind == "tls-unique"
        return build_csr(signer, challenge_password=challenge_password_value(binding.value))

    with EstClient(
        base_url(server),
        trust_anchors=[dev_pki.tls_ca_certificate],
        client_cert_chain=[x509.load_pem_x509_certificate(cert_path.read_bytes())],
        signer=tls_signer,
    ) as client:
        result = client.simpleenroll(csr)
    assert result.certificate.public_key() == key.public_key()
    eku = result.certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.CLIENT_AUTH in eku
    assert result.certificate.not_valid_after_utc > datetime.now(UTC)
    assert base64.b64decode(result.body.translate(None, b"\r\n"))  # raw body kept


def test_http_url_is_refused(dev_pki: DevPki) -> None:
    from est_agent.errors import InputError

    with pytest.raises(InputError, match="https"):
        EstClient("http://127.0.0.1:1", trust_anchors=[dev_pki.tls_ca_certificate])


@pytest.mark.parametrize("tls_max", [TlsMax.TLS1_2, TlsMax.TLS1_3])
def test_client_certificate_refused_by_server_is_auth_error_not_retried(
    start_server: StartServer, dev_pki: DevPki, tmp_path: Path, tls_max: TlsMax
) -> None:
    # A SIM whose bootstrap certificate is self-signed: the server's TLS stack refuses it
    # (unknown_ca). Under TLS 1.3 that alert only comes after the handshake, on the first read.
    from est_agent.sim.personalize import personalize
    from tests.est.card_helpers import open_sim_card

    personalize(tmp_path / "stray.json")
    card = open_sim_card(tmp_path / "stray.json")
    server = start_server(tls_max=tls_max)
    try:
        with (
            card_client(server, dev_pki, card) as client,
            pytest.raises(AuthError, match="refused"),
        ):
            client.cacerts()
        assert card.bootstrap.signatures == 1  # one handshake, no retry
    finally:
        card.close()
