"""CA certificates with chosen extensions, for the trust-anchor profile tests.

Each ``CaShape`` is one way real CAs are made: RFC 5280 to the letter, libest's example CA
(example/server/estExampleCA.cnf, section v3_ca: "basicConstraints = CA:TRUE" not critical,
"subjectKeyIdentifier=hash", no keyUsage), an OpenSSL ``req -x509`` whose AKI also names the
issuer and serial (``authorityKeyIdentifier=keyid:always,issuer:always``), and the defects a
verifier must catch. ``chain_for`` makes a server certificate under a root, through an
intermediate when asked, for the names the clients connect to.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "CASES",
    "SHAPES",
    "CaShape",
    "Case",
    "Issued",
    "ca_certificate",
    "chain_for",
    "write_key",
    "write_pem",
]

_CERT_SIGN = x509.KeyUsage(False, False, False, False, False, True, True, False, False)
_SIGN_ONLY = x509.KeyUsage(True, False, False, False, False, False, False, False, False)


@dataclass(frozen=True)
class CaShape:
    """The extensions of one CA certificate."""

    name: str
    basic_constraints: tuple[bool, bool] | None = (True, True)  # (cA, critical) or absent
    key_usage: x509.KeyUsage | None = _CERT_SIGN  # critical when present
    full_aki: bool = False  # AKI with keyIdentifier, authorityCertIssuer and serial
    expired: bool = False


SHAPES = {
    shape.name: shape
    for shape in (
        CaShape("rfc5280"),
        CaShape("libest", basic_constraints=(True, False), key_usage=None),
        CaShape("libest-full-aki", basic_constraints=(True, False), key_usage=None, full_aki=True),
        CaShape("no-keyusage", key_usage=None),
        CaShape("full-aki", full_aki=True),
        CaShape("keyusage-without-certsign", key_usage=_SIGN_ONLY),
        CaShape("ca-false", basic_constraints=(False, True), key_usage=None),
        CaShape("no-basic-constraints", basic_constraints=None, key_usage=None),
        CaShape("expired", expired=True),
    )
}


@dataclass(frozen=True)
class Case:
    anchor: str
    intermediate: str | None
    accepted: bool  # by the agent, on both TLS paths
    openssl: bool  # `openssl verify -partial_chain -purpose sslserver` (what curl does)
    openssl_strict: bool  # the same with -x509_strict (what the stdlib path used to set)
    refusal: str = ""  # what the agent's refusal says (tlslite path; stdlib when OpenSSL passed)

    @property
    def id(self) -> str:
        return self.anchor if self.intermediate is None else f"{self.anchor}>{self.intermediate}"


#: Each case's verdicts, fixed from RFC 5280 (and, for OpenSSL, from its documented checks):
#: the anchor's form is not checked (§6.1.1), what it says about itself is; intermediates keep
#: the whole CA profile (§4.2.1.9, §4.2.1.3; the AKI form is the CA/B BR 7.1.2.11.1 rule).
CASES = [
    # the anchor: its form is not checked ...
    Case("rfc5280", None, True, True, True),
    Case("libest", None, True, True, False),
    Case("libest-full-aki", None, True, True, False),
    Case("no-keyusage", None, True, True, False),
    # ... what it says about itself is (and so says OpenSSL, strict or not)
    Case("keyusage-without-certsign", None, False, False, False, "keyCertSign"),
    Case("ca-false", None, False, False, False, "cA must be asserted"),
    Case("no-basic-constraints", None, False, False, False, "missing required extension"),
    Case("expired", None, False, False, False, "expired|not valid"),
    # intermediates keep the whole CA profile, also under a libest-like anchor
    Case("rfc5280", "rfc5280", True, True, True),
    Case("rfc5280", "libest", False, True, False, "basicConstraints is not critical"),
    Case("rfc5280", "no-keyusage", False, True, False, "has no keyUsage"),
    Case("rfc5280", "full-aki", False, True, True, "names the issuer's issuer"),
    Case("libest", "libest", False, True, False, "basicConstraints is not critical"),
]


@dataclass(frozen=True)
class Issued:
    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def ca_certificate(shape: CaShape, cn: str, issuer: Issued | None = None) -> Issued:
    """A CA of ``shape``: self-signed, or signed by ``issuer``."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    start, end = (
        (now - timedelta(days=30), now - timedelta(days=1))
        if shape.expired
        else (now - timedelta(minutes=5), now + timedelta(days=30))
    )
    signer = issuer.key if issuer else key
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(issuer.certificate.subject if issuer else _name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
    )
    if shape.basic_constraints is not None:
        ca, critical = shape.basic_constraints
        builder = builder.add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical)
    if shape.key_usage is not None:
        builder = builder.add_extension(shape.key_usage, critical=True)
    if shape.full_aki or issuer is not None:
        signer_public = signer.public_key()
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(signer_public)
        if shape.full_aki:
            issuer_cert_name = issuer.certificate.issuer if issuer else _name(cn)
            aki = x509.AuthorityKeyIdentifier(
                aki.key_identifier,
                [x509.DirectoryName(issuer_cert_name)],
                issuer.certificate.serial_number if issuer else 1,
            )
        builder = builder.add_extension(aki, critical=False)
    return Issued(builder.sign(signer, hashes.SHA256()), key)


def _server_certificate(issuer: Issued) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("est-server"))
        .issuer_name(issuer.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()),
            critical=False,
        )
        .sign(issuer.key, hashes.SHA256())
    )
    return Issued(cert, key)


def chain_for(
    *, anchor: CaShape, intermediate: CaShape | None = None
) -> tuple[Issued, list[x509.Certificate], x509.Certificate]:
    """(server credential, the chain it sends leaf first, the trust anchor to configure)."""
    root = ca_certificate(anchor, f"{anchor.name} root")
    if intermediate is None:
        server = _server_certificate(root)
        return server, [server.certificate], root.certificate
    sub = ca_certificate(intermediate, f"{intermediate.name} intermediate", issuer=root)
    server = _server_certificate(sub)
    return server, [server.certificate, sub.certificate], root.certificate


def write_pem(path: Path, *certs: x509.Certificate) -> Path:
    path.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs))
    return path


def write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> Path:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)
    return path
