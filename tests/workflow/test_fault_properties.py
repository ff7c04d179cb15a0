"""Issue 9, property: whatever card faults strike during enroll / renew / run, in any order, the
device never loses its working credential and never adopts a certificate for another key.

Each example is a fresh device and a sequence of steps; each step is a command run against
the in-process virtual SIM with a few random fault rules (est_agent/sim/faults.py: a status
word instead of an answer, a truncated answer, a disconnect, silence, a lying public key, a
signature that does not verify) on random commands and occurrences. After every step the SIM
is judged independently of the store (records and keys read straight through the card layer):

* the credential valid before the step is still there, or a newer valid one replaced the
  superseded older one (the only slot a renewal may write when both are valid);
* once a device has a valid credential, it always has one;
* what the agent reports (``status --json`` with a clean card) is exactly what is on the card:
  the same valid slots, the same active one, nothing valid that does not match its key;
* every command ends with a documented exit code, never a traceback.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from est_agent.backends.signer import public_key_from_point
from est_agent.card.channel import CardSession
from est_agent.card.iotsafe import IotSafeApplet
from est_agent.card.uicc import UiccFiles
from est_agent.card.uri import IotSafeRef, ObjectKind, UiccPath
from est_agent.cli.main import main
from est_agent.sim.transport import SimTransport
from est_agent.store import HEADER_SIZE, decode_header
from est_agent.testserver import DevPki, EstTestServer, ServerConfig
from tests.workflow.conftest import Device

pytestmark = pytest.mark.integration

SLOTS = {
    "op-a": (UiccPath((0x7FF0, 0x6F01)), b"\x02"),
    "op-b": (UiccPath((0x7FF0, 0x6F02)), b"\x03"),
}
DOCUMENTED_EXITS = {0, 69, 73, 75, 76, 77}

INS = ["A4", "B0", "D6", "B9", "CD", "2A", "2B", "70", "CB"]
ACTIONS = [
    "sw=6F00",
    "sw=6A82",
    "sw=6581",
    "sw=6985",
    "truncate=1",
    "truncate=3",
    "disconnect",
    "silence",
    "wrong_public_key",
    "bad_signature",
]
rules = st.tuples(st.sampled_from(INS), st.integers(1, 4), st.sampled_from(ACTIONS)).map(
    lambda r: f"ins={r[0]} nth={r[1]} {r[2]}"
)
steps = st.lists(
    st.tuples(st.sampled_from(["enroll", "renew", "run"]), st.lists(rules, max_size=3)),
    min_size=1,
    max_size=5,
)


@dataclass(frozen=True)
class Truth:
    """What the card really holds: the valid slots by name -> (sequence, certificate hash)."""

    valid: dict[str, tuple[int, str]]

    @property
    def active(self) -> str | None:
        if not self.valid:
            return None
        return max(self.valid, key=lambda name: (self.valid[name][0], name == "op-a"))


def truth_of(sim: Path) -> Truth:
    valid: dict[str, tuple[int, str]] = {}
    session = CardSession(SimTransport(sim))
    try:
        files = UiccFiles(session.basic_channel)
        applet = IotSafeApplet.open(session)
        for name, (ef, key_id) in SLOTS.items():
            raw = files.read(ef)
            header = decode_header(raw)
            if header is None:
                continue
            der = raw[HEADER_SIZE : HEADER_SIZE + header.length]
            if hashlib.sha256(der).digest() != header.sha256:
                continue
            cert = x509.load_der_x509_certificate(der)
            try:
                ref = IotSafeRef(ObjectKind.PUBLIC_KEY, object_id=key_id)
                key = public_key_from_point(applet.read_public_key(ref))
            except Exception:
                continue  # no key in the slot
            if key == cert.public_key():
                valid[name] = (header.sequence, hashlib.sha256(der).hexdigest())
    finally:
        session.close()
    return Truth(valid)


def cli(*argv: str) -> tuple[int, str, str]:
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def server(dev_pki: DevPki, tmp_path_factory: pytest.TempPathFactory) -> Any:
    config = ServerConfig(
        pki_dir=dev_pki.directory,
        host="127.0.0.1",
        port=0,
        issuance_log=tmp_path_factory.mktemp("log") / "issuance.jsonl",
    )
    started = EstTestServer(config, pki=dev_pki)
    started.quiet()
    started.start()
    yield started
    started.close()


@settings(
    max_examples=60,
    deadline=None,
    print_blob=True,  # a failure in CI prints the @reproduce_failure line
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(sequence=steps)
def test_no_sequence_of_card_faults_costs_the_credential(
    sequence: list[tuple[str, list[str]]],
    server: EstTestServer,
    dev_pki: DevPki,
    sim_template: bytes,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    root = tmp_path_factory.mktemp("device")
    sim = root / "sim.json"
    sim.write_bytes(sim_template)
    device = Device(root, sim, root / "est-agent.toml", root / "state")
    device.write_config(
        server,
        dev_pki,
        # both deadlines short: a `silence` fault on GENERATE KEY PAIR would otherwise cost the
        # 60 s key-generation deadline each time (a 10-minute CI run once)
        card__reader='"sim:sim.json?faults=faults.txt&timeout=0.2&keygen_timeout=0.2"',
    )
    faults = root / "faults.txt"
    try:
        for command, fault_rules in sequence:
            before = truth_of(sim)
            faults.write_text("\n".join(fault_rules) + "\n")
            argv = [command, "--force"] if command == "renew" else [command]
            code, _, err = cli(*argv, "--config", str(device.config))
            assert code in DOCUMENTED_EXITS, (command, fault_rules, code, err)
            event(f"{command} exit {code}")
            assert "Traceback" not in err
            after = truth_of(sim)
            if before.active is not None:
                kept = before.valid[before.active]
                assert after.valid.get(before.active) == kept or (
                    after.active is not None and after.valid[after.active][0] > kept[0]
                ), (command, fault_rules, before, after, err)
                assert after.valid, "the device lost its only credential"
            # the agent sees exactly what is on the card
            faults.write_text("")
            code, out, err = cli("status", "--config", str(device.config), "--json")
            assert code == 0, err
            status = json.loads(out)
            reported = {s["name"] for s in status["slots"] if s["status"] == "valid"}
            assert reported == set(after.valid), (status, after)
            assert status["active_slot"] == after.active
    finally:
        shutil.rmtree(root, ignore_errors=True)
