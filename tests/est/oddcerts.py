"""Certificates seen in the field that cryptography only trips over when asked: a P-192 key, a
curve it does not know, a point off its curve, the same extension twice.

Built with cryptography, then (for what it refuses to build) patched with asn1crypto and
signed again with the issuer's key, so the signatures are genuine.
"""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta

from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, pkcs7
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "OID_PRIME192V2",
    "OID_SECP192R1",
    "certs_only",
    "issue",
    "with_curve_oid",
    "with_duplicate_extension",
]

# RFC 5480 §2.1.1.1 / X9.62 curve OIDs, DER-encoded as they sit in a SubjectPublicKeyInfo.
OID_SECP192R1 = bytes.fromhex("06082A8648CE3D030101")  # 1.2.840.10045.3.1.1 (P-192)
OID_PRIME192V2 = bytes.fromhex("06082A8648CE3D030102")  # 1.2.840.10045.3.1.2
OID_SECP256R1 = bytes.fromhex("06082A8648CE3D030107")  # 1.2.840.10045.3.1.7 (P-256)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def issue(
    issuer: x509.Certificate,
    issuer_key: ec.EllipticCurvePrivateKey,
    public_key: ec.EllipticCurvePublicKey,
    *,
    cn: str = "device-1",
    ca: bool = False,
) -> x509.Certificate:
    """A certificate for `public_key` from `issuer`: an end entity with clientAuth, or a CA."""
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(issuer.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), False
        )
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), True
        ).add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), False)
    else:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _resign(tbs_der: bytes, issuer_key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    tbs = asn1_x509.TbsCertificate.load(tbs_der)
    signature = issuer_key.sign(tbs_der, ec.ECDSA(hashes.SHA256()))
    cert = asn1_x509.Certificate(
        {
            "tbs_certificate": tbs,
            "signature_algorithm": {"algorithm": "sha256_ecdsa"},
            "signature_value": signature,
        }
    )
    return x509.load_der_x509_certificate(cert.dump())


def with_curve_oid(
    cert: x509.Certificate, issuer_key: ec.EllipticCurvePrivateKey, old: bytes, new: bytes
) -> x509.Certificate:
    """`cert` with its key's namedCurve OID replaced (same length), signed again."""
    tbs = cert.tbs_certificate_bytes
    assert tbs.count(old) == 1 and len(old) == len(new)
    return _resign(tbs.replace(old, new), issuer_key)


def with_duplicate_extension(
    cert: x509.Certificate, issuer_key: ec.EllipticCurvePrivateKey
) -> x509.Certificate:
    """`cert` with its last extension repeated (RFC 5280 §4.2 forbids it), signed again."""
    tbs = asn1_x509.TbsCertificate.load(cert.tbs_certificate_bytes)
    extensions = [asn1_x509.Extension.load(e.dump()) for e in tbs["extensions"]]
    extensions.append(asn1_x509.Extension.load(extensions[-1].dump()))
    tbs["extensions"] = asn1_x509.Extensions(extensions)
    return _resign(tbs.dump(force=True), issuer_key)


def certs_only(*certs: x509.Certificate) -> bytes:
    """A base64 certs-only body (RFC 7030 §4.1.3), as servers send it."""
    return base64.encodebytes(pkcs7.serialize_certificates(list(certs), Encoding.DER))
