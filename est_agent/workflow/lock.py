"""The run lock: one est-agent at a time on a device's card and state directory.

PC/SC opens cards shared, and two runs on one SIM would both pick the same target slot and
write two certificates into it. ``run_lock`` holds an exclusive ``flock(2)`` on
``<state_dir>/lock`` for the whole card session (certbot's ``lock.py`` idea); the file keeps the
holder's PID so that a second run can say who it waited for. flock is released by the kernel
when the holder dies, however it dies, so a stale lock file is harmless and never deleted
(unlinking a lock file races with a process that just opened it).

A read-only state directory (a device whose /var is mounted read-only) cannot hold the lock
file: the directory itself is locked instead (flock works on directory descriptors), without a
PID. A state directory that does not exist and cannot be made, or is not a directory, is a
configuration error: without it the agent cannot keep two runs apart.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from est_agent.errors import BusyError, ConfigError

__all__ = ["LOCK_FILE", "run_lock"]

log = logging.getLogger(__name__)

LOCK_FILE = "lock"
_POLL_S = 0.05
_PID_BYTES = 32


def _open_lock(state_dir: Path) -> tuple[int, bool]:
    """(descriptor to flock, whether it is the lock file that can hold our PID)."""
    with contextlib.suppress(OSError):
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
    try:
        return os.open(state_dir / LOCK_FILE, flags, 0o600), True
    except OSError as exc:
        if exc.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise _unusable(state_dir, exc) from exc
    try:
        return os.open(state_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC), False
    except OSError as exc:
        raise _unusable(state_dir, exc) from exc


def _unusable(state_dir: Path, exc: OSError) -> ConfigError:
    return ConfigError(
        f"paths.state_dir: cannot hold the run lock in {state_dir}: {exc.strerror or exc}"
    )


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, _PID_BYTES, 0).decode("ascii", "replace").strip()
    except OSError:
        return ""
    return text if text.isdigit() else ""


@contextlib.contextmanager
def run_lock(
    state_dir: Path,
    *,
    wait_s: float,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Iterator[None]:
    """Hold the run lock inside; ``BusyError`` (exit 75) after ``wait_s`` seconds of waiting."""
    fd, is_file = _open_lock(state_dir)
    try:
        deadline = clock() + wait_s
        announced = False
        polls = 0
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                pid = _holder(fd) if is_file else ""
                holder = f"PID {pid}" if pid else "another process"
                if clock() >= deadline:
                    raise BusyError(
                        f"another est-agent ({holder}) holds the run lock "
                        f"{state_dir / LOCK_FILE if is_file else state_dir}; "
                        f"waited {wait_s:g} s, try later"
                    ) from None
                # The holder writes its PID just after taking the flock: a waiter that came in
                # between sees an empty file, so it names "another process" only if the PID is
                # still missing one poll later.
                if not announced and (pid or polls > 0 or not is_file):
                    log.warning("waiting for another est-agent (%s) to finish", holder)
                    announced = True
                polls += 1
                sleep(min(_POLL_S, max(0.0, deadline - clock())))
        if is_file:
            with contextlib.suppress(OSError):  # the PID is a courtesy; the flock is the lock
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        yield
    finally:
        os.close(fd)  # releases the flock
