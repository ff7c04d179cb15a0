"""Links to a card, chosen by a reader string (``transport.registry`` maps schemes to links).

pcsc:[<name>][?timeout=S&keygen_timeout=S&busy_timeout=S]
                   the PC/SC reader with exactly that name (none: the first with a card)
modem:<port>[?baud=N&timeout=S&keygen_timeout=S]
                   the SIM behind a cellular modem's AT port (3GPP TS 27.007 AT+CSIM/AT+CGLA)
sim:<state file>[?faults=FILE&timeout=S&keygen_timeout=S]
                   the virtual SIM, in this process, once ``est_agent.sim.register()`` has
                   added the scheme (the CLI does at startup)

``timeout``: seconds per APDU (10; the modem 20); ``keygen_timeout``: per key generation (60);
``busy_timeout``: how long a PC/SC transaction waits for a card another client holds (10).
"""

from __future__ import annotations

from est_agent.transport.base import CardTransport, LinkStats
from est_agent.transport.registry import open_transport, reader_schemes, register_reader_scheme

__all__ = [
    "CardTransport",
    "LinkStats",
    "open_transport",
    "reader_schemes",
    "register_reader_scheme",
]
