"""A software UICC carrying the GSMA IoT SAFE applet: the "develop without hardware" card.

Theory of operation: ``process`` takes one command APDU and returns one response APDU, like a
card behind a reader. It never raises for bad input; it answers a status word. The card layer
here does what a UICC's operating system does (TS 102 221 / ISO/IEC 7816-4):

- decodes the CLA into a logical channel (TS 102 221 §10.1.1, ``est_agent.transport.cla``):
  ``0N``/``8N``/``AN`` for channels 0-3, ``4X``/``CX`` for 4-19; other classes are ``6E00``;
- runs MANAGE CHANNEL (open/close channels 1-19) and SELECT by AID/DF name itself; a SELECT
  of the applet on a closed channel opens it (``CardOptions.implicit_channel_open``);
- on a channel where the applet is selected, passes every other command to the applet, as a
  Java Card runtime does (so SELECT by FID there is the applet's business: ``6D00``);
- elsewhere answers SELECT / READ BINARY / UPDATE BINARY from the UICC file tree;
- applies Le rules (``6Cxx``) and, in T=0 mode, holds response data for GET RESPONSE;
- writes the state file *before* answering a command that changed persistent state, so a link
  cut after N answered APDUs leaves exactly their effects;
- misbehaves on demand (``est_agent.sim.faults``): a ``FaultPlan`` makes chosen commands
  answer another SW, lose bytes, lie about the public key or the signature, or (acted out by
  the link, see ``answer``) come late, never, or with the link dropped.

Volatile state (open channels, selections, sessions, pending GET RESPONSE data) is dropped by
``power_on``/``reset``.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from est_agent.card.apdu import CommandApdu
from est_agent.card.iotsafe_codes import INS_GENERATE_KEY_PAIR, INS_READ_PUBLIC_KEY, INS_SIGN_UPDATE
from est_agent.errors import CardProtocolError, InputError, SimStateError
from est_agent.sim import ecc, uicc
from est_agent.sim.applet import IotSafeApplet, put_file
from est_agent.sim.atr import build_atr
from est_agent.sim.faults import (
    CardAnswer,
    Fault,
    FaultInjector,
    FaultKind,
    FaultPlan,
    flip_digest_bit,
    replace_public_point,
)
from est_agent.sim.options import CardOptions
from est_agent.sim.reply import (
    SW_CHANNEL_NOT_SUPPORTED,
    SW_CLA_NOT_SUPPORTED,
    SW_CONDITIONS,
    SW_FUNCTION_NOT_SUPPORTED,
    SW_INS_NOT_SUPPORTED,
    SW_MEMORY,
    SW_NOT_FOUND,
    SW_OK,
    SW_P1P2,
    SW_SM_NOT_SUPPORTED,
    SW_UNKNOWN,
    SW_WRONG_LENGTH,
    Reply,
)
from est_agent.sim.state import CardState, DedicatedFile, load_state, save_state
from est_agent.sim.trace import ApduEvent, ApduObserver
from est_agent.transport.cla import MAX_CHANNEL, channel_of_cla

__all__ = ["ApduEvent", "CardAnswer", "CardOptions", "FaultPlan", "VirtualCard"]

log = logging.getLogger(__name__)

INS_MANAGE_CHANNEL = 0x70
INS_SELECT = 0xA4
INS_READ_BINARY = 0xB0
INS_UPDATE_BINARY = 0xD6
INS_GET_RESPONSE = 0xC0

_P1_SELECT_BY_NAME = 0x04
_P1_OPEN = 0x00
_P1_CLOSE = 0x80
_SELECT_P2 = (0x00, 0x04, 0x0C)
_WILDCARD_LE = (256, 65536)  # Le 00 / 0000: "whatever is available"


class _ClassKind(enum.Enum):
    ISO = "iso"  # 0N, 4X: SELECT, READ/UPDATE BINARY, MANAGE CHANNEL, GET RESPONSE, applet
    PROPRIETARY = "proprietary"  # 8N, CX: applet commands, its SELECT, and GET RESPONSE only
    GSM = "gsm"  # AN: a channel, but no command here accepts it


_CLASS_KINDS = {
    0x0: _ClassKind.ISO,
    0x4: _ClassKind.ISO,
    0x8: _ClassKind.PROPRIETARY,
    0xC: _ClassKind.PROPRIETARY,
    0xA: _ClassKind.GSM,
}


def _decode_cla(cla: int) -> tuple[int, _ClassKind] | int:
    """(channel, class kind), or the SW refusing the class (TS 102 221 §10.1.1)."""
    channel = channel_of_cla(cla)
    if channel is None:
        return SW_CLA_NOT_SUPPORTED
    if channel <= 3 and not cla & 0x40 and cla & 0x0C:  # `0N`/`8N`/`AN` b4 b3: secure messaging
        return SW_SM_NOT_SUPPORTED
    return channel, _CLASS_KINDS[cla >> 4]


def _sw(sw: int) -> bytes:
    return sw.to_bytes(2, "big")


def _report(observer: ApduObserver, raw: bytes, response: bytes, duration_s: float) -> None:
    """Tell the observer what happened, header and sizes only; its failures are only logged."""
    header = raw[:4].ljust(4, b"\x00")
    decoded_cla = _decode_cla(header[0])
    try:
        cmd: CommandApdu | None = CommandApdu.decode(raw)
    except (CardProtocolError, InputError):
        cmd = None
    event = ApduEvent(
        channel=None if isinstance(decoded_cla, int) else decoded_cla[0],
        cla=header[0],
        ins=header[1],
        p1=header[2],
        p2=header[3],
        lc=0 if cmd is None else len(cmd.data),
        le=None if cmd is None else cmd.le,
        response_len=max(0, len(response) - 2),
        sw=int.from_bytes(response[-2:], "big") if len(response) >= 2 else 0,
        duration_s=duration_s,
    )
    try:
        observer(event)
    except Exception:
        log.exception("virtual card: APDU observer failed")


_UICC_HANDLERS: dict[int, Callable[[uicc.FileSelection, CommandApdu, DedicatedFile], Reply]] = {
    INS_SELECT: uicc.select_by_fid_or_path,
    INS_READ_BINARY: uicc.read_binary,
    INS_UPDATE_BINARY: uicc.update_binary,
}


@dataclass
class _Channel:
    files: uicc.FileSelection = field(default_factory=uicc.FileSelection)
    applet: bool = False


@dataclass(frozen=True)
class _Pending:
    """Response data announced with 61xx, waiting for GET RESPONSE on ``channel``."""

    channel: int
    data: bytes
    sw: int


class VirtualCard:
    """One virtual UICC. Construct from a ``CardState`` or ``VirtualCard.load(path)``.

    With a ``state_path`` every persistent change is written there before it is answered;
    without one the card lives in memory only. ``faults``: the misbehaviours to act out.
    """

    def __init__(
        self,
        state: CardState,
        options: CardOptions = CardOptions(),  # noqa: B008 - frozen, so a shared default is safe
        state_path: str | os.PathLike[str] | None = None,
        *,
        on_apdu: ApduObserver | None = None,
        faults: FaultPlan | None = None,
    ) -> None:
        self._state = state
        self._options = options
        self._path = None if state_path is None else Path(os.fspath(state_path))
        self.on_apdu = on_apdu
        self._atr = build_atr(state.serial)
        self._applet = IotSafeApplet(options)
        self._channels: dict[int, _Channel] = {}
        self._pending: _Pending | None = None
        self._faults = FaultInjector(faults) if faults else None
        self._decoy_point: bytes | None = None
        self.power_on()

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        options: CardOptions = CardOptions(),  # noqa: B008
        *,
        on_apdu: ApduObserver | None = None,
        faults: FaultPlan | None = None,
    ) -> VirtualCard:
        """The card stored in ``path``; SimStateError if the file is missing or damaged."""
        return cls(load_state(path), options, path, on_apdu=on_apdu, faults=faults)

    @property
    def faults(self) -> FaultInjector | None:
        """The fault plan with its occurrence counts, when the card has one."""
        return self._faults

    @property
    def atr(self) -> bytes:
        return self._atr

    @property
    def options(self) -> CardOptions:
        return self._options

    @property
    def state_path(self) -> Path | None:
        return self._path

    @property
    def state(self) -> CardState:
        """The card's memory, for tests and personalization (an APDU never reveals keys)."""
        return self._state

    def power_on(self) -> None:
        """Cold start: only the basic channel is open, with the MF selected."""
        self._channels = {0: _Channel()}
        self._pending = None
        self._applet.reset()

    def reset(self) -> None:
        """Warm reset: same volatile-state loss as a power cycle."""
        self.power_on()

    def ota_put_file(self, file_id: bytes, data: bytes) -> None:
        """Simulated OTA: write an applet file container (the device interface cannot)."""
        self._apply_update(lambda state: put_file(state.applet, file_id, data))

    # -- APDU processing -------------------------------------------------------------------

    def process(self, apdu: bytes) -> bytes:
        """Answer one command APDU with a response APDU (data + SW1 SW2).

        A delay fault sleeps here; silence and disconnect faults raise ``LinkFaultError``:
        links that can act them out call ``answer`` instead.
        """
        return self.answer(apdu).act_out(apdu)

    def answer(self, apdu: bytes) -> CardAnswer:
        """The answer to one command APDU as the link must deliver it (faults included)."""
        started = time.perf_counter()
        raw = bytes(apdu)
        fault = self._faults.next(raw) if self._faults is not None else None
        if fault is not None:
            log.info("virtual card: fault %s on INS %s", fault.rule.describe(), raw[1:2].hex())
            if fault.link is not None:
                # the card never saw it: neither executed nor observed
                self._pending = None
                return CardAnswer(b"", fault.delay_s, fault.link)
        try:
            response = self._process(raw, fault)
        except Exception:
            # A bug in the card model, not bad input: keep serving, as a card would after 6F00.
            log.exception("virtual card: internal error on INS %s", raw[1:2].hex().upper())
            self._pending = None
            response = _sw(SW_UNKNOWN)
        observer = self.on_apdu
        if observer is not None:
            _report(observer, raw, response, time.perf_counter() - started)
        if fault is not None and fault.action is FaultKind.TRUNCATE:
            response = response[: fault.value]
        return CardAnswer(response, 0.0 if fault is None else fault.delay_s)

    def _process(self, raw: bytes, fault: Fault | None = None) -> bytes:
        if fault is not None and fault.action is FaultKind.SW:
            # answered instead of the command, which is not executed (T=0 data is lost)
            self._pending = None
            return _sw(fault.value)
        if len(raw) < 4:
            self._pending = None
            return _sw(SW_WRONG_LENGTH)
        decoded_cla = _decode_cla(raw[0])
        if isinstance(decoded_cla, int):
            self._pending = None
            return _sw(decoded_cla)
        channel, kind = decoded_cla
        try:
            cmd = CommandApdu.decode(raw)
        except (CardProtocolError, InputError):
            self._pending = None
            return _sw(SW_WRONG_LENGTH)
        if cmd.ins == INS_GET_RESPONSE and kind is not _ClassKind.GSM:
            return self._get_response(channel, cmd)
        # T=0: response data not fetched by the very next command is lost
        self._pending = None
        context = self._channels.get(channel)
        if context is None:
            return self._deliver(channel, cmd, self._select_on_closed_channel(channel, kind, cmd))
        action = None if fault is None else fault.action
        if action is FaultKind.BAD_SIGNATURE and cmd.ins == INS_SIGN_UPDATE:
            cmd = dataclasses.replace(cmd, data=flip_digest_bit(cmd.data))
        reply = self._dispatch(channel, kind, context, cmd)
        if (
            action is FaultKind.WRONG_PUBLIC_KEY
            and context.applet
            and cmd.ins in (INS_GENERATE_KEY_PAIR, INS_READ_PUBLIC_KEY)
            and reply.sw == SW_OK
        ):
            reply = dataclasses.replace(reply, data=replace_public_point(reply.data, self._decoy()))
        return self._deliver(channel, cmd, reply)

    def _decoy(self) -> bytes:
        """A valid P-256 point that is not the card's key (its scalar is thrown away)."""
        if self._decoy_point is None:
            _scalar, self._decoy_point = ecc.generate_key_pair()
        return self._decoy_point

    def _dispatch(
        self, channel: int, kind: _ClassKind, context: _Channel, cmd: CommandApdu
    ) -> Reply:
        if kind is _ClassKind.GSM:
            return Reply(SW_CLA_NOT_SUPPORTED)
        if cmd.ins == INS_MANAGE_CHANNEL:
            if kind is not _ClassKind.ISO:
                return Reply(SW_CLA_NOT_SUPPORTED)
            return self._manage_channel(channel, cmd)
        if cmd.ins == INS_SELECT and cmd.p1 == _P1_SELECT_BY_NAME:
            # the applet also by `8N`/`CX` (wolfSSL's IoT SAFE class, issue 13's clients);
            # the UICC's own DF names only by the ISO class
            if kind is not _ClassKind.ISO and cmd.data not in self._options.aids:
                return Reply(SW_CLA_NOT_SUPPORTED)
            return self._select_by_name(channel, context, cmd)
        if context.applet:
            return self._applet.process(channel, cmd, self._state.applet)
        handler = _UICC_HANDLERS.get(cmd.ins)
        if handler is None:
            return Reply(SW_INS_NOT_SUPPORTED)
        if kind is not _ClassKind.ISO:
            return Reply(SW_CLA_NOT_SUPPORTED)
        return handler(context.files, cmd, self._state.mf)

    def _deliver(self, channel: int, cmd: CommandApdu, reply: Reply) -> bytes:
        data = reply.data
        if (
            self._options.wrong_le_6c
            and reply.exact
            and data
            and cmd.le is not None
            and cmd.le not in _WILDCARD_LE
            and cmd.le != len(data)
        ):
            # ISO/IEC 7816-3 §10.3.3: refused and not executed; resend with Le = SW2
            return _sw(0x6C00 | (len(data) & 0xFF))
        if reply.update is not None:
            try:
                self._apply_update(reply.update)
            except SimStateError:
                log.exception("virtual card: cannot persist the state; change rolled back")
                return _sw(SW_MEMORY)
        if reply.transient is not None:
            reply.transient()
        if data and self._options.t0_mode:
            self._pending = _Pending(channel, data, reply.sw)
            return _sw(0x6100 | (min(len(data), 256) & 0xFF))
        return data + _sw(reply.sw)

    def _apply_update(self, update: Callable[[CardState], None]) -> None:
        """Change the persistent state; with a file, only once the new state is on disk."""
        if self._path is None:
            update(self._state)
            return
        candidate = copy.deepcopy(self._state)
        update(candidate)
        save_state(self._path, candidate)
        self._state = candidate

    def _get_response(self, channel: int, cmd: CommandApdu) -> bytes:
        pending = self._pending
        if channel not in self._channels:
            self._pending = None
            return _sw(SW_CHANNEL_NOT_SUPPORTED)
        if pending is None or pending.channel != channel:
            self._pending = None
            return _sw(SW_CONDITIONS)
        if cmd.p1 or cmd.p2:
            return _sw(SW_P1P2)
        available = len(pending.data)
        wanted = 256 if cmd.le is None else cmd.le
        if wanted >= available:
            if self._options.wrong_le_6c and wanted not in _WILDCARD_LE and wanted > available:
                return _sw(0x6C00 | (available & 0xFF))
            self._pending = None
            return pending.data + _sw(pending.sw)
        rest = pending.data[wanted:]
        self._pending = _Pending(channel, rest, pending.sw)
        return pending.data[:wanted] + _sw(0x6100 | (min(len(rest), 256) & 0xFF))

    # -- channels and selection ------------------------------------------------------------

    def _manage_channel(self, channel: int, cmd: CommandApdu) -> Reply:
        """MANAGE CHANNEL (TS 102 221 §11.1.17): P1 00 open, 80 close; P2 the channel."""
        target = cmd.p2
        if cmd.p1 == _P1_OPEN:
            if target == 0:
                free = [n for n in range(1, MAX_CHANNEL + 1) if n not in self._channels]
                if not free:
                    return Reply(SW_FUNCTION_NOT_SUPPORTED)
                number = free[0]
                return Reply(
                    SW_OK,
                    bytes((number,)),
                    exact=True,
                    transient=lambda: self._open_channel(number, channel),
                )
            if target > MAX_CHANNEL or target in self._channels:
                return Reply(SW_CHANNEL_NOT_SUPPORTED)
            return Reply(SW_OK, transient=lambda: self._open_channel(target, channel))
        if cmd.p1 == _P1_CLOSE:
            if target == 0 or target not in self._channels:
                return Reply(SW_CHANNEL_NOT_SUPPORTED)
            return Reply(SW_OK, transient=lambda: self._close_channel(target))
        return Reply(SW_P1P2)

    def _open_channel(self, number: int, origin: int) -> None:
        # ISO/IEC 7816-4 §7.1.2: opened from the basic channel → MF; otherwise the origin's
        # selection (application included) is carried over.
        if origin == 0:
            self._channels[number] = _Channel()
        else:
            source = self._channels[origin]
            self._channels[number] = _Channel(source.files.copy(), source.applet)

    def _close_channel(self, number: int) -> None:
        self._channels.pop(number, None)
        self._applet.deselect(number)

    def _select_on_closed_channel(self, channel: int, kind: _ClassKind, cmd: CommandApdu) -> Reply:
        """A command on a closed channel: 6881, except a SELECT of the applet by AID when
        implicit opening is on. That opens the channel, with the MF as its file selection, and
        selects the applet (the Java Card runtime's implicit selection on a closed channel).
        A SELECT of anything else leaves the channel closed (6A82)."""
        if not (
            self._options.implicit_channel_open
            and cmd.ins == INS_SELECT
            and cmd.p1 == _P1_SELECT_BY_NAME
            and kind is not _ClassKind.GSM
        ):
            return Reply(SW_CHANNEL_NOT_SUPPORTED)
        if cmd.data not in self._options.aids:
            return Reply(SW_NOT_FOUND)
        if cmd.p2 not in _SELECT_P2:
            return Reply(SW_P1P2)

        def open_and_select() -> None:
            self._channels[channel] = _Channel(applet=True)
            self._applet.deselect(channel)  # nothing left from an earlier life of the channel

        return Reply(SW_OK, transient=open_and_select)

    def _select_by_name(self, channel: int, context: _Channel, cmd: CommandApdu) -> Reply:
        if cmd.data in self._options.aids:
            if cmd.p2 not in _SELECT_P2:
                return Reply(SW_P1P2)

            def select_applet() -> None:
                self._applet.deselect(channel)  # a (re)selection starts from scratch
                context.applet = True

            return Reply(SW_OK, transient=select_applet)
        reply = uicc.select_by_name(context.files, cmd, self._state.mf)
        if reply is None:
            return Reply(SW_NOT_FOUND)  # the current selection stays
        if reply.sw != SW_OK or not context.applet:
            return reply
        select_df = reply.transient

        def leave_applet() -> None:
            self._applet.deselect(channel)
            context.applet = False
            if select_df is not None:
                select_df()

        return Reply(reply.sw, reply.data, exact=reply.exact, transient=leave_applet)
