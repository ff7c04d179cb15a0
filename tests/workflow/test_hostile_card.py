"""Issue 9, credential loss: a card that cannot be read is not an empty card.

An enrolled device (op-a active, op-b empty) meets a card that misbehaves, switched on through
the configuration only (``card.reader = "sim:sim.json?faults=faults.txt&timeout=1"``: the virtual
SIM's fault switches). Whatever the command, the typed error has its documented exit code, the
run is bounded in time, and afterwards a clean look at the card (``status --json`` with the
faults gone) shows the active credential exactly as before; where nothing may be written, the
SIM's state file is byte for byte unchanged.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from est_agent.card.channel import CardSession
from est_agent.card.uicc import UiccFiles
from est_agent.card.uri import UiccPath
from est_agent.sim.transport import SimTransport
from est_agent.store import HEADER_SIZE, MAGIC
from est_agent.testserver import DevPki, EstTestServer
from tests.conftest import Run
from tests.workflow.conftest import Device

pytestmark = pytest.mark.integration

OP_B_EF = UiccPath((0x7FF0, 0x6F02))
COMMANDS = {
    "run": ("run",),
    "renew": ("renew", "--force"),
    "enroll": ("enroll",),
}


@pytest.fixture
def enrolled(
    device: Device, start_server: Callable[..., EstTestServer], dev_pki: DevPki, cli: Run
) -> Device:
    device.write_config(
        start_server(), dev_pki, card__reader='"sim:sim.json?faults=faults.txt&timeout=1"'
    )
    faults(device, "")
    code, _, err = cli("enroll", "--config", str(device.config))
    assert code == 0, err
    return device


def faults(device: Device, spec: str) -> None:
    (device.root / "faults.txt").write_text(f"# injected by the test\n{spec}\n")


def clean_status(cli: Run, device: Device) -> dict[str, Any]:
    faults(device, "")
    code, out, err = cli("status", "--config", str(device.config), "--json")
    assert code == 0, err
    return dict(json.loads(out))


def active_credential(status: dict[str, Any]) -> dict[str, Any]:
    name = status["active_slot"]
    assert name is not None, status
    slot = next(s for s in status["slots"] if s["name"] == name)
    return {"active_slot": name, **slot}


def run_hostile(cli: Run, device: Device, spec: str, command: str) -> tuple[int, str, float]:
    faults(device, spec)
    started = time.monotonic()
    code, _, err = cli(*COMMANDS[command], "--config", str(device.config), "--json")
    return code, err, time.monotonic() - started


UNREADABLE = [
    ("ins=CD sw=6F00", "key-unreadable"),  # READ PUBLIC KEY: "no precise diagnosis"
    ("ins=B0 sw=6F00", "record-unreadable"),  # READ BINARY
    ("ins=B0 sw=6A82", "record-unreadable"),  # READ BINARY: "file not found"
    ("ins=A4 p1=08 sw=6A82", "record-unreadable"),  # SELECT by path
    ("ins=B0 sw=6982", "record-unreadable"),  # security status not satisfied
    ("ins=B0 truncate=1", "record-unreadable"),  # one byte, no status word
]


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize(("spec", "reason"), UNREADABLE, ids=[u[0] for u in UNREADABLE])
def test_an_unreadable_slot_stops_every_command_and_nothing_is_written(
    enrolled: Device, cli: Run, spec: str, reason: str, command: str
) -> None:
    device = enrolled
    before = clean_status(cli, device)
    sim_before = device.sim.read_bytes()
    code, err, elapsed = run_hostile(cli, device, spec, command)
    assert code == 76, err
    assert "[SlotUnreadableError]" in err and "nothing was written" in err, err
    assert reason in err
    assert "Traceback" not in err
    assert elapsed < 5.0
    assert device.sim.read_bytes() == sim_before  # no key generated, no record written
    assert active_credential(clean_status(cli, device)) == active_credential(before)


def test_status_shows_an_unreadable_slot_as_unknown(enrolled: Device, cli: Run) -> None:
    faults(enrolled, "ins=CD sw=6F00")
    code, out, err = cli("status", "--config", str(enrolled.config), "--json")
    assert code == 0, err
    slots = {s["name"]: s for s in json.loads(out)["slots"]}
    assert (slots["op-a"]["status"], slots["op-a"]["reason"]) == ("unknown", "key-unreadable")
    assert json.loads(out)["active_slot"] is None


@pytest.mark.parametrize(
    ("spec", "command", "code", "message"),
    [
        # the card signs garbage in the TLS handshake: refused before anything is generated
        ("ins=2B bad_signature", "renew", 76, "does not verify"),
        # a card that never answers: the APDU deadline, then 69
        ("ins=B0 silence", "run", 69, "within 1 s"),
        ("ins=CD silence", "renew", 69, "within 1 s"),
        ("ins=B0 disconnect", "enroll", 69, "removed"),
    ],
)
def test_a_hostile_card_leaves_the_sim_as_it_was(
    enrolled: Device, cli: Run, spec: str, command: str, code: int, message: str
) -> None:
    device = enrolled
    before = clean_status(cli, device)
    sim_before = device.sim.read_bytes()
    got, err, elapsed = run_hostile(cli, device, spec, command)
    assert got == code, err
    assert message in err
    assert "Traceback" not in err
    assert elapsed < 5.0
    assert device.sim.read_bytes() == sim_before
    assert active_credential(clean_status(cli, device)) == active_credential(before)


@pytest.mark.parametrize(
    ("spec", "code"),
    [
        ("ins=D6 disconnect", 69),  # the card went away while the new record was written
        ("ins=D6 sw=6581", 73),  # memory problem: not installed
        ("ins=D6 from=2 sw=6581", 73),  # a torn record: the first chunk written, then refused
        ("ins=B9 sw=6A84", 76),  # no key can be generated in op-b
        ("ins=B9 wrong_public_key", 76),  # the card lies about the new key: the CSR fails
    ],
)
def test_a_failed_renewal_keeps_the_working_credential(
    enrolled: Device, cli: Run, spec: str, code: int
) -> None:
    device = enrolled
    before = clean_status(cli, device)
    got, err, elapsed = run_hostile(cli, device, spec, "renew")
    assert got == code, err
    assert "Traceback" not in err
    assert elapsed < 5.0
    after = clean_status(cli, device)
    assert active_credential(after) == active_credential(before)
    # and the next clean renewal goes through, into the other slot
    code, out, err = cli("renew", "--force", "--config", str(device.config), "--json")
    assert code == 0, err
    assert json.loads(out)["slot"] == "op-b"


def test_a_card_misreporting_the_active_key_never_costs_the_credential(
    enrolled: Device, cli: Run
) -> None:
    # READ PUBLIC KEY answers another key than the one the card holds: op-a looks like
    # "key regenerated without its certificate". The run enrolls afresh into the empty op-b
    # and leaves op-a's record alone (an empty slot is written before a damaged one).
    device = enrolled
    before = clean_status(cli, device)
    code, err, _ = run_hostile(cli, device, "ins=CD wrong_public_key", "run")
    assert code == 0, err
    after = clean_status(cli, device)
    slots = {s["name"]: s for s in after["slots"]}
    op_a = active_credential(before)
    assert {k: slots["op-a"][k] for k in ("status", "sequence", "serial")} == {
        k: op_a[k] for k in ("status", "sequence", "serial")
    }
    assert slots["op-b"]["status"] == "valid" and after["active_slot"] == "op-b"


def _write_bogus_header(sim: Path, length: int) -> None:
    session = CardSession(SimTransport(sim))
    try:
        header = MAGIC + b"\x01\x00" + (5).to_bytes(4, "big") + length.to_bytes(2, "big")
        header += b"\x00" * (HEADER_SIZE - len(header))
        UiccFiles(session.basic_channel).update(OP_B_EF, header)
    finally:
        session.close()


def test_a_record_claiming_more_than_its_ef_is_damaged_not_fatal(
    enrolled: Device, cli: Run
) -> None:
    device = enrolled
    before = clean_status(cli, device)
    _write_bogus_header(device.sim, 60000)
    status = clean_status(cli, device)
    slots = {s["name"]: s for s in status["slots"]}
    assert (slots["op-b"]["status"], slots["op-b"]["reason"]) == ("damaged", "length-beyond-ef")
    assert active_credential(status) == active_credential(before)
    code, out, err = cli("run", "--config", str(device.config), "--json")
    assert code == 0, err
    assert (json.loads(out)["outcome"], json.loads(out)["slot"]) == ("not-due", "op-a")
    # the damaged, non-active slot is where the renewal goes
    code, out, err = cli("renew", "--force", "--config", str(device.config), "--json")
    assert code == 0, err
    assert json.loads(out)["slot"] == "op-b"
    assert active_credential(clean_status(cli, device))["sequence"] == 6  # after the bogus 5


def test_a_card_misreporting_the_newest_key_with_no_empty_slot_stops_the_run(
    enrolled: Device, cli: Run
) -> None:
    # Both slots hold credentials (op-b the newest). The card reports another key for op-b:
    # op-b looks "key regenerated", and the only slot a renewal could write is op-b itself.
    # Overwriting it would cost the working credential if the card is lying: stop instead.
    device = enrolled
    code, _, err = cli("renew", "--force", "--config", str(device.config))
    assert code == 0, err
    before = clean_status(cli, device)
    assert before["active_slot"] == "op-b"
    sim_before = device.sim.read_bytes()
    # the slots are read op-a, then op-b: the second READ PUBLIC KEY is op-b's
    code, err, elapsed = run_hostile(cli, device, "ins=CD nth=2 wrong_public_key", "renew")
    assert code == 76, err
    assert "[SlotUnreadableError]" in err and "not overwritten" in err, err
    assert elapsed < 5.0
    assert device.sim.read_bytes() == sim_before
    assert clean_status(cli, device)["slots"] == before["slots"]
