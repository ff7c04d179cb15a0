"""A device under test: a fresh virtual SIM (bootstrap cert from the dev PKI), a config file
pointing at an in-process EST test server, and a helper running the real CLI in process."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import Encoding

from est_agent.sim.personalize import personalize
from est_agent.testserver import DevPki, EstTestServer

ICCID = "8988247000001234567"


@dataclass
class Device:
    root: Path
    sim: Path
    config: Path
    state_dir: Path

    def write_config(self, server: EstTestServer, dev_pki: DevPki, **extra: str) -> None:
        sections: dict[str, dict[str, str]] = {
            "card": {"reader": f'"sim:{self.sim}"'},
            "est": {
                "url": f'"{server.url}"',
                "trust_anchor": f'"{self.root / "tls-ca.pem"}"',
            },
            "renewal": {"jitter_s": "0"},
            "paths": {"state_dir": f'"{self.state_dir}"'},
        }
        for dotted, value in extra.items():
            section, key = dotted.split("__", 1)
            sections.setdefault(section, {})[key] = value
        text = "\n".join(
            f"[{name}]\n" + "\n".join(f"{k} = {v}" for k, v in body.items())
            for name, body in sections.items()
        )
        (self.root / "tls-ca.pem").write_bytes(
            dev_pki.tls_ca_certificate.public_bytes(serialization.Encoding.PEM)
        )
        self.config.write_text(text + "\n")


@pytest.fixture(scope="session")
def sim_template(tmp_path_factory: pytest.TempPathFactory, dev_pki: DevPki) -> bytes:
    path = tmp_path_factory.mktemp("sim") / "sim.json"
    ca = dev_pki.bootstrap_ca
    personalize(path, iccid=ICCID, bootstrap_ca=(ca.certificate, ca.key))
    return path.read_bytes()


@pytest.fixture
def device(tmp_path: Path, sim_template: bytes) -> Device:
    sim = tmp_path / "sim.json"
    sim.write_bytes(sim_template)
    return Device(tmp_path, sim, tmp_path / "est-agent.toml", tmp_path / "state")




def openssl_verify(cert: x509.Certificate, dev_pki: DevPki, workdir: Path) -> None:
    leaf = workdir / "leaf.pem"
    ca = workdir / "est-ca.pem"
    leaf.write_bytes(cert.public_bytes(Encoding.PEM))
    ca.write_bytes(dev_pki.est_ca.certificate.public_bytes(Encoding.PEM))
    result = subprocess.run(
        ["openssl", "verify", "-CAfile", str(ca), str(leaf)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
