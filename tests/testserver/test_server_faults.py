"""Every fault switch of the test server, seen from a client over TLS on 127.0.0.1."""

from __future__ import annotations

import base64
import http.client
import json
import ssl
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import pkcs7

from est_agent.testserver import DevPki, EstTestServer, Fault
from tests.testserver.esttls_helpers import (
    EST,
    b64,
    certs_of,
    client_context,
    connect,
    enroll_headers,
    make_csr,
    new_key,
    request,
)

pytestmark = pytest.mark.integration

Start = Callable[..., EstTestServer]


def _enroll(server: EstTestServer, ctx: ssl.SSLContext, key=None):  # type: ignore[no-untyped-def]
    csr = make_csr(key or new_key())
    return request(server.port, ctx, "POST", f"{EST}/simpleenroll", b64(csr), enroll_headers())


def test_http_500_then_recovers_after_fault_times(
    start_server: Start, boot: ssl.SSLContext
) -> None:
    server = start_server(fault=Fault.HTTP_500, fault_times=1)
    first = _enroll(server, boot)
    assert first.status == 500
    assert first.headers["Content-Type"].startswith("text/plain")
    assert _enroll(server, boot).status == 200


def test_drop_mid_body(start_server: Start, boot: ssl.SSLContext) -> None:
    server = start_server(fault=Fault.DROP_MID_BODY)
    conn = connect(server.port, boot)
    try:
        conn.request("POST", f"{EST}/simpleenroll", b64(make_csr(new_key())), enroll_headers())
        response = conn.getresponse()
        assert response.status == 200
        announced = int(response.headers["Content-Length"])
        with pytest.raises((http.client.IncompleteRead, ssl.SSLError, ConnectionError)) as info:
            response.read()
        if isinstance(info.value, http.client.IncompleteRead):
            assert 0 < len(info.value.partial) < announced
    finally:
        conn.close()


def test_slow_body(start_server: Start, boot: ssl.SSLContext) -> None:
    server = start_server(fault=Fault.SLOW_BODY, slow_body_s=0.5)
    started = time.monotonic()
    key = new_key()
    reply = _enroll(server, boot, key)
    assert time.monotonic() - started >= 0.45
    assert reply.status == 200
    assert certs_of(reply.body)[0].public_key() == key.public_key()


def test_garbage_base64(start_server: Start, boot: ssl.SSLContext) -> None:
    server = start_server(fault=Fault.GARBAGE_BASE64)
    reply = _enroll(server, boot)
    assert reply.status == 200
    assert reply.headers["Content-Type"].startswith("application/pkcs7-mime")
    with pytest.raises(ValueError):
        base64.b64decode(reply.body.strip(), validate=True)


def test_not_pkcs7(start_server: Start, boot: ssl.SSLContext) -> None:
    server = start_server(fault=Fault.NOT_PKCS7)
    key = new_key()
    reply = _enroll(server, boot, key)
    der = base64.b64decode(reply.body.replace(b"\r\n", b""), validate=True)
    with pytest.raises(ValueError):
        pkcs7.load_der_pkcs7_certificates(der)
    # It is the bare certificate: the classic mistake.
    assert x509.load_der_x509_certificate(der).public_key() == key.public_key()


def test_wrong_key(start_server: Start, boot: ssl.SSLContext, dev_pki: DevPki) -> None:
    server = start_server(fault=Fault.WRONG_KEY)
    key = new_key()
    (cert,) = certs_of(_enroll(server, boot, key).body)
    cert.verify_directly_issued_by(dev_pki.est_ca.certificate)
    assert cert.public_key() != key.public_key()


def test_foreign_ca(start_server: Start, boot: ssl.SSLContext, dev_pki: DevPki) -> None:
    server = start_server(fault=Fault.FOREIGN_CA)
    key = new_key()
    (cert,) = certs_of(_enroll(server, boot, key).body)
    assert cert.public_key() == key.public_key()
    assert cert.issuer != dev_pki.est_ca.certificate.subject
    with pytest.raises(ValueError):
        cert.verify_directly_issued_by(dev_pki.est_ca.certificate)


def test_expired_cert(
    start_server: Start, boot: ssl.SSLContext, dev_pki: DevPki, issuance_log: Path
) -> None:
    server = start_server(fault=Fault.EXPIRED_CERT)
    (cert,) = certs_of(_enroll(server, boot).body)
    cert.verify_directly_issued_by(dev_pki.est_ca.certificate)
    assert cert.not_valid_after_utc < datetime.now(UTC)
    entry = json.loads(issuance_log.read_text().splitlines()[-1])
    assert entry["fault"] == "expired-cert"


def test_oversize_body(start_server: Start, boot: ssl.SSLContext) -> None:
    server = start_server(fault=Fault.OVERSIZE_BODY)
    conn = connect(server.port, boot)
    try:
        conn.request("POST", f"{EST}/simpleenroll", b64(make_csr(new_key())), enroll_headers())
        response = conn.getresponse()
        assert response.status == 200
        assert int(response.headers["Content-Length"]) > 10 * 1024 * 1024
        assert len(response.read()) > 10 * 1024 * 1024
    finally:
        conn.close()


def test_wrong_content_type(start_server: Start, boot: ssl.SSLContext) -> None:
    server = start_server(fault=Fault.WRONG_CONTENT_TYPE)
    reply = _enroll(server, boot)
    assert reply.status == 200
    assert reply.headers["Content-Type"].startswith("text/html")
    assert len(certs_of(reply.body)) == 1


def test_faults_on_cacerts_only_when_asked(start_server: Start, dev_pki: DevPki) -> None:
    anon = client_context(dev_pki.directory)
    server = start_server(fault=Fault.HTTP_500)
    assert request(server.port, anon, "GET", f"{EST}/cacerts").status == 200
    server = start_server(fault=Fault.HTTP_500, fault_operations=frozenset({"cacerts"}))
    assert request(server.port, anon, "GET", f"{EST}/cacerts").status == 500


def test_faults_on_csrattrs_only_when_asked(start_server: Start, dev_pki: DevPki) -> None:
    from est_agent.testserver.wire import CsrAttrsKind

    anon = client_context(dev_pki.directory)
    server = start_server(fault=Fault.GARBAGE_BASE64, csrattrs=CsrAttrsKind.EMPTY)
    assert request(server.port, anon, "GET", f"{EST}/csrattrs").body == b"MAA=\r\n"
    server = start_server(
        fault=Fault.GARBAGE_BASE64,
        fault_operations=frozenset({"csrattrs"}),
        csrattrs=CsrAttrsKind.EMPTY,
    )
    reply = request(server.port, anon, "GET", f"{EST}/csrattrs")
    assert (reply.status, reply.headers["Content-Type"]) == (200, "application/csrattrs")
    assert reply.body == b"%%% this is not base64 @@@\r\n"


def _closed_by_peer(conn: http.client.HTTPSConnection, timeout_s: float = 5.0) -> bool:
    """Whether the server closed the TLS connection (EOF, with or without close_notify)."""
    sock = conn.sock
    if sock is None:  # http.client already closed it, as "Connection: close" told it to
        return True
    sock.settimeout(timeout_s)
    try:
        return sock.recv(1) == b""
    except (ssl.SSLError, ConnectionError):
        return True


@pytest.mark.parametrize(
    ("fault", "says_close"),
    [(Fault.CLOSE_AFTER_RESPONSE, True), (Fault.DROP_AFTER_RESPONSE, False)],
)
def test_close_after_response_faults(
    start_server: Start, boot: ssl.SSLContext, fault: Fault, says_close: bool
) -> None:
    server = start_server(fault=fault, fault_operations=frozenset({"cacerts"}))
    conn = connect(server.port, boot)
    try:
        conn.request("GET", f"{EST}/cacerts")
        response = conn.getresponse()
        assert response.status == 200
        assert len(certs_of(response.read())) == 1  # a complete, correct answer
        assert (response.headers.get("Connection") == "close") is says_close
        started = time.monotonic()
        assert _closed_by_peer(conn)
        assert time.monotonic() - started < 2.0  # closed at once, not at the idle timeout
    finally:
        conn.close()
    # enrollment itself is untouched by a /cacerts-only fault
    assert _enroll(server, boot).status == 200
