"""The card's P-256 arithmetic: key generation, ECDSA over a SHA-2 digest, verification, ECKA.

Keys are kept as raw bytes (a 32-byte scalar, a 65-byte SEC1 point) because that is how the card
stores them; ``cryptography`` objects are built per operation.
"""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import ec

__all__ = [
    "COORDINATE_BYTES",
    "decode_signature",
    "ecka",
    "generate_key_pair",
    "is_valid_point",
    "private_key_from_scalar",
    "sign_digest",
    "verify_digest",
]

COORDINATE_BYTES = 32


# cryptography is imported on the first key operation, not with the card model: opening the
# virtual SIM for `est-agent run` with nothing due (READ BINARY, READ PUBLIC KEY of a stored
# point) then costs no cryptography import (≈ 9 MiB, ≈ 50 ms; issue 16).
@cache
def _curve() -> ec.EllipticCurve:
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.SECP256R1()


@cache
def _prehashed() -> dict[int, ec.ECDSA]:
    """By digest size: ECDSA P-256 uses the leftmost 256 bits of a longer digest (FIPS 186-5
    §6.4.1), which `cryptography` does for a Prehashed SHA-384/SHA-512 digest."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

    return {
        32: ec.ECDSA(Prehashed(hashes.SHA256())),
        48: ec.ECDSA(Prehashed(hashes.SHA384())),
        64: ec.ECDSA(Prehashed(hashes.SHA512())),
    }


def _algorithm(digest: bytes) -> ec.ECDSA:
    algorithm = _prehashed().get(len(digest))
    if algorithm is None:
        raise ValueError(f"no SHA-2 digest has {len(digest)} bytes")
    return algorithm


def generate_key_pair() -> tuple[bytes, bytes]:
    """A fresh key: (32-byte scalar, 65-byte uncompressed point)."""
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    key = ec.generate_private_key(_curve())
    scalar = key.private_numbers().private_value.to_bytes(COORDINATE_BYTES, "big")
    point = key.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
    return scalar, point


def private_key_from_scalar(scalar: bytes) -> ec.EllipticCurvePrivateKey:
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.derive_private_key(int.from_bytes(scalar, "big"), _curve())


def sign_digest(scalar: bytes, digest: bytes) -> tuple[int, int]:
    """ECDSA (r, s) over a SHA-256/384/512 digest (32, 48 or 64 bytes)."""
    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

    der = private_key_from_scalar(scalar).sign(digest, _algorithm(digest))
    return decode_dss_signature(der)


def decode_signature(value: bytes) -> tuple[int, int] | None:
    """(r, s) from raw ``r||s`` (64 bytes) or DER; None if it is neither."""
    if len(value) == 2 * COORDINATE_BYTES:
        return (
            int.from_bytes(value[:COORDINATE_BYTES], "big"),
            int.from_bytes(value[COORDINATE_BYTES:], "big"),
        )
    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

    try:
        return decode_dss_signature(value)
    except ValueError:
        return None


def verify_digest(point: bytes, digest: bytes, r: int, s: int) -> bool:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

    try:
        public_key = ec.EllipticCurvePublicKey.from_encoded_point(_curve(), point)
        public_key.verify(encode_dss_signature(r, s), digest, _algorithm(digest))
    except (InvalidSignature, ValueError):
        return False
    return True


def is_valid_point(point: bytes) -> bool:
    """An uncompressed SEC1 point (``04||X||Y``) on P-256 (SEC 1 §2.3.4 and the public-key
    validation of §3.2.2: `cryptography` refuses a point off the curve)."""
    if len(point) != 1 + 2 * COORDINATE_BYTES or point[0] != 0x04:
        return False
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        ec.EllipticCurvePublicKey.from_encoded_point(_curve(), point)
    except ValueError:
        return False
    return True


def ecka(scalar: bytes, point: bytes) -> bytes:
    """ECKA-DH (ECC CDH of SEC 1 §3.3.1, NIST SP 800-56A §5.7.1.2): the x-coordinate of
    scalar·point, 32 bytes. ``point`` must have passed `is_valid_point`."""
    from cryptography.hazmat.primitives.asymmetric import ec

    peer = ec.EllipticCurvePublicKey.from_encoded_point(_curve(), point)
    return private_key_from_scalar(scalar).exchange(ec.ECDH(), peer)
