"""Links to a card, chosen by a reader string.

pcsc:[<name>][?timeout=S&keygen_timeout=S&busy_timeout=S]
                   the PC/SC reader with exactly that name (none: the first with a card)
sim:<state file>[?faults=FILE&timeout=S&keygen_timeout=S]
                   the virtual SIM, in this process; ``faults``: est_agent.sim.faults
modem:<port>[?baud=N&timeout=S&keygen_timeout=S]
                   the SIM behind a cellular modem's AT port (3GPP TS 27.007 AT+CSIM/AT+CGLA)

``timeout``: seconds per APDU (10; the modem 20); ``keygen_timeout``: per key generation (60);
``busy_timeout``: how long a PC/SC transaction waits for a card another client holds (10).
"""

from __future__ import annotations

from est_agent.errors import UsageError
from est_agent.transport.base import CardTransport, LinkStats

__all__ = ["CardTransport", "LinkStats", "open_transport"]


def open_transport(reader: str) -> CardTransport:
    """Build (not yet connect) the transport a reader string names.

    Imports are local so that a command which never touches a card never loads pyscard.
    """
    scheme, sep, rest = reader.partition(":")
    if not sep:
        raise UsageError(
            f"reader must be pcsc:[NAME], sim:STATE_FILE or modem:PORT, got {reader!r}"
        )
    scheme = scheme.lower()
    if scheme == "pcsc":
        from est_agent.transport.pcsc import PcscTransport

        return PcscTransport.from_reader(rest)
    if scheme == "sim":
        if not rest:
            raise UsageError("sim: needs the virtual SIM's state file, e.g. sim:/var/lib/sim.json")
        # The virtual SIM is a product feature (develop without hardware); this is the one
        # place where the core reaches into est_agent.sim.
        from est_agent.sim.transport import SimTransport

        return SimTransport.from_reader(rest)
    if scheme == "modem":
        from est_agent.transport.modem import ModemTransport

        return ModemTransport.from_reader(rest)
    raise UsageError(f"unknown reader type {scheme!r} (expected pcsc:, sim: or modem:)")
