"""The EST client (RFC 7030): cacerts, csrattrs, simpleenroll, simplereenroll over one connection.

Theory of operation: one ``EstTransport`` (est/tls.py) keeps a single keep-alive TLS connection.
An enrollment attempt (1) makes sure that connection is up, by fetching ``/cacerts`` (needed
anyway: the issued certificate must chain to it), (2) calls ``csr_factory(binding)`` with the
channel binding of *that* connection, so a proof-of-possession challengePassword is
base64(tls-unique) or base64(tls-exporter) of it (RFC 7030 §3.5, RFC 9266), and (3) POSTs the
CSR with the transport pinned: if the connection died in between, nothing is sent on a new one
and the attempt fails with ``ConnectionChangedError``. Transient failures (connection errors,
5xx) retry the whole attempt on a new connection, so the CSR is signed again (est-notes.md).

Outcomes: a validated ``Enrollment``; ``EnrollmentPending`` for 202 / 503 (RFC 7030 §4.2.3);
``AuthError`` for 401/403; ``EstRejectedError`` for other 4xx; ``EstResponseError`` when the
answer does not parse or the certificate does not validate; ``EstConnectionError`` when the
server stays unreachable or keeps failing after the retries. Credentials (HTTP Basic) only ever
travel inside a verified TLS session and only in answer to a 401 challenge (RFC 7030 §3.2.3).
"""

from __future__ import annotations

import base64
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urljoin, urlsplit

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from est_agent.errors import (
    AuthError,
    EnrollmentPending,
    EstAgentError,
    EstConnectionError,
    EstError,
    EstRejectedError,
    EstResponseError,
)
from est_agent.est.messages import (
    MEDIA_CSRATTRS,
    MEDIA_PKCS7,
    MEDIA_PKCS10,
    CaCerts,
    CsrAttributes,
    classify_cacerts,
    decode_certs_only,
    encode_pkcs10_body,
    error_excerpt,
    est_url,
    media_type_matches,
    parse_csrattrs,
    parse_retry_after,
)
from est_agent.est.tls import ChannelBinding, EstTransport, StdlibTls, TlsliteTls

if TYPE_CHECKING:
    import httpx

    from est_agent.card.signer import Signer

__all__ = [
    "CsrFactory",
    "Enrollment",
    "EstCaCerts",
    "EstClient",
    "RetryPolicy",
]

#: Builds and signs the DER CSR for one attempt, given that connection's channel binding.
CsrFactory = Callable[[ChannelBinding | None], bytes]
_T = TypeVar("_T")

_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_MAX_REDIRECTS = 3


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of transient failures (connection errors, 5xx other than enroll 503).

    Exponential backoff with full jitter (uniform in [0, min(cap, initial * 2**n)]); a server's
    Retry-After (RFC 9110 §10.2.3) is a lower bound, capped at ``retry_after_cap_s``. ``sleep``
    is injectable so tests run without waiting.
    """

    attempts: int = 4
    initial_s: float = 1.0
    cap_s: float = 30.0
    retry_after_cap_s: float = 300.0
    sleep: Callable[[float], None] = time.sleep


@dataclass(frozen=True)
class EstCaCerts:
    """``/cacerts``: the certificates as sent and their CA-rollover roles."""

    certificates: tuple[x509.Certificate, ...]
    roles: CaCerts

    @property
    def anchor(self) -> x509.Certificate:
        return self.roles.anchor


@dataclass(frozen=True)
class Enrollment:
    """A validated enrollment answer.

    ``certificate`` carries the CSR's public key, chains to the ``/cacerts`` anchor, is valid
    now and (when required) has the clientAuth EKU; ``chain`` is the other certificates the
    server returned (may be empty); ``csr`` is the DER request that was answered; ``body`` the
    raw response body (for logs and the credential store's audit trail).
    """

    certificate: x509.Certificate
    chain: tuple[x509.Certificate, ...]
    csr: bytes
    body: bytes
    channel_binding: ChannelBinding | None = field(default=None, repr=False)


class _TransientError(EstConnectionError):
    """A 5xx (or 503 on a GET): try again, after ``retry_after_s`` when the server said so."""

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class _Reply:
    status: int
    headers: httpx.Headers
    body: bytes
    stream: object


class EstClient:
    """An EST client bound to one server (and label) and one TLS client identity.

    TLS: with a ``signer`` (and ``client_cert_chain``, certificate first) the handshake runs in
    tlslite-ng and the client's CertificateVerify is signed by that signer (the card); without
    one, the stdlib ``ssl`` path is used (server-only authentication, or ``client_cert_file`` /
    ``client_key_file`` for a PEM credential). ``tls_max="1.2"`` pins TLS 1.2 (servers that
    want tls-unique PoP). The server is always verified against ``trust_anchors`` + host, or
    + ``tls_server_name`` when given (the name to expect and send as SNI, e.g. when the URL
    holds an address; curl's ``--connect-to`` idea). ``transport`` replaces the TLS transport
    (tests: ``httpx.MockTransport``; no channel binding then).
    """

    def __init__(
        self,
        base_url: str,
        *,
        trust_anchors: Sequence[x509.Certificate],
        label: str = "",
        client_cert_chain: Sequence[x509.Certificate] | None = None,
        signer: Signer | None = None,
        client_cert_file: str | None = None,
        client_key_file: str | None = None,
        basic_auth: tuple[str, str] | None = None,
        timeout_s: float = 30.0,
        max_response_bytes: int = 1024 * 1024,
        retry: RetryPolicy = RetryPolicy(),
        tls_max: str = "1.3",
        require_client_auth_eku: bool = True,
        use_tlslite: bool | None = None,
        tls_server_name: str | None = None,
        transport: httpx.BaseTransport | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        import httpx

        self._base_url = base_url
        self._label = label
        est_url(base_url, "cacerts", label)  # refuses http://, credentials in the URL, ...
        origin = urlsplit(base_url)
        self._origin = (origin.scheme, origin.hostname, origin.port or 443)
        if (client_cert_chain is None) != (signer is None):
            raise EstError("client_cert_chain and signer go together")
        tls: TlsliteTls | StdlibTls
        if signer is not None or use_tlslite:
            tls = TlsliteTls(
                trust_anchors=tuple(trust_anchors),
                client_chain=tuple(client_cert_chain or ()),
                signer=signer,
                max_version=tls_max,
            )
        else:
            tls = StdlibTls(
                trust_anchors=tuple(trust_anchors),
                cert_file=client_cert_file,
                key_file=client_key_file,
                max_version=tls_max,
            )
        #: the TLS transport (connection count, channel binding); None when one was injected
        self.transport: EstTransport | None = (
            EstTransport(tls, timeout_s=timeout_s) if transport is None else None
        )
        self._http = httpx.Client(
            transport=self.transport or transport,
            trust_env=False,  # trust and proxies from configuration only (style-anchors §1)
            follow_redirects=False,  # redirects are vetted here: same origin only
            timeout=httpx.Timeout(timeout_s),
        )
        self._basic = basic_auth
        self._timeout_s = timeout_s
        self._max_bytes = max_response_bytes
        self._retry = retry
        self._require_client_auth = require_client_auth_eku
        self._clock = clock
        self._extensions = {"sni_hostname": tls_server_name} if tls_server_name else {}
        self._cacerts: EstCaCerts | None = None

    # -- lifecycle ----------------------------------------------------------------------------
    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> EstClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- operations ---------------------------------------------------------------------------
    def cacerts(self) -> EstCaCerts:
        """GET /cacerts (RFC 7030 §4.1): the EST CA certificates, classified for rollover."""
        return self._with_retries(self._fetch_cacerts)

    def csrattrs(self) -> CsrAttributes | None:
        """GET /csrattrs (RFC 7030 §4.5); None when the server asks for nothing.

        204, 404 and 501 mean "nothing asked / not offered" (the operation is optional).
        """

        def attempt() -> CsrAttributes | None:
            reply = self._exchange("GET", "csrattrs")
            if reply.status in (204, 404, 501):
                return None
            self._check_status(reply, enroll=False)
            if not reply.body.strip():
                return None
            self._check_media_type(reply, MEDIA_CSRATTRS, "csrattrs")
            return parse_csrattrs(reply.body)

        return self._with_retries(attempt)

    def simpleenroll(self, csr_factory: CsrFactory) -> Enrollment:
        """POST /simpleenroll (RFC 7030 §4.2.1) with a CSR built for this connection."""
        return self._with_retries(lambda: self._enroll_once("simpleenroll", csr_factory))

    def simplereenroll(self, csr_factory: CsrFactory) -> Enrollment:
        """POST /simplereenroll (RFC 7030 §4.2.2); TLS must use the certificate being renewed."""
        return self._with_retries(lambda: self._enroll_once("simplereenroll", csr_factory))

    # -- one attempt --------------------------------------------------------------------------
    def _fetch_cacerts(self) -> EstCaCerts:
        reply = self._exchange("GET", "cacerts")
        self._check_status(reply, enroll=False)
        # RFC 7030 §4.1.3: application/pkcs7-mime (the smime-type parameter may be missing).
        self._check_media_type(reply, MEDIA_PKCS7, "cacerts")
        certs = decode_certs_only(reply.body)
        current = self._cacerts.anchor if self._cacerts is not None else None
        result = EstCaCerts(tuple(certs), classify_cacerts(certs, current_anchor=current))
        self._cacerts = result
        return result

    def _enroll_once(self, operation: str, csr_factory: CsrFactory) -> Enrollment:
        transport = self.transport
        if self._cacerts is None or (transport is not None and not transport.connection_alive()):
            self._fetch_cacerts()  # also (re)establishes the TLS connection the CSR binds to
        cacerts = self._cacerts
        assert cacerts is not None
        binding = transport.channel_binding if transport is not None else None
        csr = csr_factory(binding)
        with transport.pinned() if transport is not None else contextlib.nullcontext():
            reply = self._exchange(
                "POST", operation, body=encode_pkcs10_body(csr), content_type=MEDIA_PKCS10
            )
        self._check_status(reply, enroll=True)
        if reply.status != 200:
            raise EstResponseError(f"{operation}: unexpected HTTP {reply.status}")
        # RFC 7030 §4.2.3: application/pkcs7-mime; smime-type=certs-only
        self._check_media_type(reply, MEDIA_PKCS7, operation)
        certs = decode_certs_only(reply.body)
        leaf, chain = self._validate_issued(certs, csr, cacerts)
        return Enrollment(leaf, chain, csr, reply.body, binding)

    def _validate_issued(
        self, certs: list[x509.Certificate], csr_der: bytes, cacerts: EstCaCerts
    ) -> tuple[x509.Certificate, tuple[x509.Certificate, ...]]:
        """est-notes.md "Enrollment outcomes": key, chain, validity, EKU, before use."""
        from cryptography.x509 import verification

        try:
            csr_key = x509.load_der_x509_csr(csr_der).public_key()
        except ValueError as exc:
            raise EstError(f"the CSR given to the client does not parse: {exc}") from exc
        # Servers may add the chain: the issued certificate is the one with the CSR's key.
        leaf = next((c for c in certs if c.public_key() == csr_key), None)
        if leaf is None:
            raise EstResponseError("no returned certificate carries the CSR's public key")
        chain = tuple(c for c in certs if c is not leaf)
        now = self._clock()
        if not leaf.not_valid_before_utc <= now <= leaf.not_valid_after_utc:
            raise EstResponseError(
                f"issued certificate is not valid now ({leaf.not_valid_before_utc:%Y-%m-%d %H:%M}"
                f" .. {leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC)"
            )
        if self._require_client_auth:
            try:
                eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
            except x509.ExtensionNotFound:
                eku = None
            if eku is None or ExtendedKeyUsageOID.CLIENT_AUTH not in eku:
                raise EstResponseError(
                    "issued certificate lacks the clientAuth EKU needed to re-enroll with it"
                )
        anchors = [cacerts.anchor]
        if cacerts.roles.new_root is not None:
            anchors.append(cacerts.roles.new_root)
        # EST certificates need not carry a SAN or an EKU (checked above when it matters):
        # relax just those two of the web-PKI end-entity rules; CA rules stay as they are.
        criticality = verification.Criticality.AGNOSTIC
        ee_policy = (
            verification.ExtensionPolicy.webpki_defaults_ee()
            .may_be_present(x509.SubjectAlternativeName, criticality, None)
            .may_be_present(x509.ExtendedKeyUsage, criticality, None)
        )
        try:
            verifier = (
                verification.PolicyBuilder()
                .store(verification.Store(anchors))
                .time(now)
                .extension_policies(
                    ca_policy=verification.ExtensionPolicy.webpki_defaults_ca(),
                    ee_policy=ee_policy,
                )
                .build_client_verifier()
            )
            verifier.verify(leaf, [*chain, *cacerts.roles.intermediates])
        except verification.VerificationError as exc:
            raise EstResponseError(
                f"issued certificate does not chain to the /cacerts anchor: {exc}"
            ) from exc
        return leaf, chain

    # -- HTTP ---------------------------------------------------------------------------------
    def _exchange(
        self,
        method: str,
        operation: str,
        *,
        body: bytes | None = None,
        content_type: str | None = None,
    ) -> _Reply:
        url = est_url(self._base_url, operation, self._label)
        headers = {"Accept": "*/*"}
        if content_type is not None:
            headers["Content-Type"] = content_type
        sent_credentials = False
        for _ in range(_MAX_REDIRECTS + 2):
            reply = self._send(method, url, headers, body)
            if reply.status in _REDIRECTS:
                url = self._redirect_target(url, reply)
                continue
            if reply.status == 401 and self._basic is not None and not sent_credentials:
                challenge = reply.headers.get("WWW-Authenticate", "")
                if "basic" in challenge.lower():
                    # RFC 7030 §3.2.3: answer the challenge once, inside the verified TLS
                    # session (every connection of this client is verified).
                    user, password = self._basic
                    token = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
                    headers["Authorization"] = f"Basic {token}"
                    sent_credentials = True
                    continue
            return reply
        raise EstRejectedError(f"{operation}: too many redirects or authentication rounds")

    def _redirect_target(self, url: str, reply: _Reply) -> str:
        location = reply.headers.get("Location")
        if not location:
            raise EstResponseError(f"HTTP {reply.status} redirect without a Location")
        target = urljoin(url, str(location))
        parts = urlsplit(target)
        if (parts.scheme, parts.hostname, parts.port or 443) != self._origin:
            # est-notes.md: never follow a redirect to another origin (credentials, PoP).
            raise EstRejectedError(f"refusing redirect to another origin: {target}")
        return target

    def _send(self, method: str, url: str, headers: dict[str, str], body: bytes | None) -> _Reply:
        request = self._http.build_request(
            method, url, headers=headers, content=body, extensions=self._extensions
        )
        deadline = time.monotonic() + self._timeout_s
        response = self._http.send(request, stream=True)
        try:
            declared = response.headers.get("Content-Length", "")
            if declared.isdigit() and int(declared) > self._max_bytes:
                raise EstResponseError(
                    f"{url}: response of {declared} bytes exceeds the {self._max_bytes} byte cap"
                )
            chunks: list[bytes] = []
            size = 0
            for chunk in response.iter_bytes():  # decoded: the cap bounds what we hold
                size += len(chunk)
                if size > self._max_bytes:
                    raise EstResponseError(
                        f"{url}: response exceeds the {self._max_bytes} byte cap"
                    )
                if time.monotonic() > deadline:
                    # A trickling server must not hold the agent forever: the per-read timeout
                    # alone would never fire.
                    raise EstConnectionError(f"{url}: response not complete in {self._timeout_s} s")
                chunks.append(chunk)
        finally:
            response.close()
        return _Reply(
            response.status_code,
            response.headers,
            b"".join(chunks),
            response.extensions.get("network_stream"),
        )

    def _check_status(self, reply: _Reply, *, enroll: bool) -> None:
        status = reply.status
        if status == 200:
            return
        excerpt = error_excerpt(reply.body)
        detail = f"HTTP {status}" + (f": {excerpt}" if excerpt else "")
        retry_after = reply.headers.get("Retry-After")
        if enroll and status in (202, 503):
            # RFC 7030 §4.2.3: accepted but not issued yet (202), or load shedding (503).
            wait_s = parse_retry_after(retry_after, now=self._clock())
            raise EnrollmentPending(
                wait_s, f"enrollment pending ({detail}); retry after {wait_s:.0f} s"
            )
        if status >= 500:
            seconds = (
                None
                if retry_after is None
                else parse_retry_after(
                    retry_after, now=self._clock(), cap_s=self._retry.retry_after_cap_s
                )
            )
            raise _TransientError(f"server error {detail}", seconds)
        if status in (401, 403):
            raise AuthError(f"EST server refused the credentials ({detail})")
        if 400 <= status < 500:
            raise EstRejectedError(f"EST server rejected the request ({detail})")
        raise EstResponseError(f"unexpected {detail}")

    @staticmethod
    def _check_media_type(reply: _Reply, expected: str, operation: str) -> None:
        content_type = reply.headers.get("Content-Type")
        if not media_type_matches(content_type, expected):
            raise EstResponseError(
                f"{operation}: Content-Type {content_type!r}, expected {expected}"
            )

    # -- retries ------------------------------------------------------------------------------
    def _with_retries(self, attempt: Callable[[], _T]) -> _T:
        from tenacity import Retrying, retry_if_exception_type, stop_after_attempt
        from tenacity.wait import wait_random_exponential

        policy = self._retry
        jitter = wait_random_exponential(multiplier=policy.initial_s, max=policy.cap_s)

        def wait(state: Any) -> float:
            delay = float(jitter(state))
            outcome = state.outcome
            exc = outcome.exception() if outcome is not None else None
            server_says: float | None = getattr(exc, "retry_after_s", None)
            return max(delay, server_says) if server_says is not None else delay

        retrying = Retrying(
            stop=stop_after_attempt(max(1, policy.attempts)),
            wait=wait,
            retry=retry_if_exception_type(EstConnectionError),
            sleep=policy.sleep,
            reraise=True,
        )
        try:
            return retrying(attempt)
        except EstAgentError:
            raise
