"""Ephemeral ECDH whose private half may stay in a secure element: the TLS 1.3 key share.

A TLS 1.3 client sends the public half of an ephemeral (EC)DHE key in its ClientHello
``key_share`` (RFC 8446 §4.2.8) and derives the handshake secrets from the shared secret with the
server's share (§7.4.2: for the NIST curves the x-coordinate of the ECDH result, SEC 1 §3.3.1,
32 bytes for P-256). ``KeyAgreement`` is that pair of operations; ``SoftwareKeyAgreement`` runs it
with ``cryptography`` (hosts, tests), ``backends.iotsafe.CardKeyAgreement`` on the SIM: GENERATE
KEY PAIR on a key-agreement slot, PUT PUBLIC KEY with the server's share, COMPUTE DH
(GSMA IoT SAFE), so the session's key-exchange secret is made where the card's keys are.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from est_agent.errors import EstAgentError, InputError

__all__ = ["KeyAgreement", "SoftwareKeyAgreement", "check_peer_point"]

#: RFC 8446 §4.2.8.2: an uncompressed P-256 point: 0x04 || X (32) || Y (32)
P256_POINT_LENGTH = 65
#: the ECDH shared secret of P-256: the x-coordinate, SEC 1 §3.3.1, RFC 8446 §7.4.2
P256_SECRET_LENGTH = 32


@runtime_checkable
class KeyAgreement(Protocol):
    """Ephemeral ECDH on P-256, one key pair at a time."""

    @property
    def agreements(self) -> int:
        """How many shared secrets were computed so far (tests, statistics)."""
        ...

    def new_key(self) -> bytes:
        """Make a fresh key pair; return its public point, uncompressed SEC 1 §2.3.3."""
        ...

    def shared_secret(self, peer_point: bytes) -> bytes:
        """The x-coordinate of ECDH(the key of the last ``new_key``, ``peer_point``);
        ``InputError`` for a point that `check_peer_point` refuses, before any device use."""
        ...


def check_peer_point(peer_point: bytes) -> ec.EllipticCurvePublicKey:
    """The peer's share as a P-256 public key, or ``InputError``.

    RFC 8446 §4.2.8.2: the share is an uncompressed point (legacy_form 4), and the receiver
    MUST validate it (a point on the curve, not the point at infinity: SP 800-56A §5.6.2.3.4)
    before using it — for the card also because a card's COMPUTE DH need not check.
    """
    if len(peer_point) != P256_POINT_LENGTH or peer_point[0] != 0x04:
        raise InputError(
            f"the peer's key share is not an uncompressed P-256 point ({len(peer_point)} bytes)"
        )
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), peer_point)
    except ValueError as exc:
        raise InputError(f"the peer's key share is not a point on P-256: {exc}") from exc


class SoftwareKeyAgreement:
    """ECDH with a key held in memory (``cryptography``): the default where no card is asked."""

    def __init__(self) -> None:
        self._key: ec.EllipticCurvePrivateKey | None = None
        self.agreements = 0

    def new_key(self) -> bytes:
        self._key = ec.generate_private_key(ec.SECP256R1())
        return self._key.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)

    def shared_secret(self, peer_point: bytes) -> bytes:
        if self._key is None:
            raise EstAgentError("no ephemeral key was made before the key agreement")
        peer = check_peer_point(peer_point)
        self.agreements += 1
        return self._key.exchange(ec.ECDH(), peer)
