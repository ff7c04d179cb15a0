"""`est-agent card verify | dh | hkdf` and `sim init --psk` against the in-process virtual SIM:
results checked with `cryptography`, exit codes as documented, secrets never in the log."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.hmac import HMAC
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from est_agent.api import open_card
from est_agent.cli.main import main
from est_agent.sim.personalize import personalize

PSK = bytes.fromhex("5ec7e75ec7e75ec7e75ec7e75ec7e75ec7e7")
MESSAGE = b"a message signed by the bootstrap key"
BOUND_S = 20.0


@pytest.fixture
def sim(tmp_path: Path) -> Path:
    path = tmp_path / "sim.json"
    personalize(path, iccid="8988247000001234567", psk=PSK)
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    started = time.monotonic()
    code = main(list(argv))
    assert time.monotonic() - started < BOUND_S
    out, err = capsys.readouterr()
    return code, out, err


def test_verify_valid_invalid_and_bad_input(
    capsys: pytest.CaptureFixture[str], sim: Path, tmp_path: Path
) -> None:
    reader = f"sim:{sim}"
    with open_card(reader) as card:
        der = card.sign_digest("iotsafe:key-id=01", hashlib.sha256(MESSAGE).digest())
    (tmp_path / "msg").write_bytes(MESSAGE)
    (tmp_path / "sig").write_bytes(der)
    key = ("--key", "iotsafe:public-key-id=01", "--reader", reader)
    code, out, _ = run(
        capsys, "card", "verify", "--message", str(tmp_path / "msg"), "--signature",
        str(tmp_path / "sig"), *key,
    )  # fmt: skip
    assert (code, out) == (0, "valid\n")
    r, s = decode_dss_signature(der)
    raw = (r.to_bytes(32, "big") + s.to_bytes(32, "big")).hex()
    digest = hashlib.sha256(MESSAGE).hexdigest()
    by_digest = ("--digest-hex", digest, "--signature-hex", raw)
    code, out, _ = run(capsys, "card", "verify", *by_digest, *key)
    assert (code, out) == (0, "valid\n")
    code, out, _ = run(
        capsys, "card", "verify", "--message-hex", (MESSAGE + b"!").hex(), "--signature-hex", raw,
        *key,
    )  # fmt: skip
    assert (code, out) == (1, "invalid\n")
    # a SHA-384 digest of the wrong size, a garbage signature, a private key URI, bad hex
    bad = [
        (65, ("--digest-hex", digest, "--hash", "sha384", "--signature-hex", raw)),
        (65, ("--digest-hex", digest, "--signature-hex", "3003020101")),
        (64, ("--digest-hex", "zz", "--signature-hex", raw)),
    ]
    for expected, argv in bad:
        code, out, err = run(capsys, "card", "verify", *argv, *key)
        assert (code, out) == (expected, ""), err
        assert "Traceback" not in err
    code, _, err = run(
        capsys, "card", "verify", "--digest-hex", digest, "--signature-hex", raw,
        "--key", "iotsafe:key-id=01", "--reader", reader,
    )  # fmt: skip
    assert code == 64 and "public key object" in err


def test_dh_generate_then_again_with_a_compressed_point(
    capsys: pytest.CaptureFixture[str], sim: Path, tmp_path: Path
) -> None:
    peer = ec.generate_private_key(ec.SECP256R1())
    pem = peer.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    (tmp_path / "peer.pem").write_bytes(pem)
    code, out, err = run(
        capsys, "card", "dh", "--generate", "--peer", str(tmp_path / "peer.pem"),
        "--reader", f"sim:{sim}", "-vv",
    )  # fmt: skip
    assert code == 0, err
    point_hex, shared_hex = out.split()
    card_public = ec.EllipticCurvePublicKey.from_encoded_point(
        ec.SECP256R1(), bytes.fromhex(point_hex)
    )
    assert bytes.fromhex(shared_hex) == peer.exchange(ec.ECDH(), card_public)
    assert shared_hex not in err.lower() and shared_hex.upper() not in err  # not logged
    compressed = peer.public_key().public_bytes(Encoding.X962, PublicFormat.CompressedPoint)
    code, out, _ = run(
        capsys, "card", "dh", "--peer-hex", compressed.hex(), "--reader", f"sim:{sim}"
    )
    assert (code, out) == (0, shared_hex + "\n")


def test_dh_errors(capsys: pytest.CaptureFixture[str], sim: Path, tmp_path: Path) -> None:
    reader = ("--reader", f"sim:{sim}")
    point = ec.generate_private_key(ec.SECP256R1()).public_key()
    p256 = point.public_bytes(Encoding.X962, PublicFormat.UncompressedPoint).hex()
    p384 = ec.generate_private_key(ec.SECP384R1()).public_key()
    (tmp_path / "p384.pem").write_bytes(
        p384.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    )
    (tmp_path / "junk").write_bytes(b"not a key")
    cases = [
        # the bootstrap key signs only: the card refuses key agreement (6985)
        (76, ("--peer-hex", p256, "--key", "iotsafe:key-id=01"), "6985"),
        # the ECDH slot is still empty
        (76, ("--peer-hex", p256), "6985"),
        # a public key object that is not writable (6982: access condition)
        (77, ("--generate", "--peer-hex", p256, "--peer-slot", "iotsafe:public-key-id=02"), "6982"),
        (65, ("--peer", str(tmp_path / "p384.pem")), "P-256"),
        (65, ("--peer", str(tmp_path / "junk")), "peer public key"),
        (65, ("--peer-hex", "04" + "00" * 64), "peer public key"),
        (64, ("--peer-hex", p256, "--key", "iotsafe:secret-id=01"), "private key"),
    ]
    for expected, argv, said in cases:
        code, out, err = run(capsys, "card", "dh", *argv, *reader)
        assert (code, out) == (expected, ""), err
        assert said in err and "Traceback" not in err


def test_hkdf_extract_and_expand(capsys: pytest.CaptureFixture[str], sim: Path) -> None:
    reader = ("--reader", f"sim:{sim}")
    salt, info = bytes(range(13)), b"est-agent hkdf"
    code, out, err = run(
        capsys, "card", "hkdf", "--salt", salt.hex(), "--info", info.hex(), "--length", "42",
        *reader, "-vv",
    )  # fmt: skip
    assert code == 0, err
    assert bytes.fromhex(out.strip()) == HKDF(hashes.SHA256(), 42, salt, info).derive(PSK)
    assert PSK.hex() not in err.lower() and out.strip() not in err.lower()
    code, out, _ = run(capsys, "card", "hkdf", "--hash", "sha384", *reader)
    assert code == 0
    prk = bytes.fromhex(out.strip())
    assert len(prk) == 48
    # no salt: PRK = HMAC-SHA384(48 zero bytes, PSK) (RFC 5869 §2.2)
    mac = HMAC(bytes(48), hashes.SHA384())
    mac.update(PSK)
    assert prk == mac.finalize()
    code, _, err = run(capsys, "card", "hkdf", "--info", "00", *reader)
    assert code == 64 and "go together" in err
    code, _, err = run(capsys, "card", "hkdf", "--length", "300", "--info", "00", *reader)
    assert code == 64


def test_hkdf_on_an_empty_secret_object_and_sim_init_psk(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    empty = tmp_path / "empty.json"
    personalize(empty)
    code, out, err = run(capsys, "card", "hkdf", "--reader", f"sim:{empty}")
    assert (code, out) == (76, "") and "6985" in err
    psk_file = tmp_path / "psk.bin"
    psk_file.write_bytes(PSK)
    state = tmp_path / "with-psk.json"
    code, out, err = run(capsys, "sim", "init", str(state), "--psk", str(psk_file), "-vv")
    assert code == 0, err
    assert "secret key  01 'psk': filled" in out
    assert PSK.hex() not in (out + err).lower()
    code, out, _ = run(capsys, "card", "hkdf", "--info", "", "--length", "16",
                       "--reader", f"sim:{state}")  # fmt: skip
    expected = HKDF(hashes.SHA256(), 16, None, b"").derive(PSK)
    assert (code, bytes.fromhex(out.strip())) == (0, expected)
    for content, said in ((b"", "empty"), (bytes(129), "128")):
        psk_file.write_bytes(content)
        code, _, err = run(capsys, "sim", "init", str(tmp_path / "x.json"), "--psk", str(psk_file))
        assert code == 65 and said in err
