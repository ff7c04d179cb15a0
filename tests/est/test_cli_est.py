"""`est-agent cacerts` / `est-agent csrattrs` against the test EST server on 127.0.0.1."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from est_agent.cli.main import main
from est_agent.testserver import DevPki, EstTestServer, ServerCertCa
from est_agent.testserver.wire import CsrAttrsKind

pytestmark = pytest.mark.integration

StartServer = Callable[..., EstTestServer]


def _args(server: EstTestServer, pki: DevPki, *extra: str) -> list[str]:
    return [
        "--server",
        server.url.removesuffix("/.well-known/est"),
        "--trust-anchor",
        str(pki.directory / "tls-ca.pem"),
        *extra,
    ]


def test_cacerts_prints_pem_bundle(
    start_server: StartServer, dev_pki: DevPki, capsys: pytest.CaptureFixture[str]
) -> None:
    server = start_server()
    assert main(["cacerts", *_args(server, dev_pki)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# anchor: CN=est-agent dev EST CA")
    assert x509.load_pem_x509_certificates(out.encode()) == [dev_pki.est_ca.certificate]


def test_cacerts_json_with_label(
    start_server: StartServer, dev_pki: DevPki, capsys: pytest.CaptureFixture[str]
) -> None:
    from est_agent.testserver.issuer import Profile

    server = start_server(labels={"iot": Profile(validity_s=60)})
    assert main(["cacerts", *_args(server, dev_pki, "--label", "iot", "--json")]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["label"] == "iot"
    (cert,) = data["certificates"]
    assert cert["role"] == "anchor"
    assert cert["subject"] == dev_pki.est_ca.certificate.subject.rfc4514_string()


def test_cacerts_untrusted_server_exit_76(
    start_server: StartServer, dev_pki: DevPki, capsys: pytest.CaptureFixture[str]
) -> None:
    server = start_server()
    argv = [
        "cacerts",
        "--server",
        server.url.removesuffix("/.well-known/est"),
        "--trust-anchor",
        str(dev_pki.directory / "ca.pem"),  # the EST CA did not sign the TLS certificate
    ]
    assert main(argv) == 76
    assert "TlsVerificationError" in capsys.readouterr().err


def test_csrattrs_none_and_pop(
    start_server: StartServer, dev_pki: DevPki, capsys: pytest.CaptureFixture[str]
) -> None:
    plain = start_server()
    assert main(["csrattrs", *_args(plain, dev_pki)]) == 0
    assert "asks for nothing" in capsys.readouterr().out
    pop = start_server(csrattrs=CsrAttrsKind.CHALLENGE_PASSWORD)
    assert main(["csrattrs", *_args(pop, dev_pki, "--json")]) == 0
    assert json.loads(capsys.readouterr().out)["requested"]["challenge_password"] is True


def test_csrattrs_shows_libest_default_body(
    start_server: StartServer, dev_pki: DevPki, capsys: pytest.CaptureFixture[str]
) -> None:
    # libest's answer ends in a NUL its Content-Length counts: it used to be refused (76).
    server = start_server(csrattrs=CsrAttrsKind.LIBEST_DEFAULT)
    started = time.monotonic()
    assert main(["csrattrs", *_args(server, dev_pki, "--json")]) == 0
    assert time.monotonic() - started < 10
    requested = json.loads(capsys.readouterr().out)["requested"]
    assert requested["oids"] == [
        "1.3.6.1.1.1.1.22",  # macAddress
        "1.2.840.113549.1.9.1",  # emailAddress
        "1.3.132.0.34",  # secp384r1
        "2.16.840.1.101.3.4.2.2",  # sha384
    ]
    assert requested["hash_oids"] == ["2.16.840.1.101.3.4.2.2"]
    assert requested["key_algorithms"] == {"1.2.840.10045.2.1": ["1.3.132.0.34"]}
    assert requested["challenge_password"] is False


def test_cacerts_console_script(start_server: StartServer, dev_pki: DevPki) -> None:
    server = start_server()
    done = subprocess.run(
        [sys.executable, "-m", "est_agent", "cacerts", *_args(server, dev_pki), "--json"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["certificates"][0]["role"] == "anchor"


def test_http_server_url_is_a_data_error(dev_pki: DevPki) -> None:
    argv = ["cacerts", "--server", "http://127.0.0.1:1", "--trust-anchor"]
    assert main([*argv, str(dev_pki.directory / "tls-ca.pem")]) == 65


# --- cacerts --fingerprint: the provisional bootstrap (RFC 7030 §4.1.1) -----------------------


def _fingerprint_args(server: EstTestServer, pin: str, *extra: str) -> list[str]:
    return ["cacerts", "--server", server.url.removesuffix("/.well-known/est"), "--fingerprint",
            pin, *extra]  # fmt: skip


def test_cacerts_fingerprint_prints_the_matched_root(
    start_server: StartServer, dev_pki: DevPki, capsys: pytest.CaptureFixture[str]
) -> None:
    server = start_server(server_cert_ca=ServerCertCa.EST_CA)
    root = dev_pki.est_ca.certificate
    pin = root.fingerprint(hashes.SHA256()).hex(":")
    started = time.monotonic()
    assert main(_fingerprint_args(server, pin)) == 0
    assert time.monotonic() - started < 10
    out = capsys.readouterr().out
    assert out.startswith("# anchor: CN=est-agent dev EST CA")
    assert x509.load_pem_x509_certificates(out.encode()) == [root]
    assert [(r.method, r.client_certificate) for r in server.requests] == [("GET", None)]
    assert main([*_fingerprint_args(server, pin.replace(":", "")), "--json"]) == 0
    (described,) = json.loads(capsys.readouterr().out)["certificates"]
    assert (described["role"], described["sha256"]) == ("anchor", pin.replace(":", ""))


def test_cacerts_fingerprint_refusals_are_76(
    start_server: StartServer, dev_pki: DevPki, capsys: pytest.CaptureFixture[str]
) -> None:
    pin = dev_pki.est_ca.certificate.fingerprint(hashes.SHA256()).hex()
    # the TLS server's certificate comes from the dev TLS CA, not from the pinned root
    plain = start_server()
    assert main(_fingerprint_args(plain, pin)) == 76
    err = capsys.readouterr().err
    assert "TlsVerificationError" in err and "does not chain to the /cacerts root" in err
    # a pin no root of /cacerts has
    server = start_server(server_cert_ca=ServerCertCa.EST_CA)
    assert main(_fingerprint_args(server, "ab" * 32)) == 76
    err = capsys.readouterr().err
    assert "EstResponseError" in err and "ab" * 32 in err and pin in err


def test_cacerts_needs_exactly_one_of_trust_anchor_and_fingerprint(
    dev_pki: DevPki, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["cacerts", "--server", "https://127.0.0.1:1"]
    assert main(base) == 64
    anchor = ["--trust-anchor", str(dev_pki.directory / "tls-ca.pem")]
    assert main([*base, *anchor, "--fingerprint", "00" * 32]) == 64
    assert main([*base, "--fingerprint", "00" * 31]) == 64
    assert "32 bytes, got 31" in capsys.readouterr().err
    assert main([*base, "--fingerprint", "xyz"]) == 64


# --- through an HTTP CONNECT proxy (RFC 9110 §9.3.6) --------------------------------------


def _authority(server: EstTestServer) -> str:
    return server.url.removeprefix("https://").split("/", 1)[0]


def test_cacerts_and_csrattrs_through_a_proxy(
    start_server: StartServer, dev_pki: DevPki, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.connect_proxy import ConnectProxy

    server = start_server(csrattrs=CsrAttrsKind.P256)
    with ConnectProxy() as proxy:
        started = time.monotonic()
        assert main(["cacerts", *_args(server, dev_pki, "--proxy", proxy.url)]) == 0
        assert main(["csrattrs", *_args(server, dev_pki, "--proxy", proxy.url)]) == 0
        assert time.monotonic() - started < 20
    out = capsys.readouterr().out
    assert out.startswith("# anchor: CN=est-agent dev EST CA")
    assert dev_pki.est_ca.certificate in x509.load_pem_x509_certificates(out.encode())
    assert [t.target for t in proxy.tunnels] == [_authority(server)] * 2
    for tunnel in proxy.tunnels:
        assert b"/.well-known/est" not in tunnel.relayed  # TLS end to end: ciphertext only
        assert "proxy-authorization" not in tunnel.headers


def test_proxy_env_and_no_proxy(
    start_server: StartServer,
    dev_pki: DevPki,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tests.connect_proxy import ConnectProxy

    server = start_server()
    for name in ("https_proxy", "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    with ConnectProxy(credentials=("ops", "pr0xy-pw")) as proxy:
        host_port = proxy.url.removeprefix("http://")
        monkeypatch.setenv("HTTPS_PROXY", f"ops:pr0xy-pw@{host_port}")
        assert main(["cacerts", *_args(server, dev_pki, "--proxy", "env")]) == 0
        assert len(proxy.tunnels) == 1 and proxy.tunnels[0].status == 200
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        assert main(["cacerts", *_args(server, dev_pki, "--proxy", "env")]) == 0
        assert len(proxy.tunnels) == 1  # excluded: connected directly
    assert "pr0xy-pw" not in capsys.readouterr().err


def test_proxy_password_from_the_environment_and_refusals(
    start_server: StartServer,
    dev_pki: DevPki,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tests.connect_proxy import ConnectProxy

    server = start_server()
    with ConnectProxy(credentials=("ops", "pr0xy-pw")) as proxy:
        user_url = proxy.url.replace("http://", "http://ops@")
        monkeypatch.setenv("PROXY_PW", "pr0xy-pw")
        monkeypatch.delenv("UNSET_VAR", raising=False)
        argv = _args(server, dev_pki, "--proxy", user_url, "--proxy-password-env", "PROXY_PW")
        assert main(["cacerts", *argv]) == 0
        assert [t.status for t in proxy.tunnels] == [200]
        capsys.readouterr()

        # a wrong password: the proxy's 407 is 77, not retried, the password never shown
        monkeypatch.setenv("PROXY_PW", "wrong-pw")
        assert main(["cacerts", *argv]) == 77
        err = capsys.readouterr().err
        assert "AuthError" in err and "wrong-pw" not in err
        assert [t.status for t in proxy.tunnels] == [200, 407]

        for bad, said in (
            (["--proxy", proxy.url.replace("http://", "http://ops:pw@")], "password in the URL"),
            (["--proxy", user_url], "without a password"),
            (["--proxy", proxy.url, "--proxy-password-env", "PROXY_PW"], "needs a user"),
            (["--proxy", user_url, "--proxy-password-env", "UNSET_VAR"], "is not set"),
        ):
            assert main(["cacerts", *_args(server, dev_pki, *bad)]) == 64
            assert said in capsys.readouterr().err
        assert len(proxy.tunnels) == 2  # no refused command reached the proxy
