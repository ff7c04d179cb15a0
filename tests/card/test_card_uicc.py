import pytest

from est_agent.card.channel import CardSession
from est_agent.card.uicc import UiccFiles, decode_fcp, decode_iccid
from est_agent.card.uri import UiccPath
from est_agent.errors import CardProtocolError, InputError, SecurityStatusError
from tests.scripted import ScriptedTransport

# TS 102 221 FCP of a 2048-byte transparent EF 6F01
FCP_6F01 = "62 14 82 02 41 21 83 02 6F 01 8A 01 05 8B 03 6F 06 01 80 02 08 00 88 00"
PATH = UiccPath((0x7FF0, 0x6F01))


def test_decode_fcp() -> None:
    fcp = decode_fcp(bytes.fromhex(FCP_6F01))
    assert (fcp.fid, fcp.size, fcp.is_transparent_ef, fcp.is_df) == (0x6F01, 2048, True, False)
    df = decode_fcp(bytes.fromhex("62 08 82 02 78 21 83 02 7F F0"))
    assert df.is_df and not df.is_transparent_ef


def test_decode_fcp_rejects_non_template() -> None:
    with pytest.raises(CardProtocolError):
        decode_fcp(bytes.fromhex("6F 00"))


def test_iccid() -> None:
    assert decode_iccid(bytes.fromhex("98 10 14 30 12 13 54 76 98 F0")) == "8901410321314567890"
    with pytest.raises(CardProtocolError):
        decode_iccid(bytes.fromhex("A0"))


def test_update_chunks_at_255_and_reuses_selection() -> None:
    data = bytes(range(256)) * 2 + b"\x01\x02"  # 514 bytes -> 255 + 255 + 4
    transport = ScriptedTransport(
        [
            ("02 A4 08 04 04 7F F0 6F 01 00", FCP_6F01 + " 90 00"),
            ("02 D6 00 10 FF " + data[:255].hex(), "90 00"),
            ("02 D6 01 0F FF " + data[255:510].hex(), "90 00"),
            ("02 D6 02 0E 04 " + data[510:].hex(), "90 00"),
            ("02 B0 00 10 00", data[:256].hex() + " 90 00"),
            ("02 B0 01 10 00", data[256:512].hex() + " 90 00"),
            ("02 B0 02 10 02", data[512:].hex() + " 90 00"),
        ]
    )
    transport.script.insert(0, (bytes.fromhex("00700000 01"), bytes.fromhex("02 9000")))
    session = CardSession(transport)
    files = UiccFiles(session.open_channel())
    with session.transaction():  # the selection is only trusted within one transaction
        files.update(PATH, data, offset=16)
        assert files.read(PATH, 16, len(data)) == data
    transport.assert_done()


def test_a_new_transaction_selects_the_ef_again() -> None:
    # Between two transactions another client of the reader (or the modem's baseband) may have
    # selected another EF on the channel: an UPDATE BINARY then would hit that file.
    transport = ScriptedTransport(
        [
            ("00 A4 08 04 04 7F F0 6F 01 00", FCP_6F01 + " 90 00"),
            ("00 B0 00 00 04", "01 02 03 04 90 00"),
            ("00 A4 08 04 04 7F F0 6F 01 00", FCP_6F01 + " 90 00"),
            ("00 D6 00 00 02 AA BB", "90 00"),
        ]
    )
    files = UiccFiles(CardSession(transport).basic_channel)
    assert files.read(PATH, 0, 4) == b"\x01\x02\x03\x04"
    files.update(PATH, b"\xaa\xbb")
    transport.assert_done()


def test_update_beyond_ef_refused_before_sending() -> None:
    transport = ScriptedTransport([("00 A4 08 04 04 7F F0 6F 01 00", FCP_6F01 + " 90 00")])
    files = UiccFiles(CardSession(transport).basic_channel)
    with pytest.raises(InputError, match="do not fit"):
        files.update(PATH, b"\x00" * 10, offset=2040)
    transport.assert_done()


def test_access_condition_not_met() -> None:
    transport = ScriptedTransport(
        [("00 A4 08 04 04 7F F0 6F 01 00", FCP_6F01 + " 90 00"), ("00 D6 00 00 01 00", "69 82")]
    )
    with pytest.raises(SecurityStatusError):
        UiccFiles(CardSession(transport).basic_channel).update(PATH, b"\x00")
