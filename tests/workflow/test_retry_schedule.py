"""Issue 12 item 5: after a failed renewal, the next attempt waits on a schedule kept in the host
state (workflow/renewal.py), against the EST test server over real TLS with the keys in the
virtual SIM. The agent's clock is injected (days pass at once); the server and the issued
certificates keep real time. In-run retry waits go to a list instead of sleeping.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

import pytest

from est_agent.config import load_config
from est_agent.errors import EstConnectionError
from est_agent.est.client import EstClient
from est_agent.testserver import DevPki, EstTestServer
from est_agent.testserver.config import Fault, Profile
from est_agent.workflow.agent import Agent
from est_agent.workflow.result import Outcome
from tests.conftest import Run
from tests.workflow.conftest import Device
from tests.workflow.test_enroll_renew import FakeClock

pytestmark = pytest.mark.integration

HOUR = timedelta(hours=1)
REENROLL_ONLY = frozenset({"simplereenroll"})
#: attempts one run makes at a 5xx (est/client.py RetryPolicy.attempts)
ATTEMPTS_PER_RUN = 4


class TimedDevice:
    """The device of one test: a fresh agent per run (as the timer starts a new process)."""

    def __init__(self, device: Device, clock: FakeClock) -> None:
        self.device = device
        self.clock = clock
        self.sleeps: list[float] = []

    def _client(self, *args: Any, **kwargs: Any) -> EstClient:
        kwargs["retry"] = replace(kwargs["retry"], sleep=self.sleeps.append)
        return EstClient(*args, **kwargs)

    def agent(self) -> Agent:
        return Agent(load_config(self.device.config), clock=self.clock, client_factory=self._client)

    def retry(self) -> dict[str, Any] | None:
        record: dict[str, Any] | None = json.loads(
            (self.device.state_dir / "state.json").read_text()
        )["retry"]
        return record


def _enrolled_and_due(
    device: Device,
    start_server: Callable[..., EstTestServer],
    dev_pki: DevPki,
    fault_times: int,
    **config: str,
) -> tuple[EstTestServer, TimedDevice]:
    server = start_server(
        default_profile=Profile(validity_s=30 * 86400),
        fault=Fault.HTTP_500,
        fault_times=fault_times,
        fault_operations=REENROLL_ONLY,
    )
    device.write_config(server, dev_pki, **config)
    dev = TimedDevice(device, FakeClock())
    assert dev.agent().enroll().outcome == Outcome.ENROLLED
    dev.clock.advance(days=21)  # past 2/3 of the 30-day lifetime: due, 9 days left
    return server, dev


def test_failed_renewals_wait_on_the_schedule_then_renew_when_the_server_is_back(
    device: Device, start_server: Callable[..., EstTestServer], dev_pki: DevPki
) -> None:
    started = time.monotonic()
    # the server answers 500 to the first 3 runs' re-enrollments (4 attempts each), then works
    server, dev = _enrolled_and_due(device, start_server, dev_pki, 3 * ATTEMPTS_PER_RUN)

    failed_1 = dev.clock.now
    with pytest.raises(EstConnectionError) as caught:
        dev.agent().run()
    assert caught.value.exit_code == 69
    # 9 days left, a tenth is 21.6 h: the first wait is the 1 h floor
    # keyed to the credential being renewed (its record hash, as the cache of the active slot)
    active_sha256 = json.loads((device.state_dir / "state.json").read_text())["active"]["sha256"]
    assert dev.retry() == {
        "sha256": active_sha256,
        "failures": 1,
        "error": "EstConnectionError",
        "exit_code": 69,
        "failed_at": failed_1.isoformat(),
        "next_at": (failed_1 + HOUR).isoformat(),
    }
    asked = len(server.requests)

    # runs before the next attempt time: no request, exit 0 saying when (fast path and full read)
    dev.clock.advance(minutes=59)
    for use_cache in (True, False):
        result = dev.agent().run(use_cache=use_cache)
        assert result.outcome == Outcome.RETRY_LATER, use_cache
        assert result.next_attempt_at == failed_1 + HOUR
    assert len(server.requests) == asked
    status = dev.agent().status()
    assert status.retry == {
        "failures": 1,
        "last_error": "EstConnectionError",
        "exit_code": 69,
        "failed_at": failed_1.isoformat(),
        "next_attempt_at": (failed_1 + HOUR).isoformat(),
    }
    assert status.to_json()["retry"] == status.retry

    # at the time: tried again, fails again, the wait doubles
    dev.clock.advance(minutes=1)
    failed_2 = dev.clock.now
    with pytest.raises(EstConnectionError):
        dev.agent().run()
    assert len(server.requests) > asked
    retry = dev.retry()
    assert retry is not None
    assert (retry["failures"], retry["next_at"]) == (2, (failed_2 + 2 * HOUR).isoformat())
    dev.clock.advance(hours=1)
    assert dev.agent().run().outcome == Outcome.RETRY_LATER

    # renew --force ignores the schedule (and its failure counts too: 4 h next)
    failed_3 = dev.clock.now
    with pytest.raises(EstConnectionError):
        dev.agent().renew(force=True)
    retry = dev.retry()
    assert retry is not None
    assert (retry["failures"], retry["next_at"]) == (3, (failed_3 + 4 * HOUR).isoformat())

    # the server is healthy again; the run at the next attempt time renews and clears the record
    dev.clock.advance(hours=3, minutes=59)
    assert dev.agent().run().outcome == Outcome.RETRY_LATER
    dev.clock.advance(minutes=1)
    assert dev.agent().run().outcome == Outcome.RENEWED
    assert dev.retry() is None
    assert dev.agent().status().retry is None
    log = [json.loads(x) for x in server.config.issuance_log.read_text().splitlines()]
    answered = [(entry["operation"], entry.get("fault")) for entry in log]
    # three failed runs of 4 attempts each, nothing between them, then one renewal
    assert answered == [
        ("simpleenroll", None),
        *[("simplereenroll", "http-500")] * (3 * ATTEMPTS_PER_RUN),
        ("simplereenroll", None),
    ]
    assert len(dev.sleeps) == 3 * (ATTEMPTS_PER_RUN - 1)  # in-run backoff, not slept here
    elapsed = time.monotonic() - started
    assert elapsed < 60, elapsed


def test_a_damaged_host_state_does_not_delay_the_renewal(
    device: Device, start_server: Callable[..., EstTestServer], dev_pki: DevPki
) -> None:
    _, dev = _enrolled_and_due(device, start_server, dev_pki, ATTEMPTS_PER_RUN)
    with pytest.raises(EstConnectionError):
        dev.agent().run()
    assert dev.retry() is not None
    # the cache is unreadable: unknown, and not a reason to wait (the SIM decides)
    (device.state_dir / "state.json").write_text('{"format": 3, "retry": [1]}')
    assert dev.agent().run().outcome == Outcome.RENEWED
    assert dev.retry() is None


def test_a_far_future_retry_time_waits_at_most_the_cap(
    device: Device, start_server: Callable[..., EstTestServer], dev_pki: DevPki
) -> None:
    _, dev = _enrolled_and_due(device, start_server, dev_pki, ATTEMPTS_PER_RUN)
    failed = dev.clock.now
    with pytest.raises(EstConnectionError):
        dev.agent().run()
    path = device.state_dir / "state.json"
    state = json.loads(path.read_text())
    state["retry"]["next_at"] = "2999-01-01T00:00:00+00:00"
    path.write_text(json.dumps(state))
    dev.clock.advance(hours=23)
    result = dev.agent().run()
    assert result.outcome == Outcome.RETRY_LATER
    assert result.next_attempt_at == failed + timedelta(days=1)  # renewal.retry_cap_s
    dev.clock.advance(hours=1)
    assert dev.agent().run().outcome == Outcome.RENEWED


def test_an_expired_certificate_never_waits_for_a_retry(
    device: Device, start_server: Callable[..., EstTestServer], dev_pki: DevPki
) -> None:
    # a 30-day cap, and a record asking to wait almost that long: still honoured while the
    # certificate is valid, but at expiry the bootstrap credential enrolls at once
    _, dev = _enrolled_and_due(
        device, start_server, dev_pki, ATTEMPTS_PER_RUN, renewal__retry_cap_s=str(30 * 86400)
    )
    failed = dev.clock.now
    with pytest.raises(EstConnectionError):
        dev.agent().run()
    path = device.state_dir / "state.json"
    state = json.loads(path.read_text())
    state["retry"]["next_at"] = (failed + timedelta(days=29)).isoformat()
    path.write_text(json.dumps(state))
    dev.clock.advance(days=8)  # 1 day left
    assert dev.agent().run().outcome == Outcome.RETRY_LATER
    dev.clock.advance(days=1, minutes=1)  # expired (the server's real clock: +30 days)
    status = dev.agent().status()
    assert status.retry is not None and status.retry["next_attempt_at"] is None
    # the fast path (which would answer "retry later" from the cache) must let it through
    assert dev.agent().run(use_cache=True).outcome == Outcome.ENROLLED
    assert dev.retry() is None


def test_run_and_status_on_the_command_line(
    device: Device, start_server: Callable[..., EstTestServer], dev_pki: DevPki, cli: Run
) -> None:
    # real time here: a 10-minute certificate due after 0.1 % of its life, one bad answer
    server = start_server(
        default_profile=Profile(validity_s=600),
        fault=Fault.GARBAGE_BASE64,
        fault_times=1,
        fault_operations=REENROLL_ONLY,
    )
    device.write_config(server, dev_pki, renewal__threshold="0.001")
    config = str(device.config)
    assert cli("enroll", "--config", config)[0] == 0
    time.sleep(1.1)  # due
    code, _, err = cli("run", "--config", config)
    assert code == 76 and "EstResponseError" in err, err
    asked = len(server.requests)

    started = time.monotonic()
    code, out, err = cli("run", "--config", config, "--json")
    elapsed = time.monotonic() - started
    assert code == 0, err
    result = json.loads(out)
    assert result["outcome"] == "retry-later"
    # less than the 1 h floor is left: the next attempt is at expiry
    assert datetime.fromisoformat(result["next_attempt_at"]) == datetime.fromisoformat(
        result["not_after"]
    )
    assert len(server.requests) == asked  # no network
    assert elapsed < 5, elapsed
    code, out, _ = cli("run", "--config", config)
    assert code == 0
    assert "renewal due; waiting after a failed attempt" in out and "next try" in out

    code, out, _ = cli("status", "--config", config)
    assert code == 0
    assert "retry:       1 failed attempt(s), last EstResponseError (exit 76)" in out
    code, out, _ = cli("status", "--config", config, "--json")
    retry = json.loads(out)["retry"]
    assert (retry["failures"], retry["last_error"], retry["exit_code"]) == (
        1,
        "EstResponseError",
        76,
    )
    assert retry["next_attempt_at"] == result["next_attempt_at"]

    code, out, err = cli("renew", "--force", "--config", config, "--json")
    assert code == 0 and json.loads(out)["outcome"] == "renewed", err
    code, out, _ = cli("status", "--config", config, "--json")
    assert json.loads(out)["retry"] is None
