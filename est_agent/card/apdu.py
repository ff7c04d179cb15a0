"""Command and response APDUs (ISO/IEC 7816-4 §5.1), short and extended, as immutable values.

Pure codecs: no I/O. Both the agent and the virtual SIM use them to frame bytes; what a command
*means* is decoded separately on each side.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from est_agent.errors import CardProtocolError, InputError

__all__ = ["CommandApdu", "ResponseApdu"]

_SHORT_MAX_LC = 255
_SHORT_MAX_LE = 256
_EXT_MAX_LC = 65535
_EXT_MAX_LE = 65536


@dataclass(frozen=True)
class CommandApdu:
    """One command. ``le`` is None when absent; 256 (short) / 65536 (extended) mean "all"."""

    cla: int
    ins: int
    p1: int
    p2: int
    data: bytes = b""
    le: int | None = None

    def __post_init__(self) -> None:
        for name in ("cla", "ins", "p1", "p2"):
            value = getattr(self, name)
            if not 0 <= value <= 0xFF:
                raise InputError(f"APDU {name} out of range: {value}")
        if len(self.data) > _EXT_MAX_LC:
            raise InputError(f"APDU data too long: {len(self.data)} bytes")
        if self.le is not None and not 1 <= self.le <= _EXT_MAX_LE:
            raise InputError(f"APDU Le out of range: {self.le}")

    @property
    def is_extended(self) -> bool:
        return len(self.data) > _SHORT_MAX_LC or (self.le is not None and self.le > _SHORT_MAX_LE)

    def with_le(self, le: int | None) -> CommandApdu:
        return replace(self, le=le)

    def with_cla(self, cla: int) -> CommandApdu:
        return replace(self, cla=cla)

    def encode(self) -> bytes:
        header = bytes((self.cla, self.ins, self.p1, self.p2))
        if self.is_extended:
            body = b""
            if self.data:
                body += b"\x00" + len(self.data).to_bytes(2, "big") + self.data
            if self.le is not None:
                le = b"\x00\x00" if self.le == _EXT_MAX_LE else self.le.to_bytes(2, "big")
                body += le if self.data else b"\x00" + le
            return header + body
        body = b""
        if self.data:
            body += bytes((len(self.data),)) + self.data
        if self.le is not None:
            body += bytes((self.le % _SHORT_MAX_LE,))
        return header + body

    @classmethod
    def decode(cls, raw: bytes) -> CommandApdu:
        """Parse any of the ISO 7816-4 cases 1, 2S/E, 3S/E, 4S/E."""
        n = len(raw)
        if n < 4:
            raise CardProtocolError(f"command APDU too short: {n} bytes")
        cla, ins, p1, p2 = raw[0], raw[1], raw[2], raw[3]
        if n == 4:
            return cls(cla, ins, p1, p2)
        if n == 5:
            return cls(cla, ins, p1, p2, le=raw[4] or _SHORT_MAX_LE)
        if raw[4] != 0:  # short case 3 or 4
            lc = raw[4]
            if n == 5 + lc:
                return cls(cla, ins, p1, p2, bytes(raw[5:]))
            if n == 6 + lc:
                return cls(cla, ins, p1, p2, bytes(raw[5:-1]), raw[-1] or _SHORT_MAX_LE)
            raise CardProtocolError(f"command APDU length {n} does not match Lc {lc}")
        # extended: B1 = 00 followed by two bytes
        if n == 7:
            le = int.from_bytes(raw[5:7], "big") or _EXT_MAX_LE
            return cls(cla, ins, p1, p2, le=le)
        lc = int.from_bytes(raw[5:7], "big")
        if lc == 0:
            raise CardProtocolError("extended command APDU with Lc = 0")
        if n == 7 + lc:
            return cls(cla, ins, p1, p2, bytes(raw[7:]))
        if n == 9 + lc:
            le = int.from_bytes(raw[-2:], "big") or _EXT_MAX_LE
            return cls(cla, ins, p1, p2, bytes(raw[7:-2]), le)
        raise CardProtocolError(f"extended command APDU length {n} does not match Lc {lc}")

    def __repr__(self) -> str:
        # Data is summarised by length only: APDUs can carry secrets (digests, PINs).
        return (
            f"CommandApdu(cla={self.cla:02X}, ins={self.ins:02X}, p1={self.p1:02X}, "
            f"p2={self.p2:02X}, lc={len(self.data)}, le={self.le})"
        )


@dataclass(frozen=True)
class ResponseApdu:
    """Response data plus the two status bytes."""

    data: bytes
    sw: int

    @property
    def sw1(self) -> int:
        return self.sw >> 8

    @property
    def sw2(self) -> int:
        return self.sw & 0xFF

    def encode(self) -> bytes:
        return self.data + self.sw.to_bytes(2, "big")

    @classmethod
    def decode(cls, raw: bytes) -> ResponseApdu:
        if len(raw) < 2:
            raise CardProtocolError(f"response APDU too short: {len(raw)} bytes")
        return cls(bytes(raw[:-2]), int.from_bytes(raw[-2:], "big"))

    def __repr__(self) -> str:
        return f"ResponseApdu(len={len(self.data)}, sw={self.sw:04X})"
