"""Small hostile TLS peers on 127.0.0.1 for the TLS-engine tests (tests/est/test_tls_hostile.py).

Each peer is a listening socket on 127.0.0.1 and a free port whose connections are handled in
daemon threads; ``close()`` stops it (closes the listener and every open connection, joins the
threads with a bound). What a peer saw is kept in plain lists for the tests to assert on.

* ``TlsliteServer``: a tlslite-ng server restricted to one cipher suite, holding whatever key
  it is given: with the real server's certificate chain and *another* key it is the impostor
  (it cannot sign ServerKeyExchange / CertificateVerify for the certificate it presents).
* ``RecordProxy``: a TCP relay in front of a real server that parses the TLS records (RFC 8446
  §5.1: type, legacy version, 16-bit length) of both directions: it counts them, can trickle
  the server's bytes, and can cut the connection (FIN, RST, or a fatal alert first) when the
  client sends a record of a given type.
* ``SslHttpServer``: an OpenSSL (stdlib ``ssl``) server that misbehaves at the HTTP level
  (trickles, closes right after the handshake or right after answering).
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from est_agent.testserver import DevPki
from est_agent.testserver.issuer import random_serial
from est_agent.testserver.pki import SERVER_NAMES
from est_agent.testserver.wire import encode_base64_body, encode_certs_only

# TLS record content types (RFC 8446 §5.1) and alert descriptions (§6.2).
CHANGE_CIPHER_SPEC = 20
ALERT = 21
HANDSHAKE = 22
APPLICATION_DATA = 23
ACCESS_DENIED = 49
CERTIFICATE = 11  # handshake message types (RFC 5246 §7.4)


def tlslite() -> None:
    """Load tlslite-ng's submodules as the EST client does (its package ``__init__`` warns)."""
    from est_agent.est.tls import tlslite_adapter

    tlslite_adapter.load()


# -- credentials -------------------------------------------------------------------------------


def pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


def key_pem(key: Any) -> str:
    data: bytes = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return data.decode("ascii")


def server_certificate(pki: DevPki) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pki.server_cert_path.read_bytes())


@functools.cache
def rsa_server_credential(pki_dir: Path) -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
    """An RSA server certificate from the dev TLS CA for the same names as server.pem (the dev
    PKI's server key is P-256; the RSA-authenticated suites need an RSA one)."""
    ca_cert = x509.load_pem_x509_certificate((pki_dir / "tls-ca.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((pki_dir / "tls-ca.key").read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    names: list[x509.GeneralName] = []
    for name in SERVER_NAMES:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            names.append(x509.DNSName(name))
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "est-server-rsa")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(random_serial())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


@functools.cache
def other_key(kind: str) -> Any:
    """A key that belongs to no certificate: what an impostor holds."""
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return ec.generate_private_key(ec.SECP256R1())


def cacerts_response(pki: DevPki, *, connection_close: bool = False) -> bytes:
    """A complete HTTP/1.1 200 answer to GET /cacerts (RFC 7030 §4.1.3)."""
    body = encode_base64_body(encode_certs_only([pki.est_ca.certificate]))
    return http_response(body, "application/pkcs7-mime", connection_close=connection_close)


def http_response(body: bytes, content_type: str, *, connection_close: bool = False) -> bytes:
    head = (
        "HTTP/1.1 200 OK\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n"
        + ("Connection: close\r\n" if connection_close else "")
        + "\r\n"
    )
    return head.encode("ascii") + body


def read_request(read: Callable[[int], bytes], limit: int = 65536) -> bytes:
    """Read one HTTP request head (up to the blank line) through ``read``; b"" on EOF."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = read(4096)
        if not chunk:
            return b""
        data += chunk
        if len(data) > limit:
            raise ValueError("request head too long")
    return data


def reset(sock: socket.socket) -> None:
    """Close with an RST instead of a FIN (SO_LINGER on, 0 s)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


# -- the peer skeleton -------------------------------------------------------------------------


class Peer:
    """Accepts connections on 127.0.0.1 and runs ``handle(conn)`` for each in a daemon thread."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self.url = f"https://127.0.0.1:{self.port}"
        self.accepted = 0
        self.errors: list[BaseException] = []  # what the handlers raised: the server's view
        self.stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._acceptor = threading.Thread(target=self._accept_loop, daemon=True)

    def start(self) -> Peer:
        self._acceptor.start()
        return self

    def handle(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def track(self, sock: socket.socket) -> socket.socket:
        with self._lock:
            self._sockets.append(sock)
        return sock

    def _accept_loop(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self.accepted += 1
            self.track(conn)
            thread = threading.Thread(target=self._run, args=(conn,), daemon=True)
            with self._lock:
                self._threads.append(thread)
            thread.start()

    def _run(self, conn: socket.socket) -> None:
        try:
            self.handle(conn)
        except Exception as exc:  # recorded for the test; a hostile peer never raises
            self.errors.append(exc)
        finally:
            with contextlib.suppress(OSError):
                conn.close()

    def close(self) -> None:
        self.stop.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self._acceptor.join(timeout=5)
        with self._lock:
            sockets, threads = list(self._sockets), list(self._threads)
        # Let the handlers finish on their own first (the client has closed by now), so what
        # they saw is recorded; then force the stragglers' sockets closed.
        settle_by = time.monotonic() + 3
        for thread in threads:
            thread.join(timeout=max(0.0, settle_by - time.monotonic()))
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()
        for thread in [self._acceptor, *threads]:
            if thread.is_alive():
                thread.join(timeout=5)

    def __enter__(self) -> Peer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- tlslite-ng server: one cipher suite, any key -------------------------------------------------


@dataclass(frozen=True)
class Suite:
    """One cipher suite as tlslite-ng's HandshakeSettings names its parts."""

    name: str  # the IANA name (what the genuine server must report)
    version: tuple[int, int]
    key_exchange: str  # "" under TLS 1.3 (the suite does not name it)
    cipher: str
    mac: str


@dataclass
class TlsliteServer(Peer):
    """Handshakes as a TLS server that offers exactly ``suite`` with ``chain`` and ``key``.

    With ``key`` not the leaf's key this is the impostor. After a handshake it answers one
    HTTP request with ``answer`` and closes. ``outcomes`` records, per connection, either
    ``("ok", suite name)`` or ``("alert", alert name)`` (the alert our client sent or the one
    this server sent) or ``("error", text)``.
    """

    chain: tuple[x509.Certificate, ...] = ()
    key: Any = None
    suite: Suite | None = None
    answer: bytes = b""
    request_cert: bool = True
    outcomes: list[tuple[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        Peer.__init__(self)

    def handle(self, conn: socket.socket) -> None:
        tlslite()
        from tlslite.constants import AlertDescription, CipherSuite
        from tlslite.errors import TLSAlert, TLSError
        from tlslite.handshakesettings import HandshakeSettings
        from tlslite.tlsconnection import TLSConnection
        from tlslite.utils.keyfactory import parsePEMKey
        from tlslite.x509certchain import X509CertChain

        assert self.suite is not None
        conn.settimeout(10)
        chain = X509CertChain()
        chain.parsePemList("".join(pem(c) for c in self.chain))
        key = parsePEMKey(key_pem(self.key), private=True, implementations=["python"])
        settings = HandshakeSettings()
        settings.minVersion = settings.maxVersion = self.suite.version
        settings.versions = [self.suite.version]
        settings.cipherNames = [self.suite.cipher]
        settings.macNames = [self.suite.mac]
        if self.suite.key_exchange:
            settings.keyExchangeNames = [self.suite.key_exchange]
        else:  # TLS 1.3 only: tlslite refuses its TLS 1.2-only curves then (RFC 8446 §4.2.7)
            settings.eccCurves = ["x25519", "secp256r1", "secp384r1"]
        tls = TLSConnection(conn)
        try:
            tls.handshakeServer(
                certChain=chain, privateKey=key, reqCert=self.request_cert, settings=settings
            )
        except TLSAlert as exc:
            self.outcomes.append(("alert", AlertDescription.toStr(exc.description)))
            return
        except (TLSError, OSError) as exc:
            self.outcomes.append(("error", str(exc) or "closed"))
            return
        self.outcomes.append(("ok", CipherSuite.ietfNames[tls.session.cipherSuite]))
        if read_request(tls.recv) and self.answer:
            tls.sendall(self.answer)
        with contextlib.suppress(TLSError, OSError):
            tls.close()


# -- a record-parsing relay ----------------------------------------------------------------------


@dataclass
class RecordProxy(Peer):
    """Relays to 127.0.0.1:``upstream``, parsing the TLS records of both directions.

    ``client_records`` / ``server_records``: (content type, length) of each record seen.
    ``cut_on_client_type``: when the client sends a record of this type (or, with
    ``cut_on_handshake``, a plaintext handshake record holding that message type: RFC 5246
    §7.4), it is not forwarded; instead ``inject`` (if any) goes to the client and both
    connections are closed, with an RST when ``cut_with_reset``. ``trickle_s``: the server's
    bytes reach the client one at a
    time, this many seconds apart.
    """

    upstream: int = 0
    cut_on_client_type: int | None = None
    cut_on_handshake: int | None = None
    inject: bytes = b""
    cut_with_reset: bool = False
    trickle_s: float | None = None
    client_records: list[tuple[int, int]] = field(default_factory=list)
    server_records: list[tuple[int, int]] = field(default_factory=list)
    cuts: int = 0

    def __post_init__(self) -> None:
        Peer.__init__(self)

    def handle(self, conn: socket.socket) -> None:
        server = self.track(socket.create_connection(("127.0.0.1", self.upstream), timeout=10))
        conn.settimeout(10)
        back = threading.Thread(target=self._pump_server, args=(server, conn), daemon=True)
        back.start()
        try:
            self._pump_client(conn, server)
        finally:
            back.join(timeout=15)
            with contextlib.suppress(OSError):
                server.close()

    def _pump_client(self, conn: socket.socket, server: socket.socket) -> None:
        buffer = b""
        while not self.stop.is_set():
            try:
                data = conn.recv(65536)
            except OSError:
                data = b""
            if not data:
                with contextlib.suppress(OSError):
                    server.shutdown(socket.SHUT_WR)
                return
            buffer += data
            while len(buffer) >= 5:
                kind, length = buffer[0], int.from_bytes(buffer[3:5], "big")
                if len(buffer) < 5 + length:
                    break
                record, buffer = buffer[: 5 + length], buffer[5 + length :]
                self.client_records.append((kind, length))
                handshake = kind == HANDSHAKE and length > 0 and record[5] == self.cut_on_handshake
                if kind == self.cut_on_client_type or handshake:
                    self._cut(conn, server)
                    return
                server.sendall(record)

    def _cut(self, conn: socket.socket, server: socket.socket) -> None:
        self.cuts += 1
        with contextlib.suppress(OSError):
            if self.inject:
                conn.sendall(self.inject)
        if self.cut_with_reset:
            reset(conn)
        else:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()
        with contextlib.suppress(OSError):  # wakes the other relay thread's recv
            server.shutdown(socket.SHUT_RDWR)
        server.close()

    def _pump_server(self, server: socket.socket, conn: socket.socket) -> None:
        buffer = b""
        while not self.stop.is_set():
            try:
                data = server.recv(65536)
            except OSError:
                data = b""
            if not data:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_WR)
                return
            buffer += data
            while len(buffer) >= 5:
                length = int.from_bytes(buffer[3:5], "big")
                if len(buffer) < 5 + length:
                    break
                self.server_records.append((buffer[0], length))
                buffer = buffer[5 + length :]
            try:
                if self.trickle_s is None:
                    conn.sendall(data)
                    continue
                for byte in data:
                    if self.stop.wait(self.trickle_s):
                        return
                    conn.sendall(bytes([byte]))
            except OSError:
                return


def alert_record(description: int, version: bytes = b"\x03\x03") -> bytes:
    """A plaintext fatal alert record (RFC 5246 §7.2): valid before the server's CCS."""
    return bytes([ALERT]) + version + b"\x00\x02" + bytes([2, description])


# -- an OpenSSL server that misbehaves in HTTP ----------------------------------------------------


def server_context(
    pki: DevPki,
    *,
    cert: x509.Certificate | None = None,
    key: Any = None,
    tls_max: ssl.TLSVersion = ssl.TLSVersion.TLSv1_3,
    ciphers: str | None = None,
    client_ca: x509.Certificate | None = None,
    require_client_cert: bool = False,
    tmp: Path,
) -> ssl.SSLContext:
    """A server context (server.pem unless ``cert``/``key``) that asks for a client certificate
    from ``client_ca`` (the SIM's bootstrap CA unless given)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.maximum_version = tls_max
    if cert is None:
        ctx.load_cert_chain(pki.server_cert_path, pki.server_key_path)
    else:
        cert_path, key_path = tmp / "hostile-server.pem", tmp / "hostile-server.key"
        cert_path.write_text(pem(cert))
        key_path.write_text(key_pem(key))
        ctx.load_cert_chain(cert_path, key_path)
    if ciphers is not None:
        ctx.set_ciphers(ciphers)
    ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    anchor = client_ca if client_ca is not None else pki.bootstrap_ca.certificate
    ctx.load_verify_locations(cadata=pem(anchor))
    ctx.num_tickets = 0
    return ctx


@dataclass
class SslHttpServer(Peer):
    """An OpenSSL server with one misbehaviour (``mode``):

    * ``"close_after_answer"``: reads a request head, waits ``pause_s`` (so anything the client
      sends after its request has arrived), sends ``answer`` (no ``Connection: close``) and
      closes the TCP connection without reading further: unread data makes that an RST.
    * ``"close_after_handshake"``: completes the handshake, then closes without an alert
      (with an RST when ``with_reset``).
    * ``"trickle_head"`` / ``"trickle_body"``: sends the answer's head (or, after a prompt
      head, its body) one byte every ``interval_s``.
    * ``"answer"``: answers each request on the connection with ``answer`` (keep-alive).
    * ``"drop_second"``: answers the first request on a connection (keep-alive), reads the
      second and closes without answering it: a keep-alive connection closed just as the
      client reused it.

    ``requests`` counts request heads read; ``handshake_errors`` the TLS errors seen.
    """

    context: ssl.SSLContext | None = None
    mode: str = "answer"
    answer: bytes = b""
    pause_s: float = 0.2
    interval_s: float = 1.0
    with_reset: bool = False
    requests: int = 0
    handshake_errors: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        Peer.__init__(self)

    def handle(self, conn: socket.socket) -> None:
        assert self.context is not None
        conn.settimeout(10)
        try:
            tls = self.context.wrap_socket(conn, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            self.handshake_errors.append(str(exc))
            return
        self.track(tls)
        try:
            self._serve_tls(tls)
        finally:
            # Closed here, not only by close(): a handler still in its handshake when close()
            # took its list of sockets would otherwise leave this one to the garbage collector
            # (a ResourceWarning that pytest pins on whichever test runs then).
            with contextlib.suppress(OSError):
                tls.close()

    def _serve_tls(self, tls: ssl.SSLSocket) -> None:
        if self.mode == "close_after_handshake":
            if self.with_reset:
                reset(tls)
            else:
                tls.close()  # no close_notify: the stdlib sends one only on unwrap()
            return
        served = 0
        while not self.stop.is_set():
            try:
                head = read_request(tls.recv)
            except (ssl.SSLError, OSError):
                return
            if not head:
                return
            self.requests += 1
            if self.mode == "close_after_answer":
                time.sleep(self.pause_s)
                tls.sendall(self.answer)
                tls.close()
                return
            if self.mode == "answer" or (self.mode == "drop_second" and served == 0):
                tls.sendall(self.answer)
                served += 1
                continue
            if self.mode == "drop_second":
                tls.close()
                return
            split = self.answer.index(b"\r\n\r\n") + 4
            slow = self.answer[:split] if self.mode == "trickle_head" else self.answer[split:]
            if self.mode == "trickle_body":
                tls.sendall(self.answer[:split])
            try:
                for byte in slow:
                    if self.stop.wait(self.interval_s):
                        return
                    tls.sendall(bytes([byte]))
            except OSError:
                return
            if self.mode == "trickle_head":
                tls.sendall(self.answer[split:])


def elapsed(start: float) -> float:
    return time.monotonic() - start
