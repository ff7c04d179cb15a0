"""The virtual IoT SAFE SIM: a tool for developing and testing without hardware.

Outside the runtime core: no runtime module imports this package. ``register()`` adds the
``sim:<state file>`` reader scheme to ``est_agent.transport.registry``; the CLI calls it at
startup, and tests that open ``sim:`` readers through the library call it from their fixtures.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from est_agent.transport.base import CardTransport

__all__ = ["register"]


def register() -> None:
    """Make ``sim:<state file>[?faults=FILE&timeout=S&keygen_timeout=S]`` readers open the
    virtual SIM in this process (``est_agent.sim.transport``). Idempotent, and a ``sim:``
    factory already in place (e.g. one wrapping this one to trace the link) is kept."""
    from est_agent.transport.registry import reader_factory, register_reader_scheme

    if reader_factory("sim") is None:
        register_reader_scheme("sim", _open_sim, usage="sim:STATE_FILE")


def _open_sim(rest: str) -> CardTransport:
    # Imported when a sim: reader is opened: the card model loads cryptography.
    from est_agent.sim.transport import SimTransport

    return SimTransport.from_reader(rest)
