"""The seam every card link implements: open, transmit bytes, close.

A transport moves whole APDUs and nothing else: T=0 GET RESPONSE handling, logical channels and
command meanings live above it (``est_agent.card.channel``), so every link behaves the same.
"""

from __future__ import annotations

import abc
import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from types import TracebackType

__all__ = ["CardTransport", "LinkStats"]


@dataclass
class LinkStats:
    """What crossed the card link; real SIM links cost tens of ms per APDU, so count them."""

    apdus: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    seconds: float = 0.0

    @property
    def bytes_total(self) -> int:
        return self.bytes_sent + self.bytes_received


class CardTransport(abc.ABC):
    """A connection to one card. Subclasses implement ``_connect``, ``_transmit``, ``_close``."""

    def __init__(self) -> None:
        self.stats = LinkStats()
        self._connected = False

    @property
    @abc.abstractmethod
    def description(self) -> str:
        """Human-readable name of the link (reader name, port, state file)."""

    @property
    def atr(self) -> bytes:
        """The card's answer-to-reset, where the link knows it."""
        return b""

    def connect(self) -> None:
        if not self._connected:
            self._connect()
            self._connected = True

    def transmit(self, apdu: bytes) -> bytes:
        """Send one command APDU; return the response APDU (data followed by SW1 SW2)."""
        if not self._connected:
            self.connect()
        started = time.perf_counter()
        response = self._transmit(apdu)
        self.stats.seconds += time.perf_counter() - started
        self.stats.apdus += 1
        self.stats.bytes_sent += len(apdu)
        self.stats.bytes_received += len(response)
        return response

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """Exclusive use of the card inside (PC/SC SCardBeginTransaction); links that serve
        only this process need nothing."""
        yield

    def close(self) -> None:
        if self._connected:
            self._connected = False
            self._close()

    def __enter__(self) -> CardTransport:
        self.connect()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @abc.abstractmethod
    def _connect(self) -> None: ...

    @abc.abstractmethod
    def _transmit(self, apdu: bytes) -> bytes: ...

    @abc.abstractmethod
    def _close(self) -> None: ...
