"""UICC file access (ETSI TS 102 221 §11.1): SELECT, READ BINARY, UPDATE BINARY.

IoT SAFE v1 gives the device no command to write a file container (docs/iot-safe-card.md §7), so
issued certificates go to a transparent EF the SIM issuer created. Never run these on the
applet's channel: a Java Card runtime forwards SELECT-by-FID to the selected applet.
"""

from __future__ import annotations

from dataclasses import dataclass

from est_agent.card.channel import LogicalChannel
from est_agent.card.tlv import decode_tlvs, find_tlv
from est_agent.card.uri import UiccPath
from est_agent.errors import CardProtocolError, InputError

__all__ = [
    "EF_ICCID",
    "FileControlParameters",
    "UiccFiles",
    "decode_fcp",
    "decode_iccid",
    "is_valid_iccid",
    "luhn_check_digit",
]

INS_SELECT = 0xA4
INS_READ_BINARY = 0xB0
INS_UPDATE_BINARY = 0xD6

SELECT_BY_FID = 0x00
SELECT_BY_PATH_FROM_MF = 0x08
SELECT_RETURN_FCP = 0x04
SELECT_NO_DATA = 0x0C

EF_ICCID = UiccPath((0x2FE2,))

_MAX_READ = 256  # short Le 00
_MAX_UPDATE = 255  # short Lc
_MAX_OFFSET = 0x7FFF  # 15-bit offset when P1 bit 8 is 0


@dataclass(frozen=True)
class FileControlParameters:
    """The parts of an FCP template (TS 102 221 §11.1.1.3) this agent uses."""

    fid: int | None
    size: int | None  # tag 80: file size of an EF
    descriptor: bytes  # tag 82
    is_transparent_ef: bool
    is_df: bool


def decode_fcp(data: bytes) -> FileControlParameters:
    tlvs = decode_tlvs(data)
    template = find_tlv(tlvs, 0x62)
    if template is None:
        raise CardProtocolError("SELECT: answer is not an FCP template (tag 62)")
    inner = decode_tlvs(template)
    descriptor = find_tlv(inner, 0x82) or b""
    fid = find_tlv(inner, 0x83)
    size = find_tlv(inner, 0x80)
    kind = descriptor[0] if descriptor else 0
    return FileControlParameters(
        fid=int.from_bytes(fid, "big") if fid else None,
        size=int.from_bytes(size, "big") if size else None,
        descriptor=descriptor,
        # file descriptor byte: b6-b4 = 0 working EF, b3-b1 = 001 transparent; 0x38 = DF
        is_transparent_ef=kind & 0b10111111 == 0x01,
        is_df=kind & 0x38 == 0x38,
    )


def luhn_check_digit(digits: str) -> str:
    """The Luhn (mod 10) digit that completes ``digits`` (ITU-T E.118 ICCID check digit)."""
    total = 0
    for index, char in enumerate(reversed(digits)):
        value = int(char)
        if index % 2 == 0:  # doubled: it will sit in an odd position once the check digit follows
            value *= 2
            if value > 9:
                value -= 9
        total += value
    return str((10 - total % 10) % 10)


def is_valid_iccid(value: str) -> bool:
    """18-20 digits ending in a correct Luhn check digit (ITU-T E.118)."""
    return value.isdigit() and 18 <= len(value) <= 20 and luhn_check_digit(value[:-1]) == value[-1]


def decode_iccid(data: bytes) -> str:
    """EF_ICCID (TS 102 221 §13.2): BCD with swapped nibbles, F padding."""
    digits = []
    for byte in data:
        for nibble in (byte & 0x0F, byte >> 4):
            if nibble == 0xF:
                continue
            if nibble > 9:
                raise CardProtocolError("EF_ICCID holds a non-BCD digit")
            digits.append(str(nibble))
    return "".join(digits)


class UiccFiles:
    """Transparent-EF access on one logical channel (channel 0, or one opened for this)."""

    def __init__(self, channel: LogicalChannel) -> None:
        self.channel = channel
        self._selected: UiccPath | None = None
        self._selected_size: int | None = None
        self._selected_epoch = -1  # the card transaction in which _selected was selected

    def select(self, path: UiccPath) -> FileControlParameters:
        """SELECT by path from the MF (P1 08) asking for the FCP, which gives the EF size."""
        response = self.channel.exchange(
            INS_SELECT,
            SELECT_BY_PATH_FROM_MF,
            SELECT_RETURN_FCP,
            path.encode(),
            256,
            name=f"SELECT {path}",
        )
        fcp = decode_fcp(response.data)
        self._selected = path
        self._selected_size = fcp.size
        self._selected_epoch = self.channel.session.transaction_epoch
        return fcp

    def select_fid(self, fid: int) -> FileControlParameters:
        """SELECT by file ID (P1 00) from the current DF: children, parent, or the MF 3F00."""
        response = self.channel.exchange(
            INS_SELECT,
            SELECT_BY_FID,
            SELECT_RETURN_FCP,
            fid.to_bytes(2, "big"),
            256,
            name=f"SELECT {fid:04X}",
        )
        self._selected = None  # a relative selection: the path is no longer known
        return decode_fcp(response.data)

    def _ensure(self, path: UiccPath) -> int | None:
        # Outside the transaction that selected it, another client may have selected another
        # EF on this channel: writing then would hit that file. Select again.
        if self._selected != path or self._selected_epoch != self.channel.session.transaction_epoch:
            self.select(path)
        return self._selected_size

    def size(self, path: UiccPath) -> int | None:
        """The EF's size from its FCP (tag 80), selecting it first if needed; None if the
        card did not report one."""
        with self.channel.session.transaction():
            return self._ensure(path)

    def read(self, path: UiccPath, offset: int = 0, length: int | None = None) -> bytes:
        """READ BINARY ``length`` bytes (default: to the end of the EF) in 256-byte chunks."""
        with self.channel.session.transaction():
            return self._read(path, offset, length)

    def _read(self, path: UiccPath, offset: int, length: int | None) -> bytes:
        size = self._ensure(path)
        if length is None:
            if size is None:
                raise CardProtocolError(f"{path}: the card did not report the EF size")
            length = size - offset
        if offset < 0 or length < 0 or (size is not None and offset + length > size):
            raise InputError(f"{path}: read of {length} bytes at {offset} outside the EF")
        out = b""
        while len(out) < length:
            position = offset + len(out)
            if position > _MAX_OFFSET:
                raise InputError(f"{path}: offset {position} beyond 15-bit addressing")
            want = min(_MAX_READ, length - len(out))
            response = self.channel.exchange(
                INS_READ_BINARY, position >> 8, position & 0xFF, le=want, name="READ BINARY"
            )
            if not response.data:
                raise CardProtocolError(f"{path}: READ BINARY returned no data at {position}")
            out += response.data[:want]
        return out

    def update(self, path: UiccPath, data: bytes, offset: int = 0) -> None:
        """UPDATE BINARY ``data`` at ``offset`` in 255-byte chunks."""
        with self.channel.session.transaction():
            self._update(path, data, offset)

    def _update(self, path: UiccPath, data: bytes, offset: int) -> None:
        size = self._ensure(path)
        if offset < 0 or (size is not None and offset + len(data) > size):
            raise InputError(
                f"{path}: {len(data)} bytes at offset {offset} do not fit the EF ({size} bytes)"
            )
        written = 0
        while written < len(data):
            position = offset + written
            if position > _MAX_OFFSET:
                raise InputError(f"{path}: offset {position} beyond 15-bit addressing")
            piece = data[written : written + _MAX_UPDATE]
            self.channel.exchange(
                INS_UPDATE_BINARY, position >> 8, position & 0xFF, piece, name="UPDATE BINARY"
            )
            written += len(piece)
