"""The RFC 7030 test server: TLS, HTTP routing, authentication, issuance and fault injection.

Theory of operation: one `ThreadingHTTPServer`; the TLS handshake runs in each connection's own
thread (a stalled or garbage-speaking client never blocks `accept`). Every request goes
through `_Handler._dispatch`: route -> admission (`--max-concurrent`) -> authentication ->
body and CSR checks -> PoP -> manual approval -> issue (or a fault) -> issuance log. Each
refusal is an `HttpRefusal` turned into a short text answer; anything else is a bug, logged
with its traceback and answered 500, and the server keeps serving.

Client certificates: OpenSSL verifies the chain against both the bootstrap CA and the EST CA,
with its time check switched off so that an expired certificate reaches the handler and gets
a readable 403 instead of a bare TLS alert; which CA issued it decides what it may do.

PoP (`--pop required`, RFC 7030 §3.5): challengePassword must be base64 of the connection's
channel binding: tls-unique under TLS 1.2 (RFC 5929), tls-exporter under TLS 1.3 (RFC 9266;
OpenSSL's exporter secret through its key log, exporter.py).
"""

from __future__ import annotations

import contextlib
import email.utils
import enum
import hmac
import http
import json
import random
import socket
import ssl
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, cast

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from est_agent.closing import Closing
from est_agent.fileio import atomic_write
from est_agent.testserver.config import (
    AuthMode,
    Fault,
    HttpScheme,
    ServerCertCa,
    ServerConfig,
    TlsMax,
)
from est_agent.testserver.csrcheck import (
    CheckedCsr,
    check_challenge_password,
    check_csr,
    check_reenroll,
)
from est_agent.testserver.digest import DigestAuthenticator, DigestVerdict
from est_agent.testserver.exporter import ExporterSecrets, peek_client_random, tls_exporter
from est_agent.testserver.issuer import (
    CertificateAuthority,
    Profile,
    issue_from_csr,
    make_ca,
    random_serial,
)
from est_agent.testserver.pki import DevPki, issue_server_certificate, load_dev_pki
from est_agent.testserver.rollover import RootRollover, make_rollover
from est_agent.testserver.wire import (
    ENROLL_OPERATIONS,
    UNSUPPORTED_OPERATIONS,
    HttpRefusal,
    csrattrs_body,
    decode_base64_body,
    encode_base64_body,
    encode_certs_only,
    format_retry_after,
    media_type_of,
    parse_basic_authorization,
    parse_est_path,
)

__all__ = ["EstTestServer", "RequestRecord"]

# X509_V_FLAG_NO_CHECK_TIME (openssl/x509_vfy.h); Python exposes no name for it but passes
# verify_flags through to X509_VERIFY_PARAM_set_flags unchanged.
_X509_V_FLAG_NO_CHECK_TIME = 0x200000
_PKCS7_CERTS_ONLY = "application/pkcs7-mime; smime-type=certs-only"
_OVERSIZE_BYTES = 10 * 1024 * 1024 + 64 * 1024
_REALM = "est"
_BASIC_REALM = f'Basic realm="{_REALM}", charset="UTF-8"'


class _Delivery(enum.Enum):
    """How the response bytes go out: normally, or misbehaving for a fault switch."""

    NORMAL = "normal"
    DROP_MID_BODY = "drop"
    SLOW = "slow"
    OVERSIZE = "oversize"
    CLOSE = "close"  # normal bytes, "Connection: close", then closed
    DROP = "drop-after"  # normal bytes, no "Connection: close", then closed anyway


@dataclass(frozen=True)
class _Response:
    status: int
    body: bytes = b""
    content_type: str | None = None
    headers: tuple[tuple[str, str], ...] = ()
    delivery: _Delivery = _Delivery.NORMAL


@dataclass(frozen=True)
class RequestRecord:
    """One answered request, for tests that count what a client sent (`EstTestServer.requests`).

    ``authorization`` is the scheme of the request's Authorization field (lower case), never its
    credentials; ``connection`` numbers the TCP connections from 1 in the order accepted;
    ``client_certificate`` says which CA issued the TLS client certificate of that connection
    ("bootstrap", "est", "unknown"), None when the client presented none.
    """

    method: str
    path: str
    status: int
    authorization: str | None
    connection: int
    client_certificate: str | None = None


@dataclass(frozen=True)
class _ClientCert:
    certificate: x509.Certificate
    #: "bootstrap" or "est": which of the two trusted CAs issued it
    issuer: str


class _State:
    """Mutable state shared by the handler threads; every field behind one lock."""

    def __init__(self, config: ServerConfig) -> None:
        self._lock = threading.Lock()
        self._first_seen: dict[str, float] = {}
        self._faults_done = 0
        self._connections = 0
        self._requests: list[RequestRecord] = []
        self._config = config
        self._slots = (
            threading.BoundedSemaphore(config.max_concurrent) if config.max_concurrent else None
        )
        #: admitted requests being answered now, and the most there were at once
        self.in_flight = 0
        self.peak_in_flight = 0
        self._log = config.issuance_log.open("a", encoding="utf-8") if config.issuance_log else None
        try:
            self._request_log = (
                config.request_log.open("a", encoding="utf-8") if config.request_log else None
            )
        except OSError:
            self.close()
            raise

    def close(self) -> None:
        if self._log is not None:
            self._log.close()
        if getattr(self, "_request_log", None) is not None:
            self._request_log.close()  # type: ignore[union-attr]

    @contextlib.contextmanager
    def admission(self) -> Iterator[bool]:
        """Yields whether this request got one of the `--max-concurrent` slots."""
        if self._slots is not None and not self._slots.acquire(blocking=False):
            yield False
            return
        with self._lock:
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            yield True
        finally:
            with self._lock:
                self.in_flight -= 1
            if self._slots is not None:
                self._slots.release()

    def log_request(self, method: str, path: str, status: int, in_flight: int) -> None:
        """One line of `--request-log` (no header values, no bodies); ``in_flight``: admitted
        requests when this one was admitted (itself included), 0 when it was not."""
        if self._request_log is None:
            return
        with self._lock:
            entry = {"t": time.time(), "method": method, "path": path, "status": status,
                     "in_flight": in_flight}  # fmt: skip
            self._request_log.write(json.dumps(entry) + "\n")
            self._request_log.flush()

    def pending_for(self, key_sha256: str, now_s: float) -> float | None:
        """Seconds still to wait for this key under `--manual-approval`, None when issued."""
        approval_s = self._config.manual_approval_s
        if approval_s is None:
            return None
        with self._lock:
            first = self._first_seen.get(key_sha256)
            if first is None:
                self._first_seen[key_sha256] = now_s
                return approval_s
        remaining = first + approval_s - now_s
        return remaining if remaining > 0 else None

    def take_fault(self, operation: str) -> Fault | None:
        """The fault to apply to this request, counting it against `--fault-times`."""
        fault = self._config.fault
        if fault is None or operation not in self._config.fault_operations:
            return None
        with self._lock:
            if self._config.fault_times and self._faults_done >= self._config.fault_times:
                return None
            self._faults_done += 1
        return fault

    def next_connection(self) -> int:
        with self._lock:
            self._connections += 1
            return self._connections

    def record(self, entry: RequestRecord) -> None:
        with self._lock:
            self._requests.append(entry)

    @property
    def requests(self) -> list[RequestRecord]:
        with self._lock:
            return list(self._requests)

    def log(self, entry: dict[str, Any]) -> None:
        if self._log is None:
            return
        line = json.dumps(entry, sort_keys=True) + "\n"
        with self._lock:
            self._log.write(line)
            self._log.flush()


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    # Do not wait for idle keep-alive connections (up to io_timeout_s each) on close.
    block_on_close = False
    # 200 clients connecting at once must not overflow the listen backlog (default 5).
    request_queue_size = 1024

    def __init__(self, address: tuple[str, int], est: EstTestServer) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.est = est
        super().__init__(address, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        # Handshake failures, resets and timeouts are the peer's doing: one line, no traceback.
        if isinstance(exc, OSError):  # ssl.SSLError, resets and timeouts included
            self.est.note(f"{client_address[0]}: connection ended: {type(exc).__name__}: {exc}")
            return
        super().handle_error(request, client_address)


class EstTestServer(Closing):
    """An RFC 7030 server for tests; `serve_forever` in the CLI, `start` in-process."""

    def __init__(self, config: ServerConfig, pki: DevPki | None = None) -> None:
        self.config = config
        self.pki = pki or load_dev_pki(config.pki_dir)
        #: the server's notion of time for the rollover phases (tests move it)
        self.clock: Callable[[], datetime] = lambda: datetime.now(UTC)
        self.rollover: RootRollover | None = None
        self._rollover_context: ssl.SSLContext | None = None
        if config.rollover_at is not None:
            self.ssl_context = self._make_rollover_contexts()
        else:
            self.ssl_context = self._make_ssl_context()
        self._foreign_ca: CertificateAuthority | None = None
        #: the Digest account and its nonces (`--http-auth digest`)
        self.digest = (
            DigestAuthenticator(
                realm=_REALM,
                username=config.basic[0],
                password=config.basic[1],
                algorithms=config.digest_algorithms,
                lifetime_s=config.digest_nonce_lifetime_s,
            )
            if config.http_scheme is HttpScheme.DIGEST and config.basic is not None
            else None
        )
        self._foreign_lock = threading.Lock()
        self._quiet = False
        self._started = time.monotonic()
        self._thread: threading.Thread | None = None
        # tls-exporter needs OpenSSL's exporter secrets: only kept when PoP may meet TLS 1.3
        self.exporter_secrets = (
            ExporterSecrets(self.ssl_context)
            if config.pop_required and config.tls_max is TlsMax.TLS1_3
            else None
        )
        try:
            self._httpd = _HTTPServer((config.host, config.port), self)
        except OSError:
            if self.exporter_secrets is not None:
                self.exporter_secrets.close()
            raise
        try:
            self._state = _State(config)
        except OSError:
            self._httpd.server_close()  # e.g. an unwritable --issuance-log: free the port
            if self.exporter_secrets is not None:
                self.exporter_secrets.close()
            raise

    # -- lifecycle ---------------------------------------------------------------------------
    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        host = f"[{self.config.host}]" if ":" in self.config.host else self.config.host
        return f"https://{host}:{self.port}/.well-known/est"

    def quiet(self) -> None:
        """Stop writing per-request lines to stderr (the issuance log is unaffected)."""
        self._quiet = True

    def serve_forever(self) -> None:
        # A short poll keeps shutdown quick (tests start and stop many servers).
        self._httpd.serve_forever(poll_interval=0.05)

    def request_stop(self) -> None:
        """Make `serve_forever` return; safe from a signal handler on the serving thread."""
        threading.Thread(target=self._httpd.shutdown, daemon=True).start()

    def start(self) -> EstTestServer:
        """Serve from a background thread (tests and benchmarks); returns self."""
        self._thread = threading.Thread(target=self.serve_forever, name="est-testserver")
        self._thread.daemon = True
        self._thread.start()
        return self

    def close(self) -> None:
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
            self._thread = None
        self._httpd.server_close()
        self._state.close()
        if self.exporter_secrets is not None:
            self.exporter_secrets.close()

    def in_outage(self) -> bool:
        """Whether the CA is down now (`outage_file` exists, or inside the `outage` window)."""
        config = self.config
        if config.outage_file is not None and config.outage_file.exists():
            return True
        if config.outage is None:
            return False
        after_s, for_s = config.outage
        elapsed = time.monotonic() - self._started
        return after_s <= elapsed < after_s + for_s

    def note(self, message: str) -> None:
        if not self._quiet:
            sys.stderr.write(f"est-testserver: {message}\n")

    # -- CA rollover (RFC 7030 §4.1.3) -------------------------------------------------------
    def _make_rollover_contexts(self) -> ssl.SSLContext:
        """The new root and its links, and one TLS server certificate under each EST root."""
        rollover = make_rollover(self.pki.est_ca, datetime.now(UTC))
        self.rollover = rollover
        self._rollover_context = self._make_ssl_context(rollover.new)
        return self._make_ssl_context(rollover.old)

    def rollover_phase(self, now: datetime | None = None) -> str:
        """before | overlap | switched | expired (the old root's end), by the server's clock."""
        config = self.config
        if config.rollover_at is None or self.rollover is None:
            return "none"
        now = now or self.clock()
        if config.rollover_announce_at is not None and now < config.rollover_announce_at:
            return "before"
        if now < config.rollover_at:
            return "overlap"
        if now < self.rollover.old.certificate.not_valid_after_utc:
            return "switched"
        return "expired"

    def context_now(self) -> ssl.SSLContext:
        """The TLS identity to present now: chained to the new root once switched."""
        if self._rollover_context is not None and self.rollover_phase() in ("switched", "expired"):
            return self._rollover_context
        return self.ssl_context

    def issuing_ca(self) -> CertificateAuthority:
        if self.rollover is not None and self.rollover_phase() in ("switched", "expired"):
            return self.rollover.new
        return self.pki.est_ca

    def cacerts_now(self) -> list[x509.Certificate]:
        """What /cacerts sends now (RFC 7030 §4.1.3: the four certificates while both roots
        live)."""
        rollover = self.rollover
        phase = self.rollover_phase()
        if rollover is None or phase == "before":
            return [self.pki.est_ca.certificate]
        if phase == "expired":
            return [rollover.new.certificate]
        return rollover.four

    def _make_ssl_context(self, issuer: CertificateAuthority | None = None) -> ssl.SSLContext:
        """The TLS server context: a server certificate made now by `issuer` (or by the EST CA
        with `--server-cert-from est-ca`), else the dev PKI's server certificate."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.maximum_version = (
            ssl.TLSVersion.TLSv1_2
            if self.config.tls_max is TlsMax.TLS1_2
            else ssl.TLSVersion.TLSv1_3
        )
        if issuer is None and self.config.server_cert_ca is ServerCertCa.EST_CA:
            issuer = self.pki.est_ca
        if issuer is not None:
            _load_server_cert_from(ctx, issuer)
        else:
            ctx.load_cert_chain(self.pki.server_cert_path, self.pki.server_key_path)
        # Optional, not required: Basic-only clients (strongSwan's first enrollment) and
        # /cacerts fetches come without a certificate.
        ctx.verify_mode = ssl.CERT_OPTIONAL
        trusted = b"".join(
            ca.certificate.public_bytes(serialization.Encoding.PEM)
            for ca in (self.pki.bootstrap_ca, self.pki.est_ca)
        )
        if self.rollover is not None:  # certificates issued after the switch renew too
            trusted += self.rollover.new.certificate.public_bytes(serialization.Encoding.PEM)
        ctx.load_verify_locations(cadata=trusted.decode("ascii"))
        ctx.verify_flags |= _X509_V_FLAG_NO_CHECK_TIME
        ctx.num_tickets = 0  # no session resumption: every connection is a full handshake
        return ctx

    # -- helpers used by the handler ---------------------------------------------------------
    def profile_for(self, label: str | None) -> Profile:
        if label is None:
            return self.config.default_profile
        profile = self.config.labels.get(label)
        if profile is None:
            raise HttpRefusal(404, f"unknown EST label {label!r}")
        return profile

    def classify_client(self, der: bytes | None) -> _ClientCert | None:
        if not der:
            return None
        cert = x509.load_der_x509_certificate(der)
        cas = [("bootstrap", self.pki.bootstrap_ca), ("est", self.pki.est_ca)]
        if self.rollover is not None:
            cas.append(("est", self.rollover.new))
        for name, ca in cas:
            try:
                cert.verify_directly_issued_by(ca.certificate)
            except (ValueError, TypeError, InvalidSignature):  # not issued by this CA
                continue
            return _ClientCert(certificate=cert, issuer=name)
        return None

    def foreign_ca(self) -> CertificateAuthority:
        with self._foreign_lock:
            if self._foreign_ca is None:
                self._foreign_ca = make_ca(
                    "est-testserver foreign CA", datetime.now(UTC), timedelta(days=365)
                )
            return self._foreign_ca

    @property
    def state(self) -> _State:
        return self._state

    @property
    def requests(self) -> list[RequestRecord]:
        """Every request answered so far (the ones whose request line parsed), in order."""
        return self._state.requests


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _load_server_cert_from(ctx: ssl.SSLContext, issuer: CertificateAuthority) -> None:
    """A TLS server certificate issued now by `issuer`: OpenSSL loads a certificate and key
    from files only, so they pass through a private temporary directory that is gone when
    this returns."""
    cert, key = issue_server_certificate(issuer, datetime.now(UTC))
    with tempfile.TemporaryDirectory(prefix="est-testserver-") as directory:
        cert_path, key_path = Path(directory) / "server.pem", Path(directory) / "server.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        atomic_write(key_path, _private_pem(key), mode=0o600, what="private key")
        ctx.load_cert_chain(cert_path, key_path)


def _valid_now(cert: x509.Certificate, now: datetime) -> bool:
    return cert.not_valid_before_utc <= now <= cert.not_valid_after_utc


def _has_client_auth(cert: x509.Certificate) -> bool:
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return False
    return ExtendedKeyUsageOID.CLIENT_AUTH in eku


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # strongSwan's client refuses an HTTP/1.0 status line
    server_version = "est-testserver/0.1"
    sys_version = ""
    disable_nagle_algorithm = True
    error_message_format = "%(code)d %(message)s\n"
    error_content_type = "text/plain; charset=utf-8"
    # Without this, a malformed request line is answered HTTP/0.9-style: a bare body with no
    # status line, which a client cannot tell from garbage.
    default_request_version = "HTTP/1.1"
    #: admitted requests when this request was admitted (`--request-log`), 0 if it was not
    _in_flight = 0

    # -- connection setup --------------------------------------------------------------------
    @property
    def _est(self) -> EstTestServer:
        return cast(_HTTPServer, self.server).est

    #: ClientHello.random of this connection (when tls-exporter may be needed): the key of
    #: its exporter secret
    _client_random: bytes | None = None

    def setup(self) -> None:
        est = self._est
        raw = cast(socket.socket, self.request)
        # Bounds the handshake and every later read and write; the TLS socket inherits it.
        raw.settimeout(est.config.io_timeout_s)
        self._connection_number = est.state.next_connection()
        if est.exporter_secrets is not None:
            self._client_random = peek_client_random(raw, est.config.io_timeout_s)
        self.request = est.context_now().wrap_socket(raw, server_side=True)
        super().setup()

    def finish(self) -> None:
        # socketserver closes the plain socket it accepted, which wrap_socket detached; the
        # TLS socket that now owns the descriptor is ours to close.
        secrets = self._est.exporter_secrets
        if secrets is not None and self._client_random is not None:
            secrets.forget(self._client_random)
        try:
            super().finish()
        finally:
            tls = self._tls
            with contextlib.suppress(OSError):  # the peer may be gone already
                tls.shutdown(socket.SHUT_WR)
            tls.close()

    def _close_notify(self) -> None:
        """Send TLS close_notify (RFC 8446 §6.1) without waiting for the peer's."""
        tls = self._tls
        # Non-blocking: unwrap() sends the alert, then raises SSLWantReadError (an OSError)
        # instead of waiting for the client's; a client that already wrote more (tlslite
        # sends an empty record after a request) makes it raise SSLError: sent all the same.
        with contextlib.suppress(OSError):
            tls.setblocking(False)
            tls.unwrap()

    @property
    def _tls(self) -> ssl.SSLSocket:
        return cast(ssl.SSLSocket, self.connection)

    def parse_request(self) -> bool:
        if not super().parse_request():
            return False
        if len(self.requestline.split()) != 3:
            # HTTP/0.9 simple requests ("GET /path") are not HTTP/1.x: refuse them.
            self.send_error(400, "request line must be METHOD TARGET HTTP/1.x")
            return False
        return True

    def handle_one_request(self) -> None:
        try:
            super().handle_one_request()
        except (ssl.SSLError, ConnectionError):
            # The peer closed (often without close_notify) between requests: not an error.
            self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:
        self._est.note(f"{self.client_address[0]} {format % args}")

    # -- methods ------------------------------------------------------------------------------
    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def _dispatch(self, method: str) -> None:
        self._body_consumed = False
        self._in_flight = 0
        try:
            response = self._route(method)
        except HttpRefusal as refusal:
            self._refuse(refusal)
            return
        except Exception:
            self._est.note("internal error:\n" + traceback.format_exc())
            self._refuse(HttpRefusal(500, "internal server error"))
            return
        self._send(response)

    def _route(self, method: str) -> _Response:
        path = parse_est_path(self.path)
        op = path.operation
        if op in UNSUPPORTED_OPERATIONS:
            raise HttpRefusal(501, f"{op} is not offered by this server")
        profile = self._est.profile_for(path.label)
        expected = "GET" if op in ("cacerts", "csrattrs") else "POST"
        if method != expected:
            raise HttpRefusal(405, f"{op} takes {expected}", {"Allow": expected})
        config = self._est.config
        if self._est.in_outage():
            # RFC 9110 §15.6.4: 503 with Retry-After for a temporary outage (RFC 7030 §4.2.3
            # lets an EST server answer so); nothing is admitted behind a CA that is down
            jitter = random.randint(0, config.busy_retry_jitter_s)  # noqa: S311 - not a secret
            retry = format_retry_after(
                config.outage_retry_after_s + jitter, config.retry_after_format, datetime.now(UTC)
            )
            raise HttpRefusal(503, "CA unavailable, retry later", {"Retry-After": retry})
        with self._est.state.admission() as admitted:
            self._in_flight = self._est.state.in_flight if admitted else 0
            if not admitted:
                jitter = random.randint(0, config.busy_retry_jitter_s)  # noqa: S311 - not a secret
                retry = format_retry_after(
                    config.busy_retry_after_s + jitter,
                    config.retry_after_format,
                    datetime.now(UTC),
                )
                if config.busy_status == 202 and op in ENROLL_OPERATIONS:
                    # RFC 7030 §4.2.3: accepted, the client asks again after Retry-After
                    raise HttpRefusal(202, "server busy, request accepted: retry later",
                                      {"Retry-After": retry})  # fmt: skip
                raise HttpRefusal(503, "server busy, retry later", {"Retry-After": retry})
            if op == "cacerts":
                return self._cacerts()
            if op == "csrattrs":
                return self._csrattrs()
            return self._enroll(op, path.label, profile)

    # -- operations ---------------------------------------------------------------------------
    def _cacerts(self) -> _Response:
        der = encode_certs_only(self._est.cacerts_now())
        ok = _Response(
            status=200,
            body=encode_base64_body(der, wrap=self._est.config.wrap_base64),
            content_type="application/pkcs7-mime",
            headers=(("Content-Transfer-Encoding", "base64"),),
        )
        fault = self._est.state.take_fault("cacerts")
        return ok if fault is None else self._faulty(fault, ok, issued_der=None)

    def _csrattrs(self) -> _Response:
        config = self._est.config
        body = csrattrs_body(
            config.csrattrs, wrap=config.wrap_base64, trailing_nul=config.csrattrs_trailing_nul
        )
        if body is None:
            return _Response(status=204)
        ok = _Response(
            status=200,
            body=body,
            content_type="application/csrattrs",
            headers=(("Content-Transfer-Encoding", "base64"),),
        )
        fault = self._est.state.take_fault("csrattrs")
        return ok if fault is None else self._faulty(fault, ok, issued_der=None)

    def _authenticate_enroll(self, client: _ClientCert | None, now: datetime) -> str:
        """RFC 7030 §3.2.3/§3.3.2 for simpleenroll; returns the method for the log."""
        config = self._est.config
        mode = config.auth
        cert_ok = client is not None and client.issuer == "bootstrap"
        if cert_ok and client is not None and not _valid_now(client.certificate, now):
            raise HttpRefusal(403, "client certificate is expired or not yet valid")
        if mode is AuthMode.CERT or mode is AuthMode.CERT_AND_BASIC:
            if not cert_ok:
                why = (
                    "simpleenroll needs a bootstrap CA certificate, not an EST CA one"
                    if client is not None
                    else "simpleenroll needs a TLS client certificate from the bootstrap CA"
                )
                raise HttpRefusal(403, why)
            if mode is AuthMode.CERT:
                return "cert"
            return "cert+" + self._http_account(required=True)
        if mode is AuthMode.CERT_OR_BASIC and cert_ok:
            account = self._http_account(required=False)
            return f"cert+{account}" if account else "cert"
        return self._http_account(required=True)

    def _http_account(self, *, required: bool) -> str:
        """The HTTP scheme that authenticated the account ("basic" / "digest"); "" when it
        did not and is not `required`; else a 401 with the challenges of `--http-auth`."""
        est = self._est
        config = est.config
        header = self.headers.get("Authorization")
        if config.http_scheme is HttpScheme.BASIC:
            creds = parse_basic_authorization(header)
            if creds is not None and config.basic is not None and _same(creds, config.basic):
                return "basic"
            if not required:
                return ""
            raise HttpRefusal(401, "HTTP Basic credentials required", challenges=(_BASIC_REALM,))
        digest = est.digest
        assert digest is not None
        verdict, reason = digest.check(header, self.command, self.path)
        if verdict is DigestVerdict.OK:
            return "digest"
        if not required:
            return ""
        stale = verdict is DigestVerdict.STALE
        raise HttpRefusal(401, reason, challenges=digest.challenges(stale=stale))

    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            self.close_connection = True
            raise HttpRefusal(411, "chunked request bodies are not accepted; send Content-Length")
        length_text = self.headers.get("Content-Length")
        if length_text is None:
            raise HttpRefusal(411, "Content-Length required")
        if not length_text.strip().isdigit():
            self.close_connection = True
            raise HttpRefusal(400, "malformed Content-Length")
        length = int(length_text)
        if length > self._est.config.max_request_bytes:
            self.close_connection = True
            raise HttpRefusal(413, "request body too large")
        body = self.rfile.read(length)
        self._body_consumed = True
        if len(body) != length:
            self.close_connection = True
            raise HttpRefusal(400, "request body shorter than Content-Length")
        return body

    def _enroll(self, op: str, label: str | None, profile: Profile) -> _Response:
        est = self._est
        config = est.config
        now = datetime.now(UTC).replace(microsecond=0)
        client = est.classify_client(self._tls.getpeercert(binary_form=True))
        if op == "simpleenroll":
            auth = self._authenticate_enroll(client, now)
        else:
            # §4.2.2: re-enrollment is authenticated by the certificate being renewed.
            if client is None or client.issuer != "est":
                raise HttpRefusal(
                    403, "simplereenroll needs the certificate being renewed (EST CA) for TLS"
                )
            if not _valid_now(client.certificate, now):
                raise HttpRefusal(403, "client certificate is expired or not yet valid")
            # OpenSSL's purpose check only refuses an EKU that lacks clientAuth; a certificate
            # with no EKU at all passes it, so the policy is enforced here.
            if not _has_client_auth(client.certificate):
                raise HttpRefusal(403, "client certificate lacks the clientAuth EKU")
            auth = "cert"
        if media_type_of(self.headers.get("Content-Type")) != "application/pkcs10":
            raise HttpRefusal(415, "Content-Type must be application/pkcs10")
        checked = check_csr(decode_base64_body(self._read_body()))
        if op == "simplereenroll" and client is not None:
            check_reenroll(checked, client.certificate, now)
        if config.pop_required:
            self._check_pop(checked)
        pending = est.state.pending_for(checked.public_key_sha256, time.monotonic())
        if pending is not None:
            est.state.log(
                _log_entry("pending", op=op, label=label, checked=checked, auth=auth, cert=None)
            )
            retry = format_retry_after(pending, config.retry_after_format, datetime.now(UTC))
            return _Response(
                status=202,
                body=b"request accepted, pending manual approval\n",
                content_type="text/plain; charset=utf-8",
                headers=(("Retry-After", retry),),
            )
        if config.response_delay_s:
            time.sleep(config.response_delay_s)
        fault = est.state.take_fault(op)
        cert = self._issue(checked, profile, now, fault)
        est.state.log(
            _log_entry(
                "issued", op=op, label=label, checked=checked, auth=auth, cert=cert, fault=fault
            )
        )
        der = encode_certs_only([cert])
        ok = _Response(
            status=200,
            body=encode_base64_body(der, wrap=config.wrap_base64),
            content_type=_PKCS7_CERTS_ONLY,
            headers=(("Content-Transfer-Encoding", "base64"),),
        )
        if fault is None:
            return ok
        return self._faulty(fault, ok, issued_der=cert.public_bytes(serialization.Encoding.DER))

    def _check_pop(self, checked: CheckedCsr) -> None:
        # RFC 7030 §3.5 binds to tls-unique (RFC 5929) under TLS 1.2; TLS 1.3 does not define
        # it, and RFC 9266 §1 replaces it with tls-exporter there.
        tls = self._tls
        if tls.version() == "TLSv1.2":
            binding = tls.get_channel_binding("tls-unique")
            if not binding:
                raise HttpRefusal(400, "PoP required: no tls-unique for this connection")
            check_challenge_password(checked, binding, "tls-unique")
            return
        secrets = self._est.exporter_secrets
        secret = (
            secrets.secret(self._client_random)
            if secrets is not None and self._client_random is not None
            else None
        )
        cipher = tls.cipher()
        if secret is None or cipher is None:
            raise HttpRefusal(400, "PoP required: no tls-exporter for this TLS 1.3 connection")
        check_challenge_password(checked, tls_exporter(secret, cipher[0]), "tls-exporter")

    def _issue(
        self, checked: CheckedCsr, profile: Profile, now: datetime, fault: Fault | None
    ) -> x509.Certificate:
        est = self._est
        ca = est.issuing_ca()
        public_key = cast(ec.EllipticCurvePublicKey, checked.csr.public_key())
        not_before, not_after = now, now + timedelta(seconds=profile.validity_s)
        if fault is Fault.WRONG_KEY:
            public_key = ec.generate_private_key(ec.SECP256R1()).public_key()
        elif fault is Fault.FOREIGN_CA:
            ca = est.foreign_ca()
        elif fault is Fault.EXPIRED_CERT:
            not_before, not_after = now - timedelta(days=2), now - timedelta(days=1)
        return issue_from_csr(
            ca,
            subject=checked.csr.subject,
            public_key=public_key,
            san_der=checked.san_der,
            san_critical=checked.san_critical,
            ekus=profile.ekus,
            not_before=not_before,
            not_after=not_after,
            serial=random_serial(),
        )

    def _faulty(self, fault: Fault, ok: _Response, issued_der: bytes | None) -> _Response:
        if fault is Fault.HTTP_500:
            return _Response(
                status=500,
                body=b"internal error (injected fault)\n",
                content_type="text/plain; charset=utf-8",
            )
        if fault is Fault.DROP_MID_BODY:
            return replace(ok, delivery=_Delivery.DROP_MID_BODY)
        if fault is Fault.SLOW_BODY:
            return replace(ok, delivery=_Delivery.SLOW)
        if fault is Fault.GARBAGE_BASE64:
            return replace(ok, body=b"%%% this is not base64 @@@\r\n")
        if fault is Fault.NOT_PKCS7:
            payload = issued_der or self._est.pki.est_ca.certificate.public_bytes(
                serialization.Encoding.DER
            )
            return replace(ok, body=encode_base64_body(payload, wrap=self._est.config.wrap_base64))
        if fault is Fault.OVERSIZE_BODY:
            return replace(ok, delivery=_Delivery.OVERSIZE)
        if fault is Fault.WRONG_CONTENT_TYPE:
            return replace(ok, content_type="text/html; charset=utf-8")
        if fault is Fault.CLOSE_AFTER_RESPONSE:
            return replace(ok, delivery=_Delivery.CLOSE)
        if fault is Fault.DROP_AFTER_RESPONSE:
            return replace(ok, delivery=_Delivery.DROP)
        # WRONG_KEY, FOREIGN_CA, EXPIRED_CERT were applied when issuing.
        return ok

    # -- output -------------------------------------------------------------------------------
    def _refuse(self, refusal: HttpRefusal) -> None:
        if not self._body_consumed and not self.close_connection:
            self._discard_body()
        self._send(
            _Response(
                status=refusal.status,
                body=(refusal.text + "\n").encode("utf-8"),
                content_type="text/plain; charset=utf-8",
                headers=(
                    *refusal.headers.items(),
                    *(("WWW-Authenticate", value) for value in refusal.challenges),
                ),
            )
        )

    def _discard_body(self) -> None:
        # Keep-alive needs the unread body gone, or its bytes would parse as the next request;
        # when that cannot be done cheaply, close after answering.
        length_text = self.headers.get("Content-Length", "0").strip()
        chunked = "chunked" in (self.headers.get("Transfer-Encoding") or "").lower()
        if chunked or not length_text.isdigit():
            self.close_connection = True
            return
        length = int(length_text)
        if length > self._est.config.max_request_bytes:
            self.close_connection = True
            return
        if length and len(self.rfile.read(length)) != length:
            self.close_connection = True
        self._body_consumed = True

    def _send(self, response: _Response) -> None:
        close_after = self._est.config.close_after
        if (
            close_after is not None
            and close_after.applies(response.status)
            and response.delivery is _Delivery.NORMAL
        ):
            # libest's way: the answer as if keep-alive, then close_notify and the TCP close.
            response = replace(response, delivery=_Delivery.DROP)
        authorization = (self.headers.get("Authorization") or "").strip()
        der = self._tls.getpeercert(binary_form=True)
        client = self._est.classify_client(der)
        self._est.state.log_request(self.command, self.path, response.status, self._in_flight)
        self._est.state.record(
            RequestRecord(
                method=self.command,
                path=self.path,
                status=response.status,
                authorization=authorization.split(" ", 1)[0].lower() or None,
                connection=self._connection_number,
                client_certificate=client.issuer if client else ("unknown" if der else None),
            )
        )
        body = response.body
        length = _OVERSIZE_BYTES if response.delivery is _Delivery.OVERSIZE else len(body)
        if response.delivery is not _Delivery.NORMAL or response.status >= 500:
            self.close_connection = True
        try:
            reason = http.HTTPStatus(response.status).phrase
        except ValueError:
            reason = ""
        lines = [
            f"HTTP/1.1 {response.status} {reason}",
            f"Server: {self.server_version}",
            f"Date: {email.utils.formatdate(usegmt=True)}",
        ]
        if response.content_type:
            lines.append(f"Content-Type: {response.content_type}")
        lines.extend(f"{name}: {value}" for name, value in response.headers)
        if response.status != 204:
            lines.append(f"Content-Length: {length}")
        if self.close_connection and response.delivery is not _Delivery.DROP:
            lines.append("Connection: close")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        self.log_request(response.status, length)
        # One write for head and body: some clients (strongSwan) parse the first TLS record
        # as if it held the whole answer.
        if response.delivery is _Delivery.NORMAL:
            self.wfile.write(head + body)
        elif response.delivery in (_Delivery.CLOSE, _Delivery.DROP):
            self.wfile.write(head + body)
            self._close_notify()  # a clean close (finish() then closes the TCP connection)
        elif response.delivery is _Delivery.DROP_MID_BODY:
            self.wfile.write(head + body[: len(body) // 2])
            # TCP-level shutdown without TLS close_notify: the peer sees a truncated stream.
            self._tls.shutdown(socket.SHUT_RDWR)
        elif response.delivery is _Delivery.SLOW:
            self.wfile.write(head)
            pieces = 10
            step = max(1, -(-len(body) // pieces))
            for start in range(0, len(body), step):
                time.sleep(self._est.config.slow_body_s / pieces)
                self.wfile.write(body[start : start + step])
        else:
            self.wfile.write(head)
            line = b"A" * 62 + b"\r\n"
            chunk = line * 1024
            sent = 0
            while sent < length:
                piece = chunk[: length - sent]
                self.wfile.write(piece)
                sent += len(piece)


def _same(given: tuple[str, str], expected: tuple[str, str]) -> bool:
    # Constant-time on both parts, so that timing does not tell which one was wrong.
    user_ok = hmac.compare_digest(given[0].encode(), expected[0].encode())
    pass_ok = hmac.compare_digest(given[1].encode(), expected[1].encode())
    return user_ok and pass_ok


def _log_entry(
    event: str,
    *,
    op: str,
    label: str | None,
    checked: CheckedCsr,
    auth: str,
    cert: x509.Certificate | None,
    fault: Fault | None = None,
) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
        "event": event,
        "operation": op,
        "label": label,
        "subject": checked.csr.subject.rfc4514_string(),
        "public_key_sha256": checked.public_key_sha256,
        "signature_algorithm": checked.csr.signature_algorithm_oid.dotted_string,
        "auth": auth,
    }
    if cert is not None:
        entry["serial"] = f"{cert.serial_number:x}"
        entry["not_after"] = cert.not_valid_after_utc.isoformat()
    if fault is not None:
        entry["fault"] = fault.value
    return entry


def write_port_file(path: Path, port: int) -> None:
    """Write the bound port atomically, so a poller never reads a half-written number."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"{port}\n", encoding="ascii")
    tmp.replace(path)
