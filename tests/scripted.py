"""A transport that replays a recorded card dialogue and fails on any unexpected command."""

from __future__ import annotations

from typing import Protocol

from est_agent.transport.base import CardTransport

AID = "A0 00 00 05 59 00 10"


def h(text: str) -> bytes:
    return bytes.fromhex(text.replace(" ", ""))


class _Card(Protocol):
    def process(self, apdu: bytes) -> bytes: ...


def tx(card: _Card, command: str | bytes) -> tuple[bytes, int]:
    """Send one raw command (hex text or bytes) to a virtual card: (data, SW)."""
    raw = h(command) if isinstance(command, str) else command
    response = card.process(raw)
    assert len(response) >= 2
    return response[:-2], int.from_bytes(response[-2:], "big")


class ScriptedTransport(CardTransport):
    def __init__(self, script: list[tuple[str, str]]) -> None:
        super().__init__()
        self.script = [(h(c), h(r)) for c, r in script]
        self.sent: list[bytes] = []

    @property
    def description(self) -> str:
        return "scripted"

    def _connect(self) -> None:
        pass

    def _close(self) -> None:
        pass

    def _transmit(self, apdu: bytes) -> bytes:
        index = len(self.sent)
        self.sent.append(apdu)
        assert index < len(self.script), f"unexpected extra command {apdu.hex(' ')}"
        expected, response = self.script[index]
        assert apdu == expected, (
            f"command {index}: sent {apdu.hex(' ')}, script expects {expected.hex(' ')}"
        )
        return response

    def assert_done(self) -> None:
        assert len(self.sent) == len(self.script), (
            f"{len(self.script) - len(self.sent)} scripted commands were not sent"
        )
