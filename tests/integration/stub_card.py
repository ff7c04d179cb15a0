"""A tiny stand-in card for transport tests: MANAGE CHANNEL, SELECT of the IoT SAFE AID, echo.

Independent of the virtual SIM on purpose: transport and vpcd framing are tested without it.
Run as a script it serves itself to vpcd (for tests that kill the card process):
``python stub_card.py PORT TAG [--t0-only] [--power-cut-after N]``.
"""

from __future__ import annotations

import argparse
import signal
import sys
from types import FrameType

IOT_SAFE_AID = bytes.fromhex("A0000005590010")


def make_atr(tag: int, *, offer_t1: bool = True) -> bytes:
    """An ATR whose historical bytes carry ``tag``: each card instance is recognisable."""
    historical = b"ESTSTUB" + tag.to_bytes(3, "big")
    if not offer_t1:
        return bytes([0x3B, 0x00 | len(historical)]) + historical  # no TD1: T=0 only
    body = bytes([0x80 | len(historical), 0x80, 0x01]) + historical  # TD1 T=0, TD2 T=1
    tck = 0
    for byte in body:
        tck ^= byte
    return b"\x3b" + body + bytes([tck])  # TCK is mandatory once T=1 is offered


class StubCard:
    def __init__(self, tag: int = 1, *, offer_t1: bool = True) -> None:
        self._atr = make_atr(tag, offer_t1=offer_t1)
        self.powered_on = 0
        self.resets = 0
        self.apdus: list[bytes] = []

    @property
    def atr(self) -> bytes:
        return self._atr

    def power_on(self) -> None:
        self.powered_on += 1

    def reset(self) -> None:
        self.resets += 1

    def process(self, apdu: bytes) -> bytes:
        self.apdus.append(apdu)
        ins, p1 = apdu[1], apdu[2]
        if ins == 0x70 and p1 == 0x00:
            return b"\x01\x90\x00"
        if ins == 0x70:
            return b"\x90\x00"
        if ins == 0xA4 and p1 == 0x04:
            return b"\x90\x00" if apdu[5:12] == IOT_SAFE_AID else b"\x6a\x82"
        if ins == 0xCB:
            return b"\x10\x01\x01\x90\x00"
        if len(apdu) > 7 and apdu[4] == 0:  # extended Lc
            return apdu[7 : 7 + int.from_bytes(apdu[5:7], "big")] + b"\x90\x00"
        return apdu[5 : 5 + apdu[4]] + b"\x90\x00" if len(apdu) > 5 else b"\x90\x00"


def main() -> int:
    from est_agent.sim.vpcd import POWER_CUT_EXIT_CODE, ServeOutcome, VpcdCardServer

    parser = argparse.ArgumentParser()
    parser.add_argument("port", type=int)
    parser.add_argument("tag", type=int)
    parser.add_argument("--t0-only", action="store_true")
    parser.add_argument("--power-cut-after", type=int)
    args = parser.parse_args()
    card = StubCard(args.tag, offer_t1=not args.t0_only)
    server = VpcdCardServer(card, "127.0.0.1", args.port, power_cut_after=args.power_cut_after)

    def _stop(signum: int, frame: FrameType | None) -> None:
        server.stop()

    signal.signal(signal.SIGTERM, _stop)
    outcome = server.serve_forever()
    return POWER_CUT_EXIT_CODE if outcome is ServeOutcome.POWER_CUT else 0


if __name__ == "__main__":
    sys.exit(main())
