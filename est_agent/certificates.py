"""Certificates from bytes: the one PEM-or-DER loader of est-agent.

A certificate reaches the agent as a PEM file (one or more ``CERTIFICATE`` blocks, RFC 7468
§5: a trust anchor bundle, a bootstrap chain, a test CA) or as the bare DER of one certificate
(RFC 5280 §4.1, e.g. the content of a SIM file). Which one is told by the PEM pre-encapsulation
boundary (RFC 7468 §2), not by a file name. Bad bytes are the caller's typed error naming what
was read, never a ``ValueError`` from the parser.
"""

from __future__ import annotations

from cryptography import x509

from est_agent.errors import EstAgentError, InputError

__all__ = ["load_certificates"]

_PEM_BOUNDARY = b"-----BEGIN"


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
