"""`est-agent enroll` through an HTTP CONNECT proxy (tests/connect_proxy.py), keys in the SIM.

The full run (card, TLS with the card's signature, /cacerts, CSR with tls-unique PoP, Basic,
install on the SIM) goes through the tunnel; the proxy's recording shows the CONNECT head and
ciphertext only. ``est.proxy = "env"`` follows HTTPS_PROXY and NO_PROXY; a refusing proxy
ends the run with the documented exit code before anything reaches the EST server.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable

import pytest
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from est_agent.testserver import DevPki, EstTestServer
from est_agent.testserver.config import AuthMode, TlsMax
from tests.conftest import Run
from tests.connect_proxy import ConnectProxy, Mode
from tests.workflow.conftest import Device
from tests.workflow.test_enroll_renew import certificate_on_sim

pytestmark = pytest.mark.integration

StartServer = Callable[..., EstTestServer]
BASIC = ("dev", "s3cret")
PROXY_USER, PROXY_PASSWORD = "proxy-user", "pr0xy-Pa55"


def issued(server: EstTestServer) -> list[str]:
    log = server.config.issuance_log
    if log is None or not log.exists():
        return []
    return [json.loads(line)["operation"] for line in log.read_text().splitlines()]


def configure(
    device: Device, server: EstTestServer, dev_pki: DevPki, proxy: str, **extra: str
) -> None:
    (device.root / "basic-pw").write_text(BASIC[1] + "\n")
    (device.root / "proxy-pw").write_text(PROXY_PASSWORD + "\n")
    device.write_config(
        server,
        dev_pki,
        est__proxy=f'"{proxy}"',
        est__basic_username=f'"{BASIC[0]}"',
        est__basic_password_file=f'"{device.root / "basic-pw"}"',
        **extra,
    )


def test_enroll_through_the_proxy_with_tls_unique_pop(
    device: Device, start_server: StartServer, dev_pki: DevPki, cli: Run
) -> None:
    server = start_server(
        tls_max=TlsMax.TLS1_2, pop_required=True, auth=AuthMode.CERT_AND_BASIC, basic=BASIC
    )
    with ConnectProxy(credentials=(PROXY_USER, PROXY_PASSWORD)) as proxy:
        configure(
            device,
            server,
            dev_pki,
            f"http://{PROXY_USER}@127.0.0.1:{proxy.port}",
            est__proxy_password_file=f'"{device.root / "proxy-pw"}"',
            est__pop='"tls-unique"',
        )
        started = time.monotonic()
        code, out, err = cli("enroll", "--config", str(device.config), "--json")
        elapsed = time.monotonic() - started
    assert code == 0, err
    assert json.loads(out)["outcome"] == "enrolled"
    assert elapsed < 30
    # The server checked challengePassword = base64(tls-unique) of its own side of the TLS
    # session: the session ran end to end through the tunnel.
    assert issued(server) == ["simpleenroll"]
    cert = certificate_on_sim(device.sim, "op-a")
    assert proxy.tunnels and all(t.status == 200 for t in proxy.tunnels)
    token = base64.b64encode(f"{PROXY_USER}:{PROXY_PASSWORD}".encode()).decode()
    secrets = [
        BASIC[1].encode(),
        base64.b64encode(":".join(BASIC).encode()),
        cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo),
        cert.public_bytes(Encoding.DER),
    ]
    for tunnel in proxy.tunnels:
        assert tunnel.head == (
            f"CONNECT 127.0.0.1:{server.port} HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
            f"Proxy-Authorization: Basic {token}\r\n\r\n"
        ).encode()
        assert tunnel.upstream[:1] == b"\x16" and tunnel.downstream[:1] == b"\x16"
        seen = tunnel.relayed
        for readable in (b"/.well-known/est", b"simpleenroll", b"Authorization", b"POST /"):
            assert readable not in seen
        for secret in secrets:
            assert secret not in seen and base64.b64encode(secret) not in seen
    assert PROXY_PASSWORD not in err + out and token not in err + out


@pytest.mark.parametrize(
    ("proxy_setting", "no_proxy", "tunnelled"),
    [
        ("env", None, True),
        ("env", "127.0.0.1", False),
        ("env", "example.net, 127.0.0.0/8", False),
        ("env", "127.0.0.1:{port}", False),
        ("env", "127.0.0.1:1", True),  # another port
        ("env", "localhost", True),  # names are not resolved
        ("env", "*", False),
        ("", None, False),  # the default ignores HTTPS_PROXY
    ],
)
def test_env_mode_follows_https_proxy_and_no_proxy(
    device: Device,
    start_server: StartServer,
    dev_pki: DevPki,
    cli: Run,
    monkeypatch: pytest.MonkeyPatch,
    proxy_setting: str,
    no_proxy: str | None,
    tunnelled: bool,
) -> None:
    server = start_server(auth=AuthMode.CERT_AND_BASIC, basic=BASIC)
    for name in ("https_proxy", "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    with ConnectProxy() as proxy:
        monkeypatch.setenv("HTTPS_PROXY", f"127.0.0.1:{proxy.port}")  # curl's scheme-less form
        if no_proxy is not None:
            monkeypatch.setenv("NO_PROXY", no_proxy.format(port=server.port))
        configure(device, server, dev_pki, proxy_setting)
        code, _, err = cli("enroll", "--config", str(device.config))
    assert code == 0, err
    assert issued(server) == ["simpleenroll"]
    if tunnelled:
        assert proxy.tunnels and all(
            t.target == f"127.0.0.1:{server.port}" and t.upstream[:1] == b"\x16"
            for t in proxy.tunnels
        )
    else:
        assert proxy.connections == 0


@pytest.mark.parametrize(
    ("proxy_kind", "code", "words"),
    [
        ("no-credentials", 77, "asks for credentials"),
        ("wrong-password", 77, f"refused the credentials of user '{PROXY_USER}'"),
        ("refuses", 69, "refused the tunnel to 127.0.0.1:"),
        ("garbage", 76, "the proxy's answer is not HTTP"),
    ],
)
def test_a_refusing_proxy_ends_the_run(
    device: Device,
    start_server: StartServer,
    dev_pki: DevPki,
    cli: Run,
    proxy_kind: str,
    code: int,
    words: str,
) -> None:
    server = start_server(auth=AuthMode.CERT_AND_BASIC, basic=BASIC)
    mode = {"refuses": Mode.REFUSE, "garbage": Mode.RAW}.get(proxy_kind, Mode.RELAY)
    with ConnectProxy(
        mode=mode, credentials=(PROXY_USER, PROXY_PASSWORD), raw=b"SSH-2.0-x\r\n\r\n"
    ) as proxy:
        url = f"http://127.0.0.1:{proxy.port}"
        extra = {"renewal__retry_cap_s": "1"}  # the 69 case retries: short waits
        if proxy_kind != "no-credentials":
            url = f"http://{PROXY_USER}@127.0.0.1:{proxy.port}"
            (device.root / "wrong-pw").write_text("not-it\n")
            password = "wrong-pw" if proxy_kind == "wrong-password" else "proxy-pw"
            extra["est__proxy_password_file"] = f'"{device.root / password}"'
        configure(device, server, dev_pki, url, **extra)
        started = time.monotonic()
        exit_code, _, err = cli("enroll", "--config", str(device.config))
        elapsed = time.monotonic() - started
    assert exit_code == code, err
    assert words in err and f"proxy 127.0.0.1:{proxy.port} (est.proxy)" in err
    assert elapsed < 10
    assert issued(server) == []
    # the proxy relayed nothing: no TLS with the server, so no card signature, no EST bytes
    assert proxy.tunnels and all(not t.upstream and not t.downstream for t in proxy.tunnels)
    assert all(BASIC[1].encode() not in t.head for t in proxy.tunnels)
    assert "not-it" not in err and PROXY_PASSWORD not in err
    if code == 77:
        assert proxy.connections == 1  # not retried


def test_an_unusable_https_proxy_variable_is_a_config_error(
    device: Device,
    start_server: StartServer,
    dev_pki: DevPki,
    cli: Run,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = start_server()
    for name in ("https_proxy", "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTPS_PROXY", "socks5://u:hunter2@127.0.0.1:1080")
    device.write_config(server, dev_pki, est__proxy='"env"')
    code, _, err = cli("enroll", "--config", str(device.config))
    assert code == 78, err
    assert "HTTPS_PROXY: proxy URL 'socks5://u:[REDACTED]@127.0.0.1:1080'" in err
    assert "hunter2" not in err
    assert issued(server) == []
