"""The one CLA coding of logical channels (ETSI TS 102 221 §10.1.1): est_agent.transport.cla."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from est_agent.errors import InputError
from est_agent.transport.cla import (
    channel_from_cla,
    channel_of_cla,
    cla_for_channel,
    with_channel,
)


@pytest.mark.parametrize(
    ("channel", "iso", "proprietary"),
    [(0, 0x00, 0x80), (1, 0x01, 0x81), (3, 0x03, 0x83), (4, 0x40, 0xC0), (19, 0x4F, 0xCF)],
)
def test_cla_coding_ts_102_221(channel: int, iso: int, proprietary: int) -> None:
    assert cla_for_channel(channel) == iso
    assert cla_for_channel(channel, proprietary=True) == proprietary
    assert channel_from_cla(iso) == channel_from_cla(proprietary) == channel


@pytest.mark.parametrize("channel", [-1, 20])
def test_cla_out_of_range(channel: int) -> None:
    with pytest.raises(InputError, match=f"logical channel {channel} outside 0..19"):
        cla_for_channel(channel)
    with pytest.raises(InputError, match=f"logical channel {channel} outside 0..19"):
        with_channel(0x80, channel)


def test_channel_from_cla_ts_102_221() -> None:
    assert [channel_of_cla(c) for c in (0x00, 0x81, 0xA3, 0x40, 0xCF, 0x20)] == [
        0,
        1,
        3,
        4,
        19,
        None,
    ]


@pytest.mark.parametrize("cla", [0x10, 0x20, 0x30, 0x50, 0x60, 0x70, 0x90, 0xB0, 0xD0, 0xE0, 0xFF])
def test_classes_without_a_channel(cla: int) -> None:
    assert channel_of_cla(cla) is None


@given(cla=st.sampled_from([0x00, 0x80, 0xA0, 0x40, 0xC0, 0x04, 0x88]), channel=st.integers(0, 19))
def test_with_channel_keeps_the_class(cla: int, channel: int) -> None:
    moved = with_channel(cla, channel)
    assert channel_from_cla(moved) == channel
    assert channel_of_cla(moved) == channel
    assert moved & 0x80 == cla & 0x80  # proprietary stays proprietary
    if channel <= 3 and not cla & 0x40:
        assert moved & 0xFC == cla & 0xFC  # class and secure-messaging bits untouched
