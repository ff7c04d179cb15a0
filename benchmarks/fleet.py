"""A fleet of devices enrolling against one EST server: mass first boot, a CA outage, a
concurrency cap, on a simulated clock.

What is real: every device runs the agent's own workflow (`Agent.run`, what the timer calls)
with its own virtual SIM (a state file, in this process, zero card latency), its own state
directory and configuration, over real TLS (tlslite-ng, the card signing CertificateVerify) to
one `est-testserver` process on 127.0.0.1, which enforces `--max-concurrent` (answering 503, or
202 with `--busy-status 202`, + Retry-After with jitter), and during the outage answers every
request 503 + Retry-After (`--outage-file`, switched by this script on the simulated clock).

What is simulated: the clock (`SimClock`: simulated time runs `--scale` times faster than real
time while some device runs, and jumps to the next event when none does: days pass in
seconds; every agent gets it as its `clock` seam); the devices' scheduler: each device's first
run is at power-on (spread over `--boot-spread`) + 2 min (`OnBootSec=2min` of
contrib/systemd/est-agent-boot.timer), and after exit 75 (EnrollmentPending) it runs again
when the agent asked (its Retry-After), as a supervisor honouring the agent's retry time would
(the shipped units retry only at the daily timer: see the README note); after any other
failure 15 min later. At most `--workers` devices run at once (threads of this process): the
devices' simultaneous arrivals are limited by this machine, not by the server.

Ideal schedule: the same arrivals served back to back, none during the outage, at the ideal
rate = min(what this harness reaches with `--workers` devices at once against a server without
a cap, measured first on `--calibrate` devices of its own; `--cap` / `--ca-delay`, as each
enrollment holds a server slot at least for the CA's delay). Both are upper bounds on the
rate, so the ideal is a lower bound on the completion time.

Reported: devices enrolled, lost (not enrolled when the simulation ends at `--horizon-days`),
completion time (from the first power-on) vs the ideal,
peak concurrent requests at the server vs the cap (the server's own count, `--request-log`),
requests per device, and a PNG of requests per simulated minute.

    .venv/bin/python benchmarks/fleet.py [--devices 1000] [--cap 8] [--png fleet.png]
"""

from __future__ import annotations

import argparse
import collections
import heapq
import json
import logging
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from pngplot import bar_chart  # noqa: E402

from est_agent import sim  # noqa: E402
from est_agent.config import load_config  # noqa: E402
from est_agent.errors import EnrollmentPending, EstAgentError  # noqa: E402
from est_agent.sim.personalize import personalize  # noqa: E402
from est_agent.testserver import load_dev_pki  # noqa: E402
from est_agent.testserver.launch import running_test_server  # noqa: E402
from est_agent.workflow.agent import Agent  # noqa: E402
from est_agent.workflow.result import Outcome  # noqa: E402

BOOT_DELAY = timedelta(minutes=2)  # OnBootSec=2min
FAILURE_RETRY = timedelta(minutes=15)
START = datetime(2027, 1, 4, 6, 0, tzinfo=UTC)


class SimClock:
    """Simulated UTC time: ``scale`` x real time, plus forward jumps over idle stretches."""

    def __init__(self, start: datetime, scale: float) -> None:
        self._lock = threading.Lock()
        self.scale = scale
        self._real0 = time.time()
        self._sim0 = start
        #: (real epoch seconds, simulated time) at every re-anchoring, to map the server's log
        self.anchors: list[tuple[float, datetime]] = [(self._real0, start)]

    def now(self) -> datetime:
        with self._lock:
            return self._sim0 + timedelta(seconds=(time.time() - self._real0) * self.scale)

    def jump_to(self, when: datetime) -> None:
        with self._lock:
            real = time.time()
            current = self._sim0 + timedelta(seconds=(real - self._real0) * self.scale)
            if when > current:
                self._real0, self._sim0 = real, when
                self.anchors.append((real, when))

    def sim_of(self, real: float) -> datetime:
        base_real, base_sim = self.anchors[0]
        for anchor_real, anchor_sim in self.anchors:
            if anchor_real <= real:
                base_real, base_sim = anchor_real, anchor_sim
        return base_sim + timedelta(seconds=(real - base_real) * self.scale)


@dataclass
class Device:
    index: int
    config_path: Path
    first_run: datetime
    wake: datetime = field(init=False)
    enrolled_at: datetime | None = None
    runs: int = 0
    outcomes: collections.Counter[str] = field(default_factory=collections.Counter)

    def __post_init__(self) -> None:
        self.wake = self.first_run


def make_devices(base: Path, url: str, count: int, boot_spread_s: float, tag: str) -> list[Device]:
    pki = load_dev_pki(base / "pki")
    ca = pki.bootstrap_ca
    devices = []
    for i in range(count):
        root = base / f"{tag}-{i:04d}"
        root.mkdir(parents=True)
        sim = root / "sim.json"
        personalize(sim, iccid=f"8988247{i:012d}", bootstrap_ca=(ca.certificate, ca.key))
        config = root / "est-agent.toml"
        config.write_text(
            f'[card]\nreader = "sim:{sim}"\n\n'
            f'[est]\nurl = "{url}"\ntrust_anchor = "{base / "pki" / "tls-ca.pem"}"\n\n'
            '[subject]\ncommon_name = "{iccid}"\n\n'
            f'[paths]\nstate_dir = "{root / "state"}"\n'
        )
        offset = timedelta(seconds=boot_spread_s * i / max(count, 1))
        devices.append(Device(i, config, START + offset + BOOT_DELAY))
    return devices


def run_device(device: Device, clock: SimClock) -> None:
    """One timer run of one device: ``Agent.run``; sets when it runs next."""
    device.runs += 1
    agent = Agent(load_config(device.config_path), progress=lambda _text: None, clock=clock.now)
    try:
        result = agent.run()
    except EnrollmentPending as pending:
        device.outcomes["pending"] += 1
        device.wake = clock.now() + timedelta(seconds=max(1.0, pending.retry_after_s))
        return
    except EstAgentError as exc:
        device.outcomes[type(exc).__name__] += 1
        device.wake = clock.now() + FAILURE_RETRY
        return
    device.outcomes[str(result.outcome)] += 1
    if result.outcome in (Outcome.ENROLLED, Outcome.RENEWED):
        device.enrolled_at = clock.now()


def simulate(
    devices: list[Device],
    clock: SimClock,
    workers: int,
    outage: tuple[datetime, datetime] | None,
    outage_file: Path | None,
    horizon: datetime,
) -> datetime:
    """Run devices when due until all are enrolled or ``horizon``; returns the last enrollment."""
    queue = [(d.wake, d.index) for d in devices]
    heapq.heapify(queue)
    running: dict[int, Future[None]] = {}
    boundaries = sorted(outage) if outage else []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        while True:
            now = clock.now()
            if outage_file is not None and outage is not None:
                down = outage[0] <= now < outage[1]
                if down != outage_file.exists():
                    outage_file.touch() if down else outage_file.unlink()
            for index, future in list(running.items()):
                if future.done():
                    future.result()
                    del running[index]
                    device = devices[index]
                    if device.enrolled_at is None:
                        heapq.heappush(queue, (device.wake, index))
            while queue and queue[0][0] <= now and len(running) < workers:
                _, index = heapq.heappop(queue)
                running[index] = pool.submit(run_device, devices[index], clock)
            if not queue and not running:
                break
            if now >= horizon:
                break
            if not running:
                # nothing runs: jump to the next event (a device's wake or the outage's edge)
                events = [queue[0][0], *(b for b in boundaries if b > now)]
                clock.jump_to(min(events))
                continue
            time.sleep(0.002)
        for future in running.values():
            future.result()
    done = [d.enrolled_at for d in devices if d.enrolled_at is not None]
    return max(done) if done else clock.now()


def calibrate(base: Path, url: str, count: int, workers: int) -> float:
    """Enrollments per real second of this harness with ``workers`` devices at once against a
    server without a cap (the most this machine can do)."""
    devices = make_devices(base, url, count, 0.0, "calibrate")
    clock = SimClock(START, 1.0)
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(lambda d: run_device(d, clock), devices))
    elapsed = time.perf_counter() - started
    enrolled = sum(d.enrolled_at is not None for d in devices)
    if enrolled != count:
        raise SystemExit(f"calibration: {count - enrolled} of {count} did not enroll")
    return count / elapsed


def ideal_end(
    arrivals: list[datetime], rate_per_s: float, outage: tuple[datetime, datetime] | None
) -> datetime:
    """Arrivals served in order, one every 1/rate simulated seconds, none inside the outage."""
    step = timedelta(seconds=1 / rate_per_s)
    t = min(arrivals)
    for arrival in sorted(arrivals):
        t = max(t, arrival)
        if outage is not None and outage[0] <= t < outage[1]:
            t = outage[1]
        t += step
        if outage is not None and outage[0] < t <= outage[1]:
            t = outage[1] + step  # it did not finish before the CA went down: served after
    return t


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--cap", type=int, default=8, help="server --max-concurrent")
    parser.add_argument(
        "--ca-delay", type=float, default=0.5, help="real s the CA takes to issue (x scale)"
    )
    parser.add_argument("--workers", type=int, default=24, help="devices running at once")
    parser.add_argument("--scale", type=float, default=120.0, help="simulated s per real s")
    parser.add_argument("--boot-spread", type=float, default=60.0, help="seconds of power-ons")
    parser.add_argument("--outage-after", type=float, default=600.0, help="s after first boot")
    parser.add_argument("--outage-for", type=float, default=3600.0, help="0: no outage")
    parser.add_argument("--busy-status", choices=("503", "202"), default="503")
    parser.add_argument("--busy-retry-after", type=int, default=120)
    parser.add_argument("--retry-jitter", type=int, default=600)
    parser.add_argument("--outage-retry-after", type=int, default=900)
    parser.add_argument("--calibrate", type=int, default=24)
    parser.add_argument("--horizon-days", type=float, default=3.0)
    parser.add_argument("--png", type=Path, default=Path("fleet.png"))
    parser.add_argument("--json", type=Path, help="write the figures here too")
    args = parser.parse_args()
    logging.basicConfig(level=logging.CRITICAL)  # 1,000 agents' warnings are not the report
    sim.register()  # the `sim:` reader, as the CLI registers it at startup
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fleet-") as scratch:
        base = Path(scratch)
        subprocess.run(
            [sys.executable, "-m", "est_agent.testserver.cli", "pki", str(base / "pki")],
            check=True,
            capture_output=True,
        )
        outage_file = base / "ca-down"
        request_log = base / "requests.jsonl"
        server_args = [
            "--max-concurrent", str(args.cap), "--busy-status", args.busy_status,
            "--busy-retry-after", str(args.busy_retry_after),
            "--busy-retry-jitter", str(args.retry_jitter),
            "--outage-file", str(outage_file),
            "--outage-retry-after", str(args.outage_retry_after),
            "--request-log", str(request_log), "--response-delay", str(args.ca_delay),
        ]  # fmt: skip
        delay = ["--response-delay", str(args.ca_delay)]
        with running_test_server(base / "pki", base / "calibration", *delay) as server:
            harness_rate = calibrate(base, server.url, args.calibrate, args.workers)
        # the ideal rate: what this machine can push, and at most what the cap lets through
        # (cap enrollments at once, each holding its slot for at least the CA's delay)
        server_rate = args.cap / args.ca_delay if args.ca_delay > 0 else float("inf")
        rate = min(harness_rate, server_rate)
        calibrated = time.perf_counter() - started
        with running_test_server(base / "pki", base / "server", *server_args) as server:
            devices = make_devices(base, server.url, args.devices, args.boot_spread, "device")
            clock = SimClock(START, args.scale)
            outage = (
                (START + timedelta(seconds=args.outage_after),
                 START + timedelta(seconds=args.outage_after + args.outage_for))
                if args.outage_for > 0 else None
            )  # fmt: skip
            horizon = START + timedelta(days=args.horizon_days)
            sim_started = time.perf_counter()
            last = simulate(devices, clock, args.workers, outage, outage_file, horizon)
            sim_real_s = time.perf_counter() - sim_started
        entries = [json.loads(line) for line in request_log.read_text().splitlines() if line]
    enrolled = sum(d.enrolled_at is not None for d in devices)
    sim_rate = rate / args.scale  # enrollments per simulated second at the cap
    ideal = ideal_end([d.first_run for d in devices], sim_rate, outage)
    actual_s = (last - START).total_seconds()
    ideal_s = (ideal - START).total_seconds()
    statuses = collections.Counter(e["status"] for e in entries)
    peak = max((e["in_flight"] for e in entries), default=0)
    minutes = collections.Counter(
        int((clock.sim_of(e["t"]) - START).total_seconds() // 60) for e in entries
    )
    span = max(minutes, default=0) + 1
    per_minute = [minutes.get(m, 0) for m in range(span)]
    shaded = (
        (int((outage[0] - START).total_seconds() // 60),
         int((outage[1] - START).total_seconds() // 60))
        if outage else None
    )  # fmt: skip
    bar_chart(
        args.png,
        per_minute,
        title=f"requests per simulated minute: {args.devices} devices, cap {args.cap}, "
        f"outage {args.outage_for / 3600:g} h (grey)",
        x_label="minutes after the first power-on",
        shaded=shaded,
    )
    outcomes: collections.Counter[str] = collections.Counter()
    for d in devices:
        outcomes.update(d.outcomes)
    figures = {
        "devices": args.devices,
        "enrolled": enrolled,
        "lost": args.devices - enrolled,
        "completion_s": actual_s,
        "ideal_s": ideal_s,
        "ratio": actual_s / ideal_s,
        "peak_concurrent": peak,
        "cap": args.cap,
        "requests": len(entries),
        "requests_per_device": len(entries) / args.devices,
        "statuses": dict(sorted(statuses.items())),
        "runs_per_device": sum(d.runs for d in devices) / args.devices,
        "outcomes": dict(outcomes),
        "ideal_rate_per_real_s": rate,
        "harness_rate_per_real_s": harness_rate,
        "server_rate_per_real_s": server_rate,
        "real_s": time.perf_counter() - started,
        "calibration_real_s": calibrated,
        "simulation_real_s": sim_real_s,
        "png": str(args.png),
    }
    print(f"fleet: {args.devices} devices, cap {args.cap}, {args.workers} at once, "
          f"busy {args.busy_status}, outage {args.outage_for / 3600:g} h from "
          f"+{args.outage_after / 60:g} min, clock x{args.scale:g}")  # fmt: skip
    print(f"  enrolled {enrolled}, lost {args.devices - enrolled} (goal 0)")
    print(f"  completion {actual_s / 60:.1f} min after the first power-on; ideal "
          f"{ideal_s / 60:.1f} min: {actual_s / ideal_s:.2f}x (goal <= 1.2x); ideal rate "
          f"{rate:.1f}/s real = {sim_rate * 60:.2f}/simulated min (harness {harness_rate:.1f}/s, "
          f"cap / CA delay {server_rate:.1f}/s)")  # fmt: skip
    print(f"  peak concurrent requests at the server {peak} (cap {args.cap})")
    print(f"  requests {len(entries)}: {len(entries) / args.devices:.2f} per device; "
          f"by status {dict(sorted(statuses.items()))}; runs per device "
          f"{figures['runs_per_device']:.2f}")  # fmt: skip
    print(f"  outcomes of the runs {dict(outcomes)}")
    print(f"  plot {args.png}; real time {figures['real_s']:.0f} s (calibration "
          f"{calibrated:.0f} s, simulation {sim_real_s:.0f} s)")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0 if enrolled == args.devices else 1


if __name__ == "__main__":
    raise SystemExit(main())
