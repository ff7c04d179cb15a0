"""Issue 9, the CGLA-only modem: "A slot whose key or record cannot be read is treated as
empty: … a CGLA-only modem (`sim serve --modem-pty L --modem-no-csim-channels`) with the
default `card.uicc_channel = "auto"`." and "The power-cut sweep also runs through the emulated
modem in CGLA-only mode."

Such a modem refuses MANAGE CHANNEL inside ``AT+CSIM``; logical channels then exist only as
``AT+CCHO`` sessions, each opened onto an application (3GPP TS 27.007 §8.43-§8.45), so a UICC
file SELECT on one is impossible and the transport answers it SW 6881 (logical channel not
supported, ISO/IEC 7816-4 §5.1.3). ``auto`` puts the certificate EFs on a logical channel on
modems, so neither slot can be read. Before issue 9 such slots counted as empty and the agent
enrolled into them; now they are *unknown* and the run stops before any write with
``SlotUnreadableError``, exit 76 ("refused", not 69 "unreachable": the link answers, with a
status word, for a command this modem cannot carry; the card and the other APDUs work).

The sweep cuts the card's power after every APDU index of ``enroll`` and of ``renew --force``
through such a modem with ``card.uicc_channel = "basic"`` (EFs on channel 0 over ``AT+CSIM``,
the applet on ``AT+CCHO``/``AT+CGLA``), with the ``PowerCutTransport`` of
tests/workflow/test_crash_safety.py wrapped around the ``modem:`` transport, and re-runs. The
emulated modem runs in this process; it is restarted after every cut, reloading the SIM from
its state file: what the card persisted is what survives, as at a real power cut (the volatile
state, open channels and selected files, is lost).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from est_agent.sim.card import VirtualCard
from est_agent.sim.modem import EmulatedModem, ModemQuirks, PtyModem
from est_agent.sim.options import CardOptions
from est_agent.sim.personalize import personalize
from est_agent.testserver import DevPki, EstTestServer
from est_agent.transport.base import CardTransport
from est_agent.transport.modem import ChannelAccess, ModemTransport
from tests.conftest import Run
from tests.linkwrap import wrapped_reader_scheme
from tests.workflow.conftest import ICCID, Device
from tests.workflow.test_crash_safety import (
    ALLOWED_SLOT_STATUS,
    CUT_EXIT_CODES,
    INS_MANAGE_CHANNEL,
    INS_UPDATE_BINARY,
    Credential,
    Link,
    PowerCutTransport,
    Snapshot,
    check_device,
    slot_state,
)

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
CGLA_ONLY = ModemQuirks(csim_basic_only=True)
#: one operation's sweep (measured 7-15 s; issue 9 asks for about a minute for all three)
SWEEP_BOUND_S = 45.0

@pytest.fixture
def device(tmp_path: Path, dev_pki: DevPki) -> Device:
    sim = tmp_path / "sim.json"
    ca = dev_pki.bootstrap_ca
    personalize(sim, iccid=ICCID, bootstrap_ca=(ca.certificate, ca.key))
    return Device(tmp_path, sim, tmp_path / "est-agent.toml", tmp_path / "state")




def status_of(cli: Run, config: Path) -> dict[str, Any]:
    code, out, err = cli("status", "--config", str(config), "--json")
    assert code == 0, err
    status: dict[str, Any] = json.loads(out)
    return status


def issued(server: EstTestServer) -> list[dict[str, Any]]:
    log = server.config.issuance_log
    assert log is not None
    if not log.exists():
        return []
    return [e for e in map(json.loads, log.read_text().splitlines()) if e["event"] == "issued"]


# --- 1. the default `auto` through `sim serve --modem-no-csim-channels` --------------------------


@dataclass
class ModemProcess:
    proc: subprocess.Popen[str]
    link: Path

    def stop(self) -> int:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
        _, err = self.proc.communicate(timeout=10)
        assert self.proc.returncode == 0, err
        return self.proc.returncode


@pytest.fixture
def modem_process(tmp_path: Path) -> Iterator[Callable[[Path], ModemProcess]]:
    started: list[ModemProcess] = []

    def start(sim: Path) -> ModemProcess:
        link = tmp_path / "ttyCGLA"
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "est_agent",
                "sim",
                "serve",
                str(sim),
                "--modem-pty",
                str(link),
                "--modem-no-csim-channels",
            ],
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        served = ModemProcess(proc, link)
        started.append(served)
        deadline = time.monotonic() + 10
        while not link.is_symlink():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no pty link"
            time.sleep(0.05)
        return served

    yield start
    for served in started:
        if served.proc.poll() is None:
            os.kill(served.proc.pid, signal.SIGTERM)
            served.proc.communicate(timeout=10)


def write_configs(
    device: Device, server: EstTestServer, dev_pki: DevPki, link: Path
) -> tuple[Path, Path]:
    """(the default config: `uicc_channel` left at `auto`, the same with `basic`)."""
    reader = f'"modem:{link}?timeout=5"'
    device.write_config(server, dev_pki, card__reader=reader)
    basic = device.root / "est-agent-basic.toml"
    default = device.config.read_text()
    assert "uicc_channel" not in default
    basic.write_text(default.replace("[card]\n", '[card]\nuicc_channel = "basic"\n', 1))
    return device.config, basic


UNREADABLE = (
    "cannot read slot op-a (record-unreadable: SELECT uicc:path=7FF0/6F01: card answered SW "
    "6881 (logical channel not supported)); slot op-b (record-unreadable: SELECT "
    "uicc:path=7FF0/6F02: card answered SW 6881 (logical channel not supported)): nothing was "
    "written (a slot that cannot be read may hold the working credential); the link refuses "
    'logical channels: set card.uicc_channel = "basic" [SlotUnreadableError]'
)


def test_default_auto_on_a_cgla_only_modem_fresh_sim_stops_with_76(
    device: Device,
    start_server: Callable[..., EstTestServer],
    dev_pki: DevPki,
    cli: Run,
    modem_process: Callable[[Path], ModemProcess],
    capsys: pytest.CaptureFixture[str],
) -> None:
    server = start_server()
    modem = modem_process(device.sim)
    default, basic = write_configs(device, server, dev_pki, modem.link)
    before = status_of(cli, basic)
    assert before["active_slot"] is None
    assert {s["name"]: s["status"] for s in before["slots"]} == {"op-a": "empty", "op-b": "empty"}
    sim_before = device.sim.read_bytes()

    timings: dict[str, float] = {}
    for command in (("enroll",), ("run",), ("renew", "--force")):
        started = time.monotonic()
        code, out, err = cli(*command, "--config", str(default))
        elapsed = time.monotonic() - started
        timings[" ".join(command)] = round(elapsed, 2)
        assert code == 76, (command, out, err)
        assert UNREADABLE in err, err
        assert "Traceback" not in err and out == ""
        assert elapsed < 3.0, (command, elapsed)
        # nothing written: not a byte of the SIM, no key generated, no request made
        assert device.sim.read_bytes() == sim_before, command
        assert issued(server) == []
        assert not (device.state_dir / "state.json").exists()
    assert status_of(cli, basic) == before
    modem.stop()
    assert device.sim.read_bytes() == sim_before
    with capsys.disabled():
        print(f"\nCGLA-only modem, uicc_channel auto: exit 76 after {timings} s")


def test_default_auto_on_a_cgla_only_modem_enrolled_sim_stops_with_76(
    device: Device,
    start_server: Callable[..., EstTestServer],
    dev_pki: DevPki,
    cli: Run,
    modem_process: Callable[[Path], ModemProcess],
    capsys: pytest.CaptureFixture[str],
) -> None:
    server = start_server()
    modem = modem_process(device.sim)
    default, basic = write_configs(device, server, dev_pki, modem.link)
    code, out, err = cli("enroll", "--config", str(basic), "--json")
    assert code == 0, err
    enrolled = json.loads(out)
    before = status_of(cli, basic)
    assert before["active_slot"] == "op-a"
    active = {s["name"]: s for s in before["slots"]}["op-a"]
    assert (active["status"], active["serial"]) == ("valid", enrolled["serial"])
    sim_before = device.sim.read_bytes()
    host_before = (device.state_dir / "state.json").read_bytes()

    # `run` first tries the fast path (the cached header, on a logical channel here: refused),
    # then the full path, which cannot read either slot either
    timings: dict[str, float] = {}
    for command in (("run",), ("enroll",), ("renew", "--force"), ("renew",)):
        started = time.monotonic()
        code, out, err = cli(*command, "--config", str(default))
        elapsed = time.monotonic() - started
        timings[" ".join(command)] = round(elapsed, 2)
        assert code == 76, (command, out, err)
        assert UNREADABLE in err, err
        assert "Traceback" not in err and out == ""
        assert elapsed < 3.0, (command, elapsed)
        assert device.sim.read_bytes() == sim_before, command
        assert (device.state_dir / "state.json").read_bytes() == host_before, command
    assert status_of(cli, basic) == before
    assert [e["serial"].upper() for e in issued(server)] == [enrolled["serial"]]
    modem.stop()
    assert device.sim.read_bytes() == sim_before
    with capsys.disabled():
        print(f"\nCGLA-only modem, uicc_channel auto: exit 76 after {timings} s")


# --- 2. the power-cut sweep through the CGLA-only modem ------------------------------------------


class Modem:
    """The emulated CGLA-only modem in this process, on a fixed link path; ``restart`` is the
    power cut's end: a new modem whose card is reloaded from the SIM's state file."""

    def __init__(self, sim: Path, link: Path) -> None:
        self.sim = sim
        self.link = link
        self.current: PtyModem | None = None

    def start(self) -> PtyModem:
        self.stop()
        card = VirtualCard.load(self.sim, CardOptions())
        self.current = PtyModem(EmulatedModem(card, CGLA_ONLY, iccid=ICCID), self.link).start()
        return self.current

    restart = start

    def stop(self) -> None:
        if self.current is not None:
            self.current.stop()
            self.current = None


@pytest.fixture
def modem(device: Device, tmp_path: Path) -> Iterator[Modem]:
    running = Modem(device.sim, tmp_path / "ttyCUT")
    try:
        yield running
    finally:
        running.stop()


@dataclass
class ModemLink(Link):
    #: the modem transports opened, last one last
    modems: list[ModemTransport] = field(default_factory=list)


@pytest.fixture
def link() -> Iterator[ModemLink]:
    """Every card link the agent opens goes through a ``PowerCutTransport`` (here around the
    ``ModemTransport`` that ``modem:`` readers open)."""
    shared = ModemLink()

    def cut(inner: CardTransport) -> CardTransport:
        assert isinstance(inner, ModemTransport), inner
        shared.modems.append(inner)
        return PowerCutTransport(inner, shared)

    with wrapped_reader_scheme("modem", cut):
        yield shared


def statuses(status: dict[str, Any]) -> tuple[str, ...]:
    return tuple(f"{s['name']}={slot_state(s)}" for s in status["slots"])


ENROLL = ("enroll",)
RENEW = ("renew", "--force")
SWEEPS = {
    "enroll": (ENROLL, ()),
    # renewal into the empty second slot
    "renew": (RENEW, (ENROLL,)),
    # renewal into a slot that still holds an older valid credential
    "renew-both-slots": (RENEW, (ENROLL, RENEW)),
}


@pytest.mark.parametrize("operation", list(SWEEPS))
def test_power_cut_at_every_apdu_through_a_cgla_only_modem(
    operation: str,
    device: Device,
    start_server: Callable[..., EstTestServer],
    dev_pki: DevPki,
    cli: Run,
    link: ModemLink,
    modem: Modem,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    command, setup = SWEEPS[operation]
    started = time.monotonic()
    server = start_server()
    device.write_config(
        server,
        dev_pki,
        card__reader=f'"modem:{modem.link}?timeout=5"',
        card__uicc_channel='"basic"',
    )
    argv = (*command, "--config", str(device.config))
    modem.start()
    link.arm(None)
    for step in setup:
        assert cli(*step, "--config", str(device.config))[0] == 0
    previous: Credential | None = None
    if setup:
        previous = check_device(cli, device, dev_pki, previous=None, previous_superseded_ok=False)
    modem.stop()
    snapshot = Snapshot.take(device, tmp_path / "snapshot")

    # a clean run for the APDU trace
    modem.start()
    link.arm(None)
    code, _, err = cli(*argv)
    assert code == 0, err
    count = link.answered
    clean = list(link.headers)
    assert count >= 10, clean
    assert sum(1 for h in clean if h[1] == INS_UPDATE_BINARY) >= 2  # a record can be torn
    # the applet's channel went through AT+CCHO/AT+CGLA, the EFs through AT+CSIM
    assert link.modems[-1].access is ChannelAccess.CGLA

    codes: dict[int, int] = {}
    seen: set[str] = set()
    for n in range(count):
        snapshot.restore(device)
        modem.restart()
        link.arm(n)
        code, _, err = cli(*argv)
        assert link.refused >= 1, f"cut after {n}: the cut never happened"
        assert link.headers == clean[:n], f"cut after {n}: the run took another path"
        assert "Traceback" not in err, err
        codes[n] = code
        if code == 0:
            # only the best-effort MANAGE CHANNEL close at the very end may go unanswered
            assert n == count - 1 and clean[n][1] == INS_MANAGE_CHANNEL, (n, err)
        else:
            assert code in CUT_EXIT_CODES, f"cut after {n}: exit {code}\n{err}"

        modem.restart()  # the power is back: the card as it persisted
        link.arm(None)
        if previous is not None:
            # right after the cut: the credential of the start is still there, intact
            check_device(cli, device, dev_pki, previous=previous, previous_superseded_ok=False)
        status = status_of(cli, device.config)
        seen.update(statuses(status))
        for slot in status["slots"]:
            assert slot_state(slot) in ALLOWED_SLOT_STATUS, (n, slot)

        code, _, err = cli(*argv)
        assert code == 0, f"re-run after a cut after {n} APDUs failed:\n{err}"
        final = check_device(cli, device, dev_pki, previous=previous, previous_superseded_ok=True)
        if previous is not None:
            assert final.sequence > previous.sequence  # the renewal did happen

    elapsed = time.monotonic() - started
    with capsys.disabled():
        print(
            f"\ncrash safety through a CGLA-only modem [{operation}]: {count} cut points, "
            f"all passed in {elapsed:.1f} s (exit codes {sorted(set(codes.values()))})"
        )
    # the sweep really went through the dangerous intermediate states
    assert any(state.endswith("=damaged:torn") for state in seen), seen
    if operation == "renew-both-slots":
        assert any(state.endswith("=damaged:key-mismatch") for state in seen), seen
    assert elapsed < SWEEP_BOUND_S, elapsed
