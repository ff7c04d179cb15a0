"""Reading and replacing the agent's local files: one bounded reader, one atomic writer.

Every file est-agent reads from a path a user or configuration chose (configuration, trust
anchor, bootstrap PEMs, Basic password file, virtual SIM state) goes through `read_bounded`, and
every file it replaces (PEM export, host state, virtual SIM state, test PKI) through
`atomic_write`. Both raise one typed error the caller picks (`error=`), so each caller keeps its
exit code: ConfigError (78) for files the configuration names, SimStateError (65) for the SIM
state, StoreError (73) for what the agent writes.

`read_bounded` refuses what cannot be a configuration or PEM file before reading a byte of it:
a FIFO (a read would wait forever for a writer), a character device (``/dev/zero`` never ends),
a directory or a socket; and a regular file larger than the caller's limit. The file is opened
with O_NONBLOCK | O_NOCTTY (POSIX.1-2017 open(): a FIFO opens without waiting for a writer, a
terminal does not become the controlling one), and at most ``limit + 1`` bytes are read, so a
file that grows while it is read cannot take more memory than that either.

`atomic_write` writes a temporary file with a unique name (mkstemp) in the target's directory,
gives it its final mode before a byte of data is in it, fsyncs it, renames it over the target
(POSIX.1-2017 rename(): the name refers to the old file or the new one, never to neither or a
mix) and fsyncs the directory so the rename itself survives a power cut. Failure policy: any
failure up to and including the rename removes the temporary file, leaves the target as it was
and raises `error`; interrupts (KeyboardInterrupt, SystemExit) clean up and propagate as they
are. A failed directory fsync after the rename is only logged: the new file is then already in
place and complete, and raising would make the caller believe the old one is still there.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import TypeAlias

from est_agent.errors import ConfigError, EstAgentError, StoreError

__all__ = [
    "CONFIG_LIMIT_BYTES",
    "PASSWORD_LIMIT_BYTES",
    "PEM_LIMIT_BYTES",
    "SIM_STATE_LIMIT_BYTES",
    "atomic_write",
    "read_bounded",
]

log = logging.getLogger(__name__)

#: the configuration file (the example with every key and its comments is ~5 KiB)
CONFIG_LIMIT_BYTES = 1024 * 1024
#: a PEM file: a trust anchor bundle, a bootstrap certificate chain or key
PEM_LIMIT_BYTES = 1024 * 1024
#: the Basic password file (only its first line is used)
PASSWORD_LIMIT_BYTES = 4 * 1024
#: a virtual SIM state file (a personalized card is ~20 KiB; EFs are at most 32 KiB each)
SIM_STATE_LIMIT_BYTES = 4 * 1024 * 1024

_READ_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_CHUNK = 64 * 1024
# builds the caller's error from the reason (the path and `what` already in it)
_Fail: TypeAlias = Callable[[str], EstAgentError]


def _kind_of(mode: int) -> str:
    """What a non-regular file is, for the message."""
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def _reason(exc: OSError) -> str:
    if isinstance(exc, FileNotFoundError):
        return "not found"
    return exc.strerror or str(exc)


def read_bounded(
    path: str | os.PathLike[str],
    *,
    limit_bytes: int,
    what: str,
    error: type[EstAgentError] = ConfigError,
    hint_if_missing: str = "",
) -> bytes:
    """The whole content of the regular file at `path` (symlinks followed), at most
    `limit_bytes` long; otherwise `error` naming `what` (the configuration key or the option)
    and the path, e.g. ``est.trust_anchor: cannot read /dev/zero: a character device, not a
    regular file``. `hint_if_missing` is appended when the file does not exist.
    """
    where = os.fspath(path)

    def fail(reason: str) -> EstAgentError:
        return error(f"{what}: cannot read {where}: {reason}")

    try:
        # Looked at before it is opened: opening some devices has effects of its own (a tape
        # rewinds, a watchdog arms), and a FIFO must never be read.
        before = os.stat(where)
    except OSError as exc:
        missing = isinstance(exc, FileNotFoundError) and hint_if_missing
        raise fail(_reason(exc) + (f" ({hint_if_missing})" if missing else "")) from None
    except ValueError:  # an embedded NUL
        raise fail("the path contains NUL") from None
    _check_regular(before, limit_bytes, fail)
    try:
        fd = os.open(where, _READ_FLAGS)
    except OSError as exc:
        raise fail(_reason(exc)) from None
    try:
        # Checked again on what was opened: the name may have been replaced in between.
        _check_regular(os.fstat(fd), limit_bytes, fail)
        data = _read_at_most(fd, limit_bytes + 1)
    except OSError as exc:
        raise fail(_reason(exc)) from None
    finally:
        os.close(fd)
    if len(data) > limit_bytes:  # it grew after fstat
        raise fail(f"larger than {limit_bytes} bytes")
    return data


def _check_regular(info: os.stat_result, limit_bytes: int, fail: _Fail) -> None:
    if not stat.S_ISREG(info.st_mode):
        raise fail(f"{_kind_of(info.st_mode)}, not a regular file")
    if info.st_size > limit_bytes:
        raise fail(f"larger than {limit_bytes} bytes ({info.st_size} bytes)")


def _read_at_most(fd: int, count: int) -> bytes:
    chunks: list[bytes] = []
    left = count
    while left > 0:
        chunk = os.read(fd, min(left, _CHUNK))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def atomic_write(
    path: str | os.PathLike[str],
    data: bytes,
    *,
    mode: int,
    error: type[EstAgentError] = StoreError,
    what: str = "file",
) -> None:
    """Replace `path` with `data`, mode `mode` whatever the umask, atomically (see the module
    docstring); on failure `error` (``cannot write <what> <path>: <reason>``) and the old file
    is untouched. A symlink at `path` is replaced by the new file, its target left alone.
    """
    import tempfile  # not at module level: readers (config on `run`'s fast path) need none of it

    target = Path(os.fspath(path))
    directory = target.parent
    tmp_name: str | None = None
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=directory)
        try:
            # Before any data: a key file is never readable by others, not even for a moment.
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp_name, target)
        tmp_name = None
    except OSError as exc:
        raise error(f"cannot write {what} {target}: {_reason(exc)}") from None
    finally:
        if tmp_name is not None:
            # Nothing more can be done if this fails; the name starts with "." and ends in ".tmp".
            with contextlib.suppress(OSError):
                os.unlink(tmp_name)
    try:
        _fsync_directory(directory)
    except OSError as exc:
        # Some file systems refuse fsync on a directory (EINVAL); the new file is in place.
        log.warning("%s %s: cannot fsync %s: %s", what, target, directory, _reason(exc))


def _fsync_directory(directory: Path) -> None:
    # The rename is durable only once the directory entry is on disk (POSIX.1-2017 fsync()).
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
