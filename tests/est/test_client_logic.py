"""EstClient's HTTP logic offline, through httpx.MockTransport: no socket is opened.

Retries and their waits, Retry-After, the 401 challenge, redirects, size caps, status mapping
and the validation of an issued certificate; credentials echoed by a server, content codings,
the in-run wait caps and the public error classes.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import re
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, pkcs7
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from est_agent.backends.signer import SoftwareSigner
from est_agent.errors import (
    AuthError,
    EnrollmentPending,
    EstConnectionError,
    EstError,
    EstRejectedError,
    EstResponseError,
)
from est_agent.est.client import EstAuth, EstClient, RetryPolicy
from tests.est.card_helpers import build_csr

NOW = datetime.now(UTC).replace(microsecond=0)
BASE = "https://est.example:8443"
Handler = Callable[[httpx.Request], httpx.Response]


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _ca() -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("mock EST CA"))
        .issuer_name(_name("mock EST CA"))
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(NOW - timedelta(days=1))
        .not_valid_after(NOW + timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


CA_CERT, CA_KEY = _ca()
DEVICE = SoftwareSigner(ec.generate_private_key(ec.SECP256R1()))


def _issue(public_key: ec.EllipticCurvePublicKey, *, eku: bool = True) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name("device-1"))
        .issuer_name(CA_CERT.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - timedelta(minutes=1))
        .not_valid_after(NOW + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(CA_KEY.public_key()), False
        )
    )
    if eku:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
    return builder.sign(CA_KEY, hashes.SHA256())


def _certs_only(*certs: x509.Certificate) -> bytes:
    return base64.encodebytes(pkcs7.serialize_certificates(list(certs), Encoding.DER))


CACERTS = httpx.Response(
    200, content=_certs_only(CA_CERT), headers={"Content-Type": "application/pkcs7-mime"}
)


def _issued(eku: bool = True) -> httpx.Response:
    return httpx.Response(
        200,
        content=_certs_only(_issue(DEVICE.public_key(), eku=eku)),
        headers={"Content-Type": "application/pkcs7-mime; smime-type=certs-only"},
    )


def _fresh(template: httpx.Response) -> httpx.Response:
    # A response body streams once: answer each request with a copy.
    return httpx.Response(template.status_code, headers=template.headers, content=template.content)


class Recorder:
    def __init__(self, *answers: httpx.Response | Handler) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []
        self.sleeps: list[float] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if request.url.path.endswith("/cacerts"):
            return _fresh(CACERTS)
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        return answer(request) if callable(answer) else _fresh(answer)

    def client(self, **options: object) -> EstClient:
        options.setdefault("retry", RetryPolicy(attempts=3, cap_s=4.0, sleep=self.sleeps.append))
        return EstClient(
            BASE,
            trust_anchors=[CA_CERT],
            transport=httpx.MockTransport(self),
            **options,  # type: ignore[arg-type]
        )

    def posts(self) -> list[httpx.Request]:
        return [r for r in self.requests if r.method == "POST"]


def _enroll(client: EstClient) -> x509.Certificate:
    with client:
        return client.simpleenroll(lambda _b: build_csr(DEVICE)).certificate


def test_enroll_validates_and_returns_the_certificate() -> None:
    rec = Recorder(_issued())
    assert _enroll(rec.client()).public_key() == DEVICE.public_key()
    (post,) = rec.posts()
    assert post.headers["Content-Type"] == "application/pkcs10"
    assert "Authorization" not in post.headers  # never preemptive
    assert post.url == f"{BASE}/.well-known/est/simpleenroll"
    # RFC 7030 §4.2.1 body: base64 of the DER CSR, wrapped lines
    assert b"\n" in post.content


def test_retry_after_is_a_lower_bound_and_backoff_is_capped() -> None:
    rec = Recorder(
        httpx.Response(500, headers={"Retry-After": "7"}, text="busy"),
        httpx.Response(502, text="bad gateway"),
        _issued(),
    )
    _enroll(rec.client())
    assert len(rec.posts()) == 3
    assert rec.sleeps[0] >= 7
    assert 0 <= rec.sleeps[1] <= 4.0  # full jitter within the cap


def test_transient_errors_give_up_after_the_attempt_limit() -> None:
    rec = Recorder(httpx.Response(500, text="<h1>internal</h1> error"))
    with pytest.raises(EstConnectionError, match="500: internal error"):
        _enroll(rec.client())
    assert len(rec.posts()) == 3 and len(rec.sleeps) == 2


def test_connection_errors_are_retried() -> None:
    calls: list[int] = []

    def flaky(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        if len(calls) == 1:
            raise EstConnectionError("reset")
        return _issued()

    rec = Recorder(flaky)
    _enroll(rec.client())
    assert len(calls) == 2


@pytest.mark.parametrize(
    ("response", "error", "match"),
    [
        (httpx.Response(400, text="bad CSR"), EstRejectedError, "400: bad CSR"),
        (httpx.Response(404, text="no such label"), EstRejectedError, "404"),
        (httpx.Response(403, text="not you"), AuthError, "403: not you"),
        (httpx.Response(401, text="who"), AuthError, "401"),
        (httpx.Response(204), EstResponseError, "204"),
        (
            httpx.Response(200, text="hello", headers={"Content-Type": "text/plain"}),
            EstResponseError,
            "Content-Type",
        ),
    ],
)
def test_status_mapping(response: httpx.Response, error: type[Exception], match: str) -> None:
    rec = Recorder(response)
    with pytest.raises(error, match=match):
        _enroll(rec.client())
    assert len(rec.posts()) == 1  # permanent: not retried


@pytest.mark.parametrize(
    ("status", "retry_after", "expected_s"),
    [(202, "120", 120.0), (503, "5", 5.0), (202, None, 60.0)],
)
def test_pending(status: int, retry_after: str | None, expected_s: float) -> None:
    headers = {"Retry-After": retry_after} if retry_after else {}
    rec = Recorder(httpx.Response(status, headers=headers))
    with pytest.raises(EnrollmentPending) as info:
        _enroll(rec.client())
    assert info.value.retry_after_s == expected_s
    assert rec.sleeps == []  # the caller decides when to come back


def test_basic_is_sent_pre_emptively_and_a_401_is_the_verdict() -> None:
    # RFC 7617 pre-emptively (as strongSwan): libest closes after its 401, so a second round
    # would need a new connection. Only ever inside the verified TLS session (EstAuth).
    rec = Recorder(_issued())
    _enroll(rec.client(basic_auth=("dev", "pw")))
    (post,) = rec.posts()
    assert post.headers["Authorization"] == "Basic " + base64.b64encode(b"dev:pw").decode()
    assert all(r.headers["Authorization"] == "Basic ZGV2OnB3" for r in rec.requests)

    challenge = httpx.Response(401, headers={"WWW-Authenticate": 'Basic realm="est"'})
    rec = Recorder(challenge)
    with pytest.raises(AuthError, match="refused the HTTP Basic credentials") as info:
        _enroll(rec.client(basic_auth=("dev", "wrong")))
    assert info.value.exit_code == 77
    assert len(rec.posts()) == 1  # once, not in a loop
    assert rec.sleeps == []


DIGEST = 'Digest realm="est", qop="auth", algorithm=SHA-256, nonce="bm9uY2U=", opaque="op"'


def _digest_fields(header: str) -> dict[str, str]:
    """An Authorization: Digest value's parameters, read with a regex of the test's own."""
    assert header.startswith("Digest ")
    return {k: v.strip('"') for k, v in re.findall(r'(\w+)=("[^"]*"|[^,\s]*)', header)}


def _expected_digest(fields: dict[str, str], method: str, password: str = "pw") -> str:
    """RFC 7616 §3.4.1 with hashlib, SHA-256, qop=auth."""

    def h(text: str) -> str:
        return hashlib.sha256(text.encode()).hexdigest()

    ha1 = h(f"{fields['username']}:{fields['realm']}:{password}")
    ha2 = h(f"{method}:{fields['uri']}")
    return h(f"{ha1}:{fields['nonce']}:{fields['nc']}:{fields['cnonce']}:auth:{ha2}")


def test_digest_challenge_is_answered_then_its_nonce_is_used_pre_emptively() -> None:
    # Several challenge fields, Negotiate first (not spoken): Digest is answered, and the
    # nonce goes on the next requests with a growing nonce count (RFC 7616 §3.4).
    challenge = httpx.Response(
        401, headers=[("WWW-Authenticate", "Negotiate"), ("WWW-Authenticate", DIGEST)]
    )
    rec = Recorder(challenge, _issued(), _issued())
    with rec.client(basic_auth=("dev", "pw")) as client:
        client.simpleenroll(lambda _b: build_csr(DEVICE))
        client.simpleenroll(lambda _b: build_csr(DEVICE))
    first, answer, again = rec.posts()
    assert first.headers["Authorization"] == "Basic ZGV2OnB3"  # auto: Basic first
    one, two = (
        _digest_fields(answer.headers["Authorization"]),
        _digest_fields(again.headers["Authorization"]),
    )
    for fields in (one, two):
        assert fields["response"] == _expected_digest(fields, "POST")
        assert (fields["username"], fields["realm"], fields["nonce"]) == ("dev", "est", "bm9uY2U=")
        assert (fields["algorithm"], fields["qop"], fields["opaque"]) == ("SHA-256", "auth", "op")
        assert fields["uri"] == "/.well-known/est/simpleenroll"
    assert (one["nc"], two["nc"]) == ("00000001", "00000002")
    assert one["cnonce"] != two["cnonce"]
    assert [r.url.path.rsplit("/", 1)[1] for r in rec.requests] == ["cacerts"] + 3 * [
        "simpleenroll"
    ]


def test_digest_mode_keeps_the_password_home() -> None:
    # est.http_auth = "digest": no Basic ever, not even when the server asks for it
    challenge = httpx.Response(401, headers={"WWW-Authenticate": 'Basic realm="est"'})
    rec = Recorder(challenge)
    with pytest.raises(AuthError, match=r'asks for HTTP Basic, and est\.http_auth = "digest"'):
        _enroll(rec.client(basic_auth=("dev", "pw"), http_auth="digest"))
    assert [r.headers.get("Authorization") for r in rec.requests] == [None, None]


def test_basic_mode_does_not_answer_digest() -> None:
    # Only Digest offered, with "basic" in a parameter: est.http_auth = "basic" answers none.
    challenge = httpx.Response(401, headers={"WWW-Authenticate": 'Digest realm="basic", nonce="n"'})
    rec = Recorder(challenge)
    with pytest.raises(AuthError, match="asks for HTTP Digest") as info:
        _enroll(rec.client(basic_auth=("dev", "pw"), http_auth="basic"))
    assert info.value.exit_code == 77
    (post,) = rec.posts()
    assert post.headers["Authorization"] == "Basic ZGV2OnB3"


def test_stale_nonce_is_answered_once_more_and_a_refused_answer_is_final() -> None:
    stale = httpx.Response(
        401, headers={"WWW-Authenticate": DIGEST.replace("bm9uY2U=", "bmV3") + ", stale=true"}
    )
    rec = Recorder(httpx.Response(401, headers={"WWW-Authenticate": DIGEST}), stale, _issued())
    _enroll(rec.client(basic_auth=("dev", "pw"), http_auth="digest"))
    nonces = [_digest_fields(p.headers["Authorization"])["nonce"] for p in rec.posts()[1:]]
    assert nonces == ["bm9uY2U=", "bmV3"]

    refused = httpx.Response(401, headers={"WWW-Authenticate": DIGEST})
    rec = Recorder(refused)
    with pytest.raises(AuthError, match="refused the HTTP Digest credentials"):
        _enroll(rec.client(basic_auth=("dev", "wrong"), http_auth="digest"))
    assert len(rec.posts()) == 2  # the challenge and one answer

    # a server that says stale every time gets two answers, not a loop
    always = httpx.Response(401, headers={"WWW-Authenticate": DIGEST + ", stale=true"})
    rec = Recorder(always)
    with pytest.raises(AuthError):
        _enroll(rec.client(basic_auth=("dev", "pw"), http_auth="digest"))
    assert len(rec.posts()) == 3


def test_a_nonce_the_server_forgot_is_answered_once_more() -> None:
    # Accepted once, then refused without stale (a restarted server knows no old nonce): the
    # new challenge is answered; refused again, that is the verdict.
    fresh = httpx.Response(401, headers={"WWW-Authenticate": DIGEST.replace("bm9uY2U=", "bmV3")})
    rec = Recorder(httpx.Response(401, headers={"WWW-Authenticate": DIGEST}), _issued(), fresh)
    with rec.client(basic_auth=("dev", "pw"), http_auth="digest") as client:
        client.simpleenroll(lambda _b: build_csr(DEVICE))
        rec.answers = [fresh, _issued()]
        client.simpleenroll(lambda _b: build_csr(DEVICE))
        rec.answers = [fresh]
        with pytest.raises(AuthError, match="refused the HTTP Digest credentials"):
            client.simpleenroll(lambda _b: build_csr(DEVICE))
    nonces = [
        _digest_fields(p.headers["Authorization"])["nonce"]
        if "Authorization" in p.headers
        else None
        for p in rec.posts()
    ]
    # 1st: challenge, answer; 2nd: the accepted nonce refused, answered anew; 3rd: the same,
    # and the new answer refused too: the verdict after two POSTs
    assert nonces == [None, "bm9uY2U=", "bm9uY2U=", "bmV3", "bmV3", "bmV3"]


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        (['Bearer realm="est"'], "by Bearer, which this agent does not speak"),
        (["NTLM", 'Negotiate realm="x"'], "by NTLM, Negotiate"),
        ([DIGEST.replace("SHA-256", "SHA-512-256")], "algorithm=SHA-512-256 is not supported"),
        ([], "without a challenge"),
    ],
)
def test_what_cannot_be_answered_is_77_naming_it(fields: list[str], named: str) -> None:
    challenge = httpx.Response(401, headers=[("WWW-Authenticate", f) for f in fields])
    rec = Recorder(challenge)
    with pytest.raises(AuthError, match=named) as info:
        _enroll(rec.client(basic_auth=("dev", "pw"), http_auth="digest"))
    assert info.value.exit_code == 77 and "HTTP 401" in str(info.value)
    assert len(rec.posts()) == 1


def test_no_credentials_configured_is_said() -> None:
    challenge = httpx.Response(401, headers={"WWW-Authenticate": 'Basic realm="est"'})
    rec = Recorder(challenge)
    with pytest.raises(AuthError, match=r"asks for HTTP authentication \(Basic\); none is"):
        _enroll(rec.client())
    assert "Authorization" not in rec.posts()[0].headers


def test_a_challenge_body_is_capped_like_any_other() -> None:
    # The flow is driven by the client, whose body reads are capped (httpx's own auth driver
    # would read a challenge's body whole).
    challenge = httpx.Response(
        401, headers={"WWW-Authenticate": 'Basic realm="est"'}, content=b"A" * 5000
    )
    rec = Recorder(challenge, _issued())
    with pytest.raises(EstResponseError, match="cap"):
        _enroll(rec.client(basic_auth=("dev", "pw"), max_response_bytes=4096))
    assert len(rec.posts()) == 1


def test_challenge_after_a_redirect_is_answered_at_the_new_url_and_carried_on() -> None:
    moved = httpx.Response(307, headers={"Location": "/.well-known/est/other/simpleenroll"})
    again = httpx.Response(307, headers={"Location": "/.well-known/est/third/simpleenroll"})
    challenge = httpx.Response(401, headers={"WWW-Authenticate": DIGEST})
    rec = Recorder(moved, challenge, again, _issued())
    _enroll(rec.client(basic_auth=("dev", "pw"), http_auth="digest"))
    sent = [(r.url.path, r.headers.get("Authorization")) for r in rec.posts()]
    assert [(path, auth is not None) for path, auth in sent] == [
        ("/.well-known/est/simpleenroll", False),
        ("/.well-known/est/other/simpleenroll", False),
        ("/.well-known/est/other/simpleenroll", True),
        ("/.well-known/est/third/simpleenroll", True),
    ]
    # the Digest answer names the URI it went to (RFC 7616 §3.4), also after the redirect
    for path, auth in sent[2:]:
        assert auth is not None
        fields = _digest_fields(auth)
        assert fields["uri"] == path and fields["response"] == _expected_digest(fields, "POST")


@pytest.mark.parametrize(
    ("url", "answered"),
    [
        ("https://est.example:8443/.well-known/est/cacerts", True),
        ("https://EST.example:8443/.well-known/est/cacerts", True),
        ("https://evil.example:8443/.well-known/est/cacerts", False),
        ("https://est.example/.well-known/est/cacerts", False),  # port 443: another origin
        ("http://est.example:8443/.well-known/est/cacerts", False),
    ],
)
def test_auth_flow_answers_only_this_clients_origin(url: str, answered: bool) -> None:
    origin = ("https", "est.example", 8443)
    request = httpx.Request("GET", url)
    first = next(EstAuth(("dev", "pw"), origin).sync_auth_flow(request))
    assert ("Authorization" in first.headers) is answered  # pre-emptive Basic, ours only

    request = httpx.Request("GET", url)
    flow = EstAuth(("dev", "pw"), origin, "digest").sync_auth_flow(request)
    assert "Authorization" not in next(flow).headers  # Digest needs the challenge first
    challenge = httpx.Response(401, headers={"WWW-Authenticate": DIGEST}, request=request)
    if not answered:
        with pytest.raises(StopIteration):
            flow.send(challenge)
        return
    retry = flow.send(challenge)
    assert retry is not request and "Authorization" not in request.headers
    assert retry.headers["Authorization"].startswith('Digest username="dev", realm="est"')
    assert retry.url == request.url
    with pytest.raises(StopIteration):  # one answer only: a second 401 is the verdict
        flow.send(httpx.Response(401, headers=challenge.headers, request=retry))


def test_auth_flow_without_credentials_or_challenge_sends_nothing() -> None:
    request = httpx.Request("GET", f"{BASE}/.well-known/est/cacerts")
    for auth, response in [
        (EstAuth(None, ("https", "est.example", 8443)), httpx.Response(401, request=request)),
        (
            EstAuth(("dev", "pw"), ("https", "est.example", 8443)),
            httpx.Response(200, request=request),
        ),
    ]:
        flow = auth.sync_auth_flow(request)
        next(flow)
        with pytest.raises(StopIteration):
            flow.send(response)
    shown = repr(EstAuth(("dev", "s3cret"), ("https", "est.example", 8443)))
    assert "s3cret" not in shown and "ZGV2" not in shown
    with pytest.raises(EstError, match="http_auth: expected one of auto, basic, digest"):
        EstAuth(("dev", "pw"), ("https", "est.example", 8443), "ntlm")  # type: ignore[arg-type]


def test_redirects_same_origin_only() -> None:
    moved = httpx.Response(307, headers={"Location": "/.well-known/est/other/simpleenroll"})
    rec = Recorder(moved, _issued())
    _enroll(rec.client())
    assert rec.posts()[1].url.path == "/.well-known/est/other/simpleenroll"

    away = httpx.Response(307, headers={"Location": "https://evil.example/simpleenroll"})
    rec = Recorder(away)
    with pytest.raises(EstRejectedError, match="another origin"):
        _enroll(rec.client(basic_auth=("dev", "pw")))
    assert {r.url.host for r in rec.requests} == {"est.example"}


def test_response_size_cap() -> None:
    big = httpx.Response(
        200, content=b"A" * 5000, headers={"Content-Type": "application/pkcs7-mime"}
    )
    rec = Recorder(big)
    with pytest.raises(EstResponseError, match="cap"):
        _enroll(rec.client(max_response_bytes=4096))


def test_clientauth_eku_required_unless_told_otherwise() -> None:
    with pytest.raises(EstResponseError, match="clientAuth"):
        _enroll(Recorder(_issued(eku=False)).client())
    assert _enroll(Recorder(_issued(eku=False)).client(require_client_auth_eku=False))


def test_issued_certificate_must_be_valid_now() -> None:
    later = lambda: NOW + timedelta(days=31)  # noqa: E731
    with pytest.raises(EstResponseError, match="not valid now"):
        _enroll(Recorder(_issued()).client(clock=later))


def test_csrattrs_not_offered_is_none() -> None:
    rec = Recorder(httpx.Response(404, text="not here"))
    with rec.client() as client:
        assert client.csrattrs() is None


# -- credentials a server echoes back --------------------------------------------------------

TOKEN = "ZGV2OnMzY3JldA=="  # base64("dev:s3cret"), RFC 7617 §2


def _echoing(status: int) -> Handler:
    """A server that wants Basic, then answers `status` with the request head in its body."""

    def answer(request: httpx.Request) -> httpx.Response:
        if "Authorization" not in request.headers:
            return httpx.Response(401, headers={"WWW-Authenticate": 'Basic realm="est"'})
        head = "".join(f"{name}: {value}\r\n" for name, value in request.headers.items())
        user, _, password = base64.b64decode(TOKEN).decode().partition(":")
        return httpx.Response(status, text=f"user={user} pw={password}\r\n{head}")

    return answer


@pytest.mark.parametrize(("status", "error"), [(400, EstRejectedError), (500, EstConnectionError)])
def test_echoed_credentials_are_masked_in_the_error(status: int, error: type[Exception]) -> None:
    rec = Recorder(_echoing(status))
    with pytest.raises(error) as info:
        _enroll(rec.client(basic_auth=("dev", "s3cret")))
    assert rec.posts()[-1].headers["Authorization"] == f"Basic {TOKEN}"  # it was sent
    message = str(info.value)
    assert f"HTTP {status}" in message and "[REDACTED]" in message
    for leaked in ("s3cret", "ZGV2OnMz", TOKEN):
        assert leaked not in message
    assert "user=dev" in message  # the rest of the excerpt is still there


def test_an_echoed_digest_response_is_masked() -> None:
    # A Digest response is replayable while its nonce lives: it is a secret like the password.
    def answer(request: httpx.Request) -> httpx.Response:
        sent = request.headers.get("Authorization", "")
        if not sent.startswith("Digest"):
            return httpx.Response(401, headers={"WWW-Authenticate": DIGEST})
        return httpx.Response(400, text=f"bad CSR; response={_digest_fields(sent)['response']}")

    rec = Recorder(answer)
    with pytest.raises(EstRejectedError) as info:
        _enroll(rec.client(basic_auth=("dev", "pw"), http_auth="digest"))
    response = _digest_fields(rec.posts()[-1].headers["Authorization"])["response"]
    message = str(info.value)
    assert "bad CSR; response=[REDACTED]" in message and response not in message


# -- content codings -------------------------------------------------------------------------


class _Raw(httpx.SyncByteStream):
    """A response body as a stream, so that the client sees it undecoded (as from a socket)."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    def __iter__(self) -> Iterator[bytes]:
        yield self._data


def _encoded_cacerts(coding: str, wire: bytes) -> Handler:
    def answer(request: httpx.Request) -> httpx.Response:
        headers = {"Content-Type": "application/pkcs7-mime", "Content-Encoding": coding}
        return httpx.Response(200, headers=headers, stream=_Raw(wire))

    return answer


def test_identity_is_asked_for_and_gzip_is_still_understood() -> None:
    seen: list[httpx.Request] = []
    wire = gzip.compress(_certs_only(CA_CERT))

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return _encoded_cacerts("gzip", wire)(request)

    with EstClient(BASE, trust_anchors=[CA_CERT], transport=httpx.MockTransport(answer)) as c:
        assert c.cacerts().anchor == CA_CERT
    assert seen[0].headers["Accept-Encoding"] == "identity"  # RFC 9110 §12.5.3


@pytest.mark.parametrize(
    ("coding", "wire", "match"),
    [
        ("br", b"\x1b\x03\x00", "unsupported Content-Encoding 'br'"),
        ("gzip, gzip", gzip.compress(gzip.compress(bytes(3 << 20))), "cap"),
    ],
)
def test_content_codings_refused(coding: str, wire: bytes, match: str) -> None:
    transport = httpx.MockTransport(_encoded_cacerts(coding, wire))
    with (
        EstClient(BASE, trust_anchors=[CA_CERT], transport=transport) as client,
        pytest.raises(EstResponseError, match=match),
    ):
        client.cacerts()


# -- waits inside a run ----------------------------------------------------------------------


def _busy_then_ok(retry_after: str, times: int = 1) -> Handler:
    calls: list[int] = []

    def answer(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        if len(calls) <= times:
            return httpx.Response(503, headers={"Retry-After": retry_after}, text="busy")
        return _fresh(CACERTS)

    return answer


@pytest.mark.parametrize("operation", ["cacerts", "csrattrs"])
def test_long_retry_after_on_a_get_is_pending_at_once(operation: str) -> None:
    sleeps: list[float] = []
    transport = httpx.MockTransport(_busy_then_ok("300", times=10))
    started = time.monotonic()
    with (
        EstClient(
            BASE,
            trust_anchors=[CA_CERT],
            transport=transport,
            retry=RetryPolicy(sleep=sleeps.append),
        ) as client,
        pytest.raises(EnrollmentPending) as info,
    ):
        getattr(client, operation)()
    assert time.monotonic() - started < 1.0
    assert info.value.retry_after_s == 300.0
    assert sleeps == []  # stored for the next run, not slept through
    assert "503" in str(info.value) and "300 s" in str(info.value)


def test_short_retry_after_is_waited_for_in_the_run() -> None:
    sleeps: list[float] = []
    transport = httpx.MockTransport(_busy_then_ok("2"))
    with EstClient(
        BASE, trust_anchors=[CA_CERT], transport=transport, retry=RetryPolicy(sleep=sleeps.append)
    ) as client:
        assert client.cacerts().anchor == CA_CERT
    assert len(sleeps) == 1 and sleeps[0] >= 2.0


def test_waits_of_one_operation_share_a_budget() -> None:
    # 25 s is within the per-wait cap; the third would take the total past 60 s.
    sleeps: list[float] = []
    transport = httpx.MockTransport(_busy_then_ok("25", times=10))
    policy = RetryPolicy(attempts=10, max_wait_s=30, budget_s=60, sleep=sleeps.append)
    with (
        EstClient(BASE, trust_anchors=[CA_CERT], transport=transport, retry=policy) as client,
        pytest.raises(EnrollmentPending) as info,
    ):
        client.cacerts()
    assert len(sleeps) == 2 and all(s >= 25 for s in sleeps)
    assert info.value.retry_after_s == 25.0


def test_long_retry_after_on_an_enroll_500_is_pending() -> None:
    rec = Recorder(httpx.Response(500, headers={"Retry-After": "600"}, text="later"))
    with pytest.raises(EnrollmentPending) as info:
        _enroll(rec.client())
    assert info.value.retry_after_s == 300.0  # RetryPolicy.retry_after_cap_s
    assert rec.sleeps == [] and len(rec.posts()) == 1


# -- only public classes leave the client ----------------------------------------------------


def test_exhausted_retries_raise_the_public_connection_error() -> None:
    rec = Recorder(httpx.Response(502, text="bad gateway"))
    with pytest.raises(EstConnectionError) as info:
        _enroll(rec.client())
    assert type(info.value) is EstConnectionError
    assert "502: bad gateway" in str(info.value)
    assert isinstance(info.value.__cause__, EstConnectionError)  # the last failure, chained


def test_httpx_errors_of_an_injected_transport_are_typed() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused")

    rec = Recorder(refuse)
    with pytest.raises(EstConnectionError, match="refused") as info:
        _enroll(rec.client())
    assert type(info.value) is EstConnectionError


# -- Location headers ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "location",
    [
        "https://est.example:99999/.well-known/est/simpleenroll",
        "https://est.example:84x3/.well-known/est/simpleenroll",
        "https://[est.example/.well-known/est/simpleenroll",
    ],
)
def test_unusable_location_is_a_response_error(location: str) -> None:
    rec = Recorder(httpx.Response(302, headers={"Location": location}))
    with pytest.raises(EstResponseError, match=r"(unusable|Invalid URL in) [Ll]ocation"):
        _enroll(rec.client())
    assert len(rec.posts()) == 1


def test_port_zero_is_not_the_default_port() -> None:
    # An explicit ":0" is port 0, not "no port" (the default, 443, RFC 9110 §4.2.2).
    rec = Recorder(httpx.Response(307, headers={"Location": "https://est.example:0/x"}))
    client = EstClient(
        "https://est.example",
        trust_anchors=[CA_CERT],
        transport=httpx.MockTransport(rec),
        retry=RetryPolicy(attempts=1),
    )
    with pytest.raises(EstRejectedError, match="another origin"):
        _enroll(client)
    assert {r.url.port for r in rec.requests} == {None}


# -- an unbound CSR is signed once per operation ---------------------------------------------


def test_unbound_csr_is_signed_once_across_retries() -> None:
    rec = Recorder(httpx.Response(500, text="a"), httpx.Response(502, text="b"), _issued())
    calls: list[object] = []

    def factory(binding: object) -> bytes:
        calls.append(binding)
        return build_csr(DEVICE)

    with rec.client() as client:
        client.simpleenroll(factory)  # type: ignore[arg-type]
    assert len(rec.posts()) == 3
    assert calls == [None]  # one signature; the same CSR went out three times
    assert len({p.content for p in rec.posts()}) == 1
