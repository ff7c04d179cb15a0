"""Crash safety through the real stack (issue 5, item 8): the virtual SIM as its own process
(``est-agent sim serve --power-cut-after N``) behind pcscd + vpcd, the agent on ``pcsc:``.

Slow (two card processes per cut point), so only a few cut points, chosen from the trace of a
clean enrollment: right after the key was generated in the target slot, between the two UPDATE
BINARY commands of the certificate record (a torn record) and after the record was written but
before it was read back. The sweep over every APDU index is tests/workflow/test_crash_safety.py.
Here the link is not wrapped in a cut: the card process itself stops answering, and the re-run
talks to a fresh ``sim serve`` of the same state file.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from est_agent.sim.personalize import personalize
from est_agent.sim.vpcd import POWER_CUT_EXIT_CODE
from est_agent.testserver import DevPki, EstTestServer
from tests.conftest import Run
from tests.integration.conftest import Cards
from tests.linkwrap import wrapped_reader_scheme
from tests.workflow.conftest import ICCID, Device
from tests.workflow.test_crash_safety import (
    CUT_EXIT_CODES,
    INS_GENERATE_KEY,
    INS_UPDATE_BINARY,
    Link,
    PowerCutTransport,
    check_device,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def device(tmp_path: Path, dev_pki: DevPki) -> Device:
    sim = tmp_path / "sim.json"
    ca = dev_pki.bootstrap_ca
    personalize(sim, iccid=ICCID, bootstrap_ca=(ca.certificate, ca.key))
    return Device(tmp_path, sim, tmp_path / "est-agent.toml", tmp_path / "state")


@pytest.fixture
def link() -> Iterator[Link]:
    """Counts what the card answered (never cuts: the card process does that here)."""
    counted = Link()
    with wrapped_reader_scheme("pcsc", lambda inner: PowerCutTransport(inner, counted)):
        yield counted




def test_power_cut_through_pcscd_and_vpcd(
    cards: Cards,
    device: Device,
    start_server: Callable[..., EstTestServer],
    dev_pki: DevPki,
    cli: Run,
    link: Link,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    server = start_server()
    device.write_config(server, dev_pki, card__reader=f'"pcsc:{cards.reader()}"')
    enroll = ("enroll", "--config", str(device.config))
    fresh = tmp_path / "fresh-sim.json"
    shutil.copy2(device.sim, fresh)

    # a clean enrollment through the stack, for its APDU trace
    proc = cards.sim_process(device.sim)
    code, _, err = cli(*enroll)
    assert code == 0, err
    assert cards.stop(proc) == 0
    headers = list(link.headers)
    generate = next(i for i, h in enumerate(headers) if h[1] == INS_GENERATE_KEY)
    update = next(i for i, h in enumerate(headers) if h[1] == INS_UPDATE_BINARY)
    assert headers[update + 1][1] == INS_UPDATE_BINARY  # the record takes two commands
    cut_points = [generate + 1, update + 1, update + 2]

    passed = 0
    for n in cut_points:
        shutil.copy2(fresh, device.sim)
        if device.state_dir.exists():
            shutil.rmtree(device.state_dir)
        proc = cards.sim_process(device.sim, "--power-cut-after", str(n))
        link.arm(None)
        code, _, err = cli(*enroll)
        assert code in CUT_EXIT_CODES, f"cut after {n}: exit {code}\n{err}"
        assert "Traceback" not in err, err
        assert link.answered == n and link.headers == headers[:n]
        assert proc.wait(timeout=10) == POWER_CUT_EXIT_CODE
        cards.died()

        proc = cards.sim_process(device.sim)
        code, _, err = cli(*enroll)
        assert code == 0, f"re-run after a cut after {n} APDUs failed:\n{err}"
        check_device(
            cli, device, dev_pki, previous=None, previous_superseded_ok=False, openssl_dir=tmp_path
        )
        assert cards.stop(proc) == 0
        passed += 1

    with capsys.disabled():
        print(
            f"\ncrash safety, power cut through pcscd [enroll]: cut points {cut_points} of "
            f"{len(headers)}, {len(cut_points)} tried, {passed} passed"
        )
    assert passed == len(cut_points)
