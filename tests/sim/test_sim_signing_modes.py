"""COMPUTE/VERIFY SIGNATURE modes 01/02/03 and SHA-256/384/512 on the virtual SIM, driven with
raw APDU bytes; every signature is checked with `cryptography` (issue 13)."""

from __future__ import annotations

import hashlib

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from est_agent.sim.card import VirtualCard
from tests.scripted import h, tx
from tests.sim.test_sim_applet import example_state, open_applet

MESSAGE = bytes(range(256)) * 3 + b"tail"  # 772 bytes: more than one short APDU
HASHES = {"0001": hashes.SHA256(), "0002": hashes.SHA384(), "0004": hashes.SHA512()}


def sha2_card() -> tuple[VirtualCard, ec.EllipticCurvePublicKey]:
    state = example_state()
    for key in (*state.applet.private_keys, *state.applet.public_keys):
        key.hash_algorithms = 0x0007
    card = VirtualCard(state)
    open_applet(card)
    answer, sw = tx(card, "81 B9 00 00 03 84 01 01")
    assert sw == 0x9000
    point = answer[answer.index(h("86 41")) + 2 :]
    return card, ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)


def apdu(header: str, data: bytes) -> bytes:
    assert len(data) <= 255
    return h(header) + bytes((len(data),)) + data


def init(card: VirtualCard, ins: str, mode: str, hash_bits: str, key: str = "84 01 01") -> int:
    data = h(f"{key} A1 01 {mode} 91 02 {hash_bits} 92 01 04")
    return tx(card, apdu(f"81 {ins} 00 01", data))[1]


def check(public: ec.EllipticCurvePublicKey, answer: bytes, message: bytes, hash_bits: str) -> None:
    assert answer[:3] == h("33 00 40") and len(answer) == 67
    der = encode_dss_signature(int.from_bytes(answer[3:35]), int.from_bytes(answer[35:]))
    public.verify(der, message, ec.ECDSA(HASHES[hash_bits]))  # raises if it does not verify


@pytest.mark.parametrize("hash_bits", ["0001", "0002", "0004"])
def test_mode_03_with_each_hash(hash_bits: str) -> None:
    card, public = sha2_card()
    assert init(card, "2A", "03", hash_bits) == 0x9000
    digest = hashlib.new(HASHES[hash_bits].name, b"m").digest()
    answer, sw = tx(card, apdu("81 2B 80 01", b"\x9e" + bytes((len(digest),)) + digest))
    assert sw == 0x9000
    check(public, answer, b"m", hash_bits)
    # the digest must have the size of the hash the INIT named
    wrong = hashlib.sha256(b"m").digest() if hash_bits != "0001" else hashlib.sha384(b"m").digest()
    assert tx(card, apdu("81 2B 80 01", b"\x9e" + bytes((len(wrong),)) + wrong)) == (b"", 0x6A80)


def _blocks_1byte(message: bytes, size: int) -> list[bytes]:
    return [b"\x9b" + bytes((len(c),)) + c for c in _chunks(message, size)]


def _chunks(message: bytes, size: int) -> list[bytes]:
    return [message[i : i + size] for i in range(0, len(message), size)]


@pytest.mark.parametrize(
    ("name", "blocks"),
    [
        ("1-byte", _blocks_1byte(MESSAGE, 100)),
        ("ber-81", [b"\x9b\x81" + bytes((len(c),)) + c for c in _chunks(MESSAGE, 200)]),
        ("ber-82", [b"\x9b\x82" + len(c).to_bytes(2) + c for c in _chunks(MESSAGE, 200)]),
        ("3-byte", [b"\x9b" + len(c).to_bytes(3) + c for c in _chunks(MESSAGE, 200)]),
        # Thales: the first 9B announces the whole message, the rest follows untagged
        (
            "total-ber",
            [b"\x9b\x82" + len(MESSAGE).to_bytes(2) + MESSAGE[:200], *_chunks(MESSAGE[200:], 250)],
        ),
        (
            "total-3-byte",
            [b"\x9b" + len(MESSAGE).to_bytes(3) + MESSAGE[:200], *_chunks(MESSAGE[200:], 250)],
        ),
        ("one-block", [b"\x9b\x04abcd"]),
    ],
)
@pytest.mark.parametrize("hash_bits", ["0001", "0002", "0004"])
def test_mode_01_full_text_over_several_updates(
    name: str, blocks: list[bytes], hash_bits: str
) -> None:
    card, public = sha2_card()
    message = b"abcd" if name == "one-block" else MESSAGE
    assert init(card, "2A", "01", hash_bits) == 0x9000
    for block in blocks[:-1]:
        assert tx(card, apdu("81 2B 00 01", block)) == (b"", 0x9000)
    answer, sw = tx(card, apdu("81 2B 80 01", blocks[-1]))
    assert sw == 0x9000
    check(public, answer, message, hash_bits)
    # the session goes on with a fresh message
    answer, sw = tx(card, apdu("81 2B 80 01", h("9B 02 68 69")))
    assert sw == 0x9000
    check(public, answer, b"hi", hash_bits)
    # and the SIM's signature verifies on the SIM in the same mode
    assert init(card, "2C", "01", hash_bits, key="85 01 02") == 0x9000
    assert tx(card, apdu("81 2D 80 01", h("9B 02 68 69") + answer)) == (b"", 0x9000)
    assert tx(card, apdu("81 2D 80 01", h("9B 02 68 68") + answer)) == (b"", 0x6D01)


def test_mode_01_refusals() -> None:
    card, _ = sha2_card()
    assert init(card, "2A", "01", "0001") == 0x9000
    assert tx(card, apdu("81 2B 80 01", h("9E 02 00 00"))) == (b"", 0x6A80)  # not a message
    assert tx(card, apdu("81 2B 80 01", h("9B 05 61 62"))) == (b"", 0x6A80)  # short last block
    assert tx(card, "81 2B 40 01 03 9B 01 61") == (b"", 0x6A86)  # P1 neither 00 nor 80
    assert tx(card, "81 2B 80 01 00") == (b"", 0x6700)
    # a total-length 9B still owed: the last block must complete it exactly
    assert tx(card, apdu("81 2B 00 01", h("9B 06 61 62"))) == (b"", 0x9000)
    assert tx(card, apdu("81 2B 80 01", h("63"))) == (b"", 0x6A80)


def test_mode_02_last_block() -> None:
    card, public = sha2_card()
    assert init(card, "2A", "02", "0002") == 0x9000
    data = h("9A 05") + b"hello" + h("9C 00 9D 04 00 00 00 00")
    answer, sw = tx(card, apdu("81 2B 80 01", data))
    assert sw == 0x9000
    check(public, answer, b"hello", "0002")
    # resuming a hash state after earlier blocks is not offered: incorrect data
    data = h("9A 05") + b"hello" + h("9C 20") + bytes(32) + h("9D 04 00 00 00 40")
    assert tx(card, apdu("81 2B 80 01", data)) == (b"", 0x6A80)
    assert tx(card, apdu("81 2B 00 01", h("9A 01 61"))) == (b"", 0x6A86)  # one block only


def test_verify_mode_03_sha512_with_1_and_2_byte_signature_lengths() -> None:
    card, public = sha2_card()
    private = card.state.applet.private_keys[0]
    assert private.filled
    assert init(card, "2A", "03", "0004") == 0x9000
    digest = hashlib.sha512(b"v").digest()
    answer, _ = tx(card, apdu("81 2B 80 01", h("9E 40") + digest))
    check(public, answer, b"v", "0004")
    assert init(card, "2C", "03", "0004", key="85 01 02") == 0x9000
    update = h("9E 40") + digest
    assert tx(card, apdu("81 2D 80 01", update + answer)) == (b"", 0x9000)
    assert tx(card, apdu("81 2D 80 01", update + h("33 40") + answer[3:])) == (b"", 0x9000)
    bad = answer[:-1] + bytes((answer[-1] ^ 1,))
    assert tx(card, apdu("81 2D 80 01", update + bad)) == (b"", 0x6D01)
    assert tx(card, apdu("81 2D 80 01", update)) == (b"", 0x6A80)  # no signature


@pytest.mark.parametrize(
    ("tlvs", "sw"),
    [
        ("A1 01 04 91 02 00 01 92 01 04", 0x6A80),  # no mode 04
        ("A1 01 01 91 02 00 10 92 01 04", 0x6A80),  # no such hash
        ("A1 01 01 91 02 00 01 92 01 02", 0x6A80),  # RSA-PSS
        ("A1 02 01 01 91 02 00 01 92 01 04", 0x6A80),  # a 2-byte mode
    ],
)
def test_unsupported_values_are_6a80(tlvs: str, sw: int) -> None:
    card, _ = sha2_card()
    assert tx(card, apdu("81 2A 00 01", h("84 01 01" + tlvs))) == (b"", sw)
    assert tx(card, apdu("81 2C 00 01", h("85 01 02" + tlvs))) == (b"", sw)
    assert tx(card, apdu("81 2A 02 01", h("84 01 01 A1 01 01 91 02 00 01 92 01 04")))[1] == 0x6A86


def test_a_key_that_takes_sha256_only_refuses_sha384() -> None:
    card = VirtualCard(example_state())  # the worked example's keys: 91 = 00 01
    open_applet(card)
    tx(card, "81 B9 00 00 03 84 01 01")
    assert init(card, "2A", "03", "0002") == 0x6985
    assert init(card, "2A", "01", "0001") == 0x9000
