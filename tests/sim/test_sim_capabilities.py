"""GET DATA advertises exactly what the virtual SIM does (issue 13): the test reads the applet
information (tags 90-94, B1-B4, B7), tries every advertised function and algorithm, and tries
every value of each bitmap that is not advertised, which must be refused."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, encode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from est_agent.sim.card import VirtualCard
from est_agent.sim.personalize import personalize
from est_agent.sim.state import load_state
from tests.scripted import AID, h, tx

HASH_OBJECTS = {0x0001: hashes.SHA256(), 0x0002: hashes.SHA384(), 0x0004: hashes.SHA512()}


def tlvs(data: bytes) -> dict[int, bytes]:
    out, pos = {}, 0
    while pos < len(data):
        out[data[pos]] = data[pos + 2 : pos + 2 + data[pos + 1]]
        pos += 2 + data[pos + 1]
    return out


def containers(listing: bytes) -> list[tuple[int, dict[int, bytes]]]:
    out, pos = [], 0
    while pos < len(listing):
        out.append((listing[pos], tlvs(listing[pos + 2 : pos + 2 + listing[pos + 1]])))
        pos += 2 + listing[pos + 1]
    return out


@pytest.fixture
def card(tmp_path: Path) -> VirtualCard:
    path = tmp_path / "sim.json"
    personalize(path, iccid="8988247000001234567", psk=b"capability psk")
    card = VirtualCard(load_state(path))
    assert tx(card, f"01 A4 04 00 07 {AID}") == (b"", 0x9000)
    return card


def sign_init(key: str, mode: int, hash_bits: int, sig: int, session: int = 1) -> str:
    algorithms = f"A1 01 {mode:02X} 91 02 {hash_bits:04X} 92 01 {sig:02X}"
    return f"81 2A 00 {session:02X} 0D 84 01 {key} {algorithms}"


def test_every_advertised_capability_works_and_nothing_else(card: VirtualCard) -> None:
    info_raw, sw = tx(card, "81 CB 00 00 44")
    assert sw == 0x9000 and len(info_raw) == 0x44
    info = tlvs(info_raw)
    functions, key_agreement, derivation = info[0x90][0], info[0x93][0], info[0x94][0]
    hash_bitmap, sig_bitmap = int.from_bytes(info[0x91], "big"), info[0x92][0]
    # what this applet claims (issue 13): all four functions, SHA-256/384/512, ECDSA, ECKA,
    # TLS 1.2 PRF and HKDF
    assert (functions, hash_bitmap, sig_bitmap, key_agreement, derivation) == (
        0x0F, 0x0007, 0x04, 0x01, 0x03,
    )  # fmt: skip

    # 90 bit 02 key generation, 01 signature: keygen in op-a, then sign with every hash
    generated, sw = tx(card, "81 B9 00 00 03 84 01 02")
    assert functions & 0x02 and sw == 0x9000
    public = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), generated[-65:])
    for bit in range(16):
        value = 1 << bit
        init = sign_init("02", 3, value, 0x04)
        if not hash_bitmap & value:
            assert tx(card, init) == (b"", 0x6A80), f"hash {value:04X} not advertised"
            continue
        algorithm = HASH_OBJECTS[value]
        digest = hashlib.new(algorithm.name, b"m").digest()
        assert tx(card, init) == (b"", 0x9000)
        update = f"81 2B 80 01 {len(digest) + 2:02X} 9E {len(digest):02X} {digest.hex()}"
        answer, sw = tx(card, update)
        assert sw == 0x9000 and answer[:3] == h("33 00 40")
        r, s = int.from_bytes(answer[3:35]), int.from_bytes(answer[35:])
        public.verify(encode_dss_signature(r, s), digest, ec.ECDSA(Prehashed(algorithm)))
    # 92: ECDSA only; every other signature algorithm bit is refused
    for bit in range(8):
        value = 1 << bit
        sw = tx(card, sign_init("02", 3, 0x0001, value))[1]
        assert sw == (0x9000 if sig_bitmap & value else 0x6A80), f"signature {value:02X}"
    # A1 modes: 01, 02, 03 and nothing else
    for mode in range(256):
        sw = tx(card, sign_init("02", mode, 0x0001, 0x04))[1]
        assert sw == (0x9000 if mode in (1, 2, 3) else 0x6A80), f"mode {mode:02X}"

    # 90 bit 04 / 93 ECKA: COMPUTE DH with the ECDH slot and a put peer key
    assert functions & 0x04 and key_agreement == 0x01
    ecdh_point, sw = tx(card, "81 B9 00 00 03 84 01 04")
    peer = ec.generate_private_key(ec.SECP256R1())
    point = peer.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
    assert tx(card, "81 24 00 02 03 85 01 05") == (b"", 0x9000)
    assert tx(card, f"81 D8 80 02 47 34 45 49 43 86 41 {point.hex()}") == (b"", 0x9000)
    shared, sw = tx(card, "81 46 00 00 06 84 01 04 85 01 05")
    card_public = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), ecdh_point[-65:])
    assert sw == 0x9000 and shared == peer.exchange(ec.ECDH(), card_public)

    # 90 bit 08 / 94: PRF (01) and HKDF (02) on the PSK object; the hashes of HKDF are 91's
    assert functions & 0x08
    assert derivation & 0x01 and tx(card, "81 48 00 00 09 86 01 01 D2 01 78 D3 01 20")[1] == 0x9000
    assert derivation & 0x02
    for bit in range(16):
        value = 1 << bit
        sw = tx(card, f"81 4A 00 00 09 86 01 01 D5 00 91 02 {value:04X}")[1]
        assert sw == (0x9000 if hash_bitmap & value else 0x6A80), f"HKDF hash {value:04X}"

    # B7: sessions 0..max-1 exist, the next does not
    sessions = info[0xB7][0]
    assert tx(card, sign_init("02", 3, 0x0001, 0x04, session=sessions - 1))[1] == 0x9000
    assert tx(card, sign_init("02", 3, 0x0001, 0x04, session=sessions))[1] == 0x6A86


def test_object_counts_and_per_object_algorithms_match_the_list(card: VirtualCard) -> None:
    info = tlvs(tx(card, "81 CB 00 00 44")[0])
    listing, sw = tx(card, "81 CB 01 00 00")
    while sw == 0x6300:
        more, sw = tx(card, "81 CB 01 01 00")
        listing += more
    assert sw == 0x9000
    found = containers(listing)
    counts = {tag: sum(1 for t, _ in found if t == tag) for tag in (0xC1, 0xC2, 0xC3, 0xC4)}
    assert (info[0xB2][0], info[0xB3][0], info[0xB1][0], info[0xB4][0]) == (
        counts[0xC1], counts[0xC2], counts[0xC3], counts[0xC4],
    )  # fmt: skip
    assert counts == {0xC1: 4, 0xC2: 5, 0xC3: 1, 0xC4: 1}
    # no object claims a function or an algorithm the applet does not advertise
    for tag, fields in found:
        if tag == 0xC3:
            continue
        assert fields[0x61][0] & ~info[0x90][0] == 0
        if 0x92 in fields:
            assert fields[0x92][0] & ~info[0x92][0] == 0
        if 0x91 in fields:
            assert int.from_bytes(fields[0x91], "big") & ~int.from_bytes(info[0x91], "big") == 0
        if 0x6F in fields:
            assert fields[0x6F][0] & ~info[0x93][0] == 0
        if 0x94 in fields:
            assert fields[0x94][0] & ~info[0x94][0] == 0
    # the ECDH private key advertises key agreement + generation and no signature
    ecdh = next(f for t, f in found if t == 0xC1 and f[0x84] == b"\x04")
    assert (ecdh[0x74], ecdh[0x61], ecdh[0x6F], ecdh[0x92]) == (b"ecdh", b"\x06", b"\x01", b"\x00")
    peer = next(f for t, f in found if t == 0xC2 and f[0x85] == b"\x05")
    assert (peer[0x75], peer[0x60], peer[0x61], peer[0x6F]) == (b"peer", b"\x03", b"\x05", b"\x01")
