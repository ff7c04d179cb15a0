"""Round trip of one small APDU (IoT SAFE GET DATA 00): in process vs pcscd + vpcd.

Run: ``.venv/bin/python benchmarks/apdu_roundtrip.py [-n 500]``. Starts its own private pcscd
(est_agent.sim.pcsc_stack) and two virtual SIMs served from threads of this process: one with
the vpcd TCP fix (TCP_NODELAY + TCP_QUICKACK re-armed per frame) in reader "Virtual PCD 00 00",
one without it in "Virtual PCD 00 01". Stops everything it started.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from est_agent.sim.pcsc_stack import CardThread, start_pcscd, wait_for_card

OPEN_CHANNEL = bytes.fromhex("0070000001")
SELECT_TAIL = bytes.fromhex("A4040007A0000005590010")
WARMUP = 20


def _measure(transmit: Callable[[bytes], bytes], n: int) -> list[float]:
    """Open a channel, select the applet, then time ``n`` GET DATA 00 exchanges (ms)."""
    opened = transmit(OPEN_CHANNEL)
    assert opened[-2:] == b"\x90\x00", opened.hex()
    channel = opened[0]
    assert transmit(bytes([channel]) + SELECT_TAIL)[-2:] == b"\x90\x00"
    get_data = bytes([0x80 | channel, 0xCB, 0x00, 0x00, 0x00])
    times: list[float] = []
    for i in range(WARMUP + n):
        started = time.perf_counter()
        response = transmit(get_data)
        elapsed = time.perf_counter() - started
        assert response[-2:] == b"\x90\x00", response[-2:].hex()
        if i >= WARMUP:
            times.append(elapsed * 1000.0)
    transmit(bytes([0x00, 0x70, 0x80, channel]))
    return times


def _report(label: str, times: list[float]) -> None:
    p95 = statistics.quantiles(times, n=20, method="inclusive")[18]
    print(
        f"{label:<44} n={len(times):<5} median {statistics.median(times):8.3f} ms"
        f"   p95 {p95:8.3f} ms   max {max(times):8.3f} ms"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", type=int, default=500, help="measured APDUs per path (>= 200)")
    parser.add_argument(
        "--untuned-n", type=int, default=200, help="APDUs without the TCP fix (~45 ms each)"
    )
    args = parser.parse_args()

    from est_agent.sim.card import VirtualCard
    from est_agent.sim.options import CardOptions
    from est_agent.sim.personalize import personalize

    with tempfile.TemporaryDirectory(prefix="apdu-bench-") as tmp:
        workdir = Path(tmp)
        states = []
        for i in range(2):
            state = workdir / f"sim{i}.json"
            personalize(state, iccid=f"8999000000000000{i:03d}")
            states.append(state)

        card = VirtualCard.load(states[0], CardOptions())
        card.power_on()
        _report("in process (VirtualCard.process)", _measure(card.process, args.n))

        try:
            from est_agent.sim.transport import SimTransport
        except ImportError:
            pass
        else:
            with SimTransport(states[0]) as link:
                _report("in process (SimTransport.transmit)", _measure(link.transmit, args.n))

        with start_pcscd(workdir / "pcscd") as stack:
            stack.activate()  # before pyscard's first context in this process
            from est_agent.transport.pcsc import PcscTransport

            tuned_card = VirtualCard.load(states[0], CardOptions())
            plain_card = VirtualCard.load(states[1], CardOptions())
            tuned = CardThread.start(tuned_card, stack.vpcd_port)
            plain = CardThread.start(plain_card, stack.vpcd_port + 1, tcp_tuning=False)
            try:
                wait_for_card(stack.reader_name, atr=tuned_card.atr)
                wait_for_card(stack.second_reader_name, atr=plain_card.atr)
                with PcscTransport(stack.reader_name) as link:
                    label = f"pcscd+vpcd, NODELAY+QUICKACK ({link.protocol})"
                    _report(label, _measure(link.transmit, args.n))
                with PcscTransport(stack.second_reader_name) as link:
                    label = f"pcscd+vpcd, without the TCP fix ({link.protocol})"
                    _report(label, _measure(link.transmit, args.untuned_n))
            finally:
                tuned.stop()
                plain.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
