"""The test server's tests: a TLS client context holding the bootstrap credential.

The dev PKI and the in-process servers come from tests/conftest.py.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from est_agent.testserver import DevPki
from tests.testserver.esttls_helpers import bootstrap_credential, client_context


@pytest.fixture
def boot(dev_pki: DevPki, tmp_path: Path) -> ssl.SSLContext:
    cert, key, _ = bootstrap_credential(dev_pki, tmp_path)
    return client_context(dev_pki.directory, (cert, key))
