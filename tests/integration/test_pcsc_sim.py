"""The virtual SIM through the whole stack: pyscard -> pcscd -> vpcd -> VirtualCard.

The client here is written from the worked exchange of docs/iot-safe-card.md §8 with raw bytes,
independent of est_agent.card.*, so that a bug shared by the agent's encoders and the card's
decoders cannot pass unnoticed.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    Prehashed,
    decode_dss_signature,
    encode_dss_signature,
)

from est_agent.errors import NoCardError
from est_agent.sim.vpcd import POWER_CUT_EXIT_CODE
from est_agent.transport.pcsc import PcscTransport
from tests.certs import ca_credential, trustme_ca
from tests.integration.conftest import Cards

pytestmark = pytest.mark.integration

AID = bytes.fromhex("A0000005590010")
BOOTSTRAP_FILE_ID = b"\x01"
KEY_SLOT = b"\x02"


# -- a raw client, from the bytes of docs/iot-safe-card.md §8 ----------------------------------


def tlvs(data: bytes) -> list[tuple[int, bytes]]:
    """Simple TLVs (1-byte tag); lengths 1 byte, BER 81/82, or the `33 00 40` 2-byte form."""
    out = []
    pos = 0
    while pos < len(data):
        tag = data[pos]
        length = data[pos + 1]
        pos += 2
        if tag == 0x33 and length == 0x00:  # a 2-byte signature length (docs/iot-safe-card.md §2)
            length = int.from_bytes(data[pos - 1 : pos + 1], "big")
            pos += 1
        elif length == 0x81:
            length = data[pos]
            pos += 1
        elif length == 0x82:
            length = int.from_bytes(data[pos : pos + 2], "big")
            pos += 2
        out.append((tag, data[pos : pos + length]))
        pos += length
    assert pos == len(data), f"TLV overrun at {pos} of {len(data)}"
    return out


def first(data: bytes, tag: int) -> bytes:
    for t, value in tlvs(data):
        if t == tag:
            return value
    raise AssertionError(f"tag {tag:02X} missing")


@dataclass
class RawClient:
    link: PcscTransport
    channel: int = 0
    saw_61xx: int = 0
    sws: list[int] = field(default_factory=list)

    @property
    def cla(self) -> int:
        return 0x80 | self.channel  # proprietary class, channels 1-3 (TS 102 221 §10.1.1)

    def send(self, apdu: bytes) -> tuple[bytes, int]:
        response = self.link.transmit(apdu)
        data, sw = response[:-2], int.from_bytes(response[-2:], "big")
        if sw >> 8 == 0x6C:  # wrong Le: resend the same command with Le = xx
            response = self.link.transmit(apdu[:-1] + bytes([sw & 0xFF]))
            data, sw = response[:-2], int.from_bytes(response[-2:], "big")
        while sw >> 8 == 0x61:  # T=0: the data waits for GET RESPONSE on this channel
            self.saw_61xx += 1
            response = self.link.transmit(bytes([apdu[0], 0xC0, 0x00, 0x00, sw & 0xFF]))
            data += response[:-2]
            sw = int.from_bytes(response[-2:], "big")
        self.sws.append(sw)
        return data, sw

    def ok(self, apdu: bytes) -> bytes:
        data, sw = self.send(apdu)
        assert sw == 0x9000, f"INS {apdu[1]:02X}: SW {sw:04X}"
        return data

    def applet(self, hex_tail: str) -> bytes:
        """An IoT SAFE command on the open channel: CLA + the hex of INS..."""
        return self.ok(bytes([self.cla]) + bytes.fromhex(hex_tail))

    # the steps of the worked exchange

    def open_and_select(self) -> None:
        data = self.ok(bytes.fromhex("0070000001"))
        assert len(data) == 1 and 1 <= data[0] <= 3
        self.channel = data[0]
        self.ok(bytes([self.channel, 0xA4, 0x04, 0x00, len(AID)]) + AID)

    def close(self) -> None:
        self.ok(bytes([0x00, 0x70, 0x80, self.channel]))

    def object_list(self) -> bytes:
        """GET DATA 01 with the `63 00` / P2 `01` paging loop (docs/iot-safe-card.md §4)."""
        collected = b""
        p2 = 0x00
        for _ in range(32):
            data, sw = self.send(bytes([self.cla, 0xCB, 0x01, p2, 0x00]))
            collected += data
            if sw == 0x9000:
                return collected
            assert sw == 0x6300, f"object list: SW {sw:04X}"
            p2 = 0x01
        raise AssertionError("object list never ended")

    def generate(self, slot: bytes) -> tuple[bytes, bytes]:
        """GENERATE KEY PAIR; (public key ID, SEC1 point)."""
        data = self.ok(bytes([self.cla, 0xB9, 0x00, 0x00, 2 + len(slot), 0x84, len(slot)]) + slot)
        public_id = first(data, 0x85)
        point = first(first(first(data, 0x34), 0x49), 0x86)
        assert len(point) == 65 and point[0] == 0x04
        return public_id, point

    def read_public(self, public_id: bytes) -> bytes:
        apdu = bytes([self.cla, 0xCD, 0x00, 0x00, 2 + len(public_id), 0x85, len(public_id)])
        data = self.ok(apdu + public_id)
        return first(first(first(data, 0x34), 0x49), 0x86)

    def sign(self, slot: bytes, digest: bytes) -> bytes:
        """COMPUTE SIGNATURE INIT/UPDATE/close, mode 03 (host hashed): DER ECDSA signature."""
        self.send(bytes([self.cla, 0x2A, 0x01, 0x01, 0x00]))  # clears a stale session 1
        init = bytes([0x84, len(slot)]) + slot + bytes.fromhex("A10103 91020001 920104")
        self.ok(bytes([self.cla, 0x2A, 0x00, 0x01, len(init)]) + init)
        update = bytes([0x9E, len(digest)]) + digest
        data = self.ok(bytes([self.cla, 0x2B, 0x80, 0x01, len(update)]) + update)
        self.ok(bytes([self.cla, 0x2A, 0x01, 0x01, 0x00]))
        value = first(data, 0x33)
        if len(value) != 64:  # some applets answer DER already (70-72 bytes for P-256)
            decode_dss_signature(value)  # raises unless it really is DER
            return value
        # Decided by length, not by a leading 30: raw r begins with 30 once in 256 signatures.
        r, s = int.from_bytes(value[:32], "big"), int.from_bytes(value[32:], "big")
        return encode_dss_signature(r, s)

    def read_file(self, file_id: bytes) -> bytes:
        """GET DATA C3 for the size, READ FILE until the DER says the certificate ends."""
        ref = bytes([0x83, len(file_id)]) + file_id
        info = self.ok(bytes([self.cla, 0xCB, 0xC3, 0x00, len(ref)]) + ref + b"\x00")
        container = first(info, 0xC3) if info[0] == 0xC3 else info  # wrapper is optional
        size = int.from_bytes(first(container, 0x20), "big")
        content = b""
        while len(content) < size:
            offset = len(content)
            apdu = bytes([self.cla, 0xB0, offset >> 8, offset & 0xFF, len(ref)]) + ref + b"\x00"
            chunk = self.ok(apdu)
            assert chunk, "READ FILE returned nothing before the end"
            content += chunk  # advance by what came back, never by a fixed step
            end = _der_end(content)
            if end is not None and len(content) >= end:
                break  # the size may be the container's capacity: the DER says where it ends
        end = _der_end(content)
        assert end is not None and len(content) >= end, "no complete DER SEQUENCE in the file"
        return content[:end]


def _der_end(content: bytes) -> int | None:
    """Total length of the DER SEQUENCE that ``content`` starts with, once the header is in."""
    if len(content) < 2 or content[0] != 0x30:
        return None
    if content[1] < 0x80:
        return 2 + content[1]
    n = content[1] & 0x7F
    if len(content) < 2 + n:
        return None
    return 2 + n + int.from_bytes(content[2 : 2 + n], "big")


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def bootstrap_ca() -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    return ca_credential(trustme_ca())


@pytest.fixture
def sim_state(
    tmp_path: Path, bootstrap_ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey]
) -> Path:
    from est_agent.sim.personalize import personalize

    state = tmp_path / "sim.json"
    # each personalization draws a random card serial, so every test's card has its own ATR
    personalize(state, bootstrap_ca=bootstrap_ca)
    return state


@pytest.fixture
def link(cards: Cards) -> Iterator[PcscTransport]:
    transport = PcscTransport(cards.reader())
    try:
        yield transport
    finally:
        transport.close()


def serve_in_thread(cards: Cards, state: Path, *, t0_mode: bool = False) -> bytes:
    from est_agent.sim.card import VirtualCard
    from est_agent.sim.options import CardOptions

    card = VirtualCard.load(state, CardOptions(t0_mode=t0_mode))
    cards.thread(card)
    return card.atr


# -- (a) the worked exchange, direct and T=0 --------------------------------------------------


@pytest.mark.parametrize("t0_mode", [False, True], ids=["direct", "t0"])
def test_reference_walkthrough(
    cards: Cards,
    sim_state: Path,
    link: PcscTransport,
    t0_mode: bool,
    bootstrap_ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
) -> None:
    atr = serve_in_thread(cards, sim_state, t0_mode=t0_mode)
    link.connect()
    assert link.atr == atr
    client = RawClient(link)
    client.open_and_select()

    info = client.applet("CB000000")
    tags = [tag for tag, _ in tlvs(info)]
    assert tags[:2] == [0x10, 0x11]
    assert {0xB1, 0xB2, 0xB3, 0xB4, 0x90, 0x91, 0x92, 0x93, 0x94, 0xB7} <= set(tags)
    assert len(info) == 0x44

    listing = client.object_list()
    containers = tlvs(listing)
    assert {tag for tag, _ in containers} <= {0xC1, 0xC2, 0xC3, 0xC4}
    private_ids = [first(value, 0x84) for tag, value in containers if tag == 0xC1]
    file_ids = [first(value, 0x83) for tag, value in containers if tag == 0xC3]
    assert KEY_SLOT in private_ids
    assert BOOTSTRAP_FILE_ID in file_ids

    public_id, point = client.generate(KEY_SLOT)
    assert client.read_public(public_id) == point
    public_key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
    digest = hashlib.sha256(b"certification request info").digest()
    signature = client.sign(KEY_SLOT, digest)
    public_key.verify(signature, digest, ec.ECDSA(Prehashed(hashes.SHA256())))

    der = client.read_file(BOOTSTRAP_FILE_ID)
    cert = x509.load_der_x509_certificate(der)
    ca_cert, _ca_key = bootstrap_ca
    cert.verify_directly_issued_by(ca_cert)
    # the certificate is for the card's bootstrap key 01: a signature by it must verify
    signature = client.sign(b"\x01", digest)
    bootstrap_public = cert.public_key()
    assert isinstance(bootstrap_public, ec.EllipticCurvePublicKey)
    bootstrap_public.verify(signature, digest, ec.ECDSA(Prehashed(hashes.SHA256())))

    client.close()
    if t0_mode:
        assert client.saw_61xx >= 4  # GET DATA x2, GENERATE, READ PUBLIC KEY, SIGN, READ FILE
    else:
        assert client.saw_61xx == 0


# -- (e) state survives the card process ------------------------------------------------------


def test_key_persists_across_card_processes(
    cards: Cards, sim_state: Path, link: PcscTransport
) -> None:
    proc = cards.sim_process(sim_state)
    link.connect()
    client = RawClient(link)
    client.open_and_select()
    public_id, point = client.generate(KEY_SLOT)
    client.close()
    link.close()
    assert cards.stop(proc) == 0  # SIGTERM: a clean stop exits 0

    cards.sim_process(sim_state)
    link.connect()
    client = RawClient(link)
    client.open_and_select()
    assert client.read_public(public_id) == point
    digest = hashlib.sha256(b"after restart").digest()
    signature = client.sign(KEY_SLOT, digest)
    public_key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
    public_key.verify(signature, digest, ec.ECDSA(Prehashed(hashes.SHA256())))


# -- (f) a power cut after N APDUs keeps exactly the completed ones ---------------------------


def test_power_cut_keeps_exactly_the_completed_apdus(
    cards: Cards, sim_state: Path, link: PcscTransport
) -> None:
    # APDUs: 1 MANAGE CHANNEL, 2 SELECT, 3 GENERATE KEY PAIR (direct mode: no GET RESPONSE).
    # The cut comes right after the 3rd answer: the key must be on "disk", and the 4th
    # command (a second GENERATE, which would replace it) must never reach the card.
    proc = cards.sim_process(sim_state, "--power-cut-after", "3")
    link.connect()
    client = RawClient(link)
    client.open_and_select()
    public_id, point = client.generate(KEY_SLOT)
    with pytest.raises(NoCardError):
        client.generate(KEY_SLOT)
    assert proc.wait(timeout=10) == POWER_CUT_EXIT_CODE
    cards.died()
    link.close()

    cards.sim_process(sim_state)
    link.connect()
    client = RawClient(link)
    client.open_and_select()
    assert client.read_public(public_id) == point


# -- (g) the trace shows what happened, never what was signed ---------------------------------


def test_trace_has_headers_and_no_payloads(
    cards: Cards, sim_state: Path, link: PcscTransport, tmp_path: Path
) -> None:
    trace = tmp_path / "trace.jsonl"
    proc = cards.sim_process(sim_state, "--trace", str(trace))
    link.connect()
    client = RawClient(link)
    client.open_and_select()
    client.generate(KEY_SLOT)
    digest = hashlib.sha256(b"a secret to-be-signed structure").digest()
    signature = client.sign(KEY_SLOT, digest)
    client.close()
    link.close()
    assert cards.stop(proc) == 0

    text = trace.read_text()
    records = [json.loads(line) for line in text.splitlines() if line.strip()]
    assert records, "no trace lines"
    ins_seen = set()
    for record in records:
        assert "channel" in record and "ins" in record and "sw" in record, record
        ins_seen.add(str(record["ins"]).upper())
    assert {"70", "A4", "B9", "2A", "2B"} <= {i[-2:] for i in ins_seen}
    lowered = text.lower()
    assert digest.hex() not in lowered
    assert signature.hex() not in lowered
    assert digest.hex()[:16] not in lowered  # not even a prefix of it


def test_pcscd_sees_the_sim_process(cards: Cards, sim_state: Path) -> None:
    """`est-agent sim serve` is what the process tests drive; SIGTERM ends it with status 0."""
    proc = cards.sim_process(sim_state)
    with PcscTransport(cards.reader()) as link:
        assert link.atr[:1] == b"\x3b"
    assert cards.stop(proc) == 0
    assert isinstance(proc, subprocess.Popen)
