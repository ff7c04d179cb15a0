"""`est-testserver serve` as a separate process on 127.0.0.1, for demos and benchmarks.

Tests use the in-process `EstTestServer`; a demo or a benchmark wants the server out of its
own process (its CPU and memory are not the client's), started and stopped around a block.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from est_agent.errors import EstConnectionError

__all__ = ["RunningServer", "running_test_server"]


@dataclass(frozen=True)
class RunningServer:
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}/.well-known/est"


@contextmanager
def running_test_server(
    pki_dir: Path, workdir: Path, *extra_args: str, timeout_s: float = 20.0
) -> Iterator[RunningServer]:
    """Serve the dev PKI in ``pki_dir`` on a free 127.0.0.1 port until the block ends."""
    workdir.mkdir(parents=True, exist_ok=True)
    port_file = workdir / "est-server.port"
    port_file.unlink(missing_ok=True)
    log_path = workdir / "est-server.log"
    argv = [
        sys.executable, "-m", "est_agent.testserver.cli", "serve", "--pki", str(pki_dir),
        "--listen", "127.0.0.1:0", "--port-file", str(port_file), "--quiet", *extra_args,
    ]  # fmt: skip
    with log_path.open("wb") as log:
        server = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    try:
        deadline = time.monotonic() + timeout_s
        while not port_file.exists() or not port_file.read_text().strip():
            if server.poll() is not None or time.monotonic() > deadline:
                raise EstConnectionError(
                    f"est-testserver did not start: {log_path.read_text(errors='replace')[-500:]}"
                )
            time.sleep(0.02)
        yield RunningServer(int(port_file.read_text().strip()), log_path)
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
