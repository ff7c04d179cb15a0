"""The agent's card client against the virtual SIM, in process, across the SIM's quirk modes."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from est_agent.backends.iotsafe import CardSigner
from est_agent.backends.signer import public_key_from_point
from est_agent.card.channel import CardSession
from est_agent.card.info import read_card_info
from est_agent.card.iotsafe import IotSafeApplet, ObjectType
from est_agent.card.uicc import UiccFiles
from est_agent.card.uri import IotSafeRef, ObjectKind, UiccPath, parse_card_uri
from est_agent.errors import (
    ConditionsNotSatisfiedError,
    NotFoundError,
    SecurityStatusError,
)
from est_agent.sim.options import CardOptions
from est_agent.sim.personalize import personalize
from est_agent.sim.transport import SimTransport

OP_A = IotSafeRef(ObjectKind.PRIVATE_KEY, label="op-a")
BOOTSTRAP = IotSafeRef(ObjectKind.PRIVATE_KEY, object_id=b"\x01")
BOOTSTRAP_CERT = IotSafeRef(ObjectKind.FILE, object_id=b"\x01")
EF_6F01 = UiccPath((0x7FF0, 0x6F01))

QUIRKS = {
    "direct": CardOptions(),
    "t0": CardOptions(t0_mode=True),
    "t0+6c": CardOptions(t0_mode=True, wrong_le_6c=True),
    "short-sig": CardOptions(signature_format="short"),
    "der-sig": CardOptions(signature_format="der"),
    "other-pub-id": CardOptions(pubkey_id_offset=0x10),
    "small-pages": CardOptions(object_list_page_bytes=40, read_file_max=100, read_oob_sw=0x6981),
}


@pytest.fixture(scope="module")
def state_template(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("sim") / "sim.json"
    personalize(path, iccid="8988247000001234567")
    return path.read_bytes()


@pytest.fixture
def state(tmp_path: Path, state_template: bytes) -> Path:
    path = tmp_path / "sim.json"
    path.write_bytes(state_template)
    return path


def open_applet(
    state: Path, options: CardOptions, **kwargs: bool
) -> tuple[IotSafeApplet, SimTransport]:
    transport = SimTransport(state, options)
    return IotSafeApplet.open(CardSession(transport), **kwargs), transport


@pytest.mark.parametrize("quirk", QUIRKS)
def test_keygen_sign_verify_read_in_every_mode(state: Path, quirk: str) -> None:
    applet, transport = open_applet(state, QUIRKS[quirk])
    generated = applet.generate_key_pair(OP_A)
    public = public_key_from_point(generated.public_point)
    if quirk == "other-pub-id":
        assert generated.public_id == b"\x12"

    signer = CardSigner.from_card(applet, OP_A)
    assert signer.public_key().public_numbers() == public.public_numbers()
    digest = hashlib.sha256(b"certification request info").digest()
    signature = signer.sign_digest(digest)
    public.verify(signature, digest, ec.ECDSA(Prehashed(hashes.SHA256())))

    pub_ref = IotSafeRef(ObjectKind.PUBLIC_KEY, object_id=generated.public_id or b"\x02")
    assert applet.verify_signature(pub_ref, digest, signature)
    assert not applet.verify_signature(pub_ref, hashlib.sha256(b"other").digest(), signature)

    cert = x509.load_der_x509_certificate(applet.read_file(BOOTSTRAP_CERT))
    assert cert.subject.rfc4514_string().endswith("CN=bootstrap-8988247000001234567")
    assert len(applet.get_random(32)) == 32
    assert {o.label for o in applet.objects()} >= {"bootstrap", "op-a", "op-b"}
    applet.close()
    transport.close()


def test_bootstrap_certificate_matches_bootstrap_key(state: Path) -> None:
    applet, _ = open_applet(state, CardOptions())
    cert = x509.load_der_x509_certificate(applet.read_file(BOOTSTRAP_CERT))
    signer = CardSigner(applet, BOOTSTRAP, cert.public_key())  # type: ignore[arg-type]
    digest = hashlib.sha256(b"tls handshake").digest()
    cert.public_key().verify(  # type: ignore[call-arg]
        signer.sign_digest(digest),
        digest,
        ec.ECDSA(Prehashed(hashes.SHA256())),  # type: ignore[arg-type]
    )


def test_bootstrap_key_cannot_be_regenerated(state: Path) -> None:
    applet, _ = open_applet(state, CardOptions())
    with pytest.raises(ConditionsNotSatisfiedError):
        applet.generate_key_pair(BOOTSTRAP)


def test_sign_costs_two_apdus_and_sessions_are_reused(state: Path) -> None:
    applet, transport = open_applet(state, CardOptions())
    applet.generate_key_pair(OP_A)
    before = transport.stats.apdus
    applet.sign_digest(OP_A, bytes(32))
    assert transport.stats.apdus - before == 2  # INIT + UPDATE; the session is left open
    applet.sign_digest(OP_A, bytes(32))  # INIT on the still-open session must work
    assert transport.stats.apdus - before == 4


def test_new_key_replaces_old_and_survives_reload(state: Path) -> None:
    applet, transport = open_applet(state, CardOptions())
    first = applet.generate_key_pair(OP_A).public_point
    second = applet.generate_key_pair(OP_A).public_point
    assert first != second
    transport.close()
    applet, _ = open_applet(state, CardOptions())
    assert CardSigner.from_card(applet, OP_A).public_key() == public_key_from_point(second)


def test_empty_slot_cannot_sign(state: Path) -> None:
    applet, _ = open_applet(state, CardOptions())
    with pytest.raises(ConditionsNotSatisfiedError):
        applet.sign_digest(IotSafeRef(ObjectKind.PRIVATE_KEY, object_id=b"\x03"), bytes(32))


def test_unknown_object(state: Path) -> None:
    applet, _ = open_applet(state, CardOptions())
    with pytest.raises(NotFoundError):
        applet.sign_digest(IotSafeRef(ObjectKind.PRIVATE_KEY, object_id=b"\x09"), bytes(32))


def test_wrong_aid(state: Path) -> None:
    with pytest.raises(NotFoundError, match="no IoT SAFE applet"):
        open_applet(state, CardOptions(), aids=(bytes.fromhex("A000000559001099"),))  # type: ignore[arg-type]


def test_iso_class(state: Path) -> None:
    applet, _ = open_applet(state, CardOptions(), proprietary_cla=False)
    assert applet.info().max_private_keys == 4  # issue 13: + the ECDH key 04


def test_object_info_single(state: Path) -> None:
    applet, _ = open_applet(state, CardOptions(t0_mode=True))
    info = applet.object_info(BOOTSTRAP_CERT)
    assert info.type is ObjectType.FILE and info.label == "bootstrap-cert"
    assert info.file_size == len(applet.read_file(BOOTSTRAP_CERT))


@pytest.mark.parametrize("quirk", ["direct", "t0"])
def test_uicc_update_and_read_back_on_own_channel(state: Path, quirk: str) -> None:
    transport = SimTransport(state, QUIRKS[quirk])
    session = CardSession(transport)
    applet = IotSafeApplet.open(session)
    files = UiccFiles(session.open_channel())
    assert files.channel.number != applet.channel.number
    payload = bytes(range(256)) * 8  # the whole 2 KiB EF: 9 UPDATE BINARY commands
    files.update(EF_6F01, payload)
    assert files.read(EF_6F01) == payload
    session.close()
    # persisted: a fresh card from the same file reads the same bytes
    files = UiccFiles(CardSession(SimTransport(state)).open_channel())
    assert files.read(EF_6F01, 100, 50) == payload[100:150]


def test_uicc_adm_file_refused(state: Path) -> None:
    files = UiccFiles(CardSession(SimTransport(state)).open_channel())
    adm = parse_card_uri("uicc:path=7FF0/6F10")
    assert isinstance(adm, UiccPath)
    with pytest.raises(SecurityStatusError):
        files.update(adm, b"\x00")


def test_uicc_missing_file(state: Path) -> None:
    files = UiccFiles(CardSession(SimTransport(state)).open_channel())
    with pytest.raises(NotFoundError):
        files.read(UiccPath((0x7FF0, 0x6F99)))


def test_card_info(state: Path) -> None:
    session = CardSession(SimTransport(state, CardOptions(t0_mode=True)))
    info = read_card_info(session)
    assert info.iccid == "8988247000001234567"
    assert info.applet.max_sessions == 4
    assert len(info.applet.applet_id) == 32
    as_json = info.to_json()
    assert as_json["objects"][0] == {
        "type": "private-key",
        "id": "01",
        "label": "bootstrap",
        "state": "activated",
        "access": info.objects[0].access,
        "key_type": 0x13,
        "key_usage": info.objects[0].key_usage,
        "crypto_functions": 0x01,
    }
    session.close()


def test_uicc_select_by_fid_walks_the_tree(state: Path) -> None:
    files = UiccFiles(CardSession(SimTransport(state)).open_channel())
    assert files.select_fid(0x3F00).is_df
    assert files.select_fid(0x7FF0).is_df
    ef = files.select_fid(0x6F02)
    assert (ef.fid, ef.size, ef.is_transparent_ef) == (0x6F02, 2048, True)
    with pytest.raises(NotFoundError):
        files.select_fid(0x2FE2)  # EF_ICCID lives under the MF, not under 7FF0
