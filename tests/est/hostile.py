"""A small hostile HTTPS server for client tests: canned, misbehaving answers over real TLS.

Python's ``ssl`` on 127.0.0.1 and a free port, with the dev PKI's TLS server certificate, so the
EST client verifies it exactly as it verifies the test EST server. Each request (head and a
Content-Length body) goes to ``handler``, which returns the bytes to write verbatim (status
line, headers and body, or an iterable of chunks for bodies too big to hold) and how the
connection ends. Nothing here is RFC-conformant on purpose: HTTP/1.0 close-delimited bodies,
echoed headers, content-coding bombs, odd Location headers.
"""

from __future__ import annotations

import socket
import ssl
import struct
import threading
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from types import TracebackType

from est_agent.testserver import DevPki

__all__ = [
    "Answer",
    "HostileServer",
    "Request",
    "gzip_gzip_bomb",
    "gzip_of_zeros",
    "gzip_stream",
    "http_response",
]


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    #: header names lower-cased; the raw head as received in ``head``
    headers: dict[str, str]
    head: bytes
    body: bytes


@dataclass(frozen=True)
class Answer:
    """What to send and how to end: ``keep`` the connection for another request, or close it
    with a TLS close_notify (``notify``) or with a bare TCP FIN (neither)."""

    data: bytes | Iterable[bytes]
    keep: bool = False
    notify: bool = True


Handler = Callable[[Request], Answer]


def http_response(
    status: int,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
    *,
    version: str = "HTTP/1.1",
    length: bool = True,
) -> bytes:
    """Status line, headers (Content-Length unless ``length`` is False) and body."""
    lines = [f"{version} {status} X"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    if length:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


@dataclass
class HostileServer:
    pki: DevPki
    handler: Handler
    tls_max: ssl.TLSVersion = ssl.TLSVersion.TLSv1_3
    requests: list[Request] = field(default_factory=list)
    connections: int = 0
    errors: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._ctx.maximum_version = self.tls_max
        self._ctx.load_cert_chain(self.pki.server_cert_path, self.pki.server_key_path)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._workers: list[threading.Thread] = []

    @property
    def port(self) -> int:
        return int(self._listener.getsockname()[1])

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def __enter__(self) -> HostileServer:
        self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for worker in self._workers:
            worker.join(timeout=5)
        self._listener.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                raw, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            worker = threading.Thread(target=self._connection, args=(raw,), daemon=True)
            self._workers.append(worker)
            worker.start()

    def _connection(self, raw: socket.socket) -> None:
        raw.settimeout(10)
        try:
            tls = self._ctx.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            self.errors.append(f"handshake: {exc}")
            raw.close()
            return
        sock: socket.socket = tls
        try:
            while not self._stop.is_set():
                request = _read_request(tls)
                if request is None:
                    return
                self.requests.append(request)
                answer = self.handler(request)
                chunks = [answer.data] if isinstance(answer.data, bytes) else answer.data
                for chunk in chunks:
                    tls.sendall(chunk)
                if not answer.keep:
                    # close_notify (RFC 8446 §6.1) or not, then FIN; reading on until the
                    # client closes avoids a reset that could destroy the answer in flight.
                    sock = _unwrap(tls) if answer.notify else tls
                    sock.shutdown(socket.SHUT_WR)
                    sock.settimeout(2)
                    while sock.recv(65536):
                        pass
                    return
        except (ssl.SSLError, OSError) as exc:
            self.errors.append(f"{type(exc).__name__}: {exc}")  # the client gave up: fine
        finally:
            sock.close()


def _unwrap(tls: ssl.SSLSocket) -> socket.socket:
    """Send close_notify without waiting for the peer's (non-blocking: SSLWantReadError).

    tlslite clients also follow a request with an empty application-data record, which
    OpenSSL meets while looking for the peer's close_notify (SSLError). Either way the alert
    has been sent: carry on with the TCP close."""
    tls.setblocking(False)
    try:
        return tls.unwrap()
    except ssl.SSLError:
        return tls
    finally:
        tls.setblocking(True)


def _read_request(tls: ssl.SSLSocket) -> Request | None:
    data = b""
    while b"\r\n\r\n" not in data:
        piece = tls.recv(65536)
        if not piece:
            return None
        data += piece
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    method, path, _version = lines[0].split(" ", 2)
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        piece = tls.recv(65536)
        if not piece:
            return None
        body += piece
    return Request(method, path, headers, head, body)


# -- content-coding bombs --------------------------------------------------------------------

#: zlib.crc32 over 2**32 zero bytes (computed once with zlib; 2.4 s to recompute)
CRC32_OF_4_GIB_ZEROS = 0xD202EF8D
_MIB = 1024 * 1024


def gzip_of_zeros(total: int, *, crc: int | None = None) -> Iterator[bytes]:
    """One gzip member (RFC 1952) of `total` zero bytes, streamed, never held in memory.

    Each MiB is deflated and then fully flushed (Z_FULL_FLUSH resets the compressor), so every
    MiB after the first deflates to the same bytes: those are computed once and repeated,
    which turns a 30 s compression of 4 GiB into milliseconds. The trailer carries the CRC-32
    and size of the whole content, as a real compressor would write them.
    """
    assert total % _MIB == 0 and total > 0
    deflate = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    zero = bytes(_MIB)
    block = deflate.compress(zero) + deflate.flush(zlib.Z_FULL_FLUSH)
    again = deflate.compress(zero) + deflate.flush(zlib.Z_FULL_FLUSH)
    assert block == again  # the state after a full flush is the same each time
    if crc is None:
        crc = 0
        for _ in range(total // _MIB):
            crc = zlib.crc32(zero, crc)
    yield b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff"  # magic, CM=deflate, no flags, XFL=2
    for _ in range(total // _MIB):
        yield block
    yield deflate.flush(zlib.Z_FINISH)  # the final (empty) block
    yield struct.pack("<II", crc, total & 0xFFFFFFFF)


def gzip_stream(chunks: Iterable[bytes]) -> bytes:
    """gzip (RFC 1952) of a stream of chunks, compressed as they come."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    out = [compressor.compress(chunk) for chunk in chunks]
    out.append(compressor.flush())
    return b"".join(out)


def gzip_gzip_bomb() -> bytes:
    """``Content-Encoding: gzip, gzip`` of 4 GiB of zeros: about 6.7 KB on the wire."""
    return gzip_stream(gzip_of_zeros(4 * 1024 * _MIB, crc=CRC32_OF_4_GIB_ZEROS))
