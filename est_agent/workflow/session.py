"""Which credential backend a run uses, opened from the configuration.

The one place that knows the configured device: the SIM (IoT SAFE keys + UICC EF records,
est_agent/backends/iotsafe_uicc.py) behind the configured reader, or, when the slots are
``pkcs11:`` URIs, a PKCS#11 token (est_agent/backends/pkcs11.py). The workflow gets a
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

        if config.backend == "pkcs11":
            return _open_token(config)
        card = config.card
        return open_iotsafe_uicc(
            card.reader,
            opener=opener,
            aids=tuple(card.aids),
            proprietary_cla=not card.iso_cla,
            basic_channel=card.uicc_channel.resolve(card.reader) is UiccChannel.BASIC,
            implicit_channel=card.implicit_channel,
        )

    return open_backend


def _open_token(config: Config) -> AbstractContextManager[CredentialBackend]:
    """The PKCS#11 token the slots name (est_agent/backends/pkcs11.py); the PIN is masked in
    every log line from here on."""
    from est_agent.backends.pkcs11 import open_pkcs11
    from est_agent.logs import register_secret

    pin = config.pkcs11_pin()
    if pin:
        register_secret(pin)
    return open_pkcs11(config.pkcs11_token(), module=config.pkcs11_module(), pin=pin)
