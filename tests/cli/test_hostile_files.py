"""The console script pointed at files that are not small regular files: a typed error and exit
code at once, in little memory (issue: a trust anchor at /dev/zero took 3.7 GB and died with
MemoryError; a FIFO blocked forever).

Each command runs as its own process under a small wrapper that reports the peak RSS of its
only child (getrusage(RUSAGE_CHILDREN)) and caps the child's address space at 1 GiB, so that a
regression fails here with MemoryError instead of taking the machine's memory.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

RSS_LIMIT_KIB = 64 * 1024
WALL_LIMIT_S = 2.5  # < FIFO_RELEASE_S: a blocking read fails here instead of passing late

_WRAPPER = """
import json, resource, subprocess, sys, time
def cap():
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
started = time.monotonic()
done = subprocess.run(sys.argv[1:], stdin=subprocess.DEVNULL, capture_output=True,
                      preexec_fn=cap, timeout=30)
print(json.dumps({
    "code": done.returncode,
    "seconds": time.monotonic() - started,
    "max_rss_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
    "stderr": done.stderr.decode(errors="replace"),
}))
"""


def run_cli(*argv: str) -> dict[str, object]:
    wrapper = subprocess.run(
        [sys.executable, "-c", _WRAPPER, sys.executable, "-m", "est_agent", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    result: dict[str, object] = json.loads(wrapper.stdout)
    return result


def hostile(kind: str, fifo: Path, sparse_2gib: Path) -> str:
    return {"dev-zero": "/dev/zero", "fifo": str(fifo), "sparse-2gib": str(sparse_2gib)}[kind]


@pytest.mark.parametrize("kind", ["dev-zero", "fifo", "sparse-2gib"])
@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (["status", "--config", "{file}"], 78, "configuration: cannot read {file}: "),
        (["card", "info", "--reader", "sim:{file}"], 65, "virtual SIM state file: cannot read "),
        (
            ["cacerts", "--server", "https://127.0.0.1:9", "--trust-anchor", "{file}"],
            65,
            "--trust-anchor: cannot read {file}: ",
        ),
        (
            ["sim", "init", "{tmp}/s.json", "--bootstrap-ca", "{file}", "--bootstrap-ca-key", "k"],
            65,
            "--bootstrap-ca: cannot read {file}: ",
        ),
    ],
    ids=["config", "sim-state", "trust-anchor", "bootstrap-ca"],
)
def test_hostile_file_gives_a_typed_error_fast_and_small(
    tmp_path: Path,
    fifo: Path,
    sparse_2gib: Path,
    kind: str,
    argv: list[str],
    code: int,
    message: str,
) -> None:
    path = hostile(kind, fifo, sparse_2gib)
    args = [a.replace("{file}", path).replace("{tmp}", str(tmp_path)) for a in argv]
    result = run_cli(*args)
    stderr = str(result["stderr"])
    assert result["code"] == code, stderr
    assert message.replace("{file}", path) in stderr
    assert "Traceback" not in stderr
    assert isinstance(result["seconds"], float) and result["seconds"] < WALL_LIMIT_S
    assert isinstance(result["max_rss_kib"], int) and result["max_rss_kib"] < RSS_LIMIT_KIB
    print(f"{kind} {args[0]}: exit {code}, {result['seconds']:.2f} s, {result['max_rss_kib']} KiB")
