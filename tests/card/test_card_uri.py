import pytest

from est_agent.card.uri import IotSafeRef, ObjectKind, UiccPath, parse_card_uri
from est_agent.errors import InputError


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("iotsafe:key-id=02", IotSafeRef(ObjectKind.PRIVATE_KEY, object_id=b"\x02")),
        ("iotsafe:label=op-a", IotSafeRef(ObjectKind.PRIVATE_KEY, label="op-a")),
        ("iotsafe:file-id=01", IotSafeRef(ObjectKind.FILE, object_id=b"\x01")),
        ("iotsafe:file-label=cert", IotSafeRef(ObjectKind.FILE, label="cert")),
        ("iotsafe:key-id=303031", IotSafeRef(ObjectKind.PRIVATE_KEY, object_id=b"001")),
        ("IOTSAFE:Key-Id=0a", IotSafeRef(ObjectKind.PRIVATE_KEY, object_id=b"\x0a")),
        ("uicc:path=7FF0/6F01", UiccPath((0x7FF0, 0x6F01))),
        ("uicc:path=3F00/7FF0/6F02", UiccPath((0x7FF0, 0x6F02))),
        ("uicc:path=2FE2", UiccPath((0x2FE2,))),
    ],
)
def test_parse(uri: str, expected: object) -> None:
    assert parse_card_uri(uri) == expected


def test_label_takes_context_kind() -> None:
    ref = parse_card_uri("iotsafe:label=x", default_kind=ObjectKind.FILE)
    assert ref == IotSafeRef(ObjectKind.FILE, label="x")


def test_round_trip_str() -> None:
    for text in ("iotsafe:key-id=02", "iotsafe:file-label=cert", "uicc:path=7FF0/6F01"):
        assert str(parse_card_uri(text)) == text


@pytest.mark.parametrize(
    "uri",
    [
        "iotsafe:key-id=",
        "iotsafe:key-id=zz",
        "iotsafe:key-id=" + "00" * 21,
        "iotsafe:colour=blue",
        "iotsafe:secret-key-id=01",  # issue 13: secret-id= names a secret-key object
        "uicc:path=7FF0/6F0",
        "uicc:path=",
        "uicc:fid=6F01",
        "pkcs11:token=x",
        "key-id=02",
    ],
)
def test_rejects(uri: str) -> None:
    with pytest.raises(InputError):
        parse_card_uri(uri)
