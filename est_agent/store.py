"""The credential store on the SIM: two slots, each an IoT SAFE key plus a UICC EF record.

Record layout in the EF (all integers big-endian):

    offset  size  field
    0       4     magic "ESTC"
    4       1     format version (1)
    5       1     reserved (0)
    6       4     sequence number (1, 2, ...; higher = newer)
    10      2     length N of the DER certificate
    12      32    SHA-256 of the DER certificate
    44      N     the DER certificate

Rules (certbot's lineage idea on two EFs): the active credential is the slot with the highest
sequence number whose record is intact (magic, length, hash) and whose certificate's public key
equals the slot's key on the card. A new credential is always written to the *other* slot and
read back before it counts, so the old one stays usable until then. A torn write (hash
mismatch) or a key regenerated without a certificate (key mismatch) is never adopted.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

from est_agent.card.uicc import UiccFiles
from est_agent.card.uri import IotSafeRef, UiccPath
from est_agent.errors import CardError, StoreError, TransportError

if TYPE_CHECKING:
    # cryptography is imported where certificates are parsed: `est-agent run` with nothing due
    # only decodes a record header and must start fast.
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

__all__ = [
    "HEADER_SIZE",
    "MAGIC",
    "RecordHeader",
    "Slot",
    "SlotStatus",
    "SlotView",
    "decode_header",
    "encode_record",
    "pick_active",
    "read_slot",
    "write_slot",
]

log = logging.getLogger(__name__)

MAGIC = b"ESTC"
VERSION = 1
HEADER_SIZE = 44
_READ_CHUNK = 256  # one short READ BINARY


@dataclass(frozen=True)
class Slot:
    """An operational slot: where its key lives in the applet and its record on the UICC."""

    index: int  # 0 or 1
    key: IotSafeRef
    ef: UiccPath
    label: str = ""

    @property
    def name(self) -> str:
        return self.label or str(self.index)


@dataclass(frozen=True)
class RecordHeader:
    sequence: int
    length: int
    sha256: bytes


class SlotStatus(Enum):
    EMPTY = "empty"  # no record (fresh EF, FF or 00 filled)
    VALID = "valid"
    TORN = "torn"  # header present but the certificate does not match its hash or length
    KEY_MISMATCH = "key-mismatch"  # certificate is not for the key now in the slot
    UNREADABLE = "unreadable"  # the EF could not be read (missing, access refused)
    BAD_CERTIFICATE = "bad-certificate"  # intact record whose DER does not parse


@dataclass(frozen=True)
class SlotView:
    """What one slot holds, and whether it can be the active credential."""

    slot: Slot
    status: SlotStatus
    header: RecordHeader | None = None
    certificate: x509.Certificate | None = None
    detail: str = ""

    @property
    def valid(self) -> bool:
        return self.status is SlotStatus.VALID


# --- pure codec ------------------------------------------------------------------------------


def encode_record(sequence: int, certificate_der: bytes) -> bytes:
    if not 0 < sequence < 2**32:
        raise StoreError(f"record sequence number out of range: {sequence}")
    if not 0 < len(certificate_der) < 2**16:
        raise StoreError(f"certificate of {len(certificate_der)} bytes cannot be stored")
    return (
        MAGIC
        + bytes((VERSION, 0))
        + sequence.to_bytes(4, "big")
        + len(certificate_der).to_bytes(2, "big")
        + hashlib.sha256(certificate_der).digest()
        + certificate_der
    )


def decode_header(data: bytes) -> RecordHeader | None:
    """The header at the start of ``data``, or None when there is no (usable) record."""
    if len(data) < HEADER_SIZE or data[:4] != MAGIC or data[4] != VERSION:
        return None
    sequence = int.from_bytes(data[6:10], "big")
    length = int.from_bytes(data[10:12], "big")
    if sequence == 0 or length == 0:
        return None
    return RecordHeader(sequence, length, bytes(data[12:44]))


def _point(key: ec.EllipticCurvePublicKey) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return key.public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)


def check_record(
    slot: Slot,
    header: RecordHeader,
    body: bytes,
    card_public_key: ec.EllipticCurvePublicKey | None,
) -> SlotView:
    """Pure verdict on a record read from ``slot`` (``body`` = bytes after the header)."""
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

    der = body[: header.length]
    if len(der) != header.length or hashlib.sha256(der).digest() != header.sha256:
        return SlotView(slot, SlotStatus.TORN, header, detail="certificate does not match its hash")
    try:
        cert = x509.load_der_x509_certificate(der)
        cert_key = cert.public_key()
    except ValueError as exc:
        return SlotView(slot, SlotStatus.BAD_CERTIFICATE, header, detail=str(exc)[:120])
    if not isinstance(cert_key, ec.EllipticCurvePublicKey):
        return SlotView(slot, SlotStatus.KEY_MISMATCH, header, cert, "certificate key is not EC")
    if card_public_key is None:
        return SlotView(slot, SlotStatus.KEY_MISMATCH, header, cert, "no key in the slot")
    if _point(cert_key) != _point(card_public_key):
        return SlotView(
            slot, SlotStatus.KEY_MISMATCH, header, cert, "certificate is not for the slot's key"
        )
    return SlotView(slot, SlotStatus.VALID, header, cert)


def pick_active(views: list[SlotView]) -> SlotView | None:
    """The valid slot with the highest sequence number."""
    valid = [v for v in views if v.valid and v.header is not None]
    return max(valid, key=lambda v: v.header.sequence if v.header else 0, default=None)


# --- card I/O --------------------------------------------------------------------------------


#: reads the public key now in a slot's key object (None when the slot has no key)
PublicKeyReader = Callable[[Slot], "ec.EllipticCurvePublicKey | None"]


def read_slot(files: UiccFiles, slot: Slot, public_key_of: PublicKeyReader) -> SlotView:
    """Read and judge one slot. One READ BINARY for an empty slot; the key is read only when
    the record itself is intact (so a fresh SIM costs two APDUs per slot: SELECT + READ)."""
    try:
        first = files.read(slot.ef, 0, _READ_CHUNK)
    except CardError as exc:
        return SlotView(slot, SlotStatus.UNREADABLE, detail=str(exc))
    header = decode_header(first)
    if header is None:
        return SlotView(slot, SlotStatus.EMPTY)
    body = first[HEADER_SIZE:]
    missing = header.length - len(body)
    if missing > 0:
        try:
            body += files.read(slot.ef, len(first), missing)
        except CardError as exc:
            return SlotView(slot, SlotStatus.UNREADABLE, header, detail=str(exc))
    digest_ok = hashlib.sha256(body[: header.length]).digest() == header.sha256
    key = public_key_of(slot) if digest_ok else None
    return check_record(slot, header, body, key)


def write_slot(
    files: UiccFiles,
    slot: Slot,
    sequence: int,
    certificate_der: bytes,
    expected_key: ec.EllipticCurvePublicKey,
) -> SlotView:
    """Write a record to ``slot`` and read it back; ``StoreError`` unless it reads back valid.

    The caller guarantees ``slot`` is not the active one, so a failure here leaves the active
    credential untouched.
    """
    record = encode_record(sequence, certificate_der)
    try:
        files.update(slot.ef, record)
        back = files.read(slot.ef, 0, len(record))
    except TransportError:
        # The card went away mid-write: whether the record is complete is unknown (the next
        # run reads it and adopts it only if intact), so this is "card unavailable", not
        # "not installed".
        raise
    except CardError as exc:
        raise StoreError(f"writing the certificate to {slot.ef} failed: {exc}") from exc
    header = decode_header(back)
    if back != record or header is None:
        raise StoreError(f"{slot.ef} reads back different bytes than were written")
    view = check_record(slot, header, back[HEADER_SIZE:], expected_key)
    if not view.valid:
        raise StoreError(f"{slot.ef}: written record is not valid ({view.detail})")
    log.info("slot %s: certificate record %d written and verified", slot.name, sequence)
    return view
