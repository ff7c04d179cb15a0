"""The test server's CA rollover switch (RFC 7030 §4.1.3): options and phases."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes

from est_agent.errors import ConfigError
from est_agent.est.messages import classify_cacerts
from est_agent.testserver import DevPki, EstTestServer
from est_agent.testserver.cli import build_parser, config_from_args, main
from est_agent.testserver.config import ServerConfig


def test_rollover_options_map_to_the_config(tmp_path: Path) -> None:
    args = build_parser().parse_args(
        [
            "serve",
            "--pki",
            str(tmp_path),
            "--rollover-at",
            "2030-01-02T03:04:05Z",
            "--rollover-announce-at",
            "2030-01-01T00:00:00+00:00",
        ]
    )
    config = config_from_args(args)
    assert config.rollover_at == datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert config.rollover_announce_at == datetime(2030, 1, 1, tzinfo=UTC)
    before = datetime.now(UTC)
    relative = config_from_args(
        build_parser().parse_args(["serve", "--pki", str(tmp_path), "--rollover-at", "+2h"])
    )
    assert relative.rollover_at is not None
    assert timedelta(hours=2) <= relative.rollover_at - before < timedelta(hours=2, minutes=1)


@pytest.mark.parametrize("value", ["2030-01-01T00:00:00", "tomorrow", "+1w"])
def test_rollover_time_without_zone_or_malformed_exits_64(
    value: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(["serve", "--pki", str(tmp_path), "--rollover-at", value])
    assert info.value.code == 64
    assert "--rollover-at" in capsys.readouterr().err


def test_announce_without_rollover_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="needs --rollover-at"):
        ServerConfig(pki_dir=tmp_path, rollover_announce_at=datetime(2030, 1, 1, tzinfo=UTC))


def test_phases_by_the_server_clock(dev_pki: DevPki) -> None:
    now = datetime.now(UTC)
    announce, switch = now + timedelta(hours=1), now + timedelta(hours=2)
    config = ServerConfig(
        pki_dir=dev_pki.directory,
        port=0,
        rollover_at=switch,
        rollover_announce_at=announce,
    )
    server = EstTestServer(config, pki=dev_pki)
    try:
        rollover = server.rollover
        assert rollover is not None
        old, new = dev_pki.est_ca.certificate, rollover.new.certificate
        moments = {
            "before": now,
            "overlap": announce + timedelta(minutes=1),
            "switched": switch + timedelta(minutes=1),
            "expired": old.not_valid_after_utc + timedelta(seconds=1),
        }
        for phase, moment in moments.items():
            server.clock = lambda moment=moment: moment  # type: ignore[misc]
            assert server.rollover_phase() == phase
            sent = server.cacerts_now()
            if phase == "before":
                assert sent == [old]
            elif phase == "expired":
                assert sent == [new]
            else:
                roles = classify_cacerts(sent)
                assert roles.anchor == old and roles.new_root == new
                assert roles.new_with_old is not None and roles.old_with_new is not None
            issuer = server.issuing_ca().certificate
            assert issuer == (old if phase in ("before", "overlap") else new)
            tls = server.context_now()
            assert (tls is server.ssl_context) == (phase in ("before", "overlap"))
        # the new root is a different key, not a re-issue of the old one
        assert new.fingerprint(hashes.SHA256()) != old.fingerprint(hashes.SHA256())
        assert new.public_key() != old.public_key()
    finally:
        server.close()
