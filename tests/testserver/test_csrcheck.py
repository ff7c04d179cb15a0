"""CSR checks of the test server (pure: no socket)."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from est_agent.testserver.csrcheck import (
    check_challenge_password,
    check_csr,
    check_reenroll,
    raw_subject_and_san_of_certificate,
)
from est_agent.testserver.issuer import issue_from_csr, make_ca, random_serial
from est_agent.testserver.wire import HttpRefusal
from tests.testserver.esttls_helpers import make_csr, new_key

NOW = datetime.now(UTC).replace(microsecond=0)


def _refusal(der: bytes) -> HttpRefusal:
    with pytest.raises(HttpRefusal) as info:
        check_csr(der)
    return info.value


def test_valid_csr_passes_with_raw_fields() -> None:
    key = new_key()
    checked = check_csr(make_csr(key, "dev", ("a.example", "b.example")))
    assert checked.csr.subject.rfc4514_string() == "CN=dev"
    assert checked.subject_der == checked.csr.subject.public_bytes()
    san = x509.SubjectAlternativeName([x509.DNSName("a.example"), x509.DNSName("b.example")])
    assert checked.san_der == san.public_bytes()
    assert checked.challenge_password is None
    assert len(checked.public_key_sha256) == 64


def test_csr_without_san() -> None:
    assert check_csr(make_csr(new_key(), san=())).san_der is None


def test_not_der_is_400() -> None:
    assert _refusal(b"\x30\x03\x02\x01\x00").status == 400
    assert "PKCS#10" in _refusal(b"garbage").text


def test_tampered_signature_is_400() -> None:
    der = bytearray(make_csr(new_key()))
    der[-5] ^= 0x01  # inside the ECDSA signature value
    refusal = _refusal(bytes(der))
    assert refusal.status == 400


def test_signature_by_other_key_is_refused() -> None:
    # Build a CSR for key A, then re-sign its TBS with key B: structurally fine, PoP broken.
    good = x509.load_der_x509_csr(make_csr(new_key()))
    other = new_key()
    signature = other.sign(good.tbs_certrequest_bytes, ec.ECDSA(hashes.SHA256()))
    from asn1crypto import csr as asn1_csr

    parsed = asn1_csr.CertificationRequest.load(good.public_bytes(serialization.Encoding.DER))
    forged = asn1_csr.CertificationRequest(
        {
            "certification_request_info": parsed["certification_request_info"],
            "signature_algorithm": parsed["signature_algorithm"],
            "signature": signature,
        }
    ).dump()
    assert "self-signature" in _refusal(forged).text


def test_p384_key_is_refused() -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    der = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")]))
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.DER)
    )
    assert "P-256" in _refusal(der).text


def test_rsa_key_is_refused() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # small: speed only
    der = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")]))
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.DER)
    )
    assert "P-256" in _refusal(der).text


def _signed_with(algorithm: hashes.HashAlgorithm) -> bytes:
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")]))
        .sign(new_key(), algorithm)
        .public_bytes(serialization.Encoding.DER)
    )


def test_sha224_signature_is_refused() -> None:
    # issue 13: ecdsa-with-SHA384/512 are accepted now (SHA-384 was refused before)
    assert "SHA256/384/512" in _refusal(_signed_with(hashes.SHA224())).text


@pytest.mark.parametrize("algorithm", [hashes.SHA384(), hashes.SHA512()])
def test_sha384_and_sha512_signatures_pass(algorithm: hashes.HashAlgorithm) -> None:
    checked = check_csr(_signed_with(algorithm))
    assert isinstance(checked.csr.signature_hash_algorithm, type(algorithm))


def test_empty_subject_is_refused() -> None:
    assert "subject" in _refusal(make_csr(new_key(), subject=x509.Name([]))).text


def test_challenge_password_matches_tls_unique() -> None:
    tls_unique = bytes(range(12))
    good = check_csr(make_csr(new_key(), challenge_password=base64.b64encode(tls_unique).decode()))
    check_challenge_password(good, tls_unique)
    with pytest.raises(HttpRefusal, match="does not match"):
        check_challenge_password(good, bytes(12))
    with pytest.raises(HttpRefusal, match="lacks challengePassword"):
        check_challenge_password(check_csr(make_csr(new_key())), tls_unique)


def _issued_for(der: bytes, *, not_after: datetime | None = None) -> x509.Certificate:
    checked = check_csr(der)
    ca = make_ca("t", NOW, timedelta(days=1))
    return issue_from_csr(
        ca,
        subject=checked.csr.subject,
        public_key=checked.csr.public_key(),  # type: ignore[arg-type]
        san_der=checked.san_der,
        san_critical=checked.san_critical,
        ekus=(),
        not_before=NOW - timedelta(hours=1),
        not_after=not_after or NOW + timedelta(hours=1),
        serial=random_serial(),
    )


def test_issued_certificate_copies_subject_and_san_bytes() -> None:
    der = make_csr(new_key(), "dev", ("a.example",))
    cert = _issued_for(der)
    subject, san = raw_subject_and_san_of_certificate(cert.public_bytes(serialization.Encoding.DER))
    checked = check_csr(der)
    assert subject == checked.subject_der
    assert san == checked.san_der


def test_reenroll_same_subject_and_san_passes_with_new_key() -> None:
    cert = _issued_for(make_csr(new_key(), "dev", ("a.example",)))
    check_reenroll(check_csr(make_csr(new_key(), "dev", ("a.example",))), cert, NOW)


@pytest.mark.parametrize(
    ("cn", "san", "message"),
    [
        ("other", ("a.example",), "Subject"),
        ("dev", ("b.example",), "SubjectAltName"),
        ("dev", (), "SubjectAltName"),
        ("dev", ("a.example", "b.example"), "SubjectAltName"),
    ],
)
def test_reenroll_mismatch_is_400(cn: str, san: tuple[str, ...], message: str) -> None:
    cert = _issued_for(make_csr(new_key(), "dev", ("a.example",)))
    with pytest.raises(HttpRefusal, match=message) as info:
        check_reenroll(check_csr(make_csr(new_key(), cn, san)), cert, NOW)
    assert info.value.status == 400


def test_reenroll_subject_compared_as_bytes_not_as_text() -> None:
    # Same text, different string type (PrintableString vs UTF8String): servers compare bytes.
    cert = _issued_for(make_csr(new_key(), "dev", ()))
    printable = x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, "dev", _type=x509.name._ASN1Type.PrintableString)]
    )
    csr = make_csr(new_key(), san=(), subject=printable)
    assert x509.load_der_x509_csr(csr).subject.rfc4514_string() == "CN=dev"
    with pytest.raises(HttpRefusal, match="Subject"):
        check_reenroll(check_csr(csr), cert, NOW)


def test_reenroll_with_expired_certificate_is_403() -> None:
    der = make_csr(new_key(), "dev", ())
    cert = _issued_for(der, not_after=NOW - timedelta(seconds=1))
    with pytest.raises(HttpRefusal, match="expired") as info:
        check_reenroll(check_csr(der), cert, NOW)
    assert info.value.status == 403
