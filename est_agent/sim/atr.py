"""The virtual card's answer-to-reset (ISO/IEC 7816-3 §8, TS 102 221 §6.3).

3B        TS  direct convention
9F        T0  TA1 and TD1 follow; 15 historical bytes
96        TA1 Fi = 512, Di = 32 (TS 102 221 cards offer fast rates)
80        TD1 TD2 follows; T=0 offered
B1        TD2 TA3, TB3, TD3 follow; T=1 offered
FE        TA3 IFSC = 254 (T=1)
45        TB3 BWI = 4, CWI = 5 (T=1)
1F        TD3 TA4 follows; T=15 (global)
C7        TA4 clock stop supported, classes A, B and C (TS 102 221 §6.3.3)
80 ...    historical bytes, COMPACT-TLV (ISO/IEC 7816-4 §8.1.1):
          31 E0     card service data
          58 <8>    card issuer's data: the card serial, so each card's ATR differs
          82 90 00  status indicator: "9000"
TCK       XOR of T0..the last historical byte (required when T=1 is offered)
"""

from __future__ import annotations

from functools import reduce
from operator import xor

from est_agent.errors import SimStateError

__all__ = ["build_atr"]

_INTERFACE = bytes.fromhex("3B 9F 96 80 B1 FE 45 1F C7")
_SERIAL_BYTES = 8


def build_atr(serial: bytes) -> bytes:
    if len(serial) != _SERIAL_BYTES:
        raise SimStateError(f"card serial must be {_SERIAL_BYTES} bytes, got {len(serial)}")
    historical = b"\x80\x31\xe0\x58" + serial + b"\x82\x90\x00"
    body = _INTERFACE + historical
    return body + bytes((reduce(xor, body[1:], 0),))
