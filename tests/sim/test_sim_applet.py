"""The virtual SIM's IoT SAFE applet, driven with raw APDU bytes (not the agent's client code).

The worked exchange of docs/iot-safe-card.md §8 is replayed byte for byte on a store built with
its objects.
"""

from __future__ import annotations

import hashlib

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    Prehashed,
    decode_dss_signature,
    encode_dss_signature,
)

from est_agent.sim.card import CardOptions, VirtualCard
from est_agent.sim.state import (
    AppletState,
    CardState,
    DedicatedFile,
    FileObject,
    PrivateKeyObject,
    PublicKeyObject,
)
from tests.scripted import AID, h, tx

CERT = bytes((i * 7 + 3) & 0xFF for i in range(500))
DIGEST = hashlib.sha256(b"to be signed").digest()
SIGN_INIT_01 = "81 2A 00 01 0D 84 01 01 A1 01 03 91 02 00 01 92 01 04"


def example_state() -> CardState:
    """The objects of docs/iot-safe-card.md §8: KEY1/01 (pub 02), PUB1/02, CERT/03 of 500 bytes."""
    return CardState(
        iccid="8988000000000000001",
        serial=bytes(8),
        mf=DedicatedFile(fid=b"\x3f\x00"),
        applet=AppletState(
            private_keys=[
                PrivateKeyObject(
                    object_id=b"\x01",
                    label="KEY1",
                    public_id=b"\x02",
                    access=0x02,
                    crypto_functions=0x03,
                    hash_algorithms=0x0001,  # the worked example's keys take SHA-256 only
                )
            ],
            public_keys=[
                PublicKeyObject(
                    object_id=b"\x02", label="PUB1", access=0x01, hash_algorithms=0x0001
                )
            ],
            files=[
                FileObject(
                    object_id=b"\x03",
                    label="CERT",
                    capacity=500,
                    access=0x01,
                    usage=0x02,
                    data=CERT,
                )
            ],
        ),
    )


def open_applet(card: VirtualCard) -> None:
    assert tx(card, "00 70 00 00 01") == (b"\x01", 0x9000)
    assert tx(card, f"01 A4 04 00 07 {AID}") == (b"", 0x9000)


def public_key(point: bytes) -> ec.EllipticCurvePublicKey:
    return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)


def verify(point: bytes, r: int, s: int, digest: bytes = DIGEST) -> None:
    public_key(point).verify(
        encode_dss_signature(r, s), digest, ec.ECDSA(Prehashed(hashes.SHA256()))
    )


# -- the worked exchange (docs/iot-safe-card.md §8) -----------------------------------------

OBJECT_LIST = h(
    "C1 1F 74 04 4B 45 59 31 84 01 01 60 01 02 4A 01 00 4B 01 13 4E 01 01 61 01 03 92 01 04 91"
    " 02 00 01"
    " C2 1F 75 04 50 55 42 31 85 01 02 60 01 01 4A 01 00 4B 01 13 4E 01 01 61 01 01 92 01 04 91"
    " 02 00 01"
    " C3 16 73 04 43 45 52 54 83 01 03 60 01 01 4A 01 01 21 01 02 20 02 01 F4"
)
CERT_INFO = h("C3 16 73 04 43 45 52 54 83 01 03 60 01 01 4A 01 01 21 01 02 20 02 01 F4")


def test_worked_example_direct_mode() -> None:
    card = VirtualCard(example_state())
    # (a)
    assert tx(card, "00 70 00 00 01") == (h("01"), 0x9000)
    assert tx(card, f"01 A4 04 00 07 {AID}") == (b"", 0x9000)
    info, sw = tx(card, "81 CB 00 00 44")
    assert sw == 0x9000 and len(info) == 0x44
    tags = []
    pos = 0
    while pos < len(info):
        tags.append((info[pos], info[pos + 1]))
        pos += 2 + info[pos + 1]
    assert tags == [
        (0x10, 1), (0x11, 0x20), (0xB1, 1), (0xB2, 1), (0xB3, 1), (0xB4, 1),
        (0x90, 1), (0x91, 2), (0x92, 1), (0x93, 1), (0x94, 1), (0xB7, 1),
    ]  # fmt: skip
    # SHA-256 | SHA-384 | SHA-512 (issue 13: was 00 01, SHA-256 only)
    assert info[info.index(b"\x91\x02") + 2 : info.index(b"\x91\x02") + 4] == h("00 07")
    assert info[-3:] == h("B7 01 04")
    # (b)
    assert tx(card, "81 CB 01 00 00") == (OBJECT_LIST, 0x9000)
    assert len(OBJECT_LIST) == 90
    # (c)
    data, sw = tx(card, "81 B9 00 00 03 84 01 01")
    assert sw == 0x9000
    assert data[:13] == h("84 01 01 85 01 02 34 45 49 43 86 41 04")
    assert len(data) == 0x4D
    point = data[12:]
    public_key(point)  # on the curve
    assert tx(card, "81 CD 00 00 03 85 01 02") == (h("34 45 49 43 86 41") + point, 0x9000)
    # (d)
    assert tx(card, "81 2A 01 01 00") == (b"", 0x9000)
    assert tx(card, SIGN_INIT_01) == (b"", 0x9000)
    sig, sw = tx(card, "81 2B 80 01 22 9E 20" + DIGEST.hex())
    assert sw == 0x9000 and sig[:3] == h("33 00 40") and len(sig) == 0x43
    verify(point, int.from_bytes(sig[3:35], "big"), int.from_bytes(sig[35:], "big"))
    assert tx(card, "81 2A 01 01 00") == (b"", 0x9000)
    # (e)
    assert tx(card, "81 CB C3 00 03 83 01 03") == (CERT_INFO, 0x9000)
    assert tx(card, "81 B0 00 00 03 83 01 03 00") == (CERT[:256], 0x9000)
    assert tx(card, "81 B0 01 00 03 83 01 03 00") == (CERT[256:], 0x9000)
    assert tx(card, "00 70 80 01 00") == (b"", 0x9000)


def test_worked_example_t0_mode_with_get_response() -> None:
    card = VirtualCard(example_state(), CardOptions(t0_mode=True))

    def fetch(command: str) -> tuple[bytes, int]:
        data, sw = tx(card, command)
        assert data == b"" and sw >> 8 == 0x61, f"{command}: {sw:04X}"
        return tx(card, f"81 C0 00 00 {sw & 0xFF:02X}")

    assert tx(card, "00 70 00 00 01") == (b"", 0x6101)
    assert tx(card, "00 C0 00 00 01") == (h("01"), 0x9000)
    assert tx(card, f"01 A4 04 00 07 {AID}") == (b"", 0x9000)
    assert fetch("81 CB 01 00 00") == (OBJECT_LIST, 0x9000)
    # exactly the key generation of the worked exchange: 61 4D, then GET RESPONSE with Le 4D
    assert tx(card, "81 B9 00 00 03 84 01 01") == (b"", 0x614D)
    data, sw = tx(card, "81 C0 00 00 4D")
    assert sw == 0x9000 and data[:13] == h("84 01 01 85 01 02 34 45 49 43 86 41 04")
    point = data[12:]
    assert tx(card, "81 2A 00 01 0D 84 01 01 A1 01 03 91 02 00 01 92 01 04") == (b"", 0x9000)
    assert tx(card, "81 2B 80 01 22 9E 20" + DIGEST.hex()) == (b"", 0x6143)
    sig, sw = tx(card, "81 C0 00 00 43")
    assert sw == 0x9000 and sig[:3] == h("33 00 40")
    verify(point, int.from_bytes(sig[3:35], "big"), int.from_bytes(sig[35:], "big"))
    assert fetch("81 CB C3 00 03 83 01 03") == (CERT_INFO, 0x9000)
    # 256 bytes are announced as 61 00; GET RESPONSE with the ISO class 01 works too
    assert tx(card, "81 B0 00 00 03 83 01 03 00") == (b"", 0x6100)
    assert tx(card, "01 C0 00 00 00") == (CERT[:256], 0x9000)


# -- GET DATA ----------------------------------------------------------------------------------


def test_object_list_paging_with_small_pages() -> None:
    card = VirtualCard(example_state(), CardOptions(object_list_page_bytes=40))
    open_applet(card)
    pages = []
    data, sw = tx(card, "81 CB 01 00 00")
    pages.append(data)
    while sw == 0x6300:
        data, sw = tx(card, "81 CB 01 01 00")
        pages.append(data)
    assert sw == 0x9000
    assert b"".join(pages) == OBJECT_LIST
    assert len(pages) == 3  # one container (33, 33, 24 bytes) per 40-byte page
    assert all(len(p) <= 40 for p in pages)
    # the cursor is gone after the last page; P2 01 without a listing in progress is refused
    assert tx(card, "81 CB 01 01 00") == (b"", 0x6985)
    assert tx(card, "81 CB 01 02 00") == (b"", 0x6A86)


def test_single_object_info_by_id_and_label() -> None:
    card = VirtualCard(example_state())
    open_applet(card)
    assert tx(card, "81 CB C1 00 03 84 01 01") == (OBJECT_LIST[:33], 0x9000)
    assert tx(card, "81 CB C1 00 06 74 04" + b"KEY1".hex()) == (OBJECT_LIST[:33], 0x9000)
    assert tx(card, "81 CB C2 00 03 85 01 02") == (OBJECT_LIST[33:66], 0x9000)
    assert tx(card, "81 CB C3 00 06 73 04" + b"CERT".hex()) == (CERT_INFO, 0x9000)
    assert tx(card, "81 CB C1 00 03 84 01 09") == (b"", 0x6A88)
    assert tx(card, "81 CB C1 00 03 83 01 03") == (b"", 0x6A80)  # wrong tag for a key
    assert tx(card, "81 CB C1 00 09 84 01 01 74 04" + b"KEY1".hex()) == (b"", 0x6A80)
    assert tx(card, "81 CB C1 00") == (b"", 0x6700)
    assert tx(card, "81 CB 77 00 00") == (b"", 0x6A86)


# -- keys ------------------------------------------------------------------------------------


def test_generate_key_pair_refused_on_signature_only_key() -> None:
    state = example_state()
    state.applet.private_keys[0].crypto_functions = 0x01
    card = VirtualCard(state)
    open_applet(card)
    assert tx(card, "81 B9 00 00 03 84 01 01") == (b"", 0x6985)
    assert not card.state.applet.private_keys[0].filled


def test_generate_key_pair_errors_and_label() -> None:
    card = VirtualCard(example_state())
    open_applet(card)
    assert tx(card, "81 B9 00 00 03 84 01 07") == (b"", 0x6A88)
    assert tx(card, "81 B9 00 00") == (b"", 0x6700)
    assert tx(card, "81 B9 00 00 02 84 05") == (b"", 0x6A80)  # truncated TLV
    assert tx(card, "81 B9 01 00 03 84 01 01") == (b"", 0x6A86)
    data, sw = tx(card, "81 B9 00 00 06 74 04" + b"KEY1".hex())
    assert sw == 0x9000 and data[:6] == h("84 01 01 85 01 02")


def test_new_key_replaces_old_and_state_is_set() -> None:
    card = VirtualCard(example_state())
    open_applet(card)
    assert tx(card, "81 CD 00 00 03 85 01 02") == (b"", 0x6985)  # empty
    first, _ = tx(card, "81 B9 00 00 03 84 01 01")
    second, _ = tx(card, "81 B9 00 00 03 84 01 01")
    assert first[12:] != second[12:]
    assert tx(card, "81 CD 00 00 03 85 01 02")[0][6:] == second[12:]
    listing, _ = tx(card, "81 CB 01 00 00")
    assert listing[:33].count(h("4A 01 01")) == 1  # private key activated
    assert listing[33:66].count(h("4A 01 01")) == 1  # public key too
    assert tx(card, "81 CD 00 00 03 85 01 09") == (b"", 0x6A88)


def test_pubkey_id_offset_gives_a_distinct_public_id() -> None:
    card = VirtualCard(example_state(), CardOptions(pubkey_id_offset=0x10))
    open_applet(card)
    data, sw = tx(card, "81 B9 00 00 03 84 01 01")
    assert sw == 0x9000 and data[:6] == h("84 01 01 85 01 12")
    assert tx(card, "81 CD 00 00 03 85 01 12")[1] == 0x9000
    assert tx(card, "81 CD 00 00 03 85 01 02") == (b"", 0x6A88)
    listing, _ = tx(card, "81 CB 01 00 00")
    assert h("85 01 12") in listing and h("85 01 02") not in listing
    assert tx(card, "81 2C 00 02 0D 85 01 12 A1 01 03 91 02 00 01 92 01 04")[1] == 0x9000


def test_get_random() -> None:
    card = VirtualCard(example_state())
    open_applet(card)
    a, sw = tx(card, "81 84 00 00 10")
    b, _ = tx(card, "81 84 00 00 10")
    assert sw == 0x9000 and len(a) == 16 and a != b
    assert len(tx(card, "81 84 00 00 00")[0]) == 256
    assert tx(card, "81 84 00 00") == (b"", 0x6700)


# -- signatures ------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["wide", "short", "der"])
def test_signature_formats_verify_over_the_digest(fmt: str) -> None:
    card = VirtualCard(example_state(), CardOptions(signature_format=fmt))  # type: ignore[arg-type]
    open_applet(card)
    point = tx(card, "81 B9 00 00 03 84 01 01")[0][12:]
    assert tx(card, SIGN_INIT_01)[1] == 0x9000
    sig, sw = tx(card, "81 2B 80 01 22 9E 20" + DIGEST.hex())
    assert sw == 0x9000 and sig[0] == 0x33
    if fmt == "wide":
        assert sig[1:3] == h("00 40") and len(sig) == 67
        r, s = int.from_bytes(sig[3:35], "big"), int.from_bytes(sig[35:], "big")
    elif fmt == "short":
        assert sig[1] == 0x40 and len(sig) == 66
        r, s = int.from_bytes(sig[2:34], "big"), int.from_bytes(sig[34:], "big")
    else:
        assert sig[1] == len(sig) - 2 and sig[2] == 0x30
        r, s = decode_dss_signature(sig[2:])
    verify(point, r, s)


def test_signing_sessions() -> None:
    card = VirtualCard(example_state())
    open_applet(card)
    update = "81 2B 80 01 22 9E 20" + DIGEST.hex()
    assert tx(card, SIGN_INIT_01) == (b"", 0x6985)  # key slot still empty
    point = tx(card, "81 B9 00 00 03 84 01 01")[0][12:]
    assert tx(card, update) == (b"", 0x6985)  # no session open
    assert tx(card, SIGN_INIT_01)[1] == 0x9000
    # the session survives its UPDATE until closed
    for _ in range(2):
        sig, sw = tx(card, update)
        assert sw == 0x9000
        verify(point, int.from_bytes(sig[3:35], "big"), int.from_bytes(sig[35:], "big"))
    # sessions belong to a channel
    assert tx(card, "00 70 00 00 01") == (h("02"), 0x9000)
    assert tx(card, f"02 A4 04 00 07 {AID}")[1] == 0x9000
    assert tx(card, "82 2B 80 01 22 9E 20" + DIGEST.hex()) == (b"", 0x6985)
    assert tx(card, "81 2B 00 01 22 9E 20" + DIGEST.hex()) == (b"", 0x6A86)  # not last
    assert tx(card, "81 2B 80 01 21 9E 1F" + DIGEST.hex()[:-2]) == (b"", 0x6A80)
    assert tx(card, "81 2A 01 01 00") == (b"", 0x9000)
    assert tx(card, update) == (b"", 0x6985)
    assert tx(card, "81 2A 01 04 00") == (b"", 0x6A86)  # beyond the 4 sessions of B7
    # label addressing, and reselecting the applet drops sessions
    assert (
        tx(card, "81 2A 00 00 10 74 04" + b"KEY1".hex() + "A1 01 03 91 02 00 01 92 01 04")[1]
        == 0x9000
    )
    assert tx(card, f"01 A4 04 00 07 {AID}")[1] == 0x9000
    assert tx(card, "81 2B 80 00 22 9E 20" + DIGEST.hex()) == (b"", 0x6985)


@pytest.mark.parametrize(
    ("tlvs", "sw"),
    [
        # issue 13: modes 01/02 and SHA-384 are offered now (were 6A86, 6A86, 6A80)
        ("A1 01 07 91 02 00 01 92 01 04", 0x6A80),
        ("A1 01 00 91 02 00 01 92 01 04", 0x6A80),
        ("A1 01 03 91 02 00 08 92 01 04", 0x6A80),  # no such hash
        ("A1 01 03 91 02 00 03 92 01 04", 0x6A80),  # two hashes at once
        ("A1 01 03 91 01 01 92 01 04", 0x6A80),  # 1-byte hash value
        ("A1 01 03 91 02 00 01 92 01 01", 0x6A80),  # RSA
        ("A1 01 03 91 02 00 01", 0x6A80),
    ],
)
def test_sign_init_refuses_other_modes(tlvs: str, sw: int) -> None:
    card = VirtualCard(example_state())
    open_applet(card)
    tx(card, "81 B9 00 00 03 84 01 01")
    data = h("84 01 01" + tlvs)
    assert tx(card, h("81 2A 00 01") + bytes((len(data),)) + data) == (b"", sw)


def test_verify_signature() -> None:
    card = VirtualCard(example_state())
    open_applet(card)
    tx(card, "81 B9 00 00 03 84 01 01")
    tx(card, SIGN_INIT_01)
    raw = tx(card, "81 2B 80 01 22 9E 20" + DIGEST.hex())[0][3:]
    verify_update = h("81 2D 80 02")
    assert tx(card, "81 2C 00 02 0D 85 01 02 A1 01 03 91 02 00 01 92 01 04") == (b"", 0x9000)

    def check(sig_tlv: bytes, digest: bytes = DIGEST) -> int:
        data = b"\x9e\x20" + digest + sig_tlv
        return tx(card, verify_update + bytes((len(data),)) + data)[1]

    assert check(b"\x33\x00\x40" + raw) == 0x9000
    assert check(b"\x33\x40" + raw) == 0x9000
    der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    assert check(b"\x33" + bytes((len(der),)) + der) == 0x9000
    assert check(b"\x33\x40" + raw, hashlib.sha256(b"other").digest()) == 0x6D01
    tampered = bytes((raw[0] ^ 1,)) + raw[1:]
    assert check(b"\x33\x40" + tampered) == 0x6D01
    assert check(b"\x33\x03\x01\x02\x03") == 0x6A80
    assert tx(card, "81 2C 01 02 00") == (b"", 0x9000)
    assert check(b"\x33\x40" + raw) == 0x6985


# -- files -----------------------------------------------------------------------------------


def read_all(card: VirtualCard, le: int) -> list[bytes]:
    chunks = []
    offset = 0
    while offset < len(CERT):
        cmd = offset.to_bytes(2, "big") + h("03 83 01 03") + bytes((le & 0xFF,))
        data, sw = tx(card, h("81 B0") + cmd)
        assert sw == 0x9000 and data
        chunks.append(data)
        offset += len(data)
    return chunks


def test_read_file_chunking_and_end() -> None:
    card = VirtualCard(example_state(), CardOptions(read_file_max=100))
    open_applet(card)
    chunks = read_all(card, 0)
    assert [len(c) for c in chunks] == [100, 100, 100, 100, 100]
    assert b"".join(chunks) == CERT
    assert [len(c) for c in read_all(card, 64)] == [64] * 7 + [52]
    assert tx(card, "81 B0 01 F4 03 83 01 03 00") == (b"", 0x6A86)
    assert tx(card, "81 B0 FF FF 03 83 01 03") == (b"", 0x6A86)
    assert tx(card, "81 B0 00 00 03 83 01 04 00") == (b"", 0x6A88)
    # READ FILE without Le (as wolfSSL and Thales' PKCS#11 module send it) answers as much as
    # allowed
    assert tx(card, "81 B0 00 00 03 83 01 03") == (CERT[:100], 0x9000)


def test_read_file_out_of_bounds_sw_is_configurable() -> None:
    card = VirtualCard(example_state(), CardOptions(read_oob_sw=0x6981))
    open_applet(card)
    assert tx(card, "81 B0 01 F4 03 83 01 03 00") == (b"", 0x6981)


def test_read_file_access_and_empty_file() -> None:
    state = example_state()
    state.applet.files.append(FileObject(object_id=b"\x04", label="SECRET", capacity=10, access=0))
    state.applet.files.append(FileObject(object_id=b"\x05", label="EMPTY", capacity=10))
    card = VirtualCard(state)
    open_applet(card)
    card.ota_put_file(b"\x04", b"hidden")
    assert tx(card, "81 B0 00 00 03 83 01 04 00") == (b"", 0x6982)
    assert tx(card, "81 B0 00 00 03 83 01 05 00") == (b"", 0x6985)
    card.ota_put_file(b"\x05", b"now here")
    assert tx(card, "81 B0 00 00 03 83 01 05 00") == (b"now here", 0x9000)
    assert tx(card, "81 CB C3 00 03 83 01 05")[0][-4:] == h("20 02 00 08")


def test_unknown_and_unsupported_instructions_on_the_applet() -> None:
    card = VirtualCard(example_state())
    open_applet(card)
    for ins in ("00", "D6", "FE", "4C"):
        assert tx(card, f"81 {ins} 00 00 00") == (b"", 0x6D00)
    # issue 13: PUT PUBLIC KEY INIT (24) and COMPUTE DH (46) are applet commands now; with no
    # data field they are the wrong length, not unknown instructions
    for ins in ("24", "46", "48", "4A"):
        assert tx(card, f"81 {ins} 00 00 00") == (b"", 0x6700)
    assert tx(card, "A1 CB 00 00 44") == (b"", 0x6E00)
    # applet commands on a channel without the applet: the UICC does not know them
    assert tx(card, "80 CB 00 00 44") == (b"", 0x6D00)
