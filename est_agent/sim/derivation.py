"""The key derivations of COMPUTE PRF and COMPUTE HKDF: pure functions over bytes.

- TLS 1.2 PRF with SHA-256 (RFC 5246 §5): ``P_SHA256(secret, label || seed)``, truncated.
- HKDF (RFC 5869 §2.2 extract, §2.3 expand) with SHA-256/384/512, from `cryptography`.
"""

from __future__ import annotations

import hashlib
import hmac

__all__ = ["hkdf_expand", "hkdf_extract", "tls12_prf"]


def tls12_prf(secret: bytes, label_seed: bytes, length: int) -> bytes:
    """PRF(secret, label, seed) = P_SHA256(secret, label + seed) (RFC 5246 §5): the label and
    seed come concatenated, as the command carries them in one TLV."""
    out = b""
    a = label_seed  # A(0)
    while len(out) < length:
        a = hmac.digest(secret, a, "sha256")  # A(i) = HMAC_hash(secret, A(i-1))
        out += hmac.digest(secret, a + label_seed, "sha256")
    return out[:length]


def hkdf_extract(hash_name: str, salt: bytes, ikm: bytes) -> bytes:
    """PRK = HMAC-Hash(salt, IKM); an absent salt is HashLen zero bytes (RFC 5869 §2.2)."""
    size = hashlib.new(hash_name).digest_size
    return hmac.digest(salt or bytes(size), ikm, hash_name)


def hkdf_expand(hash_name: str, prk: bytes, info: bytes, length: int) -> bytes:
    """OKM of ``length`` bytes (RFC 5869 §2.3; at most 255·HashLen)."""
    # imported here: the card model loads cryptography on its first key operation only
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

    algorithm: dict[str, hashes.HashAlgorithm] = {
        "sha256": hashes.SHA256(),
        "sha384": hashes.SHA384(),
        "sha512": hashes.SHA512(),
    }
    return HKDFExpand(algorithm[hash_name], length, info).derive(prk)
