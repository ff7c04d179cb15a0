"""Issue 16, "close to the limit": the applet's channel opened by its SELECT (ISO/IEC 7816-4
§5.5.2) on a PC/SC-style link, a card's refusal (6881) remembered in the host state, and
GENERATE KEY PAIR running on the card while /csrattrs crosses the network.

The card link is the in-process virtual SIM (``sim:``), every APDU traced with its start and end
on the monotonic clock; the network is the in-process EST test server, behind the benchmarks'
delaying proxy where a round trip must take time. Timing assertions are lower bounds / orders
of events only.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from est_agent.sim.card import CardOptions
from est_agent.sim.transport import SimTransport
from est_agent.testserver import DevPki, EstTestServer, Fault
from est_agent.testserver.wire import CsrAttrsKind
from est_agent.transport.base import CardTransport
from tests.conftest import Run
from tests.linkwrap import wrapped_reader_scheme
from tests.workflow.conftest import Device

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from netdelay import DelayProxy

pytestmark = pytest.mark.integration

Start = Callable[..., EstTestServer]

# GSMA IoT SAFE applet AID (IoT.05 §4.1), SELECT by DF name on channel 1 (CLA 01,
# TS 102 221 §10.1.1), Lc 07, no Le
SELECT_APPLET_CH1 = "01a4040007a0000005590010"
MANAGE_CHANNEL_OPEN = "0070000001"  # TS 102 221 §11.1.17: open, card assigns, Le 01
MANAGE_CHANNEL_CLOSE_1 = "00708001"  # close channel 1, no Le
INS_GENERATE_KEY_PAIR = 0xB9


@dataclass
class Apdu:
    command: str  # hex
    sw: str  # hex of the last two bytes of the answer
    started: float
    ended: float


@pytest.fixture
def trace() -> Iterator[list[Apdu]]:
    """The APDUs of the ``sim:`` links the agent opens, once they go through ``_traced``."""
    yield []


def _traced(log: list[Apdu], transport: CardTransport) -> CardTransport:
    real = transport._transmit_within  # type: ignore[attr-defined]

    def transmit(apdu: bytes, timeout_s: float) -> bytes:
        started = time.monotonic()
        answer: bytes = real(apdu, timeout_s)
        log.append(Apdu(apdu.hex(), answer[-2:].hex(), started, time.monotonic()))
        return answer

    transport._transmit_within = transmit  # type: ignore[attr-defined]
    return transport


def _headers(log: list[Apdu]) -> list[str]:
    return [a.command[:8] for a in log]


def test_first_boot_opens_the_applet_channel_by_its_select(
    device: Device, start_server: Start, dev_pki: DevPki, cli: Run, trace: list[Apdu]
) -> None:
    device.write_config(start_server(), dev_pki, card__implicit_channel="true")
    with wrapped_reader_scheme("sim", lambda inner: _traced(trace, inner)):
        code, _, err = cli("enroll", "--config", str(device.config))
    assert code == 0, err
    commands = [a.command for a in trace]
    assert MANAGE_CHANNEL_OPEN not in commands
    assert commands[4] == SELECT_APPLET_CH1 and trace[4].sw == "9000"
    # the 18 APDUs of a first boot with the opt-in (19 by default: MANAGE CHANNEL open)
    assert _headers(trace) == [
        "00a40804", "00b00000",  # SELECT 7FF0/6F01 by path, READ BINARY
        "00a40804", "00b00000",  # SELECT 7FF0/6F02, READ BINARY
        "01a40400",  # SELECT the applet, opening channel 1
        "81b00000", "81b00100",  # READ FILE: the bootstrap certificate
        "812a0001", "812b8001",  # COMPUTE SIGNATURE INIT + UPDATE: TLS CertificateVerify
        "81b90000",  # GENERATE KEY PAIR
        "812a0001", "812b8001",  # COMPUTE SIGNATURE: the CSR
        "00a40804", "00d60000", "00d600ff", "00b00000", "00b00100",  # write + read back
        "00708001",  # MANAGE CHANNEL close
    ]  # fmt: skip
    state = json.loads((device.state_dir / "state.json").read_text())
    assert state["implicit_channel_refused"] is False


def test_a_card_refusing_implicit_opening_is_asked_once_and_remembered(
    device: Device, start_server: Start, dev_pki: DevPki, cli: Run, trace: list[Apdu]
) -> None:
    device.write_config(start_server(), dev_pki, card__implicit_channel="true")
    refusing = CardOptions(implicit_channel_open=False)

    def rebuild(inner: CardTransport) -> CardTransport:
        return _traced(trace, SimTransport(device.sim, refusing))

    with wrapped_reader_scheme("sim", rebuild):
        code, _, err = cli("enroll", "--config", str(device.config))
        assert code == 0, err
        first = [(a.command, a.sw) for a in trace]
        # the refused SELECT (6881: logical channel not supported), MANAGE CHANNEL, SELECT again
        assert first[4:7] == [
            (SELECT_APPLET_CH1, "6881"),
            (MANAGE_CHANNEL_OPEN, "9000"),
            (SELECT_APPLET_CH1, "9000"),
        ]
        assert len(first) == 20  # one more than on a card that opens implicitly
        state = json.loads((device.state_dir / "state.json").read_text())
        assert state["implicit_channel_refused"] is True

        trace.clear()  # `run`, nothing due: the fast path goes straight to MANAGE CHANNEL
        code, out, err = cli("run", "--config", str(device.config), "--json")
        assert code == 0, err
        assert json.loads(out)["outcome"] == "not-due"
        assert [(a.command, a.sw) for a in trace][2:4] == [
            (MANAGE_CHANNEL_OPEN, "9000"),
            (SELECT_APPLET_CH1, "9000"),
        ]
        assert all(a.sw != "6881" for a in trace) and len(trace) == 6

        trace.clear()  # the full path too
        code, _, err = cli("renew", "--force", "--config", str(device.config))
        assert code == 0, err
        assert all(a.sw != "6881" for a in trace)
        assert [a.command for a in trace].count(MANAGE_CHANNEL_OPEN) == 1


def test_a_lost_host_state_asks_the_card_again(
    device: Device, start_server: Start, dev_pki: DevPki, cli: Run, trace: list[Apdu]
) -> None:
    device.write_config(start_server(), dev_pki, card__implicit_channel="true")
    refusing = CardOptions(implicit_channel_open=False)
    with wrapped_reader_scheme("sim", lambda _: _traced(trace, SimTransport(device.sim, refusing))):
        assert cli("enroll", "--config", str(device.config))[0] == 0
        (device.state_dir / "state.json").write_text("[]")  # unusable: treated as empty
        trace.clear()
        code, _, err = cli("run", "--config", str(device.config))
        assert code == 0, err
    assert [a.sw for a in trace].count("6881") == 1  # asked again, once, then remembered
    assert json.loads((device.state_dir / "state.json").read_text())["implicit_channel_refused"]


def _server_times(log: Path) -> dict[str, float]:
    """Path suffix -> time.time() of the test server's request-log entry (once answered)."""
    times: dict[str, float] = {}
    for line in log.read_text().splitlines():
        entry = json.loads(line)
        times.setdefault(entry["path"].rsplit("/", 1)[-1], entry["t"])
    return times


def test_the_card_generates_the_key_while_csrattrs_crosses_the_network(
    device: Device, start_server: Start, dev_pki: DevPki, cli: Run, trace: list[Apdu]
) -> None:
    keygen_s, rtt_s = 0.6, 0.3
    requests = device.root / "requests.jsonl"
    server = start_server(request_log=requests)
    with DelayProxy(("127.0.0.1", server.port), rtt_s=rtt_s) as proxy:
        device.write_config(
            server,
            dev_pki,
            card__reader=f'"sim:{device.sim}?keygen_ms={int(keygen_s * 1000)}"',
            est__url=f'"https://127.0.0.1:{proxy.port}/.well-known/est"',
        )
        # the two clocks of this process, tied together once
        offset = time.time() - time.monotonic()
        with wrapped_reader_scheme("sim", lambda inner: _traced(trace, inner)):
            code, _, err = cli("enroll", "--config", str(device.config))
    assert code == 0, err
    keygen = [a for a in trace if int(a.command[2:4], 16) == INS_GENERATE_KEY_PAIR]
    assert len(keygen) == 1 and keygen[0].sw == "9000"
    assert keygen[0].ended - keygen[0].started >= keygen_s  # the card's time was acted out
    at = _server_times(requests)
    started, ended = keygen[0].started + offset, keygen[0].ended + offset
    # /cacerts was answered before the card made a key (RFC 7030 §4.1.3: rollover first)...
    assert at["cacerts"] < started
    # ...and /csrattrs reached the server while the card was generating: they overlapped.
    # Sequentially the key would only start after the /csrattrs answer came back.
    assert started < at["csrattrs"] < ended
    # the CSR needs the key: its request comes after the key, signed after GENERATE KEY PAIR
    assert at["simpleenroll"] > ended
    signs = [a for a in trace if a.command.startswith("812b")]
    assert signs[-1].started >= keygen[0].ended


def test_a_failing_csrattrs_waits_for_the_card_and_writes_no_record(
    device: Device, start_server: Start, dev_pki: DevPki, cli: Run, trace: list[Apdu]
) -> None:
    # strict mode and an unusable /csrattrs: 76 (EstResponseError) as before; the key the card
    # made meanwhile is in the target slot (never the active one), no record is written
    server = start_server(
        csrattrs=CsrAttrsKind.EMPTY,
        fault=Fault.GARBAGE_BASE64,
        fault_operations=frozenset({"csrattrs"}),
    )
    device.write_config(
        server,
        dev_pki,
        est__csrattrs='"strict"',
        card__reader=f'"sim:{device.sim}?keygen_ms=400"',
    )
    with wrapped_reader_scheme("sim", lambda inner: _traced(trace, inner)):
        code, _, err = cli("enroll", "--config", str(device.config))
    assert code == 76, err
    assert "EstResponseError" in err and "Traceback" not in err
    headers = _headers(trace)
    assert "81b90000" in headers  # the key generation ran to its end...
    assert headers.index("81b90000") < headers.index(MANAGE_CHANNEL_CLOSE_1)  # ...before close
    assert "00d60000" not in headers  # no UPDATE BINARY: no record written
    code, out, err = cli("status", "--config", str(device.config), "--json")
    assert code == 0, err
    assert {s["name"]: s["status"] for s in json.loads(out)["slots"]} == {
        "op-a": "empty",
        "op-b": "empty",
    }


@pytest.mark.parametrize(
    "setting", [{}, {"card__implicit_channel": "false"}], ids=["default", "false"]
)
def test_by_default_the_applet_channel_is_opened_with_manage_channel(
    device: Device,
    start_server: Start,
    dev_pki: DevPki,
    cli: Run,
    trace: list[Apdu],
    setting: dict[str, str],
) -> None:
    device.write_config(start_server(), dev_pki, **setting)
    with wrapped_reader_scheme("sim", lambda inner: _traced(trace, inner)):
        code, _, err = cli("enroll", "--config", str(device.config))
        assert code == 0, err
        assert [a.command for a in trace][4:6] == [MANAGE_CHANNEL_OPEN, SELECT_APPLET_CH1]
        assert len(trace) == 19
        trace.clear()
        code, _, err = cli("run", "--config", str(device.config))
        assert code == 0, err
    assert [a.command for a in trace][2:4] == [MANAGE_CHANNEL_OPEN, SELECT_APPLET_CH1]
    assert len(trace) == 6
