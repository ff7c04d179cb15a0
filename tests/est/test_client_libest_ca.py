"""Enrolling against CAs made like libest's example CA (`est-testserver pki --ca-profile libest`).

libest's example CA (example/server/estExampleCA.cnf, section v3_ca) has a non-critical
basicConstraints and no keyUsage. As the TLS trust anchor and as the EST CA of /cacerts it is
trust-anchor information (RFC 5280 §6.1.1): the agent enrolls through it, as curl and
``openssl verify`` accept it. An *intermediate* with the same defects stays refused: on the
tlslite path before the card signs, on the stdlib path before a byte of HTTP, and in the
chain of an issued certificate.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from est_agent.cli.main import main
from est_agent.errors import EstResponseError, TlsVerificationError
from est_agent.est.client import EstClient, RetryPolicy
from est_agent.testserver import DevPki, EstTestServer, TlsMax
from est_agent.testserver.issuer import CaProfile, CertificateAuthority, Profile, make_ca
from est_agent.testserver.pki import generate_dev_pki, issue_server_certificate, load_dev_pki
from tests.est.anchors import write_key, write_pem
from tests.est.card_helpers import (
    OP_KEY_A,
    OP_KEY_B,
    SimCard,
    build_csr,
    personalized_sim,
    raw_subject_and_san,
    sim_from,
)

pytestmark = pytest.mark.integration

StartOn = Callable[..., EstTestServer]


@pytest.fixture(scope="module")
def libest_pki(tmp_path_factory: pytest.TempPathFactory) -> DevPki:
    directory = tmp_path_factory.mktemp("libest-pki")
    generate_dev_pki(directory, ca_profile=CaProfile.LIBEST)
    return load_dev_pki(directory)


@pytest.fixture(scope="module")
def libest_sim_template(tmp_path_factory: pytest.TempPathFactory, libest_pki: DevPki) -> bytes:
    return personalized_sim(tmp_path_factory.mktemp("libest-sim"), libest_pki)


@pytest.fixture
def libest_sim(tmp_path: Path, libest_sim_template: bytes) -> Iterator[SimCard]:
    with sim_from(tmp_path, libest_sim_template) as card:
        yield card


@pytest.fixture
def start_on(start_server: Callable[..., EstTestServer]) -> StartOn:
    """Start an in-process test server on 127.0.0.1 and a free port over the given PKI."""
    return lambda pki, **settings: start_server(pki=pki, **settings)


def _base(server: EstTestServer) -> str:
    return server.url.removesuffix("/.well-known/est")


def _card_client(server: EstTestServer, pki: DevPki, card: SimCard, **options: Any) -> EstClient:
    options.setdefault("retry", RetryPolicy(attempts=1, sleep=lambda _s: None))
    options.setdefault("timeout_s", 10.0)
    cert = options.pop("cert", card.bootstrap_cert)
    signer = options.pop("signer", card.bootstrap)
    return EstClient(
        _base(server),
        trust_anchors=[pki.tls_ca_certificate],
        client_cert_chain=[cert],
        signer=signer,
        **options,
    )


def test_libest_profile_cas_have_libest_extensions(libest_pki: DevPki) -> None:
    for ca in (libest_pki.tls_ca_certificate, libest_pki.est_ca.certificate):
        bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
        assert (bc.value.ca, bc.critical) == (True, False)
        with pytest.raises(x509.ExtensionNotFound):
            ca.extensions.get_extension_for_class(x509.KeyUsage)


@pytest.mark.parametrize("tls_max", [TlsMax.TLS1_2, TlsMax.TLS1_3])
def test_enroll_and_reenroll_through_a_libest_like_tls_anchor_and_est_ca(
    start_on: StartOn, libest_pki: DevPki, libest_sim: SimCard, tls_max: TlsMax
) -> None:
    started = time.monotonic()
    server = start_on(libest_pki, tls_max=tls_max)
    op_a = libest_sim.new_key(OP_KEY_A)
    with _card_client(server, libest_pki, libest_sim) as client:
        cacerts = client.cacerts()
        assert cacerts.anchor == libest_pki.est_ca.certificate  # /cacerts: the libest-like CA
        enrolled = client.simpleenroll(lambda _b: build_csr(op_a))
    assert libest_sim.bootstrap.signatures == 1
    cert = enrolled.certificate
    assert cert.public_key() == op_a.public_key()
    cert.verify_directly_issued_by(libest_pki.est_ca.certificate)
    # re-enroll: TLS with the issued certificate, whose chain ends at the libest-like EST CA
    op_b = libest_sim.new_key(OP_KEY_B)
    with _card_client(server, libest_pki, libest_sim, cert=cert, signer=op_a) as client:
        subject, san = raw_subject_and_san(cert)
        renewed = client.simplereenroll(
            lambda _b: build_csr(op_b, subject_der=subject, san_der=san)
        )
    assert renewed.certificate.public_key() == op_b.public_key()
    assert time.monotonic() - started < 20


def test_issued_certificate_without_eku(
    start_on: StartOn, libest_pki: DevPki, libest_sim: SimCard
) -> None:
    # libest's example CA issues without EKU (estExampleCA.cnf [client_cert]): refused by
    # default (est.require_client_auth_eku = true: re-enrolling needs clientAuth), accepted
    # when that setting is off.
    server = start_on(libest_pki, default_profile=Profile(validity_s=3600, ekus=()))
    op_a = libest_sim.new_key(OP_KEY_A)
    with (
        _card_client(server, libest_pki, libest_sim) as client,
        pytest.raises(EstResponseError, match="lacks the clientAuth EKU") as info,
    ):
        client.simpleenroll(lambda _b: build_csr(op_a))
    assert info.value.exit_code == 76
    with _card_client(server, libest_pki, libest_sim, require_client_auth_eku=False) as client:
        cert = client.simpleenroll(lambda _b: build_csr(op_a)).certificate
    with pytest.raises(x509.ExtensionNotFound):
        cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage)


def test_curl_and_openssl_verify_accept_the_libest_like_anchor(
    start_on: StartOn, libest_pki: DevPki, capsys: pytest.CaptureFixture[str]
) -> None:
    # The cross-check: curl and `openssl verify` (OpenSSL without -x509_strict) accept the
    # anchor; -x509_strict holds it to the CA profile (RFC 5280 §4.2.1.9, §4.2.1.3) as it
    # holds every CA of the chain, which is why the stdlib path no longer sets it.
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    server = start_on(libest_pki)
    anchor = str(libest_pki.directory / "tls-ca.pem")
    server_pem = str(libest_pki.server_cert_path)
    curl = subprocess.run(
        ["curl", "-sS", "-f", "--max-time", "10", "--cacert", anchor, f"{server.url}/cacerts"],
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert curl.returncode == 0, curl.stderr
    assert curl.stdout.strip()  # the base64 certs-only body
    plain = subprocess.run(
        ["openssl", "verify", "-CAfile", anchor, server_pem],
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert plain.returncode == 0, plain.stdout + plain.stderr
    strict = subprocess.run(
        ["openssl", "verify", "-x509_strict", "-CAfile", anchor, server_pem],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert strict.returncode != 0
    assert "not marked critical" in strict.stdout + strict.stderr
    assert "does not include key usage" in strict.stdout + strict.stderr
    # and the agent's stdlib path (server-only TLS): `est-agent cacerts` exits 0
    argv = ["cacerts", "--server", _base(server), "--trust-anchor", anchor]
    assert main(argv) == 0
    assert capsys.readouterr().out.startswith("# anchor: CN=est-agent dev EST CA")


# -- an intermediate with the same defects --------------------------------------------------------


def _pki_with_intermediate(directory: Path, boot: DevPki, profile: CaProfile) -> DevPki:
    """A dev PKI whose TLS server certificate comes from an intermediate of ``profile`` under
    the (RFC 5280) TLS CA: server.pem holds the leaf and the intermediate, which the server
    sends; tls-ca.pem stays the anchor. The bootstrap CA is ``boot``'s (the SIM's)."""
    generate_dev_pki(directory)
    for name in ("bootstrap-ca.pem", "bootstrap-ca.key"):
        shutil.copy(boot.directory / name, directory / name)
    tls_key = serialization.load_pem_private_key((directory / "tls-ca.key").read_bytes(), None)
    assert isinstance(tls_key, ec.EllipticCurvePrivateKey)
    root = CertificateAuthority(load_dev_pki(directory).tls_ca_certificate, tls_key)
    now = datetime.now(UTC)
    sub = make_ca(
        f"{profile.value} intermediate", now, timedelta(days=30), profile=profile, issuer=root
    )
    leaf, key = issue_server_certificate(sub, now)
    write_pem(directory / "server.pem", leaf, sub.certificate)
    write_key(directory / "server.key", key)
    return load_dev_pki(directory)


@pytest.mark.parametrize("profile", [CaProfile.RFC5280, CaProfile.LIBEST], ids=lambda p: p.value)
def test_an_intermediate_with_libest_defects_is_refused_on_both_paths(
    start_on: StartOn,
    dev_pki: DevPki,
    sim: SimCard,
    tmp_path: Path,
    profile: CaProfile,
    capsys: pytest.CaptureFixture[str],
) -> None:
    started = time.monotonic()
    pki = _pki_with_intermediate(tmp_path / "pki", dev_pki, profile)
    server = start_on(pki)
    anchor = str(pki.directory / "tls-ca.pem")
    argv = ["cacerts", "--server", _base(server), "--trust-anchor", anchor]
    apdus = sim.transport.stats.apdus
    if profile is CaProfile.RFC5280:  # the control: the same chain, a proper intermediate
        with _card_client(server, pki, sim) as client:
            client.cacerts()
        assert main(argv) == 0
        assert sim.bootstrap.signatures == 1
        return
    with (
        _card_client(server, pki, sim) as client,
        pytest.raises(TlsVerificationError, match="basicConstraints is not critical") as info,
    ):
        client.cacerts()
    assert info.value.exit_code == 76
    assert sim.bootstrap.signatures == 0 and sim.transport.stats.apdus == apdus
    assert main(argv) == 76  # the stdlib path: OpenSSL passed it, our check did not
    assert "basicConstraints is not critical" in capsys.readouterr().err
    assert time.monotonic() - started < 20
