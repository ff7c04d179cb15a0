"""Simple TLVs as used in IoT SAFE data fields (1-byte tag, then a length, then the value).

The length is one byte in most places, but real cards and libraries also send BER long forms
(``81 xx``, ``82 xx xx``) and, for the signature tag ``33``, a plain 2-byte big-endian length
(``33 00 40 <r||s>``): see docs/iot-safe-card.md §2. ``decode_tlvs`` accepts all of them;
``encode_tlv`` emits the short form when it can and BER otherwise.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from est_agent.errors import CardProtocolError, InputError

__all__ = ["WIDE_LENGTH_TAGS", "Tlv", "decode_tlvs", "encode_tlv", "find_tlv", "iter_tlvs"]

#: tags whose first length byte 00 announces a 2-byte length (the IoT SAFE signature TLV)
WIDE_LENGTH_TAGS = frozenset({0x33})


@dataclass(frozen=True)
class Tlv:
    tag: int
    value: bytes


def encode_tlv(tag: int, value: bytes, *, two_byte_length: bool = False) -> bytes:
    """Encode one TLV; ``two_byte_length`` gives the ``T 00 LL`` form some cards use for 33."""
    n = len(value)
    if two_byte_length:
        if n > 0xFFFF:
            raise InputError(f"TLV {tag:02X}: value of {n} bytes does not fit a 2-byte length")
        return bytes((tag,)) + n.to_bytes(2, "big") + value
    if n < 0x80:
        length = bytes((n,))
    elif n <= 0xFF:
        length = b"\x81" + bytes((n,))
    elif n <= 0xFFFF:
        length = b"\x82" + n.to_bytes(2, "big")
    else:
        raise InputError(f"TLV {tag:02X}: value of {n} bytes does not fit a BER length of 2 bytes")
    return bytes((tag,)) + length + value


def iter_tlvs(data: bytes, *, wide_length_tags: frozenset[int] = WIDE_LENGTH_TAGS) -> Iterator[Tlv]:
    pos = 0
    end = len(data)
    while pos < end:
        if end - pos < 2:
            raise CardProtocolError(f"truncated TLV at offset {pos}")
        tag = data[pos]
        first = data[pos + 1]
        pos += 2
        if first == 0x00 and tag in wide_length_tags and end - pos >= 1:
            length = int.from_bytes(data[pos - 1 : pos + 1], "big")
            pos += 1
        elif first == 0x81:
            if pos >= end:
                raise CardProtocolError("truncated TLV length")
            length = data[pos]
            pos += 1
        elif first == 0x82:
            if end - pos < 2:
                raise CardProtocolError("truncated TLV length")
            length = int.from_bytes(data[pos : pos + 2], "big")
            pos += 2
        else:
            length = first
        if end - pos < length:
            raise CardProtocolError(
                f"TLV {tag:02X} announces {length} bytes, only {end - pos} present"
            )
        yield Tlv(tag, bytes(data[pos : pos + length]))
        pos += length


def decode_tlvs(data: bytes, *, wide_length_tags: frozenset[int] = WIDE_LENGTH_TAGS) -> list[Tlv]:
    return list(iter_tlvs(data, wide_length_tags=wide_length_tags))


def find_tlv(tlvs: Iterable[Tlv], tag: int) -> bytes | None:
    """Value of the first TLV with ``tag``, or None."""
    for tlv in tlvs:
        if tlv.tag == tag:
            return tlv.value
    return None
