"""``sim serve --no-implicit-channel`` (issue 13): through the emulated modem's AT+CSIM, a SELECT
of the applet on a closed channel opens it by default and is refused 6881 with the option; the
agent's client (``implicit_channel=True``) then falls back to MANAGE CHANNEL."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from est_agent.card.channel import CardSession
from est_agent.card.iotsafe import IotSafeApplet
from est_agent.transport.modem import ModemTransport
from tests.integration.test_modem import sim, sim_serve_modem, sim_template, stop

pytestmark = pytest.mark.integration

__all__ = ["sim", "sim_template"]  # fixtures used here

SELECT_ON_CLOSED_CHANNEL_1 = bytes.fromhex("01A4040007A0000005590010")


@pytest.mark.parametrize(("extra", "sw"), [((), "9000"), (("--no-implicit-channel",), "6881")])
def test_select_on_a_closed_channel(
    tmp_path: Path, sim: Path, extra: tuple[str, ...], sw: str
) -> None:
    proc, link = sim_serve_modem(tmp_path, sim, *extra)
    try:
        started = time.monotonic()
        transport = ModemTransport(str(link), timeout_s=5)
        try:
            assert transport.transmit(SELECT_ON_CLOSED_CHANNEL_1) == bytes.fromhex(sw)
        finally:
            transport.close()
        session = CardSession(ModemTransport(str(link), timeout_s=5))
        try:
            applet = IotSafeApplet.open(session, implicit_channel=True)
            assert applet.info().max_sessions is not None
        finally:
            session.close()
        elapsed = time.monotonic() - started
    finally:
        stop(proc)
    print(
        f"sim serve {' '.join(extra) or '(default)'}: SELECT on closed channel 1 -> {sw}, "
        f"{elapsed:.2f} s"
    )
    assert elapsed < 10
