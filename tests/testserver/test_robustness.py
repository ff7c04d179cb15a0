"""The server process under abuse: a bounded burst of malformed requests, then 200 clients.

Traffic goes to 127.0.0.1 only, with bounded counts and timeouts.
"""

from __future__ import annotations

import json
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from est_agent.testserver import DevPki
from tests.testserver.esttls_helpers import (
    EST,
    ServerProcess,
    b64,
    certs_of,
    client_context,
    enroll_headers,
    make_csr,
    new_key,
    request,
)

pytestmark = pytest.mark.integration

BURST_ROUNDS = 16  # x the cases below: a few hundred bad requests


@pytest.fixture
def server(dev_pki: DevPki, tmp_path: Path) -> Iterator[ServerProcess]:
    proc = ServerProcess(
        dev_pki.directory, tmp_path / "srv", "--issuance-log", str(tmp_path / "issued.jsonl")
    )
    yield proc
    assert proc.stop() == 0


def _exchange(
    port: int, data: bytes, ctx: ssl.SSLContext | None, *, close_early: bool = False
) -> bytes:
    """Send raw bytes (over TLS when ctx is given) and read the answer until the server closes."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock: socket.socket = raw
    try:
        if ctx is not None:
            sock = ctx.wrap_socket(raw, server_hostname="127.0.0.1")  # takes over the fd
        sock.sendall(data)
        if close_early:
            return b""
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except (ssl.SSLError, ConnectionError):
                break
            except TimeoutError:
                return b"TIMEOUT " + b"".join(chunks)
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)
    except (ssl.SSLError, ConnectionError):
        return b""
    finally:
        sock.close()
        raw.close()


def _status(answer: bytes) -> int:
    first = answer.split(b"\r\n", 1)[0].split(b" ")
    return int(first[1]) if len(first) > 1 and first[1].isdigit() else 0


def _post(path: str, body: bytes, *headers: str) -> bytes:
    head = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close", *headers]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def _cases(csr: bytes) -> list[tuple[str, bytes, bool, bool]]:
    """(name, bytes, over TLS, expect a 4xx answer)"""
    enroll = f"{EST}/simpleenroll"
    good = b64(csr)
    pkcs10 = "Content-Type: application/pkcs10"
    return [
        ("plaintext HTTP on the TLS port", b"GET / HTTP/1.1\r\n\r\n", False, False),
        ("random bytes on the TLS port", bytes(range(256)) * 4, False, False),
        ("garbage request line", b"\x00\x01\x02 \xff\r\n\r\n", True, True),
        ("no version", b"GET\r\n\r\n", True, True),
        ("huge request line", b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n", True, True),
        ("too many headers", b"GET / HTTP/1.1\r\n" + b"X-A: b\r\n" * 150 + b"\r\n", True, True),
        ("traversal", b"GET /../../etc/passwd HTTP/1.1\r\nConnection: close\r\n\r\n", True, True),
        (
            "non-ascii path",
            "GET /.well-known/est/\u00e9/cacerts HTTP/1.1\r\nConnection: close\r\n\r\n".encode(),
            True,
            True,
        ),
        (
            "huge Content-Length",
            _post(enroll, b"", pkcs10, "Content-Length: 999999999"),
            True,
            True,
        ),
        ("negative Content-Length", _post(enroll, b"", pkcs10, "Content-Length: -5"), True, True),
        (
            "chunked",
            _post(enroll, b"5\r\nAAAAA\r\n0\r\n\r\n", pkcs10, "Transfer-Encoding: chunked"),
            True,
            True,
        ),
        ("no Content-Length", _post(enroll, b"", pkcs10), True, True),
        ("bad base64", _post(enroll, b"@@@@", pkcs10, "Content-Length: 4"), True, True),
        ("junk DER", _post(enroll, b"MIIBAA==", pkcs10, "Content-Length: 8"), True, True),
        ("truncated CSR", _post(enroll, good[:40], pkcs10, "Content-Length: 40"), True, True),
        (
            "short body",
            _post(enroll, good[:10], pkcs10, f"Content-Length: {len(good)}"),
            True,
            False,
        ),
        (
            "wrong media type",
            _post(enroll, good, "Content-Type: text/plain", f"Content-Length: {len(good)}"),
            True,
            True,
        ),
        (
            "bad Basic header",
            _post(enroll, good, pkcs10, "Authorization: Basic !!!", f"Content-Length: {len(good)}"),
            True,
            True,
        ),
        ("handshake then nothing", b"", True, False),
    ]


def test_burst_of_malformed_requests_then_valid_enrollment(
    server: ServerProcess, dev_pki: DevPki, tmp_path: Path
) -> None:
    anon = client_context(dev_pki.directory)
    cases = _cases(make_csr(new_key())) * BURST_ROUNDS
    started = time.monotonic()

    def one(case: tuple[str, bytes, bool, bool]) -> tuple[str, int, int, bytes]:
        name, data, tls, _ = case
        close_early = name in ("short body", "handshake then nothing")
        answer = _exchange(server.port, data, anon if tls else None, close_early=close_early)
        return name, _status(answer), len(answer), answer

    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(one, cases))
    elapsed = time.monotonic() - started
    expect_4xx = {name for name, _, _, expect in cases if expect}
    for name, status, _, answer in results:
        if name in expect_4xx:
            assert 400 <= status < 500, (name, answer[:200])
            head, _, body = answer.partition(b"\r\n\r\n")
            assert b"text/plain" in head, name
            assert 0 < len(body) < 300, name
    assert server.alive()
    print(f"{len(results)} malformed requests in {elapsed:.2f} s")

    # The server still serves: a correct enrollment succeeds afterwards.
    boot = client_context(
        dev_pki.directory,
        (dev_pki.directory / "bootstrap-client.pem", dev_pki.directory / "bootstrap-client.key"),
    )
    key = new_key()
    reply = request(
        server.port, boot, "POST", f"{EST}/simpleenroll", b64(make_csr(key)), enroll_headers()
    )
    assert reply.status == 200, reply.text
    assert certs_of(reply.body)[0].public_key() == key.public_key()
    assert "Traceback" not in server.stderr_path.read_text()


def test_200_concurrent_tls_clients(server: ServerProcess, dev_pki: DevPki, tmp_path: Path) -> None:
    clients = 200
    boot = client_context(
        dev_pki.directory,
        (dev_pki.directory / "bootstrap-client.pem", dev_pki.directory / "bootstrap-client.key"),
    )
    keys = [new_key() for _ in range(clients)]
    bodies = [b64(make_csr(k, f"dev-{i}", ())) for i, k in enumerate(keys)]
    barrier = threading.Barrier(clients)
    results: list[object] = [None] * clients

    def worker(i: int) -> None:
        barrier.wait(timeout=30)
        try:
            reply = request(
                server.port, boot, "POST", f"{EST}/simpleenroll", bodies[i], enroll_headers()
            )
            results[i] = (
                reply.status,
                certs_of(reply.body)[0] if reply.status == 200 else reply.text,
            )
        except Exception as exc:  # recorded and asserted below
            results[i] = exc

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    elapsed = time.monotonic() - started
    failures = [(i, r) for i, r in enumerate(results) if not (isinstance(r, tuple) and r[0] == 200)]
    assert not failures, failures[:5]
    for i, result in enumerate(results):
        assert isinstance(result, tuple)
        assert result[1].public_key() == keys[i].public_key()
    log = [json.loads(line) for line in (tmp_path / "issued.jsonl").read_text().splitlines()]
    assert len(log) == clients
    assert len({entry["serial"] for entry in log}) == clients
    print(f"{clients} concurrent enrollments in {elapsed:.2f} s")
