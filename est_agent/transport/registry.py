"""Reader schemes: the ``<scheme>:`` before a reader string, and who builds its transport.

``pcsc:`` and ``modem:`` are registered here; each factory imports its module only when a reader
of that scheme is opened, so a command that never touches a card never loads pyscard or
pyserial. Packages outside the runtime core add their own scheme: the virtual SIM registers
``sim:`` with ``est_agent.sim.register()`` (the CLI calls it at startup), so the core never
imports the virtual SIM.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from est_agent.errors import UsageError
from est_agent.transport.base import CardTransport

__all__ = [
    "ReaderFactory",
    "open_transport",
    "reader_factory",
    "reader_schemes",
    "register_reader_scheme",
]

#: builds (does not connect) a transport from what follows ``<scheme>:`` in the reader string
ReaderFactory = Callable[[str], CardTransport]

# RFC 3986 §3.1: scheme = ALPHA *( ALPHA / DIGIT / "+" / "-" / "." ), compared lowercased.
_SCHEME_RE = re.compile(r"[a-z][a-z0-9+.-]*")


@dataclass(frozen=True)
class _Scheme:
    factory: ReaderFactory
    usage: str  # how the scheme is written, for messages: "pcsc:[NAME]"


_schemes: dict[str, _Scheme] = {}


def register_reader_scheme(name: str, factory: ReaderFactory, *, usage: str = "") -> None:
    """Make ``<name>:...`` readers open with ``factory(rest)``.

    ``usage`` shows the form in error messages (default: the one registered before, else
    ``<name>:``). Registering a name again replaces its factory: registration is idempotent,
    and a test may put a double in place.
    """
    scheme = name.lower()
    if not _SCHEME_RE.fullmatch(scheme):
        raise UsageError(
            f"a reader scheme is a letter, then letters, digits, +, - or ., not {name!r}"
        )
    previous = _schemes.get(scheme)
    kept = previous.usage if previous is not None else f"{scheme}:"
    _schemes[scheme] = _Scheme(factory, usage or kept)


def reader_factory(name: str) -> ReaderFactory | None:
    """The factory registered for a scheme (to wrap it: a tracing or fault-injecting link)."""
    entry = _schemes.get(name.lower())
    return entry.factory if entry is not None else None


def reader_schemes() -> tuple[str, ...]:
    """The registered scheme names, in registration order."""
    return tuple(_schemes)


def open_transport(reader: str) -> CardTransport:
    """Build (not yet connect) the transport a reader string names; UsageError (64) naming the
    known schemes for a string without one or with a scheme nobody registered."""
    scheme, sep, rest = reader.partition(":")
    if not sep:
        raise UsageError(f"reader must be {_known(usage=True)}, got {reader!r}")
    entry = _schemes.get(scheme.lower())
    if entry is None:
        raise UsageError(f"unknown reader type {scheme!r} (expected {_known(usage=False)})")
    return entry.factory(rest)


def _known(*, usage: bool) -> str:
    names = [s.usage if usage else f"{name}:" for name, s in _schemes.items()]
    if len(names) < 2:
        return "".join(names) or "a registered reader scheme"
    return f"{', '.join(names[:-1])} or {names[-1]}"


def _open_pcsc(rest: str) -> CardTransport:
    from est_agent.transport.pcsc import PcscTransport

    return PcscTransport.from_reader(rest)


def _open_modem(rest: str) -> CardTransport:
    from est_agent.transport.modem import ModemTransport

    return ModemTransport.from_reader(rest)


register_reader_scheme("pcsc", _open_pcsc, usage="pcsc:[NAME]")
register_reader_scheme("modem", _open_modem, usage="modem:PORT")
