"""The test server's HTTP authentication switches as libest plays them: closing after a 401 (or
after every non-200 answer) without ``Connection: close``, and Digest (RFC 7616).

Seen from the stdlib client (tests/testserver/esttls_helpers.py), which shares no code with
the agent; Digest answers here are computed with hashlib in the test, from the RFC's formulas.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import re
import ssl
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from est_agent.testserver import DevPki, EstTestServer
from est_agent.testserver.config import AuthMode, CloseAfter, HttpScheme
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


# -- --http-auth digest ----------------------------------------------------------------------


def test_digest_challenge_answer_and_log(
    start_server: Start, boot: ssl.SSLContext, issuance_log: Path
) -> None:
    # RFC 7616 §3.7: one WWW-Authenticate field per algorithm, in the configured order
    server = start_server(
        auth=AuthMode.CERT_AND_BASIC,
        basic=("alice", "s3cret"),
        http_scheme=HttpScheme.DIGEST,
        digest_algorithms=("SHA-256", "MD5"),
    )
    body = b64(make_csr(new_key()))
    uri = f"{EST}/simpleenroll"
    conn = connect(server.port, boot)
    try:
        first = send(conn, "POST", uri, body, enroll_headers())
        assert first.status == 401
        sha, md5 = first.headers.get_all("WWW-Authenticate") or []
        assert "algorithm=SHA-256" in sha and "algorithm" not in md5
        basic_instead = send(conn, "POST", uri, body, enroll_headers(basic("alice", "s3cret")))
        assert basic_instead.status == 401  # Basic is not what this server speaks now
        answer = {"Authorization": _answer(md5, "alice", "s3cret", "POST", uri)}
        assert send(conn, "POST", uri, body, enroll_headers(answer)).status == 200
    finally:
        conn.close()
    assert [r.authorization for r in server.requests] == [None, "basic", "digest"]
    assert _log(issuance_log)[-1]["auth"] == "cert+digest"


def test_digest_nonce_expires_stale(start_server: Start, dev_pki: DevPki) -> None:
    server = start_server(
        auth=AuthMode.BASIC,
        basic=("alice", "s3cret"),
        http_scheme=HttpScheme.DIGEST,
        digest_nonce_lifetime_s=0.3,
    )
    uri = f"{EST}/simpleenroll"
    body = b64(make_csr(new_key()))
    conn = connect(server.port, client_context(dev_pki.directory))
    try:
        (challenge,) = send(conn, "POST", uri, body, enroll_headers()).headers.get_all(
            "WWW-Authenticate"
        ) or [""]
        time.sleep(0.5)
        late = {"Authorization": _answer(challenge, "alice", "s3cret", "POST", uri)}
        reply = send(conn, "POST", uri, body, enroll_headers(late))
        assert reply.status == 401
        (again,) = reply.headers.get_all("WWW-Authenticate") or [""]
        assert again.endswith("stale=true") and _nonce(again) != _nonce(challenge)
        fresh = {"Authorization": _answer(again, "alice", "s3cret", "POST", uri)}
        assert send(conn, "POST", uri, body, enroll_headers(fresh)).status == 200
    finally:
        conn.close()


def _nonce(challenge: str) -> str:
    match = re.search(r'nonce="([^"]*)"', challenge)
    assert match is not None
    return match.group(1)


def _answer(challenge: str, user: str, password: str, method: str, uri: str) -> str:
    """An RFC 7616 §3.4 answer, computed here with hashlib (qop=auth, nc 1)."""
    sha = "algorithm=SHA-256" in challenge
    name = "sha256" if sha else "md5"
    realm = re.search(r'realm="([^"]*)"', challenge)
    opaque = re.search(r'opaque="([^"]*)"', challenge)
    assert realm is not None
    nonce, cnonce, nc = _nonce(challenge), "c0ffee", "00000001"

    def h(text: str) -> str:
        return hashlib.new(name, text.encode()).hexdigest()

    response = h(
        f"{h(f'{user}:{realm.group(1)}:{password}')}:{nonce}:{nc}:{cnonce}:auth:"
        f"{h(f'{method}:{uri}')}"
    )
    value = (
        f'Digest username="{user}", realm="{realm.group(1)}", nonce="{nonce}", uri="{uri}", '
        f'qop=auth, nc={nc}, cnonce="{cnonce}", response="{response}"'
    )
    if sha:
        value += f', algorithm=SHA-256, opaque="{opaque.group(1) if opaque else ""}"'
    return value


def _log(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]
