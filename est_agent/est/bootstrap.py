"""Bootstrap distribution of the EST CA by fingerprint (RFC 7030 §4.1.1).

A device that ships with only a SHA-256 fingerprint of its EST CA's root (no explicit trust
anchor, RFC 7030 §3.6.1) gets the root from the server itself:

1. one server-only TLS connection whose server is not verified during the handshake
   (``ProvisionalTls``: TLS 1.2 minimum, (EC)DHE + AEAD under 1.2, the chain the server sent is
   recorded), carrying ``GET /cacerts`` and nothing else: no client certificate, no HTTP
   credentials, no CSR (the EST client refuses any other request on it);
2. the root in ``/cacerts`` whose SHA-256 fingerprint (over the whole DER certificate) equals
   the configured one is the out-of-band ("manual") authentication §4.1.1 asks for; no match
   refuses the bootstrap (``EstResponseError``, naming both fingerprints);
3. the chain the server presented on that connection must verify to that root with the policy
   of every verified connection (``verify_server_chain``: RFC 5280 path, the host name or
   address, RFC 6125 §6.4.4), else ``TlsVerificationError``: the peer that answered was not a
   server this root authenticates, and its /cacerts is not believed either.

Only then is the root a trust anchor; the caller (workflow/agent.py) enrolls on a new
connection verified against it. What an attacker on the path can do is make the bootstrap
fail: it cannot produce a root with the pinned fingerprint, nor a server certificate under it.
Every request is bounded as on the enrollment path (``EstClient``: per-request deadline,
response size cap, retries within the run's budget).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from cryptography import x509

from est_agent.certificates import sha256_fingerprint
from est_agent.errors import EstResponseError, TlsVerificationError
from est_agent.est.client import EstCaCerts, EstClient, RetryPolicy
from est_agent.est.tls import ProvisionalTls, verify_server_chain

if TYPE_CHECKING:
    from est_agent.est.messages import CaCerts
    from est_agent.est.proxy import HttpsProxy

__all__ = [
    "BootstrapAnchor",
    "fetch_bootstrap_anchor",
    "match_fingerprint",
    "verify_provisional_chains",
]


@dataclass(frozen=True)
class BootstrapAnchor:
    """The outcome of a bootstrap: the fingerprint-matched ``root``, the ``/cacerts`` answer it
    came in, and the chain the server presented (leaf first), verified to ``root``."""

    root: x509.Certificate
    cacerts: EstCaCerts
    server_chain: tuple[x509.Certificate, ...]


def match_fingerprint(roles: CaCerts, pin: bytes) -> x509.Certificate:
    """The root of ``/cacerts`` (self-signed, classified by est/messages.py) whose fingerprint is
    ``pin``; ``EstResponseError`` naming the pin and every root's fingerprint otherwise. Only a
    root qualifies: what a bootstrap yields is a trust anchor (RFC 5280 §6.1.1(d))."""
    for root in roles.roots:
        if sha256_fingerprint(root) == pin:
            return root
    offered = ", ".join(sha256_fingerprint(r).hex() for r in roles.roots)
    raise EstResponseError(
        f"no EST CA root from /cacerts matches est.cacerts_fingerprint {pin.hex()} (the server"
        f" offered {offered}): refusing it as a trust anchor (RFC 7030 §4.1.1)"
    )


def verify_provisional_chains(
    chains: Sequence[Sequence[x509.Certificate]], root: x509.Certificate, host: str
) -> tuple[x509.Certificate, ...]:
    """Every chain presented on the provisional connections (each carried a request of ours),
    verified to ``root`` for ``host`` with ``verify_server_chain``; returns the last one (the
    connection that delivered /cacerts). ``TlsVerificationError`` when one does not verify."""
    if not chains:
        raise TlsVerificationError(
            "no TLS server certificate was recorded on the provisional connection"
        )
    for chain in chains:
        try:
            verify_server_chain(chain, [root], host)
        except TlsVerificationError as exc:
            raise TlsVerificationError(
                f"{exc}; its certificate does not chain to the /cacerts root that matches"
                f" est.cacerts_fingerprint ({root.subject.rfc4514_string()}): not the server"
                " that root authenticates, so its /cacerts is not trusted either (RFC 7030"
                " §4.1.1)"
            ) from exc
    return tuple(chains[-1])


def fetch_bootstrap_anchor(
    base_url: str,
    *,
    fingerprint: bytes,
    label: str = "",
    timeout_s: float = 30.0,
    run_timeout_s: float | None = None,
    max_response_bytes: int = 1024 * 1024,
    retry: RetryPolicy | None = None,
    tls_max: str = "1.3",
    tls_server_name: str | None = None,
    proxy: HttpsProxy | None = None,
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> BootstrapAnchor:
    """Fetch ``/cacerts`` provisionally and return the root matching ``fingerprint`` once the
    server's certificate has verified to it (module docstring). Errors are the EST client's
    (``EstConnectionError`` unreachable, ``EstResponseError`` / ``EstRejectedError`` for the
    answer) and ``EstResponseError`` (no root matches) or ``TlsVerificationError`` (the
    server's certificate does not chain to the matched root)."""
    tls = ProvisionalTls(max_version=tls_max)
    with EstClient(
        base_url,
        trust_anchors=(),
        label=label,
        timeout_s=timeout_s,
        run_timeout_s=run_timeout_s,
        max_response_bytes=max_response_bytes,
        retry=retry or RetryPolicy(),
        tls_max=tls_max,
        tls_server_name=tls_server_name,
        proxy=proxy,
        server_only_tls=tls,
        clock=clock,
    ) as client:
        cacerts = client.cacerts()
    root = match_fingerprint(cacerts.roles, fingerprint)
    host = tls_server_name or urlsplit(base_url.strip()).hostname or ""
    chain = verify_provisional_chains(tls.chains.chains, root, host)
    return BootstrapAnchor(root, cacerts, chain)
