"""est_agent.api through a real pcscd: the virtual SIM served by `est-agent sim serve` to vpcd
(T=0 mode: data comes back as 61xx + GET RESPONSE), opened by the reader string ``pcsc:``."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from est_agent.api import NoCardError, open_card
from est_agent.sim.pcsc_stack import PcscStack
from est_agent.sim.personalize import personalize
from tests.integration.conftest import REPO, Cards

pytestmark = pytest.mark.integration

#: a handful of APDUs through pcscd and vpcd on 127.0.0.1; far above what they take
BOUND_S = 20.0


def test_sign_public_key_and_random_over_pcscd(
    cards: Cards, pcsc_stack: PcscStack, tmp_path: Path
) -> None:
    state = tmp_path / "sim.json"
    report = personalize(state)
    cards.sim_process(state, "--t0", atr=report.atr)
    expected = report.bootstrap_certificate.public_key()
    assert isinstance(expected, ec.EllipticCurvePublicKey)
    digest = hashlib.sha256(b"over pcscd").digest()
    started = time.monotonic()
    with open_card("pcsc:") as card:
        public = card.public_key("iotsafe:key-id=01")
        der = card.sign_digest("iotsafe:key-id=01", digest)
        first, second = card.random(500), card.random(500)
    assert time.monotonic() - started < BOUND_S
    point = PublicFormat.UncompressedPoint
    assert public.public_bytes(Encoding.X962, point) == expected.public_bytes(Encoding.X962, point)
    expected.verify(der, digest, ec.ECDSA(Prehashed(hashes.SHA256())))
    assert len(first) == len(second) == 500 and first != second

    # the command line over the same reader, as another PC/SC client process
    result = subprocess.run(
        [sys.executable, "-m", "est_agent", "card", "random", "64", "--hex", "--reader", "pcsc:"],
        cwd=REPO,
        env=pcsc_stack.client_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert len(bytes.fromhex(result.stdout.strip())) == 64


def test_named_reader_without_a_card_is_no_card_error(pcsc_stack: PcscStack) -> None:
    started = time.monotonic()
    with pytest.raises(NoCardError) as caught:
        open_card(f"pcsc:{pcsc_stack.reader_name}")
    assert time.monotonic() - started < BOUND_S
    assert caught.value.exit_code == 69
