"""A TCP proxy on 127.0.0.1 that adds a network round-trip time (benchmarks only).

Why a proxy and not ``tc qdisc ... netem``: netem needs the ``sch_netem`` kernel module, which
these containers lack ("Specified qdisc kind is unknown" inside ``unshare -n``), and a proxy
needs neither root nor a namespace, so the benchmark runs from a fresh clone anywhere.

Model: every chunk read from one side is delivered to the other side ``rtt/2`` after it was
read (one-way delay per direction, per segment burst as the kernel hands it over), in order.
TCP's own handshake costs one RTT before the client's first byte leaves (RFC 9293 §3.5: the
client may send data only after SYN, SYN-ACK; the ACK rides with its first segment), so a
connection's first client bytes are held until ``accepted + rtt`` and then travel ``rtt/2``.
Bandwidth is not modelled (the enrollment moves ~10 KB; at 1 Mbit/s that is 80 ms, listed
separately by the benchmark if it matters).

Counters (``ProxyStats``): connections, bytes per direction, and *round trips used*: one per
connection (the TCP handshake) plus one per turn, a turn being server bytes arriving after
client bytes (the client sent something and the server answered). A TLS 1.3 NewSessionTicket
that crosses the client's first request can count one turn more than the client waited.
"""

from __future__ import annotations

import contextlib
import queue
import socket
import threading
import time
from dataclasses import dataclass, field

__all__ = ["DelayProxy", "ProxyStats"]

_CHUNK = 65536


@dataclass
class ProxyStats:
    connections: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    turns: int = 0
    _last: str = field(default="", repr=False)

    @property
    def round_trips(self) -> int:
        return self.connections + self.turns


class DelayProxy:
    """``with DelayProxy(("127.0.0.1", port), rtt_s=0.3) as proxy:`` connect to ``proxy.port``."""

    def __init__(self, target: tuple[str, int], rtt_s: float) -> None:
        if rtt_s < 0:
            raise ValueError("rtt must not be negative")
        self.target = target
        self.rtt_s = rtt_s
        self.stats = ProxyStats()
        self._lock = threading.Lock()
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port: int = self._listener.getsockname()[1]
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> DelayProxy:
        thread = threading.Thread(target=self._accept_loop, name="delay-proxy", daemon=True)
        thread.start()
        self._threads.append(thread)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self._listener.close()

    def reset(self) -> ProxyStats:
        """The counters so far; counting starts again from zero."""
        with self._lock:
            stats, self.stats = self.stats, ProxyStats()
        return stats

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            accepted = time.monotonic()
            with self._lock:
                self.stats.connections += 1
            try:
                server = socket.create_connection(self.target, timeout=10)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            for sock in (client, server):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # client -> server waits for the emulated handshake; server -> client does not
            # (the server speaks only after the client in every protocol used here)
            done = threading.Semaphore(0)
            self._pipe(client, server, "up", accepted + self.rtt_s, done)
            self._pipe(server, client, "down", 0.0, done)
            threading.Thread(target=_close_after, args=(done, client, server), daemon=True).start()

    def _pipe(
        self,
        src: socket.socket,
        dst: socket.socket,
        way: str,
        not_before: float,
        done: threading.Semaphore,
    ) -> None:
        due: queue.Queue[tuple[float, bytes]] = queue.Queue()
        half = self.rtt_s / 2

        def reader() -> None:
            while True:
                try:
                    data = src.recv(_CHUNK)
                except OSError:
                    data = b""
                now = time.monotonic()
                if data:
                    self._count(way, len(data))
                due.put((max(now, not_before) + half, data))
                if not data:
                    return

        def writer() -> None:
            while True:
                when, data = due.get()
                wait = when - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                if not data:
                    with contextlib.suppress(OSError):
                        dst.shutdown(socket.SHUT_WR)
                    done.release()
                    return
                try:
                    dst.sendall(data)
                except OSError:
                    done.release()
                    return

        for target in (reader, writer):
            threading.Thread(target=target, daemon=True).start()

    def _count(self, way: str, size: int) -> None:
        with self._lock:
            stats = self.stats
            if way == "up":
                stats.bytes_up += size
            else:
                stats.bytes_down += size
                if stats._last == "up":
                    stats.turns += 1
            stats._last = way


def _close_after(done: threading.Semaphore, *socks: socket.socket) -> None:
    """Close both sockets once both directions have ended."""
    for _ in range(2):
        done.acquire()
    for sock in socks:
        with contextlib.suppress(OSError):
            sock.close()
