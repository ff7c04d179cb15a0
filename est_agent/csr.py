"""PKCS#10 certification requests (RFC 2986) signed through a `Signer`, the card's key included.

`CsrBuilder` is immutable (like cryptography's `CertificateSigningRequestBuilder`): each setter
returns a new builder, so a half-configured builder can be shared and a retry on a new TLS
connection (new channel binding, RFC 7030 §3.5) only swaps the challengePassword.

The CertificationRequestInfo is assembled with asn1crypto rather than cryptography because the
private key is not in this process: cryptography only signs with its own key objects. asn1crypto
also keeps raw encodings untouched, which re-enrollment needs (RFC 7030 §4.2.2: Subject and
SubjectAltName must equal the current certificate's, and servers compare bytes).

`build()` asks the signer for exactly one signature (a card operation is slow and counted),
then verifies the result with cryptography before returning it.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import string
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TypeAlias

from asn1crypto import csr, keys
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtensionOID, NameOID

from est_agent.backends.signer import Signer
from est_agent.errors import CardError, ConfigError, CsrError

__all__ = [
    "OID_EC_PUBLIC_KEY",
    "CsrAttributes",
    "CsrBuilder",
    "CsrDeviation",
    "CsrFit",
    "KeyedTemplate",
    "SubjectSpec",
    "parse_san",
    "parse_subject",
    "raw_subject_and_san",
    "render_subject",
    "subject_from_template",
]

#: an `x509.Name`, (OID, value) pairs, or the raw DER of a Name
SubjectSpec: TypeAlias = x509.Name | Sequence[tuple[x509.ObjectIdentifier | str, str]] | bytes

# RFC 5480 §2.1.1: id-ecPublicKey, and the named curve secp256r1 (§2.1.1.1)
OID_EC_PUBLIC_KEY = "1.2.840.10045.2.1"
OID_SECP256R1 = "1.2.840.10045.3.1.7"
_SAN_OID = ExtensionOID.SUBJECT_ALTERNATIVE_NAME.dotted_string
# A server may name the hash, the signature algorithm or both in /csrattrs (RFC 7030 §4.5.2):
# the hash each OID asks for (hashlib name, None: one this agent does not compute) and the key
# type it implies ("ec", "rsa", or None for a bare hash: any key).
_HASH_REQUESTS: dict[str, tuple[str | None, str | None]] = {
    "2.16.840.1.101.3.4.2.1": ("sha256", None),  # id-sha256 (RFC 5758 §2)
    "2.16.840.1.101.3.4.2.2": ("sha384", None),
    "2.16.840.1.101.3.4.2.3": ("sha512", None),
    "2.16.840.1.101.3.4.2.4": ("sha224", None),
    "1.2.840.10045.4.3.1": ("sha224", "ec"),  # ecdsa-with-SHA224 (RFC 5758 §3.2)
    "1.2.840.10045.4.3.2": ("sha256", "ec"),
    "1.2.840.10045.4.3.3": ("sha384", "ec"),
    "1.2.840.10045.4.3.4": ("sha512", "ec"),
    "1.2.840.113549.1.1.11": ("sha256", "rsa"),  # sha256WithRSAEncryption (RFC 4055 §5)
    "1.2.840.113549.1.1.12": ("sha384", "rsa"),
    "1.2.840.113549.1.1.13": ("sha512", "rsa"),
    "1.2.840.113549.1.1.14": ("sha224", "rsa"),
}
# RFC 5758 §3.2: ecdsa-with-SHA* (asn1crypto's names), the parameters field absent
_ECDSA_WITH = {"sha256": "sha256_ecdsa", "sha384": "sha384_ecdsa", "sha512": "sha512_ecdsa"}
_ECDSA_NAMES = {
    "sha256": "ecdsa-with-SHA256",
    "sha384": "ecdsa-with-SHA384",
    "sha512": "ecdsa-with-SHA512",
}
# Attribute types a server may ask for that this agent recognises but has no value for: it
# leaves them out and says so (anything unrecognised MUST be ignored, RFC 7030 §4.5.2).
_UNFILLABLE = {
    "1.3.6.1.1.1.1.22": "macAddress",  # RFC 2307 §2.4 (the RFC 7030 §4.5.2 example)
    "1.2.840.113549.1.9.1": "emailAddress",  # PKCS#9, RFC 2985 §5.2.1
}
_ALGORITHM_NAMES = {
    "2.16.840.1.101.3.4.2.1": "SHA-256",
    "2.16.840.1.101.3.4.2.2": "SHA-384",
    "2.16.840.1.101.3.4.2.3": "SHA-512",
    "2.16.840.1.101.3.4.2.4": "SHA-224",
    "1.2.840.10045.4.3.1": "ecdsa-with-SHA224",
    "1.2.840.10045.4.3.3": "ecdsa-with-SHA384",
    "1.2.840.10045.4.3.4": "ecdsa-with-SHA512",
    "1.2.840.113549.1.1.1": "RSA",
    "1.2.840.113549.1.1.10": "RSASSA-PSS",
    "1.2.840.113549.1.1.11": "sha256WithRSAEncryption",
    "1.2.840.113549.1.1.12": "sha384WithRSAEncryption",
    "1.2.840.113549.1.1.13": "sha512WithRSAEncryption",
    "1.2.840.113549.1.1.14": "sha224WithRSAEncryption",
    "1.3.101.112": "Ed25519",
    "1.3.101.113": "Ed448",
    "1.2.840.10045.3.1.7": "secp256r1 (P-256)",
    "1.3.132.0.34": "secp384r1 (P-384)",
    "1.3.132.0.35": "secp521r1 (P-521)",
    "1.3.36.3.3.2.8.1.1.7": "brainpoolP256r1",
    "1.3.36.3.3.2.8.1.1.11": "brainpoolP384r1",
    "1.3.36.3.3.2.8.1.1.13": "brainpoolP512r1",
}
_CARD_ALGORITHM = "ECDSA P-256 with SHA-256"
_DEFAULT_DIGEST = "sha256"

# PKCS#9 (RFC 2985 §5.4.1): ub-challenge-password = 255; PrintableString's alphabet (X.680 §41.4)
_CHALLENGE_PASSWORD_MAX = 255
_PRINTABLE_RE = re.compile(r"[A-Za-z0-9 '()+,\-./:=?]*")

# Subject templates: attribute names allowed as template keys (RFC 4514 §3 short names).
_NAME_OIDS: dict[str, x509.ObjectIdentifier] = {
    "CN": NameOID.COMMON_NAME,
    "O": NameOID.ORGANIZATION_NAME,
    "OU": NameOID.ORGANIZATIONAL_UNIT_NAME,
    "C": NameOID.COUNTRY_NAME,
    "ST": NameOID.STATE_OR_PROVINCE_NAME,
    "L": NameOID.LOCALITY_NAME,
    "DC": NameOID.DOMAIN_COMPONENT,
    "UID": NameOID.USER_ID,
    "SERIALNUMBER": NameOID.SERIAL_NUMBER,
    "EMAILADDRESS": NameOID.EMAIL_ADDRESS,
}


@dataclass(frozen=True)
class CsrAttributes:
    """What a server's `/csrattrs` asks for (RFC 7030 §4.5.2, RFC 8951 §4).

    `oids` are the bare OIDs; `attributes` maps each Attribute type to the DER of its values.
    The derived fields interpret the well-known items; anything else stays available raw, and
    items that are neither an OID nor an Attribute are kept in `unknown` (they MUST be ignored,
    RFC 7030 §4.5.2, but are useful in diagnostics).
    """

    oids: tuple[str, ...] = ()
    attributes: dict[str, tuple[bytes, ...]] = field(default_factory=dict)
    #: the server wants a challengePassword (proof of possession, RFC 7030 §3.5)
    challenge_password: bool = False
    #: hash / signature algorithm OIDs asked for (e.g. ecdsa-with-SHA384)
    hash_oids: tuple[str, ...] = ()
    #: key algorithm OID -> parameter OIDs (e.g. id-ecPublicKey -> (secp384r1,))
    key_algorithms: dict[str, tuple[str, ...]] = field(default_factory=dict)
    #: extension OIDs named inside extensionRequest (as bare OIDs or as Extensions)
    extension_requests: tuple[str, ...] = ()
    #: DER of items that are neither an OID nor an Attribute
    unknown: tuple[bytes, ...] = ()

    @property
    def empty(self) -> bool:
        """Nothing asked (204, 404 or an empty SEQUENCE all mean this, RFC 7030 §4.5.2)."""
        return not (self.oids or self.attributes or self.unknown)


@dataclass(frozen=True)
class CsrDeviation:
    """One request of `/csrattrs` the CSR does not meet as asked, and what it carries instead.

    `instead` is what the CSR carries in its place ("" when the item is only left out: an
    attribute the agent has no value for); strict mode refuses a CSR with a substitute.
    """

    asked: str
    reason: str
    instead: str = ""

    @property
    def substitute(self) -> bool:
        return bool(self.instead)

    def __str__(self) -> str:
        """The warning of advisory mode: what was asked, what is sent, why."""
        sent = f"sending {self.instead}" if self.instead else "left out"
        return f"the EST server asks for {self.asked}; {sent}: {self.reason}"

    def refusal(self) -> str:
        """The error of strict mode: what was asked and what the card can do."""
        return f"the EST server asks for {self.asked}, but {self.reason}"


@dataclass(frozen=True)
class CsrFit:
    """How a CSR for one signer meets `/csrattrs`: the digest it is signed with (a hashlib
    name) and every request it does not meet as asked."""

    digest: str = _DEFAULT_DIGEST
    deviations: tuple[CsrDeviation, ...] = ()

    @property
    def signature_algorithm(self) -> str:
        return _ECDSA_NAMES[self.digest]


@dataclass(frozen=True)
class _Extension:
    oid: str
    critical: bool
    value_der: bytes  # the extnValue contents (DER of the extension's own type)


@dataclass(frozen=True)
class CsrBuilder:
    """An immutable PKCS#10 request description; `build(signer)` produces the DER."""

    _subject_der: bytes | None = None
    _san: _Extension | None = None
    _key_usage: bool = True
    _eku_client_auth: bool = False
    _challenge_password: str | None = None
    _attributes: CsrAttributes | None = None
    _strict: bool = True

    # --- setters (each returns a new builder) ------------------------------------------------

    def subject(self, name: SubjectSpec) -> CsrBuilder:
        """The subject as an `x509.Name`, (OID, value) pairs, or raw DER copied byte for byte.

        Raw DER is what re-enrollment uses (RFC 7030 §4.2.2): re-encoding a Name may change
        string types or attribute order, and servers compare the bytes.
        """
        if isinstance(name, bytes | bytearray):
            der = bytes(name)
            try:
                parsed = asn1_x509.Name.load(der, strict=True)
                parsed.native  # noqa: B018 - force the lazy parse to find errors now
            except (ValueError, TypeError) as exc:
                raise CsrError(f"subject is not a DER-encoded Name: {exc}") from None
            return replace(self, _subject_der=der)
        if isinstance(name, x509.Name):
            return replace(self, _subject_der=name.public_bytes())
        attributes = []
        for oid, value in name:
            try:
                attr_oid = oid if isinstance(oid, x509.ObjectIdentifier) else _oid(oid)
                attributes.append(x509.NameAttribute(attr_oid, value))
            except ValueError as exc:
                raise CsrError(f"invalid subject attribute {oid}={value!r}: {exc}") from None
        return replace(self, _subject_der=x509.Name(attributes).public_bytes())

    def subject_alt_names(
        self, names: Iterable[x509.GeneralName] | bytes, *, critical: bool = False
    ) -> CsrBuilder:
        """SubjectAltName as general names, or the raw DER of the extension value (GeneralNames)
        copied from the current certificate (RFC 7030 §4.2.2). An empty list removes it."""
        if isinstance(names, bytes | bytearray):
            der = bytes(names)
            try:
                parsed = asn1_x509.GeneralNames.load(der, strict=True)
                parsed.native  # noqa: B018 - force the lazy parse
            except (ValueError, TypeError) as exc:
                raise CsrError(f"subjectAltName is not DER GeneralNames: {exc}") from None
            return replace(self, _san=_Extension(_SAN_OID, critical, der))
        general_names = list(names)
        if not general_names:
            return replace(self, _san=None)
        der = x509.SubjectAlternativeName(general_names).public_bytes()
        return replace(
            self,
            _san=_Extension(_SAN_OID, critical, der),
        )

    def key_usage(self, digital_signature: bool = True) -> CsrBuilder:
        """Ask for keyUsage digitalSignature, critical (the default; RFC 5280 §4.2.1.3)."""
        return replace(self, _key_usage=digital_signature)

    def eku_client_auth(self, enabled: bool = True) -> CsrBuilder:
        """Ask for extendedKeyUsage id-kp-clientAuth: needed to re-enroll with this certificate
        as the TLS client credential (RFC 7030 §3.3.2)."""
        return replace(self, _eku_client_auth=enabled)

    def challenge_password(self, value: str | None) -> CsrBuilder:
        """The challengePassword attribute (PKCS#9): base64 of tls-unique / tls-exporter for
        proof of possession (RFC 7030 §3.5), or a server-specific enrollment code."""
        if value is not None and (not value or len(value) > _CHALLENGE_PASSWORD_MAX):
            raise CsrError(
                f"challengePassword must be 1..{_CHALLENGE_PASSWORD_MAX} characters"
                " (RFC 2985 §5.4.1)"
            )
        return replace(self, _challenge_password=value)

    def csr_attributes(
        self, attributes: CsrAttributes | None, *, strict: bool = True
    ) -> CsrBuilder:
        """Apply what `/csrattrs` asks (RFC 7030 §4.5.2): a digest the signer takes is used.

        `strict`: a key or digest the signer cannot provide, or a challengePassword asked for
        but not set, fails `build()` with `CsrError` naming what was asked and what the card
        can do. Otherwise the CSR carries what the signer can (see `fit`, which callers log).
        Unrecognised items are ignored either way."""
        return replace(self, _attributes=attributes, _strict=strict)

    def copy_from_certificate(self, certificate: x509.Certificate | bytes) -> CsrBuilder:
        """Subject and SubjectAltName copied raw from the certificate being renewed."""
        der = (
            certificate.public_bytes(serialization.Encoding.DER)
            if isinstance(certificate, x509.Certificate)
            else certificate
        )
        subject_der, san = raw_subject_and_san(der)
        builder = self.subject(subject_der)
        if san is None:
            return replace(builder, _san=None)
        san_der, critical = san
        return builder.subject_alt_names(san_der, critical=critical)

    # --- build -------------------------------------------------------------------------------

    def build(self, signer: Signer) -> bytes:
        """The DER CertificationRequest, signed with one `signer.sign_digest` call.

        Raises `CsrError` when the request cannot be built or does not verify; errors from the
        card (`CardError`) pass through unchanged so that their exit code and retry policy hold.
        """
        fit = self.fit(signer)
        self._check_server_requirements(fit)
        subject_der = self._subject_der if self._subject_der is not None else b"\x30\x00"
        if subject_der == b"\x30\x00" and self._san is None:
            raise CsrError("a CSR needs a subject or a subjectAltName (RFC 5280 §4.1.2.6)")
        public_key = signer.public_key()
        if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(
            public_key.curve, ec.SECP256R1
        ):
            raise CsrError(
                f"the signer's key is not P-256; this agent signs with {_CARD_ALGORITHM}"
            )
        spki_der = public_key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        try:
            info = csr.CertificationRequestInfo(
                {
                    "version": "v1",
                    "subject": asn1_x509.Name.load(subject_der),
                    "subject_pk_info": keys.PublicKeyInfo.load(spki_der),
                    "attributes": self._cri_attributes(),
                }
            )
            tbs = info.dump()
        except (ValueError, TypeError) as exc:
            raise CsrError(f"cannot encode the CertificationRequestInfo: {exc}") from None
        # RFC 2986 §4.2: the signature covers the DER of CertificationRequestInfo; the card
        # signs a digest computed here (RFC 5758 §3.2 ecdsa-with-SHA256/384/512).
        try:
            signature = signer.sign_digest(hashlib.new(fit.digest, tbs).digest())
        except CardError:
            raise
        except Exception as exc:
            raise CsrError(f"the signer failed: {type(exc).__name__}: {exc}") from exc
        try:
            request = csr.CertificationRequest(
                {
                    "certification_request_info": info,
                    # RFC 5758 §3.2: ecdsa-with-SHA* with the parameters field absent
                    "signature_algorithm": {"algorithm": _ECDSA_WITH[fit.digest]},
                    "signature": signature,
                }
            )
            der: bytes = request.dump()
        except (ValueError, TypeError) as exc:
            raise CsrError(f"cannot encode the CertificationRequest: {exc}") from None
        _verify(der, tbs, subject_der, spki_der)
        return der

    def _cri_attributes(self) -> list[csr.CRIAttribute]:
        attributes = []
        if self._challenge_password is not None:
            value = self._challenge_password
            # RFC 2985 §5.4.1: PrintableString when the characters allow it (libest and the
            # RFC 7030 §3.5 example use it), else UTF8String.
            choice = "printable_string" if _PRINTABLE_RE.fullmatch(value) else "utf8_string"
            attributes.append(
                csr.CRIAttribute(
                    {
                        "type": "challenge_password",
                        "values": [asn1_x509.DirectoryString(name=choice, value=value)],
                    }
                )
            )
        extensions = self._extensions()
        if extensions:
            attributes.append(
                csr.CRIAttribute({"type": "extension_request", "values": [extensions]})
            )
        return attributes

    def _extensions(self) -> list[asn1_x509.Extension]:
        result = []
        if self._key_usage:
            result.append(
                asn1_x509.Extension(
                    {
                        "extn_id": "key_usage",
                        "critical": True,
                        "extn_value": asn1_x509.KeyUsage({"digital_signature"}),
                    }
                )
            )
        if self._eku_client_auth:
            result.append(
                asn1_x509.Extension(
                    {
                        "extn_id": "extended_key_usage",
                        "critical": False,
                        "extn_value": asn1_x509.ExtKeyUsageSyntax(["client_auth"]),
                    }
                )
            )
        if self._san is not None:
            # The DER goes into the OCTET STRING as given: a copied SAN stays byte-equal.
            extension = asn1_x509.Extension(
                {"extn_id": self._san.oid, "critical": self._san.critical}
            )
            extension["extn_value"] = asn1_x509.ParsableOctetString(self._san.value_der)
            result.append(extension)
        return result

    def fit(self, signer: Signer) -> CsrFit:
        """How the CSR `build(signer)` makes meets `/csrattrs` (RFC 7030 §4.5.2): the digest
        (the first one asked that the signer takes, else SHA-256) and what is not met as asked.
        Pure: asks the signer only for its public key and `digest_algorithms`."""
        attrs = self._attributes
        # Asking a card signer what it takes costs an APDU (GET DATA): only when the server
        # asks for a digest other than SHA-256, which every signer takes (IoT.05 table B).
        if attrs is None or all(
            _HASH_REQUESTS.get(o, (None, None))
            in ((_DEFAULT_DIGEST, "ec"), (_DEFAULT_DIGEST, None))
            for o in attrs.hash_oids
        ):
            takes: tuple[str, ...] = (_DEFAULT_DIGEST,)
        else:
            takes = tuple(d for d in signer.digest_algorithms if d in _ECDSA_WITH)
        default = _DEFAULT_DIGEST if _DEFAULT_DIGEST in takes or not takes else takes[0]
        if attrs is None:
            return CsrFit(default)
        digest, deviations = _fit_digest(attrs.hash_oids, takes, default)
        deviations += _fit_key(attrs.key_algorithms, signer.public_key())
        deviations += _fit_unfillable(attrs)
        return CsrFit(digest, deviations)

    def _check_server_requirements(self, fit: CsrFit) -> None:
        """Strict mode: refuse, before the card signs, a CSR that does not meet `/csrattrs`."""
        attrs = self._attributes
        if attrs is None or not self._strict:
            return
        refused = [d for d in fit.deviations if d.substitute]
        if refused:
            raise CsrError("; and ".join(d.refusal() for d in refused))
        if attrs.challenge_password and self._challenge_password is None:
            raise CsrError(
                "the EST server asks for a challengePassword (proof of possession, RFC 7030"
                " §3.5) but none was given"
            )


def _fit_digest(
    hash_oids: Sequence[str], takes: tuple[str, ...], default: str
) -> tuple[str, tuple[CsrDeviation, ...]]:
    """The first digest asked that the signer takes with an EC key, else `default`."""
    if not hash_oids:
        return default, ()
    for oid in hash_oids:
        digest, key_type = _HASH_REQUESTS.get(oid, (None, None))
        if digest in takes and key_type in (None, "ec"):
            return digest, ()
    asked = " or ".join(_name_of(o) for o in hash_oids)
    reason = f"the card signs {_digest_names(takes)} digests only ({_ECDSA_NAMES[default]})"
    return default, (CsrDeviation(asked, reason, _ECDSA_NAMES[default]),)


def _digest_names(takes: tuple[str, ...]) -> str:
    return ", ".join(d.upper().replace("SHA", "SHA-") for d in takes) or "no"


def _fit_key(
    key_algorithms: Mapping[str, tuple[str, ...]], key: ec.EllipticCurvePublicKey
) -> tuple[CsrDeviation, ...]:
    """RFC 7030 §4.5.2: the key type (and curve) asked, against the key the card generated."""
    holds = "P-256 (secp256r1)" if isinstance(key.curve, ec.SECP256R1) else key.curve.name
    reason, instead = f"the card makes EC {holds} keys only", f"an EC {holds} key"
    deviations = []
    for algorithm, curves in key_algorithms.items():
        if algorithm != OID_EC_PUBLIC_KEY:
            deviations.append(CsrDeviation(f"{_name_of(algorithm)} keys", reason, instead))
        elif curves and OID_SECP256R1 not in curves:
            asked = "an EC key on " + " or ".join(_name_of(c) for c in curves)
            deviations.append(CsrDeviation(asked, reason, instead))
    return tuple(deviations)


def _fit_unfillable(attrs: CsrAttributes) -> tuple[CsrDeviation, ...]:
    """Attributes and extensions asked that the agent recognises but has no value for."""
    asked = [*attrs.oids, *attrs.attributes, *attrs.extension_requests]
    names = dict.fromkeys(_UNFILLABLE[o] + f" ({o})" for o in asked if o in _UNFILLABLE)
    return tuple(CsrDeviation(name, "the agent has no value for it") for name in names)


def _name_of(oid: str) -> str:
    name = _ALGORITHM_NAMES.get(oid)
    return f"{name} ({oid})" if name else oid


def _oid(dotted: str) -> x509.ObjectIdentifier:
    upper = dotted.upper()
    if upper in _NAME_OIDS:
        return _NAME_OIDS[upper]
    return x509.ObjectIdentifier(dotted)


def _verify(der: bytes, tbs: bytes, subject_der: bytes, spki_der: bytes) -> None:
    """Re-read the request with cryptography: signature, key and the raw subject must hold."""
    try:
        request = x509.load_der_x509_csr(der)
        valid = request.is_signature_valid
        request_spki = request.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    except (ValueError, TypeError) as exc:
        raise CsrError(f"the built CSR does not parse: {exc}") from None
    if not valid:
        raise CsrError("the CSR signature does not verify with the signer's public key")
    if request_spki != spki_der:
        raise CsrError("the CSR carries another public key than the signer's")
    if request.tbs_certrequest_bytes != tbs:
        raise CsrError("the CSR's signed content differs from what was built")
    if csr.CertificationRequestInfo.load(tbs)["subject"].dump() != subject_der:
        raise CsrError("the CSR subject was re-encoded")


# --- helpers for callers ---------------------------------------------------------------------


def raw_subject_and_san(certificate_der: bytes) -> tuple[bytes, tuple[bytes, bool] | None]:
    """The certificate's Subject DER and its SubjectAltName extnValue DER with the critical
    flag, exactly as encoded in the certificate (RFC 7030 §4.2.2)."""
    try:
        cert = asn1_x509.Certificate.load(certificate_der, strict=True)
        tbs = cert["tbs_certificate"]
        subject_der: bytes = tbs["subject"].dump()
        san: tuple[bytes, bool] | None = None
        for extension in tbs["extensions"]:
            if extension["extn_id"].dotted == _SAN_OID:
                san = (extension["extn_value"].contents, bool(extension["critical"].native))
    except (ValueError, TypeError, KeyError) as exc:
        raise CsrError(f"cannot read subject/SAN of the current certificate: {exc}") from None
    return subject_der, san


def parse_subject(text: str) -> x509.Name:
    """An RFC 4514 string ("CN=dev-1,O=Acme") as a Name (command line and configuration)."""
    try:
        return x509.Name.from_rfc4514_string(text, {"SERIALNUMBER": NameOID.SERIAL_NUMBER})
    except ValueError as exc:
        raise CsrError(f"invalid subject {text!r}: {exc}") from None


def parse_san(text: str) -> x509.GeneralName:
    """``dns:host``, ``ip:192.0.2.1`` / ``ip:2001:db8::1`` or ``uri:urn:...`` as a GeneralName."""
    kind, sep, value = text.partition(":")
    kind = kind.strip().lower()
    if not sep or not value:
        raise CsrError(f"invalid SAN {text!r}: expected dns:NAME, ip:ADDRESS or uri:URI")
    try:
        if kind == "dns":
            return x509.DNSName(value)
        if kind == "ip":
            return x509.IPAddress(ipaddress.ip_address(value))
        if kind == "uri":
            return x509.UniformResourceIdentifier(value)
    except ValueError as exc:
        raise CsrError(f"invalid SAN {text!r}: {exc}") from None
    raise CsrError(f"invalid SAN type {kind!r} in {text!r}: expected dns, ip or uri")


def subject_from_template(template: Mapping[str, str], values: Mapping[str, str]) -> x509.Name:
    """A Name from a configured template such as ``{"CN": "{iccid}", "O": "Acme"}``.

    Keys are RFC 4514 short names (CN, O, OU, C, ST, L, DC, UID, serialNumber, emailAddress) or
    dotted OIDs, in RDN order. Placeholders are plain ``{name}`` looked up in `values`; format
    specs, conversions and attribute access are refused so a template cannot reach into objects.
    """
    attributes = []
    for key, pattern in template.items():
        try:
            oid = _oid(key)
        except ValueError:
            raise CsrError(f"unknown subject attribute {key!r} in the template") from None
        value = _fill(pattern, values)
        if not value:
            raise CsrError(f"subject attribute {key} is empty after filling the template")
        try:
            attributes.append(x509.NameAttribute(oid, value))
        except ValueError as exc:
            raise CsrError(f"invalid subject attribute {key}={value!r}: {exc}") from None
    return x509.Name(attributes)


#: one configured template: (the configuration key it came from, named in every error;
#: an RFC 4514 short name for a subject attribute, or "dns" / "uri" for a SAN; the pattern)
KeyedTemplate: TypeAlias = tuple[str, str, str]


def render_subject(
    subject: Sequence[KeyedTemplate], sans: Sequence[KeyedTemplate], values: Mapping[str, str]
) -> tuple[x509.Name, tuple[x509.GeneralName, ...]]:
    """The first enrollment's Subject and SubjectAltNames from configured templates, in order.

    `values` holds what the device knows (``{"iccid": ..., "imei": ...}``: leave ``imei`` out
    when it is not known). The templates come from the configuration, so a template that cannot
    be filled is a `ConfigError` naming its key (``subject.san_uri: placeholder {imei} ...``).
    """
    rdns: list[x509.RelativeDistinguishedName] = []
    for key, short_name, pattern in subject:
        _check_placeholders(key, pattern, values)
        try:
            rdns.extend(subject_from_template({short_name: pattern}, values).rdns)
        except CsrError as exc:
            raise ConfigError(f"{key}: {exc}") from None
    general_names: list[x509.GeneralName] = []
    for key, kind, pattern in sans:
        _check_placeholders(key, pattern, values)
        try:
            general_names.append(parse_san(f"{kind}:{_fill(pattern, values)}"))
        except CsrError as exc:
            raise ConfigError(f"{key}: {exc}") from None
    return x509.Name(rdns), tuple(general_names)


def _placeholders(pattern: str) -> list[str]:
    """The ``{name}`` fields of a template; CsrError for anything but plain names."""
    try:
        parsed = list(string.Formatter().parse(pattern))
    except ValueError as exc:
        raise CsrError(f"invalid subject template {pattern!r}: {exc}") from None
    names = []
    for _, field_name, spec, conversion in parsed:
        if field_name is None:
            continue
        if spec or conversion or not field_name.isidentifier():
            raise CsrError(f"subject template {pattern!r}: use plain {{name}} placeholders")
        names.append(field_name)
    return names


def _check_placeholders(key: str, pattern: str, values: Mapping[str, str]) -> None:
    """A placeholder the device has no value for (no IMEI behind a PC/SC reader) is named with
    the configuration key before anything is filled."""
    try:
        names = _placeholders(pattern)
    except CsrError as exc:
        raise ConfigError(f"{key}: {exc}") from None
    for name in names:
        if name not in values:
            known = ", ".join(f"{{{n}}}" for n in sorted(values)) or "none"
            raise ConfigError(
                f"{key}: placeholder {{{name}}} has no value for this device (known: {known})"
            )


def _fill(pattern: str, values: Mapping[str, str]) -> str:
    """The template with its placeholders replaced (`{{` and `}}` are literal braces)."""
    _placeholders(pattern)  # refuses specs, conversions and attribute access first
    parts = []
    for literal, field_name, _, _ in string.Formatter().parse(pattern):
        parts.append(literal)
        if field_name is None:
            continue
        if field_name not in values:
            known = ", ".join(sorted(values)) or "none"
            raise CsrError(
                f"unknown placeholder {{{field_name}}} in subject template (known: {known})"
            )
        parts.append(values[field_name])
    return "".join(parts)
