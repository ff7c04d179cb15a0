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

A server that closes the connection under a request is met at once, without a retry's wait:
libest closes after every 401, 202 and 4xx without ``Connection: close``, so a request on that
connection fails before any answer (or, pinned, cannot be sent at all). The attempt then begins
again on a new connection (``_reconnecting``, at most ``_MAX_RECONNECTS`` times): an unbound CSR
is sent again as it is, a bound one is signed again for the new connection.

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
for waits too long for this run; ``AuthError`` for 401/403 (saying which credentials were
refused, or which challenge could not be answered and why); ``EstRejectedError`` for other 4xx;
``EstResponseError`` when the answer does not parse or the certificate does not validate;
``EstConnectionError`` when the server stays unreachable or keeps failing after the retries. Only
these public classes leave the client.

Credentials (``EstAuth``, RFC 7030 §3.2.3) only ever travel inside a verified TLS session, to
this client's origin: HTTP Basic (RFC 7617) pre-emptively, HTTP Digest (RFC 7616) once the
server has challenged, as ``http_auth`` allows. The password, its base64 token, the Digest
responses and any Authorization value a server echoes back are masked in every error message.

Proxy: with ``proxy`` every connection is a CONNECT tunnel through that HTTP proxy (RFC 9110
§9.3.6, est/tls/backend.py); TLS, its channel binding and the EST credentials stay end to end
with the server inside it. The proxy's own Basic password is masked like the EST one.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from secrets import token_hex
from typing import TYPE_CHECKING, Any, Literal, TypeVar, get_args
from urllib.parse import SplitResult, urljoin, urlsplit

import httpcore
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
from est_agent.est.httpauth import (
    Challenge,
    DigestChallenge,
    DigestUnusable,
    basic_authorization,
    choose_digest,
    digest_authorization,
    digest_response,
    parse_challenges,
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
    ProvisionalTls,
    StdlibTls,
    TlsliteTls,
)

if TYPE_CHECKING:
    from est_agent.backends.agreement import KeyAgreement
    from est_agent.backends.signer import Signer
    from est_agent.est.proxy import HttpsProxy

__all__ = [
    "CsrFactory",
    "Enrollment",
    "EstAuth",
    "EstCaCerts",
    "EstClient",
    "HttpAuth",
    "RetryPolicy",
]

#: Builds and signs the DER CSR for one attempt, given that connection's channel binding; it
#: binds the CSR to the connection by reading ``binding.value`` (module docstring).
CsrFactory = Callable[[ChannelBinding | None], bytes]
_T = TypeVar("_T")
_E = TypeVar("_E", bound=BaseException)

_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_MAX_REDIRECTS = 3
#: how often one attempt begins again at once after the server closed the connection under a
#: request (module docstring): a Digest challenge, then a stale nonce
_MAX_RECONNECTS = 2
#: what a request that died on a reused connection before its answer fails with (httpcore)
_UNANSWERED = (httpcore.ReadError, httpcore.WriteError, httpcore.RemoteProtocolError)

#: which HTTP authentication the credentials answer (module docstring, README)
HttpAuth = Literal["auto", "basic", "digest"]


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


class _Reconnect(EstConnectionError):
    """The server closed the connection under a request (after its 401 challenge, 202 or 4xx,
    as libest does, without ``Connection: close``): begin the attempt again at once on a new
    connection. Never leaves the client (``EstClient._reconnecting``)."""


def _scheme_name(challenge: Challenge) -> str:
    return {"basic": "Basic", "digest": "Digest"}.get(challenge.scheme, challenge.name)


class EstAuth(httpx.Auth):
    """The HTTP authentication of one EST client (RFC 7030 §3.2.3), as an ``httpx.Auth`` flow.

    Only to this client's own server: a request is authorized only when it is ``https`` at the
    client's origin; the flow runs only on the client's own ``httpx.Client``, whose one
    transport verifies every TLS connection before a byte of HTTP is sent, so credentials never
    leave a verified TLS session (RFC 7030 §3.2.3). ``mode`` (``HttpAuth``):

    * ``auto``: Basic (RFC 7617) pre-emptively, as strongSwan does (a server that closes the
      connection after its 401, as libest does, needs no second round); a Digest challenge
      is answered (then Digest only, from then on).
    * ``basic``: Basic pre-emptively; a Digest challenge is not answered.
    * ``digest``: never Basic (the password itself never travels); Digest challenges answered.

    Digest (RFC 7616, qop=auth, MD5 or SHA-256): the strongest usable challenge is answered
    once; its nonce then goes on every later request, pre-emptively, with a growing nonce count
    (§3.4), also across connections; a ``stale=true`` challenge to an answer (or a new
    challenge to a nonce the server had accepted before) is answered once more with the new
    nonce. Otherwise a 401 after an answer is the verdict (``refusal`` says it in words). The
    Digest responses sent are ``secrets``, to mask: one is replayable while its nonce lives.

    Driven by ``EstClient._exchange`` (``sync_auth_flow``) rather than by ``httpx.Client.send``
    (``auth=``), which reads each challenged response's body in full, past the client's cap.
    """

    requires_request_body = False
    requires_response_body = False  # the challenge is in the headers

    def __init__(
        self,
        credentials: tuple[str, str] | None,
        origin: tuple[str, str | None, int],
        mode: HttpAuth = "auto",
        *,
        cnonce: Callable[[], str] = lambda: token_hex(16),
    ) -> None:
        if mode not in get_args(HttpAuth):
            raise EstError(f"http_auth: expected one of auto, basic, digest, got {mode!r}")
        self._credentials = credentials
        self._origin = origin
        self._mode = mode
        self._cnonce = cnonce
        self._digest: DigestChallenge | None = None
        self._nc = 0
        #: the server has accepted an answer with this nonce (so a later 401 may mean it forgot)
        self._digest_accepted = False
        self._sent: list[str] = []

    def __repr__(self) -> str:
        return (
            f"EstAuth(credentials={self._credentials is not None}, mode={self._mode!r},"
            f" origin={self._origin!r})"
        )

    @property
    def secrets(self) -> tuple[str, ...]:
        """The Digest responses sent so far (to mask wherever a server might echo them)."""
        return tuple(self._sent)

    def _ours(self, request: httpx.Request) -> bool:
        return _default_port(urlsplit(str(request.url))) == self._origin

    def authorize(self, request: httpx.Request) -> None:
        """Set pre-emptive credentials on `request`: Digest with the last challenge's nonce,
        else Basic where ``mode`` sends it; nothing without credentials or to another origin."""
        if self._credentials is None or not self._ours(request):
            return
        if self._digest is not None and self._mode != "basic":
            request.headers["Authorization"] = self._digest_answer(request, self._digest)
        elif self._mode != "digest":
            request.headers["Authorization"] = basic_authorization(*self._credentials)

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        self.authorize(request)
        response = yield request
        for _ in range(2):  # the challenge, then at most one stale (or forgotten) nonce
            self._note(response)
            retry = self._answer(response)
            if retry is None:
                return
            response = yield retry
        self._note(response)

    def _note(self, response: httpx.Response) -> None:
        sent = response.request.headers.get("Authorization", "")
        if response.status_code != 401 and sent[:7].lower() == "digest ":
            self._digest_accepted = True

    def _answer(self, response: httpx.Response) -> httpx.Request | None:
        """The request answering a 401's Digest challenge, or None when it is the verdict."""
        if response.status_code != 401 or self._credentials is None or self._mode == "basic":
            return None
        challenged = response.request
        if not self._ours(challenged):
            return None  # not this client's server (redirects elsewhere are refused before)
        offered = parse_challenges(response.headers.get_list("WWW-Authenticate"))
        try:
            challenge = choose_digest(offered)
        except DigestUnusable:
            return None
        sent = challenged.headers.get("Authorization", "")
        if sent[:7].lower() == "digest " and not (challenge.stale or self._digest_accepted):
            # Our answer to a fresh challenge was refused: the verdict. RFC 7616 §3.3: stale
            # means only the nonce was refused; a nonce accepted before and now refused was
            # forgotten (a server restart): both are answered once with the new nonce.
            return None
        self._digest, self._nc, self._digest_accepted = challenge, 0, False
        # A new request, so that the one sent (and logged, or recorded) stays as it was.
        retry = httpx.Request(
            challenged.method,
            challenged.url,
            headers=challenged.headers,
            stream=challenged.stream,
            extensions=challenged.extensions,
        )
        retry.headers["Authorization"] = self._digest_answer(retry, challenge)
        return retry

    def _digest_answer(self, request: httpx.Request, challenge: DigestChallenge) -> str:
        assert self._credentials is not None
        username, password = self._credentials
        self._nc += 1
        # RFC 7616 §3.4: uri is the request-target (origin-form: path and query)
        uri, cnonce = request.url.raw_path.decode("ascii"), self._cnonce()
        response = digest_response(
            challenge,
            username=username,
            password=password,
            method=request.method,
            uri=uri,
            nc=self._nc,
            cnonce=cnonce,
        )
        self._sent.append(response)
        return digest_authorization(
            challenge, username=username, uri=uri, nc=self._nc, cnonce=cnonce, response=response
        )

    def refusal(self, response: httpx.Response) -> str:
        """Why this 401 ends the exchange, in words for the operator (never a secret)."""
        challenges = parse_challenges(response.headers.get_list("WWW-Authenticate"))
        offered = {c.scheme for c in challenges}
        sent = response.request.headers.get("Authorization", "").split(" ", 1)[0].lower()
        if sent in ("basic", "digest") and (sent in offered or not offered):
            return f"the EST server refused the HTTP {sent.capitalize()} credentials"
        if not offered:
            return "the EST server asks for credentials without a challenge (no WWW-Authenticate)"
        names = ", ".join(dict.fromkeys(_scheme_name(c) for c in challenges))
        if not offered & {"basic", "digest"}:
            return (
                f"the EST server asks for HTTP authentication by {names}, which this agent does"
                " not speak (it speaks Basic, RFC 7617, and Digest, RFC 7616)"
            )
        if self._credentials is None:
            return (
                f"the EST server asks for HTTP authentication ({names}); none is configured"
                " (est.basic_username and its password)"
            )
        if "digest" in offered and self._mode == "basic":
            return (
                'the EST server asks for HTTP Digest, which est.http_auth = "basic" does not'
                ' answer (set it to "auto" or "digest")'
            )
        if "digest" in offered:
            try:
                choose_digest(challenges)
            except DigestUnusable as exc:
                return f"the EST server's Digest challenge cannot be answered: {exc}"
        if self._mode == "digest":
            return (
                'the EST server asks for HTTP Basic, and est.http_auth = "digest" never sends'
                ' the password itself (set it to "auto" or "basic")'
            )
        return f"the EST server asks for HTTP authentication ({names})"


class EstClient:
    """An EST client bound to one server (and label) and one TLS client identity.

    TLS: with a ``signer`` (and ``client_cert_chain``, certificate first) the handshake runs in
    tlslite-ng and the client's CertificateVerify is signed by that signer (the card, or a
    ``SoftwareSigner`` for a PEM key); without one, the stdlib ``ssl`` path is used
    (server-only authentication). ``tls_max="1.2"`` pins TLS 1.2 (servers that want
    tls-unique PoP). The server is always verified against ``trust_anchors`` + host, or
    + ``tls_server_name`` when given (the name to expect and send as SNI, e.g. when the URL
    holds an address; curl's ``--connect-to`` idea). ``basic_auth`` is the HTTP account (user,
    password), used as ``http_auth`` says: Basic pre-emptively and/or Digest (``EstAuth``).
    ``proxy``: connect through this HTTP CONNECT proxy (None: directly; the environment is never
    read here). ``transport`` replaces the TLS transport (tests: ``httpx.MockTransport``; no
    channel binding, no proxy then). ``server_only_tls`` replaces the server-only TLS
    configuration (no ``signer``): a ``ProvisionalTls`` (RFC 7030 §4.1.1, est/bootstrap.py)
    makes a client that only fetches ``/cacerts``, with no credentials, and does not verify
    the server itself (its caller does, from the recorded chains). ``key_agreement`` (with a
    ``signer``): the TLS 1.3 key share's ECDH runs there (the card's COMPUTE DH), TLS 1.3 only.
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
        http_auth: HttpAuth = "auto",
        timeout_s: float = 30.0,
        run_timeout_s: float | None = None,
        max_response_bytes: int = 1024 * 1024,
        retry: RetryPolicy = RetryPolicy(),
        tls_max: str = "1.3",
        require_client_auth_eku: bool = True,
        tls_server_name: str | None = None,
        proxy: HttpsProxy | None = None,
        transport: httpx.BaseTransport | None = None,
        server_only_tls: StdlibTls | None = None,
        key_agreement: KeyAgreement | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._base_url = base_url
        self._label = label
        est_url(base_url, "cacerts", label)  # refuses http://, credentials in the URL, ...
        self._origin = _default_port(urlsplit(base_url.strip()))
        if (client_cert_chain is None) != (signer is None):
            raise EstError("client_cert_chain and signer go together")
        if proxy is not None and transport is not None:
            raise EstError("a proxy needs the client's own TLS transport")
        if key_agreement is not None and signer is None:
            raise EstError("a key agreement on the device goes with its client key (tlslite)")
        if server_only_tls is not None and signer is not None:
            raise EstError("a server-only TLS configuration and a signer exclude each other")
        #: RFC 7030 §4.1.1: /cacerts only, without credentials, on an unverified connection
        self._provisional = isinstance(server_only_tls, ProvisionalTls)
        if self._provisional and basic_auth is not None:
            raise EstError(
                "no credentials on a provisional connection (RFC 7030 §4.1.1): the server is"
                " not authenticated yet"
            )
        tls: TlsliteTls | StdlibTls
        if signer is not None:
            tls = TlsliteTls(
                trust_anchors=tuple(trust_anchors),
                client_chain=tuple(client_cert_chain or ()),
                signer=signer,
                max_version=tls_max,
                key_agreement=key_agreement,
            )
        elif server_only_tls is not None:
            tls = server_only_tls
        else:
            tls = StdlibTls(trust_anchors=tuple(trust_anchors), max_version=tls_max)
        #: the TLS transport (connection count, channel binding); None when one was injected
        self.transport: EstTransport | None = (
            EstTransport(tls, timeout_s=timeout_s, proxy=proxy) if transport is None else None
        )
        self._http = httpx.Client(
            transport=self.transport or transport,
            trust_env=False,  # trust and proxies from the configuration only: no HTTPS_PROXY,
            # SSL_CERT_FILE or .netrc from the environment of whoever starts the agent
            follow_redirects=False,  # redirects are vetted here: same origin only
            timeout=httpx.Timeout(timeout_s),
        )
        self._auth = EstAuth(basic_auth, self._origin, http_auth)
        secrets = basic_credential_secrets(*basic_auth) if basic_auth else ()
        if proxy is not None and proxy.username is not None and proxy.password is not None:
            secrets += basic_credential_secrets(proxy.username, proxy.password)
        #: the EST and proxy passwords and their Basic tokens (Digest responses: ``_secrets``)
        self._password_secrets: tuple[str, ...] = secrets
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

    @property
    def _secrets(self) -> tuple[str, ...]:
        """What would give the credentials away (the password, its Basic token, the Digest
        responses sent): masked in every message this client raises, and so in the logs that
        show them (tracebacks included: chained messages too)."""
        return self._password_secrets + self._auth.secrets

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
        if self._provisional and (method, operation) != ("GET", "cacerts"):
            # RFC 7030 §4.1.1: a provisional connection is for the CA certificates alone
            raise EstError(f"{operation}: only /cacerts is fetched on a provisional connection")
        url = est_url(self._base_url, operation, self._label)
        # RFC 9110 §12.5.3: no content coding wanted (the body is decoded here if one comes).
        headers = {"Accept": "*/*", "Accept-Encoding": "identity"}
        if content_type is not None:
            headers["Content-Type"] = content_type
        flow = self._auth.sync_auth_flow(self._request(method, url, headers, body))
        request = next(flow)  # with pre-emptive credentials (EstAuth)
        for _ in range(_MAX_REDIRECTS + 3):
            reply = self._send(url, request)
            if reply.status in _REDIRECTS:
                url = self._redirect_target(url, reply)
                # same origin (vetted): the same credentials, a Digest answer for the new URI
                request = self._request(method, url, headers, body)
                self._auth.authorize(request)
                continue
            try:
                request = flow.send(reply.response)  # the same URL, answering a challenge
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
        transport = self.transport
        opened = transport.connections_opened if transport is not None else 0
        try:
            with self._http_errors(url):
                # The TLS transport bounds the whole request (est/tls/: connect, handshake,
                # sending and the whole body, card time excluded).
                response = self._http.send(request, stream=True)
                try:
                    received = self._read_body(url, response)
                finally:
                    response.close()
        except ConnectionChangedError as exc:
            # Pinned, and the connection had closed (libest after a 401, 202 or 4xx): the
            # bound CSR is signed again for a new one, now (_reconnecting).
            raise _Reconnect(str(exc)) from exc
        except EstConnectionError as exc:
            reused = transport is not None and 0 < opened == transport.connections_opened
            if reused and isinstance(exc.__cause__, _UNANSWERED):
                # RFC 9112 §9.3.1: a reused connection the server had closed (its close still
                # in flight) fails a request before any answer. The transport sends a GET
                # again itself; an enrollment is begun again here, its CSR signed again if
                # bound (RFC 7030 §3.5), as the retries would, without their wait.
                raise _Reconnect(str(exc)) from exc
            raise
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
        if status == 401:
            # what was answered and why this is the end (EstAuth): wrong credentials, a
            # scheme not spoken or not enabled, an unusable Digest challenge
            raise AuthError(f"{self._auth.refusal(reply.response)} ({detail})")
        if status == 403:
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
    @staticmethod
    def _reconnecting(attempt: Callable[[], _T]) -> _T:
        """`attempt`, begun again at once on a new connection when the server closed the old one
        under a request (``_Reconnect``), up to ``_MAX_RECONNECTS`` times; not a retry (no wait,
        no attempt used): libest closes after every 401, so Digest always takes two."""
        for _ in range(_MAX_RECONNECTS):
            with contextlib.suppress(_Reconnect):
                return attempt()
        try:
            return attempt()
        except _Reconnect as exc:
            raise EstConnectionError(str(exc)) from exc  # transient: the retries take it

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
            return retrying(lambda: self._reconnecting(attempt))
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
