"""EstClient and `est-agent cacerts` against servers that misbehave as servers in the field did.

Each case is an issue report: a hostile HTTPS server (tests/est/hostile.py, real TLS on
127.0.0.1) or the test EST server with a fault switch plays the server; the client must answer
with a typed error and the exit code of its class, within a bounded time (and, for the
content-coding bomb, a bounded peak RSS measured on a child process), or succeed where RFC 9112
says it must.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from est_agent.cli.main import main
from est_agent.errors import (
    EnrollmentPending,
    EstConnectionError,
    EstRejectedError,
    EstResponseError,
)
from est_agent.est.client import EstClient, RetryPolicy
from est_agent.est.messages import challenge_password_value
from est_agent.est.tls import ChannelBinding
from est_agent.testserver import DevPki, EstTestServer
from est_agent.testserver.config import Fault, TlsMax
from tests.est.card_helpers import OP_KEY_A, SimCard, build_csr
from tests.est.hostile import Answer, HostileServer, Request, gzip_gzip_bomb, http_response
from tests.est.oddcerts import (
    OID_PRIME192V2,
    OID_SECP192R1,
    certs_only,
    issue,
    with_curve_oid,
    with_duplicate_extension,
)

pytestmark = pytest.mark.integration

StartServer = Callable[..., EstTestServer]
PKCS7 = {"Content-Type": "application/pkcs7-mime"}
TOKEN = "ZGV2OnMzY3JldA=="  # base64("dev:s3cret"), RFC 7617 §2
REPO = Path(__file__).resolve().parents[2]


def _no_sleep(seconds: float) -> None:
    pass


def _cli(pki: DevPki, server: HostileServer, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """`est-agent cacerts` against `server` in this process: exit status and stderr."""
    argv = ["cacerts", "--server", server.url, "--trust-anchor", str(pki.directory / "tls-ca.pem")]
    code = main([*argv, "--attempts", "2", "--timeout", "5"])
    return code, capsys.readouterr().err


def _cacerts(pki: DevPki, *extra: x509.Certificate) -> bytes:
    return http_response(200, certs_only(pki.est_ca.certificate, *extra), PKCS7)


def _issuing(
    pki: DevPki, mangle: Callable[[x509.Certificate], list[x509.Certificate]]
) -> Callable[[Request], Answer]:
    """A server that answers /cacerts, and each POST with a certificate for the CSR's key
    issued by the dev EST CA and passed through `mangle`."""
    ca = pki.est_ca

    def answer(request: Request) -> Answer:
        if request.method == "GET":
            return Answer(_cacerts(pki), keep=True)
        csr = x509.load_der_x509_csr(base64.b64decode(request.body))
        key = csr.public_key()
        assert isinstance(key, ec.EllipticCurvePublicKey)
        body = certs_only(*mangle(issue(ca.certificate, ca.key, key)))
        return Answer(http_response(200, body, PKCS7), keep=True)

    return answer


def _client(pki: DevPki, server: HostileServer, **options: object) -> EstClient:
    options.setdefault("retry", RetryPolicy(attempts=2, sleep=_no_sleep))
    options.setdefault("timeout_s", 5.0)
    return EstClient(server.url, trust_anchors=[pki.tls_ca_certificate], **options)  # type: ignore[arg-type]


DEVICE = ec.generate_private_key(ec.SECP256R1())


def _device_csr(_binding: ChannelBinding | None) -> bytes:
    from est_agent.backends.signer import SoftwareSigner

    return build_csr(SoftwareSigner(DEVICE))


# -- 1. a password echoed in an error body -----------------------------------------------------


@pytest.mark.parametrize(("status", "error"), [(400, EstRejectedError), (500, EstConnectionError)])
def test_echoed_password_is_masked(dev_pki: DevPki, status: int, error: type[Exception]) -> None:
    def answer(request: Request) -> Answer:
        if "authorization" not in request.headers:
            challenge = {"WWW-Authenticate": 'Basic realm="est"'}
            return Answer(http_response(401, b"who?", challenge), keep=True)
        echo = b"you sent: password=s3cret\r\n" + request.head
        headers = {"Content-Type": "text/plain", "Connection": "close"}
        return Answer(http_response(status, echo, headers))

    started = time.monotonic()
    with HostileServer(dev_pki, answer) as server:
        client = _client(dev_pki, server, basic_auth=("dev", "s3cret"))
        with client, pytest.raises(error) as info:
            client.cacerts()
        sent = [r.headers.get("authorization") for r in server.requests]
    assert time.monotonic() - started < 10
    assert f"Basic {TOKEN}" in sent  # the server really got (and echoed) the credentials
    message = str(info.value)
    assert f"HTTP {status}" in message and "[REDACTED]" in message
    for leaked in ("s3cret", TOKEN, TOKEN.rstrip("=")):
        assert leaked not in message
    assert "you sent: password=[REDACTED]" in message
    # what `est-agent -v` logs with the error: the traceback, chained causes included
    logged = "".join(traceback.format_exception(info.value))
    assert "[REDACTED]" in logged
    for leaked in ("s3cret", TOKEN.rstrip("=")):
        assert leaked not in logged


# -- 2. a Content-Encoding bomb ----------------------------------------------------------------

# The child: limit its address space (so that a regression dies with MemoryError instead of
# taking the machine's memory), run the `est-agent` console script's module, and on the way out
# write its peak RSS. That is VmHWM of its own address space (proc(5)): getrusage's ru_maxrss,
# in the child or from wait4, also counts the copy of the parent (pytest, 70+ MiB late in a
# run) that the child was before exec, since Linux carries maxrss across execve.
_CHILD = """
import resource, runpy, sys
limit, report = int(sys.argv[1]), sys.argv[2]
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
sys.argv = ["est-agent", *sys.argv[3:]]
try:
    runpy.run_module("est_agent", run_name="__main__", alter_sys=True)
finally:
    with open("/proc/self/status") as status, open(report, "w") as out:
        out.write(next(line for line in status if line.startswith("VmHWM:")).split()[1])
"""


def _run_agent_child(*argv: str) -> tuple[int, int, str, float]:
    """`est-agent ARGV` in a child: exit status, peak RSS (KiB), stderr, seconds."""
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "vmhwm"
        started = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-c", _CHILD, str(1 << 30), str(report), *argv],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": path},
            timeout=60,
            check=False,
        )
        elapsed = time.monotonic() - started
        return done.returncode, int(report.read_text()), done.stderr.decode(), elapsed


def test_gzip_gzip_bomb_is_refused_with_small_rss(dev_pki: DevPki) -> None:
    bomb = gzip_gzip_bomb()  # 4 GiB of zeros, gzip of gzip: a few KB
    headers = {**PKCS7, "Content-Encoding": "gzip, gzip"}
    anchor = str(dev_pki.directory / "tls-ca.pem")
    results = {}
    for name, reply in (("plain", _cacerts(dev_pki)), ("bomb", http_response(200, bomb, headers))):
        with HostileServer(dev_pki, lambda _r, reply=reply: Answer(reply)) as server:
            argv = ("cacerts", "--server", server.url, "--trust-anchor", anchor, "--attempts", "1")
            results[name] = _run_agent_child(*argv)
    plain_code, plain_kib, _, _ = results["plain"]
    code, peak_kib, stderr, elapsed = results["bomb"]
    print(f"peak RSS: {peak_kib / 1024:.1f} MiB (plain /cacerts: {plain_kib / 1024:.1f} MiB)")
    assert plain_code == 0
    assert code == 76, stderr
    assert "exceeds the 1048576 byte cap [EstResponseError]" in stderr
    assert "Traceback" not in stderr
    assert peak_kib < 64 * 1024
    assert peak_kib < plain_kib + 8 * 1024  # the bomb costs no more than a normal answer
    assert elapsed < 20


# -- 3. Retry-After inside a run -----------------------------------------------------------------


def test_long_retry_after_on_cacerts_is_pending_at_once(
    dev_pki: DevPki, capsys: pytest.CaptureFixture[str]
) -> None:
    busy = http_response(503, b"busy", {"Retry-After": "300"})
    with HostileServer(dev_pki, lambda _r: Answer(busy)) as server:
        started = time.monotonic()
        code, stderr = _cli(dev_pki, server, capsys)  # real sleeps: nothing may wait
        elapsed = time.monotonic() - started
        with _client(dev_pki, server) as client, pytest.raises(EnrollmentPending) as info:
            client.cacerts()
    assert elapsed < 1.0
    assert code == 75
    assert "retry after 300 s" in stderr and "[EnrollmentPending]" in stderr
    assert info.value.retry_after_s == 300.0


def test_short_retry_after_is_waited_for(dev_pki: DevPki) -> None:
    answers = [http_response(503, b"busy", {"Retry-After": "2"}), _cacerts(dev_pki)]
    sleeps: list[float] = []
    with HostileServer(dev_pki, lambda _r: Answer(answers.pop(0))) as server:
        with _client(dev_pki, server, retry=RetryPolicy(sleep=sleeps.append)) as client:
            assert client.cacerts().anchor == dev_pki.est_ca.certificate
        assert len(server.requests) == 2
    assert len(sleeps) == 1 and sleeps[0] >= 2.0


# -- 4. Connection: close -------------------------------------------------------------------------

# TLS 1.2 here, as libest (which closes after many answers) speaks it. A retry may still happen
# on the card (tlslite) path: tlslite closes the socket when it meets close_notify, and reading
# on gives EBADF (a ReadError, est/tls/backend.py); the counts below hold whether or not one did.


def _card_client(
    server: EstTestServer, pki: DevPki, card: SimCard, sleeps: list[float], **options: object
) -> EstClient:
    return EstClient(
        server.url.removesuffix("/.well-known/est"),
        trust_anchors=[pki.tls_ca_certificate],
        client_cert_chain=[card.bootstrap_cert],
        signer=card.bootstrap,
        timeout_s=10.0,
        tls_max="1.2",
        retry=RetryPolicy(attempts=4, sleep=sleeps.append),
        **options,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize("fault", [Fault.CLOSE_AFTER_RESPONSE, Fault.DROP_AFTER_RESPONSE])
def test_unbound_csr_follows_a_closed_connection(
    start_server: StartServer, dev_pki: DevPki, sim: SimCard, fault: Fault
) -> None:
    # Every /cacerts answer is followed by a close; the CSR carries no binding, so its POST
    # opens a new connection: one CSR signature, not a refusal.
    server = start_server(
        tls_max=TlsMax.TLS1_2, fault=fault, fault_operations=frozenset({"cacerts"})
    )
    op_a = sim.new_key(OP_KEY_A)
    sleeps: list[float] = []
    started = time.monotonic()
    with _card_client(server, dev_pki, sim, sleeps) as client:
        assert client.cacerts().anchor == dev_pki.est_ca.certificate
        enrolled = client.simpleenroll(lambda _b: build_csr(op_a))
        assert client.transport is not None
        opened = client.transport.connections_opened
    assert time.monotonic() - started < 15
    assert enrolled.certificate.public_key() == op_a.public_key()
    assert op_a.signatures == 1  # the CSR, signed once (also across retries)
    # /cacerts, then the POST on a new connection (+1 per retried attempt)
    assert opened == 2 + len(sleeps)
    assert sim.bootstrap.signatures == opened  # one TLS handshake signature each


@pytest.mark.parametrize("fault", [Fault.CLOSE_AFTER_RESPONSE, Fault.DROP_AFTER_RESPONSE])
def test_bound_csr_is_signed_again_for_the_new_connection(
    start_server: StartServer, dev_pki: DevPki, sim: SimCard, fault: Fault
) -> None:
    # PoP (RFC 7030 §3.5): the first /cacerts connection closes; the CSR made for it is
    # useless on another one, so the client opens one and binds a new CSR to it.
    server = start_server(
        tls_max=TlsMax.TLS1_2,
        pop_required=True,
        fault=fault,
        fault_times=1,
        fault_operations=frozenset({"cacerts"}),
    )
    op_a = sim.new_key(OP_KEY_A)
    made_for: list[int] = []  # the connection each CSR was made on
    sleeps: list[float] = []

    def csr(binding: ChannelBinding | None) -> bytes:
        assert binding is not None and client.transport is not None
        made_for.append(client.transport.connections_opened)
        return build_csr(op_a, challenge_password=challenge_password_value(binding.value))

    started = time.monotonic()
    with _card_client(server, dev_pki, sim, sleeps) as client:
        enrolled = client.simpleenroll(csr)
        assert client.transport is not None
        opened = client.transport.connections_opened
    assert time.monotonic() - started < 15
    # the server checked the PoP: the CSR it got was bound to the connection that carried it
    assert enrolled.certificate.public_key() == op_a.public_key()
    assert enrolled.channel_binding is not None
    assert len(made_for) == len(set(made_for)) == op_a.signatures  # one CSR per connection
    assert made_for[-1] == opened
    if not sleeps:  # no attempt failed: the stale CSR for connection 1, then connection 2's
        assert made_for == [1, 2]
    assert sim.bootstrap.signatures == opened


def test_bound_csr_on_a_server_that_always_closes_fails_without_signing_in_vain(
    start_server: StartServer, dev_pki: DevPki, sim: SimCard
) -> None:
    # Every /cacerts answer closes the connection: a bound CSR can never be sent. After the
    # first (stale) CSR the client stops asking the card for CSRs it cannot send.
    server = start_server(
        tls_max=TlsMax.TLS1_2,
        pop_required=True,
        fault=Fault.CLOSE_AFTER_RESPONSE,
        fault_operations=frozenset({"cacerts"}),
    )
    op_a = sim.new_key(OP_KEY_A)
    sleeps: list[float] = []

    def csr(binding: ChannelBinding | None) -> bytes:
        assert binding is not None
        return build_csr(op_a, challenge_password=challenge_password_value(binding.value))

    started = time.monotonic()
    with (
        _card_client(server, dev_pki, sim, sleeps) as client,
        pytest.raises(EstConnectionError) as info,
    ):
        client.simpleenroll(csr)
    assert time.monotonic() - started < 15
    assert info.value.exit_code == 69 and len(sleeps) == 3  # all four attempts failed
    assert op_a.signatures <= 1  # at most the one made before the close was known
    log = server.config.issuance_log
    assert log is not None and log.read_text() == ""  # no CSR ever reached the server
    assert "closed the connection right after /cacerts" in str(info.value) or (
        "Bad file descriptor" in str(info.value)  # the tlslite read noted above
    )


def test_http10_server_closing_after_every_answer_still_enrolls(dev_pki: DevPki) -> None:
    # HTTP/1.0 without Content-Length: each body ends when the server closes (RFC 9112 §6.3),
    # so the POST needs a new connection; the unbound CSR is sent on it.
    def answer(request: Request) -> Answer:
        reply = _issuing(dev_pki, lambda leaf: [leaf])(request)
        head, _, body = bytes(reply.data).partition(b"\r\n\r\n")  # type: ignore[arg-type]
        head = head.replace(b"HTTP/1.1", b"HTTP/1.0")
        head = b"\r\n".join(h for h in head.split(b"\r\n") if not h.startswith(b"Content-Length"))
        return Answer(head + b"\r\n\r\n" + body)

    started = time.monotonic()
    with HostileServer(dev_pki, answer) as server, _client(dev_pki, server) as client:
        enrolled = client.simpleenroll(_device_csr)
        assert server.connections == 2
    assert time.monotonic() - started < 10
    assert enrolled.certificate.public_key() == DEVICE.public_key()


# -- 5. typed errors instead of tracebacks -----------------------------------------------------


def _p192_sub_ca(pki: DevPki) -> x509.Certificate:
    p192 = ec.generate_private_key(ec.SECP192R1()).public_key()
    return issue(pki.est_ca.certificate, pki.est_ca.key, p192, cn="P-192 sub CA", ca=True)


ODD_CACERTS: dict[str, tuple[Callable[[DevPki], x509.Certificate], str]] = {
    "p192": (_p192_sub_ca, "secp192r1, which is not an allowed curve"),
    "unknown-curve": (
        lambda pki: with_curve_oid(
            _p192_sub_ca(pki), pki.est_ca.key, OID_SECP192R1, OID_PRIME192V2
        ),
        "Curve 1.2.840.10045.3.1.2 is not supported",
    ),
    "duplicate-extension": (
        lambda pki: with_duplicate_extension(_p192_sub_ca(pki), pki.est_ca.key),
        "repeats the 2.5.29.14 extension",
    ),
}


@pytest.mark.parametrize("case", list(ODD_CACERTS))
def test_odd_certificate_in_cacerts_exits_76(
    dev_pki: DevPki, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    make, message = ODD_CACERTS[case]
    reply = _cacerts(dev_pki, make(dev_pki))
    started = time.monotonic()
    with HostileServer(dev_pki, lambda _r: Answer(reply)) as server:
        code, stderr = _cli(dev_pki, server, capsys)
    assert time.monotonic() - started < 5
    assert code == 76
    assert message in stderr and "[EstResponseError]" in stderr


ODD_ISSUED: dict[str, tuple[Callable[[DevPki, x509.Certificate], list[x509.Certificate]], str]] = {
    "p192-in-chain": (lambda pki, leaf: [leaf, _p192_sub_ca(pki)], "secp192r1"),
    "unknown-curve-in-chain": (
        lambda pki, leaf: [
            leaf,
            with_curve_oid(_p192_sub_ca(pki), pki.est_ca.key, OID_SECP192R1, OID_PRIME192V2),
        ],
        "is not supported",
    ),
    "duplicate-extension": (
        lambda pki, leaf: [with_duplicate_extension(leaf, pki.est_ca.key)],
        "repeats the 2.5.29.37 extension",
    ),
}


@pytest.mark.parametrize("case", list(ODD_ISSUED))
def test_odd_certificate_in_the_enroll_answer_is_a_response_error(
    dev_pki: DevPki, case: str
) -> None:
    mangle, message = ODD_ISSUED[case]
    started = time.monotonic()
    with (
        HostileServer(dev_pki, _issuing(dev_pki, lambda leaf: mangle(dev_pki, leaf))) as server,
        _client(dev_pki, server) as client,
        pytest.raises(EstResponseError, match=message) as info,
    ):
        client.simpleenroll(_device_csr)
    assert time.monotonic() - started < 5
    assert info.value.exit_code == 76


@pytest.mark.parametrize("port", ["99999", "84x3"])
def test_location_with_an_invalid_port_exits_76(
    dev_pki: DevPki, capsys: pytest.CaptureFixture[str], port: str
) -> None:
    location = {"Location": f"https://127.0.0.1:{port}/.well-known/est/cacerts"}
    with HostileServer(dev_pki, lambda _r: Answer(http_response(301, b"", location))) as server:
        code, stderr = _cli(dev_pki, server, capsys)
    assert code == 76, stderr
    assert "location" in stderr.lower() and "[EstResponseError]" in stderr


@pytest.mark.parametrize(
    ("path", "notify"), [("stdlib", True), ("stdlib", False), ("card", True)], ids=str
)
def test_http10_close_delimited_body_works(
    dev_pki: DevPki, sim: SimCard, path: str, notify: bool
) -> None:
    # "card": the tlslite path as production runs it (with a client key; this server does not
    # ask for a certificate, so nothing is signed).
    body = certs_only(dev_pki.est_ca.certificate)
    reply = http_response(200, body, PKCS7, version="HTTP/1.0", length=False)
    card = {"client_cert_chain": [sim.bootstrap_cert], "signer": sim.bootstrap}
    with (
        HostileServer(dev_pki, lambda _r: Answer(reply, notify=notify)) as server,
        _client(dev_pki, server, **(card if path == "card" else {})) as client,
    ):
        assert client.cacerts().anchor == dev_pki.est_ca.certificate


def test_http10_body_cut_short_exits_76(
    dev_pki: DevPki, capsys: pytest.CaptureFixture[str]
) -> None:
    body = certs_only(dev_pki.est_ca.certificate)
    reply = http_response(200, body[: len(body) // 2], PKCS7, version="HTTP/1.0", length=False)
    with HostileServer(dev_pki, lambda _r: Answer(reply)) as server:
        code, stderr = _cli(dev_pki, server, capsys)
    assert code == 76, stderr
    assert "[EstResponseError]" in stderr


# -- 6. no private class names in what the CLI prints ---------------------------------------------


def test_exhausted_retries_name_a_public_class(
    dev_pki: DevPki, capsys: pytest.CaptureFixture[str]
) -> None:
    failing = http_response(500, b"internal error", {"Content-Type": "text/plain"})
    started = time.monotonic()
    with HostileServer(dev_pki, lambda _r: Answer(failing)) as server:
        code, stderr = _cli(dev_pki, server, capsys)
        assert len(server.requests) == 2  # --attempts 2
    assert time.monotonic() - started < 5
    assert code == 69
    assert "HTTP 500: internal error [EstConnectionError]" in stderr
    assert "_TransientError" not in stderr
