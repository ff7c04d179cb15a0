"""est_agent.api.active_credential after real enrollments (EST test server on 127.0.0.1, keys in
the in-process virtual SIM): the credential's key signs for its certificate, checked with
cryptography and openssl."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from est_agent.api import (
    ActiveCredential,
    ConfigError,
    SlotUnreadableError,
    StoreError,
    UsageError,
    active_credential,
    open_card,
)
from est_agent.config import load_config
from est_agent.testserver import DevPki, EstTestServer
from tests.conftest import Run
from tests.workflow.conftest import ICCID, Device, openssl_verify

pytestmark = pytest.mark.integration

#: reading two slots of the in-process SIM is milliseconds; far above it
BOUND_S = 10.0


def _point(key: object) -> bytes:
    assert isinstance(key, ec.EllipticCurvePublicKey)
    return key.public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)


def check_signs_for_its_certificate(cred: ActiveCredential) -> None:
    cert_key = cred.certificate.public_key()
    assert isinstance(cert_key, ec.EllipticCurvePublicKey)
    digest = hashlib.sha256(b"TLS CertificateVerify content, say").digest()
    with open_card(cred.reader) as card:
        assert _point(card.public_key(cred.key)) == _point(cert_key)
        der = card.sign_digest(cred.key, digest)
    cert_key.verify(der, digest, ec.ECDSA(Prehashed(hashes.SHA256())))


def test_active_credential_follows_enroll_and_renewal(
    device: Device,
    start_server: Callable[..., EstTestServer],
    dev_pki: DevPki,
    cli: Run,
    tmp_path: Path,
) -> None:
    server = start_server()
    export = device.root / "device.pem"
    device.write_config(server, dev_pki, paths__export_pem=f'"{export}"')
    assert cli("enroll", "--config", str(device.config))[0] == 0

    started = time.monotonic()
    cred = active_credential(device.config)  # a path
    assert time.monotonic() - started < BOUND_S
    assert (cred.slot, cred.key, cred.reader) == ("op-a", "iotsafe:key-id=02", f"sim:{device.sim}")
    assert cred.certificate.subject.rfc4514_string() == f"CN={ICCID}"
    # the test server sends the leaf alone (RFC 7030 §4.2.3 certs-only), so the export is it
    assert cred.certificates == tuple(x509.load_pem_x509_certificates(export.read_bytes()))
    assert len(cred.certificates) == 1
    cred.certificate.verify_directly_issued_by(dev_pki.est_ca.certificate)
    openssl_verify(cred.certificate, dev_pki, tmp_path)
    check_signs_for_its_certificate(cred)

    assert cli("renew", "--force", "--config", str(device.config))[0] == 0
    renewed = active_credential(load_config(device.config))  # a Config
    assert (renewed.slot, renewed.key) == ("op-b", "iotsafe:key-id=03")
    assert renewed.certificate != cred.certificate
    assert _point(renewed.certificate.public_key()) != _point(cred.certificate.public_key())
    check_signs_for_its_certificate(renewed)


def test_the_chain_comes_from_an_export_of_the_same_leaf(
    device: Device, start_server: Callable[..., EstTestServer], dev_pki: DevPki, cli: Run
) -> None:
    export = device.root / "device.pem"
    device.write_config(start_server(), dev_pki, paths__export_pem=f'"{export}"')
    assert cli("enroll", "--config", str(device.config))[0] == 0
    (leaf,) = x509.load_pem_x509_certificates(export.read_bytes())
    # what the agent exports after a server that sends its chain: leaf, then the issuing CA
    ca = dev_pki.est_ca.certificate
    export.write_bytes(leaf.public_bytes(Encoding.PEM) + ca.public_bytes(Encoding.PEM))
    cred = active_credential(device.config)
    assert cred.certificates == (leaf, ca)
    cred.certificate.verify_directly_issued_by(cred.certificates[1])


def test_without_an_export_the_chain_is_the_leaf_alone(
    device: Device, start_server: Callable[..., EstTestServer], dev_pki: DevPki, cli: Run
) -> None:
    device.write_config(start_server(), dev_pki)
    assert cli("enroll", "--config", str(device.config))[0] == 0
    cred = active_credential(str(device.config))
    assert len(cred.certificates) == 1
    check_signs_for_its_certificate(cred)


def test_an_export_of_another_certificate_gives_no_chain(
    device: Device, start_server: Callable[..., EstTestServer], dev_pki: DevPki, cli: Run
) -> None:
    export = device.root / "device.pem"
    device.write_config(start_server(), dev_pki, paths__export_pem=f'"{export}"')
    assert cli("enroll", "--config", str(device.config))[0] == 0
    # someone else's PEM where the export was: its chain must not be handed out as ours
    export.write_bytes(dev_pki.tls_ca_certificate.public_bytes(Encoding.PEM))
    assert len(active_credential(device.config).certificates) == 1


def test_before_enrollment_and_bad_configuration(
    device: Device, start_server: Callable[..., EstTestServer], dev_pki: DevPki, tmp_path: Path
) -> None:
    device.write_config(start_server(), dev_pki)
    with pytest.raises(StoreError, match="no valid credential") as caught:
        active_credential(device.config)
    assert caught.value.exit_code == 73
    with pytest.raises(ConfigError) as bad:
        active_credential(tmp_path / "absent.toml")
    assert bad.value.exit_code == 78
    with pytest.raises(UsageError):
        active_credential(42)  # type: ignore[arg-type]


def test_an_unreadable_slot_gives_no_answer(
    device: Device, start_server: Callable[..., EstTestServer], dev_pki: DevPki, cli: Run
) -> None:
    server = start_server()
    device.write_config(server, dev_pki)
    assert cli("enroll", "--config", str(device.config))[0] == 0
    # READ BINARY refused: either slot could hold the newer credential
    faults = device.root / "faults.txt"
    faults.write_text("ins=B0 sw=6982\n")
    device.write_config(server, dev_pki, card__reader=f'"sim:{device.sim}?faults={faults}"')
    with pytest.raises(SlotUnreadableError, match=r"op-a.*op-b") as caught:
        active_credential(device.config)
    assert caught.value.exit_code == 76
