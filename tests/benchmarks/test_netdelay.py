"""benchmarks/netdelay.py: the delaying TCP proxy adds RTT/2 per direction, keeps the byte order,
and counts connections, bytes and round trips (lower bounds on time only: a sleep never ends
early)."""

from __future__ import annotations

import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from netdelay import DelayProxy

pytestmark = pytest.mark.integration


@pytest.fixture
def echo_port() -> Iterator[int]:
    """A server that answers every chunk with the same bytes, upper-cased."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data.upper())

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    yield listener.getsockname()[1]
    stop.set()
    listener.close()


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, "closed early"
        data += chunk
    return data


def test_round_trips_cost_the_rtt_and_are_counted(echo_port: int) -> None:
    rtt = 0.2
    with DelayProxy(("127.0.0.1", echo_port), rtt) as proxy:
        started = time.perf_counter()
        with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
            sock.sendall(b"hello")
            assert _recv_exactly(sock, 5) == b"HELLO"
            first = time.perf_counter() - started
            started = time.perf_counter()
            sock.sendall(b"again")
            assert _recv_exactly(sock, 5) == b"AGAIN"
            second = time.perf_counter() - started
        time.sleep(rtt)  # let the close travel
        stats = proxy.reset()
    # the first exchange pays the TCP handshake (1 RTT) and then its own round trip
    assert first >= 2 * rtt
    assert second >= rtt
    assert (stats.connections, stats.turns, stats.round_trips) == (1, 2, 3)
    assert (stats.bytes_up, stats.bytes_down) == (10, 10)
    assert proxy.stats.round_trips == 0  # reset


def test_a_burst_keeps_its_order(echo_port: int) -> None:
    payload = b"".join(f"{i:05d}".encode() for i in range(2000))
    with (
        DelayProxy(("127.0.0.1", echo_port), 0.05) as proxy,
        socket.create_connection(("127.0.0.1", proxy.port)) as sock,
    ):
        for start in range(0, len(payload), 1000):
            sock.sendall(payload[start : start + 1000])
        assert _recv_exactly(sock, len(payload)) == payload.upper()


def test_negative_rtt_is_refused() -> None:
    with pytest.raises(ValueError, match="rtt must not be negative"):
        DelayProxy(("127.0.0.1", 1), -0.1)
