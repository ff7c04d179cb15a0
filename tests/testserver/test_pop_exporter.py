"""The test server's tls-exporter PoP (`--pop required` under TLS 1.3), against OpenSSL.

The client here is ``openssl s_client -keymatexport EXPORTER-Channel-Binding
-keymatexportlen 32``: a stack that shares no code with the agent nor the server. It prints
the connection's RFC 9266 value after the handshake; the CSR, signed then, carries it as
challengePassword (RFC 7030 §3.5) and is POSTed on the same connection through s_client.
Also the server's own pieces: the ClientHello.random parser, and the MSG_PEEK read before the
handshake against a client that sends half a hello and stalls, or no TLS at all.
"""

from __future__ import annotations

import base64
import queue
import re
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from est_agent.testserver import DevPki, EstTestServer, TlsMax
from est_agent.testserver.exporter import client_random_of, peek_client_random
from tests.testserver.esttls_helpers import (
    EST,
    ServerProcess,
    b64,
    bootstrap_credential,
    make_csr,
    new_key,
)

pytestmark = pytest.mark.integration

Start = Callable[..., EstTestServer]
SUITES = ["TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256"]


def _s_client_enroll(
    server: EstTestServer | ServerProcess,
    pki: DevPki,
    credential: tuple[Path, Path],
    suite: str,
    *,
    password: Callable[[bytes], str],
) -> tuple[int, str, bytes]:
    """Handshake with s_client, take its exporter, POST a CSR bound to it; (status, body,
    exporter)."""
    argv = [
        "openssl", "s_client", "-connect", f"127.0.0.1:{server.port}", "-servername", "localhost",
        "-tls1_3", "-ciphersuites", suite, "-CAfile", str(pki.directory / "tls-ca.pem"),
        "-verify_return_error", "-cert", str(credential[0]), "-key", str(credential[1]),
        "-keymatexport", "EXPORTER-Channel-Binding", "-keymatexportlen", "32",
        "-nocommands", "-ign_eof",
    ]  # fmt: skip
    process = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    assert process.stdin is not None and process.stdout is not None
    lines: queue.Queue[bytes] = queue.Queue()
    output = bytearray()

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            output.extend(line)
            lines.put(line)
        lines.put(b"")

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        exporter = None
        deadline = time.monotonic() + 10
        while exporter is None:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            assert line, bytes(output).decode(errors="replace")
            found = re.search(rb"Keying material: ([0-9A-F]+)", line)
            exporter = bytes.fromhex(found.group(1).decode()) if found else None
        body = b64(make_csr(new_key(), challenge_password=password(exporter)))
        head = (
            f"POST {EST}/simpleenroll HTTP/1.1\r\nHost: localhost\r\n"
            "Content-Type: application/pkcs10\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        process.stdin.write(head.encode("ascii") + body)
        process.stdin.close()
        reader.join(timeout=15)
        process.wait(timeout=15)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stdout.close()
    text = bytes(output).decode(errors="replace")
    status = re.search(r"HTTP/1\.1 (\d{3})", text)
    assert status, text
    return int(status.group(1)), text[status.start() :], exporter


@pytest.mark.parametrize("suite", SUITES)
def test_openssl_client_with_its_tls_exporter_enrolls(
    start_server: Start, dev_pki: DevPki, tmp_path: Path, suite: str
) -> None:
    started = time.monotonic()
    server = start_server(tls_max=TlsMax.TLS1_3, pop_required=True)
    cert, key, _ = bootstrap_credential(dev_pki, tmp_path)
    status, text, exporter = _s_client_enroll(
        server, dev_pki, (cert, key), suite, password=lambda v: base64.b64encode(v).decode()
    )
    print(f"{suite}: openssl s_client exporter {exporter.hex()}")
    assert len(exporter) == 32
    assert status == 200, text
    assert time.monotonic() - started < 20


def test_serve_cli_pop_required_under_tls13(dev_pki: DevPki, tmp_path: Path) -> None:
    # `est-testserver serve --pop required` (TLS 1.3 allowed by default) as its own process.
    started = time.monotonic()
    server = ServerProcess(dev_pki.directory, tmp_path / "srv", "--pop", "required", "--quiet")
    try:
        cert, key, _ = bootstrap_credential(dev_pki, tmp_path)
        status, text, _ = _s_client_enroll(
            server, dev_pki, (cert, key), SUITES[1], password=lambda v: base64.b64encode(v).decode()
        )
        assert status == 200, text
    finally:
        assert server.stop() == 0  # SIGTERM: the key log reader stops with the server
    assert time.monotonic() - started < 20


def test_openssl_client_with_another_value_is_refused(
    start_server: Start, dev_pki: DevPki, tmp_path: Path
) -> None:
    server = start_server(tls_max=TlsMax.TLS1_3, pop_required=True)
    cert, key, _ = bootstrap_credential(dev_pki, tmp_path)
    status, text, _ = _s_client_enroll(
        server,
        dev_pki,
        (cert, key),
        SUITES[0],
        password=lambda v: base64.b64encode(bytes([v[0] ^ 1]) + v[1:]).decode(),
    )
    assert status == 400
    assert "PoP failed" in text and "tls-exporter" in text


# -- the server's own pieces ----------------------------------------------------------------------


def _hello_prefix(random: bytes) -> bytes:
    # RFC 8446 §5.1 record (handshake, legacy 0x0301, length), §4 ClientHello header, 0x0303
    return b"\x16\x03\x01\x02\x00" + b"\x01\x00\x01\xfc" + b"\x03\x03" + random


def test_client_random_of_a_hello_and_of_anything_else() -> None:
    random = bytes(range(32))
    assert client_random_of(_hello_prefix(random) + b"\x20") == random
    assert client_random_of(_hello_prefix(random)[:42]) is None  # too short
    assert client_random_of(b"GET / HTTP/1.1\r\n" + bytes(40)) is None  # not TLS
    server_hello = bytearray(_hello_prefix(random))
    server_hello[5] = 2
    assert client_random_of(bytes(server_hello)) is None  # not a ClientHello


def test_peek_waits_for_the_whole_prefix_and_consumes_nothing() -> None:
    random = bytes(range(100, 132))
    a, b = socket.socketpair()
    with a, b:
        b.sendall(_hello_prefix(random)[:20])
        threading.Timer(0.2, lambda: b.sendall(_hello_prefix(random)[20:])).start()
        started = time.monotonic()
        assert peek_client_random(a, 5.0) == random
        assert 0.15 < time.monotonic() - started < 2
        assert a.recv(100) == _hello_prefix(random)  # still there for the TLS handshake


@pytest.mark.parametrize("sent", [b"\x16\x03\x01", b""], ids=["half-hello", "nothing"])
def test_peek_gives_up_at_its_deadline(sent: bytes) -> None:
    a, b = socket.socketpair()
    with a, b:
        b.sendall(sent)
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            peek_client_random(a, 0.5)
        assert time.monotonic() - started < 1.5


def test_peek_returns_at_once_on_non_tls_or_close() -> None:
    a, b = socket.socketpair()
    with a, b:
        b.sendall(b"GET / HTTP/1.1\r\n")
        assert peek_client_random(a, 5.0) is None
    a, b = socket.socketpair()
    with a:
        b.close()
        started = time.monotonic()
        assert peek_client_random(a, 5.0) is None
        assert time.monotonic() - started < 1


def test_stalled_half_hello_does_not_hold_the_pop_server(
    start_server: Start, dev_pki: DevPki, tmp_path: Path
) -> None:
    # A client that sends 3 bytes of a ClientHello and stops is dropped at the I/O timeout;
    # meanwhile and after it, an OpenSSL client still enrolls.
    server = start_server(tls_max=TlsMax.TLS1_3, pop_required=True, io_timeout_s=1.0)
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as stalled:
        stalled.sendall(b"\x16\x03\x01")
        cert, key, _ = bootstrap_credential(dev_pki, tmp_path)
        status, text, _ = _s_client_enroll(
            server,
            dev_pki,
            (cert, key),
            SUITES[0],
            password=lambda v: base64.b64encode(v).decode(),
        )
        assert status == 200, text
        assert stalled.recv(10) == b""  # closed by the server after its timeout
    assert time.monotonic() - started < 10
