"""The agent's configuration: frozen dataclasses read from TOML and validated once.

    Config
    ├── card       CardConfig       which reader, which IoT SAFE applet, how to talk to it
    ├── pkcs11     Pkcs11Config     the PKCS#11 module and user PIN (keys in a token)
    ├── bootstrap  BootstrapConfig  the factory credential (on the SIM, or PEM files)
    ├── slots      (SlotConfig, SlotConfig)  the two operational slots ([[slot]] in TOML)
    ├── est        EstConfig        server URL, label, trust, PoP, Basic credentials, proxy
    ├── subject    SubjectConfig    subject / SAN templates for the first enrollment
    ├── renewal    RenewalConfig    when renewal is due, its per-device offset, retry cap
    └── paths      PathsConfig      state directory, PEM export, deploy hook

Every TOML key is a dataclass field of the same name (``[[slot]]`` is ``Config.slots``), so the
parser, the example file and the README can be checked against each other by a test. Each
dataclass validates itself at construction, so an invalid configuration cannot exist in memory
whether it came from a file or from code; errors are `ConfigError` (exit 78) naming the full
key, e.g. ``est.pop``.

Nothing is read from disk at parse time apart from the configuration file itself: PEM files,
the trust anchor, the Basic and proxy passwords and (``est.proxy = "env"``) ``HTTPS_PROXY`` are
read when used, so that ``status`` works with a missing trust anchor and the password never
sits in a long-lived object (or in its repr).
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import re
import string
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias, TypeVar
from urllib.parse import urlsplit

from est_agent.card.uri import DEFAULT_AID, IotSafeRef, ObjectKind, UiccPath, parse_card_uri
from est_agent.errors import ConfigError, InputError, UsageError
from est_agent.est.url import est_url
from est_agent.fileio import CONFIG_LIMIT_BYTES, read_bounded
from est_agent.passwords import has_control_character, read_secret
from est_agent.pkcs11_uri import Pkcs11Uri, is_pkcs11_uri, parse_pkcs11_uri

if TYPE_CHECKING:
    # imported where a proxy is configured or used: a configuration without one (most, and
    # `run` with nothing due) does not load the proxy URL parser
    from est_agent.est.proxy import HttpsProxy, ProxyUrl

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "DEFAULT_SLOTS",
    "PLACEHOLDERS",
    "BootstrapConfig",
    "CardConfig",
    "CertificateRef",
    "Config",
    "CsrAttrsMode",
    "EstConfig",
    "HttpAuth",
    "KeyRef",
    "PathsConfig",
    "Pkcs11Config",
    "PopMode",
    "RenewalConfig",
    "SlotConfig",
    "SubjectConfig",
    "TrustAnchorRef",
    "UiccChannel",
    "config_from_dict",
    "config_keys",
    "load_config",
    "parse_config",
]

DEFAULT_CONFIG_PATH = Path("/etc/est-agent/est-agent.toml")

#: Template placeholders for subject and SAN values, with stand-ins used to check templates at
#: load time (the real values are only known once the card has been read).
# ub-common-name, ub-organization-name, ub-serial-number (RFC 5280 Appendix A.1)
_UB_NAME = 64
PLACEHOLDERS: Mapping[str, str] = {"iccid": "8988211000000000000", "imei": "350000000000000"}

#: A private key: an IoT SAFE key on the card, a key in a PKCS#11 token, or a PEM file
#: (file-based bootstrap only).
KeyRef: TypeAlias = IotSafeRef | Pkcs11Uri | Path
#: A certificate: an IoT SAFE file container, a UICC EF, a token object, or a PEM file.
CertificateRef: TypeAlias = IotSafeRef | UiccPath | Pkcs11Uri | Path
#: TLS trust anchor for the EST server: a PEM file, or a certificate stored on the SIM / token.
TrustAnchorRef: TypeAlias = Path | IotSafeRef | UiccPath | Pkcs11Uri

_CARD_SCHEMES = ("iotsafe:", "uicc:", "pkcs11:")
_READER_SCHEMES = ("pcsc", "sim", "modem")
_AID_BYTES = (5, 16)  # ISO/IEC 7816-4 §12.2.3: RID (5 bytes) + PIX (up to 11)
_MAX_TIMEOUT_S = 3600.0
# Sanity bounds: a larger value is a unit mistake (ms for s), not a policy.
_MAX_DELAY_S = 30 * 86400.0
_ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SLOT_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,15}")
#: (configuration key, RFC 4514 short name or SAN kind, pattern): csr.KeyedTemplate
_Template: TypeAlias = tuple[str, str, str]
# Subject attributes of [subject] and their RFC 4514 names for csr.render_subject.
_SUBJECT_ATTRIBUTES = (
    ("common_name", "CN"),
    ("organization", "O"),
    ("serial_number", "serialNumber"),
)


class PopMode(Enum):
    """Proof-of-possession (RFC 7030 §3.5): bind the CSR to the TLS session, or not."""

    # bind when /csrattrs lists challengePassword: RFC 8951 §4, a server that requires the
    # linking says so there (the binding then follows the TLS version), else send none
    AUTO = "auto"
    TLS_UNIQUE = "tls-unique"  # RFC 5929: forces TLS 1.2
    TLS_EXPORTER = "tls-exporter"  # RFC 9266: forces TLS 1.3
    OFF = "off"


class CsrAttrsMode(Enum):
    """How the server's `/csrattrs` is used (RFC 7030 §4.5; RFC 8951 §4: it is advice).

    ``advisory``: fetched, and what the card can meet is honoured; what it cannot (another
    curve, a digest the card does not sign, attributes the agent has no value for) or an
    answer that cannot be parsed is logged as a warning and the CSR goes without it.
    ``strict``: an unusable answer stops the run (76) and a request the card cannot meet
    stops it before the card signs (65). ``off``: not fetched at all.
    """

    ADVISORY = "advisory"
    STRICT = "strict"
    OFF = "off"


class HttpAuth(Enum):
    """How the HTTP account (``est.basic_username`` and its password) answers the server.

    Credentials only ever go inside the verified TLS session, to the configured server
    (RFC 7030 §3.2.3); the EST client (``EstAuth``) says more.
    """

    AUTO = "auto"  # Basic pre-emptively; a Digest challenge answered with Digest
    BASIC = "basic"  # RFC 7617, pre-emptively; Digest challenges not answered
    DIGEST = "digest"  # RFC 7616 only: the password itself never travels


class UiccChannel(Enum):
    """Where the UICC file commands (SELECT / READ / UPDATE BINARY of the certificate EFs) run.

    The IoT SAFE applet always gets a logical channel of its own (a SELECT by FID on its channel
    would go to the applet); the file commands need another one (TS 102 221 §11.1.17).
    """

    AUTO = "auto"  # basic for PC/SC readers and the virtual SIM, logical for modems
    LOGICAL = "logical"  # MANAGE CHANNEL: leaves the modem's basic channel alone
    BASIC = "basic"  # channel 0: two APDUs fewer per run where nothing else uses it

    def resolve(self, reader: str) -> UiccChannel:
        """AUTO made concrete: a modem's baseband owns channel 0 (its current EF must not move
        under it); a reader dedicated to this agent does not."""
        if self is not UiccChannel.AUTO:
            return self
        modem = reader.lower().startswith("modem:")
        return UiccChannel.LOGICAL if modem else UiccChannel.BASIC


# --- small validators ------------------------------------------------------------------------


def _fail(key: str, problem: str) -> ConfigError:
    return ConfigError(f"{key}: {problem}")


def _check_type(key: str, value: object, expected: type | tuple[type, ...]) -> None:
    types = expected if isinstance(expected, tuple) else (expected,)
    # bool is an int subclass: `timeout_s = true` must not pass as 1.
    wrong_bool = isinstance(value, bool) and bool not in types
    if wrong_bool or not isinstance(value, types):
        raise _fail(key, f"expected {_type_name_of(expected)}, got {_toml_type(value)}")


def _type_name_of(expected: type | tuple[type, ...]) -> str:
    types = expected if isinstance(expected, tuple) else (expected,)
    if set(types) == {int, float}:
        return "a number"
    names = {
        str: "a string",
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        tuple: "an array",
        list: "an array",
        dict: "a table",
    }
    return " or ".join(names.get(t, t.__name__) for t in types)


def _toml_type(value: object) -> str:
    """The TOML name of a parsed value's type, for error messages."""
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list | tuple):
        return "array"
    if isinstance(value, dict):
        return "table"
    if isinstance(value, datetime.datetime):
        return "date-time"
    if isinstance(value, datetime.date):
        return "date"
    if isinstance(value, datetime.time):
        return "time"
    return type(value).__name__


def _proxy_url(key: str, text: str, *, assume_http: bool = False) -> ProxyUrl:
    from est_agent.est.proxy import parse_proxy_url

    try:
        return parse_proxy_url(text, assume_http=assume_http)
    except InputError as exc:
        raise _fail(key, str(exc)) from None


def _check_seconds(key: str, value: float, *, allow_zero: bool, maximum: float) -> None:
    _check_type(key, value, (int, float))
    # Compared without float(): a huge integer would overflow it. NaN fails both comparisons.
    in_range = (value >= 0 if allow_zero else value > 0) and value <= maximum
    if not in_range:
        bound = ">= 0" if allow_zero else "> 0"
        raise _fail(key, f"expected seconds {bound} and <= {maximum:g}, got {value!r}")


def _card_uri_kind(ref: IotSafeRef | UiccPath | Pkcs11Uri | Path) -> str:
    if isinstance(ref, Path):
        return "a file path"
    if isinstance(ref, Pkcs11Uri):
        return f"a pkcs11: {ref.type or 'object'} URI"
    if isinstance(ref, UiccPath):
        return "a uicc:path= EF"
    return {
        ObjectKind.PRIVATE_KEY: "an IoT SAFE key",
        ObjectKind.PUBLIC_KEY: "an IoT SAFE public key",
        ObjectKind.FILE: "an IoT SAFE file",
        ObjectKind.SECRET_KEY: "an IoT SAFE secret key",
    }[ref.kind]


def _fill_template(key: str, pattern: str, values: Mapping[str, str]) -> str:
    """Fill a template with the rules of csr.render_subject (plain ``{name}`` only), with the
    standard library alone: the load-time check of every subject and SAN template."""
    parts = []
    try:
        parsed = list(string.Formatter().parse(pattern))
    except ValueError as exc:
        raise _fail(key, f"invalid template {pattern!r}: {exc}") from None
    for literal, name, spec, conversion in parsed:
        parts.append(literal)
        if name is None:
            continue
        if spec or conversion or not name.isidentifier():
            raise _fail(key, f"template {pattern!r}: use plain {{name}} placeholders")
        if name not in values:
            raise _fail(key, _unknown_placeholder(name))
        parts.append(values[name])
    return "".join(parts)


def _unknown_placeholder(name: str) -> str:
    if name in PLACEHOLDERS:
        return f"placeholder {{{name}}} has no value for this device"
    known = ", ".join(f"{{{n}}}" for n in PLACEHOLDERS)
    return f"unknown placeholder {{{name}}} (known: {known})"


# --- the sections ----------------------------------------------------------------------------

#: the virtual SIM's writable public key object (sim/personalize.py PEER_PUBLIC_KEY_ID)
_PEER_PUBLIC_KEY = IotSafeRef(ObjectKind.PUBLIC_KEY, object_id=b"\x05")


@dataclass(frozen=True, kw_only=True)
class CardConfig:
    """``[card]``: the reader and how to reach the IoT SAFE applet on the card in it."""

    #: ``pcsc:`` (first reader with a card), ``pcsc:<name>``, ``sim:<state file>``, ``modem:<port>``
    reader: str = "pcsc:"
    #: IoT SAFE applet AIDs, tried in order (GSMA IoT.05 default first)
    aids: tuple[bytes, ...] = (DEFAULT_AID,)
    #: send applet commands with an ISO class byte (0N) instead of the proprietary 8N
    iso_cla: bool = False
    #: channel for the certificate EFs' file commands (see UiccChannel)
    uicc_channel: UiccChannel = UiccChannel.AUTO
    #: open the applet's logical channel by its SELECT (ISO/IEC 7816-4 §5.5.2: one APDU fewer)
    #: where the EFs use the basic channel and the link is not a modem. Off by default: on a
    #: reader shared with software that keeps a logical channel open (the SIM key used by a
    #: TLS stack), that SELECT lands on the other program's channel and the run closes it
    #: (tests/integration/test_shared_reader_pcsc.py); on only where the agent is the card's
    #: only user
    implicit_channel: bool = False
    #: TLS 1.3's ephemeral ECDH (RFC 8446 §4.2.8) on the card with this key-agreement private
    #: key (GENERATE KEY PAIR per handshake, PUT PUBLIC KEY into ``peer_public_key``, COMPUTE
    #: DH: GSMA IoT.05); None: on the host, as tlslite makes it
    key_agreement: IotSafeRef | None = None
    #: the writable public key object the server's key share is put into
    peer_public_key: IotSafeRef = _PEER_PUBLIC_KEY

    def __post_init__(self) -> None:
        _check_type("card.reader", self.reader, str)
        scheme, sep, rest = self.reader.partition(":")
        if not sep or scheme.lower() not in {*_READER_SCHEMES, *_registered_schemes()}:
            raise _fail(
                "card.reader",
                f"expected pcsc:[NAME], sim:STATE_FILE or modem:PORT, got {self.reader!r}",
            )
        if scheme.lower() in ("sim", "modem") and not rest:
            raise _fail(
                "card.reader", f"{scheme}: needs a {'state file' if scheme == 'sim' else 'port'}"
            )
        if "\x00" in self.reader:
            # No reader name, port or path can hold one (open() and SCardConnect refuse it).
            raise _fail("card.reader", "contains NUL")
        if scheme.lower() == "modem":
            _check_modem_reader(rest)
        _check_type("card.aids", self.aids, tuple)
        if not self.aids:
            raise _fail("card.aids", "needs at least one AID")
        for aid in self.aids:
            _check_type("card.aids", aid, bytes)
            if not _AID_BYTES[0] <= len(aid) <= _AID_BYTES[1]:
                raise _fail("card.aids", f"an AID is 5..16 bytes, got {aid.hex().upper()!r}")
        _check_type("card.iso_cla", self.iso_cla, bool)
        _check_type("card.implicit_channel", self.implicit_channel, bool)
        _check_type("card.uicc_channel", self.uicc_channel, UiccChannel)
        if self.key_agreement is not None:
            _check_type("card.key_agreement", self.key_agreement, IotSafeRef)
            if self.key_agreement.kind is not ObjectKind.PRIVATE_KEY:
                raise _fail(
                    "card.key_agreement",
                    f"expected an IoT SAFE key, got {_card_uri_kind(self.key_agreement)}",
                )
        _check_type("card.peer_public_key", self.peer_public_key, IotSafeRef)
        if self.peer_public_key.kind is not ObjectKind.PUBLIC_KEY:
            raise _fail(
                "card.peer_public_key",
                f"expected an IoT SAFE public key, got {_card_uri_kind(self.peer_public_key)}",
            )


@dataclass(frozen=True, kw_only=True)
class Pkcs11Config:
    """``[pkcs11]``: the PKCS#11 module and the user PIN, when slots are ``pkcs11:`` URIs.

    The PIN is not a field (like the Basic password): only where to find it, read at use time.
    A URI's own ``module-path`` / ``pin-value`` / ``pin-source`` (RFC 7512 §2.4) win.
    """

    #: path of the PKCS#11 module (``.so``), e.g. /usr/lib/softhsm/libsofthsm2.so
    module: str = ""
    pin_file: Path | None = None
    pin_env: str | None = None

    def __post_init__(self) -> None:
        _check_type("pkcs11.module", self.module, str)
        if "\x00" in self.module:
            raise _fail("pkcs11.module", "contains NUL")
        if self.pin_file is not None:
            _check_type("pkcs11.pin_file", self.pin_file, Path)
        if self.pin_env is not None:
            _check_type("pkcs11.pin_env", self.pin_env, str)
            if not _ENV_NAME_RE.fullmatch(self.pin_env):
                raise _fail("pkcs11.pin_env", f"not an environment variable name: {self.pin_env!r}")
        if self.pin_file is not None and self.pin_env is not None:
            raise _fail("pkcs11.pin_file", "set pin_file or pin_env, not both")


def _registered_schemes() -> tuple[str, ...]:
    """Reader schemes registered beyond the built-in ones (est_agent/transport/registry.py):
    what the runtime opens, configuration accepts."""
    from est_agent.transport.registry import reader_schemes

    return reader_schemes()


def _check_modem_reader(rest: str) -> None:
    """``?baud=N&timeout=S`` checked now with the transport's own parser (pure: no serial port is
    touched), so that ``timeout=nan`` stops the agent at load time, not at the first APDU."""
    from est_agent.transport.modem import parse_reader

    try:
        parse_reader(rest)
    except UsageError as exc:
        raise _fail("card.reader", str(exc)) from None


_BOOTSTRAP_KEY = IotSafeRef(ObjectKind.PRIVATE_KEY, object_id=b"\x01")
_BOOTSTRAP_CERTIFICATE = IotSafeRef(ObjectKind.FILE, object_id=b"\x01")


@dataclass(frozen=True, kw_only=True)
class BootstrapConfig:
    """``[bootstrap]``: the factory credential that authenticates the first enrollment."""

    key: KeyRef = _BOOTSTRAP_KEY
    certificate: CertificateRef = _BOOTSTRAP_CERTIFICATE

    def __post_init__(self) -> None:
        _check_type("bootstrap.key", self.key, (IotSafeRef, Pkcs11Uri, Path))
        if isinstance(self.key, Pkcs11Uri):
            _check_token_key("bootstrap.key", self.key)
        if isinstance(self.certificate, Pkcs11Uri):
            _check_token_object("bootstrap.certificate", self.certificate, "cert")
        if isinstance(self.key, IotSafeRef) and self.key.kind is not ObjectKind.PRIVATE_KEY:
            raise _fail("bootstrap.key", f"expected a private key, got {_card_uri_kind(self.key)}")
        _check_type(
            "bootstrap.certificate", self.certificate, (IotSafeRef, UiccPath, Pkcs11Uri, Path)
        )
        if (
            isinstance(self.certificate, IotSafeRef)
            and self.certificate.kind is not ObjectKind.FILE
        ):
            raise _fail(
                "bootstrap.certificate",
                f"expected a file, got {_card_uri_kind(self.certificate)}",
            )


@dataclass(frozen=True, kw_only=True)
class SlotConfig:
    """One ``[[slot]]``: an IoT SAFE key plus the EF that holds its certificate record, or a
    key in a PKCS#11 token plus that token's certificate object of the same label and id."""

    #: the name used in progress lines, status output and the deploy hook's environment
    name: str
    key: IotSafeRef | Pkcs11Uri
    certificate: UiccPath | Pkcs11Uri

    def __post_init__(self) -> None:
        _check_type("slot.name", self.name, str)
        if not _SLOT_NAME_RE.fullmatch(self.name):
            raise _fail(
                "slot.name", f"expected 1..16 of a-z, 0-9, '-', '_' (not first), got {self.name!r}"
            )
        _check_type("slot.key", self.key, (IotSafeRef, Pkcs11Uri))
        if isinstance(self.key, Pkcs11Uri):
            self._check_token_slot(self.key)
            return
        if self.key.kind is not ObjectKind.PRIVATE_KEY:
            raise _fail("slot.key", f"expected a private key, got {_card_uri_kind(self.key)}")
        _check_type("slot.certificate", self.certificate, UiccPath)

    def _check_token_slot(self, key: Pkcs11Uri) -> None:
        """A token slot is one label (and id) on the token: key pair, certificate and the
        store's record header (backends/pkcs11.py)."""
        _check_token_key("slot.key", key)
        cert = self.certificate
        if not isinstance(cert, Pkcs11Uri):
            raise _fail(
                "slot.certificate",
                f"a pkcs11: key keeps its certificate in the token, got {_card_uri_kind(cert)}",
            )
        _check_token_object("slot.certificate", cert, "cert")
        if (cert.object, cert.id) != (key.object, key.id):
            raise _fail(
                "slot.certificate",
                f"must name the key's object and id ({key.selector}), got {cert.selector}",
            )


def _check_token_object(key: str, uri: Pkcs11Uri, kind: str) -> None:
    if uri.type not in (None, kind):
        raise _fail(key, f"expected type={kind} (or none), got type={uri.type}")
    if uri.object is None and uri.id is None:
        raise _fail(key, f"{uri} names no object (object= or id=)")


def _check_token_key(key: str, uri: Pkcs11Uri) -> None:
    _check_token_object(key, uri, "private")


DEFAULT_SLOTS = (
    SlotConfig(
        name="op-a",
        key=IotSafeRef(ObjectKind.PRIVATE_KEY, object_id=b"\x02"),
        certificate=UiccPath((0x7FF0, 0x6F01)),
    ),
    SlotConfig(
        name="op-b",
        key=IotSafeRef(ObjectKind.PRIVATE_KEY, object_id=b"\x03"),
        certificate=UiccPath((0x7FF0, 0x6F02)),
    ),
)


@dataclass(frozen=True, kw_only=True)
class EstConfig:
    """``[est]``: the EST server and how to authenticate to it.

    The Basic password is deliberately not a field: only where to find it is stored, and
    `basic_password` reads it at use time (so it never shows up in a repr or a log line).
    The proxy's password likewise: `https_proxy` reads it, and the environment, at use time.
    """

    #: ``https://host[:port][/path]``; a bare origin gets ``/.well-known/est``
    url: str
    label: str = ""
    #: None only when `cacerts_fingerprint` is set: the run then takes the anchor from a
    #: provisional ``/cacerts`` (RFC 7030 §4.1.1 bootstrap distribution, est/bootstrap.py)
    trust_anchor: TrustAnchorRef | None = Path("/etc/est-agent/tls-ca.pem")
    #: SHA-256 of the EST CA root certificate: the root ``/cacerts`` must hold, and the one a
    #: fingerprint-only bootstrap accepts from a provisional connection
    cacerts_fingerprint: bytes | None = None
    pop: PopMode = PopMode.AUTO
    csrattrs: CsrAttrsMode = CsrAttrsMode.ADVISORY
    basic_username: str | None = None
    basic_password_file: Path | None = None
    basic_password_env: str | None = None
    #: "" (connect directly), "env" (``https_proxy``/``HTTPS_PROXY`` unless ``NO_PROXY``
    #: excludes the server) or ``http://[user@]host:port``: a CONNECT proxy (RFC 9110 §9.3.6)
    proxy: str = ""
    proxy_password_file: Path | None = None
    proxy_password_env: str | None = None
    http_auth: HttpAuth = HttpAuth.AUTO
    timeout_s: float = 30.0
    #: upper bound of one run's time with the server: every request, retry and wait together
    run_timeout_s: float = 600.0
    #: refuse an issued certificate without the id-kp-clientAuth extended key usage
    require_client_auth_eku: bool = True

    def __post_init__(self) -> None:
        _check_type("est.url", self.url, str)
        _check_type("est.label", self.label, str)
        try:
            est_url(self.url, "cacerts")
        except InputError as exc:
            raise _fail("est.url", str(exc)) from None
        try:
            est_url(self.url, "cacerts", self.label)
        except InputError as exc:
            raise _fail("est.label", str(exc)) from None
        if self.trust_anchor is not None:
            _check_type(
                "est.trust_anchor", self.trust_anchor, (Path, IotSafeRef, UiccPath, Pkcs11Uri)
            )
            if (
                isinstance(self.trust_anchor, IotSafeRef)
                and self.trust_anchor.kind is not ObjectKind.FILE
            ):
                raise _fail(
                    "est.trust_anchor",
                    f"expected a certificate file, got {_card_uri_kind(self.trust_anchor)}",
                )
        elif self.cacerts_fingerprint is None:
            # Without either, the server could only be trusted blindly.
            raise _fail("est.trust_anchor", "required unless est.cacerts_fingerprint is set")
        if self.cacerts_fingerprint is not None:
            _check_type("est.cacerts_fingerprint", self.cacerts_fingerprint, bytes)
            if len(self.cacerts_fingerprint) != 32:
                raise _fail(
                    "est.cacerts_fingerprint",
                    f"a SHA-256 fingerprint is 32 bytes, got {len(self.cacerts_fingerprint)}",
                )
        _check_type("est.pop", self.pop, PopMode)
        _check_type("est.csrattrs", self.csrattrs, CsrAttrsMode)
        if self.basic_username is not None:
            _check_type("est.basic_username", self.basic_username, str)
            if not self.basic_username or ":" in self.basic_username:
                # RFC 7617 §2: the user-id cannot contain a colon.
                raise _fail("est.basic_username", "must be non-empty and contain no ':'")
            if has_control_character(self.basic_username):
                raise _fail("est.basic_username", "contains a control character (RFC 7617 §2)")
        if self.basic_password_file is not None:
            _check_type("est.basic_password_file", self.basic_password_file, Path)
        if self.basic_password_env is not None:
            _check_type("est.basic_password_env", self.basic_password_env, str)
            if not _ENV_NAME_RE.fullmatch(self.basic_password_env):
                raise _fail(
                    "est.basic_password_env",
                    f"not an environment variable name: {self.basic_password_env!r}",
                )
        if self.basic_password_file is not None and self.basic_password_env is not None:
            raise _fail("est.basic_password_env", "set only one of basic_password_file / _env")
        has_password = self.basic_password_file is not None or self.basic_password_env is not None
        if has_password and self.basic_username is None:
            raise _fail("est.basic_username", "required when a Basic password is configured")
        if self.basic_username is not None and not has_password:
            raise _fail(
                "est.basic_password_file",
                "Basic username set without basic_password_file or basic_password_env",
            )
        self._check_proxy()
        _check_type("est.http_auth", self.http_auth, HttpAuth)
        if self.http_auth is not HttpAuth.AUTO and self.basic_username is None:
            raise _fail(
                "est.http_auth",
                f'"{self.http_auth.value}" needs est.basic_username and its password',
            )
        _check_seconds("est.timeout_s", self.timeout_s, allow_zero=False, maximum=_MAX_TIMEOUT_S)
        _check_seconds(
            "est.run_timeout_s", self.run_timeout_s, allow_zero=False, maximum=_MAX_TIMEOUT_S
        )
        if self.run_timeout_s < self.timeout_s:
            raise _fail(
                "est.run_timeout_s",
                f"shorter than one request (est.timeout_s = {self.timeout_s:g})",
            )
        _check_type("est.require_client_auth_eku", self.require_client_auth_eku, bool)

    def _check_proxy(self) -> None:
        _check_type("est.proxy", self.proxy, str)
        url = None if self.proxy in ("", "env") else _proxy_url("est.proxy", self.proxy)
        if url is not None and url.password is not None:
            raise _fail(
                "est.proxy",
                "must not carry a password: put it in est.proxy_password_file or "
                "est.proxy_password_env",
            )
        if self.proxy_password_file is not None:
            _check_type("est.proxy_password_file", self.proxy_password_file, Path)
        if self.proxy_password_env is not None:
            _check_type("est.proxy_password_env", self.proxy_password_env, str)
            if not _ENV_NAME_RE.fullmatch(self.proxy_password_env):
                raise _fail(
                    "est.proxy_password_env",
                    f"not an environment variable name: {self.proxy_password_env!r}",
                )
        if self.proxy_password_file is not None and self.proxy_password_env is not None:
            raise _fail("est.proxy_password_env", "set only one of proxy_password_file / _env")
        has_password = self.proxy_password_file is not None or self.proxy_password_env is not None
        if has_password and not self.proxy:
            raise _fail("est.proxy", "required when a proxy password is configured")
        if has_password and url is not None and url.username is None:
            raise _fail("est.proxy", "the proxy password needs a user: http://user@host:port")
        if url is not None and url.username is not None and not has_password:
            raise _fail(
                "est.proxy_password_file",
                "est.proxy names a user without proxy_password_file or proxy_password_env",
            )

    def https_proxy(self, environ: Mapping[str, str] | None = None) -> HttpsProxy | None:
        """The CONNECT proxy for `url`, resolved now (None: connect directly).

        ``est.proxy = "env"`` reads ``https_proxy`` / ``HTTPS_PROXY`` and ``NO_PROXY`` from
        ``environ`` (default: the process environment) now; the proxy password is read now
        from its file or variable, or taken from the variable's URL, and registered with the
        log redaction. ``ConfigError`` naming the key or variable when it cannot be used.
        """
        if not self.proxy:
            return None
        from est_agent.est.proxy import environment_proxy, proxy_with_password

        if self.proxy == "env":
            target = urlsplit(self.url.strip())
            port = target.port
            found = environment_proxy(
                os.environ if environ is None else environ,
                target.hostname or "",
                443 if port is None else port,
            )
            if found is None:
                return None
            key, text = found
            url = _proxy_url(key, text, assume_http=True)
        else:
            key, url = "est.proxy", _proxy_url("est.proxy", self.proxy)
        password = read_secret(
            file=self.proxy_password_file,
            env=self.proxy_password_env,
            file_key="est.proxy_password_file",
            env_key="est.proxy_password_env",
        )
        try:
            return proxy_with_password(url, password, source=key, setting="est.proxy_password_*")
        except InputError as exc:
            raise _fail(key, str(exc)) from None

    def operation_url(self, operation: str) -> str:
        """The URL of an EST operation (``cacerts``, ``simpleenroll`` ...) with the label."""
        return est_url(self.url, operation, self.label)

    def basic_password(self) -> str | None:
        """The Basic password, read now from its file (first line) or variable; None if unset."""
        return read_secret(
            file=self.basic_password_file,
            env=self.basic_password_env,
            file_key="est.basic_password_file",
            env_key="est.basic_password_env",
        )


@dataclass(frozen=True, kw_only=True)
class SubjectConfig:
    """``[subject]``: templates for the first enrollment's subject and SANs.

    Renewal copies Subject/SAN from the current certificate instead (RFC 7030 §4.2.2).
    Empty attributes are left out; placeholders are `PLACEHOLDERS`.
    """

    common_name: str = "{iccid}"
    organization: str = ""
    serial_number: str = ""
    san_dns: tuple[str, ...] = ()
    san_uri: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name, _ in _SUBJECT_ATTRIBUTES:
            _check_type(f"subject.{name}", getattr(self, name), str)
        for name in ("san_dns", "san_uri"):
            values = getattr(self, name)
            _check_type(f"subject.{name}", values, tuple)
            for value in values:
                _check_type(f"subject.{name}", value, str)
        if not any(getattr(self, name) for name, _ in _SUBJECT_ATTRIBUTES) and not (
            self.san_dns or self.san_uri
        ):
            raise _fail("subject.common_name", "the subject is empty and there is no SAN")
        # Fill every template with stand-in values so that a typo fails now, not in the field.
        # Only the text is checked here (stdlib): building the X.509 name needs cryptography,
        # which `est-agent run` with nothing due must not load; csr.render_subject does it at
        # enrollment.
        for name, _ in _SUBJECT_ATTRIBUTES:
            pattern = getattr(self, name)
            if pattern:
                filled = _fill_template(f"subject.{name}", pattern, PLACEHOLDERS)
                if len(filled) > _UB_NAME:
                    raise _fail(
                        f"subject.{name}",
                        f"longer than {_UB_NAME} characters (RFC 5280 upper bound)",
                    )
        for name in ("san_dns", "san_uri"):
            for pattern in getattr(self, name):
                if not _fill_template(f"subject.{name}", pattern, PLACEHOLDERS):
                    raise _fail(f"subject.{name}", "empty SAN")

    def templates(self) -> tuple[tuple[_Template, ...], tuple[_Template, ...]]:
        """The non-empty templates as ``(key, field, pattern)``: subject attributes (field: the
        RFC 4514 short name) and SANs (field: ``dns`` / ``uri``), the input of
        ``csr.render_subject``, which fills them at enrollment (it needs cryptography)."""
        subject = tuple(
            (f"subject.{name}", short, getattr(self, name))
            for name, short in _SUBJECT_ATTRIBUTES
            if getattr(self, name)
        )
        sans = tuple(
            (f"subject.{name}", kind, pattern)
            for name, kind in (("san_dns", "dns"), ("san_uri", "uri"))
            for pattern in getattr(self, name)
        )
        return subject, sans


@dataclass(frozen=True, kw_only=True)
class RenewalConfig:
    """``[renewal]``: when a certificate is due, and how runs spread and back off."""

    #: fraction of the certificate's lifetime after which renewal is due
    threshold: float = 0.67
    #: spread of the due time: renewal is due a fixed per-device offset in 0..jitter_s seconds
    #: after the threshold, derived from the certificate serial (workflow/renewal.py); nothing
    #: sleeps for it, and it never moves the due time past 90 % of the lifetime
    jitter_s: float = 3600.0
    #: upper bound of the wait after a failed renewal before the next attempt
    #: (workflow/renewal.py ``next_attempt_at``), and of an honoured Retry-After
    retry_cap_s: float = 86400.0

    def __post_init__(self) -> None:
        _check_type("renewal.threshold", self.threshold, (int, float))
        if not 0 < self.threshold < 1:
            raise _fail("renewal.threshold", f"expected 0 < threshold < 1, got {self.threshold!r}")
        _check_seconds("renewal.jitter_s", self.jitter_s, allow_zero=True, maximum=_MAX_DELAY_S)
        _check_seconds(
            "renewal.retry_cap_s", self.retry_cap_s, allow_zero=False, maximum=_MAX_DELAY_S
        )


@dataclass(frozen=True, kw_only=True)
class PathsConfig:
    """``[paths]``: local files the agent writes and the hook it runs."""

    #: pending enrollments and the run lock (the credentials themselves live on the SIM)
    state_dir: Path = Path("/var/lib/est-agent")
    export_pem: Path | None = None
    #: argv (no shell) run after a new certificate became active
    deploy_hook: tuple[str, ...] = ()
    #: how long a run waits for another est-agent holding the run lock (then exit 75)
    lock_wait_s: float = 60.0

    def __post_init__(self) -> None:
        _check_type("paths.state_dir", self.state_dir, Path)
        if self.export_pem is not None:
            _check_type("paths.export_pem", self.export_pem, Path)
        _check_type("paths.deploy_hook", self.deploy_hook, tuple)
        for arg in self.deploy_hook:
            _check_type("paths.deploy_hook", arg, str)
            if "\x00" in arg:
                raise _fail("paths.deploy_hook", "arguments cannot contain NUL")
        if self.deploy_hook and not self.deploy_hook[0]:
            raise _fail("paths.deploy_hook", "the program (first element) is empty")
        _check_seconds("paths.lock_wait_s", self.lock_wait_s, allow_zero=True, maximum=3600)


_Section = TypeVar("_Section")
_E = TypeVar("_E", bound=Enum)


@dataclass(frozen=True, kw_only=True)
class Config:
    """The whole configuration; build it with `load_config`, `parse_config` or `defaults`."""

    card: CardConfig = field(default_factory=CardConfig)
    pkcs11: Pkcs11Config = field(default_factory=Pkcs11Config)
    bootstrap: BootstrapConfig = field(default_factory=BootstrapConfig)
    slots: tuple[SlotConfig, SlotConfig] = DEFAULT_SLOTS
    est: EstConfig  # required: the EST server URL has no default
    subject: SubjectConfig = field(default_factory=SubjectConfig)
    renewal: RenewalConfig = field(default_factory=RenewalConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)

    def __post_init__(self) -> None:
        for name, cls in (
            ("card", CardConfig),
            ("pkcs11", Pkcs11Config),
            ("bootstrap", BootstrapConfig),
            ("est", EstConfig),
            ("subject", SubjectConfig),
            ("renewal", RenewalConfig),
            ("paths", PathsConfig),
        ):
            _check_type(name, getattr(self, name), cls)
        _check_type("slot", self.slots, tuple)
        if len(self.slots) != 2:
            raise _fail("slot", f"expected exactly two [[slot]] tables, got {len(self.slots)}")
        for slot in self.slots:
            _check_type("slot", slot, SlotConfig)
        # The store alternates between the slots: sharing a key or an EF would let a new
        # credential overwrite the active one, and the bootstrap key must survive every renewal.
        a, b = self.slots
        if a.name == b.name:
            raise _fail("slot[1].name", f"same name as slot[0]: {a.name!r}")
        if a.key == b.key:
            raise _fail("slot[1].key", f"same key as slot[0]: {a.key}")
        if a.certificate == b.certificate:
            raise _fail("slot[1].certificate", f"same EF as slot[0]: {a.certificate}")
        for i, slot in enumerate(self.slots):
            if slot.key == self.bootstrap.key:
                raise _fail(f"slot[{i}].key", f"is the bootstrap key {slot.key}")
            if slot.certificate == self.bootstrap.certificate:
                raise _fail(
                    f"slot[{i}].certificate", f"is the bootstrap certificate {slot.certificate}"
                )
        self._check_combinations()
        self._check_token_refs()

    def _token_refs(self) -> list[tuple[str, Pkcs11Uri]]:
        refs: list[tuple[str, object]] = [
            ("bootstrap.key", self.bootstrap.key),
            ("bootstrap.certificate", self.bootstrap.certificate),
            ("est.trust_anchor", self.est.trust_anchor),
        ]
        for i, slot in enumerate(self.slots):
            refs += [(f"slot[{i}].key", slot.key), (f"slot[{i}].certificate", slot.certificate)]
        return [(k, r) for k, r in refs if isinstance(r, Pkcs11Uri)]

    def _check_token_refs(self) -> None:
        """One run opens one device: with pkcs11: slots, every device object is on that token
        (PEM files aside); without, no pkcs11: URI at all. One module, one token."""
        tokens = self._token_refs()
        if not tokens:
            return
        on_token = isinstance(self.slots[0].key, Pkcs11Uri)
        for key, ref in [
            ("bootstrap.key", self.bootstrap.key),
            ("bootstrap.certificate", self.bootstrap.certificate),
            ("est.trust_anchor", self.est.trust_anchor),
            *[(f"slot[{i}].key", s.key) for i, s in enumerate(self.slots)],
        ]:
            if ref is None or isinstance(ref, Path):
                continue
            if isinstance(ref, Pkcs11Uri) != on_token:
                raise _fail(
                    key,
                    f"{_card_uri_kind(ref)} with slots "
                    + ("in a PKCS#11 token" if on_token else "on the SIM")
                    + ": one run uses one device",
                )
        first_key, first = tokens[0]
        for key, ref in tokens[1:]:
            if _token_of(ref) != _token_of(first):
                raise _fail(key, f"names another token than {first_key} ({first})")
        modules = {r.module_path for _, r in tokens if r.module_path}
        if len(modules) > 1:
            raise _fail(first_key, f"URIs name different module-path values: {sorted(modules)}")
        if not modules and not self.pkcs11.module:
            raise _fail("pkcs11.module", "required with pkcs11: URIs that have no module-path")

    @property
    def backend(self) -> str:
        """``pkcs11`` when the slots live in a PKCS#11 token, else ``iotsafe`` (the SIM)."""
        return "pkcs11" if isinstance(self.slots[0].key, Pkcs11Uri) else "iotsafe"

    def pkcs11_module(self) -> str:
        """The module path: a URI's ``module-path``, else ``pkcs11.module``."""
        for _, ref in self._token_refs():
            if ref.module_path:
                return ref.module_path
        return self.pkcs11.module

    def pkcs11_token(self) -> Pkcs11Uri:
        """The URI whose token attributes select the token (the first slot's key)."""
        key = self.slots[0].key
        if not isinstance(key, Pkcs11Uri):
            raise ConfigError("the slots are not in a PKCS#11 token")
        return key

    def pkcs11_pin(self) -> str | None:
        """The user PIN, read now: a URI's ``pin-value`` or ``pin-source`` file (RFC 7512
        §2.4), else ``pkcs11.pin_file`` / ``pkcs11.pin_env``; None: no login."""
        for key, ref in self._token_refs():
            if ref.pin_value is not None:
                return ref.pin_value
            try:
                path = ref.pin_file()
            except InputError as exc:
                raise _fail(key, str(exc)) from None
            if path is not None:
                return read_secret(file=path, file_key=f"{key} pin-source", env_key="")
        return read_secret(
            file=self.pkcs11.pin_file,
            env=self.pkcs11.pin_env,
            file_key="pkcs11.pin_file",
            env_key="pkcs11.pin_env",
        )

    def _check_combinations(self) -> None:
        """What the runtime would refuse later (after opening the card, or on first boot only),
        refused now, naming the key."""
        if self.card.key_agreement is not None:
            from_key = {self.bootstrap.key, *(slot.key for slot in self.slots)}
            if self.card.key_agreement in from_key:
                # GENERATE KEY PAIR for every handshake would destroy that credential's key
                raise _fail(
                    "card.key_agreement",
                    f"{self.card.key_agreement} is a credential's key; name the card's"
                    " key-agreement slot",
                )
            if self.backend == "pkcs11":
                raise _fail(
                    "card.key_agreement",
                    "the key share is made by the IoT SAFE applet; the slots are in a PKCS#11"
                    " token (its ECDH is not used)",
                )
            if self.est.pop is PopMode.TLS_UNIQUE:
                raise _fail(
                    "card.key_agreement",
                    'makes the TLS 1.3 key share on the card; est.pop = "tls-unique" needs'
                    " TLS 1.2 (RFC 9266 §1)",
                )
        if not self.card.reader.lower().startswith("modem:"):
            # {imei} is AT+CGSN (3GPP TS 27.007 §5.4): only a modem link knows it.
            subject, sans = self.subject.templates()
            for key, _field, pattern in subject + sans:
                if "{imei}" in pattern:
                    raise _fail(key, "uses {imei}, which only a modem: reader can fill (AT+CGSN)")

    @classmethod
    def defaults(cls, *, est_url: str) -> Config:
        """The built-in defaults; the EST server URL has none (there is no sensible one)."""
        return cls(est=EstConfig(url=est_url))

    def basic_password(self) -> str | None:
        """See `EstConfig.basic_password`."""
        return self.est.basic_password()


def _token_of(uri: Pkcs11Uri) -> tuple[object, ...]:
    return (uri.token, uri.serial, uri.manufacturer, uri.model, uri.slot_id)


# --- TOML -> dataclasses ---------------------------------------------------------------------


def _fields(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


# TOML section name -> dataclass (``slot`` is an array of tables).
_SECTIONS: Mapping[str, type] = {
    "card": CardConfig,
    "pkcs11": Pkcs11Config,
    "bootstrap": BootstrapConfig,
    "slot": SlotConfig,
    "est": EstConfig,
    "subject": SubjectConfig,
    "renewal": RenewalConfig,
    "paths": PathsConfig,
}


def config_keys() -> tuple[str, ...]:
    """Every TOML key as ``section.key`` (what the example file and the README document)."""
    return tuple(f"{section}.{name}" for section, cls in _SECTIONS.items() for name in _fields(cls))


class _Table:
    """One TOML table being read: typed getters that name the full key, no unknown keys."""

    def __init__(self, data: object, prefix: str, known: tuple[str, ...]) -> None:
        if not isinstance(data, dict):
            raise _fail(prefix, f"expected a table, got {_toml_type(data)}")
        for key in data:
            if key not in known:
                raise ConfigError(f"unknown key {self._join(prefix, key)}")
        self.data: dict[str, object] = data
        self.prefix = prefix

    @staticmethod
    def _join(prefix: str, name: object) -> str:
        return f"{prefix}.{name}" if prefix else str(name)

    def key(self, name: str) -> str:
        return self._join(self.prefix, name)

    def has(self, name: str) -> bool:
        return name in self.data

    def value(self, name: str) -> object:
        """A value handed to the dataclass as it is: its ``__post_init__`` checks the type (and
        everything else) once, naming the key."""
        return self.data[name]

    def string(self, name: str) -> str:
        """A string that is parsed here first (URI, path, enum, hex): checked before parsing."""
        value = self.data[name]
        _check_type(self.key(name), value, str)
        assert isinstance(value, str)
        return value

    def strings(self, name: str) -> tuple[str, ...]:
        """An array of strings, turned into the dataclass's tuple here."""
        value = self.data[name]
        _check_type(self.key(name), value, list)
        assert isinstance(value, list)
        for item in value:
            if not isinstance(item, str):
                raise _fail(
                    self.key(name), f"expected an array of strings, got {_toml_type(item)} in it"
                )
        return tuple(value)


def _path(key: str, text: str, base_dir: Path | None) -> Path:
    if not text:
        raise _fail(key, "empty path")
    if "\x00" in text:
        raise _fail(key, "path contains NUL")
    path = Path(text)
    # Relative to the configuration file, not to wherever the timer happened to start us.
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    return path


def _card_ref(
    key: str, text: str, default_kind: ObjectKind, base_dir: Path | None, *, allow_path: bool
) -> IotSafeRef | UiccPath | Pkcs11Uri | Path:
    if not text.lower().startswith(_CARD_SCHEMES):
        if allow_path:
            return _path(key, text, base_dir)
        raise _fail(key, f"expected an iotsafe:, uicc: or pkcs11: URI, got {text!r}")
    try:
        if is_pkcs11_uri(text):
            return parse_pkcs11_uri(text)
        return parse_card_uri(text, default_kind=default_kind)
    except InputError as exc:
        raise _fail(key, str(exc)) from None


def _enum(table: _Table, name: str, enum: type[_E]) -> _E:
    text = table.string(name)
    try:
        return enum(text)
    except ValueError:
        choices = ", ".join(str(m.value) for m in enum)
        raise _fail(table.key(name), f"expected one of {choices}, got {text!r}") from None


def _build(cls: type[_Section], kwargs: dict[str, object]) -> _Section:
    # One validation pass: the readers parse what needs parsing (URIs, paths, enums, hex) and
    # hand everything else over as it is; the dataclass checks all of it and names the key.
    return cls(**kwargs)


def _card(data: object, base_dir: Path | None) -> CardConfig:
    t = _Table(data, "card", _fields(CardConfig))
    kwargs: dict[str, object] = {}
    if t.has("reader"):
        reader = t.string("reader")
        scheme, sep, rest = reader.partition(":")
        if sep and scheme.lower() == "sim" and rest:
            reader = f"{scheme}:{_path(t.key('reader'), rest, base_dir)}"
        kwargs["reader"] = reader
    if t.has("aids"):
        aids = []
        for text in t.strings("aids"):
            try:
                aids.append(bytes.fromhex(text))
            except ValueError:
                raise _fail(t.key("aids"), f"not hex: {text!r}") from None
        kwargs["aids"] = tuple(aids)
    if t.has("iso_cla"):
        kwargs["iso_cla"] = t.value("iso_cla")
    if t.has("implicit_channel"):
        kwargs["implicit_channel"] = t.value("implicit_channel")
    if t.has("uicc_channel"):
        kwargs["uicc_channel"] = _enum(t, "uicc_channel", UiccChannel)
    for name, kind in (
        ("key_agreement", ObjectKind.PRIVATE_KEY),
        ("peer_public_key", ObjectKind.PUBLIC_KEY),
    ):
        if t.has(name) and (text := t.string(name)):
            ref = _card_ref(t.key(name), text, kind, None, allow_path=False)
            if not isinstance(ref, IotSafeRef) or ref.kind is not kind:
                what = "key" if kind is ObjectKind.PRIVATE_KEY else "public key"
                raise _fail(t.key(name), f"expected an IoT SAFE {what}, got {_card_uri_kind(ref)}")
            kwargs[name] = ref
    return _build(CardConfig, kwargs)


def _pkcs11(data: object, base_dir: Path | None) -> Pkcs11Config:
    t = _Table(data, "pkcs11", _fields(Pkcs11Config))
    kwargs: dict[str, object] = {}
    if t.has("module") and (text := t.string("module")):  # "" leaves it unset
        kwargs["module"] = str(_path(t.key("module"), text, base_dir))
    if t.has("pin_file") and (text := t.string("pin_file")):
        kwargs["pin_file"] = _path(t.key("pin_file"), text, base_dir)
    if t.has("pin_env") and (value := t.value("pin_env")) != "":
        kwargs["pin_env"] = value
    return _build(Pkcs11Config, kwargs)


def _bootstrap(data: object, base_dir: Path | None) -> BootstrapConfig:
    t = _Table(data, "bootstrap", _fields(BootstrapConfig))
    kwargs: dict[str, object] = {}
    for name, kind in (("key", ObjectKind.PRIVATE_KEY), ("certificate", ObjectKind.FILE)):
        if t.has(name):
            kwargs[name] = _card_ref(t.key(name), t.string(name), kind, base_dir, allow_path=True)
    return _build(BootstrapConfig, kwargs)


def _slots(data: object) -> tuple[SlotConfig, SlotConfig]:
    if not isinstance(data, list) or not all(isinstance(item, dict) for item in data):
        raise _fail("slot", f"expected an array of tables ([[slot]]), got {_toml_type(data)}")
    if len(data) != 2:
        raise _fail("slot", f"expected exactly two [[slot]] tables, got {len(data)}")
    slots = []
    for i, item in enumerate(data):
        t = _Table(item, f"slot[{i}]", _fields(SlotConfig))
        for name in ("key", "certificate"):
            if not t.has(name):
                raise _fail(t.key(name), "required in every [[slot]]")
        key = _card_ref(
            t.key("key"), t.string("key"), ObjectKind.PRIVATE_KEY, None, allow_path=False
        )
        if isinstance(key, Pkcs11Uri):
            pass  # SlotConfig checks the pair
        elif not isinstance(key, IotSafeRef) or key.kind is not ObjectKind.PRIVATE_KEY:
            raise _fail(t.key("key"), f"expected an IoT SAFE key, got {_card_uri_kind(key)}")
        cert = _card_ref(
            t.key("certificate"), t.string("certificate"), ObjectKind.FILE, None, allow_path=False
        )
        if not isinstance(cert, UiccPath | Pkcs11Uri):
            # The store writes its own record format (header + DER) into a transparent EF.
            raise _fail(
                t.key("certificate"), f"expected a uicc:path= EF, got {_card_uri_kind(cert)}"
            )
        label = t.value("name") if t.has("name") else DEFAULT_SLOTS[i].name
        try:
            slots.append(SlotConfig(name=label, key=key, certificate=cert))  # type: ignore[arg-type]
        except ConfigError as exc:
            raise ConfigError(str(exc).replace("slot.", f"slot[{i}].", 1)) from None
    return slots[0], slots[1]


def _est(data: object, base_dir: Path | None) -> EstConfig:
    t = _Table(data, "est", _fields(EstConfig))
    if not t.has("url"):
        raise _fail("est.url", "required (the EST server, https://host/.well-known/est)")
    kwargs: dict[str, object] = {"url": t.value("url")}
    if t.has("label"):
        kwargs["label"] = t.value("label")
    if t.has("trust_anchor"):
        text = t.string("trust_anchor")
        kwargs["trust_anchor"] = (
            _card_ref(t.key("trust_anchor"), text, ObjectKind.FILE, base_dir, allow_path=True)
            if text
            else None
        )
    if t.has("cacerts_fingerprint"):
        text = t.string("cacerts_fingerprint")
        if text:
            try:
                kwargs["cacerts_fingerprint"] = bytes.fromhex(text.replace(":", ""))
            except ValueError:
                raise _fail(t.key("cacerts_fingerprint"), f"not hex: {text!r}") from None
    if t.has("pop"):
        kwargs["pop"] = _enum(t, "pop", PopMode)
    if t.has("csrattrs"):
        kwargs["csrattrs"] = _enum(t, "csrattrs", CsrAttrsMode)
    if t.has("http_auth"):
        kwargs["http_auth"] = _enum(t, "http_auth", HttpAuth)
    for name in ("basic_username", "basic_password_env"):
        if t.has(name) and (value := t.value(name)) != "":  # "" leaves it unset
            kwargs[name] = value
    if t.has("basic_password_file") and (text := t.string("basic_password_file")):
        kwargs["basic_password_file"] = _path(t.key("basic_password_file"), text, base_dir)
    if t.has("proxy"):
        kwargs["proxy"] = t.value("proxy")
    if t.has("proxy_password_env") and (value := t.value("proxy_password_env")) != "":
        kwargs["proxy_password_env"] = value
    if t.has("proxy_password_file") and (text := t.string("proxy_password_file")):
        kwargs["proxy_password_file"] = _path(t.key("proxy_password_file"), text, base_dir)
    for name in ("timeout_s", "run_timeout_s", "require_client_auth_eku"):
        if t.has(name):
            kwargs[name] = t.value(name)
    return _build(EstConfig, kwargs)


def _subject(data: object) -> SubjectConfig:
    t = _Table(data, "subject", _fields(SubjectConfig))
    kwargs: dict[str, object] = {}
    for name, _ in _SUBJECT_ATTRIBUTES:
        if t.has(name):
            kwargs[name] = t.value(name)
    for name in ("san_dns", "san_uri"):
        if t.has(name):
            kwargs[name] = t.strings(name)
    return _build(SubjectConfig, kwargs)


def _renewal(data: object) -> RenewalConfig:
    t = _Table(data, "renewal", _fields(RenewalConfig))
    kwargs = {name: t.value(name) for name in _fields(RenewalConfig) if t.has(name)}
    return _build(RenewalConfig, dict(kwargs))


def _paths(data: object, base_dir: Path | None) -> PathsConfig:
    t = _Table(data, "paths", _fields(PathsConfig))
    kwargs: dict[str, object] = {}
    if t.has("state_dir"):
        kwargs["state_dir"] = _path(t.key("state_dir"), t.string("state_dir"), base_dir)
    if t.has("export_pem") and (text := t.string("export_pem")):
        kwargs["export_pem"] = _path(t.key("export_pem"), text, base_dir)
    if t.has("deploy_hook"):
        argv = list(t.strings("deploy_hook"))
        # "./hook" next to the config file is meant, not one in the working directory; a bare
        # name is left to PATH.
        if argv and "/" in argv[0]:
            argv[0] = str(_path(t.key("deploy_hook"), argv[0], base_dir))
        kwargs["deploy_hook"] = tuple(argv)
    if t.has("lock_wait_s"):
        kwargs["lock_wait_s"] = t.value("lock_wait_s")
    return _build(PathsConfig, kwargs)


def config_from_dict(data: Mapping[str, object], *, base_dir: Path | None = None) -> Config:
    """A Config from already-parsed TOML (a dict of tables); relative paths against base_dir."""
    top = _Table(dict(data), "", tuple(_SECTIONS))
    if "est" not in top.data:
        raise _fail("est.url", "required (the EST server, https://host/.well-known/est)")
    kwargs: dict[str, object] = {"est": _est(top.data["est"], base_dir)}
    if "card" in top.data:
        kwargs["card"] = _card(top.data["card"], base_dir)
    if "pkcs11" in top.data:
        kwargs["pkcs11"] = _pkcs11(top.data["pkcs11"], base_dir)
    if "bootstrap" in top.data:
        kwargs["bootstrap"] = _bootstrap(top.data["bootstrap"], base_dir)
    if "slot" in top.data:
        kwargs["slots"] = _slots(top.data["slot"])
    if "subject" in top.data:
        kwargs["subject"] = _subject(top.data["subject"])
    if "renewal" in top.data:
        kwargs["renewal"] = _renewal(top.data["renewal"])
    if "paths" in top.data:
        kwargs["paths"] = _paths(top.data["paths"], base_dir)
    return _build(Config, kwargs)


def parse_config(text: str, *, source: str = "<string>", base_dir: Path | None = None) -> Config:
    """A Config from TOML text; errors start with `source`. Relative paths against base_dir
    (the configuration file's directory), or as given when it is None."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # The message carries "(at line L, column C)".
        raise ConfigError(f"{source}: invalid TOML: {exc}") from None
    except RecursionError:
        # tomllib parses nested arrays and inline tables recursively: a value a thousand levels
        # deep exhausts the interpreter's stack. No key of this file nests deeper than two.
        raise ConfigError(f"{source}: invalid TOML: nested too deeply") from None
    try:
        return config_from_dict(data, base_dir=base_dir)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def load_config(path: Path = DEFAULT_CONFIG_PATH) -> Config:
    """Read and validate the configuration file at `path`."""
    raw = read_bounded(path, limit_bytes=CONFIG_LIMIT_BYTES, what="configuration")
    try:
        text = raw.decode("utf-8")  # TOML 1.0 §"Spec": a TOML file must be valid UTF-8
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 (byte {exc.start})") from None
    return parse_config(text, source=str(path), base_dir=path.absolute().parent)
