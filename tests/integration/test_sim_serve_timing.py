"""``est-agent sim serve --latency-ms/--keygen-ms/--sign-ms`` as a process: the card's time is
acted out over the emulated modem's pty (lower bounds only: a sleep never ends early)."""

from __future__ import annotations

import hashlib
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from est_agent.card.channel import CardSession
from est_agent.card.iotsafe import IotSafeApplet
from est_agent.card.uri import IotSafeRef, ObjectKind
from est_agent.sim.personalize import personalize
from est_agent.transport.modem import ModemTransport
from tests.integration.test_pcsc_vpcd import FakeVpcd

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
OP_A_KEY = IotSafeRef(ObjectKind.PRIVATE_KEY, object_id=b"\x02")


def _serve(sim: Path, link: Path, *extra: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "est_agent", "sim", "serve", str(sim), "--modem-pty", str(link),
         *extra],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 10
    while not link.is_symlink():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no pty link"
        time.sleep(0.05)
    return proc


def test_modem_card_time_per_at_round_trip_keygen_and_signature(tmp_path: Path) -> None:
    sim = tmp_path / "sim.json"
    personalize(sim)
    link = tmp_path / "ttySIM"
    proc = _serve(
        sim, link, "--modem-slow-ms", "30", "--latency-ms", "10",
        "--keygen-ms", "400", "--sign-ms", "200",
    )  # fmt: skip
    try:
        transport = ModemTransport(str(link), timeout_s=5)
        applet = IotSafeApplet.open(CardSession(transport))
        started = time.perf_counter()
        applet.generate_key_pair(OP_A_KEY)
        keygen = time.perf_counter() - started
        started = time.perf_counter()
        applet.sign_digest(OP_A_KEY, hashlib.sha256(b"timed").digest())
        sign = time.perf_counter() - started
        transport.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    # one AT round trip (30 ms) + the APDU (10 ms) + the key generation (400 ms)
    assert keygen >= 0.030 + 0.010 + 0.400
    # INIT and UPDATE: two AT round trips and two APDUs, + the signature (200 ms)
    assert sign >= 2 * (0.030 + 0.010) + 0.200


def test_vpcd_card_time_per_apdu_and_keygen(tmp_path: Path) -> None:
    """``sim serve --vpcd`` against a fake vpcd (the vpcd protocol byte for byte, no pcscd)."""
    sim = tmp_path / "sim.json"
    personalize(sim)
    vpcd = FakeVpcd()
    proc = subprocess.Popen(
        [sys.executable, "-m", "est_agent", "sim", "serve", str(sim),
         "--vpcd", f"127.0.0.1:{vpcd.port}", "--latency-ms", "20", "--keygen-ms", "300"],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        vpcd.accept()
        vpcd.send(b"\x01")  # power on
        started = time.perf_counter()
        assert vpcd.exchange(bytes.fromhex("01A4040007A0000005590010")) == b"\x90\x00"
        select = time.perf_counter() - started
        started = time.perf_counter()
        generated = vpcd.exchange(bytes.fromhex("81B90000067404" + "6F702D61"))
        keygen = time.perf_counter() - started
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
        vpcd.close()
    assert proc.returncode == 0, err
    assert generated.endswith(b"\x90\x00")
    assert select >= 0.020  # --latency-ms only
    assert keygen >= 0.020 + 0.300  # and the key generation


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("--keygen-ms", "--keygen-ms must not be negative"),
        ("--sign-ms", "--sign-ms must not be negative"),
        ("--latency-ms", "--latency-ms must not be negative"),
    ],
)
@pytest.mark.parametrize("link", ["vpcd", "modem"])
def test_negative_card_time_is_a_usage_error(
    tmp_path: Path, option: str, message: str, link: str
) -> None:
    sim = tmp_path / "sim.json"
    personalize(sim)
    where = ["--modem-pty", str(tmp_path / "tty")] if link == "modem" else ["--vpcd", "127.0.0.1:1"]
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "est_agent", "sim", "serve", str(sim), *where, option, "-1"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 64, done.stderr
    assert message in done.stderr
    assert "Traceback" not in done.stderr
    assert time.monotonic() - started < 30  # refused before anything starts
