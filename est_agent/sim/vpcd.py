"""The card side of vsmartcard's vpcd protocol: a virtual card served to pcscd over TCP.

vpcd (the pcscd reader driver) listens; the card process is its TCP *client* (the "reversed"
mode, where vpcd connects to the card, crashes pcscd when the card goes away). Every frame in
both directions is a 2-byte big-endian length followed by the payload. A 1-byte payload from
vpcd is a control code (00 power off, 01 power on, 02 reset: no reply; 04 get ATR: reply the
ATR); anything longer is a command APDU, answered with the response APDU. vpcd asks for the ATR
on every presence poll (every 400 ms): a card that does not answer counts as removed.

Latency: Debian's vpcd writes the length and the payload with two ``send`` calls. With Nagle on
vpcd's side and delayed ACK on ours, the payload waits for our ACK of the 2-byte header, which
the kernel delays ~40 ms. Re-arming ``TCP_QUICKACK`` right after reading each header makes the
kernel send that ACK at once; ``TCP_NODELAY`` keeps our own answers from waiting in turn.
(``benchmarks/apdu_roundtrip.py`` measures both ways.)

Faults (``est_agent.sim.faults``) are acted out on the wire: a silent card sends nothing more
on the link (vpcd, which reads the answer with a blocking ``recv``, waits until the card
process ends or vpcd closes the link); a disconnect closes the socket and the card comes back
``_REINSERT_S`` later (a new insertion for pcscd); a delay holds the answer; a truncated
answer goes out as it is (a 0-byte one leaves vpcd waiting in ``recv(MSG_WAITALL)`` for a byte
that never comes: silence, to the host).

Logs carry the INS byte, lengths and SW only: APDUs carry digests, signatures and certificates.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Protocol

from est_agent.errors import EX_UNAVAILABLE, UsageError
from est_agent.sim.faults import CardAnswer, FaultPlan, LinkFault, answer_of

__all__ = [
    "POWER_CUT_EXIT_CODE",
    "ServeOutcome",
    "VpcdCard",
    "VpcdCardServer",
    "parse_vpcd_address",
    "run_sim_server",
    "serve",
]

log = logging.getLogger(__name__)

DEFAULT_VPCD_PORT = 0x8C7B  # 35963, Debian's /etc/reader.conf.d/vpcd
#: exit status of the card process when ``power_cut_after`` dropped the link on purpose
#: (EX_UNAVAILABLE: from the agent's side the card became unreachable)
POWER_CUT_EXIT_CODE = EX_UNAVAILABLE

_CTRL_POWER_OFF = 0x00
_CTRL_POWER_ON = 0x01
_CTRL_RESET = 0x02
_CTRL_GET_ATR = 0x04
_MAX_FRAME = 0xFFFF
_SW_UNKNOWN_ERROR = b"\x6f\x00"
# How often a blocked read wakes up to look at the stop flag.
_POLL_S = 0.2
_BACKOFF_FIRST_S = 0.05
_BACKOFF_MAX_S = 1.0
#: after a disconnect fault: longer than vpcd's 400 ms presence poll, so pcscd sees a removal
_REINSERT_S = 1.0


class VpcdCard(Protocol):
    """What the server needs from a card (``est_agent.sim.card.VirtualCard`` fits)."""

    @property
    def atr(self) -> bytes: ...

    def power_on(self) -> None: ...

    def reset(self) -> None: ...

    def process(self, apdu: bytes) -> bytes: ...


class ServeOutcome(enum.Enum):
    """Why serving ended."""

    STOPPED = "stopped"  # stop() / stop_event / SIGTERM
    POWER_CUT = "power_cut"  # power_cut_after APDUs answered, link dropped on purpose
    DISCONNECTED = "disconnected"  # vpcd closed the link and reconnecting was not wanted


class _LinkClosedError(Exception):
    """vpcd closed the connection (or it broke)."""


class _StopRequestedError(Exception):
    """The stop flag was raised while waiting for data."""


def parse_vpcd_address(value: str) -> tuple[str, int]:
    """Parse ``HOST:PORT`` (``[v6]:PORT`` too); a bare ``PORT`` means 127.0.0.1."""
    host, sep, port_text = value.rpartition(":")
    if not sep:
        host, port_text = "127.0.0.1", value
    host = host.strip("[]") or "127.0.0.1"
    try:
        port = int(port_text, 10)
    except ValueError:
        raise UsageError(f"vpcd address must be HOST:PORT, got {value!r}") from None
    if not 0 < port < 65536:
        raise UsageError(f"vpcd port out of range: {port}")
    return host, port


class VpcdCardServer:
    """Serves one card to vpcd until stopped, power-cut, or (optionally) disconnected.

    Thread-safe to stop: ``stop()`` may be called from another thread or a signal handler.
    ``apdus_answered`` counts command APDUs answered over all connections.
    """

    def __init__(
        self,
        card: VpcdCard,
        host: str = "127.0.0.1",
        port: int = DEFAULT_VPCD_PORT,
        *,
        latency_ms: float = 0.0,
        power_cut_after: int | None = None,
        stop_event: threading.Event | None = None,
        on_ready: Callable[[], None] | None = None,
        reconnect: bool = True,
        tcp_tuning: bool = True,
    ) -> None:
        if latency_ms < 0:
            raise UsageError(f"latency must not be negative: {latency_ms} ms")
        if power_cut_after is not None and power_cut_after < 0:
            raise UsageError(f"power_cut_after must not be negative: {power_cut_after}")
        self.card = card
        self.host = host
        self.port = port
        self.latency_s = latency_ms / 1000.0
        self.power_cut_after = power_cut_after
        self.stop_event = stop_event if stop_event is not None else threading.Event()
        self.on_ready = on_ready
        self.reconnect = reconnect
        # Only for measuring the cost of the Nagle/delayed-ACK trap; never turn off otherwise.
        self.tcp_tuning = tcp_tuning
        self.apdus_answered = 0
        self.connections = 0
        #: command APDUs left unanswered on purpose (silence and disconnect faults)
        self.apdus_withheld = 0
        self._reinsert = False
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        # set by signal handlers, which must not take locks (see stop_from_signal)
        self.stopped_by_signal: int | None = None

    # -- control ---------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the serving loop to end soon; wakes a blocked read by shutting the socket."""
        self.stop_event.set()
        with self._lock:
            sock = self._sock
        if sock is not None:
            # already closed or never connected: the loop sees the flag anyway
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def stop_from_signal(self, signum: int) -> None:
        """``stop()`` for signal handlers: a plain assignment, no locks.

        A handler runs in the main thread between two bytecodes, possibly while that thread
        holds ``_lock`` or the stop event's internal lock: taking either would deadlock. The
        serving loop notices the flag within ``_POLL_S``.
        """
        self.stopped_by_signal = signum

    def _stopping(self) -> bool:
        return self.stopped_by_signal is not None or self.stop_event.is_set()

    def _pause(self, seconds: float) -> None:
        """Sleep ``seconds`` unless asked to stop (checked every ``_POLL_S``)."""
        deadline = time.monotonic() + seconds
        while not self._stopping():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self.stop_event.wait(min(remaining, _POLL_S))

    def serve_forever(self) -> ServeOutcome:
        """Connect to vpcd (retrying with backoff), answer frames, reconnect when it goes away."""
        if self.power_cut_after == 0:
            return ServeOutcome.POWER_CUT
        backoff_s = _BACKOFF_FIRST_S
        while not self._stopping():
            sock = self._open()
            if sock is None:
                # vpcd not listening yet (pcscd starting or restarting): retry, a bit slower
                # each time, but wake soon when asked to stop.
                self._pause(backoff_s)
                backoff_s = min(backoff_s * 2, _BACKOFF_MAX_S)
                continue
            backoff_s = _BACKOFF_FIRST_S
            try:
                outcome = self._serve_connection(sock)
            finally:
                self._close()
            if outcome is not None:
                return outcome
            if not self.reconnect:
                return ServeOutcome.DISCONNECTED
            if self._reinsert:
                self._reinsert = False
                self._pause(_REINSERT_S)
                log.info("disconnect fault: inserting the card again")
            else:
                log.info("vpcd %s:%d closed the link; reconnecting", self.host, self.port)
        return ServeOutcome.STOPPED

    # -- connection ------------------------------------------------------------------------

    def _open(self) -> socket.socket | None:
        try:
            sock = socket.create_connection((self.host, self.port), timeout=_POLL_S * 5)
        except OSError as exc:
            log.debug("vpcd %s:%d not reachable: %s", self.host, self.port, exc)
            return None
        if self.tcp_tuning:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(_POLL_S)
        with self._lock:
            self._sock = sock
        if self._stopping():  # stop() ran between connect and publishing the socket
            self._close()
            return None
        self.connections += 1
        log.info("connected to vpcd %s:%d", self.host, self.port)
        if self.on_ready is not None:
            self.on_ready()
        return sock

    def _close(self) -> None:
        with self._lock:
            sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def _serve_connection(self, sock: socket.socket) -> ServeOutcome | None:
        """Answer frames until the link closes (None) or serving must end (an outcome)."""
        try:
            while not self._stopping():  # checked per frame too: a busy link never times out
                header = self._recv_exact(sock, 2)
                if self.tcp_tuning:
                    # Re-armed per frame: the kernel leaves quick-ACK mode on its own, and
                    # setting it also flushes the pending ACK of the header, releasing
                    # vpcd's Nagle-held payload (see module docstring).
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
                length = int.from_bytes(header, "big")
                payload = self._recv_exact(sock, length) if length else b""
                if len(payload) == 1:
                    self._control(sock, payload[0])
                    continue
                if not payload:
                    log.warning("empty frame from vpcd ignored")
                    continue
                answer = self._answer(payload)
                if answer.delay_s:
                    self._pause(answer.delay_s)
                    if self._stopping():
                        return ServeOutcome.STOPPED
                if answer.link is LinkFault.SILENCE:
                    self.apdus_withheld += 1
                    return self._stay_silent(sock)
                if answer.link is LinkFault.DISCONNECT:
                    self.apdus_withheld += 1
                    log.warning("disconnect fault: dropping the link instead of answering")
                    self._reinsert = True
                    return None
                self._send(sock, answer.response)
                self.apdus_answered += 1
                if self.power_cut_after is not None and self.apdus_answered >= self.power_cut_after:
                    log.warning(
                        "power cut: dropping the link after %d command APDUs", self.apdus_answered
                    )
                    return ServeOutcome.POWER_CUT
            return ServeOutcome.STOPPED
        except _StopRequestedError:
            return ServeOutcome.STOPPED
        except _LinkClosedError:
            return ServeOutcome.STOPPED if self._stopping() else None

    def _stay_silent(self, sock: socket.socket) -> ServeOutcome | None:
        """Answer nothing more on this link: until serving stops, or vpcd closes it."""
        log.warning("silence fault: the command is not answered; the card stays silent")
        while not self._stopping():
            try:
                chunk = sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return None
            if not chunk:
                return None  # vpcd went away (pcscd restarted): a new link gets answers again
        return ServeOutcome.STOPPED

    def _recv_exact(self, sock: socket.socket, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            try:
                chunk = sock.recv(n - len(buf))
            except TimeoutError:
                if self._stopping():
                    raise _StopRequestedError from None
                continue
            except OSError as exc:
                raise _LinkClosedError from exc
            if not chunk:
                raise _LinkClosedError
            buf += chunk
        return bytes(buf)

    def _send(self, sock: socket.socket, payload: bytes) -> None:
        # One write per frame: with length and payload in separate writes our own Nagle would
        # hold the payload back just like vpcd's does.
        try:
            sock.sendall(len(payload).to_bytes(2, "big") + payload)
        except OSError as exc:
            raise _LinkClosedError from exc

    def _control(self, sock: socket.socket, code: int) -> None:
        if code == _CTRL_GET_ATR:
            self._send(sock, self.card.atr)
        elif code == _CTRL_POWER_ON:
            log.debug("power on")
            self.card.power_on()
        elif code == _CTRL_RESET:
            log.debug("reset")
            self.card.reset()
        elif code == _CTRL_POWER_OFF:
            # Nothing to do: volatile state (channels, sessions) is rebuilt by the next power
            # on, which vpcd always sends before the next APDU.
            log.debug("power off")
        else:
            log.warning("unknown vpcd control code %02X ignored", code)

    def _answer(self, apdu: bytes) -> CardAnswer:
        if self.latency_s:
            time.sleep(self.latency_s)
        ins = apdu[1] if len(apdu) > 1 else -1
        try:
            answer = answer_of(self.card, apdu)
        except Exception:
            # A card never goes silent by accident: answer "unknown error" and keep serving,
            # but leave the traceback in the log because this is a bug in the virtual card.
            log.exception("virtual card failed on INS %02X (%d bytes)", ins, len(apdu))
            return CardAnswer(_SW_UNKNOWN_ERROR)
        response = answer.response
        if len(response) > _MAX_FRAME:
            log.error("virtual card answer of %d bytes cannot be framed", len(response))
            return CardAnswer(_SW_UNKNOWN_ERROR)
        if answer.link is None:
            # (fewer than 2 bytes only come from a truncate fault: sent as they are)
            log.debug(
                "INS %02X: %d bytes in, %d bytes out, SW %s",
                ins,
                len(apdu),
                len(response),
                response[-2:].hex().upper(),
            )
        return answer


def serve(
    card: VpcdCard,
    host: str,
    port: int,
    *,
    latency_ms: float = 0.0,
    power_cut_after: int | None = None,
    stop_event: threading.Event | None = None,
    on_ready: Callable[[], None] | None = None,
) -> ServeOutcome:
    """Serve ``card`` to the vpcd at ``host:port`` until stopped or power-cut."""
    server = VpcdCardServer(
        card,
        host,
        port,
        latency_ms=latency_ms,
        power_cut_after=power_cut_after,
        stop_event=stop_event,
        on_ready=on_ready,
    )
    return server.serve_forever()


def run_sim_server(
    state_path: str | Path,
    vpcd: str,
    *,
    t0_mode: bool = False,
    implicit_channel_open: bool = True,
    latency_ms: float = 0.0,
    trace_path: str | Path | None = None,
    power_cut_after: int | None = None,
    faults: FaultPlan | None = None,
    keygen_ms: float = 0.0,
    sign_ms: float = 0.0,
) -> int:
    """Load the virtual SIM from ``state_path`` and serve it to vpcd; return the exit status.

    ``keygen_ms``/``sign_ms``: card time of GENERATE KEY PAIR and of a signature
    (``est_agent.sim.latency``), on top of ``latency_ms`` per APDU.

    0 when stopped (SIGTERM/SIGINT), ``POWER_CUT_EXIT_CODE`` after a simulated power cut.
    Errors (missing state file, bad address) propagate as ``EstAgentError`` for the CLI to map.
    """
    # Imported here: the card model pulls in cryptography, which `--help` should not pay for.
    from est_agent.sim.card import VirtualCard
    from est_agent.sim.latency import CardTiming, TimedCard
    from est_agent.sim.options import CardOptions

    timing = CardTiming(keygen_ms=keygen_ms, sign_ms=sign_ms)
    host, port = parse_vpcd_address(vpcd)
    options = CardOptions(t0_mode=t0_mode, implicit_channel_open=implicit_channel_open)
    card = VirtualCard.load(Path(state_path), options, faults=faults)
    if faults:
        log.info("faults: %s", faults.describe())
    tracer = _attach_trace(card, trace_path)
    served: VpcdCard = TimedCard(card, timing) if timing else card  # type: ignore[assignment]
    server = VpcdCardServer(
        served, host, port, latency_ms=latency_ms, power_cut_after=power_cut_after
    )
    restore = _install_stop_signals(server)
    try:
        outcome = server.serve_forever()
    finally:
        restore()
        if tracer is not None:
            tracer.close()
    if server.stopped_by_signal is not None:
        log.info("signal %d: stopped", server.stopped_by_signal)
    log.info("card server ended: %s after %d APDUs", outcome.value, server.apdus_answered)
    return POWER_CUT_EXIT_CODE if outcome is ServeOutcome.POWER_CUT else 0


class _Closeable(Protocol):
    def close(self) -> None: ...


def _attach_trace(card: object, trace_path: str | Path | None) -> _Closeable | None:
    if trace_path is None:
        return None
    from est_agent.sim.trace import attach_trace  # the trace format belongs to the card model

    return attach_trace(card, Path(trace_path))


def _install_stop_signals(server: VpcdCardServer) -> Callable[[], None]:
    """Stop cleanly on SIGTERM/SIGINT (main thread only); return a function undoing it."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def _handler(signum: int, frame: FrameType | None) -> None:
        server.stop_from_signal(signum)

    previous = {sig: signal.signal(sig, _handler) for sig in (signal.SIGTERM, signal.SIGINT)}

    def _restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    return _restore
