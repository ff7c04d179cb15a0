"""SimTransport: the virtual SIM behind the CardTransport seam, in process."""

from __future__ import annotations

from pathlib import Path

import pytest

from est_agent.errors import SimStateError
from est_agent.sim.card import CardOptions, VirtualCard
from est_agent.sim.personalize import personalize
from est_agent.sim.transport import SimTransport


def test_transport_from_a_path(tmp_path: Path) -> None:
    path = tmp_path / "card.json"
    personalize(path)
    transport = SimTransport(path, CardOptions(t0_mode=True))
    assert transport.description == f"virtual SIM {path}"
    assert transport.atr == b""  # nothing loaded before connecting
    with transport:
        assert transport.atr == VirtualCard.load(path).atr
        assert transport.transmit(bytes.fromhex("0070000001")) == bytes.fromhex("6101")
        assert transport.transmit(bytes.fromhex("00C0000001")) == bytes.fromhex("019000")
    assert transport.stats.apdus == 2
    assert transport.stats.bytes_sent == 10 and transport.stats.bytes_received == 5
    # reconnecting powers the card on again: channel 1 is closed
    with transport:
        assert transport.transmit(bytes.fromhex("01A4000C023F00")) == bytes.fromhex("6881")


def test_transport_around_a_card(tmp_path: Path) -> None:
    path = tmp_path / "card.json"
    personalize(path)
    card = VirtualCard.load(path)
    transport = SimTransport(card)
    assert transport.card is card
    assert transport.description == f"virtual SIM {path}"
    assert transport.atr == card.atr
    assert transport.transmit(bytes.fromhex("0070000001")) == bytes.fromhex("019000")
    transport.close()


def test_in_memory_card_description(tmp_path: Path) -> None:
    path = tmp_path / "card.json"
    personalize(path)
    card = VirtualCard(VirtualCard.load(path).state)
    assert SimTransport(card).description == "virtual SIM (in memory)"


def test_missing_state_file_fails_on_connect(tmp_path: Path) -> None:
    transport = SimTransport(tmp_path / "absent.json")
    with pytest.raises(SimStateError, match="not found"):
        transport.connect()
