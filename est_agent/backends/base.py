"""The seam between the credential store and wherever keys and certificates live.

The store (store.py) owns the rules: two slots, a sequence-numbered and hashed record per slot,
adopt only an intact record whose certificate carries the slot's key, write the other slot and
read it back. A ``CredentialBackend`` only moves bytes and runs key operations, addressed by the
references the configuration gives (``KeyRef``, ``RecordRef``; what they are is the backend's
business: an IoT SAFE key and a UICC EF for the SIM, token objects for PKCS#11).

Failure contract, which the store's slot states rest on (store.py "unknown is not empty"):
``CardError`` (or a subclass) when the device answered but refused or garbled an operation —
the slot is then *unknown*, never empty; ``TransportError`` when the device cannot be reached
at all — the run ends. Nothing here returns key material.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Protocol, TypeAlias, runtime_checkable

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import ec

    from est_agent.backends.agreement import KeyAgreement
    from est_agent.backends.signer import Signer
    from est_agent.transport.base import LinkStats

__all__ = ["CredentialBackend", "KeyAgreementBackend", "KeyRef", "ObjectRef", "RecordRef"]

#: where a private key lives (IoT SAFE: an ``IotSafeRef`` to a private key object)
KeyRef: TypeAlias = object
#: where a slot's certificate record lives (IoT SAFE backend: a ``UiccPath`` to a transparent EF)
RecordRef: TypeAlias = object
#: a read-only object on the device: a bootstrap certificate, a trust anchor
ObjectRef: TypeAlias = object


class CredentialBackend(Protocol):
    """What the store and the workflow need from a secure element."""

    @property
    def description(self) -> str:
        """Which device and mechanism, for status and logs (no secrets)."""

    def details(self) -> dict[str, str]:
        """Backend-specific facts for ``status`` (e.g. ``reader``, ``aid``), no secrets."""

    @property
    def stats(self) -> LinkStats:
        """What crossed the link so far (commands, bytes, time): benchmarks and --json."""

    def transaction(self) -> AbstractContextManager[None]:
        """Exclusive use of the device inside (nestable): what is read inside is one picture."""

    # -- certificate records -------------------------------------------------------------------

    def record_size(self, record: RecordRef) -> int | None:
        """Bytes the record's container holds, None if the device does not say."""

    def read_record(self, record: RecordRef, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset`` of the record's container."""

    def write_record(self, record: RecordRef, data: bytes) -> None:
        """Write ``data`` at the start of the record's container."""

    # -- keys -----------------------------------------------------------------------------------

    def public_key(self, key: KeyRef) -> ec.EllipticCurvePublicKey:
        """The public key of the private key now at ``key``."""

    def public_key_digest(self, key: KeyRef, *, last_use: bool = False) -> str:
        """Hex SHA-256 of the key's uncompressed SEC1 point, without loading cryptography (the
        fast path). ``last_use``: nothing else is done in this session afterwards."""

    def generate_key(self, key: KeyRef) -> ec.EllipticCurvePublicKey:
        """A new key pair at ``key``, generated inside the device; its public key."""

    def signer(self, key: KeyRef, public_key: ec.EllipticCurvePublicKey) -> Signer:
        """Signs digests with the private key at ``key`` (every signature checked)."""

    # -- the device's identity ------------------------------------------------------------------

    def read_object(self, ref: ObjectRef) -> bytes:
        """A read-only object (a bootstrap certificate, a trust anchor) stored on the device."""

    def iccid(self) -> str | None:
        """The card's ICCID when the device has one (subject templates), else None."""

    def imei(self) -> str | None:
        """The modem's IMEI when the link knows it (subject templates), else None."""


@runtime_checkable
class KeyAgreementBackend(Protocol):
    """A backend that can also run TLS 1.3's ephemeral ECDH on the device (the IoT SAFE
    applet's COMPUTE DH); one that cannot leaves the key share to the host."""

    def key_agreement(self, key: KeyRef, peer: KeyRef) -> KeyAgreement:
        """ECDH with the key-agreement private key ``key``; the peer's share goes to ``peer``."""
        ...
