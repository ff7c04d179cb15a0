"""`est-testserver`: argparse at the edge; `pki`, `serve` and `probe` subcommands."""

from __future__ import annotations

import argparse
import base64
import http.client
import signal
import ssl
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import FrameType
from typing import NoReturn
from urllib.parse import urlsplit

from est_agent.errors import (
    EX_OSERR,
    EX_UNHEALTHY,
    EX_USAGE,
    EstAgentError,
    UsageError,
    exit_code_for,
)
from est_agent.testserver.config import (
    AuthMode,
    CloseAfter,
    Fault,
    HttpScheme,
    ServerCertCa,
    ServerConfig,
    TlsMax,
    parse_label_profile,
)
from est_agent.testserver.issuer import CaProfile, Profile, parse_eku_names
from est_agent.testserver.pki import generate_dev_pki
from est_agent.testserver.server import EstTestServer, write_port_file
from est_agent.testserver.wire import (
    CsrAttrsKind,
    RetryAfterFormat,
    parse_duration,
    parse_listen,
)

__all__ = ["build_parser", "main"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # sysexits EX_USAGE, like the rest of the project, instead of argparse's 2.
        self.print_usage(sys.stderr)
        self.exit(EX_USAGE, f"{self.prog}: error: {message}\n")


def _duration(text: str) -> int:
    try:
        return parse_duration(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _outage(text: str) -> tuple[float, float]:
    after, sep, length = text.partition(":")
    if not sep:
        raise argparse.ArgumentTypeError(f"not AFTER:FOR: {text!r}")
    return float(_duration(after)), float(_duration(length))


def _listen(text: str) -> tuple[str, int]:
    try:
        return parse_listen(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _label(text: str) -> tuple[str, Profile]:
    try:
        return parse_label_profile(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _user_pass(text: str) -> tuple[str, str]:
    user, sep, password = text.partition(":")
    if not sep or not user:
        raise argparse.ArgumentTypeError("expected USER:PASS")
    return user, password


def _moment(text: str) -> datetime:
    """An ISO 8601 time with a zone (``2030-01-01T00:00:00+00:00`` or ``...Z``), or ``+DURATION``
    from now (``+90s``, ``+2h``)."""
    if text.startswith("+"):
        try:
            return datetime.now(UTC) + timedelta(seconds=parse_duration(text[1:]))
        except UsageError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {text!r}") from None
    if value.tzinfo is None:
        raise argparse.ArgumentTypeError(f"needs a time zone (e.g. {text}Z): {text!r}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError("must not be negative")
    return value


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def _add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pki", type=Path, required=True, help="directory made by `pki`")
    p.add_argument(
        "--listen",
        type=_listen,
        default=("127.0.0.1", 8443),
        metavar="HOST:PORT",
        help="address to bind (default 127.0.0.1:8443; port 0 = any free port)",
    )
    p.add_argument("--port-file", type=Path, help="write the bound port here once listening")
    p.add_argument("--tls-max", choices=[v.value for v in TlsMax], default="1.3")
    p.add_argument(
        "--server-cert-from",
        choices=[v.value for v in ServerCertCa],
        default=ServerCertCa.TLS_CA.value,
        help="CA of the TLS server certificate: tls-ca (server.pem) or est-ca (issued at start,"
        " for clients that bootstrap their trust anchor from /cacerts by fingerprint)",
    )
    p.add_argument(
        "--auth",
        choices=[v.value for v in AuthMode],
        default="cert",
        help="what simpleenroll demands (simplereenroll always needs the certificate)",
    )
    p.add_argument(
        "--basic",
        type=_user_pass,
        metavar="USER:PASS",
        help="the HTTP account (Basic, or Digest with --http-auth digest)",
    )
    p.add_argument(
        "--http-auth",
        choices=[v.value for v in HttpScheme],
        default="basic",
        help="how --auth asks for the account: Basic (RFC 7617) or Digest (RFC 7616)",
    )
    p.add_argument(
        "--digest-algorithms",
        default="MD5",
        metavar="ALGS",
        help="comma-separated, one challenge each in this order: MD5 (libest's), MD5-sess,"
        " SHA-256, SHA-256-sess",
    )
    p.add_argument(
        "--nonce-lifetime",
        type=_seconds,
        default=300.0,
        metavar="SECONDS",
        help="Digest nonces older than this are answered stale=true",
    )
    p.add_argument(
        "--pop",
        choices=["off", "required"],
        default="off",
        help="required: challengePassword = base64(tls-unique) under TLS 1.2, "
        "base64(tls-exporter) under TLS 1.3 (RFC 9266)",
    )
    p.add_argument(
        "--csrattrs",
        choices=[v.value for v in CsrAttrsKind],
        default="none",
        help="what /csrattrs asks for (libest-default: libest's example server, trailing NUL)",
    )
    p.add_argument(
        "--csrattrs-trailing-nul",
        action="store_true",
        help="end the /csrattrs body with one 00 byte, counted in Content-Length (as libest)",
    )
    p.add_argument("--validity", type=_duration, default=30 * 86400, metavar="DURATION")
    p.add_argument(
        "--eku",
        default="clientAuth",
        metavar="NAMES",
        help="comma-separated EKUs of the default profile, or none",
    )
    p.add_argument(
        "--label",
        type=_label,
        action="append",
        default=[],
        metavar="NAME=DURATION[,EKU...]",
        help="add a CA profile reachable as /.well-known/est/NAME/...",
    )
    p.add_argument("--manual-approval", type=_seconds, metavar="SECONDS")
    p.add_argument(
        "--rollover-at",
        type=_moment,
        metavar="TIME",
        help="CA root key rollover (RFC 7030 §4.1.3): serve the four rollover certificates, and"
        " from TIME (ISO 8601 or +DURATION) issue from the new root and present a TLS chain to it",
    )
    p.add_argument(
        "--rollover-announce-at",
        type=_moment,
        metavar="TIME",
        help="with --rollover-at: serve only the old root before TIME",
    )
    p.add_argument(
        "--retry-after-format", choices=[v.value for v in RetryAfterFormat], default="seconds"
    )
    p.add_argument("--max-concurrent", type=_positive_int, metavar="N")
    p.add_argument("--busy-retry-after", type=_duration, default=1, metavar="DURATION")
    p.add_argument(
        "--busy-retry-jitter",
        type=_duration,
        default=0,
        metavar="DURATION",
        help="add a random 0..DURATION to each busy or outage Retry-After (spreads retries)",
    )
    p.add_argument(
        "--busy-status",
        type=int,
        choices=(202, 503),
        default=503,
        help="answer to an enrollment over --max-concurrent (202: accepted, retry later)",
    )
    p.add_argument(
        "--outage",
        type=_outage,
        metavar="AFTER:FOR",
        help="CA outage: answer every request 503 from AFTER for FOR (durations, from start)",
    )
    p.add_argument(
        "--outage-file",
        type=Path,
        metavar="FILE",
        help="CA outage while FILE exists: every request is answered 503 + Retry-After",
    )
    p.add_argument("--outage-retry-after", type=_duration, default=60, metavar="DURATION")
    p.add_argument(
        "--request-log",
        type=Path,
        metavar="FILE",
        help="append one JSON line per answered request (time, path, status, in flight)",
    )
    p.add_argument(
        "--unwrapped-base64",
        action="store_true",
        help="one base64 line per response (strongSwan's pki --est needs this)",
    )
    p.add_argument("--fault", choices=[v.value for v in Fault])
    p.add_argument("--fault-times", type=int, default=0, metavar="N", help="0 = always")
    p.add_argument(
        "--fault-ops",
        default="simpleenroll,simplereenroll",
        metavar="OPS",
        help="comma-separated operations the fault applies to",
    )
    p.add_argument(
        "--close-after",
        choices=[v.value for v in CloseAfter],
        help="close the connection after every 401 / every non-200 answer without saying so"
        " (no Connection: close), as libest does",
    )
    p.add_argument("--slow-body", type=_seconds, default=5.0, metavar="SECONDS")
    p.add_argument("--response-delay", type=_seconds, default=0.0, metavar="SECONDS")
    p.add_argument("--issuance-log", type=Path, metavar="FILE", help="JSON lines, appended")
    p.add_argument("--quiet", action="store_true", help="no per-request lines on stderr")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="est-testserver", description="RFC 7030 EST test server")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    pki = sub.add_parser("pki", help="generate the development PKI into DIR")
    pki.add_argument("directory", type=Path, metavar="DIR")
    pki.add_argument("--force", action="store_true", help="overwrite existing files")
    pki.add_argument(
        "--ca-profile",
        choices=[v.value for v in CaProfile],
        default=CaProfile.RFC5280.value,
        help="CA certificate extensions: rfc5280, or libest (non-critical basicConstraints, "
        "no keyUsage, as libest's example CA)",
    )
    serve = sub.add_parser("serve", help="run the EST server")
    _add_serve_arguments(serve)
    probe = sub.add_parser("probe", help="health check: GET BASE_URL/cacerts over TLS")
    probe.add_argument(
        "url", metavar="BASE_URL", help="e.g. https://localhost:8443/.well-known/est"
    )
    probe.add_argument("--cacert", type=Path, required=True, help="TLS trust anchor (tls-ca.pem)")
    probe.add_argument("--timeout", type=_seconds, default=5.0)
    return parser


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    host, port = args.listen
    try:
        ekus = parse_eku_names(args.eku.split(","))
    except UsageError as exc:
        raise UsageError(f"--eku: {exc}") from None
    return ServerConfig(
        pki_dir=args.pki,
        host=host,
        port=port,
        tls_max=TlsMax(args.tls_max),
        auth=AuthMode(args.auth),
        basic=args.basic,
        server_cert_ca=ServerCertCa(args.server_cert_from),
        http_scheme=HttpScheme(args.http_auth),
        digest_algorithms=tuple(a for a in args.digest_algorithms.split(",") if a),
        digest_nonce_lifetime_s=args.nonce_lifetime,
        pop_required=args.pop == "required",
        csrattrs=CsrAttrsKind(args.csrattrs),
        csrattrs_trailing_nul=args.csrattrs_trailing_nul,
        default_profile=Profile(validity_s=args.validity, ekus=ekus),
        labels=dict(args.label),
        manual_approval_s=args.manual_approval,
        retry_after_format=RetryAfterFormat(args.retry_after_format),
        max_concurrent=args.max_concurrent,
        busy_retry_after_s=args.busy_retry_after,
        busy_retry_jitter_s=args.busy_retry_jitter,
        busy_status=args.busy_status,
        outage=args.outage,
        outage_file=args.outage_file,
        outage_retry_after_s=args.outage_retry_after,
        request_log=args.request_log,
        wrap_base64=not args.unwrapped_base64,
        fault=Fault(args.fault) if args.fault else None,
        fault_times=args.fault_times,
        close_after=CloseAfter(args.close_after) if args.close_after else None,
        fault_operations=frozenset(op for op in args.fault_ops.split(",") if op),
        slow_body_s=args.slow_body,
        response_delay_s=args.response_delay,
        issuance_log=args.issuance_log,
        port_file=args.port_file,
        rollover_at=args.rollover_at,
        rollover_announce_at=args.rollover_announce_at,
    )


def _serve(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    server = EstTestServer(config)
    if args.quiet:
        server.quiet()

    def stop(signum: int, frame: FrameType | None) -> None:
        server.request_stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if config.port_file is not None:
        write_port_file(config.port_file, server.port)
    # The ready line: tests and humans learn the real port from it (`--listen ...:0`).
    print(f"est-testserver: listening on {server.url}", flush=True)
    try:
        server.serve_forever()
    finally:
        server.close()
    return 0


def _probe(args: argparse.Namespace) -> int:
    parts = urlsplit(args.url.rstrip("/"))
    if parts.scheme != "https" or not parts.hostname:
        print(f"est-testserver probe: not an https URL: {args.url}", file=sys.stderr)
        return EX_USAGE
    ctx = ssl.create_default_context(cafile=str(args.cacert))
    conn = http.client.HTTPSConnection(
        parts.hostname, parts.port or 443, context=ctx, timeout=args.timeout
    )
    try:
        conn.request("GET", f"{parts.path}/cacerts")
        response = conn.getresponse()
        body = response.read()
        base64.b64decode(body.translate(None, b" \t\r\n"), validate=True)
    except (OSError, http.client.HTTPException, ValueError) as exc:
        print(f"est-testserver probe: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EX_UNHEALTHY
    finally:
        conn.close()
    if response.status != 200:
        print(f"est-testserver probe: HTTP {response.status}", file=sys.stderr)
        return EX_UNHEALTHY
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "pki":
            profile = CaProfile(args.ca_profile)
            for path in generate_dev_pki(args.directory, force=args.force, ca_profile=profile):
                print(path)
            return 0
        if args.command == "serve":
            return _serve(args)
        return _probe(args)
    except EstAgentError as exc:
        print(f"est-testserver: {exc}", file=sys.stderr)
        return exit_code_for(exc)
    except OSError as exc:  # cannot bind, cannot write the PKI, unreadable key file ...
        print(f"est-testserver: {exc}", file=sys.stderr)
        return EX_OSERR


if __name__ == "__main__":
    sys.exit(main())
