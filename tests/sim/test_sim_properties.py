"""Property: whatever APDUs arrive, no answer contains a private key, and none is a crash.

Sequences mix well-formed IoT SAFE and UICC commands with random parameters and plain random
bytes, under random card options; key generation inside a sequence adds new secrets, which are
checked too.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from est_agent.sim.applet import generate_key_pair
from est_agent.sim.card import CardOptions, VirtualCard
from est_agent.sim.personalize import personalize
from est_agent.sim.state import CardState, load_state

AID = bytes.fromhex("A0000005590010")


def _apdu(cla: int, ins: int, p1: int, p2: int, data: bytes, le: int | None) -> bytes:
    out = bytes((cla, ins, p1, p2))
    if data:
        out += bytes((len(data),)) + data
    if le is not None:
        out += bytes((le,))
    return out


def _tlv(tag: int, value: bytes) -> bytes:
    return bytes((tag, len(value))) + value


# mostly channel 1, where the applet usually is; now and then any CLA at all
channels = st.sampled_from([1, 1, 1, 1, 0, 2, 3])
classes = st.one_of(
    st.builds(lambda ch, base: base | ch, channels, st.sampled_from([0x00, 0x80])),
    st.builds(lambda ch, base: base | ch, channels, st.sampled_from([0x00, 0x80])),
    st.builds(lambda ch, base: base | ch, channels, st.sampled_from([0x00, 0x80])),
    st.integers(min_value=0, max_value=0xFF),
)
object_ids = st.one_of(
    st.sampled_from([b"\x01", b"\x02", b"\x03", b"\x12"]), st.binary(min_size=0, max_size=3)
)
les = st.one_of(st.none(), st.integers(min_value=0, max_value=0xFF))
small = st.integers(min_value=0, max_value=3)
key_tags = st.sampled_from([0x84, 0x85, 0x83, 0x74, 0x75, 0x73])
labels = st.sampled_from([b"bootstrap", b"op-a", b"op-b", b"bootstrap-cert", b"x"])


@st.composite
def key_reference(draw: st.DrawFn) -> bytes:
    tag = draw(key_tags)
    value = draw(labels) if tag in (0x73, 0x74, 0x75) else draw(object_ids)
    return _tlv(tag, value)


@st.composite
def session_init(draw: st.DrawFn) -> bytes:
    body = draw(key_reference())
    body += _tlv(0xA1, bytes((draw(st.sampled_from([1, 2, 3, 3, 3, 9])),)))
    body += _tlv(0x91, draw(st.sampled_from([b"\x00\x01", b"\x00\x02", b"\x01"])))
    body += _tlv(0x92, bytes((draw(st.sampled_from([4, 4, 1])),)))
    return body


@st.composite
def signature_update(draw: st.DrawFn) -> bytes:
    body = _tlv(0x9E, draw(st.binary(min_size=31, max_size=33)))
    if draw(st.booleans()):
        raw = draw(st.binary(min_size=64, max_size=64))
        body += draw(st.sampled_from([b"\x33\x00\x40", b"\x33\x40"])) + raw
    return body


@st.composite
def command(draw: st.DrawFn) -> bytes:
    cla = draw(classes)
    kind = draw(st.integers(min_value=0, max_value=15))
    p2 = draw(small)
    if kind == 0:
        manage = draw(st.sampled_from([0x00, 0x00, 0x00, 0x80, 0x40]))
        return _apdu(cla & 0x03, 0x70, manage, p2, b"", 1)
    if kind == 1:
        return _apdu(cla & 0x03, 0xA4, 0x04, 0x00, AID, None)
    if kind == 2:
        return _apdu(cla, 0xCB, draw(st.sampled_from([0, 1, 0xC1, 0xC2, 0xC3, 7])), p2,
                     draw(st.one_of(st.just(b""), key_reference())), draw(les))  # fmt: skip
    if kind == 3:
        return _apdu(cla, 0xB9, 0, 0, draw(key_reference()), draw(les))
    if kind == 4:
        return _apdu(cla, 0xCD, 0, 0, draw(key_reference()), draw(les))
    if kind == 5:
        return _apdu(cla, 0x84, 0, 0, b"", draw(les))
    if kind in (6, 7):
        ins = 0x2A if kind == 6 else 0x2C
        return _apdu(cla, ins, draw(st.sampled_from([0, 1, 2])), p2, draw(session_init()), None)
    if kind in (8, 9):
        ins = 0x2B if kind == 8 else 0x2D
        p1 = draw(st.sampled_from([0x80, 0x80, 0x00]))
        return _apdu(cla, ins, p1, p2, draw(signature_update()), draw(les))
    if kind == 10:
        offset = draw(st.integers(min_value=0, max_value=0x300))
        return _apdu(cla, 0xB0, offset >> 8, offset & 0xFF, draw(key_reference()), draw(les))
    if kind == 11:
        path = draw(
            st.sampled_from([b"\x3f\x00", b"\x7f\xf0", b"\x6f\x01", b"\x6f\x10", b"\x2f\xe2"])
        )
        return _apdu(cla & 0x03, 0xA4, draw(st.sampled_from([0, 8, 9])), 0x04, path, None)
    if kind == 12:
        offset = draw(st.integers(min_value=0, max_value=0x900))
        return _apdu(cla & 0x03, 0xB0, offset >> 8, offset & 0xFF, b"", draw(les))
    if kind == 13:
        offset = draw(st.integers(min_value=0, max_value=0x900))
        data = draw(st.binary(min_size=1, max_size=40))
        return _apdu(cla & 0x03, 0xD6, offset >> 8, offset & 0xFF, data, None)
    if kind == 14:
        return _apdu(cla, 0xC0, 0, 0, b"", draw(les))
    return draw(st.binary(max_size=300))


option_sets = st.builds(
    CardOptions,
    t0_mode=st.booleans(),
    wrong_le_6c=st.booleans(),
    signature_format=st.sampled_from(["wide", "short", "der"]),
    pubkey_id_offset=st.sampled_from([0, 0x10]),
    object_list_page_bytes=st.sampled_from([40, 240]),
    read_file_max=st.sampled_from([50, 256]),
)

_SELECT_APPLET = (bytes.fromhex("0070000001"), bytes.fromhex("01A4040007") + AID)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> CardState:
    path: Path = tmp_path_factory.mktemp("sim") / "template.json"
    personalize(path)
    state = load_state(path)
    # one operational key already filled, so that both kinds of slots are exercised
    generate_key_pair(state.applet, b"\x03")
    return state


@settings(
    max_examples=200,
    deadline=None,
    database=None,  # unit tests write only under tmp_path
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    options=option_sets,
    select_first=st.sampled_from([True, True, True, False]),
    commands=st.lists(command(), min_size=5, max_size=40),
)
def test_no_answer_reveals_a_private_key(
    template: CardState, options: CardOptions, select_first: bool, commands: list[bytes]
) -> None:
    card = VirtualCard(copy.deepcopy(template), options)
    sequence = [*_SELECT_APPLET, bytes.fromhex("81B90000038401") + b"\x02"] if select_first else []
    for raw in [*sequence, *commands]:
        response = card.process(raw)
        assert len(response) >= 2
        assert response[-2:] != b"\x6f\x00", f"internal error on {raw.hex()}"
        for key in card.state.applet.private_keys:
            if key.scalar:
                assert key.scalar not in response
                assert key.scalar[::-1] not in response
