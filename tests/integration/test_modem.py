"""The ``modem:`` transport over a real pty against the emulated modem, in every quirk mode:
``card info``, the IoT SAFE operations, the typed failures, ``sim serve --modem-pty`` as a
process, and whole enrollments against the EST test server."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import NameOID

from est_agent.backends.iotsafe import CardSigner
from est_agent.card.channel import CardSession
from est_agent.card.iotsafe import IotSafeApplet
from est_agent.card.uicc import UiccFiles
from est_agent.card.uri import IotSafeRef, ObjectKind, UiccPath
from est_agent.cli.main import main
from est_agent.errors import ModemError, NoCardError, StatusWordError
from est_agent.sim.card import VirtualCard
from est_agent.sim.modem import EmulatedModem, ModemQuirks, PtyModem
from est_agent.sim.options import CardOptions
from est_agent.sim.personalize import personalize
from est_agent.sim.state import load_state
from est_agent.sim.transport import SimTransport
from est_agent.store import HEADER_SIZE, decode_header
from est_agent.testserver import DevPki, EstTestServer
from est_agent.transport.modem import ChannelAccess, ModemTransport
from est_agent.transport.pcsc import PcscTransport
from tests.integration.conftest import Cards
from tests.workflow.conftest import Device

pytestmark = pytest.mark.integration

ICCID = "8988247000007654321"
REPO = Path(__file__).resolve().parents[2]
OP_A_EF = UiccPath((0x7FF0, 0x6F01))
OP_A_KEY = IotSafeRef(ObjectKind.PRIVATE_KEY, object_id=b"\x02")
BOOTSTRAP_FILE = IotSafeRef(ObjectKind.FILE, object_id=b"\x01")

# mode -> (quirks, T=0 card)
MODES: dict[str, tuple[ModemQuirks, bool]] = {
    "default": (ModemQuirks(), False),
    "echo": (ModemQuirks(echo=True), False),
    "urc": (ModemQuirks(urc=True), False),
    "csim-only": (ModemQuirks(csim_only=True), False),
    "no-csim-channels": (ModemQuirks(csim_basic_only=True), False),
    "slow": (ModemQuirks(slow_ms=10), False),
    "lowercase-hex": (ModemQuirks(lowercase_hex=True), False),
    "t0-card": (ModemQuirks(), True),
    "everything": (
        ModemQuirks(echo=True, urc=True, csim_only=True, lowercase_hex=True, slow_ms=2),
        True,
    ),
}
# through AT+CCHO/AT+CGLA, where file commands must stay on the basic channel
CGLA_MODES = {"no-csim-channels"}

StartModem = Callable[..., PtyModem]


@pytest.fixture(scope="module")
def sim_template(tmp_path_factory: pytest.TempPathFactory, dev_pki: DevPki) -> bytes:
    path = tmp_path_factory.mktemp("sim") / "sim.json"
    ca = dev_pki.bootstrap_ca
    personalize(path, iccid=ICCID, bootstrap_ca=(ca.certificate, ca.key))
    return path.read_bytes()


@pytest.fixture
def sim(tmp_path: Path, sim_template: bytes) -> Path:
    path = tmp_path / "sim.json"
    path.write_bytes(sim_template)
    return path


@pytest.fixture
def start_modem(tmp_path: Path, sim: Path) -> Iterator[StartModem]:
    modems: list[PtyModem] = []

    def start(quirks: ModemQuirks = ModemQuirks(), t0: bool = False) -> PtyModem:  # noqa: B008
        card = VirtualCard.load(sim, CardOptions(t0_mode=t0))
        modem = PtyModem(
            EmulatedModem(card, quirks, iccid=ICCID), tmp_path / f"ttyMODEM{len(modems)}"
        )
        modems.append(modem.start())
        return modem

    yield start
    for modem in modems:
        modem.stop()


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("mode", list(MODES))
def test_card_info(mode: str, start_modem: StartModem, capsys: pytest.CaptureFixture[str]) -> None:
    quirks, t0 = MODES[mode]
    modem = start_modem(quirks, t0)
    code, out, err = run_cli(
        capsys, "card", "info", "--reader", f"modem:{modem.device}?timeout=5", "--json"
    )
    assert code == 0, err
    info = json.loads(out)
    assert info["reader"] == f"modem {modem.device}"
    assert info["applet"]["aid"] == "A0000005590010"
    labels = {o["label"] for o in info["objects"]}
    assert {"bootstrap", "op-a", "op-b", "bootstrap-cert"} <= labels
    # ICCID is read on a logical channel: out of reach where only AT+CCHO opens channels
    assert info["iccid"] == (None if mode in CGLA_MODES else ICCID)
    assert modem.modem.apdus > 0


@pytest.mark.parametrize("mode", list(MODES))
def test_iotsafe_operations(mode: str, start_modem: StartModem, sim: Path) -> None:
    quirks, t0 = MODES[mode]
    modem = start_modem(quirks, t0)
    transport = ModemTransport(modem.device, timeout_s=5)
    session = CardSession(transport)
    try:
        applet = IotSafeApplet.open(session)
        generated = applet.generate_key_pair(OP_A_KEY)
        signer = CardSigner.from_card(applet, OP_A_KEY)
        point = signer.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
        assert point == generated.public_point
        digest = hashlib.sha256(mode.encode()).digest()
        signature = signer.sign_digest(digest)
        signer.public_key().verify(signature, digest, ec.ECDSA(Prehashed(hashes.SHA256())))
        bootstrap = x509.load_der_x509_certificate(applet.read_file(BOOTSTRAP_FILE))
        assert ICCID in bootstrap.subject.rfc4514_string()
        channel = session.basic_channel if mode in CGLA_MODES else session.open_channel()
        files = UiccFiles(channel)
        record = mode.encode().ljust(64, b"\x5a")
        files.update(OP_A_EF, record)
        assert files.read(OP_A_EF, 0, len(record)) == record
    finally:
        session.close()
    expected = ChannelAccess.CGLA if mode in CGLA_MODES else ChannelAccess.CSIM
    assert transport.access == expected
    if expected == ChannelAccess.CSIM:
        # frugal: ATE0+CMEE=1, then exactly one AT+CSIM per APDU
        assert transport.at_commands == 1 + transport.stats.apdus
    assert transport.at_commands == modem.modem.commands
    if quirks.urc:
        assert transport.urcs, "URCs were injected but none was seen"
    # the update went to the SIM's file, not only to a cache
    reread = CardSession(SimTransport(sim))
    try:
        assert UiccFiles(reread.basic_channel).read(OP_A_EF, 0, 64) == record
    finally:
        reread.close()


# -- failures ------------------------------------------------------------------------------


def test_modem_that_stops_answering(
    start_modem: StartModem, capsys: pytest.CaptureFixture[str]
) -> None:
    modem = start_modem(ModemQuirks(hang_after=4))  # setup (1) + a few APDUs, then silence
    started = time.monotonic()
    code, _, err = run_cli(capsys, "card", "info", "--reader", f"modem:{modem.device}?timeout=0.4")
    elapsed = time.monotonic() - started
    assert code == 69
    # the message names the AT command and the INS of the APDU it carried
    assert f"modem {modem.device} did not answer AT+CSIM (INS " in err
    assert "within 0.4 s" in err
    assert "[ModemError]" in err
    print(f"silent modem detected by `card info` (timeout 0.4 s): {elapsed:.2f} s")
    assert elapsed < 0.4 + 1


def sim_serve_modem(tmp_path: Path, sim: Path, *extra: str) -> tuple[subprocess.Popen[str], Path]:
    """``est-agent sim serve STATE --modem-pty LINK ...`` as a process; wait for the link."""
    link = tmp_path / "ttyFAULT"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "est_agent",
            "sim",
            "serve",
            str(sim),
            "--modem-pty",
            str(link),
            *extra,
        ],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 10
    while not link.is_symlink():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no pty link"
        time.sleep(0.05)
    return proc, link


def stop(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=10)
    assert proc.returncode == 0


@pytest.mark.parametrize("channels", ["csim", "cgla"])
def test_silent_card_behind_the_modem(
    channels: str, tmp_path: Path, sim: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    extra = ["--modem-no-csim-channels"] if channels == "cgla" else []
    proc, link = sim_serve_modem(tmp_path, sim, "--fault", "ins=CB,silence", *extra)
    try:
        started = time.monotonic()
        code, _, err = run_cli(capsys, "card", "info", "--reader", f"modem:{link}?timeout=1")
        elapsed = time.monotonic() - started
    finally:
        stop(proc)
    assert code == 69, err
    command = "AT+CGLA" if channels == "cgla" else "AT+CSIM"
    assert f"did not answer {command} (INS CB) within 1 s" in err
    print(f"silent card behind the modem ({channels}, timeout 1 s): {elapsed:.2f} s")
    assert elapsed < 1 + 1


def test_key_generation_faults_behind_the_cgla_only_modem(tmp_path: Path, sim: Path) -> None:
    """The modem answers from the same card, so its faults apply on AT+CGLA sessions too."""
    proc, link = sim_serve_modem(
        tmp_path,
        sim,
        "--modem-no-csim-channels",
        "--fault",
        "ins=B9,nth=1,sw=6A84",
        "--fault",
        "ins=B9,nth=2,wrong_public_key",
    )
    try:
        session = CardSession(ModemTransport(str(link), timeout_s=5))
        try:
            applet = IotSafeApplet.open(session)
            with pytest.raises(StatusWordError) as caught:
                applet.generate_key_pair(OP_A_KEY)
            assert caught.value.sw == 0x6A84
            generated = applet.generate_key_pair(OP_A_KEY)
            assert isinstance(session.transport, ModemTransport)
            assert session.transport.access is ChannelAccess.CGLA
        finally:
            session.close()
    finally:
        stop(proc)
    held = next(k.point for k in load_state(sim).applet.public_keys if k.object_id == b"\x02")
    assert held and generated.public_point != held


def test_truncated_answer_behind_the_modem(tmp_path: Path, sim: Path) -> None:
    proc, link = sim_serve_modem(tmp_path, sim, "--fault", "ins=CB,truncate=1")
    try:
        session = CardSession(ModemTransport(str(link), timeout_s=5))
        try:
            applet = IotSafeApplet.open(session)
            with pytest.raises(ModemError, match=r"\+CSIM answer has no status word"):
                applet.info()
        finally:
            session.close()
    finally:
        stop(proc)


def test_disconnect_behind_the_modem_is_no_card(tmp_path: Path, sim: Path) -> None:
    proc, link = sim_serve_modem(tmp_path, sim, "--fault", "ins=CB,disconnect")
    try:
        session = CardSession(ModemTransport(str(link), timeout_s=5))
        try:
            applet = IotSafeApplet.open(session)
            with pytest.raises(NoCardError, match=r"CME ERROR: 10 \(sim not inserted\)") as caught:
                applet.info()
        finally:
            session.close()
    finally:
        stop(proc)
    assert caught.value.exit_code == 69


def test_missing_port(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    port = tmp_path / "ttyUSB7"
    code, _, err = run_cli(capsys, "card", "info", "--reader", f"modem:{port}")
    assert code == 69
    assert f"cannot open modem port {port}: no such port" in err


def test_busy_port(start_modem: StartModem) -> None:
    modem = start_modem()
    first = ModemTransport(modem.device, timeout_s=2)
    first.connect()
    try:
        with pytest.raises(ModemError, match=f"cannot open modem port {modem.device}: port busy"):
            ModemTransport(modem.device, timeout_s=2).connect()
        # the holder is not disturbed by the attempt
        assert first.transmit(bytes.fromhex("0070000001"))[-2:] == b"\x90\x00"
    finally:
        first.close()


def test_numeric_cme_error_through_the_pty(start_modem: StartModem) -> None:
    modem = start_modem()
    transport = ModemTransport(modem.device, timeout_s=2)
    transport.connect()
    try:
        with pytest.raises(ModemError) as caught:
            transport.command("AT+CCHC=7")  # no such session: TS 27.007 §9.2.1 invalid index
        assert caught.value.cme_error == 21
        assert transport.command("AT").ok  # an error answer leaves the dialogue in step
    finally:
        transport.close()


def test_verbose_cme_error_when_cmee_is_2(start_modem: StartModem) -> None:
    modem = start_modem()
    transport = ModemTransport(modem.device, timeout_s=2)
    transport.connect()
    try:
        transport.command("AT+CMEE=2")
        with pytest.raises(ModemError, match="invalid index") as caught:
            transport.command("AT+CCHC=7")
        assert caught.value.cme_error == 21
    finally:
        transport.close()


# -- sim serve --modem-pty as a process ------------------------------------------------------


def test_sim_serve_modem_pty_process(
    tmp_path: Path, sim: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    link = tmp_path / "ttyEST"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "est_agent",
            "sim",
            "serve",
            str(sim),
            "--modem-pty",
            str(link),
            "--modem-urc",
            "--modem-echo",
            "--modem-lowercase-hex",
            "--modem-imei",
            "490154203237518",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 10
        while not link.is_symlink():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no pty link"
            time.sleep(0.05)
        assert os.readlink(link).startswith("/dev/pts/")
        code, out, err = run_cli(capsys, "card", "info", "--reader", f"modem:{link}", "--json")
        assert code == 0, err
        assert json.loads(out)["iccid"] == ICCID
        transport = ModemTransport(str(link), timeout_s=2)
        try:
            assert transport.imei() == "490154203237518"
        finally:
            transport.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert not link.exists() and not link.is_symlink()


# -- whole enrollments -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "extra"),
    [
        ("default", {}),
        ("everything", {}),
        ("no-csim-channels", {"card__uicc_channel": '"basic"'}),
    ],
)
def test_enroll_through_the_modem(
    mode: str,
    extra: dict[str, str],
    tmp_path: Path,
    sim: Path,
    start_modem: StartModem,
    start_server: Callable[..., EstTestServer],
    dev_pki: DevPki,
    capsys: pytest.CaptureFixture[str],
) -> None:
    quirks, t0 = MODES[mode]
    modem = start_modem(quirks, t0)
    device = Device(tmp_path, sim, tmp_path / "est-agent.toml", tmp_path / "state")
    server = start_server()
    device.write_config(server, dev_pki, card__reader=f'"modem:{modem.device}?timeout=5"', **extra)
    code, out, err = run_cli(capsys, "enroll", "--config", str(device.config), "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["outcome"] == "enrolled" and result["slot"] == "op-a"
    # the certificate is on the SIM (read from its state file, not through the modem)
    session = CardSession(SimTransport(sim))
    try:
        raw = UiccFiles(session.basic_channel).read(OP_A_EF)
    finally:
        session.close()
    header = decode_header(raw)
    assert header is not None
    cert = x509.load_der_x509_certificate(raw[HEADER_SIZE : HEADER_SIZE + header.length])
    assert f"{cert.serial_number:X}" == result["serial"]
    assert cert.subject.rfc4514_string() == f"CN={ICCID}"
    assert modem.modem.commands > modem.modem.apdus > 0
    # a second run finds it through the modem and does nothing
    code, out, err = run_cli(capsys, "enroll", "--config", str(device.config), "--json")
    assert code == 0, err
    assert json.loads(out)["outcome"] == "already-enrolled"
    # and the timer's fast path (record header + key) works through it too
    before = modem.modem.commands
    code, out, err = run_cli(capsys, "run", "--config", str(device.config), "--json")
    assert code == 0, err
    assert json.loads(out)["outcome"] == "not-due"
    fast = modem.modem.commands - before
    print(f"run (not due) through the modem, {mode}: {fast} AT commands")
    # connect, then the record header and the slot's key (workflow/quick.py); a modem whose
    # AT+CSIM refuses logical channels costs that refusal once, then AT+CCHO/CGLA/CCHC
    assert 0 < fast <= (12 if t0 else 8 if mode == "no-csim-channels" else 7), fast


def test_imei_subject_template_is_filled_from_the_modem(
    tmp_path: Path,
    sim: Path,
    start_modem: StartModem,
    start_server: Callable[..., EstTestServer],
    dev_pki: DevPki,
    capsys: pytest.CaptureFixture[str],
) -> None:
    modem = start_modem(ModemQuirks(imei="490154203237518", urc=True))
    device = Device(tmp_path, sim, tmp_path / "est-agent.toml", tmp_path / "state")
    server = start_server()
    device.write_config(
        server,
        dev_pki,
        card__reader=f'"modem:{modem.device}?timeout=5"',
        subject__serial_number='"IMEI:{imei}"',
    )
    code, _, err = run_cli(capsys, "enroll", "--config", str(device.config), "--json")
    assert code == 0, err
    session = CardSession(SimTransport(sim))
    try:
        raw = UiccFiles(session.basic_channel).read(OP_A_EF)
    finally:
        session.close()
    header = decode_header(raw)
    assert header is not None
    cert = x509.load_der_x509_certificate(raw[HEADER_SIZE : HEADER_SIZE + header.length])
    serial = cert.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)
    assert [a.value for a in serial] == ["IMEI:490154203237518"]
    assert [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)] == [ICCID]


def test_one_card_through_the_modem_and_pcscd(cards: Cards, sim: Path, tmp_path: Path) -> None:
    """``sim serve --vpcd ... --modem-pty``: the same card behind both links."""
    link = tmp_path / "ttyBOTH"
    cards.sim_process(sim, "--modem-pty", str(link))
    deadline = time.monotonic() + 10
    while not link.is_symlink():
        assert time.monotonic() < deadline, "no pty link"
        time.sleep(0.05)
    session = CardSession(ModemTransport(str(link), timeout_s=5))
    try:
        applet = IotSafeApplet.open(session)
        generated = applet.generate_key_pair(OP_A_KEY)
    finally:
        session.close()
    session = CardSession(PcscTransport(cards.reader()))
    try:
        applet = IotSafeApplet.open(session)
        point = CardSigner.from_card(applet, OP_A_KEY).public_key()
    finally:
        session.close()
    assert point.public_bytes(Encoding.X962, PublicFormat.UncompressedPoint) == (
        generated.public_point
    )
