"""TLS for the EST client: an httpx transport whose client authentication can sign on the card.

Laid out along httpx's lines, one direction of imports (each uses only those above it):

* ``policy``: what is accepted and offered, pure: versions, suites, the server-chain check
  (``verify_server_chain``, whose CA profile exempts the configured trust anchor, RFC 5280
  §6.1.1), which alerts mean "certificate refused", the channel binding.
* ``keyschedule``: the TLS 1.3 exporter (RFC 8446 §7.1, §7.5), pure: tls-exporter is derived
  here, not by tlslite-ng (whose 0.8.2 transcript is wrong for it under client authentication).
* ``config``: the two configurations, ``TlsliteTls`` (tlslite-ng runs the handshake, so the
  client's CertificateVerify can be signed by a ``Signer``: the SIM's key) and ``StdlibTls``
  (the stdlib ``ssl`` module, server-only authentication). Same anchors, same check: the
  stdlib path runs ``verify_server_chain`` on the server's chain after OpenSSL's own;
  ``ProvisionalTls`` (RFC 7030 §4.1.1 bootstrap) is the stdlib path with the check deferred:
  the chain is recorded, to be verified once /cacerts has yielded the fingerprint's root.
* ``tlslite_adapter``: everything that touches tlslite-ng, its private internals included
  (listed in its docstring, watched by tests/est/test_tlslite_canary.py). tlslite does not
  verify the server at all, so the adapter checks the server's chain as soon as its
  Certificate message is parsed and aborts with ``bad_certificate`` before the card is ever
  asked to sign: the card never signs for an unauthenticated peer (RFC 7030 §3.3.1, §3.6.1).
* ``backend``: the httpcore network backend and its streams (TCP, tlslite, stdlib), the
  per-request ``Deadline`` (frozen while the card signs) and the failure wording.
* ``transport``: ``EstTransport`` (httpx), one keep-alive connection, ``pinned()``, the
  mapping of httpcore's exceptions.

Both paths: TLS 1.2 minimum (RFC 8996, RFC 7030 §3.3.1), 1.3 allowed; under TLS 1.2 only
(EC)DHE suites, whose server signs its key exchange (checked before our CertificateVerify is
made): static RSA would let a server that merely copied the real certificate collect a card
signature (RFC 9325 §4.1). The binding of the live connection is tls-unique (RFC 5929) under
TLS 1.2 and tls-exporter (RFC 9266) under TLS 1.3 (tlslite path only).

Errors leave the package typed: ``TlsVerificationError`` (server not authenticated, handshake
failed), ``AuthError`` (the server refused our client certificate with a certificate alert),
``EstConnectionError`` (unreachable, a close or reset without an alert, deadline), always
chained with ``from``; messages say what happened, never which class. Heavy imports (tlslite,
cryptography's verifier) happen when a connection is first made.
"""

from __future__ import annotations

from est_agent.est.tls.backend import ConnectionChangedError, Deadline, DeadlineExceeded
from est_agent.est.tls.config import ProvisionalTls, ServerChains, StdlibTls, TlsliteTls
from est_agent.est.tls.policy import ChannelBinding, verify_server_chain
from est_agent.est.tls.transport import EstTransport

__all__ = [
    "ChannelBinding",
    "ConnectionChangedError",
    "Deadline",
    "DeadlineExceeded",
    "EstTransport",
    "ProvisionalTls",
    "ServerChains",
    "StdlibTls",
    "TlsliteTls",
    "verify_server_chain",
]
