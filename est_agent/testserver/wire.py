"""Pure codecs of the test server: EST paths, media types, base64 bodies, PKCS#7, csrattrs.

No sockets here: the request handler in `server.py` calls these with bytes and strings, and the
unit tests call them with vectors. Every function that judges client input raises
`HttpRefusal` with the status a strict server would answer.
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import enum
import math
import re
from dataclasses import dataclass
from datetime import datetime, timedelta

from asn1crypto import core
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, pkcs7

from est_agent.errors import EstError, UsageError

__all__ = [
    "ENROLL_OPERATIONS",
    "EST_PREFIX",
    "OPERATIONS",
    "UNSUPPORTED_OPERATIONS",
    "CsrAttrsKind",
    "EstPath",
    "HttpRefusal",
    "RetryAfterFormat",
    "csrattrs_body",
    "decode_base64_body",
    "encode_base64_body",
    "encode_certs_only",
    "encode_csrattrs",
    "format_retry_after",
    "media_type_of",
    "parse_basic_authorization",
    "parse_duration",
    "parse_est_path",
    "parse_listen",
]

EST_PREFIX = "/.well-known/est/"
# RFC 7030 §3.2.2: mandatory and optional operations this server answers.
OPERATIONS = frozenset({"cacerts", "csrattrs", "simpleenroll", "simplereenroll"})
ENROLL_OPERATIONS = frozenset({"simpleenroll", "simplereenroll"})
# Optional operations the server knows but does not offer: 501, like many real servers.
UNSUPPORTED_OPERATIONS = frozenset({"serverkeygen", "fullcmc"})

# RFC 7030 §3.2.2: a label is one path segment; keep it to a safe token so that it can be
# echoed in messages and log lines without escaping.
_LABEL_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_B64_ALPHABET_RE = re.compile(rb"[A-Za-z0-9+/]*={0,2}")
# RFC 8951 §3: receivers tolerate CR, LF, space and tab inside base64 bodies.
_B64_WHITESPACE = b" \t\r\n"


class HttpRefusal(EstError):
    """Raised inside the test server to answer a request with an HTTP error status.

    `text` is the short plain-text body sent to the client; `headers` are extra response headers
    (e.g. Retry-After, Allow); `challenges` are WWW-Authenticate values, one field each.
    """

    def __init__(
        self,
        status: int,
        text: str,
        headers: dict[str, str] | None = None,
        *,
        challenges: tuple[str, ...] = (),
    ) -> None:
        self.status = status
        self.text = text
        self.headers = dict(headers or {})
        self.challenges = challenges
        super().__init__(f"HTTP {status}: {text}")


@dataclass(frozen=True)
class EstPath:
    """A parsed `/.well-known/est/[label/]operation` request path."""

    label: str | None
    operation: str


def parse_est_path(path: str) -> EstPath:
    """Split an EST request target into label and operation (RFC 7030 §3.2.2).

    A query string is ignored (servers do); anything else that does not fit the grammar is 404.
    The operation is returned even when it is unsupported, so that the caller can answer 501.
    """
    target = path.split("?", 1)[0]
    if not target.startswith(EST_PREFIX):
        raise HttpRefusal(404, "not an EST path (expected /.well-known/est/...)")
    segments = target[len(EST_PREFIX) :].split("/")
    if len(segments) == 1:
        label, operation = None, segments[0]
    elif len(segments) == 2:
        label, operation = segments
        if not _LABEL_RE.fullmatch(label):
            raise HttpRefusal(404, "malformed EST label")
    else:
        raise HttpRefusal(404, "too many path segments")
    if operation not in OPERATIONS and operation not in UNSUPPORTED_OPERATIONS:
        raise HttpRefusal(404, "unknown EST operation")
    return EstPath(label=label, operation=operation)


def media_type_of(content_type: str | None) -> str:
    """The media type of a Content-Type value without parameters, lower-cased."""
    if not content_type:
        return ""
    return content_type.split(";", 1)[0].strip().lower()


def decode_base64_body(body: bytes) -> bytes:
    """Decode an EST request body: base64 of DER, wrapped or not (RFC 7030 §4.2.1, RFC 8951 §3).

    CR, LF, space and tab are ignored anywhere; any other non-alphabet byte (PEM armour included)
    and bad padding are refused, as a strict server would.
    """
    compact = body.translate(None, _B64_WHITESPACE)
    if not compact:
        raise HttpRefusal(400, "empty request body")
    if not _B64_ALPHABET_RE.fullmatch(compact) or len(compact) % 4:
        raise HttpRefusal(400, "request body is not base64 (RFC 7030 §4.2.1)")
    try:
        return base64.b64decode(compact, validate=True)
    except binascii.Error:
        raise HttpRefusal(400, "request body is not base64 (RFC 7030 §4.2.1)") from None


def encode_base64_body(der: bytes, *, wrap: bool = True) -> bytes:
    """Base64 for a response body: 64-character lines ending in CRLF, or one unwrapped line.

    Wrapped is what OpenSSL-based clients expect. RFC 8951 §3 tells receivers to ignore line
    breaks, yet strongSwan's `pki --est` only parses the unwrapped form (tests/testserver/
    test_interop.py shows it failing on wrapped bodies), hence the switch.
    """
    text = base64.b64encode(der)
    if not wrap:
        return text
    lines = [text[i : i + 64] for i in range(0, len(text), 64)]
    return b"".join(line + b"\r\n" for line in lines)


def encode_certs_only(certificates: list[x509.Certificate]) -> bytes:
    """DER of a degenerate certs-only SignedData holding `certificates` (RFC 7030 §4.1.3)."""
    return pkcs7.serialize_certificates(certificates, Encoding.DER)


class CsrAttrsKind(enum.Enum):
    """What `/csrattrs` answers (`--csrattrs`)."""

    NONE = "none"  # 204 No Content: nothing asked
    EMPTY = "empty"  # an empty SEQUENCE, which also means nothing asked (RFC 8951 §4)
    # Only the challengePassword OID: PoP wanted.
    CHALLENGE_PASSWORD = "challengePassword"  # noqa: S105 - an option name, not a secret
    P256 = "p256"  # challengePassword, EC P-256 key, ecdsa-with-SHA256: what a card can do
    RFC8951 = "rfc8951"  # the RFC 7030 §4.5.2 example (as clarified by RFC 8951 §4): P-384
    # Cisco libest 3.2.0p's example server (example/server/estserver.c) with no EST_CSR_ATTR:
    # bare OIDs macAddress, emailAddress, secp384r1 and sha384, sent as one unwrapped base64
    # line followed by the C string's terminating NUL (`*csr_len = sizeof(TEST_CSR)`), which
    # its Content-Length counts.
    LIBEST_DEFAULT = "libest-default"


_OID_CHALLENGE_PASSWORD = "1.2.840.113549.1.9.7"  # noqa: S105 - an OID, not a secret
_OID_EXTENSION_REQUEST = "1.2.840.113549.1.9.14"
_OID_EC_PUBLIC_KEY = "1.2.840.10045.2.1"
_OID_PRIME256V1 = "1.2.840.10045.3.1.7"
_OID_SECP384R1 = "1.3.132.0.34"
_OID_MAC_ADDRESS = "1.3.6.1.1.1.1.22"
_OID_EMAIL_ADDRESS = "1.2.840.113549.1.9.1"  # PKCS#9 (RFC 2985 §5.2.1)
_OID_SHA384 = "2.16.840.1.101.3.4.2.2"
_OID_ECDSA_SHA256 = "1.2.840.10045.4.3.2"
_OID_ECDSA_SHA384 = "1.2.840.10045.4.3.3"


def _oid(dotted: str) -> bytes:
    return bytes(core.ObjectIdentifier(dotted).dump())


def _tlv(tag: int, content: bytes) -> bytes:
    # DER definite length: short form below 128, long form otherwise (X.690 §8.1.3).
    n = len(content)
    if n < 0x80:
        return bytes([tag, n]) + content
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(size)]) + size + content


def _sequence(*items: bytes) -> bytes:
    return _tlv(0x30, b"".join(items))


def _attribute(oid: str, *values: bytes) -> bytes:
    # Attribute ::= SEQUENCE { type OID, values SET SIZE(1..MAX) OF ANY }
    return _sequence(_oid(oid), _tlv(0x31, b"".join(values)))


def encode_csrattrs(kind: CsrAttrsKind) -> bytes | None:
    """DER of the CsrAttrs SEQUENCE for `kind`, or None for "answer 204"."""
    if kind is CsrAttrsKind.NONE:
        return None
    if kind is CsrAttrsKind.EMPTY:
        return _sequence()
    if kind is CsrAttrsKind.CHALLENGE_PASSWORD:
        return _sequence(_oid(_OID_CHALLENGE_PASSWORD))
    if kind is CsrAttrsKind.P256:
        return _sequence(
            _oid(_OID_CHALLENGE_PASSWORD),
            _attribute(_OID_EC_PUBLIC_KEY, _oid(_OID_PRIME256V1)),
            _oid(_OID_ECDSA_SHA256),
        )
    if kind is CsrAttrsKind.LIBEST_DEFAULT:
        return _sequence(
            _oid(_OID_MAC_ADDRESS),
            _oid(_OID_EMAIL_ADDRESS),
            _oid(_OID_SECP384R1),
            _oid(_OID_SHA384),
        )
    # The published example keeps a bare OID where an Extensions value belongs; clients must
    # parse it leniently, which is exactly why it is offered verbatim.
    return _sequence(
        _oid(_OID_CHALLENGE_PASSWORD),
        _attribute(_OID_EC_PUBLIC_KEY, _oid(_OID_SECP384R1)),
        _attribute(_OID_EXTENSION_REQUEST, _oid(_OID_MAC_ADDRESS)),
        _oid(_OID_ECDSA_SHA384),
    )


def csrattrs_body(kind: CsrAttrsKind, *, wrap: bool, trailing_nul: bool) -> bytes | None:
    """The `/csrattrs` body for `kind` (base64 of the DER, RFC 7030 §4.5.2), or None for 204.

    `trailing_nul` appends one 00 byte after the base64 text, as libest does; the
    ``libest-default`` profile always has it and is never wrapped, as libest sends it.
    """
    der = encode_csrattrs(kind)
    if der is None:
        return None
    if kind is CsrAttrsKind.LIBEST_DEFAULT:
        return base64.b64encode(der) + b"\x00"
    body = encode_base64_body(der, wrap=wrap)
    return body + b"\x00" if trailing_nul else body


class RetryAfterFormat(enum.Enum):
    """How Retry-After is written (RFC 9110 §10.2.3 allows both)."""

    SECONDS = "seconds"
    HTTP_DATE = "http-date"


def format_retry_after(delay_s: float, fmt: RetryAfterFormat, now: datetime) -> str:
    """Retry-After value for a wait of `delay_s` from `now` (an aware UTC datetime).

    Rounded up to whole seconds: both forms have one-second resolution and a client must
    never be told a time earlier than the one the server will accept.
    """
    seconds = max(0, math.ceil(delay_s))
    if fmt is RetryAfterFormat.SECONDS:
        return str(seconds)
    when = now.replace(microsecond=0) + timedelta(seconds=seconds + (1 if now.microsecond else 0))
    return email.utils.format_datetime(when, usegmt=True)


def parse_basic_authorization(value: str | None) -> tuple[str, str] | None:
    """User and password of an `Authorization: Basic` header (RFC 7617), or None.

    None means "no usable Basic credentials": absent, another scheme, or malformed.
    """
    if not value:
        return None
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "basic" or not token:
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, sep, password = decoded.partition(":")
    if not sep:
        return None
    return user, password


_DURATION_RE = re.compile(r"(\d+)([smhd]?)")
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> int:
    """Seconds in `90`, `90s`, `5m`, `2h` or `30d`; raises UsageError otherwise."""
    match = _DURATION_RE.fullmatch(text.strip())
    if not match:
        raise UsageError(f"not a duration: {text!r} (use e.g. 90s, 5m, 2h, 30d)")
    return int(match.group(1)) * _DURATION_UNITS[match.group(2)]


def parse_listen(text: str) -> tuple[str, int]:
    """Host and port of `HOST:PORT` or `[IPV6]:PORT`; port 0 asks for a free port."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise UsageError(f"not HOST:PORT: {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    port = int(port_text)
    if port > 65535:
        raise UsageError(f"port out of range: {port}")
    return host, port
