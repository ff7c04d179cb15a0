"""PUT PUBLIC KEY (24/D8) and COMPUTE DH (46) on the virtual SIM, driven with raw APDU bytes;
the shared secrets are checked against `cryptography`'s ECDH (SEC 1 §3.3.1)."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from est_agent.sim.card import VirtualCard
from est_agent.sim.personalize import personalize
from est_agent.sim.state import CardState, load_state
from tests.scripted import AID, h, tx

PSK = bytes(range(0x40, 0x60))  # 32 bytes


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path: Path = tmp_path_factory.mktemp("sim") / "sim.json"
    personalize(path, iccid="8988247000001234567", psk=PSK)
    return path.read_bytes()


def fresh_card(template: bytes, tmp_path: Path) -> tuple[VirtualCard, CardState]:
    path = tmp_path / "sim.json"
    path.write_bytes(template)
    state = load_state(path)
    card = VirtualCard(state)
    assert tx(card, f"01 A4 04 00 07 {AID}") == (b"", 0x9000)  # channel 1, opened implicitly
    return card, state


def point_of(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)


def public(point: bytes) -> ec.EllipticCurvePublicKey:
    return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)


def put_key_update(point: bytes, p1: str = "80") -> str:
    return f"81 D8 {p1} 02 47 34 45 49 43 86 41 {point.hex()}"


def generate_ecdh(card: VirtualCard) -> bytes:
    answer, sw = tx(card, "81 B9 00 00 03 84 01 04")
    assert sw == 0x9000 and answer[:12] == h("84 01 04 85 01 04 34 45 49 43 86 41")
    return answer[12:]


def test_put_public_key_then_dh_matches_cryptography(template: bytes, tmp_path: Path) -> None:
    card, _ = fresh_card(template, tmp_path)
    card_point = generate_ecdh(card)
    peer = ec.generate_private_key(ec.SECP256R1())
    assert tx(card, "81 24 00 02 03 85 01 05") == (b"", 0x9000)
    assert tx(card, put_key_update(point_of(peer))) == (b"", 0x9000)
    assert tx(card, "81 24 01 02 00") == (b"", 0x9000)
    # the peer slot is readable, and holds what was put
    assert tx(card, "81 CD 00 00 03 85 01 05") == (h("34 45 49 43 86 41") + point_of(peer), 0x9000)
    shared, sw = tx(card, "81 46 00 00 06 84 01 04 85 01 05")
    assert sw == 0x9000 and len(shared) == 32
    assert shared == peer.exchange(ec.ECDH(), public(card_point))
    # by labels, the same
    assert tx(card, "81 46 00 00 0C 74 04" + b"ecdh".hex() + "75 04" + b"peer".hex()) == (
        shared,
        0x9000,
    )


def test_chained_updates_and_a_second_key_in_one_session(
    template: bytes, tmp_path: Path
) -> None:
    card, _ = fresh_card(template, tmp_path)
    card_point = generate_ecdh(card)
    encoding = "49 43 86 41 " + point_of(ec.generate_private_key(ec.SECP256R1())).hex()
    raw = h(encoding)
    assert tx(card, "81 24 00 02 03 85 01 05") == (b"", 0x9000)
    # Thales' form: each block its own 34 TLV with a fragment, P1 00 then 80
    assert tx(card, f"81 D8 00 02 22 34 20 {raw[:32].hex()}") == (b"", 0x9000)
    assert tx(card, f"81 D8 80 02 27 34 25 {raw[32:].hex()}") == (b"", 0x9000)
    assert tx(card, "81 CD 00 00 03 85 01 05")[0][-65:] == raw[4:]
    # the session stays open until closed: another key replaces the first
    second = ec.generate_private_key(ec.SECP256R1())
    assert tx(card, put_key_update(point_of(second))) == (b"", 0x9000)
    shared, _ = tx(card, "81 46 00 00 06 84 01 04 85 01 05")
    assert shared == second.exchange(ec.ECDH(), public(card_point))


def test_put_public_key_refusals(template: bytes, tmp_path: Path) -> None:
    card, state = fresh_card(template, tmp_path)
    peer = point_of(ec.generate_private_key(ec.SECP256R1()))
    # UPDATE without INIT: conditions of use not satisfied
    assert tx(card, put_key_update(peer)) == (b"", 0x6985)
    # a public key object that is not writable (op-a's public key 02: read only)
    assert tx(card, "81 24 00 02 03 85 01 02") == (b"", 0x6982)
    # not a public key reference (a private key ID), unknown object, wrong P1
    assert tx(card, "81 24 00 02 03 84 01 05") == (b"", 0x6A80)
    assert tx(card, "81 24 00 02 03 85 01 09") == (b"", 0x6A88)
    assert tx(card, "81 24 02 02 03 85 01 05") == (b"", 0x6A86)
    assert tx(card, "81 24 00 07 03 85 01 05") == (b"", 0x6A86)  # no session 7
    assert tx(card, "81 24 00 02 03 85 01 05") == (b"", 0x9000)
    # off the curve: y + 1
    bad = peer[:-1] + bytes(((peer[-1] + 1) & 0xFF,))
    assert tx(card, put_key_update(bad)) == (b"", 0x6A80)
    # not a 34 TLV, two TLVs, compressed point, empty, wrong P1
    assert tx(card, "81 D8 80 02 03 49 01 00") == (b"", 0x6A80)
    assert tx(card, f"81 D8 80 02 4A 34 45 49 43 86 41 {peer.hex()} 34 01 00") == (b"", 0x6A80)
    compressed = "34 25 49 23 86 21 02" + peer[1:33].hex()
    assert tx(card, f"81 D8 80 02 27 {compressed}") == (b"", 0x6A80)
    assert tx(card, "81 D8 80 02 00") == (b"", 0x6700)
    assert tx(card, put_key_update(peer, p1="01")) == (b"", 0x6A86)
    peer_slot = next(k for k in state.applet.public_keys if k.object_id == b"\x05")
    assert not peer_slot.filled  # nothing refused was written
    # a session on another channel is another session
    assert tx(card, f"02 A4 04 00 07 {AID}") == (b"", 0x9000)
    assert tx(card, put_key_update(peer).replace("81", "82", 1)) == (b"", 0x6985)


def test_dh_refusals(template: bytes, tmp_path: Path) -> None:
    card, _ = fresh_card(template, tmp_path)
    # empty ECDH slot, empty peer slot
    assert tx(card, "81 46 00 00 06 84 01 04 85 01 05") == (b"", 0x6985)
    generate_ecdh(card)
    assert tx(card, "81 46 00 00 06 84 01 04 85 01 05") == (b"", 0x6985)  # no peer key put yet
    assert tx(card, "81 24 00 02 03 85 01 05") == (b"", 0x9000)
    assert tx(card, put_key_update(point_of(ec.generate_private_key(ec.SECP256R1())))) == (
        b"",
        0x9000,
    )
    # a signing key (op-a, filled) may not agree keys; nor may the bootstrap key
    assert tx(card, "81 B9 00 00 03 84 01 02")[1] == 0x9000
    assert tx(card, "81 46 00 00 06 84 01 02 85 01 05") == (b"", 0x6985)
    assert tx(card, "81 46 00 00 06 84 01 01 85 01 05") == (b"", 0x6985)
    # a public key object for signatures only (op-a's 02)
    assert tx(card, "81 46 00 00 06 84 01 04 85 01 02") == (b"", 0x6985)
    # the ECDH key does not sign
    sign_init = "81 2A 00 01 0D 84 01 04 A1 01 03 91 02 00 01 92 01 04"
    assert tx(card, sign_init) == (b"", 0x6985)
    # malformed: P1/P2, a missing or doubled reference, an extra tag, unknown object
    assert tx(card, "81 46 01 00 06 84 01 04 85 01 05") == (b"", 0x6A86)
    assert tx(card, "81 46 00 00 03 84 01 04") == (b"", 0x6A80)
    assert tx(card, "81 46 00 00 0C 84 01 04 74 04 65 63 64 68 85 01 05") == (b"", 0x6A80)
    assert tx(card, "81 46 00 00 09 84 01 04 85 01 05 D1 01 00") == (b"", 0x6A80)
    assert tx(card, "81 46 00 00 06 84 01 09 85 01 05") == (b"", 0x6A88)
    assert tx(card, "81 46 00 00 00") == (b"", 0x6700)
