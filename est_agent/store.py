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

Each slot is judged into one of four states (``SlotState``), and the difference between the
last two is the point of this module:

* ``VALID``: the record is intact (magic, version, length within the EF, hash), the certificate
  parses and carries the public key now in the slot's key object;
* ``EMPTY``: read, and nothing there (no record magic: a fresh EF, FF or 00 filled);
* ``DAMAGED``: read, and what is there cannot be used: a torn write (hash or length), a length
  beyond the EF, a certificate that does not parse, a key regenerated without its certificate;
* ``UNKNOWN``: *could not be read* (READ BINARY or READ PUBLIC KEY refused with a status word,
  a record format this agent does not know). Unknown is not empty: such a slot may hold the
  working credential, so nothing may be written anywhere until it can be read (the workflow's
  plan stops with ``SlotUnreadableError``).

Transport failures (card gone, link silent) are not a slot state: they abort the whole run.

Rules (certbot's lineage idea on two EFs): the active credential is the slot with the highest
sequence number that is ``VALID``. A new credential is always written to a slot that is not the
active one and not ``UNKNOWN``, and read back before it counts, so the old one stays usable until
then. A torn write (hash mismatch) or a key regenerated without a certificate (key mismatch) is
never adopted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

from est_agent.digests import sha256
from est_agent.errors import CardError, InputError, StoreError, TransportError

if TYPE_CHECKING:
    # cryptography is imported where certificates are parsed: `est-agent run` with nothing due
    # only decodes a record header and must start fast.
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

    from est_agent.backends.base import CredentialBackend, KeyRef, RecordRef

__all__ = [
    "HEADER_SIZE",
    "MAGIC",
    "REASON_CERTIFICATE",
    "REASON_EF_TOO_SMALL",
    "REASON_HEADER",
    "REASON_KEY_MISMATCH",
    "REASON_KEY_UNREADABLE",
    "REASON_LENGTH",
    "REASON_RECORD_UNREADABLE",
    "REASON_TORN",
    "REASON_UNKNOWN_FORMAT",
    "HeaderVerdict",
    "RecordHeader",
    "Slot",
    "SlotState",
    "SlotView",
    "check_record",
    "decode_header",
    "encode_record",
    "judge_header",
    "pick_active",
    "public_key_digest",
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
    """An operational slot: where its key and its certificate record live (references the
    credential backend understands: an IoT SAFE key and a UICC EF for the SIM)."""

    index: int  # 0 or 1
    key: KeyRef
    record: RecordRef
    label: str = ""

    @property
    def name(self) -> str:
        return self.label or str(self.index)


@dataclass(frozen=True)
class RecordHeader:
    sequence: int
    length: int
    sha256: bytes


class SlotState(Enum):
    """What a slot holds, as far as the card let us see (module docstring)."""

    VALID = "valid"
    EMPTY = "empty"
    DAMAGED = "damaged"
    UNKNOWN = "unknown"


#: ``SlotView.reason`` values: why a slot is DAMAGED or UNKNOWN (short, stable, for --json)
REASON_TORN = "torn"  # the certificate does not match its hash or length
REASON_LENGTH = "length-beyond-ef"
REASON_HEADER = "bad-header"  # magic present, zero sequence or length
REASON_CERTIFICATE = "bad-certificate"  # intact record whose DER does not parse (or unusable)
REASON_KEY_MISMATCH = "key-mismatch"  # certificate is not for the key now in the slot
REASON_EF_TOO_SMALL = "ef-too-small"
REASON_RECORD_UNREADABLE = "record-unreadable"
REASON_KEY_UNREADABLE = "key-unreadable"
REASON_UNKNOWN_FORMAT = "unknown-format"


@dataclass(frozen=True)
class SlotView:
    """What one slot holds, and whether it can be the active credential."""

    slot: Slot
    state: SlotState
    header: RecordHeader | None = None
    certificate: x509.Certificate | None = None
    reason: str = ""
    detail: str = ""

    @property
    def valid(self) -> bool:
        return self.state is SlotState.VALID


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
        + sha256(certificate_der).digest()
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


@dataclass(frozen=True)
class HeaderVerdict:
    """``judge_header``'s answer: a header to follow, or the slot's final state."""

    header: RecordHeader | None
    state: SlotState | None = None  # None: read the body and judge it
    reason: str = ""
    detail: str = ""


def judge_header(data: bytes, ef_size: int | None) -> HeaderVerdict:
    """Pure: what the first bytes of a slot's EF say (``ef_size`` from its FCP, if known)."""
    if ef_size is not None and ef_size < HEADER_SIZE:
        return HeaderVerdict(
            None, SlotState.DAMAGED, REASON_EF_TOO_SMALL, f"EF of {ef_size} bytes holds no record"
        )
    if data[:4] != MAGIC:
        return HeaderVerdict(None, SlotState.EMPTY)
    if len(data) < HEADER_SIZE:
        return HeaderVerdict(None, SlotState.DAMAGED, REASON_HEADER, "record header cut short")
    if data[4] != VERSION:
        # Written by another (newer?) agent: it may be the working credential in a format we
        # cannot judge, so it is not ours to overwrite.
        return HeaderVerdict(
            None,
            SlotState.UNKNOWN,
            REASON_UNKNOWN_FORMAT,
            f"record format version {data[4]} (this agent knows {VERSION})",
        )
    header = decode_header(data)
    if header is None:
        return HeaderVerdict(None, SlotState.DAMAGED, REASON_HEADER, "zero sequence or length")
    if ef_size is not None and HEADER_SIZE + header.length > ef_size:
        return HeaderVerdict(
            header,
            SlotState.DAMAGED,
            REASON_LENGTH,
            f"record claims {header.length} bytes; the EF holds {ef_size - HEADER_SIZE}",
        )
    return HeaderVerdict(header)


def public_key_digest(key: ec.EllipticCurvePublicKey) -> str:
    """Hex SHA-256 of the uncompressed SEC1 point (what the host cache remembers of a key)."""
    return sha256(_point(key)).hexdigest()


def _point(key: ec.EllipticCurvePublicKey) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return key.public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)


def check_record(
    slot: Slot,
    header: RecordHeader,
    body: bytes,
    card_public_key: ec.EllipticCurvePublicKey | None,
) -> SlotView:
    """Pure verdict on a record read from ``slot`` (``body`` = bytes after the header).

    ``card_public_key`` None means the slot's key object holds no key (read, and empty).
    """
    from cryptography import x509
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.asymmetric import ec

    der = body[: header.length]
    if len(der) != header.length or sha256(der).digest() != header.sha256:
        detail = "certificate does not match its hash"
        return SlotView(slot, SlotState.DAMAGED, header, None, REASON_TORN, detail)
    try:
        cert = x509.load_der_x509_certificate(der)
        cert_key = cert.public_key()
    except (ValueError, UnsupportedAlgorithm) as exc:
        return SlotView(
            slot, SlotState.DAMAGED, header, None, REASON_CERTIFICATE, str(exc)[:120]
        )
    if not isinstance(cert_key, ec.EllipticCurvePublicKey):
        return SlotView(
            slot, SlotState.DAMAGED, header, cert, REASON_KEY_MISMATCH, "certificate key is not EC"
        )
    if card_public_key is None:
        return SlotView(
            slot, SlotState.DAMAGED, header, cert, REASON_KEY_MISMATCH, "no key in the slot"
        )
    if _point(cert_key) != _point(card_public_key):
        return SlotView(
            slot,
            SlotState.DAMAGED,
            header,
            cert,
            REASON_KEY_MISMATCH,
            "certificate is not for the slot's key",
        )
    return SlotView(slot, SlotState.VALID, header, cert)


def pick_active(views: list[SlotView]) -> SlotView | None:
    """The valid slot with the highest sequence number (the lower index on a tie)."""
    valid = [v for v in views if v.valid and v.header is not None]
    return max(
        valid,
        key=lambda v: (v.header.sequence if v.header else 0, -v.slot.index),
        default=None,
    )


# --- card I/O --------------------------------------------------------------------------------


def _unknown(
    slot: Slot, reason: str, exc: Exception, header: RecordHeader | None = None
) -> SlotView:
    return SlotView(slot, SlotState.UNKNOWN, header, None, reason, str(exc))


def read_slot(backend: CredentialBackend, slot: Slot) -> SlotView:
    """Read and judge one slot. One read for an empty slot (SELECT + READ BINARY on the SIM);
    the key is read only when the record itself is intact.

    A refusal of the device (``CardError``: a status word on the SIM) makes the slot UNKNOWN;
    a transport failure (``TransportError``) propagates: the device is gone, the run ends.
    """
    with backend.transaction():  # one consistent look at the slot
        return _read_slot(backend, slot)


def _read_slot(backend: CredentialBackend, slot: Slot) -> SlotView:
    try:
        size = backend.record_size(slot.record)
        want = _READ_CHUNK if size is None else min(_READ_CHUNK, size)
        first = backend.read_record(slot.record, 0, want)
    except TransportError:
        raise
    except (CardError, InputError) as exc:
        return _unknown(slot, REASON_RECORD_UNREADABLE, exc)
    verdict = judge_header(first, size)
    header = verdict.header
    if verdict.state is not None:
        return SlotView(slot, verdict.state, header, None, verdict.reason, verdict.detail)
    assert header is not None
    body = first[HEADER_SIZE:]
    missing = header.length - len(body)
    if missing > 0:
        try:
            body += backend.read_record(slot.record, len(first), missing)
        except TransportError:
            raise
        except (CardError, InputError) as exc:
            return _unknown(slot, REASON_RECORD_UNREADABLE, exc, header)
    if sha256(body[: header.length]).digest() != header.sha256:
        return check_record(slot, header, body, None)  # torn: the key is not worth a command
    try:
        key = backend.public_key(slot.key)
    except TransportError:
        raise
    except CardError as exc:
        # The record is intact; only the key could not be read. It may well be the working
        # credential: UNKNOWN, never "no key".
        return _unknown(slot, REASON_KEY_UNREADABLE, exc, header)
    return check_record(slot, header, body, key)


def write_slot(
    backend: CredentialBackend,
    slot: Slot,
    sequence: int,
    certificate_der: bytes,
    expected_key: ec.EllipticCurvePublicKey,
) -> SlotView:
    """Write a record to ``slot`` and read it back; ``StoreError`` unless it reads back valid.

    The caller guarantees ``slot`` is not the active one (workflow/plan.py), so a failure here
    leaves the active credential untouched.
    """
    record = encode_record(sequence, certificate_der)
    try:
        with backend.transaction():  # read back what this write left, unmixed
            backend.write_record(slot.record, record)
            back = backend.read_record(slot.record, 0, len(record))
    except TransportError:
        # The device went away mid-write: whether the record is complete is unknown (the next
        # run reads it and adopts it only if intact), so this is "unavailable", not
        # "not installed".
        raise
    except (CardError, InputError) as exc:
        raise StoreError(f"writing the certificate to {slot.record} failed: {exc}") from exc
    header = decode_header(back)
    if back != record or header is None:
        raise StoreError(f"{slot.record} reads back different bytes than were written")
    view = check_record(slot, header, back[HEADER_SIZE:], expected_key)
    if not view.valid:
        raise StoreError(f"{slot.record}: written record is not valid ({view.detail})")
    log.info("slot %s: certificate record %d written and verified", slot.name, sequence)
    return view
