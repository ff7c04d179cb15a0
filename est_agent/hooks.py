"""What happens after a new certificate became active: the PEM export and the deploy hook.

Both run only after the store has written the certificate to the SIM and read it back (certbot's
rule: deploy hooks only after a successful install). Neither can undo that install, so neither
raises for an operational failure: `write_pem_export` returns an `ExportResult` and
`run_deploy_hook` a `HookResult`, and the caller reports them (a failed hook still lets the run
exit 0, see the exit-code table in the README). Raising instead would let an `OSError` from the
export travel up through the workflow and be mistaken for a failed install (exit 73, "certificate
not installed"), which would be false. Only a programming error (an empty certificate list, an
argument of the wrong form) raises `ValueError`.

The hook is an argv list run without a shell, in an environment built from scratch: PATH and LANG
from the agent's environment, the caller's `base_env`, then the `EST_AGENT_*` variables. Nothing
else of the agent's environment is passed on, so a Basic password handed to the agent through an
environment variable never reaches the hook.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import selectors
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from est_agent.errors import InputError, StoreError
from est_agent.fileio import atomic_write

__all__ = [
    "DEFAULT_HOOK_TIMEOUT_S",
    "DEFAULT_PATH",
    "HOOK_ENV_NAMES",
    "OUTPUT_EXCERPT_BYTES",
    "DeployReport",
    "ExportResult",
    "HookResult",
    "check_hook_command",
    "deploy_new_certificate",
    "hook_environment",
    "pem_bundle",
    "run_deploy_hook",
    "write_pem_export",
]

log = logging.getLogger(__name__)

DEFAULT_HOOK_TIMEOUT_S = 60.0
#: PATH given to the hook when the agent itself has none (systemd always sets one)
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: the variables a deploy hook receives, in the order the README documents them
HOOK_ENV_NAMES = (
    "EST_AGENT_SLOT",
    "EST_AGENT_KEY",
    "EST_AGENT_SERIAL",
    "EST_AGENT_NOT_AFTER",
    "EST_AGENT_PEM",
    "EST_AGENT_SUBJECT",
)
#: the last this many bytes of each of stdout/stderr are kept (errors are usually at the end)
OUTPUT_EXCERPT_BYTES = 4096
_EXPORT_MODE = 0o644
# After SIGTERM to the hook's process group, how long it may take to exit before SIGKILL.
_KILL_GRACE_S = 2.0
# Once the hook itself exited, how long to keep reading output a child it left behind may
# still write into the inherited pipes; after that the pipes are closed and the child is left.
_DRAIN_AFTER_EXIT_S = 1.0
_HEX = re.compile(r"[0-9A-Fa-f]+")


# ---------------------------------------------------------------------------------------------
# PEM export


@dataclass(frozen=True)
class ExportResult:
    """Outcome of `write_pem_export`: `error` is None when the file was replaced."""

    path: Path
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def pem_bundle(certificates: Sequence[x509.Certificate]) -> bytes:
    """The PEM of each certificate in the given order (leaf first, then its chain)."""
    if not certificates:
        raise InputError("pem_bundle: no certificate")
    return b"".join(cert.public_bytes(Encoding.PEM) for cert in certificates)


def write_pem_export(path: Path, certificates: Sequence[x509.Certificate]) -> ExportResult:
    """Replace `path` with the PEM of the leaf and its chain, atomically, mode 0644.

    `fileio.atomic_write` does it (temporary file in the same directory, fsync, rename, fsync of
    the directory): a reader of `path` sees the old file or the new one, never a mix; on any
    failure the old file is left as it was. A symlink at `path` is replaced by a regular file
    (the link is not followed). The mode is set with fchmod, so the umask does not matter: a
    certificate is public and services running as other users must read it.
    """
    data = pem_bundle(certificates)
    try:
        atomic_write(Path(path), data, mode=_EXPORT_MODE, what="the PEM export")
    except StoreError as exc:
        return ExportResult(Path(path), str(exc))
    return ExportResult(Path(path))


def _os_error_text(exc: OSError) -> str:
    return exc.strerror or str(exc)


# ---------------------------------------------------------------------------------------------
# Deploy hook


@dataclass(frozen=True)
class HookResult:
    """Outcome of one deploy hook run.

    `exit_status` is the process's exit status, negative for "killed by that signal", None when
    it never started (`error` says why). `stdout` / `stderr` hold at most the last
    `OUTPUT_EXCERPT_BYTES` of each, decoded leniently; `*_truncated` says whether more was
    written.
    """

    argv: tuple[str, ...]
    exit_status: int | None
    duration_s: float
    stdout: str = ""
    stderr: str = ""
    timed_out: bool = False
    error: str | None = None
    stdout_truncated: bool = False
    stderr_truncated: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None and not self.timed_out and self.exit_status == 0

    def describe(self) -> str:
        """One line for the log: what ran and how it ended."""
        name = self.argv[0] if self.argv else "(none)"
        if self.error is not None:
            return f"deploy hook {name}: {self.error}"
        if self.timed_out:
            return f"deploy hook {name} timed out after {self.duration_s:.1f} s and was killed"
        status = self.exit_status
        if status is not None and status < 0:
            try:
                how = f"was killed by {signal.Signals(-status).name}"
            except ValueError:
                how = f"was killed by signal {-status}"
        else:
            how = f"exited with status {status}"
        return f"deploy hook {name} {how} after {self.duration_s:.1f} s"


def check_hook_command(argv: Sequence[str], *, path: str | None = None) -> str | None:
    """Why `argv` cannot run (missing, not executable), or None when it can.

    Meant for checking the configuration at startup as well as right before the run. A bare
    name is looked up in `path` (default: the PATH the hook will get).
    """
    resolved, problem = _resolve_executable(argv, path if path is not None else _base_path())
    return problem if resolved is None else None


def _resolve_executable(argv: Sequence[str], path: str) -> tuple[str | None, str | None]:
    if not argv or not argv[0]:
        return None, "no command given"
    program = argv[0]
    if "\0" in program:
        return None, "the command contains a NUL character"
    if "/" not in program:
        found = shutil.which(program, path=path)
        if found is None:
            return None, f"{program!r} not found in PATH ({path})"
        return found, None
    if not os.path.exists(program):
        return None, f"{program} does not exist"
    if os.path.isdir(program):
        return None, f"{program} is a directory"
    if not os.access(program, os.X_OK):
        return None, f"{program} is not executable"
    return program, None


def _base_path() -> str:
    return os.environ.get("PATH") or DEFAULT_PATH


def hook_environment(
    *,
    slot: str,
    key: str,
    serial: str,
    not_after: datetime,
    pem_path: Path | None,
    subject: str,
    base_env: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The complete environment of a deploy hook (see the module docstring for the layering).

    `serial` is hexadecimal (any case, no separators) and is passed in upper case; `not_after`
    is passed as ISO 8601 UTC (`2027-05-01T12:00:00Z`), a naive value being taken as UTC as
    cryptography's naive accessors return it. `EST_AGENT_PEM` is empty when there is no export.
    `key` is the active slot's private key as a card URI (`iotsafe:key-id=03`, the form of
    `slot.key` in the configuration, card/uri.py), so device software that signs with the SIM
    key (a TLS stack's IoT SAFE layer, an LwM2M client) can pick the slot that is now active.
    The `EST_AGENT_*` names always carry these values, even if `base_env` names them too.
    """
    if not _HEX.fullmatch(serial):
        raise InputError(f"serial {serial!r} is not hexadecimal")
    env = {"PATH": _base_path()}
    lang = os.environ.get("LANG")
    if lang:
        env["LANG"] = lang
    if base_env:
        env.update(base_env)
    if not_after.tzinfo is None:
        not_after = not_after.replace(tzinfo=UTC)
    env.update(
        {
            "EST_AGENT_SLOT": slot,
            "EST_AGENT_KEY": key,
            "EST_AGENT_SERIAL": serial.upper(),
            "EST_AGENT_NOT_AFTER": not_after.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "EST_AGENT_PEM": str(pem_path) if pem_path is not None else "",
            "EST_AGENT_SUBJECT": subject,
        }
    )
    # The subject comes from the issuing server; a NUL in it would make exec fail with a
    # ValueError, so it is shown as U+FFFD instead (as would any other value).
    return {key: value.replace("\0", "\ufffd") for key, value in env.items()}


def run_deploy_hook(
    argv: Sequence[str],
    *,
    slot: str,
    key: str,
    serial: str,
    not_after: datetime,
    pem_path: Path | None,
    subject: str,
    timeout_s: float = DEFAULT_HOOK_TIMEOUT_S,
    base_env: Mapping[str, str] | None = None,
) -> HookResult:
    """Run the deploy hook once and report how it ended; never raises for the hook's failures.

    The hook runs without a shell, with stdin from /dev/null, in its own session (so its process
    group is its own). After `timeout_s` the whole group gets SIGTERM, then SIGKILL if it is
    still there after a short grace: a hook that hangs must not stop the agent's next timer run.
    """
    argv = tuple(argv)
    env = hook_environment(
        slot=slot,
        key=key,
        serial=serial,
        not_after=not_after,
        pem_path=pem_path,
        subject=subject,
        base_env=base_env,
    )
    started = time.monotonic()
    executable, problem = _resolve_executable(argv, env["PATH"])
    if executable is None:
        return HookResult(argv, None, 0.0, error=problem)
    try:
        process = subprocess.Popen(
            list(argv),
            # The resolved path runs, the hook still sees argv[0] as configured.
            executable=executable,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            start_new_session=True,
            close_fds=True,
        )
    except (OSError, ValueError) as exc:  # ENOEXEC, EACCES, a NUL in an argument ...
        text = _os_error_text(exc) if isinstance(exc, OSError) else str(exc)
        return HookResult(
            argv, None, time.monotonic() - started, error=f"cannot start {argv[0]}: {text}"
        )
    with process:
        out, err, timed_out = _collect(process, started + timeout_s)
    return HookResult(
        argv,
        process.returncode,
        time.monotonic() - started,
        stdout=out.text(),
        stderr=err.text(),
        timed_out=timed_out,
        stdout_truncated=out.truncated,
        stderr_truncated=err.truncated,
    )


class _Tail:
    """The last `OUTPUT_EXCERPT_BYTES` of a stream, however much was written."""

    def __init__(self) -> None:
        self._data = bytearray()
        self.truncated = False

    def add(self, chunk: bytes) -> None:
        self._data += chunk
        excess = len(self._data) - OUTPUT_EXCERPT_BYTES
        if excess > 0:
            del self._data[:excess]
            self.truncated = True

    def text(self) -> str:
        return self._data.decode("utf-8", errors="replace")


def _collect(process: subprocess.Popen[bytes], deadline: float) -> tuple[_Tail, _Tail, bool]:
    """Read both pipes until EOF and the process exit, or until the deadline (then kill)."""
    assert process.stdout is not None and process.stderr is not None
    out, err = _Tail(), _Tail()
    tails = {process.stdout.fileno(): out, process.stderr.fileno(): err}
    timed_out = False
    with selectors.DefaultSelector() as selector:
        for pipe in (process.stdout, process.stderr):
            selector.register(pipe, selectors.EVENT_READ)
        exited_at: float | None = None
        while True:
            now = time.monotonic()
            if exited_at is None and process.poll() is not None:
                exited_at = now
            if exited_at is None and now >= deadline:
                timed_out = True
                break
            if not selector.get_map():
                if exited_at is not None:
                    break
                # Both pipes closed, the hook still runs: only its exit is left to wait for.
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=deadline - now)
                continue
            if exited_at is not None and now >= exited_at + _DRAIN_AFTER_EXIT_S:
                break  # a child left behind keeps the pipes open; do not wait for it
            limit = deadline if exited_at is None else exited_at + _DRAIN_AFTER_EXIT_S
            # Wake at least every 0.1 s to notice the exit of a hook whose pipes stay open.
            for key, _ in selector.select(timeout=min(max(limit - now, 0.0), 0.1)):
                chunk = os.read(key.fd, 65536)
                if chunk:
                    tails[key.fd].add(chunk)
                else:
                    selector.unregister(key.fileobj)
    if timed_out:
        _kill_group(process)
    return out, err, timed_out


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    # start_new_session made the hook a session and group leader: its pid is the group id, and
    # everything it started without leaving the group goes with it.
    _signal_group(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=_KILL_GRACE_S)
    # Whatever is left: the leader if it ignored SIGTERM, children that ignored it or were slow.
    _signal_group(process.pid, signal.SIGKILL)
    process.wait()


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    # ProcessLookupError: the group is gone already; PermissionError: nothing left we may signal.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


# ---------------------------------------------------------------------------------------------
# Both, in order


@dataclass(frozen=True)
class DeployReport:
    """What `deploy_new_certificate` did: None for a step that is not configured."""

    export: ExportResult | None
    hook: HookResult | None

    @property
    def ok(self) -> bool:
        return all(step is None or step.ok for step in (self.export, self.hook))


def deploy_new_certificate(
    certificates: Sequence[x509.Certificate],
    *,
    slot: str,
    key: str,
    export_path: Path | None,
    hook_argv: Sequence[str],
    hook_timeout_s: float = DEFAULT_HOOK_TIMEOUT_S,
    base_env: Mapping[str, str] | None = None,
) -> DeployReport:
    """Export, then run the hook, for a certificate the store has just made active.

    `key`: the slot's private key URI (`EST_AGENT_KEY`). Call it only after the install was
    read back. The hook sees `EST_AGENT_PEM` only when the
    export succeeded in this run, so it never deploys a stale file. Failures are logged as
    warnings and returned; nothing here raises for them.
    """
    if not certificates:
        raise InputError("deploy_new_certificate: no certificate")
    leaf = certificates[0]
    export: ExportResult | None = None
    if export_path is not None:
        export = write_pem_export(export_path, certificates)
        if export.ok:
            log.info("wrote the PEM export %s", export.path, extra={"slot": slot})
        else:
            log.warning("%s", export.error, extra={"slot": slot})
    hook: HookResult | None = None
    if hook_argv:
        hook = run_deploy_hook(
            hook_argv,
            slot=slot,
            key=key,
            serial=format(leaf.serial_number, "X"),
            not_after=leaf.not_valid_after_utc,
            pem_path=export.path if export is not None and export.ok else None,
            subject=leaf.subject.rfc4514_string(),
            timeout_s=hook_timeout_s,
            base_env=base_env,
        )
        if hook.ok:
            log.info("%s", hook.describe(), extra={"slot": slot})
        else:
            log.warning(
                "%s; the new certificate stays active%s",
                hook.describe(),
                f"; stderr: {hook.stderr.strip()[-500:]}" if hook.stderr.strip() else "",
                extra={"slot": slot, "exit_status": hook.exit_status},
            )
    return DeployReport(export, hook)
