"""What a fresh `est-agent` process imports (issue 16, "a lighter process"), without timing.

`run` with nothing due is what the daily timer costs on every device: it must decide from the
host cache and the card alone, so none of the EST, TLS, HTTP or certificate stacks may load
(each is MiB of RSS and tens of ms). Read from the interpreter's own import log (`-X
importtime`: one line per module actually imported, nested by importer), so a module pulled in
lazily at run time is seen as well as one imported at the top of a file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from est_agent.testserver import DevPki, EstTestServer
from tests.conftest import Run
from tests.workflow.conftest import Device

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]

# Packages `run` with nothing due must not import, and why they are heavy on these machines
# (RSS, time) when it did: cryptography (≈ 9 MiB, ≈ 50 ms: certificate parsing and
# verification), httpx/httpcore/h11 (the EST client's HTTP), tlslite-ng and python-ecdsa (the
# card-signed TLS handshake), ssl (≈ 6 MiB with libssl), asn1crypto (CMS of /cacerts),
# tenacity (retries), and the modules of ours built on them.
NOT_ON_THE_QUICK_PATH = (
    "cryptography",
    "httpx",
    "httpcore",
    "h11",
    "tlslite",
    "ecdsa",
    "ssl",
    "asn1crypto",
    "tenacity",
    "est_agent.csr",
    "est_agent.est.client",
    "est_agent.est.messages",
    "est_agent.est.tls",
    "est_agent.workflow.agent",
    "est_agent.certificates",
    "est_agent.est.proxy",  # the configuration has no proxy
)


def imports_of(*argv: str) -> tuple[subprocess.CompletedProcess[str], list[tuple[int, str]]]:
    """Run `python -X importtime -m est_agent ARGV`: the process and its import log as
    (nesting depth, module) in completion order (an importer after what it imported)."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "est_agent", *argv],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    log = []
    for line in done.stderr.splitlines():
        if not line.startswith("import time:") or line.endswith("imported package"):
            continue
        name = line.rsplit("|", 1)[1]
        log.append(((len(name) - len(name.lstrip())) // 2, name.strip()))
    return done, log


def importers(log: list[tuple[int, str]], module: str) -> list[list[str]]:
    """For each import of ``module``: the chain of modules that imported it, nearest first."""
    chains = []
    for i, (depth, name) in enumerate(log):
        if name != module:
            continue
        chain, level = [], depth
        for later_depth, later in log[i + 1 :]:
            if later_depth < level:
                chain.append(later)
                level = later_depth
        chains.append(chain)
    return chains


def heavy(log: list[tuple[int, str]]) -> list[str]:
    return sorted(
        name
        for _, name in log
        if any(name == top or name.startswith(top + ".") for top in NOT_ON_THE_QUICK_PATH)
    )


@pytest.fixture
def enrolled(
    device: Device, start_server: Callable[..., EstTestServer], dev_pki: DevPki, cli: Run
) -> Device:
    device.write_config(start_server(), dev_pki)
    code, out, err = cli("enroll", "--config", str(device.config), "--json")
    assert code == 0 and json.loads(out)["outcome"] == "enrolled", err
    return device


def test_run_not_due_imports_no_est_tls_http_or_certificate_stack(enrolled: Device) -> None:
    done, log = imports_of("run", "--config", str(enrolled.config), "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["outcome"] == "not-due"
    assert "est_agent.workflow.quick" in {name for _, name in log}, "not the quick path"
    assert heavy(log) == []
    # hashlib maps OpenSSL's libcrypto (≈ 3.4 MiB): the agent hashes with est_agent.digests;
    # only the virtual SIM's own card model (in this process with a sim: reader) may load it
    for chain in importers(log, "_hashlib"):
        assert any(name.startswith("est_agent.sim.") for name in chain), chain
