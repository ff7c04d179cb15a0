"""The card side of the vpcd protocol against a fake vpcd on 127.0.0.1 (no pcscd needed).

The fake plays vpcd's part byte for byte: 2-byte big-endian length + payload, 1-byte control
codes, the length and the payload written separately as Debian's vpcd does.
"""

from __future__ import annotations

import logging
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from est_agent.sim.pcsc_stack import CardThread, stop_process
from est_agent.sim.vpcd import ServeOutcome, VpcdCardServer, parse_vpcd_address
from tests.integration.stub_card import StubCard

pytestmark = pytest.mark.integration


class FakeVpcd:
    def __init__(self, port: int = 0) -> None:
        self.listener = socket.create_server(("127.0.0.1", port))
        self.listener.settimeout(5.0)
        self.port = int(self.listener.getsockname()[1])
        self.conn: socket.socket | None = None

    def accept(self) -> socket.socket:
        self.conn, _ = self.listener.accept()
        self.conn.settimeout(5.0)
        return self.conn

    def send(self, payload: bytes) -> None:
        assert self.conn is not None
        self.conn.sendall(len(payload).to_bytes(2, "big"))  # two writes, like vpcd
        self.conn.sendall(payload)

    def recv(self) -> bytes:
        header = self._exact(2)
        return self._exact(int.from_bytes(header, "big"))

    def _exact(self, n: int) -> bytes:
        assert self.conn is not None
        buf = b""
        while len(buf) < n:
            chunk = self.conn.recv(n - len(buf))
            if not chunk:
                raise EOFError
            buf += chunk
        return buf

    def exchange(self, apdu: bytes) -> bytes:
        self.send(apdu)
        return self.recv()

    def close_conn(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def close(self) -> None:
        self.close_conn()
        self.listener.close()


@pytest.fixture
def vpcd() -> Iterator[FakeVpcd]:
    fake = FakeVpcd()
    try:
        yield fake
    finally:
        fake.close()


def test_parse_vpcd_address() -> None:
    assert parse_vpcd_address("127.0.0.1:35963") == ("127.0.0.1", 35963)
    assert parse_vpcd_address("35964") == ("127.0.0.1", 35964)
    assert parse_vpcd_address("[::1]:1") == ("::1", 1)
    for bad in ("host:port", "h:0", "h:70000"):
        with pytest.raises(Exception, match="vpcd"):
            parse_vpcd_address(bad)


def test_control_codes_and_apdus(vpcd: FakeVpcd) -> None:
    card = StubCard(1)
    runner = CardThread.start(card, vpcd.port)
    try:
        vpcd.accept()
        vpcd.send(b"\x04")
        assert vpcd.recv() == card.atr
        vpcd.send(b"\x01")  # power on: no reply
        vpcd.send(b"\x02")  # reset: no reply
        vpcd.send(b"\x00")  # power off: no reply
        vpcd.send(b"\x01")
        assert vpcd.exchange(bytes.fromhex("0070000001")) == b"\x01\x90\x00"
        big = bytes(range(256)) * 16  # extended length passes through untouched
        command = b"\x80\x10\x00\x00\x00" + len(big).to_bytes(2, "big") + big
        assert vpcd.exchange(command) == big + b"\x90\x00"
        assert (card.powered_on, card.resets) == (2, 1)
    finally:
        assert runner.stop() is ServeOutcome.STOPPED
    assert runner.server.apdus_answered == 2


def test_power_cut_after_n_apdus(vpcd: FakeVpcd) -> None:
    card = StubCard(2)
    runner = CardThread.start(card, vpcd.port, power_cut_after=3)
    vpcd.accept()
    for i in range(3):
        vpcd.send(b"\x04")  # presence polls do not count
        assert vpcd.recv() == card.atr
        assert vpcd.exchange(bytes([0x80, 0x01, 0, 0, 1, i])) == bytes([i, 0x90, 0x00])
    with pytest.raises((EOFError, ConnectionError)):
        vpcd.exchange(bytes.fromhex("8001000001FF"))
    assert runner.join() is ServeOutcome.POWER_CUT
    assert len(card.apdus) == 3  # the 4th never reached the card


def test_waits_for_vpcd_and_reconnects() -> None:
    probe = socket.create_server(("127.0.0.1", 0))
    port = int(probe.getsockname()[1])
    probe.close()  # nobody listens yet: the card must keep retrying
    card = StubCard(3)
    ready = threading.Event()
    server = VpcdCardServer(card, "127.0.0.1", port, on_ready=ready.set)
    runner = CardThread(server)
    runner._thread.start()
    time.sleep(0.3)
    assert not ready.is_set()
    fake = FakeVpcd(port)
    try:
        fake.accept()
        assert ready.wait(2.0)
        fake.send(b"\x04")
        assert fake.recv() == card.atr
        fake.close_conn()  # vpcd goes away (pcscd restart) ...
        fake.accept()  # ... and the card comes back by itself
        fake.send(b"\x04")
        assert fake.recv() == card.atr
        assert server.connections == 2
    finally:
        fake.close()
        assert runner.stop() is ServeOutcome.STOPPED


def test_no_reconnect_when_told(vpcd: FakeVpcd) -> None:
    runner = CardThread.start(StubCard(4), vpcd.port, reconnect=False)
    vpcd.accept()
    vpcd.close_conn()
    assert runner.join() is ServeOutcome.DISCONNECTED


def test_stop_wakes_a_blocked_read_quickly(vpcd: FakeVpcd) -> None:
    runner = CardThread.start(StubCard(5), vpcd.port)
    vpcd.accept()
    started = time.monotonic()
    assert runner.stop() is ServeOutcome.STOPPED
    assert time.monotonic() - started < 1.0


def test_card_exception_answers_6f00_and_keeps_serving(
    vpcd: FakeVpcd, caplog: pytest.LogCaptureFixture
) -> None:
    class Broken(StubCard):
        def process(self, apdu: bytes) -> bytes:
            if apdu[1] == 0xEE:
                raise ZeroDivisionError
            return super().process(apdu)

    runner = CardThread.start(Broken(6), vpcd.port)
    try:
        vpcd.accept()
        with caplog.at_level(logging.ERROR, logger="est_agent.sim.vpcd"):
            assert vpcd.exchange(bytes.fromhex("80EE0000")) == b"\x6f\x00"
        assert "INS EE" in caplog.text
        assert vpcd.exchange(bytes.fromhex("0070000001")) == b"\x01\x90\x00"
    finally:
        runner.stop()


def test_logs_never_carry_payloads(vpcd: FakeVpcd, caplog: pytest.LogCaptureFixture) -> None:
    secret = bytes.fromhex("5EC12E75EC12E75EC12E75EC12E75EC1")
    runner = CardThread.start(StubCard(7), vpcd.port)
    try:
        vpcd.accept()
        with caplog.at_level(logging.DEBUG, logger="est_agent.sim.vpcd"):
            reply = vpcd.exchange(b"\x80\x2b\x80\x01" + bytes([len(secret)]) + secret)
        assert reply == secret + b"\x90\x00"
        assert "INS 2B" in caplog.text
        assert secret.hex() not in caplog.text.lower()
        assert secret.hex().upper() not in caplog.text
    finally:
        runner.stop()


def test_tcp_options_are_set(vpcd: FakeVpcd) -> None:
    tuned = CardThread.start(StubCard(8), vpcd.port)
    try:
        vpcd.accept()
        vpcd.send(b"\x04")
        vpcd.recv()
        sock = tuned.server._sock
        assert sock is not None
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        tuned.stop()


def test_sigterm_while_waiting_for_vpcd(tmp_path: Path) -> None:
    """The card process keeps retrying while vpcd is absent, and SIGTERM still ends it at once."""
    from est_agent.sim.personalize import personalize

    state = tmp_path / "sim.json"
    personalize(state)
    probe = socket.create_server(("127.0.0.1", 0))
    port = int(probe.getsockname()[1])
    probe.close()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "est_agent",
            "sim",
            "serve",
            str(state),
            "--vpcd",
            f"127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        time.sleep(1.0)  # long enough for several connection attempts with backoff
        assert proc.poll() is None
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0
        assert time.monotonic() - started < 1.5
    finally:
        stop_process(proc)
        if proc.stderr is not None:
            proc.stderr.close()


def test_stop_from_signal_needs_no_lock(vpcd: FakeVpcd) -> None:
    runner = CardThread.start(StubCard(9), vpcd.port)
    vpcd.accept()
    with runner.server._lock:  # as if the signal arrived while the loop held the lock
        runner.server.stop_from_signal(signal.SIGTERM)
    assert runner.join() is ServeOutcome.STOPPED
    assert runner.server.stopped_by_signal == signal.SIGTERM
