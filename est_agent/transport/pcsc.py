"""PC/SC readers through pyscard (pcsc-lite on Linux).

pyscard's low-level ``smartcard.scard`` calls are used rather than its ``CardConnection``
classes: those power the card off on ``disconnect()`` and in ``__del__`` by default (resetting
every other connection to the card, 0x80100068) and raise from destructors. Here the card is
always left as it is (``SCARD_LEAVE_CARD``) and nothing happens at garbage collection.

Each failing call's PC/SC code (``hresult``) is mapped to one of our errors, chained from a
pyscard ``SmartcardException`` carrying the code, so ``exc.__cause__.hresult`` tells exactly what
PC/SC said. pyscard is imported inside the functions: the CLI should start without loading it.

``_transmit`` is raw: 61xx / 6Cxx handling is the channel layer's job (``est_agent.card.channel``).
"""

from __future__ import annotations

import logging
from types import ModuleType
from typing import Any

from est_agent.errors import NoCardError, ReaderError, TransportError
from est_agent.transport.base import CardTransport

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


def _scard() -> ModuleType:
    """pyscard's ``smartcard.scard``, without running ``smartcard/__init__.py`` first.

    That ``__init__`` imports the high-level Session/System/CardConnection layers (threading,
    observers, reader factories: 24 modules instead of 5, ~2-4 ms and ~0.25 MiB) that this
    module never uses. The package object is created unexecuted (the approach of
    est/tls.py's ``_import_tlslite_core``); its ``__init__`` still runs, in place, the first
    time anything else reads an attribute of the package (``from smartcard import Session``).
    """
    import sys

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


class PcscTransport(CardTransport):
    """One card in one PC/SC reader.

    ``reader_name``: the exact reader name; None or "" picks the first reader holding a card.
    The protocol is T=1 when the card's ATR offers it, else T=0 (readers pass 61xx through).
    """

    def __init__(self, reader_name: str | None = None) -> None:
        super().__init__()
        self._wanted = reader_name or None
        self._reader: str | None = None
        self._atr = b""
        self._context: Any = None
        self._card: Any = None
        self._protocol = 0

    @property
    def description(self) -> str:
        if self._reader is not None:
            return f"PC/SC reader {self._reader!r}"
        if self._wanted is not None:
            return f"PC/SC reader {self._wanted!r}"
        return "PC/SC (first reader with a card)"

    @property
    def atr(self) -> bytes:
        return self._atr

    @property
    def reader_name(self) -> str | None:
        """The reader in use once connected."""
        return self._reader

    @property
    def protocol(self) -> str | None:
        """``"T=0"`` or ``"T=1"`` once connected."""
        scard = _scard()
        if self._card is None:
            return None
        return "T=1" if self._protocol == scard.SCARD_PROTOCOL_T1 else "T=0"

    def _connect(self) -> None:
        scard = _scard()
        self._context = _establish()
        try:
            reader, atr = self._choose_reader()
            offered = atr_protocols(atr)
            if 1 in offered:
                wanted = scard.SCARD_PROTOCOL_T1
            elif offered:
                wanted = scard.SCARD_PROTOCOL_T0
            else:  # no ATR yet (card still powering up): let pcscd negotiate
                wanted = scard.SCARD_PROTOCOL_T0 | scard.SCARD_PROTOCOL_T1
            hresult, card, active = scard.SCardConnect(
                self._context, reader, scard.SCARD_SHARE_SHARED, wanted
            )
            _raise_for(hresult, "connecting to the card", reader)
            self._card, self._protocol, self._reader = card, int(active), reader
            hresult, _name, _state, _proto, atr_now = scard.SCardStatus(card)
            _raise_for(hresult, "reading the card status", reader)
            self._atr = bytes(atr_now)
        except BaseException:
            self._release()
            raise
        log.debug("connected to %r (%s), ATR %s", reader, self.protocol, self._atr.hex().upper())

    def _choose_reader(self) -> tuple[str, bytes]:
        readers = _readers(self._context)
        if self._wanted is not None:
            if self._wanted not in readers:
                listed = ", ".join(repr(r) for r in readers) or "none"
                raise ReaderError(f"no reader named {self._wanted!r}; available: {listed}")
            ((_name, _state, atr),) = _reader_states(self._context, [self._wanted])
            return self._wanted, atr
        if not readers:
            raise ReaderError("no PC/SC readers available")
        states = _reader_states(self._context, readers)
        for name, state, atr in states:
            if _has_card(state):
                return name, atr
        listed = ", ".join(repr(name) for name, _s, _a in states)
        raise NoCardError(f"no card in any reader ({listed})")

    def _transmit(self, apdu: bytes) -> bytes:
        scard = _scard()
        pci = (
            scard.SCARD_PCI_T1 if self._protocol == scard.SCARD_PROTOCOL_T1 else scard.SCARD_PCI_T0
        )
        hresult, response = scard.SCardTransmit(self._card, pci, list(apdu))
        _raise_for(
            hresult,
            f"transmitting INS {apdu[1]:02X}" if len(apdu) > 1 else "transmit",
            self._reader,
        )
        if len(response) < 2:
            # A card always ends with SW1 SW2. "Success" without them is how vpcd reports a
            # card whose link closed between command and answer: the card is gone.
            raise NoCardError(
                f"card in reader {self._reader!r} gave no status word "
                f"({len(response)} bytes): removed mid-command?"
            )
        return bytes(b & 0xFF for b in response)

    def _close(self) -> None:
        self._release()

    def _release(self) -> None:
        """Disconnect leaving the card powered, release the context; never raise.

        Closing follows a failure as often as not (card gone, pcscd gone): the error that
        matters has already been raised, so failures here are only logged.
        """
        scard = _scard()
        if self._card is not None:
            hresult = scard.SCardDisconnect(self._card, scard.SCARD_LEAVE_CARD)
            if hresult != scard.SCARD_S_SUCCESS:
                log.debug("SCardDisconnect: %s", _code_name(hresult))
            self._card = None
        if self._context is not None:
            hresult = scard.SCardReleaseContext(self._context)
            if hresult != scard.SCARD_S_SUCCESS:
                log.debug("SCardReleaseContext: %s", _code_name(hresult))
            self._context = None
