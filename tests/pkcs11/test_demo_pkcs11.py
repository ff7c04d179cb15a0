"""`est-agent demo --backend pkcs11`: the whole job with every key in a SoftHSM2 token, each
step its own process (README: Keys in a PKCS#11 token)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509

from tests.pkcs11.conftest import SOFTHSM_MODULE

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def test_demo_with_the_keys_in_softhsm(tmp_path: Path) -> None:
    if not Path(SOFTHSM_MODULE).exists() or shutil.which("softhsm2-util") is None:
        pytest.skip("SoftHSM2 is not installed (scripts/bootstrap installs softhsm2)")
    demo = tmp_path / "demo"
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "est_agent", "demo", "--backend", "pkcs11", "--dir", str(demo)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert time.monotonic() - started < 120
    assert result.returncode == 0, result.stderr
    assert "enrolled: slot op-a" in result.stdout
    assert "renewed: slot op-b" in result.stdout
    assert "backend:     pkcs11" in result.stdout
    assert "device.pem: OK" in result.stdout  # openssl verify against the EST CA
    assert "[4/6] generating a key in token slot op-b" in result.stderr
    assert "SIM" not in result.stderr.replace("demo: ", "")  # every step names the token
    # what token info shows: three key pairs, three certificates, two record headers
    objects = [line.split()[0] for line in result.stdout.splitlines() if "label=" in line]
    assert sorted(objects) == sorted(
        ["private_key"] * 3 + ["public_key"] * 3 + ["certificate"] * 3 + ["data"] * 2
    )
    pin = (demo / "token-pin").read_text().strip()
    assert pin not in result.stdout + result.stderr
    issued = [json.loads(line) for line in (demo / "issuance.jsonl").read_text().splitlines()]
    assert [entry["operation"] for entry in issued] == ["simpleenroll", "simplereenroll"]
    exported = x509.load_pem_x509_certificates((demo / "device.pem").read_bytes())[0]
    assert int(issued[-1]["serial"], 16) == exported.serial_number
    assert exported.subject.rfc4514_string() == "CN=demo-device-0001"


def test_demo_refuses_pcsc_with_pkcs11() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "est_agent", "demo", "--backend", "pkcs11", "--pcsc"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 64, result.stderr
    assert "--backend pkcs11 uses no SIM" in result.stderr
