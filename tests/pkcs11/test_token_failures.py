"""The token's failures, as the store and the workflow must see them (backends/base.py):
refused → the slot is unknown (never empty) and nothing is written; unreachable → the run ends
(69); a refused PIN → 77. And TLS client auth with the token's keys: the server is verified
before the token signs, one signature per handshake."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pkcs11.exceptions
import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from est_agent.backends.base import CredentialBackend
from est_agent.backends.pkcs11 import Pkcs11Backend
from est_agent.config import Config, load_config
from est_agent.errors import (
    SlotUnreadableError,
    TlsVerificationError,
    TokenLoginError,
    TransportError,
)
from est_agent.testserver import DevPki, EstTestServer
from est_agent.workflow.agent import Agent
from est_agent.workflow.session import BackendOpener, backend_opener
from tests.conftest import Run
from tests.pkcs11.conftest import PIN, PIN_ENV, Token

pytestmark = pytest.mark.integration


def recording(calls: list[str], fault: Callable[[str], None] | None = None) -> BackendOpener:
    """The configured backend, with every PKCS#11 call recorded (and ``fault`` run before it:
    a PKCS11Error it raises is what the token answered)."""
    base = backend_opener()

    @contextlib.contextmanager
    def open_backend(config: Config) -> Iterator[CredentialBackend]:
        with base(config) as backend:
            assert isinstance(backend, Pkcs11Backend)

            def hook(what: str) -> None:
                calls.append(what)
                if fault is not None:
                    fault(what)

            backend.before_call = hook
            yield backend

    return open_backend


def enrolled_and_renewed(token: Token, server: EstTestServer, dev_pki: DevPki) -> Config:
    token.write_config(server, dev_pki)
    config = load_config(token.config)
    Agent(config).enroll()
    Agent(config).renew(force=True)  # op-a sequence 1, op-b sequence 2 (active)
    return config


def test_refused_read_of_one_slot_is_unknown_never_empty(
    token: Token, start_server: Callable[..., EstTestServer], dev_pki: DevPki
) -> None:
    server = start_server()
    config = enrolled_and_renewed(token, server, dev_pki)
    before = [json.loads(line) for line in server.config.issuance_log.read_text().splitlines()]

    def refuse_op_a(what: str) -> None:
        if what.startswith("read record header object=op-a"):
            raise pkcs11.exceptions.FunctionFailed()

    status = Agent(config, backends=recording([], refuse_op_a)).status()
    slots = {s.name: s for s in status.slots}
    assert slots["op-a"].status == "unknown" and slots["op-a"].reason == "record-unreadable"
    assert "FunctionFailed" in slots["op-a"].detail
    assert slots["op-b"].status == "valid" and status.active == "op-b"

    # a forced renewal would write op-a: it stops before anything is written or signed
    calls: list[str] = []
    started = time.monotonic()
    with pytest.raises(SlotUnreadableError) as info:
        Agent(config, backends=recording(calls, refuse_op_a)).renew(force=True)
    assert time.monotonic() - started < 10
    assert info.value.exit_code == 76
    assert not [c for c in calls if c.split()[0] in ("create", "destroy", "generate", "sign")]
    after = [json.loads(line) for line in server.config.issuance_log.read_text().splitlines()]
    assert after == before  # the server was not asked either

    # the same read answered with a refused key read: unknown as well
    def refuse_key(what: str) -> None:
        if what.startswith("read public key object=op-a"):
            raise pkcs11.exceptions.AttributeSensitive()

    slots = {s.name: s for s in Agent(config, backends=recording([], refuse_key)).status().slots}
    assert slots["op-a"].status == "unknown" and slots["op-a"].reason == "key-unreadable"
    # and with nothing refused, op-a is the valid credential it always was
    slots = {s.name: s for s in Agent(config).status().slots}
    assert slots["op-a"].status == "valid" and slots["op-a"].sequence == 1


def test_token_gone_mid_scan_ends_the_run(
    token: Token, start_server: Callable[..., EstTestServer], dev_pki: DevPki
) -> None:
    server = start_server()
    config = enrolled_and_renewed(token, server, dev_pki)

    def removed(what: str) -> None:
        if "op-b" in what:
            raise pkcs11.exceptions.DeviceRemoved()

    with pytest.raises(TransportError, match="DeviceRemoved") as info:
        Agent(config, backends=recording([], removed)).run(use_cache=False)
    assert info.value.exit_code == 69


def test_wrong_pin_absent_token_missing_module(
    token: Token,
    start_server: Callable[..., EstTestServer],
    dev_pki: DevPki,
    cli: Run,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    server = start_server()
    token.write_config(server, dev_pki)
    cfg = ("--config", str(token.config))

    monkeypatch.setenv(PIN_ENV, "wrong-pin-4455")
    started = time.monotonic()
    code, out, err = cli("enroll", *cfg, "--json")
    assert code == TokenLoginError.exit_code == 77, err
    assert "PinIncorrect" in err and "Traceback" not in err
    assert "wrong-pin-4455" not in out + err
    monkeypatch.setenv(PIN_ENV, PIN)

    token.write_config(server, dev_pki, pkcs11__module=f'"{tmp_path / "missing.so"}"')
    code, _, err = cli("status", *cfg)
    assert code == 69 and "cannot load the PKCS#11 module" in err and "Traceback" not in err

    token.write_config(server, dev_pki)
    token.config.write_text(token.config.read_text().replace("token=est-test", "token=absent"))
    code, _, err = cli("enroll", *cfg)
    assert code == 69 and "no PKCS#11 token matches" in err, err
    assert time.monotonic() - started < 20


def test_tls_client_auth_one_signature_per_handshake(
    token: Token, start_server: Callable[..., EstTestServer], dev_pki: DevPki
) -> None:
    server = start_server()
    token.write_config(server, dev_pki)
    config = load_config(token.config)

    calls: list[str] = []
    Agent(config, backends=recording(calls)).enroll()
    handshakes = {r.connection for r in server.requests if r.client_certificate == "bootstrap"}
    assert handshakes  # the enrollment was authenticated by the token's bootstrap key
    assert calls.count("sign object=bootstrap") == len(handshakes)
    assert calls.count("sign object=op-a") == 1  # the CSR
    first = len(server.requests)

    calls.clear()
    Agent(config, backends=recording(calls)).renew(force=True)
    renewal = server.requests[first:]
    handshakes = {r.connection for r in renewal if r.client_certificate == "est"}
    assert handshakes and all(r.client_certificate == "est" for r in renewal)
    assert calls.count("sign object=op-a") == len(handshakes)  # TLS with the current key
    assert calls.count("sign object=op-b") == 1  # the CSR with the new one
    assert "sign object=bootstrap" not in calls


def test_server_verified_before_the_token_signs(
    token: Token, start_server: Callable[..., EstTestServer], dev_pki: DevPki
) -> None:
    server = start_server()
    token.write_config(server, dev_pki)
    # an anchor that did not issue the server's certificate
    (token.root / "tls-ca.pem").write_bytes(
        dev_pki.est_ca.certificate.public_bytes(Encoding.PEM)
    )
    config = load_config(token.config)
    calls: list[str] = []
    started = time.monotonic()
    with pytest.raises(TlsVerificationError):
        Agent(config, backends=recording(calls)).enroll()
    assert time.monotonic() - started < 20
    assert not [c for c in calls if c.startswith(("sign", "generate", "create", "destroy"))]
    assert server.requests == []


def test_pin_value_in_a_uri_is_in_no_output(
    token: Token,
    start_server: Callable[..., EstTestServer],
    dev_pki: DevPki,
    cli: Run,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = start_server()
    token.write_config(server, dev_pki)
    monkeypatch.delenv(PIN_ENV)
    text = token.config.read_text().replace(f'pin_env = "{PIN_ENV}"\n', "")
    with_pin = text.replace(
        'key = "pkcs11:token=est-test;object=op-a;type=private"',
        f'key = "pkcs11:token=est-test;object=op-a;type=private?pin-value={PIN}"',
    )
    assert with_pin != text
    token.config.write_text(with_pin)
    cfg = ("--config", str(token.config))
    outputs = []
    for argv in (("enroll", "-vv", "--json"), ("status", "--json"), ("status",), ("run", "-vv")):
        code, out, err = cli(*argv, *cfg)
        assert code == 0, err
        outputs.append(out + err)
    status = json.loads(outputs[1])
    assert status["slots"][0]["key"] == "pkcs11:token=est-test;object=op-a;type=private"
    # an error that names the URI: the token is absent
    token.config.write_text(with_pin.replace("token=est-test", "token=absent"))
    code, out, err = cli("run", "-vv", "--log-format", "json", *cfg)
    assert code == 69, err
    outputs.append(out + err)
    assert "no PKCS#11 token matches pkcs11:token=absent;object=op-a;type=private" in err
    for text in outputs:
        assert PIN not in text
