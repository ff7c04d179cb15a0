"""Which credential backend a run uses, opened from the configuration.

The one place that knows the configured device: today the SIM (IoT SAFE keys + UICC EF
records, est_agent/backends/iotsafe_uicc.py) behind the configured reader. The workflow gets a
``BackendOpener`` (injectable: tests wrap the link, a PKCS#11 backend plugs in here) and only
ever talks to the ``CredentialBackend`` protocol.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING

from est_agent.backends.iotsafe_uicc import TransportOpener, open_iotsafe_uicc
from est_agent.transport import open_transport

if TYPE_CHECKING:
    from est_agent.backends.base import CredentialBackend
    from est_agent.config import Config

__all__ = ["BackendOpener", "backend_opener"]

#: opens (connects, and closes on exit) the credential backend a configuration names
BackendOpener = Callable[["Config"], AbstractContextManager["CredentialBackend"]]


def backend_opener(opener: TransportOpener = open_transport) -> BackendOpener:
    """The configured backend, its card link built by ``opener`` (reader string -> transport)."""

    def open_backend(config: Config) -> AbstractContextManager[CredentialBackend]:
        from est_agent.config import UiccChannel

        card = config.card
        return open_iotsafe_uicc(
            card.reader,
            opener=opener,
            aids=tuple(card.aids),
            proprietary_cla=not card.iso_cla,
            basic_channel=card.uicc_channel.resolve(card.reader) is UiccChannel.BASIC,
        )

    return open_backend
