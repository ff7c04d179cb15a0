"""The virtual card's OS layer: ATR, logical channels, CLA, T=0 GET RESPONSE, 6Cxx, events,
persistence order. Raw APDU bytes only."""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime
from functools import reduce
from operator import xor
from pathlib import Path

import pytest

from est_agent.errors import SimStateError
from est_agent.sim.atr import build_atr
from est_agent.sim.card import ApduEvent, CardOptions, VirtualCard
from est_agent.sim.personalize import personalize
from est_agent.sim.trace import TraceWriter, attach_trace
from tests.scripted import AID, h, tx


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sim") / "template.json"
    personalize(path, iccid="8988000000000000018")
    return path


@pytest.fixture
def state_path(template: Path, tmp_path: Path) -> Path:
    path = tmp_path / "card.json"
    shutil.copyfile(template, path)
    return path


def card_with(state_path: Path, **options: object) -> VirtualCard:
    return VirtualCard.load(state_path, CardOptions(**options))  # type: ignore[arg-type]


def open_applet(card: VirtualCard) -> None:
    assert tx(card, "00 70 00 00 01") == (b"\x01", 0x9000)
    assert tx(card, f"01 A4 04 00 07 {AID}") == (b"", 0x9000)


# -- ATR -------------------------------------------------------------------------------------


def _atr_protocols(atr: bytes) -> tuple[list[int], int]:
    """Protocols offered by the TDi bytes and the index of the first historical byte."""
    assert atr[0] == 0x3B
    protocols = []
    y = atr[1] >> 4
    pos = 2
    while True:
        pos += bin(y & 0x7).count("1")  # TA, TB, TC present
        if not y & 0x8:
            break
        td = atr[pos]
        protocols.append(td & 0x0F)
        y = td >> 4
        pos += 1
    return protocols, pos


def test_atr_is_valid_distinct_and_offers_t0_and_t1(state_path: Path, tmp_path: Path) -> None:
    atr = VirtualCard.load(state_path).atr
    protocols, first_historical = _atr_protocols(atr)
    assert 0 in protocols and 1 in protocols
    k = atr[1] & 0x0F
    assert len(atr) == first_historical + k + 1  # historical bytes, then TCK
    assert reduce(xor, atr[1:], 0) == 0  # TCK makes the XOR of T0..TCK zero
    serial = VirtualCard.load(state_path).state.serial
    assert serial in atr[first_historical : first_historical + k]
    other = tmp_path / "other.json"
    personalize(other)
    assert VirtualCard.load(other).atr != atr


# -- channels and CLA ------------------------------------------------------------------------


@pytest.mark.parametrize("length", [0, 7, 9])
def test_atr_needs_an_eight_byte_serial(length: int) -> None:
    with pytest.raises(SimStateError, match=f"card serial must be 8 bytes, got {length}"):
        build_atr(bytes(length))


def test_manage_channel(state_path: Path) -> None:
    card = card_with(state_path)
    assert tx(card, "00 70 00 00 01") == (h("01"), 0x9000)
    assert tx(card, "00 70 00 00 00") == (h("02"), 0x9000)  # ZARIOT's P3 00 form
    assert tx(card, "00 70 00 05") == (b"", 0x9000)  # open a chosen channel
    assert tx(card, "00 70 00 05") == (b"", 0x6881)  # already open
    assert tx(card, "00 70 00 14") == (b"", 0x6881)  # 20: beyond 19
    assert tx(card, "00 70 80 02 00") == (b"", 0x9000)
    assert tx(card, "00 70 80 02") == (b"", 0x6881)  # closed already
    assert tx(card, "00 70 80 00") == (b"", 0x6881)  # the basic channel never closes
    assert tx(card, "00 70 00 00 01") == (h("02"), 0x9000)  # lowest free again
    assert tx(card, "00 70 40 00 01") == (b"", 0x6A86)
    assert tx(card, "80 70 00 00 01") == (b"", 0x6E00)  # ISO class only
    for _ in range(3, 20):
        if tx(card, "00 70 00 00 01")[1] != 0x9000:
            break
    assert tx(card, "00 70 00 00 01") == (b"", 0x6A81)  # all 19 in use
    assert tx(card, "4F 70 80 13") == (b"", 0x9000)  # close 19 via its own class 4F


def test_channels_beyond_three_use_4x_and_cx(state_path: Path) -> None:
    card = card_with(state_path)
    assert tx(card, "00 70 00 07") == (b"", 0x9000)
    assert tx(card, f"43 A4 04 00 07 {AID}") == (b"", 0x9000)  # 4X: channel 4 + 3
    assert tx(card, "C3 CB 00 00 44")[1] == 0x9000
    assert tx(card, "43 CB 00 00 44")[1] == 0x9000
    assert tx(card, "C4 CB 00 00 44") == (b"", 0x6881)  # channel 8 is closed


def test_closed_channel_bad_cla_unknown_ins_and_garbage(state_path: Path) -> None:
    card = card_with(state_path)
    assert tx(card, "01 A4 00 04 02 3F 00") == (b"", 0x6881)
    assert tx(card, "83 CB 00 00 44") == (b"", 0x6881)
    for cla in ("20", "90", "FF", "10", "60", "B0"):
        assert tx(card, f"{cla} A4 00 04 02 3F 00") == (b"", 0x6E00), cla
    assert tx(card, "04 A4 00 04 02 3F 00") == (b"", 0x6882)  # secure messaging
    assert tx(card, "A0 A4 00 00 02 3F 00") == (b"", 0x6E00)  # GSM class: no command takes it
    assert tx(card, "00 FE 00 00") == (b"", 0x6D00)
    assert tx(card, "00 CB 00 00 44") == (b"", 0x6D00)  # no applet on the basic channel
    for garbage in ("", "00", "00 A4 00", "00 A4 00 04 05 3F 00", "00 A4 00 04 00 00 05 3F"):
        assert tx(card, garbage) == (b"", 0x6700), garbage


def test_select_wrong_aid_keeps_the_selection(state_path: Path) -> None:
    card = card_with(state_path)
    open_applet(card)
    assert tx(card, "01 A4 04 00 07 A0 00 00 05 59 00 11") == (b"", 0x6A82)
    assert tx(card, "81 CB 00 00 44")[1] == 0x9000  # the applet is still selected
    assert tx(card, "00 A4 04 00 07 A0 00 00 05 59 00 11") == (b"", 0x6A82)
    # issue 13: the applet is selectable with its proprietary class too (was 6E00), the
    # UICC's own DF names are not
    assert tx(card, "81 A4 04 00 07 " + AID) == (b"", 0x9000)
    assert tx(card, "81 A4 04 00 07 A0 00 00 05 59 00 11") == (b"", 0x6E00)


def test_other_configured_aid_selects_the_applet(state_path: Path) -> None:
    card = card_with(state_path, aids=(h("A0 00 00 02 48 04 00"),))
    assert tx(card, f"00 A4 04 00 07 {AID}") == (b"", 0x6A82)
    assert tx(card, "00 A4 04 00 07 A0 00 00 02 48 04 00") == (b"", 0x9000)
    assert tx(card, "80 CB 00 00 44")[1] == 0x9000


def test_channel_opened_from_an_applet_channel_inherits_it(state_path: Path) -> None:
    card = card_with(state_path)
    open_applet(card)
    assert tx(card, "01 70 00 00 01") == (h("02"), 0x9000)
    assert tx(card, "82 CB 00 00 44")[1] == 0x9000
    assert tx(card, "00 70 00 00 01") == (h("03"), 0x9000)
    assert tx(card, "83 CB 00 00 44") == (b"", 0x6D00)  # from channel 0: MF, no applet


# -- T=0 and Le ------------------------------------------------------------------------------


def test_t0_get_response_partial_and_discarded(state_path: Path) -> None:
    card = card_with(state_path, t0_mode=True)
    tx(card, "00 70 00 00 01")
    tx(card, "00 C0 00 00 01")
    assert tx(card, f"01 A4 04 00 07 {AID}") == (b"", 0x9000)
    assert tx(card, "81 CB 00 00 44") == (b"", 0x6144)
    first, sw = tx(card, "81 C0 00 00 10")
    assert len(first) == 0x10 and sw == 0x6134  # 0x44 - 0x10 left
    second, sw = tx(card, "01 C0 00 00 30")
    assert len(second) == 0x30 and sw == 0x6104
    third, sw = tx(card, "81 C0 00 00 04")
    assert sw == 0x9000
    direct = card_with(state_path)
    open_applet(direct)
    assert first + second + third == tx(direct, "81 CB 00 00 44")[0]
    assert tx(card, "81 C0 00 00 04") == (b"", 0x6985)  # nothing pending
    # any other command in between loses the data
    assert tx(card, "81 CB 00 00 44") == (b"", 0x6144)
    assert tx(card, "81 84 00 00 08") == (b"", 0x6108)
    assert len(tx(card, "81 C0 00 00 08")[0]) == 8
    assert tx(card, "81 CB 00 00 44") == (b"", 0x6144)
    assert tx(card, "00 C0 00 00 44") == (b"", 0x6985)  # GET RESPONSE on another channel
    assert tx(card, "81 C0 00 00 44") == (b"", 0x6985)
    # Le larger than pending is served (only 6C-mode complains)
    assert tx(card, "81 CB 00 00 44") == (b"", 0x6144)
    data, sw = tx(card, "81 C0 00 00 00")
    assert len(data) == 0x44 and sw == 0x9000


def test_t0_mode_without_data_answers_the_sw(state_path: Path) -> None:
    card = card_with(state_path, t0_mode=True)
    assert tx(card, "00 A4 00 0C 02 7F F0") == (b"", 0x9000)
    assert tx(card, "00 A4 00 0C 02 7F F1") == (b"", 0x6A82)


def test_t0_mode_keeps_a_warning_sw_for_the_last_get_response(state_path: Path) -> None:
    card = card_with(state_path, t0_mode=True, object_list_page_bytes=64)
    tx(card, "00 70 00 00 01")
    tx(card, "00 C0 00 00 01")
    tx(card, f"01 A4 04 00 07 {AID}")
    _, sw = tx(card, "81 CB 01 00 00")
    assert sw >> 8 == 0x61
    assert tx(card, f"81 C0 00 00 {sw & 0xFF:02X}")[1] == 0x6300


def test_wrong_le_answers_6c_and_does_not_execute(state_path: Path) -> None:
    card = card_with(state_path, wrong_le_6c=True)
    open_applet(card)
    assert tx(card, "81 CB 00 00 10") == (b"", 0x6C44)
    data, sw = tx(card, "81 CB 00 00 44")
    assert len(data) == 0x44 and sw == 0x9000
    assert tx(card, "81 CB 00 00 00")[1] == 0x9000  # Le 00: "whatever there is"
    assert tx(card, "81 B9 00 00 03 84 01 02 10") == (b"", 0x6C4D)
    op_a = next(k for k in card.state.applet.private_keys if k.object_id == b"\x02")
    assert not op_a.filled  # refused: no key was generated
    assert tx(card, "81 B9 00 00 03 84 01 02 4D")[1] == 0x9000
    assert tx(card, "81 CD 00 00 03 85 01 02 47")[1] == 0x9000
    # Le chooses the amount for GET RANDOM and READ FILE: no 6C there
    assert len(tx(card, "81 84 00 00 05")[0]) == 5
    assert len(tx(card, "81 B0 00 00 03 83 01 01 20")[0]) == 0x20


def test_wrong_le_in_t0_get_response(state_path: Path) -> None:
    card = card_with(state_path, t0_mode=True, wrong_le_6c=True)
    tx(card, "00 70 00 00 01")
    tx(card, "00 C0 00 00 01")
    tx(card, f"01 A4 04 00 07 {AID}")
    assert tx(card, "81 CB 00 00 44") == (b"", 0x6144)
    assert tx(card, "81 C0 00 00 50") == (b"", 0x6C44)
    assert len(tx(card, "81 C0 00 00 44")[0]) == 0x44


# -- reset -----------------------------------------------------------------------------------


def test_reset_drops_channels_sessions_and_pending_data(state_path: Path) -> None:
    card = card_with(state_path, t0_mode=True)
    tx(card, "00 70 00 00 01")
    tx(card, "00 C0 00 00 01")
    tx(card, f"01 A4 04 00 07 {AID}")
    tx(card, "81 2A 00 01 0D 84 01 01 A1 01 03 91 02 00 01 92 01 04")
    assert tx(card, "81 CB 00 00 44") == (b"", 0x6144)
    atr = card.atr
    card.reset()
    assert card.atr == atr
    assert tx(card, "81 C0 00 00 44") == (b"", 0x6881)
    assert tx(card, "00 70 00 00 01") == (b"", 0x6101)
    tx(card, "00 C0 00 00 01")
    assert tx(card, "81 CB 00 00 44") == (b"", 0x6D00)  # applet no longer selected
    tx(card, f"01 A4 04 00 07 {AID}")
    assert tx(card, "81 2B 80 01 22 9E 20" + "00" * 32) == (b"", 0x6985)
    card.power_on()
    # issue 13: the SELECT opens the closed channel (was 6881); a command other than SELECT
    # of the applet still finds it closed
    assert tx(card, "81 CB 00 00 44") == (b"", 0x6881)
    assert tx(card, "01 A4 04 00 07 " + AID) == (b"", 0x9000)
    assert tx(card, "81 2B 80 01 22 9E 20" + "00" * 32) == (b"", 0x6985)  # no session lives on


@pytest.mark.parametrize(
    ("cla", "channel"),
    [("01", 1), ("02", 2), ("03", 3), ("81", 1), ("82", 2), ("83", 3), ("40", 4), ("4F", 19)],
)
def test_select_of_the_applet_opens_a_closed_channel(
    state_path: Path, cla: str, channel: int
) -> None:
    card = card_with(state_path)
    proprietary = f"{0xC0 | (channel - 4):02X}" if channel >= 4 else f"{0x80 | channel:02X}"
    assert tx(card, f"{proprietary} CB 00 00 44") == (b"", 0x6881)
    assert tx(card, f"{cla} A4 04 00 07 {AID}") == (b"", 0x9000)
    info, sw = tx(card, f"{proprietary} CB 00 00 44")
    assert sw == 0x9000 and info[:3] == h("10 01 01")
    # the channel is open for MANAGE CHANNEL as well: closing it works, closing again not
    close_cla = f"{0x40 | (channel - 4):02X}" if channel >= 4 else "00"
    assert tx(card, f"{close_cla} 70 80 {channel:02X}") == (b"", 0x9000)
    assert tx(card, f"{proprietary} CB 00 00 44") == (b"", 0x6881)
    # MANAGE CHANNEL open picks another number while it is open
    assert tx(card, f"{cla} A4 04 00 07 {AID}") == (b"", 0x9000)
    if channel == 1:
        assert tx(card, "00 70 00 00 01") == (h("02"), 0x9000)


def test_implicit_opening_only_by_selecting_the_applet(state_path: Path) -> None:
    card = card_with(state_path)
    assert tx(card, "01 A4 04 00 07 A0 00 00 05 59 00 11") == (b"", 0x6A82)  # unknown AID
    assert tx(card, "01 CB 00 00 44") == (b"", 0x6881)  # ... so the channel stayed closed
    assert tx(card, "01 A4 00 04 02 3F 00") == (b"", 0x6881)  # SELECT by FID does not open
    assert tx(card, "01 B0 00 00 01") == (b"", 0x6881)
    assert tx(card, "A1 A4 04 00 07 " + AID) == (b"", 0x6881)  # GSM class does not open
    assert tx(card, "01 A4 04 7F 07 " + AID) == (b"", 0x6A86)
    assert tx(card, "01 CB 00 00 44") == (b"", 0x6881)


def test_refusing_implicit_opening_answers_6881(state_path: Path) -> None:
    card = card_with(state_path, implicit_channel_open=False)
    assert tx(card, "01 A4 04 00 07 " + AID) == (b"", 0x6881)
    assert tx(card, "81 A4 04 00 07 " + AID) == (b"", 0x6881)
    assert tx(card, "81 CB 00 00 44") == (b"", 0x6881)
    open_applet(card)  # MANAGE CHANNEL first still works
    assert tx(card, "81 CB 00 00 44")[1] == 0x9000


# -- events and trace ------------------------------------------------------------------------


def test_on_apdu_events_carry_no_payload(state_path: Path) -> None:
    events: list[ApduEvent] = []
    card = VirtualCard.load(state_path, on_apdu=events.append)
    open_applet(card)
    tx(card, "81 CB 00 00 44")
    tx(card, "00")
    assert [(e.channel, e.ins, e.sw) for e in events] == [
        (0, 0x70, 0x9000),
        (1, 0xA4, 0x9000),
        (1, 0xCB, 0x9000),
        (0, 0x00, 0x6700),
    ]
    select = events[1]
    assert (select.cla, select.p1, select.p2, select.lc, select.le) == (0x01, 0x04, 0x00, 7, None)
    assert (events[2].le, events[2].response_len) == (0x44, 0x44)
    assert all(e.duration_s >= 0 for e in events)
    assert set(vars(select)) == {
        "channel", "cla", "ins", "p1", "p2", "lc", "le", "response_len", "sw", "duration_s"
    }  # fmt: skip


def test_trace_writer_json_lines(state_path: Path, tmp_path: Path) -> None:
    trace = tmp_path / "trace.jsonl"
    clock = datetime(2025, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
    seen: list[ApduEvent] = []
    card = VirtualCard.load(state_path, on_apdu=seen.append)
    with TraceWriter(trace, clock=lambda: clock) as writer:
        card.on_apdu = writer
        open_applet(card)
        tx(card, "81 84 00 00 10")
    lines = [json.loads(line) for line in trace.read_text().splitlines()]
    assert len(lines) == 3
    assert lines[2] == {
        "time": "2025-01-02T03:04:05.678+00:00",
        "channel": 1,
        "cla": "81",
        "ins": "84",
        "p1": "00",
        "p2": "00",
        "lc": 0,
        "le": 16,
        "response_len": 16,
        "sw": "9000",
        "duration_s": lines[2]["duration_s"],
    }
    # attach_trace keeps an observer already there
    card.on_apdu = seen.append
    with attach_trace(card, tmp_path / "more.jsonl"):
        tx(card, "81 84 00 00 01")
    assert len((tmp_path / "more.jsonl").read_text().splitlines()) == 1
    assert seen[-1].ins == 0x84
    with pytest.raises(TypeError):
        attach_trace(object(), tmp_path / "x.jsonl")


def test_a_failing_observer_does_not_break_the_card(state_path: Path) -> None:
    def broken(event: ApduEvent) -> None:
        raise OSError("disk full")

    card = VirtualCard.load(state_path, on_apdu=broken)
    assert tx(card, "00 70 00 00 01") == (h("01"), 0x9000)


# -- persistence order -----------------------------------------------------------------------


def test_state_changes_reach_the_file_before_the_answer(state_path: Path) -> None:
    observed: list[bytes] = []

    def on_apdu(event: ApduEvent) -> None:
        # runs after processing, before the caller gets the answer: a link cut here must
        # already find the change on disk
        observed.append(VirtualCard.load(state_path).state.mf.dfs[0].efs[0].data[:4])

    card = VirtualCard.load(state_path, on_apdu=on_apdu)
    tx(card, "00 A4 08 0C 04 7F F0 6F 01")
    assert tx(card, "00 D6 00 00 04 01 02 03 04") == (b"", 0x9000)
    assert observed[-1] == h("01 02 03 04")
    open_applet(card)
    point = tx(card, "81 B9 00 00 03 84 01 03")[0][12:]
    reloaded = VirtualCard.load(state_path)
    open_applet(reloaded)
    assert tx(reloaded, "81 CD 00 00 03 85 01 03") == (h("34 45 49 43 86 41") + point, 0x9000)


def test_commands_that_change_nothing_do_not_write(state_path: Path) -> None:
    card = VirtualCard.load(state_path)
    before = state_path.stat().st_mtime_ns, state_path.read_bytes()
    open_applet(card)
    tx(card, "81 CB 01 00 00")
    tx(card, "81 2A 00 01 0D 84 01 01 A1 01 03 91 02 00 01 92 01 04")
    tx(card, "81 2B 80 01 22 9E 20" + "00" * 32)
    tx(card, "00 A4 08 0C 04 7F F0 6F 01")
    tx(card, "00 B0 00 00 10")
    tx(card, "00 D6 00 00 01")  # refused: no data
    assert (state_path.stat().st_mtime_ns, state_path.read_bytes()) == before
