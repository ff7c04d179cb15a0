"""Enroll, renew, run (not due) and status with every key in a SoftHSM2 token, against the EST
test server over real TLS (client auth with the token's bootstrap key, then its slot key)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from pkcs11 import Attribute, ObjectClass

from est_agent.testserver import DevPki, EstTestServer
from tests.conftest import Run
from tests.pkcs11.conftest import PIN, SLOT_KEYS, Token
from tests.workflow.conftest import openssl_verify

pytestmark = pytest.mark.integration


def token_objects(token: Token) -> list[dict[str, object]]:
    """Class, label, id and the key flags of every object, read with python-pkcs11 directly."""
    rows = []
    with token.open() as backend:
        for obj in backend.session.get_objects():
            row: dict[str, object] = {
                "class": obj[Attribute.CLASS],
                "label": obj[Attribute.LABEL],
                "id": obj[Attribute.ID] if obj[Attribute.CLASS] != ObjectClass.DATA else None,
            }
            if row["class"] is ObjectClass.PRIVATE_KEY:
                for attr in (
                    Attribute.TOKEN,
                    Attribute.SENSITIVE,
                    Attribute.EXTRACTABLE,
                    Attribute.SIGN,
                    Attribute.NEVER_EXTRACTABLE,
                ):
                    row[attr.name] = bool(obj[attr])
            if row["class"] is ObjectClass.CERTIFICATE:
                row["value"] = bytes(obj[Attribute.VALUE])
            rows.append(row)
    return rows


def certificate_object(token: Token, label: str) -> x509.Certificate:
    (row,) = [
        r
        for r in token_objects(token)
        if r["class"] is ObjectClass.CERTIFICATE and r["label"] == label
    ]
    assert row["id"] == label.encode()  # the slot's CKA_ID, shared with its key pair
    value = row["value"]
    assert isinstance(value, bytes)
    return x509.load_der_x509_certificate(value)


def test_enroll_status_run_renew_on_softhsm(
    token: Token,
    start_server: Callable[..., EstTestServer],
    dev_pki: DevPki,
    cli: Run,
    tmp_path: Path,
) -> None:
    server = start_server()
    token.write_config(server, dev_pki)
    cfg = ("--config", str(token.config))
    outputs: list[str] = []

    started = time.monotonic()
    code, out, err = cli("enroll", "-vv", *cfg, "--json")
    outputs += [out, err]
    assert code == 0, err
    result = json.loads(out)
    assert result["outcome"] == "enrolled" and result["slot"] == "op-a"
    assert "key pair object=op-a generated on the token" in err  # -vv logs are in `outputs`
    cert_a = certificate_object(token, "op-a")
    assert f"{cert_a.serial_number:X}" == result["serial"]
    assert cert_a.subject.rfc4514_string() == "CN=device-0001"
    with token.open() as backend:
        assert backend.public_key(SLOT_KEYS["op-a"]) == cert_a.public_key()
    openssl_verify(cert_a, dev_pki, tmp_path)
    assert (tmp_path / "device.pem").read_bytes().startswith(b"-----BEGIN CERTIFICATE")

    code, out, err = cli("status", *cfg, "--json")
    outputs += [out, err]
    assert code == 0, err
    status = json.loads(out)
    assert status["backend"] == "pkcs11"
    assert status["reader"].startswith("PKCS#11 token 'est-test' via ")
    assert status["active_slot"] == "op-a"
    assert {s["name"]: s["status"] for s in status["slots"]} == {"op-a": "valid", "op-b": "empty"}
    code, out, err = cli("status", *cfg)
    outputs += [out, err]
    assert code == 0 and "backend:     pkcs11" in out and "applet:" not in out

    code, out, err = cli("run", *cfg, "--json")
    outputs += [out, err]
    assert code == 0 and json.loads(out)["outcome"] == "not-due", err

    code, out, err = cli("renew", "-vv", "--force", *cfg, "--json")
    outputs += [out, err]
    assert code == 0, err
    result = json.loads(out)
    assert result["outcome"] == "renewed" and result["slot"] == "op-b"
    cert_b = certificate_object(token, "op-b")
    assert cert_b.subject == cert_a.subject  # RFC 7030 §4.2.2: the same Subject
    assert cert_b.public_key() != cert_a.public_key()  # rekeyed in the other slot
    openssl_verify(cert_b, dev_pki, tmp_path)

    code, out, err = cli("status", *cfg, "--json")
    outputs += [out, err]
    status = json.loads(out)
    assert status["active_slot"] == "op-b"
    assert {s["name"]: s["sequence"] for s in status["slots"]} == {"op-a": 1, "op-b": 2}
    log = [json.loads(line) for line in server.config.issuance_log.read_text().splitlines()]
    assert [entry["operation"] for entry in log] == ["simpleenroll", "simplereenroll"]
    elapsed = time.monotonic() - started
    assert elapsed < 60, elapsed

    # keys generated on the token: token objects, sensitive, never extractable, sign only there
    keys = {
        r["label"]: r
        for r in token_objects(token)
        if r["class"] is ObjectClass.PRIVATE_KEY
    }
    assert set(keys) == {"bootstrap", "op-a", "op-b"}
    for row in keys.values():
        assert row["TOKEN"] and row["SENSITIVE"] and row["SIGN"], row
        assert not row["EXTRACTABLE"] and row["NEVER_EXTRACTABLE"], row

    # the PIN is in no output of any command, no state file, no exported file
    for text in outputs:
        assert PIN not in text
    for path in [*token.state_dir.rglob("*"), tmp_path / "device.pem"]:
        if path.is_file():
            assert PIN.encode() not in path.read_bytes(), path


def test_token_info_lists_slots_mechanisms_objects_without_secrets(
    token: Token, cli: Run
) -> None:
    code, out, err = cli(
        "token", "info", "--module", "/usr/lib/softhsm/libsofthsm2.so", "--pin-env",
        "EST_TEST_TOKEN_PIN", "--json",
    )  # fmt: skip
    assert code == 0, err
    report = json.loads(out)
    (slot,) = [s for s in report["slots"] if s.get("token") == "est-test"]
    assert "ECDSA" in slot["mechanisms"] and "EC_KEY_PAIR_GEN" in slot["mechanisms"]
    private = [o for o in slot["objects"] if o["class"] == "private_key"]
    assert private == [
        {
            "class": "private_key",
            "label": "bootstrap",
            "id": b"bootstrap".hex(),
            "token": True,
            "private": True,
            "sensitive": True,
            "extractable": False,
            "sign": True,
        }
    ]
    assert {o["class"] for o in slot["objects"]} == {"private_key", "public_key", "certificate"}
    assert PIN not in out + err
    # without a PIN: only the public objects
    code, out, err = cli("token", "info", "--module", "/usr/lib/softhsm/libsofthsm2.so")
    assert code == 0, err
    assert "private_key" not in out and "public_key" in out


def test_token_info_module_missing_is_unavailable(cli: Run, tmp_path: Path) -> None:
    code, _, err = cli("token", "info", "--module", str(tmp_path / "nope.so"))
    assert code == 69
    assert "no PKCS#11 module" in err and "Traceback" not in err


def test_api_active_credential_names_the_token_key(
    token: Token, start_server: Callable[..., EstTestServer], dev_pki: DevPki, cli: Run
) -> None:
    from est_agent.api import active_credential

    server = start_server()
    token.write_config(server, dev_pki)
    code, _, err = cli("enroll", "--config", str(token.config))
    assert code == 0, err
    credential = active_credential(token.config)
    assert credential.slot == "op-a"
    # the URI other software opens the key with (its PIN is its own business: not in here)
    assert credential.key == "pkcs11:token=est-test;object=op-a;type=private"
    assert credential.certificate == certificate_object(token, "op-a")


def test_a_uri_without_token_attributes_takes_the_one_initialised_token(token: Token) -> None:
    from est_agent.backends.pkcs11 import open_pkcs11
    from est_agent.pkcs11_uri import parse_pkcs11_uri
    from tests.pkcs11.conftest import SOFTHSM_MODULE

    # SoftHSM also shows a spare slot with an uninitialised token: it is not a candidate
    with open_pkcs11(parse_pkcs11_uri("pkcs11:object=x"), module=SOFTHSM_MODULE, pin=PIN) as b:
        assert b.token.label == "est-test"
        assert b.read_object(parse_pkcs11_uri("pkcs11:object=bootstrap;type=cert"))[:1] == b"\x30"
