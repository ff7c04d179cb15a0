from __future__ import annotations

import json
import os
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from est_agent.errors import ConfigError, StoreError
from est_agent.workflow.hoststate import (
    ActiveCache,
    Deployment,
    HostState,
    Installing,
    Pending,
    Retry,
    load_host_state,
    save_host_state,
)
from est_agent.workflow.renewal import (
    is_expired,
    next_attempt_at,
    renewal_due_at,
    retry_not_before,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)
T1 = T0 + timedelta(days=90)


@pytest.mark.parametrize(
    ("days", "due"), [(0, False), (59, False), (60, False), (60.4, True), (89, True), (91, True)]
)
def test_two_thirds_of_the_lifetime(days: float, due: bool) -> None:
    now = T0 + timedelta(days=days)
    assert (now >= renewal_due_at(T0, T1, threshold=0.67)) is due


def test_due_at_the_threshold_of_the_lifetime() -> None:
    # 0.67 x 90 days = 60.3 days, no jitter
    assert renewal_due_at(T0, T1, threshold=0.67) == T0 + timedelta(days=60, hours=7, minutes=12)


def test_jitter_is_deterministic_spread_and_bounded() -> None:
    base = renewal_due_at(T0, T1, threshold=0.67)
    dues = {renewal_due_at(T0, T1, threshold=0.67, jitter_s=3600, serial=s) for s in range(50)}
    assert len(dues) == 50  # spread across the fleet
    assert all(base <= d <= base + timedelta(hours=1) for d in dues)
    assert renewal_due_at(T0, T1, threshold=0.67, jitter_s=3600, serial=7) == renewal_due_at(
        T0, T1, threshold=0.67, jitter_s=3600, serial=7
    )
    # a huge jitter never pushes renewal past 90 % of the lifetime
    late = renewal_due_at(T0, T1, threshold=0.67, jitter_s=10**9, serial=3)
    assert late <= T0 + (T1 - T0) * 0.9


@pytest.mark.parametrize("threshold", [0.0, 1.0, -0.5, float("nan")])
def test_threshold_validated(threshold: float) -> None:
    with pytest.raises(ConfigError, match=r"^renewal\.threshold: expected 0 < threshold < 1"):
        renewal_due_at(T0, T1, threshold=threshold)


def test_expiry() -> None:
    assert not is_expired(T1, T1 - timedelta(seconds=1))
    assert is_expired(T1, T1)


# --- the retry schedule after a failed renewal (workflow/renewal.py) -------------------------

H = 3600.0
DAY = 86400.0
F = T0 + timedelta(days=60)  # when the attempt failed


@pytest.mark.parametrize(
    ("left_s", "failures", "cap_s", "wait_s"),
    [
        # 30 days left (a tenth: 3 days): 1 h doubling per failure, then the 1-day cap
        (30 * DAY, 1, DAY, 1 * H),
        (30 * DAY, 2, DAY, 2 * H),
        (30 * DAY, 3, DAY, 4 * H),
        (30 * DAY, 5, DAY, 16 * H),
        (30 * DAY, 6, DAY, 24 * H),
        (30 * DAY, 10**9, DAY, 24 * H),  # no overflow, still the cap
        (30 * DAY, 0, DAY, 1 * H),  # "no failure" is read as the first
        # 5 days left (a tenth: 12 h): the doubling stops at a tenth of the time left
        (5 * DAY, 1, DAY, 1 * H),
        (5 * DAY, 4, DAY, 8 * H),
        (5 * DAY, 5, DAY, 12 * H),
        (5 * DAY, 20, DAY, 12 * H),
        # 5 hours left (a tenth: 30 min): never closer than the 1 h floor
        (5 * H, 1, DAY, 1 * H),
        (5 * H, 7, DAY, 1 * H),
        # less than the floor left: the next attempt is at expiry (then: bootstrap, no wait)
        (1800.0, 1, DAY, 1800.0),
        (1800.0, 3, DAY, 1800.0),
        (0.0, 1, DAY, 0.0),
        (-DAY, 2, DAY, 0.0),
        # the configured cap bounds it, even below the floor
        (30 * DAY, 3, 2 * H, 2 * H),
        (30 * DAY, 1, 1800.0, 1800.0),
        (30 * DAY, 8, 1800.0, 1800.0),
        (400 * DAY, 30, 30 * DAY, 30 * DAY),
    ],
)
def test_next_attempt_schedule(left_s: float, failures: int, cap_s: float, wait_s: float) -> None:
    not_after = F + timedelta(seconds=left_s)
    got = next_attempt_at(F, not_after, failures, cap_s=cap_s)
    assert got == F + timedelta(seconds=wait_s)


@pytest.mark.parametrize(
    ("next_after_s", "now_after_s", "cap_s", "waits_until_s"),
    [
        (H, 0.0, DAY, H),
        (H, H - 1, DAY, H),
        (H, H, DAY, None),  # the time has come
        (H, 2 * H, DAY, None),
        (H, -1.0, DAY, None),  # a failure "in the future": the clock went back; not trusted
        (30 * DAY, 2 * H, DAY, DAY),  # a wait beyond the cap (damaged record): cut to the cap
        (30 * DAY, DAY, DAY, None),
        (H, 300.0, 600.0, 600.0),  # the cap was lowered since the failure
    ],
)
def test_a_recorded_retry_time_never_holds_a_renewal_off_past_the_cap(
    next_after_s: float, now_after_s: float, cap_s: float, waits_until_s: float | None
) -> None:
    got = retry_not_before(
        F,
        F + timedelta(seconds=next_after_s),
        F + timedelta(seconds=now_after_s),
        cap_s=cap_s,
    )
    assert got == (None if waits_until_s is None else F + timedelta(seconds=waits_until_s))


# --- the host state file ----------------------------------------------------------------------


def _full_state() -> HostState:
    return HostState(
        active=ActiveCache(1, 4, "ab" * 32, "1F", "CN=x", T0, T1, "cd" * 32),
        pending=Pending("simplereenroll", 0, "04" + "00" * 64, T1, T0),
        deployment=Deployment(1, 4, "ab" * 32, False, 3, T1, "hook exited 1"),
        installing=Installing(0, 5),
        retry=Retry("ab" * 32, 2, "EstConnectionError", 69, F, F + timedelta(hours=2)),
    )


def test_host_state_round_trip(tmp_path: Path) -> None:
    state = _full_state()
    save_host_state(tmp_path / "st", state)
    assert load_host_state(tmp_path / "st") == state
    assert json.loads((tmp_path / "st" / "state.json").read_text())["format"] == 3
    assert not list((tmp_path / "st").glob(".state-*"))  # no temp file left behind


def test_a_first_enrollment_failure_round_trips_without_a_wait(tmp_path: Path) -> None:
    state = HostState(retry=Retry("", 1, "AuthError", 77, F, None))
    save_host_state(tmp_path, state)
    assert load_host_state(tmp_path) == state


def _good_json() -> dict[str, object]:
    return {
        "format": 2,
        "active": {
            "slot": 1,
            "sequence": 4,
            "sha256": "ab" * 32,
            "serial": "1F",
            "subject": "CN=x",
            "not_before": T0.isoformat(),
            "not_after": T1.isoformat(),
            "public_key_sha256": "cd" * 32,
        },
        "pending": None,
        "deployment": None,
        "installing": None,
    }


def test_the_good_json_is_read(tmp_path: Path) -> None:
    # the baseline for the damaged variants below: the same text without the damage is used.
    # It is format 2 (before the retry record): still read.
    (tmp_path / "state.json").write_text(json.dumps(_good_json()))
    state = load_host_state(tmp_path)
    assert state.active is not None and state.active.serial == "1F"
    assert state.retry is None


def _good_retry() -> dict[str, object]:
    return {
        "sha256": "ab" * 32,
        "failures": 3,
        "error": "EstConnectionError",
        "exit_code": 69,
        "failed_at": F.isoformat(),
        "next_at": (F + timedelta(hours=4)).isoformat(),
    }


def test_the_good_retry_json_is_read(tmp_path: Path) -> None:
    data = {**_good_json(), "format": 3, "retry": _good_retry()}
    (tmp_path / "state.json").write_text(json.dumps(data))
    assert load_host_state(tmp_path).retry == Retry(
        "ab" * 32, 3, "EstConnectionError", 69, F, F + timedelta(hours=4)
    )


@pytest.mark.parametrize(
    "damage",
    [
        {"failures": 0},
        {"failures": "3"},
        {"failures": True},
        {"exit_code": 300},
        {"sha256": "xyz"},
        {"sha256": "ab"},
        {"error": 69},
        {"failed_at": "2026-03-01T00:00:00"},  # no time zone
        {"next_at": "tomorrow"},
        {"next_at": 86400},
    ],
    ids=str,
)
def test_a_damaged_retry_record_delays_nothing(tmp_path: Path, damage: dict[str, object]) -> None:
    # Unknown is not empty, but here "unknown" must not mean "wait": the whole cache is dropped,
    # the next run reads the SIM and renews if due (the SIM is authoritative).
    data = {**_good_json(), "format": 3, "retry": {**_good_retry(), **damage}}
    (tmp_path / "state.json").write_text(json.dumps(data))
    assert load_host_state(tmp_path) == HostState()


def test_an_unknown_future_format_is_ignored(tmp_path: Path) -> None:
    data = {**_good_json(), "format": 4, "retry": _good_retry()}
    (tmp_path / "state.json").write_text(json.dumps(data))
    assert load_host_state(tmp_path) == HostState()


def _damaged(**changes: object) -> str:
    data = _good_json()
    active = dict(data["active"])  # type: ignore[call-overload]
    for key, value in changes.items():
        if key in active:
            active[key] = value
        else:
            data[key] = value
    data["active"] = active
    return json.dumps(data)


@pytest.mark.parametrize(
    "content",
    [
        "",
        "{",
        "[1, 2, 3]",
        '"a string"',
        "null",
        '{"format": 99}',
        '{"format": 1, "active": {"slot": 1}}',
        '{"format": 2, "active": {"slot": 1}}',
        "[" * 100_000 + "]" * 100_000,
        _damaged(serial="not-hex"),
        _damaged(sha256="ab"),
        _damaged(slot=-1),
        _damaged(slot=True),
        _damaged(sequence="4"),
        _damaged(not_after="yesterday"),
        _damaged(not_after="2026-01-01T00:00:00"),  # no time zone
        _damaged(public_key_sha256=None),
        _damaged(pending=[1]),
        _damaged(deployment={"slot": 0}),
    ],
    ids=lambda c: c[:40],
)
def test_damaged_host_state_is_ignored(tmp_path: Path, content: str) -> None:
    (tmp_path / "state.json").write_text(content)
    assert load_host_state(tmp_path) == HostState()
    assert load_host_state(tmp_path / "missing") == HostState()


def test_a_directory_or_fifo_in_place_of_the_state_is_ignored(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "state.json").mkdir()
    assert load_host_state(tmp_path / "d") == HostState()
    (tmp_path / "f").mkdir()
    os.mkfifo(tmp_path / "f" / "state.json")
    started = time.monotonic()
    assert load_host_state(tmp_path / "f") == HostState()  # no writer: must not block
    assert time.monotonic() - started < 1.0
    (tmp_path / "big").mkdir()
    with open(tmp_path / "big" / "state.json", "wb") as handle:
        handle.truncate(1 << 30)  # sparse: no disk cost
    assert load_host_state(tmp_path / "big") == HostState()


def test_saving_where_it_cannot_be_written_is_a_store_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match="cannot write agent state"):
        save_host_state(tmp_path / "file" / "state", _full_state())
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "state.json").mkdir()
    with pytest.raises(StoreError, match="cannot write agent state"):
        save_host_state(tmp_path / "d", _full_state())
    assert not list((tmp_path / "d").glob(".state-*"))
