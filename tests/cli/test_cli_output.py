"""Standard output closed under the agent (`est-agent card info --json | head -1`): exit 74
(OutputError) with one line on stderr, no traceback, no "Exception ignored" from the final flush.

The reading end of a real pipe is closed before the command writes, so every write fails with
EPIPE, whichever size the output has and however the scheduler runs the two processes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from est_agent.sim.personalize import personalize

pytestmark = pytest.mark.integration

EXPECTED_STDERR = "est-agent: error: cannot write to standard output: Broken pipe [OutputError]\n"


@pytest.fixture(scope="module")
def sim_state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sim") / "sim.json"
    personalize(path)
    return path


def run_into_closed_pipe(*argv: str) -> tuple[int, str, float]:
    read_end, write_end = os.pipe()
    os.close(read_end)  # the consumer is gone before the first byte
    started = time.monotonic()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "est_agent", *argv],
            stdin=subprocess.DEVNULL,
            stdout=write_end,
            stderr=subprocess.PIPE,
            timeout=30,
            check=False,
        )
    finally:
        os.close(write_end)
    return done.returncode, done.stderr.decode(errors="replace"), time.monotonic() - started


@pytest.mark.parametrize(
    "argv",
    [
        ["card", "info", "--reader", "sim:{state}", "--json"],  # larger than the stdout buffer
        ["card", "info", "--reader", "sim:{state}"],  # text, left in the buffer until the end
        ["sim", "init", "{tmp}/new.json", "--json"],
    ],
    ids=["card-info-json", "card-info-text", "sim-init-json"],
)
def test_closed_stdout_is_exit_74_without_traceback(
    sim_state: Path, tmp_path: Path, argv: list[str]
) -> None:
    args = [a.replace("{state}", str(sim_state)).replace("{tmp}", str(tmp_path)) for a in argv]
    code, stderr, seconds = run_into_closed_pipe(*args)
    assert (code, stderr) == (74, EXPECTED_STDERR)
    assert seconds < 10.0
    print(f"{' '.join(argv[:2])}: exit {code} in {seconds:.2f} s")


def test_an_open_pipe_still_gets_everything(sim_state: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "est_agent", "card", "info", "--reader", f"sim:{sim_state}"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert "\nICCID:    " in done.stdout
    assert done.stdout.splitlines()[-1].split()[:5] == [
        "file",
        "id",
        "01",
        "label",
        "bootstrap-cert",
    ]
