"""One card session of a run: the transport, the channel of the certificate EFs, the applet.

Used by the full workflow and by the fast path alike, so both open the card the same way:
connect, UICC files on channel 0 or a logical channel (``card.uicc_channel``), the IoT SAFE
applet on a logical channel of its own, opened only when first needed. Light imports only: the
fast path of `est-agent run` uses this without loading cryptography.

Card transactions (PC/SC SCardBeginTransaction: other clients of the reader wait) are held
around card work, never across network waits: the device's other software may need the SIM
key meanwhile. The card layer makes each multi-APDU operation one transaction (a GET RESPONSE
after its command, SIGN INIT + UPDATE, an EF's SELECT + READ/UPDATE BINARY); the workflow holds
one around the reading of the slots and one around writing and reading back a record. The
host-side run lock (workflow/lock.py) keeps other est-agent runs out for the whole session.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from est_agent.card.channel import CardSession
from est_agent.card.iotsafe import IotSafeApplet
from est_agent.card.uicc import UiccFiles
from est_agent.transport import open_transport
from est_agent.transport.base import CardTransport

if TYPE_CHECKING:
    from est_agent.config import Config

__all__ = ["CardLink", "TransportOpener", "card_link"]

#: builds (not connects) the transport a reader string names (est_agent.transport)
TransportOpener = Callable[[str], CardTransport]


@dataclass
class CardLink:
    config: Config
    session: CardSession
    files: UiccFiles
    _applet: IotSafeApplet | None = field(default=None, repr=False)

    @property
    def transport(self) -> CardTransport:
        return self.session.transport

    @property
    def applet(self) -> IotSafeApplet:
        """The IoT SAFE applet, selected on its own logical channel at first use."""
        if self._applet is None:
            self._applet = IotSafeApplet.open(
                self.session,
                aids=tuple(self.config.card.aids),
                proprietary_cla=not self.config.card.iso_cla,
            )
        return self._applet


@contextlib.contextmanager
def card_link(config: Config, opener: TransportOpener = open_transport) -> Iterator[CardLink]:
    """Connect, take the card transaction, open the files' channel; close all on exit."""
    from est_agent.config import UiccChannel

    session = CardSession(opener(config.card.reader))
    try:
        session.transport.connect()
        try:
            if config.card.uicc_channel.resolve(config.card.reader) is UiccChannel.BASIC:
                channel = session.basic_channel
            else:
                channel = session.open_channel()
            yield CardLink(config, session, UiccFiles(channel))
        finally:
            session.close_channels()  # best effort
    finally:
        session.close()
