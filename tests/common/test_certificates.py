"""The one PEM-or-DER certificate loader (est_agent.certificates.load_certificates)."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from est_agent.certificates import load_certificates
from est_agent.cli.main import main
from est_agent.errors import ConfigError, InputError
from tests.certs import self_signed_der

_PEM_KEY = b"-----BEGIN PRIVATE KEY-----\nMAA=\n-----END PRIVATE KEY-----\n"


def _pem(der: bytes) -> bytes:
    """RFC 7468 §2 by hand: base64 in 64-character lines between the boundaries."""
    text = base64.b64encode(der).decode("ascii")
    lines = [text[i : i + 64] for i in range(0, len(text), 64)]
    body = "\n".join(["-----BEGIN CERTIFICATE-----", *lines, "-----END CERTIFICATE-----"])
    return (body + "\n").encode("ascii")


@pytest.fixture(scope="module")
def two_ders() -> tuple[bytes, bytes]:
    return (
        self_signed_der(ec.generate_private_key(ec.SECP256R1()), "first"),
        self_signed_der(ec.generate_private_key(ec.SECP256R1()), "second"),
    )


def _cns(certs: list[x509.Certificate]) -> list[str]:
    return [c.subject.rfc4514_string() for c in certs]


def test_pem_bundle_in_file_order(two_ders: tuple[bytes, bytes]) -> None:
    first, second = two_ders
    bundle = b"leading text\n" + _pem(first) + _pem(second)
    loaded = load_certificates(bundle, "bundle")
    assert _cns(loaded) == ["CN=first", "CN=second"]
    assert [c.public_bytes(Encoding.DER) for c in loaded] == [first, second]


def test_one_der_certificate(two_ders: tuple[bytes, bytes]) -> None:
    loaded = load_certificates(two_ders[1], "record")
    assert _cns(loaded) == ["CN=second"]


@pytest.mark.parametrize(
    "data",
    [b"", b"garbage", b"-----BEGIN", _PEM_KEY, b"\x30\x03\x02\x01\x01"],
    ids=["empty", "text", "cut-boundary", "pem-key-only", "der-not-a-certificate"],
)
def test_no_certificate_is_the_callers_error_naming_what(data: bytes) -> None:
    with pytest.raises(InputError, match=r"^est\.trust_anchor: no usable certificate \("):
        load_certificates(data, "est.trust_anchor")
    with pytest.raises(ConfigError, match=r"^tls-ca\.pem: no usable certificate \("):
        load_certificates(data, "tls-ca.pem", error=ConfigError)


def test_truncated_der_is_refused(two_ders: tuple[bytes, bytes]) -> None:
    with pytest.raises(InputError, match="no usable certificate"):
        load_certificates(two_ders[0][:-10], "record")


def test_cli_trust_anchor_without_a_certificate_is_65(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    anchor = tmp_path / "anchor.pem"
    anchor.write_bytes(_PEM_KEY)
    argv = ["cacerts", "--server", "https://127.0.0.1:9", "--trust-anchor", str(anchor)]
    assert main(argv) == 65
    err = capsys.readouterr().err
    assert f"--trust-anchor {anchor}: no usable certificate" in err
    assert "[InputError]" in err


def test_cli_bootstrap_ca_without_a_certificate_is_65(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_bytes(b"not a certificate")
    key = tmp_path / "ca.key"
    key.write_bytes(_PEM_KEY)
    argv = ["sim", "init", str(tmp_path / "s.json"), "--bootstrap-ca", str(ca)]
    assert main([*argv, "--bootstrap-ca-key", str(key)]) == 65
    err = capsys.readouterr().err
    assert f"--bootstrap-ca {ca}: no usable certificate" in err
    assert not (tmp_path / "s.json").exists()
