"""The timer's run on a PC/SC reader that other device software uses at the same time.

A program holding an ``est_agent.api`` Card (or wolfSSL's IoT-SAFE layer, an LwM2M client)
keeps the applet open on a logical channel it got from MANAGE CHANNEL. The agent's run must
leave that channel alone. If the agent opened "its" channel implicitly, by a SELECT on the
lowest channel it had not opened itself (ISO/IEC 7816-4 §5.5.2), that SELECT would land on the
other program's open channel, and the run's closing MANAGE CHANNEL would close it under that
program. This is why ``card.implicit_channel`` is off by default: the test shows both sides.
Real pcscd + vpcd + ``est-agent sim serve``: one card, two PC/SC clients.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from est_agent.api import open_card
from est_agent.cli.main import main
from est_agent.errors import StatusWordError
from est_agent.sim.personalize import personalize
from est_agent.testserver import DevPki, EstTestServer
from tests.integration.conftest import Cards
from tests.workflow.conftest import ICCID, Device

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("implicit", ["false", "true"])
def test_a_card_held_by_other_software_survives_the_timer_run(
    cards: Cards,
    tmp_path: Path,
    dev_pki: DevPki,
    start_server: Callable[..., EstTestServer],
    capsys: pytest.CaptureFixture[str],
    implicit: str,
) -> None:
    sim = tmp_path / "sim.json"
    ca = dev_pki.bootstrap_ca
    personalize(sim, iccid=ICCID, bootstrap_ca=(ca.certificate, ca.key))
    device = Device(tmp_path, sim, tmp_path / "est-agent.toml", tmp_path / "state")
    reader = f"pcsc:{cards.reader()}"
    device.write_config(
        start_server(), dev_pki, card__reader=f'"{reader}"', card__implicit_channel=implicit
    )
    cards.sim_process(device.sim)
    assert main(["enroll", "--config", str(device.config), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["outcome"] == "enrolled"

    with open_card(reader) as other:  # the other program: MANAGE CHANNEL, SELECT, kept open
        assert len(other.random(16)) == 16
        assert main(["run", "--config", str(device.config), "--json"]) == 0
        result = json.loads(capsys.readouterr().out)
        assert result["outcome"] == "not-due"
        if implicit == "false":
            # the default: the agent asked the card for a channel of its own
            assert result["card_link"]["apdus"] == 6
            assert len(other.random(16)) == 16
        else:
            # the opt-in took the other program's channel and closed it (68 81 afterwards)
            assert result["card_link"]["apdus"] == 5
            with pytest.raises(StatusWordError) as refused:
                other.random(16)
            assert refused.value.sw == 0x6881
