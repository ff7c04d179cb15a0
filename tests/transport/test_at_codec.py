"""The pure AT codec (est_agent.transport.at): framing, echo, URCs, final results, hex answers."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from est_agent.errors import ModemError
from est_agent.transport.at import (
    MAX_BUFFER,
    AtReader,
    AtReply,
    ChannelTable,
    FinalResult,
    RouteKind,
    encode_cchc,
    encode_ccho,
    encode_cgla,
    encode_command,
    encode_csim,
    parse_ccho,
    parse_cgla,
    parse_csim,
    parse_digits,
    parse_hex,
)

CSIM = 'AT+CSIM=10,"00A4040000"'


def read(command: str, *chunks: bytes) -> AtReader:
    reader = AtReader(command)
    for chunk in chunks:
        reader.receive_data(chunk)
    return reader


def reply_of(command: str, data: bytes) -> AtReply:
    reply = read(command, data).next_reply()
    assert reply is not None
    return reply


# -- encoding ------------------------------------------------------------------------------


def test_encoders_count_hex_characters() -> None:
    apdu = bytes.fromhex("00a4040007a0000005590010")
    assert encode_csim(apdu) == 'AT+CSIM=24,"00A4040007A0000005590010"'
    assert encode_cgla(2, b"\x81\xcb\x00\x00") == 'AT+CGLA=2,8,"81CB0000"'
    assert encode_ccho(bytes.fromhex("a0000005590010")) == 'AT+CCHO="A0000005590010"'
    assert encode_cchc(3) == "AT+CCHC=3"
    assert encode_command("AT") == b"AT\r"


@pytest.mark.parametrize("bad", ["AT\rAT", "AT\n", "AT+CSIM=é"])
def test_encode_command_refuses_more_than_one_ascii_line(bad: str) -> None:
    with pytest.raises(ModemError):
        encode_command(bad)


# -- framing -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "wire",
    [
        b'\r\n+CSIM: 4,"9000"\r\n\r\nOK\r\n',  # V.250 framing
        b'+CSIM: 4,"9000"\rOK\r',  # bare CR
        b'+CSIM: 4,"9000"\nOK\n',  # bare LF
        CSIM.encode() + b'\r\r\n+CSIM: 4,"9000"\r\n\r\nOK\r\n',  # echo on
    ],
)
def test_line_endings_and_echo(wire: bytes) -> None:
    reply = reply_of(CSIM, wire)
    assert reply.ok and reply.lines == ('+CSIM: 4,"9000"',)
    assert parse_csim(reply) == b"\x90\x00"


def test_byte_at_a_time_waits_for_the_final_result() -> None:
    wire = b'\r\n+CSIM: 6,"019000"\r\n\r\nOK\r\n'
    reader = AtReader(CSIM)
    end_of_ok = wire.index(b"OK") + 2  # the CR after OK completes the reply (bare CR allowed)
    for i, byte in enumerate(wire):
        assert (reader.next_reply() is None) == (i <= end_of_ok), f"byte {i}"
        reader.receive_data(bytes([byte]))
    reply = reader.next_reply()
    assert reply is not None and parse_csim(reply) == b"\x01\x90\x00"


def test_echo_is_recognised_by_content_only_once() -> None:
    # the same text coming back twice: the second copy is not echo (it is kept as a line)
    reply = reply_of("ATI", b"ATI\rATI\r\nOK\r\n")
    assert reply.lines == ("ATI",)


def test_echo_with_odd_spacing_and_case() -> None:
    reply = reply_of("AT+CCHC=2", b"at+cchc = 2\r\r\nOK\r\n")
    assert reply.ok and reply.lines == ()


def test_urcs_are_kept_apart_from_the_answer() -> None:
    wire = (
        b'\r\n+CREG: 1\r\n\r\nRING\r\n\r\n+CSIM: 4,"6A82"\r\n\r\n+QIND: "csq",20,99\r\n\r\nOK\r\n'
    )
    reply = reply_of(CSIM, wire)
    assert parse_csim(reply) == b"\x6a\x82"
    assert "+CREG: 1" in reply.lines and "RING" in reply.lines


def test_lines_after_the_final_result_are_trailing() -> None:
    reader = read(CSIM, b'+CSIM: 4,"9000"\r\nOK\r\n+CREG: 5\r\n')
    assert reader.next_reply() is not None
    assert reader.trailing == ["+CREG: 5"]


@pytest.mark.parametrize(
    ("line", "result", "code", "text"),
    [
        ("ERROR", FinalResult.ERROR, None, ""),
        ("error", FinalResult.ERROR, None, ""),
        ("+CME ERROR: 10", FinalResult.CME_ERROR, 10, "10"),
        ("+CME ERROR:3", FinalResult.CME_ERROR, 3, "3"),
        ("+CME ERROR: SIM not inserted", FinalResult.CME_ERROR, 10, "SIM not inserted"),
        ('+CME ERROR: "operation not allowed"', FinalResult.CME_ERROR, 3, "operation not allowed"),
        ("+cme error: sim  busy", FinalResult.CME_ERROR, 14, "sim  busy"),
        ("+CME ERROR: vendor special", FinalResult.CME_ERROR, None, "vendor special"),
        ("+CMS ERROR: 500", FinalResult.CMS_ERROR, 500, "500"),
    ],
)
def test_final_results(line: str, result: FinalResult, code: int | None, text: str) -> None:
    reply = reply_of("AT+CSIM=?", f"\r\n{line}\r\n".encode())
    assert (reply.result, reply.error_code, reply.error_text) == (result, code, text)
    assert not reply.ok
    assert reply.describe() == (
        line.upper() if code is None and ":" not in line else f"{result.value}: {text}"
    )


def test_runaway_line_is_refused() -> None:
    reader = AtReader("AT")
    with pytest.raises(ModemError, match="without a line end"):
        reader.receive_data(b"A" * (MAX_BUFFER + 1))


def test_runaway_answer_without_result_is_refused() -> None:
    reader = AtReader("AT")
    line = b"x" * 60000 + b"\r\n"
    with pytest.raises(ModemError, match="without a result"):
        for _ in range(MAX_BUFFER // 60000 + 2):
            reader.receive_data(line)


# -- answers -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "line",
    [
        '+CSIM: 6,"019000"',
        "+CSIM: 6,019000",  # unquoted
        '+csim:6, "019000"',  # case and spacing of the prefix
        '+CSIM: 6,"01 90 00"',  # spaced hex (length counts the hex digits)
        '+CSIM: 6 , " 019000 "',
    ],
)
def test_csim_answer_forms(line: str) -> None:
    reply = AtReply((line,), FinalResult.OK)
    assert parse_csim(reply) == b"\x01\x90\x00"


def test_lowercase_hex() -> None:
    reply = AtReply(('+CGLA: 8,"0a0b9000"',), FinalResult.OK)
    assert parse_cgla(reply) == bytes.fromhex("0A0B9000")


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ('+CSIM: 3,"9000"', "disagrees"),  # declared in bytes? no: 27.007 counts characters
        ('+CSIM: 2,"9000"', "disagrees"),
        ('+CSIM: 3,"900"', "malformed hex"),  # odd number of digits
        ('+CSIM: 4,"90G0"', "malformed hex"),
        ('+CSIM: 2,"90"', "no status word"),
        ('+CSIM: "9000"', "malformed"),
        ("+CSIM: x,9000", "malformed"),
    ],
)
def test_bad_csim_answers(line: str, match: str) -> None:
    with pytest.raises(ModemError, match=match):
        parse_csim(AtReply((line,), FinalResult.OK))


def test_answer_line_missing_or_doubled() -> None:
    with pytest.raises(ModemError, match="expected one"):
        parse_csim(AtReply(("+CREG: 1",), FinalResult.OK))
    with pytest.raises(ModemError, match="expected one"):
        parse_csim(AtReply(('+CSIM: 4,"9000"', '+CSIM: 4,"9000"'), FinalResult.OK))
    # a URC whose name merely starts like the answer's is not the answer
    with pytest.raises(ModemError, match="expected one"):
        parse_csim(AtReply(('+CSIMX: 4,"9000"',), FinalResult.OK))


def test_session_id_bare_or_prefixed_among_urcs() -> None:
    assert parse_ccho(AtReply(("RDY", "+CREG: 1", "3"), FinalResult.OK)) == 3
    assert parse_ccho(AtReply(("+CCHO: 2",), FinalResult.OK)) == 2
    with pytest.raises(ModemError):
        parse_ccho(AtReply(("+CREG: 1",), FinalResult.OK))


def test_identity_answers() -> None:
    assert parse_digits(AtReply(("356938035643809",), FinalResult.OK)) == "356938035643809"
    iccid = AtReply(("SMS Ready", '+ICCID: "8988247000001234567"'), FinalResult.OK)
    assert parse_digits(iccid, ("+CCID", "+ICCID")) == "8988247000001234567"


def test_parse_hex() -> None:
    assert parse_hex('"0a 0B"') == b"\x0a\x0b"
    assert parse_hex("") == b""
    with pytest.raises(ModemError):
        parse_hex('"0a0"')


# -- property: any interleaving of URCs into an answer parses to the same APDU ---------------

_URC = st.sampled_from(
    ["RING", "+CREG: 1", "+CREG: 5", '+QIND: "csq",20,99', "^RSSI: 17", "NO CARRIER", "RDY"]
)
_EOL = st.sampled_from([b"\r\n", b"\r", b"\n"])


@settings(max_examples=300, deadline=None)
@given(
    response=st.binary(min_size=2, max_size=300),
    lower=st.booleans(),
    quoted=st.booleans(),
    echo=st.booleans(),
    before=st.lists(_URC, max_size=3),
    between=st.lists(_URC, max_size=3),
    after=st.lists(_URC, max_size=2),
    eol=_EOL,
    cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=6),
)
def test_urc_interleavings_do_not_change_the_answer(
    response: bytes,
    lower: bool,
    quoted: bool,
    echo: bool,
    before: list[str],
    between: list[str],
    after: list[str],
    eol: bytes,
    cuts: list[int],
) -> None:
    text = response.hex() if lower else response.hex().upper()
    body = f'"{text}"' if quoted else text
    lines = [*before, f"+CSIM: {2 * len(response)},{body}", *between, "OK", *after]
    wire = (CSIM.encode() + b"\r" if echo else b"") + b"".join(
        eol + line.encode() + eol for line in lines
    )
    # arbitrary chunking, as reads from a serial port return
    reader = AtReader(CSIM)
    start = 0
    for cut in sorted({c % (len(wire) + 1) for c in cuts}):
        reader.receive_data(wire[start:cut])
        start = max(start, cut)
    reader.receive_data(wire[start:])
    reply = reader.next_reply()
    assert reply is not None and reply.ok
    assert parse_csim(reply) == response
    assert [x for x in reply.lines if not x.startswith("+CSIM")] == [*before, *between]
    assert reader.trailing == after


@settings(max_examples=100, deadline=None)
@given(garbage=st.binary(max_size=200))
def test_garbage_never_escapes_as_another_exception(garbage: bytes) -> None:
    reader = AtReader(CSIM)
    reader.receive_data(garbage + b"\r\nOK\r\n")
    reply = reader.next_reply()
    if reply is None:
        return
    with contextlib.suppress(ModemError):
        parse_csim(reply)


# -- CGLA mode: the host's side of MANAGE CHANNEL, as a table --------------------------------


def test_case_1_apdu_gets_p3_over_csim() -> None:
    assert encode_csim(bytes.fromhex("00708001")) == 'AT+CSIM=10,"0070800100"'


def test_channel_table_walk() -> None:
    table = ChannelTable()
    opened = table.route(bytes.fromhex("0070000001"))
    assert (opened.kind, opened.answer) == (RouteKind.LOCAL, b"\x01\x90\x00")
    select = table.route(bytes.fromhex("01A4040007A0000005590010"))
    assert (select.kind, select.command, select.channel) == (
        RouteKind.CCHO,
        'AT+CCHO="A0000005590010"',
        1,
    )
    table.bind(1, 3)  # the modem's session id differs from our channel number
    command = table.route(bytes.fromhex("81CB000000"))
    # CLA now addresses the session's channel (8N proprietary class kept)
    assert (command.kind, command.command) == (RouteKind.CGLA, 'AT+CGLA=3,10,"83CB000000"')
    assert table.open_sessions() == [3]
    basic = table.route(bytes.fromhex("00B0000010"))
    assert (basic.kind, basic.command) == (RouteKind.CSIM, 'AT+CSIM=10,"00B0000010"')
    close = table.route(bytes.fromhex("00708001"))
    assert (close.kind, close.command) == (RouteKind.CCHC, "AT+CCHC=3")
    assert table.sessions == {}
    again = table.route(bytes.fromhex("00708001"))
    assert (again.kind, again.answer) == (RouteKind.LOCAL, b"\x68\x81")


def test_channel_table_refusals() -> None:
    table = ChannelTable()
    assert table.route(bytes.fromhex("0070000201")).answer == b"\x6a\x81"
    table.route(bytes.fromhex("0070000001"))
    files = table.route(bytes.fromhex("01A40804047FF06F01"))
    assert files.answer == b"\x68\x81" and "uicc_channel" in files.note
    assert table.route(bytes.fromhex("02B0000010")).answer == b"\x68\x81"
    # closing an unbound channel needs no modem
    assert table.route(bytes.fromhex("0070800100")).answer == b"\x90\x00"
    for expected in range(1, 20):
        assert table.route(bytes.fromhex("0070000001")).answer[0] == expected
    assert table.route(bytes.fromhex("0070000001")).answer == b"\x6a\x81"
    table.bind(5, 5)
    with pytest.raises(ModemError):
        table.bind(5, 6)
