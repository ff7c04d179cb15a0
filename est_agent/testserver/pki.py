"""The development PKI: generate it into a directory, load it back.

Three CAs keep the trust stores apart, as in a real deployment: an EST client authenticates the
server with its explicit trust anchor (RFC 7030 §3.6.1) and checks issued certificates against
the CA certificates of /cacerts (§4.1.3); the server's TLS certificate need not come from the
EST CA, and a client that mixes the two up is caught here:

    tls-ca.pem / .key         signs server.pem: what a client trusts for the TLS server
    ca.pem / .key             the EST CA: issues enrolled certificates, served by /cacerts
    bootstrap-ca.pem / .key   the SIM provider's CA: signs bootstrap (first-enrollment) certs

plus `server.pem`/`.key` (localhost, 127.0.0.1, ::1, est-server) and a sample bootstrap client
credential `bootstrap-client.pem`/`.key` for curl and strongSwan demonstrations. Private keys
are written with mode 0600 and are never committed (see certs/README.md).

`--ca-profile libest` gives the three CAs the extensions of libest's example CA (issuer.py
`CaProfile`): a server in the field whose trust anchor the client must take as it is.
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

from est_agent.certificates import load_certificates
from est_agent.errors import ConfigError
from est_agent.fileio import atomic_write
from est_agent.testserver.issuer import (
    CaProfile,
    CertificateAuthority,
    issue_from_csr,
    make_ca,
    random_serial,
)

__all__ = [
    "PKI_FILES",
    "SERVER_NAMES",
    "DevPki",
    "generate_dev_pki",
    "issue_bootstrap_certificate",
    "issue_server_certificate",
    "load_dev_pki",
]

SERVER_NAMES = ("localhost", "est-server", "127.0.0.1", "::1")
PKI_FILES = (
    "ca.pem",
    "ca.key",
    "tls-ca.pem",
    "tls-ca.key",
    "server.pem",
    "server.key",
    "bootstrap-ca.pem",
    "bootstrap-ca.key",
    "bootstrap-client.pem",
    "bootstrap-client.key",
)
_CA_VALIDITY = timedelta(days=3650)
_LEAF_VALIDITY = timedelta(days=825)


@dataclass(frozen=True)
class DevPki:
    """A loaded dev PKI directory."""

    directory: Path
    est_ca: CertificateAuthority
    tls_ca_certificate: x509.Certificate
    bootstrap_ca: CertificateAuthority

    @property
    def server_cert_path(self) -> Path:
        return self.directory / "server.pem"

    @property
    def server_key_path(self) -> Path:
        return self.directory / "server.key"


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _write(path: Path, data: bytes, *, private: bool) -> None:
    # The final mode before any data and an atomic replace: a key is never readable by others,
    # not even for a moment, and an interrupted run leaves no half-written file (StoreError).
    mode = 0o600 if private else 0o644
    atomic_write(path, data, mode=mode, what="private key" if private else "certificate")


def issue_server_certificate(
    tls_ca: CertificateAuthority, now: datetime
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The TLS server's certificate and key: SERVER_NAMES in the SAN, serverAuth, from
    ``tls_ca`` (the dev TLS CA, or an intermediate under it)."""
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for name in SERVER_NAMES:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            names.append(x509.DNSName(name))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "est-server")]))
        .issuer_name(tls_ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(random_serial())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + _LEAF_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(tls_ca.key.public_key()),
            critical=False,
        )
        .sign(tls_ca.key, hashes.SHA256())
    )
    return cert, key


def issue_bootstrap_certificate(
    bootstrap_ca: CertificateAuthority,
    public_key: ec.EllipticCurvePublicKey,
    common_name: str,
    *,
    now: datetime | None = None,
    validity: timedelta = _LEAF_VALIDITY,
) -> x509.Certificate:
    """A bootstrap (first-enrollment) client certificate, as a SIM provider would issue it."""
    start = now or datetime.now(UTC)
    return issue_from_csr(
        bootstrap_ca,
        subject=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]),
        public_key=public_key,
        san_der=None,
        san_critical=False,
        ekus=(ExtendedKeyUsageOID.CLIENT_AUTH,),
        not_before=start - timedelta(minutes=5),
        not_after=start + validity,
        serial=random_serial(),
    )


def generate_dev_pki(
    directory: Path, *, force: bool = False, ca_profile: CaProfile = CaProfile.RFC5280
) -> list[Path]:
    """Generate the dev PKI into `directory` (created if needed); returns the files written.
    The three CAs' extensions follow `ca_profile`.

    Refuses (ConfigError) to overwrite existing files unless `force`: regenerating the CAs
    orphans every certificate issued so far. A file that cannot be written raises StoreError;
    the files before it are new then, the ones after it still the old ones.
    """
    directory.mkdir(parents=True, exist_ok=True)
    existing = [name for name in PKI_FILES if (directory / name).exists()]
    if existing and not force:
        raise ConfigError(f"{directory}: {', '.join(existing)} already exist (use --force)")
    now = datetime.now(UTC)
    est_ca = make_ca("est-agent dev EST CA", now, _CA_VALIDITY, profile=ca_profile)
    tls_ca = make_ca("est-agent dev TLS CA", now, _CA_VALIDITY, profile=ca_profile)
    bootstrap_ca = make_ca("est-agent dev bootstrap CA", now, _CA_VALIDITY, profile=ca_profile)
    server_cert, server_key = issue_server_certificate(tls_ca, now)
    client_key = ec.generate_private_key(ec.SECP256R1())
    client_cert = issue_bootstrap_certificate(
        bootstrap_ca, client_key.public_key(), "bootstrap-client", now=now
    )
    outputs: dict[str, bytes] = {
        "ca.pem": _cert_pem(est_ca.certificate),
        "ca.key": _key_pem(est_ca.key),
        "tls-ca.pem": _cert_pem(tls_ca.certificate),
        "tls-ca.key": _key_pem(tls_ca.key),
        "server.pem": _cert_pem(server_cert),
        "server.key": _key_pem(server_key),
        "bootstrap-ca.pem": _cert_pem(bootstrap_ca.certificate),
        "bootstrap-ca.key": _key_pem(bootstrap_ca.key),
        "bootstrap-client.pem": _cert_pem(client_cert),
        "bootstrap-client.key": _key_pem(client_key),
    }
    written = []
    for name, data in outputs.items():
        path = directory / name
        _write(path, data, private=name.endswith(".key"))
        written.append(path)
    return written


def _load_ca(directory: Path, stem: str) -> CertificateAuthority:
    cert_path, key_path = directory / f"{stem}.pem", directory / f"{stem}.key"
    try:
        cert_data, key_data = cert_path.read_bytes(), key_path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {exc.filename}: {exc.strerror}") from exc
    cert = load_certificates(cert_data, str(cert_path), error=ConfigError)[0]
    try:
        key = serialization.load_pem_private_key(key_data, password=None)
    except ValueError as exc:
        raise ConfigError(f"{key_path}: not a PEM private key") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{key_path}: expected an EC private key")
    if key.public_key() != cert.public_key():
        raise ConfigError(f"{key_path} does not match {cert_path}")
    return CertificateAuthority(certificate=cert, key=key)


def load_dev_pki(directory: Path) -> DevPki:
    """Load the files the server needs from a directory made by `generate_dev_pki`."""
    est_ca = _load_ca(directory, "ca")
    bootstrap_ca = _load_ca(directory, "bootstrap-ca")
    tls_ca_path = directory / "tls-ca.pem"
    try:
        tls_ca_data = tls_ca_path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{tls_ca_path}: cannot load ({exc})") from exc
    tls_ca = load_certificates(tls_ca_data, str(tls_ca_path), error=ConfigError)[0]
    for name in ("server.pem", "server.key"):
        if not (directory / name).is_file():
            raise ConfigError(f"{directory / name} is missing (run: est-testserver pki DIR)")
    return DevPki(
        directory=directory,
        est_ca=est_ca,
        tls_ca_certificate=tls_ca,
        bootstrap_ca=bootstrap_ca,
    )
