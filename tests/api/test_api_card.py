"""est_agent.api against the virtual SIM in this process (reader ``sim:FILE``): every result is
checked with cryptography, never with the code under test."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, decode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

import est_agent.api as api
from est_agent.api import (
    CardError,
    InputError,
    NotFoundError,
    UsageError,
    open_card,
)
from est_agent.errors import SimStateError, StatusWordError
from est_agent.sim.personalize import personalize

# P-256 group order (SEC 2 §2.4.2): r and s of an ECDSA signature are in 1..n-1
P256_N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
#: an in-process card operation is milliseconds; a bound far above it catches a hang
BOUND_S = 10.0


@pytest.fixture
def sim(tmp_path: Path) -> tuple[Path, x509.Certificate]:
    path = tmp_path / "sim.json"
    report = personalize(path, iccid="8988247000001112223")
    return path, report.bootstrap_certificate


def test_all_names_are_exported_and_exist() -> None:
    assert set(api.__all__) >= {
        "open_card",
        "active_credential",
        "Card",
        "ActiveCredential",
        "CardError",
    }
    for name in api.__all__:
        assert getattr(api, name) is not None, name


def test_sign_digest_returns_der_that_verifies_with_the_certificates_key(
    sim: tuple[Path, x509.Certificate],
) -> None:
    path, bootstrap_cert = sim
    digest = hashlib.sha256(b"a message from other device software").digest()
    started = time.monotonic()
    with open_card(f"sim:{path}") as card:
        der = card.sign_digest("iotsafe:key-id=01", digest)
        public = card.public_key("iotsafe:key-id=01")
        by_public_uri = card.public_key("iotsafe:public-key-id=01")
    assert time.monotonic() - started < BOUND_S
    expected = bootstrap_cert.public_key()
    assert isinstance(expected, ec.EllipticCurvePublicKey)
    # the card's key is the one the personalization certified
    point = PublicFormat.UncompressedPoint
    assert public.public_bytes(Encoding.X962, point) == expected.public_bytes(Encoding.X962, point)
    assert by_public_uri.public_bytes(Encoding.X962, point) == expected.public_bytes(
        Encoding.X962, point
    )
    r, s = decode_dss_signature(der)  # DER Ecdsa-Sig-Value, else ValueError
    assert 0 < r < P256_N and 0 < s < P256_N
    expected.verify(der, digest, ec.ECDSA(Prehashed(hashes.SHA256())))
    with pytest.raises(InvalidSignature):
        expected.verify(der, bytes(32), ec.ECDSA(Prehashed(hashes.SHA256())))


def test_labels_address_the_same_keys(sim: tuple[Path, x509.Certificate]) -> None:
    path, bootstrap_cert = sim
    digest = hashlib.sha256(b"by label").digest()
    with open_card(f"sim:{path}") as card:
        der = card.sign_digest("iotsafe:label=bootstrap", digest)
    bootstrap_cert.public_key().verify(  # type: ignore[call-arg]
        der,
        digest,
        ec.ECDSA(Prehashed(hashes.SHA256())),  # type: ignore[arg-type]
    )


def test_random_lengths_chunks_and_two_calls_differ(sim: tuple[Path, x509.Certificate]) -> None:
    path, _ = sim
    with open_card(f"sim:{path}") as card:
        stats = card._session.transport.stats
        assert len(card.random(1)) == 1
        before = stats.apdus
        big = card.random(api.MAX_RANDOM_BYTES)
        # ceil(4096 / 240) GET RANDOM commands, nothing else
        assert stats.apdus - before == 18
        first, second = card.random(32), card.random(32)
    assert len(big) == 4096
    assert len(first) == len(second) == 32
    assert first != second  # 2^-256 chance of a false failure
    # a 4096-byte sample of a fair generator has every byte value; a stuck one does not
    assert len(set(big)) > 200


@pytest.mark.parametrize("length", [0, -1, 4097, 10**9])
def test_random_out_of_bounds_is_input_error(
    sim: tuple[Path, x509.Certificate], length: int
) -> None:
    path, _ = sim
    with open_card(f"sim:{path}") as card, pytest.raises(InputError, match=r"1\.\.4096"):
        card.random(length)
    assert InputError("x").exit_code == 65


def test_a_card_that_refuses_get_random_is_a_card_error(tmp_path: Path) -> None:
    path = tmp_path / "sim.json"
    personalize(path)
    (tmp_path / "faults.txt").write_text("ins=84 sw=6D00\n")
    reader = f"sim:{path}?faults={tmp_path / 'faults.txt'}"
    with open_card(reader) as card, pytest.raises(StatusWordError) as caught:
        card.random(16)
    assert isinstance(caught.value, CardError)
    assert caught.value.sw == 0x6D00 and caught.value.exit_code == 76
    assert "GET RANDOM" in str(caught.value)


def test_bad_inputs_get_typed_errors(sim: tuple[Path, x509.Certificate], tmp_path: Path) -> None:
    path, _ = sim
    with pytest.raises(UsageError, match="unknown reader type"):
        open_card("nfc:0")
    with pytest.raises(SimStateError):
        open_card(f"sim:{tmp_path / 'absent.json'}")
    with open_card(f"sim:{path}") as card:
        with pytest.raises(InputError, match=r"32, 48 or 64 bytes\), got 5"):
            card.sign_digest("iotsafe:key-id=01", b"short")
        with pytest.raises(InputError, match="not a private key"):
            card.sign_digest("iotsafe:public-key-id=01", bytes(32))
        with pytest.raises(InputError, match="a file"):
            card.public_key("iotsafe:file-id=01")
        with pytest.raises(InputError, match="card URI"):
            card.public_key("key-id=01")
        with pytest.raises(NotFoundError) as caught:
            card.public_key("iotsafe:key-id=7E")
        assert caught.value.exit_code == 76
    with pytest.raises(UsageError, match="closed"):
        card.random(8)


def test_open_card_without_the_applet_is_not_found(sim: tuple[Path, x509.Certificate]) -> None:
    path, _ = sim
    with pytest.raises(NotFoundError, match="no IoT SAFE applet"):
        open_card(f"sim:{path}", aids=(bytes.fromhex("A000000559FFFF"),))
