"""An emulated cellular modem on a pty, answering 3GPP TS 27.007 SIM-access AT commands from the
virtual SIM: the ``modem:`` transport's counterpart for tests and the demo.

The command lines are parsed here from the modem's side, as TS 27.007 words them, and not with
the agent's codec (``est_agent.transport.at``), so a misreading shared by both ends is less
likely to pass. Answered: ``AT``, ``ATE0``/``ATE1`` (V.250 §6.2.4), ``AT+CMEE`` (§9.1: 0 plain
``ERROR``, 1 numeric, 2 verbose ``+CME ERROR``), ``AT+CSIM`` (§8.17), ``AT+CCHO`` (§8.43: MANAGE
CHANNEL + SELECT by AID on the card, session id = channel number), ``AT+CCHC`` (§8.44),
``AT+CGLA`` (§8.45: strict, the CLA must address the session's channel), ``AT+CIMI`` (§5.6),
``AT+CGSN`` (§5.4), ``AT+CCID`` (vendor, common) and the ``=?`` test forms, several on one
line as V.250 §5.4, §5.6 allows (``ATE0+CMEE=1``).

Quirks seen on real modems, each switchable (``ModemQuirks``): echo that ``ATE0`` does not turn
off, URCs injected between a command and its answer, no ``AT+CCHO``/``AT+CGLA``/``AT+CCHC``,
an ``AT+CSIM`` that refuses logical channels (MANAGE CHANNEL or a non-zero channel in CLA:
``+CME ERROR: 3``), slow answers, a modem that stops answering after N commands, and
lowercase unquoted hex.

Card faults (``est_agent.sim.faults``) apply behind the modem too, since it answers from the
same card: a silent card leaves the AT command without a final result code (the echo, if any,
has gone out), a disconnected one makes the modem answer ``+CME ERROR: 10`` (SIM not
inserted), a delay holds the answer, a truncated answer goes out in ``+CSIM``/``+CGLA``.

``PtyModem`` serves one ``EmulatedModem`` on a fresh pty (``os.openpty``; the slave end is put
in raw mode and kept open here, so clients may come and go), optionally symlinked at a stable
path; ``serve_forever`` runs in the caller's thread, ``start`` in a daemon thread.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import select
import threading
import time
import tty
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from est_agent.errors import UsageError
from est_agent.sim.faults import CardAnswer, FaultPlan, LinkFault, answer_of
from est_agent.transport.cla import channel_from_cla, cla_for_channel

if TYPE_CHECKING:
    from est_agent.sim.latency import CardTiming

__all__ = ["EmulatedModem", "ModemCard", "ModemQuirks", "PtyModem", "run_modem_server"]

log = logging.getLogger(__name__)

DEFAULT_IMEI = "356938035643809"
# injected in turn when ModemQuirks.urc is on: network registration (§7.2), an incoming call
# (V.250 §6.3.4 RING), a Quectel indication, a Huawei-style signal report
_URCS = ("+CREG: 1", "RING", '+QIND: "csq",20,99', "^RSSI: 17")
# TS 27.007 §9.2.1
_CME_TEXT = {
    3: "operation not allowed",
    4: "operation not supported",
    10: "SIM not inserted",
    21: "invalid index",
}
_CME_NOT_ALLOWED = 3
_CME_NOT_SUPPORTED = 4
_CME_SIM_NOT_INSERTED = 10
_CME_INVALID_INDEX = 21
_LINE_MAX = 2 * 65538 + 64
_POLL_S = 0.2


class ModemCard(Protocol):
    """What the modem needs from the card (``VirtualCard`` fits)."""

    def process(self, apdu: bytes) -> bytes: ...


@dataclass(frozen=True)
class ModemQuirks:
    """Switches for behaviours real modems differ in (module docstring)."""

    echo: bool = False
    urc: bool = False
    csim_only: bool = False
    csim_basic_only: bool = False
    slow_ms: float = 0.0
    hang_after: int | None = None
    lowercase_hex: bool = False
    imei: str = DEFAULT_IMEI

    def __post_init__(self) -> None:
        if self.slow_ms < 0:
            raise UsageError("modem latency must not be negative")
        if self.hang_after is not None and self.hang_after < 0:
            raise UsageError("modem hang-after must not be negative")
        if not (self.imei.isdigit() and 14 <= len(self.imei) <= 16):
            raise UsageError(f"IMEI must be 14..16 digits, got {self.imei!r}")


class _CmeError(Exception):
    def __init__(self, code: int) -> None:
        self.code = code


class _SilentCardError(Exception):
    """The card never answered (a silence fault): the command line gets no result code."""


# TS 27.007 syntax, from the modem's side: <length>,"<hex>" (quotes optional on input too)
_CSIM = re.compile(r'^\+CSIM=(\d+),"?([0-9A-Fa-f]*)"?$')
_CGLA = re.compile(r'^\+CGLA=(\d+),(\d+),"?([0-9A-Fa-f]*)"?$')
_CCHO = re.compile(r'^\+CCHO="?([0-9A-Fa-f]{10,32})"?$')
_CCHC = re.compile(r"^\+CCHC=(\d+)$")
_CMEE = re.compile(r"^\+CMEE=([012])$")
_BASIC = re.compile(r"^(?:&?[A-Za-z]\d*)*")  # V.250 §5.3.1 basic syntax commands
_BASIC_ONE = re.compile(r"&?[A-Za-z]\d*")


class EmulatedModem:
    """The AT dialogue: ``handle(line)`` returns the bytes a modem would write back.

    ``commands`` counts command lines answered; after ``hang_after`` of them nothing is
    answered any more (not even echo), as when a modem's firmware wedges.
    """

    def __init__(
        self,
        card: ModemCard,
        quirks: ModemQuirks = ModemQuirks(),
        *,
        iccid: str = "",
        lock: threading.Lock | None = None,
    ) -> None:
        self.card = card
        self.quirks = quirks
        self.iccid = iccid
        self._lock = lock or threading.Lock()
        self.echo = True  # V.250 factory default
        self.cmee = 0
        self.sessions: dict[int, int] = {}
        self.commands = 0
        self.apdus = 0
        self._urc_turn = 0

    @property
    def hung(self) -> bool:
        return self.quirks.hang_after is not None and self.commands >= self.quirks.hang_after

    def handle(self, line: str) -> bytes:
        if self.hung:
            return b""
        self.commands += 1
        out = line.encode("ascii", "replace") + b"\r" if self.echo or self.quirks.echo else b""
        if self.quirks.slow_ms:
            time.sleep(self.quirks.slow_ms / 1000)
        if self.quirks.urc:
            out += self._urc()
        try:
            info = self._execute(line.strip())
        except _CmeError as exc:
            return out + self._error(exc.code)
        except _SilentCardError:
            log.warning("emulated modem: the card does not answer; no result code")
            return out
        if info is None:
            return out + b"\r\nERROR\r\n"
        for text in info:
            out += b"\r\n" + text.encode("ascii") + b"\r\n"
            if self.quirks.urc:
                out += self._urc()
        return out + b"\r\nOK\r\n"

    def _urc(self) -> bytes:
        text = _URCS[self._urc_turn % len(_URCS)]
        self._urc_turn += 1
        return b"\r\n" + text.encode("ascii") + b"\r\n"

    def _error(self, code: int) -> bytes:
        if self.cmee == 1:
            return f"\r\n+CME ERROR: {code}\r\n".encode()
        if self.cmee == 2:
            return f"\r\n+CME ERROR: {_CME_TEXT.get(code, 'unknown')}\r\n".encode()
        return b"\r\nERROR\r\n"

    def _hex(self, data: bytes) -> str:
        if self.quirks.lowercase_hex:
            return data.hex()  # lowercase, and unquoted (seen on some modules)
        return f'"{data.hex().upper()}"'

    def _process(self, apdu: bytes) -> bytes:
        self.apdus += 1
        with self._lock:
            answer: CardAnswer = answer_of(self.card, apdu)
        if answer.delay_s:
            time.sleep(answer.delay_s)
        if answer.link is LinkFault.SILENCE:
            raise _SilentCardError
        if answer.link is LinkFault.DISCONNECT:
            raise _CmeError(_CME_SIM_NOT_INSERTED)
        return answer.response

    def _execute(self, line: str) -> list[str] | None:
        """Information lines of a successful command line, None for ERROR (or raise _CmeError).

        V.250 §5.4, §5.6: basic commands (``E0``) first, then extended ones (``+CMEE=1``) separated
        by ``;``; the first failing command ends the line with its error.
        """
        if not line.upper().startswith("AT"):
            return None
        body = line[2:]
        basic = _BASIC.match(body)
        assert basic is not None  # the pattern matches the empty string
        rest = body[basic.end() :]
        if rest and not rest.startswith("+"):
            return None
        info: list[str] = []
        commands = _BASIC_ONE.findall(basic.group(0)) + (rest.split(";") if rest else [])
        for command in commands:
            answer = self._execute_one(command)
            if answer is None:
                return None
            info += answer
        return info

    def _execute_one(self, command: str) -> list[str] | None:
        head = command.upper()
        if head in ("E", "E0", "E1"):
            self.echo = head == "E1"
            return []
        if head in ("V1", "Q0"):  # verbose result codes, results not suppressed: the defaults
            return []
        if head in ("+CSIM=?", "+CMEE=?"):
            return []
        if head in ("+CCHO=?", "+CGLA=?", "+CCHC=?"):
            return None if self.quirks.csim_only else []
        if head == "+CGSN":
            return [self.quirks.imei]
        if head == "+CCID":
            return [f"+CCID: {self.iccid}"] if self.iccid else None
        if head == "+CIMI":
            # no IMSI in the virtual SIM's state: a test-network one (MCC 001, MNC 01) from it
            return [f"00101{self.iccid[-10:]:0>10}"]
        if match := _CMEE.match(head):
            self.cmee = int(match.group(1))
            return []
        if match := _CSIM.match(head):
            return self._csim(int(match.group(1)), match.group(2))
        if head.startswith(("+CCHO", "+CGLA", "+CCHC")) and self.quirks.csim_only:
            return None
        if match := _CCHO.match(head):
            return self._ccho(bytes.fromhex(match.group(1)))
        if match := _CGLA.match(head):
            return self._cgla(int(match.group(1)), int(match.group(2)), match.group(3))
        if match := _CCHC.match(head):
            return self._cchc(int(match.group(1)))
        return None

    def _command_bytes(self, length: int, text: str) -> bytes:
        # §8.17: <length> counts the characters of <command>
        if length != len(text) or len(text) % 2 or len(text) < 8:
            raise _CmeError(_CME_NOT_ALLOWED)
        return bytes.fromhex(text)

    def _csim(self, length: int, text: str) -> list[str]:
        apdu = self._command_bytes(length, text)
        if self.quirks.csim_basic_only and (apdu[1] == 0x70 or channel_from_cla(apdu[0]) != 0):
            raise _CmeError(_CME_NOT_ALLOWED)
        response = self._process(apdu)
        return [f"+CSIM: {2 * len(response)},{self._hex(response)}"]

    def _ccho(self, aid: bytes) -> list[str]:
        opened = self._process(b"\x00\x70\x00\x00\x01")
        if len(opened) != 3 or opened[1:] != b"\x90\x00":
            raise _CmeError(_CME_NOT_ALLOWED)
        channel = opened[0]
        by_aid = bytes([cla_for_channel(channel), 0xA4, 0x04, 0x00, len(aid)]) + aid
        selected = self._process(by_aid)
        if selected[-2:] != b"\x90\x00" and selected[-2] != 0x61:
            self._process(bytes([0x00, 0x70, 0x80, channel, 0x00]))
            raise _CmeError(_CME_NOT_ALLOWED)
        self.sessions[channel] = channel
        return [str(channel)]  # §8.43: the bare <sessionid>

    def _cgla(self, session: int, length: int, text: str) -> list[str]:
        apdu = self._command_bytes(length, text)
        channel = self.sessions.get(session)
        if channel is None:
            raise _CmeError(_CME_INVALID_INDEX)
        if channel_from_cla(apdu[0]) != channel:
            raise _CmeError(_CME_NOT_ALLOWED)
        response = self._process(apdu)
        return [f"+CGLA: {2 * len(response)},{self._hex(response)}"]

    def _cchc(self, session: int) -> list[str]:
        channel = self.sessions.pop(session, None)
        if channel is None:
            raise _CmeError(_CME_INVALID_INDEX)
        self._process(bytes([0x00, 0x70, 0x80, channel, 0x00]))
        return []


class PtyModem:
    """Serves an ``EmulatedModem`` on a pty; ``path`` is the slave device, ``link`` a symlink."""

    def __init__(self, modem: EmulatedModem, link: str | os.PathLike[str] | None = None) -> None:
        self.modem = modem
        self._master, self._slave = os.openpty()
        # raw: no echo or CR->NL mapping by the line discipline before any client sets it
        tty.setraw(self._slave)
        self.path = os.ttyname(self._slave)
        self.link = Path(os.fspath(link)) if link is not None else None
        if self.link is not None:
            tmp = self.link.with_name(f".{self.link.name}.{os.getpid()}")
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            os.symlink(self.path, tmp)
            os.replace(tmp, self.link)  # atomic: a client never sees a half-made link
        self._wake_r, self._wake_w = os.pipe()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._buffer = b""

    @property
    def device(self) -> str:
        """What a client opens: the link if there is one, else the pty itself."""
        return str(self.link) if self.link is not None else self.path

    def start(self) -> PtyModem:
        self._thread = threading.Thread(target=self.serve_forever, name="pty-modem", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.close()

    def close(self) -> None:
        for fd in (self._master, self._slave, self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._master = self._slave = self._wake_r = self._wake_w = -1
        if self.link is not None and self.link.is_symlink():
            with contextlib.suppress(FileNotFoundError):
                self.link.unlink()

    def __enter__(self) -> PtyModem:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop_soon(self) -> None:
        """For signal handlers: only set the flag (the loop looks every 0.2 s)."""
        self._stop.set()

    def serve_forever(self) -> None:
        while not self._stop.is_set():
            try:
                ready, _, _ = select.select([self._master, self._wake_r], [], [], _POLL_S)
            except (OSError, ValueError):
                return  # closed under us: stopping
            if self._wake_r in ready:
                return
            if self._master not in ready:
                continue
            try:
                data = os.read(self._master, 4096)
            except OSError:
                time.sleep(_POLL_S)  # EIO: no slave open (cannot happen while we hold one)
                continue
            self._feed(data)

    def _feed(self, data: bytes) -> None:
        self._buffer += data
        while True:
            # S3 (\r) ends a command line (V.250 §5.2.1); a stray \n is ignored
            cut = self._buffer.find(b"\r")
            if cut < 0:
                break
            raw, self._buffer = self._buffer[:cut], self._buffer[cut + 1 :]
            line = raw.replace(b"\n", b"").decode("ascii", "replace").strip()
            if line:
                self._write(self.modem.handle(line))
        if len(self._buffer) > _LINE_MAX:
            log.warning("emulated modem: %d bytes without a line end dropped", len(self._buffer))
            self._buffer = b""

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = os.write(self._master, view)
            view = view[written:]


def run_modem_server(
    state_path: Path,
    link: Path,
    quirks: ModemQuirks,
    *,
    t0_mode: bool = False,
    implicit_channel_open: bool = True,
    vpcd: str | None = None,
    faults: FaultPlan | None = None,
    timing: CardTiming | None = None,
) -> int:
    """``sim serve --modem-pty LINK``: serve the SIM through an emulated modem until
    SIGTERM/SIGINT; with ``vpcd``, through vpcd as well (one card, one lock, one fault plan).
    ``timing``: the card's own time per APDU / key generation / signature (sim/latency.py),
    on top of the modem's ``quirks.slow_ms`` per AT round trip."""
    import signal

    from est_agent.sim.card import VirtualCard
    from est_agent.sim.latency import TimedCard
    from est_agent.sim.options import CardOptions

    options = CardOptions(t0_mode=t0_mode, implicit_channel_open=implicit_channel_open)
    loaded = VirtualCard.load(state_path, options, faults=faults)
    if faults:
        log.info("faults: %s", faults.describe())
    card: ModemCard = TimedCard(loaded, timing) if timing else loaded
    lock = threading.Lock()
    modem = PtyModem(EmulatedModem(card, quirks, iccid=loaded.state.iccid, lock=lock), link)
    vpcd_server = None
    vpcd_thread = None
    if vpcd is not None:
        from est_agent.sim.vpcd import VpcdCardServer, parse_vpcd_address

        host, port = parse_vpcd_address(vpcd)
        vpcd_server = VpcdCardServer(_LockedCard(loaded, lock), host, port)
        vpcd_thread = threading.Thread(target=vpcd_server.serve_forever, daemon=True)
        vpcd_thread.start()

    def _handler(signum: int, frame: object) -> None:
        modem.stop_soon()

    previous = {sig: signal.signal(sig, _handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    log.info("emulated modem on %s (%s)", modem.path, link)
    print(f"modem {link} -> {modem.path}", flush=True)
    try:
        modem.serve_forever()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        modem.close()
        if vpcd_server is not None and vpcd_thread is not None:
            vpcd_server.stop()
            vpcd_thread.join(timeout=5)
    log.info("emulated modem stopped after %d commands", modem.modem.commands)
    return 0


class _LockedCard:
    """The card shared by vpcd and the modem threads: one APDU at a time."""

    def __init__(self, card: object, lock: threading.Lock) -> None:
        from est_agent.sim.card import VirtualCard

        assert isinstance(card, VirtualCard)
        self._card = card
        self._lock = lock

    @property
    def atr(self) -> bytes:
        return self._card.atr

    def power_on(self) -> None:
        with self._lock:
            self._card.power_on()

    def reset(self) -> None:
        with self._lock:
            self._card.reset()

    def process(self, apdu: bytes) -> bytes:
        with self._lock:
            return self._card.process(apdu)

    def answer(self, apdu: bytes) -> CardAnswer:
        with self._lock:
            return self._card.answer(apdu)
