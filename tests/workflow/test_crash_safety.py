"""Crash safety (issue 5, item 8): cut the card's power after every APDU index in turn, kill the
agent at every network step, then re-run normally. Whatever the cut point, the device must end
with a valid credential, never adopt a certificate that does not match its slot's key, and never
lose the credential that was valid when the operation started.

The power cut is the one of the virtual SIM: the card persists its state before answering each
state-changing APDU, so a link cut after N answered APDUs leaves exactly the first N completed,
and the (N+1)th never reaches the card. Here the cut sits in a transport wrapped around the
in-process ``SimTransport`` (the same semantics as ``est-agent sim serve --power-cut-after N``,
which tests/integration/test_crash_safety_pcsc.py drives through pcscd + vpcd).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from est_agent.config import load_config
from est_agent.errors import NoCardError
from est_agent.est.client import Enrollment, EstCaCerts, EstClient
from est_agent.est.messages import CsrAttributes
from est_agent.testserver import DevPki, EstTestServer
from est_agent.transport.base import CardTransport
from est_agent.workflow.agent import Agent
from est_agent.workflow.session import backend_opener
from tests.conftest import Run
from tests.linkwrap import wrapped_reader_scheme
from tests.workflow.conftest import Device, openssl_verify
from tests.workflow.test_enroll_renew import certificate_on_sim

pytestmark = pytest.mark.integration

#: what a slot may look like after any crash: never a record that is intact but unusable
ALLOWED_SLOT_STATUS = {"valid", "empty", "damaged:torn", "damaged:key-mismatch"}
#: exit codes of a run whose card link died: 69 card unavailable, 73 certificate not installed
CUT_EXIT_CODES = {69, 73}
INS_MANAGE_CHANNEL = 0x70
INS_UPDATE_BINARY = 0xD6
INS_GENERATE_KEY = 0xB9


# --- the power cut ----------------------------------------------------------------------------


@dataclass
class Link:
    """Every card link the agent opens during one command: counts the APDUs the card answered,
    and once ``cut_after`` of them were answered the power is gone for good (this run)."""

    cut_after: int | None = None
    answered: int = 0
    refused: int = 0
    #: CLA INS P1 P2 of each answered command, in order
    headers: list[bytes] = field(default_factory=list)

    def arm(self, cut_after: int | None) -> None:
        self.cut_after = cut_after
        self.answered = 0
        self.refused = 0
        self.headers.clear()

    def index_of(self, ins: int) -> int:
        """Index of the first answered command with this INS."""
        return next(i for i, h in enumerate(self.headers) if h[1] == ins)


class PowerCutTransport(CardTransport):
    """Forwards to the real transport until the link's budget is used up; after that every APDU
    raises ``NoCardError`` without reaching the card, as when the card loses power."""

    def __init__(self, inner: CardTransport, link: Link) -> None:
        super().__init__()
        self.inner = inner
        self.link = link

    @property
    def description(self) -> str:
        return self.inner.description

    @property
    def atr(self) -> bytes:
        return self.inner.atr

    def _connect(self) -> None:
        if self.link.cut_after is not None and self.link.answered >= self.link.cut_after:
            self.link.refused += 1
            raise NoCardError("no card in the reader (power cut by the test)")
        self.inner.connect()

    def _transmit(self, apdu: bytes) -> bytes:
        link = self.link
        if link.cut_after is not None and link.answered >= link.cut_after:
            link.refused += 1
            raise NoCardError(f"card lost (power cut by the test after {link.cut_after} APDUs)")
        response = self.inner.transmit(apdu)
        link.answered += 1
        link.headers.append(bytes(apdu[:4]))
        return response

    def _close(self) -> None:
        self.inner.close()


@pytest.fixture
def link() -> Iterator[Link]:
    """Route every ``sim:`` card link the agent opens through a ``PowerCutTransport``."""
    shared = Link()
    with wrapped_reader_scheme("sim", lambda inner: PowerCutTransport(inner, shared)):
        yield shared


# --- device snapshots and checks ----------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    directory: Path

    @classmethod
    def take(cls, device: Device, directory: Path) -> Snapshot:
        if directory.exists():
            shutil.rmtree(directory)
        directory.mkdir(parents=True)
        shutil.copy2(device.sim, directory / "sim.json")
        if device.state_dir.exists():
            shutil.copytree(device.state_dir, directory / "state")
        return cls(directory)

    def restore(self, device: Device) -> None:
        shutil.copy2(self.directory / "sim.json", device.sim)
        if device.state_dir.exists():
            shutil.rmtree(device.state_dir)
        if (self.directory / "state").exists():
            shutil.copytree(self.directory / "state", device.state_dir)


@dataclass(frozen=True)
class Credential:
    slot: str
    sequence: int
    serial: str
    certificate: x509.Certificate


def status_of(cli: Run, device: Device) -> dict[str, Any]:
    code, out, err = cli("status", "--config", str(device.config), "--json")
    assert code == 0, err
    status: dict[str, Any] = json.loads(out)
    return status


def check_device(
    cli: Run,
    device: Device,
    dev_pki: DevPki,
    *,
    previous: Credential | None,
    previous_superseded_ok: bool,
    openssl_dir: Path | None = None,
) -> Credential:
    """The invariants after any crash (and after the re-run), read back from the SIM.

    * a valid active credential: the status names one, its slot is valid, the certificate read
      straight from the SIM with the card layer matches the key in that slot and was issued by
      the EST CA;
    * no slot holds an intact record that would be wrong to adopt: every slot is valid, empty,
      damaged (torn or key-mismatch), never unknown, and every valid one really matches its key;
    * the credential valid when the operation started is still in its slot, record intact, or
      (only when ``previous_superseded_ok``) that slot now holds a newer valid credential.
    """
    status = status_of(cli, device)
    slots = {s["name"]: s for s in status["slots"]}
    for name, slot in slots.items():
        assert slot_state(slot) in ALLOWED_SLOT_STATUS, (name, slot)
    active_name = status["active_slot"]
    assert active_name is not None, f"no active credential: {status}"
    active = slots[active_name]
    assert active["status"] == "valid", active
    valid = {name: s for name, s in slots.items() if s["status"] == "valid"}
    assert active["sequence"] == max(s["sequence"] for s in valid.values())
    for name, slot in valid.items():
        cert = certificate_on_sim(device.sim, name)  # asserts cert key == the slot's key
        assert f"{cert.serial_number:X}" == slot["serial"]
    cert = certificate_on_sim(device.sim, active_name)
    cert.verify_directly_issued_by(dev_pki.est_ca.certificate)
    now = datetime.now(UTC)
    assert cert.not_valid_before_utc <= now < cert.not_valid_after_utc
    if openssl_dir is not None:
        openssl_verify(cert, dev_pki, openssl_dir)
    if previous is not None:
        before = slots[previous.slot]
        intact = before["status"] == "valid" and (before["sequence"], before["serial"]) == (
            previous.sequence,
            previous.serial,
        )
        if not intact:
            assert previous_superseded_ok, f"previous credential lost: {before}"
            assert before["status"] == "valid" and before["sequence"] > previous.sequence, before
        assert active["sequence"] >= previous.sequence
    return Credential(active_name, active["sequence"], active["serial"], cert)


def slot_states(cli: Run, device: Device) -> tuple[str, ...]:
    status = status_of(cli, device)
    return tuple(f"{s['name']}={slot_state(s)}" for s in status["slots"])


def slot_state(slot: dict[str, Any]) -> str:
    """``valid``, ``empty``, or ``damaged:<reason>`` / ``unknown:<reason>`` of a status slot."""
    return slot["status"] if slot["status"] in ("valid", "empty") else (
        f"{slot['status']}:{slot['reason']}"
    )


# --- scenarios ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    name: str
    command: tuple[str, ...]
    #: commands run (uncut) before the snapshot: the device as the operation finds it
    setup: tuple[tuple[str, ...], ...]


ENROLL = ("enroll",)
RENEW = ("renew", "--force")
SCENARIOS = [
    Scenario("enroll", ENROLL, ()),
    # renewal into the empty second slot
    Scenario("renew", RENEW, (ENROLL,)),
    # renewal into a slot that still holds an older valid credential (both slots occupied)
    Scenario("renew-both-slots", RENEW, (ENROLL, RENEW)),
]


@dataclass
class Prepared:
    snapshot: Snapshot
    previous: Credential | None


@pytest.fixture
def prepare(
    device: Device,
    start_server: Callable[..., EstTestServer],
    dev_pki: DevPki,
    cli: Run,
    link: Link,
    tmp_path: Path,
) -> Callable[[Scenario], Prepared]:
    def run(scenario: Scenario) -> Prepared:
        server = start_server()
        device.write_config(server, dev_pki)
        link.arm(None)
        for command in scenario.setup:
            code, _, err = cli(*command, "--config", str(device.config))
            assert code == 0, err
        previous = None
        if scenario.setup:
            previous = check_device(
                cli, device, dev_pki, previous=None, previous_superseded_ok=False
            )
        return Prepared(Snapshot.take(device, tmp_path / "snapshot"), previous)

    return run


# --- 1. power cut at every APDU index -----------------------------------------------------------


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.name)
def test_power_cut_at_every_apdu(
    scenario: Scenario,
    prepare: Callable[[Scenario], Prepared],
    device: Device,
    dev_pki: DevPki,
    cli: Run,
    link: Link,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    prepared = prepare(scenario)
    argv = (*scenario.command, "--config", str(device.config))

    link.arm(None)
    code, _, err = cli(*argv)
    assert code == 0, err
    count = link.answered
    clean_headers = list(link.headers)
    assert count >= 10, clean_headers
    # a run that writes its certificate in more than one UPDATE BINARY can leave a torn record
    assert sum(1 for h in clean_headers if h[1] == INS_UPDATE_BINARY) >= 2

    passed = 0
    left_behind: dict[int, tuple[str, ...]] = {}
    codes: dict[int, int] = {}
    for n in range(count):
        prepared.snapshot.restore(device)
        link.arm(n)
        code, _, err = cli(*argv)
        assert link.refused >= 1, f"cut after {n}: the cut never happened"
        assert link.headers == clean_headers[:n], f"cut after {n}: the run took another path"
        assert "Traceback" not in err, err
        codes[n] = code
        if code == 0:
            # only the best-effort MANAGE CHANNEL close at the very end may go unanswered
            assert n == count - 1 and clean_headers[n][1] == INS_MANAGE_CHANNEL, (n, err)
        else:
            assert code in CUT_EXIT_CODES, f"cut after {n}: exit {code}\n{err}"
        link.arm(None)
        left_behind[n] = slot_states(cli, device)
        if prepared.previous is not None:
            # right after the crash: the credential of the start is still there and intact
            check_device(
                cli, device, dev_pki, previous=prepared.previous, previous_superseded_ok=False
            )

        code, _, err = cli(*argv)
        assert code == 0, f"re-run after a cut after {n} APDUs failed:\n{err}"
        final = check_device(
            cli,
            device,
            dev_pki,
            previous=prepared.previous,
            previous_superseded_ok=True,
            openssl_dir=tmp_path,
        )
        if prepared.previous is not None:
            assert final.sequence > prepared.previous.sequence  # the renewal did happen
        passed += 1

    with capsys.disabled():
        print(
            f"\ncrash safety, power cut [{scenario.name}]: {count} cut points tried, "
            f"{passed} passed (exit codes {sorted(set(codes.values()))})"
        )
    assert passed == count
    seen = {state for states in left_behind.values() for state in states}
    # the sweep really went through the dangerous intermediate states
    assert any(state.endswith("=damaged:torn") for state in seen), seen
    if scenario.name == "renew-both-slots":
        assert any(state.endswith("=damaged:key-mismatch") for state in seen), seen


def test_a_record_written_just_before_the_card_went_away_is_adopted_by_the_next_run(
    device: Device,
    start_server: Callable[..., EstTestServer],
    dev_pki: DevPki,
    cli: Run,
    link: Link,
) -> None:
    # The renewal's record reached the SIM, then the card went away before it was read back:
    # the host state still caches op-a but notes the write, so the fast path does not trust
    # the cache and the full run adopts the newer record in op-b.
    server = start_server()
    device.write_config(server, dev_pki)
    link.arm(None)
    assert cli("enroll", "--config", str(device.config))[0] == 0
    # one clean forced renewal first, to find the index of its last UPDATE BINARY
    snapshot = Snapshot.take(device, device.root / "before-renew")
    link.arm(None)
    assert cli("renew", "--force", "--config", str(device.config))[0] == 0
    headers = list(link.headers)
    last_update = max(i for i, h in enumerate(headers) if h[1] == INS_UPDATE_BINARY)
    snapshot.restore(device)
    link.arm(last_update + 1)  # the record is complete; its read-back never happens
    code, _, err = cli("renew", "--force", "--config", str(device.config))
    assert code == 69, err
    state = json.loads((device.state_dir / "state.json").read_text())
    assert state["installing"] is not None and state["active"]["slot"] == 0
    link.arm(None)
    code, out, err = cli("run", "--config", str(device.config), "--json")
    assert code == 0, err
    result = json.loads(out)
    assert (result["outcome"], result["slot"]) == ("not-due", "op-b")
    assert result["card_link"]["apdus"] > 6  # the full path ran
    state = json.loads((device.state_dir / "state.json").read_text())
    assert state["active"]["slot"] == 1 and state["installing"] is None
    code, out, _ = cli("run", "--config", str(device.config), "--json")
    # fast path again: the record header, then the key through the applet (MANAGE CHANNEL,
    # SELECT, READ PUBLIC KEY, MANAGE CHANNEL close)
    assert json.loads(out)["card_link"]["apdus"] == 6


# --- 2. the agent killed at each network step ---------------------------------------------------


class AgentKilled(BaseException):
    """The agent process dying (SIGKILL, OOM, power of the host): not an ``EstAgentError`` and
    not an ``Exception``, so no handler in est-agent turns it into an orderly exit."""


KILL_POINTS = [
    "cacerts:before",
    "cacerts:after",
    "csrattrs:before",
    "csrattrs:after",
    "enroll:before",  # key generated in the target slot, nothing sent
    "enroll:csr-signed",  # the card signed the CSR, the POST not sent
    "enroll:after",  # the server issued a certificate the agent never stores
    "install:after-write",  # record written and read back; host state, export, hook not done
]


def killing_client(point: str, fired: list[str]) -> type[EstClient]:
    """An ``EstClient`` that dies at ``point`` (the real client does the work around it)."""

    def die(where: str) -> None:
        if where == point:
            fired.append(where)
            raise AgentKilled(where)

    class KillingClient(EstClient):
        def cacerts(self) -> EstCaCerts:
            die("cacerts:before")
            answer = EstClient.cacerts(self)
            die("cacerts:after")
            return answer

        def csrattrs(self) -> CsrAttributes | None:
            die("csrattrs:before")
            answer = EstClient.csrattrs(self)
            die("csrattrs:after")
            return answer

        def simpleenroll(self, csr_factory: Any) -> Enrollment:
            return self._enroll(EstClient.simpleenroll, csr_factory)

        def simplereenroll(self, csr_factory: Any) -> Enrollment:
            return self._enroll(EstClient.simplereenroll, csr_factory)

        def _enroll(self, operation: Any, csr_factory: Any) -> Enrollment:
            die("enroll:before")

            def signed_then_die(binding: Any) -> bytes:
                csr: bytes = csr_factory(binding)
                die("enroll:csr-signed")
                return csr

            enrollment: Enrollment = operation(self, signed_then_die)
            die("enroll:after")
            return enrollment

    return KillingClient


class KillingBackend:
    """The real credential backend, dying in the read-back of the first record written: the
    record is complete on the SIM, the run never learns it (``install:after-write``)."""

    def __init__(self, inner: Any, fired: list[str]) -> None:
        self._inner = inner
        self._fired = fired
        self._written = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def write_record(self, record: object, data: bytes) -> None:
        self._inner.write_record(record, data)
        self._written = True

    def read_record(self, record: object, offset: int, length: int) -> bytes:
        data: bytes = self._inner.read_record(record, offset, length)
        if self._written:
            self._fired.append("install:after-write")
            raise AgentKilled("install:after-write")
        return data


@dataclass
class Killer:
    """Runs one command through the Agent with one kill point armed; ``fired`` lists the points
    reached. The seams are the Agent's own: the EST client factory and the backend opener."""

    device: Device
    fired: list[str] = field(default_factory=list)

    def __call__(self, point: str, command: tuple[str, ...]) -> None:
        self.fired.clear()
        real = backend_opener()

        @contextlib.contextmanager
        def backends(config: Any) -> Iterator[Any]:
            with real(config) as backend:
                if point == "install:after-write":
                    yield KillingBackend(backend, self.fired)
                else:
                    yield backend

        agent = Agent(
            load_config(self.device.config),
            client_factory=killing_client(point, self.fired),
            backends=backends,
        )
        if command == ENROLL:
            agent.enroll()
        else:
            assert command == RENEW
            agent.renew(force=True)


@pytest.fixture
def kill_at(device: Device) -> Killer:
    return Killer(device)


def issued(server: EstTestServer) -> list[dict[str, Any]]:
    log = server.config.issuance_log
    assert log is not None
    if not log.exists():
        return []
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    return [e for e in entries if e["event"] == "issued"]


@pytest.mark.parametrize("point", KILL_POINTS)
@pytest.mark.parametrize("scenario", SCENARIOS[:2], ids=lambda s: s.name)
def test_agent_killed_at_each_network_step(
    scenario: Scenario,
    point: str,
    device: Device,
    start_server: Callable[..., EstTestServer],
    dev_pki: DevPki,
    cli: Run,
    kill_at: Killer,
    tmp_path: Path,
) -> None:
    server = start_server()
    device.write_config(server, dev_pki)
    argv = (*scenario.command, "--config", str(device.config))
    for command in scenario.setup:
        assert cli(*command, "--config", str(device.config))[0] == 0
    previous = None
    if scenario.setup:
        previous = check_device(cli, device, dev_pki, previous=None, previous_superseded_ok=False)
    issued_before = len(issued(server))

    with pytest.raises(AgentKilled):
        kill_at(point, scenario.command)
    assert kill_at.fired == [point]
    orphans = issued(server)[issued_before:]
    assert len(orphans) == (1 if point in ("enroll:after", "install:after-write") else 0)

    if previous is not None:
        check_device(cli, device, dev_pki, previous=previous, previous_superseded_ok=False)
    code, out, err = cli(*argv, "--json")
    assert code == 0, err
    final = check_device(
        cli, device, dev_pki, previous=previous, previous_superseded_ok=True, openssl_dir=tmp_path
    )
    if point == "install:after-write" and scenario.command == ENROLL:
        # the killed run had installed it: the re-run finds it and does nothing
        assert json.loads(out)["outcome"] == "already-enrolled"
        assert final.serial == orphans[0]["serial"].upper()
    else:
        assert json.loads(out)["outcome"] in ("enrolled", "renewed")
        assert len(issued(server)) == issued_before + len(orphans) + 1
        assert final.serial == issued(server)[-1]["serial"].upper()
    if point == "enroll:after":
        # the certificate issued to the dead run is for a key the SIM no longer holds: the
        # re-run generated a new key and never took that certificate for it
        assert orphans[0]["serial"].upper() != final.serial
        assert orphans[0]["public_key_sha256"] != issued(server)[-1]["public_key_sha256"]
    if previous is not None:
        assert final.sequence > previous.sequence


# --- 3. a credential made active by a run that died is deployed by the next one ------------------


def hook_config(device: Device) -> tuple[Path, Path, dict[str, str]]:
    """PEM export + a deploy hook that appends its serial to a file."""
    export = device.root / "out" / "device.pem"
    export.parent.mkdir(exist_ok=True)
    seen = device.root / "hook-serials.txt"
    hook = device.root / "hook.sh"
    hook.write_text(f'#!/bin/sh\necho "$EST_AGENT_SLOT $EST_AGENT_SERIAL" >> {seen}\n')
    hook.chmod(0o755)
    return export, seen, {"paths__export_pem": f'"{export}"', "paths__deploy_hook": f'["{hook}"]'}


@pytest.mark.parametrize("crash", ["killed-after-write", "killed-in-hook", "cut-before-readback"])
@pytest.mark.parametrize("scenario", SCENARIOS[:2], ids=lambda s: s.name)
def test_credential_installed_by_a_dead_run_is_deployed_by_the_next(
    scenario: Scenario,
    crash: str,
    device: Device,
    start_server: Callable[..., EstTestServer],
    dev_pki: DevPki,
    cli: Run,
    link: Link,
    kill_at: Killer,
) -> None:
    """The record is on the SIM (valid, highest sequence: the store's active credential) but the
    run died before the PEM export and the deploy hook. The next full run (here `enroll`, which
    finds a credential and does no network) must deploy it, or the services using the export
    stay on the previous certificate until it expires (or, on first boot, never get one)."""
    server = start_server()
    export, seen, extra = hook_config(device)
    device.write_config(server, dev_pki, **extra)
    for command in scenario.setup:
        assert cli(*command, "--config", str(device.config))[0] == 0
    argv = (*scenario.command, "--config", str(device.config))

    if crash == "killed-after-write":
        with pytest.raises(AgentKilled):
            kill_at("install:after-write", scenario.command)
    elif crash == "killed-in-hook":
        # a real agent process, killed by its own deploy hook (once: the marker file)
        marker = device.root / "killed-once"
        hook = device.root / "hook.sh"
        hook.write_text(
            f"#!/bin/sh\nif [ ! -e {marker} ]; then touch {marker}; kill -9 $PPID; exit 1; fi\n"
            f'echo "$EST_AGENT_SLOT $EST_AGENT_SERIAL" >> {seen}\n'
        )
        killed = subprocess.run(
            [sys.executable, "-m", "est_agent", *argv],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        assert marker.exists()
    else:
        before = Snapshot.take(device, device.root / "snapshot")
        link.arm(None)
        assert cli(*argv)[0] == 0
        second_update = [i for i, h in enumerate(link.headers) if h[1] == INS_UPDATE_BINARY][1]
        before.restore(device)
        link.arm(second_update + 1)  # the record is complete, its read-back never answered
        code, _, err = cli(*argv)
        assert code == 69 and "Traceback" not in err, err  # unknown: card unavailable
        link.arm(None)
    status = status_of(cli, device)
    active = {s["name"]: s for s in status["slots"]}[status["active_slot"]]

    code, out, err = cli("enroll", "--config", str(device.config), "--json")
    assert code == 0, err
    result = json.loads(out)
    assert (result["outcome"], result["serial"]) == ("already-enrolled", active["serial"])
    assert result["deploy_hook"]["exit_status"] == 0
    exported = x509.load_pem_x509_certificates(export.read_bytes())
    assert f"{exported[0].serial_number:X}" == active["serial"]
    assert seen.read_text().splitlines()[-1] == f"{active['name']} {active['serial']}"
    # and only once: the next run has nothing to deploy
    hooks_run = len(seen.read_text().splitlines())
    code, out, err = cli("enroll", "--config", str(device.config), "--json")
    assert code == 0 and json.loads(out)["deploy_hook"] is None, err
    assert len(seen.read_text().splitlines()) == hooks_run
