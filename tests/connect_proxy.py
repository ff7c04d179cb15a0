"""A small HTTP CONNECT proxy (RFC 9110 §9.3.6) on 127.0.0.1 that records what it saw.

Each tunnel keeps the CONNECT head as received and every byte it relayed in each direction, so
tests can assert what a proxy can read: the CONNECT line and its header fields in clear, then
only TLS records. It relays to 127.0.0.1 only (never out of the machine). ``mode`` makes it
misbehave: ask for credentials (``credentials``, optionally challenging with another scheme),
refuse with a status, never answer, dribble, answer garbage, or send bytes after its 200.

    with ConnectProxy(credentials=("u", "p")) as proxy:
        ... proxy.url ...
    (tunnel,) = proxy.tunnels
    assert tunnel.target == "127.0.0.1:8443" and b"simpleenroll" not in tunnel.relayed
"""

from __future__ import annotations

import base64
import contextlib
import enum
import select
import socket
import threading
import time
from dataclasses import dataclass, field
from types import TracebackType

__all__ = ["ConnectProxy", "Mode", "Tunnel"]

_MAX_HEAD = 65536


class Mode(enum.Enum):
    RELAY = "relay"  # answer 200 and relay (after the credentials check, if any)
    REFUSE = "refuse"  # answer ``status`` and close
    SILENT = "silent"  # read the CONNECT, never answer, keep the connection open
    DRIBBLE = "dribble"  # answer one byte of an endless head every 50 ms
    RAW = "raw"  # answer ``raw`` verbatim and close
    EARLY = "early"  # answer 200 followed at once by ``raw``, then relay
    CLOSE = "close"  # read the CONNECT and close without a word


@dataclass
class Tunnel:
    """One connection to the proxy: its CONNECT head, the answer, what it relayed."""

    head: bytes
    method: str = ""
    target: str = ""
    #: header field names lower-cased
    headers: dict[str, str] = field(default_factory=dict)
    status: int | None = None
    #: client -> server bytes after the head, as relayed
    upstream: bytearray = field(default_factory=bytearray)
    #: server -> client bytes after the proxy's answer
    downstream: bytearray = field(default_factory=bytearray)

    @property
    def relayed(self) -> bytes:
        """Everything the proxy saw after the CONNECT head, both directions."""
        return bytes(self.upstream) + b"\n" + bytes(self.downstream)


@dataclass
class ConnectProxy:
    mode: Mode = Mode.RELAY
    #: (user, password) the proxy requires as Proxy-Authorization: Basic, else 407
    credentials: tuple[str, str] | None = None
    #: the scheme of the 407 challenge (Proxy-Authenticate, RFC 9110 §11.7.1)
    challenge: str = 'Basic realm="test proxy"'
    status: int = 403
    raw: bytes = b""
    tunnels: list[Tunnel] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self._port = int(self._listener.getsockname()[1])
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._workers: list[threading.Thread] = []
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def connections(self) -> int:
        return len(self.tunnels)

    def __enter__(self) -> ConnectProxy:
        self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        with self._lock:
            for sock in self._sockets:
                sock.close()
        for worker in self._workers:
            worker.join(timeout=5)
        self._listener.close()

    # -- serving ------------------------------------------------------------------------------
    def _keep(self, sock: socket.socket) -> socket.socket:
        with self._lock:
            self._sockets.append(sock)
        return sock

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._keep(client)
            worker = threading.Thread(target=self._connection, args=(client,), daemon=True)
            self._workers.append(worker)
            worker.start()

    def _connection(self, client: socket.socket) -> None:
        client.settimeout(10)
        try:
            tunnel = self._read_head(client)
            if tunnel is None:
                return
            self.tunnels.append(tunnel)
            self._answer(client, tunnel)
        except OSError as exc:
            self.errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            client.close()

    def _read_head(self, client: socket.socket) -> Tunnel | None:
        data = b""
        while b"\r\n\r\n" not in data and len(data) < _MAX_HEAD:
            piece = client.recv(4096)
            if not piece:
                return None
            data += piece
        head, _, rest = data.partition(b"\r\n\r\n")
        tunnel = Tunnel(head=head + b"\r\n\r\n")
        tunnel.upstream += rest
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) == 3:
            tunnel.method, tunnel.target = parts[0], parts[1]
        for line in lines[1:]:
            name, _, value = line.partition(":")
            tunnel.headers[name.strip().lower()] = value.strip()
        return tunnel

    def _authorized(self, tunnel: Tunnel) -> bool:
        if self.credentials is None:
            return True
        token = base64.b64encode(":".join(self.credentials).encode()).decode()
        return tunnel.headers.get("proxy-authorization") == f"Basic {token}"

    def _answer(self, client: socket.socket, tunnel: Tunnel) -> None:
        mode = self.mode
        if not self._authorized(tunnel):
            tunnel.status = 407
            client.sendall(
                b"HTTP/1.1 407 Proxy Authentication Required\r\n"
                + f"Proxy-Authenticate: {self.challenge}\r\n".encode()
                + b"Content-Length: 0\r\n\r\n"
            )
            _drain(client)
            return
        if mode is Mode.REFUSE:
            tunnel.status = self.status
            body = b"no tunnel for you\n"
            client.sendall(
                f"HTTP/1.1 {self.status} Refused\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            _drain(client)
            return
        if mode is Mode.CLOSE:
            return
        if mode is Mode.SILENT:
            self._stop.wait(30)
            return
        if mode is Mode.DRIBBLE:
            client.sendall(b"HTTP/1.1 200 OK\r\n")
            while not self._stop.wait(0.05):
                client.sendall(b"X")
            return
        if mode is Mode.RAW:
            client.sendall(self.raw)
            _drain(client)
            return
        host, _, port = tunnel.target.rpartition(":")
        if tunnel.method != "CONNECT" or host not in ("127.0.0.1", "localhost"):
            tunnel.status = 403  # never relays out of the machine
            client.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
            return
        try:
            upstream = self._keep(socket.create_connection(("127.0.0.1", int(port)), timeout=5))
        except OSError:
            tunnel.status = 502
            client.sendall(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
            return
        tunnel.status = 200
        # (EARLY: in the same segment, so the client has them before its ClientHello)
        extra = self.raw if mode is Mode.EARLY else b""
        client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n" + extra)
        try:
            if tunnel.upstream:
                upstream.sendall(tunnel.upstream)
            self._relay(client, upstream, tunnel)
        finally:
            upstream.close()

    def _relay(self, client: socket.socket, upstream: socket.socket, tunnel: Tunnel) -> None:
        """Both directions until both are closed; a FIN is passed on as a FIN."""
        record = {client: tunnel.upstream, upstream: tunnel.downstream}
        other = {client: upstream, upstream: client}
        open_ = {client, upstream}
        while open_ and not self._stop.is_set():
            readable, _, _ = select.select(list(open_), [], [], 0.1)
            for sock in readable:
                try:
                    data = sock.recv(65536)
                except OSError:
                    data = b""
                if data:
                    record[sock] += data
                    try:
                        other[sock].sendall(data)
                    except OSError:
                        open_.discard(sock)
                    continue
                open_.discard(sock)
                with contextlib.suppress(OSError):
                    other[sock].shutdown(socket.SHUT_WR)


def _drain(client: socket.socket) -> None:
    """Read on briefly until the client closes: closing with unread data would reset the
    connection and could destroy the answer in flight."""
    client.shutdown(socket.SHUT_WR)
    client.settimeout(2)
    deadline = time.monotonic() + 2
    with contextlib.suppress(OSError):
        while time.monotonic() < deadline and client.recv(65536):
            pass
