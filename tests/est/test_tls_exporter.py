"""The agent's tls-exporter (RFC 9266) against an independent TLS stack: ``openssl s_server``.

Issue 11 item 6: tlslite-ng 0.8.2 derives exporter_master_secret from a transcript that already
holds the client's Certificate and CertificateVerify; RFC 8446 §7.1 derives it from
ClientHello...server Finished. The adapter derives it itself. ``openssl s_server
-keymatexport EXPORTER-Channel-Binding -keymatexportlen 32`` prints OpenSSL's value for the
connection; the agent's must be the same with client authentication required (the card signs
CertificateVerify), requested but not answered (an empty client Certificate) and not requested,
for each TLS 1.3 suite (SHA-256 and SHA-384 key schedules).
"""

from __future__ import annotations

import contextlib
import socket
import time
from pathlib import Path

import pytest

from est_agent.est.tls import TlsliteTls, tlslite_adapter
from est_agent.est.tls.policy import TLS_EXPORTER_LABEL, TLS_EXPORTER_LENGTH
from est_agent.testserver import DevPki
from tests.est.card_helpers import SimCard
from tests.est.openssl_server import CLIENT_AUTH, OpenSslServer, s_server

pytestmark = pytest.mark.integration

SUITES = ["TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256"]


def _exporters(server: OpenSslServer, config: TlsliteTls) -> tuple[bytes, bytes]:
    """(the agent's tls-exporter, tlslite-ng's own keyingMaterialExporter) of one connection."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        connection = tlslite_adapter.handshake(
            sock, config, "localhost", card_time=contextlib.nullcontext
        )
        assert connection.ssl_object.version() == "TLSv1.3"
        ours = connection.ssl_object.export_keying_material(TLS_EXPORTER_LABEL, TLS_EXPORTER_LENGTH)
        tlslites = bytes(
            connection._connection.keyingMaterialExporter(
                bytearray(TLS_EXPORTER_LABEL), TLS_EXPORTER_LENGTH
            )
        )
        connection.sendall(b"bye\n")
        connection.close()
    return ours, tlslites


@pytest.mark.parametrize("auth", list(CLIENT_AUTH))
@pytest.mark.parametrize("suite", SUITES)
def test_tls_exporter_equals_openssls(
    dev_pki: DevPki, sim: SimCard, tmp_path: Path, suite: str, auth: str
) -> None:
    started = time.monotonic()
    config = (
        TlsliteTls((dev_pki.tls_ca_certificate,), (sim.bootstrap_cert,), sim.bootstrap)
        if auth == "required"
        else TlsliteTls((dev_pki.tls_ca_certificate,))
    )
    exporter = ["-keymatexport", TLS_EXPORTER_LABEL.decode()]
    exporter += ["-keymatexportlen", str(TLS_EXPORTER_LENGTH)]
    with s_server(dev_pki, tmp_path, suite, auth, exporter) as server:
        ours, tlslites = _exporters(server, config)
    openssl = server.keying_material()
    print(f"{suite} client auth {auth}: openssl {openssl.hex()} agent {ours.hex()}")
    assert len(openssl) == 32
    assert ours == openssl
    assert sim.bootstrap.signatures == (1 if auth == "required" else 0)
    # The canary on tlslite-ng itself: its exporter is right only while no client Certificate
    # entered its transcript (RFC 8446 §7.1); when it agrees with OpenSSL under client
    # authentication too, tlslite-ng was fixed and the adapter's own derivation may go.
    if auth == "none":
        assert tlslites == openssl
    else:
        assert tlslites != openssl, "tlslite-ng now derives the RFC 8446 §7.1 exporter secret"
    assert time.monotonic() - started < 15
