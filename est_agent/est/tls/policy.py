"""What the EST client accepts from a TLS server, and what it offers: pure, no TLS engine.

* Versions: TLS 1.2 minimum (RFC 8996, RFC 7030 §3.3.1), TLS 1.3 allowed.
* TLS 1.2 key exchanges: only those in which the server signs its ServerKeyExchange with its
  certificate's key (RFC 5246 §7.4.3, RFC 8422 §5.4), so the server has proven it holds that
  key before the client's CertificateVerify is made; static RSA (TLS_RSA_*) proves nothing
  before the card signs and RFC 9325 §4.1 says not to negotiate it. TLS 1.3 always has the
  server's CertificateVerify checked before the client's is made (RFC 8446 §4.4).
* Ciphers: AEAD (RFC 9325 §4.2); AES-CBC with SHA-2 HMACs (and encrypt-then-MAC, RFC 7366) only
  as a last resort on the tlslite path.
* The server's chain: ``verify_server_chain`` (explicit trust anchors only, RFC 7030 §3.6.1;
  the leaf names the host, RFC 6125 §6.4.4; RFC 5280 path validation). The CA profile
  (``ca_extension_policy``) is cryptography's web-PKI one for intermediates, while a configured
  trust anchor is trust-anchor information (RFC 5280 §6.1.1(d)): its key and name are trusted,
  its own extensions are not held to a profile; only what it says about itself is honoured
  (cA, keyCertSign, pathLenConstraint, name constraints, EKU). README "Certificate checks".
* Alerts: which TLS alerts mean "the server refused our certificate" (RFC 8446 §6.2), which
  are a mere close.
* The channel binding a CSR may carry: tls-unique (RFC 5929 §3) under TLS 1.2, tls-exporter
  (RFC 9266 §2) under TLS 1.3.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from cryptography import x509

from est_agent.errors import TlsVerificationError

if TYPE_CHECKING:
    from cryptography.x509.verification import ExtensionPolicy, Policy

__all__ = [
    "CLIENT_CERT_ALERTS",
    "CLIENT_CERT_ALERT_NAMES",
    "CLOSE_ALERTS",
    "STDLIB_TLS12_CIPHERS",
    "TLS12_KEY_EXCHANGES",
    "TLS_CIPHERS",
    "TLS_EXPORTER_LABEL",
    "TLS_EXPORTER_LENGTH",
    "TLS_MACS",
    "TLS_MAX_VERSIONS",
    "ChannelBinding",
    "ca_extension_policy",
    "verification_reason",
    "verify_server_chain",
]

#: The highest TLS version a configuration may ask for (the lowest is always 1.2, RFC 8996).
TLS_MAX_VERSIONS = ("1.2", "1.3")

#: What the tlslite path offers, in tlslite-ng's HandshakeSettings names (module docstring).
#: The order of the offer is set by the adapter (AEAD first, RFC 9325 §4.2).
TLS12_KEY_EXCHANGES = ("ecdhe_ecdsa", "ecdhe_rsa", "dhe_rsa")
TLS_CIPHERS = ("aes128gcm", "aes256gcm", "chacha20-poly1305", "aes128", "aes256")
TLS_MACS = ("aead", "sha256", "sha384")

#: The stdlib path's TLS 1.2 suites (OpenSSL cipher string): (EC)DHE with AEAD only (RFC 9325
#: §4.1, §4.2). TLS 1.3 suites are set apart by OpenSSL and stay its defaults.
STDLIB_TLS12_CIPHERS = (
    "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL:!eNULL:!PSK:!SRP:!DSS"
)

#: TLS alerts (RFC 8446 §6.2) by which a server says it refused *our* certificate:
#: bad_certificate .. certificate_unknown, unknown_ca, access_denied, certificate_required.
CLIENT_CERT_ALERTS = frozenset({42, 43, 44, 45, 46, 48, 49, 116})
#: The same alerts by name, as both tlslite and OpenSSL ("TLSV1_ALERT_UNKNOWN_CA") name them.
CLIENT_CERT_ALERT_NAMES = frozenset(
    {
        "bad_certificate",
        "unsupported_certificate",
        "certificate_revoked",
        "certificate_expired",
        "certificate_unknown",
        "unknown_ca",
        "access_denied",
        "certificate_required",
    }
)
#: close_notify, user_canceled (RFC 8446 §6.1): a close, not a verdict.
CLOSE_ALERTS = frozenset({0, 90})

#: RFC 9266 §2: the tls-exporter channel binding: this label, an empty context, 32 bytes.
TLS_EXPORTER_LABEL = b"EXPORTER-Channel-Binding"
TLS_EXPORTER_LENGTH = 32


@dataclass(frozen=True)
class ChannelBinding:
    """The channel binding of one TLS connection (RFC 5929 / RFC 9266).

    ``kind`` is ``"tls-unique"`` (TLS 1.2: the first Finished message's verify_data, 12 bytes)
    or ``"tls-exporter"`` (TLS 1.3: 32 bytes exported with ``EXPORTER-Channel-Binding``).
    """

    kind: str
    value: bytes
    tls_version: str

    def __repr__(self) -> str:
        # The value is a per-connection secret-ish token (it authorises a CSR): keep it out
        # of logs and tracebacks.
        return f"ChannelBinding(kind={self.kind!r}, tls_version={self.tls_version!r})"


def server_identity(host: str) -> Any:
    """The name the server's certificate must carry: an IP address or a DNS name."""
    # The verifier's subject types are x509's GeneralName classes.
    try:
        return x509.IPAddress(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        return x509.DNSName(host)


def is_ip_address(host: str) -> bool:
    """Whether ``host`` is an IP literal (RFC 6066 §3: never sent as SNI)."""
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


class _AnchorExempt:
    """The CA-extension checks that a configured trust anchor is exempt from.

    cryptography's web-PKI CA profile applies to every CA certificate of a path, the anchor
    included. RFC 5280 §6.1.1(d) makes the anchor trust-anchor information (a name and a key,
    however delivered, often as a self-signed certificate) that path validation does not
    check; libest's example CA (basicConstraints not critical, no keyUsage) is refused by the
    profile while curl, ``openssl verify`` and libest accept it. So, for the anchor only, the
    profile's form requirements are dropped; what the anchor states about itself still binds
    (RFC 5937 §2: constraints carried in the anchor's certificate): basicConstraints must say
    cA (cryptography requires the extension on every CA), keyUsage when present must allow
    keyCertSign, pathLenConstraint, nameConstraints and EKU are cryptography's checks.
    Intermediates keep the whole profile (written out here where cryptography's own validator
    cannot be called: critical basicConstraints, keyUsage present, the AKI/SKI rules).
    """

    def __init__(self, anchors: Collection[x509.Certificate]) -> None:
        self._anchors = frozenset(anchors)

    def _intermediate(self, cert: x509.Certificate) -> str | None:
        """The subject of ``cert`` when it is not a configured anchor, else None."""
        return None if cert in self._anchors else cert.subject.rfc4514_string()

    def basic_constraints(
        self, policy: Policy, cert: x509.Certificate, ext: x509.BasicConstraints
    ) -> None:
        # RFC 5280 §4.2.1.9: cA asserted in every CA certificate; "MUST be critical" in CA
        # certificates that sign certificates: the anchor's form is not checked (§6.1.1).
        if not ext.ca:
            raise ValueError(f"{cert.subject.rfc4514_string()!r}: basicConstraints cA is false")
        subject = self._intermediate(cert)
        if subject is not None and not _is_critical(cert, x509.BasicConstraints):
            raise ValueError(
                f"intermediate CA {subject!r}: basicConstraints is not critical (RFC 5280 §4.2.1.9)"
            )

    def key_usage(self, policy: Policy, cert: x509.Certificate, ext: x509.KeyUsage | None) -> None:
        # RFC 5280 §4.2.1.3: CA certificates MUST include keyUsage with keyCertSign; when an
        # anchor has one, it limits what the anchor's key may do (RFC 5937 §2).
        subject = self._intermediate(cert)
        if ext is None:
            if subject is not None:
                raise ValueError(f"intermediate CA {subject!r} has no keyUsage (RFC 5280 §4.2.1.3)")
            return
        if not ext.key_cert_sign:
            raise ValueError(
                f"{cert.subject.rfc4514_string()!r}: keyUsage does not allow keyCertSign"
            )

    def authority_key_identifier(
        self, policy: Policy, cert: x509.Certificate, ext: x509.AuthorityKeyIdentifier | None
    ) -> None:
        # cryptography's web-PKI CA rule, kept for intermediates: RFC 5280 §4.2.1.1 (not
        # critical), CA/B BR 7.1.2.11.1 (keyIdentifier only).
        subject = self._intermediate(cert)
        if ext is None or subject is None:
            return
        if _is_critical(cert, x509.AuthorityKeyIdentifier):
            raise ValueError(f"intermediate CA {subject!r}: authorityKeyIdentifier is critical")
        if ext.key_identifier is None:
            raise ValueError(
                f"intermediate CA {subject!r}: authorityKeyIdentifier lacks keyIdentifier"
            )
        if ext.authority_cert_issuer is not None or ext.authority_cert_serial_number is not None:
            raise ValueError(
                f"intermediate CA {subject!r}: authorityKeyIdentifier names the issuer's issuer"
                " and serial number"
            )

    def subject_key_identifier(
        self, policy: Policy, cert: x509.Certificate, ext: x509.SubjectKeyIdentifier | None
    ) -> None:
        # RFC 5280 §4.2.1.2: MUST NOT be critical (cryptography's web-PKI CA rule).
        subject = self._intermediate(cert)
        if ext is not None and subject is not None and _is_critical(cert, type(ext)):
            raise ValueError(f"intermediate CA {subject!r}: subjectKeyIdentifier is critical")


def _is_critical(cert: x509.Certificate, kind: type[x509.ExtensionType]) -> bool:
    return cert.extensions.get_extension_for_class(kind).critical


def ca_extension_policy(anchors: Collection[x509.Certificate]) -> ExtensionPolicy:
    """The CA extension policy of every path check (server chains, issued certificates):
    cryptography's web-PKI CA profile, with the configured ``anchors`` exempt from its form
    requirements (``_AnchorExempt``, RFC 5280 §6.1.1)."""
    from cryptography.x509.verification import Criticality, ExtensionPolicy

    exempt = _AnchorExempt(anchors)
    agnostic = Criticality.AGNOSTIC
    return (
        ExtensionPolicy.webpki_defaults_ca()
        .require_present(x509.BasicConstraints, agnostic, exempt.basic_constraints)
        .may_be_present(x509.KeyUsage, agnostic, exempt.key_usage)
        .may_be_present(x509.AuthorityKeyIdentifier, agnostic, exempt.authority_key_identifier)
        .may_be_present(x509.SubjectKeyIdentifier, agnostic, exempt.subject_key_identifier)
    )


def verification_reason(exc: Exception) -> str:
    """cryptography's verification error in words: without the name of the exception class a
    validator of ``ca_extension_policy`` raised (cryptography prefixes it)."""
    return re.sub(r"Python extension validator failed: \w+: ", "", str(exc))


def verify_server_chain(
    chain: Sequence[x509.Certificate],
    anchors: Sequence[x509.Certificate],
    host: str,
    *,
    now: datetime | None = None,
) -> None:
    """Verify a server's certificate chain (leaf first) to an explicit trust anchor + host.

    cryptography's RFC 5280 / CA/B web-PKI profile: the leaf must name ``host`` in its
    subjectAltName (DNS name or IP address; RFC 6125 §6.4.4: no CN fallback), carry serverAuth
    when it has an EKU, and chain to one of ``anchors`` through the intermediates the server
    sent (any of them may itself be an anchor). The anchor itself is not held to the CA
    profile (``ca_extension_policy``). Both TLS paths call this (the stdlib one after
    OpenSSL's own check). Raises ``TlsVerificationError``.
    """
    from cryptography.x509 import verification

    if not chain:
        raise TlsVerificationError("the server sent no certificate")
    if not anchors:
        raise TlsVerificationError("no trust anchor configured for the EST server")
    try:
        builder = (
            verification.PolicyBuilder()
            .store(verification.Store(list(anchors)))
            .extension_policies(
                ca_policy=ca_extension_policy(anchors),
                ee_policy=verification.ExtensionPolicy.webpki_defaults_ee(),
            )
        )
        if now is not None:
            builder = builder.time(now)
        verifier = builder.build_server_verifier(server_identity(host))
        verifier.verify(chain[0], list(chain[1:]))
    except verification.VerificationError as exc:
        reason = verification_reason(exc)
        raise TlsVerificationError(
            f"EST server certificate for {host!r} refused: {reason}"
        ) from exc
    except ValueError as exc:  # e.g. a host name that is not a valid DNS name
        raise TlsVerificationError(f"cannot verify the EST server as {host!r}: {exc}") from exc
