"""Pure codecs of the test server, tested with byte vectors."""

from __future__ import annotations

import base64
from datetime import UTC, datetime

import pytest
from cryptography.hazmat.primitives.serialization import pkcs7

from est_agent.errors import UsageError
from est_agent.testserver.pki import generate_dev_pki, load_dev_pki
from est_agent.testserver.wire import (
    CsrAttrsKind,
    EstPath,
    HttpRefusal,
    RetryAfterFormat,
    csrattrs_body,
    decode_base64_body,
    encode_base64_body,
    encode_certs_only,
    encode_csrattrs,
    format_retry_after,
    media_type_of,
    parse_basic_authorization,
    parse_duration,
    parse_est_path,
    parse_listen,
)

# RFC 7030 §4.5.2 example CsrAttrs, as published (RFC 8951 §4 keeps it).
RFC_CSRATTRS_B64 = (
    "MEEGCSqGSIb3DQEJBzASBgcqhkjOPQIBMQcGBSuBBAAiMBYGCSqGSIb3DQEJDjEJBgcrBgEBAQEWBggqhkjOPQQDAw=="
)


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/.well-known/est/cacerts", EstPath(None, "cacerts")),
        ("/.well-known/est/simpleenroll?x=1", EstPath(None, "simpleenroll")),
        ("/.well-known/est/iot/simplereenroll", EstPath("iot", "simplereenroll")),
        ("/.well-known/est/serverkeygen", EstPath(None, "serverkeygen")),
        ("/.well-known/est/a.b-c_d/fullcmc", EstPath("a.b-c_d", "fullcmc")),
    ],
)
def test_parse_est_path_accepts(path: str, expected: EstPath) -> None:
    assert parse_est_path(path) == expected


@pytest.mark.parametrize(
    "path",
    [
        "/",
        "/.well-known/est/",
        "/.well-known/est//cacerts",
        "/.well-known/est/a/b/cacerts",
        "/.well-known/est/nope",
        "/.well-known/est/../cacerts",
        "/.well-known/EST/cacerts",
        "/.well-known/est/%2e%2e/cacerts",
    ],
)
def test_parse_est_path_refuses_with_404(path: str) -> None:
    with pytest.raises(HttpRefusal) as info:
        parse_est_path(path)
    assert info.value.status == 404


def test_media_type_ignores_parameters_and_case() -> None:
    assert media_type_of("Application/PKCS10; charset=x") == "application/pkcs10"
    assert media_type_of(None) == ""


@pytest.mark.parametrize(
    "body",
    [
        b"AAEC",
        b"AAEC\n",
        b"AA\r\nEC\r\n",
        b" A A\tE C ",
    ],
)
def test_decode_base64_body_tolerates_whitespace(body: bytes) -> None:
    assert decode_base64_body(body) == b"\x00\x01\x02"


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"\r\n",
        b"AAE",
        b"AA=C",
        b"-----BEGIN CERTIFICATE REQUEST-----\nAAEC\n-----END CERTIFICATE REQUEST-----\n",
        b"\x30\x82\x01\x00",
        "AAEC\u00e9".encode(),
    ],
)
def test_decode_base64_body_refuses_with_400(body: bytes) -> None:
    with pytest.raises(HttpRefusal) as info:
        decode_base64_body(body)
    assert info.value.status == 400


def test_encode_base64_body_wraps_at_64_with_crlf() -> None:
    der = bytes(range(256))
    wrapped = encode_base64_body(der)
    lines = wrapped.split(b"\r\n")
    assert lines[-1] == b""
    assert all(len(line) == 64 for line in lines[:-2])
    assert 0 < len(lines[-2]) <= 64
    assert base64.b64decode(wrapped.replace(b"\r\n", b"")) == der
    assert encode_base64_body(der, wrap=False) == base64.b64encode(der)


def test_csrattrs_rfc_example_is_byte_exact() -> None:
    der = encode_csrattrs(CsrAttrsKind.RFC8951)
    assert der is not None
    assert base64.b64encode(der).decode() == RFC_CSRATTRS_B64


def test_csrattrs_other_kinds() -> None:
    assert encode_csrattrs(CsrAttrsKind.NONE) is None
    assert encode_csrattrs(CsrAttrsKind.EMPTY) == b"\x30\x00"
    assert encode_csrattrs(CsrAttrsKind.CHALLENGE_PASSWORD) == bytes.fromhex(
        "300b06092a864886f70d010907"
    )
    p256 = encode_csrattrs(CsrAttrsKind.P256)
    assert p256 is not None
    assert bytes.fromhex("06082a8648ce3d030107") in p256  # prime256v1
    assert p256.endswith(bytes.fromhex("06082a8648ce3d040302"))  # ecdsa-with-SHA256


# Cisco libest 3.2.0p, example/server/estserver.c: TEST_CSR, the default /csrattrs answer
# (macAddress, emailAddress, secp384r1, sha384), copied from its source.
LIBEST_CSRATTRS_B64 = b"MCYGBysGAQEBARYGCSqGSIb3DQEJAQYFK4EEACIGCWCGSAFlAwQCAg=="


def test_csrattrs_libest_default_is_byte_exact() -> None:
    # libest returns sizeof(TEST_CSR) bytes: the base64 and the C string's NUL, unwrapped.
    body = csrattrs_body(CsrAttrsKind.LIBEST_DEFAULT, wrap=True, trailing_nul=False)
    assert body == LIBEST_CSRATTRS_B64 + b"\x00"
    assert len(body) == 57


def test_csrattrs_trailing_nul_switch() -> None:
    body = csrattrs_body(CsrAttrsKind.RFC8951, wrap=False, trailing_nul=True)
    assert body == RFC_CSRATTRS_B64.encode() + b"\x00"
    wrapped = csrattrs_body(CsrAttrsKind.RFC8951, wrap=True, trailing_nul=True)
    assert wrapped is not None and wrapped.endswith(b"\r\n\x00")
    assert csrattrs_body(CsrAttrsKind.RFC8951, wrap=False, trailing_nul=False) == (
        RFC_CSRATTRS_B64.encode()
    )
    assert csrattrs_body(CsrAttrsKind.NONE, wrap=False, trailing_nul=True) is None


def test_retry_after_seconds_rounds_up() -> None:
    now = datetime(2026, 1, 2, 3, 4, 5, 500000, tzinfo=UTC)
    assert format_retry_after(1.2, RetryAfterFormat.SECONDS, now) == "2"
    assert format_retry_after(0, RetryAfterFormat.SECONDS, now) == "0"
    assert format_retry_after(-3, RetryAfterFormat.SECONDS, now) == "0"


def test_retry_after_http_date_is_never_early() -> None:
    now = datetime(2026, 1, 2, 3, 4, 5, 500000, tzinfo=UTC)
    # 5.5 s + 1 s ceil -> not before 03:04:07, so 03:04:07 exactly.
    assert (
        format_retry_after(1.0, RetryAfterFormat.HTTP_DATE, now) == "Fri, 02 Jan 2026 03:04:07 GMT"
    )
    exact = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert (
        format_retry_after(2, RetryAfterFormat.HTTP_DATE, exact) == "Fri, 02 Jan 2026 03:04:07 GMT"
    )


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("Basic YWxpY2U6czNjcjN0", ("alice", "s3cr3t")),
        ("basic   YWxpY2U6czNjcjN0", ("alice", "s3cr3t")),
        ("Basic YWxpY2U6", ("alice", "")),
        ("Basic YWxpY2U6YTpi", ("alice", "a:b")),
        (None, None),
        ("", None),
        ("Bearer abc", None),
        ("Basic", None),
        ("Basic !!!", None),
        ("Basic YWxpY2U=", None),  # no colon
        ("Basic //79", None),  # not UTF-8
    ],
)
def test_parse_basic_authorization(header: str | None, expected: tuple[str, str] | None) -> None:
    assert parse_basic_authorization(header) == expected


@pytest.mark.parametrize(
    ("text", "seconds"), [("90", 90), ("90s", 90), ("5m", 300), ("2h", 7200), ("30d", 2592000)]
)
def test_parse_duration(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "s", "1.5s", "-1", "10w", "1 d"])
def test_parse_duration_refuses(text: str) -> None:
    with pytest.raises(UsageError, match=r"^not a duration: "):
        parse_duration(text)


def test_parse_listen() -> None:
    assert parse_listen("127.0.0.1:0") == ("127.0.0.1", 0)
    assert parse_listen("[::1]:8443") == ("::1", 8443)
    assert parse_listen("0.0.0.0:8443") == ("0.0.0.0", 8443)
    for bad in ("8443", ":8443", "host:", "host:x"):
        with pytest.raises(UsageError, match=r"^not HOST:PORT: "):
            parse_listen(bad)
    with pytest.raises(UsageError, match=r"^port out of range: 99999"):
        parse_listen("host:99999")


def test_certs_only_round_trips(tmp_path) -> None:  # type: ignore[no-untyped-def]
    generate_dev_pki(tmp_path)
    ca = load_dev_pki(tmp_path).est_ca.certificate
    assert pkcs7.load_der_pkcs7_certificates(encode_certs_only([ca])) == [ca]
