"""Issue 9, the run lock: "the README promises a run lock in the state directory; there is none
(PC/SC opens shared): two `enroll`s started together on one SIM both reported 'enrolled', with
two different certificates. Hold an exclusive lock … a second process waits a bounded time,
then exits 75 with a message naming the holder's PID."

Real `est-agent` processes against the in-process EST test server (slowed with its response
delay, so that the runs overlap) and one virtual SIM on the ``sim:`` reader: each process
loads the SIM's state file when it connects, which it does only once it holds the run lock, so
the file is exactly as shared as a card behind pcscd is (the same race through the real PC/SC
stack: tests/integration/test_run_lock_pcsc.py). The lock is ``flock(2)`` (workflow/lock.py),
which the kernel releases when its holder dies however it dies.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from est_agent.testserver import DevPki, EstTestServer
from est_agent.transport.base import CardTransport
from tests.conftest import Run
from tests.linkwrap import wrapped_reader_scheme
from tests.workflow.conftest import Device
from tests.workflow.test_enroll_renew import certificate_on_sim

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
#: seconds the test server sits on each enrollment: long enough that the second process
#: surely asks for the lock while the first holds it (Python start-up is ~0.4 s here)
RESPONSE_DELAY_S = 2.0


# --- helpers ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Finished:
    pid: int
    code: int
    out: str
    err: str
    elapsed_s: float

    @property
    def result(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.out)
        return data


def agent_argv(*argv: str) -> list[str]:
    """A real est-agent process (cwd = this tree, so ``-m est_agent`` is this tree's)."""
    return [sys.executable, "-m", "est_agent", *argv]


def race(config: Path, *commands: tuple[str, ...], timeout_s: float = 60) -> list[Finished]:
    """Start one est-agent process per command at once; the results in the order they ended,
    each with its wall time from the common start."""
    started = time.monotonic()
    procs = [
        subprocess.Popen(
            agent_argv(*command, "--config", str(config)),
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for command in commands
    ]
    finished: list[Finished] = []
    try:
        pending = list(procs)
        while pending:
            for proc in list(pending):
                if proc.poll() is None:
                    continue
                out, err = proc.communicate()  # small outputs: the pipes never filled up
                elapsed = time.monotonic() - started
                finished.append(Finished(proc.pid, proc.returncode, out, err, elapsed))
                pending.remove(proc)
            assert time.monotonic() - started < timeout_s, "a run did not finish"
            time.sleep(0.02)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return finished


def issued(server: EstTestServer) -> list[dict[str, Any]]:
    log = server.config.issuance_log
    assert log is not None
    if not log.exists():
        return []
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    return [e for e in entries if e["event"] == "issued"]


def status_json(cli: Run, device: Device) -> dict[str, Any]:
    code, out, err = cli("status", "--config", str(device.config), "--json")
    assert code == 0, err
    status: dict[str, Any] = json.loads(out)
    return status


def slot_statuses(status: dict[str, Any]) -> dict[str, str]:
    return {s["name"]: s["status"] for s in status["slots"]}


# --- a helper process holding the lock --------------------------------------------------------

_HOLDER = r"""
import fcntl, os, sys, time
path, kind = sys.argv[1], sys.argv[2]
if kind == "file":
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
else:  # the state directory itself (what the agent locks when it cannot create the file)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
fcntl.flock(fd, fcntl.LOCK_EX)
if kind == "file":
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
print("locked", flush=True)
time.sleep(120)
"""


class LockHolders:
    """Small Python children that flock a path; killed (by PID) at the end of the test."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[str]] = []

    def hold(self, path: Path, kind: str = "file") -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, "-c", _HOLDER, str(path), kind],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.procs.append(proc)
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "locked", "the holder did not get the lock"
        return proc

    @staticmethod
    def kill9(proc: subprocess.Popen[str]) -> None:
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=10) == -signal.SIGKILL
        if proc.stdout is not None:
            proc.stdout.close()

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()


@pytest.fixture
def holders() -> Iterator[LockHolders]:
    manager = LockHolders()
    try:
        yield manager
    finally:
        manager.close()


class _Touches(CardTransport):
    """Records every connect and APDU header of the link it wraps."""

    def __init__(self, inner: CardTransport, touches: list[str]) -> None:
        super().__init__()
        self.inner, self.touches = inner, touches

    @property
    def description(self) -> str:
        return self.inner.description

    def _connect(self) -> None:
        self.touches.append("connect")
        self.inner.connect()

    def _transmit(self, apdu: bytes) -> bytes:
        self.touches.append(apdu[:4].hex())
        return self.inner.transmit(apdu)

    def _close(self) -> None:
        self.inner.close()


@pytest.fixture
def card_touches() -> Iterator[list[str]]:
    """Every connect / APDU of the in-process virtual SIM's links, in this process."""
    touches: list[str] = []
    with wrapped_reader_scheme("sim", lambda inner: _Touches(inner, touches)):
        yield touches


Say = Callable[[str], None]


@pytest.fixture
def say(capsys: pytest.CaptureFixture[str]) -> Say:
    """Print a measurement past pytest's capture (as the crash-safety sweeps do)."""

    def emit(text: str) -> None:
        with capsys.disabled():
            print(f"\nrun lock: {text}")

    return emit


def timed(cli: Run, *argv: str) -> tuple[int, str, str, float]:
    started = time.monotonic()
    code, out, err = cli(*argv)
    return code, out, err, time.monotonic() - started


# --- 1. two runs at once ------------------------------------------------------------------------


def check_one_enrollment(
    runs: list[Finished], server: EstTestServer, device: Device, cli: Run
) -> Finished:
    """Exactly one run enrolled; one certificate issued; it is the one on the SIM."""
    for run in runs:
        assert "Traceback" not in run.err, run.err
    winners = [r for r in runs if r.code == 0 and r.result["outcome"] == "enrolled"]
    assert len(winners) == 1, [(r.code, r.out, r.err) for r in runs]
    [winner] = winners
    certificates = issued(server)
    assert len(certificates) == 1, certificates
    assert certificates[0]["serial"].upper() == winner.result["serial"]
    status = status_json(cli, device)
    assert slot_statuses(status) == {"op-a": "valid", "op-b": "empty"}, status
    active = {s["name"]: s for s in status["slots"]}[status["active_slot"]]
    assert (status["active_slot"], active["serial"]) == ("op-a", winner.result["serial"])
    cert = certificate_on_sim(device.sim, "op-a")  # also: the certificate matches the slot key
    assert f"{cert.serial_number:X}" == winner.result["serial"]
    return winner


def test_two_enrolls_at_once_the_second_waits_and_finds_the_credential(
    device: Device,
    start_server: Callable[..., EstTestServer],
    dev_pki: DevPki,
    cli: Run,
    say: Say,
) -> None:
    server = start_server(response_delay_s=RESPONSE_DELAY_S)
    device.write_config(server, dev_pki, paths__lock_wait_s="30")
    runs = race(device.config, ("enroll", "--json"), ("enroll", "--json"))
    winner = check_one_enrollment(runs, server, device, cli)
    [loser] = [r for r in runs if r is not winner]
    assert loser.code == 0, loser.err
    assert loser.result["outcome"] == "already-enrolled"
    assert loser.result["serial"] == winner.result["serial"]
    # it really overlapped: it found the lock taken and said by whom
    assert f"waiting for another est-agent (PID {winner.pid}) to finish" in loser.err, loser.err
    assert loser.elapsed_s < 30  # bounded: far below lock_wait_s + a whole enrollment
    say(f"two enrolls (sim:), waits: {winner.elapsed_s:.2f} s / {loser.elapsed_s:.2f} s")


def test_two_enrolls_at_once_the_second_gives_up_with_75_naming_the_holder(
    device: Device,
    start_server: Callable[..., EstTestServer],
    dev_pki: DevPki,
    cli: Run,
    say: Say,
) -> None:
    server = start_server(response_delay_s=RESPONSE_DELAY_S)
    device.write_config(server, dev_pki, paths__lock_wait_s="0.3")
    runs = race(device.config, ("enroll", "--json"), ("enroll", "--json"))
    loser, winner = runs  # in the order they ended
    assert loser.code == 75, (loser.out, loser.err)
    assert f"another est-agent (PID {winner.pid}) holds the run lock" in loser.err, loser.err
    assert f"{device.state_dir / 'lock'}; waited 0.3 s, try later [BusyError]" in loser.err
    assert loser.out == ""
    # bounded: start-up + 0.3 s, not the winner's whole enrollment (>= the 2 s server delay)
    assert loser.elapsed_s < winner.elapsed_s - 1.0, (loser.elapsed_s, winner.elapsed_s)
    assert loser.elapsed_s < 5.0
    assert check_one_enrollment([winner], server, device, cli) == winner
    say(f"two enrolls (sim:), gives up: 75 after {loser.elapsed_s:.2f} s, 0 after "
        f"{winner.elapsed_s:.2f} s")  # fmt: skip


# --- 2. a lock held by another process ------------------------------------------------------------


def test_lock_held_by_another_process_exits_75_at_once_then_kill_9_frees_it(
    device: Device,
    start_server: Callable[..., EstTestServer],
    dev_pki: DevPki,
    cli: Run,
    holders: LockHolders,
    card_touches: list[str],
    say: Say,
) -> None:
    server = start_server()
    device.write_config(server, dev_pki, paths__lock_wait_s="0")
    device.state_dir.mkdir()
    holder = holders.hold(device.state_dir / "lock")
    sim_before = device.sim.read_bytes()

    code, out, err, busy_s = timed(cli, "enroll", "--config", str(device.config))
    assert code == 75, err
    assert busy_s < 1.0, busy_s
    assert f"another est-agent (PID {holder.pid}) holds the run lock" in err, err
    assert "[BusyError]" in err and out == ""
    assert card_touches == []  # the lock comes before the card
    assert device.sim.read_bytes() == sim_before
    # the same through a real process (exit status of the executable, not of main())
    started = time.monotonic()
    proc = subprocess.run(
        agent_argv("enroll", "--config", str(device.config)),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 75, proc.stderr
    assert f"(PID {holder.pid})" in proc.stderr
    busy_proc_s = time.monotonic() - started
    assert busy_proc_s < 5.0  # interpreter start-up included

    holders.kill9(holder)  # no unlock, no cleanup: the kernel drops the flock
    assert (device.state_dir / "lock").read_text().strip() == str(holder.pid)  # stale, harmless
    code, out, err, freed_s = timed(cli, "enroll", "--config", str(device.config), "--json")
    assert code == 0, err
    assert freed_s < 20.0
    assert json.loads(out)["outcome"] == "enrolled"
    assert (device.state_dir / "lock").read_text().strip() == str(os.getpid())
    assert len(issued(server)) == 1
    say(f"lock held, lock_wait_s 0: 75 after {busy_s:.3f} s in process, {busy_proc_s:.2f} s "
        f"as a process; after kill -9: enrolled in {freed_s:.2f} s")  # fmt: skip


@pytest.mark.parametrize("command", [("run",), ("status",), ("renew", "--force"), ("enroll",)])
def test_lock_held_stops_every_command_of_an_enrolled_device(
    command: tuple[str, ...],
    device: Device,
    start_server: Callable[..., EstTestServer],
    dev_pki: DevPki,
    cli: Run,
    holders: LockHolders,
    card_touches: list[str],
) -> None:
    server = start_server()
    device.write_config(server, dev_pki, paths__lock_wait_s="0")
    assert cli("enroll", "--config", str(device.config))[0] == 0
    before = status_json(cli, device)
    card_touches.clear()

    holder = holders.hold(device.state_dir / "lock")
    code, out, err, elapsed = timed(cli, *command, "--config", str(device.config))
    assert code == 75, (out, err)
    assert elapsed < 1.0, elapsed
    assert f"another est-agent (PID {holder.pid}) holds the run lock" in err, err
    assert card_touches == []
    holders.kill9(holder)
    # the refused run changed nothing (the status needs the lock too, so only now)
    assert status_json(cli, device) == before

    code, out, err = cli(*command, "--config", str(device.config), "--json")
    assert code == 0, err
    if command[0] == "run":
        # the lock was the fast path's: the same path runs now (record header + key)
        assert json.loads(out)["card_link"]["apdus"] == 6
    if command[0] == "renew":
        assert json.loads(out)["outcome"] == "renewed"
        assert slot_statuses(status_json(cli, device)) == {"op-a": "valid", "op-b": "valid"}


# --- 3. a read-only state directory ------------------------------------------------------------


def read_only_argv(state_dir: Path, *argv: str) -> list[str]:
    """Run ``argv`` with ``state_dir`` bind-mounted read-only in a private mount namespace.

    We run as root, and chmod 0555 does not stop root; a read-only mount does (EROFS), as on a
    device whose /var is mounted read-only. The mount exists only in the child's namespace.
    """
    script = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"'
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script,
            str(state_dir), *argv]  # fmt: skip


def _can_unshare() -> bool:
    if shutil.which("unshare") is None:
        return False
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        probe = subprocess.run(
            ["unshare", "--mount", "true"], capture_output=True, timeout=10, check=False
        )
        return probe.returncode == 0
    return False


needs_unshare = pytest.mark.skipif(
    not _can_unshare(), reason="needs unshare --mount (root or CAP_SYS_ADMIN) for a read-only mount"
)


@needs_unshare
def test_read_only_state_dir_still_locks_and_enrolls_with_a_note(
    device: Device,
    start_server: Callable[..., EstTestServer],
    dev_pki: DevPki,
    cli: Run,
    holders: LockHolders,
    capsys: pytest.CaptureFixture[str],
) -> None:
    server = start_server()
    device.write_config(server, dev_pki, paths__lock_wait_s="0")
    device.state_dir.mkdir()
    enroll = read_only_argv(
        device.state_dir, *agent_argv("enroll", "--json", "--config", str(device.config))
    )

    # another process holding the directory's flock keeps the read-only run out: the
    # directory lock is real (no PID to name: there is no file to hold one)
    holder = holders.hold(device.state_dir, kind="directory")
    started = time.monotonic()
    proc = subprocess.run(enroll, cwd=REPO, capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == 75, proc.stderr
    assert f"another est-agent (another process) holds the run lock {device.state_dir};" in (
        proc.stderr
    )
    assert time.monotonic() - started < 5.0
    holders.kill9(holder)

    started = time.monotonic()
    proc = subprocess.run(enroll, cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert elapsed < 20.0
    result = json.loads(proc.stdout)
    assert result["outcome"] == "enrolled"
    # every host-state write failed, said once (the SIM is authoritative: exit 0)
    not_written = (
        f"cannot write agent state {device.state_dir / 'state.json'}: Read-only file system"
    )
    assert result["notes"] == [not_written], result["notes"]
    with capsys.disabled():
        print(f"\nrun lock: read-only state dir: enroll 0 after {elapsed:.2f} s, {result['notes']}")
    # the SIM holds the new credential; the host state directory stayed empty
    cert = certificate_on_sim(device.sim, "op-a")
    assert f"{cert.serial_number:X}" == result["serial"]
    assert [e["serial"].upper() for e in issued(server)] == [result["serial"]]
    assert list(device.state_dir.iterdir()) == []
    status = status_json(cli, device)
    assert slot_statuses(status) == {"op-a": "valid", "op-b": "empty"}

    # (that status ran outside the namespace: it could make the lock file)
    assert [p.name for p in device.state_dir.iterdir()] == ["lock"]

    # the next run, still read-only (now with a lock file it cannot open for writing), decides
    # from the SIM: nothing due, exit 0, and the same note
    run = read_only_argv(
        device.state_dir, *agent_argv("run", "--json", "--config", str(device.config))
    )
    proc = subprocess.run(run, cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    again = json.loads(proc.stdout)
    assert (again["outcome"], again["serial"]) == ("not-due", result["serial"])
    assert again["notes"] == [not_written], again["notes"]
    assert [p.name for p in device.state_dir.iterdir()] == ["lock"]
    assert status_json(cli, device) == status


# --- 4. a state directory that cannot be one ----------------------------------------------------


@pytest.mark.parametrize("where", ["under-a-file", "is-a-file"])
@pytest.mark.parametrize("command", [("enroll",), ("run",), ("status",), ("renew", "--force")])
def test_state_dir_that_is_not_a_directory_is_a_config_error_before_any_apdu(
    where: str,
    command: tuple[str, ...],
    device: Device,
    start_server: Callable[..., EstTestServer],
    dev_pki: DevPki,
    cli: Run,
    card_touches: list[str],
) -> None:
    server = start_server()
    blocker = device.root / "var-lib-est-agent"
    blocker.write_text("a regular file\n")
    state_dir = blocker / "state" if where == "under-a-file" else blocker
    device.state_dir = state_dir
    device.write_config(server, dev_pki)
    sim_before = device.sim.read_bytes()

    code, out, err, elapsed = timed(cli, *command, "--config", str(device.config))
    assert code == 78, (out, err)
    assert elapsed < 1.0, elapsed
    assert f"paths.state_dir: cannot hold the run lock in {state_dir}: Not a directory" in err, err
    assert "[ConfigError]" in err and "Traceback" not in err
    assert card_touches == []
    assert device.sim.read_bytes() == sim_before
    assert blocker.read_text() == "a regular file\n"
    assert issued(server) == []
