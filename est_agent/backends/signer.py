"""The one interface CSR building and TLS use to sign: a public key and ``sign_digest``.

``SoftwareSigner`` wraps an in-memory key (devices whose bootstrap credential is a PEM file, and
tests); ``backends.iotsafe.CardSigner`` keeps the private key inside the IoT SAFE applet.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from est_agent.errors import CardProtocolError, InputError

__all__ = ["SHA256_ONLY", "Signer", "SoftwareSigner", "check_digest", "public_key_from_point"]

#: `Signer.digest_algorithms` of a signer that takes 32-byte SHA-256 digests only
SHA256_ONLY: tuple[str, ...] = ("sha256",)


@runtime_checkable
class Signer(Protocol):
    """Something that signs digests computed on the host with a P-256 key."""

    @property
    def digest_algorithms(self) -> tuple[str, ...]:
        """The digests `sign_digest` takes, as hashlib names in order of preference (the host
        hashes; ECDSA uses the leftmost bits of a longer digest, FIPS 186-5 §6.4.1). A CSR
        follows a server asking for another one of these (RFC 7030 §4.5.2)."""
        ...

    def public_key(self) -> ec.EllipticCurvePublicKey: ...

    def sign_digest(self, digest: bytes) -> bytes:
        """ECDSA signature (DER Ecdsa-Sig-Value) over a digest of `digest_algorithms`."""
        ...


def public_key_from_point(point: bytes) -> ec.EllipticCurvePublicKey:
    """A P-256 public key from its SEC 1 §2.3.3 encoded point, as a card returns it."""
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
    except ValueError as exc:
        raise CardProtocolError(f"card public key is not a valid P-256 point: {exc}") from exc


def check_digest(digest: bytes) -> None:
    """Refuse anything but a 32-byte SHA-256 digest before a key is used."""
    if len(digest) != 32:
        raise InputError(f"expected a 32-byte SHA-256 digest, got {len(digest)} bytes")


class SoftwareSigner:
    """A P-256 key held in memory (file-based bootstrap credentials; tests)."""

    def __init__(self, private_key: ec.EllipticCurvePrivateKey) -> None:
        if not isinstance(private_key.curve, ec.SECP256R1):
            raise InputError(f"only P-256 keys are supported, not {private_key.curve.name}")
        self._key = private_key
        self.signatures = 0

    @property
    def digest_algorithms(self) -> tuple[str, ...]:
        return SHA256_ONLY

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._key.public_key()

    def sign_digest(self, digest: bytes) -> bytes:
        check_digest(digest)
        self.signatures += 1
        return self._key.sign(digest, ec.ECDSA(Prehashed(hashes.SHA256())))
