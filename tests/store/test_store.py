"""The SIM credential store: record format and adoption rules (pure), I/O on the virtual SIM."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from est_agent.backends.iotsafe_uicc import IotSafeUiccBackend
from est_agent.card.channel import CardSession
from est_agent.card.iotsafe import IotSafeApplet
from est_agent.card.uicc import UiccFiles
from est_agent.card.uri import IotSafeRef, ObjectKind, UiccPath
from est_agent.errors import StoreError
from est_agent.sim.options import DEFAULT_AID
from est_agent.sim.personalize import personalize
from est_agent.sim.transport import SimTransport
from est_agent.store import (
    HEADER_SIZE,
    MAGIC,
    Slot,
    SlotState,
    SlotView,
    check_record,
    decode_header,
    encode_record,
    pick_active,
    read_slot,
    write_slot,
)
from tests.certs import certificate, self_signed_der

KEY = ec.generate_private_key(ec.SECP256R1())
OTHER = ec.generate_private_key(ec.SECP256R1())
CERT = self_signed_der(KEY)
SLOT_A = Slot(0, IotSafeRef(ObjectKind.PRIVATE_KEY, object_id=b"\x02"), UiccPath((0x7FF0, 0x6F01)))
SLOT_B = Slot(1, IotSafeRef(ObjectKind.PRIVATE_KEY, object_id=b"\x03"), UiccPath((0x7FF0, 0x6F02)))


def test_record_layout_is_byte_exact() -> None:
    record = encode_record(7, CERT)
    assert record[:4] == MAGIC == b"ESTC"
    assert record[4:6] == b"\x01\x00"
    assert record[6:10] == (7).to_bytes(4, "big")
    assert record[10:12] == len(CERT).to_bytes(2, "big")
    assert record[12:44] == hashlib.sha256(CERT).digest()
    assert record[HEADER_SIZE:] == CERT
    header = decode_header(record)
    assert header is not None and (header.sequence, header.length) == (7, len(CERT))


@pytest.mark.parametrize(
    "data",
    [
        b"\xff" * 256,
        b"\x00" * 256,
        b"ESTC",
        b"ESTC\x02" + b"\x00" * 60,
        encode_record(1, CERT)[:6] + b"\x00" * 4 + encode_record(1, CERT)[10:],
    ],
    ids=["ff-filled", "zero-filled", "short", "future-version", "sequence-0"],
)
def test_no_record(data: bytes) -> None:
    assert decode_header(data) is None


def test_encode_limits() -> None:
    with pytest.raises(StoreError):
        encode_record(0, CERT)
    with pytest.raises(StoreError):
        encode_record(1, b"")


def _verdict(view: SlotView) -> tuple[str, str]:
    return view.state.value, view.reason


def test_verdicts() -> None:
    record = encode_record(3, CERT)
    header = decode_header(record)
    assert header is not None
    body = record[HEADER_SIZE:]
    assert check_record(SLOT_A, header, body, KEY.public_key()).state is SlotState.VALID
    torn = body[:-10] + b"\xff" * 10
    assert _verdict(check_record(SLOT_A, header, torn, KEY.public_key())) == ("damaged", "torn")
    assert _verdict(check_record(SLOT_A, header, body[:100], KEY.public_key())) == (
        "damaged",
        "torn",
    )
    mismatch = check_record(SLOT_A, header, body, OTHER.public_key())
    assert _verdict(mismatch) == ("damaged", "key-mismatch") and mismatch.certificate is not None
    assert _verdict(check_record(SLOT_A, header, body, None)) == ("damaged", "key-mismatch")
    garbage = b"\x30\x03\x02\x01\x01"
    bad = decode_header(encode_record(4, garbage))
    assert bad is not None
    assert _verdict(check_record(SLOT_A, bad, garbage, KEY.public_key())) == (
        "damaged",
        "bad-certificate",
    )


def test_pick_active_highest_valid_sequence() -> None:
    def view(slot: Slot, seq: int, state: SlotState) -> SlotView:
        header = decode_header(encode_record(seq, CERT))
        return SlotView(slot, state, header)

    assert (
        pick_active([view(SLOT_A, 1, SlotState.VALID), view(SLOT_B, 2, SlotState.VALID)]).slot
        == SLOT_B
    )  # type: ignore[union-attr]
    # a newer record that is damaged or unknown never wins
    for broken in (SlotState.DAMAGED, SlotState.UNKNOWN, SlotState.EMPTY):
        chosen = pick_active([view(SLOT_A, 1, SlotState.VALID), view(SLOT_B, 9, broken)])
        assert chosen is not None and chosen.slot == SLOT_A
    assert (
        pick_active([SlotView(SLOT_A, SlotState.EMPTY), SlotView(SLOT_B, SlotState.EMPTY)])
        is None
    )


@pytest.fixture
def card(tmp_path: Path) -> tuple[IotSafeApplet, IotSafeUiccBackend, SimTransport]:
    state = tmp_path / "sim.json"
    personalize(state)
    transport = SimTransport(state)
    session = CardSession(transport)
    backend = IotSafeUiccBackend(session, UiccFiles(session.basic_channel), aids=(DEFAULT_AID,))
    return backend.applet, backend, transport


Card = tuple[IotSafeApplet, IotSafeUiccBackend, SimTransport]


def test_fresh_sim_slot_costs_two_apdus(card: Card) -> None:
    _, backend, transport = card
    before = transport.stats.apdus
    view = read_slot(backend, SLOT_A)  # an empty record: the key is not even read
    assert view.state is SlotState.EMPTY
    assert transport.stats.apdus - before == 2


def test_write_read_back_and_adopt(card: Card) -> None:
    applet, backend, _ = card
    key = backend.generate_key(SLOT_A.key)
    # a certificate for the card key, signed by some issuer key
    der = certificate(key, KEY, cn="device", issuer_cn="test issuer").public_bytes(Encoding.DER)
    written = write_slot(backend, SLOT_A, 5, der, key)
    assert written.valid
    view = read_slot(backend, SLOT_A)
    assert view.valid and view.header is not None and view.header.sequence == 5
    # the key regenerated without a new certificate: no longer adopted
    applet.generate_key_pair(SLOT_A.key)
    assert _verdict(read_slot(backend, SLOT_A)) == ("damaged", "key-mismatch")


def test_write_refuses_a_certificate_for_another_key(card: Card) -> None:
    _, backend, _ = card
    with pytest.raises(StoreError, match="not valid"):
        write_slot(backend, SLOT_B, 1, CERT, OTHER.public_key())


def test_torn_write_is_never_adopted(card: Card) -> None:
    _, backend, _ = card
    record = encode_record(2, CERT)
    backend.write_record(SLOT_B.record, record[:300])  # power lost after the 2nd UPDATE BINARY
    assert _verdict(read_slot(backend, SLOT_B)) == ("damaged", "torn")
