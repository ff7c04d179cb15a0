"""Dev PKI generation, profiles, settings validation and the CLI parser (no sockets)."""

from __future__ import annotations

import ipaddress
import os
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from est_agent.errors import ConfigError, StoreError, UsageError
from est_agent.testserver.cli import build_parser, config_from_args, main
from est_agent.testserver.config import (
    AuthMode,
    CloseAfter,
    Fault,
    HttpScheme,
    ServerCertCa,
    ServerConfig,
    parse_label_profile,
)
from est_agent.testserver.issuer import Profile, parse_eku_names
from est_agent.testserver.pki import PKI_FILES, generate_dev_pki, load_dev_pki
from est_agent.testserver.wire import CsrAttrsKind


def test_generate_writes_all_files_with_private_keys_0600(tmp_path: Path) -> None:
    written = generate_dev_pki(tmp_path / "pki")
    assert sorted(p.name for p in written) == sorted(PKI_FILES)
    for path in written:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o600 if path.suffix == ".key" else 0o644), path
    assert not list((tmp_path / "pki").glob("*.tmp"))


def test_three_distinct_cas_and_server_names(tmp_path: Path) -> None:
    generate_dev_pki(tmp_path)
    pki = load_dev_pki(tmp_path)
    subjects = {
        pki.est_ca.certificate.subject,
        pki.tls_ca_certificate.subject,
        pki.bootstrap_ca.certificate.subject,
    }
    assert len(subjects) == 3
    server = x509.load_pem_x509_certificate((tmp_path / "server.pem").read_bytes())
    server.verify_directly_issued_by(pki.tls_ca_certificate)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "est-server"}
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    }
    client = x509.load_pem_x509_certificate((tmp_path / "bootstrap-client.pem").read_bytes())
    client.verify_directly_issued_by(pki.bootstrap_ca.certificate)
    for ca in (pki.est_ca.certificate, pki.bootstrap_ca.certificate):
        assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


@pytest.mark.parametrize(
    ("profile", "bc_critical", "key_usage"), [("rfc5280", True, True), ("libest", False, False)]
)
def test_pki_ca_profile_switch(
    tmp_path: Path, profile: str, bc_critical: bool, key_usage: bool
) -> None:
    # `est-testserver pki DIR --ca-profile libest`: the three CAs as libest's example CA
    # (estExampleCA.cnf [v3_ca]: basicConstraints CA:TRUE, not critical; no keyUsage).
    assert main(["pki", str(tmp_path), "--ca-profile", profile]) == 0
    pki = load_dev_pki(tmp_path)
    for ca in (pki.est_ca.certificate, pki.tls_ca_certificate, pki.bootstrap_ca.certificate):
        bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
        assert (bc.value.ca, bc.critical) == (True, bc_critical)
        present = {type(e.value) for e in ca.extensions}
        assert (x509.KeyUsage in present) is key_usage
        assert x509.SubjectKeyIdentifier in present
    server = x509.load_pem_x509_certificate(pki.server_cert_path.read_bytes())
    server.verify_directly_issued_by(pki.tls_ca_certificate)


def test_pki_ca_profile_refuses_an_unknown_profile(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as info:
        main(["pki", str(tmp_path), "--ca-profile", "web"])
    assert info.value.code == 64
    assert not list(tmp_path.iterdir())


def test_generate_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    generate_dev_pki(tmp_path)
    before = (tmp_path / "ca.pem").read_bytes()
    with pytest.raises(ConfigError, match="already exist"):
        generate_dev_pki(tmp_path)
    assert (tmp_path / "ca.pem").read_bytes() == before
    generate_dev_pki(tmp_path, force=True)
    assert (tmp_path / "ca.pem").read_bytes() != before


def test_generate_sets_modes_whatever_the_umask(tmp_path: Path) -> None:
    old_umask = os.umask(0o077)
    try:
        written = generate_dev_pki(tmp_path)
    finally:
        os.umask(old_umask)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in written}
    assert modes == {name: 0o600 if name.endswith(".key") else 0o644 for name in PKI_FILES}


def test_a_failed_write_keeps_the_old_files_and_leaves_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    generate_dev_pki(tmp_path)
    before = {name: (tmp_path / name).read_bytes() for name in PKI_FILES}
    real_replace = os.replace

    def full_after_three(src: str, dst: str) -> None:
        if len(replaced) == 3:
            raise OSError(28, "No space left on device")
        replaced.append(Path(dst).name)
        real_replace(src, dst)

    replaced: list[str] = []
    monkeypatch.setattr(os, "replace", full_after_three)
    with pytest.raises(StoreError, match="No space left on device") as info:
        generate_dev_pki(tmp_path, force=True)
    monkeypatch.undo()
    assert str(tmp_path) in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(PKI_FILES)  # no temp file
    for name in PKI_FILES[3:]:
        assert (tmp_path / name).read_bytes() == before[name], name


def test_load_reports_missing_and_mismatched_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"ca\.pem"):
        load_dev_pki(tmp_path)
    generate_dev_pki(tmp_path)
    (tmp_path / "ca.key").write_bytes((tmp_path / "tls-ca.key").read_bytes())
    with pytest.raises(ConfigError, match="does not match"):
        load_dev_pki(tmp_path)


@pytest.mark.parametrize("name", ["ca.pem", "bootstrap-ca.pem", "tls-ca.pem"])
def test_load_names_a_file_without_a_certificate(tmp_path: Path, name: str) -> None:
    generate_dev_pki(tmp_path)
    (tmp_path / name).write_bytes(b"-----BEGIN CERTIFICATE-----\nnot base64\n")
    with pytest.raises(ConfigError, match=f"^{tmp_path / name}: no usable certificate"):
        load_dev_pki(tmp_path)


def test_load_names_a_key_that_is_not_pem(tmp_path: Path) -> None:
    generate_dev_pki(tmp_path)
    (tmp_path / "ca.key").write_bytes(b"key")
    with pytest.raises(ConfigError, match=f"^{tmp_path / 'ca.key'}: not a PEM private key"):
        load_dev_pki(tmp_path)


def test_label_profiles() -> None:
    assert parse_label_profile("short=30s") == ("short", Profile(30))
    name, profile = parse_label_profile("tls=1d,clientAuth,serverAuth")
    assert name == "tls"
    assert profile == Profile(
        86400, (ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH)
    )
    assert parse_label_profile("bare=1h,none")[1].ekus == ()
    for bad in ("x", "=1d", "x="):
        with pytest.raises(UsageError, match=r"^not NAME=DURATION\[,EKU\.\.\.\]: "):
            parse_label_profile(bad)
    with pytest.raises(UsageError, match=r"^unknown EKU 'fooAuth'"):
        parse_label_profile("x=1d,fooAuth")
    with pytest.raises(UsageError, match=r"^profile validity must be at least one second, got 0"):
        parse_label_profile("x=0s")
    with pytest.raises(UsageError, match="unknown EKU"):
        parse_eku_names(["clientAuth", "nope"])


def test_config_validation(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--basic"):
        ServerConfig(pki_dir=tmp_path, auth=AuthMode.BASIC)
    with pytest.raises(ConfigError, match="max-concurrent"):
        ServerConfig(pki_dir=tmp_path, max_concurrent=0)
    with pytest.raises(ConfigError, match="fault-ops"):
        ServerConfig(pki_dir=tmp_path, fault_operations=frozenset({"bogus"}))
    with pytest.raises(ConfigError, match="--digest-algorithms: expected some of MD5, MD5-sess"):
        ServerConfig(pki_dir=tmp_path, digest_algorithms=("SHA-512-256",))
    with pytest.raises(ConfigError, match="--digest-algorithms"):
        ServerConfig(pki_dir=tmp_path, digest_algorithms=())
    with pytest.raises(ConfigError, match="--nonce-lifetime"):
        ServerConfig(pki_dir=tmp_path, digest_nonce_lifetime_s=0)


def test_cli_maps_every_option(tmp_path: Path) -> None:
    args = build_parser().parse_args(
        [
            "serve",
            "--pki",
            str(tmp_path),
            "--listen",
            "[::1]:0",
            "--tls-max",
            "1.2",
            "--auth",
            "cert-or-basic",
            "--basic",
            "alice:pw:with:colons",
            "--pop",
            "required",
            "--csrattrs",
            "libest-default",
            "--csrattrs-trailing-nul",
            "--validity",
            "90s",
            "--eku",
            "clientAuth,serverAuth",
            "--label",
            "short=30s",
            "--label",
            "long=2d,none",
            "--manual-approval",
            "1.5",
            "--retry-after-format",
            "http-date",
            "--max-concurrent",
            "3",
            "--unwrapped-base64",
            "--fault",
            "foreign-ca",
            "--fault-times",
            "2",
            "--fault-ops",
            "cacerts,simpleenroll",
            "--close-after",
            "non-200",
            "--http-auth",
            "digest",
            "--digest-algorithms",
            "SHA-256,MD5-sess",
            "--nonce-lifetime",
            "2.5",
            "--server-cert-from",
            "est-ca",
        ]
    )
    config = config_from_args(args)
    assert config.server_cert_ca is ServerCertCa.EST_CA
    assert (config.host, config.port) == ("::1", 0)
    assert config.basic == ("alice", "pw:with:colons")
    assert config.pop_required
    assert config.csrattrs is CsrAttrsKind.LIBEST_DEFAULT
    assert config.csrattrs_trailing_nul
    assert config.default_profile.validity_s == 90
    assert len(config.default_profile.ekus) == 2
    assert config.labels["long"] == Profile(2 * 86400, ())
    assert config.manual_approval_s == 1.5
    assert config.max_concurrent == 3
    assert not config.wrap_base64
    assert config.fault is Fault.FOREIGN_CA
    assert config.fault_operations == {"cacerts", "simpleenroll"}
    assert config.close_after is CloseAfter.NON_200
    assert config.http_scheme is HttpScheme.DIGEST
    assert config.digest_algorithms == ("SHA-256", "MD5-sess")
    assert config.digest_nonce_lifetime_s == 2.5


@pytest.mark.parametrize(
    "argv",
    [
        ["serve"],
        ["serve", "--pki", "x", "--listen", "nope"],
        ["serve", "--pki", "x", "--fault", "nope"],
        ["serve", "--pki", "x", "--max-concurrent", "0"],
        ["serve", "--pki", "x", "--validity", "1w"],
        ["serve", "--pki", "x", "--http-auth", "bearer"],
        ["serve", "--pki", "x", "--close-after", "403"],
        ["serve", "--pki", "x", "--server-cert-from", "bootstrap-ca"],
        ["bogus"],
    ],
)
def test_cli_usage_errors_exit_64(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 64
    assert "error" in capsys.readouterr().err


def test_cli_zero_validity_exits_64_without_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # --validity 0 parses as a duration; the profile refuses it (a UsageError, not ValueError)
    argv = ["serve", "--pki", str(tmp_path), "--listen", "127.0.0.1:0", "--validity", "0"]
    assert main(argv) == 64
    err = capsys.readouterr().err
    assert "profile validity must be at least one second, got 0" in err
    assert "Traceback" not in err


def test_cli_config_errors_exit_78(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(["serve", "--pki", str(tmp_path), "--auth", "basic", "--listen", "127.0.0.1:0"]) == 78
    )
    assert "--basic" in capsys.readouterr().err
    assert main(["serve", "--pki", str(tmp_path / "missing"), "--listen", "127.0.0.1:0"]) == 78


def test_cli_pki_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["pki", str(tmp_path / "d")]) == 0
    assert "ca.pem" in capsys.readouterr().out
    assert main(["pki", str(tmp_path / "d")]) == 78
    assert main(["pki", "--force", str(tmp_path / "d")]) == 0
