"""``openssl s_server`` for one TLS 1.3 connection: an independent peer for the tlslite path."""

from __future__ import annotations

import contextlib
import re
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from est_agent.testserver import DevPki

#: s_server's client-certificate switches: required (-Verify), requested (-verify), none
CLIENT_AUTH = {"required": ["-Verify", "1"], "requested": ["-verify", "1"], "none": []}


@dataclass
class OpenSslServer:
    port: int
    output: Path

    def keying_material(self) -> bytes:
        match = re.search(r"Keying material: ([0-9A-F]+)", self.output.read_text())
        assert match, self.output.read_text()
        return bytes.fromhex(match.group(1))


@contextlib.contextmanager
def s_server(
    pki: DevPki, tmp_path: Path, suite: str, auth: str, extra: Sequence[str] = ()
) -> Iterator[OpenSslServer]:
    """``openssl s_server`` on 127.0.0.1 and a free port, for one connection: TLS 1.3 with
    ``suite``, or TLS 1.2 alone when ``suite`` is ``"tls1.2"``; ``extra``: further switches."""
    output = tmp_path / f"s_server-{suite}-{auth}.txt"
    argv = [
        "openssl", "s_server", "-accept", "127.0.0.1:0", "-naccept", "1",
        *(["-tls1_2"] if suite == "tls1.2" else ["-tls1_3", "-ciphersuites", suite]),
        "-num_tickets", "0",
        "-cert", str(pki.server_cert_path), "-key", str(pki.server_key_path),
        "-CAfile", str(pki.directory / "bootstrap-ca.pem"), *CLIENT_AUTH[auth],
        *extra,
    ]  # fmt: skip
    with output.open("wb") as out:
        process = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.PIPE
        )
    try:
        deadline = time.monotonic() + 10
        while not (found := re.search(r"ACCEPT 127\.0\.0\.1:(\d+)", output.read_text())):
            assert process.poll() is None and time.monotonic() < deadline, output.read_text()
            time.sleep(0.02)
        yield OpenSslServer(int(found.group(1)), output)
        process.wait(timeout=10)  # -naccept 1: it leaves once our connection is closed
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        assert process.stdin is not None  # kept open: s_server reads commands from it
        process.stdin.close()
