"""``card.key_agreement``: the enrollment's and renewal's TLS 1.3 key share made on the SIM.

With ``card.key_agreement = "iotsafe:key-id=04"`` every handshake that the card signs also has
its ephemeral ECDH on the card (GENERATE KEY PAIR on key 04, PUT PUBLIC KEY of the server's
share into public key 05, COMPUTE DH: five APDUs more than with the host's ECDH). The server
(the test server, OpenSSL) is the judge: a wrong secret could not finish the handshake.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from est_agent.sim.state import load_state
from est_agent.testserver import DevPki, EstTestServer
from est_agent.testserver.config import TlsMax
from tests.conftest import Run
from tests.workflow.conftest import Device
from tests.workflow.test_enroll_renew import certificate_on_sim

pytestmark = pytest.mark.integration

StartServer = Callable[..., EstTestServer]
#: GENERATE KEY PAIR + PUT PUBLIC KEY INIT/UPDATE/close + COMPUTE DH, per handshake
CARD_ECDH_APDUS = 5


def _points(device: Device) -> tuple[bytes, bytes]:
    """(the card's ephemeral public key 04, the server's share in public key 05)."""
    keys = {k.object_id: k.point for k in load_state(device.sim).applet.public_keys}
    return keys[b"\x04"], keys[b"\x05"]


def _enroll(device: Device, cli: Run, *argv: str) -> dict[str, object]:
    code, out, err = cli(*argv, "--config", str(device.config), "--json")
    assert code == 0, err
    result: dict[str, object] = json.loads(out)
    return result


def test_enroll_and_renew_with_the_key_share_on_the_card(
    tmp_path_factory: pytest.TempPathFactory,
    device: Device,
    sim_template: bytes,
    start_server: StartServer,
    dev_pki: DevPki,
    cli: Run,
) -> None:
    server = start_server()
    # the same enrollment with the host's ECDH, on a second SIM: the APDU count to compare
    host = tmp_path_factory.mktemp("host-ecdh")
    other = Device(host, host / "sim.json", host / "est-agent.toml", host / "state")
    other.sim.write_bytes(sim_template)
    other.write_config(server, dev_pki)
    baseline = _enroll(other, cli, "enroll")

    device.write_config(server, dev_pki, card__key_agreement='"iotsafe:key-id=04"')
    assert _points(device) == (b"", b"")
    enrolled = _enroll(device, cli, "enroll")
    assert enrolled["outcome"] == "enrolled"
    card_link = enrolled["card_link"]
    assert isinstance(card_link, dict) and isinstance(baseline["card_link"], dict)
    assert card_link["apdus"] == baseline["card_link"]["apdus"] + CARD_ECDH_APDUS
    ours, theirs = _points(device)
    assert ours.startswith(b"\x04") and len(ours) == 65
    assert theirs.startswith(b"\x04") and len(theirs) == 65 and theirs != ours
    certificate_on_sim(device.sim, "op-a")

    renewed = _enroll(device, cli, "renew", "--force")
    assert renewed["outcome"] == "renewed"
    certificate_on_sim(device.sim, "op-b")
    # a new ephemeral key pair on the card, and a new server share, for the new handshake
    again = _points(device)
    assert again[0] != ours and again[1] != theirs


def test_a_tls12_server_refuses_the_card_key_share_mode(
    device: Device, start_server: StartServer, dev_pki: DevPki, cli: Run
) -> None:
    """The card makes TLS 1.3 key shares only: a TLS 1.2-only server ends the run (76), the
    card signs nothing, and the operator is told why."""
    server = start_server(tls_max=TlsMax.TLS1_2)
    device.write_config(server, dev_pki, card__key_agreement='"iotsafe:key-id=04"')
    code, _out, err = cli("enroll", "--config", str(device.config))
    assert code == 76, err
    assert "protocol_version" in err
    assert "card.key_agreement" in err and "TLS 1.3 only" in err
    keys = {k.object_id: k.point for k in load_state(device.sim).applet.public_keys}
    assert keys[b"\x05"] == b""  # no server share ever reached the card


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"card__key_agreement": '"iotsafe:key-id=01"'}, "credential's key"),
        ({"card__key_agreement": '"iotsafe:key-id=02"'}, "credential's key"),
        ({"card__key_agreement": '"iotsafe:file-id=04"'}, "expected an IoT SAFE key"),
        (
            {"card__key_agreement": '"iotsafe:key-id=04"', "est__pop": '"tls-unique"'},
            "tls-unique",
        ),
        (
            {
                "card__key_agreement": '"iotsafe:key-id=04"',
                "card__peer_public_key": '"uicc:path=7FF0"',
            },
            "expected an IoT SAFE public key",
        ),
    ],
)
def test_key_agreement_configuration_is_checked(
    device: Device,
    start_server: StartServer,
    dev_pki: DevPki,
    cli: Run,
    extra: dict[str, str],
    message: str,
) -> None:
    server = start_server()
    device.write_config(server, dev_pki, **extra)
    code, _out, err = cli("enroll", "--config", str(device.config))
    assert code == 78, err
    assert message in err
    assert "card.key_agreement" in err or "card.peer_public_key" in err
