"""Certificate issuance for the test server: CA profiles and the builder calls, no I/O.

Time and serial numbers are passed in or drawn here; callers (the server, the tests) decide
what "now" is, so that validity down to seconds can be asserted exactly.
"""

from __future__ import annotations

import enum
import secrets
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID

from est_agent.certificates import CA_KEY_USAGE, SIGNING_KEY_USAGE
from est_agent.errors import UsageError

__all__ = [
    "EKU_BY_NAME",
    "CaProfile",
    "CertificateAuthority",
    "Profile",
    "issue_from_csr",
    "make_ca",
    "parse_eku_names",
    "random_serial",
]

EKU_BY_NAME: dict[str, x509.ObjectIdentifier] = {
    "clientAuth": ExtendedKeyUsageOID.CLIENT_AUTH,
    "serverAuth": ExtendedKeyUsageOID.SERVER_AUTH,
    "codeSigning": ExtendedKeyUsageOID.CODE_SIGNING,
    "emailProtection": ExtendedKeyUsageOID.EMAIL_PROTECTION,
}


def parse_eku_names(names: list[str]) -> tuple[x509.ObjectIdentifier, ...]:
    """EKU OIDs for names such as `clientAuth`; `none` alone means "no EKU extension"."""
    if names == ["none"]:
        return ()
    unknown = [n for n in names if n not in EKU_BY_NAME]
    if unknown:
        raise UsageError(f"unknown EKU {unknown[0]!r}; known: {', '.join(EKU_BY_NAME)}, none")
    return tuple(EKU_BY_NAME[n] for n in names)


@dataclass(frozen=True)
class Profile:
    """What a label issues: lifetime in seconds and the extended key usages."""

    validity_s: int
    ekus: tuple[x509.ObjectIdentifier, ...] = field(default=(ExtendedKeyUsageOID.CLIENT_AUTH,))

    def __post_init__(self) -> None:
        if self.validity_s <= 0:
            raise UsageError(f"profile validity must be at least one second, got {self.validity_s}")


@dataclass(frozen=True)
class CertificateAuthority:
    """A CA certificate with its private key."""

    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def random_serial() -> int:
    # RFC 5280 §4.1.2.2: positive, at most 20 octets; 127 random bits stay clear of both limits.
    return secrets.randbits(127) | 1


class CaProfile(enum.Enum):
    """The extensions of a CA certificate made here (`est-testserver pki --ca-profile`)."""

    #: RFC 5280 §4.2.1.9 / §4.2.1.3 as written: critical basicConstraints cA, critical
    #: keyUsage keyCertSign + cRLSign, subjectKeyIdentifier (and AKI when not self-signed)
    RFC5280 = "rfc5280"
    #: libest's example CA (example/server/estExampleCA.cnf, section v3_ca:
    #: "basicConstraints = CA:TRUE", "subjectKeyIdentifier=hash"): basicConstraints cA *not*
    #: critical and no keyUsage; what curl, `openssl verify` and libest's client accept
    LIBEST = "libest"


def make_ca(
    common_name: str,
    now: datetime,
    validity: timedelta,
    *,
    profile: CaProfile = CaProfile.RFC5280,
    issuer: CertificateAuthority | None = None,
) -> CertificateAuthority:
    """An EC P-256 CA: self-signed (the dev PKI, the foreign-CA fault), or an intermediate
    signed by ``issuer``; its extensions follow ``profile``."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    libest = profile is CaProfile.LIBEST
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.certificate.subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(random_serial())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + validity)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=not libest)
    )
    if not libest:
        builder = builder.add_extension(CA_KEY_USAGE, critical=True)
    builder = builder.add_extension(ski, critical=False)
    if issuer is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()),
            critical=False,
        )
    cert = builder.sign(issuer.key if issuer else key, hashes.SHA256())
    return CertificateAuthority(certificate=cert, key=key)


def issue_from_csr(
    ca: CertificateAuthority,
    *,
    subject: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    san_der: bytes | None,
    san_critical: bool,
    ekus: tuple[x509.ObjectIdentifier, ...],
    not_before: datetime,
    not_after: datetime,
    serial: int,
) -> x509.Certificate:
    """Sign an end-entity certificate.

    The SAN is copied as the CSR's raw bytes (an unrecognised-extension wrapper writes them
    verbatim) so that a later re-enrollment, whose CSR copies the certificate's SAN, compares
    equal byte for byte (RFC 7030 §4.2.2).
    """
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.certificate.subject)
        .public_key(public_key)
        .serial_number(serial)
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(SIGNING_KEY_USAGE, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
    )
    if ekus:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(ekus)), critical=False)
    if san_der is not None:
        builder = builder.add_extension(
            x509.UnrecognizedExtension(ExtensionOID.SUBJECT_ALTERNATIVE_NAME, san_der),
            critical=san_critical,
        )
    return builder.sign(ca.key, hashes.SHA256())
