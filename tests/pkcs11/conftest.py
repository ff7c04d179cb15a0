"""A SoftHSM2 token per test, initialised in the test's temporary directory (``SOFTHSM2_CONF``),
with a bootstrap key generated on it and certified by the dev PKI's bootstrap CA, and a
configuration whose slots and bootstrap credential are ``pkcs11:`` URIs on that token."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from est_agent.backends.pkcs11 import Pkcs11Backend, load_module, open_pkcs11
from est_agent.cli.token import provision_bootstrap
from est_agent.pkcs11_uri import parse_pkcs11_uri
from est_agent.testserver import DevPki, EstTestServer

SOFTHSM_MODULE = "/usr/lib/softhsm/libsofthsm2.so"
TOKEN_LABEL = "est-test"
#: distinctive, so that a test can grep every output for it
PIN = "pin-7Rq4-Xz9"
PIN_ENV = "EST_TEST_TOKEN_PIN"
SO_PIN = "so-0000"
ROOT = Path(__file__).resolve().parents[2]


def uri(label: str, kind: str) -> str:
    return f"pkcs11:token={TOKEN_LABEL};object={label};type={kind}"


BOOTSTRAP_KEY = parse_pkcs11_uri(uri("bootstrap", "private"))
BOOTSTRAP_CERT = parse_pkcs11_uri(uri("bootstrap", "cert"))
SLOT_KEYS = {name: parse_pkcs11_uri(uri(name, "private")) for name in ("op-a", "op-b")}


@dataclass
class Token:
    root: Path
    softhsm_conf: Path
    config: Path
    state_dir: Path

    def env(self) -> dict[str, str]:
        """The environment of a child process that uses this token."""
        env = dict(os.environ)
        env["SOFTHSM2_CONF"] = str(self.softhsm_conf)
        env[PIN_ENV] = PIN
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        return env

    @contextlib.contextmanager
    def open(self) -> Iterator[Pkcs11Backend]:
        with open_pkcs11(SLOT_KEYS["op-a"], module=SOFTHSM_MODULE, pin=PIN) as backend:
            yield backend

    def write_config(self, server: EstTestServer, dev_pki: DevPki, **extra: str) -> None:
        (self.root / "tls-ca.pem").write_bytes(
            dev_pki.tls_ca_certificate.public_bytes(serialization.Encoding.PEM)
        )
        sections: dict[str, dict[str, str]] = {
            "pkcs11": {"module": f'"{SOFTHSM_MODULE}"', "pin_env": f'"{PIN_ENV}"'},
            "bootstrap": {
                "key": f'"{uri("bootstrap", "private")}"',
                "certificate": f'"{uri("bootstrap", "cert")}"',
            },
            "est": {"url": f'"{server.url}"', "trust_anchor": f'"{self.root / "tls-ca.pem"}"'},
            "subject": {"common_name": '"device-0001"'},
            "renewal": {"jitter_s": "0"},
            "paths": {
                "state_dir": f'"{self.state_dir}"',
                "export_pem": f'"{self.root / "device.pem"}"',
            },
        }
        for dotted, value in extra.items():
            section, key = dotted.split("__", 1)
            sections.setdefault(section, {})[key] = value
        text = "\n".join(
            f"[{name}]\n" + "\n".join(f"{k} = {v}" for k, v in body.items()) + "\n"
            for name, body in sections.items()
        )
        for name in ("op-a", "op-b"):
            text += (
                f'[[slot]]\nname = "{name}"\nkey = "{uri(name, "private")}"\n'
                f'certificate = "{uri(name, "cert")}"\n'
            )
        self.config.write_text(text)


def init_token(root: Path) -> Path:
    """A fresh SoftHSM2 token store under ``root``; the configuration file that points at it."""
    tokens = root / "softhsm-tokens"
    tokens.mkdir(parents=True)
    conf = root / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n"
    )
    env = {**os.environ, "SOFTHSM2_CONF": str(conf)}
    subprocess.run(
        [
            "softhsm2-util", "--init-token", "--free", "--label", TOKEN_LABEL,
            "--so-pin", SO_PIN, "--pin", PIN,
        ],
        env=env,
        check=True,
        capture_output=True,
    )
    return conf


@pytest.fixture
def token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dev_pki: DevPki) -> Token:
    if not Path(SOFTHSM_MODULE).exists() or shutil.which("softhsm2-util") is None:
        pytest.skip("SoftHSM2 is not installed (scripts/bootstrap installs softhsm2)")
    conf = init_token(tmp_path)
    monkeypatch.setenv("SOFTHSM2_CONF", str(conf))
    monkeypatch.setenv(PIN_ENV, PIN)
    # SoftHSM reads SOFTHSM2_CONF in C_Initialize; the module stays loaded for the process
    load_module(SOFTHSM_MODULE).reinitialize()
    dev = Token(tmp_path, conf, tmp_path / "est-agent.toml", tmp_path / "state")
    with dev.open() as backend:
        provision_bootstrap(
            backend, BOOTSTRAP_KEY, BOOTSTRAP_CERT, dev_pki.bootstrap_ca, "bootstrap-device-0001"
        )
    return dev


def agent_process(
    token: Token, *argv: str, timeout: float = 60.0
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "est_agent", *argv, "--config", str(token.config)],
        env=token.env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
