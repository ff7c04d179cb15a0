"""README's first command: `est-agent demo` (test EST server + in-process virtual SIM)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def test_demo_enrolls_renews_and_verifies(tmp_path: Path) -> None:
    demo = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, "-m", "est_agent", "demo", "--dir", str(demo)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "enrolled: slot op-a" in result.stdout
    assert "renewed: slot op-b" in result.stdout
    assert "device.pem: OK" in result.stdout  # openssl verify against the EST CA
    issued = [json.loads(line) for line in (demo / "issuance.jsonl").read_text().splitlines()]
    assert [entry["operation"] for entry in issued] == ["simpleenroll", "simplereenroll"]
    exported = x509.load_pem_x509_certificates((demo / "device.pem").read_bytes())[0]
    assert int(issued[-1]["serial"], 16) == exported.serial_number  # the renewed one is active
