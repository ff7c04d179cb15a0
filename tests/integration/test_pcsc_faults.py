"""A misbehaving virtual SIM behind the real pcscd + vpcd (``sim serve --fault``): silence costs
the APDU deadline and no more, then TransportError (exit 69) and a process that exits; SW
substitution, disconnect and a lying GENERATE KEY PAIR arrive as the card layer's typed errors."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from est_agent.card.channel import CardSession
from est_agent.card.iotsafe import IotSafeApplet
from est_agent.card.uri import IotSafeRef, ObjectKind
from est_agent.errors import CardProtocolError, NoCardError, StatusWordError, TransportError
from est_agent.sim.card import VirtualCard
from est_agent.sim.pcsc_stack import PcscStack, wait_for_card
from est_agent.sim.personalize import personalize
from est_agent.sim.state import load_state
from est_agent.transport.pcsc import PcscTransport
from tests.integration.conftest import REPO, Cards

pytestmark = pytest.mark.integration

OP_A = IotSafeRef(ObjectKind.PRIVATE_KEY, label="op-a")
GET_DATA_ON_BASIC = bytes.fromhex("80CB000044")


@pytest.fixture(scope="module")
def sim_template(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("sim") / "sim.json"
    personalize(path, iccid="8988247000001112223")
    return path.read_bytes()


@pytest.fixture
def sim(tmp_path: Path, sim_template: bytes) -> Path:
    path = tmp_path / "sim.json"
    path.write_bytes(sim_template)
    return path


def serve(cards: Cards, sim: Path, *faults: str) -> subprocess.Popen[bytes]:
    args = [arg for spec in faults for arg in ("--fault", spec)]
    return cards.sim_process(sim, *args, atr=VirtualCard.load(sim).atr)


def run_cli(stack: PcscStack, *argv: str) -> tuple[int, str, float]:
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "est_agent", *argv],
        cwd=REPO,
        env=stack.client_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return result.returncode, result.stderr, time.monotonic() - started


def test_silent_card_card_info_exits_69_within_the_deadline(
    cards: Cards, sim: Path, pcsc_stack: PcscStack
) -> None:
    serve(cards, sim, "ins=CB,silence")
    reader = f"pcsc:{cards.reader()}?timeout=2"
    code, err, elapsed = run_cli(pcsc_stack, "card", "info", "--reader", reader)
    assert code == 69, err
    assert "no answer to INS CB within 2 s" in err
    assert "[TransportError]" in err and "Traceback" not in err
    print(f"silence detected by `card info` (pcscd + vpcd, timeout 2 s): {elapsed:.2f} s")
    assert elapsed < 2 + 1  # the deadline, process start and exit included


def test_silent_card_transmit_times_out_and_the_link_stays_dead(cards: Cards, sim: Path) -> None:
    serve(cards, sim, "ins=CB,silence")
    link = PcscTransport(cards.reader(), timeout_s=1.0)
    link.connect()
    started = time.monotonic()
    with pytest.raises(TransportError, match=r"no answer to INS CB within 1 s") as caught:
        link.transmit(GET_DATA_ON_BASIC)
    elapsed = time.monotonic() - started
    print(f"silence detected by a transmit (pcscd + vpcd, timeout 1 s): {elapsed:.3f} s")
    assert 1.0 <= elapsed < 2.0
    assert caught.value.exit_code == 69
    started = time.monotonic()
    with pytest.raises(TransportError, match=r"INS CB within 1 s.*earlier failure"):
        link.transmit(bytes.fromhex("0070000001"))
    link.close()  # the stuck SCardTransmit is left to its thread: close does not wait for it
    assert time.monotonic() - started < 0.5
    assert any(t.name.startswith("pcsc ") and t.daemon for t in threading.enumerate())


def test_other_commands_answer_before_the_silence(cards: Cards, sim: Path) -> None:
    serve(cards, sim, "ins=CB,nth=2,silence")
    session = CardSession(PcscTransport(cards.reader(), timeout_s=1.0))
    try:
        applet = IotSafeApplet.open(session)
        assert applet.info().version == 1  # the first GET DATA is answered
        with pytest.raises(TransportError, match="INS CB"):
            applet.objects()  # the second is not
    finally:
        session.close()


def test_sw_substituted_through_pcscd(cards: Cards, sim: Path) -> None:
    before = load_state(sim).applet.public_keys
    serve(cards, sim, "ins=B9,sw=6A84")
    session = CardSession(PcscTransport(cards.reader()))
    try:
        applet = IotSafeApplet.open(session)
        with pytest.raises(StatusWordError) as caught:
            applet.generate_key_pair(OP_A)
    finally:
        session.close()
    assert caught.value.sw == 0x6A84 and caught.value.exit_code == 76
    assert load_state(sim).applet.public_keys == before


def test_disconnect_through_pcscd_then_the_card_comes_back(cards: Cards, sim: Path) -> None:
    proc = serve(cards, sim, "ins=CB,nth=1,disconnect")
    session = CardSession(PcscTransport(cards.reader()))
    try:
        applet = IotSafeApplet.open(session)
        started = time.monotonic()
        with pytest.raises(NoCardError) as caught:
            applet.info()
        assert time.monotonic() - started < 1.0
        assert caught.value.exit_code == 69
    finally:
        session.close()
    assert proc.poll() is None  # the card process lives on and reinserts the card
    time.sleep(0.5)  # the removal must be seen by pcscd before the card shows again
    wait_for_card(cards.reader(), atr=VirtualCard.load(sim).atr, timeout_s=5.0)
    session = CardSession(PcscTransport(cards.reader()))
    try:
        assert IotSafeApplet.open(session).info().version == 1  # nth=1: once only
    finally:
        session.close()


@pytest.mark.parametrize(
    ("keep", "error", "message"),
    [
        (1, CardProtocolError, "answered 1 byte without a status word"),
        # vpcd reads a 0-byte answer with recv(MSG_WAITALL), which waits for a byte that
        # never comes: to the host that card is silent
        (0, TransportError, r"no answer to INS CB within 2 s"),
    ],
)
def test_truncated_answer_through_pcscd(
    cards: Cards, sim: Path, keep: int, error: type[Exception], message: str
) -> None:
    serve(cards, sim, f"ins=CB,nth=1,truncate={keep}")
    session = CardSession(PcscTransport(cards.reader(), timeout_s=2.0))
    try:
        applet = IotSafeApplet.open(session)
        with pytest.raises(error, match=message):
            applet.info()
    finally:
        session.close()


def test_wrong_public_key_through_pcscd(cards: Cards, sim: Path) -> None:
    serve(cards, sim, "ins=B9,wrong_public_key")
    session = CardSession(PcscTransport(cards.reader()))
    try:
        generated = IotSafeApplet.open(session).generate_key_pair(OP_A)
    finally:
        session.close()
    held = next(k.point for k in load_state(sim).applet.public_keys if k.label == "op-a")
    assert held and generated.public_point != held
    assert len(generated.public_point) == 65 and generated.public_point[0] == 0x04


def test_bad_fault_spec_is_a_usage_error(sim: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "est_agent", "sim", "serve", str(sim), "--fault", "ins=B9,loud"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 64
    assert "--fault: unknown fault word 'loud'" in result.stderr
