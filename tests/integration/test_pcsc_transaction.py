"""PC/SC transactions (``CardTransport.transaction()``) against the real pcscd + vpcd: a second
client, in this process or another, waits a bounded time for a held card and then gets a typed
"card busy" error (exit 69); the holder is not disturbed; the waiter's abandoned request never
takes the card afterwards."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from est_agent.errors import ReaderError, TransportError
from est_agent.sim.pcsc_stack import PcscStack
from est_agent.transport.pcsc import PcscTransport
from tests.integration.conftest import REPO, Cards
from tests.integration.stub_card import StubCard

pytestmark = pytest.mark.integration

SELECT_IOT_SAFE = bytes.fromhex("00A4040007A0000005590010")


def test_second_transaction_waits_then_reports_busy(cards: Cards) -> None:
    card = StubCard(401)
    cards.thread(card)
    holder = PcscTransport(cards.reader())
    waiter = PcscTransport(cards.reader())
    waiter.connect()
    with holder.transaction():
        started = time.monotonic()
        busy = r"busy: another PC/SC client has held it for more than 0\.5 s"
        with pytest.raises(ReaderError, match=busy) as caught, waiter.transaction(timeout_s=0.5):
            pytest.fail("entered a transaction on a card another handle holds")
        elapsed = time.monotonic() - started
        print(f"busy card reported after {elapsed:.3f} s (busy_timeout 0.5 s)")
        assert 0.5 <= elapsed < 1.5
        assert caught.value.exit_code == 69
        # the holder keeps working inside its transaction
        assert holder.transmit(SELECT_IOT_SAFE) == b"\x90\x00"
        # the waiter is dead (its handle is gone) and says so at once
        started = time.monotonic()
        with pytest.raises(TransportError, match="earlier failure"):
            waiter.transmit(SELECT_IOT_SAFE)
        waiter.close()
        assert time.monotonic() - started < 0.5
    # the abandoned request did not take the card when the holder let go
    third = PcscTransport(cards.reader())
    try:
        with third.transaction(timeout_s=0.5):
            assert third.transmit(SELECT_IOT_SAFE) == b"\x90\x00"
    finally:
        third.close()
        holder.close()


def test_connecting_to_a_held_card_is_bounded_too(cards: Cards) -> None:
    """pcscd makes SCardConnect itself wait while another handle holds a transaction."""
    cards.thread(StubCard(406))
    holder = PcscTransport(cards.reader())
    late = PcscTransport(cards.reader(), busy_timeout_s=0.5)
    try:
        with holder.transaction():
            started = time.monotonic()
            with pytest.raises(ReaderError, match=r"busy: no connection within 0\.5 s"):
                late.connect()
            assert 0.5 <= time.monotonic() - started < 1.5
            assert holder.transmit(SELECT_IOT_SAFE) == b"\x90\x00"
        late.connect()  # the same object connects once the card is free
        assert late.transmit(SELECT_IOT_SAFE) == b"\x90\x00"
    finally:
        late.close()
        holder.close()


def test_waiter_gets_the_card_when_the_holder_lets_go(cards: Cards) -> None:
    cards.thread(StubCard(402))
    holder = PcscTransport(cards.reader())
    waiter = PcscTransport(cards.reader())
    waiter.connect()
    holder.connect()
    entered = threading.Event()
    release = threading.Event()

    def hold() -> None:
        with holder.transaction():
            entered.set()
            release.wait(5)

    thread = threading.Thread(target=hold)
    thread.start()
    try:
        assert entered.wait(5)
        threading.Timer(0.3, release.set).start()
        started = time.monotonic()
        with waiter.transaction(timeout_s=5):
            waited = time.monotonic() - started
            assert waiter.transmit(SELECT_IOT_SAFE) == b"\x90\x00"
        print(f"waiter got the card {waited:.3f} s after asking (holder let go at 0.3 s)")
        assert 0.25 <= waited < 1.0  # pcsc-lite polls every 100 ms
    finally:
        release.set()
        thread.join(5)
        holder.close()
        waiter.close()


def test_transmit_outside_a_transaction_meets_a_held_card(cards: Cards) -> None:
    """Without a transaction of its own a client is not let in either: it waits its APDU
    deadline (pcsc-lite's non-blocking mode: no unbounded wait) and reports the card busy."""
    cards.thread(StubCard(403))
    holder = PcscTransport(cards.reader())
    other = PcscTransport(cards.reader(), timeout_s=0.5)
    other.connect()
    try:
        with holder.transaction():
            started = time.monotonic()
            with pytest.raises(ReaderError, match="busy during transmitting INS A4"):
                other.transmit(SELECT_IOT_SAFE)
            assert 0.4 <= time.monotonic() - started < 1.5
        # once the holder is done, the same link works: it was not marked dead
        assert other.transmit(SELECT_IOT_SAFE) == b"\x90\x00"
    finally:
        other.close()
        holder.close()


_OTHER_PROCESS = textwrap.dedent(
    """
    import json, sys, time
    from est_agent.errors import EstAgentError
    from est_agent.transport.pcsc import PcscTransport

    link = PcscTransport.from_reader(sys.argv[1] + "?busy_timeout=0.5")
    started = time.monotonic()
    try:
        with link.transaction():
            out = {"entered": True}
    except EstAgentError as exc:
        out = {"error": type(exc).__name__, "message": str(exc), "exit": exc.exit_code}
    out["elapsed"] = time.monotonic() - started
    link.close()
    print(json.dumps(out))
    """
)


def test_transaction_held_against_another_process(cards: Cards, pcsc_stack: PcscStack) -> None:
    """Two agents on one SIM: the second process is refused with exit 69, not let in."""
    cards.thread(StubCard(404))
    holder = PcscTransport(cards.reader())

    def other() -> dict[str, object]:
        result = subprocess.run(
            [sys.executable, "-c", _OTHER_PROCESS, cards.reader()],
            cwd=REPO,
            env=pcsc_stack.client_env(),
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        answer: dict[str, object] = json.loads(result.stdout.strip().splitlines()[-1])
        return answer

    try:
        with holder.transaction():
            refused = other()
            assert holder.transmit(SELECT_IOT_SAFE) == b"\x90\x00"
        assert refused["error"] == "ReaderError" and refused["exit"] == 69
        assert "busy" in str(refused["message"])
        assert 0.5 <= float(str(refused["elapsed"])) < 1.5
        entered = other()  # once released, the other process gets in
        assert entered["entered"] is True
    finally:
        holder.close()


def test_transaction_cost_per_session(cards: Cards) -> None:
    cards.thread(StubCard(405))
    link = PcscTransport(cards.reader())
    link.connect()
    try:
        rounds = 200
        started = time.perf_counter()
        for _ in range(rounds):
            with link.transaction():
                pass
        per_session = (time.perf_counter() - started) / rounds
        started = time.perf_counter()
        for _ in range(rounds):
            link.transmit(SELECT_IOT_SAFE)
        per_apdu = (time.perf_counter() - started) / rounds
    finally:
        link.close()
    print(
        f"transaction begin+end: {per_session * 1e6:.0f} us per session; "
        f"one APDU through pcscd + vpcd: {per_apdu * 1e6:.0f} us"
    )
    assert per_session < 0.01  # far below one APDU on a real SIM (tens of ms)
