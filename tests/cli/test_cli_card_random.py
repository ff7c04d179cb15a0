"""`est-agent card random N [--hex]`: GET RANDOM bytes from the card, raw or hex, bounded."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from est_agent.cli.main import main
from est_agent.sim.personalize import personalize

REPO = Path(__file__).resolve().parents[2]
#: a whole `est-agent` process on the in-process SIM takes well under a second; far above it
BOUND_S = 20.0


@pytest.fixture
def sim(tmp_path: Path) -> Path:
    path = tmp_path / "sim.json"
    personalize(path)
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def est_agent_process(*argv: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "est_agent", *argv],
        cwd=REPO,
        capture_output=True,
        timeout=60,
        check=False,
    )


@pytest.mark.integration
def test_raw_bytes_on_stdout_in_a_real_process(sim: Path) -> None:
    started = time.monotonic()
    first = est_agent_process("card", "random", "4096", "--reader", f"sim:{sim}")
    second = est_agent_process("card", "random", "4096", "--reader", f"sim:{sim}")
    assert time.monotonic() - started < 2 * BOUND_S
    assert first.returncode == 0, first.stderr
    assert second.returncode == 0, second.stderr
    assert len(first.stdout) == len(second.stdout) == 4096
    assert first.stdout != second.stdout
    assert first.stderr == b""


def test_hex_is_one_line_of_2n_hex_digits(capsys: pytest.CaptureFixture[str], sim: Path) -> None:
    code, out, err = run(capsys, "card", "random", "300", "--hex", "--reader", f"sim:{sim}")
    assert code == 0, err
    assert out.endswith("\n") and out.count("\n") == 1
    assert len(bytes.fromhex(out.strip())) == 300  # more than one 240-byte GET RANDOM
    code, again, _ = run(capsys, "card", "random", "300", "--hex", "--reader", f"sim:{sim}")
    assert code == 0 and again != out


@pytest.mark.parametrize("n", ["0", "4097", "-5", "ten", "1.5"])
def test_out_of_bounds_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], sim: Path, n: str
) -> None:
    code, out, err = run(capsys, "card", "random", n, "--reader", f"sim:{sim}")
    assert code == 64
    assert out == ""
    assert "N: expected a whole number from 1 to 4096" in err and "UsageError" in err


def test_bounds_themselves_are_accepted(capsys: pytest.CaptureFixture[str], sim: Path) -> None:
    for n in (1, 4096):
        code, out, err = run(capsys, "card", "random", str(n), "--hex", "--reader", f"sim:{sim}")
        assert code == 0, err
        assert len(bytes.fromhex(out.strip())) == n


def test_a_card_that_refuses_get_random(
    capsys: pytest.CaptureFixture[str], sim: Path, tmp_path: Path
) -> None:
    faults = tmp_path / "faults.txt"
    faults.write_text("ins=84 sw=6D00\n")
    started = time.monotonic()
    code, out, err = run(capsys, "card", "random", "16", "--reader", f"sim:{sim}?faults={faults}")
    assert time.monotonic() - started < BOUND_S
    assert code == 76
    assert out == ""
    assert "GET RANDOM: card answered SW 6D00" in err and "[StatusWordError]" in err
    assert "Traceback" not in err


def test_a_card_without_the_applet(capsys: pytest.CaptureFixture[str], sim: Path) -> None:
    code, _, err = run(
        capsys, "card", "random", "8", "--aid", "A000000559FFFF", "--reader", f"sim:{sim}"
    )
    assert code == 76 and "[NotFoundError]" in err


def test_unknown_reader_and_missing_sim(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run(capsys, "card", "random", "8", "--reader", "nfc:0")
    assert code == 64 and "unknown reader type" in err
    code, _, err = run(capsys, "card", "random", "8", "--reader", f"sim:{tmp_path / 'none.json'}")
    assert code == 65 and "[SimStateError]" in err
