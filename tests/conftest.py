"""Fixtures shared by every test package: a throwaway dev PKI and in-process EST test servers.

`sim:` readers are registered for the whole session (as the CLI does at startup): the tests
open them through the library API (Agent, open_transport), and the runtime core never imports
the virtual SIM to know the scheme.

Servers are `EstTestServer` instances on 127.0.0.1 and a free port (the same code as
`est-testserver serve`), stopped after each test. Keys are generated per session, never stored.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import est_agent.sim
from est_agent.testserver import DevPki, EstTestServer, ServerConfig, generate_dev_pki, load_dev_pki

#: the ``cli`` fixture: ``est-agent`` in this process, its exit code, stdout and stderr
Run = Callable[..., tuple[int, str, str]]


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Run:
    """Run ``est-agent ARGV...`` in this process (``cli.main.main``): (exit code, out, err)."""
    from est_agent.cli.main import main

    def run(*argv: str) -> tuple[int, str, str]:
        code = main(list(argv))
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture(scope="session", autouse=True)
def sim_reader_scheme() -> None:
    est_agent.sim.register()


@pytest.fixture(scope="session")
def dev_pki(tmp_path_factory: pytest.TempPathFactory) -> DevPki:
    directory = tmp_path_factory.mktemp("pki")
    generate_dev_pki(directory)
    return load_dev_pki(directory)


@pytest.fixture
def issuance_log(tmp_path: Path) -> Path:
    return tmp_path / "issuance.jsonl"


@pytest.fixture
def start_server(dev_pki: DevPki, issuance_log: Path) -> Iterator[Callable[..., EstTestServer]]:
    """Start an in-process server on 127.0.0.1 and a free port with the given settings."""
    servers: list[EstTestServer] = []

    def start(*, pki: DevPki | None = None, **settings: Any) -> EstTestServer:
        # the first server logs to the `issuance_log` fixture's path, later ones beside it;
        # `pki`: another PKI than the session's dev PKI (e.g. one made with libest's profile)
        pki = pki or dev_pki
        log = issuance_log.with_name(f"issuance-{len(servers)}.jsonl") if servers else issuance_log
        settings.setdefault("issuance_log", log)
        config = ServerConfig(pki_dir=pki.directory, host="127.0.0.1", port=0, **settings)
        server = EstTestServer(config, pki=pki)
        server.quiet()
        servers.append(server.start())
        return server

    yield start
    for server in servers:
        server.close()


# --- hostile files shared by the file-reading tests (fileio, config, sim state, cli) ---------

#: a FIFO reader that blocks is released after this long, so it fails its time bound, not hangs
FIFO_RELEASE_S = 3.0


@pytest.fixture
def fifo(tmp_path: Path) -> Iterator[Path]:
    """A FIFO nobody writes to. Should a regression block on it, a writer opens and closes it
    after FIFO_RELEASE_S, so the test fails on its time bound instead of hanging the suite."""
    path = tmp_path / "fifo"
    os.mkfifo(path)
    done = threading.Event()

    def release() -> None:
        if not done.wait(FIFO_RELEASE_S):
            os.close(os.open(path, os.O_RDWR))  # a writer appears and leaves: EOF

    watchdog = threading.Thread(target=release, daemon=True)
    watchdog.start()
    yield path
    done.set()
    watchdog.join()


@pytest.fixture
def sparse_2gib(tmp_path: Path) -> Path:
    """A 2 GiB file of zeros that takes no disk blocks."""
    path = tmp_path / "huge"
    with path.open("wb") as handle:
        handle.truncate(2 * 1024**3)
    return path
