"""The one interface CSR building and TLS use to sign: a public key and ``sign_digest``.

A ``CardSigner`` keeps the private key inside the IoT SAFE applet; ``SoftwareSigner`` wraps an
in-memory key (devices whose bootstrap credential is a PEM file, and tests).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from est_agent.card.iotsafe import IotSafeApplet, ObjectType
from est_agent.card.uri import IotSafeRef, ObjectKind
from est_agent.errors import CardProtocolError, InputError, NotFoundError

__all__ = ["CardSigner", "Signer", "SoftwareSigner", "public_key_from_point"]


@runtime_checkable
class Signer(Protocol):
    """Something that signs SHA-256 digests with a P-256 key."""

    def public_key(self) -> ec.EllipticCurvePublicKey: ...

    def sign_digest(self, digest: bytes) -> bytes:
        """ECDSA signature (DER Ecdsa-Sig-Value) over a 32-byte SHA-256 digest."""
        ...


def public_key_from_point(point: bytes) -> ec.EllipticCurvePublicKey:
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
    except ValueError as exc:
        raise CardProtocolError(f"card public key is not a valid P-256 point: {exc}") from exc


def _check_digest(digest: bytes) -> None:
    if len(digest) != 32:
        raise InputError(f"expected a 32-byte SHA-256 digest, got {len(digest)} bytes")


class CardSigner:
    """A private key in the IoT SAFE applet.

    Every signature is checked against the public key before it is returned: a card that
    answers garbage (or the wrong key's signature) fails here, not at the EST server.
    """

    def __init__(
        self, applet: IotSafeApplet, key: IotSafeRef, public_key: ec.EllipticCurvePublicKey
    ) -> None:
        if key.kind is not ObjectKind.PRIVATE_KEY:
            raise InputError(f"{key} is not a private key reference")
        self.applet = applet
        self.key = key
        self._public_key = public_key
        self.signatures = 0  # card operations are expensive: benchmarks count them

    @classmethod
    def from_card(
        cls, applet: IotSafeApplet, key: IotSafeRef, public_key: IotSafeRef | None = None
    ) -> CardSigner:
        """Read the public key from the card: the given public-key object, else the one with
        the private key's ID or label, else the one whose label matches in the object list."""
        candidates = (
            [public_key]
            if public_key is not None
            else [IotSafeRef(ObjectKind.PUBLIC_KEY, object_id=key.object_id, label=key.label)]
        )
        for ref in candidates:
            try:
                return cls(applet, key, public_key_from_point(applet.read_public_key(ref)))
            except NotFoundError:
                if public_key is not None:
                    raise
        # The card gave the public key another ID (§3.2): match through the object list.
        objects = applet.objects()
        label = key.label
        if label is None:
            label = next(
                (
                    o.label
                    for o in objects
                    if o.object_id == key.object_id and o.type is ObjectType.PRIVATE_KEY
                ),
                None,
            )
        for obj in objects:
            if (
                obj.type is ObjectType.PUBLIC_KEY
                and label is not None
                and obj.label == label
                and obj.object_id
            ):
                ref = IotSafeRef(ObjectKind.PUBLIC_KEY, object_id=obj.object_id)
                return cls(applet, key, public_key_from_point(applet.read_public_key(ref)))
        raise NotFoundError(0x6A88, "READ PUBLIC KEY", f"no public key found for {key}")

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._public_key

    def sign_digest(self, digest: bytes) -> bytes:
        _check_digest(digest)
        signature = self.applet.sign_digest(self.key, digest)
        self.signatures += 1
        try:
            self._public_key.verify(signature, digest, ec.ECDSA(Prehashed(hashes.SHA256())))
        except InvalidSignature:
            raise CardProtocolError(
                f"the card's signature with {self.key} does not verify with its public key"
            ) from None
        return signature


class SoftwareSigner:
    """A P-256 key held in memory (file-based bootstrap credentials; tests)."""

    def __init__(self, private_key: ec.EllipticCurvePrivateKey) -> None:
        if not isinstance(private_key.curve, ec.SECP256R1):
            raise InputError(f"only P-256 keys are supported, not {private_key.curve.name}")
        self._key = private_key
        self.signatures = 0

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._key.public_key()

    def sign_digest(self, digest: bytes) -> bytes:
        _check_digest(digest)
        self.signatures += 1
        return self._key.sign(digest, ec.ECDSA(Prehashed(hashes.SHA256())))
