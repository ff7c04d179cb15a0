"""A bar chart as a PNG with nothing but zlib (benchmarks only: matplotlib and Pillow are not in
the venv, and a plot is not worth a dependency). PNG: RFC 2083 / ISO/IEC 15948 (8-bit RGB,
filter 0 on every row); labels in a 3x5 pixel font, scaled."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

__all__ = ["bar_chart"]

_FONT = {
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111",
    "3": "111001111001111", "4": "101101111001001", "5": "111100111001111",
    "6": "111100111101111", "7": "111001001001001", "8": "111101111101111",
    "9": "111101111001111", " ": "000000000000000", "-": "000000111000000",
    ".": "000000000000010", ":": "000010000010000", "/": "001001010100100",
    "=": "000111000111000", "x": "000101010101000", "h": "100100111101101",
    "m": "000111111101101", "r": "000110100100100", "e": "000111111100111",
    "q": "000111101111001", "p": "000111101111100", "i": "010000010010010",
    "n": "000110101101101", "u": "000101101101111", "t": "010111010010011",
    "a": "000011101101011", "c": "000111100100111", "s": "000011110011110",
    "o": "000111101101111", "d": "001111101101111", "l": "010010010010010",
    "g": "000111101111011", "k": "100101110101101", "b": "100111101101111",
    "f": "011100110100100", "y": "000101111001110", "w": "000101101111111",
    "v": "000101101101010", "(": "001010010010001", ")": "100010010010100",
    ",": "000000000010100", "%": "101001010100101", "_": "000000000000111",
}  # fmt: skip

Color = tuple[int, int, int]


class _Canvas:
    def __init__(self, width: int, height: int) -> None:
        self.width = width
        self.height = height
        self.pixels = bytearray(b"\xff" * (width * height * 3))

    def rect(self, x0: int, y0: int, x1: int, y1: int, color: Color) -> None:
        x0, x1 = max(0, min(x0, x1)), min(self.width, max(x0, x1))
        y0, y1 = max(0, min(y0, y1)), min(self.height, max(y0, y1))
        row = bytes(color) * (x1 - x0)
        for y in range(y0, y1):
            start = (y * self.width + x0) * 3
            self.pixels[start : start + len(row)] = row

    def text(self, x: int, y: int, text: str, scale: int = 2, color: Color = (0, 0, 0)) -> None:
        for i, char in enumerate(text.lower()):
            glyph = _FONT.get(char, _FONT[" "])
            for bit, on in enumerate(glyph):
                if on == "1":
                    gx = x + (i * 4 + bit % 3) * scale
                    gy = y + (bit // 3) * scale
                    self.rect(gx, gy, gx + scale, gy + scale, color)

    def png(self) -> bytes:
        raw = b"".join(
            b"\x00" + bytes(self.pixels[y * self.width * 3 : (y + 1) * self.width * 3])
            for y in range(self.height)
        )

        def chunk(kind: bytes, data: bytes) -> bytes:
            body = kind + data
            return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

        header = struct.pack(">IIBBBBB", self.width, self.height, 8, 2, 0, 0, 0)
        return (
            b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(raw, 9))
            + chunk(b"IEND", b"")
        )


def bar_chart(
    path: Path,
    values: list[int],
    *,
    title: str,
    x_label: str,
    cap_line: float | None = None,
    shaded: tuple[int, int] | None = None,
    width: int = 1000,
    height: int = 420,
) -> None:
    """``values[i]``: the bar of bucket i. ``shaded``: buckets [a, b) drawn behind in grey (an
    outage); ``cap_line``: a horizontal red line at that value."""
    canvas = _Canvas(width, height)
    left, right, top, bottom = 70, 20, 40, 50
    plot_w, plot_h = width - left - right, height - top - bottom
    peak = max([*values, int(cap_line or 0), 1])
    step = _nice_step(peak)
    top_value = step * (-(-peak // step))
    n = max(len(values), 1)
    if shaded is not None:
        x0 = left + shaded[0] * plot_w // n
        x1 = left + shaded[1] * plot_w // n
        canvas.rect(x0, top, x1, top + plot_h, (225, 225, 225))
    for value in range(0, top_value + 1, step):
        y = top + plot_h - value * plot_h // top_value
        canvas.rect(left, y, left + plot_w, y + 1, (200, 200, 200))
        canvas.text(5, y - 5, f"{value:>6}")
    for i, value in enumerate(values):
        x0 = left + i * plot_w // n
        x1 = max(x0 + 1, left + (i + 1) * plot_w // n - (1 if plot_w // n > 3 else 0))
        canvas.rect(x0, top + plot_h - value * plot_h // top_value, x1, top + plot_h, (40, 90, 170))
    if cap_line is not None:
        y = top + plot_h - int(cap_line * plot_h / top_value)
        canvas.rect(left, y, left + plot_w, y + 2, (200, 30, 30))
    canvas.rect(left, top, left + 1, top + plot_h, (0, 0, 0))
    canvas.rect(left, top + plot_h, left + plot_w, top + plot_h + 1, (0, 0, 0))
    ticks = _nice_step(n)
    for i in range(0, n + 1, ticks):
        x = left + i * plot_w // n
        canvas.rect(x, top + plot_h, x + 1, top + plot_h + 6, (0, 0, 0))
        canvas.text(x - 6, top + plot_h + 10, str(i))
    canvas.text(left, 10, title)
    canvas.text(left + plot_w // 2 - len(x_label) * 4, height - 18, x_label)
    path.write_bytes(canvas.png())


def _nice_step(peak: int) -> int:
    for step in (1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000, 2000, 5000, 10000):
        if peak / step <= 8:
            return step
    return 10 ** len(str(peak))
