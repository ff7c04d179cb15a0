"""A test-local EST client (stdlib http.client + ssl) and CSR/key helpers.

Deliberately independent of est_agent's own EST client: the server is checked against this,
curl + openssl and strongSwan, never against the code it will later test.
"""

from __future__ import annotations

import base64
import http.client
import os
import signal
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import AttributeOID, NameOID

from est_agent.testserver.pki import DevPki, issue_bootstrap_certificate

EST = "/.well-known/est"


@dataclass
class Reply:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


def client_context(
    pki_dir: Path,
    cert: tuple[Path, Path] | None = None,
    *,
    max_version: ssl.TLSVersion | None = None,
    min_version: ssl.TLSVersion | None = None,
) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki_dir / "tls-ca.pem"))
    if cert is not None:
        ctx.load_cert_chain(str(cert[0]), str(cert[1]))
    if max_version is not None:
        ctx.maximum_version = max_version
    if min_version is not None:
        ctx.minimum_version = min_version
    return ctx


def connect(port: int, ctx: ssl.SSLContext, timeout: float = 10.0) -> http.client.HTTPSConnection:
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=timeout)
    conn.connect()
    return conn


def send(
    conn: http.client.HTTPSConnection,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> Reply:
    conn.request(method, path, body=body, headers=headers or {})
    response = conn.getresponse()
    return Reply(response.status, response.headers, response.read())


def request(
    port: int,
    ctx: ssl.SSLContext,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> Reply:
    conn = connect(port, ctx)
    try:
        return send(conn, method, path, body, headers)
    finally:
        conn.close()


def enroll_headers(extra: dict[str, str] | None = None) -> dict[str, str]:
    return {"Content-Type": "application/pkcs10", **(extra or {})}


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def make_csr(
    key: ec.EllipticCurvePrivateKey,
    cn: str = "device-1",
    san: tuple[str, ...] = ("device-1.example",),
    *,
    challenge_password: str | None = None,
    subject: x509.Name | None = None,
) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        subject if subject is not None else x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    )
    if san:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(n) for n in san]), critical=False
        )
    if challenge_password is not None:
        builder = builder.add_attribute(
            AttributeOID.CHALLENGE_PASSWORD, challenge_password.encode("ascii")
        )
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def b64(der: bytes, *, wrap: bool = True) -> bytes:
    text = base64.b64encode(der)
    if not wrap:
        return text
    return b"\n".join(text[i : i + 64] for i in range(0, len(text), 64)) + b"\n"


def certs_of(body: bytes) -> list[x509.Certificate]:
    der = base64.b64decode(body.translate(None, b" \t\r\n"), validate=True)
    return pkcs7.load_der_pkcs7_certificates(der)


def write_credential(
    directory: Path, name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> tuple[Path, Path]:
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def bootstrap_credential(
    pki: DevPki,
    directory: Path,
    name: str = "boot",
    *,
    expired: bool = False,
) -> tuple[Path, Path, ec.EllipticCurvePrivateKey]:
    key = new_key()
    now = datetime.now(UTC) - (timedelta(days=10) if expired else timedelta(0))
    cert = issue_bootstrap_certificate(
        pki.bootstrap_ca, key.public_key(), name, now=now, validity=timedelta(days=1)
    )
    cert_path, key_path = write_credential(directory, name, cert, key)
    return cert_path, key_path, key


def testserver_command(*args: str) -> list[str]:
    """The `est-testserver` console script, run from this interpreter."""
    return [sys.executable, "-m", "est_agent.testserver.cli", *args]


class ServerProcess:
    """`est-testserver serve` as a subprocess on 127.0.0.1 and a free port."""

    def __init__(self, pki_dir: Path, workdir: Path, *options: str) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.port_file = workdir / "port"
        self.port_file.unlink(missing_ok=True)
        self.stderr_path = workdir / "server.stderr"
        self.stdout_path = workdir / "server.stdout"
        argv = testserver_command(
            "serve",
            "--pki",
            str(pki_dir),
            "--listen",
            "127.0.0.1:0",
            "--port-file",
            str(self.port_file),
            *options,
        )
        # Output goes to files, never to pipes nobody reads (a full pipe would stall it).
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        self.port = self._wait_for_port()

    def _wait_for_port(self, timeout_s: float = 15.0) -> int:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.port_file.exists():
                return int(self.port_file.read_text())
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.stderr_path.read_text()}")
            time.sleep(0.02)
        self.stop()
        raise RuntimeError("server did not start in time")

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode
