"""`est-agent demo`: the whole job on built-in defaults, with nothing but this package.

It lives in the CLI layer because it drives both tools outside the runtime, the virtual SIM and
the test EST server, which only the CLI may use together.

In a scratch directory: a dev PKI and the RFC 7030 test server on 127.0.0.1 (a separate
`est-testserver serve` process), a freshly personalized virtual SIM, a configuration file, and
then the real commands an operator or a timer runs, each as its own process:
`est-agent enroll`, `status`, `renew --force`, `status`, and finally `openssl verify` of the
active certificate against the EST CA. With ``pcsc=True`` the SIM is served through a private
pcscd + vpcd (`est-agent sim serve`) and the agent reaches it as `pcsc:`; otherwise in process
(`sim:`), which needs no daemon at all. With ``backend="pkcs11"`` every key is in a SoftHSM2
token initialised in the scratch directory (``SOFTHSM2_CONF``) instead: the bootstrap key is
generated on it and certified by the dev PKI's bootstrap CA, the slots are ``pkcs11:`` URIs,
and `est-agent token info` shows what ends up on the token. Everything started is stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path

from est_agent.errors import EstAgentError, InputError, UsageError
from est_agent.sim.personalize import personalize
from est_agent.testserver.launch import running_test_server

__all__ = ["demo", "run_demo", "write_demo_config"]

_ICCID = "8988247000001234567"


def _say(text: str) -> None:
    print(f"demo: {text}", file=sys.stderr, flush=True)


def _run(argv: Sequence[str], *, env: dict[str, str] | None = None, check: bool = True) -> str:
    shown = [Path(argv[0]).name if i == 0 else a for i, a in enumerate(argv)]
    print(f"\n$ {shlex.join(shown)}", flush=True)
    result = subprocess.run(list(argv), capture_output=True, text=True, env=env, check=False)
    sys.stderr.write(result.stderr)
    sys.stdout.write(result.stdout)
    sys.stdout.flush()
    if check and result.returncode != 0:
        raise DemoStepError(f"`{shlex.join(shown)}` exited {result.returncode}")
    return result.stdout


class DemoStepError(EstAgentError):
    """Raised when a step of the demo fails (its own output says why)."""


def _agent(*args: str) -> list[str]:
    return [sys.executable, "-m", "est_agent", *args]


@contextmanager
def _pcsc_reader(base: Path, state: Path, atr: bytes) -> Iterator[dict[str, str]]:
    from est_agent.sim.pcsc_stack import start_pcscd, stop_process, wait_for_card

    stack = start_pcscd(base / "pcsc")
    try:
        _say(f"private pcscd started (vpcd reader on port {stack.vpcd_port})")
        env = stack.client_env()
        argv = _agent("sim", "serve", str(state), "--vpcd", f"127.0.0.1:{stack.vpcd_port}")
        print(f"\n$ est-agent sim serve {state} --vpcd 127.0.0.1:{stack.vpcd_port} &", flush=True)
        card = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL)
        try:
            stack.activate()
            wait_for_card(stack.reader_name, atr=atr, timeout_s=10.0)
            _say(f"virtual SIM inserted in {stack.reader_name!r}")
            yield env
        finally:
            stop_process(card)
    finally:
        stack.stop()


def write_demo_config(path: Path, *, reader: str, url: str, base: Path) -> None:
    path.write_text(
        "# written by `est-agent demo`; every key: est-agent.example.toml\n"
        f'[card]\nreader = "{reader}"\n\n'
        f'[est]\nurl = "{url}"\ntrust_anchor = "{base / "pki" / "tls-ca.pem"}"\n\n'
        '[subject]\ncommon_name = "{iccid}"\n\n'
        f'[paths]\nstate_dir = "{base / "state"}"\nexport_pem = "{base / "device.pem"}"\n',
        encoding="utf-8",
    )


#: Debian's softhsm2 package
SOFTHSM_MODULE = "/usr/lib/softhsm/libsofthsm2.so"
_TOKEN = "est-demo"  # noqa: S105 (a token label, not a password)


def _token_uri(label: str, kind: str) -> str:
    return f"pkcs11:token={_TOKEN};object={label};type={kind}"


def write_token_config(path: Path, *, url: str, base: Path, pin_file: Path) -> None:
    """The demo configuration with every key in the SoftHSM2 token."""
    slots = "".join(
        f'[[slot]]\nname = "{name}"\nkey = "{_token_uri(name, "private")}"\n'
        f'certificate = "{_token_uri(name, "cert")}"\n'
        for name in ("op-a", "op-b")
    )
    path.write_text(
        "# written by `est-agent demo --backend pkcs11`; README: Keys in a PKCS#11 token\n"
        f'[pkcs11]\nmodule = "{SOFTHSM_MODULE}"\npin_file = "{pin_file}"\n\n'
        f'[bootstrap]\nkey = "{_token_uri("bootstrap", "private")}"\n'
        f'certificate = "{_token_uri("bootstrap", "cert")}"\n\n'
        f"{slots}\n"
        f'[est]\nurl = "{url}"\ntrust_anchor = "{base / "pki" / "tls-ca.pem"}"\n\n'
        '[subject]\ncommon_name = "demo-device-0001"\n\n'
        f'[paths]\nstate_dir = "{base / "state"}"\nexport_pem = "{base / "device.pem"}"\n',
        encoding="utf-8",
    )


def _softhsm_token(base: Path, pki_dir: Path) -> tuple[dict[str, str], Path]:
    """A SoftHSM2 token in ``base/softhsm`` with the bootstrap credential on it; the
    environment of the agent's processes and the PIN file."""
    from est_agent.backends.pkcs11 import load_module, open_pkcs11
    from est_agent.cli.token import provision_bootstrap
    from est_agent.errors import TransportError
    from est_agent.pkcs11_uri import parse_pkcs11_uri
    from est_agent.testserver import load_dev_pki

    if not Path(SOFTHSM_MODULE).exists():
        raise TransportError(f"no {SOFTHSM_MODULE}: install softhsm2 (scripts/bootstrap does)")
    tokens = base / "softhsm" / "tokens"
    if tokens.exists():
        import shutil

        shutil.rmtree(tokens)
    tokens.mkdir(parents=True)
    conf = base / "softhsm" / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n"
    )
    pin = secrets.token_hex(4)
    pin_file = base / "token-pin"
    pin_file.write_text(pin + "\n")
    pin_file.chmod(0o600)
    env = {**os.environ, "SOFTHSM2_CONF": str(conf)}
    os.environ["SOFTHSM2_CONF"] = str(conf)  # this process provisions the bootstrap key
    # not through _run: its echo of the command line would show the PINs
    print(f"\n$ softhsm2-util --init-token --free --label {_TOKEN} --so-pin *** --pin ***")
    init = subprocess.run(
        [
            "softhsm2-util", "--init-token", "--free", "--label", _TOKEN,
            "--so-pin", secrets.token_hex(4), "--pin", pin,
        ],
        env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    sys.stdout.write(init.stdout)
    if init.returncode != 0:
        raise DemoStepError(f"softhsm2-util exited {init.returncode}: {init.stderr.strip()}")
    load_module(SOFTHSM_MODULE).reinitialize()  # SoftHSM reads SOFTHSM2_CONF when initialised
    pki = load_dev_pki(pki_dir)
    key = parse_pkcs11_uri(_token_uri("bootstrap", "private"))
    with open_pkcs11(key, module=SOFTHSM_MODULE, pin=pin) as backend:
        provision_bootstrap(
            backend, key, key.with_type("cert"), pki.bootstrap_ca, "bootstrap-demo-device-0001"
        )
    _say(f"SoftHSM2 token {_TOKEN!r}: bootstrap key generated on it, certified by the dev CA")
    return env, pin_file


def run_demo(
    workdir: Path | None = None, *, pcsc: bool = False, backend: str = "iotsafe"
) -> int:
    with tempfile.TemporaryDirectory(prefix="est-agent-demo-") as scratch, ExitStack() as stack:
        base = (workdir or Path(scratch)).resolve()
        base.mkdir(parents=True, exist_ok=True)
        _run(_agent_testserver("pki", "--force", str(base / "pki")))
        server = stack.enter_context(
            running_test_server(base / "pki", base, "--issuance-log", str(base / "issuance.jsonl"))
        )
        url = server.url
        _say(f"est-testserver listening on {url}")

        from est_agent.testserver import load_dev_pki

        config = base / "est-agent.toml"
        env: dict[str, str] | None = None
        if backend == "pkcs11":
            env, pin_file = _softhsm_token(base, base / "pki")
            write_token_config(config, url=url, base=base, pin_file=pin_file)
        else:
            pki = load_dev_pki(base / "pki")
            state = base / "sim.json"
            ca = pki.bootstrap_ca
            report = personalize(
                state, iccid=_ICCID, bootstrap_ca=(ca.certificate, ca.key), force=True
            )
            print(f"\n$ est-agent sim init {state} --bootstrap-ca pki/bootstrap-ca.pem ...")
            print(report)
            reader = f"sim:{state}"
            if pcsc:
                env = stack.enter_context(_pcsc_reader(base, state, report.atr))
                reader = "pcsc:"
            write_demo_config(config, reader=reader, url=url, base=base)
        _say(f"configuration: {config}")

        cfg = ["--config", str(config)]
        _run(_agent("enroll", *cfg), env=env)
        _run(_agent("status", *cfg), env=env)
        _run(_agent("renew", "--force", *cfg), env=env)
        status = json.loads(_run(_agent("status", "--json", *cfg), env=env))
        if status["active_slot"] is None:
            raise InputError("no active credential after the demo")
        _run(
            ["openssl", "verify", "-CAfile", str(base / "pki" / "ca.pem"), str(base / "device.pem")]
        )
        if backend == "pkcs11":
            _run(_agent("token", "info", "--module", SOFTHSM_MODULE, "--pin-file", str(pin_file)))
        kept = f"; files kept in {base}" if workdir else ""
        where = "token" if backend == "pkcs11" else "SIM"
        _say(f"done: active credential in {where} slot {status['active_slot']}{kept}")
    return 0


def demo(args: argparse.Namespace) -> int:
    """`est-agent demo [--dir DIR] [--pcsc] [--backend iotsafe|pkcs11]`."""
    if args.pcsc and args.backend == "pkcs11":
        raise UsageError("--pcsc serves a virtual SIM; --backend pkcs11 uses no SIM")
    return run_demo(Path(args.dir) if args.dir else None, pcsc=args.pcsc, backend=args.backend)


def _agent_testserver(*args: str) -> list[str]:
    return [sys.executable, "-m", "est_agent.testserver.cli", *args]
