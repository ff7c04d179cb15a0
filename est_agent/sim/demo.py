"""`est-agent demo`: the virtual SIM through the real PC/SC stack, end to end.

Personalizes a virtual SIM, starts a private pcscd with vsmartcard's vpcd driver, inserts the
card with `est-agent sim serve` (a separate process, exactly as an operator would run it) and
reads it back with `est-agent card info --reader pcsc:`. Everything it starts is stopped.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from est_agent.card.channel import CardSession
from est_agent.card.info import read_card_info
from est_agent.errors import ReaderError
from est_agent.sim.pcsc_stack import start_pcscd, stop_process, wait_for_card
from est_agent.sim.personalize import personalize
from est_agent.transport import open_transport

__all__ = ["run_demo"]


def _say(text: str) -> None:
    print(f"demo: {text}", file=sys.stderr, flush=True)


def run_demo(workdir: Path | None = None, *, as_json: bool = False) -> int:
    with tempfile.TemporaryDirectory(prefix="est-agent-demo-") as scratch:
        base = workdir or Path(scratch)
        base.mkdir(parents=True, exist_ok=True)
        state = base / "sim.json"
        report = personalize(state, force=True)
        _say(f"est-agent sim init {state}  (ICCID {report.iccid})")

        stack = start_pcscd(base / "pcsc")
        try:
            stack.activate()  # this process's PC/SC client talks to the private pcscd
            _say(f"pcscd started (vpcd reader on port {stack.vpcd_port})")
            serve_argv = [
                sys.executable, "-m", "est_agent", "sim", "serve", str(state),
                "--vpcd", f"127.0.0.1:{stack.vpcd_port}",
            ]  # fmt: skip
            _say("est-agent " + " ".join(serve_argv[3:]))
            server = subprocess.Popen(serve_argv, env=stack.client_env(), stdin=subprocess.DEVNULL)
            try:
                wait_for_card(stack.reader_name, atr=report.atr, timeout_s=10.0)
                _say(f"card present in {stack.reader_name!r}")
                _say("est-agent card info --reader pcsc:" + (" --json" if as_json else ""))
                session = CardSession(open_transport("pcsc:"))
                try:
                    info = read_card_info(session)
                finally:
                    session.close()
            finally:
                stop_process(server)
        finally:
            stack.stop()
    if info.atr != report.atr:
        raise ReaderError("the card read through pcscd is not the one just personalized")
    if as_json:
        print(json.dumps(info.to_json(), indent=2))
    else:
        print(info.render())
    return 0
