"""Fixtures for the EST client tests: a virtual SIM (dev PKI and servers: tests/conftest.py).

The SIM is personalized once per session with a bootstrap certificate from the dev PKI's
bootstrap CA; each test gets its own copy.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from est_agent.testserver import DevPki
from tests.est.card_helpers import SimCard, personalized_sim, sim_from


@pytest.fixture(scope="session")
def sim_template(tmp_path_factory: pytest.TempPathFactory, dev_pki: DevPki) -> bytes:
    return personalized_sim(tmp_path_factory.mktemp("sim"), dev_pki)


@pytest.fixture
def sim(tmp_path: Path, sim_template: bytes) -> Iterator[SimCard]:
    with sim_from(tmp_path, sim_template) as card:
        yield card
