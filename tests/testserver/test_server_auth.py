"""The test server's HTTP authentication switches as libest plays them: closing after a 401 (or
after every non-200 answer) without ``Connection: close``, and Digest (RFC 7616).

Seen from the stdlib client (tests/testserver/esttls_helpers.py), which shares no code with
the agent; Digest answers here are computed with hashlib in the test, from the RFC's formulas.
"""

from __future__ import annotations

import http.client
import ssl
import time
from collections.abc import Callable

import pytest

from est_agent.testserver import DevPki, EstTestServer
from est_agent.testserver.config import AuthMode, CloseAfter
from est_agent.testserver.server import RequestRecord
from tests.testserver.esttls_helpers import (
    EST,
    b64,
    basic,
    client_context,
    connect,
    enroll_headers,
    make_csr,
    new_key,
    send,
)

pytestmark = pytest.mark.integration

Start = Callable[..., EstTestServer]


def _closed_by_peer(conn: http.client.HTTPSConnection, timeout_s: float = 5.0) -> bool:
    """Whether the server closed the TLS connection (EOF, with or without close_notify)."""
    sock = conn.sock
    if sock is None:  # http.client closed it itself: the answer said "Connection: close"
        return True
    sock.settimeout(timeout_s)
    try:
        return sock.recv(1) == b""
    except (ssl.SSLError, ConnectionError):
        return True


# -- --close-after ---------------------------------------------------------------------------


def test_close_after_401_closes_without_saying_so(start_server: Start, dev_pki: DevPki) -> None:
    server = start_server(
        auth=AuthMode.BASIC, basic=("alice", "pw"), close_after=CloseAfter.UNAUTHORIZED
    )
    body = b64(make_csr(new_key()))
    conn = connect(server.port, client_context(dev_pki.directory))
    try:
        assert send(conn, "GET", f"{EST}/cacerts").status == 200  # kept open after a 200
        good = send(conn, "POST", f"{EST}/simpleenroll", body, enroll_headers(basic("alice", "pw")))
        assert good.status == 200
        refused = send(conn, "POST", f"{EST}/simpleenroll", body, enroll_headers())
        assert refused.status == 401
        assert refused.headers["WWW-Authenticate"].startswith("Basic realm=")
        assert refused.headers.get("Connection") is None  # nothing says it will close ...
        started = time.monotonic()
        assert _closed_by_peer(conn)  # ... and it does, at once
        assert time.monotonic() - started < 2.0
    finally:
        conn.close()
    assert server.requests == [
        RequestRecord("GET", f"{EST}/cacerts", 200, None, 1),
        RequestRecord("POST", f"{EST}/simpleenroll", 200, "basic", 1),
        RequestRecord("POST", f"{EST}/simpleenroll", 401, None, 1),
    ]


@pytest.mark.parametrize(
    ("method", "path", "headers", "status"),
    [
        ("GET", f"{EST}/csrattrs", {}, 204),  # nothing asked
        ("POST", f"{EST}/simpleenroll", {"Content-Type": "text/plain"}, 415),
        ("GET", f"{EST}/serverkeygen", {}, 501),
        ("GET", f"{EST}/nope/cacerts", {}, 404),
    ],
)
def test_close_after_non_200(
    start_server: Start,
    boot: ssl.SSLContext,
    method: str,
    path: str,
    headers: dict[str, str],
    status: int,
) -> None:
    server = start_server(close_after=CloseAfter.NON_200)
    conn = connect(server.port, boot)
    try:
        assert send(conn, "GET", f"{EST}/cacerts").status == 200
        body = b64(make_csr(new_key())) if method == "POST" else None
        reply = send(conn, method, path, body, headers)
        assert reply.status == status
        assert reply.headers.get("Connection") is None
        assert _closed_by_peer(conn)
    finally:
        conn.close()
    assert [(r.status, r.connection) for r in server.requests] == [(200, 1), (status, 1)]
