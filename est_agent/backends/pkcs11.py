"""A PKCS#11 token as credential backend: an HSM, a TPM (tpm2-pkcs11), an IoT SAFE middleware.

Binding: python-pkcs11 (typed, ``py.typed``; one exception class per CKR_* value, so the
failure contract below is a table, not string matching; EC domain parameters and
``CKM_ECDSA`` as first-class calls).

One slot of the store is one *label* on the token (``pkcs11:...;object=<label>``, with the same
``id`` when one is given; without one the label's UTF-8 bytes are the ``CKA_ID``):

* the key pair: ``CKO_PRIVATE_KEY`` + ``CKO_PUBLIC_KEY``, EC P-256, generated on the token with
  ``CKA_TOKEN``, ``CKA_PRIVATE``, ``CKA_SENSITIVE``, ``CKA_EXTRACTABLE=false``, ``CKA_SIGN``
  (PKCS#11 v2.40 §4.9: a sensitive, unextractable key never leaves the token);
* the certificate: ``CKO_CERTIFICATE`` / ``CKC_X_509`` with the slot's ``CKA_ID`` and label,
  so other software on the device (OpenSSL's pkcs11 engine, curl) finds it next to the key;
* the store's record header (magic, sequence, SHA-256 of the DER: store.py) in a ``CKO_DATA``
  object, ``CKA_APPLICATION = "est-agent"``, the slot's label, ``CKA_VALUE`` = the 44 bytes.

The record the store reads is header + certificate value, so the store's rules hold unchanged:
no header object is an EMPTY slot; a header whose hash does not match the certificate object is
a torn write (DAMAGED). Writes destroy the header first and create it last (the commit point);
a new key pair also destroys the slot's header first, so a run killed between destroying the
old key and making the new one leaves an EMPTY slot (never "record intact, key unreadable",
which the store must treat as UNKNOWN and stop on). The target slot is never the active one.

Failure contract (backends/base.py): ``TransportError`` when the module cannot be loaded, the
token is absent or went away (CKR_DEVICE_REMOVED, CKR_TOKEN_NOT_PRESENT, CKR_DEVICE_ERROR,
CKR_SESSION_CLOSED ...); ``TokenError`` (a ``CardError``) when the token answered and refused;
``TokenLoginError`` for a refused PIN. Every PKCS#11 call goes through ``Pkcs11Backend._call``
(one place to map errors, count calls and, in tests, stop a run at a given call).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

from est_agent.errors import (
    CardProtocolError,
    InputError,
    TokenError,
    TokenLoginError,
    TransportError,
)
from est_agent.pkcs11_uri import Pkcs11Uri
from est_agent.transport.base import LinkStats

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import ec
    from pkcs11._pkcs11 import lib as Pkcs11Library

    from est_agent.backends.signer import Signer

__all__ = ["APPLICATION", "Pkcs11Backend", "Pkcs11Signer", "load_module", "open_pkcs11"]

log = logging.getLogger(__name__)

#: CKA_APPLICATION of the record header data objects
APPLICATION = "est-agent"
HEADER_SIZE = 44  # store.py's record header
_MAGIC = b"ESTC"
_T = TypeVar("_T")

#: CKR_* answers that mean "the token is not reachable", not "the token refused"
_UNREACHABLE = (
    "DeviceRemoved",
    "DeviceError",
    "TokenNotPresent",
    "TokenNotRecognised",
    "SessionClosed",
    "SessionHandleInvalid",
    "SlotIDInvalid",
    "NoSuchToken",
    "GeneralError",
    "HostMemory",
    "CryptokiNotInitialized",
)
_LOGIN = ("PinIncorrect", "PinInvalid", "PinLenRange", "PinLocked", "PinExpired", "UserNotLoggedIn")


def _map_error(what: str, exc: Exception) -> Exception:
    """The typed error of ours for a python-pkcs11 exception (module docstring)."""
    name = type(exc).__name__
    text = f"{what}: PKCS#11 {name}" + (f" ({exc})" if str(exc) else "")
    if name in _UNREACHABLE:
        return TransportError(text)
    if name in _LOGIN:
        return TokenLoginError(text)
    return TokenError(text)


def load_module(path: str) -> Pkcs11Library:
    """Load (once per process: a PKCS#11 module is initialised once) the module at ``path``."""
    import pkcs11

    try:
        return pkcs11.lib(path)
    except (RuntimeError, OSError) as exc:
        # dlopen failed, no C_GetFunctionList, or C_Initialize refused: there is no token to
        # talk to at all (python-pkcs11 raises a bare PKCS11Error for the first two)
        raise TransportError(f"cannot load the PKCS#11 module {path}: {exc}") from None


def object_id(uri: Pkcs11Uri) -> bytes:
    """The CKA_ID of a slot's objects: the URI's ``id``, else its label's UTF-8 bytes."""
    if uri.id is not None:
        return uri.id
    if uri.object is None:
        raise InputError(f"{uri}: a slot or key URI needs object= or id=")
    return uri.object.encode("utf-8")


def _label(uri: Pkcs11Uri) -> str | None:
    return uri.object


class Pkcs11Signer:
    """A private EC key on the token: ``CKM_ECDSA`` over a digest the host computed (PKCS#11
    v2.40 Current Mechanisms §2.3.6: the input is the hash; the token keeps its leftmost bits),
    raw r||s converted to the DER ``Ecdsa-Sig-Value`` X.509 and TLS carry (RFC 5480 §2.2... /
    RFC 8446 §4.2.3), and checked against the public key before it is returned."""

    def __init__(
        self, backend: Pkcs11Backend, key: Pkcs11Uri, public_key: ec.EllipticCurvePublicKey
    ) -> None:
        self._backend = backend
        self.key = key
        self._public_key = public_key
        self.signatures = 0

    @property
    def digest_algorithms(self) -> tuple[str, ...]:
        return ("sha256", "sha384", "sha512")

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._public_key

    def sign_digest(self, digest: bytes) -> bytes:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.hazmat.primitives.asymmetric.utils import (
            Prehashed,
            encode_dss_signature,
        )

        algorithms: dict[int, hashes.HashAlgorithm] = {
            32: hashes.SHA256(),
            48: hashes.SHA384(),
            64: hashes.SHA512(),
        }
        algorithm = algorithms.get(len(digest))
        if algorithm is None:
            raise InputError(f"expected a SHA-256/384/512 digest, got {len(digest)} bytes")
        raw = self._backend.sign_raw(self.key, digest)
        half = len(raw) // 2
        if len(raw) % 2 or half == 0:
            raise CardProtocolError(f"the token's ECDSA signature is {len(raw)} bytes")
        der = encode_dss_signature(
            int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big")
        )
        self.signatures += 1
        try:
            self._public_key.verify(der, digest, ec.ECDSA(Prehashed(algorithm)))
        except InvalidSignature:
            raise CardProtocolError(
                f"the token's signature with {self.key.selector} does not verify"
            ) from None
        return der


class Pkcs11Backend:
    """``CredentialBackend`` (backends/base.py) on one logged-in read/write token session."""

    def __init__(self, session: Any, token: Any, module: str) -> None:
        self.session = session
        self.token = token
        self.module = module
        self.calls = 0
        #: called with the operation's name before each PKCS#11 call (tests: kill at call k)
        self.before_call: Callable[[str], None] | None = None
        self._stats = LinkStats()
        self._depth = 0
        self._records: dict[bytes, bytes] = {}  # the picture of this transaction

    # -- the one choke point ------------------------------------------------------------------

    def _call(self, what: str, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        import pkcs11

        self.calls += 1
        self._stats.apdus += 1  # one PKCS#11 call counts as one command on the link
        started = time.monotonic()
        try:
            if self.before_call is not None:
                self.before_call(what)  # inside: a PKCS11Error it raises is the token's answer
            return fn(*args, **kwargs)
        except pkcs11.PKCS11Error as exc:
            raise _map_error(what, exc) from None
        finally:
            self._stats.seconds += time.monotonic() - started

    def _find(self, what: str, attrs: dict[Any, Any]) -> list[Any]:
        return self._call(what, lambda: list(self.session.get_objects(attrs)))

    def _slot_attrs(self, uri: Pkcs11Uri, cls: Any) -> dict[Any, Any]:
        from pkcs11 import Attribute

        attrs: dict[Any, Any] = {Attribute.CLASS: cls, Attribute.ID: object_id(uri)}
        if uri.object is not None:
            attrs[Attribute.LABEL] = uri.object
        return attrs

    def _one(self, what: str, attrs: dict[Any, Any], uri: Pkcs11Uri) -> Any | None:
        found = self._find(f"{what} {uri.selector}", attrs)
        if len(found) > 1:
            raise TokenError(f"{what}: {len(found)} objects match {uri.selector}")
        return found[0] if found else None

    # -- CredentialBackend ----------------------------------------------------------------------

    @property
    def description(self) -> str:
        return f"PKCS#11 token {self.token.label!r} via {self.module}"

    def details(self) -> dict[str, str]:
        return {"reader": self.description, "backend": "pkcs11", "aid": ""}

    @property
    def stats(self) -> LinkStats:
        return self._stats

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """PKCS#11 has no cross-process lock of its own (v2.40 §5.6: sessions share the token);
        the agent's run lock serialises its runs. Inside, records are read once."""
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if self._depth == 0:
                self._records.clear()

    def record_size(self, record: object) -> int | None:
        return None  # a token object has no fixed container size

    def _record(self, uri: Pkcs11Uri) -> bytes:
        from pkcs11 import Attribute, ObjectClass

        key = object_id(uri)
        if key in self._records:
            return self._records[key]
        header = self._one("find record header", self._header_attrs(uri), uri)
        if header is None:
            data = b""  # nothing written: an empty slot
        else:
            value = bytes(
                self._call(
                    f"read record header {uri.selector}", header.__getitem__, Attribute.VALUE
                )
            )
            cert = self._one(
                "find certificate", self._slot_attrs(uri, ObjectClass.CERTIFICATE), uri
            )
            body = (
                b""
                if cert is None
                else bytes(
                    self._call(
                        f"read certificate {uri.selector}", cert.__getitem__, Attribute.VALUE
                    )
                )
            )
            data = value + body  # no certificate: the hash check makes it a torn write
        if self._depth:
            self._records[key] = data
        return data

    def _header_attrs(self, uri: Pkcs11Uri) -> dict[Any, Any]:
        from pkcs11 import Attribute, ObjectClass

        return {
            Attribute.CLASS: ObjectClass.DATA,
            Attribute.APPLICATION: APPLICATION,
            Attribute.LABEL: uri.object if uri.object is not None else object_id(uri).hex(),
        }

    def read_record(self, record: object, offset: int, length: int) -> bytes:
        return self._record(_uri(record))[offset : offset + length]

    def write_record(self, record: object, data: bytes) -> None:
        from pkcs11 import Attribute

        uri = _uri(record)
        if len(data) <= HEADER_SIZE or data[:4] != _MAGIC:
            raise InputError("a token record is a store record header plus a certificate")
        header, der = data[:HEADER_SIZE], data[HEADER_SIZE:]
        self._records.clear()
        # the header is the commit point: gone first, back last (module docstring)
        self._destroy_all("destroy record header", self._header_attrs(uri), uri)
        self._put_certificate(uri, der)
        header_attrs = {
            **self._header_attrs(uri),
            Attribute.TOKEN: True,
            Attribute.PRIVATE: False,
            Attribute.VALUE: header,
        }
        self._call(
            f"create record header {uri.selector}", self.session.create_object, header_attrs
        )

    def _destroy_all(self, what: str, attrs: dict[Any, Any], uri: Pkcs11Uri) -> None:
        for obj in self._find(f"{what.replace('destroy', 'find')} {uri.selector}", attrs):
            self._call(f"{what} {uri.selector}", obj.destroy)

    # -- keys -------------------------------------------------------------------------------

    def _public_point(self, uri: Pkcs11Uri) -> bytes:
        from asn1crypto.core import OctetString
        from pkcs11 import Attribute, ObjectClass

        obj = self._one("find public key", self._slot_attrs(uri, ObjectClass.PUBLIC_KEY), uri)
        if obj is None:
            raise TokenError(f"no public key {uri.selector} on the token")
        raw = bytes(
            self._call(f"read public key {uri.selector}", obj.__getitem__, Attribute.EC_POINT)
        )
        try:
            # CKA_EC_POINT is the DER OCTET STRING of the SEC 1 point (PKCS#11 v2.40 §2.3.3)
            return bytes(OctetString.load(raw).native)
        except ValueError:
            if raw[:1] == b"\x04":
                return raw  # some tokens give the bare point
            raise CardProtocolError(f"public key {uri.selector}: CKA_EC_POINT is not DER") from None

    def public_key(self, key: object) -> ec.EllipticCurvePublicKey:
        from est_agent.backends.signer import public_key_from_point

        return public_key_from_point(self._public_point(_uri(key)))

    def public_key_digest(self, key: object, *, last_use: bool = False) -> str:
        return hashlib.sha256(self._public_point(_uri(key))).hexdigest()

    def generate_key(self, key: object) -> ec.EllipticCurvePublicKey:
        from pkcs11 import Attribute, KeyType, ObjectClass
        from pkcs11.util.ec import encode_named_curve_parameters

        uri = _uri(key)
        self._records.clear()
        # the slot's record goes first: a kill from here on leaves an EMPTY slot (docstring)
        self._destroy_all("destroy record header", self._header_attrs(uri), uri)
        for cls, what in (
            (ObjectClass.PRIVATE_KEY, "private key"),
            (ObjectClass.PUBLIC_KEY, "public key"),
        ):
            self._destroy_all(f"destroy {what}", self._slot_attrs(uri, cls), uri)
        params = self._call(
            "EC domain parameters",
            self.session.create_domain_parameters,
            KeyType.EC,
            {Attribute.EC_PARAMS: encode_named_curve_parameters("1.2.840.10045.3.1.7")},
            local=True,
        )
        label = uri.object
        self._call(
            f"generate key pair {uri.selector}",
            params.generate_keypair,
            store=True,
            id=object_id(uri),
            label=label,
            public_template={Attribute.VERIFY: True, Attribute.TOKEN: True},
            private_template={
                Attribute.TOKEN: True,
                Attribute.PRIVATE: True,
                Attribute.SENSITIVE: True,
                Attribute.EXTRACTABLE: False,
                Attribute.SIGN: True,
            },
        )
        log.info("key pair %s generated on the token", uri.selector)
        return self.public_key(uri)

    def signer(self, key: object, public_key: ec.EllipticCurvePublicKey) -> Signer:
        return Pkcs11Signer(self, _uri(key), public_key)

    def sign_raw(self, key: Pkcs11Uri, digest: bytes) -> bytes:
        from pkcs11 import Mechanism, ObjectClass

        obj = self._one("find private key", self._slot_attrs(key, ObjectClass.PRIVATE_KEY), key)
        if obj is None:
            raise TokenError(f"no private key {key.selector} on the token")
        return bytes(
            self._call(f"sign {key.selector}", obj.sign, digest, mechanism=Mechanism.ECDSA)
        )

    # -- identity ---------------------------------------------------------------------------

    def read_object(self, ref: object) -> bytes:
        """A certificate object's DER (bootstrap certificate, trust anchor)."""
        from pkcs11 import Attribute, ObjectClass

        uri = _uri(ref)
        attrs: dict[Any, Any] = {Attribute.CLASS: ObjectClass.CERTIFICATE}
        if uri.object is not None:
            attrs[Attribute.LABEL] = uri.object
        if uri.id is not None:
            attrs[Attribute.ID] = uri.id
        obj = self._one("find certificate", attrs, uri)
        if obj is None:
            raise TokenError(f"no certificate {uri.selector} on the token")
        return bytes(self._call("read certificate", obj.__getitem__, Attribute.VALUE))

    def store_certificate(self, ref: Pkcs11Uri, der: bytes) -> None:
        """Put a certificate object on the token (provisioning the bootstrap certificate)."""
        self._put_certificate(ref, der)

    def _put_certificate(self, uri: Pkcs11Uri, der: bytes) -> None:
        """Replace the certificate object of ``uri`` (its CKA_ID, and label when it has one)."""
        from pkcs11 import Attribute, CertificateType, ObjectClass

        subject, issuer, serial = _certificate_names(der)
        attrs: dict[Any, Any] = {
            Attribute.CLASS: ObjectClass.CERTIFICATE,
            Attribute.CERTIFICATE_TYPE: CertificateType.X_509,
            Attribute.TOKEN: True,
            Attribute.PRIVATE: False,
            Attribute.ID: object_id(uri),
            Attribute.VALUE: der,
            Attribute.SUBJECT: subject,
            Attribute.ISSUER: issuer,
            Attribute.SERIAL_NUMBER: serial,
        }
        if uri.object is not None:
            attrs[Attribute.LABEL] = uri.object
        self._destroy_all(
            "destroy certificate", self._slot_attrs(uri, ObjectClass.CERTIFICATE), uri
        )
        self._call(f"create certificate {uri.selector}", self.session.create_object, attrs)

    def iccid(self) -> str | None:
        return None

    def imei(self) -> str | None:
        return None


def _uri(ref: object) -> Pkcs11Uri:
    if not isinstance(ref, Pkcs11Uri):
        raise InputError(f"the PKCS#11 backend addresses objects with pkcs11: URIs, not {ref}")
    return ref


def _certificate_names(der: bytes) -> tuple[bytes, bytes, bytes]:
    """CKA_SUBJECT, CKA_ISSUER and CKA_SERIAL_NUMBER (DER) of a certificate (PKCS#11 v2.40
    §4.6.3), which other software uses to find it."""
    from asn1crypto import x509 as asn1x509

    try:
        cert = asn1x509.Certificate.load(der)
        tbs = cert["tbs_certificate"]
        return tbs["subject"].dump(), tbs["issuer"].dump(), tbs["serial_number"].dump()
    except ValueError as exc:
        raise InputError(f"not a DER certificate: {exc}") from None


@contextlib.contextmanager
def open_pkcs11(token: Pkcs11Uri, *, module: str, pin: str | None) -> Iterator[Pkcs11Backend]:
    """Load ``module``, find the token ``token`` names, open a read/write session logged in
    with ``pin`` (user); close it on exit. Token absent: ``TransportError`` (69)."""
    import pkcs11

    lib = load_module(module)
    selector: dict[str, Any] = {}
    if token.token is not None:
        selector["token_label"] = token.token
    if token.serial is not None:
        selector["token_serial"] = token.serial.encode("utf-8")
    try:
        tokens = list(lib.get_tokens(**selector))
    except pkcs11.PKCS11Error as exc:
        raise _map_error("listing tokens", exc) from None
    # a slot whose token was never initialised (SoftHSM's spare slot) holds nothing of ours
    tokens = [t for t in tokens if t.flags & pkcs11.TokenFlag.TOKEN_INITIALIZED]
    if token.manufacturer is not None:
        tokens = [t for t in tokens if t.manufacturer_id == token.manufacturer]
    if token.model is not None:
        tokens = [t for t in tokens if t.model == token.model]
    if token.slot_id is not None:
        tokens = [t for t in tokens if t.slot.slot_id == token.slot_id]
    if not tokens:
        raise TransportError(f"no PKCS#11 token matches {token} in {module}")
    if len(tokens) > 1:
        raise TokenError(f"{len(tokens)} PKCS#11 tokens match {token}: name one (token=...)")
    found = tokens[0]
    try:
        session = found.open(rw=True, user_pin=pin)
    except pkcs11.PKCS11Error as exc:
        raise _map_error(f"logging in to token {found.label!r}", exc) from None
    try:
        yield Pkcs11Backend(session, found, module)
    finally:
        with contextlib.suppress(pkcs11.PKCS11Error):
            session.close()
