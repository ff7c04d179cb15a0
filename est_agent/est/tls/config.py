"""The two TLS configurations of the EST client (httpx's ``_config`` idea), one policy.

* ``TlsliteTls``: tlslite-ng runs the handshake, so the client's CertificateVerify can be
  signed by a ``Signer`` (a key inside the SIM, or a software key); the server is verified by
  the adapter (tlslite_adapter.py) before anything is signed.
* ``StdlibTls``: the stdlib ``ssl`` module, for server-only authentication (``est-agent
  cacerts``/``csrattrs``); OpenSSL checks the chain against the same explicit anchors (no
  system store) and the host name or address.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from est_agent.errors import EstError, TlsVerificationError
from est_agent.est.tls.policy import STDLIB_TLS12_CIPHERS, TLS_MAX_VERSIONS

if TYPE_CHECKING:
    from est_agent.backends.signer import Signer

__all__ = ["StdlibTls", "TlsliteTls"]


@dataclass(frozen=True)
class TlsliteTls:
    """Handshake with tlslite-ng; client authentication (optional) signs through ``signer``.

    ``client_chain`` is the client certificate first, then any intermediates. ``max_version``
    may be ``"1.2"`` to stay on TLS 1.2 (servers that require tls-unique PoP).
    """

    trust_anchors: tuple[x509.Certificate, ...]
    client_chain: tuple[x509.Certificate, ...] = ()
    signer: Signer | None = None
    max_version: str = "1.3"

    def __post_init__(self) -> None:
        if bool(self.client_chain) != (self.signer is not None):
            raise EstError("a client certificate chain and a signer go together")
        if self.max_version not in TLS_MAX_VERSIONS:
            raise EstError(f"max TLS version must be 1.2 or 1.3, not {self.max_version}")
        if self.signer is not None and self.client_chain[0].public_key() != (
            self.signer.public_key()
        ):
            raise EstError("the client certificate does not belong to the signer's key")


@dataclass(frozen=True)
class StdlibTls:
    """Handshake with the stdlib ``ssl`` module: server-only authentication (no client key:
    every client key, on the card or in a PEM file, signs through ``TlsliteTls``).

    Channel binding: tls-unique under TLS 1.2; none under TLS 1.3 (the stdlib has no exporter
    API, and RFC 9266 §1 leaves tls-unique undefined for TLS 1.3).
    """

    trust_anchors: tuple[x509.Certificate, ...]
    max_version: str = "1.3"

    def context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # check_hostname + CERT_REQUIRED
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.maximum_version = (
            ssl.TLSVersion.TLSv1_2 if self.max_version == "1.2" else ssl.TLSVersion.TLSv1_3
        )
        # The configured anchors only, never the system store (RFC 7030 §3.6.1 explicit TA);
        # PARTIAL_CHAIN lets an intermediate be an anchor, as cryptography's Store does, and
        # X509_STRICT applies RFC 5280 as strictly as the tlslite path's verifier.
        if not self.trust_anchors:
            raise TlsVerificationError("no trust anchor configured for the EST server")
        pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.trust_anchors)
        ctx.load_verify_locations(cadata=pem.decode("ascii"))
        ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN | ssl.VERIFY_X509_STRICT
        ctx.set_ciphers(STDLIB_TLS12_CIPHERS)
        return ctx
