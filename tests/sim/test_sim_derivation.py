"""Secret-key objects, COMPUTE PRF (48) and COMPUTE HKDF (4A) on the virtual SIM, with raw
APDU bytes. Expected values: the TLS 1.2 PRF SHA-256 vector published on the IETF TLS list
, RFC 5869 Appendix A.1, and references built on `cryptography`'s HMAC and HKDF."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.hmac import HMAC
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from est_agent.sim.card import VirtualCard
from est_agent.sim.personalize import personalize
from est_agent.sim.state import decode_state, encode_state, load_state
from tests.scripted import AID, h, tx

# TLS 1.2 PRF SHA-256 test vector (IETF TLS WG list, 2009; used by many TLS stacks' tests)
PRF_SECRET = h("9b be 43 6b a9 40 f0 17 b1 76 52 84 9a 71 db 35")
PRF_SEED = h("a0 ba 9f 93 6c da 31 18 27 a6 f7 96 ff d5 19 8c")
PRF_OUT = h(
    "e3 f2 29 ba 72 7b e1 7b 8d 12 26 20 55 7c d4 53 c2 aa b2 1d 07 c3 d4 95 32 9b 52 d4 e6 1e"
    " db 5a 6b 30 17 91 e9 0d 35 c9 c9 a4 6b 4e 14 ba f9 af 0f a0 22 f7 07 7d ef 17 ab fd 37 97"
    " c0 56 4b ab 4f bc 91 66 6e 9d ef 9b 97 fc e3 4f 79 67 89 ba a4 80 82 d1 22 ee 42 c5 a7 2e"
    " 5a 51 10 ff f7 01 87 34 7b 66"
)
# RFC 5869 Appendix A.1 (SHA-256)
IKM = bytes([0x0B]) * 22
SALT = bytes(range(0x0D))
INFO = bytes(range(0xF0, 0xFA))
PRK = h("077709362c2e32df0ddc3f0dc47bba6390b6c73bb50f9c3122ec844ad7c2b3e5")
OKM = h(
    "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
)


def reference_prf(secret: bytes, label_seed: bytes, length: int) -> bytes:
    """P_SHA256 (RFC 5246 §5) written from the RFC with `cryptography`'s HMAC."""

    def mac(data: bytes) -> bytes:
        m = HMAC(secret, hashes.SHA256())
        m.update(data)
        return m.finalize()

    out, a = b"", label_seed
    while len(out) < length:
        a = mac(a)
        out += mac(a + label_seed)
    return out[:length]


def test_reference_prf_is_the_published_vector() -> None:
    assert reference_prf(PRF_SECRET, b"test label" + PRF_SEED, 100) == PRF_OUT


def tlv(tag: int, value: bytes) -> str:
    return f"{tag:02X} {len(value):02X} {value.hex()}"


def apdu(ins: str, *tlvs: str, p1: str = "00") -> str:
    data = h(" ".join(tlvs))
    return f"81 {ins} {p1} 00 {len(data):02X} {data.hex()}"


PSK_REF = tlv(0x86, b"\x01")


def card_with(tmp_path: Path, psk: bytes) -> VirtualCard:
    path = tmp_path / f"sim-{len(psk)}.json"
    personalize(path, iccid="8988247000001234567", psk=psk)
    card = VirtualCard(load_state(path))
    assert tx(card, f"01 A4 04 00 07 {AID}") == (b"", 0x9000)
    return card


def test_prf_of_the_psk_object_is_the_published_vector(tmp_path: Path) -> None:
    card = card_with(tmp_path, PRF_SECRET)
    command = apdu("48", PSK_REF, tlv(0xD2, b"test label" + PRF_SEED), "D3 01 64")
    assert h(command).startswith(h("81 48 00 00 22 86 01 01 D2 1A"))
    assert tx(card, command) == (PRF_OUT, 0x9000)
    # by label, and a shorter output is the prefix
    by_label = apdu("48", tlv(0x76, b"psk"), tlv(0xD2, b"test label" + PRF_SEED), "D3 01 10")
    assert tx(card, by_label) == (PRF_OUT[:16], 0x9000)


def test_prf_of_a_given_secret_equals_the_reference(tmp_path: Path) -> None:
    card = card_with(tmp_path, b"")
    secret, seed = os.urandom(48), os.urandom(64)
    expected = reference_prf(secret, b"master secret" + seed, 256)
    command = apdu("48", tlv(0xD1, secret), tlv(0xD2, b"master secret" + seed), "D3 02 01 00")
    assert tx(card, command) == (expected, 0x9000)


def test_hkdf_rfc5869_a1_extract_and_expand(tmp_path: Path) -> None:
    for card, secret in (
        (card_with(tmp_path, IKM), PSK_REF),
        (card_with(tmp_path, b""), tlv(0xD1, IKM)),
    ):
        # wolfSSL's form: IKM, salt, hash -> PRK
        assert tx(card, apdu("4A", secret, tlv(0xD5, SALT), "91 02 00 01")) == (PRK, 0x9000)
        expand = apdu("4A", secret, tlv(0xD5, SALT), "91 02 00 01", tlv(0xD6, INFO), "D3 01 2A")
        assert tx(card, expand) == (OKM, 0x9000)


@pytest.mark.parametrize(
    ("bits", "algorithm"), [("00 02", hashes.SHA384()), ("00 04", hashes.SHA512())]
)
def test_hkdf_sha384_sha512_equal_cryptography(
    tmp_path: Path, bits: str, algorithm: hashes.HashAlgorithm
) -> None:
    card = card_with(tmp_path, b"")
    ikm, salt, info = os.urandom(40), os.urandom(20), b"tls13 derived"
    expected = HKDF(algorithm, 200, salt, info).derive(ikm)
    hash_tlv = f"91 02 {bits}"
    command = apdu("4A", tlv(0xD1, ikm), tlv(0xD5, salt), hash_tlv, tlv(0xD6, info), "D3 01 C8")
    assert tx(card, command) == (expected, 0x9000)
    # empty salt: HashLen zeros (RFC 5869 §2.2), as `cryptography` does for salt=None
    prk, sw = tx(card, apdu("4A", tlv(0xD1, ikm), "D5 00", hash_tlv, tlv(0xD6, b""), "D3 01 20"))
    assert (prk, sw) == (HKDF(algorithm, 32, None, b"").derive(ikm), 0x9000)


def test_derivation_refusals(tmp_path: Path) -> None:
    empty = card_with(tmp_path, b"")
    label_seed = tlv(0xD2, b"label seed")
    # an empty secret-key object: conditions of use not satisfied
    assert tx(empty, apdu("48", PSK_REF, label_seed, "D3 01 10")) == (b"", 0x6985)
    assert tx(empty, apdu("4A", PSK_REF, "D5 00", "91 02 00 01")) == (b"", 0x6985)
    card = card_with(tmp_path, PRF_SECRET)
    refused = {
        # both a secret object and a given secret; neither; an empty given one
        apdu("48", PSK_REF, tlv(0xD1, b"x"), label_seed, "D3 01 10"): 0x6A80,
        apdu("48", label_seed, "D3 01 10"): 0x6A80,
        apdu("48", "D1 00", label_seed, "D3 01 10"): 0x6A80,
        # no label/seed, no length, length 0, 257, 3 bytes, an unknown tag
        apdu("48", PSK_REF, "D3 01 10"): 0x6A80,
        apdu("48", PSK_REF, label_seed): 0x6A80,
        apdu("48", PSK_REF, label_seed, "D3 01 00"): 0x6A80,
        apdu("48", PSK_REF, label_seed, "D3 02 01 01"): 0x6A80,
        apdu("48", PSK_REF, label_seed, "D3 03 00 00 10"): 0x6A80,
        apdu("48", PSK_REF, label_seed, "D3 01 10", "D4 01 00"): 0x6A80,
        # the PSK premaster modes (Thales' P1 01/02) are not offered
        apdu("48", PSK_REF, label_seed, "D3 01 10", p1="01"): 0x6A86,
        apdu("48", PSK_REF, label_seed, "D3 01 10", p1="02"): 0x6A86,
        # no such secret-key object; a private key ID where a secret is expected
        apdu("48", "86 01 07", label_seed, "D3 01 10"): 0x6A88,
        apdu("48", "84 01 04", label_seed, "D3 01 10"): 0x6A80,
        # HKDF: no hash, a hash not offered, info without a length
        apdu("4A", PSK_REF, "D5 00"): 0x6A80,
        apdu("4A", PSK_REF, "D5 00", "91 02 00 08"): 0x6A80,
        apdu("4A", PSK_REF, "D5 00", "91 01 01"): 0x6A80,
        apdu("4A", PSK_REF, "D5 00", "91 02 00 01", "D6 01 00"): 0x6A80,
        apdu("4A", PSK_REF, "D5 00", "91 02 00 01", p1="01"): 0x6A86,
        "81 48 00 00 00": 0x6700,
        "81 4A 00 00 00": 0x6700,
    }
    for command, sw in refused.items():
        assert tx(card, command) == (b"", sw), command


def test_secret_object_usage_limits_the_derivation(tmp_path: Path) -> None:
    path = tmp_path / "sim.json"
    personalize(path, iccid="8988247000001234567", psk=PRF_SECRET)
    state = load_state(path)
    state.applet.secret_keys[0].key_derivation_algorithms = 0x02  # HKDF only
    card = VirtualCard(state)
    assert tx(card, f"01 A4 04 00 07 {AID}") == (b"", 0x9000)
    assert tx(card, apdu("48", PSK_REF, tlv(0xD2, b"x"), "D3 01 10")) == (b"", 0x6985)
    assert tx(card, apdu("4A", PSK_REF, "D5 00", "91 02 00 01"))[1] == 0x9000


def test_secret_key_container_never_shows_the_value(tmp_path: Path) -> None:
    card = card_with(tmp_path, PRF_SECRET)
    container = h("C4 17 76 03 70 73 6B 86 01 01 60 01 00 4A 01 01 4B 01 A0 61 01 08 94 01 03")
    assert tx(card, "81 CB C4 00 03 86 01 01") == (container, 0x9000)
    assert tx(card, "81 CB C4 00 05 76 03 70 73 6B") == (container, 0x9000)
    listing, sw = tx(card, "81 CB 01 00 00")
    while sw == 0x6300:
        more, sw = tx(card, "81 CB 01 01 00")
        listing += more
    assert sw == 0x9000 and container in listing
    # secret keys come before the files (the order Orange's parser needs)
    assert listing.index(container) < listing.index(h("C3"), listing.index(container))
    info, _ = tx(card, "81 CB 00 00 44")
    assert h("B4 01 01") in info and h("90 01 0F") in info
    assert h("93 01 01") in info and h("94 01 03") in info


def test_state_file_keeps_secret_keys_and_reads_older_files(tmp_path: Path) -> None:
    path = tmp_path / "sim.json"
    personalize(path, iccid="8988247000001234567", psk=b"k" * 20)
    state = load_state(path)
    assert state.applet.secret_keys[0].value == b"k" * 20
    assert "k" * 20 not in repr(state.applet.secret_keys[0])  # repr hides the value
    # a file written before secret-key objects existed: none, no error
    document = json.loads(path.read_bytes())
    del document["card"]["applet"]["secret_keys"]
    older = dataclasses.replace(state, applet=dataclasses.replace(state.applet, secret_keys=[]))
    reencoded = json.loads(encode_state(older))
    assert reencoded["card"]["applet"]["secret_keys"] == []
    del reencoded["card"]["applet"]["secret_keys"]
    assert reencoded["card"] == document["card"]
    assert decode_state(encode_state(older)).applet.secret_keys == []
    # a secret longer than the 128 bytes a secret-key object holds is refused at personalization
    with pytest.raises(Exception, match="at most 128"):
        personalize(tmp_path / "other.json", psk=bytes(129))
