"""Issue 13 in the card client: implicit channel opening (with its MANAGE CHANNEL fallback) and
SHA-384/512 signatures, byte for byte against a scripted card, counted against the virtual SIM."""

from __future__ import annotations

import hashlib

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, decode_dss_signature

from est_agent.backends.iotsafe import CardSigner
from est_agent.card.channel import CardSession
from est_agent.card.iotsafe import IotSafeApplet
from est_agent.card.uri import IotSafeRef, ObjectKind
from est_agent.errors import InputError, NotFoundError
from est_agent.sim.card import CardOptions, VirtualCard
from est_agent.sim.transport import SimTransport
from tests.scripted import AID, ScriptedTransport
from tests.sim.test_sim_applet import example_state

KEY = ec.generate_private_key(ec.SECP256R1())
KEY1 = IotSafeRef(ObjectKind.PRIVATE_KEY, object_id=b"\x01")
PUB2 = IotSafeRef(ObjectKind.PUBLIC_KEY, object_id=b"\x02")
# GET DATA C1 of private key 01 taking SHA-256/384/512 (91 02 00 07)
KEY_INFO = (
    "C1 1F 74 04 4B 45 59 31 84 01 01 60 01 02 4A 01 01 4B 01 13 4E 01 01 61 01 03 92 01 04"
    " 91 02 00 07"
)


def raw_sig(digest: bytes, algorithm: hashes.HashAlgorithm) -> str:
    r, s = decode_dss_signature(KEY.sign(digest, ec.ECDSA(Prehashed(algorithm))))
    return r.to_bytes(32, "big").hex() + s.to_bytes(32, "big").hex()


def test_implicit_channel_selects_without_manage_channel() -> None:
    transport = ScriptedTransport([(f"01 A4 04 00 07 {AID}", "90 00"), ("00 70 80 01", "90 00")])
    session = CardSession(transport)
    applet = IotSafeApplet.open(session, implicit_channel=True)
    assert applet.channel.number == 1
    session.close_channels()  # the implicitly opened channel is closed like any other
    transport.assert_done()


def test_implicit_channel_falls_back_to_manage_channel_on_6881() -> None:
    transport = ScriptedTransport(
        [
            (f"01 A4 04 00 07 {AID}", "68 81"),
            ("00 70 00 00 01", "01 90 00"),
            (f"01 A4 04 00 07 {AID}", "90 00"),
        ]
    )
    applet = IotSafeApplet.open(CardSession(transport), implicit_channel=True)
    assert applet.channel.number == 1
    transport.assert_done()


def test_implicit_channel_without_the_applet_is_not_found() -> None:
    transport = ScriptedTransport([(f"01 A4 04 00 07 {AID}", "6A 82")])
    with pytest.raises(NotFoundError) as caught:
        IotSafeApplet.open(CardSession(transport), implicit_channel=True)
    assert caught.value.sw == 0x6A82
    transport.assert_done()


@pytest.mark.parametrize(
    ("algorithm", "bits"), [(hashes.SHA384(), "00 02"), (hashes.SHA512(), "00 04")]
)
def test_card_signer_signs_longer_digests_with_tag_91(
    algorithm: hashes.HashAlgorithm, bits: str
) -> None:
    digest = hashlib.new(algorithm.name, b"tbs").digest()
    n = len(digest)
    transport = ScriptedTransport(
        [
            ("00 70 00 00 01", "01 90 00"),
            (f"01 A4 04 00 07 {AID}", "90 00"),
            ("81 CB C1 00 03 84 01 01", KEY_INFO + " 90 00"),
            (f"81 2A 00 01 0D 84 01 01 A1 01 03 91 02 {bits} 92 01 04", "90 00"),
            (f"81 2B 80 01 {n + 2:02X} 9E {n:02X} {digest.hex()}", "61 43"),
            ("81 C0 00 00 43", f"33 00 40 {raw_sig(digest, algorithm)} 90 00"),
        ]
    )
    signer = CardSigner(IotSafeApplet.open(CardSession(transport)), KEY1, KEY.public_key())
    der = signer.sign_digest(digest)
    transport.assert_done()
    KEY.public_key().verify(der, digest, ec.ECDSA(Prehashed(algorithm)))


def test_card_signer_refuses_a_digest_the_card_does_not_advertise() -> None:
    transport = ScriptedTransport(
        [
            ("00 70 00 00 01", "01 90 00"),
            (f"01 A4 04 00 07 {AID}", "90 00"),
            ("81 CB C1 00 03 84 01 01", KEY_INFO.replace("91 02 00 07", "91 02 00 01") + " 90 00"),
        ]
    )
    signer = CardSigner(IotSafeApplet.open(CardSession(transport)), KEY1, KEY.public_key())
    assert signer.digest_algorithms == ("sha256",)
    with pytest.raises(InputError, match="sha256 digests, not one of 48 bytes"):
        signer.sign_digest(hashlib.sha384(b"x").digest())
    with pytest.raises(InputError, match="32, 48 or 64 bytes"):
        signer.sign_digest(b"\x00" * 20)
    transport.assert_done()  # neither reached COMPUTE SIGNATURE


def test_verify_signature_sha512_on_the_card() -> None:
    digest = hashlib.sha512(b"v").digest()
    der = KEY.sign(digest, ec.ECDSA(Prehashed(hashes.SHA512())))
    r, s = decode_dss_signature(der)
    raw = r.to_bytes(32, "big").hex() + s.to_bytes(32, "big").hex()
    transport = ScriptedTransport(
        [
            ("00 70 00 00 01", "01 90 00"),
            (f"01 A4 04 00 07 {AID}", "90 00"),
            ("81 2C 00 01 0D 85 01 02 A1 01 03 91 02 00 04 92 01 04", "90 00"),
            (f"81 2D 80 01 85 9E 40 {digest.hex()} 33 00 40 {raw}", "90 00"),
            ("81 2C 01 01", "90 00"),
        ]
    )
    applet = IotSafeApplet.open(CardSession(transport))
    assert applet.verify_signature(PUB2, digest, der)
    transport.assert_done()


# -- APDU counts against the virtual SIM (tests/linkwrap.py counts the same LinkStats) -------


def _sim(**options: bool) -> SimTransport:
    state = example_state()
    return SimTransport(VirtualCard(state, CardOptions(**options)))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("implicit", "refuses", "apdus"),
    [
        (False, False, 2),  # MANAGE CHANNEL + SELECT (today's default)
        (True, False, 1),  # SELECT alone opens the channel
        (True, True, 3),  # SELECT (6881) + MANAGE CHANNEL + SELECT
        (False, True, 2),
    ],
)
def test_opening_the_applet_costs(implicit: bool, refuses: bool, apdus: int) -> None:
    transport = _sim(implicit_channel_open=not refuses)
    session = CardSession(transport)
    applet = IotSafeApplet.open(session, implicit_channel=implicit)
    assert transport.stats.apdus == apdus
    # and the channel works: a GET DATA answers, then closing it leaves it closed
    assert applet.info().max_sessions == 4
    session.close_channels()
    assert transport.transmit(bytes.fromhex("81CB000044")) == bytes.fromhex("6881")


def test_a_sha256_only_key_on_a_card_that_offers_more_takes_sha256() -> None:
    """A state file personalized before SHA-384 (key tag 91 = 00 01) on a SIM whose applet
    advertises 00 07: the signer goes by the key, so a server asking sha384 gets SHA-256 rather
    than a 6985 at signing time."""
    transport = _sim()
    applet = IotSafeApplet.open(CardSession(transport))
    assert applet.info().hash_algorithms == 0x0007
    point = applet.generate_key_pair(KEY1).public_point
    public = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
    signer = CardSigner(applet, KEY1, public)
    assert signer.digest_algorithms == ("sha256",)
    with pytest.raises(InputError, match="not one of 48 bytes"):
        signer.sign_digest(hashlib.sha384(b"x").digest())
    digest = hashlib.sha256(b"x").digest()
    public.verify(signer.sign_digest(digest), digest, ec.ECDSA(Prehashed(hashes.SHA256())))
