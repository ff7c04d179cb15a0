"""What the virtual card reports about each APDU, and a JSON-lines trace file of it.

Events carry header bytes, lengths, the status word and timing, never payloads: APDUs carry
digests, signatures and certificates, and a trace is something people attach to bug reports.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol, runtime_checkable

from est_agent.closing import Closing

__all__ = ["ApduEvent", "ApduObserver", "ObservableCard", "TraceWriter", "attach_trace"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ApduEvent:
    """One command and its answer. ``channel`` is None when the CLA names no channel."""

    channel: int | None
    cla: int
    ins: int
    p1: int
    p2: int
    lc: int
    le: int | None
    response_len: int  # response data bytes, SW excluded
    sw: int
    duration_s: float


ApduObserver = Callable[[ApduEvent], None]


@runtime_checkable
class ObservableCard(Protocol):
    on_apdu: ApduObserver | None


class TraceWriter(Closing):
    """Appends one JSON object per event to a file; usable as a card's ``on_apdu``."""

    def __init__(
        self, path: str | os.PathLike[str], *, clock: Callable[[], datetime] | None = None
    ) -> None:
        self.path = Path(os.fspath(path))
        self._clock = clock or (lambda: datetime.now(UTC))
        # the file stays open until close(): one line per APDU, flushed each time
        self._file = self.path.open("a", encoding="utf-8")

    def __call__(self, event: ApduEvent) -> None:
        record = {
            "time": self._clock().isoformat(timespec="milliseconds"),
            "channel": event.channel,
            "cla": f"{event.cla:02X}",
            "ins": f"{event.ins:02X}",
            "p1": f"{event.p1:02X}",
            "p2": f"{event.p2:02X}",
            "lc": event.lc,
            "le": event.le,
            "response_len": event.response_len,
            "sw": f"{event.sw:04X}",
            "duration_s": round(event.duration_s, 6),
        }
        self._file.write(json.dumps(record, separators=(",", ":")) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()



def attach_trace(card: object, path: str | os.PathLike[str]) -> TraceWriter:
    """Trace ``card``'s APDUs to ``path`` (after any observer it already has); close when done."""
    if not isinstance(card, ObservableCard):
        # A builtin on purpose: only code passes a card here (the CLI always a VirtualCard),
        # so a card without ``on_apdu`` is a programming error, reported as a bug (exit 70).
        raise TypeError(f"{type(card).__name__} does not report APDUs (no on_apdu)")
    writer = TraceWriter(path)
    previous = card.on_apdu
    if previous is None:
        card.on_apdu = writer
    else:

        def both(event: ApduEvent) -> None:
            previous(event)
            writer(event)

        card.on_apdu = both
    return writer
