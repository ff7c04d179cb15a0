"""The command sequences third-party IoT SAFE clients send, replayed as raw bytes to the virtual
SIM (issue 13): wolfSSL's IoT-SAFE port selects with CLA 01 without MANAGE CHANNEL and fetches
61xx answers with CLA 01; others select with 81; the answers are checked with `cryptography`.
The TLS part of wolfSSL's port (its ECDH key share: GENERATE KEY PAIR in the ECDH slot, PUT
PUBLIC KEY of the server's share in session 2, COMPUTE DH, then COMPUTE HKDF extract) and the
PRF a ZARIOT SIM was traced answering (at_client_sdk: P1 00, D3 01 10) close the sequence."""

from __future__ import annotations

import hashlib

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.hmac import HMAC
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from est_agent.sim.card import CardOptions, VirtualCard
from est_agent.sim.state import PrivateKeyObject, PublicKeyObject, SecretKeyObject
from tests.scripted import AID, h, tx
from tests.sim.test_sim_applet import CERT, example_state
from tests.sim.test_sim_derivation import reference_prf


def _card(t0: bool) -> VirtualCard:
    state = example_state()
    for key in (*state.applet.private_keys, *state.applet.public_keys):
        key.hash_algorithms = 0x0007
    # the key-agreement objects of the default personalization (sim/personalize.py)
    state.applet.private_keys.append(
        PrivateKeyObject(object_id=b"\x04", label="ecdh", public_id=b"\x04", access=0x02,
                         crypto_functions=0x06, key_agreement_algorithms=0x01)
    )  # fmt: skip
    state.applet.public_keys += [
        PublicKeyObject(object_id=b"\x04", label="ecdh", crypto_functions=0x04,
                        key_agreement_algorithms=0x01),
        PublicKeyObject(object_id=b"\x05", label="peer", access=0x03, crypto_functions=0x05,
                        key_agreement_algorithms=0x01),
    ]  # fmt: skip
    state.applet.secret_keys.append(SecretKeyObject(object_id=b"\x01", label="psk", value=PSK))
    return VirtualCard(state, CardOptions(t0_mode=t0))


PSK = b"third-party psk"


def _send(card: VirtualCard, apdu: str | bytes, gr_cla: str) -> tuple[bytes, int]:
    """One command as these clients send it: on 61xx, GET RESPONSE with their class."""
    data, sw = tx(card, apdu)
    if sw >> 8 == 0x61:
        data, sw = tx(card, f"{gr_cla} C0 00 00 {sw & 0xFF:02X}")
    return data, sw


def _rs(answer: bytes) -> bytes:
    assert answer[:3] == h("33 00 40") and len(answer) == 67
    return encode_dss_signature(int.from_bytes(answer[3:35]), int.from_bytes(answer[35:]))


@pytest.mark.parametrize(("select_cla", "gr_cla"), [("01", "01"), ("81", "81")])
@pytest.mark.parametrize("t0", [False, True])
def test_third_party_sequence(select_cla: str, gr_cla: str, t0: bool) -> None:
    card = _card(t0)

    def send(apdu: str | bytes) -> tuple[bytes, int]:
        return _send(card, apdu, gr_cla)

    # select on channel 1 without MANAGE CHANNEL (wolfSSL's iotsafe.c init string)
    assert send(f"{select_cla} A4 04 00 07 {AID}") == (b"", 0x9000)
    # capability check
    info, sw = send("81 CB 00 00 44")
    assert sw == 0x9000 and len(info) == 0x44
    assert info[info.index(h("91 02")) : info.index(h("91 02")) + 4] == h("91 02 00 07")
    assert info[info.index(h("92 01")) : info.index(h("92 01")) + 3] == h("92 01 04")
    # certificate: size by GET DATA C3, then READ FILE by offsets
    container, sw = send("81 CB C3 00 03 83 01 03")
    assert sw == 0x9000 and container.endswith(h("20 02 01 F4"))
    first, sw = send("81 B0 00 00 03 83 01 03 00")
    assert sw == 0x9000 and len(first) == 256
    second, sw = send("81 B0 01 00 03 83 01 03 00")
    assert sw == 0x9000 and first + second == CERT
    # key generation, then READ PUBLIC KEY of the returned public ID
    generated, sw = send("81 B9 00 00 03 84 01 01")
    assert sw == 0x9000 and generated[:6] == h("84 01 01 85 01 02")
    point = generated[generated.index(h("86 41 04")) + 2 :]
    assert send("81 CD 00 00 03 85 01 02") == (h("34 45 49 43 86 41") + point, 0x9000)
    public = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
    # sign mode 03 (host hash), after clearing a stale session as Orange's library does
    digest = hashlib.sha256(b"CertificateVerify").digest()
    assert send("81 2A 01 01 00") == (b"", 0x9000)
    assert send("81 2A 00 01 0D 84 01 01 A1 01 03 91 02 00 01 92 01 04") == (b"", 0x9000)
    signed, sw = send("81 2B 80 01 22 9E 20" + digest.hex())
    assert sw == 0x9000
    public.verify(_rs(signed), b"CertificateVerify", ec.ECDSA(hashes.SHA256()))
    assert send("81 2A 01 01 00") == (b"", 0x9000)
    # sign mode 01 (the card hashes), SHA-384, the message in two 9B blocks
    assert send("81 2A 00 01 0D 84 01 01 A1 01 01 91 02 00 02 92 01 04") == (b"", 0x9000)
    assert send("81 2B 00 01 07 9B 05" + b"hello".hex()) == (b"", 0x9000)
    full, sw = send("81 2B 80 01 08 9B 06" + b" world".hex())
    assert sw == 0x9000
    public.verify(_rs(full), b"hello world", ec.ECDSA(hashes.SHA384()))
    # VERIFY on the card (session 2, as at_client_sdk #850 traces it), then a mismatch
    assert send("81 2C 00 02 0D 85 01 02 A1 01 03 91 02 00 01 92 01 04") == (b"", 0x9000)
    verify = "81 2D 80 02 65 9E 20" + digest.hex() + signed.hex()
    assert send(verify) == (b"", 0x9000)
    other = hashlib.sha256(b"other").digest()
    assert send("81 2D 80 02 65 9E 20" + other.hex() + signed.hex()) == (b"", 0x6D01)
    assert send("81 2C 01 02 00") == (b"", 0x9000)
    # wolfSSL's ECDH key share: a fresh key pair in its ECDH slot, the server's share put in
    # session 2 (closed after), COMPUTE DH, HKDF-Extract of the shared secret (TLS 1.3)
    generated, sw = send("81 B9 00 00 03 84 01 04")
    assert sw == 0x9000 and generated[:12] == h("84 01 04 85 01 04 34 45 49 43 86 41")
    card_share = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), generated[12:])
    server = ec.generate_private_key(ec.SECP256R1())
    server_share = server.public_key().public_bytes(
        Encoding.X962, PublicFormat.UncompressedPoint
    )
    assert send("81 24 00 02 03 85 01 05") == (b"", 0x9000)
    assert send("81 D8 80 02 47 34 45 49 43 86 41" + server_share.hex()) == (b"", 0x9000)
    assert send("81 24 01 02 00") == (b"", 0x9000)
    shared, sw = send("81 46 00 00 06 84 01 04 85 01 05")
    assert sw == 0x9000 and shared == server.exchange(ec.ECDH(), card_share)
    salt = bytes(32)  # TLS 1.3's first extract: a zero salt of hash length (RFC 8446 §7.1)
    prk, sw = send("81 4A 00 00 48 D1 20" + shared.hex() + "D5 20" + salt.hex() + "91 02 00 01")
    mac = HMAC(salt, hashes.SHA256())
    mac.update(shared)
    assert (prk, sw) == (mac.finalize(), 0x9000)
    # COMPUTE PRF as traced on a ZARIOT SIM: P1 00, 16 bytes (61 10 under T=0)
    prf, sw = send("81 48 00 00 0F 86 01 01 D2 07" + b"label!!".hex() + "D3 01 10")
    assert (prf, sw) == (reference_prf(PSK, b"label!!", 16), 0x9000)
    # close the channel the SELECT opened
    assert send("00 70 80 01 00") == (b"", 0x9000)
    assert send("81 CB 00 00 44") == (b"", 0x6881)
