"""PC/SC readers through pyscard (pcsc-lite on Linux).

pyscard's low-level ``smartcard.scard`` calls are used rather than its ``CardConnection``
classes: those power the card off on ``disconnect()`` and in ``__del__`` by default (resetting
every other connection to the card, 0x80100068) and raise from destructors. Here the card is
always left as it is (``SCARD_LEAVE_CARD``) and nothing happens at garbage collection.

Each failing call's PC/SC code (``hresult``) is mapped to one of our errors, chained from a
pyscard ``SmartcardException`` carrying the code, so ``exc.__cause__.hresult`` tells exactly what
PC/SC said. pyscard is imported inside the functions: the CLI should start without loading it.

``_transmit`` is raw: 61xx / 6Cxx handling is the channel layer's job (``est_agent.card.channel``).

Deadlines. pcsc-lite cannot interrupt a call in progress: ``SCardCancel`` only ends
``SCardGetStatusChange``, and the client library holds the context's mutex for the whole of
``SCardTransmit``, so ``SCardDisconnect`` from another thread waits for it too. vsmartcard's
vpcd reads the card's answer with a blocking ``recv`` and no timeout. So every PC/SC call of a
connection runs on that connection's own daemon thread (``_Worker``; pyscard releases the GIL
around each call) and the caller waits with the deadline. A call that misses it is abandoned:
the link is marked dead, its release is queued behind the stuck call (it runs if the call ever
returns), and nothing joins the thread, so the process exits normally.

Transactions (``transaction()``): ``SCardBeginTransaction`` / ``SCardEndTransaction
(SCARD_LEAVE_CARD)`` around a card session, so two agents (or any PC/SC client) sharing the
reader cannot interleave APDUs. pcsc-lite's ``SCardBeginTransaction`` polls pcscd every 100 ms
for as long as another handle holds the card; it releases the context mutex between polls, so
a begin that misses its deadline is ended by disconnecting the handle (the loop then returns
SCARD_E_INVALID_HANDLE; a lock won in that instant goes with the handle). The client is put in
pcsc-lite's non-blocking mode (``PCSCLITE_NO_BLOCKING``, read at the first context of the
process) so that a transmit or status call meeting another client's transaction answers
SCARD_E_SHARING_VIOLATION at once instead of waiting without bound: transmits retry that until
their deadline, then report the card busy.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Generic, TypeVar

from est_agent.errors import CardProtocolError, NoCardError, ReaderError, TransportError
from est_agent.transport.base import (
    DEFAULT_BUSY_TIMEOUT_S,
    DEFAULT_SLOW_TIMEOUT_S,
    DEFAULT_TIMEOUT_S,
    CardTransport,
    parse_link_options,
    split_reader_query,
)

__all__ = ["PcscTransport", "atr_protocols", "list_readers"]

log = logging.getLogger(__name__)

# PC/SC result codes (winscard.h / pcsclite.h) grouped by what the caller should do.
_SERVICE_GONE = {
    0x8010001D: "SCARD_E_NO_SERVICE",
    0x8010001E: "SCARD_E_SERVICE_STOPPED",
    0x80100003: "SCARD_E_INVALID_HANDLE",  # handle from a pcscd that has since restarted
}
_NO_CARD = {
    0x8010000C: "SCARD_E_NO_SMARTCARD",
    0x80100069: "SCARD_W_REMOVED_CARD",
    0x80100067: "SCARD_W_UNPOWERED_CARD",
    0x80100066: "SCARD_W_UNRESPONSIVE_CARD",
    # pcsc-lite's answer when the card went away during the exchange itself (vpcd card killed)
    0x80100016: "SCARD_E_NOT_TRANSACTED",
    0x80100068: "SCARD_W_RESET_CARD",  # someone reset it: channels and sessions are gone
}
_READER = {
    0x8010002E: "SCARD_E_NO_READERS_AVAILABLE",
    0x80100009: "SCARD_E_UNKNOWN_READER",
    0x80100017: "SCARD_E_READER_UNAVAILABLE",
    0x8010000B: "SCARD_E_SHARING_VIOLATION",
    0x8010000A: "SCARD_E_TIMEOUT",
}
_OTHER = {
    0x8010000F: "SCARD_E_PROTO_MISMATCH",
    0x80100008: "SCARD_E_INSUFFICIENT_BUFFER",
    0x80100001: "SCARD_F_INTERNAL_ERROR",
    0x80100006: "SCARD_E_NO_MEMORY",
}
_T_GLOBAL = 15  # "T=15" in a TD byte announces global interface bytes, not a protocol
_SHARING_VIOLATION = 0x8010000B
#: pcsc-lite's own poll period for a held card (PCSCLITE_LOCK_POLL_RATE, 100 ms)
_BUSY_POLL_S = 0.1
#: how long closing and abandoning wait for pcscd before leaving it to the worker thread
_RELEASE_WAIT_S = 2.0
_NO_BLOCKING_ENV = "PCSCLITE_NO_BLOCKING"


def _scard() -> ModuleType:
    """pyscard's ``smartcard.scard``, without running ``smartcard/__init__.py`` first.

    That ``__init__`` imports the high-level Session/System/CardConnection layers (threading,
    observers, reader factories: 24 modules instead of 5, ~2-4 ms and ~0.25 MiB) that this
    module never uses. The package object is created unexecuted (the approach of
    est/tls/tlslite_adapter.py's ``_import_tlslite_core``); its ``__init__`` still runs, in
    place, the first time anything else reads an attribute of the package (``from smartcard
    import Session``).
    """
    import sys

    # Before the process's first context (libpcsclite reads it once): see the module docstring.
    os.environ.setdefault(_NO_BLOCKING_ENV, "1")
    if "smartcard" not in sys.modules:
        import importlib.util

        spec = importlib.util.find_spec("smartcard")
        if spec is not None and spec.loader is not None and spec.submodule_search_locations:
            package = importlib.util.module_from_spec(spec)
            loader = spec.loader

            def complete(name: str) -> Any:
                del package.__dict__["__getattr__"]
                loader.exec_module(package)
                return getattr(package, name)

            package.__dict__["__getattr__"] = complete
            sys.modules["smartcard"] = package
    import smartcard.scard

    module: ModuleType = smartcard.scard
    return module


def _code_name(hresult: int) -> str:
    code = hresult & 0xFFFFFFFF
    for table in (_SERVICE_GONE, _NO_CARD, _READER, _OTHER):
        if code in table:
            return f"{table[code]} 0x{code:08X}"
    return f"0x{code:08X}"


def _raise_for(hresult: int, action: str, reader: str | None = None) -> None:
    """Raise the typed error for a failed PC/SC call; return silently on success."""
    scard = _scard()
    if hresult == scard.SCARD_S_SUCCESS:
        return
    from smartcard.Exceptions import SmartcardException

    cause = SmartcardException(message=action, hresult=hresult)
    code = hresult & 0xFFFFFFFF
    detail = _code_name(hresult)
    where = f" in reader {reader!r}" if reader else ""
    error: TransportError
    if code in _SERVICE_GONE:
        error = ReaderError(
            f"PC/SC service not available ({detail}) during {action}: is pcscd running?"
        )
    elif code in _NO_CARD:
        error = NoCardError(
            f"no card{where}, or it was removed or reset during {action} ({detail})"
        )
    elif code == _SHARING_VIOLATION:
        error = ReaderError(
            f"card{where} busy during {action}: another PC/SC client holds it ({detail})"
        )
    elif code in _READER:
        error = ReaderError(f"reader problem{where} during {action} ({detail})")
    else:
        error = TransportError(f"PC/SC error{where} during {action} ({detail})")
    raise error from cause


def atr_protocols(atr: bytes) -> frozenset[int]:
    """Transmission protocols an ATR offers (ISO/IEC 7816-3 §8.2.3): T of each TDi; no TD1 = T=0."""
    offered: set[int] = set()
    if len(atr) < 2:
        return frozenset()
    indicator = atr[1] >> 4  # Y1: which of TA1 TB1 TC1 TD1 follow T0
    pos = 2
    while indicator & 0x8:
        pos += bin(indicator & 0x7).count("1")  # skip TAi, TBi, TCi
        if pos >= len(atr):
            break
        td = atr[pos]
        pos += 1
        if td & 0x0F != _T_GLOBAL:
            offered.add(td & 0x0F)
        indicator = td >> 4
    return frozenset(offered or {0})


def _establish() -> Any:
    scard = _scard()
    hresult, context = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
    _raise_for(hresult, "establishing a PC/SC context")
    return context


def _readers(context: Any) -> list[str]:
    scard = _scard()
    hresult, readers = scard.SCardListReaders(context, [])
    if hresult & 0xFFFFFFFF == 0x8010002E:  # none at all is an answer here, not a failure
        return []
    _raise_for(hresult, "listing readers")
    return [str(name) for name in readers]


def _reader_states(context: Any, readers: list[str]) -> list[tuple[str, int, bytes]]:
    """(name, state bits, ATR) of each reader, without waiting."""
    scard = _scard()
    hresult, states = scard.SCardGetStatusChange(
        context, 0, [(name, scard.SCARD_STATE_UNAWARE) for name in readers]
    )
    _raise_for(hresult, "querying reader states")
    return [(str(name), int(state), bytes(atr)) for name, state, atr in states]


def _has_card(state: int) -> bool:
    scard = _scard()
    return bool(state & scard.SCARD_STATE_PRESENT) and not state & scard.SCARD_STATE_MUTE


def list_readers() -> list[str]:
    """Names of the PC/SC readers pcscd knows (empty if none); ReaderError if no service."""
    scard = _scard()
    context = _establish()
    try:
        return _readers(context)
    finally:
        scard.SCardReleaseContext(context)


_R = TypeVar("_R")


class _LateError(Exception):
    """A worker call did not finish within its deadline (internal; never leaves this module)."""


class _Job(Generic[_R]):
    __slots__ = ("done", "error", "fn", "result")

    def __init__(self, fn: Callable[[], _R]) -> None:
        self.fn = fn
        self.done = threading.Event()
        self.result: _R | None = None
        self.error: BaseException | None = None


class _Worker:
    """The daemon thread making one connection's PC/SC calls (module docstring)."""

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue[_Job[Any] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def call(self, fn: Callable[[], _R], timeout_s: float) -> _R:
        """Run ``fn`` on the thread; its result or exception, or ``_LateError`` after the
        deadline (``fn`` then goes on running there)."""
        job: _Job[_R] = _Job(fn)
        self._jobs.put(job)
        if not job.done.wait(timeout_s):
            raise _LateError
        if job.error is not None:
            raise job.error
        return job.result  # type: ignore[return-value]  # set when fn returned

    def post(self, fn: Callable[[], object]) -> None:
        """Queue ``fn`` without waiting (it runs after whatever is running now)."""
        self._jobs.put(_Job(fn))

    def stop(self) -> None:
        """End the thread after the queued jobs."""
        self._jobs.put(None)

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                job.result = job.fn()
            except BaseException as exc:  # handed to the caller; never an unhandled thread error
                job.error = exc
            finally:
                job.done.set()


@dataclass
class _Link:
    """The handles of one connection (owned by its worker thread once abandoned)."""

    context: Any
    card: Any = None
    reader: str = ""
    protocol: int = 0
    atr: bytes = b""


def _release_link(link: _Link) -> None:
    """Disconnect leaving the card powered, release the context; never raise.

    Closing follows a failure as often as not (card gone, pcscd gone): the error that matters
    has already been raised, so failures here are only logged.
    """
    scard = _scard()
    if link.card is not None:
        hresult = scard.SCardDisconnect(link.card, scard.SCARD_LEAVE_CARD)
        if hresult != scard.SCARD_S_SUCCESS:
            log.debug("SCardDisconnect: %s", _code_name(hresult))
        link.card = None
    if link.context is not None:
        hresult = scard.SCardReleaseContext(link.context)
        if hresult != scard.SCARD_S_SUCCESS:
            log.debug("SCardReleaseContext: %s", _code_name(hresult))
        link.context = None


def _choose_reader(context: Any, wanted: str | None) -> tuple[str, bytes]:
    readers = _readers(context)
    if wanted is not None:
        if wanted not in readers:
            listed = ", ".join(repr(r) for r in readers) or "none"
            raise ReaderError(f"no reader named {wanted!r}; available: {listed}")
        ((_name, _state, atr),) = _reader_states(context, [wanted])
        return wanted, atr
    if not readers:
        raise ReaderError("no PC/SC readers available")
    states = _reader_states(context, readers)
    for name, state, atr in states:
        if _has_card(state):
            return name, atr
    listed = ", ".join(repr(name) for name, _s, _a in states)
    raise NoCardError(f"no card in any reader ({listed})")


def _open_link(wanted: str | None) -> _Link:
    """Context, reader, card handle and ATR (runs on the worker thread)."""
    scard = _scard()
    link = _Link(_establish())
    try:
        reader, atr = _choose_reader(link.context, wanted)
        offered = atr_protocols(atr)
        if 1 in offered:
            protocols = scard.SCARD_PROTOCOL_T1
        elif offered:
            protocols = scard.SCARD_PROTOCOL_T0
        else:  # no ATR yet (card still powering up): let pcscd negotiate
            protocols = scard.SCARD_PROTOCOL_T0 | scard.SCARD_PROTOCOL_T1
        hresult, card, active = scard.SCardConnect(
            link.context, reader, scard.SCARD_SHARE_SHARED, protocols
        )
        _raise_for(hresult, "connecting to the card", reader)
        link.card, link.protocol, link.reader, link.atr = card, int(active), reader, atr
        hresult, _name, _state, _proto, atr_now = scard.SCardStatus(card)
        if hresult & 0xFFFFFFFF == _SHARING_VIOLATION:
            # another client began a transaction since: the reader's ATR will do
            return link
        _raise_for(hresult, "reading the card status", reader)
        link.atr = bytes(atr_now)
    except BaseException:
        _release_link(link)
        raise
    return link


class PcscTransport(CardTransport):
    """One card in one PC/SC reader.

    ``reader_name``: the exact reader name; None or "" picks the first reader holding a card.
    The protocol is T=1 when the card's ATR offers it, else T=0 (readers pass 61xx through).
    Reader string: ``pcsc:[NAME][?timeout=S&keygen_timeout=S&busy_timeout=S]``.
    """

    def __init__(
        self,
        reader_name: str | None = None,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        slow_timeout_s: float = DEFAULT_SLOW_TIMEOUT_S,
        busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S,
    ) -> None:
        super().__init__(
            timeout_s=timeout_s, slow_timeout_s=slow_timeout_s, busy_timeout_s=busy_timeout_s
        )
        self._wanted = reader_name or None
        self._last_reader: str | None = None
        self._link: _Link | None = None
        self._worker: _Worker | None = None

    @classmethod
    def from_reader(cls, rest: str) -> PcscTransport:
        """``[NAME][?timeout=S&keygen_timeout=S&busy_timeout=S]`` after ``pcsc:``."""
        name, query = split_reader_query(rest)
        options = parse_link_options("pcsc", query, busy=True)
        return cls(
            name or None,
            timeout_s=options.timeout_s,
            slow_timeout_s=options.slow_timeout_s,
            busy_timeout_s=options.busy_timeout_s,
        )

    @property
    def description(self) -> str:
        reader = self._last_reader or self._wanted
        if reader is not None:
            return f"PC/SC reader {reader!r}"
        return "PC/SC (first reader with a card)"

    @property
    def atr(self) -> bytes:
        return b"" if self._link is None else self._link.atr

    @property
    def reader_name(self) -> str | None:
        """The reader in use once connected."""
        return None if self._link is None else self._link.reader

    @property
    def protocol(self) -> str | None:
        """``"T=0"`` or ``"T=1"`` once connected."""
        if self._link is None or self._link.card is None:
            return None
        scard = _scard()
        return "T=1" if self._link.protocol == scard.SCARD_PROTOCOL_T1 else "T=0"

    # -- lifecycle -----------------------------------------------------------------------

    def _connect(self) -> None:
        _scard()  # loads pyscard (and sets the non-blocking mode) on this thread first
        worker = _Worker(f"pcsc {self._wanted or 'first reader'}")
        wanted = self._wanted
        # pcscd makes SCardConnect wait while another client holds a transaction on the card
        # (and for ever behind a card that does not answer): that is the busy wait.
        limit = self.busy_timeout_s
        job_link: list[_Link] = []

        def open_now() -> _Link:
            link = _open_link(wanted)
            job_link.append(link)
            return link

        try:
            link = worker.call(open_now, limit)
        except _LateError:
            # whatever open_now still makes is released behind it
            def release_late() -> None:
                for late in job_link:
                    _release_link(late)

            worker.post(release_late)
            worker.stop()
            where = f"in reader {wanted!r}" if wanted else "(first reader with a card)"
            raise ReaderError(
                f"card {where} busy: no connection within {limit:g} s (another PC/SC client "
                "holds it in a transaction, or a card that does not answer blocks the reader)"
            ) from None
        except BaseException:
            worker.stop()
            raise
        self._link, self._worker, self._last_reader = link, worker, link.reader
        log.debug("connected to %r (%s), ATR %s", link.reader, self.protocol, link.atr.hex())

    def _close(self) -> None:
        link, worker = self._link, self._worker
        self._link = self._worker = None
        if link is None or worker is None:
            return
        if self.dead is not None:
            # a call is stuck on the worker: release behind it, if it ever returns
            worker.post(lambda: _release_link(link))
            worker.stop()
            return
        try:
            worker.call(lambda: _release_link(link), _RELEASE_WAIT_S)
        except _LateError:
            log.debug("PC/SC release of %r still pending after %g s", link.reader, _RELEASE_WAIT_S)
        worker.stop()

    # -- APDUs ---------------------------------------------------------------------------

    def _transmit(self, apdu: bytes) -> bytes:
        return self._transmit_within(apdu, self.timeout_s)

    def _transmit_within(self, apdu: bytes, timeout_s: float) -> bytes:
        link, worker = self._link, self._worker
        assert link is not None and worker is not None  # transmit() connects first
        scard = _scard()
        pci = scard.SCARD_PCI_T1 if link.protocol == scard.SCARD_PROTOCOL_T1 else scard.SCARD_PCI_T0
        command = list(apdu)
        what = f"transmitting INS {apdu[1]:02X}" if len(apdu) > 1 else "transmit"
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            try:
                hresult, response = worker.call(
                    lambda: scard.SCardTransmit(link.card, pci, command), max(remaining, 0.001)
                )
            except _LateError:
                raise self.timed_out(
                    apdu,
                    timeout_s,
                    "the card (or the reader) does not answer; a card that is only slow "
                    "needs a longer ?timeout=",
                ) from None
            if hresult & 0xFFFFFFFF != _SHARING_VIOLATION:
                break
            # another client is in a transaction: wait for it, within this APDU's deadline
            if deadline - time.monotonic() <= _BUSY_POLL_S:
                break
            time.sleep(_BUSY_POLL_S)
        _raise_for(hresult, what, link.reader)
        if not response:
            # A card always ends with SW1 SW2. "Success" without any byte is how vpcd reports
            # a card whose link closed between command and answer: the card is gone.
            raise NoCardError(
                f"card in reader {link.reader!r} gave no answer at all to INS "
                f"{apdu[1]:02X}: removed mid-command?"
            )
        if len(response) < 2:
            raise CardProtocolError(
                f"card in reader {link.reader!r} answered {len(response)} byte without a "
                "status word (ISO/IEC 7816-4 §5.1: every response ends with SW1 SW2)"
            )
        return bytes(b & 0xFF for b in response)

    # -- transactions --------------------------------------------------------------------

    def _begin_transaction(self, timeout_s: float) -> None:
        link, worker = self._link, self._worker
        assert link is not None and worker is not None  # transaction() connects first
        scard = _scard()
        card = link.card
        try:
            hresult = worker.call(lambda: scard.SCardBeginTransaction(card), timeout_s)
        except _LateError:
            self._abandon_busy(link, worker, timeout_s)
            raise ReaderError(
                f"card in reader {link.reader!r} busy: another PC/SC client has held it for "
                f"more than {timeout_s:g} s (a second agent, or another program using the SIM)"
            ) from None
        _raise_for(hresult, "beginning a transaction", link.reader)

    def _abandon_busy(self, link: _Link, worker: _Worker, timeout_s: float) -> None:
        """End a begin still polling pcscd: disconnect the handle from another thread."""
        scard = _scard()
        card, link.card = link.card, None
        self.mark_dead(f"{self.description}: card busy for more than {timeout_s:g} s")
        helper = _Worker("pcsc abandon")
        leave = scard.SCARD_LEAVE_CARD
        try:
            helper.call(lambda: scard.SCardDisconnect(card, leave), _RELEASE_WAIT_S)
        except _LateError:
            log.debug("SCardDisconnect after a busy wait did not return")
        helper.stop()

    def _end_transaction(self) -> None:
        link, worker = self._link, self._worker
        if link is None or worker is None or link.card is None or self.dead is not None:
            return  # the handle (and with it pcscd's lock) goes when the link is released
        scard = _scard()
        card = link.card
        try:
            hresult = worker.call(
                lambda: scard.SCardEndTransaction(card, scard.SCARD_LEAVE_CARD), self.timeout_s
            )
        except _LateError:
            self.mark_dead(f"{self.description}: SCardEndTransaction did not return")
            log.warning("PC/SC: ending the transaction on %r did not return", link.reader)
            return
        if hresult != scard.SCARD_S_SUCCESS:
            log.debug("SCardEndTransaction: %s", _code_name(hresult))
