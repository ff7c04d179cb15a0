"""TLS for the EST client: an httpx transport whose client authentication can sign on the card.

Two ways to do TLS, one verification policy:

* ``TlsliteTls``: tlslite-ng (pure Python) runs the handshake, so the client's CertificateVerify
  can be signed by a ``Signer`` (the SIM's bootstrap or operational key; card-tls.md). tlslite
  does not verify the server at all, so ``_VerifyingConnection`` checks the server's chain
  (explicit trust anchors, hostname/IP per RFC 6125) with ``cryptography.x509.verification`` as
  soon as the server's Certificate message is parsed, and aborts with ``bad_certificate``
  before the card is ever asked to sign: the card must never sign for an unauthenticated peer
  (est-notes.md, RFC 7030 §3.3.1).
* ``StdlibTls``: the stdlib ``ssl`` module, for server-only authentication and for file-based
  keys (devices whose bootstrap credential is a PEM file). OpenSSL checks the chain against the
  same explicit anchors (no system store) and the hostname/IP.

Both: TLS 1.2 minimum (RFC 8996, RFC 7030 §3.3.1), 1.3 allowed; under TLS 1.2 only (EC)DHE
suites, whose server signs its key exchange (checked before our CertificateVerify is made):
static RSA would let a server that merely copied the real certificate collect a card signature
(RFC 9325 §4.1). One connection carries the whole exchange (``max_connections=1``, keep-alive)
so the channel binding the CSR carries stays valid (RFC 7030 §3.5); the binding of the live
connection is tls-unique (RFC 5929) under TLS 1.2 and tls-exporter (RFC 9266) under TLS 1.3.
``EstTransport.pinned()`` forbids opening a new connection, so a CSR bound to one connection is
never sent on another. ``EstTransport(timeout_s=...)`` gives each request one deadline, end to
end, that stands still while the card signs (``Deadline``).

Errors leave this module typed: ``TlsVerificationError`` (server not authenticated, handshake
failed), ``AuthError`` (the server refused our client certificate with a certificate alert),
``EstConnectionError`` (unreachable, a close or reset without an alert, deadline), always
chained with ``from``; messages say what happened, never which class. Heavy imports (tlslite,
httpcore, cryptography's verifier) happen when a connection is first made.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import ssl
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, cast

import httpcore
import httpx
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from est_agent.errors import (
    AuthError,
    ConfigError,
    EstAgentError,
    EstConnectionError,
    EstError,
    TlsVerificationError,
)

if TYPE_CHECKING:
    from est_agent.backends.signer import Signer

__all__ = [
    "ChannelBinding",
    "ConnectionChangedError",
    "Deadline",
    "DeadlineExceeded",
    "EstTransport",
    "StdlibTls",
    "TlsliteTls",
    "verify_server_chain",
]

#: RFC 9266 §2: the tls-exporter channel binding: this label, an empty context, 32 bytes.
TLS_EXPORTER_LABEL = b"EXPORTER-Channel-Binding"
TLS_EXPORTER_LENGTH = 32

# TLS alerts (RFC 8446 §6.2) by which a server says it refused *our* certificate.
_CLIENT_CERT_ALERTS = frozenset({42, 43, 44, 45, 46, 48, 49, 116})  # ... certificate_required

# What the tlslite path offers (HandshakeSettings names). TLS 1.2: only key exchanges in which
# the server signs its ServerKeyExchange with the certificate's key (RFC 5246 §7.4.3, RFC 8422
# §5.4), a signature tlslite checks before our CertificateVerify is made; static RSA
# (TLS_RSA_*) proves nothing before the card signs and RFC 9325 §4.1 says not to negotiate it.
# TLS 1.3 always has the server's CertificateVerify checked first (RFC 8446 §4.4). Ciphers:
# AEAD (RFC 9325 §4.2), AES-CBC with SHA-2 HMACs (and encrypt-then-MAC, RFC 7366) only as a
# last resort; the order of the offer is set by ``offer_rank`` in ``_tlslite_classes``.
_TLS12_KEY_EXCHANGES = ("ecdhe_ecdsa", "ecdhe_rsa", "dhe_rsa")
_TLS_CIPHERS = ("aes128gcm", "aes256gcm", "chacha20-poly1305", "aes128", "aes256")
_TLS_MACS = ("aead", "sha256", "sha384")

#: The stdlib path's TLS 1.2 suites (OpenSSL cipher string): (EC)DHE with AEAD only (RFC 9325
#: §4.1, §4.2). TLS 1.3 suites are set apart by OpenSSL and stay its defaults.
STDLIB_TLS12_CIPHERS = (
    "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL:!eNULL:!PSK:!SRP:!DSS"
)


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


class ConnectionChangedError(EstConnectionError):
    """Raised when a request would need a new TLS connection while the transport is pinned
    (the CSR is bound to the old connection and must be signed again)."""


_DEADLINE_SLACK_S = 0.05  # a socket timeout set to the time left ends within this of it


class DeadlineExceeded(TimeoutError):
    """Raised inside the transport when a request's deadline has run out (it leaves the
    transport as ``EstConnectionError``)."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"request not complete in {seconds:g} s")
        self.seconds = seconds


class Deadline:
    """The time budget of one request: ``remaining()`` seconds, frozen while ``paused()``.

    One deadline covers connect, handshake, sending and the whole response body; the time the
    card spends signing is excluded (``paused()``), as the card has its own APDU timeouts.
    ``clock`` is a monotonic clock in seconds, injectable for tests.
    """

    def __init__(self, seconds: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        if not seconds > 0:
            raise ValueError(f"a deadline needs a positive number of seconds, not {seconds}")
        self.seconds = seconds
        self._clock = clock
        self._end = clock() + seconds
        self._paused_at: float | None = None
        self._pauses = 0

    def remaining(self) -> float:
        now = self._paused_at if self._paused_at is not None else self._clock()
        return max(0.0, self._end - now)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """The clock stops inside (nested pauses count once)."""
        if self._pauses == 0:
            self._paused_at = self._clock()
        self._pauses += 1
        try:
            yield
        finally:
            self._pauses -= 1
            if self._pauses == 0 and self._paused_at is not None:
                self._end += self._clock() - self._paused_at
                self._paused_at = None

    def clamp(self, timeout: float | None) -> float:
        """The timeout for one socket operation: ``min(timeout, remaining())``.

        Raises ``DeadlineExceeded`` when nothing is left (a zero socket timeout would mean
        non-blocking, not "expired").
        """
        left = self.remaining()
        if left <= 0.0:
            raise DeadlineExceeded(self.seconds)
        return left if timeout is None else min(timeout, left)


def _server_identity(host: str) -> Any:
    # The verifier's subject types are x509's GeneralName classes.
    try:
        return x509.IPAddress(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        return x509.DNSName(host)


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
    when it has an EKU, and chain to one of ``anchors``. Raises ``TlsVerificationError``.
    """
    from cryptography.x509 import verification

    if not chain:
        raise TlsVerificationError("the server sent no certificate")
    if not anchors:
        raise TlsVerificationError("no trust anchor configured for the EST server")
    try:
        builder = verification.PolicyBuilder().store(verification.Store(list(anchors)))
        if now is not None:
            builder = builder.time(now)
        verifier = builder.build_server_verifier(_server_identity(host))
        verifier.verify(chain[0], list(chain[1:]))
    except verification.VerificationError as exc:
        raise TlsVerificationError(f"EST server certificate for {host!r} refused: {exc}") from exc
    except ValueError as exc:  # e.g. a host name that is not a valid DNS name
        raise TlsVerificationError(f"cannot verify the EST server as {host!r}: {exc}") from exc


# --------------------------------------------------------------------------------------------
# TLS configurations
# --------------------------------------------------------------------------------------------


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
        if self.max_version not in ("1.2", "1.3"):
            raise EstError(f"max TLS version must be 1.2 or 1.3, not {self.max_version}")
        if self.signer is not None and self.client_chain[0].public_key() != (
            self.signer.public_key()
        ):
            raise EstError("the client certificate does not belong to the signer's key")


@dataclass(frozen=True)
class StdlibTls:
    """Handshake with the stdlib ``ssl`` module: no client certificate, or a file key.

    Channel binding: tls-unique under TLS 1.2; none under TLS 1.3 (the stdlib has no
    exporter API and its "tls-unique" there is meaningless; est-notes.md).
    """

    trust_anchors: tuple[x509.Certificate, ...]
    cert_file: str | None = None
    key_file: str | None = None
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
        if self.cert_file is not None:
            try:
                ctx.load_cert_chain(self.cert_file, self.key_file)
            except (OSError, ssl.SSLError) as exc:
                raise EstError(f"cannot load client credential {self.cert_file}: {exc}") from exc
        return ctx


# --------------------------------------------------------------------------------------------
# tlslite-ng: card key, verifying connection, stream
# --------------------------------------------------------------------------------------------


def _import_tlslite_core() -> None:
    """Load tlslite-ng's package object without running its ``__init__``.

    tlslite-ng 0.8.2's ``__init__`` star-imports ``tlslite.api``, which pulls in every
    integration helper (asyncio, asyncore, xmlrpc, smtplib, imaplib, poplib, httplib): ~33 ms
    and ~8 MiB of a process that only needs the TLS connection classes (measured with
    ``-X importtime`` on Python 3.11), plus a DeprecationWarning for asyncore. The submodules
    used here import each other by full or relative name, never through the package's
    re-exports, so an unexecuted package module is enough.
    """
    import importlib.util
    import sys

    if "tlslite" in sys.modules:
        return
    spec = importlib.util.find_spec("tlslite")
    if spec is None or spec.submodule_search_locations is None:
        raise EstError("tlslite-ng is not installed (needed for TLS with a card key)")
    sys.modules["tlslite"] = importlib.util.module_from_spec(spec)


def _install_fast_aes_gcm() -> None:
    """Let tlslite's AES-GCM record protection run in OpenSSL (via ``cryptography``).

    Without M2Crypto or pycryptodome, tlslite-ng encrypts records with its pure-Python AES,
    whose constructor also inspects the caller's source on every call (a deprecation shim for
    an old class name): ~35 ms of a ~50 ms handshake. ``cipherfactory.createAESGCM`` calls
    ``python_aesgcm.new(key)`` at run time; this replaces that factory with an object of the
    same interface (``seal``/``open``; ``open`` returns None on a bad tag, as tlslite expects).
    """
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from tlslite.utils import python_aesgcm  # type: ignore[import-untyped]

    class OpenSslAesGcm:
        isBlockCipher = False
        isAEAD = True
        nonceLength = 12
        tagLength = 16
        implementation = "openssl"

        def __init__(self, key: bytearray) -> None:
            self.key = key
            self.name = "aes128gcm" if len(key) == 16 else "aes256gcm"
            self._aead = AESGCM(bytes(key))

        def seal(self, nonce: bytearray, plaintext: bytearray, data: bytearray) -> bytearray:
            return bytearray(self._aead.encrypt(bytes(nonce), bytes(plaintext), bytes(data)))

        def open(self, nonce: bytearray, ciphertext: bytearray, data: bytearray) -> Any:
            try:
                return bytearray(self._aead.decrypt(bytes(nonce), bytes(ciphertext), bytes(data)))
            except InvalidTag:
                return None

    python_aesgcm.new = OpenSslAesGcm


def _tlslite_classes() -> tuple[type[Any], type[Any]]:
    """Build the tlslite subclasses on first use (tlslite costs ~40 ms to import)."""
    _import_tlslite_core()
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
    from tlslite.constants import (  # type: ignore[import-untyped]
        AlertDescription,
        CipherSuite,
        ContentType,
    )
    from tlslite.errors import (  # type: ignore[import-untyped]
        TLSDecryptionFailed,
        TLSIllegalParameterException,
        TLSInternalError,
    )
    from tlslite.messages import ClientHello, Finished  # type: ignore[import-untyped]
    from tlslite.tlsconnection import TLSConnection  # type: ignore[import-untyped]
    from tlslite.utils.ecdsakey import ECDSAKey  # type: ignore[import-untyped]

    _install_fast_aes_gcm()

    # TLS 1.2 suites whose server signs the key exchange with its certificate's key.
    signed_key_exchange = frozenset(
        CipherSuite.ecdheEcdsaSuites + CipherSuite.ecdheCertSuites + CipherSuite.dheCertSuites
    )
    fast_aead = frozenset(CipherSuite.aes128GcmSuites + CipherSuite.aes256GcmSuites)

    def offer_rank(suite: int) -> tuple[int, int, int]:
        """Sort key of the ClientHello's suites: TLS 1.3 first, then AEAD before CBC (RFC 9325
        §4.2), AES-GCM (OpenSSL-backed here) before ChaCha20 (pure Python), ECDHE before DHE;
        tlslite's own order (AES-256 before AES-128) is kept within each rank."""
        if suite not in CipherSuite.ietfNames or suite in (
            CipherSuite.TLS_EMPTY_RENEGOTIATION_INFO_SCSV,
            CipherSuite.TLS_FALLBACK_SCSV,
        ):
            return (-1, 0, 0)  # signalling values (RFC 5746 §3.3): first, as tlslite has it
        tls13 = 0 if suite in CipherSuite.tls13Suites else 1
        cipher = 0 if suite in fast_aead else 1 if suite in CipherSuite.aeadSuites else 2
        exchange = 0 if suite in CipherSuite.ecdhAllSuites else 1
        return (tls13, cipher, exchange)

    class _Curve:
        baselen = 32  # P-256: tlslite truncates the TLS 1.2 digest to this many bytes

    class _PrivateKeyShim:
        curve = _Curve()

    class CardEcdsaKey(ECDSAKey):  # type: ignore[misc]
        """A tlslite ECDSA private key whose signatures come from a ``Signer``."""

        key_type = "ecdsa"

        def __init__(  # no super().__init__: it raises
            self,
            signer: Signer,
            card_time: Callable[[], contextlib.AbstractContextManager[None]],
        ) -> None:
            self._signer = signer
            self._card_time = card_time  # the request deadline stands still while it signs
            self.used = False  # whether CertificateVerify was signed in this handshake
            self._public = signer.public_key()
            self.private_key = _PrivateKeyShim()
            self.public_key = self._public

        def __len__(self) -> int:
            return 256

        def hasPrivateKey(self) -> bool:
            return True

        def _sign(self, data: bytearray, hash_alg: str) -> bytearray:
            # The card signs SHA-256 digests only (IoT SAFE, P-256): sha256 is first in the
            # preference list and TLS 1.3 binds P-256 to SHA-256 (RFC 8446 §4.2.3).
            if hash_alg.lower() != "sha256" or len(data) != 32:
                raise TLSInternalError(f"the card key cannot sign with {hash_alg}")
            self.used = True
            with self._card_time():
                return bytearray(self._signer.sign_digest(bytes(data)))

        def _verify(self, signature: bytearray, hash_bytes: bytearray) -> bool:
            # tlslite checks its own signature right after making it.
            try:
                self._public.verify(
                    bytes(signature), bytes(hash_bytes), ec.ECDSA(Prehashed(hashes.SHA256()))
                )
            except InvalidSignature:
                return False
            return True

    class VerifyingConnection(TLSConnection):  # type: ignore[misc]
        """A client TLSConnection that verifies the server before anything is signed."""

        def __init__(self, sock: Any, anchors: Sequence[x509.Certificate], host: str) -> None:
            super().__init__(sock)
            self.est_anchors = anchors
            self.est_host = host
            self.est_verification_error: TlsVerificationError | None = None
            self.est_first_finished: bytes | None = None

        def _clientKeyExchange(
            self,
            settings: Any,
            cipherSuite: int,
            *rest: Any,
        ) -> Iterator[Any]:
            # TLS 1.2, after ServerHello: a server that chose a suite without a signed key
            # exchange would get our CertificateVerify before proving it holds its key. Never
            # offered (_TLS12_KEY_EXCHANGES); refused here too, before anything is sent.
            if cipherSuite not in signed_key_exchange:
                name = CipherSuite.ietfNames.get(cipherSuite, f"0x{cipherSuite:04x}")
                self.est_verification_error = TlsVerificationError(
                    f"the server chose {name}, a key exchange in which it does not prove it "
                    "holds its certificate's key before the client signs (RFC 9325 §4.1)"
                )
                yield from self._sendError(AlertDescription.handshake_failure, name)
            yield from super()._clientKeyExchange(settings, cipherSuite, *rest)

        def _clientGetKeyFromChain(
            self, certificate: Any, settings: Any, tack_ext: Any = None
        ) -> Iterator[Any]:
            # Called for the server's Certificate in TLS 1.2 (before our Certificate and
            # CertificateVerify) and TLS 1.3 (before its CertificateVerify is even checked):
            # the one point where refusing costs no card signature.
            try:
                chain = [
                    x509.load_der_x509_certificate(bytes(c.bytes))
                    for c in (certificate.cert_chain.x509List if certificate.cert_chain else [])
                ]
                verify_server_chain(chain, self.est_anchors, self.est_host)
            except (TlsVerificationError, ValueError) as exc:
                self.est_verification_error = (
                    exc
                    if isinstance(exc, TlsVerificationError)
                    else TlsVerificationError(f"unparseable server certificate: {exc}")
                )
                yield from self._sendError(AlertDescription.bad_certificate, str(exc))
            yield from super()._clientGetKeyFromChain(certificate, settings, tack_ext)

        def _clientTLS13Handshake(self, *args: Any) -> Iterator[Any]:
            # tlslite 0.8.2 raises on a bad server CertificateVerify (TLS 1.3) without the
            # alert RFC 8446 §4.4.3 requires ("MUST terminate the handshake with a
            # decrypt_error alert"): send it, and so leave as a TLSLocalAlert like TLS 1.2.
            try:
                yield from super()._clientTLS13Handshake(*args)
            except TLSDecryptionFailed as exc:
                yield from self._sendError(AlertDescription.decrypt_error, str(exc))
            except TLSIllegalParameterException as exc:
                yield from self._sendError(AlertDescription.illegal_parameter, str(exc))

        def _sendMsg(
            self, msg: Any, randomizeFirstBlock: bool = True, update_hashes: bool = True
        ) -> Iterator[Any]:
            if isinstance(msg, ClientHello):
                # Our preference order (no PSK binder covers the list: we never resume).
                msg.cipher_suites.sort(key=offer_rank)
            # RFC 5929 §3.1: tls-unique is the first Finished message of the connection; for
            # a full handshake (we never resume) that is the client's own.
            if (
                self.est_first_finished is None
                and isinstance(msg, Finished)
                and msg.contentType == ContentType.handshake
            ):
                self.est_first_finished = bytes(msg.verify_data)
            yield from super()._sendMsg(msg, randomizeFirstBlock, update_hashes)

    return CardEcdsaKey, VerifyingConnection


_CLASSES: tuple[type[Any], type[Any]] | None = None


def _classes() -> tuple[type[Any], type[Any]]:
    global _CLASSES  # noqa: PLW0603 - a lazily built, immutable cache
    if _CLASSES is None:
        _CLASSES = _tlslite_classes()
    return _CLASSES


class TlsliteSslObject:
    """What ``get_extra_info("ssl_object")`` returns on the tlslite path (ssl.SSLObject-like)."""

    def __init__(self, connection: Any) -> None:
        self._connection = connection

    def selected_alpn_protocol(self) -> str | None:
        return None  # HTTP/1.1 only; no ALPN offered

    def version(self) -> str:
        return "TLSv1.3" if tuple(self._connection.version) >= (3, 4) else "TLSv1.2"

    def getpeercert(self, binary_form: bool = False) -> Any:
        chain = self._connection.session.serverCertChain
        if not binary_form:
            return {}  # the dict form is an OpenSSL-ism; nothing here needs it
        return bytes(chain.x509List[0].bytes) if chain else None

    def get_channel_binding(self, cb_type: str = "tls-unique") -> bytes | None:
        if cb_type != "tls-unique":
            raise ValueError(f"{cb_type} channel binding type not implemented")
        if self.version() != "TLSv1.2":
            return None  # RFC 9266 §1: tls-unique is not defined for TLS 1.3
        first: bytes | None = self._connection.est_first_finished
        return first

    def export_keying_material(self, label: bytes, length: int) -> bytes:
        # RFC 8446 §7.5 exporter with an empty context (what RFC 9266 asks for).
        return bytes(self._connection.keyingMaterialExporter(bytearray(label), length))


def channel_binding_of(ssl_object: Any) -> ChannelBinding | None:
    """tls-unique (TLS 1.2) or tls-exporter (TLS 1.3) of a live connection, when available."""
    if ssl_object is None:
        return None
    version = ssl_object.version()
    if version == "TLSv1.2":
        value = ssl_object.get_channel_binding("tls-unique")
        return ChannelBinding("tls-unique", bytes(value), version) if value else None
    if version == "TLSv1.3" and isinstance(ssl_object, TlsliteSslObject):
        value = ssl_object.export_keying_material(TLS_EXPORTER_LABEL, TLS_EXPORTER_LENGTH)
        return ChannelBinding("tls-exporter", value, version)
    return None  # stdlib ssl under TLS 1.3: no exporter API


# --------------------------------------------------------------------------------------------
# What went wrong, in words
# --------------------------------------------------------------------------------------------

# Alert names by which a server refuses *our* certificate (the numbers in _CLIENT_CERT_ALERTS),
# as both tlslite and OpenSSL ("TLSV1_ALERT_UNKNOWN_CA" -> "unknown_ca") name them.
_CLIENT_CERT_ALERT_NAMES = frozenset(
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
_CLOSE_ALERTS = frozenset({0, 90})  # close_notify, user_canceled: a close, not a verdict


def _alert_name(description: int) -> str:
    from tlslite.constants import AlertDescription

    name: str = AlertDescription.toStr(description)
    return name


def _what_happened(exc: BaseException) -> str:
    """A short description of a socket or TLS failure (never a class name)."""
    if "tlslite" in sys.modules:
        from tlslite.errors import TLSAbruptCloseError, TLSRemoteAlert

        if isinstance(exc, TLSAbruptCloseError):
            return "the server closed the connection without a TLS alert"
        if isinstance(exc, TLSRemoteAlert):
            return f"the server sent the TLS alert {_alert_name(exc.description)}"
    if isinstance(exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError)):
        return "the server closed the connection without a TLS alert"
    if isinstance(exc, ssl.SSLError):
        return f"TLS failure: {_openssl_alert(exc) or exc.reason or exc.strerror or 'unknown'}"
    if isinstance(exc, ConnectionResetError):
        return "the server reset the connection"
    if isinstance(exc, (BrokenPipeError, ConnectionAbortedError)):
        return "the server closed the connection"
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, OSError):
        return exc.strerror or str(exc) or "socket failure"
    text = str(exc)
    # tlslite's message-less errors print as "ClassName()"
    return "TLS protocol failure" if not text or text.endswith("()") else text


def _openssl_alert(exc: ssl.SSLError) -> str | None:
    """The alert an OpenSSL error reports having received ("SSLV3_ALERT_BAD_CERTIFICATE")."""
    reason = exc.reason or ""
    return reason.split("ALERT_", 1)[1].lower() if "ALERT_" in reason else None


def _is_bare_close(exc: BaseException) -> bool:
    """The peer closed or reset the TCP connection without a TLS alert."""
    if isinstance(exc, (ConnectionError, ssl.SSLEOFError, ssl.SSLZeroReturnError)):
        return True
    if "tlslite" in sys.modules:
        from tlslite.errors import TLSAbruptCloseError, TLSRemoteAlert

        if isinstance(exc, TLSAbruptCloseError):
            return True
        return isinstance(exc, TLSRemoteAlert) and exc.description in _CLOSE_ALERTS
    return False


def _tlslite_handshake_failure(
    host: str, exc: BaseException, alert: int | None, *, signed: bool
) -> Exception:
    """What a failed tlslite handshake means (``alert``: the alert the server sent, if any).

    Only a certificate alert (RFC 8446 §6.2: bad_certificate ... certificate_required) says
    the server refused our certificate: permanent, a retry would cost a card signature for the
    same answer. A close or reset without an alert, even right after our CertificateVerify,
    is the server shedding load or the path failing: transient (EstConnectionError).
    """
    if alert in _CLIENT_CERT_ALERTS:
        return AuthError(
            f"{host} refused the TLS client certificate (TLS alert {_alert_name(alert)})"
        )
    if alert is not None and alert not in _CLOSE_ALERTS:
        return TlsVerificationError(
            f"TLS handshake with {host} failed: the server sent the TLS alert {_alert_name(alert)}"
        )
    what = _what_happened(exc)
    if _is_bare_close(exc):
        if signed:
            what += " after our certificate was sent (transient: a refusal comes with an alert)"
        return httpcore.ConnectError(f"TLS handshake with {host}: {what}")
    if isinstance(exc, OSError):
        return httpcore.ConnectError(f"TLS handshake with {host}: {what}")
    return TlsVerificationError(f"TLS handshake with {host} failed: {what}")


# --------------------------------------------------------------------------------------------
# tlslite-ng streams
# --------------------------------------------------------------------------------------------


class _BoundedSocket:
    """The socket tlslite reads and writes: every recv/send waits at most ``timeout`` (the
    current operation's, from httpcore) and never past the request's deadline.

    A write the peer cuts short (EPIPE, ECONNRESET) is noted in ``write_failure`` and
    reported as done: a server refusing our certificate sends its alert and closes while we
    are still writing (OpenSSL judges our Certificate as it arrives; under TLS 1.3 the alert
    is encrypted), and the kernel keeps what it received readable after the reset. So the
    next read gets the alert, and the verdict, instead of it dying with the write.
    """

    def __init__(self, sock: socket.socket, transport: EstTransport) -> None:
        self.sock = sock
        self.timeout: float | None = None
        self.write_failure: ConnectionError | None = None
        self._transport = transport

    def _arm(self) -> None:
        self.sock.settimeout(self._transport._op_timeout(self.timeout))

    def recv(self, size: int) -> bytes:
        self._arm()
        return self.sock.recv(size)

    def send(self, data: bytes) -> int:
        if self.write_failure is None:
            self._arm()
            try:
                return self.sock.send(data)
            except ConnectionError as exc:
                self.write_failure = exc
        return len(data)

    def sendall(self, data: bytes) -> None:
        if self.write_failure is None:
            self._arm()
            try:
                self.sock.sendall(data)
            except ConnectionError as exc:
                self.write_failure = exc

    def close(self) -> None:
        self.sock.close()

    def shutdown(self, how: int) -> None:
        self.sock.shutdown(how)

    def fileno(self) -> int:
        return self.sock.fileno()

    def getsockname(self) -> Any:
        return self.sock.getsockname()

    def getpeername(self) -> Any:
        return self.sock.getpeername()

    def settimeout(self, value: float | None) -> None:
        self.timeout = value

    def gettimeout(self) -> float | None:
        return self.timeout

    def setsockopt(self, level: int, option: int, value: int) -> None:
        self.sock.setsockopt(level, option, value)


class _TcpStream(httpcore.NetworkStream):
    """A TCP socket; ``start_tls`` runs tlslite (tlslite path) and returns ``_TlsliteStream``."""

    def __init__(self, sock: socket.socket, config: TlsliteTls, transport: EstTransport) -> None:
        self._sock = sock
        self._config = config
        self._transport = transport

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        raise httpcore.ReadError("plain-text HTTP is refused")  # https only

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        raise httpcore.WriteError("plain-text HTTP is refused")

    def close(self) -> None:
        self._sock.close()

    def get_extra_info(self, info: str) -> Any:
        return self._sock if info == "socket" else None

    def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        card_key_class, connection_class = _classes()  # first: imports tlslite quietly
        from tlslite.errors import BaseTLSException, TLSLocalAlert, TLSRemoteAlert
        from tlslite.handshakesettings import HandshakeSettings  # type: ignore[import-untyped]
        from tlslite.x509 import X509  # type: ignore[import-untyped]
        from tlslite.x509certchain import X509CertChain  # type: ignore[import-untyped]

        host = server_hostname or ""
        config = self._config
        transport = self._transport
        settings = HandshakeSettings()
        settings.minVersion = (3, 3)  # RFC 8996: nothing below TLS 1.2
        settings.maxVersion = (3, 3) if config.max_version == "1.2" else (3, 4)
        # tlslite 0.8.2 sends a compressed client Certificate under TLS 1.3 whenever it can,
        # which OpenSSL 3.0 servers reject (card-tls.md).
        settings.certificate_compression_send = []
        # The card signs SHA-256 digests: sha256 first, so TLS 1.2 CertificateVerify uses it.
        settings.ecdsaSigHashes = ["sha256"] + [h for h in settings.ecdsaSigHashes if h != "sha256"]
        settings.keyExchangeNames = list(_TLS12_KEY_EXCHANGES)
        settings.cipherNames = list(_TLS_CIPHERS)
        settings.macNames = list(_TLS_MACS)
        chain = key = None
        if config.signer is not None:
            certs = []
            for cert in config.client_chain:
                parsed = X509()
                parsed.parseBinary(bytearray(cert.public_bytes(serialization.Encoding.DER)))
                certs.append(parsed)
            chain = X509CertChain(certs)
            key = card_key_class(config.signer, transport._card_time)
        bounded = _BoundedSocket(self._sock, transport)
        bounded.timeout = timeout
        connection = connection_class(bounded, config.trust_anchors, host)
        try:
            server_name = None if _is_ip(host) else host  # RFC 6066 §3: no IP literals in SNI
            connection.handshakeClientCert(
                certChain=chain, privateKey=key, settings=settings, serverName=server_name
            )
        except TLSLocalAlert as exc:
            self._sock.close()
            if connection.est_verification_error is not None:
                raise connection.est_verification_error from exc
            raise TlsVerificationError(f"TLS handshake with {host} aborted ({exc})") from exc
        except TimeoutError as exc:
            self._sock.close()
            raise httpcore.ConnectTimeout(
                transport._timeout_message(f"TLS handshake with {host}", timeout)
            ) from exc
        except (BaseTLSException, OSError) as exc:
            alert = exc.description if isinstance(exc, TLSRemoteAlert) else None
            self._sock.close()
            signed = key is not None and key.used
            raise _tlslite_handshake_failure(host, exc, alert, signed=signed) from exc
        stream = _TlsliteStream(
            self._sock, bounded, connection, transport, client_auth=chain is not None
        )
        transport._note_stream(stream, channel_binding_of(stream.ssl_object))
        return stream


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


class _TlsliteStream(httpcore.NetworkStream):
    def __init__(
        self,
        sock: socket.socket,
        bounded: _BoundedSocket,
        connection: Any,
        transport: EstTransport,
        *,
        client_auth: bool,
    ) -> None:
        self._sock = sock
        self._bounded = bounded
        self._connection = connection
        self._transport = transport
        self.ssl_object = TlsliteSslObject(connection)
        self.closed = False
        # TLS 1.3 (RFC 8446 §4.4.2): the server judges our Certificate only after the client
        # has finished the handshake, so its verdict shows up on the first write or read.
        self._judged_late = client_auth and self.ssl_object.version() == "TLSv1.3"
        self._answered = False

    def _failure(self, exc: BaseException, *, reading: bool) -> Exception:
        """The exception a failed read or write leaves with.

        A certificate alert is a refusal (AuthError, permanent); under TLS 1.3 before any
        answer, another fatal alert ends the handshake (TlsVerificationError); a close or
        reset without an alert is a connection failure httpcore reports (transient).
        """
        from tlslite.errors import TLSRemoteAlert

        alert = exc.description if isinstance(exc, TLSRemoteAlert) else None
        if alert in _CLIENT_CERT_ALERTS:
            return AuthError(
                f"the server refused the TLS client certificate (TLS alert {_alert_name(alert)})"
            )
        early = self._judged_late and not self._answered
        if alert is not None and alert not in _CLOSE_ALERTS and early:
            return TlsVerificationError(
                f"the server ended the TLS 1.3 handshake with the TLS alert {_alert_name(alert)}"
            )
        what = _what_happened(exc)
        if early and _is_bare_close(exc):
            what += " right after the handshake (transient: a refusal comes with an alert)"
        return httpcore.ReadError(what) if reading else httpcore.WriteError(what)

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        from tlslite.errors import BaseTLSException, TLSAbruptCloseError

        self._bounded.timeout = timeout
        try:
            data = bytes(self._connection.recv(max_bytes))
        except TLSAbruptCloseError as exc:
            cut = self._bounded.write_failure
            if cut is not None:
                raise httpcore.ReadError(
                    f"the connection broke while sending: {_what_happened(cut)}"
                ) from exc
            return b""  # TCP closed without close_notify: httpcore judges the truncation
        except TimeoutError as exc:
            raise httpcore.ReadTimeout(
                self._transport._timeout_message("receiving the response", timeout)
            ) from exc
        except (OSError, BaseTLSException) as exc:
            raise self._failure(exc, reading=True) from exc
        self._answered = self._answered or bool(data)
        return data

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        from tlslite.errors import BaseTLSException

        if not buffer:
            # h11 hands over b"" for an empty body and its end; tlslite would send each as a
            # zero-length application_data record (RFC 8446 §5.1 lets only application data
            # be empty, never required). A server that closes after answering then sees
            # unread data, resets, and our next write or read fails: send nothing.
            return
        self._bounded.timeout = timeout
        try:
            self._connection.sendall(buffer)
        except TimeoutError as exc:
            raise httpcore.WriteTimeout(
                self._transport._timeout_message("sending the request", timeout)
            ) from exc
        except (OSError, BaseTLSException) as exc:
            raise self._failure(exc, reading=False) from exc

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        from tlslite.errors import BaseTLSException

        self._bounded.timeout = 1.0
        with contextlib.suppress(OSError, BaseTLSException):  # tlslite closes on fatal errors
            self._connection.close()  # close_notify (RFC 8446 §6.1)
        self._sock.close()

    def get_extra_info(self, info: str) -> Any:
        if info == "ssl_object":
            return self.ssl_object
        if info == "socket":
            return self._sock
        if info == "is_readable":
            # An idle keep-alive connection that is readable has been closed by the server.
            return self.closed or _socket_readable(self._sock)
        if info == "client_addr":
            return self._sock.getsockname()
        if info == "server_addr":
            return self._sock.getpeername()
        return None


def _socket_readable(sock: socket.socket) -> bool:
    import select

    if sock.fileno() < 0:
        return True
    readable, _, _ = select.select([sock], [], [], 0)
    return bool(readable)


# --------------------------------------------------------------------------------------------
# stdlib ssl stream
# --------------------------------------------------------------------------------------------

_WRITE_CHUNK = 16384  # one TLS record's worth: each send gets its own (clamped) timeout


def _stdlib_failure(exc: httpcore.NetworkError, *, reading: bool) -> Exception:
    """A stdlib read/write failure: a certificate alert is a refusal, the rest in words."""
    cause = exc.__cause__ or exc.__context__
    if isinstance(cause, ssl.SSLError) and _openssl_alert(cause) in _CLIENT_CERT_ALERT_NAMES:
        return AuthError(
            f"the server refused the TLS client certificate (TLS alert {_openssl_alert(cause)})"
        )
    what = _what_happened(cause) if cause is not None else str(exc) or "connection failed"
    return httpcore.ReadError(what) if reading else httpcore.WriteError(what)


class _StdlibStream(httpcore.NetworkStream):
    """httpcore's own sync stream, bounded by the request deadline; after ``start_tls`` the
    TLS stream is wrapped again and its channel binding noted."""

    def __init__(self, inner: httpcore.NetworkStream, transport: EstTransport) -> None:
        self._inner = inner
        self._transport = transport

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        try:
            return self._inner.read(max_bytes, self._transport._op_timeout(timeout))
        except (TimeoutError, httpcore.ReadTimeout) as exc:
            raise httpcore.ReadTimeout(
                self._transport._timeout_message("receiving the response", timeout)
            ) from exc
        except httpcore.ReadError as exc:
            raise _stdlib_failure(exc, reading=True) from exc

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        for start in range(0, len(buffer), _WRITE_CHUNK):
            try:
                self._inner.write(
                    buffer[start : start + _WRITE_CHUNK], self._transport._op_timeout(timeout)
                )
            except (TimeoutError, httpcore.WriteTimeout) as exc:
                raise httpcore.WriteTimeout(
                    self._transport._timeout_message("sending the request", timeout)
                ) from exc
            except httpcore.WriteError as exc:
                raise _stdlib_failure(exc, reading=False) from exc

    def close(self) -> None:
        self._inner.close()

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)

    def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        host = server_hostname
        transport = self._transport
        try:
            # CPython's SSLSocket.do_handshake applies the socket timeout to the whole
            # handshake (a deadline, not per read): clamped, it ends with the request's.
            tls = self._inner.start_tls(
                ssl_context, server_hostname, transport._op_timeout(timeout)
            )
        except (TimeoutError, httpcore.ConnectTimeout) as exc:
            raise httpcore.ConnectTimeout(
                transport._timeout_message(f"TLS handshake with {host}", timeout)
            ) from exc
        except httpcore.ConnectError as exc:
            cause = exc.__context__ or exc.__cause__
            if isinstance(cause, ssl.SSLCertVerificationError):
                raise TlsVerificationError(
                    f"EST server certificate for {host!r} refused: {cause.verify_message}"
                ) from cause
            if isinstance(cause, ssl.SSLError) and not _is_bare_close(cause):
                alert = _openssl_alert(cause)
                if alert in _CLIENT_CERT_ALERT_NAMES:
                    raise AuthError(
                        f"{host} refused the TLS client certificate (TLS alert {alert})"
                    ) from cause
                raise TlsVerificationError(
                    f"TLS handshake with {host} failed: "
                    + (f"the server sent the TLS alert {alert}" if alert else str(cause.reason))
                ) from cause
            what = _what_happened(cause) if cause is not None else str(exc)
            raise httpcore.ConnectError(f"TLS handshake with {host}: {what}") from exc
        stream = _StdlibStream(tls, transport)
        transport._note_stream(stream, channel_binding_of(tls.get_extra_info("ssl_object")))
        return stream


class _Backend(httpcore.NetworkBackend):
    def __init__(self, transport: EstTransport) -> None:
        self._transport = transport
        self._sync = httpcore.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        transport = self._transport
        if transport.is_pinned:
            raise ConnectionChangedError(
                "the TLS connection closed between requests; the CSR is bound to it and must "
                "be signed again on a new connection"
            )
        transport.connections_opened += 1
        what = f"connect to {host}:{port}"
        try:
            budget = transport._op_timeout(timeout)
            if isinstance(transport.tls, StdlibTls):
                inner = self._sync.connect_tcp(host, port, budget, local_address, socket_options)
                return _StdlibStream(inner, transport)
            sock = socket.create_connection((host, port), budget)
        except (TimeoutError, httpcore.ConnectTimeout) as exc:
            raise httpcore.ConnectTimeout(transport._timeout_message(what, timeout)) from exc
        except httpcore.ConnectError as exc:
            raise httpcore.ConnectError(f"{what}: {exc}") from exc
        except OSError as exc:
            raise httpcore.ConnectError(f"{what}: {_what_happened(exc)}") from exc
        # Small request/response exchanges: no Nagle delay (card-tls.md).
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return _TcpStream(sock, transport.tls, transport)

    def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        raise httpcore.ConnectError("unix sockets are not supported")

    def sleep(self, seconds: float) -> None:
        self._sync.sleep(seconds)


# --------------------------------------------------------------------------------------------
# The httpx transport
# --------------------------------------------------------------------------------------------

# httpcore's connection-level errors, with the phase each names (the messages raised in this
# module already say what failed; httpcore's own ones get the phase in front).
_CONNECTION_ERRORS: dict[type[Exception], str] = {
    httpcore.ConnectError: "",
    httpcore.ConnectTimeout: "",
    httpcore.ReadError: "receiving the response",
    httpcore.ReadTimeout: "",
    httpcore.WriteError: "sending the request",
    httpcore.WriteTimeout: "",
    httpcore.PoolTimeout: "waiting for the connection",
    httpcore.RemoteProtocolError: "the HTTP exchange broke off",  # e.g. a body cut short
}
_STALE_CONNECTION_ERRORS = (httpcore.ReadError, httpcore.WriteError, httpcore.RemoteProtocolError)
_IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS"})


@contextlib.contextmanager
def _mapped(url: str) -> Iterator[None]:
    """httpcore's exceptions as est_agent's (httpx's ``map_httpcore_exceptions`` idea)."""
    try:
        yield
    except EstAgentError:
        raise
    except tuple(_CONNECTION_ERRORS) as exc:
        phase = next(p for cls, p in _CONNECTION_ERRORS.items() if isinstance(exc, cls))
        text = str(exc) or "timed out"
        raise EstConnectionError(f"{url}: {phase}: {text}" if phase else f"{url}: {text}") from exc
    except httpcore.UnsupportedProtocol as exc:
        raise EstError(f"{url}: {exc}") from exc
    except httpcore.ProtocolError as exc:
        raise EstError(f"{url}: HTTP protocol error: {exc}") from exc


class _ResponseStream(httpx.SyncByteStream):
    """The response body; the request's deadline ends when it is exhausted or closed."""

    def __init__(self, inner: Iterable[bytes], url: str, done: Callable[[], None]) -> None:
        self._inner = inner
        self._url = url
        self._done = done

    def __iter__(self) -> Iterator[bytes]:
        try:
            with _mapped(self._url):
                yield from self._inner
        finally:
            self._done()

    def close(self) -> None:
        close = getattr(self._inner, "close", None)
        try:
            if close is not None:
                with _mapped(self._url):
                    close()
        finally:
            self._done()


class _UnusedSslContext:
    """What httpcore gets as ``ssl_context`` on the tlslite path: it only calls
    ``set_alpn_protocols`` on it before handing it to ``_TcpStream.start_tls``, which ignores
    it (tlslite offers no ALPN; HTTP/1.1 only)."""

    def set_alpn_protocols(self, protocols: Iterable[str]) -> None:
        pass


class EstTransport(httpx.BaseTransport):
    """httpx transport over one keep-alive TLS connection (tlslite-ng or stdlib ``ssl``).

    ``connections_opened`` counts TCP connections; ``channel_binding`` is that of the most
    recently established TLS connection; ``pinned()`` forbids new connections.

    ``timeout_s``: each request, end to end (connect, handshake, sending, and reading the
    whole response body: the deadline ends when the response stream is exhausted or closed),
    must finish within this many seconds; time spent in the card's signer does not count.
    Every socket operation waits at most min(its own timeout, the time left). ``clock`` is the
    monotonic clock of those deadlines (tests inject one).
    """

    def __init__(
        self,
        tls: TlsliteTls | StdlibTls,
        *,
        timeout_s: float | None = None,
        keepalive_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if timeout_s is not None and not timeout_s > 0:
            raise ConfigError(f"the EST request timeout must be positive, not {timeout_s}")
        self.tls = tls
        self.timeout_s = timeout_s
        self.connections_opened = 0
        self.channel_binding: ChannelBinding | None = None
        self.is_pinned = False
        self._clock = clock
        self._deadline: Deadline | None = None
        self._stream: httpcore.NetworkStream | None = None
        # The stdlib path's context does the verification; the tlslite path ignores the
        # context httpcore hands to start_tls, so give it a stand-in (an empty SSLContext would
        # load no CA bundle, but still costs ~1 ms and ~0.4 MiB of OpenSSL state).
        ssl_context = (
            tls.context()
            if isinstance(tls, StdlibTls)
            else cast("ssl.SSLContext", _UnusedSslContext())
        )
        self._pool = httpcore.ConnectionPool(
            ssl_context=ssl_context,
            max_connections=1,
            max_keepalive_connections=1,
            keepalive_expiry=keepalive_s,
            http1=True,
            http2=False,
            retries=0,  # retries belong to the EST client (it must re-sign the CSR)
            network_backend=_Backend(self),
        )

    # -- the request deadline (used by the streams) ------------------------------------------
    def _op_timeout(self, timeout: float | None) -> float | None:
        """A socket operation's timeout: ``timeout``, clamped to the request's time left."""
        deadline = self._deadline
        return timeout if deadline is None else deadline.clamp(timeout)

    def _timeout_message(self, what: str, timeout: float | None) -> str:
        deadline = self._deadline
        if deadline is not None and deadline.remaining() <= _DEADLINE_SLACK_S:
            return f"request not complete in {deadline.seconds:g} s ({what})"
        return f"{what}: no progress in {timeout:g} s" if timeout else f"{what}: timed out"

    def _card_time(self) -> contextlib.AbstractContextManager[None]:
        """Around a card signature: the request deadline stands still."""
        deadline = self._deadline
        return deadline.paused() if deadline is not None else contextlib.nullcontext()

    def _end_request(self) -> None:
        self._deadline = None

    # -- connection state ---------------------------------------------------------------------
    def _note_stream(self, stream: httpcore.NetworkStream, binding: ChannelBinding | None) -> None:
        self._stream = stream
        self.channel_binding = binding

    def connection_alive(self) -> bool:
        """Whether the noted TLS connection is still open and idle (not closed by the peer)."""
        stream = self._stream
        if stream is None or getattr(stream, "closed", False):
            return False
        return not stream.get_extra_info("is_readable")

    def is_current(self, stream: object) -> bool:
        """Whether ``stream`` (a response's ``network_stream``) is the noted TLS connection."""
        return stream is not None and stream is self._stream

    @contextlib.contextmanager
    def pinned(self) -> Iterator[None]:
        """No new connection inside: a request that would need one raises
        ``ConnectionChangedError`` before anything is sent on it."""
        self.is_pinned = True
        try:
            yield
        finally:
            self.is_pinned = False

    # -- requests -----------------------------------------------------------------------------
    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.scheme != "https":
            raise EstError(f"refusing {request.url.scheme}:// (EST needs TLS, RFC 7030 §3.3)")
        assert isinstance(request.stream, httpx.SyncByteStream)
        url = str(request.url.copy_with(query=None))
        core_request = httpcore.Request(
            method=request.method,
            url=httpcore.URL(
                scheme=request.url.raw_scheme,
                host=request.url.raw_host,
                port=request.url.port,
                target=request.url.raw_path,
            ),
            headers=request.headers.raw,
            content=request.stream,
            extensions=request.extensions,
        )
        if self.timeout_s is not None:
            self._deadline = Deadline(self.timeout_s, clock=self._clock)
        try:
            response = self._send(core_request, url)
        except BaseException:
            self._end_request()
            raise
        assert isinstance(response.stream, Iterable)
        return httpx.Response(
            status_code=response.status,
            headers=response.headers,
            stream=_ResponseStream(response.stream, url, self._end_request),
            extensions=response.extensions,
        )

    def _send(self, request: httpcore.Request, url: str) -> httpcore.Response:
        opened = self.connections_opened
        try:
            with _mapped(url):
                return self._pool.handle_request(request)
        except EstConnectionError as exc:
            stale = (
                opened > 0
                and self.connections_opened == opened  # it went on a reused connection
                and not self.is_pinned
                and request.method in _IDEMPOTENT
                and isinstance(exc.__cause__, _STALE_CONNECTION_ERRORS)
            )
            if not stale:
                raise
        # RFC 9112 §9.3.1: a client may retry an idempotent request when the connection
        # closed before any answer. A keep-alive connection the server closed just as we
        # reused it is that case (it cannot be seen in advance): once, on a new connection.
        with _mapped(url):
            return self._pool.handle_request(request)

    def close(self) -> None:
        self._pool.close()
