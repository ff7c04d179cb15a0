"""First boot, renewal, status and the 202 path against the EST test server over real TLS,
with every key inside the (in-process) virtual SIM."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from est_agent.backends.iotsafe import CardSigner
from est_agent.card.channel import CardSession
from est_agent.card.iotsafe import IotSafeApplet
from est_agent.card.uicc import UiccFiles
from est_agent.card.uri import IotSafeRef, ObjectKind, UiccPath
from est_agent.config import load_config
from est_agent.errors import EnrollmentPending
from est_agent.sim.transport import SimTransport
from est_agent.store import HEADER_SIZE, decode_header
from est_agent.testserver import DevPki, EstTestServer
from est_agent.testserver.config import Profile
from est_agent.workflow.agent import Agent
from est_agent.workflow.result import Outcome
from tests.conftest import Run
from tests.workflow.conftest import ICCID, Device, openssl_verify

pytestmark = pytest.mark.integration

SLOT_EF = {"op-a": UiccPath((0x7FF0, 0x6F01)), "op-b": UiccPath((0x7FF0, 0x6F02))}
SLOT_KEY = {"op-a": b"\x02", "op-b": b"\x03"}


def certificate_on_sim(sim: Path, slot: str) -> x509.Certificate:
    """Read a slot straight from the SIM with the card layer (not through the store)."""
    session = CardSession(SimTransport(sim))
    try:
        files = UiccFiles(session.basic_channel)
        raw = files.read(SLOT_EF[slot])
        header = decode_header(raw)
        assert header is not None, f"no record in slot {slot}"
        cert = x509.load_der_x509_certificate(raw[HEADER_SIZE : HEADER_SIZE + header.length])
        applet = IotSafeApplet.open(session)
        key = IotSafeRef(ObjectKind.PRIVATE_KEY, object_id=SLOT_KEY[slot])
        assert CardSigner.from_card(applet, key).public_key() == cert.public_key()
        return cert
    finally:
        session.close()


def test_first_boot_enroll_then_nothing_to_do(
    device: Device,
    start_server: Callable[..., EstTestServer],
    dev_pki: DevPki,
    cli: Run,
    tmp_path: Path,
) -> None:
    server = start_server()
    device.write_config(server, dev_pki)
    code, out, err = cli("enroll", "--config", str(device.config), "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["outcome"] == "enrolled" and result["slot"] == "op-a"
    assert "[1/6] reading the credential slots on the SIM" in err
    cert = certificate_on_sim(device.sim, "op-a")
    assert f"{cert.serial_number:X}" == result["serial"]
    assert cert.subject.rfc4514_string() == f"CN={ICCID}"
    openssl_verify(cert, dev_pki, tmp_path)
    log = [json.loads(line) for line in server.config.issuance_log.read_text().splitlines()]
    assert [entry["operation"] for entry in log] == ["simpleenroll"]

    code, out, _ = cli("enroll", "--config", str(device.config), "--json")
    assert code == 0 and json.loads(out)["outcome"] == "already-enrolled"
    code, out, _ = cli("run", "--config", str(device.config), "--json")
    assert code == 0 and json.loads(out)["outcome"] == "not-due"
    # neither touched the server
    assert len(server.config.issuance_log.read_text().splitlines()) == 1


def test_renew_rotates_to_the_other_slot_and_back(
    device: Device,
    start_server: Callable[..., EstTestServer],
    dev_pki: DevPki,
    cli: Run,
) -> None:
    server = start_server()
    device.write_config(server, dev_pki)
    assert cli("enroll", "--config", str(device.config))[0] == 0
    first = certificate_on_sim(device.sim, "op-a")

    code, out, err = cli("renew", "--force", "--config", str(device.config), "--json")
    assert code == 0, err
    assert json.loads(out)["outcome"] == "renewed" and json.loads(out)["slot"] == "op-b"
    second = certificate_on_sim(device.sim, "op-b")
    assert second.public_key() != first.public_key()  # rekeyed inside the SIM
    assert second.subject.public_bytes() == first.subject.public_bytes()
    # the old credential is still intact in its slot
    assert certificate_on_sim(device.sim, "op-a") == first

    code, out, _ = cli("renew", "--force", "--config", str(device.config), "--json")
    assert code == 0 and json.loads(out)["slot"] == "op-a"
    ops = [json.loads(x)["operation"] for x in server.config.issuance_log.read_text().splitlines()]
    assert ops == ["simpleenroll", "simplereenroll", "simplereenroll"]

    code, out, _ = cli("status", "--config", str(device.config), "--json")
    status = json.loads(out)
    assert status["active_slot"] == "op-a" and status["iccid"] == ICCID
    assert {s["name"]: s["status"] for s in status["slots"]} == {"op-a": "valid", "op-b": "valid"}


class FakeClock:
    """The agent's clock (renewal timing, pending waits), moved by the test: days pass at once.
    The EST server, TLS and the issued certificates keep real time."""

    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


def agent_on(device: Device, clock: FakeClock) -> Agent:
    return Agent(load_config(device.config), clock=clock)


def test_renewal_when_due_and_bootstrap_fallback_after_expiry(
    device: Device,
    start_server: Callable[..., EstTestServer],
    dev_pki: DevPki,
) -> None:
    server = start_server(default_profile=Profile(validity_s=30 * 86400))
    device.write_config(server, dev_pki)
    clock = FakeClock()
    assert agent_on(device, clock).enroll().outcome == Outcome.ENROLLED
    assert agent_on(device, clock).run().outcome == Outcome.NOT_DUE
    clock.advance(days=21)  # past 2/3 of a 30-day lifetime: due
    assert agent_on(device, clock).run().outcome == Outcome.RENEWED
    clock.advance(days=31)  # the renewed certificate has expired too: back to the bootstrap key
    assert agent_on(device, clock).run().outcome == Outcome.ENROLLED
    ops = [json.loads(x)["operation"] for x in server.config.issuance_log.read_text().splitlines()]
    assert ops == ["simpleenroll", "simplereenroll", "simpleenroll"]


def test_pending_202_is_stored_and_resumed_with_the_same_key(
    device: Device,
    start_server: Callable[..., EstTestServer],
    dev_pki: DevPki,
    cli: Run,
) -> None:
    server = start_server(manual_approval_s=0.05)  # the server says: Retry-After: 1
    device.write_config(server, dev_pki)
    clock = FakeClock()
    with pytest.raises(EnrollmentPending):
        agent_on(device, clock).enroll()
    state = json.loads((device.state_dir / "state.json").read_text())
    assert state["pending"]["operation"] == "simpleenroll"
    key_hex = state["pending"]["public_key"]
    requests = len(server.config.issuance_log.read_text().splitlines())
    with pytest.raises(EnrollmentPending, match="pending"):  # before Retry-After: no network
        agent_on(device, clock).enroll()
    assert len(server.config.issuance_log.read_text().splitlines()) == requests
    clock.advance(seconds=2)
    # the server approves 0.05 s of real time after the first request (the agent's clock is
    # fake, the server's is not): on a fast run the resumed request came sooner and was 202 again
    time.sleep(0.1)
    assert agent_on(device, clock).enroll().outcome == Outcome.ENROLLED
    cert = certificate_on_sim(device.sim, "op-a")
    from cryptography.hazmat.primitives.serialization import PublicFormat

    assert (
        cert.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint).hex()
        == key_hex
    )
    assert json.loads((device.state_dir / "state.json").read_text())["pending"] is None


@pytest.mark.parametrize(
    "fault",
    [
        "http-500",
        "drop-mid-body",
        "garbage-base64",
        "not-pkcs7",
        "wrong-key",
        "foreign-ca",
        "expired-cert",
        "oversize-body",
        "wrong-content-type",
    ],
)
def test_hostile_server_leaves_the_active_credential(
    device: Device,
    start_server: Callable[..., EstTestServer],
    dev_pki: DevPki,
    cli: Run,
    fault: str,
) -> None:
    good = start_server()
    device.write_config(good, dev_pki)
    assert cli("enroll", "--config", str(device.config))[0] == 0
    before = certificate_on_sim(device.sim, "op-a")
    from est_agent.testserver.config import Fault

    bad = start_server(fault=Fault(fault))
    device.write_config(bad, dev_pki)
    code, _, err = cli("renew", "--force", "--config", str(device.config))
    assert code in (69, 75, 76), err
    code, out, _ = cli("status", "--config", str(device.config), "--json")
    status = json.loads(out)
    assert status["active_slot"] == "op-a"
    assert certificate_on_sim(device.sim, "op-a") == before


def test_untrusted_server_gets_no_card_signature(
    device: Device,
    start_server: Callable[..., EstTestServer],
    dev_pki: DevPki,
    cli: Run,
) -> None:
    server = start_server()
    device.write_config(server, dev_pki)
    # trust the EST CA instead of the TLS CA: the server's certificate does not verify
    (device.root / "tls-ca.pem").write_bytes(dev_pki.est_ca.certificate.public_bytes(Encoding.PEM))
    text = device.config.read_text()
    device.config.write_text(
        text.replace(str(device.root / "tls-ca.pem"), str(device.root / "est-ca.pem"))
    )
    (device.root / "est-ca.pem").write_bytes(dev_pki.est_ca.certificate.public_bytes(Encoding.PEM))
    code, _, err = cli("enroll", "--config", str(device.config))
    assert code == 76 and "TlsVerificationError" in err
    assert not server.config.issuance_log.exists() or not server.config.issuance_log.read_text()


def test_export_and_deploy_hook_after_install(
    device: Device,
    start_server: Callable[..., EstTestServer],
    dev_pki: DevPki,
    cli: Run,
) -> None:
    server = start_server()
    hook = device.root / "hook.sh"
    seen = device.root / "hook-env.txt"
    hook.write_text(f"#!/bin/sh\nenv | grep ^EST_AGENT_ | sort > {seen}\nexit 3\n")
    hook.chmod(0o755)
    export = device.root / "out" / "device.pem"
    export.parent.mkdir()
    device.write_config(
        server, dev_pki, paths__export_pem=f'"{export}"', paths__deploy_hook=f'["{hook}"]'
    )
    code, out, err = cli("enroll", "--config", str(device.config), "--json")
    assert code == 0, err  # a failing hook is reported, the certificate stays installed
    assert json.loads(out)["deploy_hook"]["exit_status"] == 3
    cert = certificate_on_sim(device.sim, "op-a")
    exported = x509.load_pem_x509_certificates(export.read_bytes())
    assert exported[0] == cert
    assert export.stat().st_mode & 0o777 == 0o644
    env = dict(line.split("=", 1) for line in seen.read_text().splitlines())
    assert env["EST_AGENT_SLOT"] == "op-a"
    assert env["EST_AGENT_KEY"] == "iotsafe:key-id=02"
    assert env["EST_AGENT_SERIAL"] == f"{cert.serial_number:X}"
    assert env["EST_AGENT_PEM"] == str(export)


def test_retry_after_is_capped_by_the_configuration(
    device: Device,
    start_server: Callable[..., EstTestServer],
    dev_pki: DevPki,
    cli: Run,
) -> None:
    server = start_server(manual_approval_s=600.0)  # the server says: come back in 10 minutes
    device.write_config(server, dev_pki, renewal__retry_cap_s="2")
    code, _, err = cli("enroll", "--config", str(device.config))
    assert code == 75, err
    pending = json.loads((device.state_dir / "state.json").read_text())["pending"]
    from datetime import datetime

    wait = datetime.fromisoformat(pending["retry_at"]) - datetime.fromisoformat(pending["since"])
    assert 0 < wait.total_seconds() <= 2.0


def test_deploy_hook_is_told_the_active_slots_key_uri(
    device: Device,
    start_server: Callable[..., EstTestServer],
    dev_pki: DevPki,
    cli: Run,
) -> None:
    """EST_AGENT_KEY names the key of the slot just made active, in the configuration's URI
    form: op-a (key 02) after enroll, op-b (03) after the first renewal, op-a after the next."""
    server = start_server()
    calls = device.root / "hook-calls.txt"
    hook = device.root / "hook.sh"
    hook.write_text(f'#!/bin/sh\necho "$EST_AGENT_SLOT $EST_AGENT_KEY" >> "{calls}"\n')
    hook.chmod(0o755)
    device.write_config(server, dev_pki, paths__deploy_hook=f'["{hook}"]')
    started = time.monotonic()
    code, _, err = cli("enroll", "--config", str(device.config))
    assert code == 0, err
    assert calls.read_text().splitlines() == ["op-a iotsafe:key-id=02"]
    for expected in ("op-b iotsafe:key-id=03", "op-a iotsafe:key-id=02"):
        code, _, err = cli("renew", "--force", "--config", str(device.config))
        assert code == 0, err
        assert calls.read_text().splitlines()[-1] == expected
    assert len(calls.read_text().splitlines()) == 3
    assert time.monotonic() - started < 60.0
