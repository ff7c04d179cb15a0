"""The trust anchor is trust-anchor information, not a certificate to validate (RFC 5280 §6.1.1).

Issue 11 item 5: libest's example CA (basicConstraints not critical, no keyUsage) was refused
as the configured anchor because the web-PKI CA profile was applied to the anchor itself; curl
and ``openssl verify`` accept it. Each CA shape (tests/est/anchors.py) is served by a real
OpenSSL server on 127.0.0.1 and fetched over both TLS paths (tlslite with the virtual SIM's
key; the stdlib ``ssl`` path, server-only); ``openssl verify`` gives its verdict on the same
files, with and without ``-x509_strict``. The verdicts are fixed below from RFC 5280: an
anchor's form is not checked, what it says about itself is; intermediates keep the profile.
"""

from __future__ import annotations

import re
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509

from est_agent.errors import TlsVerificationError
from est_agent.est.client import EstClient, RetryPolicy
from est_agent.testserver import DevPki
from tests.est import hostile_tls as hostile
from tests.est.anchors import CASES, SHAPES, Case, chain_for, write_key, write_pem
from tests.est.card_helpers import SimCard

pytestmark = pytest.mark.integration


@dataclass
class Served:
    url: str
    anchor: x509.Certificate
    files: dict[str, Path]


@pytest.fixture
def serve(dev_pki: DevPki, tmp_path: Path) -> Iterator[Callable[[Case], Served]]:
    servers: list[hostile.SslHttpServer] = []

    def start(case: Case) -> Served:
        server_cred, chain, anchor = chain_for(
            anchor=SHAPES[case.anchor],
            intermediate=SHAPES[case.intermediate] if case.intermediate else None,
        )
        files = {
            "anchor": write_pem(tmp_path / "anchor.pem", anchor),
            "leaf": write_pem(tmp_path / "leaf.pem", chain[0]),
            "untrusted": write_pem(tmp_path / "untrusted.pem", *chain[1:]),
            "chain": write_pem(tmp_path / "chain.pem", *chain),
            "key": write_key(tmp_path / "server.key", server_cred.key),
        }
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(files["chain"], files["key"])  # the leaf and its intermediate
        ctx.verify_mode = ssl.CERT_OPTIONAL  # ask for the SIM's certificate: the card signs
        ctx.load_verify_locations(cadata=hostile.pem(dev_pki.bootstrap_ca.certificate))
        ctx.num_tickets = 0
        server = hostile.SslHttpServer(
            context=ctx, mode="answer", answer=hostile.cacerts_response(dev_pki)
        )
        servers.append(server)
        server.start()
        return Served(server.url, anchor, files)

    yield start
    for server in servers:
        server.close()


def _openssl_verify(files: dict[str, Path], *, strict: bool) -> bool:
    argv = ["openssl", "verify", "-partial_chain", "-purpose", "sslserver"]
    argv += ["-x509_strict"] if strict else []
    argv += ["-CAfile", str(files["anchor"])]
    if files["untrusted"].read_bytes():
        argv += ["-untrusted", str(files["untrusted"])]
    done = subprocess.run([*argv, str(files["leaf"])], capture_output=True, timeout=30, check=False)
    return done.returncode == 0


def _fetch(served: Served, sim: SimCard | None) -> None:
    retry = RetryPolicy(attempts=1, sleep=lambda _s: None)
    if sim is None:  # the stdlib path
        client = EstClient(served.url, trust_anchors=[served.anchor], retry=retry, timeout_s=10)
    else:
        client = EstClient(
            served.url,
            trust_anchors=[served.anchor],
            client_cert_chain=[sim.bootstrap_cert],
            signer=sim.bootstrap,
            retry=retry,
            timeout_s=10,
        )
    with client:
        client.cacerts()


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_anchor_and_intermediate_profiles_on_both_tls_paths(
    serve: Callable[[Case], Served],
    sim: SimCard,
    case: Case,
) -> None:
    started = time.monotonic()
    served = serve(case)
    assert _openssl_verify(served.files, strict=False) is case.openssl
    assert _openssl_verify(served.files, strict=True) is case.openssl_strict
    for path in ("tlslite", "stdlib"):
        card = sim if path == "tlslite" else None
        apdus = sim.transport.stats.apdus
        if case.accepted:
            _fetch(served, card)
            continue
        with pytest.raises(TlsVerificationError) as info:
            _fetch(served, card)
        assert info.value.exit_code == 76
        if path == "tlslite" or case.openssl:  # else OpenSSL's own words refused it first
            assert case.refusal, "a refusal names its reason"
            assert re.search(case.refusal, str(info.value)), str(info.value)
        assert "ValueError" not in str(info.value)  # what happened, not which class
        assert sim.transport.stats.apdus == apdus  # the card never signed for it
    # one handshake signature for each accepted tlslite fetch, none for a refused one
    assert sim.bootstrap.signatures == (1 if case.accepted else 0)
    assert time.monotonic() - started < 20
