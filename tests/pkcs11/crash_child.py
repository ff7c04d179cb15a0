"""Child process of test_token_crash.py: ``renew --force`` through the configured token, killed
with SIGKILL just before its PKCS#11 call number ``K`` (0: not killed; prints the calls made)."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

from est_agent.backends.base import CredentialBackend
from est_agent.backends.pkcs11 import Pkcs11Backend
from est_agent.config import Config, load_config
from est_agent.workflow.agent import Agent
from est_agent.workflow.session import backend_opener


def main() -> None:
    config_path, kill_at = Path(sys.argv[1]), int(sys.argv[2])
    calls: list[str] = []
    base = backend_opener()

    @contextlib.contextmanager
    def open_backend(config: Config) -> Iterator[CredentialBackend]:
        with base(config) as backend:
            assert isinstance(backend, Pkcs11Backend)

            def hook(what: str) -> None:
                calls.append(what)
                if len(calls) == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)

            backend.before_call = hook
            yield backend

    Agent(load_config(config_path), backends=open_backend).renew(force=True)
    print("\n".join(calls))


if __name__ == "__main__":
    main()
