"""The SIM behind a cellular modem, reached with AT commands over a serial port (pyserial).

Reader string: ``modem:<port>[?baud=115200&timeout=20&keygen_timeout=60]``, e.g.
``modem:/dev/ttyUSB2``. ``timeout`` (seconds) bounds each APDU's AT round trip (generous: a
busy baseband answers late), ``keygen_timeout`` the round trip of a key generation, which
takes a real SIM seconds. A modem that stays silent past the deadline raises ``ModemError``
naming the AT command and the INS, and the link stays unusable until reconnected. This
module is only the serial loop; every byte is encoded and parsed by the pure codec
``est_agent.transport.at``.

Connecting costs one round trip: ``ATE0+CMEE=1`` (a basic and an extended command on one line,
V.250 §5.4, §5.6): no echo (V.250 §6.2.4; echo is still recognised if the modem ignores it) and
numeric ``+CME ERROR`` codes instead of a bare ``ERROR`` (TS 27.007 §9.1). A modem refusing the
pair gets ``ATE0`` alone. ``AT+CSIM=?`` is not asked: the first APDU tells, and each probe would
cost a round trip on every connection (``run`` with nothing due needs only a few APDUs).

Which AT command carries an APDU, and why. ``CardSession`` opens logical channels itself with
MANAGE CHANNEL and codes the channel in CLA (TS 102 221 §10.1.1, §11.1.17), so the simplest
correct mapping is one ``AT+CSIM`` per APDU, whatever the channel: one round trip, the SELECT
answer comes back, and the card (not the modem) assigns channel numbers. ``AT+CCHO`` /
``AT+CGLA`` / ``AT+CCHC`` (§8.43-§8.45) cannot express a bare MANAGE CHANNEL (CCHO opens *and*
selects an AID), so they are used only where ``AT+CSIM`` cannot reach logical channels: when
the modem has no ``AT+CSIM``, or refuses a MANAGE CHANNEL sent through it (some basebands keep
logical channels to themselves). That is found out once, at the first MANAGE CHANNEL, and
remembered for the connection; ``AT+CGLA=?`` is asked only then.

In CGLA mode ``ChannelTable`` (in the codec) plays the card's part of MANAGE CHANNEL and
maps each APDU to ``AT+CCHO`` / ``AT+CGLA`` / ``AT+CCHC``; file commands on such a channel have
no AT form, so keep them on the basic channel there (``card.uicc_channel = "basic"``). Case-1
APDUs get P3 = ``00`` over ``AT+CSIM`` (``encode_csim``).

61xx / 6Cxx pass through untouched to ``est_agent.card.channel``, as on PC/SC.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from est_agent.errors import ModemError, NoCardError, TransportError, UsageError
from est_agent.transport.at import (
    CME_ERRORS,
    AtReader,
    AtReply,
    ChannelAccess,
    ChannelTable,
    RouteKind,
    encode_cchc,
    encode_command,
    encode_csim,
    parse_ccho,
    parse_cgla,
    parse_csim,
    parse_digits,
)
from est_agent.transport.base import (
    DEFAULT_SLOW_TIMEOUT_S,
    CardTransport,
    LinkOptions,
    parse_link_options,
    split_reader_query,
)

__all__ = [
    "DEFAULT_BAUD",
    "DEFAULT_TIMEOUT_S",
    "ChannelAccess",
    "ModemTransport",
    "parse_modem_reader",
    "parse_reader",
]

log = logging.getLogger(__name__)

DEFAULT_BAUD = 115200
#: per APDU: a busy baseband answers AT+CSIM late; key generation has its own, longer deadline
DEFAULT_TIMEOUT_S = 20.0
#: for the setup commands, which the modem answers itself
_SETUP_TIMEOUT_S = 3.0
_READ_POLL_S = 0.2

# TS 27.007 §9.2.1 codes meaning the card is not there (or not usable at all)
_CME_NO_CARD = {10, 13, 15}  # SIM not inserted, SIM failure, SIM wrong
_CME_MEANING = {code: text for text, code in CME_ERRORS.items()}
# ... meaning the modem will not relay this (so another AT command may)
_CME_REFUSED = {3, 4}
_INS_MANAGE_CHANNEL = 0x70
_SW_OK = b"\x90\x00"
_SW_NOT_FOUND = b"\x6a\x82"


def _serial_module() -> Any:
    import serial

    return serial


def parse_modem_reader(rest: str) -> tuple[str, int, LinkOptions]:
    """``<port>[?baud=N&timeout=S&keygen_timeout=S]`` -> (port, baud, deadlines)."""
    port, query = split_reader_query(rest)
    if not port or port.startswith("?"):
        raise UsageError("modem: needs a serial port, e.g. modem:/dev/ttyUSB2")
    options = parse_link_options(
        "modem", query, extra_keys=("baud",), default_timeout_s=DEFAULT_TIMEOUT_S
    )
    baud = DEFAULT_BAUD
    text = options.get("baud")
    if text is not None:
        if not text.isdigit() or int(text) <= 0:
            raise UsageError(f"modem: bad baud {text!r}")
        baud = int(text)
    return port, baud, options


def parse_reader(rest: str) -> tuple[str, int, float]:
    """``<port>[?baud=N&timeout=S]`` -> (port, baud, timeout_s); UsageError names what is wrong."""
    port, baud, options = parse_modem_reader(rest)
    return port, baud, options.timeout_s


class ModemTransport(CardTransport):
    """One SIM behind one modem AT port. ``serial_factory`` is for tests (a pyserial-like object
    with ``write``, ``read``, ``in_waiting``, ``timeout``, ``reset_input_buffer``, ``close``)."""

    #: no SELECT on a channel not opened by MANAGE CHANNEL: the first MANAGE CHANNEL decides
    #: between AT+CSIM and AT+CCHO/AT+CGLA, and CGLA needs a channel CCHO opened (27.007 §8.45)
    implicit_channel_opening = False

    def __init__(
        self,
        port: str,
        *,
        baud: int = DEFAULT_BAUD,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        slow_timeout_s: float = DEFAULT_SLOW_TIMEOUT_S,
        serial_factory: Callable[[], Any] | None = None,
    ) -> None:
        super().__init__(timeout_s=timeout_s, slow_timeout_s=slow_timeout_s)
        self.port = port
        self.baud = baud
        self._factory = serial_factory
        self._serial: Any = None
        self._broken: str | None = None
        self._cgla: bool | None = None  # None: not asked yet
        #: set at the first MANAGE CHANNEL of a connection
        self.access: ChannelAccess | None = None
        self._table = ChannelTable()  # CGLA mode: our channel numbers -> the modem's sessions
        #: AT command round trips (a real modem costs tens of ms each)
        self.at_commands = 0
        #: URCs seen while waiting for answers (the latest few)
        self.urcs: list[str] = []

    @classmethod
    def from_reader(cls, rest: str) -> ModemTransport:
        port, baud, options = parse_modem_reader(rest)
        return cls(
            port, baud=baud, timeout_s=options.timeout_s, slow_timeout_s=options.slow_timeout_s
        )

    @property
    def description(self) -> str:
        return f"modem {self.port}"

    # -- lifecycle -----------------------------------------------------------------------------

    def _connect(self) -> None:
        self._broken = None
        self._table = ChannelTable()
        self.access = None
        self._cgla = None
        self._serial = self._open_port()
        try:
            if not self.command("ATE0+CMEE=1", _SETUP_TIMEOUT_S, check=False).ok:
                # no +CMEE, or no concatenation: bare ERRORs then, but at least no echo
                self.command("ATE0", _SETUP_TIMEOUT_S)
        except BaseException:
            self._release()
            raise

    def _open_port(self) -> Any:
        if self._factory is not None:
            return self._factory()
        serial = _serial_module()
        try:
            # exclusive: an flock, so a second agent (or ModemManager honouring it) cannot
            # interleave its own commands with ours on the same AT port.
            return serial.Serial(
                self.port,
                self.baud,
                # a short read timeout: the loop above keeps the real deadline
                timeout=_READ_POLL_S,
                write_timeout=_SETUP_TIMEOUT_S,
                exclusive=True,
            )
        except serial.SerialException as exc:
            code = exc.errno
            if code in (errno.ENOENT, errno.ENODEV, errno.ENXIO):
                why = "no such port (modem unplugged or not enumerated?)"
            elif code in (errno.EBUSY, errno.EAGAIN, errno.EWOULDBLOCK):
                why = "port busy (another program holds it: ModemManager, a second agent?)"
            elif code in (errno.EACCES, errno.EPERM):
                why = "permission denied (is the user in the dialout group?)"
            else:
                why = str(exc)
            raise ModemError(f"cannot open modem port {self.port}: {why}") from exc
        except (OSError, ValueError) as exc:
            raise ModemError(f"cannot open modem port {self.port}: {exc}") from exc

    def _close(self) -> None:
        for session in self._table.open_sessions():
            if self._broken is None:
                try:
                    self.command(encode_cchc(session), _SETUP_TIMEOUT_S, check=False)
                except TransportError as exc:
                    log.debug("closing session %d: %s", session, exc)
        self._table = ChannelTable()
        self._release()

    def _release(self) -> None:
        if self._serial is not None:
            try:
                self._serial.close()
            except (OSError, ValueError) as exc:  # closing after a failure: already reported
                log.debug("closing %s: %s", self.port, exc)
            self._serial = None

    # -- the serial loop ---------------------------------------------------------------------

    def command(
        self,
        text: str,
        timeout_s: float | None = None,
        *,
        check: bool = True,
        label: str | None = None,
    ) -> AtReply:
        """Send one command line and wait for its final result code.

        ``check``: raise the typed error for ``ERROR`` / ``+CME ERROR`` (else return it).
        A silent modem raises ModemError and leaves the link unusable until reconnected: a late
        answer would otherwise be taken for the answer to the next command. ``label`` names
        the command in that message (default: the AT command without its arguments).
        """
        if self._broken is not None:
            raise ModemError(f"link not used after an earlier failure: {self._broken}")
        if self._serial is None:
            raise ModemError(f"modem {self.port} is not open")
        limit = self.timeout_s if timeout_s is None else timeout_s
        reader = AtReader(text)
        port = self._serial
        line = encode_command(text)
        try:
            # Drop what arrived between commands (URCs): it is nobody's answer.
            port.reset_input_buffer()
            port.write(line)
            self.at_commands += 1
            deadline = time.monotonic() + limit
            while (reply := reader.next_reply()) is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ModemError(
                        f"modem {self.port} did not answer {label or _name(text)} within "
                        f"{limit:g} s (hung, or the SIM is still busy: raise ?timeout=)"
                    )
                chunk = port.read(max(1, port.in_waiting))
                if chunk:
                    reader.receive_data(chunk)
        except ModemError as exc:  # silence or garbage: the dialogue is out of step
            self._broken = str(exc)  # later calls: ModemError (not the base class dead mark)
            raise
        except (OSError, ValueError) as exc:
            # pyserial's SerialException is an OSError: the device vanished (USB reset)
            error = ModemError(f"modem {self.port}: {_name(text)} failed: {exc}")
            self._broken = str(error)
            raise error from exc
        self._note_urcs(reader.trailing)
        if check and not reply.ok:
            raise self._error_for(reply, text)
        return reply

    def _note_urcs(self, lines: list[str]) -> None:
        if lines:
            self.urcs = (self.urcs + lines)[-16:]

    def _error_for(self, reply: AtReply, text: str) -> TransportError:
        what = f"modem {self.port}: {_name(text)} answered {reply.describe()}"
        code = reply.error_code
        meaning = _CME_MEANING.get(code) if code is not None else None
        if meaning and reply.error_text.isdigit():  # numeric: say what it means
            what += f" ({meaning})"
        if code in _CME_NO_CARD:
            error: TransportError = NoCardError(what)
            error.__cause__ = ModemError(what, cme_error=code)
            return error
        return ModemError(what, cme_error=code)

    # -- APDUs -------------------------------------------------------------------------------

    def _transmit(self, apdu: bytes) -> bytes:
        return self._transmit_within(apdu, self.timeout_s)

    def _transmit_within(self, apdu: bytes, timeout_s: float) -> bytes:
        if len(apdu) < 4:
            raise ModemError(f"not an APDU ({len(apdu)} bytes)")
        limit = _Limit(timeout_s, f"INS {apdu[1]:02X}")
        if self.access is ChannelAccess.CGLA:
            return self._transmit_cgla(apdu, limit)
        is_open = apdu[1] == _INS_MANAGE_CHANNEL and apdu[2] == 0x00
        if is_open and self.access is None:
            return self._first_open(apdu, limit)
        return self._csim(encode_csim(apdu), limit)

    def _apdu_command(self, text: str, limit: _Limit, *, check: bool = True) -> AtReply:
        label = f"{_name(text)} ({limit.ins})"
        return self.command(text, limit.seconds, check=check, label=label)

    def _csim(self, text: str, limit: _Limit) -> bytes:
        reply = self._apdu_command(text, limit)
        self._note_urcs(_others(reply, "+CSIM"))
        return parse_csim(reply)

    def _first_open(self, apdu: bytes, limit: _Limit) -> bytes:
        """MANAGE CHANNEL through AT+CSIM once; on refusal, use the channel commands instead.

        A refusal is ``+CME ERROR: 3/4`` (operation not allowed / supported, TS 27.007 §9.2.1)
        or a bare ``ERROR`` (``AT+CMEE`` ignored); a silent modem or a garbled answer is not.
        """
        text = encode_csim(apdu)
        reply = self._apdu_command(text, limit, check=False)
        if reply.ok:
            self.access = ChannelAccess.CSIM
            self._note_urcs(_others(reply, "+CSIM"))
            return parse_csim(reply)
        if not _refusal(reply):
            raise self._error_for(reply, text)
        if not self._has_cgla():
            raise ModemError(
                f"modem {self.port} refuses MANAGE CHANNEL in AT+CSIM ({reply.describe()}) and "
                'has no AT+CGLA: no logical channel (set card.uicc_channel = "basic")',
                cme_error=reply.error_code,
            )
        log.info("modem %s: logical channels through AT+CCHO/AT+CGLA", self.port)
        self.access = ChannelAccess.CGLA
        return self._transmit_cgla(apdu, limit)

    def _has_cgla(self) -> bool:
        if self._cgla is None:
            self._cgla = self.command("AT+CGLA=?", _SETUP_TIMEOUT_S, check=False).ok
        return self._cgla

    def _transmit_cgla(self, apdu: bytes, limit: _Limit) -> bytes:
        route = self._table.route(apdu)
        if route.note:
            log.warning("modem %s: %s", self.port, route.note)
        if route.kind is RouteKind.LOCAL:
            return route.answer
        if route.kind is RouteKind.CSIM:
            return self._csim(route.command, limit)
        if route.kind is RouteKind.CCHC:
            self._apdu_command(route.command, limit)
            return _SW_OK
        if route.kind is RouteKind.CCHO:
            reply = self._apdu_command(route.command, limit, check=False)
            if not reply.ok:
                if not _refusal(reply):
                    raise self._error_for(reply, route.command)
                # §8.43 gives no status word back: a refused CCHO most often means "no such
                # AID", so say 6A82 and let the applet layer try its next AID.
                log.debug("modem %s: AT+CCHO refused (%s)", self.port, reply.describe())
                return _SW_NOT_FOUND
            self._table.bind(route.channel, parse_ccho(reply))
            return _SW_OK
        reply = self._apdu_command(route.command, limit)
        self._note_urcs(_others(reply, "+CGLA"))
        return parse_cgla(reply)

    # -- identity ------------------------------------------------------------------------------

    def imei(self) -> str:
        """The modem's IMEI (``AT+CGSN``, TS 27.007 §5.4), for ``{imei}`` subject templates."""
        self.connect()
        return parse_digits(self.command("AT+CGSN"), ("+CGSN",))

    def iccid(self) -> str:
        """The SIM's ICCID as the modem reports it (``AT+CCID``: not in 27.007, but common)."""
        self.connect()
        return parse_digits(self.command("AT+CCID"), ("+CCID", "+ICCID", "+QCCID"))

    def imsi(self) -> str:
        """``AT+CIMI`` (TS 27.007 §5.6)."""
        self.connect()
        return parse_digits(self.command("AT+CIMI"), ("+CIMI",))


@dataclass(frozen=True)
class _Limit:
    """The deadline of one APDU's AT round trip, and the INS to name when it passes."""

    seconds: float
    ins: str


def _refusal(reply: AtReply) -> bool:
    """Did the modem decline the command (rather than report the SIM gone or busy)?"""
    return reply.error_code is None or reply.error_code in _CME_REFUSED


def _others(reply: AtReply, prefix: str) -> list[str]:
    head = prefix.upper()
    return [line for line in reply.lines if not line.upper().startswith(head)]


def _name(text: str) -> str:
    """The command without its arguments (APDUs carry digests and certificates)."""
    return text.partition("=")[0] + ("=?" if text.endswith("=?") else "")
