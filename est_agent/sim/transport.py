"""The virtual SIM as a card link inside this process (reader string ``sim:<state file>``)."""

from __future__ import annotations

import os
from pathlib import Path

from est_agent.sim.card import VirtualCard
from est_agent.sim.options import CardOptions
from est_agent.transport.base import CardTransport

__all__ = ["SimTransport"]


class SimTransport(CardTransport):
    """Moves APDUs to a ``VirtualCard`` by function call.

    Given a path, the card is loaded on ``connect`` (so building the transport touches no file)
    and every state change is written back to that file. Connecting powers the card on, as
    inserting it into a reader would.
    """

    def __init__(
        self,
        card: VirtualCard | str | os.PathLike[str],
        options: CardOptions = CardOptions(),  # noqa: B008 - frozen, so a shared default is safe
    ) -> None:
        super().__init__()
        self._options = options
        if isinstance(card, VirtualCard):
            self._card: VirtualCard | None = card
            self._path = card.state_path
        else:
            self._card = None
            self._path = Path(os.fspath(card))

    @property
    def card(self) -> VirtualCard | None:
        """The card, once loaded."""
        return self._card

    @property
    def description(self) -> str:
        return f"virtual SIM {self._path}" if self._path is not None else "virtual SIM (in memory)"

    @property
    def atr(self) -> bytes:
        return b"" if self._card is None else self._card.atr

    def _connect(self) -> None:
        if self._card is None:
            assert self._path is not None
            self._card = VirtualCard.load(self._path, self._options)
        self._card.power_on()

    def _transmit(self, apdu: bytes) -> bytes:
        assert self._card is not None  # CardTransport.transmit connects first
        return self._card.process(apdu)

    def _close(self) -> None:
        # Nothing to release; the card keeps its memory, volatile state goes at the next connect.
        pass
