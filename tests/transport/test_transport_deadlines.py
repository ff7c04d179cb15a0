"""APDU deadlines on the CardTransport seam: option parsing, defaults, the slow (key generation)
deadline asked for by the channel layer, dead links, and the transaction hook."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from est_agent.card.apdu import CommandApdu
from est_agent.card.channel import CardSession
from est_agent.card.iotsafe import IotSafeApplet
from est_agent.card.uri import IotSafeRef, ObjectKind
from est_agent.errors import TransportError, UsageError
from est_agent.sim.card import VirtualCard
from est_agent.sim.options import CardOptions
from est_agent.sim.personalize import personalize
from est_agent.transport import open_transport
from est_agent.transport.base import (
    CardTransport,
    LinkOptions,
    parse_link_options,
    split_reader_query,
)
from est_agent.transport.modem import ModemTransport, parse_modem_reader
from est_agent.transport.pcsc import PcscTransport
from tests.scripted import ScriptedTransport

OP_A = IotSafeRef(ObjectKind.PRIVATE_KEY, label="op-a")


class RecordingTransport(CardTransport):
    """Forwards to a virtual card and records the deadline of every APDU (by INS)."""

    def __init__(self, card: VirtualCard, **deadlines: float) -> None:
        super().__init__(**deadlines)
        self.card = card
        self.deadlines: list[tuple[int, float]] = []
        self.begun = 0
        self.ended = 0

    @property
    def description(self) -> str:
        return "recording"

    def _connect(self) -> None:
        self.card.power_on()

    def _transmit(self, apdu: bytes) -> bytes:  # pragma: no cover - _transmit_within is used
        raise AssertionError("the deadline-aware entry point must be used")

    def _transmit_within(self, apdu: bytes, timeout_s: float) -> bytes:
        self.deadlines.append((apdu[1], timeout_s))
        return self.card.process(apdu)

    def _begin_transaction(self, timeout_s: float) -> None:
        self.begun += 1

    def _end_transaction(self) -> None:
        self.ended += 1

    def _close(self) -> None:
        pass


@pytest.fixture(scope="module")
def state_template(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("sim") / "sim.json"
    personalize(path, iccid="8988247000001234567")
    return path.read_bytes()


@pytest.fixture
def card(tmp_path: Path, state_template: bytes) -> Iterator[VirtualCard]:
    path = tmp_path / "sim.json"
    path.write_bytes(state_template)
    yield VirtualCard.load(path)


def test_split_reader_query() -> None:
    assert split_reader_query("Virtual PCD 00 00?timeout=2") == ("Virtual PCD 00 00", "timeout=2")
    assert split_reader_query("/dev/ttyUSB2") == ("/dev/ttyUSB2", "")
    # a "?" in a name is kept unless key=value options follow it
    assert split_reader_query("Odd? Reader 00 00") == ("Odd? Reader 00 00", "")
    assert split_reader_query("Odd? Reader?timeout=1") == ("Odd? Reader", "timeout=1")


def test_link_options_defaults_and_values() -> None:
    assert parse_link_options("pcsc", "") == LinkOptions(10.0, 60.0, 10.0)
    parsed = parse_link_options("pcsc", "timeout=2.5&keygen_timeout=90&busy_timeout=0.5", busy=True)
    assert (parsed.timeout_s, parsed.slow_timeout_s, parsed.busy_timeout_s) == (2.5, 90.0, 0.5)
    extra = parse_link_options("sim", "faults=f.txt&timeout=1", extra_keys=("faults",))
    assert extra.get("faults") == "f.txt" and extra.timeout_s == 1.0


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("speed=1", "unknown option 'speed'"),
        ("timeout=fast", "bad timeout 'fast'"),
        ("timeout=0", "bad timeout '0'"),
        ("timeout=601", "bad timeout '601'"),
        ("keygen_timeout=-1", "bad keygen_timeout"),
        ("busy_timeout=1", "unknown option 'busy_timeout'"),  # only PC/SC has transactions
        ("timeout", "key=value"),
    ],
)
def test_link_options_refused(query: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        parse_link_options("sim", query)


def test_reader_strings_carry_the_deadlines(tmp_path: Path) -> None:
    pcsc = open_transport("pcsc:Virtual PCD 00 00?timeout=2&keygen_timeout=30&busy_timeout=4")
    assert isinstance(pcsc, PcscTransport)
    assert pcsc.description == "PC/SC reader 'Virtual PCD 00 00'"
    assert (pcsc.timeout_s, pcsc.slow_timeout_s, pcsc.busy_timeout_s) == (2.0, 30.0, 4.0)
    default = open_transport("pcsc:")
    assert (default.timeout_s, default.slow_timeout_s) == (10.0, 60.0)
    modem = open_transport("modem:/dev/ttyUSB2?baud=9600&keygen_timeout=45")
    assert isinstance(modem, ModemTransport)
    assert (modem.baud, modem.timeout_s, modem.slow_timeout_s) == (9600, 20.0, 45.0)
    assert parse_modem_reader("/dev/x?timeout=3")[2].timeout_s == 3.0
    sim = open_transport(f"sim:{tmp_path / 'sim.json'}?timeout=0.5")
    assert (sim.timeout_s, sim.slow_timeout_s) == (0.5, 60.0)
    with pytest.raises(UsageError, match="pcsc: unknown option 'baud'"):
        open_transport("pcsc:X?baud=9600")


def test_slow_deadline_is_never_shorter_than_the_normal_one(card: VirtualCard) -> None:
    assert RecordingTransport(card, timeout_s=120.0).slow_timeout_s == 120.0
    assert RecordingTransport(card, timeout_s=1.0, slow_timeout_s=5.0).slow_timeout_s == 5.0
    with pytest.raises(UsageError):
        RecordingTransport(card, timeout_s=0.0)


def test_generate_key_pair_asks_for_the_key_generation_deadline(card: VirtualCard) -> None:
    transport = RecordingTransport(card, timeout_s=2.0, slow_timeout_s=45.0)
    applet = IotSafeApplet.open(CardSession(transport))
    applet.generate_key_pair(OP_A)
    applet.info()
    by_ins = dict(transport.deadlines)
    assert by_ins[0xB9] == 45.0  # GENERATE KEY PAIR
    assert by_ins[0xA4] == 2.0 and by_ins[0xCB] == 2.0  # SELECT, GET DATA
    assert [t for ins, t in transport.deadlines if ins != 0xB9] == [2.0] * (
        len(transport.deadlines) - 1
    )


def test_get_response_after_a_slow_command_is_fast_again(
    tmp_path: Path, state_template: bytes
) -> None:
    path = tmp_path / "t0.json"
    path.write_bytes(state_template)
    transport = RecordingTransport(VirtualCard.load(path, CardOptions(t0_mode=True)))
    applet = IotSafeApplet.open(CardSession(transport))
    applet.generate_key_pair(OP_A)
    keygen = [i for i, (ins, _t) in enumerate(transport.deadlines) if ins == 0xB9]
    assert len(keygen) == 1
    follow_up = transport.deadlines[keygen[0] + 1]
    assert follow_up == (0xC0, 10.0)  # GET RESPONSE with the 61xx data: the normal deadline
    assert transport.deadlines[keygen[0]] == (0xB9, 60.0)


def test_a_missed_deadline_leaves_the_link_dead_until_closed(card: VirtualCard) -> None:
    transport = RecordingTransport(card)
    transport.connect()
    error = transport.timed_out(bytes.fromhex("80B9000000"), 2.5)
    assert isinstance(error, TransportError)
    assert "no answer to INS B9 within 2.5 s" in str(error)
    assert transport.dead is not None
    started = time.monotonic()
    # the refusal repeats the first failure: it may be the error the user sees
    refusal = r"recording: no answer to INS B9 within 2\.5 s .*not used after that earlier failure"
    with pytest.raises(TransportError, match=refusal):
        transport.transmit(bytes.fromhex("0070000001"))
    assert time.monotonic() - started < 0.1  # fails fast, does not wait again
    assert transport.deadlines == []  # nothing reached the card
    transport.close()
    assert transport.dead is None
    assert transport.transmit(bytes.fromhex("0070000001"))[-2:] == b"\x90\x00"


def test_per_call_deadline_is_checked(card: VirtualCard) -> None:
    transport = RecordingTransport(card)
    with pytest.raises(UsageError):
        transport.transmit(bytes.fromhex("0070000001"), timeout_s=-1)
    transport.transmit(bytes.fromhex("0070000001"), timeout_s=0.25)
    assert transport.deadlines == [(0x70, 0.25)]


def test_transaction_nests_and_calls_the_link_once(card: VirtualCard) -> None:
    transport = RecordingTransport(card)
    with transport.transaction():
        with transport.transaction():
            transport.transmit(bytes.fromhex("0070000001"))
        assert (transport.begun, transport.ended) == (1, 0)
    assert (transport.begun, transport.ended) == (1, 1)
    with pytest.raises(RuntimeError), transport.transaction():
        raise RuntimeError("the block failed")
    assert (transport.begun, transport.ended) == (2, 2)  # ended on the way out


def test_transaction_is_a_no_op_on_simple_links() -> None:
    transport = ScriptedTransport([("00 70 00 00 01", "01 90 00")])
    with transport.transaction():
        assert (
            CardSession(transport)
            .exchange(CommandApdu(0x00, 0x70, 0x00, 0x00, le=1), name="MANAGE CHANNEL")
            .data
            == b"\x01"
        )
    transport.assert_done()
