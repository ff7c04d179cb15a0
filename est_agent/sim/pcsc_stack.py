"""Start and stop a private PC/SC stack (pcscd + vpcd) and virtual cards: tests and benchmarks.

Isolation. pcsc-lite 1.9.9's pcscd always creates ``/run/pcscd/pcscd.comm`` (it ignores
``PCSCLITE_CSOCK_NAME``), while the client library reads that variable once per process, on its
first context. So pcscd is started in a private mount namespace (``unshare --mount``, as root or,
elsewhere, inside a user namespace) with a private directory bind-mounted over ``/run/pcscd``;
clients reach it by setting ``PCSCLITE_CSOCK_NAME`` to ``<private dir>/pcscd.comm`` before
pyscard's first call. A system pcscd, if any, is untouched. Without namespaces, the stack falls
back to the system socket, and refuses to start if another pcscd is running.

vpcd listens on 0.0.0.0 (not configurable) at the port in its DEVICENAME, and on port+1 for its
second reader: both must be free. Reader names are "Virtual PCD 00 00" (port) and
"Virtual PCD 00 01" (port + 1).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from est_agent.closing import Closing
from est_agent.errors import ReaderError
from est_agent.sim.vpcd import ServeOutcome, VpcdCard, VpcdCardServer

__all__ = [
    "DEFAULT_SOCKET",
    "SOCKET_ENV",
    "CardThread",
    "PcscStack",
    "free_vpcd_port",
    "running_pcscd_pids",
    "start_pcscd",
    "stop_process",
    "wait_for_card",
    "wait_for_no_card",
]

log = logging.getLogger(__name__)

SOCKET_ENV = "PCSCLITE_CSOCK_NAME"
DEFAULT_SOCKET = Path("/run/pcscd/pcscd.comm")
VPCD_DRIVER_CONF = Path("/etc/reader.conf.d/vpcd")
READER_NAMES = ("Virtual PCD 00 00", "Virtual PCD 00 01")
# pcscd is started by a shell inside the namespace so that the bind mount exists before it
# runs; `exec` keeps one PID for unshare, sh and pcscd, so signals reach pcscd directly.
# Without write access to /run (non-root in a user namespace) a tmpfs over /run gives one.
_NAMESPACE_SCRIPT = (
    "mkdir -p /run/pcscd 2>/dev/null || { mount -t tmpfs tmpfs /run && mkdir /run/pcscd; } && "
    'mount --bind "$0" /run/pcscd && exec "$1" -f -c "$2"'
)


def _pcscd_binary() -> str:
    for candidate in (shutil.which("pcscd"), "/usr/sbin/pcscd"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise ReaderError("pcscd not found (apt-get install pcscd vsmartcard-vpcd)")


def _vpcd_driver() -> str:
    """LIBPATH of the vpcd driver, taken from the package's own reader.conf entry."""
    try:
        text = VPCD_DRIVER_CONF.read_text(encoding="utf-8")
    except OSError as exc:
        raise ReaderError(f"{VPCD_DRIVER_CONF} missing (apt-get install vsmartcard-vpcd)") from exc
    for line in text.splitlines():
        key, _, value = line.strip().partition(" ")
        if key == "LIBPATH":
            return value.strip()
    raise ReaderError(f"no LIBPATH line in {VPCD_DRIVER_CONF}")


def free_vpcd_port() -> int:
    """A port P with P and P + 1 both free on all interfaces (vpcd binds 0.0.0.0)."""
    for _ in range(50):
        with socket.socket() as first:
            first.bind(("0.0.0.0", 0))  # noqa: S104 - probing what vpcd will bind
            port = int(first.getsockname()[1])
            if port >= 65535:
                continue
            with socket.socket() as second:
                try:
                    second.bind(("0.0.0.0", port + 1))  # noqa: S104
                except OSError:
                    continue
        return port
    raise ReaderError("no two adjacent free TCP ports for vpcd")


def running_pcscd_pids() -> list[int]:
    """PIDs of processes named pcscd on this machine (visible in /proc)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text(encoding="utf-8").strip() == "pcscd":
                pids.append(int(entry.name))
        except OSError:
            continue  # exited while we looked
    return sorted(pids)


def _namespaces_work() -> list[str] | None:
    """The unshare prefix that gives a private mount namespace here, or None."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return None
    candidates = [[unshare, "--mount", "--propagation", "private"]]
    if os.geteuid() != 0:
        candidates = [[unshare, "--user", "--map-root-user", "--mount", "--propagation", "private"]]
    for prefix in candidates:
        probe = subprocess.run([*prefix, "true"], capture_output=True, timeout=10, check=False)
        if probe.returncode == 0:
            return prefix
        log.debug("no private mount namespace via %s: %s", prefix, probe.stderr.decode().strip())
    return None


def _socket_accepts(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


def stop_process(
    proc: subprocess.Popen[bytes], *, sig: int = signal.SIGTERM, timeout_s: float = 5.0
) -> int:
    """Signal ``proc``, wait for it (kill after ``timeout_s``), return its exit status."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            return proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("PID %d ignored signal %d; killing it", proc.pid, sig)
            proc.kill()
    # wait() even after kill: an unreaped PID makes the next pcscd think one is still running
    return proc.wait(timeout=timeout_s)


@dataclass
class PcscStack(Closing):
    """A running pcscd with one vpcd entry, owned by this process."""

    workdir: Path
    socket_path: Path
    vpcd_port: int
    isolated: bool
    process: subprocess.Popen[bytes]
    log_path: Path
    _stopped: bool = field(default=False, repr=False)

    @property
    def reader_name(self) -> str:
        """The reader a card connecting to ``vpcd_port`` appears in."""
        return READER_NAMES[0]

    @property
    def second_reader_name(self) -> str:
        """The reader for a card connecting to ``vpcd_port + 1``."""
        return READER_NAMES[1]

    def client_env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """Environment for a process that should talk to this pcscd."""
        env = dict(os.environ if base is None else base)
        env[SOCKET_ENV] = str(self.socket_path)
        return env

    def activate(self) -> None:
        """Point this process's PC/SC client at this pcscd.

        Must run before pyscard's first context in the process: libpcsclite reads the variable
        once and keeps it.
        """
        os.environ[SOCKET_ENV] = str(self.socket_path)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop pcscd, wait for its PID, remove its socket if it left one."""
        if self._stopped:
            return
        self._stopped = True
        status = stop_process(self.process, timeout_s=timeout_s)
        log.debug("pcscd PID %d ended with %s", self.process.pid, status)
        if not self.isolated:
            # after SIGKILL pcscd leaves the socket behind and the next start would refuse
            for leftover in (self.socket_path, self.socket_path.with_name("pcscd.pid")):
                with contextlib.suppress(FileNotFoundError):
                    leftover.unlink()

    def close(self) -> None:
        """``stop`` with its default grace period (the ``with`` block's exit)."""
        self.stop()


def start_pcscd(
    workdir: Path,
    *,
    vpcd_port: int | None = None,
    isolate: bool | None = None,
    timeout_s: float = 10.0,
) -> PcscStack:
    """Start ``pcscd -f`` with a single vpcd entry on a free port; wait until it accepts clients.

    ``isolate``: None = private namespace when possible, else the system socket; True = require
    the namespace; False = system socket. Raises ReaderError with a reason when it cannot start.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    port = vpcd_port if vpcd_port is not None else free_vpcd_port()
    conf_dir = workdir / "reader.conf.d"
    conf_dir.mkdir(exist_ok=True)
    (conf_dir / "vpcd").write_text(
        'FRIENDLYNAME "Virtual PCD"\n'
        f"DEVICENAME   /dev/null:0x{port:04X}\n"
        f"LIBPATH      {_vpcd_driver()}\n",
        encoding="utf-8",
    )
    pcscd = _pcscd_binary()
    prefix = _namespaces_work() if isolate is not False else None
    if isolate and prefix is None:
        raise ReaderError("private mount namespace (unshare --mount) not available here")
    if prefix is not None:
        run_dir = workdir / "run"
        run_dir.mkdir(exist_ok=True)
        socket_path = run_dir / "pcscd.comm"
        argv = [*prefix, "/bin/sh", "-c", _NAMESPACE_SCRIPT, str(run_dir), pcscd, str(conf_dir)]
    else:
        socket_path = DEFAULT_SOCKET
        others = running_pcscd_pids()
        if others:
            raise ReaderError(
                f"pcscd already running (PID {', '.join(map(str, others))}) and no private "
                "mount namespace is available to run a second one: stop it, or run the tests "
                "as root / where `unshare --user --mount` works"
            )
        for stale in (socket_path, socket_path.with_name("pcscd.pid")):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
        argv = [pcscd, "-f", "-c", str(conf_dir)]
    log_path = workdir / "pcscd.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT
        )
    stack = PcscStack(workdir, socket_path, port, prefix is not None, proc, log_path)
    deadline = time.monotonic() + timeout_s
    while not _socket_accepts(socket_path):
        if proc.poll() is not None or time.monotonic() > deadline:
            stack.stop()
            raise ReaderError(
                f"pcscd did not start (exit status {proc.returncode}): "
                f"{stack.log_text()[-2000:].strip()}"
            )
        time.sleep(0.01)
    log.info("pcscd PID %d up; socket %s; vpcd port %d", proc.pid, socket_path, port)
    return stack


def _reader_state(context: int, reader: str) -> tuple[int, bytes] | None:
    """(event state bits, ATR) of ``reader``, or None when pcscd does not list it."""
    from smartcard import scard

    hresult, states = scard.SCardGetStatusChange(context, 0, [(reader, scard.SCARD_STATE_UNAWARE)])
    if hresult != scard.SCARD_S_SUCCESS:
        return None
    _name, event_state, atr = states[0]
    if event_state & scard.SCARD_STATE_UNKNOWN:
        return None
    return int(event_state), bytes(atr)


def _poll_reader(reader: str, timeout_s: float, want_card: bool, atr: bytes | None) -> bytes:
    from smartcard import scard

    hresult, context = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
    if hresult != scard.SCARD_S_SUCCESS:
        raise ReaderError(f"PC/SC service not available (0x{hresult & 0xFFFFFFFF:08X})")
    try:
        deadline = time.monotonic() + timeout_s
        last: tuple[int, bytes] | None = None
        while True:
            last = _reader_state(context, reader)
            if last is not None:
                state, seen_atr = last
                present = bool(state & scard.SCARD_STATE_PRESENT)
                if want_card and present and (atr is None or seen_atr == atr):
                    return seen_atr
                if not want_card and not present:
                    return b""
            if time.monotonic() > deadline:
                what = f"card with ATR {atr.hex().upper()}" if atr else "a card"
                goal = what if want_card else "no card"
                seen = (
                    "reader not listed"
                    if last is None
                    else f"state {last[0]:#x}, ATR {last[1].hex().upper()}"
                )
                raise ReaderError(f"{reader!r} did not show {goal} within {timeout_s} s ({seen})")
            time.sleep(0.02)
    finally:
        scard.SCardReleaseContext(context)


def wait_for_card(reader: str, *, atr: bytes | None = None, timeout_s: float = 5.0) -> bytes:
    """Wait until ``reader`` holds a card (with ``atr`` if given); return the ATR seen.

    vpcd polls every 400 ms, so a fresh card shows up after 0.1-0.45 s.
    """
    return _poll_reader(reader, timeout_s, True, atr)


def wait_for_no_card(reader: str, *, timeout_s: float = 5.0) -> None:
    """Wait until ``reader`` reports no card (vpcd notices a dead card within one poll)."""
    _poll_reader(reader, timeout_s, False, None)


class CardThread:
    """A ``VpcdCardServer`` running in a daemon thread; ``stop()`` joins it."""

    def __init__(self, server: VpcdCardServer) -> None:
        self.server = server
        self.outcome: ServeOutcome | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="vpcd-card", daemon=True)

    @classmethod
    def start(
        cls,
        card: VpcdCard,
        port: int,
        *,
        latency_ms: float = 0.0,
        power_cut_after: int | None = None,
        reconnect: bool = True,
        tcp_tuning: bool = True,
    ) -> CardThread:
        """Start serving ``card`` to vpcd on 127.0.0.1:``port``."""
        server = VpcdCardServer(
            card,
            "127.0.0.1",
            port,
            latency_ms=latency_ms,
            power_cut_after=power_cut_after,
            reconnect=reconnect,
            tcp_tuning=tcp_tuning,
        )
        runner = cls(server)
        runner._thread.start()
        return runner

    def _run(self) -> None:
        try:
            self.outcome = self.server.serve_forever()
        except BaseException as exc:  # surfaced by stop()/join()
            self.error = exc

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout_s: float = 5.0) -> ServeOutcome | None:
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            # A builtin on purpose: the card thread ignoring stop() is a simulator bug (exit 70),
            # nothing a user's input or the link can cause.
            raise RuntimeError("vpcd card thread did not end")
        if self.error is not None:
            raise self.error
        return self.outcome

    def stop(self, timeout_s: float = 5.0) -> ServeOutcome | None:
        self.server.stop()
        return self.join(timeout_s)
