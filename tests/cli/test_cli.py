"""The command line, run in process: output, JSON and exit codes."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from cryptography import x509

from est_agent.cli.main import main
from tests.certs import ca_credential, trustme_ca


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def make_ca(tmp_path: Path) -> tuple[Path, Path, x509.Certificate]:
    """A bootstrap CA from trustme, as the PEM files ``sim init --bootstrap-ca`` reads."""
    ca = trustme_ca()
    cert_path, key_path = tmp_path / "ca.pem", tmp_path / "ca.key"
    ca.cert_pem.write_to_path(str(cert_path))
    ca.private_key_pem.write_to_path(str(key_path))
    return cert_path, key_path, ca_credential(ca)[0]


def test_sim_init_with_ca_then_card_info_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ca_cert, ca_key, ca = make_ca(tmp_path)
    state = tmp_path / "sim.json"
    code, out, _ = run(
        capsys,
        "sim",
        "init",
        str(state),
        "--bootstrap-ca",
        str(ca_cert),
        "--bootstrap-ca-key",
        str(ca_key),
        "--iccid",
        "8988247000001234567",
        "--json",
    )
    assert code == 0
    report = json.loads(out)
    assert report["bootstrap_certificate"]["issuer"] == ca.subject.rfc4514_string()

    code, out, _ = run(capsys, "card", "info", "--reader", f"sim:{state}", "--json")
    assert code == 0
    info = json.loads(out)
    assert info["iccid"] == "8988247000001234567"
    assert info["applet"]["aid"] == "A0000005590010"
    labels = {(o["type"], o["label"], o["state"]) for o in info["objects"]}
    assert ("private-key", "bootstrap", "activated") in labels
    assert ("private-key", "op-a", "empty") in labels
    assert ("file", "bootstrap-cert", "activated") in labels

    code, out, _ = run(capsys, "card", "info", "--reader", f"sim:{state}")
    assert code == 0 and "ICCID:    8988247000001234567" in out


def test_sim_init_refuses_to_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "sim.json"
    assert run(capsys, "sim", "init", str(state))[0] == 0
    before = state.read_bytes()
    code, _, err = run(capsys, "sim", "init", str(state))
    assert code == 65 and "SimStateError" in err
    assert state.read_bytes() == before
    assert run(capsys, "sim", "init", str(state), "--force")[0] == 0
    assert state.read_bytes() != before


@pytest.mark.parametrize(
    ("argv", "code", "needle"),
    [
        (["card", "info", "--reader", "sim:/nonexistent/sim.json"], 65, "SimStateError"),
        (["card", "info", "--reader", "floppy:a"], 64, "unknown reader type"),
        (["card", "info", "--aid", "zz", "--reader", "sim:x"], 64, "--aid"),
        (["sim", "init", "x", "--bootstrap-ca", "ca.pem"], 64, "go together"),
        (["sim", "serve", "x", "--vpcd", "nohost"], 64, "HOST:PORT"),
        (["frobnicate"], 64, ""),
        (["sim", "init", "{tmp}/s.json", "--iccid", "12ab"], 65, "ICCID"),
        (
            [
                "sim",
                "init",
                "{tmp}/s.json",
                "--bootstrap-ca",
                "{tmp}/nope.pem",
                "--bootstrap-ca-key",
                "{tmp}/nope.key",
            ],
            65,
            "cannot read",
        ),
    ],
)
def test_errors_have_exit_codes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], code: int, needle: str
) -> None:
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    got, _, err = run(capsys, *argv)
    assert got == code, err
    assert needle in err


def test_wrong_aid_exit_code(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "sim.json"
    run(capsys, "sim", "init", str(state))
    code, _, err = run(
        capsys, "card", "info", "--reader", f"sim:{state}", "--aid", "A0000002480400"
    )
    assert code == 76 and "6A82" in err


def test_ca_key_must_match(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    ca_cert, _, _ = make_ca(tmp_path / "a")
    _, other_key, _ = make_ca(tmp_path / "b")
    code, _, err = run(
        capsys,
        "sim",
        "init",
        str(tmp_path / "s.json"),
        "--bootstrap-ca",
        str(ca_cert),
        "--bootstrap-ca-key",
        str(other_key),
    )
    assert code == 65 and "not the private key" in err


# --- numeric options: a clear UsageError (64), never a traceback ------------------------------


@pytest.mark.parametrize("command", ["cacerts", "csrattrs"])
@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--timeout", "-1", "--timeout: expected seconds > 0 and <= 3600, got '-1'"),
        ("--timeout", "0", "--timeout: expected seconds > 0 and <= 3600, got '0'"),
        ("--timeout", "nan", "--timeout: expected seconds > 0 and <= 3600, got 'nan'"),
        ("--timeout", "inf", "--timeout: expected seconds > 0 and <= 3600, got 'inf'"),
        ("--timeout", "-inf", "--timeout: expected seconds > 0 and <= 3600, got '-inf'"),
        ("--timeout", "1e9", "--timeout: expected seconds > 0 and <= 3600, got '1e9'"),
        ("--timeout", "soon", "--timeout: expected seconds > 0 and <= 3600, got 'soon'"),
        ("--attempts", "0", "--attempts: expected a whole number from 1 to 20, got '0'"),
        ("--attempts", "-3", "--attempts: expected a whole number from 1 to 20, got '-3'"),
        ("--attempts", "21", "--attempts: expected a whole number from 1 to 20, got '21'"),
        ("--attempts", "2.5", "--attempts: expected a whole number from 1 to 20, got '2.5'"),
    ],
)
def test_numeric_options_out_of_range_are_usage_errors(
    capsys: pytest.CaptureFixture[str], command: str, option: str, value: str, message: str
) -> None:
    argv = [command, "--server", "https://127.0.0.1:9", "--trust-anchor", "ca.pem"]
    started = time.monotonic()
    # --opt=VALUE: argparse would read a separate "-inf" as an option of its own
    code, out, err = run(capsys, *argv, f"{option}={value}")
    assert time.monotonic() - started < 1.0  # refused before anything is read or connected
    assert code == 64
    assert err == f"est-agent: error: {message} [UsageError]\n"
    assert out == ""


@pytest.mark.parametrize(("option", "value"), [("--timeout", "0.5"), ("--attempts", "1")])
def test_numeric_options_in_range_are_taken(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], option: str, value: str
) -> None:
    # Past the parser: the missing trust anchor is the next thing to fail.
    argv = ["cacerts", "--server", "https://127.0.0.1:9", "--trust-anchor", str(tmp_path / "no")]
    code, _, err = run(capsys, *argv, option, value)
    assert code == 65 and "--trust-anchor: cannot read" in err
