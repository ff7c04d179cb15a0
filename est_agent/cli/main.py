"""est-agent command line: argparse at the edge, the only place errors become exit codes.

Subcommand modules are imported only when their command runs, so `est-agent run` with nothing
due stays fast and never loads the HTTP or PC/SC stacks.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import logging
import math
import os
import select
import sys
from collections.abc import Callable, Sequence
from typing import Any

import est_agent.sim
from est_agent import __version__
from est_agent.errors import (
    EX_INTERRUPTED,
    EX_SOFTWARE,
    EX_USAGE,
    EstAgentError,
    OutputError,
    UsageError,
    exit_code_for,
)

__all__ = ["build_parser", "main", "public_class_name"]

log = logging.getLogger("est_agent")

DEFAULT_READER = "pcsc:"
# As est.timeout_s in the configuration: a larger value is a unit mistake (ms for s), and a
# socket timeout must be a finite positive number (socket.settimeout refuses NaN and overflows).
_MAX_TIMEOUT_S = 3600.0
_MAX_ATTEMPTS = 20
# `card random N`: est_agent.api.MAX_RANDOM_BYTES, repeated so the parser loads no card code
_MAX_RANDOM_BYTES = 4096
# argparse's own exit status for a bad command line (ArgumentParser.error): shown as EX_USAGE.
_ARGPARSE_USAGE_STATUS = 2


def _fingerprint(text: str) -> bytes:
    """argparse type: a SHA-256 fingerprint, hex (colons allowed); else UsageError."""
    try:
        value = bytes.fromhex(text.replace(":", ""))
    except ValueError:
        raise UsageError(f"--fingerprint: not hex: {text!r}") from None
    if len(value) != 32:
        raise UsageError(f"--fingerprint: a SHA-256 fingerprint is 32 bytes, got {len(value)}")
    return value


def _seconds(option: str, maximum: float) -> Callable[[str], float]:
    """argparse type: seconds, finite, > 0 and <= maximum; else UsageError naming the option."""

    def convert(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        # NaN fails every comparison, inf the upper bound.
        if not 0 < value <= maximum:
            raise UsageError(f"{option}: expected seconds > 0 and <= {maximum:g}, got {text!r}")
        return value

    return convert


def _count(option: str, maximum: int) -> Callable[[str], int]:
    """argparse type: a whole number 1..maximum; else UsageError naming the option."""

    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = 0
        if not 1 <= value <= maximum:
            raise UsageError(f"{option}: expected a whole number from 1 to {maximum}, got {text!r}")
        return value

    return convert


def _handler(module: str, function: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        target: Callable[[argparse.Namespace], int] = getattr(
            importlib.import_module(f"est_agent.cli.{module}"), function
        )
        return target(args)

    return run


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-v", "--verbose", action="count", default=0, help="more detail (-vv: APDU headers)"
    )
    common.add_argument(
        "--log-format",
        choices=("text", "json"),
        default="text",
        help="log and progress lines on stderr as text or JSON lines (journald, fleet tools)",
    )
    return common


def _add_est_commands(commands: Any, common: argparse.ArgumentParser) -> None:
    """`cacerts` and `csrattrs`: diagnostics against an EST server (est_agent/cli/est.py)."""
    for name, text in (
        ("cacerts", "fetch and print the EST CA certificates (RFC 7030 §4.1)"),
        ("csrattrs", "show what the EST server asks CSRs to contain (RFC 7030 §4.5)"),
    ):
        est_cmd = commands.add_parser(name, parents=[common], help=text)
        est_cmd.add_argument("--server", required=True, help="EST server, e.g. https://host:8443")
        est_cmd.add_argument("--label", default="", help="EST CA label (path segment)")
        if name == "cacerts":
            # RFC 7030 §4.1.1: either an explicit trust anchor or a fingerprint-only bootstrap
            trust = est_cmd.add_mutually_exclusive_group(required=True)
            trust.add_argument("--trust-anchor", metavar="PEM", help="CA that signed the TLS cert")
            trust.add_argument(
                "--fingerprint",
                type=_fingerprint,
                metavar="HEX",
                help="SHA-256 of the EST CA root: fetch /cacerts provisionally, print the root"
                " that matches once the TLS server has verified to it (RFC 7030 §4.1.1)",
            )
        else:
            est_cmd.add_argument(
                "--trust-anchor", required=True, metavar="PEM", help="CA that signed the TLS cert"
            )
        est_cmd.add_argument(
            "--timeout",
            type=_seconds("--timeout", _MAX_TIMEOUT_S),
            default=30.0,
            metavar="SECONDS",
            help="per HTTP request (default 30)",
        )
        est_cmd.add_argument(
            "--attempts",
            type=_count("--attempts", _MAX_ATTEMPTS),
            default=3,
            help=f"tries on transient errors (1..{_MAX_ATTEMPTS}, default 3)",
        )
        est_cmd.add_argument(
            "--proxy",
            default="",
            metavar="URL|env",
            help="connect through this HTTP CONNECT proxy (http://[user@]host:port), or 'env'"
            " for https_proxy/HTTPS_PROXY unless NO_PROXY excludes the server (default: direct)",
        )
        est_cmd.add_argument(
            "--proxy-password-env",
            default="",
            metavar="VAR",
            help="the proxy user's password from this environment variable",
        )
        est_cmd.add_argument("--json", action="store_true", help="machine-readable output")
        est_cmd.set_defaults(func=_handler("est", name))


def _add_card_commands(commands: Any, common: argparse.ArgumentParser) -> None:
    """`card info`, `card random`, and `verify`/`dh`/`hkdf`: diagnostics against the card in a
    reader (cli/card.py)."""
    card = commands.add_parser("card", help="inspect the card in a reader")
    card_cmds = card.add_subparsers(dest="card_command", metavar="SUBCOMMAND", required=True)
    info = card_cmds.add_parser(
        "info", parents=[common], help="IoT SAFE applet info, object list and ICCID"
    )
    info.add_argument(
        "--reader",
        default=DEFAULT_READER,
        help="pcsc:[NAME] (default: first reader with a card), sim:STATE_FILE or modem:PORT",
    )
    info.add_argument(
        "--aid",
        action="append",
        default=None,
        metavar="HEX",
        help="IoT SAFE applet AID (repeatable; default A0000005590010)",
    )
    info.add_argument(
        "--iso-cla", action="store_true", help="send applet commands with CLA 0N instead of 8N"
    )
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.set_defaults(func=_handler("card", "info"))

    random = card_cmds.add_parser(
        "random",
        parents=[common],
        help="N bytes from the card's random number generator (IoT SAFE GET RANDOM)",
    )
    random.add_argument(
        "length",
        metavar="N",
        type=_count("N", _MAX_RANDOM_BYTES),
        help=f"how many bytes (1..{_MAX_RANDOM_BYTES})",
    )
    random.add_argument(
        "--hex", action="store_true", help="print them as hex and a newline instead of raw bytes"
    )
    _card_link_options(random)
    random.set_defaults(func=_handler("card", "random"))
    _add_card_crypto_commands(card_cmds, common)


def _card_link_options(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument(
        "--reader",
        default=DEFAULT_READER,
        help="pcsc:[NAME] (default: first reader with a card), sim:STATE_FILE or modem:PORT",
    )
    cmd.add_argument("--aid", metavar="HEX", help="IoT SAFE applet AID (default A0000005590010)")
    cmd.add_argument("--iso-cla", action="store_true", help="applet commands with CLA 0N")


_HASH_CHOICES = ("sha256", "sha384", "sha512")
_PRINTS_A_RESULT_HELP = (
    "The result is a secret: it is printed (stdout only, never logged) because you asked for "
    "it. Exit codes: 0 done; 64 bad option; 65 bad input data; 69 card unreachable; 76 the card "
    "refused (e.g. 6985: the key's usage does not allow it) or answered garbage; 77 an "
    "access condition (6982: a public key object that is not writable)."
)


def _add_card_crypto_commands(card_cmds: Any, common: argparse.ArgumentParser) -> None:
    """`card verify`, `card dh`, `card hkdf`: the applet's own cryptography (cli/card.py)."""
    verify = card_cmds.add_parser(
        "verify",
        parents=[common],
        help="check an ECDSA signature on the card (IoT SAFE VERIFY SIGNATURE)",
        description="Exit codes: 0 valid; 1 the signature does not verify; 64 bad option; "
        "65 bad input data; 69 card unreachable; 76 the card refused or answered garbage.",
    )
    verify.add_argument(
        "--key",
        required=True,
        metavar="URI",
        help="public key object on the card: iotsafe:public-key-id=HEX (or id=/label=)",
    )
    message = verify.add_mutually_exclusive_group(required=True)
    message.add_argument("--message", metavar="FILE", help="the signed message (hashed here)")
    message.add_argument("--message-hex", metavar="HEX", help="the signed message, as hex")
    message.add_argument("--digest-hex", metavar="HEX", help="its digest, as hex (see --hash)")
    verify.add_argument("--hash", choices=_HASH_CHOICES, default="sha256", help="default sha256")
    signature = verify.add_mutually_exclusive_group(required=True)
    signature.add_argument("--signature", metavar="FILE", help="DER or raw r||s (64 bytes)")
    signature.add_argument("--signature-hex", metavar="HEX", help="DER or raw r||s, as hex")
    _card_link_options(verify)
    verify.set_defaults(func=_handler("card", "verify"))

    dh = card_cmds.add_parser(
        "dh",
        parents=[common],
        help="ECDH on the card: PUT PUBLIC KEY of the peer, then COMPUTE DH; prints the shared "
        "x-coordinate as hex",
        description=_PRINTS_A_RESULT_HELP,
    )
    dh.add_argument(
        "--key",
        default="iotsafe:key-id=04",
        metavar="URI",
        help="key-agreement private key (default iotsafe:key-id=04, the SIM's ECDH slot)",
    )
    dh.add_argument(
        "--peer-slot",
        default="iotsafe:public-key-id=05",
        metavar="URI",
        help="writable public key object for the peer's key (default iotsafe:public-key-id=05)",
    )
    peer = dh.add_mutually_exclusive_group(required=True)
    peer.add_argument("--peer", metavar="FILE", help="peer public key, PEM or DER")
    peer.add_argument("--peer-hex", metavar="HEX", help="peer public key, a SEC 1 point as hex")
    dh.add_argument(
        "--generate",
        action="store_true",
        help="first generate a fresh key pair in --key (printed first: its public point, hex)",
    )
    _card_link_options(dh)
    dh.set_defaults(func=_handler("card", "dh"))

    hkdf = card_cmds.add_parser(
        "hkdf",
        parents=[common],
        help="RFC 5869 HKDF on the card over a secret-key object; prints hex",
        description=_PRINTS_A_RESULT_HELP,
    )
    hkdf.add_argument(
        "--secret",
        default="iotsafe:secret-id=01",
        metavar="URI",
        help="secret-key object (default iotsafe:secret-id=01, the SIM's PSK)",
    )
    hkdf.add_argument("--salt", default="", metavar="HEX", help="salt as hex (default none)")
    hkdf.add_argument("--info", metavar="HEX", help="info as hex (with --length: expand too)")
    hkdf.add_argument(
        "--length",
        type=_count("--length", 256),
        metavar="N",
        help="OKM bytes, 1..256 (with --info); without both: the PRK (HKDF-Extract)",
    )
    hkdf.add_argument("--hash", choices=_HASH_CHOICES, default="sha256", help="default sha256")
    _card_link_options(hkdf)
    hkdf.set_defaults(func=_handler("card", "hkdf"))


def _add_token_commands(commands: Any, common: argparse.ArgumentParser) -> None:
    """`token info`: what a PKCS#11 module shows (cli/token.py)."""
    token = commands.add_parser("token", help="inspect a PKCS#11 token (keys in an HSM/TPM)")
    token_cmds = token.add_subparsers(dest="token_command", metavar="SUBCOMMAND", required=True)
    info = token_cmds.add_parser(
        "info", parents=[common], help="slots, tokens, mechanisms and objects (no secrets)"
    )
    info.add_argument("--module", required=True, metavar="PATH", help="the PKCS#11 module (.so)")
    info.add_argument("--pin-file", metavar="FILE", help="log in with the user PIN in FILE")
    info.add_argument("--pin-env", metavar="VAR", help="log in with the user PIN in $VAR")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.set_defaults(func=_handler("token", "info"))


def _add_workflow_commands(commands: Any, common: argparse.ArgumentParser) -> None:
    workflow = [
        ("enroll", "first boot: obtain the operational certificate (no-op when one is valid)"),
        ("renew", "renew the certificate when due (or --force), rekeying in the other slot"),
        ("run", "what the timer calls: enroll if nothing is installed, else renew if due"),
        (
            "status",
            "reader, applet, both slots, active slot, next renewal, pending request, failed"
            " attempts and the next attempt time",
        ),
    ]
    timing = (
        "Renewal is due at renewal.threshold of the certificate's lifetime plus a fixed"
        " per-device offset of 0..renewal.jitter_s seconds derived from the certificate serial"
        " (nothing sleeps for it). After a failed renewal the next attempt waits until the time"
        " `status` shows (a run before it exits 0 without network); renew --force tries now."
    )
    for name, text in workflow:
        cmd = commands.add_parser(
            name,
            parents=[common],
            help=text,
            description=text,
            epilog=timing if name in ("renew", "run") else None,
        )
        cmd.add_argument(
            "--config",
            default="/etc/est-agent/est-agent.toml",
            help="configuration file (default /etc/est-agent/est-agent.toml)",
        )
        cmd.add_argument("--json", action="store_true", help="machine-readable output")
        if name == "renew":
            cmd.add_argument("--force", action="store_true", help="renew even if not due")
        cmd.set_defaults(func=_handler("workflow", name))


def _add_modem_options(serve: argparse.ArgumentParser) -> None:
    """`sim serve --modem-pty`: the emulated modem and its quirks (est_agent/sim/modem.py)."""
    modem = serve.add_argument_group("emulated cellular modem (3GPP TS 27.007 AT commands)")
    modem.add_argument(
        "--modem-pty",
        metavar="LINK",
        help="answer AT+CSIM/AT+CCHO/AT+CGLA on a new pty, symlinked at LINK (reader modem:LINK)",
    )
    modem.add_argument("--modem-echo", action="store_true", help="echo that ATE0 cannot stop")
    modem.add_argument(
        "--modem-urc", action="store_true", help="inject URCs (+CREG, RING, +QIND) into answers"
    )
    modem.add_argument("--modem-csim-only", action="store_true", help="no AT+CCHO/AT+CGLA/AT+CCHC")
    modem.add_argument(
        "--modem-no-csim-channels",
        action="store_true",
        help="AT+CSIM refuses logical channels (only AT+CCHO/AT+CGLA reach them)",
    )
    modem.add_argument(
        "--modem-slow-ms", type=float, default=0.0, metavar="MS", help="delay before every answer"
    )
    modem.add_argument(
        "--modem-hang-after", type=int, metavar="N", help="stop answering after N commands"
    )
    modem.add_argument(
        "--modem-lowercase-hex", action="store_true", help="answer hex in lowercase, unquoted"
    )
    modem.add_argument("--modem-imei", metavar="DIGITS", help="IMEI for AT+CGSN")


# The fault spec (est_agent/sim/faults.py documents it in full); kept here so that building
# the parser loads nothing of the virtual SIM.
_FAULTS_HELP = """\
faults (--fault SPEC, repeatable; --faults-file FILE: one SPEC per line, # comments, or JSON
a list of objects with the same keys): a SPEC is key=value words and flags, e.g.
  --fault ins=B9,sw=6A84              GENERATE KEY PAIR answers 6A84 (not executed)
  --fault "ins=2B nth=2 bad_signature" the 2nd signature does not verify
selectors (all optional): ins=HEX channel=N p1=HEX p2=HEX, and which matching command:
  nth=N (only the Nth), from=N (the Nth on), count=N (at most N times)
actions (one; delay_ms may also come alone or with another):
  sw=XXXX            answer this status word instead, command not executed
  truncate=N         answer only the first N bytes of the response (SW included)
  silence            never answer
  disconnect         drop the link instead of answering
  delay_ms=N         answer N ms late
  wrong_public_key   GENERATE KEY PAIR / READ PUBLIC KEY give another valid P-256 point
  bad_signature      COMPUTE SIGNATURE UPDATE gives a well-formed signature that fails
Faults also apply behind --modem-pty. In process: reader sim:STATE?faults=FILE.
"""


def _add_fault_options(serve: argparse.ArgumentParser) -> None:
    """`sim serve --fault/--faults-file`: the card misbehaves on demand (sim/faults.py)."""
    faults = serve.add_argument_group("faults on demand (see the end of this help)")
    faults.add_argument(
        "--fault",
        action="append",
        default=[],
        metavar="SPEC",
        help="a misbehaviour, e.g. ins=B9,sw=6A84 (repeatable; the first that fires wins)",
    )
    faults.add_argument(
        "--faults-file", metavar="FILE", help="faults, one SPEC per line (or JSON); after --fault"
    )


# The commands a device runs (`run` daily from its timer): cli/workflow.py, _add_workflow_commands.
_WORKFLOW_COMMANDS = frozenset({"enroll", "renew", "run", "status"})


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The whole command line; given the arguments to parse and a workflow command first, only
    what parses them: argparse hands everything after the command's name to that command's
    parser, so the other commands' parsers (~6 ms of building, every run) would go unused."""
    parser = argparse.ArgumentParser(
        prog="est-agent",
        description="EST enrollment with keys that never leave the SIM (GSMA IoT SAFE).",
    )
    parser.add_argument("--version", action="version", version=f"est-agent {__version__}")
    common = _common()
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    if argv and argv[0] in _WORKFLOW_COMMANDS:
        _add_workflow_commands(commands, common)
        return parser

    _add_card_commands(commands, common)

    csr = commands.add_parser(
        "csr", parents=[common], help="print a PEM CSR signed by a key inside the card"
    )
    csr.add_argument(
        "--reader", default=DEFAULT_READER, help="pcsc:[NAME], sim:STATE_FILE or modem:PORT"
    )
    csr.add_argument("--key", required=True, metavar="URI", help="e.g. iotsafe:key-id=02")
    csr.add_argument("--subject", required=True, help='RFC 4514 DN, e.g. "CN=dev-1,O=Acme"')
    csr.add_argument(
        "--san", action="append", metavar="TYPE:VALUE", help="dns:, ip: or uri: (repeatable)"
    )
    csr.add_argument(
        "--generate", action="store_true", help="first generate a fresh key pair in that slot"
    )
    csr.add_argument("--eku-client-auth", action="store_true", help="request EKU clientAuth")
    csr.add_argument("--aid", metavar="HEX", help="IoT SAFE applet AID (default A0000005590010)")
    csr.add_argument("--iso-cla", action="store_true", help="applet commands with CLA 0N")
    csr.set_defaults(func=_handler("csr", "csr"))

    sim = commands.add_parser("sim", help="the virtual IoT SAFE SIM (develop without hardware)")
    sim_cmds = sim.add_subparsers(dest="sim_command", metavar="SUBCOMMAND", required=True)
    init = sim_cmds.add_parser(
        "init", parents=[common], help="factory-personalize a new virtual SIM state file"
    )
    init.add_argument("state", help="state file to create")
    init.add_argument(
        "--bootstrap-ca",
        metavar="CERT",
        help="PEM CA certificate issuing the bootstrap certificate (default: self-signed)",
    )
    init.add_argument("--bootstrap-ca-key", metavar="KEY", help="PEM private key of --bootstrap-ca")
    init.add_argument("--iccid", help="18-20 digit ICCID (default: random test ICCID)")
    init.add_argument(
        "--psk",
        metavar="FILE",
        help="load secret key 01 (PSK for COMPUTE PRF/HKDF) with FILE's bytes, 1..128; "
        "never printed or logged (default: the object stays empty)",
    )
    init.add_argument("--force", action="store_true", help="overwrite an existing state file")
    init.add_argument("--json", action="store_true", help="machine-readable output")
    init.set_defaults(func=_handler("sim", "init"))

    serve = sim_cmds.add_parser(
        "serve",
        parents=[common],
        help="insert the virtual SIM into vsmartcard's vpcd reader (pcscd driver)",
        epilog=_FAULTS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument("state", help="state file made by 'sim init'")
    serve.add_argument(
        "--vpcd",
        default=None,
        metavar="HOST:PORT",
        help="where vpcd listens (default 127.0.0.1:35963; with --modem-pty only if given)",
    )
    serve.add_argument(
        "--t0", action="store_true", help="T=0 behaviour: data-returning commands answer 61xx"
    )
    serve.add_argument(
        "--no-implicit-channel",
        action="store_true",
        help="refuse (6881) a SELECT of the applet on a closed logical channel instead of "
        "opening it, as some cards do (default: open it, as Java Card does)",
    )
    serve.add_argument(
        "--latency-ms",
        type=float,
        default=0.0,
        help="added delay per APDU, to imitate a real SIM link",
    )
    serve.add_argument(
        "--keygen-ms",
        type=float,
        default=0.0,
        metavar="MS",
        help="card time of GENERATE KEY PAIR, on top of --latency-ms",
    )
    serve.add_argument(
        "--sign-ms",
        type=float,
        default=0.0,
        metavar="MS",
        help="card time of a signature (the last COMPUTE SIGNATURE UPDATE)",
    )
    serve.add_argument(
        "--trace", metavar="FILE", help="append a JSON line per APDU (no payloads) to FILE"
    )
    serve.add_argument(
        "--power-cut-after", type=int, metavar="N", help="drop the link after N APDUs (crash tests)"
    )
    _add_fault_options(serve)
    _add_modem_options(serve)
    serve.set_defaults(func=_handler("sim", "serve"))

    _add_workflow_commands(commands, common)
    _add_token_commands(commands, common)

    demo = commands.add_parser(
        "demo",
        parents=[common],
        help="the whole job on built-in defaults: test EST server + virtual SIM + enroll, "
        "status, renew --force, status",
    )
    demo.add_argument("--dir", help="keep the PKI, SIM state and config here (default: temporary)")
    demo.add_argument(
        "--pcsc", action="store_true", help="serve the SIM through a private pcscd + vpcd"
    )
    demo.add_argument(
        "--backend",
        choices=("iotsafe", "pkcs11"),
        default="iotsafe",
        help="where the keys live: the virtual SIM (default) or a SoftHSM2 PKCS#11 token",
    )
    demo.set_defaults(func=_handler("demo", "demo"))

    _add_est_commands(commands, common)
    return parser


def _configure_logging(verbosity: int, fmt: str) -> None:
    from est_agent.logs import configure_logging

    configure_logging(verbosity, "json" if fmt == "json" else "text")


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; ``argv=None`` (the console script, ``python -m est_agent``) means the
    process exits right after, which lets the interpreter skip collecting garbage at exit."""
    try:
        return _main(argv)
    finally:
        if argv is None:
            # Interpreter shutdown runs full garbage collections over every object left (~60k
            # after an enrollment: ~35 of a ~230 ms `est-agent enroll`). Frozen objects are
            # skipped; refcounting still frees the rest, and nothing relies on the collector at
            # exit: files, sockets and the card are closed explicitly, logging flushes in atexit.
            gc.freeze()


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser(sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on usage errors; sysexits says 64
        code = exc.code if isinstance(exc.code, int) else EX_USAGE
        return EX_USAGE if code == _ARGPARSE_USAGE_STATUS else code
    except UsageError as exc:  # a value argparse took apart but our type= refused
        _report(exc)
        return exit_code_for(exc)
    _configure_logging(getattr(args, "verbose", 0), getattr(args, "log_format", "text"))
    # The virtual SIM is a tool the CLI offers, not part of the runtime: its `sim:` reader scheme
    # is added here (transport.registry; loads nothing of the card model until one is opened).
    est_agent.sim.register()
    try:
        result: int = args.func(args)
        # Flushed here rather than at interpreter exit, so that a closed pipe is reported like
        # any other error instead of as "Exception ignored" (Python docs, signal module, "Note
        # on SIGPIPE").
        sys.stdout.flush()
        return result
    except BrokenPipeError as exc:
        if not _stdout_gone():
            # Some other pipe or socket: not the reader of our output leaving.
            log.exception("unexpected error (a bug: please report it with this traceback)")
            return EX_SOFTWARE
        _discard_stdout()
        error = OutputError(f"cannot write to standard output: {exc.strerror or 'Broken pipe'}")
        _report(error)
        return exit_code_for(error)
    except EstAgentError as exc:
        _report(exc)
        log.debug("details", exc_info=True)
        return exit_code_for(exc)
    except KeyboardInterrupt:
        return EX_INTERRUPTED
    except Exception:
        log.exception("unexpected error (a bug: please report it with this traceback)")
        return EX_SOFTWARE


def _report(exc: EstAgentError) -> None:
    # Nothing more can be said when stderr is gone too.
    with contextlib.suppress(OSError):
        print(f"est-agent: error: {exc} [{public_class_name(exc)}]", file=sys.stderr)


def public_class_name(exc: BaseException) -> str:
    """The first class in the exception's MRO whose name does not start with ``_``: what the
    README's exit-code table documents (est/client.py's ``_TransientError`` is shown as
    ``EstConnectionError``)."""
    for cls in type(exc).__mro__:
        if not cls.__name__.startswith("_"):
            return cls.__name__
    return "Exception"  # unreachable: BaseException is public


def _stdout_gone() -> bool:
    """Whether our standard output is a pipe or socket whose reader went away (POLLERR/POLLHUP,
    POSIX.1-2017 poll()), as opposed to an EPIPE from some other descriptor."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return False
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))


def _discard_stdout() -> None:
    """Point file descriptor 1 at /dev/null: the interpreter's final flush of what is still
    buffered then succeeds instead of raising BrokenPipeError a second time."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)
