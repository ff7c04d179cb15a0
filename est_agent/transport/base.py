"""The seam every card link implements: open, transmit bytes, close, hold the card.

A transport moves whole APDUs and nothing else: T=0 GET RESPONSE handling, logical channels and
command meanings live above it (``est_agent.card.channel``), so every link behaves the same.

Every APDU has a deadline. ISO/IEC 7816-3 lets a card stretch an answer without limit by
asking for more time (T=0 NULL procedure bytes, §10.3.3; T=1 S(WTX) blocks, clause 11), so
nothing below the host bounds how long a command may take: a card (or a vpcd peer, a modem)
that never answers would hang the agent forever. ``transmit`` therefore takes ``timeout_s``;
None means the link's ``timeout_s`` (10 s: seconds beyond anything a SIM needs for a READ or
a signature), and the channel layer asks for ``slow_timeout_s`` (60 s) for commands a real
SIM takes seconds for (GSMA IoT.05 GENERATE KEY PAIR). A link that misses a deadline raises
``TransportError`` naming the INS and the limit and is marked dead: a late answer would
otherwise be taken for the answer to the next command, so every later APDU fails fast until
``close()``.

``transaction()`` holds the card for this process across several APDUs (the resource manager's
SCardBeginTransaction / SCardEndTransaction of PC/SC Part 5); links that no other client can
reach make it a no-op.

Reader-string options shared by the links (``?timeout=S&keygen_timeout=S``) are parsed by
``parse_link_options``.
"""

from __future__ import annotations

import abc
import contextlib
import time
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from typing import Self
from urllib.parse import parse_qsl

from est_agent.closing import Closing
from est_agent.errors import TransportError, UsageError

__all__ = [
    "DEFAULT_BUSY_TIMEOUT_S",
    "DEFAULT_SLOW_TIMEOUT_S",
    "DEFAULT_TIMEOUT_S",
    "CardTransport",
    "LinkOptions",
    "LinkStats",
    "parse_link_options",
    "split_reader_query",
]

#: per APDU: reads, selections and ECDSA signatures take well under a second on a real SIM
DEFAULT_TIMEOUT_S = 10.0
#: per slow APDU (key generation): an ECC key pair takes a real SIM several seconds
DEFAULT_SLOW_TIMEOUT_S = 60.0
#: how long ``transaction()`` waits for a card another client holds
DEFAULT_BUSY_TIMEOUT_S = 10.0
#: upper bound of every configurable wait: longer is a typo, not a slow card
MAX_TIMEOUT_S = 600.0


@dataclass
class LinkStats:
    """What crossed the card link; real SIM links cost tens of ms per APDU, so count them."""

    apdus: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    seconds: float = 0.0

    @property
    def bytes_total(self) -> int:
        return self.bytes_sent + self.bytes_received


@dataclass(frozen=True)
class LinkOptions:
    """The deadlines of one link (reader-string options ``timeout``, ``keygen_timeout``,
    ``busy_timeout``), and the link-specific options left over for the link to read."""

    timeout_s: float = DEFAULT_TIMEOUT_S
    slow_timeout_s: float = DEFAULT_SLOW_TIMEOUT_S
    busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S
    extra: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        for name in ("timeout_s", "slow_timeout_s", "busy_timeout_s"):
            _check_seconds(name, getattr(self, name))

    def get(self, key: str) -> str | None:
        """The last value given for a link-specific option."""
        found = [value for name, value in self.extra if name == key]
        return found[-1] if found else None


def _check_seconds(name: str, value: float) -> None:
    if not 0 < value <= MAX_TIMEOUT_S:
        raise UsageError(f"{name} must be > 0 and <= {MAX_TIMEOUT_S:g} s, got {value!r}")


def split_reader_query(rest: str) -> tuple[str, str]:
    """``NAME?k=v&k=v`` -> (``NAME``, ``k=v&k=v``); a ``?`` not followed by options stays.

    Reader names and paths rarely contain ``?``; when they do, what follows the last ``?`` is
    taken as options only if it has the ``key=value`` form.
    """
    head, sep, query = rest.rpartition("?")
    if not sep or "=" not in query:
        return rest, ""
    return head, query


_TIMEOUT_KEYS = {"timeout": "timeout_s", "keygen_timeout": "slow_timeout_s"}


def parse_link_options(
    scheme: str,
    query: str,
    *,
    extra_keys: Collection[str] = (),
    busy: bool = False,
    default_timeout_s: float = DEFAULT_TIMEOUT_S,
) -> LinkOptions:
    """Parse ``timeout=S&keygen_timeout=S`` (+ ``busy_timeout=S`` when ``busy``) and the
    link-specific ``extra_keys``, kept as text in ``LinkOptions.extra``.

    UsageError names the scheme and the bad option.
    """
    allowed = dict(_TIMEOUT_KEYS)
    if busy:
        allowed["busy_timeout"] = "busy_timeout_s"
    seconds: dict[str, float] = {}
    extra: list[tuple[str, str]] = []
    if not query:
        return LinkOptions(timeout_s=default_timeout_s)
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True)
    except ValueError:
        raise UsageError(f"{scheme}: options must be key=value&key=value, got {query!r}") from None
    for key, value in pairs:
        if key in allowed:
            try:
                number = float(value)
            except ValueError:
                raise UsageError(f"{scheme}: bad {key} {value!r} (seconds)") from None
            if not 0 < number <= MAX_TIMEOUT_S:
                raise UsageError(
                    f"{scheme}: bad {key} {value!r} (seconds, > 0 and <= {MAX_TIMEOUT_S:g})"
                )
            seconds[allowed[key]] = number
        elif key in extra_keys:
            extra.append((key, value))
        else:
            known = ", ".join(sorted([*allowed, *extra_keys]))
            raise UsageError(f"{scheme}: unknown option {key!r} ({known})")
    return LinkOptions(
        timeout_s=seconds.get("timeout_s", default_timeout_s),
        slow_timeout_s=seconds.get("slow_timeout_s", DEFAULT_SLOW_TIMEOUT_S),
        busy_timeout_s=seconds.get("busy_timeout_s", DEFAULT_BUSY_TIMEOUT_S),
        extra=tuple(extra),
    )


def _ins_of(apdu: bytes) -> str:
    return f"INS {apdu[1]:02X}" if len(apdu) > 1 else "a malformed APDU"


class CardTransport(Closing):
    """A connection to one card. Subclasses implement ``_connect``, ``_transmit``, ``_close``.

    Links that can block (a socket, a serial port, pcscd) override ``_transmit_within`` and
    keep its deadline; ``_transmit`` alone is for links that answer at once (test doubles).
    """

    def __init__(
        self,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        slow_timeout_s: float = DEFAULT_SLOW_TIMEOUT_S,
        busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S,
    ) -> None:
        for name, value in (
            ("timeout_s", timeout_s),
            ("slow_timeout_s", slow_timeout_s),
            ("busy_timeout_s", busy_timeout_s),
        ):
            _check_seconds(name, value)
        self.stats = LinkStats()
        self.timeout_s = timeout_s
        self._slow_timeout_s = slow_timeout_s
        self.busy_timeout_s = busy_timeout_s
        self._connected = False
        self._dead: str | None = None
        self._transaction_depth = 0

    @property
    @abc.abstractmethod
    def description(self) -> str:
        """Human-readable name of the link (reader name, port, state file)."""

    @property
    def atr(self) -> bytes:
        """The card's answer-to-reset, where the link knows it."""
        return b""

    @property
    def slow_timeout_s(self) -> float:
        """Deadline for commands a card takes seconds for; never shorter than ``timeout_s``."""
        return max(self._slow_timeout_s, self.timeout_s)

    @property
    def dead(self) -> str | None:
        """Why the link is unusable until closed (a missed deadline), or None."""
        return self._dead

    def connect(self) -> None:
        if not self._connected:
            self._connect()
            self._connected = True

    def transmit(self, apdu: bytes, *, timeout_s: float | None = None) -> bytes:
        """Send one command APDU; return the response APDU (data followed by SW1 SW2).

        ``timeout_s``: how long to wait for the answer (default ``self.timeout_s``); past it
        the link raises ``TransportError`` and stays dead until closed.
        """
        if self._dead is not None:
            # The first failure is what the user must see, also when this refusal is what
            # reaches them (a channel closed in a ``finally`` after the timeout, say).
            raise TransportError(f"{self._dead}; link not used after that earlier failure")
        limit = self.timeout_s if timeout_s is None else timeout_s
        _check_seconds("timeout_s", limit)
        if not self._connected:
            self.connect()
        started = time.perf_counter()
        response = self._transmit_within(apdu, limit)
        self.stats.seconds += time.perf_counter() - started
        self.stats.apdus += 1
        self.stats.bytes_sent += len(apdu)
        self.stats.bytes_received += len(response)
        return response

    def timed_out(self, apdu: bytes, limit: float, detail: str = "") -> TransportError:
        """Mark the link dead and build the error for an APDU not answered within ``limit``."""
        hint = detail or "the card is silent or hung; if it is only slow, raise ?timeout="
        error = TransportError(
            f"{self.description}: no answer to {_ins_of(apdu)} within {limit:g} s ({hint})"
        )
        self._dead = str(error)
        return error

    def mark_dead(self, reason: str) -> None:
        """Refuse every later APDU until ``close()`` (the dialogue is out of step); ``reason``
        is repeated in each refusal, so it should name the link."""
        self._dead = reason

    @contextlib.contextmanager
    def transaction(self, *, timeout_s: float | None = None) -> Iterator[None]:
        """Hold the card for this process while the block runs (nested blocks: the outermost).

        Waits at most ``timeout_s`` (default ``busy_timeout_s``) for a card another client
        holds, then raises ``ReaderError``. A no-op on links nobody else can reach.
        """
        limit = self.busy_timeout_s if timeout_s is None else timeout_s
        _check_seconds("timeout_s", limit)
        if self._dead is not None:
            raise TransportError(f"{self._dead}; link not used after that earlier failure")
        self.connect()
        if self._transaction_depth == 0:
            self._begin_transaction(limit)
        self._transaction_depth += 1
        try:
            yield
        finally:
            self._transaction_depth -= 1
            if self._transaction_depth == 0 and self._connected:
                self._end_transaction()

    def close(self) -> None:
        self._transaction_depth = 0
        if self._connected:
            self._connected = False
            self._close()
        self._dead = None

    def __enter__(self) -> Self:
        """Connected inside a ``with`` block, closed after it (``Closing``)."""
        self.connect()
        return self

    @abc.abstractmethod
    def _connect(self) -> None: ...

    @abc.abstractmethod
    def _transmit(self, apdu: bytes) -> bytes: ...

    def _transmit_within(self, apdu: bytes, timeout_s: float) -> bytes:
        """``_transmit`` with a deadline; links that can block override this."""
        return self._transmit(apdu)

    def _begin_transaction(self, timeout_s: float) -> None:  # an optional hook
        """Take the card for this process (bounded by ``timeout_s``); default: nothing to do."""

    def _end_transaction(self) -> None:  # an optional hook
        """Give the card back, leaving it powered; never raises (the block's outcome counts)."""

    @abc.abstractmethod
    def _close(self) -> None: ...
