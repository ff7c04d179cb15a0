"""workflow/cardwork.py: a card operation in a worker thread hands its result or its typed error
to the main thread, and a worker that does not finish is a bounded TransportError (exit 69)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from est_agent.errors import EX_UNAVAILABLE, NotFoundError, TransportError
from est_agent.workflow.cardwork import CardWork, apply_card_facts, learned_card_facts
from est_agent.workflow.hoststate import HostState, load_host_state, save_host_state


def test_the_result_comes_back_to_the_main_thread() -> None:
    seen: list[str] = []

    def work() -> int:
        seen.append(threading.current_thread().name)
        return 42

    assert CardWork(work, name="keygen", deadline_s=1.0).result() == 42
    assert seen == ["keygen"]  # it ran in the worker, not here


def test_the_workers_typed_error_is_raised_as_is() -> None:
    error = NotFoundError(0x6A82, "GENERATE KEY PAIR", "no such key")

    def work() -> int:
        raise error

    with pytest.raises(NotFoundError) as caught:
        CardWork(work, name="keygen", deadline_s=1.0).result()
    assert caught.value is error


def test_a_worker_past_its_deadline_is_a_bounded_transport_error() -> None:
    release = threading.Event()
    job = CardWork(release.wait, name="keygen in slot op-a", deadline_s=0.0, margin_s=0.2)
    started = time.monotonic()
    with pytest.raises(TransportError, match="keygen in slot op-a: the card did not finish") as e:
        job.result()
    elapsed = time.monotonic() - started
    release.set()
    assert e.value.exit_code == EX_UNAVAILABLE == 69
    assert 0.2 <= elapsed < 2.0
    assert job.wait()  # released: it ends


class _Backend:
    def __init__(self, refused: bool) -> None:
        self.implicit_channel = True
        self.implicit_channel_refused = refused


def test_card_facts_round_trip() -> None:
    backend = _Backend(refused=True)
    apply_card_facts(backend, HostState())
    assert backend.implicit_channel is True  # nothing known yet: ask the card
    learned = learned_card_facts(backend, HostState())
    assert learned == HostState(implicit_channel_refused=True)
    apply_card_facts(backend, learned)
    assert backend.implicit_channel is False
    assert learned_card_facts(backend, learned) is None  # nothing new to save
    assert learned_card_facts(_Backend(refused=False), HostState()) is None


def test_the_refusal_survives_the_host_state_file_and_older_files_read_as_not_refused(
    tmp_path: Path,
) -> None:
    save_host_state(tmp_path, HostState(implicit_channel_refused=True))
    raw = json.loads((tmp_path / "state.json").read_text())
    assert raw["format"] == 3 and raw["implicit_channel_refused"] is True
    assert load_host_state(tmp_path) == HostState(implicit_channel_refused=True)
    del raw["implicit_channel_refused"]  # a file written before issue 16
    (tmp_path / "state.json").write_text(json.dumps(raw))
    assert load_host_state(tmp_path) == HostState()
    raw["implicit_channel_refused"] = "yes"  # anything but true: ask the card again
    (tmp_path / "state.json").write_text(json.dumps(raw))
    assert load_host_state(tmp_path).implicit_channel_refused is False
