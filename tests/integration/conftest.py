"""Real PC/SC stack for integration tests: a private pcscd + vpcd, virtual cards on 127.0.0.1.

``pcsc_stack`` (session): one pcscd in a private mount namespace (see est_agent.sim.pcsc_stack),
its vpcd on a free port; this process's PC/SC client is pointed at it through
PCSCLITE_CSOCK_NAME before pyscard's first call (libpcsclite reads it once per process).
``cards`` (function): starts cards on that vpcd port (threads, or ``python -m est_agent sim
serve`` processes), waits until pcscd shows their ATR, and stops everything afterwards, even
when the test failed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from est_agent.errors import ReaderError
from est_agent.sim.pcsc_stack import (
    SOCKET_ENV,
    CardThread,
    PcscStack,
    start_pcscd,
    stop_process,
    wait_for_card,
    wait_for_no_card,
)
from est_agent.sim.vpcd import VpcdCard
from est_agent.transport.pcsc import list_readers

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
# After a card dies, a new one connecting within one vpcd poll (400 ms) may leave the reader
# EMPTY or unpowered (0x80100067): wait this long after a death before the next card.
_SETTLE_S = 0.5


@pytest.fixture(scope="session")
def pcsc_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PcscStack]:
    try:
        stack = start_pcscd(tmp_path_factory.mktemp("pcscd"))
    except ReaderError as exc:
        pytest.fail(f"cannot start a private pcscd: {exc}", pytrace=False)
    previous = os.environ.get(SOCKET_ENV)
    stack.activate()
    try:
        # If anything in this process opened a PC/SC context before, libpcsclite kept the old
        # socket path and these tests would talk to some other pcscd (or none).
        if list_readers() != [stack.reader_name, stack.second_reader_name]:
            pytest.fail(
                f"PC/SC client does not see the private pcscd ({list_readers()}): was pyscard "
                f"used before {SOCKET_ENV} was set?",
                pytrace=False,
            )
        yield stack
    finally:
        stack.stop()
        if previous is None:
            os.environ.pop(SOCKET_ENV, None)
        else:
            os.environ[SOCKET_ENV] = previous


class Cards:
    """Starts cards on the private vpcd and tears every one down, waiting for an empty reader."""

    # shared by all tests: the vpcd slot remembers a death across test boundaries
    _last_death = 0.0

    def __init__(self, stack: PcscStack, workdir: Path) -> None:
        self.stack = stack
        self.workdir = workdir
        self._threads: list[CardThread] = []
        self._procs: list[subprocess.Popen[bytes]] = []
        self._n = 0

    def port(self, second: bool = False) -> int:
        return self.stack.vpcd_port + (1 if second else 0)

    def reader(self, second: bool = False) -> str:
        return self.stack.second_reader_name if second else self.stack.reader_name

    def _settle(self) -> None:
        gap = _SETTLE_S - (time.monotonic() - self._last_death)
        if gap > 0:
            time.sleep(gap)

    def thread(
        self, card: VpcdCard, *, second: bool = False, wait: bool = True, **options: object
    ) -> CardThread:
        """Serve ``card`` from a thread of this process; wait until pcscd shows its ATR."""
        self._settle()
        runner = CardThread.start(card, self.port(second), **options)  # type: ignore[arg-type]
        self._threads.append(runner)
        if wait:
            wait_for_card(self.reader(second), atr=card.atr)
        return runner

    def process(
        self, argv: list[str], *, atr: bytes | None = None, second: bool = False, name: str = ""
    ) -> subprocess.Popen[bytes]:
        """Run a card process (``argv`` after the interpreter); wait until its card shows."""
        self._settle()
        self._n += 1
        log = (self.workdir / f"card-{self._n}{'-' + name if name else ''}.log").open("wb")
        with log:
            proc = subprocess.Popen(
                [sys.executable, *argv],
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self._procs.append(proc)
        try:
            wait_for_card(self.reader(second), atr=atr, timeout_s=10.0)
        except ReaderError:
            if proc.poll() is not None:
                pytest.fail(f"card process exited {proc.returncode}:\n{self.log_of(proc)}")
            raise
        return proc

    def sim_process(
        self, state: Path, *extra: str, atr: bytes | None = None, second: bool = False
    ) -> subprocess.Popen[bytes]:
        """The virtual SIM in its own process, through the CLI: ``est-agent sim serve``."""
        vpcd = f"127.0.0.1:{self.port(second)}"
        argv = ["-m", "est_agent", "sim", "serve", str(state), "--vpcd", vpcd, *extra]
        return self.process(argv, atr=atr, second=second, name="sim")

    def stub_process(
        self, tag: int, *extra: str, second: bool = False, wait_atr: bytes | None = None
    ) -> subprocess.Popen[bytes]:
        argv = [str(HERE / "stub_card.py"), str(self.port(second)), str(tag), *extra]
        return self.process(argv, atr=wait_atr, second=second, name=f"stub{tag}")

    def log_of(self, proc: subprocess.Popen[bytes]) -> str:
        index = self._procs.index(proc) + 1
        for path in self.workdir.glob(f"card-{index}*.log"):
            return path.read_text(errors="replace")
        return ""

    def kill(self, proc: subprocess.Popen[bytes]) -> int:
        """SIGKILL a card process: no goodbye on the vpcd link, as in a crash."""
        status = stop_process(proc, sig=signal.SIGKILL)
        type(self)._last_death = time.monotonic()
        return status

    def stop(self, proc: subprocess.Popen[bytes]) -> int:
        status = stop_process(proc)
        type(self)._last_death = time.monotonic()
        return status

    def died(self) -> None:
        """Note a card that ended on its own (power cut)."""
        type(self)._last_death = time.monotonic()

    def stop_thread(self, runner: CardThread) -> None:
        runner.stop()
        type(self)._last_death = time.monotonic()

    def close(self) -> None:
        errors: list[BaseException] = []
        for runner in self._threads:
            try:
                runner.stop()
            except BaseException as exc:  # stop every card before reporting anything
                errors.append(exc)
        for proc in self._procs:
            stop_process(proc)
        # Leave the readers empty for the next test, which waits for its own card's ATR.
        for second in (False, True):
            try:
                wait_for_no_card(self.reader(second), timeout_s=5.0)
            except ReaderError as exc:
                errors.append(exc)
        type(self)._last_death = time.monotonic()
        if errors:
            raise errors[0]


@pytest.fixture
def cards(pcsc_stack: PcscStack, tmp_path: Path) -> Iterator[Cards]:
    manager = Cards(pcsc_stack, tmp_path)
    try:
        yield manager
    finally:
        manager.close()
