"""PcscTransport against a real pcscd + vpcd: reader choice, dispositions, typed failures.

A stub card (stub_card.py) is enough here: these tests are about the link, not the applet.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from est_agent.errors import NoCardError, ReaderError
from est_agent.sim.pcsc_stack import SOCKET_ENV, PcscStack
from est_agent.transport.pcsc import PcscTransport, atr_protocols, list_readers
from tests.integration.conftest import REPO, Cards
from tests.integration.stub_card import StubCard, make_atr

pytestmark = pytest.mark.integration

SELECT_IOT_SAFE = bytes.fromhex("00A4040007A0000005590010")
SCARD_E_NO_SMARTCARD = 0x8010000C
SCARD_E_NO_SERVICE = 0x8010001D
# what pcsc-lite reports when the card process dies: during the exchange, then after a poll
CARD_GONE = {0x80100016, 0x80100069, 0x8010000C, 0x80100067}


def hresult_of(exc: BaseException) -> int:
    cause = exc.__cause__
    assert cause is not None, "typed PC/SC errors chain the pyscard exception"
    return int(cause.hresult) & 0xFFFFFFFF  # type: ignore[attr-defined]


def test_atr_protocols() -> None:
    assert atr_protocols(make_atr(1)) == {0, 1}
    assert atr_protocols(make_atr(1, offer_t1=False)) == {0}
    assert atr_protocols(bytes.fromhex("3B800181")) == {1}  # TD1 offers T=1 only
    # TA1, TD1 (T=0), TD2 (T=1) with TA3 TB3, TD3 = T=15: global bytes, not a protocol
    assert atr_protocols(bytes.fromhex("3B9F9680B1FE451FC7")) == {0, 1}
    assert atr_protocols(b"") == frozenset()


def test_lists_both_vpcd_readers(pcsc_stack: PcscStack) -> None:
    assert list_readers() == [pcsc_stack.reader_name, pcsc_stack.second_reader_name]


def test_connect_by_exact_name(cards: Cards) -> None:
    card = StubCard(101)
    cards.thread(card)
    with PcscTransport(cards.reader()) as link:
        assert link.reader_name == cards.reader()
        assert link.atr == card.atr
        assert link.protocol == "T=1"  # the ATR offers T=0 and T=1: T=1 wins
        assert link.transmit(SELECT_IOT_SAFE) == b"\x90\x00"
        assert link.stats.apdus == 1
    assert card.apdus == [SELECT_IOT_SAFE]


def test_t0_only_atr_gives_t0(cards: Cards) -> None:
    card = StubCard(102, offer_t1=False)
    cards.thread(card)
    with PcscTransport(cards.reader()) as link:
        assert link.protocol == "T=0"
        assert link.transmit(bytes.fromhex("0070000001")) == b"\x01\x90\x00"


def test_first_reader_with_a_card(cards: Cards) -> None:
    card = StubCard(103)
    cards.thread(card, second=True)  # the first reader stays empty
    for name in (None, ""):
        with PcscTransport(name) as link:
            assert link.reader_name == cards.reader(second=True)
            assert link.atr == card.atr
            assert "Virtual PCD 00 01" in link.description


def test_unknown_reader_lists_the_available_ones(pcsc_stack: PcscStack) -> None:
    link = PcscTransport("No Such Reader 00 00")
    with pytest.raises(ReaderError) as info:
        link.connect()
    message = str(info.value)
    assert "No Such Reader" in message
    assert pcsc_stack.reader_name in message
    assert pcsc_stack.second_reader_name in message


def test_named_reader_without_card(cards: Cards) -> None:
    with pytest.raises(NoCardError) as info:
        PcscTransport(cards.reader()).connect()
    assert hresult_of(info.value) == SCARD_E_NO_SMARTCARD


def test_no_card_in_any_reader(cards: Cards) -> None:
    with pytest.raises(NoCardError, match="no card in any reader"):
        PcscTransport().connect()


def test_close_leaves_the_card_powered_for_other_connections(cards: Cards) -> None:
    card = StubCard(104)
    cards.thread(card)
    first = PcscTransport(cards.reader())
    second = PcscTransport(cards.reader())
    first.connect()
    second.connect()
    assert first.transmit(bytes.fromhex("0070000001"))[-2:] == b"\x90\x00"
    powered = card.powered_on
    first.close()
    del first  # nothing may happen at garbage collection either
    # With SCARD_UNPOWER_CARD the other handle would now fail with 0x80100068 (reset card).
    assert second.transmit(SELECT_IOT_SAFE) == b"\x90\x00"
    assert card.powered_on == powered
    assert card.resets == 0
    second.close()


def test_card_process_killed_mid_session(cards: Cards) -> None:
    first_atr = make_atr(201)
    proc = cards.stub_process(201, wait_atr=first_atr)
    link = PcscTransport(cards.reader())
    link.connect()
    assert link.transmit(SELECT_IOT_SAFE) == b"\x90\x00"

    cards.kill(proc)
    with pytest.raises(NoCardError) as info:
        link.transmit(SELECT_IOT_SAFE)
    # pcsc-lite says "not transacted"; or vpcd reports success with no bytes at all (no cause)
    assert info.value.__cause__ is None or hresult_of(info.value) in CARD_GONE
    # ...and it stays typed on the next attempts (0x80100069 once pcscd has polled)
    with pytest.raises(NoCardError):
        link.transmit(SELECT_IOT_SAFE)
    link.close()

    second_atr = make_atr(202)
    cards.stub_process(202, wait_atr=second_atr)
    link.connect()  # the same transport object reconnects to the new card
    assert link.atr == second_atr
    assert link.transmit(SELECT_IOT_SAFE) == b"\x90\x00"
    link.close()


_NO_SERVICE_SCRIPT = textwrap.dedent(
    """
    import json
    from est_agent.errors import ReaderError
    from est_agent.transport.pcsc import PcscTransport, list_readers

    out = {}
    for name, call in (("list", list_readers), ("connect", lambda: PcscTransport().connect())):
        try:
            call()
            out[name] = None
        except ReaderError as exc:
            out[name] = [type(exc).__name__, str(exc), exc.__cause__.hresult & 0xFFFFFFFF]
    print(json.dumps(out))
    """
)


def test_pcscd_not_running(tmp_path: Path) -> None:
    # libpcsclite fixes its socket path per process, so the "no service" case runs in a child
    # pointed at a socket nobody serves.
    env = {SOCKET_ENV: str(tmp_path / "nobody-here" / "pcscd.comm"), "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, "-c", _NO_SERVICE_SCRIPT],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    out = json.loads(result.stdout)
    for name in ("list", "connect"):
        kind, message, hresult = out[name]
        assert kind == "ReaderError"
        assert "PC/SC service not available" in message
        assert hresult == SCARD_E_NO_SERVICE


_PCSCD_DIES_SCRIPT = textwrap.dedent(
    """
    import json, signal, sys, tempfile
    from pathlib import Path
    from tests.integration.stub_card import StubCard
    from est_agent.errors import ReaderError
    from est_agent.sim.pcsc_stack import CardThread, start_pcscd, stop_process, wait_for_card

    with tempfile.TemporaryDirectory() as workdir:
        stack = start_pcscd(Path(workdir), isolate=True)
        stack.activate()
        from est_agent.transport.pcsc import PcscTransport
        card = StubCard(301)
        runner = CardThread.start(card, stack.vpcd_port)
        try:
            wait_for_card(stack.reader_name, atr=card.atr)
            link = PcscTransport(stack.reader_name)
            link.connect()
            link.transmit(bytes.fromhex("00A4040007A0000005590010"))
            stop_process(stack.process, sig=signal.SIGKILL)
            try:
                link.transmit(bytes.fromhex("00A4040007A0000005590010"))
                out = None
            except ReaderError as exc:
                out = [type(exc).__name__, str(exc), exc.__cause__.hresult & 0xFFFFFFFF]
            link.close()
        finally:
            runner.stop()
            stack.stop()
    print(json.dumps(out))
    """
)


def test_pcscd_killed_mid_session(pcsc_stack: PcscStack) -> None:
    if not pcsc_stack.isolated:
        pytest.skip("needs a second, private pcscd (mount namespaces unavailable)")
    result = subprocess.run(
        [sys.executable, "-c", _PCSCD_DIES_SCRIPT],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    kind, message, hresult = json.loads(result.stdout.strip().splitlines()[-1])
    assert kind == "ReaderError"
    assert "PC/SC service not available" in message
    assert hresult == SCARD_E_NO_SERVICE
