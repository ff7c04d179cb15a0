"""Issue 9, bounded time: a server asking for a wait longer than a run may take.

A `/cacerts` 503 with `Retry-After: 300` kept one run alive for 900 s (the unit's
TimeoutStartSec). Now the run ends at once with 75, stores when to try again, and the next run
before that time exits 75 without network or card signatures; after it, the run proceeds.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime

import pytest

from est_agent.testserver import DevPki
from tests.conftest import Run
from tests.est.hostile import Answer, HostileServer, Request, http_response
from tests.workflow.conftest import Device

pytestmark = pytest.mark.integration


def test_long_retry_after_on_cacerts_is_stored_and_honoured(
    device: Device, dev_pki: DevPki, cli: Run
) -> None:
    def busy(_request: Request) -> Answer:
        return Answer(http_response(503, b"busy", {"Retry-After": "300"}))

    with HostileServer(dev_pki, busy) as server:
        device.write_config(server, dev_pki)  # type: ignore[arg-type]
        started = time.monotonic()
        code, out, err = cli("enroll", "--config", str(device.config))
        elapsed = time.monotonic() - started
        assert code == 75, err
        assert elapsed < 3.0, elapsed  # nothing waited for the 300 s inside the run
        assert "300" in err and "[EnrollmentPending]" in err
        pending = json.loads((device.state_dir / "state.json").read_text())["pending"]
        assert pending["operation"] == "simpleenroll" and pending["public_key"] == ""
        wait = datetime.fromisoformat(pending["retry_at"]) - datetime.now(UTC)
        assert 290 < wait.total_seconds() <= 300
        asked = len(server.requests)
        assert asked == 1  # /cacerts, once

        # the next run (the timer) before the time: 75 at once, no request, no key made
        started = time.monotonic()
        code, _, err = cli("run", "--config", str(device.config), "--json")
        assert code == 75, err
        assert time.monotonic() - started < 2.0
        assert len(server.requests) == asked
        code, out, _ = cli("status", "--config", str(device.config), "--json")
        status = json.loads(out)
        assert status["pending"]["operation"] == "simpleenroll"
        assert {s["status"] for s in status["slots"]} == {"empty"}  # no key, nothing written
