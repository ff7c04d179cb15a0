"""UICC file commands of the virtual SIM (TS 102 221 §11.1): SELECT, READ/UPDATE BINARY."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from est_agent.sim.card import CardOptions, VirtualCard
from est_agent.sim.personalize import personalize
from tests.scripted import AID, h, tx


def fcp_tlvs(fcp: bytes) -> dict[int, bytes]:
    assert fcp[0] == 0x62 and fcp[1] == len(fcp) - 2
    tlvs = {}
    pos = 2
    while pos < len(fcp):
        tag, length = fcp[pos], fcp[pos + 1]
        tlvs[tag] = fcp[pos + 2 : pos + 2 + length]
        pos += 2 + length
    return tlvs


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sim") / "template.json"
    personalize(path, iccid="89882000000000000015")
    return path


@pytest.fixture
def state_path(template: Path, tmp_path: Path) -> Path:
    path = tmp_path / "card.json"
    shutil.copyfile(template, path)
    return path


@pytest.fixture
def card(state_path: Path) -> VirtualCard:
    return VirtualCard.load(state_path)


def test_select_mf_and_df_fcp(card: VirtualCard) -> None:
    fcp, sw = tx(card, "00 A4 00 04 02 3F 00")
    assert sw == 0x9000
    tlvs = fcp_tlvs(fcp)
    assert tlvs[0x82] == h("78 21") and tlvs[0x83] == h("3F 00") and tlvs[0x8A] == h("05")
    assert 0x8C in tlvs
    fcp, sw = tx(card, "00 A4 00 04 02 7F F0 00")  # with Le
    assert sw == 0x9000 and fcp_tlvs(fcp)[0x83] == h("7F F0")
    assert tx(card, "00 A4 00 04")[1] == 0x9000  # P1 00 without data: the MF


def test_select_ef_fcp_and_no_data(card: VirtualCard) -> None:
    assert tx(card, "00 A4 00 0C 02 7F F0") == (b"", 0x9000)
    fcp, sw = tx(card, "00 A4 00 04 02 6F 01")
    assert sw == 0x9000
    tlvs = fcp_tlvs(fcp)
    assert tlvs[0x82] == h("41 21")
    assert tlvs[0x83] == h("6F 01")
    assert tlvs[0x80] == h("08 00")  # 2048 bytes
    assert tlvs[0x8A] == h("05")
    assert tlvs[0x8C] == h("03 00 00")  # update and read: always
    fcp, _ = tx(card, "00 A4 00 04 02 6F 10")
    assert fcp_tlvs(fcp)[0x8C][1:] != h("00 00")  # ADM-only is shown as restricted
    assert fcp_tlvs(fcp)[0x80] == h("00 20")
    assert tx(card, "00 A4 00 0C 02 6F 01") == (b"", 0x9000)


def test_select_by_path_and_relatives(card: VirtualCard) -> None:
    assert tx(card, "00 A4 08 0C 04 7F F0 6F 02") == (b"", 0x9000)
    assert tx(card, "00 A4 08 0C 06 3F 00 7F F0 6F 02") == (b"", 0x9000)  # MF included
    assert tx(card, "00 A4 08 0C 02 2F E2") == (b"", 0x9000)
    assert tx(card, "00 A4 08 0C 04 6F 01 7F F0") == (b"", 0x6A82)  # EF is no DF
    assert tx(card, "00 A4 08 0C 03 7F F0 6F") == (b"", 0x6700)
    assert tx(card, "00 A4 00 0C 02 7F F0") == (b"", 0x9000)
    assert tx(card, "00 A4 09 0C 02 6F 10") == (b"", 0x9000)
    assert tx(card, "00 A4 09 0C 02 2F E2") == (b"", 0x6A82)  # not under the current DF
    assert tx(card, "00 A4 00 0C 02 2F E2") == (b"", 0x6A82)  # EFs of the parent: no
    assert tx(card, "00 A4 00 0C 02 3F 00") == (b"", 0x9000)  # the MF from anywhere
    assert tx(card, "00 A4 00 0C 02 2F E2") == (b"", 0x9000)
    tx(card, "00 A4 08 0C 02 7F F0")
    fcp, _ = tx(card, "00 A4 00 04 02 7F F0")  # the current DF itself
    assert fcp_tlvs(fcp)[0x83] == h("7F F0")


@pytest.mark.parametrize(
    ("command", "sw"),
    [
        ("00 A4 00 04 02 6F 99", 0x6A82),
        ("00 A4 00 04 02 7F F1", 0x6A82),
        ("00 A4 00 05 02 3F 00", 0x6A86),
        ("00 A4 02 04 02 6F 01", 0x6A86),
        ("00 A4 00 04 03 3F 00 00", 0x6700),
        ("00 A4 04 00 07 A0 00 00 05 59 00 99", 0x6A82),
        ("80 A4 00 04 02 3F 00", 0x6E00),
        ("80 B0 00 00 01", 0x6E00),
    ],
)
def test_select_errors(card: VirtualCard, command: str, sw: int) -> None:
    assert tx(card, command) == (b"", sw)


def test_read_iccid(card: VirtualCard) -> None:
    tx(card, "00 A4 00 0C 02 2F E2")
    data, sw = tx(card, "00 B0 00 00 0A")
    assert sw == 0x9000
    digits = "".join(f"{b & 0x0F:X}{b >> 4:X}" for b in data)
    assert digits == "89882000000000000015"
    assert tx(card, "00 D6 00 00 01 00") == (b"", 0x6982)  # update NEVER


def test_read_binary(card: VirtualCard) -> None:
    assert tx(card, "00 B0 00 00 04") == (b"", 0x6986)  # MF selected, no EF
    tx(card, "00 A4 08 0C 04 7F F0 6F 01")
    assert tx(card, "00 B0 00 00 04") == (h("FF FF FF FF"), 0x9000)
    assert len(tx(card, "00 B0 00 00 00")[0]) == 256
    data, sw = tx(card, "00 B0 07 FC 08")  # 4 bytes left, 8 asked
    assert (len(data), sw) == (4, 0x6282)
    data, sw = tx(card, "00 B0 07 F0 00")  # Le 00: what is there, no warning
    assert (len(data), sw) == (16, 0x9000)
    assert tx(card, "00 B0 08 00 01") == (b"", 0x6B00)
    assert tx(card, "00 B0 7F FF 01") == (b"", 0x6B00)
    assert tx(card, "00 B0 00 00") == (b"", 0x6700)
    assert tx(card, "00 B0 81 00 01") == (b"", 0x6A81)  # SFI addressing not offered


def test_update_binary_and_reload(card: VirtualCard, state_path: Path) -> None:
    assert tx(card, "00 D6 00 00 01 00") == (b"", 0x6986)
    tx(card, "00 A4 08 0C 04 7F F0 6F 02")
    assert tx(card, "00 D6 07 FE 02 AB CD") == (b"", 0x9000)
    assert tx(card, "00 B0 07 FD 03") == (h("FF AB CD"), 0x9000)
    assert tx(card, "00 D6 07 FF 02 00 00") == (b"", 0x6700)  # does not fit
    assert tx(card, "00 D6 08 00 01 00") == (b"", 0x6B00)
    assert tx(card, "00 D6 00 00") == (b"", 0x6700)
    big = bytes(range(255))
    assert tx(card, h("00 D6 01 00 FF") + big) == (b"", 0x9000)
    reloaded = VirtualCard.load(state_path)
    tx(reloaded, "00 A4 08 0C 04 7F F0 6F 02")
    assert tx(reloaded, "00 B0 01 00 FF") == (big, 0x9000)
    assert tx(reloaded, "00 B0 07 FE 02") == (h("AB CD"), 0x9000)


def test_adm_only_ef_refuses_read_and_update(card: VirtualCard, state_path: Path) -> None:
    before = state_path.read_bytes()
    tx(card, "00 A4 08 0C 04 7F F0 6F 10")
    assert tx(card, "00 B0 00 00 01") == (b"", 0x6982)
    assert tx(card, "00 D6 00 00 01 00") == (b"", 0x6982)
    assert state_path.read_bytes() == before


def test_each_channel_has_its_own_selection(card: VirtualCard) -> None:
    tx(card, "00 A4 08 0C 04 7F F0 6F 01")
    tx(card, "00 D6 00 00 01 11")
    assert tx(card, "00 70 00 00 01") == (h("01"), 0x9000)
    assert tx(card, "01 B0 00 00 01") == (b"", 0x6986)  # new channel: MF, no EF
    tx(card, "01 A4 08 0C 04 7F F0 6F 02")
    tx(card, "01 D6 00 00 01 22")
    assert tx(card, "00 B0 00 00 01") == (h("11"), 0x9000)
    assert tx(card, "01 B0 00 00 01") == (h("22"), 0x9000)


def test_select_by_fid_on_the_applet_channel_goes_to_the_applet(card: VirtualCard) -> None:
    tx(card, "00 70 00 00 01")
    tx(card, "01 A4 08 0C 04 7F F0 6F 01")
    tx(card, f"01 A4 04 00 07 {AID}")
    # A Java Card runtime hands SELECT by FID to the selected applet, which does not know it
    assert tx(card, "01 A4 00 0C 02 6F 02") == (b"", 0x6D00)
    assert tx(card, "01 A4 08 0C 04 7F F0 6F 02") == (b"", 0x6D00)
    assert tx(card, "81 CB 00 00 44")[1] == 0x9000  # still the applet
    # B0 here is the applet's READ FILE, not READ BINARY of an EF
    assert tx(card, "01 B0 00 00 01") == (b"", 0x6700)
    assert tx(card, "01 D6 00 00 01 00") == (b"", 0x6D00)


def test_fcp_in_t0_mode(state_path: Path) -> None:
    card = VirtualCard.load(state_path, CardOptions(t0_mode=True))
    data, sw = tx(card, "00 A4 00 04 02 3F 00")
    assert data == b"" and sw >> 8 == 0x61
    fcp, sw = tx(card, f"00 C0 00 00 {sw & 0xFF:02X}")
    assert sw == 0x9000 and fcp_tlvs(fcp)[0x83] == h("3F 00")
    tx(card, "00 A4 08 0C 04 7F F0 6F 01")
    assert tx(card, "00 B0 07 FC 08") == (b"", 0x6104)
    assert tx(card, "00 C0 00 00 04") == (h("FF FF FF FF"), 0x6282)
