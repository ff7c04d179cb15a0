import pytest

from est_agent.card.apdu import CommandApdu, ResponseApdu
from est_agent.errors import CardProtocolError, InputError


@pytest.mark.parametrize(
    ("apdu", "encoded"),
    [
        (CommandApdu(0x00, 0x70, 0x80, 0x01), "00708001"),  # case 1
        (CommandApdu(0x00, 0x70, 0x00, 0x00, le=1), "0070000001"),  # case 2S
        (CommandApdu(0x81, 0xCB, 0x01, 0x00, le=256), "81CB010000"),  # case 2S, Le 00 = 256
        (
            CommandApdu(0x01, 0xA4, 0x04, 0x00, bytes.fromhex("A0000005590010")),
            "01A4040007A0000005590010",
        ),  # case 3S
        (
            CommandApdu(0x81, 0xB0, 0x01, 0x00, bytes.fromhex("830103"), 256),
            "81B001000383010300",
        ),  # case 4S
        (CommandApdu(0x00, 0xB0, 0x00, 0x00, le=1000), "00B000000003E8"),  # case 2E
        (CommandApdu(0x00, 0xB0, 0x00, 0x00, le=65536), "00B00000000000"),  # 2E, Le 0000
        (
            CommandApdu(0x00, 0xD6, 0x00, 0x00, b"\xaa" * 300),
            "00D6000000012C" + "AA" * 300,
        ),  # case 3E
        (
            CommandApdu(0x00, 0xD6, 0x00, 0x00, b"\xaa" * 300, 2),
            "00D6000000012C" + "AA" * 300 + "0002",
        ),  # case 4E
    ],
)
def test_encode_decode_every_case(apdu: CommandApdu, encoded: str) -> None:
    raw = bytes.fromhex(encoded)
    assert apdu.encode() == raw
    assert CommandApdu.decode(raw) == apdu


@pytest.mark.parametrize(
    "raw",
    ["00A4", "00A4040005A000", "00A404000000", "00D600000001", "00D6000000000A" + "00" * 9],
)
def test_decode_rejects_inconsistent_lengths(raw: str) -> None:
    with pytest.raises(CardProtocolError):
        CommandApdu.decode(bytes.fromhex(raw))


def test_constructor_validates() -> None:
    with pytest.raises(InputError):
        CommandApdu(0x100, 0, 0, 0)
    with pytest.raises(InputError):
        CommandApdu(0, 0, 0, 0, le=0)
    with pytest.raises(InputError):
        CommandApdu(0, 0, 0, 0, b"\x00" * 65536)


def test_repr_never_shows_data() -> None:
    secret = bytes.fromhex("DEADBEEF" * 8)
    text = repr(CommandApdu(0x81, 0x2B, 0x80, 0x01, secret))
    assert "deadbeef" not in text.lower()
    assert "lc=32" in text


def test_response_split() -> None:
    response = ResponseApdu.decode(bytes.fromhex("0102" + "6143"))
    assert response.data == b"\x01\x02"
    assert (response.sw1, response.sw2, response.sw) == (0x61, 0x43, 0x6143)
    assert response.encode() == bytes.fromhex("01026143")
    with pytest.raises(CardProtocolError):
        ResponseApdu.decode(b"\x90")
