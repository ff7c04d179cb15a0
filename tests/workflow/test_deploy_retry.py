"""Issue 9: "A deploy hook that failed is retried by later runs until it succeeds; `status`
shows it." The same for a PEM export that could not be written.

The credential is on the SIM after the first run whatever the deployment does (the install is
never undone, exit 0 with a note); `status --json` reports the deployment of the *active*
credential as failed / done with its attempt count; every later `run` that finds it not done
takes the full path (the fast path does not trust a cache whose deployment failed) and deploys
again; once it succeeded, `run` is back on the fast path (record header + key, 6 APDUs on the
in-process SIM) and deploys nothing.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from est_agent.testserver import DevPki, EstTestServer
from tests.conftest import Run
from tests.workflow.conftest import Device
from tests.workflow.test_enroll_renew import certificate_on_sim

pytestmark = pytest.mark.integration

#: `run` with nothing due on the in-process SIM: SELECT + READ BINARY of the record header,
#: then MANAGE CHANNEL, SELECT applet, READ PUBLIC KEY, MANAGE CHANNEL close (workflow/quick.py)
FAST_PATH_APDUS = 6
#: a whole run (card, TLS to 127.0.0.1, hook) is well under this on the 2-core test machine
RUN_BOUND_S = 20.0


def flaky_hook(device: Device, failures: int) -> tuple[Path, Path]:
    """A deploy hook that fails its first ``failures`` calls, then succeeds; every call appends
    ``<call number> <slot> <serial>`` to a log (the counter)."""
    calls = device.root / "hook-calls.txt"
    hook = device.root / "flaky-hook.sh"
    hook.write_text(
        "#!/bin/sh\n"
        f'n=$(( $(wc -l < "{calls}" 2>/dev/null || echo 0) + 1 ))\n'
        f'echo "$n $EST_AGENT_SLOT $EST_AGENT_SERIAL" >> "{calls}"\n'
        f'if [ "$n" -le {failures} ]; then echo "deploy target not ready ($n)" >&2; exit 3; fi\n'
        "exit 0\n"
    )
    hook.chmod(0o755)
    return hook, calls


def timed(cli: Run, *argv: str) -> tuple[int, dict[str, Any], str, float]:
    started = time.monotonic()
    code, out, err = cli(*argv, "--json")
    elapsed = time.monotonic() - started
    assert "Traceback" not in err, err
    return code, (json.loads(out) if out.strip() else {}), err, elapsed


def status_json(cli: Run, device: Device) -> dict[str, Any]:
    code, out, err = cli("status", "--config", str(device.config), "--json")
    assert code == 0, err
    status: dict[str, Any] = json.loads(out)
    return status


def active_credential(status: dict[str, Any]) -> dict[str, Any]:
    """The active slot's entry of `status --json` (what must survive every run unchanged)."""
    slot: dict[str, Any] = {s["name"]: s for s in status["slots"]}[status["active_slot"]]
    return slot


def test_failed_deploy_hook_is_retried_by_each_run_until_it_succeeds(
    device: Device,
    start_server: Callable[..., EstTestServer],
    dev_pki: DevPki,
    cli: Run,
) -> None:
    server = start_server()
    hook, calls = flaky_hook(device, failures=2)
    device.write_config(server, dev_pki, paths__deploy_hook=f'["{hook}"]')
    config = ("--config", str(device.config))

    code, result, err, elapsed = timed(cli, "enroll", *config)
    assert code == 0, err  # the credential is installed; the failed hook does not undo that
    assert elapsed < RUN_BOUND_S
    assert result["outcome"] == "enrolled" and result["slot"] == "op-a"
    assert result["deploy_hook"]["exit_status"] == 3
    [note] = result["notes"]
    assert note.startswith("deployment failed (attempt 1; retried by the next run)"), note
    assert f"deploy hook {hook} exited with status 3" in note, note
    serial = result["serial"]
    cert = certificate_on_sim(device.sim, "op-a")
    assert f"{cert.serial_number:X}" == serial
    assert calls.read_text().splitlines() == [f"1 op-a {serial}"]

    status = status_json(cli, device)
    credential = active_credential(status)
    assert (status["active_slot"], credential["serial"]) == ("op-a", serial)
    deployment = status["deployment"]
    assert (deployment["state"], deployment["attempts"]) == ("failed", 1), deployment
    assert f"deploy hook {hook} exited with status 3" in deployment["error"], deployment

    # 1st `run`: nothing due, but the deployment failed -> full path, hook again, fails again
    code, result, err, elapsed = timed(cli, "run", *config)
    assert code == 0, err
    assert elapsed < RUN_BOUND_S
    assert (result["outcome"], result["serial"]) == ("not-due", serial)
    assert result["deploy_hook"]["exit_status"] == 3
    assert result["notes"][0].startswith("deployment failed (attempt 2;"), result["notes"]
    assert result["card_link"]["apdus"] > FAST_PATH_APDUS  # the full path read both slots
    status = status_json(cli, device)
    assert (status["deployment"]["state"], status["deployment"]["attempts"]) == ("failed", 2)
    assert active_credential(status) == credential

    # 2nd `run`: the hook succeeds this time
    code, result, err, elapsed = timed(cli, "run", *config)
    assert code == 0, err
    assert elapsed < RUN_BOUND_S
    assert (result["outcome"], result["serial"]) == ("not-due", serial)
    assert result["deploy_hook"]["exit_status"] == 0
    assert result["notes"] == []
    status = status_json(cli, device)
    assert (status["deployment"]["state"], status["deployment"]["attempts"]) == ("done", 3)
    assert status["deployment"]["error"] is None
    assert active_credential(status) == credential
    assert calls.read_text().splitlines() == [f"{n} op-a {serial}" for n in (1, 2, 3)]

    # 3rd `run`: deployed, nothing due -> the fast path, no hook
    code, result, err, elapsed = timed(cli, "run", *config)
    assert code == 0, err
    assert elapsed < RUN_BOUND_S
    assert (result["outcome"], result["serial"]) == ("not-due", serial)
    assert result["card_link"]["apdus"] == FAST_PATH_APDUS
    assert result["deploy_hook"] is None
    assert len(calls.read_text().splitlines()) == 3  # the hook did not run again
    status = status_json(cli, device)
    assert (status["deployment"]["state"], status["deployment"]["attempts"]) == ("done", 3)
    assert active_credential(status) == credential
    # and no second certificate was requested along the way
    log = [json.loads(line) for line in server.config.issuance_log.read_text().splitlines()]
    assert [(e["event"], e["serial"].upper()) for e in log] == [("issued", serial)]


def test_pem_export_into_a_missing_directory_is_retried_until_it_exists(
    device: Device,
    start_server: Callable[..., EstTestServer],
    dev_pki: DevPki,
    cli: Run,
) -> None:
    server = start_server()
    export = device.root / "not-yet" / "device.pem"
    device.write_config(server, dev_pki, paths__export_pem=f'"{export}"')
    config = ("--config", str(device.config))

    code, result, err, elapsed = timed(cli, "enroll", *config)
    assert code == 0, err
    assert elapsed < RUN_BOUND_S
    assert result["outcome"] == "enrolled"
    serial = result["serial"]
    [note] = result["notes"]
    assert note.startswith("deployment failed (attempt 1; retried by the next run)"), note
    assert f"cannot write the PEM export {export}: not found" in note, note
    assert not export.parent.exists()  # the agent does not invent directories for the export
    status = status_json(cli, device)
    credential = active_credential(status)
    assert credential["serial"] == serial
    assert (status["deployment"]["state"], status["deployment"]["attempts"]) == ("failed", 1)

    code, result, err, elapsed = timed(cli, "run", *config)
    assert code == 0, err
    assert elapsed < RUN_BOUND_S
    assert result["outcome"] == "not-due"
    assert result["notes"][0].startswith("deployment failed (attempt 2;"), result["notes"]
    status = status_json(cli, device)
    assert (status["deployment"]["state"], status["deployment"]["attempts"]) == ("failed", 2)
    assert active_credential(status) == credential

    export.parent.mkdir()  # the administrator fixes the target
    code, result, err, elapsed = timed(cli, "run", *config)
    assert code == 0, err
    assert elapsed < RUN_BOUND_S
    assert (result["outcome"], result["notes"]) == ("not-due", [])
    exported = x509.load_pem_x509_certificates(export.read_bytes())
    assert f"{exported[0].serial_number:X}" == serial
    assert exported[0] == certificate_on_sim(device.sim, "op-a")
    assert export.stat().st_mode & 0o777 == 0o644
    status = status_json(cli, device)
    assert (status["deployment"]["state"], status["deployment"]["attempts"]) == ("done", 3)
    assert active_credential(status) == credential

    export.write_bytes(b"changed by someone else\n")  # a rewrite would put the PEM back
    code, result, err, elapsed = timed(cli, "run", *config)
    assert code == 0, err
    assert result["outcome"] == "not-due"
    assert result["card_link"]["apdus"] == FAST_PATH_APDUS
    assert export.read_bytes() == b"changed by someone else\n"  # not exported again
    status = status_json(cli, device)
    assert (status["deployment"]["state"], status["deployment"]["attempts"]) == ("done", 3)
