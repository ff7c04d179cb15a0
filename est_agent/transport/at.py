"""AT commands for SIM access through a cellular modem (3GPP TS 27.007), without I/O.

Sans-I/O in the manner of h11: ``encode_*`` build command lines, ``AtReader`` turns received
bytes into one ``AtReply`` per command, ``parse_*`` pick the answer out of a reply. The serial
loop (``est_agent.transport.modem``) owns the port, the clock and the retries.

Theory of operation. A command line ends with ``\\r`` (ITU-T V.250 §5.2.1). The modem answers
with zero or more information lines and one final result code (``OK``, ``ERROR``,
``+CME ERROR: <err>`` of TS 27.007 §9.2, ``+CMS ERROR`` of TS 27.005 §3.2.5), each framed by
``\\r\\n`` (V.250 §5.7.1; some modems send bare ``\\r``). Around them may appear:

- the echo of the command line itself (V.250 §6.2.4, ``ATE1``; some modems keep echoing after
  ``ATE0``, so echo is recognised by content, not by setting);
- unsolicited result codes (``RING``, ``+CREG: 1`` of TS 27.007 §7.2, ``+QIND: ...``,
  ``^RSSI``) at any moment, even between a command and its answer: holding them back while a
  command runs is not something every modem does.

So the reader keeps every line that is not echo or a final result, and each ``parse_*`` takes
only the line matching its own grammar: whatever else was received is a URC and is reported as
such. That is the whole difference between an answer and a URC a client can rely on.

Hex in ``+CSIM``/``+CGLA`` (TS 27.007 §8.17, §8.45): the ``<length>`` counts *characters*
of the hex string (twice the bytes), and is checked against the data; quotes are optional in
practice, case varies, and some modems space out the hex. All of that is accepted; an odd or
non-hex string, or a length that disagrees, is a ``ModemError``.

``ChannelTable`` decides, per APDU, which AT command carries it where only ``AT+CCHO`` /
``AT+CGLA`` / ``AT+CCHC`` (§8.43-§8.45) reach logical channels.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable
from dataclasses import dataclass

from est_agent.errors import ModemError
from est_agent.transport.cla import MAX_CHANNEL, channel_from_cla, with_channel

__all__ = [
    "CME_ERRORS",
    "MAX_BUFFER",
    "AtReader",
    "AtReply",
    "ChannelAccess",
    "ChannelTable",
    "FinalResult",
    "Route",
    "RouteKind",
    "encode_cchc",
    "encode_ccho",
    "encode_cgla",
    "encode_command",
    "encode_csim",
    "format_hex",
    "parse_ccho",
    "parse_cgla",
    "parse_csim",
    "parse_digits",
    "parse_hex",
]

#: A reply bigger than this is garbage (or a runaway modem): the longest legitimate answer is
#: a +CGLA with an extended-length response (2 x 65 538 hex characters) plus framing.
MAX_BUFFER = 2 * 65538 + 4096

#: TS 27.007 §9.2.1 (general errors) and §9.2.2 (GPRS): verbose text -> numeric <err>, for
#: modems in ``AT+CMEE=2`` mode (or that ignore ``AT+CMEE=1``). Only the codes a SIM access
#: can meet are listed; others keep their text and code None.
CME_ERRORS: dict[str, int] = {
    "phone failure": 0,
    "no connection to phone": 1,
    "operation not allowed": 3,
    "operation not supported": 4,
    "ph-sim pin required": 5,
    "sim not inserted": 10,
    "sim pin required": 11,
    "sim puk required": 12,
    "sim failure": 13,
    "sim busy": 14,
    "sim wrong": 15,
    "incorrect password": 16,
    "sim pin2 required": 17,
    "sim puk2 required": 18,
    "memory full": 20,
    "invalid index": 21,
    "not found": 22,
    "memory failure": 23,
    "text string too long": 24,
    "invalid characters in text string": 25,
    "no network service": 30,
    "network timeout": 31,
    "unknown": 100,
}


class FinalResult(enum.Enum):
    """How a command ended (V.250 §5.7.1, TS 27.007 §9.2)."""

    OK = "OK"
    ERROR = "ERROR"
    CME_ERROR = "+CME ERROR"
    CMS_ERROR = "+CMS ERROR"


@dataclass(frozen=True)
class AtReply:
    """One command's answer: its non-echo lines (answer and URCs mixed) and the final result.

    ``error_code`` is the numeric ``<err>`` of a ``+CME ERROR`` / ``+CMS ERROR`` (verbose texts
    translated through ``CME_ERRORS``), else None; ``error_text`` is what followed the colon.
    """

    lines: tuple[str, ...]
    result: FinalResult
    error_code: int | None = None
    error_text: str = ""

    @property
    def ok(self) -> bool:
        return self.result is FinalResult.OK

    def describe(self) -> str:
        """The final result as the modem said it (for messages)."""
        if self.result in (FinalResult.OK, FinalResult.ERROR):
            return str(self.result.value)
        return f"{self.result.value}: {self.error_text}"


# -- encoding --------------------------------------------------------------------------------


def format_hex(data: bytes) -> str:
    return data.hex().upper()


def encode_command(text: str) -> bytes:
    """A command line as sent: ASCII, terminated by S3 = ``\\r`` (V.250 §5.2.1)."""
    if "\r" in text or "\n" in text or not text.isascii():
        raise ModemError(f"not a single ASCII command line: {text[:40]!r}")
    return text.encode("ascii") + b"\r"


def encode_csim(apdu: bytes) -> str:
    """``AT+CSIM=<length>,"<command>"`` (TS 27.007 §8.17): length in hex characters.

    A case-1 APDU (4 bytes) gets P3 = ``00``: the modem forwards a T=0 TPDU, whose header is
    always five bytes (ISO/IEC 7816-3 §12.2.2), and many modems refuse four.
    """
    if len(apdu) == 4:
        apdu += b"\x00"
    return f'AT+CSIM={2 * len(apdu)},"{format_hex(apdu)}"'


def encode_cgla(session_id: int, apdu: bytes) -> str:
    """``AT+CGLA=<sessionid>,<length>,"<command>"`` (TS 27.007 §8.45)."""
    return f'AT+CGLA={session_id},{2 * len(apdu)},"{format_hex(apdu)}"'


def encode_ccho(aid: bytes) -> str:
    """``AT+CCHO="<dfname>"`` (TS 27.007 §8.43): open a channel and select the AID on it."""
    return f'AT+CCHO="{format_hex(aid)}"'


def encode_cchc(session_id: int) -> str:
    """``AT+CCHC=<sessionid>`` (TS 27.007 §8.44)."""
    return f"AT+CCHC={session_id}"


# -- framing ---------------------------------------------------------------------------------

_CME = re.compile(r"^\+(CME|CMS) ERROR\s*:\s*(.*)$", re.IGNORECASE)


def _squash(text: str) -> str:
    return "".join(text.split()).upper()


class AtReader:
    """Collects the answer to one command line from received bytes.

    ``receive_data`` takes whatever the port returned; ``next_reply`` is the reply once the
    final result code has arrived, else None (more data needed). Lines after the final result
    belong to no command (URCs) and are kept in ``trailing``.
    """

    def __init__(self, command: str) -> None:
        self._echo = _squash(command)
        self._buffer = b""
        self._lines: list[str] = []
        self._reply: AtReply | None = None
        self.trailing: list[str] = []
        self.echo_seen = False

    def receive_data(self, data: bytes) -> None:
        self._buffer += data
        # Line terminators: "\r\n" per V.250, a bare "\r" or "\n" from some modems; an empty
        # line between them is framing, never content.
        while True:
            cut = min(
                (i for i in (self._buffer.find(b"\r"), self._buffer.find(b"\n")) if i >= 0),
                default=-1,
            )
            if cut < 0:
                break
            raw, self._buffer = self._buffer[:cut], self._buffer[cut + 1 :]
            self._line(raw.decode("ascii", errors="replace").strip())
        if len(self._buffer) > MAX_BUFFER:
            raise ModemError(f"modem sent {len(self._buffer)} bytes without a line end")

    def _line(self, line: str) -> None:
        if not line:
            return
        if self._reply is not None:
            self.trailing.append(line)
            return
        if not self.echo_seen and _squash(line) == self._echo:
            self.echo_seen = True  # only the first copy: an answer never repeats the command
            return
        final = _final(line)
        if final is not None:
            self._reply = AtReply(tuple(self._lines), *final)
            return
        self._lines.append(line)
        if sum(len(x) for x in self._lines) > MAX_BUFFER:
            raise ModemError(f"modem sent more than {MAX_BUFFER} characters without a result")

    def next_reply(self) -> AtReply | None:
        return self._reply


def _final(line: str) -> tuple[FinalResult, int | None, str] | None:
    upper = line.upper()
    if upper == "OK":
        return FinalResult.OK, None, ""
    if upper == "ERROR":
        return FinalResult.ERROR, None, ""
    match = _CME.match(line)
    if match is None:
        return None
    kind = FinalResult.CME_ERROR if match.group(1).upper() == "CME" else FinalResult.CMS_ERROR
    text = match.group(2).strip().strip('"').strip()
    code = int(text) if text.isdigit() else CME_ERRORS.get(" ".join(text.lower().split()))
    return kind, code, text


# -- parsing answers -------------------------------------------------------------------------

_HEX_CHARS = frozenset("0123456789abcdefABCDEF")


def parse_hex(text: str) -> bytes:
    """Hex data as modems write it: optional quotes, any case, spaces allowed inside."""
    body = text.strip()
    if len(body) >= 2 and body[0] == body[-1] == '"':
        body = body[1:-1]
    digits = "".join(body.split())
    if len(digits) % 2 or not set(digits) <= _HEX_CHARS:
        raise ModemError(f"modem answered malformed hex: {text[:60]!r}")
    return bytes.fromhex(digits)


def _length_and_hex(line: str, prefix: str) -> bytes:
    _, _, rest = line.partition(":")
    length_text, comma, data_text = rest.partition(",")
    if not comma or not length_text.strip().isdigit():
        raise ModemError(f"malformed {prefix} answer: {line[:60]!r}")
    data = parse_hex(data_text)
    declared = int(length_text.strip())
    # TS 27.007 §8.17/§8.45: "<length>: ... length of the characters that are sent" - hex
    # characters, so twice the bytes. A mismatch means a truncated or garbled line.
    if declared != 2 * len(data):
        raise ModemError(
            f"{prefix} length {declared} disagrees with {2 * len(data)} hex characters received"
        )
    if len(data) < 2:
        raise ModemError(f"{prefix} answer has no status word: {line[:60]!r}")
    return data


def _answer_lines(lines: Iterable[str], prefix: str) -> list[str]:
    head = prefix.upper()
    return [
        line
        for line in lines
        if line.upper().startswith(head) and line[len(head) :].lstrip().startswith(":")
    ]


def _single(reply: AtReply, prefix: str) -> str:
    found = _answer_lines(reply.lines, prefix)
    if len(found) != 1:
        raise ModemError(f"expected one {prefix} line, got {len(found)} in {list(reply.lines)!r}")
    return found[0]


def parse_csim(reply: AtReply) -> bytes:
    """The response APDU in ``+CSIM: <length>,"<response>"`` (TS 27.007 §8.17)."""
    return _length_and_hex(_single(reply, "+CSIM"), "+CSIM")


def parse_cgla(reply: AtReply) -> bytes:
    """The response APDU in ``+CGLA: <length>,"<response>"`` (TS 27.007 §8.45)."""
    return _length_and_hex(_single(reply, "+CGLA"), "+CGLA")


_DIGITS = re.compile(r"^(?:\+\w+\s*:\s*)?\"?(\d+)\"?$")


def parse_digits(reply: AtReply, prefixes: tuple[str, ...] = ()) -> str:
    """A number answered bare (``<sessionid>`` of TS 27.007 §8.43, ``+CGSN`` §5.4, ``+CIMI``
    §5.6) or after one of ``prefixes`` (``+CCHO:``, ``+CCID:``, ``+ICCID:``...).

    A bare line that is not all digits is a URC (``RDY``, ``SMS Ready``), never the answer.
    """
    wanted = {p.upper() for p in prefixes}
    found: list[str] = []
    for line in reply.lines:
        match = _DIGITS.match(line.strip())
        if match is None:
            continue
        head = line.partition(":")[0].strip().upper() if line.startswith("+") else ""
        if head and head not in wanted:
            continue  # e.g. "+CREG: 1" while waiting for a session id
        found.append(match.group(1))
    if len(found) != 1:
        raise ModemError(f"expected one numeric answer, got {list(reply.lines)!r}")
    return found[0]


def parse_ccho(reply: AtReply) -> int:
    """The ``<sessionid>`` of ``AT+CCHO`` (bare per §8.43; ``+CCHO: <n>`` on some modems)."""
    return int(parse_digits(reply, ("+CCHO",)))


# -- logical channels without AT+CSIM ---------------------------------------------------------

_INS_MANAGE_CHANNEL = 0x70
_INS_SELECT = 0xA4
_SW_OK = b"\x90\x00"
_SW_CHANNEL_NOT_SUPPORTED = b"\x68\x81"  # TS 102 221 §10.2.1.3
_SW_FUNCTION_NOT_SUPPORTED = b"\x6a\x81"


class ChannelAccess(enum.Enum):
    """How logical channels are reached on one connection."""

    CSIM = "AT+CSIM"  # MANAGE CHANNEL and CLA channel coding inside AT+CSIM
    CGLA = "AT+CCHO/AT+CGLA"  # the modem's own channel commands


class RouteKind(enum.Enum):
    CSIM = "AT+CSIM"  # send as is through AT+CSIM
    CGLA = "AT+CGLA"  # send on the channel's session
    CCHO = "AT+CCHO"  # open the session (a SELECT by AID on a fresh channel)
    CCHC = "AT+CCHC"  # close the session; the APDU's answer is 9000
    LOCAL = "local"  # answered here without the modem


@dataclass(frozen=True)
class Route:
    """Where one APDU goes: an AT command line, or ``answer`` (LOCAL)."""

    kind: RouteKind
    command: str = ""
    answer: bytes = b""
    channel: int = 0
    note: str = ""


class ChannelTable:
    """The card's side of MANAGE CHANNEL, played by the host where only ``AT+CCHO`` opens
    channels (TS 27.007 §8.43 opens *and* selects, so a bare MANAGE CHANNEL has no AT form).

    "Open" hands out a channel number of its own, bound to no session yet; the SELECT by AID
    that follows on it becomes ``AT+CCHO``; later APDUs go through ``AT+CGLA`` with the
    session id in CLA's channel bits (session id = card channel on the modems we know, and
    modems that set the bits themselves do not mind); "close" is ``AT+CCHC``. Other commands
    on an unbound channel (UICC file access) have no AT form and answer 6881.
    """

    def __init__(self) -> None:
        #: our channel number -> the modem's session id (None: opened, no AID selected yet)
        self.sessions: dict[int, int | None] = {}

    def route(self, apdu: bytes) -> Route:
        cla, ins, p1, p2 = apdu[:4]
        number = channel_from_cla(cla)
        if ins == _INS_MANAGE_CHANNEL and p1 == 0x00:
            free = next((n for n in range(1, MAX_CHANNEL + 1) if n not in self.sessions), None)
            if p2 != 0x00 or free is None:  # a chosen number: the modem's numbering is its own
                return Route(RouteKind.LOCAL, answer=_SW_FUNCTION_NOT_SUPPORTED)
            self.sessions[free] = None
            return Route(RouteKind.LOCAL, answer=bytes([free]) + _SW_OK)
        if ins == _INS_MANAGE_CHANNEL and p1 == 0x80:
            target = p2 or number
            if target not in self.sessions:
                return Route(RouteKind.LOCAL, answer=_SW_CHANNEL_NOT_SUPPORTED)
            session = self.sessions.pop(target)
            if session is None:
                return Route(RouteKind.LOCAL, answer=_SW_OK)
            return Route(RouteKind.CCHC, encode_cchc(session), channel=target)
        if number == 0:  # the basic channel needs no session: AT+CSIM, if the modem has it
            return Route(RouteKind.CSIM, encode_csim(apdu))
        if number not in self.sessions:
            return Route(RouteKind.LOCAL, answer=_SW_CHANNEL_NOT_SUPPORTED)
        session = self.sessions[number]
        if session is None:
            if ins == _INS_SELECT and p1 == 0x04 and len(apdu) > 5 and apdu[4]:
                aid = apdu[5 : 5 + apdu[4]]
                return Route(RouteKind.CCHO, encode_ccho(aid), channel=number)
            note = (
                f"INS {ins:02X} on channel {number} needs AT+CSIM channel access; this modem "
                'only opens channels onto an application (set card.uicc_channel = "basic")'
            )
            return Route(RouteKind.LOCAL, answer=_SW_CHANNEL_NOT_SUPPORTED, note=note)
        wire = bytes([with_channel(cla, session)]) + apdu[1:] if session <= MAX_CHANNEL else apdu
        return Route(RouteKind.CGLA, encode_cgla(session, wire), channel=number)

    def bind(self, channel: int, session_id: int) -> None:
        """``AT+CCHO`` for ``channel`` answered ``session_id``."""
        if self.sessions.get(channel, 0) is not None:
            raise ModemError(f"channel {channel} is not waiting for a session")
        self.sessions[channel] = session_id

    def open_sessions(self) -> list[int]:
        return sorted(s for s in self.sessions.values() if s is not None)
