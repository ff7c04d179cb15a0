"""fileio: the bounded reader refuses what is not a small regular file before reading it, and
the atomic writer leaves the old file or the new one, never a mix, a temp file or a wrong mode.

Failures of the writer are injected by replacing the os function of one step (fileio is the
quarantined I/O seam; the tests run as root, so a read-only directory would not stop them).
"""

from __future__ import annotations

import logging
import os
import socket
import stat
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from est_agent import fileio
from est_agent.errors import ConfigError, InputError, SimStateError, StoreError
from est_agent.fileio import atomic_write, read_bounded

KIB = 1024


def elapsed(call: Callable[[], object]) -> tuple[BaseException | None, float]:
    started = time.monotonic()
    try:
        call()
    except Exception as exc:
        return exc, time.monotonic() - started
    return None, time.monotonic() - started


# --- read_bounded -----------------------------------------------------------------------------


def test_reads_a_regular_file_and_through_a_symlink(tmp_path: Path) -> None:
    target = tmp_path / "ca.pem"
    target.write_bytes(b"-----BEGIN CERTIFICATE-----\n")
    link = tmp_path / "link.pem"
    link.symlink_to(target)
    assert read_bounded(target, limit_bytes=KIB, what="est.trust_anchor") == target.read_bytes()
    assert read_bounded(link, limit_bytes=KIB, what="est.trust_anchor") == target.read_bytes()
    assert read_bounded(str(link), limit_bytes=28, what="x") == target.read_bytes()  # limit: ok


def test_dev_zero_is_refused_at_once() -> None:
    error, seconds = elapsed(
        lambda: read_bounded("/dev/zero", limit_bytes=KIB, what="est.trust_anchor")
    )
    assert isinstance(error, ConfigError) and error.exit_code == 78
    assert str(error) == (
        "est.trust_anchor: cannot read /dev/zero: a character device, not a regular file"
    )
    assert seconds < 1.0


def test_fifo_is_refused_without_waiting_for_a_writer(fifo: Path) -> None:
    error, seconds = elapsed(
        lambda: read_bounded(fifo, limit_bytes=KIB, what="est.basic_password_file")
    )
    assert isinstance(error, ConfigError), error
    assert str(error) == f"est.basic_password_file: cannot read {fifo}: a FIFO, not a regular file"
    assert seconds < 1.0


def test_directory_socket_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^configuration: cannot read .*: a directory, not a"):
        read_bounded(tmp_path, limit_bytes=KIB, what="configuration")
    sock_path = tmp_path / "s.sock"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(sock_path))
        with pytest.raises(ConfigError, match="a socket, not a regular file"):
            read_bounded(sock_path, limit_bytes=KIB, what="configuration")
    with pytest.raises(SimStateError, match=r"absent\.json: not found \(personalize first\)$"):
        read_bounded(
            tmp_path / "absent.json",
            limit_bytes=KIB,
            what="virtual SIM state file",
            error=SimStateError,
            hint_if_missing="personalize first",
        )
    with pytest.raises(ConfigError, match="contains NUL"):
        read_bounded("a\0b", limit_bytes=KIB, what="x")


def test_oversize_sparse_file_is_refused_before_reading(tmp_path: Path, sparse_2gib: Path) -> None:
    big = sparse_2gib
    error, seconds = elapsed(lambda: read_bounded(big, limit_bytes=1024 * KIB, what="x"))
    assert isinstance(error, ConfigError)
    assert str(error) == f"x: cannot read {big}: larger than 1048576 bytes (2147483648 bytes)"
    assert seconds < 1.0
    one_over = tmp_path / "one-over"
    one_over.write_bytes(b"a" * 101)
    with pytest.raises(InputError, match="larger than 100 bytes"):
        read_bounded(one_over, limit_bytes=100, what="--trust-anchor", error=InputError)


def test_a_file_growing_after_fstat_is_read_only_to_the_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    grown = tmp_path / "grown"
    grown.write_bytes(b"b" * 5000)
    small = os.stat(grown)
    small_result = os.stat_result((*small[:6], 10, *small[7:]))  # st_size as it was at fstat
    monkeypatch.setattr(os, "stat", lambda *a, **k: small_result)
    monkeypatch.setattr(os, "fstat", lambda fd: small_result)
    reads: list[int] = []
    real_read = os.read

    def counting_read(fd: int, n: int) -> bytes:
        reads.append(n)
        return real_read(fd, n)

    monkeypatch.setattr(os, "read", counting_read)
    with pytest.raises(ConfigError, match="larger than 100 bytes"):
        read_bounded(grown, limit_bytes=100, what="x")
    assert sum(reads) <= 101


# --- atomic_write -----------------------------------------------------------------------------


def names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


@pytest.mark.parametrize("mode", [0o600, 0o644, 0o640])
def test_writes_with_the_mode_whatever_the_umask(tmp_path: Path, mode: int) -> None:
    target = tmp_path / "out"
    old_umask = os.umask(0o077 if mode != 0o600 else 0o000)
    try:
        atomic_write(target, b"new\n", mode=mode)
    finally:
        os.umask(old_umask)
    assert target.read_bytes() == b"new\n"
    assert stat.S_IMODE(target.stat().st_mode) == mode
    assert names(tmp_path) == ["out"]


def test_the_renamed_file_is_complete_and_has_its_mode_already(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "server.key"
    target.write_bytes(b"old")
    seen: list[tuple[Path, int, bytes, bytes]] = []
    real_replace = os.replace

    def spy(src: str, dst: Path) -> None:
        seen.append(
            (
                Path(src).parent,
                stat.S_IMODE(os.stat(src).st_mode),
                Path(src).read_bytes(),
                target.read_bytes(),
            )
        )
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    atomic_write(target, b"secret", mode=0o600)
    assert seen == [(tmp_path, 0o600, b"secret", b"old")]
    assert target.read_bytes() == b"secret"


def _fail_mkstemp(*args: object, **kwargs: object) -> tuple[int, str]:
    raise OSError(13, "Permission denied")


def _fail(*args: object) -> None:
    raise OSError(28, "No space left on device")


@pytest.mark.parametrize(
    ("module", "name"),
    [
        (tempfile, "mkstemp"),
        (os, "fchmod"),
        (os, "write"),
        (os, "fsync"),  # the file's fsync comes first
        (os, "replace"),
    ],
)
def test_a_failure_at_any_step_leaves_the_old_file_and_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, module: object, name: str
) -> None:
    target = tmp_path / "state.json"
    target.write_bytes(b"old")
    target.chmod(0o600)
    monkeypatch.setattr(module, name, _fail_mkstemp if name == "mkstemp" else _fail)
    with pytest.raises(StoreError) as info:
        atomic_write(target, b"new", mode=0o644, what="agent state")
    monkeypatch.undo()
    assert str(info.value).startswith(f"cannot write agent state {target}: ")
    assert info.value.exit_code == 73
    assert target.read_bytes() == b"old"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert names(tmp_path) == ["state.json"]


def test_the_caller_picks_the_error_and_interrupts_propagate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "card.json"
    target.write_bytes(b"old")
    monkeypatch.setattr(os, "replace", _fail)
    with pytest.raises(SimStateError, match="No space left on device"):
        atomic_write(target, b"new", mode=0o600, error=SimStateError)

    def interrupted(src: object, dst: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, b"new", mode=0o600)
    assert target.read_bytes() == b"old"
    assert names(tmp_path) == ["card.json"]


def test_missing_directory_is_the_callers_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match=r"cannot write file .*/nope/x: not found"):
        atomic_write(tmp_path / "nope" / "x", b"", mode=0o644)


def test_a_refused_directory_fsync_is_only_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def refuse(directory: Path) -> None:
        raise OSError(22, "Invalid argument")

    monkeypatch.setattr(fileio, "_fsync_directory", refuse)
    target = tmp_path / "device.pem"
    with caplog.at_level(logging.WARNING, logger="est_agent.fileio"):
        atomic_write(target, b"pem", mode=0o644, what="PEM export")
    assert target.read_bytes() == b"pem"
    assert f"PEM export {target}: cannot fsync {tmp_path}: Invalid argument" in caplog.text


def test_a_symlink_is_replaced_not_followed(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_bytes(b"keep")
    link = tmp_path / "out"
    link.symlink_to(elsewhere)
    atomic_write(link, b"new", mode=0o644)
    assert not link.is_symlink() and link.read_bytes() == b"new"
    assert elsewhere.read_bytes() == b"keep"


def test_concurrent_writers_never_produce_a_torn_file(tmp_path: Path) -> None:
    target = tmp_path / "shared"
    payloads = [bytes([65 + i]) * (512 * KIB) for i in range(4)]
    atomic_write(target, payloads[0], mode=0o644)
    stop = threading.Event()
    problems: list[str] = []

    def writer(payload: bytes) -> None:
        for _ in range(15):
            atomic_write(target, payload, mode=0o644)

    def reader() -> None:
        while not stop.is_set():
            data = target.read_bytes()
            if data not in payloads:
                problems.append(f"torn: {len(data)} bytes, starts {data[:1]!r}")

    threads = [threading.Thread(target=writer, args=(p,)) for p in payloads]
    watcher = threading.Thread(target=reader)
    watcher.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stop.set()
    watcher.join()
    assert problems == []
    assert target.read_bytes() in payloads
    assert names(tmp_path) == ["shared"]
