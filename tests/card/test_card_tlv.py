import pytest

from est_agent.card.tlv import Tlv, decode_tlvs, encode_tlv, find_tlv
from est_agent.errors import CardProtocolError, InputError


def test_one_byte_lengths() -> None:
    data = bytes.fromhex("840101 A10103 91020001")
    assert decode_tlvs(data) == [
        Tlv(0x84, b"\x01"),
        Tlv(0xA1, b"\x03"),
        Tlv(0x91, b"\x00\x01"),
    ]


@pytest.mark.parametrize(
    "header",
    ["3340", "330040", "338140"],  # 1-byte, 2-byte (ZARIOT SIM, wolfSSL), BER long form
)
def test_signature_length_variants(header: str) -> None:
    value = bytes(range(64))
    assert decode_tlvs(bytes.fromhex(header) + value) == [Tlv(0x33, value)]


def test_two_byte_length_only_for_signature_tag() -> None:
    # "73 00" is an empty label, not a 2-byte length
    assert decode_tlvs(bytes.fromhex("7300 830103")) == [Tlv(0x73, b""), Tlv(0x83, b"\x03")]


def test_ber_82_length() -> None:
    value = b"\x01" * 300
    encoded = encode_tlv(0x34, value)
    assert encoded[:4] == bytes.fromhex("3482012C")
    assert decode_tlvs(encoded) == [Tlv(0x34, value)]


def test_encode_forms() -> None:
    assert encode_tlv(0x9E, b"\x00" * 32)[:2] == bytes.fromhex("9E20")
    assert encode_tlv(0x33, b"\x00" * 64, two_byte_length=True)[:3] == bytes.fromhex("330040")
    assert encode_tlv(0x34, b"\x00" * 200)[:3] == bytes.fromhex("3481C8")


@pytest.mark.parametrize("raw", ["84", "8402 01", "3382 01", "8481"])
def test_truncated(raw: str) -> None:
    with pytest.raises(CardProtocolError):
        decode_tlvs(bytes.fromhex(raw))


def test_find() -> None:
    tlvs = decode_tlvs(bytes.fromhex("840101 850102"))
    assert find_tlv(tlvs, 0x85) == b"\x02"
    assert find_tlv(tlvs, 0x86) is None


@pytest.mark.parametrize(
    ("two_byte_length", "header"), [(False, "3382FFFF"), (True, "33FFFF")]
)
def test_a_value_beyond_two_length_bytes_is_refused(two_byte_length: bool, header: str) -> None:
    longest = encode_tlv(0x33, bytes(0xFFFF), two_byte_length=two_byte_length)
    assert longest[: len(header) // 2] == bytes.fromhex(header)
    assert len(longest) == len(header) // 2 + 0xFFFF
    with pytest.raises(InputError, match=r"^TLV 33: value of 65536 bytes does not fit"):
        encode_tlv(0x33, bytes(0x10000), two_byte_length=two_byte_length)
