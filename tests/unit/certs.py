"""Throwaway certificates for unit tests (generated at run time, never stored)."""

from __future__ import annotations

import datetime

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def self_signed_der(key: ec.EllipticCurvePrivateKey, cn: str = "unit-test") -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.DER)


def cert_for_public_key_der(
    public_key: ec.EllipticCurvePublicKey, issuer_key: ec.EllipticCurvePrivateKey
) -> bytes:
    """A certificate for ``public_key`` (e.g. a card key) issued by ``issuer_key``."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "device")])
    issuer = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test issuer")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(issuer_key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.DER)
