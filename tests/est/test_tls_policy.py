"""The TLS policy and configurations of est/tls/ and its request Deadline, offline (dev PKI)."""

from __future__ import annotations

import pytest

from est_agent.errors import ConfigError, EstError, TlsVerificationError
from est_agent.est.tls import (
    ChannelBinding,
    Deadline,
    EstTransport,
    StdlibTls,
    TlsliteTls,
    verify_server_chain,
)
from est_agent.testserver import DevPki
from tests.est.anchors import CASES, SHAPES, Case, chain_for


def _server_cert(pki: DevPki):  # type: ignore[no-untyped-def]
    from cryptography import x509

    return x509.load_pem_x509_certificate(pki.server_cert_path.read_bytes())


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "est-server", "::1", "[::1]"])
def test_names_in_the_san_verify(dev_pki: DevPki, host: str) -> None:
    verify_server_chain([_server_cert(dev_pki)], [dev_pki.tls_ca_certificate], host)


@pytest.mark.parametrize("host", ["127.0.0.2", "est.example.org", "EST-SERVER.evil"])
def test_other_names_are_refused(dev_pki: DevPki, host: str) -> None:
    with pytest.raises(TlsVerificationError, match="subjectAltName"):
        verify_server_chain([_server_cert(dev_pki)], [dev_pki.tls_ca_certificate], host)


def test_wrong_anchor_empty_chain_and_no_anchor_are_refused(dev_pki: DevPki) -> None:
    cert = _server_cert(dev_pki)
    with pytest.raises(TlsVerificationError, match="refused"):
        verify_server_chain([cert], [dev_pki.est_ca.certificate], "localhost")
    with pytest.raises(TlsVerificationError, match="no certificate"):
        verify_server_chain([], [dev_pki.tls_ca_certificate], "localhost")
    with pytest.raises(TlsVerificationError, match="no trust anchor"):
        verify_server_chain([cert], [], "localhost")


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_anchor_is_exempt_from_the_ca_profile_intermediates_are_not(case: Case) -> None:
    # The verdicts of tests/est/anchors.py CASES, offline (the same cases run over both TLS
    # paths against a real server, and through `openssl verify`, in test_tls_anchor.py).
    _, chain, anchor = chain_for(
        anchor=SHAPES[case.anchor],
        intermediate=SHAPES[case.intermediate] if case.intermediate else None,
    )
    if case.accepted:
        verify_server_chain(chain, [anchor], "localhost")
        return
    with pytest.raises(TlsVerificationError, match=case.refusal) as info:
        verify_server_chain(chain, [anchor], "localhost")
    assert info.value.exit_code == 76
    assert "ValueError" not in str(info.value)  # what happened, not which class


def test_an_intermediate_configured_as_anchor_is_exempt_itself() -> None:
    # RFC 5280 §6.1.1: whichever certificate is configured is the anchor (PARTIAL_CHAIN on the
    # stdlib path): a libest-like intermediate trusted directly needs no profile of its own.
    _, chain, root = chain_for(anchor=SHAPES["rfc5280"], intermediate=SHAPES["libest"])
    with pytest.raises(TlsVerificationError, match="basicConstraints is not critical"):
        verify_server_chain(chain, [root], "localhost")  # under the root: an intermediate
    verify_server_chain(chain[:1], [chain[1]], "localhost")  # configured itself: the anchor
    verify_server_chain(chain, [root, chain[1]], "localhost")  # both: the path ends there


def test_client_chain_must_match_the_signer(dev_pki: DevPki) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec

    from est_agent.backends.signer import SoftwareSigner

    other = SoftwareSigner(ec.generate_private_key(ec.SECP256R1()))
    with pytest.raises(EstError, match="does not belong"):
        TlsliteTls((dev_pki.tls_ca_certificate,), (_server_cert(dev_pki),), other)
    with pytest.raises(EstError, match="go together"):
        TlsliteTls((dev_pki.tls_ca_certificate,), (), other)


def test_channel_binding_repr_hides_the_value() -> None:
    binding = ChannelBinding("tls-unique", b"\x01" * 12, "TLSv1.2")
    assert "value" not in repr(binding) and "\\x01" not in repr(binding)


# -- the request deadline (est/tls/backend.py Deadline), on a fake clock -----------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_deadline_counts_down_and_pauses() -> None:
    clock = FakeClock()
    deadline = Deadline(5.0, clock=clock)
    clock.now += 2
    assert deadline.remaining() == 3.0
    assert deadline.clamp(10.0) == 3.0 and deadline.clamp(1.0) == 1.0
    assert deadline.clamp(None) == 3.0
    with deadline.paused():
        clock.now += 60  # the card at work
        assert deadline.remaining() == 3.0
        with deadline.paused():  # nested: still one pause
            clock.now += 1
    assert deadline.remaining() == 3.0
    clock.now += 3
    assert deadline.remaining() == 0.0
    with pytest.raises(TimeoutError, match="not complete in 5 s"):
        deadline.clamp(1.0)


def test_deadline_refuses_a_non_positive_budget() -> None:
    with pytest.raises(ValueError, match="positive"):
        Deadline(0.0)


@pytest.mark.parametrize("timeout_s", [0.0, -1.0])
def test_transport_refuses_a_non_positive_request_timeout(
    dev_pki: DevPki, timeout_s: float
) -> None:
    with pytest.raises(ConfigError, match="positive") as info:
        EstTransport(StdlibTls((dev_pki.tls_ca_certificate,)), timeout_s=timeout_s)
    assert info.value.exit_code == 78


# -- the CA profile of the issued-certificate check (EstClient._validate_issued) ----------------


@pytest.mark.parametrize(
    ("sub_profile", "refusal"),
    [("rfc5280", None), ("libest", "intermediate CA .* basicConstraints is not critical")],
)
def test_issued_chain_exempts_the_cacerts_anchor_not_its_intermediates(
    sub_profile: str, refusal: str | None
) -> None:
    # /cacerts: a libest-like root (the anchor, RFC 5280 §6.1.1: accepted as it is) and a
    # sub-CA that issued the certificate; the sub-CA is held to the CA profile.
    from datetime import UTC, datetime, timedelta

    import httpx
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from est_agent.backends.signer import SoftwareSigner
    from est_agent.errors import EstResponseError
    from est_agent.est.client import EstClient
    from est_agent.testserver.issuer import CaProfile, issue_from_csr, make_ca, random_serial
    from tests.est.card_helpers import build_csr
    from tests.est.oddcerts import certs_only

    now = datetime.now(UTC)
    root = make_ca("libest-like EST CA", now, timedelta(days=30), profile=CaProfile.LIBEST)
    sub = make_ca(
        "EST sub-CA", now, timedelta(days=30), profile=CaProfile(sub_profile), issuer=root
    )
    device = SoftwareSigner(ec.generate_private_key(ec.SECP256R1()))
    leaf = issue_from_csr(
        sub,
        subject=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "device-1")]),
        public_key=device.public_key(),
        san_der=None,
        san_critical=False,
        ekus=(),
        not_before=now - timedelta(minutes=1),
        not_after=now + timedelta(days=1),
        serial=random_serial(),
    )

    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/cacerts"):
            body, kind = certs_only(root.certificate, sub.certificate), "application/pkcs7-mime"
        else:
            body, kind = certs_only(leaf), "application/pkcs7-mime; smime-type=certs-only"
        return httpx.Response(200, content=body, headers={"Content-Type": kind})

    client = EstClient(
        "https://est.example",
        trust_anchors=[root.certificate],
        transport=httpx.MockTransport(answer),
        require_client_auth_eku=False,
    )
    with client:
        if refusal is None:
            assert client.simpleenroll(lambda _b: build_csr(device)).certificate == leaf
            return
        with pytest.raises(EstResponseError, match=refusal) as info:
            client.simpleenroll(lambda _b: build_csr(device))
    assert info.value.exit_code == 76
    assert "ValueError" not in str(info.value)
