"""RFC 7512 ``pkcs11:`` URIs: a pure parser, table-tested (est_agent/pkcs11_uri.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from est_agent.errors import InputError
from est_agent.pkcs11_uri import Pkcs11Uri, parse_pkcs11_uri

GOOD = [
    # RFC 7512 §3.3's own examples (the parts this agent reads)
    ("pkcs11:", Pkcs11Uri()),
    ("pkcs11:object=my-pubkey;type=public", Pkcs11Uri(object="my-pubkey", type="public")),
    (
        "pkcs11:object=my-key;type=private?pin-source=file:/etc/token",
        Pkcs11Uri(object="my-key", type="private", pin_source="file:/etc/token"),
    ),
    (
        "pkcs11:token=The%20Software%20PKCS%2311%20Softtoken;manufacturer=Snake%20Oil,%20Inc.;"
        "model=1.0;object=my-certificate;type=cert;id=%69%95%3E%5C%F4%BD%EC%91;serial=",
        Pkcs11Uri(
            token="The Software PKCS#11 Softtoken",
            manufacturer="Snake Oil, Inc.",
            model="1.0",
            object="my-certificate",
            type="cert",
            id=bytes.fromhex("69953e5cf4bdec91"),
            serial="",
        ),
    ),
    (
        "pkcs11:object=my-sign-key;type=private?module-name=mypkcs11",
        Pkcs11Uri(object="my-sign-key", type="private", module_name="mypkcs11"),
    ),
    (
        "pkcs11:object=my-sign-key;type=private?module-path=/mnt/libmypkcs11.so.1",
        Pkcs11Uri(object="my-sign-key", type="private", module_path="/mnt/libmypkcs11.so.1"),
    ),
    # Anjay's form (issue 14)
    ("pkcs11:token=MyToken;object=EstClientKey", Pkcs11Uri(token="MyToken", object="EstClientKey")),
    # id is bytes: %-encoded, any byte value, case-insensitive hex
    ("pkcs11:id=%00%ff%Aa", Pkcs11Uri(id=b"\x00\xff\xaa")),
    # id may also carry unencoded characters (their bytes)
    ("pkcs11:id=ab%01", Pkcs11Uri(id=b"ab\x01")),
    # UTF-8 in a label, percent-encoded
    ("pkcs11:object=cl%C3%A9", Pkcs11Uri(object="clé")),
    # attribute names are case-insensitive, the scheme too
    ("PKCS11:Token=t;OBJECT=o", Pkcs11Uri(token="t", object="o")),
    ("pkcs11:slot-id=3", Pkcs11Uri(slot_id=3)),
    # trailing separators name nothing
    ("pkcs11:object=o;", Pkcs11Uri(object="o")),
]


@pytest.mark.parametrize(("text", "expected"), GOOD)
def test_parses(text: str, expected: Pkcs11Uri) -> None:
    assert parse_pkcs11_uri(text) == expected


def test_pin_value_is_parsed_but_never_printed() -> None:
    uri = parse_pkcs11_uri("pkcs11:token=t;object=o?pin-value=s3cr%65t-4711")
    assert uri.pin_value == "s3cret-4711"
    assert "s3cret-4711" not in str(uri)
    assert "s3cret-4711" not in repr(uri)
    assert "pin" not in str(uri)
    # the PIN is no part of which object is named
    assert uri == parse_pkcs11_uri("pkcs11:token=t;object=o")


@pytest.mark.parametrize(
    ("source", "path"),
    [
        ("file:/etc/pin", Path("/etc/pin")),
        ("file:///etc/pin", Path("/etc/pin")),
        ("/etc/pin", Path("/etc/pin")),
        ("file:pin.txt", Path("pin.txt")),
    ],
)
def test_pin_source_file(source: str, path: Path) -> None:
    assert parse_pkcs11_uri(f"pkcs11:object=o?pin-source={source}").pin_file() == path


def test_unknown_query_attributes_are_kept_and_ignored() -> None:
    uri = parse_pkcs11_uri("pkcs11:object=o?x-vendor=1&future-attr=2")
    assert uri == Pkcs11Uri(object="o")
    assert uri.other == (("x-vendor", "1"), ("future-attr", "2"))


def test_vendor_path_attribute_is_kept() -> None:
    assert parse_pkcs11_uri("pkcs11:object=o;x-vendor=v").other == (("x-vendor", "v"),)


def test_str_round_trips() -> None:
    text = "pkcs11:token=My%20Token;object=a%3Bb;type=private;id=%01%02?module-path=/usr/lib/x.so"
    uri = parse_pkcs11_uri(text)
    assert uri.object == "a;b"
    assert str(uri) == text
    assert parse_pkcs11_uri(str(uri)) == uri


BAD = [
    ("pkcs11:objekt=o", "unknown path attribute 'objekt'"),
    ("pkcs11:object=o;object=p", "object given twice"),
    ("pkcs11:object=o?pin-value=1&pin-value=2", "pin-value given twice"),
    ("pkcs11:object=o?pin-value=1&pin-source=file:/x", "pin-value and pin-source both given"),
    ("pkcs11:id=%0", "id: malformed percent-encoding"),
    ("pkcs11:object=%zz", "object: malformed percent-encoding"),
    ("pkcs11:object=%ff", "object is not UTF-8"),
    ("pkcs11:type=secret", "type is one of"),
    ("pkcs11:slot-id=x", "slot-id is a decimal number"),
    ("pkcs11:id=", "empty id"),
    ("pkcs11:object", "expected name=value"),
    ("pkcs11:object=o?module-path=", "module-path is empty"),
    ("pkcs11:object=o\n", "control character"),
    ("iotsafe:key-id=01", "not a pkcs11: URI"),
]


@pytest.mark.parametrize(("text", "message"), BAD)
def test_refuses(text: str, message: str) -> None:
    with pytest.raises(InputError, match=message.replace("?", r"\?")) as info:
        parse_pkcs11_uri(text)
    assert info.value.exit_code == 65


def test_pin_source_empty_path() -> None:
    with pytest.raises(InputError, match="empty file path"):
        parse_pkcs11_uri("pkcs11:object=o?pin-source=file:").pin_file()
