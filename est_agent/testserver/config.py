"""The test server's settings: one frozen dataclass, validated once, plus its enums."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from est_agent.errors import ConfigError, UsageError
from est_agent.testserver.digest import DIGEST_ALGORITHMS
from est_agent.testserver.issuer import Profile, parse_eku_names
from est_agent.testserver.wire import (
    ENROLL_OPERATIONS,
    OPERATIONS,
    CsrAttrsKind,
    RetryAfterFormat,
    parse_duration,
)

__all__ = [
    "AuthMode",
    "CloseAfter",
    "Fault",
    "HttpScheme",
    "ServerCertCa",
    "ServerConfig",
    "TlsMax",
    "parse_label_profile",
]


class AuthMode(enum.Enum):
    """What `simpleenroll` demands (`--auth`); `simplereenroll` always needs the cert."""

    CERT = "cert"
    BASIC = "basic"
    CERT_AND_BASIC = "cert+basic"
    CERT_OR_BASIC = "cert-or-basic"


class CloseAfter(enum.Enum):
    """`--close-after`: which answers end the connection, without `Connection: close` (RFC 9112
    §9.6 would have the server say so). Cisco libest closes after every 401, 202 and 4xx."""

    UNAUTHORIZED = "401"
    NON_200 = "non-200"

    def applies(self, status: int) -> bool:
        return status == 401 if self is CloseAfter.UNAUTHORIZED else status != 200


class HttpScheme(enum.Enum):
    """`--http-auth`: how the HTTP account (`--basic USER:PASS`) is asked for where `--auth`
    wants it: Basic (RFC 7617) or Digest (RFC 7616, as libest `-h`)."""

    BASIC = "basic"
    DIGEST = "digest"


class ServerCertCa(enum.Enum):
    """`--server-cert-from`: which CA issues the TLS server certificate. The dev TLS CA (the
    default, `server.pem`), or the EST CA that /cacerts serves: what a client that bootstraps
    its trust anchor from /cacerts by fingerprint (RFC 7030 §4.1.1) needs to verify the server
    with that root (a certificate issued at start-up, for the names of `server.pem`)."""

    TLS_CA = "tls-ca"
    EST_CA = "est-ca"


class TlsMax(enum.Enum):
    """Highest TLS version offered (`--tls-max`); 1.2 behaves like libest."""

    TLS1_2 = "1.2"
    TLS1_3 = "1.3"


class Fault(enum.Enum):
    """Deliberate misbehaviour for client tests (`--fault`), applied after all checks pass."""

    HTTP_500 = "http-500"  # 500 with a short text body
    DROP_MID_BODY = "drop-mid-body"  # full Content-Length announced, half sent, TCP closed
    SLOW_BODY = "slow-body"  # correct answer trickled over --slow-body seconds
    GARBAGE_BASE64 = "garbage-base64"  # 200, PKCS#7 media type, body not base64
    NOT_PKCS7 = "not-pkcs7"  # 200, base64 of a bare certificate instead of PKCS#7
    WRONG_KEY = "wrong-key"  # a certificate for a different public key
    FOREIGN_CA = "foreign-ca"  # the right key, signed by a CA the client never saw
    EXPIRED_CERT = "expired-cert"  # the right key and CA, validity ended yesterday
    OVERSIZE_BODY = "oversize-body"  # 200 with a body over 10 MiB
    WRONG_CONTENT_TYPE = "wrong-content-type"  # right body, Content-Type text/html
    # the right answer with "Connection: close", then the connection is closed (RFC 9112 §9.6)
    CLOSE_AFTER_RESPONSE = "close-after-response"
    # the right answer, keep-alive as far as the headers say, then the connection is closed
    DROP_AFTER_RESPONSE = "drop-after-response"


def parse_label_profile(text: str) -> tuple[str, Profile]:
    """`NAME=DURATION[,EKU...]`, e.g. `short=30s` or `tls=1d,clientAuth,serverAuth`."""
    name, sep, spec = text.partition("=")
    if not sep or not name or not spec:
        raise UsageError(f"not NAME=DURATION[,EKU...]: {text!r}")
    duration, *ekus = spec.split(",")
    profile = Profile(
        validity_s=parse_duration(duration),
        ekus=parse_eku_names(ekus) if ekus else Profile(validity_s=1).ekus,
    )
    return name, profile


@dataclass(frozen=True)
class ServerConfig:
    """Everything `est-testserver serve` can be told; `validate()` runs at construction."""

    pki_dir: Path
    host: str = "127.0.0.1"
    port: int = 8443
    tls_max: TlsMax = TlsMax.TLS1_3
    server_cert_ca: ServerCertCa = ServerCertCa.TLS_CA
    auth: AuthMode = AuthMode.CERT
    basic: tuple[str, str] | None = None
    http_scheme: HttpScheme = HttpScheme.BASIC
    #: offered in this order, one challenge each (RFC 7616 §3.7)
    digest_algorithms: tuple[str, ...] = ("MD5",)
    digest_nonce_lifetime_s: float = 300.0
    pop_required: bool = False
    csrattrs: CsrAttrsKind = CsrAttrsKind.NONE
    #: one 00 byte after the /csrattrs base64, counted in Content-Length (libest's C string)
    csrattrs_trailing_nul: bool = False
    default_profile: Profile = field(default_factory=lambda: Profile(validity_s=30 * 86400))
    labels: Mapping[str, Profile] = field(default_factory=dict)
    manual_approval_s: float | None = None
    retry_after_format: RetryAfterFormat = RetryAfterFormat.SECONDS
    max_concurrent: int | None = None
    busy_retry_after_s: int = 1
    #: the answer to an enrollment over `max_concurrent`: 503 (RFC 9110 §15.6.4) or 202
    #: (accepted, come back after Retry-After, RFC 7030 §4.2.3); /cacerts and /csrattrs get 503
    busy_status: int = 503
    #: each busy (and outage) Retry-After is `busy_retry_after_s` (`outage_retry_after_s`) + a
    #: random 0..jitter whole seconds, so the clients refused together do not all come back at once
    busy_retry_jitter_s: int = 0
    #: a CA outage: every request is answered 503 + Retry-After `outage_retry_after_s` while
    #: `outage_file` exists, and during `outage` = (seconds after start, duration in seconds)
    outage_file: Path | None = None
    outage: tuple[float, float] | None = None
    outage_retry_after_s: int = 60
    #: one JSON line per answered request: wall time, method, path, status, requests in flight
    request_log: Path | None = None
    wrap_base64: bool = True
    fault: Fault | None = None
    close_after: CloseAfter | None = None
    fault_times: int = 0  # 0: every matching request; N: the first N, then behave
    fault_operations: frozenset[str] = ENROLL_OPERATIONS
    slow_body_s: float = 5.0
    response_delay_s: float = 0.0
    issuance_log: Path | None = None
    port_file: Path | None = None
    max_request_bytes: int = 64 * 1024
    io_timeout_s: float = 10.0
    #: CA root key rollover (RFC 7030 §4.1.3): a new root is made at start; /cacerts serves
    #: OldWithOld, NewWithOld, OldWithNew and NewWithNew (from `rollover_announce_at`, None:
    #: from the start); from `rollover_at` certificates are issued by the new root and the TLS
    #: chain leads to it; once the old root expired only NewWithNew is served. With either set
    #: the server's TLS certificate comes from the EST CA (one root for TLS and issuance, as
    #: after a bootstrap by fingerprint, RFC 7030 §4.1.1). Times are the server's `clock`.
    rollover_at: datetime | None = None
    rollover_announce_at: datetime | None = None

    def __post_init__(self) -> None:
        if self.auth is not AuthMode.CERT and self.basic is None:
            raise ConfigError(f"--auth {self.auth.value} needs --basic USER:PASS")
        if not self.digest_algorithms or not set(self.digest_algorithms) <= set(DIGEST_ALGORITHMS):
            raise ConfigError(
                f"--digest-algorithms: expected some of {', '.join(DIGEST_ALGORITHMS)}"
            )
        if not self.digest_nonce_lifetime_s > 0:
            raise ConfigError("--nonce-lifetime must be positive")
        if self.max_concurrent is not None and self.max_concurrent < 1:
            raise ConfigError("--max-concurrent must be at least 1")
        if self.busy_status not in (202, 503):
            raise ConfigError(f"--busy-status must be 202 or 503, got {self.busy_status}")
        if self.busy_retry_jitter_s < 0 or self.outage_retry_after_s < 0:
            raise ConfigError("--busy-retry-jitter and --outage-retry-after must not be negative")
        if self.outage is not None and (self.outage[0] < 0 or not self.outage[1] > 0):
            raise ConfigError("--outage AFTER:FOR needs AFTER >= 0 and FOR > 0 (seconds)")
        if self.manual_approval_s is not None and self.manual_approval_s < 0:
            raise ConfigError("--manual-approval must not be negative")
        if self.fault_times < 0:
            raise ConfigError("--fault-times must not be negative")
        if self.rollover_announce_at is not None and self.rollover_at is None:
            raise ConfigError("--rollover-announce-at needs --rollover-at")
        for moment in (self.rollover_at, self.rollover_announce_at):
            if moment is not None and moment.tzinfo is None:
                raise ConfigError("rollover times need a time zone (e.g. 2030-01-01T00:00Z)")
        unknown = self.fault_operations - OPERATIONS
        if unknown:
            raise ConfigError(f"--fault-ops: unknown operation {sorted(unknown)[0]!r}")
