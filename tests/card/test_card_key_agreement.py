"""The client's PUT PUBLIC KEY / COMPUTE DH / COMPUTE PRF / COMPUTE HKDF byte for byte against a
scripted card, and against the virtual SIM with the results checked by `cryptography`."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from est_agent.card.channel import CardSession
from est_agent.card.iotsafe import IotSafeApplet
from est_agent.card.uri import IotSafeRef, ObjectKind, parse_iotsafe_ref
from est_agent.errors import (
    CardProtocolError,
    ConditionsNotSatisfiedError,
    InputError,
    SecurityStatusError,
    StatusWordError,
)
from est_agent.sim.personalize import personalize
from est_agent.sim.transport import SimTransport
from tests.scripted import ScriptedTransport

OPEN = [("00 70 00 00 01", "01 90 00"), ("01 A4 04 00 07 A0 00 00 05 59 00 10", "90 00")]
ECDH = IotSafeRef(ObjectKind.PRIVATE_KEY, object_id=b"\x04")
PEER = IotSafeRef(ObjectKind.PUBLIC_KEY, object_id=b"\x05")
PSK = IotSafeRef(ObjectKind.SECRET_KEY, object_id=b"\x01")
PEER_KEY = ec.generate_private_key(ec.SECP256R1())
PEER_POINT = PEER_KEY.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
SECRET = bytes(range(1, 33))


def applet_for(script: list[tuple[str, str]]) -> tuple[IotSafeApplet, ScriptedTransport]:
    transport = ScriptedTransport(OPEN + script)
    return IotSafeApplet.open(CardSession(transport)), transport


def test_put_public_key_bytes() -> None:
    applet, transport = applet_for(
        [
            ("81 24 00 01 03 85 01 05", "90 00"),
            ("81 D8 80 01 47 34 45 49 43 86 41 " + PEER_POINT.hex(), "90 00"),
            ("81 24 01 01", "90 00"),  # closed, as wolfSSL's port does
        ]
    )
    applet.put_public_key(PEER, PEER_POINT)
    transport.assert_done()


def test_put_public_key_closes_the_session_when_refused() -> None:
    applet, transport = applet_for(
        [
            ("81 24 00 01 03 85 01 05", "90 00"),
            ("81 D8 80 01 47 34 45 49 43 86 41 " + PEER_POINT.hex(), "6A 80"),
            ("81 24 01 01", "90 00"),
        ]
    )
    with pytest.raises(StatusWordError, match="6A80"):
        applet.put_public_key(PEER, PEER_POINT)
    transport.assert_done()


def test_put_public_key_not_writable() -> None:
    applet, transport = applet_for([("81 24 00 01 03 85 01 02", "69 82")])
    with pytest.raises(SecurityStatusError):
        applet.put_public_key(IotSafeRef(ObjectKind.PUBLIC_KEY, object_id=b"\x02"), PEER_POINT)
    transport.assert_done()


def test_put_public_key_refuses_a_bad_point_before_sending() -> None:
    applet, transport = applet_for([])
    with pytest.raises(InputError, match="65-byte"):
        applet.put_public_key(PEER, PEER_POINT[:33])
    transport.assert_done()


def test_compute_dh_bytes() -> None:
    applet, transport = applet_for([("81 46 00 00 06 84 01 04 85 01 05", SECRET.hex() + " 90 00")])
    assert applet.compute_dh(ECDH, PEER) == SECRET
    transport.assert_done()


def test_compute_dh_labels_t0() -> None:
    applet, transport = applet_for(
        [
            ("81 46 00 00 0C 74 04 65 63 64 68 75 04 70 65 65 72", "61 20"),
            ("81 C0 00 00 20", SECRET.hex() + " 90 00"),
        ]
    )
    ecdh = parse_iotsafe_ref("iotsafe:key-label=ecdh", default_kind=ObjectKind.PRIVATE_KEY)
    peer = parse_iotsafe_ref("iotsafe:public-key-label=peer", default_kind=ObjectKind.PUBLIC_KEY)
    assert applet.compute_dh(ecdh, peer) == SECRET
    transport.assert_done()


def test_compute_dh_refused_and_short() -> None:
    applet, transport = applet_for(
        [
            ("81 46 00 00 06 84 01 04 85 01 05", "69 85"),
            ("81 46 00 00 06 84 01 04 85 01 05", SECRET[:31].hex() + " 90 00"),
        ]
    )
    with pytest.raises(ConditionsNotSatisfiedError):
        applet.compute_dh(ECDH, PEER)
    with pytest.raises(CardProtocolError, match="32-byte"):
        applet.compute_dh(ECDH, PEER)
    transport.assert_done()


# -- against the virtual SIM -----------------------------------------------------------------


@pytest.fixture
def sim_applet(tmp_path: Path) -> IotSafeApplet:
    path = tmp_path / "sim.json"
    personalize(path, iccid="8988247000001234567", psk=b"a pre-shared key")
    session = CardSession(SimTransport(path))
    session.transport.connect()
    return IotSafeApplet.open(session)


def test_dh_on_the_sim_equals_cryptography(sim_applet: IotSafeApplet) -> None:
    generated = sim_applet.generate_key_pair(ECDH)
    assert (generated.private_id, generated.public_id) == (b"\x04", b"\x04")
    sim_applet.put_public_key(PEER, PEER_POINT)
    card_public = ec.EllipticCurvePublicKey.from_encoded_point(
        ec.SECP256R1(), generated.public_point
    )
    assert sim_applet.compute_dh(ECDH, PEER) == PEER_KEY.exchange(ec.ECDH(), card_public)
    # the peer slot also serves VERIFY SIGNATURE (wolfSSL's peer-certificate key)
    assert sim_applet.read_public_key(PEER) == PEER_POINT
