"""Throwaway certificates for tests (made at run time, never stored): the one shared helper.

A CA that issues ordinary certificates comes from ``trustme`` (``trustme_ca``, EC P-256 by
default; ``ca_credential`` turns it into cryptography objects through its public PEM API).
This module builds what trustme cannot:

- a certificate for a public key held elsewhere (the card's key: trustme always makes the
  leaf's key itself), or signed by a given key;
- exact subjects (trustme always adds its own O and OU, so ``CN=device-1`` cannot be had);
- CA keys other than P-256 (trustme offers P-256 ECDSA or RSA only, e.g. no P-384), and
  chosen validity, serial or signature hash.

Odd certificates (P-192, unknown curves, duplicate extensions) stay in tests/est/oddcerts.py.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from est_agent.certificates import CA_KEY_USAGE

__all__ = [
    "ca_credential",
    "certificate",
    "p256_key",
    "self_signed_der",
    "trustme_ca",
]

def p256_key() -> ec.EllipticCurvePrivateKey:
    """A fresh NIST P-256 key, the only curve an IoT SAFE key of ours has."""
    return ec.generate_private_key(ec.SECP256R1())


def trustme_ca() -> trustme.CA:
    """A CA with an EC P-256 key (trustme's ECDSA key type is P-256)."""
    return trustme.CA(key_type=trustme.KeyType.ECDSA)


def ca_credential(ca: trustme.CA) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The trustme CA's certificate and key as cryptography objects (from its PEM)."""
    cert = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
    key = serialization.load_pem_private_key(ca.private_key_pem.bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return cert, key


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def certificate(
    subject_key: ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    cn: str,
    issuer_cn: str | None = None,
    ca: bool = False,
    not_before: datetime | None = None,
    lifetime: timedelta = timedelta(days=1),
    hash_algorithm: hashes.HashAlgorithm | None = None,
) -> x509.Certificate:
    """A certificate ``CN=cn`` for ``subject_key`` signed by ``issuer_key``.

    ``issuer_cn`` None: self-issued (issuer = subject). ``ca``: BasicConstraints CA (critical),
    keyCertSign/cRLSign and a subject key identifier (RFC 5280 §4.2.1.2, §4.2.1.3, §4.2.1.9).
    """
    public = (
        subject_key.public_key()
        if isinstance(subject_key, ec.EllipticCurvePrivateKey)
        else subject_key
    )
    start = not_before if not_before is not None else datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(issuer_cn if issuer_cn is not None else cn))
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + lifetime)
    )
    if ca:
        builder = (
            builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(CA_KEY_USAGE, critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        )
    return builder.sign(issuer_key, hash_algorithm or hashes.SHA256())


def self_signed_der(key: ec.EllipticCurvePrivateKey, cn: str = "unit-test") -> bytes:
    """The DER of a one-day self-signed certificate for ``key``."""
    return certificate(key, key, cn=cn).public_bytes(serialization.Encoding.DER)
