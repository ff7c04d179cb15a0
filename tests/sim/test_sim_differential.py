"""Differential property test of the whole IoT SAFE command set on the virtual SIM (issue 13).

Random sequences mix well-formed operations (GENERATE KEY PAIR, COMPUTE/VERIFY SIGNATURE, PUT
PUBLIC KEY, COMPUTE DH, COMPUTE PRF, COMPUTE HKDF, GET DATA, GET RANDOM, READ FILE) with
random and mutated APDUs of every instruction, under random card options. For every answer:

- it is a response APDU ending in a status word, never 6F00 (an internal error);
- it contains no private key scalar and no secret-key value the card holds or ever held;
- a successful result matches `cryptography`: signatures verify with the key's public point,
  DH equals `cryptography`'s ECDH exchange, PRF equals P_SHA256 built on its HMAC, HKDF its
  HKDF, a VERIFY answers 9000 exactly for a valid signature, a put key reads back.

Each kind of well-formed operation must succeed at least once over the run, so the comparisons
are not vacuous.
"""

from __future__ import annotations

import copy
import hashlib
import time
from collections import Counter
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    Prehashed,
    decode_dss_signature,
    encode_dss_signature,
)
from cryptography.hazmat.primitives.hmac import HMAC
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from est_agent.sim.card import CardOptions, VirtualCard
from est_agent.sim.personalize import personalize
from est_agent.sim.state import CardState, load_state
from tests.sim.test_sim_derivation import reference_prf
from tests.sim.test_sim_properties import command as random_command

AID = bytes.fromhex("A0000005590010")
PSK = bytes.fromhex("0f1e2d3c4b5a69788796a5b4c3d2e1f0" * 2)
HASHES = {1: (hashes.SHA256(), 32), 2: (hashes.SHA384(), 48), 4: (hashes.SHA512(), 64)}
#: the whole property run: max_examples=50 takes 2-5 s alone on one core; the bound is for a
#: loaded CI machine and catches a hang, not a slow run
RUN_BOUND_S = 60.0
SUCCESSES: Counter[str] = Counter()


def tlv(tag: int, value: bytes) -> bytes:
    return bytes((tag, len(value))) + value


def apdu(ins: int, p1: int, p2: int, data: bytes = b"", le: int | None = None) -> bytes:
    out = bytes((0x81, ins, p1, p2))
    if data:
        out += bytes((len(data),)) + data
    if le is not None:
        out += bytes((le,))
    return out


class Run:
    """One card and everything the test knows of it."""

    def __init__(self, state: CardState, options: CardOptions) -> None:
        self.card = VirtualCard(state, options)
        self.secrets: set[bytes] = set()
        self.peer_keys: dict[bytes, ec.EllipticCurvePrivateKey] = {}
        self._remember_secrets()

    def _remember_secrets(self) -> None:
        applet = self.card.state.applet
        self.secrets.update(k.scalar for k in applet.private_keys if k.scalar)
        self.secrets.update(k.value for k in applet.secret_keys if k.value)

    def raw(self, command: bytes) -> bytes:
        response = self.card.process(command)
        assert len(response) >= 2, f"no status word for {command.hex()}"
        assert response[-2:] != b"\x6f\x00", f"internal error on {command.hex()}"
        self._remember_secrets()
        for secret in self.secrets:
            assert secret not in response, f"a card secret in the answer to {command.hex()}"
        return response

    def ensure_applet(self) -> None:
        """The applet selected on channel 1 again (a random APDU may have closed the channel or
        selected something else there): MANAGE CHANNEL open 1 when it is closed, then SELECT."""
        if self.raw(bytes.fromhex("01A4040007") + AID)[-2:] == b"\x68\x81":
            self.raw(bytes.fromhex("0070000100"))
            assert self.raw(bytes.fromhex("01A4040007") + AID)[-2:] == b"\x90\x00"

    def send(self, command: bytes) -> tuple[bytes, int]:
        """One command, following 61xx with GET RESPONSE as a T=0 client does."""
        response = self.raw(command)
        data, sw = response[:-2], int.from_bytes(response[-2:], "big")
        if sw >> 8 == 0x61:
            response = self.raw(bytes((0x81, 0xC0, 0, 0, sw & 0xFF)))
            data, sw = response[:-2], int.from_bytes(response[-2:], "big")
        return data, sw

    # -- what the state says (the card's own memory) --------------------------------------

    def private(self, object_id: bytes) -> ec.EllipticCurvePrivateKey | None:
        for key in self.card.state.applet.private_keys:
            if key.object_id == object_id and key.scalar:
                return ec.derive_private_key(int.from_bytes(key.scalar, "big"), ec.SECP256R1())
        return None

    def point(self, object_id: bytes) -> bytes | None:
        for key in self.card.state.applet.public_keys:
            if key.object_id == object_id and key.point:
                return key.point
        return None

    def paired_point(self, private_id: bytes) -> bytes | None:
        for key in self.card.state.applet.private_keys:
            if key.object_id == private_id:
                return self.point(key.public_id)
        return None


def signature_of(answer: bytes) -> bytes:
    """DER from a 33 TLV in any of the card's three codings (1- or 2-byte length, raw or DER)."""
    assert answer[0] == 0x33
    if answer[1] == 0x00:
        value = answer[3 : 3 + int.from_bytes(answer[1:3], "big")]
    else:
        value = answer[2 : 2 + answer[1]]
    if len(value) == 64:
        return encode_dss_signature(int.from_bytes(value[:32]), int.from_bytes(value[32:]))
    decode_dss_signature(value)
    return value


# -- well-formed operations ---------------------------------------------------------------

private_ids = st.sampled_from([b"\x01", b"\x02", b"\x03", b"\x04", b"\x09"])
public_ids = st.sampled_from([b"\x01", b"\x02", b"\x03", b"\x04", b"\x05", b"\x09"])
hash_bits = st.sampled_from([1, 2, 4])
sessions = st.integers(min_value=0, max_value=3)


@st.composite
def op_generate(draw: st.DrawFn) -> tuple[str, tuple[object, ...]]:
    return "generate", (draw(private_ids),)


@st.composite
def op_sign(draw: st.DrawFn) -> tuple[str, tuple[object, ...]]:
    bit = draw(hash_bits)
    digest = draw(st.binary(min_size=HASHES[bit][1], max_size=HASHES[bit][1]))
    private = draw(st.one_of(st.just(b"\x01"), private_ids))  # 01: always filled, signs
    return "sign", (private, bit, digest, draw(sessions))


@st.composite
def op_put_key(draw: st.DrawFn) -> tuple[str, tuple[object, ...]]:
    return "put_key", (draw(public_ids), draw(sessions), draw(st.booleans()))


@st.composite
def op_dh(draw: st.DrawFn) -> tuple[str, tuple[object, ...]]:
    # mostly the key-agreement objects, so that some succeed; the others must be refused
    private = draw(st.one_of(st.just(b"\x04"), private_ids))
    public = draw(st.one_of(st.sampled_from([b"\x04", b"\x05"]), public_ids))
    return "dh", (private, public)


@st.composite
def op_verify(draw: st.DrawFn) -> tuple[str, tuple[object, ...]]:
    return "verify", (draw(st.binary(min_size=1, max_size=40)), draw(st.booleans()))


@st.composite
def op_prf(draw: st.DrawFn) -> tuple[str, tuple[object, ...]]:
    given_secret = draw(st.one_of(st.none(), st.binary(min_size=1, max_size=64)))
    label_seed = draw(st.binary(min_size=1, max_size=80))
    return "prf", (given_secret, label_seed, draw(st.integers(min_value=1, max_value=256)))


@st.composite
def op_hkdf(draw: st.DrawFn) -> tuple[str, tuple[object, ...]]:
    given_secret = draw(st.one_of(st.none(), st.binary(min_size=1, max_size=64)))
    salt = draw(st.binary(max_size=64))
    expand = draw(st.one_of(st.none(), st.tuples(st.binary(max_size=40), st.integers(1, 256))))
    return "hkdf", (given_secret, salt, draw(hash_bits), expand)


@st.composite
def op_raw(draw: st.DrawFn) -> tuple[str, tuple[object, ...]]:
    """A random APDU: the earlier property test's, or one of the new instructions with random
    parameters and a random or mutated data field."""
    if draw(st.booleans()):
        return "raw", (draw(random_command()),)
    ins = draw(st.sampled_from([0x24, 0xD8, 0x46, 0x48, 0x4A, 0xCB]))
    p1 = draw(st.sampled_from([0x00, 0x00, 0x01, 0x80, 0x02, 0xC4, 0xFF]))
    p2 = draw(st.sampled_from([0, 1, 2, 3, 4, 0xFF]))
    tags = st.sampled_from([0x84, 0x85, 0x86, 0x74, 0x75, 0x76, 0x34, 0xD1, 0xD2, 0xD3, 0xD5,
                            0xD6, 0x91, 0x49, 0x00])  # fmt: skip
    parts = draw(st.lists(st.tuples(tags, st.binary(max_size=70)), max_size=5))
    data = b"".join(tlv(tag, value) for tag, value in parts)
    if draw(st.booleans()) and data:  # truncate or flip a byte
        cut = draw(st.integers(min_value=0, max_value=len(data) - 1))
        flipped = data[:cut] + bytes((data[cut] ^ 0xFF,)) + data[cut + 1 :]
        data = data[:cut] if draw(st.booleans()) else flipped
    cla = draw(st.sampled_from([0x81, 0x81, 0x01, 0x82, 0x80]))
    le = draw(st.one_of(st.none(), st.integers(min_value=0, max_value=255)))
    raw = bytes((cla, ins, p1, p2)) + (bytes((len(data),)) + data if data else b"")
    return "raw", (raw + (bytes((le,)) if le is not None else b""),)


operations = st.one_of(
    op_generate(), op_sign(), op_put_key(), op_dh(), op_verify(), op_prf(), op_hkdf(), op_raw(),
    op_raw(),
)  # fmt: skip


def do_generate(run: Run, private_id: bytes) -> None:
    run.ensure_applet()
    answer, sw = run.send(apdu(0xB9, 0, 0, tlv(0x84, private_id)))
    if sw != 0x9000:
        return
    point = answer[answer.index(bytes.fromhex("864104")) + 2 :]
    assert point == run.paired_point(private_id)
    ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
    SUCCESSES["generate"] += 1


def do_sign(run: Run, private_id: bytes, bit: int, digest: bytes, session: int) -> None:
    run.ensure_applet()
    init = tlv(0x84, private_id) + bytes.fromhex("A10103") + tlv(0x91, bit.to_bytes(2, "big"))
    if run.send(apdu(0x2A, 0, session, init + bytes.fromhex("920104")))[1] != 0x9000:
        return
    answer, sw = run.send(apdu(0x2B, 0x80, session, tlv(0x9E, digest)))
    if sw != 0x9000:
        return
    point = run.paired_point(private_id)
    assert point is not None
    public = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
    public.verify(signature_of(answer), digest, ec.ECDSA(Prehashed(HASHES[bit][0])))
    SUCCESSES["sign"] += 1


def do_put_key(run: Run, public_id: bytes, session: int, close: bool) -> None:
    run.ensure_applet()
    peer = ec.generate_private_key(ec.SECP256R1())
    point = peer.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
    if run.send(apdu(0x24, 0, session, tlv(0x85, public_id)))[1] != 0x9000:
        return
    update = tlv(0x34, tlv(0x49, tlv(0x86, point)))
    sw = run.send(apdu(0xD8, 0x80, session, update))[1]
    if close:
        run.send(apdu(0x24, 0x01, session))
    if sw != 0x9000:
        return
    assert run.point(public_id) == point
    run.peer_keys[public_id] = peer
    SUCCESSES["put_key"] += 1


def do_dh(run: Run, private_id: bytes, public_id: bytes) -> None:
    run.ensure_applet()
    answer, sw = run.send(apdu(0x46, 0, 0, tlv(0x84, private_id) + tlv(0x85, public_id)))
    if sw != 0x9000:
        return
    private, point = run.private(private_id), run.point(public_id)
    assert private is not None and point is not None
    peer_public = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
    assert answer == private.exchange(ec.ECDH(), peer_public)
    peer = run.peer_keys.get(public_id)
    own = run.paired_point(private_id)
    if peer is not None and own is not None:  # and from the other side of the exchange
        own_public = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), own)
        assert answer == peer.exchange(ec.ECDH(), own_public)
    SUCCESSES["dh"] += 1


def do_verify(run: Run, message: bytes, valid: bool) -> None:
    """VERIFY against the peer slot 05, holding a key this test put there (and can sign with)."""
    run.ensure_applet()
    peer = run.peer_keys.get(b"\x05")
    if peer is None or run.point(b"\x05") is None:
        return
    digest = hashlib.sha256(message).digest()
    r, s = decode_dss_signature(peer.sign(digest, ec.ECDSA(Prehashed(hashes.SHA256()))))
    if not valid:
        s = s ^ 1
    init = tlv(0x85, b"\x05") + bytes.fromhex("A10103 91020001 920104")
    if run.send(apdu(0x2C, 0, 2, init))[1] != 0x9000:
        return
    raw = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    sw = run.send(apdu(0x2D, 0x80, 2, tlv(0x9E, digest) + b"\x33\x00\x40" + raw))[1]
    if sw not in (0x9000, 0x6D01):
        return
    try:
        peer.public_key().verify(
            encode_dss_signature(r, s), digest, ec.ECDSA(Prehashed(hashes.SHA256()))
        )
        expected = 0x9000
    except InvalidSignature:
        expected = 0x6D01
    assert sw == expected
    SUCCESSES["verify"] += 1


def _length_tlv(length: int) -> bytes:
    return tlv(0xD3, length.to_bytes(1 if length < 256 else 2, "big"))


def do_prf(run: Run, given_secret: bytes | None, label_seed: bytes, length: int) -> None:
    run.ensure_applet()
    secret_tlv = tlv(0x86, b"\x01") if given_secret is None else tlv(0xD1, given_secret)
    data = secret_tlv + tlv(0xD2, label_seed) + _length_tlv(length)
    answer, sw = run.send(apdu(0x48, 0, 0, data))
    if sw != 0x9000:
        return
    secret = PSK if given_secret is None else given_secret
    assert answer == reference_prf(secret, label_seed, length)
    SUCCESSES["prf"] += 1


def do_hkdf(
    run: Run,
    given_secret: bytes | None,
    salt: bytes,
    bit: int,
    expand: tuple[bytes, int] | None,
) -> None:
    run.ensure_applet()
    secret_tlv = tlv(0x86, b"\x01") if given_secret is None else tlv(0xD1, given_secret)
    data = secret_tlv + tlv(0xD5, salt) + tlv(0x91, bit.to_bytes(2, "big"))
    if expand is not None:
        data += tlv(0xD6, expand[0]) + _length_tlv(expand[1])
    answer, sw = run.send(apdu(0x4A, 0, 0, data))
    if sw != 0x9000:
        return
    algorithm, size = HASHES[bit]
    ikm = PSK if given_secret is None else given_secret
    if expand is None:
        mac = HMAC(salt or bytes(size), algorithm)
        mac.update(ikm)
        assert answer == mac.finalize()
    else:
        info, length = expand
        assert answer == HKDF(algorithm, length, salt or None, info).derive(ikm)
    SUCCESSES["hkdf"] += 1


HANDLERS = {
    "generate": do_generate,
    "sign": do_sign,
    "put_key": do_put_key,
    "dh": do_dh,
    "verify": do_verify,
    "prf": do_prf,
    "hkdf": do_hkdf,
}


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> CardState:
    path: Path = tmp_path_factory.mktemp("sim") / "template.json"
    personalize(path, psk=PSK)
    return load_state(path)


option_sets = st.builds(
    CardOptions,
    t0_mode=st.booleans(),
    signature_format=st.sampled_from(["wide", "short", "der"]),
    object_list_page_bytes=st.sampled_from([40, 240]),
    read_file_max=st.sampled_from([50, 256]),
    implicit_channel_open=st.booleans(),
)


@settings(
    max_examples=50,
    deadline=None,
    database=None,
    # the same 50 sequences every run: the "every kind succeeded at least once" check below
    # depends on which sequences were drawn, and one random draw in CI missed a kind
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    options=option_sets,
    ops=st.lists(operations, min_size=3, max_size=30),
)
def _random_sequence(
    template: CardState, options: CardOptions, ops: list[tuple[str, tuple[object, ...]]]
) -> None:
    run = Run(copy.deepcopy(template), options)
    run.ensure_applet()
    # a filled ECDH key and a peer key to start from, so the comparisons have material
    do_generate(run, b"\x04")
    do_put_key(run, b"\x05", 1, True)
    for name, args in ops:
        if name == "raw":
            run.raw(args[0])  # type: ignore[arg-type]
            continue
        HANDLERS[name](run, *args)  # type: ignore[operator]


def test_random_sequences_match_cryptography_and_leak_nothing(template: CardState) -> None:
    SUCCESSES.clear()
    started = time.monotonic()
    _random_sequence(template)
    elapsed = time.monotonic() - started
    assert elapsed < RUN_BOUND_S
    # every well-formed kind succeeded at least once: the comparisons above were made
    assert set(SUCCESSES) >= set(HANDLERS), f"never succeeded: {set(HANDLERS) - set(SUCCESSES)}"
