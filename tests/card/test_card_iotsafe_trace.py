"""The client replays docs/iot-safe-card.md §8 byte for byte (T=0 card: 61xx answers)."""

from __future__ import annotations

import hashlib

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, decode_dss_signature

from est_agent.backends.iotsafe import CardSigner
from est_agent.card.channel import CardSession
from est_agent.card.iotsafe import IotSafeApplet, ObjectType
from est_agent.card.uri import IotSafeRef, ObjectKind
from est_agent.errors import CardProtocolError, NotFoundError
from tests.certs import self_signed_der
from tests.scripted import ScriptedTransport

KEY = ec.generate_private_key(ec.SECP256R1())
POINT = KEY.public_key().public_numbers()
XY = POINT.x.to_bytes(32, "big").hex() + POINT.y.to_bytes(32, "big").hex()
OPEN = [("00 70 00 00 01", "01 90 00"), ("01 A4 04 00 07 A0 00 00 05 59 00 10", "90 00")]
OBJECT_LIST = (
    "C1 1F 74 04 4B 45 59 31 84 01 01 60 01 02 4A 01 00 4B 01 13 4E 01 01 61 01 03 92 01 04"
    " 91 02 00 01"
    " C2 1F 75 04 50 55 42 31 85 01 02 60 01 01 4A 01 00 4B 01 13 4E 01 01 61 01 01 92 01 04"
    " 91 02 00 01"
    " C3 16 73 04 43 45 52 54 83 01 03 60 01 01 4A 01 01 21 01 02 20 02 01 F4"
)


def applet_for(script: list[tuple[str, str]]) -> tuple[IotSafeApplet, ScriptedTransport]:
    transport = ScriptedTransport(OPEN + script)
    return IotSafeApplet.open(CardSession(transport)), transport


def raw_sig(digest: bytes) -> str:
    r, s = decode_dss_signature(KEY.sign(digest, ec.ECDSA(Prehashed(hashes.SHA256()))))
    return r.to_bytes(32, "big").hex() + s.to_bytes(32, "big").hex()


def test_b_object_list() -> None:
    applet, transport = applet_for([("81 CB 01 00 00", OBJECT_LIST + " 90 00")])
    objects = applet.objects()
    transport.assert_done()
    assert [(o.type, o.object_id, o.label) for o in objects] == [
        (ObjectType.PRIVATE_KEY, b"\x01", "KEY1"),
        (ObjectType.PUBLIC_KEY, b"\x02", "PUB1"),
        (ObjectType.FILE, b"\x03", "CERT"),
    ]
    key, _, cert = objects
    assert (key.access, key.state, key.key_type, key.key_usage) == (0x02, 0x00, 0x13, 0x01)
    assert (key.crypto_functions, key.signature_algorithms, key.hash_algorithms) == (3, 4, 1)
    assert (cert.file_usage, cert.file_size, cert.activated) == (0x02, 500, True)


def test_b_object_list_paging() -> None:
    first, second = OBJECT_LIST[:96], OBJECT_LIST[96:]
    applet, transport = applet_for(
        [("81 CB 01 00 00", first + " 63 00"), ("81 CB 01 01 00", second + " 90 00")]
    )
    assert len(applet.objects()) == 3
    transport.assert_done()


def test_c_generate_key_pair_uses_returned_ids() -> None:
    applet, transport = applet_for(
        [
            ("81 B9 00 00 03 84 01 01", "61 4D"),
            ("81 C0 00 00 4D", f"84 01 01 85 01 02 34 45 49 43 86 41 04 {XY} 90 00"),
            ("81 CD 00 00 03 85 01 02", "61 47"),
            ("81 C0 00 00 47", f"34 45 49 43 86 41 04 {XY} 90 00"),
        ]
    )
    generated = applet.generate_key_pair(IotSafeRef(ObjectKind.PRIVATE_KEY, object_id=b"\x01"))
    assert (generated.private_id, generated.public_id) == (b"\x01", b"\x02")
    assert generated.public_point == bytes.fromhex("04" + XY)
    public_ref = IotSafeRef(ObjectKind.PUBLIC_KEY, object_id=generated.public_id)
    assert applet.read_public_key(public_ref) == generated.public_point
    transport.assert_done()


@pytest.mark.parametrize("sig_header", ["33 00 40", "33 40"])
def test_d_sign_digest(sig_header: str) -> None:
    digest = hashlib.sha256(b"to be signed").digest()
    length = 3 + 64 if sig_header == "33 00 40" else 2 + 64
    applet, transport = applet_for(
        [
            ("81 2A 00 01 0D 84 01 01 A1 01 03 91 02 00 01 92 01 04", "90 00"),
            ("81 2B 80 01 22 9E 20 " + digest.hex(), f"61 {length:02X}"),
            (f"81 C0 00 00 {length:02X}", f"{sig_header} {raw_sig(digest)} 90 00"),
        ]
    )
    signer = CardSigner(
        applet, IotSafeRef(ObjectKind.PRIVATE_KEY, object_id=b"\x01"), KEY.public_key()
    )
    der = signer.sign_digest(digest)
    transport.assert_done()
    KEY.public_key().verify(der, digest, ec.ECDSA(Prehashed(hashes.SHA256())))
    assert signer.signatures == 1


def test_d_close_sessions_option_closes_after_signing() -> None:
    digest = hashlib.sha256(b"z").digest()
    transport = ScriptedTransport(
        [
            *OPEN,
            ("81 2A 00 01 0D 84 01 01 A1 01 03 91 02 00 01 92 01 04", "90 00"),
            ("81 2B 80 01 22 9E 20 " + digest.hex(), f"33 00 40 {raw_sig(digest)} 90 00"),
            ("81 2A 01 01", "90 00"),
        ]
    )
    applet = IotSafeApplet.open(CardSession(transport), close_sessions=True)
    applet.sign_digest(IotSafeRef(ObjectKind.PRIVATE_KEY, object_id=b"\x01"), digest)
    transport.assert_done()


def test_d_stale_session_is_closed_and_retried() -> None:
    digest = hashlib.sha256(b"x").digest()
    init = "81 2A 00 01 0D 84 01 01 A1 01 03 91 02 00 01 92 01 04"
    applet, transport = applet_for(
        [
            (init, "69 85"),
            ("81 2A 01 01", "90 00"),
            (init, "90 00"),
            ("81 2B 80 01 22 9E 20 " + digest.hex(), f"33 00 40 {raw_sig(digest)} 90 00"),
        ]
    )
    applet.sign_digest(IotSafeRef(ObjectKind.PRIVATE_KEY, object_id=b"\x01"), digest)
    transport.assert_done()


def test_d_wrong_key_signature_is_caught() -> None:
    digest = hashlib.sha256(b"y").digest()
    other = ec.generate_private_key(ec.SECP256R1())
    r, s = decode_dss_signature(other.sign(digest, ec.ECDSA(Prehashed(hashes.SHA256()))))
    raw = r.to_bytes(32, "big").hex() + s.to_bytes(32, "big").hex()
    applet, _ = applet_for(
        [
            ("81 2A 00 01 0D 84 01 01 A1 01 03 91 02 00 01 92 01 04", "90 00"),
            ("81 2B 80 01 22 9E 20 " + digest.hex(), f"33 40 {raw} 90 00"),
        ]
    )
    signer = CardSigner(
        applet, IotSafeRef(ObjectKind.PRIVATE_KEY, object_id=b"\x01"), KEY.public_key()
    )
    with pytest.raises(CardProtocolError, match="does not verify"):
        signer.sign_digest(digest)


def test_e_read_file_stops_at_der_length() -> None:
    cert = self_signed_der(KEY)
    assert 256 < len(cert) < 512
    applet, transport = applet_for(
        [
            ("81 B0 00 00 03 83 01 03 00", cert[:256].hex() + " 90 00"),
            # Le = exactly what the DER header says is left (Le 00 would also fetch the
            # container's padding over a slow link)
            (f"81 B0 01 00 03 83 01 03 {len(cert) - 256:02X}", cert[256:].hex() + " 90 00"),
        ]
    )
    data = applet.read_file(IotSafeRef(ObjectKind.FILE, object_id=b"\x03"))
    transport.assert_done()
    assert data == cert
    x509.load_der_x509_certificate(data)


def test_e_read_file_card_capping_answers_at_240() -> None:
    cert = self_signed_der(KEY)
    container = cert + b"\x00" * (500 - len(cert))
    applet, transport = applet_for(
        [
            ("81 B0 00 00 03 83 01 03 00", container[:240].hex() + " 90 00"),
            (
                f"81 B0 00 F0 03 83 01 03 {len(cert) - 240:02X}",
                container[240 : len(cert)].hex() + " 90 00",
            ),
        ]
    )
    assert applet.read_file(IotSafeRef(ObjectKind.FILE, object_id=b"\x03")) == cert
    transport.assert_done()


def test_e_get_data_file_info() -> None:
    applet, transport = applet_for(
        [
            (
                "81 CB C3 00 03 83 01 03",
                "C3 16 73 04 43 45 52 54 83 01 03 60 01 01 4A 01 01 21 01 02 20 02 01 F4 90 00",
            )
        ]
    )
    info = applet.object_info(IotSafeRef(ObjectKind.FILE, object_id=b"\x03"))
    assert (info.label, info.file_size) == ("CERT", 500)
    transport.assert_done()


def test_wrong_aid_is_not_found_and_channel_closed() -> None:
    transport = ScriptedTransport(
        [
            ("00 70 00 00 01", "01 90 00"),
            ("01 A4 04 00 07 A0 00 00 05 59 00 10", "6A 82"),
            ("01 A4 04 00 07 A0 00 00 02 48 04 00", "6A 82"),
            ("00 70 80 01", "90 00"),
        ]
    )
    with pytest.raises(NotFoundError, match="no IoT SAFE applet"):
        IotSafeApplet.open(
            CardSession(transport),
            aids=[bytes.fromhex("A0000005590010"), bytes.fromhex("A0000002480400")],
        )
    transport.assert_done()


def test_iso_class_option() -> None:
    transport = ScriptedTransport(
        [*OPEN, ("01 84 00 00 08", "61 08"), ("01 C0 00 00 08", "0102030405060708 90 00")]
    )
    applet = IotSafeApplet.open(CardSession(transport), proprietary_cla=False)
    assert applet.get_random(8) == bytes(range(1, 9))
    transport.assert_done()
