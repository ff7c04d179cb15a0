"""First-boot enrollment through a cellular modem's AT port (``modem:`` reader), emulated on a pty.

Against one `est-testserver` on 127.0.0.1 with a fresh virtual SIM per run, the agent enrolls in
this process (``Agent.enroll``) through ``est-agent``'s emulated modem (est_agent/sim/modem.py,
served in a thread). Per mode it reports:

- APDUs and AT commands (round trips) per enrollment, and what the AT framing adds: ``extra``
  = AT commands - APDUs (setup, probes; CGLA mode answers MANAGE CHANNEL open without the
  modem), serial bytes in both directions vs the APDU bytes they carry (hex doubles them);
- the card-link time (the transport's own clock, ``LinkStats.seconds``) and the wall time of the
  whole enrollment, with no added latency and with ``--latency-ms`` (default 80 ms) before every
  modem answer, which is what a real modem's AT+CSIM round trip costs;
- the median AT+CSIM round trip over the pty (``--roundtrips`` of them, a SELECT of the applet
  on a logical channel) next to the same APDU by function call (``sim:``).

    .venv/bin/python benchmarks/modem_at.py [--latency-ms 80] [--roundtrips 500]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from est_agent.cli.demo import write_demo_config  # noqa: E402
from est_agent.config import load_config  # noqa: E402
from est_agent.sim.card import VirtualCard  # noqa: E402
from est_agent.sim.modem import EmulatedModem, ModemQuirks, PtyModem  # noqa: E402
from est_agent.sim.personalize import personalize  # noqa: E402
from est_agent.sim.transport import SimTransport  # noqa: E402
from est_agent.testserver import load_dev_pki  # noqa: E402
from est_agent.testserver.launch import running_test_server  # noqa: E402
from est_agent.transport.modem import ModemTransport  # noqa: E402
from est_agent.workflow.agent import Agent  # noqa: E402

SELECT = bytes.fromhex("01A4040007A0000005590010")


class CountingModem(EmulatedModem):
    """The emulated modem, counting serial bytes: command lines in, everything out."""

    bytes_in = 0
    bytes_out = 0

    def handle(self, line: str) -> bytes:
        out = super().handle(line)
        self.bytes_in += len(line) + 1  # + S3
        self.bytes_out += len(out)
        return out


def enroll_once(
    base: Path, url: str, name: str, quirks: ModemQuirks, extra: str
) -> dict[str, float]:
    pki = load_dev_pki(base / "pki")
    sim = base / f"sim-{name}.json"
    ca = pki.bootstrap_ca
    personalize(sim, bootstrap_ca=(ca.certificate, ca.key), force=True)
    modem = CountingModem(VirtualCard.load(sim), quirks, iccid="")
    with PtyModem(modem, base / f"tty-{name}") as pty:
        config_path = base / f"est-agent-{name}.toml"
        write_demo_config(config_path, reader=f"modem:{pty.device}", url=url, base=base)
        text = config_path.read_text().replace(str(base / "state"), str(base / f"state-{name}"))
        config_path.write_text(text.replace("[card]\n", f"[card]\n{extra}"))
        agent = Agent(load_config(config_path), progress=lambda _text: None)
        started = time.perf_counter()
        result = agent.enroll()
        wall = time.perf_counter() - started
    stats = agent.link_stats
    assert result.outcome == "enrolled", result
    return {
        "apdus": stats.apdus,
        "apdu_bytes": stats.bytes_total,
        "at": modem.commands,
        "serial_bytes": modem.bytes_in + modem.bytes_out,
        "link_s": stats.seconds,
        "wall_s": wall,
        "signatures": agent.card_signatures,
    }


def roundtrips(base: Path, count: int) -> tuple[float, float]:
    sim = base / "sim-rt.json"
    personalize(sim, force=True)
    card = VirtualCard.load(sim)
    with PtyModem(EmulatedModem(card, ModemQuirks()), base / "tty-rt") as pty:
        transport = ModemTransport(pty.device, timeout_s=5)
        transport.connect()
        transport.transmit(bytes.fromhex("0070000001"))
        times = []
        for _ in range(count):
            started = time.perf_counter()
            transport.transmit(SELECT)
            times.append(time.perf_counter() - started)
        transport.close()
    local = SimTransport(card)
    local.connect()
    local.transmit(bytes.fromhex("0070000001"))
    direct = []
    for _ in range(count):
        started = time.perf_counter()
        local.transmit(SELECT)
        direct.append(time.perf_counter() - started)
    return statistics.median(times) * 1000, statistics.median(direct) * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latency-ms", type=float, default=80.0)
    parser.add_argument("--roundtrips", type=int, default=500)
    args = parser.parse_args()
    modes = [
        ("csim", ModemQuirks(), ""),
        ("csim+urc+echo", ModemQuirks(urc=True, echo=True), ""),
        ("ccho/cgla", ModemQuirks(csim_basic_only=True), 'uicc_channel = "basic"\n'),
        (f"csim {args.latency_ms:g}ms", ModemQuirks(slow_ms=args.latency_ms), ""),
        (
            f"ccho/cgla {args.latency_ms:g}ms",
            ModemQuirks(csim_basic_only=True, slow_ms=args.latency_ms),
            'uicc_channel = "basic"\n',
        ),
    ]
    with tempfile.TemporaryDirectory(prefix="modem-at-") as scratch, ExitStack() as stack:
        base = Path(scratch)
        subprocess.run(
            [sys.executable, "-m", "est_agent.testserver.cli", "pki", str(base / "pki")],
            check=True,
            capture_output=True,
        )
        url = stack.enter_context(running_test_server(base / "pki", base)).url
        print(f"{'mode':18} {'APDUs':>5} {'AT':>4} {'extra':>5} {'APDU B':>7} {'serial B':>8} "
              f"{'x':>5} {'link ms':>8} {'wall ms':>8} {'sigs':>4}")  # fmt: skip
        for name, quirks, extra in modes:
            r = enroll_once(base, url, name.replace("/", "-").replace(" ", "-"), quirks, extra)
            print(
                f"{name:18} {r['apdus']:5.0f} {r['at']:4.0f} {r['at'] - r['apdus']:5.0f} "
                f"{r['apdu_bytes']:7.0f} {r['serial_bytes']:8.0f} "
                f"{r['serial_bytes'] / r['apdu_bytes']:5.2f} {r['link_s'] * 1000:8.1f} "
                f"{r['wall_s'] * 1000:8.1f} {r['signatures']:4.0f}"
            )
        pty_ms, direct_ms = roundtrips(base, args.roundtrips)
        print(
            f"\nAT+CSIM round trip over the pty (SELECT, median of {args.roundtrips}): "
            f"{pty_ms:.3f} ms; the same APDU by function call: {direct_ms:.3f} ms"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
