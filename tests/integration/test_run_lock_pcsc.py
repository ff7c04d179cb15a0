"""Issue 9, two runs at once through the real PC/SC stack: "there is none (PC/SC opens shared):
two `enroll`s started together on one SIM both reported 'enrolled', with two different
certificates."

One virtual SIM served by ``est-agent sim serve --vpcd`` behind the private pcscd of
tests/integration/conftest.py; two real ``est-agent enroll`` processes on ``pcsc:<reader>``
(they inherit the private pcscd's socket from this process's environment) against the
in-process EST test server, slowed so that they overlap. PC/SC gives both a shared connection;
only the run lock in the state directory keeps the second one out until the first is done.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from est_agent.sim.personalize import personalize
from est_agent.testserver import DevPki, EstTestServer
from tests.conftest import Run
from tests.integration.conftest import Cards
from tests.workflow.conftest import ICCID, Device
from tests.workflow.test_run_lock import RESPONSE_DELAY_S, check_one_enrollment, race

pytestmark = pytest.mark.integration


@pytest.fixture
def device(tmp_path: Path, dev_pki: DevPki) -> Device:
    sim = tmp_path / "sim.json"
    ca = dev_pki.bootstrap_ca
    personalize(sim, iccid=ICCID, bootstrap_ca=(ca.certificate, ca.key))
    return Device(tmp_path, sim, tmp_path / "est-agent.toml", tmp_path / "state")




@pytest.mark.parametrize("lock_wait_s", ["30", "0.3"], ids=["waits", "gives-up"])
def test_two_enrolls_at_once_through_pcscd(
    lock_wait_s: str,
    cards: Cards,
    device: Device,
    start_server: Callable[..., EstTestServer],
    dev_pki: DevPki,
    cli: Run,
) -> None:
    server = start_server(response_delay_s=RESPONSE_DELAY_S)
    device.write_config(
        server,
        dev_pki,
        card__reader=f'"pcsc:{cards.reader()}"',
        paths__lock_wait_s=lock_wait_s,
    )
    cards.sim_process(device.sim)
    runs = race(device.config, ("enroll", "--json"), ("enroll", "--json"))
    winner = check_one_enrollment(runs, server, device, cli)
    [loser] = [r for r in runs if r is not winner]
    result: dict[str, Any] = json.loads(loser.out) if loser.code == 0 else {}
    if lock_wait_s == "30":
        assert loser.code == 0, loser.err
        assert (result["outcome"], result["serial"]) == (
            "already-enrolled",
            winner.result["serial"],
        )
        assert f"waiting for another est-agent (PID {winner.pid}) to finish" in loser.err
    else:
        assert loser.code == 75, loser.err
        assert f"another est-agent (PID {winner.pid}) holds the run lock" in loser.err
        assert loser.elapsed_s < winner.elapsed_s - 1.0, (loser.elapsed_s, winner.elapsed_s)
    assert max(r.elapsed_s for r in runs) < 30.0
