"""The logical channel in a CLA byte (ETSI TS 102 221 §10.1.1), as pure functions.

The one coding of channels into CLA for every layer: the card session builds its commands with
it, the AT transport moves commands onto the modem's sessions with it, and the virtual SIM
decodes what it receives with it. It sits in transport, the lowest layer, so every layer above
can import it.

TS 102 221 §10.1.1 (and ISO/IEC 7816-4 §5.4.1 for the inter-industry classes):

- channels 0-3: the two low bits carry the channel; high nibble ``0`` (inter-industry),
  ``8`` (TS 102 221 proprietary) or ``A`` (GSM, TS 51.011); bits b4 b3 are secure messaging;
- channels 4-19: ``4X`` (inter-industry) or ``CX`` (proprietary) with X = channel - 4.

Any other high nibble is not a class that codes a channel.
"""

from __future__ import annotations

from est_agent.errors import InputError

__all__ = [
    "MAX_CHANNEL",
    "channel_from_cla",
    "channel_of_cla",
    "cla_for_channel",
    "with_channel",
]

#: the highest logical channel TS 102 221 §10.1.1 can code (``4F``/``CF``)
MAX_CHANNEL = 19

_SHORT_CLASSES = (0x0, 0x8, 0xA)  # `0N`, `8N`, `AN`: channels 0-3
_LONG_CLASSES = (0x4, 0xC)  # `4X`, `CX`: channels 4-19


def cla_for_channel(channel: int, *, proprietary: bool = False) -> int:
    """CLA byte for ``channel``: inter-industry (`0N`/`4X`) or proprietary (`8N`/`CX`)."""
    if not 0 <= channel <= MAX_CHANNEL:
        raise InputError(f"logical channel {channel} outside 0..{MAX_CHANNEL}")
    if channel <= 3:
        return (0x80 if proprietary else 0x00) | channel
    return (0xC0 if proprietary else 0x40) | (channel - 4)


def channel_of_cla(cla: int) -> int | None:
    """The channel ``cla`` codes, or None when its class codes no channel (e.g. `2X`, `FF`)."""
    high = cla >> 4
    if high in _SHORT_CLASSES:
        return cla & 0x03
    if high in _LONG_CLASSES:
        return 4 + (cla & 0x0F)
    return None


def channel_from_cla(cla: int) -> int:
    """The channel bits of ``cla`` read without checking the class (`0N`/`8N`/`AN` -> N,
    `4X`/`CX` -> 4 + X): for commands the host built itself."""
    return 4 + (cla & 0x0F) if cla & 0x40 else cla & 0x03


def with_channel(cla: int, channel: int) -> int:
    """``cla`` moved to ``channel`` (0..19), keeping its class (inter-industry or proprietary)
    and, when both codings are `0N`/`8N`/`AN`, the secure-messaging bits b4 b3."""
    if not 0 <= channel <= MAX_CHANNEL:
        raise InputError(f"logical channel {channel} outside 0..{MAX_CHANNEL}")
    proprietary = cla & 0x80
    if channel <= 3:
        base = proprietary if cla & 0x40 else cla & 0xFC
        return base | channel
    return proprietary | 0x40 | (channel - 4)
