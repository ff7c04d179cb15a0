"""CsrBuilder with a software key and with the virtual SIM's card key, checked by openssl."""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import hashlib
import ipaddress
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from asn1crypto import core
from asn1crypto import csr as asn1_csr
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from est_agent.backends.iotsafe import CardSigner
from est_agent.backends.signer import SoftwareSigner
from est_agent.card.channel import CardSession
from est_agent.card.iotsafe import IotSafeApplet
from est_agent.card.uri import IotSafeRef, ObjectKind
from est_agent.csr import (
    CsrBuilder,
    parse_san,
    parse_subject,
    raw_subject_and_san,
    subject_from_template,
)
from est_agent.errors import CardError, CsrError
from est_agent.est.messages import challenge_password_value, parse_csrattrs
from est_agent.sim.options import CardOptions
from est_agent.sim.personalize import personalize
from est_agent.sim.transport import SimTransport
from est_agent.testserver.csrcheck import (
    check_challenge_password,
    check_csr,
    check_reenroll,
    raw_subject_and_san_of_certificate,
)

OPENSSL = shutil.which("openssl")
needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="openssl binary not installed")
OP_A = IotSafeRef(ObjectKind.PRIVATE_KEY, label="op-a")
RFC7030_CSRATTRS = (
    b"MEEGCSqGSIb3DQEJBzASBgcqhkjOPQIBMQcGBSuBBAAiMBYGCSqGSIb3DQEJDjEJBgcrBgEBAQEWBggqhkjOPQQDAw=="
)
# Cisco libest 3.2.0p's example server: its default /csrattrs (TEST_CSR in
# example/server/estserver.c) with the C string's NUL it sends: macAddress, emailAddress,
# secp384r1 and sha384 as bare OIDs.
LIBEST_CSRATTRS = b"MCYGBysGAQEBARYGCSqGSIb3DQEJAQYFK4EEACIGCWCGSAFlAwQCAg==\x00"


def openssl_text(der: bytes, tmp_path: Path) -> str:
    """`openssl req -verify` must accept the CSR; returns `openssl req -text` output."""
    assert OPENSSL is not None
    pem = x509.load_der_x509_csr(der).public_bytes(serialization.Encoding.PEM)
    path = tmp_path / f"req-{hashlib.sha256(der).hexdigest()[:8]}.pem"
    path.write_bytes(pem)
    verify = subprocess.run(
        [OPENSSL, "req", "-verify", "-noout", "-in", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert verify.returncode == 0, verify.stderr
    assert "verify OK" in verify.stderr + verify.stdout
    text = subprocess.run(
        [OPENSSL, "req", "-text", "-noout", "-nameopt", "RFC2253", "-in", str(path)],
        capture_output=True,
        text=True,
        check=True,
    )
    return text.stdout


@pytest.fixture
def signer() -> SoftwareSigner:
    return SoftwareSigner(ec.generate_private_key(ec.SECP256R1()))


def spki(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


# --- software signer -------------------------------------------------------------------------


@needs_openssl
def test_full_request_with_software_key(signer: SoftwareSigner, tmp_path: Path) -> None:
    password = challenge_password_value(bytes(range(12)))
    der = (
        CsrBuilder()
        .subject(parse_subject("CN=8988247000001234567,O=Acme IoT"))
        .subject_alt_names(
            [parse_san("dns:dev-1.example"), parse_san("ip:192.0.2.7"), parse_san("uri:urn:x:1")]
        )
        .eku_client_auth()
        .challenge_password(password)
        .build(signer)
    )
    assert signer.signatures == 1
    text = openssl_text(der, tmp_path)
    assert "CN=8988247000001234567,O=Acme IoT" in text
    assert "DNS:dev-1.example, IP Address:192.0.2.7, URI:urn:x:1" in text
    assert f"challengePassword        :{password}" in text
    assert "X509v3 Key Usage: critical" in text
    assert "Digital Signature" in text
    assert "TLS Web Client Authentication" in text
    assert "ecdsa-with-SHA256" in text

    request = x509.load_der_x509_csr(der)
    assert spki(request.public_key()) == spki(signer.public_key())  # type: ignore[arg-type]
    eku = request.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    assert list(eku.value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    key_usage = request.extensions.get_extension_for_class(x509.KeyUsage)
    assert key_usage.critical and key_usage.value.digital_signature
    assert not key_usage.value.key_encipherment
    # the test server's independent checker accepts it, PoP value included
    checked = check_csr(der)
    check_challenge_password(checked, bytes(range(12)))
    # RFC 5758 §3.2: ecdsa-with-SHA256 without parameters
    algorithm = asn1_csr.CertificationRequest.load(der)["signature_algorithm"]
    assert algorithm.dump() == bytes.fromhex("300a06082a8648ce3d040302")


def test_challenge_password_string_types(signer: SoftwareSigner) -> None:
    def password_tag(value: str) -> int:
        der = CsrBuilder().subject(parse_subject("CN=x")).challenge_password(value).build(signer)
        info = asn1_csr.CertificationRequest.load(der)["certification_request_info"]
        (attribute,) = [a for a in info["attributes"] if a["type"].native == "challenge_password"]
        (value_,) = list(attribute["values"])
        assert value_.native == value
        return int(value_.chosen.tag)

    assert password_tag("AAECAwQFBgcICQoL") == 19  # PrintableString, as in RFC 7030 §3.5
    assert password_tag("abc+/=") == 19
    assert password_tag("enroll_code!") == 12  # '_' and '!' are not printable: UTF8String
    assert password_tag("pässwort") == 12
    with pytest.raises(CsrError):
        CsrBuilder().challenge_password("")
    with pytest.raises(CsrError):
        CsrBuilder().challenge_password("x" * 256)


def test_minimal_request_has_empty_attributes_and_no_extension_request(
    signer: SoftwareSigner,
) -> None:
    der = CsrBuilder().subject(parse_subject("CN=x")).key_usage(False).build(signer)
    info = asn1_csr.CertificationRequest.load(der)["certification_request_info"]
    # RFC 2986 §4.1: attributes [0] is not optional; an empty set is A0 00
    assert info.dump().endswith(b"\xa0\x00")
    assert len(x509.load_der_x509_csr(der).extensions) == 0


def test_builder_is_immutable(signer: SoftwareSigner) -> None:
    base = CsrBuilder().subject(parse_subject("CN=a"))
    with_eku = base.eku_client_auth()
    assert with_eku is not base
    first = x509.load_der_x509_csr(base.build(signer))
    second = x509.load_der_x509_csr(with_eku.build(signer))
    assert len(first.extensions) == 1  # keyUsage only: the setter did not change `base`
    assert len(second.extensions) == 2
    assert signer.signatures == 2


def test_subject_forms_agree(signer: SoftwareSigner) -> None:
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "DE"),
            x509.NameAttribute(NameOID.COMMON_NAME, "dev-1"),
        ]
    )
    from_name = CsrBuilder().subject(name).build(signer)
    from_pairs = CsrBuilder().subject([("C", "DE"), ("2.5.4.3", "dev-1")]).build(signer)
    from_der = CsrBuilder().subject(name.public_bytes()).build(signer)
    subjects = {x509.load_der_x509_csr(d).subject for d in (from_name, from_pairs, from_der)}
    assert subjects == {name}


def test_raw_subject_and_san_copied_byte_for_byte(signer: SoftwareSigner, tmp_path: Path) -> None:
    # A certificate whose encodings cryptography would not produce itself: PrintableString CN,
    # T61String O, unusual RDN order, a critical SAN with an IP and a directoryName.
    ca_key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, "dev-1", x509.name._ASN1Type.PrintableString),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Acme", x509.name._ASN1Type.T61String),
            x509.NameAttribute(NameOID.COUNTRY_NAME, "DE"),
        ]
    )
    san = x509.SubjectAlternativeName(
        [
            x509.IPAddress(ipaddress.ip_address("2001:db8::1")),
            x509.DirectoryName(x509.Name([x509.NameAttribute(NameOID.SERIAL_NUMBER, "42")])),
            x509.DNSName("dev-1.example"),
        ]
    )
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "CA")]))
        .public_key(signer.public_key())
        .serial_number(1)
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(san, critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    cert_der = cert.public_bytes(serialization.Encoding.DER)
    expected_subject, expected_san = raw_subject_and_san_of_certificate(cert_der)
    assert raw_subject_and_san(cert_der) == (expected_subject, (expected_san, True))

    der = CsrBuilder().copy_from_certificate(cert).eku_client_auth().build(signer)
    checked = check_csr(der)
    assert checked.subject_der == expected_subject
    assert checked.san_der == expected_san
    assert checked.san_critical
    check_reenroll(checked, cert, now)  # the test server's byte comparison passes
    # and the string types survived (a re-encoding would turn them into UTF8String)
    attrs = x509.load_der_x509_csr(der).subject
    assert [a._type for a in attrs] == [  # type: ignore[attr-defined]
        x509.name._ASN1Type.PrintableString,
        x509.name._ASN1Type.T61String,
        x509.name._ASN1Type.PrintableString,
    ]
    if OPENSSL:
        assert "IP Address:2001:DB8:0:0:0:0:0:1" in openssl_text(der, tmp_path)


def test_certificate_without_san(signer: SoftwareSigner) -> None:
    ca_key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dev")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(signer.public_key())
        .serial_number(2)
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(ca_key, hashes.SHA256())
    )
    builder = CsrBuilder().subject_alt_names([parse_san("dns:old")]).copy_from_certificate(cert)
    request = x509.load_der_x509_csr(builder.build(signer))
    with pytest.raises(x509.ExtensionNotFound):
        request.extensions.get_extension_for_class(x509.SubjectAlternativeName)


def test_invalid_inputs(signer: SoftwareSigner) -> None:
    with pytest.raises(CsrError, match="subject or a subjectAltName"):
        CsrBuilder().build(signer)
    assert signer.signatures == 0
    with pytest.raises(CsrError, match="Name"):
        CsrBuilder().subject(b"\x30\x03\x02\x01\x01\x00")
    with pytest.raises(CsrError, match="GeneralNames"):
        CsrBuilder().subject_alt_names(b"\x04\x00")
    with pytest.raises(CsrError):
        CsrBuilder().subject([("nonsense", "x")])
    with pytest.raises(CsrError):
        raw_subject_and_san(b"not a certificate")
    # SAN only (empty subject) is allowed
    der = CsrBuilder().subject_alt_names([parse_san("dns:a")]).build(signer)
    assert len(x509.load_der_x509_csr(der).subject) == 0


def test_p384_signer_refused() -> None:
    class P384Signer:
        signatures = 0
        digest_algorithms = ("sha256",)

        def __init__(self) -> None:
            self.key = ec.generate_private_key(ec.SECP384R1())

        def public_key(self) -> ec.EllipticCurvePublicKey:
            return self.key.public_key()

        def sign_digest(self, digest: bytes) -> bytes:
            self.signatures += 1
            raise AssertionError("must not be asked")

    bad = P384Signer()
    with pytest.raises(CsrError, match="P-256"):
        CsrBuilder().subject(parse_subject("CN=x")).build(bad)
    assert bad.signatures == 0


class BrokenSigner:
    """Signs with another key than it claims, or raises: the builder must notice."""

    digest_algorithms = ("sha256",)

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.signatures = 0
        self.claimed = ec.generate_private_key(ec.SECP256R1())
        self.actual = ec.generate_private_key(ec.SECP256R1())

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self.claimed.public_key()

    def sign_digest(self, digest: bytes) -> bytes:
        from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

        self.signatures += 1
        if self.mode == "card":
            raise CardError("card went away")
        if self.mode == "crash":
            raise RuntimeError("boom")
        if self.mode == "garbage":
            return b"\x30\x00"
        return self.actual.sign(digest, ec.ECDSA(Prehashed(hashes.SHA256())))


@pytest.mark.parametrize(
    ("mode", "error", "fragment"),
    [
        ("wrong-key", CsrError, "does not verify"),
        ("garbage", CsrError, "CSR"),
        ("crash", CsrError, "signer failed"),
        ("card", CardError, "went away"),
    ],
)
def test_bad_signatures_are_caught(mode: str, error: type[Exception], fragment: str) -> None:
    broken = BrokenSigner(mode)
    with pytest.raises(error, match=fragment):
        CsrBuilder().subject(parse_subject("CN=x")).build(broken)
    assert broken.signatures == 1


# --- /csrattrs -------------------------------------------------------------------------------


def _csrattrs(*items: core.Asn1Value) -> bytes:
    class _Seq(core.SequenceOf):  # type: ignore[misc]
        _child_spec = core.Any

    return _Seq([core.Any.load(i.dump()) for i in items]).dump()


def _attribute(oid: str, value: core.Asn1Value) -> core.Sequence:
    class _Attr(core.Sequence):  # type: ignore[misc]
        _fields = [("type", core.ObjectIdentifier), ("values", core.SetOf, {"spec": core.Any})]  # noqa: RUF012

    return _Attr({"type": oid, "values": [core.Any.load(value.dump())]})


def test_rfc7030_example_asks_for_what_the_card_cannot_do(signer: SoftwareSigner) -> None:
    attrs = parse_csrattrs(RFC7030_CSRATTRS)
    builder = CsrBuilder().subject(parse_subject("CN=x")).challenge_password("AAAA")
    with pytest.raises(CsrError, match=r"ecdsa-with-SHA384|secp384r1"):
        builder.csr_attributes(attrs).build(signer)
    assert signer.signatures == 0  # refused before the card is asked


@pytest.mark.parametrize(
    ("items", "fragment"),
    [
        ((core.ObjectIdentifier("1.2.840.113549.1.1.1"),), "RSA"),
        ((core.ObjectIdentifier("2.16.840.1.101.3.4.2.2"),), "SHA-384"),
        ((core.ObjectIdentifier("1.2.840.10045.4.3.3"),), "ecdsa-with-SHA384"),
        ((_attribute("1.2.840.10045.2.1", core.ObjectIdentifier("1.3.132.0.34")),), "secp384r1"),
        ((_attribute("1.2.840.10045.2.1", core.ObjectIdentifier("1.3.132.0.35")),), "P-521"),
        ((core.ObjectIdentifier("1.2.840.113549.1.9.7"),), "challengePassword"),
    ],
)
def test_unsatisfiable_csrattrs_named(
    signer: SoftwareSigner, items: tuple[core.Asn1Value, ...], fragment: str
) -> None:
    attrs = parse_csrattrs(_csrattrs(*items))
    with pytest.raises(CsrError, match=fragment):
        CsrBuilder().subject(parse_subject("CN=x")).csr_attributes(attrs).build(signer)
    assert signer.signatures == 0


def test_satisfiable_csrattrs_build(signer: SoftwareSigner) -> None:
    attrs = parse_csrattrs(
        _csrattrs(
            core.ObjectIdentifier("1.2.840.113549.1.9.7"),  # challengePassword
            core.ObjectIdentifier("1.2.840.10045.4.3.2"),  # ecdsa-with-SHA256
            core.ObjectIdentifier("2.16.840.1.101.3.4.2.1"),  # sha256
            core.ObjectIdentifier("1.2.3.4.5.6"),  # unknown: ignored
            _attribute("1.2.840.10045.2.1", core.ObjectIdentifier("1.2.840.10045.3.1.7")),
            _attribute("1.2.840.113549.1.9.14", core.ObjectIdentifier("1.3.6.1.1.1.1.22")),
        )
    )
    der = (
        CsrBuilder()
        .subject(parse_subject("CN=x"))
        .csr_attributes(attrs)
        .challenge_password(challenge_password_value(b"\x01" * 32))
        .build(signer)
    )
    assert check_csr(der).challenge_password == base64.b64encode(b"\x01" * 32).decode()
    assert signer.signatures == 1


LIBEST_DEVIATIONS = [
    "the EST server asks for SHA-384 (2.16.840.1.101.3.4.2.2); sending ecdsa-with-SHA256: the"
    " card signs SHA-256 digests only (ecdsa-with-SHA256)",
    "the EST server asks for an EC key on secp384r1 (P-384) (1.3.132.0.34); sending an EC P-256"
    " (secp256r1) key: the card makes EC P-256 (secp256r1) keys only",
    "the EST server asks for macAddress (1.3.6.1.1.1.1.22); left out: the agent has no value"
    " for it",
    "the EST server asks for emailAddress (1.2.840.113549.1.9.1); left out: the agent has no value"
    " for it",
]


def test_libest_default_advisory_sends_what_the_card_can(
    signer: SoftwareSigner, tmp_path: Path
) -> None:
    builder = (
        CsrBuilder()
        .subject(parse_subject("CN=x"))
        .csr_attributes(parse_csrattrs(LIBEST_CSRATTRS), strict=False)
    )
    fit = builder.fit(signer)
    assert fit.digest == "sha256"
    assert [str(d) for d in fit.deviations] == LIBEST_DEVIATIONS
    assert signer.signatures == 0  # fit asks nothing of the card
    der = builder.build(signer)
    assert signer.signatures == 1
    request = x509.load_der_x509_csr(der)
    assert request.signature_algorithm_oid.dotted_string == "1.2.840.10045.4.3.2"
    assert isinstance(request.public_key(), ec.EllipticCurvePublicKey)
    assert request.public_key().curve.name == "secp256r1"
    if OPENSSL is not None:
        assert "ecdsa-with-SHA256" in openssl_text(der, tmp_path)


def test_libest_default_strict_names_what_was_asked_and_what_the_card_does(
    signer: SoftwareSigner,
) -> None:
    builder = CsrBuilder().subject(parse_subject("CN=x"))
    with pytest.raises(CsrError) as info:
        builder.csr_attributes(parse_csrattrs(LIBEST_CSRATTRS), strict=True).build(signer)
    assert str(info.value) == (
        "the EST server asks for SHA-384 (2.16.840.1.101.3.4.2.2), but the card signs SHA-256"
        " digests only (ecdsa-with-SHA256); and the EST server asks for an EC key on secp384r1"
        " (P-384) (1.3.132.0.34), but the card makes EC P-256 (secp256r1) keys only"
    )
    # macAddress/emailAddress are left out in both modes: not a reason to refuse
    assert signer.signatures == 0


class WideSigner:
    """A card that also takes 48- and 64-byte digests (what the SIM issue adds): the CSR code
    follows `digest_algorithms` and needs no change."""

    digest_algorithms = ("sha256", "sha384", "sha512")

    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.sizes: list[int] = []

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self.key.public_key()

    def sign_digest(self, digest: bytes) -> bytes:
        from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

        self.sizes.append(len(digest))
        algorithm = {32: hashes.SHA256(), 48: hashes.SHA384(), 64: hashes.SHA512()}[len(digest)]
        return self.key.sign(digest, ec.ECDSA(Prehashed(algorithm)))


@pytest.mark.parametrize(
    ("asked", "size", "signature_oid", "openssl_name"),
    [
        ("2.16.840.1.101.3.4.2.2", 48, "1.2.840.10045.4.3.3", "ecdsa-with-SHA384"),  # sha384
        ("1.2.840.10045.4.3.4", 64, "1.2.840.10045.4.3.4", "ecdsa-with-SHA512"),
        ("2.16.840.1.101.3.4.2.1", 32, "1.2.840.10045.4.3.2", "ecdsa-with-SHA256"),
    ],
)
def test_a_digest_the_card_takes_is_honoured(
    asked: str, size: int, signature_oid: str, openssl_name: str, tmp_path: Path
) -> None:
    wide = WideSigner()
    attrs = parse_csrattrs(_csrattrs(core.ObjectIdentifier(asked)))
    builder = CsrBuilder().subject(parse_subject("CN=x")).csr_attributes(attrs, strict=True)
    assert builder.fit(wide).deviations == ()
    der = builder.build(wide)
    assert wide.sizes == [size]
    request = x509.load_der_x509_csr(der)
    assert request.is_signature_valid
    assert request.signature_algorithm_oid.dotted_string == signature_oid
    if OPENSSL is not None:
        assert openssl_name in openssl_text(der, tmp_path)


def test_libest_default_on_a_wide_card_only_the_curve_is_left() -> None:
    wide = WideSigner()
    builder = CsrBuilder().subject(parse_subject("CN=x"))
    fit = builder.csr_attributes(parse_csrattrs(LIBEST_CSRATTRS), strict=False).fit(wide)
    assert fit.digest == "sha384"
    assert [str(d) for d in fit.deviations] == LIBEST_DEVIATIONS[1:]


def test_rsa_signature_asked_is_not_an_ecdsa_digest() -> None:
    wide = WideSigner()
    attrs = parse_csrattrs(_csrattrs(core.ObjectIdentifier("1.2.840.113549.1.1.12")))
    fit = CsrBuilder().csr_attributes(attrs).fit(wide)
    assert fit.digest == "sha256"
    assert [d.asked for d in fit.deviations] == ["sha384WithRSAEncryption (1.2.840.113549.1.1.12)"]


def test_challenge_password_asked_but_not_given_is_sent_without_in_advisory_mode(
    signer: SoftwareSigner,
) -> None:
    attrs = parse_csrattrs(_csrattrs(core.ObjectIdentifier("1.2.840.113549.1.9.7")))
    der = (
        CsrBuilder()
        .subject(parse_subject("CN=x"))
        .csr_attributes(attrs, strict=False)
        .build(signer)
    )
    assert check_csr(der).challenge_password is None
    with pytest.raises(CsrError, match="challengePassword"):
        CsrBuilder().subject(parse_subject("CN=x")).csr_attributes(attrs).build(signer)


def test_card_signer_takes_what_the_card_advertises(
    card: tuple[IotSafeApplet, SimTransport],
) -> None:
    # issue 13: the virtual SIM advertises SHA-256/384/512 (GET DATA 91 = 00 07); the signer
    # took SHA-256 only before
    applet, transport = card
    applet.generate_key_pair(OP_A)
    card_signer = CardSigner.from_card(applet, OP_A)
    before = transport.stats.apdus
    assert card_signer.digest_algorithms == ("sha256", "sha384", "sha512")
    assert card_signer.digest_algorithms == ("sha256", "sha384", "sha512")
    assert transport.stats.apdus - before == 1  # one GET DATA, remembered
    assert SoftwareSigner(ec.generate_private_key(ec.SECP256R1())).digest_algorithms == ("sha256",)


# --- subject templates and CLI-style parsing ---------------------------------------------------


def test_subject_from_template() -> None:
    name = subject_from_template(
        {"CN": "dev-{iccid}", "O": "Acme", "serialNumber": "{imei}"},
        {"iccid": "8988247000001234567", "imei": "490154203237518"},
    )
    assert name.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "dev-8988247000001234567"
    assert name.get_attributes_for_oid(NameOID.SERIAL_NUMBER)[0].value == "490154203237518"
    assert [a.oid for a in name] == [
        NameOID.COMMON_NAME,
        NameOID.ORGANIZATION_NAME,
        NameOID.SERIAL_NUMBER,
    ]
    assert subject_from_template({"CN": "{{literal}}"}, {}).rfc4514_string() == "CN={literal}"


@pytest.mark.parametrize(
    ("template", "fragment"),
    [
        ({"CN": "{imsi}"}, r"unknown placeholder \{imsi\}.*known: iccid"),
        ({"CN": "{iccid.__class__}"}, "plain"),
        ({"CN": "{iccid!r}"}, "plain"),
        ({"CN": "{iccid:>30}"}, "plain"),
        ({"CN": "{}"}, "plain"),
        ({"CN": "{iccid"}, "invalid subject template"),
        ({"XX": "a"}, "unknown subject attribute"),
        ({"CN": ""}, "empty"),
        ({"C": "Germany"}, "invalid subject attribute"),
    ],
)
def test_subject_template_errors(template: dict[str, str], fragment: str) -> None:
    with pytest.raises(CsrError, match=fragment):
        subject_from_template(template, {"iccid": "89"})


def test_parse_san_and_subject() -> None:
    assert parse_san("DNS:a.example") == x509.DNSName("a.example")
    assert parse_san("ip:2001:db8::1") == x509.IPAddress(ipaddress.ip_address("2001:db8::1"))
    assert parse_san("uri:urn:ietf:x") == x509.UniformResourceIdentifier("urn:ietf:x")
    for bad in ("a.example", "dns:", "ip:300.1.1.1", "email:x@y"):
        with pytest.raises(CsrError):
            parse_san(bad)
    assert parse_subject("CN=a,O=b").rfc4514_string() == "CN=a,O=b"
    with pytest.raises(CsrError):
        parse_subject("not a dn")


# --- the virtual SIM's key -------------------------------------------------------------------


@pytest.fixture
def card(tmp_path: Path) -> Iterator[tuple[IotSafeApplet, SimTransport]]:
    state = tmp_path / "sim.json"
    personalize(state, iccid="8988247000001234567")
    transport = SimTransport(state, CardOptions())
    applet = IotSafeApplet.open(CardSession(transport))
    yield applet, transport
    transport.close()


@needs_openssl
def test_card_signed_csr(card: tuple[IotSafeApplet, SimTransport], tmp_path: Path) -> None:
    applet, transport = card
    generated = applet.generate_key_pair(OP_A)
    signer = CardSigner.from_card(applet, OP_A)
    before = transport.stats.apdus
    der = (
        CsrBuilder()
        .subject(subject_from_template({"CN": "{iccid}"}, {"iccid": "8988247000001234567"}))
        .subject_alt_names([parse_san("dns:dev.example")])
        .eku_client_auth()
        .challenge_password(challenge_password_value(b"\x07" * 12))
        .build(signer)
    )
    assert signer.signatures == 1
    assert transport.stats.apdus - before == 2  # one card signature: INIT + UPDATE
    request = x509.load_der_x509_csr(der)
    card_key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), generated.public_point)
    assert spki(request.public_key()) == spki(card_key)  # type: ignore[arg-type]
    text = openssl_text(der, tmp_path)
    assert "CN=8988247000001234567" in text
    assert "DNS:dev.example" in text
    check_challenge_password(check_csr(der), b"\x07" * 12)


@needs_openssl
def test_card_reenroll_copies_bootstrap_certificate(
    card: tuple[IotSafeApplet, SimTransport], tmp_path: Path
) -> None:
    applet, _ = card
    cert_der = applet.read_file(IotSafeRef(ObjectKind.FILE, object_id=b"\x01"))
    cert = x509.load_der_x509_certificate(cert_der)
    applet.generate_key_pair(OP_A)
    signer = CardSigner.from_card(applet, OP_A)  # rekey: a new key, same names
    der = CsrBuilder().copy_from_certificate(cert_der).build(signer)
    assert signer.signatures == 1
    checked = check_csr(der)
    assert checked.subject_der == raw_subject_and_san_of_certificate(cert_der)[0]
    check_reenroll(checked, cert, dt.datetime.now(dt.UTC))
    assert "bootstrap-8988247000001234567" in openssl_text(der, tmp_path)


# --- properties: text and DER parsers raise CsrError only ------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60))
def test_parse_subject_raises_only_csr_error(text: str) -> None:
    try:
        name = parse_subject(text)
    except CsrError:
        return
    assert isinstance(name, x509.Name)


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.text(max_size=40),
        st.sampled_from(["dns:", "ip:", "uri:"]).flatmap(
            lambda prefix: st.text(max_size=40).map(lambda rest: prefix + rest)
        ),
    )
)
def test_parse_san_raises_only_csr_error(text: str) -> None:
    try:
        name = parse_san(text)
    except CsrError:
        return
    assert isinstance(name, x509.GeneralName)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["CN", "O", "C", "serialNumber", "2.5.4.5", "bogus", "1.2.3"]),
        st.text(max_size=30),
        max_size=3,
    ),
    st.dictionaries(st.sampled_from(["iccid", "imei"]), st.text(max_size=10), max_size=2),
)
def test_subject_from_template_raises_only_csr_error(
    template: dict[str, str], values: dict[str, str]
) -> None:
    try:
        name = subject_from_template(template, values)
    except CsrError:
        return
    assert len(name) == len(template)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_raw_der_inputs_raise_only_csr_error(data: bytes) -> None:
    for call in (
        lambda: CsrBuilder().subject(data),
        lambda: CsrBuilder().subject_alt_names(data),
        lambda: raw_subject_and_san(data),
    ):
        with contextlib.suppress(CsrError):
            call()
