"""The virtual SIM as a card link inside this process (reader string ``sim:<state file>``).

Options: ``sim:<state file>?faults=FILE&timeout=S&keygen_timeout=S&apdu_ms=MS&keygen_ms=MS&
sign_ms=MS``. The ``*_ms`` options give the card a real card's speed (``est_agent.sim.latency``:
per APDU, and for GENERATE KEY PAIR and the signing COMPUTE SIGNATURE UPDATE). ``faults`` loads a
fault plan (``est_agent.sim.faults``; a relative FILE is taken from the state file's
directory, so a configuration can name both side by side). The timeouts behave as on the
real links: a card that answers later than the APDU's deadline (a ``delay_ms`` or
``silence`` fault) costs exactly the deadline and then ``TransportError``; a ``disconnect``
fault is a card pulled out of the reader (``NoCardError`` until the link is opened again).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from est_agent.errors import NoCardError, UsageError
from est_agent.sim.card import VirtualCard
from est_agent.sim.faults import FaultPlan, LinkFault
from est_agent.sim.latency import CardTiming
from est_agent.sim.options import CardOptions
from est_agent.transport.base import (
    DEFAULT_SLOW_TIMEOUT_S,
    DEFAULT_TIMEOUT_S,
    CardTransport,
    parse_link_options,
    split_reader_query,
)

__all__ = ["SimTransport"]

_TIMING_KEYS = ("apdu_ms", "keygen_ms", "sign_ms")


def _timing(get: Callable[[str], str | None]) -> CardTiming:
    """The ``apdu_ms``/``keygen_ms``/``sign_ms`` reader options (UsageError on a bad one)."""
    values: dict[str, float] = {}
    for key in _TIMING_KEYS:
        text = get(key)
        if text is None:
            continue
        try:
            values[key] = float(text)
        except ValueError:
            raise UsageError(f"sim: bad {key} {text!r} (milliseconds)") from None
    return CardTiming(**values)


class SimTransport(CardTransport):
    """Moves APDUs to a ``VirtualCard`` by function call.

    Given a path, the card is loaded on ``connect`` (so building the transport touches no file)
    and every state change is written back to that file. Connecting powers the card on, as
    inserting it into a reader would. ``faults`` (a plan, or the path of a faults file read on
    connect) only goes with a path: a card object brings its own.
    """

    def __init__(
        self,
        card: VirtualCard | str | os.PathLike[str],
        options: CardOptions = CardOptions(),  # noqa: B008 - frozen, so a shared default is safe
        *,
        faults: FaultPlan | Path | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        slow_timeout_s: float = DEFAULT_SLOW_TIMEOUT_S,
        timing: CardTiming = CardTiming(),  # noqa: B008 - frozen
    ) -> None:
        super().__init__(timeout_s=timeout_s, slow_timeout_s=slow_timeout_s)
        self._options = options
        self._timing = timing
        self._faults = faults
        self._removed = False
        if isinstance(card, VirtualCard):
            if faults is not None:
                raise UsageError("faults go with a state file; give the VirtualCard its own")
            self._card: VirtualCard | None = card
            self._path = card.state_path
        else:
            self._card = None
            self._path = Path(os.fspath(card))

    @classmethod
    def from_reader(cls, rest: str) -> SimTransport:
        """``<state file>[?faults=FILE&timeout=S&keygen_timeout=S&apdu_ms=MS...]`` (module
        docstring)."""
        path_text, query = split_reader_query(rest)
        if not path_text:
            raise UsageError("sim: needs the virtual SIM's state file, e.g. sim:/var/lib/sim.json")
        options = parse_link_options("sim", query, extra_keys=("faults", *_TIMING_KEYS))
        path = Path(path_text)
        faults: Path | None = None
        faults_text = options.get("faults")
        if faults_text is not None:
            if not faults_text:
                raise UsageError("sim: faults= needs a file")
            faults = Path(faults_text)
            if not faults.is_absolute():
                faults = path.parent / faults
        return cls(
            path,
            faults=faults,
            timeout_s=options.timeout_s,
            slow_timeout_s=options.slow_timeout_s,
            timing=_timing(options.get),
        )

    @property
    def card(self) -> VirtualCard | None:
        """The card, once loaded."""
        return self._card

    @property
    def description(self) -> str:
        return f"virtual SIM {self._path}" if self._path is not None else "virtual SIM (in memory)"

    @property
    def atr(self) -> bytes:
        return b"" if self._card is None else self._card.atr

    def _connect(self) -> None:
        if self._card is None:
            assert self._path is not None
            plan = FaultPlan.load(self._faults) if isinstance(self._faults, Path) else self._faults
            self._card = VirtualCard.load(self._path, self._options, faults=plan)
        self._removed = False
        self._card.power_on()

    def _transmit(self, apdu: bytes) -> bytes:
        return self._transmit_within(apdu, self.timeout_s)

    def _transmit_within(self, apdu: bytes, timeout_s: float) -> bytes:
        assert self._card is not None  # CardTransport.transmit connects first
        if self._removed:
            raise NoCardError(f"{self.description}: card removed (disconnect fault)")
        answer = self._card.answer(apdu)
        wait = answer.delay_s
        if self._timing and answer.link is None:
            wait += self._timing.seconds(apdu, answer.response)
        if answer.link is LinkFault.SILENCE or wait > timeout_s:
            # A silent card costs a real link its whole deadline: so it does here.
            time.sleep(timeout_s)
            raise self.timed_out(apdu, timeout_s)
        if wait:
            time.sleep(wait)
        if answer.link is LinkFault.DISCONNECT:
            self._removed = True
            ins = f"INS {apdu[1]:02X}" if len(apdu) > 1 else "a command"
            raise NoCardError(f"{self.description}: card removed during {ins} (disconnect fault)")
        return answer.response

    def _close(self) -> None:
        # Nothing to release; the card keeps its memory, volatile state goes at the next connect.
        pass
