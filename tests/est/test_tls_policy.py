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
