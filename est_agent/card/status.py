"""Status words: readable meanings and the typed exception each one raises.

Sources: ISO/IEC 7816-4 §5.1.3, ETSI TS 102 221 §10.2, and the GSMA IoT.05 applet status words
as Orange's IoT-SAFE-APDU-library lists them (docs/iot-safe-card.md §9).
"""

from __future__ import annotations

from est_agent.errors import (
    ConditionsNotSatisfiedError,
    NotFoundError,
    SecurityStatusError,
    StatusWordError,
)

__all__ = ["SW_OK", "describe_sw", "error_for_sw", "is_success"]

SW_OK = 0x9000

_EXACT: dict[int, str] = {
    0x9000: "success",
    0x6200: "warning, no information",
    0x6281: "part of returned data may be corrupted",
    0x6282: "end of file reached before Le bytes",
    0x6283: "selected file invalidated",
    0x6300: "more data available",
    0x63CF: "success, remote administration session completed",
    0x6400: "applet store integrity issue",
    0x6581: "memory problem",
    0x6700: "wrong length",
    0x6881: "logical channel not supported",
    0x6882: "secure messaging not supported",
    0x6981: "command incompatible with file structure",
    0x6982: "security status not satisfied",
    0x6983: "authentication method blocked",
    0x6984: "referenced data invalidated",
    0x6985: "conditions of use not satisfied",
    0x6986: "command not allowed (no current EF)",
    0x6989: "remote administration updated the object, or capacity reached",
    0x6A80: "incorrect data",
    0x6A81: "function not supported",
    0x6A82: "file, object or application not found",
    0x6A84: "insufficient memory",
    0x6A86: "incorrect P1/P2",
    0x6A88: "referenced data not found",
    0x6B00: "wrong P1/P2 (offset outside the file)",
    0x6D00: "instruction not supported",
    0x6D01: "signature does not match",
    0x6E00: "class not supported",
    0x6F00: "unknown error",
    0x9300: "SIM application toolkit busy",
}

_BY_SW1: dict[int, str] = {
    0x61: "response bytes available",
    0x6C: "wrong Le",
    0x91: "success, proactive command pending",
    0x92: "success, data transfer information",
}


def describe_sw(sw: int) -> str:
    if sw in _EXACT:
        return _EXACT[sw]
    sw1, sw2 = sw >> 8, sw & 0xFF
    if sw1 in _BY_SW1:
        return f"{_BY_SW1[sw1]} ({sw2})"
    if sw1 == 0x63 and sw2 & 0xF0 == 0xC0:
        return f"verification failed, {sw2 & 0x0F} tries left"
    return "unknown status"


def is_success(sw: int) -> bool:
    """9000, and the 91xx/92xx "success plus information" family of TS 102 221 §10.2.1.1."""
    return sw == SW_OK or sw >> 8 in (0x91, 0x92)


def error_for_sw(sw: int, command: str = "") -> StatusWordError:
    """The most specific exception for a status word the caller did not expect, carrying the
    status word's meaning (errors.py holds no table of its own)."""
    meaning = describe_sw(sw)
    if sw == 0x6982:
        return SecurityStatusError(sw, command, meaning)
    if sw in (0x6A82, 0x6A88):
        return NotFoundError(sw, command, meaning)
    if sw == 0x6985:
        return ConditionsNotSatisfiedError(sw, command, meaning)
    return StatusWordError(sw, command, meaning)
