"""`/csrattrs` as advice (RFC 7030 §4.5, RFC 8951 §4) and `est.pop = "auto"`, end to end: the
agent against the EST test server imitating libest's example server, with the virtual SIM."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from est_agent.config import load_config
from est_agent.est.client import EstClient
from est_agent.est.messages import CsrAttributes
from est_agent.testserver import DevPki, EstTestServer, Fault
from est_agent.testserver.config import TlsMax
from est_agent.testserver.wire import CsrAttrsKind
from est_agent.workflow.agent import Agent
from tests.conftest import Run
from tests.workflow.conftest import Device
from tests.workflow.test_enroll_renew import certificate_on_sim

pytestmark = pytest.mark.integration

Start = Callable[..., EstTestServer]
# one enrollment on the in-process SIM takes about a second; a hang would take the 30 s timeout
BOUND_S = 20.0


def _issued(server: EstTestServer) -> list[dict[str, Any]]:
    path = server.config.issuance_log
    assert path is not None
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def _enroll(cli: Run, device: Device) -> tuple[int, str, float]:
    started = time.monotonic()
    code, _, err = cli("enroll", "--config", str(device.config))
    return code, err, time.monotonic() - started


def test_libest_default_csrattrs_advisory_enrolls_and_warns(
    device: Device, start_server: Start, dev_pki: DevPki, cli: Run
) -> None:
    # libest's default answer: macAddress, emailAddress, bare secp384r1, sha384 and a NUL.
    # Before: 76 (the NUL), then 65 (secp384r1/sha384), although libest takes a P-256 CSR.
    server = start_server(csrattrs=CsrAttrsKind.LIBEST_DEFAULT)
    device.write_config(server, dev_pki)
    code, err, elapsed = _enroll(cli, device)
    assert code == 0, err
    assert elapsed < BOUND_S
    # issue 13: the SIM takes SHA-384 digests now, so the CSR is signed ecdsa-with-SHA384 as
    # asked (it was ecdsa-with-SHA256 with a warning before)
    assert "SHA-384" not in err
    for warning in (
        "asks for an EC key on secp384r1 (P-384) (1.3.132.0.34); sending an EC P-256 (secp256r1)"
        " key",
        "asks for macAddress (1.3.6.1.1.1.1.22); left out: the agent has no value for it",
        "asks for emailAddress (1.2.840.113549.1.9.1); left out",
    ):
        assert warning in err
    cert = certificate_on_sim(device.sim, "op-a")
    key = cert.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"
    assert [e["operation"] for e in _issued(server)] == ["simpleenroll"]
    assert _issued(server)[0]["signature_algorithm"] == "1.2.840.10045.4.3.3"  # ecdsa-with-SHA384


def test_libest_default_csrattrs_strict_refuses_naming_both(
    device: Device, start_server: Start, dev_pki: DevPki, cli: Run
) -> None:
    server = start_server(csrattrs=CsrAttrsKind.LIBEST_DEFAULT)
    device.write_config(server, dev_pki, est__csrattrs='"strict"')
    code, err, elapsed = _enroll(cli, device)
    assert code == 65, err
    assert elapsed < BOUND_S
    assert "CsrError" in err
    # issue 13: SHA-384 is met now; the P-384 key still is not
    assert "SHA-384" not in err
    assert "secp384r1" in err and "P-256" in err
    assert _issued(server) == []


@pytest.mark.parametrize("fault", [Fault.GARBAGE_BASE64, Fault.WRONG_CONTENT_TYPE])
def test_unusable_csrattrs_advisory_warns_strict_stops(
    device: Device, start_server: Start, dev_pki: DevPki, cli: Run, fault: Fault
) -> None:
    server = start_server(
        csrattrs=CsrAttrsKind.EMPTY, fault=fault, fault_operations=frozenset({"csrattrs"})
    )
    device.write_config(server, dev_pki, est__csrattrs='"strict"')
    code, err, elapsed = _enroll(cli, device)
    assert code == 76, err
    assert elapsed < BOUND_S
    assert "EstResponseError" in err

    device.write_config(server, dev_pki)  # advisory, the default
    code, err, elapsed = _enroll(cli, device)
    assert code == 0, err
    assert elapsed < BOUND_S
    assert "/csrattrs cannot be used" in err and "enrolling without it" in err
    assert [e["operation"] for e in _issued(server)] == ["simpleenroll"]


def test_unusable_csrattrs_rejected_with_4xx_advisory_enrolls(
    device: Device, start_server: Start, dev_pki: DevPki
) -> None:
    # The test server has no 4xx switch for /csrattrs: a label with a typo answers 404 on
    # every operation, so this goes through a client whose csrattrs answers 400 instead.
    from est_agent.errors import EstRejectedError

    class Refusing(EstClient):
        def csrattrs(self) -> CsrAttributes | None:
            raise EstRejectedError("EST server rejected the request (HTTP 400: bad request)")

    server = start_server()
    device.write_config(server, dev_pki)
    result = Agent(load_config(device.config), client_factory=Refusing).enroll()
    assert result.outcome.value == "enrolled"
    device.write_config(server, dev_pki, est__csrattrs='"strict"')
    with pytest.raises(EstRejectedError):
        Agent(load_config(device.config), client_factory=Refusing).renew(force=True)


def test_csrattrs_off_is_not_asked(device: Device, start_server: Start, dev_pki: DevPki) -> None:
    asked: list[str] = []

    class Counting(EstClient):
        def csrattrs(self) -> CsrAttributes | None:
            asked.append("csrattrs")
            return EstClient.csrattrs(self)

    server = start_server(csrattrs=CsrAttrsKind.LIBEST_DEFAULT)
    device.write_config(server, dev_pki, est__csrattrs='"off"')
    result = Agent(load_config(device.config), client_factory=Counting).enroll()
    assert result.outcome.value == "enrolled"
    assert asked == []
    device.write_config(server, dev_pki)
    Agent(load_config(device.config), client_factory=Counting).renew(force=True)
    assert asked == ["csrattrs"]


# --- est.pop = "auto" (item 7) -----------------------------------------------------------------


def test_pop_auto_binds_when_csrattrs_lists_challenge_password(
    device: Device, start_server: Start, dev_pki: DevPki, cli: Run
) -> None:
    # RFC 8951 §4: a server that requires linking lists challengePassword; libest-like server
    # on TLS 1.2 checks tls-unique.
    server = start_server(
        tls_max=TlsMax.TLS1_2, pop_required=True, csrattrs=CsrAttrsKind.CHALLENGE_PASSWORD
    )
    device.write_config(server, dev_pki)
    code, err, elapsed = _enroll(cli, device)
    assert code == 0, err
    assert elapsed < BOUND_S


@pytest.mark.parametrize(
    ("pop", "why"),
    [
        ("auto", "the server's /csrattrs did not list challengePassword (RFC 8951 §4)"),
        ("off", 'est.pop = "off"'),
    ],
)
def test_pop_required_but_not_listed_says_which_setting_to_change(
    device: Device, start_server: Start, dev_pki: DevPki, cli: Run, pop: str, why: str
) -> None:
    # A server requiring PoP without listing challengePassword in /csrattrs: 400 "PoP
    # required: CSR lacks challengePassword = base64(tls-unique)".
    server = start_server(tls_max=TlsMax.TLS1_2, pop_required=True)
    device.write_config(server, dev_pki, est__pop=f'"{pop}"')
    code, err, elapsed = _enroll(cli, device)
    assert code == 76, err
    assert elapsed < BOUND_S
    assert "EstRejectedError" in err
    assert "HTTP 400" in err and why in err
    assert 'set est.pop = "tls-unique"' in err
    assert _issued(server) == []
    # following the advice enrolls
    device.write_config(server, dev_pki, est__pop='"tls-unique"')
    code, err, _ = _enroll(cli, device)
    assert code == 0, err


def test_csrattrs_the_card_meets_is_followed_in_strict_mode_without_warnings(
    device: Device, start_server: Start, dev_pki: DevPki, cli: Run
) -> None:
    # P-256, ecdsa-with-SHA256 and challengePassword: all of it met, nothing to warn about.
    server = start_server(csrattrs=CsrAttrsKind.P256)
    device.write_config(server, dev_pki, est__csrattrs='"strict"')
    code, err, _ = _enroll(cli, device)
    assert code == 0, err
    assert "asks for" not in err
    assert [e["operation"] for e in _issued(server)] == ["simpleenroll"]
