"""The error line names a public class: `[EstConnectionError]`, never `[_TransientError]`."""

from __future__ import annotations

import argparse
from collections.abc import Callable

import pytest

from est_agent.card.status import error_for_sw
from est_agent.cli.main import main
from est_agent.errors import EstConnectionError
from est_agent.testserver import DevPki, EstTestServer
from est_agent.testserver.config import Fault


class _Private(EstConnectionError):
    pass


class _MorePrivate(_Private):
    pass


@pytest.mark.parametrize(
    ("error", "code", "name"),
    [
        (_MorePrivate("server error 500"), 69, "EstConnectionError"),
        (EstConnectionError("refused"), 69, "EstConnectionError"),
        (error_for_sw(0x6A82, "SELECT"), 76, "NotFoundError"),
    ],
)
def test_error_line_names_the_nearest_public_class(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    error: Exception,
    code: int,
    name: str,
) -> None:
    def fail(args: argparse.Namespace) -> int:
        raise error

    monkeypatch.setattr("est_agent.cli.est.cacerts", fail)
    argv = ["cacerts", "--server", "https://127.0.0.1:9", "--trust-anchor", "x.pem"]
    assert main(argv) == code
    assert capsys.readouterr().err == f"est-agent: error: {error} [{name}]\n"


@pytest.mark.integration
def test_a_real_server_error_names_no_private_class(
    start_server: Callable[..., EstTestServer],
    dev_pki: DevPki,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # The client's retryable 5xx is the private _TransientError (est/client.py).
    server = start_server(fault=Fault.HTTP_500, fault_operations=frozenset({"cacerts"}))
    argv = [
        "cacerts",
        "--server",
        server.url.removesuffix("/.well-known/est"),
        "--trust-anchor",
        str(dev_pki.directory / "tls-ca.pem"),
        "--attempts",
        "1",
    ]
    assert main(argv) == 69
    err = capsys.readouterr().err
    assert err.endswith(" [EstConnectionError]\n"), err
    assert "500" in err and "_Transient" not in err
