"""Other software on the device uses the enrolled key through the same token: OpenSSL's pkcs11
engine (Debian libengine-pkcs11-openssl) signs the TLS handshake of ``openssl s_client`` with
the slot's key, presenting the certificate the agent enrolled, to ``openssl s_server -Verify 1``
(client certificate required and verified against the EST CA)."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from est_agent.testserver import DevPki, EstTestServer
from tests.conftest import Run
from tests.pkcs11.conftest import PIN, SOFTHSM_MODULE, TOKEN_LABEL, Token

pytestmark = pytest.mark.integration

ENGINE = Path("/usr/lib/x86_64-linux-gnu/engines-3/pkcs11.so")


def _server_identity(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "server.pem", directory / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_openssl_handshake_with_the_enrolled_token_key(
    token: Token,
    start_server: Callable[..., EstTestServer],
    dev_pki: DevPki,
    cli: Run,
    tmp_path: Path,
) -> None:
    if not ENGINE.exists():
        pytest.skip("libengine-pkcs11-openssl is not installed (scripts/bootstrap installs it)")
    server = start_server()
    token.write_config(server, dev_pki)
    code, out, err = cli("enroll", "--config", str(token.config), "--json")
    assert code == 0, err
    slot = json.loads(out)["slot"]
    device_pem = tmp_path / "device.pem"  # paths.export_pem: the certificate just enrolled
    est_ca = tmp_path / "est-ca.pem"
    est_ca.write_bytes(dev_pki.est_ca.certificate.public_bytes(serialization.Encoding.PEM))
    server_cert, server_key = _server_identity(tmp_path)
    conf = tmp_path / "openssl-pkcs11.cnf"
    conf.write_text(
        "openssl_conf = openssl_init\n[openssl_init]\nengines = engine_section\n"
        "[engine_section]\npkcs11 = pkcs11_section\n[pkcs11_section]\nengine_id = pkcs11\n"
        f"dynamic_path = {ENGINE}\nMODULE_PATH = {SOFTHSM_MODULE}\ninit = 0\n"
    )
    port = _free_port()
    s_server = subprocess.Popen(
        [
            "openssl", "s_server", "-accept", f"127.0.0.1:{port}", "-naccept", "1",
            "-cert", str(server_cert), "-key", str(server_key), "-CAfile", str(est_ca),
            "-Verify", "1", "-verify_return_error",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert s_server.stdout is not None
        banner = []
        while not banner or banner[-1].strip() != "ACCEPT":  # printed once it listens
            line = s_server.stdout.readline()
            assert line, f"openssl s_server did not start: {banner}"
            banner.append(line)
        key_uri = f"pkcs11:token={TOKEN_LABEL};object={slot};type=private;pin-value={PIN}"
        started = time.monotonic()
        client = subprocess.run(
            [
                "openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-engine", "pkcs11",
                "-keyform", "engine", "-key", key_uri, "-cert", str(device_pem),
                "-CAfile", str(server_cert), "-verify_return_error", "-no_ign_eof",
            ],
            input="Q\n",
            env={**token.env(), "OPENSSL_CONF": str(conf)},
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert time.monotonic() - started < 30
        assert client.returncode == 0, client.stdout + client.stderr
        assert "Verify return code: 0 (ok)" in client.stdout
    finally:
        try:
            output, _ = s_server.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            s_server.kill()  # this test's own child, by its handle
            output, _ = s_server.communicate()
    output = "".join(banner) + output
    assert "subject=CN = device-0001" in output, output
    assert "issuer=CN = est-agent dev EST CA" in output, output
    assert "Peer signature type: ECDSA" in output, output  # CertificateVerify by the token key
    device = x509.load_pem_x509_certificate(device_pem.read_bytes())
    assert device.subject.rfc4514_string() == "CN=device-0001"
