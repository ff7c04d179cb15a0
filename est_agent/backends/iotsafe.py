"""Keys inside the SIM's GSMA IoT SAFE applet (GSMA IoT.05): a `Signer`, a `KeyAgreement`.

The private key never leaves the card: ``sign_digest`` sends the digest to the applet's
COMPUTE SIGNATURE and checks the answer against the public key before returning it;
``CardKeyAgreement`` makes TLS 1.3's ephemeral key pair with GENERATE KEY PAIR and the shared
secret with COMPUTE DH.
"""

from __future__ import annotations

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from est_agent.backends.agreement import check_peer_point
from est_agent.backends.signer import SHA256_ONLY, public_key_from_point
from est_agent.card.iotsafe import IotSafeApplet, ObjectType, hash_for_digest, hash_names
from est_agent.card.uri import IotSafeRef, ObjectKind
from est_agent.errors import (
    CardProtocolError,
    EstAgentError,
    InputError,
    NotFoundError,
    StatusWordError,
)

_HASHES: dict[str, hashes.HashAlgorithm] = {
    "sha256": hashes.SHA256(),
    "sha384": hashes.SHA384(),
    "sha512": hashes.SHA512(),
}

__all__ = ["CardKeyAgreement", "CardSigner"]


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
        self._digests: tuple[str, ...] | None = None

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

    @property
    def digest_algorithms(self) -> tuple[str, ...]:
        """The hashes the private key object takes (GET DATA C1, its tag 91; GSMA IoT.05
        table B), SHA-256 first; asked once (one APDU). The key's own list, not the applet's:
        a key personalized for SHA-256 only refuses SHA-384 (6985) on a card that offers it.
        SHA-256 alone when the card does not say."""
        if self._digests is None:
            try:
                bitmap = self.applet.object_info(self.key).hash_algorithms
            except (StatusWordError, CardProtocolError):
                bitmap = None
            names = tuple(n for n in hash_names(bitmap) if n in _HASHES)
            self._digests = names if "sha256" in names else SHA256_ONLY
        return self._digests

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._public_key

    def sign_digest(self, digest: bytes) -> bytes:
        hash_for_digest(digest)  # a digest of another size is refused before the card is used
        # SHA-256 every IoT SAFE applet takes (IoT.05 table B); others only if advertised
        name: str | None = "sha256"
        if len(digest) != _HASHES["sha256"].digest_size:
            sizes = {_HASHES[n].digest_size: n for n in self.digest_algorithms}
            name = sizes.get(len(digest))
        if name is None:
            raise InputError(
                f"the card takes {', '.join(self.digest_algorithms)} digests, "
                f"not one of {len(digest)} bytes"
            )
        signature = self.applet.sign_digest(self.key, digest)
        self.signatures += 1
        try:
            self._public_key.verify(signature, digest, ec.ECDSA(Prehashed(_HASHES[name])))
        except InvalidSignature:
            raise CardProtocolError(
                f"the card's signature with {self.key} does not verify with its public key"
            ) from None
        return signature


class CardKeyAgreement:
    """TLS 1.3's ephemeral ECDH (RFC 8446 §4.2.8, §7.4.2) on the card (GSMA IoT.05 key
    agreement): ``new_key`` is GENERATE KEY PAIR on a key-agreement private key, whose previous
    key is gone then (the slot holds one ephemeral key at a time: forward secrecy on the
    card); ``shared_secret`` puts the server's share into a writable public key object (PUT
    PUBLIC KEY) and asks COMPUTE DH for the x-coordinate. The share is validated on the host
    first (a card's COMPUTE DH need not). The card's answer cannot be checked here (its
    private key never leaves it): a wrong secret fails the handshake's first decryption,
    before the card is asked to sign.

    Per handshake: 1 + 3 + 1 APDUs (GENERATE KEY PAIR; PUT PUBLIC KEY INIT, UPDATE, close;
    COMPUTE DH) and the card's key-generation time.
    """

    def __init__(self, applet: IotSafeApplet, key: IotSafeRef, peer: IotSafeRef) -> None:
        if key.kind is not ObjectKind.PRIVATE_KEY:
            raise InputError(f"{key} is not a private key reference")
        if peer.kind is not ObjectKind.PUBLIC_KEY:
            raise InputError(f"{peer} is not a public key reference")
        self.applet = applet
        self.key = key
        self.peer = peer
        self.agreements = 0
        self._made = False

    def new_key(self) -> bytes:
        point = self.applet.generate_key_pair(self.key).public_point
        public_key_from_point(point)  # a card that answers no P-256 point fails here
        self._made = True
        return point

    def shared_secret(self, peer_point: bytes) -> bytes:
        if not self._made:
            raise EstAgentError("no ephemeral key was made on the card before the agreement")
        check_peer_point(peer_point)
        secret = self.applet.ecdh(self.key, self.peer, peer_point)
        self.agreements += 1
        return secret
