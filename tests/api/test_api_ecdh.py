"""est_agent.api's ECDH on the virtual SIM: `Card.new_ecdh_key` + `Card.ecdh` equal
`cryptography`'s exchange from the peer's side; refusals are typed."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

import est_agent.api as api
from est_agent.api import InputError, SecurityStatusError, StatusWordError, open_card
from est_agent.sim.personalize import personalize


@pytest.fixture
def reader(tmp_path: Path) -> str:
    path = tmp_path / "sim.json"
    personalize(path, iccid="8988247000001112223")
    return f"sim:{path}"


def test_ecdh_equals_the_peers_exchange(reader: str) -> None:
    assert {"ECDH_KEY", "PEER_PUBLIC_KEY"} <= set(api.__all__)
    peer = ec.generate_private_key(ec.SECP256R1())
    with open_card(reader) as card:
        card_public = card.new_ecdh_key()
        shared = card.ecdh(peer.public_key())
        again = card.ecdh(
            peer.public_key().public_bytes(Encoding.X962, PublicFormat.CompressedPoint),
            key="iotsafe:key-label=ecdh",
            peer_slot="iotsafe:public-key-label=peer",
        )
        fresh = card.new_ecdh_key()
        after = card.ecdh(peer.public_key())
    assert shared == again == peer.exchange(ec.ECDH(), card_public)
    assert after == peer.exchange(ec.ECDH(), fresh) != shared


def test_ecdh_refusals(reader: str) -> None:
    peer = ec.generate_private_key(ec.SECP256R1()).public_key()
    with open_card(reader) as card:
        with pytest.raises(StatusWordError, match="6985"):
            card.ecdh(peer)  # the ECDH slot is still empty
        card.new_ecdh_key()
        with pytest.raises(StatusWordError, match="6985"):
            card.ecdh(peer, key="iotsafe:key-id=01")  # the bootstrap key only signs
        with pytest.raises(StatusWordError, match="6985"):
            card.new_ecdh_key("iotsafe:key-id=01")  # nor may it be regenerated
        with pytest.raises(SecurityStatusError):
            card.ecdh(peer, peer_slot="iotsafe:public-key-id=02")  # not writable
        with pytest.raises(InputError, match="P-256"):
            card.ecdh(ec.generate_private_key(ec.SECP384R1()).public_key())
        with pytest.raises(InputError, match="P-256"):
            card.ecdh(b"\x04" + bytes(64))
        with pytest.raises(InputError, match="not a key"):
            card.ecdh(peer, peer_slot="iotsafe:file-id=01")
        with pytest.raises(InputError, match="not a public key object"):
            card.ecdh(peer, peer_slot="iotsafe:key-id=05")
