"""EST message codecs: vectors rebuilt from RFC 7030 / RFC 8951 text, generated CAs, properties."""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import gzip
import time
import zlib
from pathlib import Path

import pytest
from asn1crypto import core
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, pkcs7
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from est_agent.errors import EstAgentError, EstResponseError, InputError
from est_agent.est.messages import (
    MEDIA_CERTS_ONLY,
    MEDIA_CSRATTRS,
    OID_CHALLENGE_PASSWORD,
    OID_EC_PUBLIC_KEY,
    OID_EXTENSION_REQUEST,
    ContentDecoder,
    CsrAttributes,
    basic_credential_secrets,
    challenge_password_value,
    classify_cacerts,
    decode_certs_only,
    encode_pkcs10_body,
    error_excerpt,
    est_url,
    media_type_matches,
    parse_content_codings,
    parse_csrattrs,
    parse_retry_after,
    pop_refusal,
    redact_secrets,
)
from est_agent.testserver.issuer import make_ca
from est_agent.testserver.wire import decode_base64_body
from tests.est.hostile import gzip_gzip_bomb, gzip_of_zeros
from tests.est.oddcerts import (
    OID_PRIME192V2,
    OID_SECP192R1,
    certs_only,
    issue,
    with_curve_oid,
    with_duplicate_extension,
)

NOW = dt.datetime(2026, 11, 28, 12, 0, 0, tzinfo=dt.UTC)

# RFC 7030 §4.5.2 example response, as printed in the RFC (base64 of CsrAttrs). It asks for a
# challengePassword, an EC key on secp384r1, a macAddress extension (given as a bare OID where
# RFC 2985 wants Extensions: the lenient case of RFC 8951 §4) and ecdsa-with-SHA384.
RFC7030_CSRATTRS = (
    b"MEEGCSqGSIb3DQEJBzASBgcqhkjOPQIBMQcGBSuBBAAiMBYGCSqGSIb3DQEJDjEJ\r\n"
    b"BgcrBgEBAQEWBggqhkjOPQQDAw==\r\n"
)
SECP384R1 = "1.3.132.0.34"
MAC_ADDRESS = "1.3.6.1.1.1.1.22"
ECDSA_SHA384 = "1.2.840.10045.4.3.3"
EMAIL_ADDRESS = "1.2.840.113549.1.9.1"
SHA384 = "2.16.840.1.101.3.4.2.2"
# Cisco libest 3.2.0p's example server, /csrattrs with no EST_CSR_ATTR set: TEST_CSR from
# example/server/estserver.c, sent with sizeof() bytes, i.e. followed by the C string's NUL.
LIBEST_CSRATTRS = b"MCYGBysGAQEBARYGCSqGSIb3DQEJAQYFK4EEACIGCWCGSAFlAwQCAg==\x00"


# --- URLs ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("base", "operation", "label", "expected"),
    [
        (
            "https://est.example:8443/.well-known/est",
            "cacerts",
            "",
            "https://est.example:8443/.well-known/est/cacerts",
        ),
        (
            "https://est.example/.well-known/est/",
            "simpleenroll",
            "arbitraryLabel1",
            "https://est.example/.well-known/est/arbitraryLabel1/simpleenroll",
        ),
        ("https://est.example", "csrattrs", "", "https://est.example/.well-known/est/csrattrs"),
        (
            "HTTPS://[::1]:9443/",
            "simplereenroll",
            "",
            "https://[::1]:9443/.well-known/est/simplereenroll",
        ),
        (
            "https://proxy.example/ca1/.well-known/est//",
            "cacerts",
            "a.b-c_d~e",
            "https://proxy.example/ca1/.well-known/est/a.b-c_d~e/cacerts",
        ),
    ],
)
def test_est_url_joins_without_double_slashes(
    base: str, operation: str, label: str, expected: str
) -> None:
    url = est_url(base, operation, label)
    assert url == expected
    assert "//" not in url.removeprefix("https://")


@pytest.mark.parametrize(
    ("base", "operation", "label"),
    [
        ("http://est.example/.well-known/est", "cacerts", ""),
        ("est.example/.well-known/est", "cacerts", ""),
        ("https:///.well-known/est", "cacerts", ""),
        ("https://user:pw@est.example/.well-known/est", "cacerts", ""),
        ("https://est.example/.well-known/est?x=1", "cacerts", ""),
        ("https://est.example:99999/", "cacerts", ""),
        ("https://est.example/", "serverkeygen", ""),  # the key lives in the SIM
        ("https://est.example/", "simpleenroll", "a/b"),
        ("https://est.example/", "simpleenroll", ".."),
        ("https://est.example/", "simpleenroll", "a b"),
        ("https://est.example/", "simpleenroll", "a%2Fb"),
    ],
)
def test_est_url_refuses(base: str, operation: str, label: str) -> None:
    with pytest.raises(InputError):
        est_url(base, operation, label)


# --- media types -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content_type", "expected", "matches"),
    [
        ("application/pkcs7-mime; smime-type=certs-only", MEDIA_CERTS_ONLY, True),
        ("Application/PKCS7-MIME", MEDIA_CERTS_ONLY, True),
        ("application/pkcs7-mime;smime-type=CERTS-ONLY;charset=x", MEDIA_CERTS_ONLY, True),
        ("  application/csrattrs  ", MEDIA_CSRATTRS, True),
        ("application/pkcs7-mime", "application/pkcs7-mime; smime-type=certs-only", True),
        ("application/pkcs7", MEDIA_CERTS_ONLY, False),
        ("text/html; charset=utf-8", MEDIA_CERTS_ONLY, False),
        ("application/pkcs7-mime-x", MEDIA_CERTS_ONLY, False),
        ("", MEDIA_CERTS_ONLY, False),
        (None, MEDIA_CERTS_ONLY, False),
        (";", "", False),
    ],
)
def test_media_type_matches(content_type: str | None, expected: str, matches: bool) -> None:
    assert media_type_matches(content_type, expected) is matches


# --- request body ----------------------------------------------------------------------------


def test_pkcs10_body_is_wrapped_at_64_with_crlf() -> None:
    der = bytes(range(256)) * 2  # 512 bytes -> 684 base64 characters -> 11 lines
    body = encode_pkcs10_body(der)
    lines = body.split(b"\r\n")
    assert lines[-1] == b""  # every line, the last included, ends in CRLF
    assert [len(line) for line in lines[:-1]] == [64] * 10 + [44]
    assert b"\n" not in body.replace(b"\r\n", b"")
    # the test server's independent strict decoder accepts it
    assert decode_base64_body(body) == der


def test_pkcs10_body_exact_multiple_has_no_empty_line() -> None:
    body = encode_pkcs10_body(b"\x00" * 48)  # exactly 64 base64 characters
    assert body == b"A" * 64 + b"\r\n"


def test_pkcs10_body_refuses_empty() -> None:
    with pytest.raises(InputError):
        encode_pkcs10_body(b"")


# --- certs-only PKCS#7 -----------------------------------------------------------------------


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: str | None = None,
    signer: ec.EllipticCurvePrivateKey | None = None,
    *,
    days_before: int = 1,
    ca: bool = True,
) -> x509.Certificate:
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer or subject))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(days=days_before))
        .not_valid_after(NOW + dt.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .sign(signer or key, hashes.SHA256())
    )


@pytest.fixture(scope="module")
def chain() -> list[x509.Certificate]:
    root_key = ec.generate_private_key(ec.SECP256R1())
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    root = _cert("Root", root_key)
    leaf = _cert("leaf", leaf_key, "Root", root_key, ca=False)
    return [leaf, root]


def _wrap(text: bytes, width: int, eol: bytes) -> bytes:
    return b"".join(text[i : i + width] + eol for i in range(0, len(text), width))


def test_certs_only_all_encodings(chain: list[x509.Certificate]) -> None:
    der = pkcs7.serialize_certificates(chain, Encoding.DER)
    b64 = base64.b64encode(der)
    pem = pkcs7.serialize_certificates(chain, Encoding.PEM)
    variants = {
        "der": der,
        "unwrapped": b64,
        "unwrapped+newline": b64 + b"\n",
        "crlf64": _wrap(b64, 64, b"\r\n"),
        "lf76": _wrap(b64, 76, b"\n"),
        "spaces-tabs": _wrap(b64, 10, b" \t"),
        "pem": pem,
        "pem-crlf": pem.replace(b"\n", b"\r\n"),
        "pem-with-leading-blank": b"\r\n\r\n" + pem,
    }
    for name, body in variants.items():
        got = decode_certs_only(body)
        assert [c.subject for c in got] == [c.subject for c in chain], name
        assert got == chain, name


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"", "empty"),
        (b"   \r\n", "empty"),
        (b"not base64 at all!", "neither DER nor base64"),
        (b"QUJD", "ContentInfo"),  # valid base64 of b"ABC"
        (b"MIIBIjAN", "ContentInfo"),  # truncated DER in base64
        (b"-----BEGIN PKCS7-----\nQUJD\n", "complete PKCS7"),
        (b"-----BEGIN CERTIFICATE-----\nQUJD\n-----END CERTIFICATE-----\n", "PKCS7"),
        (b"<html><body>500</body></html>", "base64"),
    ],
)
def test_certs_only_garbage(body: bytes, fragment: str) -> None:
    with pytest.raises(EstResponseError, match=fragment):
        decode_certs_only(body)


def test_certs_only_with_zero_certificates_is_an_error() -> None:
    from asn1crypto import cms

    signed = cms.SignedData(
        {
            "version": "v1",
            "digest_algorithms": [],
            "encap_content_info": {"content_type": "data"},
            "signer_infos": [],
        }
    )
    der = cms.ContentInfo({"content_type": "signed_data", "content": signed}).dump()
    with pytest.raises(EstResponseError, match="no certificate"):
        decode_certs_only(der)
    with pytest.raises(EstResponseError, match="no certificate"):
        decode_certs_only(base64.b64encode(der))


def test_certs_only_refuses_other_content_types() -> None:
    from asn1crypto import cms

    der = cms.ContentInfo({"content_type": "data", "content": b"x"}).dump()
    with pytest.raises(EstResponseError, match="signedData"):
        decode_certs_only(der)


# --- csrattrs --------------------------------------------------------------------------------


def test_csrattrs_rfc7030_example() -> None:
    attrs = parse_csrattrs(RFC7030_CSRATTRS)
    assert attrs.oids == (OID_CHALLENGE_PASSWORD, ECDSA_SHA384)
    assert attrs.challenge_password
    assert attrs.hash_oids == (ECDSA_SHA384,)
    assert attrs.key_algorithms == {OID_EC_PUBLIC_KEY: (SECP384R1,)}
    assert attrs.extension_requests == (MAC_ADDRESS,)
    assert set(attrs.attributes) == {OID_EC_PUBLIC_KEY, OID_EXTENSION_REQUEST}
    assert attrs.attributes[OID_EC_PUBLIC_KEY] == (core.ObjectIdentifier(SECP384R1).dump(),)
    assert attrs.unknown == ()
    assert not attrs.empty


def test_csrattrs_unwrapped_and_der_forms_agree() -> None:
    der = base64.b64decode(RFC7030_CSRATTRS)
    reference = parse_csrattrs(RFC7030_CSRATTRS)
    assert parse_csrattrs(der) == reference
    assert parse_csrattrs(base64.b64encode(der)) == reference
    assert parse_csrattrs(_wrap(base64.b64encode(der), 4, b" \t\n")) == reference


@pytest.mark.parametrize(
    "body", [b"", b"\r\n", b"MAA=", b"MAA=\r\n", b"\x30\x00", b"\x00", b"MAA=\x00"]
)
def test_csrattrs_empty_means_nothing_asked(body: bytes) -> None:
    attrs = parse_csrattrs(body)
    assert attrs == CsrAttributes()
    assert attrs.empty
    assert not attrs.challenge_password


def _attribute(oid: str, *values: core.Asn1Value) -> core.Sequence:
    class _Attr(core.Sequence):  # type: ignore[misc]
        _fields = [("type", core.ObjectIdentifier), ("values", core.SetOf, {"spec": core.Any})]  # noqa: RUF012

    return _Attr({"type": oid, "values": [core.Any.load(v.dump()) for v in values]})


def _csrattrs(*items: core.Asn1Value) -> bytes:
    class _Seq(core.SequenceOf):  # type: ignore[misc]
        _child_spec = core.Any

    return base64.b64encode(_Seq([core.Any.load(i.dump()) for i in items]).dump())


def test_csrattrs_libest_default_with_its_trailing_nul() -> None:
    attrs = parse_csrattrs(LIBEST_CSRATTRS)
    assert attrs.oids == (MAC_ADDRESS, EMAIL_ADDRESS, SECP384R1, SHA384)
    assert attrs.hash_oids == (SHA384,)
    # the bare curve OID reads like Attribute{id-ecPublicKey, {secp384r1}}
    assert attrs.key_algorithms == {OID_EC_PUBLIC_KEY: (SECP384R1,)}
    assert not attrs.challenge_password
    assert attrs.unknown == ()


@pytest.mark.parametrize(
    "tail",
    [b"\x00", b"\x00\x00", b"\r\n\x00", b"\x00\r\n", b" \t\x00\n", b"\n"],
)
def test_csrattrs_trailing_nul_and_whitespace_tolerated(tail: bytes) -> None:
    reference = parse_csrattrs(RFC7030_CSRATTRS)
    assert parse_csrattrs(RFC7030_CSRATTRS + tail) == reference
    assert parse_csrattrs(b"\r\n " + RFC7030_CSRATTRS.replace(b"\r\n", b"") + tail) == reference
    # raw DER with the NUL after it, too
    assert parse_csrattrs(base64.b64decode(RFC7030_CSRATTRS) + tail) == reference


def test_csrattrs_bare_curve_and_parameter_forms_agree() -> None:
    bare = parse_csrattrs(_csrattrs(core.ObjectIdentifier(SECP384R1)))
    attribute = parse_csrattrs(
        _csrattrs(_attribute(OID_EC_PUBLIC_KEY, core.ObjectIdentifier(SECP384R1)))
    )
    assert bare.key_algorithms == attribute.key_algorithms == {OID_EC_PUBLIC_KEY: (SECP384R1,)}
    both = parse_csrattrs(
        _csrattrs(
            core.ObjectIdentifier(SECP384R1),
            _attribute(OID_EC_PUBLIC_KEY, core.ObjectIdentifier(SECP384R1)),
        )
    )
    assert both.key_algorithms == {OID_EC_PUBLIC_KEY: (SECP384R1,)}


def test_csrattrs_rsa_key_oid_is_not_a_hash() -> None:
    attrs = parse_csrattrs(_csrattrs(core.ObjectIdentifier("1.2.840.113549.1.1.1")))
    assert attrs.key_algorithms == {"1.2.840.113549.1.1.1": ()}
    assert attrs.hash_oids == ()


def test_csrattrs_rfc2985_extensions_and_unknown_items() -> None:
    class _Ext(core.Sequence):  # type: ignore[misc]
        _fields = [("extn_id", core.ObjectIdentifier), ("extn_value", core.OctetString)]  # noqa: RUF012

    class _Exts(core.SequenceOf):  # type: ignore[misc]
        _child_spec = _Ext

    exts = _Exts(
        [
            {"extn_id": "2.5.29.17", "extn_value": b"\x30\x00"},
            {"extn_id": "2.5.29.37", "extn_value": b"\x30\x00"},
        ]
    )
    body = _csrattrs(
        core.ObjectIdentifier("1.2.3.4.5"),  # unknown bare OID: kept, ignored
        _attribute(OID_EXTENSION_REQUEST, exts),
        core.Integer(7),  # neither OID nor Attribute: kept in unknown
        _attribute(OID_CHALLENGE_PASSWORD, core.PrintableString("x")),
    )
    attrs = parse_csrattrs(body)
    assert attrs.oids == ("1.2.3.4.5",)
    assert attrs.extension_requests == ("2.5.29.17", "2.5.29.37")
    assert attrs.unknown == (core.Integer(7).dump(),)
    assert attrs.challenge_password  # given as an Attribute rather than a bare OID
    assert attrs.hash_oids == ()
    assert attrs.key_algorithms == {}


@pytest.mark.parametrize(
    "body",
    [
        b"MEEG",  # truncated
        b"\x30\x03\x06\x01",  # DER with a short length, not base64 either
        base64.b64encode(b"\x02\x01\x01"),  # an INTEGER, not a SEQUENCE
        base64.b64encode(base64.b64decode(RFC7030_CSRATTRS) + b"\x00"),  # trailing byte
        b"<html>404</html>",
        b"MCYG\x00" + LIBEST_CSRATTRS[4:],  # a NUL inside the base64 is not a terminator
        b"\x00" + LIBEST_CSRATTRS,  # nor one before it
    ],
)
def test_csrattrs_malformed(body: bytes) -> None:
    with pytest.raises(EstResponseError):
        parse_csrattrs(body)


# --- proof-of-possession refusals ------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # libest 3.2.0p (EST_BODY_POP_MISMATCH, sent with 401)
        ("Proof of Possession Mismatch.\n", ""),
        # the test server
        ("PoP required: CSR lacks challengePassword = base64(tls-unique)", "tls-unique"),
        ("PoP failed: challengePassword does not match this TLS session", ""),
        ("challenge password missing", ""),
        ("channel binding tls_exporter mismatch", "tls-exporter"),
        ("TLS-Unique value wrong", "tls-unique"),
        ("Invalid or corrupted pkcs10 request.\n", None),  # libest EST_BODY_BAD_PKCS10
        ("popular request", None),
        ("", None),
    ],
)
def test_pop_refusal(text: str, expected: str | None) -> None:
    assert pop_refusal(text) == expected


# --- Retry-After -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("120", 120.0),
        (" 0 ", 0.0),
        ("7200", 3600.0),  # capped
        ("99999999999999999999999", 3600.0),
        ("Sat, 28 Nov 2026 12:05:00 GMT", 300.0),  # IMF-fixdate
        ("Saturday, 28-Nov-26 12:01:30 GMT", 90.0),  # obsolete RFC 850 form
        ("Sat Nov 28 12:00:45 2026", 45.0),  # obsolete asctime form (GMT by definition)
        ("Fri, 27 Nov 2026 12:00:00 GMT", 0.0),  # in the past
        ("Sat, 28 Nov 2027 12:00:00 GMT", 3600.0),  # far future: capped
        (None, 60.0),
        ("", 60.0),
        ("soon", 60.0),
        ("-5", 60.0),  # not 1*DIGIT
        ("1.5", 60.0),
        ("Sat, 99 Nov 2026 12:00:00 GMT", 60.0),
    ],
)
def test_retry_after(value: str | None, expected: float) -> None:
    assert parse_retry_after(value, now=NOW) == pytest.approx(expected)


def test_retry_after_naive_now_is_utc_and_custom_bounds() -> None:
    naive = NOW.replace(tzinfo=None)
    assert parse_retry_after("Sat, 28 Nov 2026 12:00:10 GMT", now=naive) == 10.0
    assert parse_retry_after("garbage", now=NOW, default_s=5, cap_s=3) == 3.0
    assert parse_retry_after("100", now=NOW, cap_s=-1) == 0.0


# --- error excerpts --------------------------------------------------------------------------


def test_error_excerpt() -> None:
    assert error_excerpt(b"<html><body><h1>400</h1>\r\n  Bad\trequest</body></html>") == (
        "400 Bad request"
    )
    assert error_excerpt(b"\x00\x01bad\x1b[31m red") == "bad [31m red"
    assert error_excerpt(b"caf\xc3\xa9 \xff") == "café"
    long = error_excerpt(b"x" * 10_000, limit=50)
    assert len(long) == 50
    assert long.endswith("…")
    assert error_excerpt(b"") == ""
    assert error_excerpt(b"abc", limit=0) in ("a", "…")


# --- CA rollover -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rollover() -> dict[str, x509.Certificate]:
    old_key = ec.generate_private_key(ec.SECP256R1())
    new_key = ec.generate_private_key(ec.SECP256R1())
    sub_key = ec.generate_private_key(ec.SECP256R1())
    # RFC 4210 §4.4: the same CA name, a new key pair; the links cross-sign the keys.
    return {
        "old_with_old": _cert("EST CA", old_key, days_before=300),
        "new_with_new": _cert("EST CA", new_key, days_before=1),
        "new_with_old": _cert("EST CA", new_key, "EST CA", old_key, days_before=1),
        "old_with_new": _cert("EST CA", old_key, "EST CA", new_key, days_before=1),
        "sub": _cert("Issuing CA", sub_key, "EST CA", new_key),
    }


def _spki(cert: x509.Certificate) -> bytes:
    from cryptography.hazmat.primitives.serialization import PublicFormat

    return cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


@pytest.mark.parametrize("order", [(0, 1, 2, 3, 4), (4, 3, 2, 1, 0), (2, 4, 0, 3, 1)])
def test_rollover_classified_by_signatures_not_order(
    rollover: dict[str, x509.Certificate], order: tuple[int, ...]
) -> None:
    listed = list(rollover.values())
    result = classify_cacerts([listed[i] for i in order])
    assert result.anchor == rollover["old_with_old"]
    assert result.new_root == rollover["new_with_new"]
    assert result.new_with_old == rollover["new_with_old"]
    assert result.old_with_new == rollover["old_with_new"]
    assert set(result.roots) == {rollover["old_with_old"], rollover["new_with_new"]}
    assert result.roots[0] == result.anchor
    assert result.intermediates == (rollover["sub"],)
    assert len(result.all) == 5


def test_rollover_known_anchor_decides_which_root_is_old(
    rollover: dict[str, x509.Certificate],
) -> None:
    # A device that already trusts the *new* key (say after the switch) keeps it as anchor,
    # whatever the dates say; the link certified by it is then NewWithOld from its viewpoint.
    result = classify_cacerts(list(rollover.values()), current_anchor=rollover["new_with_new"])
    assert result.anchor == rollover["new_with_new"]
    assert result.new_root == rollover["old_with_old"]
    assert result.new_with_old == rollover["old_with_new"]
    # an anchor given as a different certificate with the same key still matches
    same_key = classify_cacerts(list(rollover.values()), current_anchor=rollover["new_with_old"])
    assert same_key.anchor == rollover["new_with_new"]


def test_rollover_without_link_does_not_trust_second_root(
    rollover: dict[str, x509.Certificate],
) -> None:
    result = classify_cacerts(
        [rollover["new_with_new"], rollover["old_with_old"], rollover["old_with_new"]]
    )
    assert result.anchor == rollover["old_with_old"]
    assert result.new_root is None  # not certified by the old key: no NewWithOld
    assert result.old_with_new == rollover["old_with_new"]


def test_single_root_and_duplicates(chain: list[x509.Certificate]) -> None:
    leaf, root = chain
    result = classify_cacerts([root, leaf, root])
    assert result.anchor == root
    assert result.roots == (root,)
    assert result.new_root is None
    assert result.intermediates == (leaf,)


def test_link_is_not_a_root_even_if_self_issued(rollover: dict[str, x509.Certificate]) -> None:
    # NewWithOld is self-issued (subject == issuer) but not self-signed
    link = rollover["new_with_old"]
    assert link.subject == link.issuer
    result = classify_cacerts([rollover["old_with_old"], link])
    assert result.roots == (rollover["old_with_old"],)
    assert result.new_root is None  # NewWithNew itself is missing
    assert link in result.intermediates
    assert _spki(link) != _spki(result.anchor)


def test_no_root_is_an_error(rollover: dict[str, x509.Certificate]) -> None:
    with pytest.raises(EstResponseError, match="root"):
        classify_cacerts([rollover["sub"]])
    with pytest.raises(EstResponseError):
        classify_cacerts([])


# --- PoP -------------------------------------------------------------------------------------


def test_challenge_password_value() -> None:
    # TLS 1.2 tls-unique is the 12-byte Finished verify_data: 16 base64 characters
    value = challenge_password_value(bytes(range(12)))
    assert value == "AAECAwQFBgcICQoL"
    assert len(challenge_password_value(b"\xff" * 32)) == 44  # RFC 9266 tls-exporter
    assert "\n" not in challenge_password_value(b"\x01" * 200)
    with pytest.raises(InputError):
        challenge_password_value(b"")


# --- properties: typed errors only, never a crash --------------------------------------------


def _der_like() -> st.SearchStrategy[bytes]:
    """Random bytes, and random bytes behind a plausible SEQUENCE header (reaches the parser)."""
    return st.one_of(
        st.binary(max_size=300),
        st.binary(max_size=200).map(lambda b: b"\x30" + bytes([len(b) & 0x7F]) + b),
        st.binary(max_size=200).map(
            lambda b: base64.b64encode(b"\x30" + bytes([len(b) & 0x7F]) + b)
        ),
        st.binary(max_size=200).map(
            lambda b: b"-----BEGIN PKCS7-----\n" + base64.b64encode(b) + b"\n-----END PKCS7-----\n"
        ),
    )


@settings(max_examples=400, deadline=None)
@given(_der_like())
def test_decode_certs_only_raises_only_typed_errors(body: bytes) -> None:
    try:
        certs = decode_certs_only(body)
    except EstAgentError:
        return
    assert certs  # if it parsed, there are certificates


@settings(max_examples=400, deadline=None)
@given(_der_like())
def test_parse_csrattrs_raises_only_typed_errors(body: bytes) -> None:
    try:
        attrs = parse_csrattrs(body)
    except EstAgentError:
        return
    assert isinstance(attrs, CsrAttributes)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.builds(
                lambda first, second, rest: core.ObjectIdentifier(
                    ".".join(map(str, [first, second, *rest]))
                ),
                st.integers(0, 2),
                st.integers(0, 39),
                st.lists(st.integers(0, 10**6), max_size=4),
            ),
            st.integers().map(core.Integer),
            st.text(max_size=10).map(core.UTF8String),
        ),
        max_size=6,
    )
)
def test_parse_csrattrs_keeps_every_item(items: list[core.Asn1Value]) -> None:
    attrs = parse_csrattrs(_csrattrs(*items))
    oids = [i.dotted for i in items if isinstance(i, core.ObjectIdentifier)]
    assert list(attrs.oids) == oids
    assert len(attrs.unknown) == len(items) - len(oids)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.none(), st.text(max_size=60)), st.floats(min_value=-10, max_value=1e6))
def test_parse_retry_after_always_within_bounds(value: str | None, cap: float) -> None:
    got = parse_retry_after(value, now=NOW, cap_s=cap)
    assert 0.0 <= got <= max(cap, 0.0)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=3000), st.integers(min_value=-5, max_value=300))
def test_error_excerpt_bounded_and_printable(body: bytes, limit: int) -> None:
    text = error_excerpt(body, limit)
    assert len(text) <= max(limit, 1)
    assert all(ch.isprintable() for ch in text)
    assert "  " not in text


@settings(max_examples=200, deadline=None)
@given(
    st.text(max_size=40), st.sampled_from(["cacerts", "simpleenroll", "x"]), st.text(max_size=12)
)
def test_est_url_raises_only_typed_errors(base: str, operation: str, label: str) -> None:
    try:
        url = est_url(base, operation, label)
    except EstAgentError:
        return
    assert url.startswith("https://")
    assert url.endswith("/" + operation)


# built once: the strategy below must draw the same way on every run
_VALID_CERTS_ONLY = pkcs7.serialize_certificates(
    [_cert("Root", ec.derive_private_key(1234567, ec.SECP256R1()))], Encoding.DER
)


@settings(max_examples=500, deadline=None)
@given(st.data())
def test_mutated_certs_only_and_csrattrs_raise_only_typed_errors(data: st.DataObject) -> None:
    # Valid bodies with one byte changed or cut short reach deep into the ASN.1 parsers.
    for valid, parse in (
        (_VALID_CERTS_ONLY, decode_certs_only),
        (base64.b64decode(RFC7030_CSRATTRS), parse_csrattrs),
    ):
        body = bytearray(valid)
        index = data.draw(st.integers(0, len(body) - 1))
        body[index] = data.draw(st.integers(0, 255))
        cut = data.draw(st.integers(1, len(body)))
        for candidate in (bytes(body), bytes(body[:cut]), base64.b64encode(bytes(body[:cut]))):
            with contextlib.suppress(EstAgentError):
                parse(candidate)  # type: ignore[operator]


def test_raw_der_ending_in_whitespace_bytes_is_not_trimmed() -> None:
    # The last OID arc 10 is encoded as 0x0A (LF), 32 as 0x20 (space): trimming whitespace
    # from a DER body before parsing would cut it.
    for arc in (9, 10, 13, 32):
        der = _csrattrs_der(core.ObjectIdentifier(f"1.2.3.{arc}"))
        assert der[-1] == arc
        assert parse_csrattrs(der).oids == (f"1.2.3.{arc}",)


def _csrattrs_der(*items: core.Asn1Value) -> bytes:
    return base64.b64decode(_csrattrs(*items))


def test_certificate_with_non_positive_serial_is_refused() -> None:
    # Found by the mutation property test: cryptography only warns about serial 0 (RFC 5280
    # §4.1.2.2 forbids it); the decoder must refuse it with a typed error, not pass it on.
    from asn1crypto import cms
    from asn1crypto import x509 as asn1_x509

    generated = _cert("serial", ec.generate_private_key(ec.SECP256R1()))
    good = pkcs7.serialize_certificates([generated], Encoding.DER)
    assert decode_certs_only(good) == [generated]
    info = cms.ContentInfo.load(good)
    cert = info["content"]["certificates"][0].chosen
    tbs = cert["tbs_certificate"].copy()
    tbs["serial_number"] = 0
    cert = asn1_x509.Certificate(
        {
            "tbs_certificate": tbs,
            "signature_algorithm": cert["signature_algorithm"],
            "signature_value": cert["signature_value"],
        }
    )
    bad = cms.ContentInfo(
        {
            "content_type": "signed_data",
            "content": cms.SignedData(
                {
                    "version": "v1",
                    "digest_algorithms": [],
                    "encap_content_info": {"content_type": "data"},
                    "certificates": [cert],
                    "signer_infos": [],
                }
            ),
        }
    ).dump()
    with pytest.raises(EstResponseError, match="malformed certificate"):
        decode_certs_only(bad)


# --- credentials echoed in error bodies ------------------------------------------------------

# base64("dev:s3cret"), RFC 7617 §2, written out here rather than computed
DEV_TOKEN = "ZGV2OnMzY3JldA=="
DEV_SECRETS = basic_credential_secrets("dev", "s3cret")


def test_basic_credential_secrets_cover_the_password_and_its_token() -> None:
    assert {"s3cret", DEV_TOKEN, "ZGV2OnMzY3JldA"} <= set(DEV_SECRETS)
    assert basic_credential_secrets("dev", "") == ()
    assert [len(s) for s in DEV_SECRETS] == sorted((len(s) for s in DEV_SECRETS), reverse=True)


@pytest.mark.parametrize(
    ("body", "kept"),
    [
        # a server that echoes the request head into its 400 page
        (
            b"400 Bad Request\r\nPOST /.well-known/est/simpleenroll HTTP/1.1\r\n"
            b"Authorization: Basic ZGV2OnMzY3JldA==\r\nHost: est.example\r\n",
            "Host: est.example",
        ),
        # ... as HTML, the header on one line with the rest of the table
        (
            b"<html><pre>authorization: basic ZGV2OnMzY3JldA==\nuser-agent: x</pre></html>",
            "user-agent: x",
        ),
        # ... as JSON, with the header value quoted and the password decoded elsewhere
        (
            b'{"error": "bad csr", "headers": {"Authorization": "Basic ZGV2OnMzY3JldA"},'
            b' "user": "dev", "password": "s3cret"}',
            '"user": "dev"',
        ),
        # a proxy credential, masked even though the client never had it
        (b"Proxy-Authorization: Bearer abc.def.ghi\r\nVia: 1.1 proxy", "Via: 1.1 proxy"),
        # the token somewhere else in the text
        (b"rejected token ZGV2OnMzY3JldA== for realm est", "for realm est"),
    ],
)
def test_error_excerpt_masks_echoed_credentials(body: bytes, kept: str) -> None:
    text = error_excerpt(body, secrets=DEV_SECRETS)
    for leaked in ("s3cret", "ZGV2OnMz", "abc.def"):
        assert leaked not in text
    assert "[REDACTED]" in text
    assert kept in text


def test_masking_twice_changes_nothing() -> None:
    # The client masks excerpts, then whole messages (excerpts joined into one line): the
    # second pass must not swallow the rest of the line after an already masked value.
    once = error_excerpt(b"Authorization: Basic eHk6eg==\r\nuser-agent: est", secrets=("eHk6eg==",))
    assert once == "Authorization: [REDACTED] user-agent: est"
    assert redact_secrets(once, ("eHk6eg==",)) == once
    assert redact_secrets('{"Authorization": "[REDACTED]", "k": 1}') == (
        '{"Authorization": "[REDACTED]", "k": 1}'
    )


def test_error_excerpt_masks_a_secret_cut_by_the_window() -> None:
    # The body is cut before the excerpt is built: a password straddling the cut must not
    # leave its first letters behind.
    body = b" " * 93 + b"s3cret" + b" tail" * 50
    text = error_excerpt(body, limit=10, secrets=DEV_SECRETS)
    assert "s3c" not in text and "s3" not in text
    assert text.startswith("[RED")


# --- content codings -------------------------------------------------------------------------


def _decode(coding: str | None, wire: bytes, limit: int = 1 << 20, step: int = 7) -> bytes:
    decoder = ContentDecoder(coding, limit)
    out = []
    for start in range(0, len(wire), step):
        out += decoder.feed(wire[start : start + step])
    decoder.finish()
    return b"".join(out)


PLAIN = b"MIIB certs-only body " * 300


@pytest.mark.parametrize(
    ("coding", "wire"),
    [
        (None, PLAIN),
        ("identity", PLAIN),
        ("gzip", gzip.compress(PLAIN)),
        ("x-gzip", gzip.compress(PLAIN)),
        ("deflate", zlib.compress(PLAIN)),  # RFC 9110 §8.4.1.2: the zlib format
        ("deflate", zlib.compress(PLAIN)[2:-4]),  # raw deflate, as some servers send it
        ("gzip, gzip", gzip.compress(gzip.compress(PLAIN))),
        ("deflate, identity, GZIP", gzip.compress(zlib.compress(PLAIN))),
    ],
)
def test_content_codings_are_undone(coding: str | None, wire: bytes) -> None:
    assert _decode(coding, wire) == PLAIN


def test_gzip_of_several_members_is_one_body() -> None:
    # RFC 1952 §2.2: a gzip file is a series of members.
    assert _decode("gzip", gzip.compress(PLAIN) + gzip.compress(b"more")) == PLAIN + b"more"


@pytest.mark.parametrize(
    ("coding", "wire", "match"),
    [
        ("br", b"\x0b\x02\x80hi\x03", "unsupported Content-Encoding 'br'"),
        ("zstd", b"", "unsupported Content-Encoding 'zstd'"),
        ("gzip, compress", b"", "unsupported Content-Encoding 'compress'"),
        ("gzip, gzip, gzip, gzip", b"", "4 codings"),
        ("gzip", gzip.compress(PLAIN)[:-6], "truncated gzip"),
        ("gzip", b"this is not gzip at all", "malformed gzip"),
        ("deflate", zlib.compress(PLAIN) + b"junk", "after the end"),
        ("gzip", gzip.compress(PLAIN) + b"junk", "malformed gzip"),
    ],
)
def test_content_coding_refusals(coding: str, wire: bytes, match: str) -> None:
    with pytest.raises(EstResponseError, match=match):
        _decode(coding, wire)


def test_parse_content_codings_in_order_applied() -> None:
    assert parse_content_codings(None) == ()
    assert parse_content_codings(" identity ") == ()
    assert parse_content_codings("deflate, GZip") == ("deflate", "gzip")


def test_gzip_bomb_is_refused_at_the_cap_without_inflating_it() -> None:
    # "gzip, gzip" of 4 GiB of zeros: a few KB on the wire. The cap is on decoded bytes,
    # enforced while decoding: at most one 64 KiB step past it is ever produced.
    wire = gzip_gzip_bomb()
    assert len(wire) < 16 * 1024
    decoder = ContentDecoder("gzip, gzip", 1 << 20)
    started = time.monotonic()
    with pytest.raises(EstResponseError, match="exceeds the 1048576 byte cap"):
        for start in range(0, len(wire), 4096):
            decoder.feed(wire[start : start + 4096])
    assert time.monotonic() - started < 1.0
    assert (1 << 20) < decoder.size <= (1 << 20) + 64 * 1024


def test_the_bomb_generator_makes_real_gzip() -> None:
    # The 4 GiB bomb is this generator at a larger size: check its output with the stdlib.
    member = b"".join(gzip_of_zeros(8 * 1024 * 1024))
    assert gzip.decompress(member) == bytes(8 * 1024 * 1024)


# --- certificates cryptography parses lazily -------------------------------------------------


@pytest.fixture(scope="module")
def odd_ca() -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    ca = make_ca("odd certificates CA", dt.datetime.now(dt.UTC), dt.timedelta(days=2))
    return ca.certificate, ca.key


def _p192_sub_ca(ca: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    p192 = ec.generate_private_key(ec.SECP192R1()).public_key()
    return issue(ca, key, p192, cn="P-192 sub CA", ca=True)


def test_p192_certificate_is_refused(
    odd_ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
) -> None:
    ca, key = odd_ca
    with pytest.raises(EstResponseError, match="secp192r1, which is not an allowed curve"):
        decode_certs_only(certs_only(ca, _p192_sub_ca(ca, key)))


@pytest.mark.parametrize(
    ("new_oid", "match"),
    [
        (OID_PRIME192V2, "cannot be used: Curve 1.2.840.10045.3.1.2 is not supported"),
        # a P-192 point labelled P-256: not on the curve
        (bytes.fromhex("06082A8648CE3D030107"), "cannot be used: Invalid key"),
    ],
)
def test_key_cryptography_cannot_load_is_refused(
    odd_ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey], new_oid: bytes, match: str
) -> None:
    ca, key = odd_ca
    odd = with_curve_oid(_p192_sub_ca(ca, key), key, OID_SECP192R1, new_oid)
    odd.verify_directly_issued_by(ca)  # a genuine signature: only the key is odd
    with pytest.raises(EstResponseError, match=match):
        decode_certs_only(certs_only(ca, odd))


def test_duplicate_extension_is_refused(
    odd_ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
) -> None:
    ca, key = odd_ca
    leaf = issue(ca, key, ec.generate_private_key(ec.SECP256R1()).public_key())
    dup = with_duplicate_extension(leaf, key)
    with pytest.raises(x509.DuplicateExtension):
        dup.extensions  # noqa: B018 - what the client used to meet deep inside
    with pytest.raises(
        EstResponseError, match=r"certificate \d in PKCS#7 repeats the 2\.5\.29\.37"
    ):
        decode_certs_only(certs_only(dup, ca))


def test_small_rsa_key_is_refused(
    odd_ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
) -> None:
    from cryptography.hazmat.primitives.asymmetric import rsa

    ca, key = odd_ca
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # speed only
    cert = (
        x509.CertificateBuilder()
        .subject_name(ca.subject)
        .issuer_name(ca.subject)
        .public_key(small.public_key())
        .serial_number(9)
        .not_valid_before(ca.not_valid_before_utc)
        .not_valid_after(ca.not_valid_after_utc)
        .sign(key, hashes.SHA256())
    )
    with pytest.raises(EstResponseError, match="1024-bit RSA key"):
        decode_certs_only(certs_only(ca, cert))


# --- RFC 7030 Appendix A.1 -------------------------------------------------------------------

_APPENDIX_A1 = Path(__file__).resolve().parents[1] / "vectors" / "rfc7030-appendix-a1-cacerts.b64"


def test_appendix_a1_cacerts_refusal_names_the_sha1_signatures() -> None:
    # RFC 7030's own /cacerts example: four RSA certificates signed with sha1WithRSAEncryption.
    # SHA-1 stays refused; the error must say that is why, not only that no root was found.
    body = _APPENDIX_A1.read_bytes()
    assert len(body) == 4246  # the Content-Length printed in Appendix A.1
    certs = decode_certs_only(body)
    assert sorted(c.subject.rfc4514_string() for c in certs) == [
        "CN=estExampleCA NwN",
        "CN=estExampleCA NwO",
        "CN=estExampleCA OwN",
        "CN=estExampleCA OwO",
    ]
    with pytest.raises(EstResponseError) as refused:
        classify_cacerts(certs)
    message = str(refused.value)
    assert "no self-signed root" in message
    assert "sha1_rsa (1.2.840.113549.1.1.5)" in message
    # the two self-signed roots are named, the links (signed by the other key) are not
    assert "CN=estExampleCA OwO" in message and "CN=estExampleCA NwN" in message
    assert "NwO" not in message and "OwN" not in message


def test_a_root_with_a_bad_signature_is_not_blamed_on_its_algorithm(
    rollover: dict[str, x509.Certificate],
) -> None:
    with pytest.raises(EstResponseError) as refused:
        classify_cacerts([rollover["sub"]])
    assert "signature algorithm" not in str(refused.value)
