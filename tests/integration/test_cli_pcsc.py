"""The issue's "done when": sim init + sim serve + card info --json --reader pcsc: through a real
pcscd, as separate processes, and the agent's own client (CardSigner, UICC) over PC/SC."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from est_agent.backends.iotsafe import CardSigner
from est_agent.card.channel import CardSession
from est_agent.card.iotsafe import IotSafeApplet
from est_agent.card.uicc import UiccFiles
from est_agent.card.uri import IotSafeRef, ObjectKind, UiccPath
from est_agent.sim.pcsc_stack import PcscStack
from est_agent.transport import open_transport
from tests.integration.conftest import REPO, Cards

pytestmark = pytest.mark.integration


def est_agent(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "est_agent", *argv],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("t0", [False, True], ids=["direct", "t0"])
def test_sim_init_serve_card_info_json(
    cards: Cards, pcsc_stack: PcscStack, tmp_path: Path, t0: bool
) -> None:
    state = tmp_path / "sim.json"
    init = est_agent("sim", "init", str(state), "--iccid", "8988247000007654321", "--json")
    assert init.returncode == 0, init.stderr
    atr = bytes.fromhex(json.loads(init.stdout)["atr"])
    cards.sim_process(state, *(["--t0"] if t0 else []), atr=atr)

    info = est_agent("card", "info", "--json", "--reader", "pcsc:", env=pcsc_stack.client_env())
    assert info.returncode == 0, info.stderr
    card = json.loads(info.stdout)
    assert card["reader"] == f"PC/SC reader {pcsc_stack.reader_name!r}"
    assert bytes.fromhex(card["atr"]) == atr
    assert card["iccid"] == "8988247000007654321"
    assert card["applet"]["aid"] == "A0000005590010"
    assert [(o["type"], o["id"], o["label"]) for o in card["objects"]] == [
        ("private-key", "01", "bootstrap"),
        ("private-key", "02", "op-a"),
        ("private-key", "03", "op-b"),
        ("private-key", "04", "ecdh"),  # issue 13: the ECDH slot
        ("public-key", "01", "bootstrap"),
        ("public-key", "02", "op-a"),
        ("public-key", "03", "op-b"),
        ("public-key", "04", "ecdh"),
        ("public-key", "05", "peer"),  # issue 13: PUT PUBLIC KEY's target
        ("secret-key", "01", "psk"),  # issue 13: empty without sim init --psk
        ("file", "01", "bootstrap-cert"),
    ]


def test_card_info_named_reader_without_card(pcsc_stack: PcscStack) -> None:
    result = est_agent(
        "card", "info", "--reader", f"pcsc:{pcsc_stack.reader_name}", env=pcsc_stack.client_env()
    )
    assert result.returncode == 69, result.stderr
    assert "NoCardError" in result.stderr


def test_agent_client_over_pcsc(cards: Cards, tmp_path: Path) -> None:
    state = tmp_path / "sim.json"
    assert est_agent("sim", "init", str(state)).returncode == 0
    cards.sim_process(state, "--t0")
    session = CardSession(open_transport("pcsc:"))
    try:
        applet = IotSafeApplet.open(session)
        cert = x509.load_der_x509_certificate(
            applet.read_file(IotSafeRef(ObjectKind.FILE, object_id=b"\x01"))
        )
        bootstrap = CardSigner(
            applet,
            IotSafeRef(ObjectKind.PRIVATE_KEY, object_id=b"\x01"),
            cert.public_key(),  # type: ignore[arg-type]
        )
        digest = hashlib.sha256(b"over pcscd").digest()
        cert.public_key().verify(  # type: ignore[call-arg]
            bootstrap.sign_digest(digest),
            digest,
            ec.ECDSA(Prehashed(hashes.SHA256())),  # type: ignore[arg-type]
        )
        op = IotSafeRef(ObjectKind.PRIVATE_KEY, label="op-b")
        point = applet.generate_key_pair(op).public_point
        public = CardSigner.from_card(applet, op).public_key()
        assert public.public_bytes(Encoding.X962, PublicFormat.UncompressedPoint) == point
        files = UiccFiles(session.open_channel())
        ef = UiccPath((0x7FF0, 0x6F02))
        der = cert.public_bytes(Encoding.DER)
        files.update(ef, der)
        assert files.read(ef, 0, len(der)) == der
    finally:
        session.close()


def test_demo_command_end_to_end_through_pcscd(tmp_path: Path) -> None:
    demo = tmp_path / "demo"
    result = est_agent("demo", "--pcsc", "--dir", str(demo))
    assert result.returncode == 0, result.stderr
    assert "private pcscd started" in result.stderr
    assert "enrolled: slot op-a" in result.stdout and "renewed: slot op-b" in result.stdout
    assert "PC/SC reader 'Virtual PCD 00 00'" in result.stdout
    # the exported certificate chains to the demo's EST CA (checked here again, independently)
    check = subprocess.run(
        ["openssl", "verify", "-CAfile", str(demo / "pki" / "ca.pem"), str(demo / "device.pem")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert check.returncode == 0, check.stderr
