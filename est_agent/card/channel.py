"""Logical channels, CLA coding and the T=0 response loop on top of any card transport.

CLA coding (ETSI TS 102 221 §10.1.1) is ``est_agent.transport.cla``'s, shared with the AT
transport and the virtual SIM.

T=0 (ISO/IEC 7816-3 §10.3.4, TS 102 221 §7.3.1): a card may answer `61xx` ("xx bytes waiting":
fetch them with GET RESPONSE before any other command on the channel) or `6Cxx` ("wrong Le:
resend the same command with Le = xx"). Readers and modems pass these through, so the loop runs
here, once, for every transport. `next_t0_step` is the pure rule; `CardSession.exchange` the I/O.

Deadlines: every APDU gets the transport's own timeout, except commands marked ``slow`` (key
generation takes a real SIM seconds, GSMA IoT.05 GENERATE KEY PAIR), which get its
``slow_timeout_s``; the GET RESPONSE fetching their answer is fast again.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from typing import Required, TypedDict, Unpack

from est_agent.card.apdu import CommandApdu, ResponseApdu
from est_agent.card.status import error_for_sw, is_success
from est_agent.errors import CardProtocolError
from est_agent.transport.base import CardTransport
from est_agent.transport.cla import MAX_CHANNEL, channel_from_cla, cla_for_channel

__all__ = [
    "CardSession",
    "ExchangeOptions",
    "LogicalChannel",
    "T0Step",
    "next_t0_step",
]

log = logging.getLogger(__name__)

INS_GET_RESPONSE = 0xC0
INS_MANAGE_CHANNEL = 0x70
# A card that keeps announcing data forever is broken; 64 x 256 bytes is far beyond any
# IoT SAFE answer.
_MAX_GET_RESPONSES = 64


class ExchangeOptions(TypedDict, total=False):
    """The keywords of ``CardSession.exchange`` that the layers above pass through."""

    name: Required[str]  # the command's name in logs and errors
    accept: Collection[int]
    slow: bool


@dataclass(frozen=True)
class T0Step:
    """What to send next: a GET RESPONSE / a resend, or nothing (``command`` None) when done."""

    command: CommandApdu | None
    keep_data: bool  # whether the response data so far is part of the final answer


def next_t0_step(command: CommandApdu, response: ResponseApdu, *, get_response_cla: int) -> T0Step:
    """The pure T=0 rule: decide the follow-up to ``response`` for ``command``."""
    sw1, sw2 = response.sw1, response.sw2
    if sw1 == 0x61:
        return T0Step(CommandApdu(get_response_cla, INS_GET_RESPONSE, 0, 0, le=sw2 or 256), True)
    if sw1 == 0x6C:
        return T0Step(command.with_le(sw2 or 256), False)
    return T0Step(None, True)


class CardSession:
    """One card behind one transport: APDU exchange with T=0 handling and channel management."""

    def __init__(self, transport: CardTransport, *, iso_get_response: bool = False) -> None:
        """``iso_get_response``: send GET RESPONSE with the ISO class `0N` instead of the class
        of the command that got 61xx (the default, as the real ZARIOT SIM traced in
        atsign-foundation/at_client_sdk issue #850 does; wolfSSL's IoT SAFE port always uses
        `0N`: docs/iot-safe-card.md §1)."""
        self.transport = transport
        self._iso_get_response = iso_get_response
        self._open_channels: set[int] = set()
        self._depth = 0
        # The card is one device: a worker thread generating a key while the main thread waits
        # on the network (workflow/cardwork.py) and the main thread take turns per transaction,
        # so APDUs, T=0 follow-ups and channel state never interleave.
        self._lock = threading.RLock()
        #: counts the card transactions begun: state the card holds per channel (the selected
        #: EF) is only known within the transaction that set it, since another client of a
        #: shared reader or the modem's own baseband may change it in between
        self.transaction_epoch = 0

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """Exclusive use of the card inside (nested blocks: the outermost counts); the
        transport's ``transaction`` does the locking (PC/SC SCardBeginTransaction) against
        other clients; threads of this process wait for each other here first."""
        with self._lock:
            if self._depth == 0:
                self.transaction_epoch += 1
            self._depth += 1
            try:
                with self.transport.transaction():
                    yield
            finally:
                self._depth -= 1

    def exchange(
        self,
        command: CommandApdu,
        *,
        name: str,
        accept: Collection[int] = (),
        slow: bool = False,
    ) -> ResponseApdu:
        """Send ``command``; follow 61xx/6Cxx; raise a typed error unless the SW is accepted.

        Success (9000, 91xx, 92xx) is always accepted; ``accept`` adds more (e.g. 6300 paging).
        ``slow``: the card may take seconds to execute it (the transport's longer deadline).
        """
        with self.transaction():  # a GET RESPONSE must follow its command unseparated
            return self._exchange(command, name=name, accept=accept, slow=slow)

    def _exchange(
        self, command: CommandApdu, *, name: str, accept: Collection[int], slow: bool
    ) -> ResponseApdu:
        gr_cla = command.cla
        if self._iso_get_response:
            gr_cla = cla_for_channel(channel_from_cla(command.cla))
        slow_s = self.transport.slow_timeout_s if slow else None
        data = b""
        current = command
        resends = 0
        response = self._transmit(current, name, slow_s)
        for _ in range(_MAX_GET_RESPONSES):
            step = next_t0_step(current, response, get_response_cla=gr_cla)
            if step.keep_data:
                data += response.data
            if step.command is None:
                break
            if step.command.ins != INS_GET_RESPONSE:
                resends += 1
                if resends > 1:
                    raise CardProtocolError(f"{name}: card asked twice for another Le (6Cxx)")
                data = b""
            current = step.command
            # a 6Cxx resend executes the command again; GET RESPONSE only fetches its answer
            again = slow_s if current.ins != INS_GET_RESPONSE else None
            response = self._transmit(current, name, again)
        else:
            raise CardProtocolError(f"{name}: card keeps announcing more data (61xx)")
        final = ResponseApdu(data, response.sw)
        if not is_success(final.sw) and final.sw not in accept:
            raise error_for_sw(final.sw, name)
        return final

    def _transmit(
        self, command: CommandApdu, name: str, timeout_s: float | None = None
    ) -> ResponseApdu:
        raw = self.transport.transmit(command.encode(), timeout_s=timeout_s)
        response = ResponseApdu.decode(raw)
        log.debug(
            "%s: CLA %02X INS %02X P1 %02X P2 %02X Lc %d -> %d bytes SW %04X",
            name,
            command.cla,
            command.ins,
            command.p1,
            command.p2,
            len(command.data),
            len(response.data),
            response.sw,
        )
        return response

    @property
    def basic_channel(self) -> LogicalChannel:
        return LogicalChannel(self, 0)

    def open_channel(self) -> LogicalChannel:
        """MANAGE CHANNEL open, card-assigned number (TS 102 221 §11.1.17)."""
        response = self.exchange(
            CommandApdu(0x00, INS_MANAGE_CHANNEL, 0x00, 0x00, le=1), name="MANAGE CHANNEL open"
        )
        if len(response.data) != 1 or not 1 <= response.data[0] <= MAX_CHANNEL:
            raise CardProtocolError(
                f"MANAGE CHANNEL open: expected one channel number, got {response.data.hex()}"
            )
        number = response.data[0]
        self._open_channels.add(number)
        return LogicalChannel(self, number)

    def unopened_channel(self) -> LogicalChannel:
        """The lowest channel 1..19 this session has not opened, for a SELECT that opens it
        implicitly (``IotSafeApplet.open(implicit_channel=True)``); ``adopt_channel`` it then."""
        for number in range(1, MAX_CHANNEL + 1):
            if number not in self._open_channels:
                return LogicalChannel(self, number)
        raise CardProtocolError("every logical channel is open in this session")

    def adopt_channel(self, number: int) -> None:
        """Count a channel the card opened implicitly as this session's, to close it at the end."""
        self._open_channels.add(number)

    def close_channel(self, number: int) -> None:
        if number == 0:
            return  # the basic channel is never closed
        self._open_channels.discard(number)
        self.exchange(
            CommandApdu(0x00, INS_MANAGE_CHANNEL, 0x80, number), name="MANAGE CHANNEL close"
        )

    def close_channels(self) -> None:
        """Close every channel this session opened (best effort: logged, never raised)."""
        for number in sorted(self._open_channels):
            try:
                self.close_channel(number)
            except Exception as exc:
                log.debug("closing channel %d failed: %s", number, exc)
        self._open_channels.clear()

    def close(self) -> None:
        """Close every channel this session opened (best effort), then the transport."""
        self.close_channels()
        self.transport.close()


@dataclass(frozen=True)
class LogicalChannel:
    """A channel number bound to a session; builds commands with the right CLA."""

    session: CardSession
    number: int

    def cla(self, *, proprietary: bool = False) -> int:
        return cla_for_channel(self.number, proprietary=proprietary)

    def exchange(
        self,
        ins: int,
        p1: int,
        p2: int,
        data: bytes = b"",
        le: int | None = None,
        *,
        proprietary: bool = False,
        **how: Unpack[ExchangeOptions],
    ) -> ResponseApdu:
        command = CommandApdu(self.cla(proprietary=proprietary), ins, p1, p2, data, le)
        return self.session.exchange(command, **how)

    def close(self) -> None:
        self.session.close_channel(self.number)
