"""COMPUTE/VERIFY SIGNATURE UPDATE data of the full-text mode (GSMA IoT.05 §3.5, mode 01).

In mode 01 the card hashes the message; the host sends it in tag ``9B`` over one or more
UPDATEs (P1 ``00`` more, ``80`` last). Public clients disagree on the ``9B`` length coding, so
the card accepts each of them:

- one byte (``9B 20 …``), as Orange's library writes it;
- BER long forms (``9B 81 xx``, ``82 xx xx``, ``83 xx xx xx``, ISO/IEC 7816-4 §5.2.2.2);
- a fixed 3-byte length (``9B 00 01 00 …``: IoT.05 allows a message up to ``FFFFFF`` bytes);

and both block structures: every block its own ``9B`` TLV, or (Thales' middleware) the first
block's ``9B`` announcing the whole message with the later blocks untagged continuation.

Pure functions over bytes; the applet keeps the running hash.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from est_agent.card.iotsafe_codes import TAG_MESSAGE

__all__ = ["MAX_MESSAGE_BYTES", "MessageBlock", "split_message_block"]

#: the largest message a 3-byte length can announce (IoT.05 §3.5)
MAX_MESSAGE_BYTES = 0xFFFFFF


@dataclass(frozen=True)
class MessageBlock:
    """One UPDATE's share of the message, what follows it, and what is still owed after it."""

    chunk: bytes
    rest: bytes  # data after the message part (VERIFY: the signature TLV)
    remaining: int  # message bytes announced by a total-length 9B but not yet sent


def _length_forms(data: bytes) -> list[tuple[int, int]]:
    """(header size, value length) readings of a ``9B`` header: 1-byte/BER first, then fixed
    3-byte; a header that cannot be read is not listed."""
    forms: list[tuple[int, int]] = []
    if len(data) < 2:
        return forms
    first = data[1]
    if first < 0x80:
        forms.append((2, first))
    elif 0x81 <= first <= 0x83:
        size = first - 0x80
        if len(data) >= 2 + size:
            forms.append((2 + size, int.from_bytes(data[2 : 2 + size], "big")))
    if len(data) >= 4:
        forms.append((4, int.from_bytes(data[1:4], "big")))
    return forms


def split_message_block(
    data: bytes,
    *,
    remaining: int,
    first_block: bool,
    rest_ok: Callable[[bytes], bool],
) -> MessageBlock | None:
    """Read one UPDATE's data field; None when no reading fits (the card answers 6A80).

    ``remaining``: bytes still owed by an earlier total-length ``9B`` (then this block starts
    with untagged message bytes). ``rest_ok`` says whether what follows the message part may
    stand there (COMPUTE: nothing; VERIFY's last block: one signature TLV).
    """
    if remaining:
        chunk = data[:remaining]
        rest = data[len(chunk) :]
        if not rest_ok(rest):
            return None
        return MessageBlock(chunk, rest, remaining - len(chunk))
    if not data or data[0] != TAG_MESSAGE:
        # VERIFY's last block may carry the signature alone, the message having gone before
        return MessageBlock(b"", data, 0) if data and rest_ok(data) else None
    forms = _length_forms(data)
    for header, length in forms:
        end = header + length
        if end <= len(data) and rest_ok(data[end:]):
            return MessageBlock(data[header:end], data[end:], 0)
    if first_block:
        # Thales' form: the first 9B announces the whole message, the rest follows untagged
        for header, length in forms:
            if header + length > len(data) and length <= MAX_MESSAGE_BYTES:
                return MessageBlock(data[header:], b"", length - (len(data) - header))
    return None
