"""Crash safety on a PKCS#11 token: a renewal SIGKILLed just before each of its PKCS#11 calls in
turn (a child process, tests/pkcs11/crash_child.py). Whatever the kill point, the token keeps
the credential that was valid when the renewal started (or the new one, once it is complete),
no slot becomes unknown (that would stop every later run), nothing intact-but-unusable is left,
and the next run renews normally."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable

import pytest

from est_agent.backends.pkcs11 import load_module
from est_agent.config import load_config
from est_agent.testserver import DevPki, EstTestServer
from est_agent.workflow.agent import Agent
from tests.pkcs11.conftest import SOFTHSM_MODULE, Token

pytestmark = pytest.mark.integration

#: a slot after any kill: never unknown, never an intact record that does not fit its key
ALLOWED = {"valid", "empty", "damaged:torn"}


def child(token: Token, kill_at: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tests.pkcs11.crash_child", str(token.config), str(kill_at)],
        env=token.env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_kill_at_each_pkcs11_call_of_a_renewal(
    token: Token, start_server: Callable[..., EstTestServer], dev_pki: DevPki
) -> None:
    server = start_server()
    token.write_config(server, dev_pki)
    config = load_config(token.config)
    Agent(config).enroll()
    Agent(config).renew(force=True)  # op-a sequence 1, op-b sequence 2: two valid credentials
    start = Agent(config).status()
    assert start.active == "op-b"
    active_serial = {s.name: s.serial for s in start.slots}["op-b"]
    tokens = token.root / "softhsm-tokens"
    snapshot = token.root / "snapshot"
    shutil.copytree(tokens, snapshot / "tokens")
    shutil.copytree(token.state_dir, snapshot / "state")

    full = child(token, 0)
    assert full.returncode == 0, full.stderr
    calls = full.stdout.splitlines()
    # the renewal of op-a: record header destroyed before the key, header created last
    writes = [c for c in calls if c.split()[0] in ("destroy", "generate", "create")]
    assert writes[0] == "destroy record header object=op-a", writes
    assert writes[-1] == "create record header object=op-a", writes
    assert all("op-b" not in c for c in writes)  # the active slot is never written

    print(f"renewal: {len(calls)} PKCS#11 calls, killed before each in turn")
    killed = 0
    started = time.monotonic()
    for k in range(1, len(calls) + 1):
        for name in ("tokens", "state"):
            target = tokens if name == "tokens" else token.state_dir
            shutil.rmtree(target)
            shutil.copytree(snapshot / name, target)
        load_module(SOFTHSM_MODULE).reinitialize()  # this process reads the restored files
        proc = child(token, k)
        assert proc.returncode == -signal.SIGKILL, f"kill at call {k}: {proc.stderr}"
        killed += 1
        load_module(SOFTHSM_MODULE).reinitialize()
        status = Agent(config).status()
        seen = {
            s.name: f"{s.status}:{s.reason}" if s.status == "damaged" else s.status
            for s in status.slots
        }
        assert set(seen.values()) <= ALLOWED, f"kill at call {k} ({calls[k - 1]}): {seen}"
        valid = [s for s in status.slots if s.status == "valid"]
        assert valid, f"kill at call {k}: no valid credential left"
        # the credential active at the start is still there, unless the new one replaced it
        by_name = {s.name: s for s in status.slots}
        if status.active == "op-b":
            assert by_name["op-b"].serial == active_serial
        else:
            assert status.active == "op-a" and by_name["op-a"].sequence == 3, seen
        # and the next run renews from here
        result = Agent(config).renew(force=True)
        assert result.outcome.value == "renewed", f"re-run after kill at call {k}"
    assert killed == len(calls) > 10
    assert time.monotonic() - started < 30 + 5 * len(calls)
