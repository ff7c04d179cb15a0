"""Pure checks a strict EST server applies to a PKCS#10 request.

Two parsers on purpose: `cryptography` verifies the signature and reads the key, while
`asn1crypto` gives the raw, un-re-encoded bytes of Subject and SubjectAltName that RFC 7030
§4.2.2 compares byte for byte.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from asn1crypto import csr as asn1_csr
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import SignatureAlgorithmOID

from est_agent.testserver.wire import HttpRefusal

__all__ = [
    "CheckedCsr",
    "check_challenge_password",
    "check_csr",
    "check_reenroll",
    "public_key_fingerprint",
    "raw_subject_and_san_of_certificate",
]

_OID_SAN = "2.5.29.17"


@dataclass(frozen=True)
class CheckedCsr:
    """A CSR that passed `check_csr`, with the raw fields later checks compare."""

    csr: x509.CertificateSigningRequest
    der: bytes
    subject_der: bytes
    #: DER of the GeneralNames inside the requested SAN extension, and its critical flag
    san_der: bytes | None
    san_critical: bool
    challenge_password: str | None
    public_key_sha256: str


def public_key_fingerprint(key: ec.EllipticCurvePublicKey) -> str:
    """Hex SHA-256 of the SubjectPublicKeyInfo DER: the key's identity in logs and state."""
    spki = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).hexdigest()


def _san_of_extensions(extensions: Any) -> tuple[bytes | None, bool]:
    for ext in extensions:
        if ext["extn_id"].dotted == _OID_SAN:
            return bytes(ext["extn_value"].contents), bool(ext["critical"].native)
    return None, False


def _raw_fields_of_csr(der: bytes) -> tuple[bytes, bytes | None, bool, str | None]:
    info = asn1_csr.CertificationRequest.load(der)["certification_request_info"]
    subject = bytes(info["subject"].dump())
    san: bytes | None = None
    critical = False
    password: str | None = None
    for attribute in info["attributes"]:
        kind = attribute["type"].dotted
        if kind == "1.2.840.113549.1.9.14":  # extensionRequest (RFC 2985 §5.4.2)
            for extensions in attribute["values"]:
                found, crit = _san_of_extensions(extensions)
                if found is not None:
                    san, critical = found, crit
        elif kind == "1.2.840.113549.1.9.7":  # challengePassword (RFC 2985 §5.4.1)
            values = list(attribute["values"])
            if len(values) != 1:
                raise HttpRefusal(400, "challengePassword must have exactly one value")
            native = values[0].native
            password = native if isinstance(native, str) else None
    return subject, san, critical, password


_ECDSA_SHA2 = {
    (SignatureAlgorithmOID.ECDSA_WITH_SHA256, hashes.SHA256),
    (SignatureAlgorithmOID.ECDSA_WITH_SHA384, hashes.SHA384),
    (SignatureAlgorithmOID.ECDSA_WITH_SHA512, hashes.SHA512),
}


def check_csr(der: bytes) -> CheckedCsr:
    """Parse and vet a CSR: valid self-signature, EC P-256 key, ECDSA with SHA-2, a subject."""
    try:
        csr = x509.load_der_x509_csr(der)
        subject_der, san_der, san_critical, password = _raw_fields_of_csr(der)
    except HttpRefusal:
        raise
    except Exception:
        raise HttpRefusal(400, "body is not a DER PKCS#10 certification request") from None
    key = csr.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise HttpRefusal(400, "only EC P-256 (secp256r1) public keys are accepted")
    # ecdsa-with-SHA256/384/512 (RFC 5758 §3.2): what /csrattrs may ask of a P-256 key
    if (csr.signature_algorithm_oid, type(csr.signature_hash_algorithm)) not in _ECDSA_SHA2:
        raise HttpRefusal(400, "only ecdsa-with-SHA256/384/512 signatures are accepted")
    try:
        signature_ok = csr.is_signature_valid
    except Exception:
        signature_ok = False
    if not signature_ok:
        raise HttpRefusal(400, "CSR self-signature does not verify (proof of possession)")
    if len(csr.subject) == 0:
        raise HttpRefusal(400, "CSR subject is empty")
    return CheckedCsr(
        csr=csr,
        der=der,
        subject_der=subject_der,
        san_der=san_der,
        san_critical=san_critical,
        challenge_password=password,
        public_key_sha256=public_key_fingerprint(key),
    )


def check_challenge_password(
    checked: CheckedCsr, binding: bytes, kind: str = "tls-unique"
) -> None:
    """RFC 7030 §3.5: challengePassword must be base64 of this TLS connection's channel
    binding ``kind``: tls-unique (RFC 5929) under TLS 1.2, tls-exporter (RFC 9266) under 1.3."""
    expected = base64.b64encode(binding).decode("ascii")
    if checked.challenge_password is None:
        raise HttpRefusal(400, f"PoP required: CSR lacks challengePassword = base64({kind})")
    if checked.challenge_password != expected:
        raise HttpRefusal(
            400, f"PoP failed: challengePassword does not match this TLS session's {kind}"
        )


def raw_subject_and_san_of_certificate(der: bytes) -> tuple[bytes, bytes | None]:
    """Raw Subject DER and raw SAN GeneralNames DER (or None) of a certificate."""
    tbs = asn1_x509.Certificate.load(der)["tbs_certificate"]
    extensions = tbs["extensions"]
    san, _ = _san_of_extensions(extensions if extensions.native is not None else [])
    return bytes(tbs["subject"].dump()), san


def check_reenroll(checked: CheckedCsr, client_cert: x509.Certificate, now: datetime) -> None:
    """RFC 7030 §4.2.2: Subject and SubjectAltName equal the authenticating certificate's.

    Compared as bytes, as real servers do; the certificate must be valid at `now`.
    """
    if not client_cert.not_valid_before_utc <= now <= client_cert.not_valid_after_utc:
        raise HttpRefusal(403, "client certificate is expired or not yet valid")
    subject, san = raw_subject_and_san_of_certificate(
        client_cert.public_bytes(serialization.Encoding.DER)
    )
    if checked.subject_der != subject:
        raise HttpRefusal(400, "re-enroll: CSR Subject differs from the client certificate's")
    if checked.san_der != san:
        raise HttpRefusal(
            400, "re-enroll: CSR SubjectAltName differs from the client certificate's"
        )
