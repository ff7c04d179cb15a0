"""Card work alongside network waits, and what the agent remembers about the card's answers.

``in_background`` runs one card operation (GENERATE KEY PAIR: 0.3-1 s on real SIMs, GSMA IoT.05
§4.2.6) in a worker thread while the main thread waits on the network (GET /csrattrs, RFC 7030
§4.5), so the card is busy while the link is. The card stays one device: ``CardSession``
serialises every transaction between the threads (card/channel.py), so the worker's APDUs and
any card use of the main thread (a TLS reconnect's CertificateVerify) never interleave. The
result is taken with ``CardWork.result``, which re-raises the worker's typed error in the main
thread; ``CardWork.wait`` is called on every way out, so no card operation outlives the step
that started it (the session closes the channels after it).

``apply_card_facts`` / ``learned_card_facts``: the host state remembers that the card refused
to open a logical channel by SELECT (6881, ISO/IEC 7816-4 §5.5.2), so later runs go straight to
MANAGE CHANNEL instead of paying the refused SELECT every time.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

from est_agent.errors import TransportError
from est_agent.workflow.hoststate import HostState

__all__ = ["CardWork", "apply_card_facts", "in_background", "learned_card_facts"]

T = TypeVar("T")

#: beyond the transport's own deadline for a slow command (which ends the worker's APDU with a
#: TransportError): the join never blocks forever even if a transport ignores its deadline
_JOIN_MARGIN_S = 5.0


class CardWork(Generic[T]):
    """One card operation running in a daemon thread; ``result`` joins it."""

    def __init__(
        self,
        work: Callable[[], T],
        *,
        name: str,
        deadline_s: float,
        margin_s: float = _JOIN_MARGIN_S,
    ) -> None:
        self._work = work
        self._deadline_s = deadline_s + margin_s
        self._value: T | None = None
        self._error: BaseException | None = None
        self._done = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._value = self._work()
        except BaseException as exc:  # re-raised in the main thread by result()
            self._error = exc
        finally:
            self._done = True

    def wait(self) -> bool:
        """Join the worker (bounded); True once it has finished."""
        self._thread.join(self._deadline_s)
        return self._done

    def result(self) -> T:
        if not self.wait():
            raise TransportError(
                f"{self._thread.name}: the card did not finish within {self._deadline_s:.0f} s"
            )
        if self._error is not None:
            raise self._error
        assert self._value is not None
        return self._value


def in_background(work: Callable[[], T], *, name: str, deadline_s: float) -> CardWork[T]:
    """Start ``work`` (card access only) in a worker thread."""
    return CardWork(work, name=name, deadline_s=deadline_s)


def apply_card_facts(backend: object, state: HostState) -> None:
    """Before the card is used: no implicit channel opening on a card that refused it."""
    if state.implicit_channel_refused and hasattr(backend, "implicit_channel"):
        backend.implicit_channel = False


def learned_card_facts(backend: object, state: HostState) -> HostState | None:
    """After the run: the state to save if the card taught something new, else None."""
    if getattr(backend, "implicit_channel_refused", False) and not state.implicit_channel_refused:
        return dataclasses.replace(state, implicit_channel_refused=True)
    return None
