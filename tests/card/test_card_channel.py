import pytest

from est_agent.card.apdu import CommandApdu, ResponseApdu
from est_agent.card.channel import CardSession, next_t0_step
from est_agent.errors import (
    CardProtocolError,
    ConditionsNotSatisfiedError,
    NotFoundError,
    SecurityStatusError,
    StatusWordError,
)
from tests.scripted import ScriptedTransport


def test_t0_rule_table() -> None:
    command = CommandApdu(0x81, 0xCB, 0x00, 0x00, le=0x10)
    more = next_t0_step(command, ResponseApdu(b"", 0x6143), get_response_cla=0x81)
    assert more.command == CommandApdu(0x81, 0xC0, 0x00, 0x00, le=0x43)
    assert more.keep_data
    wrong_le = next_t0_step(command, ResponseApdu(b"", 0x6C44), get_response_cla=0x81)
    assert wrong_le.command == command.with_le(0x44)
    assert not wrong_le.keep_data
    all_256 = next_t0_step(command, ResponseApdu(b"", 0x6100), get_response_cla=0x01)
    assert all_256.command is not None and all_256.command.le == 256
    done = next_t0_step(command, ResponseApdu(b"\x01", 0x9000), get_response_cla=0x81)
    assert done.command is None and done.keep_data


def test_get_response_loop_concatenates() -> None:
    transport = ScriptedTransport(
        [
            ("81 CB 00 00 44", "6C 10"),
            ("81 CB 00 00 10", "61 08"),
            ("81 C0 00 00 08", "0102030405060708 61 02"),
            ("81 C0 00 00 02", "090A 90 00"),
        ]
    )
    response = CardSession(transport).exchange(
        CommandApdu(0x81, 0xCB, 0, 0, le=0x44), name="GET DATA"
    )
    assert response.data == bytes(range(1, 11))
    assert response.sw == 0x9000
    transport.assert_done()


def test_iso_get_response_option() -> None:
    transport = ScriptedTransport([("81 84 00 00 02", "61 02"), ("01 C0 00 00 02", "AABB 90 00")])
    session = CardSession(transport, iso_get_response=True)
    assert session.exchange(CommandApdu(0x81, 0x84, 0, 0, le=2), name="x").data == b"\xaa\xbb"


def test_endless_61xx_is_a_protocol_error() -> None:
    script = [("81 84 00 00 02", "61 02")] + [("81 C0 00 00 02", "61 02")] * 64
    with pytest.raises(CardProtocolError, match="61xx"):
        CardSession(ScriptedTransport(script)).exchange(
            CommandApdu(0x81, 0x84, 0, 0, le=2), name="x"
        )


@pytest.mark.parametrize(
    ("sw", "error"),
    [
        ("6982", SecurityStatusError),
        ("6A82", NotFoundError),
        ("6A88", NotFoundError),
        ("6985", ConditionsNotSatisfiedError),
        ("6D00", StatusWordError),
        ("6E00", StatusWordError),
    ],
)
def test_status_words_map_to_typed_errors(sw: str, error: type[StatusWordError]) -> None:
    transport = ScriptedTransport([("81 2A 00 01", sw)])
    with pytest.raises(error) as info:
        CardSession(transport).exchange(CommandApdu(0x81, 0x2A, 0, 1), name="SIGN INIT")
    assert info.value.sw == int(sw, 16)
    assert "SIGN INIT" in str(info.value) and sw in str(info.value)


def test_91xx_is_success() -> None:
    transport = ScriptedTransport([("00 70 00 00 01", "02 91 10")])
    assert CardSession(transport).open_channel().number == 2


def test_manage_channel_garbage() -> None:
    transport = ScriptedTransport([("00 70 00 00 01", "90 00")])
    with pytest.raises(CardProtocolError):
        CardSession(transport).open_channel()


def test_session_close_closes_open_channels() -> None:
    transport = ScriptedTransport(
        [
            ("00 70 00 00 01", "01 90 00"),
            ("00 70 00 00 01", "02 90 00"),
            ("00 70 80 01", "90 00"),
            ("00 70 80 02", "90 00"),
        ]
    )
    session = CardSession(transport)
    session.open_channel()
    session.open_channel()
    session.close()
    transport.assert_done()
