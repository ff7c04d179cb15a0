"""Certificates from bytes: the one PEM-or-DER loader of est-agent.

A certificate reaches the agent as a PEM file (one or more ``CERTIFICATE`` blocks, RFC 7468
§5: a trust anchor bundle, a bootstrap chain, a test CA) or as the bare DER of one certificate
(RFC 5280 §4.1, e.g. the content of a SIM file). Which one is told by the PEM pre-encapsulation
boundary (RFC 7468 §2), not by a file name. Bad bytes are the caller's typed error naming what
was read, never a ``ValueError`` from the parser.
"""

from __future__ import annotations

import hashlib

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from est_agent.errors import EstAgentError, InputError

__all__ = ["CA_KEY_USAGE", "SIGNING_KEY_USAGE", "load_certificates", "sha256_fingerprint"]

_PEM_BOUNDARY = b"-----BEGIN"


def _key_usage(*, signing: bool, certifying: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=signing,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=certifying,
        crl_sign=certifying,
        encipher_only=False,
        decipher_only=False,
    )


#: keyUsage of an end entity that signs (TLS CertificateVerify, CSRs): digitalSignature only
#: (RFC 5280 §4.2.1.3)
SIGNING_KEY_USAGE = _key_usage(signing=True, certifying=False)
#: keyUsage of a CA: keyCertSign and cRLSign (RFC 5280 §4.2.1.3, §4.2.1.9)
CA_KEY_USAGE = _key_usage(signing=False, certifying=True)


def load_certificates(
    data: bytes, what: str, *, error: type[EstAgentError] = InputError
) -> list[x509.Certificate]:
    """Every certificate of a PEM bundle, or the one certificate of DER bytes, in file order.

    ``what`` names the source in the message (a configuration key, an option, a path); bytes
    that hold no certificate raise ``error`` (InputError, exit 65, unless the caller's file is
    configuration: ConfigError). The list is never empty.
    """
    try:
        if _PEM_BOUNDARY in data:
            return x509.load_pem_x509_certificates(data)
        return [x509.load_der_x509_certificate(data)]
    except ValueError as exc:
        raise error(f"{what}: no usable certificate ({exc})") from exc


def sha256_fingerprint(cert: x509.Certificate) -> bytes:
    """SHA-256 over the whole DER certificate (RFC 7030 §4.1.1's "fingerprint"; what
    est.cacerts_fingerprint pins)."""
    return hashlib.sha256(cert.public_bytes(Encoding.DER)).digest()
