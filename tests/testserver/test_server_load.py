"""The test server under load: 503 or 202 + Retry-After over the concurrency cap (with jitter),
a CA outage (a file, or a window after start), the per-request log and the in-flight peak."""

from __future__ import annotations

import json
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from est_agent.errors import ConfigError
from est_agent.testserver import DevPki, EstTestServer, ServerConfig
from est_agent.testserver.cli import build_parser, config_from_args
from tests.testserver.esttls_helpers import (
    EST,
    b64,
    client_context,
    enroll_headers,
    make_csr,
    new_key,
    request,
)

pytestmark = pytest.mark.integration

Start = Callable[..., EstTestServer]


def _enroll(server: EstTestServer, ctx: ssl.SSLContext):  # type: ignore[no-untyped-def]
    body = b64(make_csr(new_key()))
    return request(server.port, ctx, "POST", f"{EST}/simpleenroll", body, enroll_headers())


def _while_busy(server: EstTestServer, boot: ssl.SSLContext, ask: Callable[[], object]) -> object:
    """``ask()`` while another enrollment holds the only slot (its answer is delayed 1 s)."""
    occupied: dict[str, int] = {}
    worker = threading.Thread(target=lambda: occupied.update(status=_enroll(server, boot).status))
    worker.start()
    threading.Event().wait(0.4)  # the first request is now inside its one-second delay
    try:
        return ask()
    finally:
        worker.join()
        assert occupied["status"] == 200


def test_busy_enrollment_gets_202_and_cacerts_503(
    start_server: Start, dev_pki: DevPki, boot: ssl.SSLContext
) -> None:
    server = start_server(
        max_concurrent=1, response_delay_s=1.0, busy_status=202, busy_retry_after_s=30
    )
    enroll = _while_busy(server, boot, lambda: _enroll(server, boot))
    assert (enroll.status, enroll.headers["Retry-After"]) == (202, "30")  # type: ignore[attr-defined]
    plain = client_context(dev_pki.directory)
    cacerts = _while_busy(
        server, boot, lambda: request(server.port, plain, "GET", f"{EST}/cacerts")
    )
    # 202 means "accepted for processing" (RFC 7030 §4.2.3): only enrollments can be accepted
    assert (cacerts.status, cacerts.headers["Retry-After"]) == (503, "30")  # type: ignore[attr-defined]
    assert server.state.peak_in_flight == 1


def test_busy_retry_after_is_spread_by_the_jitter(
    start_server: Start, dev_pki: DevPki, boot: ssl.SSLContext
) -> None:
    server = start_server(
        max_concurrent=1, response_delay_s=1.5, busy_retry_after_s=10, busy_retry_jitter_s=5
    )
    plain = client_context(dev_pki.directory)

    def many() -> list[int]:
        return [
            int(request(server.port, plain, "GET", f"{EST}/cacerts").headers["Retry-After"])
            for _ in range(12)
        ]

    waits = _while_busy(server, boot, many)
    assert isinstance(waits, list)
    assert all(10 <= wait <= 15 for wait in waits)
    # 12 draws from 6 values: all equal has probability 6 * (1/6)**12 < 3e-9
    assert len(set(waits)) > 1


def test_outage_file_refuses_everything_with_503(
    start_server: Start, dev_pki: DevPki, boot: ssl.SSLContext, tmp_path: Path
) -> None:
    down = tmp_path / "ca-down"
    log = tmp_path / "requests.jsonl"
    server = start_server(outage_file=down, outage_retry_after_s=600, request_log=log)
    assert _enroll(server, boot).status == 200
    down.touch()
    refused = _enroll(server, boot)
    assert (refused.status, refused.headers["Retry-After"]) == (503, "600")
    assert "CA unavailable" in refused.text
    plain = client_context(dev_pki.directory)
    assert request(server.port, plain, "GET", f"{EST}/cacerts").status == 503
    down.unlink()
    assert _enroll(server, boot).status == 200
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(e["path"], e["status"]) for e in lines] == [
        (f"{EST}/simpleenroll", 200),
        (f"{EST}/simpleenroll", 503),
        (f"{EST}/cacerts", 503),
        (f"{EST}/simpleenroll", 200),
    ]
    # an answered enrollment was in flight while it was answered; a refused request was not
    assert [e["in_flight"] for e in lines] == [1, 0, 0, 1]
    assert all(e["t"] > 1.7e9 and e["method"] in ("GET", "POST") for e in lines)


def test_outage_window_after_start(
    start_server: Start, dev_pki: DevPki, boot: ssl.SSLContext
) -> None:
    started = time.monotonic()
    server = start_server(outage=(0.0, 1.0), outage_retry_after_s=5)
    plain = client_context(dev_pki.directory)
    during = request(server.port, plain, "GET", f"{EST}/cacerts")
    in_window = time.monotonic() - started < 1.0
    while time.monotonic() - started < 1.2:
        time.sleep(0.05)
    after = request(server.port, plain, "GET", f"{EST}/cacerts")
    if in_window:  # (a machine that took > 1 s for one request saw the window end already)
        assert (during.status, during.headers["Retry-After"]) == (503, "5")
    assert after.status == 200


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--outage", "10"], "not AFTER:FOR"),
        (["--busy-status", "500"], "invalid choice"),
    ],
)
def test_bad_load_options_are_refused(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as caught:
        build_parser().parse_args(["serve", "--pki", "x", *argv])
    assert caught.value.code == 64
    assert message in capsys.readouterr().err


def test_load_options_from_the_command_line() -> None:
    args = build_parser().parse_args(
        ["serve", "--pki", "x", "--max-concurrent", "8", "--busy-status", "202",
         "--busy-retry-after", "1m", "--busy-retry-jitter", "30s", "--outage", "1h:30m",
         "--outage-file", "/run/ca-down", "--outage-retry-after", "10m",
         "--request-log", "/tmp/r.jsonl"]
    )  # fmt: skip
    config = config_from_args(args)
    assert (config.max_concurrent, config.busy_status) == (8, 202)
    assert (config.busy_retry_after_s, config.busy_retry_jitter_s) == (60, 30)
    assert config.outage == (3600.0, 1800.0)
    assert config.outage_file == Path("/run/ca-down")
    assert config.outage_retry_after_s == 600
    assert config.request_log == Path("/tmp/r.jsonl")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"busy_status": 500}, "--busy-status must be 202 or 503, got 500"),
        ({"busy_retry_jitter_s": -1}, "must not be negative"),
        ({"outage": (5.0, 0.0)}, "--outage AFTER:FOR needs"),
        ({"outage": (-1.0, 5.0)}, "--outage AFTER:FOR needs"),
    ],
)
def test_bad_load_config(tmp_path: Path, changes: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ServerConfig(pki_dir=tmp_path, **changes)  # type: ignore[arg-type]
