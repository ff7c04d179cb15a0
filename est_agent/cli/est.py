"""`est-agent cacerts` / `est-agent csrattrs`: diagnostics against an EST server (RFC 7030).

Both use server-only TLS (stdlib ``ssl``) verified against the given trust anchor: they never
touch the card and never send credentials. ``cacerts --fingerprint`` instead fetches /cacerts on
a provisional connection (RFC 7030 §4.1.1, est/bootstrap.py) and prints the root that matches
the fingerprint, once the TLS server's chain has verified to it: what a fingerprint-only device
would take as its trust anchor.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from est_agent.certificates import load_certificates
from est_agent.errors import InputError, UsageError
from est_agent.est.client import EstCaCerts, EstClient, RetryPolicy
from est_agent.est.proxy import (
    HttpsProxy,
    environment_proxy,
    parse_proxy_url,
    proxy_with_password,
)
from est_agent.fileio import PEM_LIMIT_BYTES, read_bounded


def _anchors(path: str) -> list[x509.Certificate]:
    data = read_bounded(path, limit_bytes=PEM_LIMIT_BYTES, what="--trust-anchor", error=InputError)
    return load_certificates(data, f"--trust-anchor {path}")


def _proxy(args: argparse.Namespace) -> HttpsProxy | None:
    """``--proxy``: an HTTP CONNECT proxy (RFC 9110 §9.3.6) as the configuration's
    ``est.proxy`` takes it: ``http://[user@]host:port``, or ``env`` for ``https_proxy`` /
    ``HTTPS_PROXY`` unless ``NO_PROXY`` excludes the server. A password never on the command
    line (other users see it in the process list): ``--proxy-password-env``, or in the
    variable's URL with ``env``."""
    text = args.proxy
    if not text:
        return None
    if text == "env":
        target = urlsplit(args.server.strip())
        found = environment_proxy(os.environ, target.hostname or "", target.port or 443)
        if found is None:
            return None
        source, value = found
        url = parse_proxy_url(value, assume_http=True)
    else:
        source, url = "--proxy", parse_proxy_url(text)
        if url.password is not None:
            raise UsageError("--proxy: a password in the URL is refused; use --proxy-password-env")
    password = None
    if args.proxy_password_env:
        password = os.environ.get(args.proxy_password_env)
        if password is None:
            raise UsageError(f"--proxy-password-env: {args.proxy_password_env} is not set")
    try:
        return proxy_with_password(
            url, password, source=source, setting="--proxy-password-env"
        )
    except InputError as exc:
        raise UsageError(f"{source}: {exc}") from None


def _client(args: argparse.Namespace) -> EstClient:
    return EstClient(
        args.server,
        trust_anchors=_anchors(args.trust_anchor),
        label=args.label or "",
        timeout_s=args.timeout,
        retry=RetryPolicy(attempts=args.attempts),
        proxy=_proxy(args),
    )


def _roles(ca: EstCaCerts) -> dict[bytes, str]:
    roles = ca.roles
    named = {
        "new-root": roles.new_root,
        "new-with-old": roles.new_with_old,
        "old-with-new": roles.old_with_new,
    }
    result = {c.fingerprint(hashes.SHA256()): "intermediate" for c in roles.intermediates}
    result.update({c.fingerprint(hashes.SHA256()): "root" for c in roles.roots})
    result.update({c.fingerprint(hashes.SHA256()): n for n, c in named.items() if c is not None})
    result[roles.anchor.fingerprint(hashes.SHA256())] = "anchor"
    return result


def _describe(cert: x509.Certificate, role: str) -> dict[str, Any]:
    return {
        "role": role,
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "serial": f"{cert.serial_number:x}",
        "not_before": cert.not_valid_before_utc.isoformat(),
        "not_after": cert.not_valid_after_utc.isoformat(),
        "sha256": cert.fingerprint(hashes.SHA256()).hex(),
        "pem": cert.public_bytes(serialization.Encoding.PEM).decode("ascii"),
    }


def cacerts(args: argparse.Namespace) -> int:
    if args.fingerprint is not None:
        from est_agent.est.bootstrap import fetch_bootstrap_anchor

        bootstrap = fetch_bootstrap_anchor(
            args.server,
            fingerprint=args.fingerprint,
            label=args.label or "",
            timeout_s=args.timeout,
            retry=RetryPolicy(attempts=args.attempts),
            proxy=_proxy(args),
        )
        # the one certificate a fingerprint-only device takes as its trust anchor
        described = [_describe(bootstrap.root, "anchor")]
    else:
        with _client(args) as client:
            ca = client.cacerts()
        roles = _roles(ca)
        described = [
            _describe(c, roles.get(c.fingerprint(hashes.SHA256()), "other"))
            for c in ca.certificates
        ]
    if args.json:
        print(json.dumps({"server": args.server, "label": args.label, "certificates": described}))
        return 0
    for item in described:
        # Text before BEGIN is ignored by PEM readers (openssl, cryptography): the output
        # stays usable as a CA bundle.
        print(f"# {item['role']}: {item['subject']} (until {item['not_after'][:10]})")
        print(item["pem"], end="")
    return 0


def csrattrs(args: argparse.Namespace) -> int:
    with _client(args) as client:
        attrs = client.csrattrs()
    if attrs is None or attrs.empty:
        if args.json:
            print(json.dumps({"server": args.server, "label": args.label, "requested": None}))
        else:
            print("the server asks for nothing (RFC 7030 §4.5.2)")
        return 0
    summary = {
        "challenge_password": attrs.challenge_password,
        "oids": list(attrs.oids),
        "attributes": sorted(attrs.attributes),
        "hash_oids": list(attrs.hash_oids),
        "key_algorithms": {k: list(v) for k, v in attrs.key_algorithms.items()},
        "extension_requests": list(attrs.extension_requests),
        "unknown_items": len(attrs.unknown),
    }
    if args.json:
        print(json.dumps({"server": args.server, "label": args.label, "requested": summary}))
        return 0
    for key, value in summary.items():
        print(f"{key:20} {value}")
    return 0
