"""The two TLS configurations of the EST client (httpx's ``_config`` idea), one policy.

* ``TlsliteTls``: tlslite-ng runs the handshake, so the client's CertificateVerify can be
  signed by a ``Signer`` (a key inside the SIM, or a software key); the server is verified by
  the adapter (tlslite_adapter.py) before anything is signed.
* ``StdlibTls``: the stdlib ``ssl`` module, for server-only authentication (``est-agent
  cacerts``/``csrattrs``); OpenSSL checks the chain against the same explicit anchors (no
  system store) and the host name or address, then, before a byte of HTTP is sent, the chain
  the server sent goes through the tlslite path's ``verify_server_chain`` too: one policy.
* ``ProvisionalTls``: the stdlib path without a trust anchor yet, for the bootstrap
  distribution of the EST CA (RFC 7030 §4.1.1): the server is not verified during the
  handshake, its chain is recorded (``ServerChains``) for est/bootstrap.py to verify once
  /cacerts has yielded the root that matches the configured fingerprint. Same versions and
  suites as ``StdlibTls`` (``_client_context``): TLS 1.2 minimum, (EC)DHE + AEAD under 1.2.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from est_agent.errors import EstError, TlsVerificationError
from est_agent.est.tls.policy import STDLIB_TLS12_CIPHERS, TLS_MAX_VERSIONS, verify_server_chain

if TYPE_CHECKING:
    from est_agent.backends.agreement import KeyAgreement
    from est_agent.backends.signer import Signer

__all__ = ["ProvisionalTls", "ServerChains", "StdlibTls", "TlsliteTls"]

_C = TypeVar("_C", bound=ssl.SSLContext)


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
    #: TLS 1.3's ephemeral ECDH (the key share) by this device instead of tlslite (the card)
    key_agreement: KeyAgreement | None = None

    def __post_init__(self) -> None:
        if self.key_agreement is not None and self.max_version != "1.3":
            raise EstError("a key agreement on the device needs TLS 1.3 (RFC 8446 §4.2.8)")
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
        ctx = _client_context(_AnchoredContext, self.max_version)  # check_hostname, CERT_REQUIRED
        # The configured anchors only, never the system store (RFC 7030 §3.6.1 explicit TA);
        # PARTIAL_CHAIN lets an intermediate be an anchor, as cryptography's Store does.
        # Not X509_STRICT: OpenSSL applies it to the trust anchor too (a non-critical
        # basicConstraints, a missing keyUsage: libest's example CA), where RFC 5280 §6.1.1
        # checks no anchor; the strict profile for intermediates and the leaf is
        # verify_server_chain's, run on the same chain once OpenSSL is done (_VerifiedSocket).
        if not self.trust_anchors:
            raise TlsVerificationError("no trust anchor configured for the EST server")
        pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.trust_anchors)
        ctx.load_verify_locations(cadata=pem.decode("ascii"))
        ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
        ctx.est_anchors = self.trust_anchors
        return ctx


class ServerChains:
    """The certificate chains (leaf first) servers sent on provisional connections, one per
    completed TLS handshake, in order (``ProvisionalTls``)."""

    def __init__(self) -> None:
        self._chains: list[tuple[x509.Certificate, ...]] = []

    def note(self, chain: list[x509.Certificate]) -> None:
        self._chains.append(tuple(chain))

    @property
    def chains(self) -> tuple[tuple[x509.Certificate, ...], ...]:
        return tuple(self._chains)


@dataclass(frozen=True)
class ProvisionalTls(StdlibTls):
    """Server-only stdlib TLS with no trust anchor yet (RFC 7030 §4.1.1 bootstrap distribution):
    the handshake completes without verifying the server, and the chain it sent is recorded in
    ``chains`` for the caller to verify once it has a trust anchor (est/bootstrap.py).

    Only for ``GET /cacerts`` without credentials (the EST client refuses anything else on it):
    such a connection carries nothing secret. The server still proves it holds the key of the
    leaf it sent (TLS 1.3 CertificateVerify, RFC 8446 §4.4.3; the signed (EC)DHE key exchange of
    TLS 1.2, RFC 8422 §5.4, the only kind offered): that leaf is what is verified later.
    """

    trust_anchors: tuple[x509.Certificate, ...] = ()
    chains: ServerChains = field(default_factory=ServerChains, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.trust_anchors:
            raise EstError("a provisional TLS connection has no trust anchor (use StdlibTls)")
        if self.max_version not in TLS_MAX_VERSIONS:
            raise EstError(f"max TLS version must be 1.2 or 1.3, not {self.max_version}")

    def context(self) -> ssl.SSLContext:
        ctx = _client_context(_ProvisionalContext, self.max_version)
        # RFC 7030 §4.1.1: "provisionally continue the TLS handshake": nothing to verify
        # against yet; the recorded chain is verified to the fingerprint-matched root.
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.est_chains = self.chains
        return ctx


def _client_context(kind: type[_C], max_version: str) -> _C:
    """A client context of class ``kind`` with the versions and TLS 1.2 suites of every stdlib
    connection, verified or provisional: TLS 1.2 minimum (RFC 8996), (EC)DHE with AEAD under
    TLS 1.2 (RFC 9325 §4.1, §4.2; policy.STDLIB_TLS12_CIPHERS)."""
    ctx = kind(ssl.PROTOCOL_TLS_CLIENT)  # check_hostname + CERT_REQUIRED until told otherwise
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2 if max_version == "1.2" else ssl.TLSVersion.TLSv1_3
    ctx.set_ciphers(STDLIB_TLS12_CIPHERS)
    return ctx


class _AnchoredContext(ssl.SSLContext):
    """An ``SSLContext`` whose sockets (and memory-BIO objects, for TLS inside a TLS proxy
    tunnel) verify the server's chain with ``verify_server_chain`` when the handshake is done:
    ``sslsocket_class`` / ``sslobject_class`` are the stdlib's hooks for exactly that."""

    est_anchors: tuple[x509.Certificate, ...] = ()


def _check_peer(tls: ssl.SSLSocket | ssl.SSLObject) -> None:
    """After OpenSSL accepted the handshake: the tlslite path's check on the chain the server
    sent (leaf first). A refusal is raised as OpenSSL's own certificate refusal, so that the
    stream layer reports it the same way (and closes the connection unused)."""
    context = tls.context
    anchors = context.est_anchors if isinstance(context, _AnchoredContext) else ()
    host = tls.server_hostname
    try:
        if host is None:
            raise TlsVerificationError("no server name to verify the EST server against")
        verify_server_chain(_peer_chain(tls), anchors, host)
    except ValueError as exc:  # DER that OpenSSL took and cryptography does not
        error = TlsVerificationError(f"unparseable server certificate: {exc}")
    except TlsVerificationError as exc:
        error = exc
    else:
        return
    refusal = ssl.SSLCertVerificationError(ssl.SSL_ERROR_SSL, str(error))
    refusal.verify_code = 0
    refusal.verify_message = str(error).removeprefix(
        f"EST server certificate for {host!r} refused: "
    )
    raise refusal from error


def _peer_chain(tls: ssl.SSLSocket | ssl.SSLObject) -> list[x509.Certificate]:
    """The certificates the server sent, leaf first (``get_unverified_chain``: public from
    Python 3.13, the ``_ssl`` object's method since 3.10)."""
    public = getattr(tls, "get_unverified_chain", None)
    if public is not None:
        ders = [bytes(c) for c in public()]
    else:
        import _ssl

        inner: Any = tls._sslobj  # type: ignore[union-attr]
        ders = [c.public_bytes(_ssl.ENCODING_DER) for c in inner.get_unverified_chain()]
    return [x509.load_der_x509_certificate(der) for der in ders]


class _VerifiedSocket(ssl.SSLSocket):
    def do_handshake(self, block: bool = False) -> None:
        super().do_handshake(block)
        _check_peer(self)


class _VerifiedObject(ssl.SSLObject):
    def do_handshake(self) -> None:
        super().do_handshake()
        _check_peer(self)


_AnchoredContext.sslsocket_class = _VerifiedSocket
_AnchoredContext.sslobject_class = _VerifiedObject


class _ProvisionalContext(ssl.SSLContext):
    """An ``SSLContext`` whose sockets (and memory-BIO objects) record the server's chain in
    ``est_chains`` once the handshake is done (``ProvisionalTls``)."""

    est_chains: ServerChains | None = None


def _record_peer(tls: ssl.SSLSocket | ssl.SSLObject) -> None:
    """After the provisional handshake: the chain the server sent, for the later check. DER
    that cryptography cannot parse is refused now, as the verified path does (``_check_peer``)."""
    context = tls.context
    chains = context.est_chains if isinstance(context, _ProvisionalContext) else None
    try:
        chain = _peer_chain(tls)
    except ValueError as exc:
        error = TlsVerificationError(f"unparseable server certificate: {exc}")
        refusal = ssl.SSLCertVerificationError(ssl.SSL_ERROR_SSL, str(error))
        refusal.verify_code = 0
        refusal.verify_message = str(error)
        raise refusal from error
    if chains is not None:
        chains.note(chain)


class _RecordingSocket(ssl.SSLSocket):
    def do_handshake(self, block: bool = False) -> None:
        super().do_handshake(block)
        _record_peer(self)


class _RecordingObject(ssl.SSLObject):
    def do_handshake(self) -> None:
        super().do_handshake()
        _record_peer(self)


_ProvisionalContext.sslsocket_class = _RecordingSocket
_ProvisionalContext.sslobject_class = _RecordingObject
