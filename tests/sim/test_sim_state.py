"""The virtual SIM's state file: round trip, damage detection, atomic replacement."""

from __future__ import annotations

import json
import os
import shutil
import stat
import time
from pathlib import Path
from typing import Any

import pytest

from est_agent.errors import SimStateError
from est_agent.sim.card import VirtualCard
from est_agent.sim.personalize import personalize
from est_agent.sim.state import (
    FORMAT_VERSION,
    decode_state,
    encode_state,
    load_state,
    save_state,
)

AID = "A0 00 00 05 59 00 10"


def h(text: str) -> bytes:
    return bytes.fromhex(text.replace(" ", ""))


def tx(card: VirtualCard, command: str) -> tuple[bytes, int]:
    response = card.process(h(command))
    return response[:-2], int.from_bytes(response[-2:], "big")


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sim") / "template.json"
    personalize(path)
    return path


@pytest.fixture
def state_path(template: Path, tmp_path: Path) -> Path:
    path = tmp_path / "card.json"
    shutil.copyfile(template, path)
    return path


def rewrite(path: Path, change: Any, *, fix_checksum: bool) -> None:
    """Edit the document; optionally recompute the checksum the way the format defines it."""
    import hashlib

    document = json.loads(path.read_text())
    change(document)
    if fix_checksum:
        canonical = json.dumps(document["card"], sort_keys=True, separators=(",", ":"))
        document["sha256"] = hashlib.sha256(canonical.encode()).hexdigest()
    path.write_text(json.dumps(document))


def scalars(path: Path) -> list[str]:
    return [k.scalar.hex() for k in load_state(path).applet.private_keys if k.scalar]


def test_round_trip_and_mode(template: Path, tmp_path: Path) -> None:
    state = load_state(template)
    assert stat.S_IMODE(template.stat().st_mode) == 0o600  # as personalization wrote it
    assert decode_state(encode_state(state)) == state
    copy = tmp_path / "copy.json"
    save_state(copy, state)
    assert stat.S_IMODE(copy.stat().st_mode) == 0o600
    assert load_state(copy) == state
    document = json.loads(copy.read_text())
    assert document["format"] == "est-agent-virtual-sim"
    assert document["version"] == FORMAT_VERSION
    assert len(document["sha256"]) == 64


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SimStateError, match="not found"):
        load_state(tmp_path / "absent.json")
    with pytest.raises(SimStateError, match="not found"):
        VirtualCard.load(tmp_path / "absent.json")


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(SimStateError, match="cannot read"):
        load_state(tmp_path)  # a directory


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("dev-zero", "a character device, not a regular file"),
        ("fifo", "a FIFO, not a regular file"),
        ("sparse-2gib", "larger than 4194304 bytes"),
    ],
)
def test_state_file_that_is_not_a_small_regular_file(
    fifo: Path, sparse_2gib: Path, kind: str, reason: str
) -> None:
    path = {"dev-zero": Path("/dev/zero"), "fifo": fifo, "sparse-2gib": sparse_2gib}[kind]
    started = time.monotonic()
    with pytest.raises(SimStateError) as info:
        load_state(path)
    assert time.monotonic() - started < 1.0
    assert str(info.value).startswith(f"virtual SIM state file: cannot read {path}: {reason}")
    assert info.value.exit_code == 65


def test_state_file_through_a_symlink(template: Path, tmp_path: Path) -> None:
    link = tmp_path / "link.json"
    link.symlink_to(template)
    assert load_state(link) == load_state(template)


def test_truncated_file(state_path: Path) -> None:
    raw = state_path.read_bytes()
    state_path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(SimStateError, match="corrupt"):
        load_state(state_path)
    state_path.write_bytes(b"")
    with pytest.raises(SimStateError, match="corrupt"):
        load_state(state_path)


def test_garbage_file(state_path: Path) -> None:
    state_path.write_bytes(bytes(range(256)))
    with pytest.raises(SimStateError, match="corrupt"):
        load_state(state_path)
    state_path.write_text('{"hello": 1}')
    with pytest.raises(SimStateError, match="not a virtual SIM state file"):
        load_state(state_path)


def test_bit_flip_is_detected(state_path: Path) -> None:
    raw = bytearray(state_path.read_bytes())
    index = raw.index(b'"data": "') + 20
    raw[index] = ord("0") if raw[index] != ord("0") else ord("1")
    state_path.write_bytes(bytes(raw))
    with pytest.raises(SimStateError, match="checksum mismatch"):
        load_state(state_path)


def test_tampering_is_detected(state_path: Path) -> None:
    def change(document: dict[str, Any]) -> None:
        document["card"]["applet"]["private_keys"][0]["crypto_functions"] = 3

    rewrite(state_path, change, fix_checksum=False)
    with pytest.raises(SimStateError, match="checksum mismatch"):
        load_state(state_path)


def test_wrong_version(state_path: Path) -> None:
    rewrite(state_path, lambda d: d.update(version=2), fix_checksum=False)
    with pytest.raises(SimStateError, match="unsupported format version 2"):
        load_state(state_path)


@pytest.mark.parametrize(
    ("change", "where"),
    [
        (lambda c: c["applet"]["private_keys"][0].update(scalar="00" * 31), "scalar"),
        (lambda c: c["applet"]["private_keys"][0].update(access=256), "access"),
        (lambda c: c["applet"]["private_keys"][0].update(access=True), "access"),
        (lambda c: c["applet"]["private_keys"][0].update(public_id="77"), "no public key"),
        (lambda c: c["applet"]["public_keys"].append(c["applet"]["public_keys"][0]), "duplicate"),
        (lambda c: c["applet"]["files"][0].update(capacity=1), "capacity"),
        (lambda c: c["mf"]["efs"][0].update(read="sometimes"), "access rule"),
        (lambda c: c["mf"]["efs"][0].update(fid="2F"), "fid"),
        (lambda c: c["mf"].update(fid="3F01"), "3F00"),
        (lambda c: c.update(iccid="12AB"), "iccid"),
        (lambda c: c.update(serial="zz"), "serial"),
        (lambda c: c.pop("applet"), "applet"),
        (lambda c: c["mf"]["dfs"][0].update(efs={}), "efs"),
    ],
)
def test_invalid_content_with_a_valid_checksum(state_path: Path, change: Any, where: str) -> None:
    secrets_before = scalars(state_path)
    rewrite(state_path, lambda d: change(d["card"]), fix_checksum=True)
    with pytest.raises(SimStateError, match="invalid content") as info:
        load_state(state_path)
    assert where in str(info.value)
    for secret in secrets_before:  # error messages never carry key material
        assert secret not in str(info.value).lower()


def test_atomic_write_keeps_the_old_file_when_replace_fails(
    state_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = state_path.read_bytes()
    state = load_state(state_path)
    state.iccid = "8988111111111111111"

    def crash(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(SimStateError, match="cannot write"):
        save_state(state_path, state)
    assert state_path.read_bytes() == before
    assert sorted(p.name for p in state_path.parent.iterdir()) == ["card.json"]  # no temp left

    def interrupted(src: object, dst: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_state(state_path, state)
    assert state_path.read_bytes() == before
    assert sorted(p.name for p in state_path.parent.iterdir()) == ["card.json"]


def test_save_is_0600_under_any_umask_and_a_failed_fsync_keeps_the_old_file(
    state_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = load_state(state_path)
    old_umask = os.umask(0)
    try:
        save_state(state_path, state)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(state_path.stat().st_mode) == 0o600
    before = state_path.read_bytes()
    state.iccid = "8988111111111111111"

    def failing_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(SimStateError, match=r"cannot write virtual SIM state file .*: Input/out"):
        save_state(state_path, state)
    assert state_path.read_bytes() == before
    assert sorted(p.name for p in state_path.parent.iterdir()) == ["card.json"]


def test_card_answers_6581_and_rolls_back_when_it_cannot_persist(
    state_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = state_path.read_bytes()
    card = VirtualCard.load(state_path)
    tx(card, "00 A4 08 0C 04 7F F0 6F 01")
    tx(card, "00 70 00 00 01")
    tx(card, f"01 A4 04 00 07 {AID}")

    def crash(src: object, dst: object) -> None:
        raise OSError(5, "I/O error")

    monkeypatch.setattr(os, "replace", crash)
    assert tx(card, "00 D6 00 00 02 12 34") == (b"", 0x6581)
    assert tx(card, "81 B9 00 00 03 84 01 02") == (b"", 0x6581)
    monkeypatch.undo()
    assert tx(card, "00 B0 00 00 02") == (h("FF FF"), 0x9000)  # memory unchanged too
    assert tx(card, "81 CD 00 00 03 85 01 02") == (b"", 0x6985)
    assert state_path.read_bytes() == before


def test_state_survives_reload_with_a_generated_key(state_path: Path) -> None:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, encode_dss_signature

    digest = bytes(range(32))
    card = VirtualCard.load(state_path)
    tx(card, "00 70 00 00 01")
    tx(card, f"01 A4 04 00 07 {AID}")
    point = tx(card, "81 B9 00 00 03 84 01 02")[0][12:]
    del card
    again = VirtualCard.load(state_path)
    tx(again, "00 70 00 00 01")
    tx(again, f"01 A4 04 00 07 {AID}")
    assert tx(again, "81 CD 00 00 03 85 01 02")[0][6:] == point
    tx(again, "81 2A 00 01 0D 84 01 02 A1 01 03 91 02 00 01 92 01 04")
    sig = tx(again, "81 2B 80 01 22 9E 20" + digest.hex())[0]
    r, s = int.from_bytes(sig[3:35], "big"), int.from_bytes(sig[35:], "big")
    key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
    key.verify(encode_dss_signature(r, s), digest, ec.ECDSA(Prehashed(hashes.SHA256())))
