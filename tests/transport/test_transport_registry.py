"""Reader schemes come from a registry: pcsc: and modem: from the transport package, sim: only
once est_agent.sim.register() ran (the CLI at startup; tests/conftest.py for the session)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from est_agent.errors import UsageError, exit_code_for
from est_agent.sim.transport import SimTransport
from est_agent.transport import CardTransport, open_transport, registry

REPO = Path(__file__).resolve().parents[2]


def _python(code: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    argv = [sys.executable, "-c", code]
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60, check=False)


def test_unknown_scheme_is_a_usage_error_naming_the_known_ones() -> None:
    with pytest.raises(UsageError) as info:
        open_transport("floppy:a")
    assert str(info.value) == "unknown reader type 'floppy' (expected pcsc:, modem: or sim:)"
    assert exit_code_for(info.value) == 64


def test_reader_without_scheme_shows_every_form() -> None:
    with pytest.raises(UsageError) as info:
        open_transport("Virtual PCD 00 00")
    assert str(info.value) == (
        "reader must be pcsc:[NAME], modem:PORT or sim:STATE_FILE, got 'Virtual PCD 00 00'"
    )


def test_a_registered_scheme_gets_the_rest_of_the_reader_string(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(registry, "_schemes", dict(registry._schemes))  # undone after the test
    built = SimTransport(tmp_path / "never-read.json")
    seen: list[str] = []

    def factory(rest: str) -> CardTransport:
        seen.append(rest)
        return built

    registry.register_reader_scheme("Bench-Double", factory, usage="bench-double:THING")
    assert open_transport("BENCH-double:a:b?timeout=1") is built
    assert seen == ["a:b?timeout=1"]  # everything after the first colon, untouched
    assert registry.reader_schemes()[-1] == "bench-double"
    with pytest.raises(UsageError, match=r"sim:STATE_FILE or bench-double:THING, got 'x'"):
        open_transport("x")


@pytest.mark.parametrize("name", ["", "1sim", "sim:", "s im", "sím"])
def test_a_scheme_name_follows_rfc3986(name: str) -> None:
    with pytest.raises(UsageError, match="reader scheme"):
        registry.register_reader_scheme(name, SimTransport.from_reader)


def test_registering_sim_again_keeps_one_entry() -> None:
    import est_agent.sim

    before = registry.reader_schemes()
    est_agent.sim.register()
    assert registry.reader_schemes() == before
    assert before.count("sim") == 1


@pytest.mark.integration
def test_the_runtime_core_neither_imports_nor_registers_the_virtual_sim() -> None:
    start = time.monotonic()
    result = _python(
        "import sys\n"
        "import est_agent.workflow.agent, est_agent.workflow.quick, est_agent.store\n"
        "from est_agent.transport import open_transport, reader_schemes\n"
        "print(','.join(reader_schemes()), 'est_agent.sim' in sys.modules)\n"
        "try:\n"
        "    open_transport('sim:/x.json')\n"
        "except Exception as exc:\n"
        "    print(type(exc).__name__, exc)\n"
    )
    assert time.monotonic() - start < 30
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "pcsc,modem False",
        "UsageError unknown reader type 'sim' (expected pcsc: or modem:)",
    ]


@pytest.mark.integration
def test_the_cli_registers_sim_readers_at_startup(tmp_path: Path) -> None:
    # A fresh process (no conftest): a missing state file is SimStateError (65), which only
    # the sim: factory can raise; an unregistered scheme would be UsageError (64).
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "est_agent", "card", "info", "--reader", f"sim:{tmp_path}/no.json"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=60,
        check=False,
    )
    assert time.monotonic() - start < 30
    assert result.returncode == 65, result.stderr
    assert result.stderr.endswith("[SimStateError]\n"), result.stderr
