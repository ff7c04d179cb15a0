"""TLS 1.3 with the ephemeral ECDH of the key share made by a ``KeyAgreement`` (the card's
COMPUTE DH in production), against ``openssl s_server -Verify 1``: RFC 8446 §4.2.8, §7.4.2."""

from __future__ import annotations

import contextlib
import socket
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from est_agent.backends.agreement import KeyAgreement, SoftwareKeyAgreement, check_peer_point
from est_agent.backends.iotsafe import CardKeyAgreement
from est_agent.card.uri import IotSafeRef, ObjectKind
from est_agent.errors import EstError, InputError
from est_agent.est.tls import TlsliteTls, tlslite_adapter
from est_agent.testserver import DevPki
from tests.est.card_helpers import SimCard
from tests.est.openssl_server import OpenSslServer, s_server

pytestmark = pytest.mark.integration


class WrongSecret(SoftwareKeyAgreement):
    """An agreement that answers a secret the server cannot have: the handshake must fail."""

    def shared_secret(self, peer_point: bytes) -> bytes:
        return bytes(b ^ 0x01 for b in super().shared_secret(peer_point))


def _card_tls(dev_pki: DevPki, sim: SimCard, agreement: KeyAgreement) -> TlsliteTls:
    """Client authentication by the SIM's bootstrap key, the key share from ``agreement``."""
    return TlsliteTls(
        (dev_pki.tls_ca_certificate,), (sim.bootstrap_cert,), sim.bootstrap,
        key_agreement=agreement,
    )  # fmt: skip


def _refused(
    dev_pki: DevPki, sim: SimCard, tmp_path: Path, agreement: KeyAgreement, suite: str
) -> str:
    """Connect to a server that must fail the handshake; s_server's output."""
    with (
        s_server(dev_pki, tmp_path, suite, "required") as server,
        pytest.raises((tlslite_adapter.HandshakeFailed, EstError)),
    ):
        _connect(server, _card_tls(dev_pki, sim, agreement))
    return server.output.read_text()


def _connect(server: OpenSslServer, config: TlsliteTls) -> str:
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        connection = tlslite_adapter.handshake(
            sock, config, "localhost", card_time=contextlib.nullcontext
        )
        version = connection.ssl_object.version()
        connection.sendall(b"hello from the agent\n")
        connection.close()
    return version


@pytest.mark.parametrize("suite", ["TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384"])
def test_key_share_from_the_agreement_and_card_signature(
    dev_pki: DevPki, sim: SimCard, tmp_path: Path, suite: str
) -> None:
    agreement = SoftwareKeyAgreement()
    config = _card_tls(dev_pki, sim, agreement)
    started = time.monotonic()
    with s_server(dev_pki, tmp_path, suite, "required") as server:
        assert _connect(server, config) == "TLSv1.3"
    output = server.output.read_text()
    assert "hello from the agent" in output
    # the one group offered: the device's curve (s_server prints the ClientHello's list)
    assert "Supported groups: secp256r1\n" in output, output
    assert agreement.agreements == 1
    assert sim.bootstrap.signatures == 1
    assert time.monotonic() - started < 10


def test_a_wrong_secret_fails_before_anything_is_signed(
    dev_pki: DevPki, sim: SimCard, tmp_path: Path
) -> None:
    agreement = WrongSecret()
    _refused(dev_pki, sim, tmp_path, agreement, "TLS_AES_128_GCM_SHA256")
    assert agreement.agreements == 1
    # The handshake keys come from the secret: the server's EncryptedExtensions cannot be read,
    # so the server is never authenticated and the card never signs.
    assert sim.bootstrap.signatures == 0


def test_a_tls12_only_server_gets_no_card_signature(
    dev_pki: DevPki, sim: SimCard, tmp_path: Path
) -> None:
    agreement = SoftwareKeyAgreement()
    assert "version" in _refused(dev_pki, sim, tmp_path, agreement, "tls1.2").lower()
    assert agreement.agreements == 0
    assert sim.bootstrap.signatures == 0


def test_a_device_agreement_needs_tls13() -> None:
    with pytest.raises(EstError, match=r"TLS 1\.3"):
        TlsliteTls((), key_agreement=SoftwareKeyAgreement(), max_version="1.2")


def _point(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)


def test_peer_points_are_checked() -> None:
    good = _point(ec.generate_private_key(ec.SECP256R1()))
    compressed = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(Encoding.X962, PublicFormat.CompressedPoint)
    )
    off_curve = good[:-1] + bytes([good[-1] ^ 0x01])
    p384 = _point(ec.generate_private_key(ec.SECP384R1()))
    assert (
        check_peer_point(good).public_bytes(Encoding.X962, PublicFormat.UncompressedPoint) == good
    )
    for bad, why in [
        (compressed, "uncompressed"),
        (off_curve, "not a point"),
        (p384, "uncompressed"),
        (b"\x00", "uncompressed"),
        (b"\x04" + bytes(64), "not a point"),
        (b"", "uncompressed"),
    ]:
        with pytest.raises(InputError, match=why):
            check_peer_point(bad)


def test_software_agreement_matches_cryptography() -> None:
    agreement = SoftwareKeyAgreement()
    ours = agreement.new_key()
    peer = ec.generate_private_key(ec.SECP256R1())
    expected = peer.exchange(
        ec.ECDH(), ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), ours)
    )
    assert agreement.shared_secret(_point(peer)) == expected
    assert len(expected) == 32


ECDH_KEY = IotSafeRef(ObjectKind.PRIVATE_KEY, object_id=b"\x04")
PEER_KEY = IotSafeRef(ObjectKind.PUBLIC_KEY, object_id=b"\x05")


def test_tls13_with_ecdh_and_certificate_verify_on_the_sim(
    dev_pki: DevPki, sim: SimCard, tmp_path: Path
) -> None:
    """Issue 13: the client's ephemeral ECDH runs on the virtual SIM (GENERATE KEY PAIR, PUT
    PUBLIC KEY, COMPUTE DH) and its CertificateVerify is signed by it, against OpenSSL."""
    agreement = CardKeyAgreement(sim.applet, ECDH_KEY, PEER_KEY)
    config = _card_tls(dev_pki, sim, agreement)
    shares = []
    for round_ in range(2):
        before = sim.transport.stats.apdus
        (workdir := tmp_path / str(round_)).mkdir()
        with s_server(dev_pki, workdir, "TLS_AES_128_GCM_SHA256", "required") as server:
            assert _connect(server, config) == "TLSv1.3"
        output = server.output.read_text()
        assert "hello from the agent" in output
        assert "Supported groups: secp256r1\n" in output, output
        assert sim.transport.stats.apdus - before == 5 + 2  # ECDH 1+3+1, signature 2
        shares.append(sim.applet.read_public_key(IotSafeRef(ObjectKind.PUBLIC_KEY, b"\x04")))
    assert agreement.agreements == 2
    assert sim.bootstrap.signatures == 2
    # a fresh key pair on the card for each handshake (RFC 8446 §4.2.8: ephemeral)
    assert shares[0] != shares[1]
