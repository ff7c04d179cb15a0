"""First-boot `est-agent enroll` on a realistic card and network, against the physical limit.

Profiles (issue 16): ``zero`` (no added latency), ``usb`` (a PC/SC USB reader: 15 ms per APDU,
GENERATE KEY PAIR 300 ms, a signature 80 ms, network RTT 20 ms) and ``cellular`` (a cellular
modem: 80 ms per AT+CSIM round trip, GENERATE KEY PAIR 900 ms, a signature 200 ms, RTT 300 ms).

Per round: a fresh virtual SIM; a fresh `est-agent enroll --json` process (byte-compiled
package, as installed; wall and peak RSS of that process, os.wait4 through a helper); the test
server (`est-testserver`, its own process) reached through `netdelay.DelayProxy` with the
profile's RTT; the card in the agent's process (``sim:`` reader with ``apdu_ms``, ``keygen_ms``,
``sign_ms``) for zero/usb, or behind the emulated modem on a pty (served by this process, the
card timed by ``sim.latency.TimedCard``, ``ModemQuirks.slow_ms`` per AT round trip) for
cellular.

The physical limit (what no client can avoid on that link, summed as the issue defines it;
an agent that overlaps card work with network waits can go below the sum):

    limit = card + network
    card  = keygen + 2 x sign + MIN_APDUS x per_apdu
            (per_apdu: apdu_ms; on the modem the AT round trip, one AT+CSIM per APDU)
    MIN_APDUS = 1   SELECT of the applet by AID, opening a logical channel implicitly
                    (ISO/IEC 7816-4 §5.5.2, as the virtual card does)
              + ceil(len(bootstrap certificate DER) / 256)   READ FILE (IoT.05: <= 256 a read)
              + 2   COMPUTE SIGNATURE INIT + UPDATE for the TLS CertificateVerify
              + 1   GENERATE KEY PAIR
              + 2   COMPUTE SIGNATURE INIT + UPDATE for the CSR
              + 1   SELECT of the certificate EF
              + ceil((44 + len(issued certificate DER)) / 255)   UPDATE BINARY (short APDUs;
                    44: the slot record header, est_agent/store.py)
    network = RTT x (1 TCP handshake + TLS handshake (TLS 1.3: 1, TLS 1.2: 2)
                     + 2 HTTP requests: GET /cacerts (RFC 7030 §4.1.1, a first boot needs the
                       CA certificates) and POST /simpleenroll (§4.2.1); /csrattrs is optional
                       (§4.5, MAY) and not in the limit)

Printed per profile (median of --rounds): wall, limit, ratio, APDUs and bytes on the card link
(the agent's own counters), AT round trips and serial bytes (cellular), round trips used and
TCP connections counted at the proxy. Then, at zero latency against the same server in one
run: `est-agent enroll` vs curl + openssl (wall, peak RSS), `est-agent run` with nothing due
vs `python -c pass` of the same interpreter.

    .venv/bin/python benchmarks/enroll_realistic.py [--rounds 3] [--profiles usb,cellular]
        [--tls 1.3] [--profile-dir DIR]   (py-spy the agent: one raw profile per profile, not
        in the figures, and -X importtime of enroll and run; summarise with spy_summary.py)
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from enroll_client import _curl_script  # noqa: E402
from enroll_e2e import compile_package  # noqa: E402
from netdelay import DelayProxy  # noqa: E402

from est_agent.cli.demo import write_demo_config  # noqa: E402
from est_agent.sim.card import VirtualCard  # noqa: E402
from est_agent.sim.latency import CardTiming, TimedCard  # noqa: E402
from est_agent.sim.modem import EmulatedModem, ModemQuirks, PtyModem  # noqa: E402
from est_agent.sim.personalize import personalize  # noqa: E402
from est_agent.testserver import load_dev_pki  # noqa: E402
from est_agent.testserver.launch import running_test_server  # noqa: E402

HEADER_BYTES = 44
READ_MAX = 256
WRITE_MAX = 255
MIN_REQUESTS = 2  # GET /cacerts + POST /simpleenroll


@dataclass(frozen=True)
class Profile:
    name: str
    link: str  # "sim" or "modem"
    apdu_ms: float
    at_ms: float
    keygen_ms: float
    sign_ms: float
    rtt_ms: float

    @property
    def per_apdu_ms(self) -> float:
        return self.at_ms + self.apdu_ms


PROFILES = {
    "zero": Profile("zero", "sim", 0, 0, 0, 0, 0),
    "usb": Profile("usb", "sim", 15, 0, 300, 80, 20),
    "cellular": Profile("cellular", "modem", 0, 80, 900, 200, 300),
}


class CountingModem(EmulatedModem):
    """The emulated modem, counting serial bytes: command lines in, everything out."""

    bytes_in = 0
    bytes_out = 0

    def handle(self, line: str) -> bytes:
        out = super().handle(line)
        self.bytes_in += len(line) + 1  # + S3
        self.bytes_out += len(out)
        return out


_HELPER = (
    "import json,resource,subprocess,sys,time;"
    "a=json.loads(sys.argv[1]);t=time.perf_counter();"
    "p=subprocess.run(a,capture_output=True);w=time.perf_counter()-t;"
    "r=resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss/1024;"
    "print(json.dumps({'rc':p.returncode,'wall':w,'rss':r,'out':p.stdout.decode(),"
    "'err':p.stderr.decode()[-2000:]}))"
)


#: the interpreter the agent's processes run with: this one, or a device install's (--agent-python)
AGENT_PYTHON = [sys.executable]


def measure_out(argv: list[str]) -> tuple[float, float, str]:
    """Wall seconds, peak RSS (MiB) and stdout of ``argv``, from a tiny helper process: a child
    forked straight from this (large) process would report this process's RSS as its peak."""
    done = subprocess.run(
        [sys.executable, "-c", _HELPER, json.dumps(argv)],
        capture_output=True,
        text=True,
        check=True,
    )
    report = json.loads(done.stdout)
    if report["rc"] != 0:
        raise SystemExit(f"{argv[0]} failed ({report['rc']}): {report['err']}")
    return report["wall"], report["rss"], report["out"]


def measure_plain(argv: list[str]) -> tuple[float, float]:
    wall, rss, _ = measure_out(argv)
    return wall, rss


def measure_agent(argv: list[str]) -> tuple[float, float, dict[str, Any]]:
    """``measure_out`` of an `est-agent ... --json` command (py-spy's own lines skipped)."""
    wall, rss, out = measure_out(argv)
    text = "\n".join(line for line in out.splitlines() if not line.startswith("py-spy>"))
    return wall, rss, json.loads(text)


def min_apdus(bootstrap_len: int, issued_len: int) -> int:
    """MIN_APDUS of the module docstring."""
    reads = math.ceil(bootstrap_len / READ_MAX)
    writes = math.ceil((HEADER_BYTES + issued_len) / WRITE_MAX)
    return 1 + reads + 2 + 1 + 2 + 1 + writes


def limit_s(profile: Profile, apdus: int, tls: str) -> tuple[float, float]:
    """(card, network) seconds of the physical limit."""
    card = profile.keygen_ms + 2 * profile.sign_ms + apdus * profile.per_apdu_ms
    tls_rtts = 1 if tls == "1.3" else 2
    network = profile.rtt_ms * (1 + tls_rtts + MIN_REQUESTS)
    return card / 1000, network / 1000


def write_config(config: Path, *, reader: str, url: str, work: Path, pki: Path) -> None:
    """The demo's configuration, with its state and export under ``work`` and the dev PKI."""
    write_demo_config(config, reader=reader, url=url, base=work)
    config.write_text(config.read_text().replace(str(work / "pki"), str(pki)))


def _pem_der_len(path: Path) -> int:
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    cert = x509.load_pem_x509_certificates(path.read_bytes())[0]
    return len(cert.public_bytes(Encoding.DER))


def one_round(
    base: Path, server_port: int, profile: Profile, tls: str, index: int, spy: Path | None
) -> dict[str, Any]:
    pki = load_dev_pki(base / "pki")
    ca = pki.bootstrap_ca
    work = base / f"{profile.name}-{index}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    state = work / "sim.json"
    report = personalize(state, bootstrap_ca=(ca.certificate, ca.key), force=True)
    from cryptography.hazmat.primitives.serialization import Encoding

    bootstrap_len = len(report.bootstrap_certificate.public_bytes(Encoding.DER))
    with ExitStack() as stack:
        modem: CountingModem | None = None
        if profile.link == "modem":
            timing = CardTiming(keygen_ms=profile.keygen_ms, sign_ms=profile.sign_ms)
            card = TimedCard(VirtualCard.load(state), timing)
            modem = CountingModem(card, ModemQuirks(slow_ms=profile.at_ms), iccid="")
            pty = stack.enter_context(PtyModem(modem, work / "tty"))
            reader = f"modem:{pty.device}"
        else:
            query = "&".join(
                f"{key}={value:g}"
                for key, value in (
                    ("apdu_ms", profile.apdu_ms),
                    ("keygen_ms", profile.keygen_ms),
                    ("sign_ms", profile.sign_ms),
                )
                if value
            )
            reader = f"sim:{state}" + (f"?{query}" if query else "")
        proxy = stack.enter_context(DelayProxy(("127.0.0.1", server_port), profile.rtt_ms / 1000))
        url = f"https://127.0.0.1:{proxy.port}/.well-known/est"
        config = work / "est-agent.toml"
        write_config(config, reader=reader, url=url, work=work, pki=base / "pki")
        argv = [AGENT_PYTHON[0], "-m", "est_agent", "enroll", "--config", str(config), "--json"]
        if spy is not None:
            spy.mkdir(parents=True, exist_ok=True)
            out_file = spy / f"{profile.name}-{index}.txt"
            argv = [
                str(Path(sys.executable).with_name("py-spy")), "record", "--idle", "--format",
                "raw", "-r", "500", "-o", str(out_file), "--", *argv,
            ]  # fmt: skip
        wall, rss, out = measure_agent(argv)
        net = proxy.reset()
        at = (modem.commands, modem.bytes_in + modem.bytes_out) if modem else (None, None)
    assert out["outcome"] == "enrolled", out
    issued_len = _pem_der_len(work / "device.pem")
    apdus_min = min_apdus(bootstrap_len, issued_len)
    card_s, net_s = limit_s(profile, apdus_min, tls)
    return {
        "wall_s": wall,
        "rss_mib": rss,
        "apdus": out["card_link"]["apdus"],
        "card_bytes": out["card_link"]["bytes"],
        "signatures": out["card_link"]["signatures"],
        "at": at[0],
        "serial_bytes": at[1],
        "round_trips": net.round_trips,
        "connections": net.connections,
        "net_bytes": net.bytes_up + net.bytes_down,
        "min_apdus": apdus_min,
        "limit_card_s": card_s,
        "limit_net_s": net_s,
    }


def _median(rows: list[dict[str, Any]], key: str) -> float:
    values = [r[key] for r in rows if r[key] is not None]
    return float(statistics.median(values)) if values else float("nan")


def print_profiles(results: dict[str, list[dict[str, Any]]], tls: str, rounds: int) -> None:
    print(f"first-boot `est-agent enroll`, fresh process, median of {rounds}; TLS {tls}")
    print(
        f"{'profile':9} {'wall ms':>8} {'limit ms':>9} {'(card':>7} {'+ net)':>7} {'ratio':>6} "
        f"{'APDUs':>5} {'min':>4} {'AT':>4} {'card B':>7} {'serial B':>8} {'RTTs':>5} "
        f"{'min':>4} {'TCP':>4} {'RSS MiB':>7}"
    )
    min_rtts = 1 + (1 if tls == "1.3" else 2) + MIN_REQUESTS
    for name, rows in results.items():
        wall = _median(rows, "wall_s")
        card = _median(rows, "limit_card_s")
        net = _median(rows, "limit_net_s")
        limit = card + net
        ratio = f"{wall / limit:6.2f}" if limit else f"{'-':>6}"
        at = _median(rows, "at")
        serial = _median(rows, "serial_bytes")
        print(
            f"{name:9} {wall * 1000:8.0f} {limit * 1000:9.0f} {card * 1000:7.0f} "
            f"{net * 1000:7.0f} {ratio} {_median(rows, 'apdus'):5.0f} "
            f"{_median(rows, 'min_apdus'):4.0f} "
            f"{'-' if math.isnan(at) else f'{at:.0f}':>4} {_median(rows, 'card_bytes'):7.0f} "
            f"{'-' if math.isnan(serial) else f'{serial:.0f}':>8} "
            f"{_median(rows, 'round_trips'):5.0f} {min_rtts:4d} "
            f"{_median(rows, 'connections'):4.0f} {_median(rows, 'rss_mib'):7.1f}"
        )


def zero_latency_comparison(base: Path, url: str, rounds: int) -> None:
    """`enroll` vs curl + openssl, and `run` (nothing due) vs `python -c pass`, same server."""
    pki = load_dev_pki(base / "pki")
    ca = pki.bootstrap_ca
    agent: list[tuple[float, float]] = []
    idle: list[tuple[float, float]] = []
    curl: list[tuple[float, float]] = []
    floor: list[tuple[float, float]] = []
    for i in range(rounds):
        work = base / f"cmp-{i}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        state = work / "sim.json"
        personalize(state, bootstrap_ca=(ca.certificate, ca.key), force=True)
        config = work / "est-agent.toml"
        write_config(config, reader=f"sim:{state}", url=url, work=work, pki=base / "pki")
        for command, sink in (("enroll", agent), ("run", idle)):
            argv = [AGENT_PYTHON[0], "-m", "est_agent", command, "--config", str(config), "--json"]
            wall, rss, out = measure_agent(argv)
            expected = "enrolled" if command == "enroll" else "not-due"
            assert out["outcome"].replace("_", "-") == expected, out
            sink.append((wall, rss))
        curl_dir = work / "curl"
        curl_dir.mkdir()
        origin = url.split("/.well", maxsplit=1)[0]
        curl.append(measure_plain(_curl_script(curl_dir, base / "pki", origin, "1.3")))
        floor.append(measure_plain([AGENT_PYTHON[0], "-c", "pass"]))

    def med(rows: list[tuple[float, float]]) -> tuple[float, float]:
        return statistics.median(w for w, _ in rows) * 1000, statistics.median(r for _, r in rows)

    (aw, ar), (iw, ir), (cw, cr), (pw, pr) = med(agent), med(idle), med(curl), med(floor)
    print(f"\nzero latency, 127.0.0.1, same server, median of {rounds}")
    print(f"  est-agent enroll   {aw:7.0f} ms {ar:6.1f} MiB   (target <= 3x curl, <= 35 MiB)")
    print(f"  curl + openssl     {cw:7.0f} ms {cr:6.1f} MiB   ratio {aw / cw:.2f}x")
    print(f"  est-agent run      {iw:7.0f} ms {ir:6.1f} MiB   (nothing due; target <= 120 ms, "
          "<= 20 MiB)")  # fmt: skip
    print(f"  python -c pass     {pw:7.0f} ms {pr:6.1f} MiB   (the interpreter floor)")


def import_times(base: Path, url: str, out: Path) -> None:
    """``-X importtime`` of a first-boot `enroll` and of `run` with nothing due (zero latency),
    written to ``out`` and summarised by top-level import (spy_summary.importtime)."""
    from spy_summary import importtime

    pki = load_dev_pki(base / "pki")
    ca = pki.bootstrap_ca
    work = base / "importtime"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    state = work / "sim.json"
    personalize(state, bootstrap_ca=(ca.certificate, ca.key), force=True)
    config = work / "est-agent.toml"
    write_config(config, reader=f"sim:{state}", url=url, work=work, pki=base / "pki")
    out.mkdir(parents=True, exist_ok=True)
    for command in ("enroll", "run"):
        report = importtime(["-m", "est_agent", command, "--config", str(config), "--json"], 15)
        (out / f"importtime-{command}.txt").write_text(report + "\n")
        print(f"\n`est-agent {command}` {report}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profiles", default="zero,usb,cellular")
    parser.add_argument("--tls", choices=("1.2", "1.3"), default="1.3")
    parser.add_argument("--compare-rounds", type=int, default=5, help="0: skip the comparison")
    parser.add_argument("--profile-dir", type=Path, help="py-spy raw profiles of the agent here")
    parser.add_argument(
        "--agent-python",
        help="run the agent with this interpreter: a device install (`python -m venv D && D/bin/pip"
        " install .`), without the dev extra's rich/click/pygments that httpx imports when present",
    )
    args = parser.parse_args()
    if args.agent_python:
        AGENT_PYTHON[0] = args.agent_python
    names = [n for n in args.profiles.split(",") if n]
    unknown = [n for n in names if n not in PROFILES]
    if unknown:
        parser.error(f"unknown profile {unknown[0]!r} ({', '.join(PROFILES)})")
    compile_package()
    with tempfile.TemporaryDirectory(prefix="enroll-real-") as scratch, ExitStack() as stack:
        base = Path(scratch)
        subprocess.run(
            [sys.executable, "-m", "est_agent.testserver.cli", "pki", str(base / "pki")],
            check=True,
            capture_output=True,
        )
        server = stack.enter_context(running_test_server(base / "pki", base, "--tls-max", args.tls))
        results: dict[str, list[dict[str, Any]]] = {}
        for name in names:
            rows = [
                one_round(base, server.port, PROFILES[name], args.tls, i, None)
                for i in range(args.rounds)
            ]
            results[name] = rows
            if args.profile_dir is not None:  # one more round under py-spy, not in the figures
                one_round(
                    base, server.port, PROFILES[name], args.tls, args.rounds, args.profile_dir
                )
        print_profiles(results, args.tls, args.rounds)
        if args.compare_rounds:
            zero_latency_comparison(base, server.url, args.compare_rounds)
        if args.profile_dir is not None:
            import_times(base, server.url, args.profile_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
