"""`est-agent run` with nothing due on a device's card path (issue 16, "a lighter process"):
pyscard -> the private pcscd -> vpcd -> `est-agent sim serve` in its own process, so what the
agent's process imports is the runtime's alone. Read from its `-X importtime` log, no timing.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from est_agent.cli.main import main
from est_agent.sim.personalize import personalize
from est_agent.testserver import DevPki, EstTestServer
from tests.integration.conftest import Cards
from tests.workflow.conftest import ICCID, Device
from tests.workflow.test_light_process import heavy, imports_of

pytestmark = pytest.mark.integration


def test_run_not_due_through_pcscd_imports_neither_the_est_stacks_nor_hashlib(
    cards: Cards,
    tmp_path: Path,
    dev_pki: DevPki,
    start_server: Callable[..., EstTestServer],
    capsys: pytest.CaptureFixture[str],
) -> None:
    sim = tmp_path / "sim.json"
    ca = dev_pki.bootstrap_ca
    personalize(sim, iccid=ICCID, bootstrap_ca=(ca.certificate, ca.key))
    device = Device(tmp_path, sim, tmp_path / "est-agent.toml", tmp_path / "state")
    device.write_config(start_server(), dev_pki, card__reader=f'"pcsc:{cards.reader()}"')
    cards.sim_process(device.sim)
    assert main(["enroll", "--config", str(device.config), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["outcome"] == "enrolled"

    done, log = imports_of("run", "--config", str(device.config), "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert result["outcome"] == "not-due" and result["card_link"]["apdus"] == 6
    names = {name for _, name in log}
    assert {"est_agent.workflow.quick", "est_agent.transport.pcsc", "smartcard.scard"} <= names
    assert heavy(log) == []
    # hashlib would map OpenSSL's libcrypto (≈ 3.4 MiB) for two SHA-256 of a few bytes; the
    # card model that loads it in process is in the `sim serve` process here
    assert not {"hashlib", "_hashlib", "hmac", "secrets"} & names
    assert not any(name.startswith("est_agent.sim.") for name in names)
