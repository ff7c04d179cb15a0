"""The pure parts of the benchmarks: the fleet's simulated clock and ideal schedule, the
physical limit of enroll_realistic.py, and the zlib-only PNG writer."""

from __future__ import annotations

import struct
import sys
import time
import zlib
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from enroll_realistic import PROFILES, limit_s, min_apdus
from fleet import SimClock, ideal_end
from pngplot import bar_chart

T0 = datetime(2027, 1, 4, 6, 0, tzinfo=UTC)


def test_sim_clock_runs_scaled_and_jumps_forward_only() -> None:
    clock = SimClock(T0, scale=1000.0)
    time.sleep(0.01)
    assert clock.now() >= T0 + timedelta(seconds=10)  # 10 ms real x 1000
    clock.jump_to(T0 + timedelta(days=2))
    after = clock.now()
    assert after >= T0 + timedelta(days=2)
    clock.jump_to(T0)  # backwards: ignored
    assert clock.now() >= after
    real, sim = clock.anchors[-1]
    assert sim == T0 + timedelta(days=2)
    assert clock.sim_of(real + 0.5) == sim + timedelta(seconds=500)
    assert clock.sim_of(clock.anchors[0][0]) == T0


def test_ideal_schedule_serves_around_the_outage() -> None:
    arrivals = [T0 + timedelta(seconds=s) for s in (0, 0, 0, 0)]
    # 1 per 10 s, no outage: the fourth finishes at 40 s
    assert ideal_end(arrivals, 0.1, None) == T0 + timedelta(seconds=40)
    # an outage from 15 s to 100 s: the first finishes at 10 s; the second would end at 20 s,
    # inside the outage, so it is served after it (110 s), then 120 s and 130 s
    outage = (T0 + timedelta(seconds=15), T0 + timedelta(seconds=100))
    assert ideal_end(arrivals, 0.1, outage) == T0 + timedelta(seconds=130)
    # late arrivals: served when they come
    late = [T0, T0 + timedelta(seconds=300)]
    assert ideal_end(late, 0.1, None) == T0 + timedelta(seconds=310)


def test_physical_limit_of_the_profiles() -> None:
    # 519-byte bootstrap certificate: 3 READ FILE; 44 + 560 bytes to write: 3 UPDATE BINARY
    assert min_apdus(519, 560) == 1 + 3 + 2 + 1 + 2 + 1 + 3
    card, net = limit_s(PROFILES["usb"], 13, "1.3")
    assert card == pytest.approx((300 + 2 * 80 + 13 * 15) / 1000)
    assert net == pytest.approx(20 * (1 + 1 + 2) / 1000)
    card, net = limit_s(PROFILES["cellular"], 13, "1.2")
    assert card == pytest.approx((900 + 2 * 200 + 13 * 80) / 1000)
    assert net == pytest.approx(300 * (1 + 2 + 2) / 1000)
    assert limit_s(PROFILES["zero"], 13, "1.3") == (0.0, 0.0)


def test_bar_chart_is_a_valid_png(tmp_path: Path) -> None:
    path = tmp_path / "plot.png"
    bar_chart(path, [0, 5, 10, 3], title="t", x_label="x", cap_line=8, shaded=(1, 2), width=200,
              height=100)  # fmt: skip
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert (length, kind) == (13, b"IHDR")
    width, height, depth, color = struct.unpack(">IIBB", data[16:26])
    assert (width, height, depth, color) == (200, 100, 8, 2)
    assert struct.unpack(">I", data[29:33])[0] == zlib.crc32(data[12:29])
    start = data.index(b"IDAT") + 4
    (size,) = struct.unpack(">I", data[start - 8 : start - 4])
    raw = zlib.decompress(data[start : start + size])
    assert len(raw) == height * (1 + width * 3)  # filter byte + RGB per row
    assert data.endswith(b"IEND\xaeB`\x82")
