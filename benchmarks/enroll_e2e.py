"""`est-agent enroll`, `run` (nothing due) and `renew --force` as fresh processes, end to end.

Against one `est-testserver` on 127.0.0.1, with a fresh virtual SIM per round, through two
card links: in process (`sim:` reader, zero latency) and the real PC/SC stack (`pcsc:`: pyscard
-> private pcscd -> vpcd -> `est-agent sim serve`). Per command, the median over --rounds of:
wall time of the whole child process, its peak RSS (os.wait4), APDUs and bytes over the card
link (the agent's own transport counters, `--json` `card_link`; through pcscd cross-checked
with the card's APDU trace), and card signatures. Targets (DEVELOPERS.md): first-boot
enrollment <= 22 APDUs and <= 8 KiB, one signature per handshake + one per CSR, peak RSS
<= 40 MiB; `run` with nothing due <= 120 ms, <= 4 APDUs, no network.

    .venv/bin/python benchmarks/enroll_e2e.py --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from est_agent.cli.demo import write_demo_config  # noqa: E402
from est_agent.sim.personalize import personalize  # noqa: E402
from est_agent.testserver import load_dev_pki  # noqa: E402
from est_agent.testserver.launch import running_test_server  # noqa: E402

COMMANDS = (("enroll",), ("run",), ("renew", "--force"))


def measure(argv: list[str], env: dict[str, str] | None) -> tuple[float, float, dict[str, Any]]:
    """Run `argv` from a tiny helper process so that RUSAGE_CHILDREN covers only it."""
    helper = (
        "import json,os,resource,subprocess,sys,time;"
        "a=json.loads(sys.argv[1]);t=time.perf_counter();"
        "p=subprocess.run(a,capture_output=True);w=time.perf_counter()-t;"
        "r=resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss/1024;"
        "print(json.dumps({'rc':p.returncode,'wall':w,'rss':r,"
        "'out':p.stdout.decode(),'err':p.stderr.decode()[-2000:]}))"
    )
    done = subprocess.run(
        [sys.executable, "-c", helper, json.dumps(argv)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    report = json.loads(done.stdout)
    if report["rc"] != 0:
        raise SystemExit(f"{' '.join(argv[3:])} failed ({report['rc']}): {report['err']}")
    return report["wall"], report["rss"], json.loads(report["out"])


def one_round(
    base: Path, url: str, mode: str, stack: ExitStack, pcscd: Any
) -> dict[str, tuple[float, float, dict[str, Any], int | None]]:
    pki = load_dev_pki(base / "pki")
    state = base / f"sim-{mode}.json"
    ca = pki.bootstrap_ca
    report = personalize(state, bootstrap_ca=(ca.certificate, ca.key), force=True)
    env = dict(os.environ)
    reader = f"sim:{state}"
    trace = base / f"trace-{mode}.jsonl"
    trace.unlink(missing_ok=True)
    if mode == "pcsc":
        from est_agent.sim.pcsc_stack import stop_process, wait_for_card, wait_for_no_card

        env = pcscd.client_env()
        card = subprocess.Popen(
            [sys.executable, "-m", "est_agent", "sim", "serve", str(state),
             "--vpcd", f"127.0.0.1:{pcscd.vpcd_port}", "--trace", str(trace)],
            env=env,
        )  # fmt: skip
        # after the card process ends, wait for an empty reader (and one vpcd poll) before
        # the next round's card connects (a reader reused within one 400 ms poll can stay empty)
        stack.callback(time.sleep, 0.5)
        stack.callback(wait_for_no_card, pcscd.reader_name)
        stack.callback(stop_process, card)
        wait_for_card(pcscd.reader_name, atr=report.atr, timeout_s=10)
        reader = "pcsc:"
    state_dir = base / f"state-{mode}"
    shutil.rmtree(state_dir, ignore_errors=True)
    config = base / f"est-agent-{mode}.toml"
    write_demo_config(config, reader=reader, url=url, base=base)
    text = config.read_text().replace(str(base / "state"), str(state_dir))
    config.write_text(text.replace(f'export_pem = "{base / "device.pem"}"\n', ""))
    results = {}
    for command in COMMANDS:
        seen = len(trace.read_text().splitlines()) if trace.exists() else 0
        argv = [sys.executable, "-m", "est_agent", *command, "--config", str(config), "--json"]
        wall, rss, out = measure(argv, env)
        traced = len(trace.read_text().splitlines()) - seen if trace.exists() else None
        results[" ".join(command)] = (wall, rss, out, traced)
    return results


def compile_package() -> None:
    """Byte-compile est_agent first, as an installed package is (pip, the Dockerfile): with
    PYTHONDONTWRITEBYTECODE set, as on these machines, every child would otherwise compile the
    package from source (~45 ms, ~0.8 MiB) and the figures would measure the compiler."""
    import compileall

    compileall.compile_dir(str(REPO / "est_agent"), quiet=1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--modes", default="inprocess,pcsc")
    args = parser.parse_args()
    compile_package()
    with tempfile.TemporaryDirectory(prefix="enroll-e2e-") as scratch, ExitStack() as stack:
        base = Path(scratch)
        subprocess.run(
            [sys.executable, "-m", "est_agent.testserver.cli", "pki", str(base / "pki")],
            check=True,
            capture_output=True,
        )
        url = stack.enter_context(running_test_server(base / "pki", base)).url
        print(f"{'mode':10} {'command':14} {'wall ms':>8} {'RSS MiB':>8} {'APDUs':>6} "
              f"{'traced':>6} {'bytes':>6} {'sigs':>5}  outcome")  # fmt: skip
        pcscd = None
        if "pcsc" in args.modes.split(","):
            from est_agent.sim.pcsc_stack import start_pcscd

            # one pcscd for the whole run: libpcsclite reads its socket path once per process
            pcscd = start_pcscd(base / "pcsc")
            stack.callback(pcscd.stop)
            pcscd.activate()
        for mode in args.modes.split(","):
            rounds = []
            for _ in range(args.rounds):
                with ExitStack() as card_stack:
                    rounds.append(one_round(base, url, mode, card_stack, pcscd))
            for command in rounds[0]:
                rows = [r[command] for r in rounds]
                link = [r[2]["card_link"] for r in rows]
                traced = [r[3] for r in rows if r[3] is not None]
                print(
                    f"{mode:10} {command:14} "
                    f"{statistics.median(r[0] for r in rows) * 1000:8.1f} "
                    f"{statistics.median(r[1] for r in rows):8.1f} "
                    f"{statistics.median(x['apdus'] for x in link):6.0f} "
                    f"{statistics.median(traced) if traced else float('nan'):6.0f} "
                    f"{statistics.median(x.get('bytes', 0) for x in link):6.0f} "
                    f"{statistics.median(x['signatures'] for x in link):5.0f}  "
                    f"{rows[0][2]['outcome']}"
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
