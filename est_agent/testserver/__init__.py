"""RFC 7030 EST test server with a development PKI and fault switches (`est-testserver`).

Test-only: no core module of est_agent imports this package, and it does not import the
agent's EST client, so that a misunderstanding shared by both sides is less likely to pass.
"""

from __future__ import annotations

from est_agent.testserver.config import AuthMode, Fault, ServerCertCa, ServerConfig, TlsMax
from est_agent.testserver.issuer import Profile
from est_agent.testserver.pki import DevPki, generate_dev_pki, load_dev_pki
from est_agent.testserver.server import EstTestServer
from est_agent.testserver.wire import CsrAttrsKind, HttpRefusal, RetryAfterFormat

__all__ = [
    "AuthMode",
    "CsrAttrsKind",
    "DevPki",
    "EstTestServer",
    "Fault",
    "HttpRefusal",
    "Profile",
    "RetryAfterFormat",
    "ServerCertCa",
    "ServerConfig",
    "TlsMax",
    "generate_dev_pki",
    "load_dev_pki",
]
