"""``est-agent run`` against a misbehaving in-process SIM, set up through the configuration only
(``card.reader = "sim:sim.json?faults=faults.txt"``), with the EST test server on 127.0.0.1:
each fault ends in its typed exit code, installs nothing, and the next clean run enrolls."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from est_agent.card.channel import CardSession
from est_agent.card.uicc import UiccFiles
from est_agent.card.uri import UiccPath
from est_agent.cli.main import main
from est_agent.sim.personalize import personalize
from est_agent.sim.transport import SimTransport
from est_agent.store import decode_header
from est_agent.testserver import DevPki, EstTestServer
from tests.workflow.conftest import Device

pytestmark = pytest.mark.integration

ICCID = "8988247000005556667"
OP_A_EF = UiccPath((0x7FF0, 0x6F01))


@pytest.fixture(scope="module")
def sim_template(tmp_path_factory: pytest.TempPathFactory, dev_pki: DevPki) -> bytes:
    path = tmp_path_factory.mktemp("sim") / "sim.json"
    ca = dev_pki.bootstrap_ca
    personalize(path, iccid=ICCID, bootstrap_ca=(ca.certificate, ca.key))
    return path.read_bytes()


@pytest.fixture
def device(
    tmp_path: Path,
    sim_template: bytes,
    start_server: Callable[..., EstTestServer],
    dev_pki: DevPki,
) -> Device:
    sim = tmp_path / "sim.json"
    sim.write_bytes(sim_template)
    device = Device(tmp_path, sim, tmp_path / "est-agent.toml", tmp_path / "state")
    # relative to the configuration file, like every path in it; faults.txt beside sim.json
    device.write_config(
        start_server(), dev_pki, card__reader='"sim:sim.json?faults=faults.txt&timeout=1"'
    )
    return device


def run(device: Device, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str, float]:
    started = time.monotonic()
    code = main(["run", "--config", str(device.config), "--json"])
    out, err = capsys.readouterr()
    return code, out, err, time.monotonic() - started


def installed(device: Device) -> bool:
    session = CardSession(SimTransport(device.sim))
    try:
        return decode_header(UiccFiles(session.basic_channel).read(OP_A_EF)) is not None
    finally:
        session.close()


@pytest.mark.parametrize(
    ("fault", "code", "message"),
    [
        ("ins=B9 sw=6A84", 76, "GENERATE KEY PAIR: card answered SW 6A84"),
        ("ins=B9 truncate=1", 76, "response APDU too short: 1 bytes"),
        ("ins=A4 p1=04 silence", 69, "no answer to INS A4 within 1 s"),
        ("ins=B9 disconnect", 69, "card removed during INS B9"),
    ],
)
def test_run_against_a_faulty_card(
    device: Device,
    capsys: pytest.CaptureFixture[str],
    fault: str,
    code: int,
    message: str,
) -> None:
    (device.root / "faults.txt").write_text(f"# injected by the test\n{fault}\n")
    got, _, err, elapsed = run(device, capsys)
    assert got == code, err
    assert message in err
    assert "Traceback" not in err
    assert not installed(device)
    if "silence" in fault:
        assert elapsed < 1 + 1  # the deadline, not more
    # the same configuration with the fault gone: the next run enrolls
    (device.root / "faults.txt").write_text("")
    got, out, err, _ = run(device, capsys)
    assert got == 0, err
    assert json.loads(out)["outcome"] == "enrolled"
    assert installed(device)
    print(f"{fault}: exit {code} after {elapsed:.2f} s")


def test_slow_key_generation_within_its_deadline(
    device: Device, capsys: pytest.CaptureFixture[str]
) -> None:
    """timeout=1 in the reader string, but key generation has its own 60 s deadline: a 1.5 s
    GENERATE KEY PAIR is merely slow, and the enrollment succeeds."""
    (device.root / "faults.txt").write_text("ins=B9 delay_ms=1500\n")
    got, out, err, elapsed = run(device, capsys)
    assert got == 0, err
    assert json.loads(out)["outcome"] == "enrolled"
    assert elapsed >= 1.5
    assert installed(device)


@pytest.mark.parametrize("fault", ["ins=B9 wrong_public_key", "ins=2B bad_signature"])
def test_run_refuses_a_card_that_lies(
    device: Device, capsys: pytest.CaptureFixture[str], fault: str
) -> None:
    (device.root / "faults.txt").write_text(f"{fault}\n")
    got, _, err, _ = run(device, capsys)
    assert got == 76, err
    print(f"{fault}: exit {got}: {err.strip().splitlines()[-1]}")
    assert "Traceback" not in err
    assert not installed(device)
