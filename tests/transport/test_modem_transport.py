"""ModemTransport without a port: a scripted stand-in for pyserial, answering through the
emulated modem (est_agent.sim.modem) or through a script for the failure modes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from est_agent.card.channel import CardSession
from est_agent.card.iotsafe import DEFAULT_AID, IotSafeApplet
from est_agent.card.uicc import EF_ICCID, UiccFiles, decode_iccid
from est_agent.errors import ModemError, NoCardError, StatusWordError, UsageError
from est_agent.sim.card import VirtualCard
from est_agent.sim.modem import EmulatedModem, ModemQuirks
from est_agent.sim.options import CardOptions
from est_agent.sim.personalize import personalize
from est_agent.transport import open_transport
from est_agent.transport.modem import ChannelAccess, ModemTransport, parse_reader

ICCID = "8988247000001234567"


class FakePort:
    """Just the pyserial surface the transport uses; ``answer(line) -> bytes``."""

    def __init__(self, answer: Callable[[str], bytes]) -> None:
        self.answer = answer
        self.sent: list[str] = []
        self._out = b""
        self._partial = b""
        self.closed = False
        self.timeout = 0.0

    def write(self, data: bytes) -> int:
        self._partial += data
        while b"\r" in self._partial:
            line, _, self._partial = self._partial.partition(b"\r")
            self.sent.append(line.decode())
            self._out += self.answer(line.decode())
        return len(data)

    @property
    def in_waiting(self) -> int:
        return len(self._out)

    def read(self, size: int) -> bytes:
        data, self._out = self._out[:size], self._out[size:]
        return data

    def reset_input_buffer(self) -> None:
        self._out = b""

    def close(self) -> None:
        self.closed = True


@pytest.fixture(scope="module")
def sim_file(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("sim") / "sim.json"
    personalize(path, iccid=ICCID)
    return path.read_bytes()


def emulated(
    tmp_path: Path, sim_file: bytes, quirks: ModemQuirks | None = None, *, t0: bool = False
) -> tuple[ModemTransport, FakePort, EmulatedModem]:
    path = tmp_path / "sim.json"
    path.write_bytes(sim_file)
    card = VirtualCard.load(path, CardOptions(t0_mode=t0))
    modem = EmulatedModem(card, quirks or ModemQuirks(), iccid=ICCID)
    port = FakePort(modem.handle)
    return ModemTransport("/dev/fake", timeout_s=0.2, serial_factory=lambda: port), port, modem


def scripted(script: dict[str, str], default: str = "\r\nOK\r\n") -> FakePort:
    def answer(line: str) -> bytes:
        for head, reply in script.items():
            if line.startswith(head):
                return reply.encode()
        return default.encode()

    return FakePort(answer)


def test_reader_string() -> None:
    assert parse_reader("/dev/ttyUSB2") == ("/dev/ttyUSB2", 115200, 20.0)
    assert parse_reader("/dev/ttyACM0?baud=9600&timeout=1.5") == ("/dev/ttyACM0", 9600, 1.5)
    transport = open_transport("modem:/dev/ttyUSB2?timeout=3")
    assert isinstance(transport, ModemTransport) and transport.timeout_s == 3.0
    assert transport.description == "modem /dev/ttyUSB2"
    for bad in ("", "?baud=1", "/dev/x?speed=1", "/dev/x?baud=fast", "/dev/x?timeout=0"):
        with pytest.raises(UsageError):
            parse_reader(bad)


def test_setup_then_one_at_command_per_apdu(tmp_path: Path, sim_file: bytes) -> None:
    transport, port, _ = emulated(tmp_path, sim_file)
    session = CardSession(transport)
    transport.connect()
    assert port.sent == ["ATE0+CMEE=1"]
    channel = session.open_channel()
    iccid = decode_iccid(UiccFiles(channel).read(EF_ICCID))
    session.close()
    assert iccid == ICCID
    assert transport.access == ChannelAccess.CSIM
    assert transport.at_commands == 1 + transport.stats.apdus
    # a case-1 APDU (MANAGE CHANNEL close) goes out with P3 = 00 (T=0 TPDU header)
    assert port.sent[-1] == 'AT+CSIM=10,"0070800100"'
    assert port.closed


def test_t0_card_61xx_goes_through_the_channel_layer(tmp_path: Path, sim_file: bytes) -> None:
    transport, port, _ = emulated(tmp_path, sim_file, t0=True)
    session = CardSession(transport)
    applet = IotSafeApplet.open(session)
    info = applet.info()
    session.close()
    assert info.max_private_keys >= 1
    assert any(line.startswith('AT+CSIM=10,"81C00000') for line in port.sent)


def test_csim_refusing_channels_falls_back_to_ccho_cgla(tmp_path: Path, sim_file: bytes) -> None:
    transport, port, modem = emulated(tmp_path, sim_file, ModemQuirks(csim_basic_only=True))
    session = CardSession(transport)
    applet = IotSafeApplet.open(session)
    objects = applet.objects()
    # the basic channel still goes through AT+CSIM
    iccid = decode_iccid(UiccFiles(session.basic_channel).read(EF_ICCID))
    channel = applet.channel.number
    session.close()
    assert objects and iccid == ICCID
    assert transport.access == ChannelAccess.CGLA
    assert 'AT+CCHO="A0000005590010"' in port.sent
    assert any(line.startswith(f"AT+CGLA={channel},") for line in port.sent)
    assert f"AT+CCHC={channel}" in port.sent
    assert modem.sessions == {}
    # the probe is asked once, only when AT+CSIM refused the first MANAGE CHANNEL
    assert port.sent.count("AT+CGLA=?") == 1


def test_ccho_refused_reads_as_applet_not_found(tmp_path: Path, sim_file: bytes) -> None:
    transport, _, _ = emulated(tmp_path, sim_file, ModemQuirks(csim_basic_only=True))
    session = CardSession(transport)
    applet = IotSafeApplet.open(session, aids=(bytes.fromhex("A000000559FFFF"), DEFAULT_AID))
    assert applet.aid == DEFAULT_AID
    session.close()


def test_file_commands_on_a_ccho_only_channel_get_6881(tmp_path: Path, sim_file: bytes) -> None:
    transport, _, _ = emulated(tmp_path, sim_file, ModemQuirks(csim_basic_only=True))
    session = CardSession(transport)
    channel = session.open_channel()
    with pytest.raises(StatusWordError) as caught:
        UiccFiles(channel).read(EF_ICCID)
    assert caught.value.sw == 0x6881
    session.close()


def test_neither_csim_nor_cgla() -> None:
    port = scripted({"AT+CSIM=": "\r\nERROR\r\n", "AT+CGLA=?": "\r\nERROR\r\n"})
    transport = ModemTransport("/dev/fake", serial_factory=lambda: port)
    with pytest.raises(
        ModemError, match=r"refuses MANAGE CHANNEL in AT\+CSIM \(ERROR\) and has no"
    ):
        CardSession(transport).open_channel()
    assert port.sent[1:] == ['AT+CSIM=10,"0070000001"', "AT+CGLA=?"]


def test_modem_without_cmee_still_gets_echo_off() -> None:
    port = scripted({"ATE0+CMEE=1": "ATE0+CMEE=1\r\r\nERROR\r\n"})
    transport = ModemTransport("/dev/fake", serial_factory=lambda: port)
    transport.connect()
    assert port.sent == ["ATE0+CMEE=1", "ATE0"]


@pytest.mark.parametrize(
    ("answer", "error", "code"),
    [
        ("+CME ERROR: 10", NoCardError, 10),
        ("+CME ERROR: SIM not inserted", NoCardError, 10),
        ("+CME ERROR: 13", NoCardError, 13),
        ("+CME ERROR: 14", ModemError, 14),
        ("+CME ERROR: operation not allowed", ModemError, 3),
        ("ERROR", ModemError, None),
    ],
)
def test_cme_errors_are_typed(answer: str, error: type[Exception], code: int | None) -> None:
    port = scripted({"AT+CSIM=10": f"\r\n{answer}\r\n"})
    transport = ModemTransport("/dev/fake", serial_factory=lambda: port)
    transport.connect()
    with pytest.raises(error) as caught:
        transport.transmit(bytes.fromhex("80CA0000"))
    exc = caught.value
    carrier = exc if isinstance(exc, ModemError) else exc.__cause__
    assert isinstance(carrier, ModemError) and carrier.cme_error == code
    assert "/dev/fake" in str(exc) and "AT+CSIM" in str(exc)
    if code == 10:
        assert "sim not inserted" in str(exc).lower()
    assert "80CA" not in str(exc)  # APDUs stay out of messages


def test_silent_modem_times_out_and_poisons_the_link(tmp_path: Path, sim_file: bytes) -> None:
    transport, port, _ = emulated(tmp_path, sim_file, ModemQuirks(hang_after=1))
    transport.connect()
    # the message names the AT command and the INS of the APDU it carried
    with pytest.raises(ModemError, match=r"did not answer AT\+CSIM \(INS 70\) within 0\.2 s"):
        transport.transmit(bytes.fromhex("0070000001"))
    with pytest.raises(ModemError, match="not used after an earlier failure: modem"):
        transport.transmit(bytes.fromhex("0070000001"))
    transport.close()
    assert port.closed


def test_length_mismatch_is_a_modem_error() -> None:
    port = scripted({"AT+CSIM=10": '\r\n+CSIM: 6,"9000"\r\n\r\nOK\r\n'})
    transport = ModemTransport("/dev/fake", serial_factory=lambda: port)
    with pytest.raises(ModemError, match="disagrees"):
        transport.transmit(bytes.fromhex("80CA0000"))


def test_identity_commands(tmp_path: Path, sim_file: bytes) -> None:
    transport, _, _ = emulated(tmp_path, sim_file, ModemQuirks(imei="490154203237518"))
    assert transport.imei() == "490154203237518"
    assert transport.iccid() == ICCID
    assert transport.imsi() == "00101" + ICCID[-10:]
    transport.close()


def test_missing_port_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "ttyUSB9"
    transport = open_transport(f"modem:{missing}")
    with pytest.raises(ModemError, match=f"cannot open modem port {missing}: no such port"):
        transport.connect()


def test_emulated_modem_dialogue(tmp_path: Path, sim_file: bytes) -> None:
    _, _, modem = emulated(tmp_path, sim_file, ModemQuirks(imei="490154203237518"))
    # echo is on until ATE0 (V.250 factory default); one line may carry several commands
    assert (
        modem.handle("ATE0+CMEE=1;+CGSN") == b"ATE0+CMEE=1;+CGSN\r\r\n490154203237518\r\n\r\nOK\r\n"
    )
    assert modem.handle("AT") == b"\r\nOK\r\n"
    assert modem.handle("ATX9") == b"\r\nERROR\r\n"
    assert modem.handle("AT+CCHC=4") == b"\r\n+CME ERROR: 21\r\n"
    assert modem.handle("AT+CMEE=2;+CCHC=4") == b"\r\n+CME ERROR: invalid index\r\n"
    # the length counts hex characters; a byte count is refused
    assert modem.handle('AT+CSIM=5,"0070000001"') == b"\r\n+CME ERROR: operation not allowed\r\n"
    assert modem.handle('AT+CSIM=10,"0070000001"') == b'\r\n+CSIM: 6,"019000"\r\n\r\nOK\r\n'
