"""The EST client (RFC 7030): cacerts, csrattrs, simpleenroll, simplereenroll over one connection.

Theory of operation: one ``EstTransport`` (est/tls/) keeps a single keep-alive TLS connection.
An enrollment attempt (1) fetches ``/cacerts`` once (the issued certificate must chain to it; it
also brings the connection up), (2) calls ``csr_factory(binding)`` with the channel binding of
the live connection, and (3) POSTs the CSR.

Which CSRs are bound: the factory gets the binding wrapped so that the client sees whether it
read ``binding.value``. A factory that reads it (a proof-of-possession challengePassword is
base64(tls-unique) or base64(tls-exporter), RFC 7030 §3.5, RFC 9266) made a CSR that is only
good on that connection: the POST is sent with the transport pinned (a connection that died in
between fails it with ``ConnectionChangedError`` rather than carrying the CSR elsewhere), and
every new connection gets a new CSR, after a ``/cacerts`` request has opened it. A factory that
does not read it made a CSR that is good anywhere: it is signed once per operation, and its POST
may open a new connection, as it must when the server closed the old one (``Connection: close``,
RFC 9112 §9.6, or a silent close). The factory signature stays ``csr_factory(binding)``: no flag
to keep in step with what the factory really does.

Transient failures (connection errors, 5xx) retry the whole attempt, with backoff; a server's
Retry-After (RFC 9110 §10.2.3) is honoured inside the run only up to ``RetryPolicy.max_wait_s``
per wait and ``budget_s`` for all waits of one operation: a longer wait ends the operation with
``EnrollmentPending`` at once, for the caller to store and come back (a run must end well within
its service manager's start timeout).

Responses: ``Accept-Encoding: identity`` is sent (RFC 9110 §12.5.3) and the raw body is decoded
here (``ContentDecoder``, est/messages.py): gzip/deflate, stacked a few deep, inflated in bounded
steps so ``max_response_bytes`` caps the decoded size before it is produced; other codings are
refused.

Outcomes: a validated ``Enrollment``; ``EnrollmentPending`` for 202 / 503 (RFC 7030 §4.2.3) and
for waits too long for this run; ``AuthError`` for 401/403; ``EstRejectedError`` for other 4xx;
``EstResponseError`` when the answer does not parse or the certificate does not validate;
``EstConnectionError`` when the server stays unreachable or keeps failing after the retries. Only
these public classes leave the client. Credentials (HTTP Basic, the ``EstAuth`` flow) only ever
travel inside a verified TLS session and only in answer to a 401 challenge that offers Basic
(RFC 7030 §3.2.3); the password, its base64 token and any Authorization value a server echoes
back are masked in every error message.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import SplitResult, urljoin, urlsplit

import httpx
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
    ContentDecoder,
    CsrAttributes,
    basic_credential_secrets,
    classify_cacerts,
    decode_certs_only,
    encode_pkcs10_body,
    error_excerpt,
    est_url,
    media_type_matches,
    parse_csrattrs,
    parse_retry_after,
    redact_secrets,
)
from est_agent.est.tls import (
    ChannelBinding,
    ConnectionChangedError,
    EstTransport,
    StdlibTls,
    TlsliteTls,
)

if TYPE_CHECKING:
    from est_agent.backends.signer import Signer

__all__ = [
    "CsrFactory",
    "Enrollment",
    "EstAuth",
    "EstCaCerts",
    "EstClient",
    "RetryPolicy",
]

#: Builds and signs the DER CSR for one attempt, given that connection's channel binding; it
#: binds the CSR to the connection by reading ``binding.value`` (module docstring).
CsrFactory = Callable[[ChannelBinding | None], bytes]
_T = TypeVar("_T")
_E = TypeVar("_E", bound=BaseException)

_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_MAX_REDIRECTS = 3


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of transient failures (connection errors, 5xx other than enroll 503).

    Exponential backoff with full jitter (uniform in [0, min(cap, initial * 2**n)]); a server's
    Retry-After (RFC 9110 §10.2.3), capped at ``retry_after_cap_s``, is a lower bound. No wait
    inside the run is longer than ``max_wait_s``, nor all waits of one operation together longer
    than ``budget_s``: when the server asks for more, the operation ends at once with
    ``EnrollmentPending`` (retry_after_s = what the server asked) instead of sleeping. ``sleep``
    is injectable so tests run without waiting.
    """

    attempts: int = 4
    initial_s: float = 1.0
    cap_s: float = 30.0
    retry_after_cap_s: float = 300.0
    max_wait_s: float = 30.0
    budget_s: float = 120.0
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
    raw response body (for logs and the credential store's audit trail); ``channel_binding``
    the binding the CSR carries (None when the factory did not read it).
    """

    certificate: x509.Certificate
    chain: tuple[x509.Certificate, ...]
    csr: bytes
    body: bytes
    channel_binding: ChannelBinding | None = field(default=None, repr=False)


class _TransientError(EstConnectionError):
    """A 5xx (or 503 on a GET): try again, after ``retry_after_s`` when the server said so.

    Never leaves the client: ``_with_retries`` turns the last one into a public
    ``EstConnectionError`` or ``EnrollmentPending``.
    """

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class _WatchedBinding(ChannelBinding):
    """The channel binding as handed to a CSR factory: notes whether ``value`` was read."""

    read: bool

    @classmethod
    def wrap(cls, binding: ChannelBinding | None) -> _WatchedBinding | None:
        if binding is None:
            return None
        watched = cls(binding.kind, binding.value, binding.tls_version)
        object.__setattr__(watched, "read", False)
        return watched

    def __getattribute__(self, name: str) -> Any:
        if name == "value":
            object.__setattr__(self, "read", True)
        return super().__getattribute__(name)


@dataclass
class _CsrMemo:
    """What one enrollment operation keeps across its attempts (module docstring)."""

    #: an unbound CSR, sent again as it is on every later attempt
    csr: bytes | None = None
    #: the factory binds its CSRs: each new connection needs a new one
    binds: bool = False


@dataclass(frozen=True)
class _Reply:
    response: httpx.Response  # closed: status, headers and request only
    body: bytes  # read here, capped and decoded
    stream: object

    @property
    def status(self) -> int:
        return self.response.status_code

    @property
    def headers(self) -> httpx.Headers:
        return self.response.headers


def _default_port(parts: SplitResult) -> tuple[str, str | None, int]:
    # RFC 9110 §4.2.2: https defaults to 443; an explicit port (even 0) is kept as it is.
    port = parts.port
    return (parts.scheme.lower(), parts.hostname, 443 if port is None else port)


def _scrub(exc: _E, secrets: Sequence[str]) -> _E:
    """Mask credentials in the message of `exc` and of the exceptions it was raised from."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen and len(seen) < 16:
        seen.add(id(current))
        current.args = tuple(
            redact_secrets(a, secrets) if isinstance(a, str) else a for a in current.args
        )
        current = current.__cause__ or current.__context__
    return exc


# RFC 9110 §5.6.2 token; §11.6.1: a challenge is an auth-scheme (a token), then a token68 or
# auth-params (token BWS "=" BWS value); one field may hold several challenges, comma-separated.
_TCHARS = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_LIST_ELEMENT = re.compile(r'(?:[^,"]|"(?:[^"\\]|\\.)*(?:"|$))+')  # a quote unclosed: to the end
_ELEMENT_HEAD = re.compile(rf"\s*({_TCHARS})\s*(=?)")


def challenge_schemes(values: Iterable[str]) -> frozenset[str]:
    """The auth-schemes (lower case) of ``WWW-Authenticate`` field values (RFC 9110 §11.6.1).

    A list element that starts with a token not followed by ``=`` starts a challenge (its
    scheme); one followed by ``=`` is an auth-param of the challenge before it. Quoted strings
    may hold commas. Garbage yields no scheme rather than an error.
    """
    schemes: set[str] = set()
    for value in values:
        for element in _LIST_ELEMENT.findall(value):
            head = _ELEMENT_HEAD.match(element)
            if head is not None and not head.group(2):
                schemes.add(head.group(1).lower())
    return frozenset(schemes)


class EstAuth(httpx.Auth):
    """The HTTP authentication of one EST client (RFC 7030 §3.2.3), as an ``httpx.Auth`` flow.

    Basic (RFC 7617): the credentials go only in answer to a 401 whose challenge offers the
    Basic scheme, once per request (a second 401 is the answer), and only to this client's
    own server: the challenged request must be ``https`` at the client's origin. The flow runs
    only on the client's own ``httpx.Client``, whose one transport verifies every TLS
    connection before a byte of HTTP is sent, so credentials never leave a verified TLS
    session. Never pre-emptive: a server that does not ask gets no password. Digest (RFC 7616)
    would be another scheme answered here.

    Driven by ``EstClient._exchange`` (``sync_auth_flow``) rather than by ``httpx.Client.send``
    (``auth=``), which reads each challenged response's body in full, past the client's cap.
    """

    requires_request_body = False
    requires_response_body = False  # the challenge is in the headers

    def __init__(self, basic: tuple[str, str] | None, origin: tuple[str, str | None, int]) -> None:
        self._basic = httpx.BasicAuth(*basic) if basic is not None else None
        self._origin = origin

    def __repr__(self) -> str:
        return f"EstAuth(basic={self._basic is not None}, origin={self._origin!r})"

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        response = yield request
        if response.status_code != 401 or self._basic is None:
            return
        challenged = response.request
        if _default_port(urlsplit(str(challenged.url))) != self._origin:
            return  # not this client's server (redirects elsewhere are refused before)
        if "basic" in challenge_schemes(response.headers.get_list("WWW-Authenticate")):
            # A new request, so that the one sent (and logged, or recorded) stays as it was.
            retry = httpx.Request(
                challenged.method,
                challenged.url,
                headers=challenged.headers,
                stream=challenged.stream,
                extensions=challenged.extensions,
            )
            yield from self._basic.auth_flow(retry)


class EstClient:
    """An EST client bound to one server (and label) and one TLS client identity.

    TLS: with a ``signer`` (and ``client_cert_chain``, certificate first) the handshake runs in
    tlslite-ng and the client's CertificateVerify is signed by that signer (the card, or a
    ``SoftwareSigner`` for a PEM key); without one, the stdlib ``ssl`` path is used
    (server-only authentication). ``tls_max="1.2"`` pins TLS 1.2 (servers that want
    tls-unique PoP). The server is always verified against ``trust_anchors`` + host, or
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
        basic_auth: tuple[str, str] | None = None,
        timeout_s: float = 30.0,
        run_timeout_s: float | None = None,
        max_response_bytes: int = 1024 * 1024,
        retry: RetryPolicy = RetryPolicy(),
        tls_max: str = "1.3",
        require_client_auth_eku: bool = True,
        tls_server_name: str | None = None,
        transport: httpx.BaseTransport | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._base_url = base_url
        self._label = label
        est_url(base_url, "cacerts", label)  # refuses http://, credentials in the URL, ...
        self._origin = _default_port(urlsplit(base_url.strip()))
        if (client_cert_chain is None) != (signer is None):
            raise EstError("client_cert_chain and signer go together")
        tls: TlsliteTls | StdlibTls
        if signer is not None:
            tls = TlsliteTls(
                trust_anchors=tuple(trust_anchors),
                client_chain=tuple(client_cert_chain or ()),
                signer=signer,
                max_version=tls_max,
            )
        else:
            tls = StdlibTls(trust_anchors=tuple(trust_anchors), max_version=tls_max)
        #: the TLS transport (connection count, channel binding); None when one was injected
        self.transport: EstTransport | None = (
            EstTransport(tls, timeout_s=timeout_s) if transport is None else None
        )
        self._http = httpx.Client(
            transport=self.transport or transport,
            trust_env=False,  # trust and proxies from the configuration only: no HTTPS_PROXY,
            # SSL_CERT_FILE or .netrc from the environment of whoever starts the agent
            follow_redirects=False,  # redirects are vetted here: same origin only
            timeout=httpx.Timeout(timeout_s),
        )
        self._auth = EstAuth(basic_auth, self._origin)
        #: what would give the Basic credentials away: masked in every message this client
        #: raises, and so in the logs that show them (tracebacks included: chained messages too)
        self._secrets: tuple[str, ...] = basic_credential_secrets(*basic_auth) if basic_auth else ()
        self._timeout_s = timeout_s
        # All retries and waits of this client's lifetime (one run) end by this monotonic time:
        # a failing attempt after it is the last one (the run is then at most one request over).
        self._run_deadline = None if run_timeout_s is None else time.monotonic() + run_timeout_s
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
        memo = _CsrMemo()
        return self._with_retries(lambda: self._enroll_once("simpleenroll", csr_factory, memo))

    def simplereenroll(self, csr_factory: CsrFactory) -> Enrollment:
        """POST /simplereenroll (RFC 7030 §4.2.2); TLS must use the certificate being renewed."""
        memo = _CsrMemo()
        return self._with_retries(lambda: self._enroll_once("simplereenroll", csr_factory, memo))

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

    def _enroll_once(self, operation: str, csr_factory: CsrFactory, memo: _CsrMemo) -> Enrollment:
        transport = self.transport
        if self._cacerts is None:
            self._fetch_cacerts()  # the issued certificate must chain to it; opens the connection
        csr, binding = memo.csr, None
        if csr is None:
            csr, binding = self._make_csr(csr_factory, memo)  # may fetch /cacerts again
            if binding is None:
                memo.csr = csr  # bound to no connection: later attempts send it again
        cacerts = self._cacerts
        assert cacerts is not None
        # A bound CSR goes on its own connection or not at all (RFC 7030 §3.5); an unbound one
        # may open a new connection, as it must after the server closed the last one.
        pin = (
            transport.pinned()
            if transport is not None and binding is not None
            else contextlib.nullcontext()
        )
        with pin:
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

    def _make_csr(
        self, csr_factory: CsrFactory, memo: _CsrMemo
    ) -> tuple[bytes, ChannelBinding | None]:
        """The CSR for this attempt and the binding it carries (None: it carries none)."""
        transport = self.transport
        for _ in range(2):
            if transport is not None and memo.binds and not transport.connection_alive():
                self._fetch_cacerts()  # a bound CSR needs the connection that will carry it
                if not transport.connection_alive():
                    # Closed again right after answering: a CSR signed now could never be
                    # sent. Do not ask the card for it; the attempt is retried (transient).
                    raise ConnectionChangedError(
                        "the server closed the connection right after /cacerts: a CSR bound to"
                        " its connection (proof of possession, RFC 7030 §3.5) cannot be sent"
                    )
            binding = transport.channel_binding if transport is not None else None
            watched = _WatchedBinding.wrap(binding)
            csr = csr_factory(watched)
            if watched is None or not watched.read:
                return csr, None
            assert transport is not None and binding is not None
            memo.binds = True
            if transport.connection_alive():
                return csr, binding
            # Signed for a connection that closed meanwhile (or had already): useless, since
            # a bound CSR never travels on another one; sign again for a new connection.
        return csr, binding  # the pinned POST fails and the attempt is retried

    def _validate_issued(
        self, certs: list[x509.Certificate], csr_der: bytes, cacerts: EstCaCerts
    ) -> tuple[x509.Certificate, tuple[x509.Certificate, ...]]:
        """The enrollment answer (RFC 7030 §4.2.3), checked before it is used: one certificate
        carries the CSR's key, is valid now, has clientAuth when required, and chains to the
        /cacerts anchor (RFC 5280 §6; a CA rollover's new root counts too, RFC 7030 §4.1.3)."""
        from cryptography.x509 import verification

        from est_agent.est.tls.policy import ca_extension_policy, verification_reason

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
        # relax just those two of the web-PKI end-entity rules. CA rules stay, except for the
        # /cacerts anchor itself: trust-anchor information (RFC 5280 §6.1.1), as on the TLS
        # paths (policy.ca_extension_policy).
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
                .extension_policies(ca_policy=ca_extension_policy(anchors), ee_policy=ee_policy)
                .build_client_verifier()
            )
            verifier.verify(leaf, [*chain, *cacerts.roles.intermediates])
        except verification.VerificationError as exc:
            raise EstResponseError(
                "issued certificate does not chain to the /cacerts anchor: "
                + verification_reason(exc)
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
        # RFC 9110 §12.5.3: no content coding wanted (the body is decoded here if one comes).
        headers = {"Accept": "*/*", "Accept-Encoding": "identity"}
        if content_type is not None:
            headers["Content-Type"] = content_type
        flow = self._auth.sync_auth_flow(self._request(method, url, headers, body))
        request = next(flow)
        for _ in range(_MAX_REDIRECTS + 2):
            reply = self._send(url, request)
            if reply.status in _REDIRECTS:
                url = self._redirect_target(url, reply)
                # same origin (vetted): credentials already sent in this exchange go along
                sent = request.headers.get("Authorization")
                carried = {"Authorization": sent} if sent is not None else {}
                request = self._request(method, url, headers | carried, body)
                continue
            try:
                request = flow.send(reply.response)  # the same URL, now with credentials
            except StopIteration:
                return reply
        raise EstRejectedError(f"{operation}: too many redirects or authentication rounds")

    def _redirect_target(self, url: str, reply: _Reply) -> str:
        location = reply.headers.get("Location")
        if not location:
            raise EstResponseError(f"HTTP {reply.status} redirect without a Location")
        try:
            target = urljoin(url, str(location))
            parts = urlsplit(target)
            origin = _default_port(parts)  # .port raises ValueError on "host:99999" or "host:x"
            httpx.URL(target)  # what the next request is built from: must parse as well
        except (ValueError, httpx.InvalidURL) as exc:
            shown = error_excerpt(str(location).encode(), 120, secrets=self._secrets)
            raise EstResponseError(
                f"HTTP {reply.status} redirect to an unusable Location {shown!r}: {exc}"
            ) from None
        if origin != self._origin:
            # Never to another origin: the Basic credentials and a CSR bound to this connection
            # would go to a server this client was not configured for.
            raise EstRejectedError(f"refusing redirect to another origin: {target}")
        return target

    def _request(
        self, method: str, url: str, headers: dict[str, str], body: bytes | None
    ) -> httpx.Request:
        with self._http_errors(url):
            return self._http.build_request(
                method, url, headers=headers, content=body, extensions=self._extensions
            )

    def _send(self, url: str, request: httpx.Request) -> _Reply:
        with self._http_errors(url):
            # The TLS transport bounds the whole request (est/tls/: connect, handshake, sending
            # and the whole body, card time excluded).
            response = self._http.send(request, stream=True)
            try:
                received = self._read_body(url, response)
            finally:
                response.close()
        return _Reply(response, received, response.extensions.get("network_stream"))

    @staticmethod
    @contextlib.contextmanager
    def _http_errors(url: str) -> Iterator[None]:
        """httpx's own exceptions as est_agent's (those of est/tls/ are typed already)."""
        try:
            yield
        except httpx.ProtocolError as exc:
            # httpx itself parses a redirect's Location (even when not following it) and
            # raises RemoteProtocolError for one it cannot use, e.g. "host:84x3": garbage.
            raise EstResponseError(f"{url}: {exc}") from exc
        except httpx.TransportError as exc:  # an injected transport (tests) raising httpx's own
            raise EstConnectionError(f"{url}: {type(exc).__name__}: {exc}") from exc
        except (httpx.HTTPError, httpx.InvalidURL, httpx.StreamError) as exc:
            raise EstResponseError(f"{url}: {type(exc).__name__}: {exc}") from exc

    def _read_body(self, url: str, response: httpx.Response) -> bytes:
        """The decoded body, capped at ``max_response_bytes`` before and after decoding."""
        declared = response.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > self._max_bytes:
            raise EstResponseError(
                f"{url}: response of {declared} bytes exceeds the {self._max_bytes} byte cap"
            )
        raw: Iterable[bytes]
        if response.is_stream_consumed:
            # Only from an injected transport (tests) whose body httpx has already read.
            raw, coding = (response.content,), None
        else:
            raw, coding = response.iter_raw(), response.headers.get("Content-Encoding")
        # Unknown codings are refused before a byte of the body is read.
        decoder = ContentDecoder(coding, self._max_bytes)
        chunks: list[bytes] = []
        size = 0
        for chunk in raw:  # as on the wire: httpx's own decoders would inflate without bound
            size += len(chunk)
            if size > self._max_bytes:
                raise EstResponseError(f"{url}: response exceeds the {self._max_bytes} byte cap")
            try:
                chunks.extend(decoder.feed(chunk))
            except EstResponseError as exc:
                raise EstResponseError(f"{url}: {exc}") from None
        try:
            decoder.finish()
        except EstResponseError as exc:
            raise EstResponseError(f"{url}: {exc}") from None
        return b"".join(chunks)

    def _check_status(self, reply: _Reply, *, enroll: bool) -> None:
        status = reply.status
        if status == 200:
            return
        excerpt = error_excerpt(reply.body, secrets=self._secrets)
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
        from tenacity import RetryCallState, Retrying, retry_if_exception_type
        from tenacity.wait import wait_random_exponential

        policy = self._retry
        jitter = wait_random_exponential(multiplier=policy.initial_s, max=policy.cap_s)
        too_long: list[float] = []  # a server's wait that this run will not make

        def server_wait(state: RetryCallState) -> float | None:
            outcome = state.outcome
            exc = outcome.exception() if outcome is not None else None
            return exc.retry_after_s if isinstance(exc, _TransientError) else None

        def left(state: RetryCallState) -> float:
            budget = policy.budget_s - state.idle_for
            if self._run_deadline is not None:
                budget = min(budget, self._run_deadline - time.monotonic())
            return budget

        def stop(state: RetryCallState) -> bool:
            asked = server_wait(state)
            if asked is not None and asked > min(policy.max_wait_s, left(state)):
                too_long.append(asked)
                return True
            return state.attempt_number >= max(1, policy.attempts) or left(state) <= 0

        def wait(state: RetryCallState) -> float:
            delay = min(float(jitter(state)), policy.max_wait_s, max(left(state), 0.0))
            asked = server_wait(state)
            return max(delay, asked) if asked is not None else delay

        retrying = Retrying(
            stop=stop,
            wait=wait,
            retry=retry_if_exception_type(EstConnectionError),
            sleep=policy.sleep,
            reraise=True,
        )
        try:
            return retrying(attempt)
        except _TransientError as exc:
            # What leaves the client is public: the last failure's message, typed.
            if too_long:
                seconds = too_long[-1]
                raise _scrub(
                    EnrollmentPending(
                        seconds,
                        f"{exc}; the server asks to retry after {seconds:.0f} s, longer than"
                        f" this run waits ({policy.max_wait_s:.0f} s at a time,"
                        f" {policy.budget_s:.0f} s in all)",
                    ),
                    self._secrets,
                ) from exc
            raise _scrub(EstConnectionError(str(exc)), self._secrets) from exc
        except EstAgentError as exc:
            _scrub(exc, self._secrets)
            raise
