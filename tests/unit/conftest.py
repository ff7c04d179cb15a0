"""Hostile files shared by the file-reading tests (test_fileio, test_config, test_sim_state ...)."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

#: a FIFO reader that blocks is released after this long, so it fails its time bound, not hangs
FIFO_RELEASE_S = 3.0


@pytest.fixture
def fifo(tmp_path: Path) -> Iterator[Path]:
    """A FIFO nobody writes to. Should a regression block on it, a writer opens and closes it
    after FIFO_RELEASE_S, so the test fails on its time bound instead of hanging the suite."""
    path = tmp_path / "fifo"
    os.mkfifo(path)
    done = threading.Event()

    def release() -> None:
        if not done.wait(FIFO_RELEASE_S):
            os.close(os.open(path, os.O_RDWR))  # a writer appears and leaves: EOF

    watchdog = threading.Thread(target=release, daemon=True)
    watchdog.start()
    yield path
    done.set()
    watchdog.join()


@pytest.fixture
def sparse_2gib(tmp_path: Path) -> Path:
    """A 2 GiB file of zeros that takes no disk blocks."""
    path = tmp_path / "huge"
    with path.open("wb") as handle:
        handle.truncate(2 * 1024**3)
    return path
