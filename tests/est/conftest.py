"""Fixtures for the EST client tests: a virtual SIM (dev PKI and servers: tests/conftest.py).

The SIM is personalized once per session with a bootstrap certificate from the dev PKI's
bootstrap CA; each test gets its own copy.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from est_agent.sim.personalize import personalize
from est_agent.testserver import DevPki
from tests.est.card_helpers import SimCard, open_sim_card


@pytest.fixture(scope="session")
def sim_template(tmp_path_factory: pytest.TempPathFactory, dev_pki: DevPki) -> bytes:
    path = tmp_path_factory.mktemp("sim") / "sim.json"
    ca = dev_pki.bootstrap_ca
    personalize(path, iccid="8988247000001234567", bootstrap_ca=(ca.certificate, ca.key))
    return path.read_bytes()


@pytest.fixture
def sim(tmp_path: Path, sim_template: bytes) -> Iterator[SimCard]:
    path = tmp_path / "sim.json"
    path.write_bytes(sim_template)
    card = open_sim_card(path)
    yield card
    card.close()
