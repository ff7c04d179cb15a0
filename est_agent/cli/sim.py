"""`est-agent sim ...`: create and serve the virtual IoT SAFE SIM."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from est_agent.certificates import load_certificates
from est_agent.errors import InputError, UsageError
from est_agent.fileio import PEM_LIMIT_BYTES, read_bounded

if TYPE_CHECKING:
    from est_agent.sim.faults import FaultPlan
    from est_agent.sim.latency import CardTiming


def _read(path: str, option: str) -> bytes:
    return read_bounded(path, limit_bytes=PEM_LIMIT_BYTES, what=option, error=InputError)


def load_ca(cert_path: str, key_path: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert = load_certificates(_read(cert_path, "--bootstrap-ca"), f"--bootstrap-ca {cert_path}")[0]
    try:
        key = load_pem_private_key(_read(key_path, "--bootstrap-ca-key"), password=None)
    except (ValueError, TypeError):
        raise InputError(f"{key_path} is not an unencrypted PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise InputError(f"{key_path}: only EC CA keys are supported")
    if key.public_key().public_numbers() != cert.public_key().public_numbers():  # type: ignore[union-attr]
        raise InputError(f"{key_path} is not the private key of {cert_path}")
    return cert, key


def read_psk(path: str) -> bytes:
    """``--psk FILE``: the secret-key object's value, the file's bytes as they are (1..128).
    Neither its value nor its length is printed or logged: the report says "filled"."""
    from est_agent.sim.state import MAX_SECRET_BYTES

    data = read_bounded(path, limit_bytes=MAX_SECRET_BYTES, what="--psk", error=InputError)
    if not data:
        raise InputError(f"--psk {path}: the file is empty")
    return data


def init(args: argparse.Namespace) -> int:
    from est_agent.sim.personalize import personalize

    if bool(args.bootstrap_ca) != bool(args.bootstrap_ca_key):
        raise UsageError("--bootstrap-ca and --bootstrap-ca-key go together")
    ca = load_ca(args.bootstrap_ca, args.bootstrap_ca_key) if args.bootstrap_ca else None
    psk = read_psk(args.psk) if args.psk else b""
    report = personalize(
        Path(args.state), iccid=args.iccid, bootstrap_ca=ca, force=args.force, psk=psk
    )
    if args.json:
        cert = report.bootstrap_certificate
        print(
            json.dumps(
                {
                    "path": str(report.path),
                    "iccid": report.iccid,
                    "card_serial": report.card_serial.hex().upper(),
                    "atr": report.atr.hex().upper(),
                    "objects": list(report.objects),
                    "files": list(report.files),
                    "bootstrap_certificate": {
                        "subject": cert.subject.rfc4514_string(),
                        "issuer": cert.issuer.rfc4514_string(),
                        "not_after": cert.not_valid_after_utc.isoformat(),
                        "sha256": cert.fingerprint(hashes.SHA256()).hex(),
                    },
                },
                indent=2,
            )
        )
    else:
        print(report)
    return 0


def fault_plan(specs: list[str], faults_file: str | None) -> FaultPlan | None:
    """``--fault`` specs (a bad one is a usage error) then ``--faults-file`` (input data)."""
    from est_agent.sim.faults import FaultPlan

    try:
        plan = FaultPlan.parse(specs)
    except InputError as exc:
        raise UsageError(f"--fault: {exc}") from None
    if faults_file:
        plan = plan + FaultPlan.load(faults_file)
    return plan or None


def serve(args: argparse.Namespace) -> int:
    faults = fault_plan(args.fault, args.faults_file)
    if args.modem_pty:
        return _serve_modem(args, faults)
    from est_agent.sim.vpcd import run_sim_server

    host, sep, port = (args.vpcd or "127.0.0.1:35963").rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"--vpcd must be HOST:PORT, got {args.vpcd!r}")
    if args.latency_ms < 0:
        raise UsageError("--latency-ms must not be negative")
    if args.power_cut_after is not None and args.power_cut_after < 0:
        raise UsageError("--power-cut-after must not be negative")
    _card_timing(args)  # a bad value is a usage error before anything starts
    return run_sim_server(
        Path(args.state),
        f"{host or '127.0.0.1'}:{port}",
        t0_mode=args.t0,
        implicit_channel_open=not args.no_implicit_channel,
        latency_ms=args.latency_ms,
        trace_path=Path(args.trace) if args.trace else None,
        power_cut_after=args.power_cut_after,
        faults=faults,
        keygen_ms=args.keygen_ms,
        sign_ms=args.sign_ms,
    )


def _card_timing(args: argparse.Namespace) -> CardTiming:
    """``--latency-ms``/``--keygen-ms``/``--sign-ms``: the card's time (sim/latency.py)."""
    from est_agent.sim.latency import CardTiming

    for option, value in (("--keygen-ms", args.keygen_ms), ("--sign-ms", args.sign_ms)):
        if value < 0:
            raise UsageError(f"{option} must not be negative")
    return CardTiming(apdu_ms=args.latency_ms, keygen_ms=args.keygen_ms, sign_ms=args.sign_ms)


def _serve_modem(args: argparse.Namespace, faults: FaultPlan | None) -> int:
    from est_agent.sim.modem import DEFAULT_IMEI, ModemQuirks, run_modem_server

    quirks = ModemQuirks(
        echo=args.modem_echo,
        urc=args.modem_urc,
        csim_only=args.modem_csim_only,
        csim_basic_only=args.modem_no_csim_channels,
        slow_ms=args.modem_slow_ms,
        hang_after=args.modem_hang_after,
        lowercase_hex=args.modem_lowercase_hex,
        imei=args.modem_imei or DEFAULT_IMEI,
    )
    if args.latency_ms < 0:
        raise UsageError("--latency-ms must not be negative")
    return run_modem_server(
        Path(args.state),
        Path(args.modem_pty),
        quirks,
        t0_mode=args.t0,
        implicit_channel_open=not args.no_implicit_channel,
        vpcd=args.vpcd,
        faults=faults,
        timing=_card_timing(args),
    )
