"""Time a real card takes, added to the virtual SIM's answers (benchmarks of a realistic link).

A real SIM answers in tens of milliseconds per APDU over PC/SC, generates an EC key pair in
up to about a second and computes an ECDSA signature in 100-300 ms; the virtual card answers
in microseconds. ``CardTiming`` says how long each command takes; ``TimedCard`` wraps a card
so that every link (in process, vpcd, the emulated modem) acts the time out as it acts out a
``delay_ms`` fault: by ``CardAnswer.delay_s``, before the answer is delivered. The time is
card time: a link's deadline covers it (a GENERATE KEY PAIR slower than ``keygen_timeout``
times out as on a real reader).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from est_agent.card.iotsafe_codes import INS_GENERATE_KEY_PAIR, INS_SIGN_UPDATE, P1_LAST_BLOCK
from est_agent.errors import UsageError
from est_agent.sim.faults import CardAnswer, answer_of

if TYPE_CHECKING:
    from est_agent.sim.faults import _ProcessingCard

__all__ = ["CardTiming", "TimedCard"]

_MAX_MS = 60_000.0
_SW_OK = b"\x90\x00"


@dataclass(frozen=True)
class CardTiming:
    """Milliseconds a card spends: on every APDU, and on top of that on the two slow commands.

    ``keygen_ms``: GENERATE KEY PAIR (GSMA IoT.05, INS B9). ``sign_ms``: the COMPUTE SIGNATURE
    UPDATE that carries the last block (P1 bit 8 set, IoT.05 §3.5), where the card signs; the
    INIT and intermediate UPDATEs cost ``apdu_ms`` only. Only successful answers (9000) pay
    the command time: a refused command does no cryptography.
    """

    apdu_ms: float = 0.0
    keygen_ms: float = 0.0
    sign_ms: float = 0.0

    def __post_init__(self) -> None:
        for name in ("apdu_ms", "keygen_ms", "sign_ms"):
            value = getattr(self, name)
            if not 0 <= value <= _MAX_MS:
                raise UsageError(f"card {name} must be 0..{_MAX_MS:g} ms, got {value:g}")

    def __bool__(self) -> bool:
        return bool(self.apdu_ms or self.keygen_ms or self.sign_ms)

    def seconds(self, apdu: bytes, response: bytes) -> float:
        """The time the card takes for ``apdu`` answered by ``response``."""
        ms = self.apdu_ms
        if len(apdu) >= 4 and response.endswith(_SW_OK):
            ins, p1 = apdu[1], apdu[2]
            if ins == INS_GENERATE_KEY_PAIR:
                ms += self.keygen_ms
            elif ins == INS_SIGN_UPDATE and p1 & P1_LAST_BLOCK:
                ms += self.sign_ms
        return ms / 1000.0


class TimedCard:
    """``card`` answering after the time ``timing`` gives each command.

    Everything else (ATR, power on/reset, state, the APDU observer) is the wrapped card's.
    """

    def __init__(self, card: _ProcessingCard, timing: CardTiming) -> None:
        self.card = card
        self.timing = timing

    def answer(self, apdu: bytes) -> CardAnswer:
        answer = answer_of(self.card, apdu)
        extra = self.timing.seconds(apdu, answer.response) if answer.link is None else 0.0
        return replace(answer, delay_s=answer.delay_s + extra) if extra else answer

    def process(self, apdu: bytes) -> bytes:
        """As ``VirtualCard.process``: sleeps the answer's time, raises on a link fault."""
        return self.answer(apdu).act_out(apdu)

    def __getattr__(self, name: str) -> object:
        # atr, power_on, reset, state, on_apdu, ...: the wrapped card's own
        return getattr(self.card, name)
