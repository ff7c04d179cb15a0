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
    load_host_state,
    save_host_state,
)
from est_agent.workflow.renewal import is_expired, renewal_due_at

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


def _full_state() -> HostState:
    return HostState(
        active=ActiveCache(1, 4, "ab" * 32, "1F", "CN=x", T0, T1, "cd" * 32),
        pending=Pending("simplereenroll", 0, "04" + "00" * 64, T1, T0),
        deployment=Deployment(1, 4, "ab" * 32, False, 3, T1, "hook exited 1"),
        installing=Installing(0, 5),
    )


def test_host_state_round_trip(tmp_path: Path) -> None:
    state = _full_state()
    save_host_state(tmp_path / "st", state)
    assert load_host_state(tmp_path / "st") == state
    assert not list((tmp_path / "st").glob(".state-*"))  # no temp file left behind


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
    # the baseline for the damaged variants below: the same text without the damage is used
    (tmp_path / "state.json").write_text(json.dumps(_good_json()))
    state = load_host_state(tmp_path)
    assert state.active is not None and state.active.serial == "1F"


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
