"""The TLS 1.3 exporter (RFC 8446 §7.1, §7.5): pure functions over bytes, no TLS engine.

tlslite-ng 0.8.2 derives exporter_master_secret after the client's Certificate and
CertificateVerify have entered its transcript; RFC 8446 §7.1 derives it from the transcript
ClientHello...server Finished. With client authentication the two differ, and so did the RFC 9266
tls-exporter channel binding from what every other stack computes. The adapter therefore keeps
the transcript hash as it was at the server Finished and derives the exporter here.

HKDF-Expand is cryptography's (RFC 5869 §2.3); only the HkdfLabel structure (RFC 8446 §7.1) is
built here.
"""

from __future__ import annotations

import struct

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

__all__ = [
    "derive_secret",
    "exporter_master_secret",
    "hkdf_expand_label",
    "tls13_exporter",
    "transcript_hash_algorithm",
]

#: The hash of a TLS 1.3 cipher suite (RFC 8446 §B.4): SHA-384 for TLS_AES_256_GCM_SHA384 only.
_SHA384_SUITES = frozenset({0x1302})
_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
}


def transcript_hash_algorithm(cipher_suite: int) -> str:
    """``"sha256"`` or ``"sha384"``: the Hash of a TLS 1.3 cipher suite (RFC 8446 §B.4)."""
    return "sha384" if cipher_suite in _SHA384_SUITES else "sha256"


def _hash(name: str) -> hashes.HashAlgorithm:
    try:
        return _HASHES[name]()
    except KeyError:
        raise ValueError(f"not a TLS 1.3 hash: {name!r}") from None


def hkdf_expand_label(
    secret: bytes, label: bytes, context: bytes, length: int, hash_name: str
) -> bytes:
    """HKDF-Expand-Label (RFC 8446 §7.1): HKDF-Expand(Secret, HkdfLabel, Length), where
    HkdfLabel = uint16 length || opaque label<7..255> = "tls13 " + Label || opaque
    context<0..255>."""
    full_label = b"tls13 " + label
    if not 7 <= len(full_label) <= 255 or len(context) > 255 or not 0 < length < 65536:
        raise ValueError("HKDF-Expand-Label parameters out of range (RFC 8446 §7.1)")
    info = (
        struct.pack("!HB", length, len(full_label))
        + full_label
        + struct.pack("!B", len(context))
        + context
    )
    return HKDFExpand(_hash(hash_name), length, info).derive(secret)


def derive_secret(secret: bytes, label: bytes, transcript_hash: bytes, hash_name: str) -> bytes:
    """Derive-Secret(Secret, Label, Messages) = HKDF-Expand-Label(Secret, Label,
    Transcript-Hash(Messages), Hash.length) (RFC 8446 §7.1); ``transcript_hash`` is already
    Transcript-Hash(Messages)."""
    return hkdf_expand_label(
        secret, label, transcript_hash, _hash(hash_name).digest_size, hash_name
    )


def exporter_master_secret(
    master_secret: bytes, server_finished_transcript_hash: bytes, hash_name: str
) -> bytes:
    """exporter_master_secret = Derive-Secret(Master Secret, "exp master", ClientHello...server
    Finished) (RFC 8446 §7.1): the transcript ends at the server's Finished, whatever the
    client sends after it (its Certificate, CertificateVerify, Finished)."""
    return derive_secret(master_secret, b"exp master", server_finished_transcript_hash, hash_name)


def tls13_exporter(
    exporter_secret: bytes, label: bytes, context: bytes, length: int, hash_name: str
) -> bytes:
    """TLS-Exporter(label, context_value, key_length) = HKDF-Expand-Label(Derive-Secret(Secret,
    label, ""), "exporter", Hash(context_value), key_length) (RFC 8446 §7.5), with Secret the
    exporter_master_secret. RFC 9266 §2 uses label "EXPORTER-Channel-Binding", an empty
    context and 32 bytes."""
    per_label = derive_secret(exporter_secret, label, _digest(b"", hash_name), hash_name)
    return hkdf_expand_label(per_label, b"exporter", _digest(context, hash_name), length, hash_name)


def _digest(data: bytes, hash_name: str) -> bytes:
    digest = hashes.Hash(_hash(hash_name))
    digest.update(data)
    return digest.finalize()
