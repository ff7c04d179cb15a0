"""EstClient's HTTP authentication against servers that behave as libest does (issue 11, items
3 and 4): Basic sent pre-emptively inside verified TLS, a server that closes the connection
after every 401 (or every non-200 answer) without ``Connection: close``, Digest (RFC 7616)
across that close with a CSR bound to the new connection, and a clear 77 for what cannot be
answered. Real TLS on 127.0.0.1, TLS 1.2 as libest speaks it, keys in the virtual SIM; every
case counts the requests the server answered and bounds its wall time.
"""

from __future__ import annotations

import base64
import ssl
import time
from collections.abc import Callable

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from est_agent.errors import AuthError
from est_agent.est.client import EstClient, RetryPolicy
from est_agent.est.messages import challenge_password_value
from est_agent.est.tls import ChannelBinding
from est_agent.testserver import DevPki, EstTestServer
from est_agent.testserver.config import AuthMode, CloseAfter, CsrAttrsKind, HttpScheme, TlsMax
from est_agent.testserver.server import RequestRecord
from tests.est.card_helpers import OP_KEY_A, SimCard, build_csr
from tests.est.hostile import Answer, HostileServer, Request, http_response
from tests.est.oddcerts import certs_only, issue

pytestmark = pytest.mark.integration

StartServer = Callable[..., EstTestServer]
PKCS7 = "application/pkcs7-mime; smime-type=certs-only"
#: a generous bound for one enrollment on 127.0.0.1 (two handshakes and card signatures)
BOUND_S = 15.0


def _libest(start_server: StartServer, **settings: object) -> EstTestServer:
    """The test server as libest's example server runs: TLS 1.2, certificate and HTTP account
    both required, and the connection closed after every 401 without saying so."""
    settings.setdefault("close_after", CloseAfter.UNAUTHORIZED)
    settings.setdefault("auth", AuthMode.CERT_AND_BASIC)
    return start_server(tls_max=TlsMax.TLS1_2, basic=("dev", "s3cret"), **settings)


def _client(
    server: EstTestServer | HostileServer,
    pki: DevPki,
    card: SimCard,
    sleeps: list[float],
    **options: object,
) -> EstClient:
    url = server.url.removesuffix("/.well-known/est")
    return EstClient(
        url,
        trust_anchors=[pki.tls_ca_certificate],
        client_cert_chain=[card.bootstrap_cert],
        signer=card.bootstrap,
        timeout_s=10.0,
        tls_max="1.2",
        retry=RetryPolicy(attempts=4, sleep=sleeps.append),
        **options,  # type: ignore[arg-type]
    )


def _posts(server: EstTestServer) -> list[RequestRecord]:
    return [r for r in server.requests if r.method == "POST"]


# -- item 3: Basic ----------------------------------------------------------------------------


@pytest.mark.parametrize("close_after", [CloseAfter.UNAUTHORIZED, CloseAfter.NON_200])
def test_basic_goes_first_time_to_a_server_that_closes_after_401(
    start_server: StartServer, dev_pki: DevPki, sim: SimCard, close_after: CloseAfter
) -> None:
    server = _libest(start_server, close_after=close_after)
    op_a = sim.new_key(OP_KEY_A)
    sleeps: list[float] = []
    started = time.monotonic()
    with _client(server, dev_pki, sim, sleeps, basic_auth=("dev", "s3cret")) as client:
        enrolled = client.simpleenroll(lambda _b: build_csr(op_a))
    elapsed = time.monotonic() - started
    assert elapsed < BOUND_S
    assert enrolled.certificate.public_key() == op_a.public_key()
    # pre-emptive: the one POST carried the credentials, no 401, no retry, one connection
    assert [(r.status, r.authorization, r.connection) for r in _posts(server)] == [
        (200, "basic", 1)
    ]
    assert sleeps == [] and sim.bootstrap.signatures == 1 and op_a.signatures == 1


def test_wrong_basic_password_is_77_after_one_request(
    start_server: StartServer, dev_pki: DevPki, sim: SimCard
) -> None:
    server = _libest(start_server)
    op_a = sim.new_key(OP_KEY_A)
    sleeps: list[float] = []
    started = time.monotonic()
    with (
        _client(server, dev_pki, sim, sleeps, basic_auth=("dev", "wrong")) as client,
        pytest.raises(AuthError) as info,
    ):
        client.simpleenroll(lambda _b: build_csr(op_a))
    assert time.monotonic() - started < BOUND_S
    assert info.value.exit_code == 77
    assert "refused the HTTP Basic credentials" in str(info.value) and "401" in str(info.value)
    assert "wrong" not in str(info.value)
    assert [(r.status, r.authorization) for r in _posts(server)] == [(401, "basic")]
    assert sleeps == []


def test_basic_and_a_bound_csr_on_a_server_closing_after_every_non_200(
    start_server: StartServer, dev_pki: DevPki, sim: SimCard
) -> None:
    # /csrattrs answers 204 and closes (libest closes after 4xx and 202 alike): the CSR bound
    # to the connection that carries it (PoP, RFC 7030 §3.5) is made on the next connection.
    server = _libest(
        start_server,
        close_after=CloseAfter.NON_200,
        pop_required=True,
        csrattrs=CsrAttrsKind.NONE,
    )
    op_a = sim.new_key(OP_KEY_A)
    made_on: list[int] = []
    sleeps: list[float] = []

    def csr(binding: ChannelBinding | None) -> bytes:
        assert binding is not None and client.transport is not None
        made_on.append(client.transport.connections_opened)
        return build_csr(op_a, challenge_password=challenge_password_value(binding.value))

    started = time.monotonic()
    with _client(server, dev_pki, sim, sleeps, basic_auth=("dev", "s3cret")) as client:
        assert client.csrattrs() is None
        enrolled = client.simpleenroll(csr)
    assert time.monotonic() - started < BOUND_S
    assert enrolled.channel_binding is not None
    statuses = [(r.method, r.status, r.connection) for r in server.requests]
    assert statuses[0] == ("GET", 204, 1)  # /csrattrs, then closed
    assert statuses[-1] == ("POST", 200, made_on[-1])  # the CSR went on its own connection
    assert len(_posts(server)) == 1 and sleeps == []


# -- item 4: Digest ---------------------------------------------------------------------------


@pytest.mark.parametrize("algorithms", [("MD5",), ("SHA-256",), ("SHA-256", "MD5")])
def test_digest_across_the_close_after_401_with_an_unbound_csr(
    start_server: StartServer, dev_pki: DevPki, sim: SimCard, algorithms: tuple[str, ...]
) -> None:
    server = _libest(start_server, http_scheme=HttpScheme.DIGEST, digest_algorithms=algorithms)
    op_a = sim.new_key(OP_KEY_A)
    sleeps: list[float] = []
    started = time.monotonic()
    with _client(server, dev_pki, sim, sleeps, basic_auth=("dev", "s3cret")) as client:
        enrolled = client.simpleenroll(lambda _b: build_csr(op_a))
    assert time.monotonic() - started < BOUND_S
    assert enrolled.certificate.public_key() == op_a.public_key()
    # Basic first (pre-emptive, est.http_auth = auto), the Digest challenge and its close,
    # then the Digest answer on a new connection: no retry, no wait
    assert [(r.status, r.authorization, r.connection) for r in _posts(server)] == [
        (401, "basic", 1),
        (200, "digest", 2),
    ]
    assert sleeps == []
    assert op_a.signatures == 1  # an unbound CSR is signed once and sent again as it is
    assert sim.bootstrap.signatures == 2  # one handshake per connection


def test_digest_across_the_close_after_401_signs_a_bound_csr_again(
    start_server: StartServer, dev_pki: DevPki, sim: SimCard
) -> None:
    server = _libest(
        start_server,
        http_scheme=HttpScheme.DIGEST,
        digest_algorithms=("SHA-256",),
        pop_required=True,
    )
    op_a = sim.new_key(OP_KEY_A)
    bindings: list[bytes] = []
    sleeps: list[float] = []

    def csr(binding: ChannelBinding | None) -> bytes:
        assert binding is not None
        bindings.append(binding.value)
        return build_csr(op_a, challenge_password=challenge_password_value(binding.value))

    started = time.monotonic()
    with _client(
        server, dev_pki, sim, sleeps, basic_auth=("dev", "s3cret"), http_auth="digest"
    ) as client:
        enrolled = client.simpleenroll(csr)
    assert time.monotonic() - started < BOUND_S
    assert enrolled.channel_binding is not None
    assert enrolled.channel_binding.value == bindings[-1]
    # no password on the wire at all (digest only): the challenge, then the answer with a
    # CSR signed again for the new connection (the server checked its PoP)
    assert [(r.status, r.authorization, r.connection) for r in _posts(server)] == [
        (401, None, 1),
        (200, "digest", 2),
    ]
    assert len(bindings) == len(set(bindings)) == op_a.signatures == 2
    assert sim.bootstrap.signatures == 2 and sleeps == []


def test_wrong_digest_password_is_77(
    start_server: StartServer, dev_pki: DevPki, sim: SimCard
) -> None:
    server = _libest(start_server, http_scheme=HttpScheme.DIGEST)
    op_a = sim.new_key(OP_KEY_A)
    sleeps: list[float] = []
    started = time.monotonic()
    with (
        _client(
            server, dev_pki, sim, sleeps, basic_auth=("dev", "wrong"), http_auth="digest"
        ) as client,
        pytest.raises(AuthError) as info,
    ):
        client.simpleenroll(lambda _b: build_csr(op_a))
    assert time.monotonic() - started < BOUND_S
    assert info.value.exit_code == 77
    assert "refused the HTTP Digest credentials" in str(info.value)
    # the challenge, then one answer: refused, no loop
    assert [(r.status, r.authorization) for r in _posts(server)] == [(401, None), (401, "digest")]
    assert sleeps == []


def test_a_stale_nonce_is_answered_again_without_asking_twice(
    start_server: StartServer, dev_pki: DevPki, sim: SimCard
) -> None:
    # The nonce of the first enrollment has expired by the second one: the server says stale
    # (RFC 7616 §3.3), the client answers the fresh challenge once.
    server = start_server(
        auth=AuthMode.CERT_AND_BASIC,
        basic=("dev", "s3cret"),
        http_scheme=HttpScheme.DIGEST,
        digest_nonce_lifetime_s=0.5,
    )
    op_a = sim.new_key(OP_KEY_A)
    sleeps: list[float] = []
    with _client(
        server, dev_pki, sim, sleeps, basic_auth=("dev", "s3cret"), http_auth="digest"
    ) as client:
        client.simpleenroll(lambda _b: build_csr(op_a))
        time.sleep(0.7)
        started = time.monotonic()
        client.simpleenroll(lambda _b: build_csr(op_a))
        assert time.monotonic() - started < BOUND_S
    assert [(r.status, r.authorization) for r in _posts(server)] == [
        (401, None),
        (200, "digest"),
        (401, "digest"),  # pre-emptive with the old nonce: stale
        (200, "digest"),
    ]
    assert sleeps == []


# -- what cannot be answered: 77, saying what to change -----------------------------------------


def test_basic_only_setting_against_a_digest_server(
    start_server: StartServer, dev_pki: DevPki, sim: SimCard
) -> None:
    server = _libest(start_server, http_scheme=HttpScheme.DIGEST)
    op_a = sim.new_key(OP_KEY_A)
    sleeps: list[float] = []
    with (
        _client(
            server, dev_pki, sim, sleeps, basic_auth=("dev", "s3cret"), http_auth="basic"
        ) as client,
        pytest.raises(AuthError) as info,
    ):
        client.simpleenroll(lambda _b: build_csr(op_a))
    message = str(info.value)
    assert info.value.exit_code == 77
    assert "asks for HTTP Digest" in message and 'est.http_auth = "basic"' in message
    assert [(r.status, r.authorization) for r in _posts(server)] == [(401, "basic")]


def test_digest_only_setting_never_sends_the_password_to_a_basic_server(
    start_server: StartServer, dev_pki: DevPki, sim: SimCard
) -> None:
    server = _libest(start_server)
    op_a = sim.new_key(OP_KEY_A)
    sleeps: list[float] = []
    with (
        _client(
            server, dev_pki, sim, sleeps, basic_auth=("dev", "s3cret"), http_auth="digest"
        ) as client,
        pytest.raises(AuthError) as info,
    ):
        client.simpleenroll(lambda _b: build_csr(op_a))
    message = str(info.value)
    assert info.value.exit_code == 77
    assert "asks for HTTP Basic" in message and 'est.http_auth = "digest"' in message
    assert {r.authorization for r in server.requests} == {None}


@pytest.mark.parametrize(
    ("challenge", "named"),
    [
        ('Bearer realm="est", error="invalid_token"', "Bearer"),
        ("Negotiate, NTLM", "Negotiate, NTLM"),
        ('Digest realm="est", nonce="n", qop="auth", algorithm=SHA-512-256', "SHA-512-256"),
        ('Digest realm="est", nonce="n", qop="auth-int"', "qop=auth-int"),
    ],
)
def test_a_challenge_we_do_not_speak_is_77_naming_it(
    dev_pki: DevPki, sim: SimCard, challenge: str, named: str
) -> None:
    def answer(request: Request) -> Answer:
        if request.method == "GET":
            certs = certs_only(dev_pki.est_ca.certificate)
            return Answer(http_response(200, certs, {"Content-Type": PKCS7}))
        # libest's way: the 401, then the connection closes
        return Answer(http_response(401, b"", {"WWW-Authenticate": challenge}))

    op_a = sim.new_key(OP_KEY_A)
    sleeps: list[float] = []
    started = time.monotonic()
    with (
        HostileServer(dev_pki, answer, tls_max=ssl.TLSVersion.TLSv1_2) as server,
        _client(server, dev_pki, sim, sleeps, basic_auth=("dev", "s3cret")) as client,
        pytest.raises(AuthError) as info,
    ):
        client.simpleenroll(lambda _b: build_csr(op_a))
    assert time.monotonic() - started < BOUND_S
    assert info.value.exit_code == 77
    assert named in str(info.value)
    posts = [r for r in server.requests if r.method == "POST"]
    assert len(posts) == 1 and sleeps == []


# -- the close the client cannot see coming -----------------------------------------------------


def test_challenge_answer_on_a_connection_that_dies_goes_on_a_new_one(
    dev_pki: DevPki, sim: SimCard
) -> None:
    # The 401 comes without any sign of a close; the server closes when the answer arrives
    # (what a client sees when libest's close is still in flight): the answer is sent again
    # at once on a new connection, with the CSR bound to that one.
    challenge = 'Digest realm="est", nonce="bm9uY2U=", qop="auth", algorithm=SHA-256'
    posts: list[Request] = []

    def answer(request: Request) -> Answer:
        if request.method == "GET":
            certs = certs_only(dev_pki.est_ca.certificate)
            return Answer(http_response(200, certs, {"Content-Type": PKCS7}), keep=True)
        posts.append(request)
        if len(posts) == 1:
            return Answer(http_response(401, b"", {"WWW-Authenticate": challenge}), keep=True)
        if len(posts) == 2:
            return Answer(b"", notify=False)  # closed without a word
        key = x509.load_der_x509_csr(base64.b64decode(request.body)).public_key()
        assert isinstance(key, ec.EllipticCurvePublicKey)
        leaf = issue(dev_pki.est_ca.certificate, dev_pki.est_ca.key, key)
        return Answer(http_response(200, certs_only(leaf), {"Content-Type": PKCS7}), keep=True)

    op_a = sim.new_key(OP_KEY_A)
    sleeps: list[float] = []
    connections: list[int] = []

    def csr(binding: ChannelBinding | None) -> bytes:
        assert binding is not None and client.transport is not None
        connections.append(client.transport.connections_opened)
        return build_csr(op_a, challenge_password=challenge_password_value(binding.value))

    started = time.monotonic()
    with (
        HostileServer(dev_pki, answer, tls_max=ssl.TLSVersion.TLSv1_2) as server,
        _client(server, dev_pki, sim, sleeps, basic_auth=("dev", "s3cret")) as client,
    ):
        enrolled = client.simpleenroll(csr)
    assert time.monotonic() - started < BOUND_S
    assert enrolled.certificate.public_key() == op_a.public_key()
    assert [p.headers.get("authorization", "")[:6] for p in posts] == ["Basic ", "Digest", "Digest"]
    assert posts[1].body != posts[2].body  # the CSR was signed again for the new connection
    assert connections == [1, 2] and sleeps == []
