"""Configuration: defaults, the example file, every validation error, secrets kept out of reprs."""

from __future__ import annotations

import contextlib
import dataclasses
import re
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from est_agent.card.uri import IotSafeRef, ObjectKind, UiccPath
from est_agent.config import (
    DEFAULT_CONFIG_PATH,
    BootstrapConfig,
    CardConfig,
    Config,
    CsrAttrsMode,
    EstConfig,
    PathsConfig,
    Pkcs11Config,
    PopMode,
    RenewalConfig,
    SlotConfig,
    SubjectConfig,
    UiccChannel,
    config_from_dict,
    config_keys,
    load_config,
    parse_config,
)
from est_agent.csr import render_subject
from est_agent.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "est-agent.example.toml"
URL = "https://est.example.net/.well-known/est"
MINIMAL = f'[est]\nurl = "{URL}"\n'
SECRET = "s3cr3t-Pa55word"


def with_est(extra: str = "", est: str = "") -> str:
    # `extra` first, so that top-level keys in it stay top-level.
    return f'{extra}\n[est]\nurl = "{URL}"\n{est}\n'


# --- defaults and the example file -----------------------------------------------------------


def test_defaults() -> None:
    config = Config.defaults(est_url=URL)
    assert config == parse_config(MINIMAL)
    assert config.card == CardConfig(
        reader="pcsc:",
        aids=(bytes.fromhex("A0000005590010"),),
        iso_cla=False,
        uicc_channel=UiccChannel.AUTO,
    )
    assert config.bootstrap.key == IotSafeRef(ObjectKind.PRIVATE_KEY, object_id=b"\x01")
    assert config.bootstrap.certificate == IotSafeRef(ObjectKind.FILE, object_id=b"\x01")
    assert [(s.name, str(s.key), str(s.certificate)) for s in config.slots] == [
        ("op-a", "iotsafe:key-id=02", "uicc:path=7FF0/6F01"),
        ("op-b", "iotsafe:key-id=03", "uicc:path=7FF0/6F02"),
    ]
    assert config.est.pop is PopMode.AUTO
    assert config.est.csrattrs is CsrAttrsMode.ADVISORY
    assert config.est.trust_anchor == Path("/etc/est-agent/tls-ca.pem")
    assert config.est.timeout_s == 30
    assert config.est.require_client_auth_eku
    assert config.est.cacerts_fingerprint is None
    assert config.basic_password() is None
    assert config.subject.common_name == "{iccid}"
    assert config.renewal == RenewalConfig(threshold=0.67, jitter_s=3600, retry_cap_s=86400)
    assert config.paths == PathsConfig(
        state_dir=Path("/var/lib/est-agent"), export_pem=None, deploy_hook=()
    )
    assert Path("/etc/est-agent/est-agent.toml") == DEFAULT_CONFIG_PATH


def test_example_file_shows_the_defaults() -> None:
    assert load_config(EXAMPLE) == Config.defaults(est_url=URL)


def _documented_keys(text: str) -> set[str]:
    """``section.key`` for every ``key =`` line (commented or not) under a section header."""
    keys = set()
    section = ""
    for raw in text.splitlines():
        line = raw.lstrip("# ").strip()
        if m := re.fullmatch(r"\[\[?(\w+)\]\]?.*", line):
            section = m.group(1)
        elif m := re.match(r"(\w+)\s*=", line):
            keys.add(f"{section}.{m.group(1)}")
    return keys


def test_every_key_is_in_the_example_file() -> None:
    missing = set(config_keys()) - _documented_keys(EXAMPLE.read_text())
    assert not missing


def test_every_key_is_in_the_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    missing = [key for key in config_keys() if f"`{key}`" not in section]
    assert not missing


def test_every_dataclass_field_is_a_key() -> None:
    sections = {
        "card": CardConfig,
        "pkcs11": Pkcs11Config,
        "bootstrap": BootstrapConfig,
        "slot": SlotConfig,
        "est": EstConfig,
        "subject": SubjectConfig,
        "renewal": RenewalConfig,
        "paths": PathsConfig,
    }
    expected = {f"{s}.{f.name}" for s, cls in sections.items() for f in dataclasses.fields(cls)}
    assert set(config_keys()) == expected
    assert [f.name for f in dataclasses.fields(Config)] == [
        "card",
        "pkcs11",
        "bootstrap",
        "slots",
        "est",
        "subject",
        "renewal",
        "paths",
    ]


def test_full_config() -> None:
    config = parse_config(
        """
        [card]
        reader = "modem:/dev/ttyUSB2?baud=921600"
        aids = ["A0000005590010", "a000000559001100"]
        iso_cla = true
        uicc_channel = "basic"
        [bootstrap]
        key = "/etc/est-agent/bootstrap.key"
        certificate = "uicc:path=7FF0/6F10"
        [[slot]]
        name = "left"
        key = "iotsafe:label=op-a"
        certificate = "uicc:path=3F00/7FF0/6F01"
        [[slot]]
        name = "right"
        key = "iotsafe:key-label=op-b"
        certificate = "uicc:path=7FF0/6F02"
        [est]
        url = "https://est.example.net:8443"
        label = "iot-devices"
        trust_anchor = "iotsafe:file-id=0A"
        cacerts_fingerprint = "AB:cd:00:11:22:33:44:55:66:77:88:99:aa:bb:cc:dd:ee:ff:00:11:22:33:\
44:55:66:77:88:99:aa:bb:cc:dd"
        pop = "tls-exporter"
        csrattrs = "strict"
        basic_username = "device"
        basic_password_env = "EST_PASSWORD"
        timeout_s = 2.5
        require_client_auth_eku = false
        [subject]
        common_name = "dev-{iccid}"
        organization = "Acme"
        serial_number = "{imei}"
        san_dns = ["{iccid}.devices.example.net"]
        san_uri = ["urn:imei:{imei}"]
        [renewal]
        threshold = 0.5
        jitter_s = 0
        retry_cap_s = 600
        [paths]
        state_dir = "/run/est"
        export_pem = "/etc/ssl/device.pem"
        deploy_hook = ["systemctl", "reload", "mqtt-client"]
        """
    )
    assert config.card.aids[1] == bytes.fromhex("A000000559001100")
    assert config.card.uicc_channel is UiccChannel.BASIC
    assert config.bootstrap.key == Path("/etc/est-agent/bootstrap.key")
    assert config.bootstrap.certificate == UiccPath((0x7FF0, 0x6F10))
    assert config.slots[0].key == IotSafeRef(ObjectKind.PRIVATE_KEY, label="op-a")
    assert config.slots[0].certificate == UiccPath((0x7FF0, 0x6F01))
    assert config.est.trust_anchor == IotSafeRef(ObjectKind.FILE, object_id=b"\x0a")
    assert config.est.cacerts_fingerprint is not None
    assert config.est.cacerts_fingerprint[:2] == b"\xab\xcd"
    assert config.est.operation_url("simpleenroll") == (
        "https://est.example.net:8443/.well-known/est/iot-devices/simpleenroll"
    )
    assert config.est.basic_username == "device"
    assert config.est.csrattrs is CsrAttrsMode.STRICT
    assert config.paths.deploy_hook == ("systemctl", "reload", "mqtt-client")
    name, sans = render_subject(*config.subject.templates(), {"iccid": "8988", "imei": "3500"})
    assert name.rfc4514_string() == "2.5.4.5=3500,O=Acme,CN=dev-8988"
    assert [san.value for san in sans] == ["8988.devices.example.net", "urn:imei:3500"]


def test_fingerprint_only_bootstrap_is_accepted_at_load_time() -> None:
    # RFC 7030 §4.1.1: the run bootstraps the anchor from /cacerts (tests/workflow/
    # test_bootstrap_fingerprint.py); only both empty is refused (est.trust_anchor case below).
    config = parse_config(with_est(est=f'trust_anchor = ""\ncacerts_fingerprint = "{"0a" * 32}"'))
    assert config.est.trust_anchor is None
    assert config.est.cacerts_fingerprint == b"\x0a" * 32
    with pytest.raises(ConfigError, match=r"est\.trust_anchor: required unless"):
        parse_config(with_est(est='trust_anchor = ""\ncacerts_fingerprint = ""'))


def test_an_imei_template_needs_a_modem_reader() -> None:
    with pytest.raises(ConfigError, match=r"subject\.san_uri: uses \{imei\}, which only a modem"):
        parse_config(with_est('[subject]\nsan_uri = ["urn:imei:{imei}"]'))
    config = parse_config(
        with_est('[card]\nreader = "modem:/dev/ttyUSB2"\n[subject]\nsan_uri = ["urn:imei:{imei}"]')
    )
    assert config.subject.san_uri == ("urn:imei:{imei}",)


def test_render_without_imei_names_the_key() -> None:
    config = parse_config(
        with_est('[card]\nreader = "modem:/dev/ttyUSB2"\n[subject]\nsan_uri = ["urn:imei:{imei}"]')
    )
    with pytest.raises(ConfigError, match=r"subject\.san_uri: placeholder \{imei\}"):
        render_subject(*config.subject.templates(), {"iccid": "8988"})


# --- every validation error names its key ----------------------------------------------------

BAD = [
    # (key named in the message, TOML, fragment of the message)
    ("treshold", "[renewal]\ntreshold = 0.5", "unknown key renewal.treshold"),
    ("cards", "[cards]\nreader = 'pcsc:'", "unknown key cards"),
    ("card", "card = 1", "card: expected a table, got integer"),
    ("card.reader", "[card]\nreader = 'usb:x'", "card.reader: expected pcsc:"),
    ("card.reader", "[card]\nreader = 'sim:'", "card.reader"),
    ("card.reader", "[card]\nreader = 'modem:'", "card.reader"),
    ("card.reader", "[card]\nreader = 7", "card.reader: expected a string, got integer"),
    ("card.aids", "[card]\naids = []", "card.aids: needs at least one AID"),
    ("card.aids", "[card]\naids = ['A000']", "card.aids: an AID is 5..16 bytes"),
    ("card.aids", "[card]\naids = ['zz']", "card.aids: not hex"),
    ("card.aids", "[card]\naids = 'A0000005590010'", "card.aids: expected an array"),
    ("card.aids", "[card]\naids = [1]", "card.aids: expected an array of strings"),
    ("card.iso_cla", "[card]\niso_cla = 'no'", "card.iso_cla: expected a boolean, got string"),
    (
        "card.implicit_channel",
        "[card]\nimplicit_channel = 1",
        "card.implicit_channel: expected a boolean, got integer",
    ),
    ("card.uicc_channel", "[card]\nuicc_channel = 'x'", "expected one of auto, logical, basic"),
    ("bootstrap.key", "[bootstrap]\nkey = 'iotsafe:file-id=01'", "expected a private key"),
    ("bootstrap.key", "[bootstrap]\nkey = 'uicc:path=6F01'", "bootstrap.key"),
    ("bootstrap.key", "[bootstrap]\nkey = 'iotsafe:key-id=zz'", "not hex"),
    ("bootstrap.key", "[bootstrap]\nkey = ''", "bootstrap.key: empty path"),
    ("bootstrap.certificate", "[bootstrap]\ncertificate = 'iotsafe:key-id=01'", "expected a file"),
    ("bootstrap.certificate", "[bootstrap]\ncertificate = 'uicc:path=3F00'", "bootstrap.cert"),
    ("slot", "[slot]\nkey = 'iotsafe:key-id=02'", "expected an array of tables"),
    ("slot", "[[slot]]\nkey = 'iotsafe:key-id=02'\ncertificate = 'uicc:path=6F01'", "exactly two"),
    ("slot[0].key", "[[slot]]\ncertificate = 'uicc:path=6F01'\n[[slot]]", "required"),
    (
        "slot[1].cert",
        "[[slot]]\nkey = 'iotsafe:key-id=02'\ncertificate = 'uicc:path=6F01'\n"
        "[[slot]]\nkey = 'iotsafe:key-id=03'",
        "required",
    ),
    (
        "slot[0].key",
        "[[slot]]\nkey = 'k.pem'\ncertificate = 'uicc:path=6F01'\n"
        "[[slot]]\nkey = 'iotsafe:key-id=03'\ncertificate = 'uicc:path=6F02'",
        "expected an iotsafe",
    ),
    (
        "slot[0].key",
        "[[slot]]\nkey = 'iotsafe:file-id=02'\ncertificate = 'uicc:path=6F01'\n"
        "[[slot]]\nkey = 'iotsafe:key-id=03'\ncertificate = 'uicc:path=6F02'",
        "IoT SAFE key",
    ),
    (
        "slot[0].certificate",
        "[[slot]]\nkey = 'iotsafe:key-id=02'\ncertificate = 'iotsafe:file-id=02'\n"
        "[[slot]]\nkey = 'iotsafe:key-id=03'\ncertificate = 'uicc:path=6F02'",
        "uicc:path= EF",
    ),
    (
        "slot[1].name",
        "[[slot]]\nkey = 'iotsafe:key-id=02'\ncertificate = 'uicc:path=6F01'\n"
        "[[slot]]\nname = 'B!'\nkey = 'iotsafe:key-id=03'\ncertificate = 'uicc:path=6F02'",
        "1..16",
    ),
    (
        "slot[1].name",
        "[[slot]]\nname = 'x'\nkey = 'iotsafe:key-id=02'\ncertificate = 'uicc:path=6F01'"
        "\n[[slot]]\nname = 'x'\nkey = 'iotsafe:key-id=03'\ncertificate = 'uicc:path=6F02'",
        "same",
    ),
    (
        "slot[1].key",
        "[[slot]]\nkey = 'iotsafe:key-id=02'\ncertificate = 'uicc:path=6F01'\n"
        "[[slot]]\nkey = 'iotsafe:key-id=02'\ncertificate = 'uicc:path=6F02'",
        "same key",
    ),
    (
        "slot[1].certificate",
        "[[slot]]\nkey = 'iotsafe:key-id=02'\ncertificate = 'uicc:path=6F01'"
        "\n[[slot]]\nkey = 'iotsafe:key-id=03'\ncertificate = 'uicc:path=3F00/6F01'",
        "same EF",
    ),
    (
        "slot[0].key",
        "[[slot]]\nkey = 'iotsafe:key-id=01'\ncertificate = 'uicc:path=6F01'\n"
        "[[slot]]\nkey = 'iotsafe:key-id=03'\ncertificate = 'uicc:path=6F02'",
        "bootstrap key",
    ),
    (
        "slot[1].certificate",
        "[bootstrap]\ncertificate = 'uicc:path=7FF0/6F02'",
        "bootstrap certificate",
    ),
    ("slot[0].colour", "[[slot]]\ncolour = 1\n[[slot]]", "unknown key slot[0].colour"),
    ("est.url", "[est]\nlabel = 'x'", "est.url: required"),
    (
        "est.pop",
        "[est]\nurl = 'https://e.x'\npop = 'yes'",
        "est.pop: expected one of auto, tls-unique, tls-exporter, off, got 'yes'",
    ),
    (
        "est.csrattrs",
        "[est]\nurl = 'https://e.x'\ncsrattrs = 'lenient'",
        "est.csrattrs: expected one of advisory, strict, off, got 'lenient'",
    ),
    ("est.csrattrs", "[est]\nurl = 'https://e.x'\ncsrattrs = true", "est.csrattrs: expected"),
    ("est.url", "[est]\nurl = 'http://est.example.net'", "est.url: EST server URL must use https"),
    ("est.url", "[est]\nurl = 'https://u:p@e.x'", "est.url"),
    ("est.url", "[est]\nurl = 'https://e.x:99999'", "est.url"),
    ("est.url", "[est]\nurl = 'https://e.x/?q=1'", "est.url"),
    ("est.url", "[est]\nurl = 1", "est.url: expected a string"),
    ("est.label", "[est]\nurl = 'https://e.x'\nlabel = 'a/b'", "est.label"),
    ("est.trust_anchor", "[est]\nurl = 'https://e.x'\ntrust_anchor = ''", "required unless"),
    (
        "est.trust_anchor",
        "[est]\nurl = 'https://e.x'\ntrust_anchor = 'iotsafe:key-id=01'",
        "expected a certificate file",
    ),
    ("est.trust_anchor", "[est]\nurl = 'https://e.x'\ntrust_anchor = 'uicc:path=XY'", "not hex"),
    (
        "est.cacerts_fingerprint",
        "[est]\nurl = 'https://e.x'\ncacerts_fingerprint = 'AB:CD'",
        "32 bytes",
    ),
    ("est.cacerts_fingerprint", "[est]\nurl = 'https://e.x'\ncacerts_fingerprint = 'xyz'", "hex"),
    ("est.basic_username", "[est]\nurl = 'https://e.x'\nbasic_password_env = 'P'", "required"),
    (
        "est.basic_username",
        "[est]\nurl = 'https://e.x'\nbasic_username = 'a:b'\nbasic_password_env = 'P'",
        "no ':'",
    ),
    ("est.basic_password_file", "[est]\nurl = 'https://e.x'\nbasic_username = 'u'", "without"),
    (
        "est.basic_password_env",
        "[est]\nurl = 'https://e.x'\nbasic_username = 'u'\n"
        "basic_password_env = 'P'\nbasic_password_file = 'p.txt'",
        "only one",
    ),
    (
        "est.basic_password_env",
        "[est]\nurl = 'https://e.x'\nbasic_username = 'u'\nbasic_password_env = 'A B'",
        "not an environment variable name",
    ),
    (
        "est.http_auth",
        "[est]\nurl = 'https://e.x'\nhttp_auth = 'ntlm'",
        "expected one of auto, basic, digest, got 'ntlm'",
    ),
    ("est.http_auth", "[est]\nurl = 'https://e.x'\nhttp_auth = 'digest'", "needs est.basic_user"),
    ("est.timeout_s", "[est]\nurl = 'https://e.x'\ntimeout_s = 0", "est.timeout_s"),
    ("est.timeout_s", "[est]\nurl = 'https://e.x'\ntimeout_s = 1e9", "est.timeout_s"),
    ("est.timeout_s", "[est]\nurl = 'https://e.x'\ntimeout_s = nan", "est.timeout_s"),
    ("est.timeout_s", "[est]\nurl = 'https://e.x'\ntimeout_s = true", "got boolean"),
    ("est.timeout_s", "[est]\nurl = 'https://e.x'\ntimeout_s = '30'", "got string"),
    (
        "est.require_client_auth_eku",
        "[est]\nurl = 'https://e.x'\nrequire_client_auth_eku = 1",
        "expected a boolean",
    ),
    ("subject.common_name", "[subject]\ncommon_name = '{serial}'", "unknown placeholder {serial}"),
    ("subject.common_name", "[subject]\ncommon_name = '{iccid!r}'", "plain {name}"),
    ("subject.common_name", "[subject]\ncommon_name = '{'", "invalid template"),
    ("subject.common_name", "[subject]\ncommon_name = ''", "the subject is empty"),
    ("subject.common_name", f"[subject]\ncommon_name = '{'x' * 65}'", "subject.common_name"),
    ("subject.organization", "[subject]\norganization = '{imei.real}'", "subject.organization"),
    ("subject.serial_number", "[subject]\nserial_number = 5", "expected a string"),
    ("subject.san_dns", "[subject]\nsan_dns = ['{host}']", "unknown placeholder {host}"),
    ("subject.san_dns", "[subject]\nsan_dns = 'a.example'", "expected an array"),
    ("subject.san_uri", "[subject]\nsan_uri = ['']", "subject.san_uri"),
    ("est.timeout_s", "[est]\nurl = 'https://e.x'\ntimeout_s = inf", "got inf"),
    ("est.timeout_s", "[est]\nurl = 'https://e.x'\ntimeout_s = -inf", "got -inf"),
    ("est.timeout_s", "[est]\nurl = 'https://e.x'\ntimeout_s = -1", "got -1"),
    ("renewal.threshold", "[renewal]\nthreshold = nan", "got nan"),
    ("renewal.threshold", "[renewal]\nthreshold = inf", "got inf"),
    ("renewal.threshold", "[renewal]\nthreshold = -inf", "got -inf"),
    ("renewal.jitter_s", "[renewal]\njitter_s = nan", "got nan"),
    ("renewal.jitter_s", "[renewal]\njitter_s = inf", "got inf"),
    ("renewal.retry_cap_s", "[renewal]\nretry_cap_s = nan", "got nan"),
    ("renewal.retry_cap_s", "[renewal]\nretry_cap_s = +inf", "got inf"),
    ("card.reader", '[card]\nreader = "pcsc:Reader\\u0000 0"', "card.reader: contains NUL"),
    ("card.reader", '[card]\nreader = "modem:/dev/tty\\u0000"', "card.reader: contains NUL"),
    ("card.reader", "[card]\nreader = 'modem:/dev/ttyUSB2?timeout=nan'", "bad timeout 'nan'"),
    ("card.reader", "[card]\nreader = 'modem:/dev/ttyUSB2?timeout=0'", "bad timeout '0'"),
    ("card.reader", "[card]\nreader = 'modem:/dev/ttyUSB2?baud=-9600'", "bad baud"),
    ("card.reader", "[card]\nreader = 'modem:/dev/ttyUSB2?speed=1'", "unknown option 'speed'"),
    (
        "est.basic_username",
        "[est]\nurl = 'https://e.x'\nbasic_username = \"a\\tb\"\nbasic_password_env = 'P'",
        "control character",
    ),
    (
        "est.basic_username",
        "[est]\nurl = 'https://e.x'\nbasic_username = \"a\\u007f\"\nbasic_password_env = 'P'",
        "control character",
    ),
    ("renewal.threshold", "[renewal]\nthreshold = 1", "0 < threshold < 1"),
    ("renewal.threshold", "[renewal]\nthreshold = 0.0", "0 < threshold < 1"),
    ("renewal.threshold", "[renewal]\nthreshold = '0.5'", "expected a number"),
    ("renewal.jitter_s", "[renewal]\njitter_s = -1", "renewal.jitter_s"),
    ("renewal.retry_cap_s", "[renewal]\nretry_cap_s = 0", "renewal.retry_cap_s"),
    ("renewal.retry_cap_s", "[renewal]\nretry_cap_s = 1e12", "renewal.retry_cap_s"),
    ("paths.state_dir", "[paths]\nstate_dir = ''", "paths.state_dir: empty path"),
    ("paths.export_pem", "[paths]\nexport_pem = []", "paths.export_pem: expected a string"),
    ("paths.deploy_hook", "[paths]\ndeploy_hook = 'reload.sh'", "expected an array"),
    ("paths.deploy_hook", "[paths]\ndeploy_hook = ['']", "the program"),
    ("paths.deploy_hook", "[paths]\ndeploy_hook = [['a']]", "array of strings"),
    ("paths.deploy_hook", '[paths]\ndeploy_hook = ["a\\u0000b"]', "NUL"),
]


@pytest.mark.parametrize(
    ("key", "toml", "fragment"), BAD, ids=[f"{k}-{i}" for i, (k, _, _) in enumerate(BAD)]
)
def test_invalid_values_name_the_key(key: str, toml: str, fragment: str) -> None:
    text = toml if "[est]" in toml else with_est(toml)
    with pytest.raises(ConfigError) as info:
        parse_config(text, source="test.toml")
    message = str(info.value)
    assert message.startswith("test.toml: ")
    assert key in message
    assert fragment in message
    assert info.value.exit_code == 78


def test_est_url_is_required() -> None:
    with pytest.raises(ConfigError, match=r"^<string>: est\.url: required"):
        parse_config("[card]\nreader = 'pcsc:'")


def test_toml_syntax_error_has_line_and_column() -> None:
    with pytest.raises(ConfigError, match=r"x\.toml: invalid TOML: .*line 2, column"):
        parse_config('[est]\nurl = "https://e.x\n', source="x.toml")


@pytest.mark.parametrize(
    "value",
    ["[" * 1000 + "]" * 1000, "{a = " * 1000 + "1" + "}" * 1000, "[{a = " * 600 + "1" + "}]" * 600],
    ids=["arrays", "inline-tables", "mixed"],
)
def test_toml_nested_a_thousand_levels_deep(tmp_path: Path, value: str) -> None:
    with pytest.raises(ConfigError, match=r"^deep\.toml: invalid TOML: nested too deeply"):
        parse_config(f"x = {value}\n" + MINIMAL, source="deep.toml")
    path = tmp_path / "est-agent.toml"
    path.write_text(f"[est]\nurl = {value}\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: invalid TOML: nested"):
        load_config(path)


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match=re.escape(str(path))):
        load_config(path)


def test_directory_and_non_utf8_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=re.escape(str(tmp_path))):
        load_config(tmp_path)
    bad = tmp_path / "latin1.toml"
    bad.write_bytes(b'[est]\nurl = "https://\xe9.x"\n')
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(bad)


def _hostile(kind: str, tmp_path: Path, fifo: Path, sparse_2gib: Path) -> Path:
    return {
        "dev-zero": Path("/dev/zero"),
        "fifo": fifo,
        "directory": tmp_path,
        "sparse-2gib": sparse_2gib,
    }[kind]


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("dev-zero", "a character device, not a regular file"),
        ("fifo", "a FIFO, not a regular file"),
        ("directory", "a directory, not a regular file"),
        ("sparse-2gib", "larger than 1048576 bytes"),
    ],
)
def test_config_file_that_is_not_a_small_regular_file(
    tmp_path: Path, fifo: Path, sparse_2gib: Path, kind: str, reason: str
) -> None:
    path = _hostile(kind, tmp_path, fifo, sparse_2gib)
    started = time.monotonic()
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert time.monotonic() - started < 1.0
    assert str(info.value).startswith(f"configuration: cannot read {path}: {reason}")
    assert info.value.exit_code == 78


def test_config_file_through_a_symlink_is_read(tmp_path: Path) -> None:
    real = tmp_path / "real.toml"
    real.write_text(MINIMAL)
    link = tmp_path / "est-agent.toml"
    link.symlink_to(real)
    assert load_config(link).est.url == URL


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("dev-zero", "a character device, not a regular file"),
        ("fifo", "a FIFO, not a regular file"),
        ("directory", "a directory, not a regular file"),
        ("sparse-2gib", "larger than 4096 bytes"),
    ],
)
def test_password_file_that_is_not_a_small_regular_file(
    tmp_path: Path, fifo: Path, sparse_2gib: Path, kind: str, reason: str
) -> None:
    path = _hostile(kind, tmp_path, fifo, sparse_2gib)
    config = parse_config(
        with_est(est=f'basic_username = "u"\nbasic_password_file = "{path}"'), base_dir=tmp_path
    )
    started = time.monotonic()
    with pytest.raises(ConfigError) as info:
        config.basic_password()
    assert time.monotonic() - started < 1.0
    assert str(info.value).startswith(f"est.basic_password_file: cannot read {path}: {reason}")


def test_password_file_limit_is_4_kib(tmp_path: Path) -> None:
    config = parse_config(
        with_est(est='basic_username = "u"\nbasic_password_file = "pw"'), base_dir=tmp_path
    )
    (tmp_path / "pw").write_text(SECRET + "\n" + "x" * (4096 - len(SECRET) - 1))
    assert config.basic_password() == SECRET
    (tmp_path / "pw").write_text(SECRET + "\n" + "x" * (4096 - len(SECRET)))
    with pytest.raises(ConfigError, match="larger than 4096 bytes") as info:
        config.basic_password()
    assert SECRET not in str(info.value)


def test_errors_from_a_file_start_with_its_path(tmp_path: Path) -> None:
    path = tmp_path / "est-agent.toml"
    path.write_text(with_est("[renewal]\nthreshold = 2"))
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: renewal\.threshold"):
        load_config(path)


@pytest.mark.parametrize(
    ("build", "key"),
    [
        (lambda: RenewalConfig(threshold=1.5), "renewal.threshold"),
        (lambda: CardConfig(aids=()), "card.aids"),
        (lambda: CardConfig(reader=1), "card.reader"),  # type: ignore[arg-type]
        (lambda: EstConfig(url="http://e.x"), "est.url"),
        (lambda: EstConfig(url="https://e.x", timeout_s=True), "est.timeout_s"),
        (lambda: SubjectConfig(san_dns=["a"]), "subject.san_dns"),  # type: ignore[arg-type]
        (lambda: PathsConfig(state_dir="/x"), "paths.state_dir"),  # type: ignore[arg-type]
        (
            lambda: SlotConfig(
                name="a",
                key=IotSafeRef(ObjectKind.FILE, object_id=b"\x02"),
                certificate=UiccPath((0x6F01,)),
            ),
            "slot.key",
        ),
        (
            lambda: BootstrapConfig(key=IotSafeRef(ObjectKind.FILE, object_id=b"\x01")),
            "bootstrap.key",
        ),
        (
            lambda: Config(est=EstConfig(url=URL), slots=(Config.defaults(est_url=URL).slots[0],)),  # type: ignore[arg-type]
            "slot",
        ),
    ],
)
def test_dataclasses_validate_when_built_in_code(build: object, key: str) -> None:
    assert callable(build)
    with pytest.raises(ConfigError, match=re.escape(key)):
        build()


def test_dataclasses_are_frozen_and_keyword_only() -> None:
    config = Config.defaults(est_url=URL)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.renewal.threshold = 0.9  # type: ignore[misc]
    with pytest.raises(TypeError):
        RenewalConfig(0.5)  # type: ignore[call-arg]


# --- paths relative to the configuration file ------------------------------------------------


def test_relative_paths_resolve_against_the_config_directory(tmp_path: Path) -> None:
    path = tmp_path / "etc" / "est-agent.toml"
    path.parent.mkdir()
    path.write_text(
        with_est(
            """
            [card]
            reader = "sim:sim.json"
            [bootstrap]
            key = "boot/key.pem"
            certificate = "/abs/cert.pem"
            [paths]
            state_dir = "state"
            export_pem = "out/device.pem"
            deploy_hook = ["./hooks/reload", "relative/arg"]
            """,
            est='trust_anchor = "ca.pem"\nbasic_username = "u"\nbasic_password_file = "pw"',
        )
    )
    config = load_config(path)
    etc = path.parent
    assert config.card.reader == f"sim:{etc / 'sim.json'}"
    assert config.bootstrap.key == etc / "boot" / "key.pem"
    assert config.bootstrap.certificate == Path("/abs/cert.pem")
    assert config.est.trust_anchor == etc / "ca.pem"
    assert config.est.basic_password_file == etc / "pw"
    assert config.paths.state_dir == etc / "state"
    assert config.paths.export_pem == etc / "out" / "device.pem"
    # argv[0] with a "/" is a path; other arguments are the hook's business.
    assert config.paths.deploy_hook == (str(etc / "hooks" / "reload"), "relative/arg")


def test_pem_paths_are_not_read_at_parse_time(tmp_path: Path) -> None:
    config = parse_config(
        with_est('[bootstrap]\nkey = "missing.pem"\ncertificate = "missing.crt"'),
        base_dir=tmp_path,
    )
    assert config.bootstrap.key == tmp_path / "missing.pem"


def test_bare_hook_name_is_left_to_path() -> None:
    config = parse_config(with_est('[paths]\ndeploy_hook = ["systemctl", "reload", "x"]'))
    assert config.paths.deploy_hook[0] == "systemctl"


# --- the Basic password ----------------------------------------------------------------------


def test_password_from_file_first_line(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text(f"{SECRET}\nsecond line\n")
    config = parse_config(
        with_est(est='basic_username = "u"\nbasic_password_file = "pw"'), base_dir=tmp_path
    )
    assert config.basic_password() == SECRET
    # Read at use time: a rotated password is picked up without reloading the configuration.
    (tmp_path / "pw").write_text("rotated\r\n")
    assert config.basic_password() == "rotated"


def test_password_file_missing_or_empty(tmp_path: Path) -> None:
    config = parse_config(
        with_est(est='basic_username = "u"\nbasic_password_file = "pw"'), base_dir=tmp_path
    )
    with pytest.raises(ConfigError, match=re.escape(str(tmp_path / "pw"))):
        config.basic_password()
    (tmp_path / "pw").write_text("\nnot-the-first-line\n")
    with pytest.raises(ConfigError, match=r"first line .* is empty"):
        config.basic_password()
    (tmp_path / "pw").write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match="not UTF-8") as info:
        config.basic_password()
    assert "basic_password_file" in str(info.value)


def test_password_with_a_control_character_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # RFC 7617 §2: neither user-id nor password may contain a CTL (RFC 5234 Appendix B.1).
    config = parse_config(
        with_est(est='basic_username = "u"\nbasic_password_file = "pw"'), base_dir=tmp_path
    )
    (tmp_path / "pw").write_bytes(SECRET.encode() + b"\x00x\n")
    with pytest.raises(ConfigError, match=r"first line of .*pw contains a control character"):
        config.basic_password()
    from_env = parse_config(with_est(est='basic_username = "u"\nbasic_password_env = "EST_PW"'))
    monkeypatch.setenv("EST_PW", SECRET + "\x1b")
    with pytest.raises(ConfigError, match="EST_PW contains a control character") as info:
        from_env.basic_password()
    assert SECRET not in str(info.value)


def test_modem_reader_options_in_range_are_taken() -> None:
    reader = "modem:/dev/ttyUSB2?baud=9600&timeout=60"
    assert parse_config(with_est(f"[card]\nreader = '{reader}'")).card.reader == reader


def test_password_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    config = parse_config(with_est(est='basic_username = "u"\nbasic_password_env = "EST_PW"'))
    monkeypatch.setenv("EST_PW", SECRET)
    assert config.basic_password() == SECRET
    monkeypatch.delenv("EST_PW")
    with pytest.raises(ConfigError, match="EST_PW"):
        config.basic_password()
    monkeypatch.setenv("EST_PW", "")
    with pytest.raises(ConfigError, match="EST_PW"):
        config.basic_password()


def test_password_never_in_repr_or_str(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "pw").write_text(SECRET)
    monkeypatch.setenv("EST_PW", SECRET)
    configs = [
        parse_config(
            with_est(est='basic_username = "u"\nbasic_password_file = "pw"'), base_dir=tmp_path
        ),
        parse_config(with_est(est='basic_username = "u"\nbasic_password_env = "EST_PW"')),
    ]
    for config in configs:
        assert config.basic_password() == SECRET
        objects: list[object] = [
            config,
            *(getattr(config, f.name) for f in dataclasses.fields(config)),
        ]
        objects.extend(config.slots)
        for obj in objects:
            assert SECRET not in repr(obj)
            assert SECRET not in str(obj)
        assert SECRET not in repr(dataclasses.asdict(config))


# --- property: arbitrary input raises ConfigError and nothing else ---------------------------

_SCALARS = st.one_of(
    st.text(max_size=30),
    st.sampled_from(
        [
            "pcsc:",
            "sim:x",
            "modem:",
            "iotsafe:key-id=02",
            "iotsafe:file-id=01",
            "iotsafe:label=",
            "uicc:path=7FF0/6F01",
            "uicc:path=3F00",
            "https://e.x",
            "http://e.x",
            "https://e.x:0",
            "{iccid}",
            "{imei}",
            "{0}",
            "{iccid:>99}",
            "auto",
            "basic",
            "A0000005590010",
            "",
        ]
    ),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.datetimes(),
    st.dates(),
)
_KEYS = st.sampled_from(sorted({k.split(".")[1] for k in config_keys()} | {"bogus"}))
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_KEYS, inner, max_size=4),
    max_leaves=8,
)
_SECTION_NAMES = st.sampled_from(
    ["card", "bootstrap", "slot", "est", "subject", "renewal", "paths", "x"]
)
_TABLES = st.dictionaries(_KEYS, _VALUES, max_size=6)
_DOCUMENTS = st.dictionaries(
    _SECTION_NAMES,
    st.one_of(_TABLES, st.lists(_TABLES, max_size=3), _SCALARS),
    max_size=7,
)


@settings(max_examples=400, deadline=None)
@given(data=_DOCUMENTS)
def test_random_documents_raise_only_config_error(data: dict[str, object]) -> None:
    if "est" in data and isinstance(data["est"], dict):
        data["est"].setdefault("url", URL)  # get past the required key more often
    with contextlib.suppress(ConfigError):
        config_from_dict(data, base_dir=Path("/etc/est-agent"))


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=200))
def test_random_text_raises_only_config_error(text: str) -> None:
    with contextlib.suppress(ConfigError):
        parse_config(MINIMAL + text)


@pytest.mark.parametrize(
    ("reader", "channel"),
    [
        ("pcsc:", UiccChannel.BASIC),
        ("sim:/x.json", UiccChannel.BASIC),
        ("modem:/dev/ttyUSB2", UiccChannel.LOGICAL),
    ],
)
def test_uicc_channel_auto_resolves_by_reader(reader: str, channel: UiccChannel) -> None:
    assert UiccChannel.AUTO.resolve(reader) is channel
    assert UiccChannel.LOGICAL.resolve(reader) is UiccChannel.LOGICAL
