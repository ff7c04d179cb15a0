from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from est_agent.workflow.hoststate import (
    ActiveCache,
    HostState,
    Pending,
    load_host_state,
    save_host_state,
)
from est_agent.workflow.renewal import is_expired, renewal_due_at, should_renew

T0 = datetime(2026, 1, 1, tzinfo=UTC)
T1 = T0 + timedelta(days=90)


@pytest.mark.parametrize(
    ("days", "due"), [(0, False), (59, False), (60, False), (60.4, True), (89, True), (91, True)]
)
def test_two_thirds_of_the_lifetime(days: float, due: bool) -> None:
    now = T0 + timedelta(days=days)
    assert should_renew(T0, T1, now, threshold=0.67) is due


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


def test_threshold_validated() -> None:
    with pytest.raises(ValueError):
        renewal_due_at(T0, T1, threshold=1.0)


def test_expiry() -> None:
    assert not is_expired(T1, T1 - timedelta(seconds=1))
    assert is_expired(T1, T1)


def test_host_state_round_trip(tmp_path: Path) -> None:
    state = HostState(
        active=ActiveCache(1, 4, "ab" * 32, "1F", "CN=x", T0, T1),
        pending=Pending("simplereenroll", 0, "04" + "00" * 64, T1, T0),
    )
    save_host_state(tmp_path / "st", state)
    assert load_host_state(tmp_path / "st") == state
    assert not list((tmp_path / "st").glob(".state-*"))  # no temp file left behind


@pytest.mark.parametrize(
    "content", ["", "{", '{"format": 99}', '{"format": 1, "active": {"slot": 1}}']
)
def test_damaged_host_state_is_ignored(tmp_path: Path, content: str) -> None:
    (tmp_path / "state.json").write_text(content)
    assert load_host_state(tmp_path) == HostState()
    assert load_host_state(tmp_path / "missing") == HostState()
