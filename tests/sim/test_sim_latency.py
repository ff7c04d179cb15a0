"""The card's own time (sim/latency.py): per APDU, GENERATE KEY PAIR and the signing UPDATE.

The timed exchanges assert lower bounds only (a sleep never ends early); no upper bounds.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest

from est_agent.card.channel import CardSession
from est_agent.card.iotsafe import IotSafeApplet
from est_agent.card.uri import IotSafeRef, ObjectKind
from est_agent.errors import UsageError
from est_agent.sim.card import VirtualCard
from est_agent.sim.faults import FaultPlan
from est_agent.sim.latency import CardTiming, TimedCard
from est_agent.sim.personalize import personalize
from est_agent.sim.transport import SimTransport
from est_agent.transport import open_transport

OP_A = IotSafeRef(ObjectKind.PRIVATE_KEY, label="op-a")
TIMING = CardTiming(apdu_ms=10, keygen_ms=300, sign_ms=80)


@pytest.fixture
def state(tmp_path: Path) -> Path:
    path = tmp_path / "sim.json"
    personalize(path)
    return path


@pytest.mark.parametrize(
    ("apdu", "response", "seconds"),
    [
        ("81B90000038401 01", "84010185010290 00", 0.310),  # GENERATE KEY PAIR, 9000
        ("81B90000038401 01", "6A88", 0.010),  # refused: no key was made
        ("812B8001229E20" + "00" * 32, "3300409000", 0.090),  # last block: the card signs
        ("812B0001079B05" + "00" * 5, "9000", 0.010),  # intermediate block: no signature
        ("812A0001 0D", "9000", 0.010),  # INIT
        ("01A4040007A0000005590010", "9000", 0.010),  # SELECT
        ("00", "6700", 0.010),  # too short to have an INS: the APDU time only
    ],
)
def test_seconds_per_command(apdu: str, response: str, seconds: float) -> None:
    got = TIMING.seconds(bytes.fromhex(apdu), bytes.fromhex(response))
    assert got == pytest.approx(seconds)


@pytest.mark.parametrize("field", ["apdu_ms", "keygen_ms", "sign_ms"])
@pytest.mark.parametrize("value", [-1.0, 60_001.0, float("nan")])
def test_bad_timing_is_a_usage_error(field: str, value: float) -> None:
    with pytest.raises(UsageError, match=f"card {field} must be 0..60000 ms"):
        CardTiming(**{field: value})


def test_no_timing_is_false() -> None:
    assert not CardTiming()
    assert CardTiming(sign_ms=1)


def _keygen_and_sign(transport: SimTransport) -> tuple[float, float, int]:
    applet = IotSafeApplet.open(CardSession(transport))
    started = time.perf_counter()
    applet.generate_key_pair(OP_A)
    keygen = time.perf_counter() - started
    started = time.perf_counter()
    applet.sign_digest(OP_A, hashlib.sha256(b"x").digest())
    return keygen, time.perf_counter() - started, transport.stats.apdus


def test_sim_reader_options_time_the_card(state: Path) -> None:
    transport = open_transport(f"sim:{state}?apdu_ms=20&keygen_ms=300&sign_ms=150")
    with transport:
        assert isinstance(transport, SimTransport)
        keygen, sign, apdus = _keygen_and_sign(transport)
    # GENERATE KEY PAIR: one APDU + the key generation; the signature: INIT + UPDATE + signing
    assert keygen >= 0.020 + 0.300
    assert sign >= 2 * 0.020 + 0.150
    # MANAGE CHANNEL, SELECT, GENERATE KEY PAIR, COMPUTE SIGNATURE INIT + UPDATE
    assert apdus == 5


def test_without_options_the_card_takes_no_time(state: Path) -> None:
    transport = open_transport(f"sim:{state}")
    with transport:
        assert isinstance(transport, SimTransport)
        assert not transport._timing


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("apdu_ms=fast", "sim: bad apdu_ms 'fast' (milliseconds)"),
        ("keygen_ms=-5", "card keygen_ms must be 0..60000 ms, got -5"),
        ("sign_ms=", "sim: bad sign_ms '' (milliseconds)"),
    ],
)
def test_bad_reader_option(state: Path, query: str, message: str) -> None:
    with pytest.raises(UsageError) as caught:
        open_transport(f"sim:{state}?{query}")
    assert str(caught.value) == message
    assert caught.value.exit_code == 64


@pytest.mark.parametrize(
    ("faults", "sw", "delay_s"), [([], "9000", 0.5), (["ins=B9 sw=6A84"], "6A84", 0.0)]
)
def test_timed_card_adds_the_command_time_to_the_answer(
    state: Path, faults: list[str], sw: str, delay_s: float
) -> None:
    card = VirtualCard.load(state, faults=FaultPlan.parse(faults))
    timed = TimedCard(card, CardTiming(keygen_ms=500))
    assert timed.atr == card.atr and timed.state is card.state  # the wrapped card's own
    assert timed.process(bytes.fromhex("01A4040007A0000005590010")) == bytes.fromhex("9000")
    # a refused GENERATE KEY PAIR (the fault) made no key, so it costs no key-generation time
    answer = timed.answer(bytes.fromhex("81B900000674046F702D61"))
    assert answer.response[-2:] == bytes.fromhex(sw)
    assert answer.delay_s == delay_s
