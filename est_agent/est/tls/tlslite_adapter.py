"""The tlslite-ng adapter: every use of tlslite-ng, and every reach into its internals, is here.

tlslite-ng (pure Python) is the one TLS stack that lets the client's CertificateVerify be signed
by a key it does not hold (the SIM's). It does not verify the server at all, and it was not
written to be extended, so this module subclasses and patches it. Written against tlslite-ng
0.8.2: ``tests/est/test_tlslite_canary.py`` fails, naming what to re-check, when another version
is installed or one of these internals changes.

Private internals used (overridden, called or read), and why:

* the package import bypass (``_import_tlslite_core``): the package object is created without
  running ``tlslite/__init__.py`` (whose star-import of every integration helper costs ~33 ms,
  ~8 MiB and a DeprecationWarning); that ``__init__`` runs in place the first time anything
  else reads an attribute of the package, so other tlslite users in the process see it whole
  (the one process-wide effect of this module, and invisible to them).
* ``TLSRecordLayer._recordLayer`` and ``RecordLayer._getCipherSettings``: shadowed on our
  connections' record layer only, so that their AES-GCM records are protected by OpenSSL
  (``use_fast_aes_gcm``): same interface and results as tlslite's ``createAESGCM``, ~35 ms
  less per handshake. Nothing process-wide: other tlslite connections in the process keep
  tlslite's own ciphers.
* ``ECDSAKey._sign`` / ``_verify`` (overridden by ``CardEcdsaKey``, whose ``__init__`` does not
  call the base one), and the attributes tlslite reads from an ECDSA key: ``key_type``,
  ``public_key``, ``private_key.curve.baselen`` (``KeyExchange.makeCertificateVerify``
  truncates the TLS 1.2 digest to it).
* ``TLSConnection._clientGetKeyFromChain`` (overridden): the server's chain is verified here,
  before the client's Certificate/CertificateVerify exist (the pre-sign certificate check).
* ``TLSConnection._clientKeyExchange`` (overridden): a TLS 1.2 suite without a signed key
  exchange is refused before anything is signed.
* ``TLSConnection._clientTLS13Handshake`` (overridden): the decrypt_error / illegal_parameter
  alert RFC 8446 §4.4.3 requires on a bad server CertificateVerify (the TLS 1.3 signature-error
  mapping).
* ``TLSConnection._genKeyShareEntry`` (a classmethod) and ``TLSConnection._getKEX`` (a
  staticmethod), overridden by instance methods, and the ``RawDHKeyExchange.calc_shared_key``
  interface (implemented by ``DeviceKeyExchange``): with a ``KeyAgreement`` configured, the
  TLS 1.3 key share's key pair is made and its ECDH computed by the device (the card's COMPUTE
  DH), never by tlslite; a share's ``private`` is then an opaque marker. tlslite calls both
  through ``self`` (ClientHello, HelloRetryRequest, ``_clientTLS13Handshake``).
* ``TLSRecordLayer._sendMsg`` (overridden): the ClientHello's suite order, the tls-unique
  capture (the first Finished message, RFC 5929 §3.1), and, under TLS 1.3, a copy of
  ``TLSRecordLayer._handshake_hash`` (a ``HandshakeHashes``: ``copy()``, ``digest(name)``)
  as it is before the client's first message after the server Finished.
* ``TLSRecordLayer._sendError`` (called): send a fatal alert and raise ``TLSLocalAlert``.
* ``Session.masterSecret`` and ``Session.cipherSuite`` (read, TLS 1.3): the master secret and
  suite that the RFC 9266 tls-exporter is derived from (keyschedule.py). tlslite-ng 0.8.2's
  own ``keyingMaterialExporter`` derives exporter_master_secret after the client's
  Certificate and CertificateVerify entered the transcript (``_clientTLS13Handshake``:
  "Do after client cert and verify messages has been sent"), where RFC 8446 §7.1 stops at the
  server Finished: with client authentication its value is not the server's.

Public API used: ``TLSConnection`` (``handshakeClientCert``, ``recv``, ``sendall``, ``close``,
``version``, ``session``, ``keyingMaterialExporter`` for TLS 1.2 exporters, RFC 5705),
``HandshakeSettings``, ``X509``, ``X509CertChain``, ``constants`` and ``errors``.

What the rest of the package gets: ``handshake()`` returning a ``ClientConnection``, the
``HandshakeFailed`` it raises when the handshake breaks, and small helpers that classify
tlslite's exceptions; nothing else needs tlslite's names. tlslite is imported on first use.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from est_agent.errors import EstError, InputError, TlsVerificationError
from est_agent.est.tls import keyschedule, policy
from est_agent.est.tls.policy import verify_server_chain

if TYPE_CHECKING:
    from est_agent.backends.agreement import KeyAgreement
    from est_agent.backends.signer import Signer
    from est_agent.est.tls.config import TlsliteTls

__all__ = [
    "ClientConnection",
    "HandshakeFailed",
    "OpenSslAesGcm",
    "TlsliteSslObject",
    "alert_name",
    "describe",
    "handshake",
    "is_abrupt_close",
    "is_remote_close",
    "load",
    "loaded",
    "remote_alert",
    "tls_errors",
    "use_fast_aes_gcm",
]


def _import_tlslite_core() -> None:
    """Load tlslite-ng's package object without running its ``__init__`` first.

    tlslite-ng 0.8.2's ``__init__`` star-imports ``tlslite.api``, which pulls in every
    integration helper (asyncio, asyncore, xmlrpc, smtplib, imaplib, poplib, httplib): ~33 ms
    and ~8 MiB of a process that only needs the TLS connection classes (measured with
    ``-X importtime`` on Python 3.11), plus a DeprecationWarning for asyncore. The submodules
    used here import each other by full or relative name, never through the package's
    re-exports, so an unexecuted package module is enough. That ``__init__`` still runs, in
    place, the first time anything else reads an attribute of the package (``from tlslite
    import TLSConnection``, ``tlslite.__version__``): another tlslite user in the process
    sees the whole package, as if nothing had happened.
    """
    import importlib.util

    if "tlslite" in sys.modules:
        return
    spec = importlib.util.find_spec("tlslite")
    if spec is None or spec.loader is None or spec.submodule_search_locations is None:
        raise EstError("tlslite-ng is not installed (needed for TLS with a card key)")
    package = importlib.util.module_from_spec(spec)
    loader = spec.loader

    def complete(name: str) -> Any:
        if name.startswith("__") and name not in ("__version__", "__all__"):
            # introspection (inspect, mock, doctest) probing for __wrapped__ & co., not a
            # tlslite user: no reason to run the package __init__
            raise AttributeError(name)
        del package.__dict__["__getattr__"]
        loader.exec_module(package)
        return getattr(package, name)

    package.__dict__["__getattr__"] = complete
    sys.modules["tlslite"] = package


class OpenSslAesGcm:
    """tlslite's AES-GCM record cipher interface, run by OpenSSL (through ``cryptography``).

    Without M2Crypto or pycryptodome, tlslite-ng protects records with its pure-Python AES,
    whose constructor also inspects the caller's source on every call (a deprecation shim for
    an old class name): ~35 ms of a ~50 ms handshake. This object has the interface of
    ``tlslite.utils.aesgcm.AESGCM`` (``seal``/``open``; ``open`` returns None on a bad tag, as
    tlslite expects) and the same results (AES-GCM is deterministic: NIST SP 800-38D).
    """

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

    def open(self, nonce: bytearray, ciphertext: bytearray, data: bytearray) -> bytearray | None:
        try:
            return bytearray(self._aead.decrypt(bytes(nonce), bytes(ciphertext), bytes(data)))
        except InvalidTag:
            return None


def _create_aes_gcm(key: bytearray, implementations: Any = None) -> OpenSslAesGcm:
    """What ``cipherfactory.createAESGCM(key, implList)`` is called as, returning ours."""
    return OpenSslAesGcm(key)


def use_fast_aes_gcm(connection: Any) -> None:
    """Let this one tlslite connection protect AES-GCM records with ``OpenSslAesGcm``.

    tlslite's record layer picks each suite's cipher factory in
    ``RecordLayer._getCipherSettings(cipherSuite)`` (a staticmethod, called through the
    instance): an instance attribute in front of it changes this connection's record layer
    only; every other tlslite connection in the process keeps tlslite's own factory.
    """
    from tlslite.utils.cipherfactory import createAESGCM  # type: ignore[import-untyped]

    record_layer = connection._recordLayer
    settings_of = type(record_layer)._getCipherSettings

    def cipher_settings(cipher_suite: int) -> tuple[int, int, Any]:
        key_length, iv_length, create = settings_of(cipher_suite)
        return key_length, iv_length, (_create_aes_gcm if create is createAESGCM else create)

    record_layer._getCipherSettings = cipher_settings


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
        GroupName,
    )
    from tlslite.errors import (  # type: ignore[import-untyped]
        TLSDecryptionFailed,
        TLSIllegalParameterException,
        TLSInternalError,
    )
    from tlslite.extensions import KeyShareEntry  # type: ignore[import-untyped]
    from tlslite.messages import ClientHello, Finished  # type: ignore[import-untyped]
    from tlslite.tlsconnection import TLSConnection  # type: ignore[import-untyped]
    from tlslite.utils.ecdsakey import ECDSAKey  # type: ignore[import-untyped]

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

    class _DeviceShare:
        """The ``private`` of a key share whose private key is in the device (never here)."""

    class DeviceKeyExchange:
        """tlslite's ``RawDHKeyExchange`` interface over a ``KeyAgreement`` (TLS 1.3, P-256).

        Only ``calc_shared_key`` is called on it (``_clientTLS13Handshake``); the share itself
        is made by ``VerifyingConnection._genKeyShareEntry``.
        """

        def __init__(
            self,
            agreement: KeyAgreement,
            card_time: Callable[[], contextlib.AbstractContextManager[None]],
        ) -> None:
            self._agreement = agreement
            self._card_time = card_time

        def calc_shared_key(
            self, private: Any, peer_share: bytearray, valid_point_formats: Any = None
        ) -> bytearray:
            if not isinstance(private, _DeviceShare):
                raise TLSInternalError("the key share was not made by the device")
            # The agreement checks the server's share before the device sees it (RFC 8446
            # §4.2.8.2: the receiver MUST validate the point) and refuses it with InputError:
            # the illegal_parameter alert here.
            try:
                with self._card_time():
                    return bytearray(self._agreement.shared_secret(bytes(peer_share)))
            except InputError as exc:
                raise TLSIllegalParameterException(str(exc)) from exc

    class VerifyingConnection(TLSConnection):  # type: ignore[misc]
        """A client TLSConnection that verifies the server before anything is signed."""

        def __init__(
            self,
            sock: Any,
            anchors: Sequence[x509.Certificate],
            host: str,
            *,
            agreement: KeyAgreement | None = None,
            card_time: Callable[[], contextlib.AbstractContextManager[None]] = (
                contextlib.nullcontext
            ),
        ) -> None:
            super().__init__(sock)
            use_fast_aes_gcm(self)
            self.est_anchors = anchors
            self.est_host = host
            #: TLS 1.3 key shares from this (the card's COMPUTE DH) instead of tlslite's own
            self.est_agreement = agreement
            self.est_card_time = card_time
            self.est_verification_error: TlsVerificationError | None = None
            self.est_first_finished: bytes | None = None
            #: TLS 1.3: the transcript (tlslite HandshakeHashes) ClientHello...server Finished
            self.est_server_finished_hashes: Any = None

        def _clientKeyExchange(
            self,
            settings: Any,
            cipherSuite: int,
            *rest: Any,
        ) -> Iterator[Any]:
            # TLS 1.2, after ServerHello: a server that chose a suite without a signed key
            # exchange would get our CertificateVerify before proving it holds its key. Never
            # offered (policy.TLS12_KEY_EXCHANGES); refused here too, before anything is sent.
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

        # The two overrides below replace tlslite's classmethod/staticmethod on this class
        # only; tlslite calls both through ``self`` (ClientHello, HelloRetryRequest, the
        # shared secret in ``_clientTLS13Handshake``), so instance methods see the agreement.
        def _genKeyShareEntry(self, group: int, version: Any) -> Any:
            if self.est_agreement is None:
                return TLSConnection._genKeyShareEntry(group, version)  # tlslite's, unchanged
            if group != GroupName.secp256r1:  # only offered (settings), asked for in an HRR
                raise TLSIllegalParameterException(
                    f"the server asks for a key share on {GroupName.toStr(group)}; the device"
                    " agrees keys on secp256r1 only"
                )
            with self.est_card_time():
                point = self.est_agreement.new_key()
            return KeyShareEntry().create(group, bytearray(point), _DeviceShare())

        def _getKEX(self, group: int, version: Any) -> Any:
            if self.est_agreement is None:
                return TLSConnection._getKEX(group, version)
            return DeviceKeyExchange(self.est_agreement, self.est_card_time)

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
            elif (
                self.est_server_finished_hashes is None
                and msg.contentType == ContentType.handshake
                and tuple(self.version) >= (3, 4)
            ):
                # RFC 8446 §2, §4.4: after its ClientHello(s) a TLS 1.3 client sends nothing
                # until the server's Finished; its first other handshake message (Certificate,
                # or Finished) follows it. The transcript now is ClientHello...server Finished,
                # the one exporter_master_secret is derived from (§7.1).
                self.est_server_finished_hashes = self._handshake_hash.copy()
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


def load() -> None:
    """Import tlslite-ng (without its package ``__init__``) and build the subclasses."""
    _classes()


def loaded() -> bool:
    """Whether tlslite-ng has been imported (its exceptions can only be met after that)."""
    return "tlslite" in sys.modules


# --------------------------------------------------------------------------------------------
# The connection as the streams see it
# --------------------------------------------------------------------------------------------


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
        """The RFC 8446 §7.5 exporter with an empty context (what RFC 9266 §2 asks for).

        Under TLS 1.3 derived here from the master secret and the transcript through the
        server Finished (RFC 8446 §7.1), not with tlslite's ``keyingMaterialExporter``: 0.8.2
        derives its exporter_master_secret after the client's Certificate and
        CertificateVerify, so with client authentication its value is not the peer's.
        """
        connection = self._connection
        if self.version() != "TLSv1.3":
            # RFC 5705 (TLS 1.2): tlslite's PRF over the master secret and both randoms.
            return bytes(connection.keyingMaterialExporter(bytearray(label), length))
        transcript = connection.est_server_finished_hashes
        if transcript is None:
            raise TlsVerificationError("TLS 1.3 handshake ended without a server Finished")
        hash_name = keyschedule.transcript_hash_algorithm(connection.session.cipherSuite)
        secret = keyschedule.exporter_master_secret(
            bytes(connection.session.masterSecret), bytes(transcript.digest(hash_name)), hash_name
        )
        return keyschedule.tls13_exporter(secret, label, b"", length, hash_name)


class ClientConnection:
    """An established tlslite-ng client connection: bytes in and out, its ``ssl_object``."""

    def __init__(self, connection: Any, *, client_auth: bool) -> None:
        self._connection = connection
        self.ssl_object = TlsliteSslObject(connection)
        #: whether the client sent a certificate (the server's verdict on it may come late)
        self.client_auth = client_auth

    def recv(self, max_bytes: int) -> bytes:
        return bytes(self._connection.recv(max_bytes))

    def sendall(self, data: bytes) -> None:
        self._connection.sendall(data)

    def close(self) -> None:
        """Send close_notify (RFC 8446 §6.1); tlslite closes the socket itself on fatal errors."""
        self._connection.close()


class HandshakeFailed(Exception):
    """The handshake broke: the server sent an alert (``alert``), closed, or the socket failed.

    Never leaves the package: backend.py turns it into the typed error it means. ``signed``:
    whether our CertificateVerify had been signed by then. ``cause`` (also ``__cause__``) is
    what tlslite or the socket raised.
    """

    def __init__(self, cause: BaseException, *, alert: int | None, signed: bool) -> None:
        super().__init__(str(cause))
        self.cause = cause
        self.alert = alert
        self.signed = signed


def _handshake_settings(config: TlsliteTls) -> Any:
    from tlslite.handshakesettings import HandshakeSettings  # type: ignore[import-untyped]

    settings = HandshakeSettings()
    settings.minVersion = (3, 3)  # RFC 8996: nothing below TLS 1.2
    settings.maxVersion = (3, 3) if config.max_version == "1.2" else (3, 4)
    # tlslite 0.8.2 sends a compressed client Certificate (RFC 8879) under TLS 1.3 whenever
    # the server allows it, and OpenSSL 3.0 servers fail to decompress it: never compress.
    settings.certificate_compression_send = []
    # The card signs SHA-256 digests: sha256 first, so TLS 1.2 CertificateVerify uses it.
    settings.ecdsaSigHashes = ["sha256"] + [h for h in settings.ecdsaSigHashes if h != "sha256"]
    settings.keyExchangeNames = list(policy.TLS12_KEY_EXCHANGES)
    settings.cipherNames = list(policy.TLS_CIPHERS)
    settings.macNames = list(policy.TLS_MACS)
    if config.key_agreement is not None:
        # The device agrees keys on P-256 only, and only the TLS 1.3 key share is made by it
        # (RFC 8446 §4.2.8): offer that group alone, and TLS 1.3 alone (a TLS 1.2 ECDHE
        # ClientKeyExchange would be computed by tlslite on the host).
        settings.minVersion = (3, 4)
        settings.eccCurves = ["secp256r1"]
        settings.keyShares = ["secp256r1"]
        settings.dhGroups = []
    return settings


def handshake(
    sock: Any,
    config: TlsliteTls,
    host: str,
    *,
    card_time: Callable[[], contextlib.AbstractContextManager[None]],
) -> ClientConnection:
    """Run a client handshake on ``sock`` (a connected socket-like object); verify the server.

    Raises ``TlsVerificationError`` when we refused the server (its chain or name, its choice
    of suite, its signature: an alert was sent before anything was signed, or in place of our
    Finished), ``TimeoutError`` when the socket timed out, ``HandshakeFailed`` otherwise.
    """
    card_key_class, connection_class = _classes()  # first: imports tlslite quietly
    from tlslite.constants import AlertDescription
    from tlslite.errors import BaseTLSException, TLSLocalAlert, TLSRemoteAlert
    from tlslite.x509 import X509  # type: ignore[import-untyped]
    from tlslite.x509certchain import X509CertChain  # type: ignore[import-untyped]

    settings = _handshake_settings(config)
    chain = key = None
    if config.signer is not None:
        certs = []
        for cert in config.client_chain:
            parsed = X509()
            parsed.parseBinary(bytearray(cert.public_bytes(serialization.Encoding.DER)))
            certs.append(parsed)
        chain = X509CertChain(certs)
        key = card_key_class(config.signer, card_time)
    connection = connection_class(
        sock, config.trust_anchors, host, agreement=config.key_agreement, card_time=card_time
    )
    try:
        server_name = None if policy.is_ip_address(host) else host  # RFC 6066 §3
        connection.handshakeClientCert(
            certChain=chain, privateKey=key, settings=settings, serverName=server_name
        )
    except TLSLocalAlert as exc:
        if connection.est_verification_error is not None:
            raise connection.est_verification_error from exc
        hint = ""
        if (
            config.key_agreement is not None
            and exc.description == AlertDescription.protocol_version
        ):
            hint = "; the key share is made on the card (card.key_agreement): TLS 1.3 only"
        raise TlsVerificationError(f"TLS handshake with {host} aborted ({exc}){hint}") from exc
    except TimeoutError:
        raise
    except (BaseTLSException, OSError) as exc:
        alert = exc.description if isinstance(exc, TLSRemoteAlert) else None
        signed = key is not None and key.used
        raise HandshakeFailed(exc, alert=alert, signed=signed) from exc
    return ClientConnection(connection, client_auth=chain is not None)


# --------------------------------------------------------------------------------------------
# tlslite's exceptions, classified
# --------------------------------------------------------------------------------------------


def tls_errors() -> tuple[type[Exception], ...]:
    """The base class of every exception tlslite raises (after ``load()``)."""
    from tlslite.errors import BaseTLSException

    return (BaseTLSException,)


def alert_name(description: int) -> str:
    from tlslite.constants import AlertDescription

    name: str = AlertDescription.toStr(description)
    return name


def remote_alert(exc: BaseException) -> int | None:
    """The alert the server sent, when ``exc`` is tlslite's report of one."""
    if not loaded():
        return None
    from tlslite.errors import TLSRemoteAlert

    return exc.description if isinstance(exc, TLSRemoteAlert) else None


def is_abrupt_close(exc: BaseException) -> bool:
    """tlslite met the end of the TCP stream without a close_notify alert."""
    if not loaded():
        return False
    from tlslite.errors import TLSAbruptCloseError

    return isinstance(exc, TLSAbruptCloseError)


def is_remote_close(exc: BaseException) -> bool:
    """The server closed without a verdict: no alert, or close_notify / user_canceled."""
    alert = remote_alert(exc)
    return is_abrupt_close(exc) or (alert is not None and alert in policy.CLOSE_ALERTS)


def describe(exc: BaseException) -> str | None:
    """What a tlslite exception says happened (None when ``exc`` is not one of those)."""
    if is_abrupt_close(exc):
        return "the server closed the connection without a TLS alert"
    alert = remote_alert(exc)
    if alert is not None:
        return f"the server sent the TLS alert {alert_name(alert)}"
    return None
