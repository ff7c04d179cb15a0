"""`est-agent enroll` against servers that authenticate as Cisco libest does (issue 11, items 3
and 4): the real CLI in process, keys in the virtual SIM, the test server on 127.0.0.1 with
TLS 1.2 and the connection closed after every non-200 answer without `Connection: close`.
Each case checks the exit code, what the server answered (request counts) and the wall time.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import pytest

from est_agent.testserver import DevPki, EstTestServer
from est_agent.testserver.config import AuthMode, CloseAfter, HttpScheme, TlsMax
from tests.conftest import Run
from tests.est.hostile import Answer, HostileServer, Request, http_response
from tests.est.oddcerts import certs_only
from tests.workflow.conftest import Device

pytestmark = pytest.mark.integration

StartServer = Callable[..., EstTestServer]
PASSWORD = "s3cret-Pa55"
#: one enrollment on 127.0.0.1: two handshakes at most, card signatures, key generation
BOUND_S = 20.0


def _libest(start_server: StartServer, **settings: object) -> EstTestServer:
    settings.setdefault("close_after", CloseAfter.NON_200)
    return start_server(
        tls_max=TlsMax.TLS1_2, auth=AuthMode.CERT_AND_BASIC, basic=("dev", PASSWORD), **settings
    )


class _Url:
    """What Device.write_config reads from a server: its EST URL."""

    def __init__(self, url: str) -> None:
        self.url = url


def _configure(
    device: Device,
    url: str,
    dev_pki: DevPki,
    monkeypatch: pytest.MonkeyPatch,
    password: str = PASSWORD,
    **extra: str,
) -> None:
    monkeypatch.setenv("EST_TEST_PASSWORD", password)  # the password never on a command line
    device.write_config(
        _Url(url),  # type: ignore[arg-type]
        dev_pki,
        est__basic_username='"dev"',
        est__basic_password_env='"EST_TEST_PASSWORD"',
        **extra,
    )


def _enroll(cli: Run, device: Device) -> tuple[int, str, str, float]:
    started = time.monotonic()
    code, out, err = cli("enroll", "--config", str(device.config), "--json")
    return code, out, err, time.monotonic() - started


def _posts(server: EstTestServer) -> list[tuple[int, str | None]]:
    return [(r.status, r.authorization) for r in server.requests if r.method == "POST"]


def test_basic_enrolls_first_time(
    device: Device,
    start_server: StartServer,
    dev_pki: DevPki,
    cli: Run,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = _libest(start_server)
    _configure(device, server.url, dev_pki, monkeypatch)
    code, out, err, elapsed = _enroll(cli, device)
    assert code == 0, err
    assert json.loads(out)["outcome"] == "enrolled"
    assert elapsed < BOUND_S
    assert _posts(server) == [(200, "basic")]
    assert PASSWORD not in err


def test_wrong_basic_password_exits_77_after_one_request(
    device: Device,
    start_server: StartServer,
    dev_pki: DevPki,
    cli: Run,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = _libest(start_server)
    _configure(device, server.url, dev_pki, monkeypatch, password="not-the-one")
    code, _, err, elapsed = _enroll(cli, device)
    assert code == 77, err
    assert elapsed < BOUND_S
    assert "refused the HTTP Basic credentials" in err and "[AuthError]" in err
    assert "not-the-one" not in err and "Traceback" not in err
    assert _posts(server) == [(401, "basic")]


@pytest.mark.parametrize("pop", ["auto", "tls-unique"])
def test_digest_enrolls_across_the_close_after_401(
    device: Device,
    start_server: StartServer,
    dev_pki: DevPki,
    cli: Run,
    monkeypatch: pytest.MonkeyPatch,
    pop: str,
) -> None:
    # libest -h: Digest (MD5, its challenge form); with tls-unique the CSR is bound to the
    # connection and the server checks it: the CSR for the first connection is signed again.
    server = _libest(start_server, http_scheme=HttpScheme.DIGEST, pop_required=pop != "auto")
    _configure(device, server.url, dev_pki, monkeypatch, est__pop=f'"{pop}"')
    code, out, err, elapsed = _enroll(cli, device)
    assert code == 0, err
    assert json.loads(out)["outcome"] == "enrolled"
    assert elapsed < BOUND_S
    seen = [
        (r.path.rsplit("/", 1)[1], r.status, r.authorization, r.connection) for r in server.requests
    ]
    # /csrattrs has nothing (204) and the connection closes; the POST draws the challenge
    # and the connection closes again; the answer goes on a third one. A bound CSR needs its
    # connection up first (/cacerts) and is signed for each: twice.
    bound = pop == "tls-unique"
    assert seen == [
        ("cacerts", 200, "basic", 1),
        ("csrattrs", 204, "basic", 1),
        *([("cacerts", 200, "basic", 2)] if bound else []),
        ("simpleenroll", 401, "basic", 2),
        *([("cacerts", 200, "digest", 3)] if bound else []),
        ("simpleenroll", 200, "digest", 3),
    ]


def test_digest_only_setting_with_wrong_password_exits_77(
    device: Device,
    start_server: StartServer,
    dev_pki: DevPki,
    cli: Run,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = _libest(start_server, http_scheme=HttpScheme.DIGEST)
    _configure(device, server.url, dev_pki, monkeypatch, password="nope", est__http_auth='"digest"')
    code, _, err, elapsed = _enroll(cli, device)
    assert code == 77, err
    assert elapsed < BOUND_S
    assert "refused the HTTP Digest credentials" in err
    assert _posts(server) == [(401, None), (401, "digest")]
    assert {r.authorization for r in server.requests} <= {None, "digest"}  # never Basic


def test_basic_only_setting_against_digest_exits_77_naming_the_setting(
    device: Device,
    start_server: StartServer,
    dev_pki: DevPki,
    cli: Run,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = _libest(start_server, http_scheme=HttpScheme.DIGEST)
    _configure(device, server.url, dev_pki, monkeypatch, est__http_auth='"basic"')
    code, _, err, elapsed = _enroll(cli, device)
    assert code == 77, err
    assert elapsed < BOUND_S
    assert 'asks for HTTP Digest, which est.http_auth = "basic" does not answer' in err
    assert _posts(server) == [(401, "basic")]


def test_a_scheme_not_spoken_exits_77_naming_it(
    device: Device, dev_pki: DevPki, cli: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    def answer(request: Request) -> Answer:
        if request.path.endswith("/cacerts"):
            body = certs_only(dev_pki.est_ca.certificate)
            return Answer(http_response(200, body, {"Content-Type": "application/pkcs7-mime"}))
        if request.path.endswith("/csrattrs"):
            return Answer(http_response(204))
        return Answer(http_response(401, b"", {"WWW-Authenticate": 'Bearer realm="est"'}))

    with HostileServer(dev_pki, answer) as server:
        _configure(device, f"{server.url}/.well-known/est", dev_pki, monkeypatch)
        code, _, err, elapsed = _enroll(cli, device)
        posts = [r for r in server.requests if r.method == "POST"]
    assert code == 77, err
    assert elapsed < BOUND_S
    assert "asks for HTTP authentication by Bearer, which this agent does not speak" in err
    assert len(posts) == 1
