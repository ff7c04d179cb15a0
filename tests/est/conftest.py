"""Fixtures for the EST client tests: a dev PKI, in-process test servers, a virtual SIM.

Servers are `EstTestServer` instances on 127.0.0.1 and a free port (the same code as
`est-testserver serve`), stopped after each test. The SIM is personalized once per session
with a bootstrap certificate from the dev PKI's bootstrap CA; each test gets its own copy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from est_agent.sim.personalize import personalize
from est_agent.testserver import DevPki, EstTestServer, ServerConfig, generate_dev_pki, load_dev_pki
from tests.est.card_helpers import SimCard, open_sim_card


@pytest.fixture(scope="session")
def dev_pki(tmp_path_factory: pytest.TempPathFactory) -> DevPki:
    directory = tmp_path_factory.mktemp("est-pki")
    generate_dev_pki(directory)
    return load_dev_pki(directory)


@pytest.fixture
def start_server(dev_pki: DevPki, tmp_path: Path) -> Iterator[Callable[..., EstTestServer]]:
    """Start an in-process server on 127.0.0.1 and a free port with the given settings."""
    servers: list[EstTestServer] = []

    def start(**settings: Any) -> EstTestServer:
        settings.setdefault("issuance_log", tmp_path / f"issuance-{len(servers)}.jsonl")
        config = ServerConfig(pki_dir=dev_pki.directory, host="127.0.0.1", port=0, **settings)
        server = EstTestServer(config, pki=dev_pki)
        server.quiet()
        servers.append(server.start())
        return server

    yield start
    for server in servers:
        server.close()


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
