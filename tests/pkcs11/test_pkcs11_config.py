"""``pkcs11:`` URIs and ``[pkcs11]`` in the configuration: what is accepted, what is refused
(78, naming the key), where the module and the PIN come from."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from est_agent.config import parse_config
from est_agent.errors import ConfigError
from est_agent.pkcs11_uri import parse_pkcs11_uri

EST = '[est]\nurl = "https://est.example.net"\ntrust_anchor = "/etc/tls-ca.pem"\n'
MODULE = '[pkcs11]\nmodule = "/usr/lib/softhsm/libsofthsm2.so"\n'
BOOT = (
    '[bootstrap]\nkey = "pkcs11:token=t;object=boot;type=private"\n'
    'certificate = "pkcs11:token=t;object=boot;type=cert"\n'
)


def slots(a_key: str = "pkcs11:token=t;object=op-a", a_cert: str = "") -> str:
    a_cert = a_cert or "pkcs11:token=t;object=op-a;type=cert"
    return (
        f'[[slot]]\nname = "op-a"\nkey = "{a_key}"\ncertificate = "{a_cert}"\n'
        '[[slot]]\nname = "op-b"\nkey = "pkcs11:token=t;object=op-b;type=private"\n'
        'certificate = "pkcs11:token=t;object=op-b;type=cert"\n'
    )


def test_a_token_configuration() -> None:
    config = parse_config(MODULE + BOOT + EST + slots())
    assert config.backend == "pkcs11"
    assert config.pkcs11_module() == "/usr/lib/softhsm/libsofthsm2.so"
    assert config.slots[0].key == parse_pkcs11_uri("pkcs11:token=t;object=op-a")
    assert config.pkcs11_token().token == "t"
    assert config.pkcs11_pin() is None  # no PIN configured: no login
    assert parse_config(EST).backend == "iotsafe"


def test_module_path_in_a_uri() -> None:
    key = "pkcs11:token=t;object=op-a?module-path=/opt/hsm/libhsm.so"
    config = parse_config(BOOT + EST + slots(a_key=key))
    assert config.pkcs11_module() == "/opt/hsm/libhsm.so"


def test_pin_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pin_file = tmp_path / "pin"
    pin_file.write_text("4711\nignored\n")
    config = parse_config(
        MODULE + f'pin_file = "{pin_file}"\n' + BOOT + EST + slots(), base_dir=tmp_path
    )
    assert config.pkcs11_pin() == "4711"
    monkeypatch.setenv("TOKEN_PIN", "0815")
    config = parse_config(MODULE + 'pin_env = "TOKEN_PIN"\n' + BOOT + EST + slots())
    assert config.pkcs11_pin() == "0815"
    # a URI's own PIN wins (RFC 7512 §2.4: pin-value, pin-source)
    key = "pkcs11:token=t;object=op-a?pin-value=1234"
    config = parse_config(MODULE + 'pin_env = "TOKEN_PIN"\n' + BOOT + EST + slots(a_key=key))
    assert config.pkcs11_pin() == "1234"
    assert "1234" not in repr(config)
    key = f"pkcs11:token=t;object=op-a?pin-source=file:{pin_file}"
    assert parse_config(MODULE + BOOT + EST + slots(a_key=key)).pkcs11_pin() == "4711"
    monkeypatch.delenv("TOKEN_PIN")
    config = parse_config(MODULE + 'pin_env = "TOKEN_PIN"\n' + BOOT + EST + slots())
    with pytest.raises(ConfigError, match=r"pkcs11\.pin_env: environment variable TOKEN_PIN"):
        config.pkcs11_pin()


REFUSED = [
    (BOOT + EST + slots(), "pkcs11.module: required"),
    # the default bootstrap credential is on the SIM: one run uses one device
    (MODULE + EST + slots(), "bootstrap.key: an IoT SAFE key with slots in a PKCS#11 token"),
    (
        MODULE + BOOT + EST + slots(a_cert="uicc:path=7FF0/6F01"),
        "slot[0].certificate: a pkcs11: key keeps its certificate in the token",
    ),
    (
        MODULE + BOOT + EST + slots(a_cert="pkcs11:token=t;object=other;type=cert"),
        "slot[0].certificate: must name the key's object and id",
    ),
    (
        MODULE + BOOT + EST + slots(a_key="pkcs11:token=t;object=op-a;type=cert"),
        "slot[0].key: expected type=private",
    ),
    (MODULE + BOOT + EST + slots(a_key="pkcs11:token=t"), "slot[0].key: pkcs11:token=t names no"),
    (
        MODULE + BOOT + EST + slots(a_key="pkcs11:token=u;object=op-a"),
        "slot[0].key: names another token than bootstrap.key",
    ),
    (
        MODULE + BOOT + EST + slots(a_key="pkcs11:token=t;objekt=op-a"),
        "slot[0].key: pkcs11 URI: unknown path attribute 'objekt'",
    ),
    (
        MODULE + BOOT + EST + slots(a_key="pkcs11:token=t;object=op-a?module-path=/a.so")
        .replace("object=op-b;type=private", "object=op-b;type=private?module-path=/b.so"),
        "URIs name different module-path values",
    ),
    (
        '[est]\nurl = "https://est.example.net"\ntrust_anchor = "pkcs11:token=t;object=ca"\n',
        "est.trust_anchor: a pkcs11: object URI with slots on the SIM",
    ),
    (MODULE + 'pin_env = "1X"\n' + BOOT + EST + slots(), "pkcs11.pin_env: not an environment"),
    (
        MODULE + 'pin_env = "A"\npin_file = "/p"\n' + BOOT + EST + slots(),
        "pkcs11.pin_file: set pin_file or pin_env, not both",
    ),
    (
        '[card]\nkey_agreement = "iotsafe:key-id=04"\n' + MODULE + BOOT + EST + slots(),
        "card.key_agreement: the key share is made by the IoT SAFE applet",
    ),
]


@pytest.mark.parametrize(("text", "message"), REFUSED)
def test_refused(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)) as info:
        parse_config(text)
    assert info.value.exit_code == 78
