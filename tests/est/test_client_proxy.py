"""EstClient through an HTTP CONNECT proxy (tests/connect_proxy.py) to the real test EST server.

What the proxy saw is asserted from its recording: the CONNECT line, ``Host`` and (when
configured) Proxy-Authorization in clear, then TLS records only; no EST path, no
Authorization, no CSR. A proxy that refuses is a typed error, before the card signs anything
and before any EST byte is sent; the request deadline covers the CONNECT.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable

import pytest
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from est_agent.errors import (
    AuthError,
    EstAgentError,
    EstConnectionError,
    EstError,
    exit_code_for,
)
from est_agent.est.client import EstClient, RetryPolicy
from est_agent.est.messages import challenge_password_value
from est_agent.est.proxy import HttpsProxy
from est_agent.est.tls import ChannelBinding
from est_agent.testserver import DevPki, EstTestServer
from est_agent.testserver.config import AuthMode, TlsMax
from tests.connect_proxy import ConnectProxy, Mode, Tunnel
from tests.est.card_helpers import OP_KEY_A, SimCard, build_csr

pytestmark = pytest.mark.integration

StartServer = Callable[..., EstTestServer]
BASIC = ("dev", "s3cret")
PROXY_CREDENTIALS = ("proxy-user", "pr0xy-pw")


class Sleeps:
    def __init__(self) -> None:
        self.calls: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


def proxy_of(proxy: ConnectProxy, credentials: tuple[str, str] | None = None) -> HttpsProxy:
    user, password = credentials or (None, None)
    return HttpsProxy("127.0.0.1", proxy.port, user, password)


def client_via(
    server: EstTestServer,
    pki: DevPki,
    card: SimCard | None,
    proxy: HttpsProxy,
    **options: object,
) -> EstClient:
    options.setdefault("retry", RetryPolicy(attempts=1, sleep=Sleeps()))
    options.setdefault("timeout_s", 10.0)
    if card is not None:
        options.setdefault("client_cert_chain", [card.bootstrap_cert])
        options.setdefault("signer", card.bootstrap)
    return EstClient(
        server.url.removesuffix("/.well-known/est"),
        trust_anchors=[pki.tls_ca_certificate],
        proxy=proxy,
        **options,  # type: ignore[arg-type]
    )


def assert_ciphertext_only(tunnel: Tunnel, *secrets: bytes) -> None:
    """After the CONNECT head: TLS records only, nothing of HTTP or of ``secrets`` readable."""
    assert tunnel.upstream[:1] == b"\x16"  # a TLS handshake record (RFC 8446 §5.1)
    assert tunnel.upstream[1:3] in (b"\x03\x01", b"\x03\x03")  # legacy_record_version
    assert tunnel.downstream[:1] == b"\x16"
    seen = tunnel.relayed.lower()
    # (the ClientHello may offer ALPN "http/1.1" in clear: RFC 7301 §3.1; no request line or
    # status line, no header field)
    for readable in (b"/.well-known/est", b"simpleenroll", b"cacerts", b"authorization"):
        assert readable not in seen
    for readable in (b"get /", b"post /", b"http/1.1 200", b"http/1.1\r\n", b"content-"):
        assert readable not in seen
    for secret in secrets:
        assert secret not in tunnel.relayed
        assert base64.b64encode(secret) not in tunnel.relayed


def assert_connect_head(tunnel: Tunnel, server: EstTestServer) -> None:
    target = f"127.0.0.1:{server.port}"
    assert tunnel.head.startswith(f"CONNECT {target} HTTP/1.1\r\n".encode())
    assert tunnel.headers["host"] == target
    assert "authorization" not in tunnel.headers
    assert b"/.well-known" not in tunnel.head


# -- through the tunnel: TLS, PoP and Basic end to end -----------------------------------------


@pytest.mark.parametrize("proxy_auth", [False, True])
def test_enroll_with_tls_unique_pop_and_basic_through_the_proxy(
    start_server: StartServer, dev_pki: DevPki, sim: SimCard, proxy_auth: bool
) -> None:
    server = start_server(
        tls_max=TlsMax.TLS1_2, pop_required=True, auth=AuthMode.CERT_AND_BASIC, basic=BASIC
    )
    op_a = sim.new_key(OP_KEY_A)
    csrs: list[bytes] = []

    def csr(binding: ChannelBinding | None) -> bytes:
        assert binding is not None and binding.kind == "tls-unique"
        csrs.append(build_csr(op_a, challenge_password=challenge_password_value(binding.value)))
        return csrs[-1]

    credentials = PROXY_CREDENTIALS if proxy_auth else None
    with (
        ConnectProxy(credentials=credentials) as proxy,
        client_via(
            server, dev_pki, sim, proxy_of(proxy, credentials), basic_auth=BASIC, tls_max="1.2"
        ) as client,
    ):
        started = time.monotonic()
        enrolled = client.simpleenroll(csr)
        elapsed = time.monotonic() - started
        assert client.transport is not None and client.transport.connections_opened == 1
    # The server checked challengePassword against its own tls-unique: the TLS session is
    # the one between the client and the server, not one with the proxy.
    assert enrolled.certificate.public_key() == op_a.public_key()
    assert sim.bootstrap.signatures == 1
    assert elapsed < 10
    (tunnel,) = proxy.tunnels
    assert tunnel.status == 200
    assert_connect_head(tunnel, server)
    if proxy_auth:
        # RFC 7617 §2: base64("proxy-user:pr0xy-pw")
        assert tunnel.headers["proxy-authorization"] == "Basic cHJveHktdXNlcjpwcjB4eS1wdw=="
    else:
        assert "proxy-authorization" not in tunnel.headers
    spki = op_a.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    issued = enrolled.certificate.public_bytes(Encoding.DER)
    assert_ciphertext_only(tunnel, csrs[0], spki, issued, b"s3cret", b"dev:s3cret")


@pytest.mark.parametrize("tls_max", ["1.2", "1.3"])
def test_card_tls_and_channel_binding_through_the_proxy(
    start_server: StartServer, dev_pki: DevPki, sim: SimCard, tls_max: str
) -> None:
    server = start_server(tls_max=TlsMax.TLS1_2 if tls_max == "1.2" else TlsMax.TLS1_3)
    op_a = sim.new_key(OP_KEY_A)
    seen: list[ChannelBinding] = []

    def csr(binding: ChannelBinding | None) -> bytes:
        assert binding is not None
        seen.append(binding)
        return build_csr(op_a)

    with ConnectProxy() as proxy, client_via(server, dev_pki, sim, proxy_of(proxy)) as client:
        assert client.cacerts().anchor == dev_pki.est_ca.certificate
        client.simpleenroll(csr)
    (binding,) = seen
    expected = ("tls-unique", 12) if tls_max == "1.2" else ("tls-exporter", 32)
    assert (binding.kind, len(binding.value)) == expected
    (tunnel,) = proxy.tunnels
    assert_connect_head(tunnel, server)
    assert_ciphertext_only(tunnel)


def test_server_only_tls_through_the_proxy(start_server: StartServer, dev_pki: DevPki) -> None:
    # The stdlib ssl path (est-agent cacerts without a card) tunnels the same way.
    server = start_server()
    with ConnectProxy() as proxy, client_via(server, dev_pki, None, proxy_of(proxy)) as client:
        assert client.cacerts().anchor == dev_pki.est_ca.certificate
        assert client.csrattrs() is None
    (tunnel,) = proxy.tunnels
    assert_connect_head(tunnel, server)
    assert_ciphertext_only(tunnel)


# -- a proxy that refuses ----------------------------------------------------------------------


def _refused(
    start_server: StartServer,
    dev_pki: DevPki,
    sim: SimCard,
    proxy: ConnectProxy,
    credentials: tuple[str, str] | None = None,
    **options: object,
) -> tuple[BaseException, float]:
    server = start_server(basic=BASIC, auth=AuthMode.CERT_AND_BASIC)
    op_a = sim.new_key(OP_KEY_A)
    with client_via(
        server, dev_pki, sim, proxy_of(proxy, credentials), basic_auth=BASIC, **options
    ) as client:
        started = time.monotonic()
        with pytest.raises(EstAgentError) as info:
            client.simpleenroll(lambda _b: build_csr(op_a))
        elapsed = time.monotonic() - started
    # Nothing reached the server, the card never signed, no EST byte went to the proxy.
    assert sim.bootstrap.signatures == 0 and op_a.signatures == 0
    assert not server.config.issuance_log.exists() or not server.config.issuance_log.read_text()
    for tunnel in proxy.tunnels:
        assert not tunnel.upstream or tunnel.upstream[:1] == b"\x16"  # a ClientHello at most
        assert b"s3cret" not in tunnel.head and b"ZGV2OnMzY3JldA" not in tunnel.head
        assert b"/.well-known" not in tunnel.head
    return info.value, elapsed


@pytest.mark.parametrize(
    ("credentials", "challenge", "words"),
    [
        (None, 'Basic realm="x"', "asks for credentials"),
        (("proxy-user", "wrong"), "Basic", "refused the credentials of user 'proxy-user'"),
        (None, "Negotiate", "offers Negotiate; the agent speaks Basic only"),
    ],
)
def test_proxy_407_is_an_auth_error_naming_the_proxy(
    start_server: StartServer,
    dev_pki: DevPki,
    sim: SimCard,
    credentials: tuple[str, str] | None,
    challenge: str,
    words: str,
) -> None:
    with ConnectProxy(credentials=PROXY_CREDENTIALS, challenge=challenge) as proxy:
        error, elapsed = _refused(
            start_server,
            dev_pki,
            sim,
            proxy,
            credentials,
            retry=RetryPolicy(attempts=4, sleep=Sleeps()),
        )
    assert isinstance(error, AuthError) and not isinstance(error, EstConnectionError)
    assert exit_code_for(error) == 77
    message = str(error)
    assert f"proxy 127.0.0.1:{proxy.port} (est.proxy)" in message
    assert words in message and "HTTP 407 Proxy Authentication Required" in message
    assert "wrong" not in message
    assert proxy.connections == 1  # not retried
    assert elapsed < 5


@pytest.mark.parametrize(("status", "phrase"), [(403, "Forbidden"), (502, "Bad Gateway")])
def test_proxy_refusing_the_tunnel_is_unreachable(
    start_server: StartServer, dev_pki: DevPki, sim: SimCard, status: int, phrase: str
) -> None:
    sleeps = Sleeps()
    with ConnectProxy(mode=Mode.REFUSE, status=status) as proxy:
        error, elapsed = _refused(
            start_server, dev_pki, sim, proxy, retry=RetryPolicy(attempts=3, sleep=sleeps)
        )
    assert isinstance(error, EstConnectionError)
    assert exit_code_for(error) == 69
    assert str(error).startswith(
        f"proxy 127.0.0.1:{proxy.port} (est.proxy) refused the tunnel to 127.0.0.1:"
    )
    assert f"(HTTP {status} {phrase})" in str(error)
    assert "no tunnel for you" not in str(error)  # the proxy's words are not repeated
    assert proxy.connections == 3 and len(sleeps.calls) == 2  # transient: retried
    assert elapsed < 5


def test_proxy_credentials_are_masked_in_errors(
    start_server: StartServer, dev_pki: DevPki, sim: SimCard
) -> None:
    # A proxy that echoes what it got in a garbage answer: the message must not show it.
    token = base64.b64encode(b"proxy-user:pr0xy-pw")
    with ConnectProxy(mode=Mode.RAW, raw=b"GARBAGE " + token + b" pr0xy-pw\r\n\r\n") as proxy:
        error, _ = _refused(start_server, dev_pki, sim, proxy, PROXY_CREDENTIALS)
    assert exit_code_for(error) == 76
    assert "pr0xy-pw" not in str(error) and token.decode() not in str(error)


# -- a proxy that misbehaves -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "raw", "error_type", "code", "words"),
    [
        (Mode.RAW, b"SSH-2.0-OpenSSH_9.6\r\n\r\n", EstError, 76, "the proxy's answer is not HTTP"),
        (
            Mode.RAW,
            b"HTTP/1.1 200 OK\r\nX-Pad: " + b"a" * 100_000 + b"\r\n\r\n",
            EstError,
            76,
            "the proxy's answer is not HTTP: no end of its head in 16384 bytes",
        ),
        (
            Mode.EARLY,
            b"\x16\x03\x03\x00\x02hi",
            EstError,
            76,
            "the proxy sent 7 bytes after its HTTP 200, before the TLS handshake began",
        ),
        (Mode.CLOSE, b"", EstConnectionError, 69, "closed the connection without a complete"),
        (Mode.RAW, b"HTTP/1.1 200 Conn", EstConnectionError, 69, "without a complete answer"),
    ],
)
def test_proxy_answers_that_cannot_be_used(
    start_server: StartServer,
    dev_pki: DevPki,
    sim: SimCard,
    mode: Mode,
    raw: bytes,
    error_type: type[Exception],
    code: int,
    words: str,
) -> None:
    with ConnectProxy(mode=mode, raw=raw) as proxy:
        error, elapsed = _refused(start_server, dev_pki, sim, proxy)
    assert type(error) is error_type, error
    assert exit_code_for(error) == code
    assert words in str(error)
    assert "CONNECT 127.0.0.1:" in str(error) and f"proxy 127.0.0.1:{proxy.port}" in str(error)
    assert elapsed < 5


@pytest.mark.parametrize("mode", [Mode.SILENT, Mode.DRIBBLE])
def test_the_request_deadline_covers_the_connect(
    start_server: StartServer, dev_pki: DevPki, sim: SimCard, mode: Mode
) -> None:
    with ConnectProxy(mode=mode) as proxy:
        error, elapsed = _refused(start_server, dev_pki, sim, proxy, timeout_s=1.0)
    assert isinstance(error, EstConnectionError)
    assert exit_code_for(error) == 69
    assert "request not complete in 1 s (CONNECT 127.0.0.1:" in str(error)
    assert 0.9 < elapsed < 2.0


def test_proxy_not_listening(start_server: StartServer, dev_pki: DevPki, sim: SimCard) -> None:
    with ConnectProxy() as proxy:
        pass  # its port is free now: nothing listens there
    error, elapsed = _refused(start_server, dev_pki, sim, proxy)
    assert isinstance(error, EstConnectionError)
    assert str(error).endswith(
        f"connect to proxy 127.0.0.1:{proxy.port} (est.proxy): Connection refused"
    )
    assert elapsed < 2


def test_a_proxy_needs_the_clients_own_transport(dev_pki: DevPki) -> None:
    import httpx

    with pytest.raises(EstError, match="a proxy needs the client's own TLS transport"):
        EstClient(
            "https://127.0.0.1:1",
            trust_anchors=[dev_pki.tls_ca_certificate],
            proxy=HttpsProxy("127.0.0.1", 1),
            transport=httpx.MockTransport(lambda request: httpx.Response(200)),
        )

