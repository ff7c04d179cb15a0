"""The public Python API: the SIM credential est-agent manages, for other device software.

Stable (semantic versioning of the est-agent package): the names in ``__all__``, their
parameters and return types, and the exception classes they raise (``est_agent.errors``, each
with its ``exit_code``). Everything else in est-agent is internal and may change in any
release. ::

    from est_agent.api import active_credential, open_card

    cred = active_credential("/etc/est-agent/est-agent.toml")
    with open_card(cred.reader) as card:
        der = card.sign_digest(cred.key, hashlib.sha256(data).digest())
        cred.certificate.public_key().verify(der, data, ec.ECDSA(hashes.SHA256()))

Readers are the strings of ``card.reader`` in the configuration: ``pcsc:[NAME]``,
``modem:PORT``, ``sim:STATE_FILE`` (the virtual SIM in this process; this module adds that
scheme itself). Keys are card URIs as ``slot.key`` writes them and the deploy hook's
``EST_AGENT_KEY`` carries them (``iotsafe:key-id=03``, ``iotsafe:label=op-b``).

A ``Card`` holds the card's link open; each operation runs in one card transaction (PC/SC
SCardBeginTransaction), so an est-agent run can use the same reader in between. A ``Card`` is
not thread-safe: one thread at a time. The private key never leaves the SIM: signatures are
computed by the IoT SAFE applet (GSMA IoT.05 COMPUTE SIGNATURE) and checked against the key's
public key before they are returned. `Card.ecdh` does key agreement on the card the same way
(GSMA IoT.05 PUT PUBLIC KEY + COMPUTE DH): the shared secret is returned, the private key stays.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

import est_agent.sim
from est_agent.card.uri import DEFAULT_AID, IotSafeRef, ObjectKind, parse_iotsafe_ref
from est_agent.errors import (
    CardError,
    CardProtocolError,
    ConfigError,
    EstAgentError,
    InputError,
    ModemError,
    NoCardError,
    NotFoundError,
    ReaderError,
    SecurityStatusError,
    SlotUnreadableError,
    StatusWordError,
    StoreError,
    TransportError,
    UsageError,
)

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

    from est_agent.backends.iotsafe import CardSigner
    from est_agent.card.channel import CardSession
    from est_agent.card.iotsafe import IotSafeApplet
    from est_agent.config import Config

__all__ = [
    "ECDH_KEY",
    "MAX_RANDOM_BYTES",
    "PEER_PUBLIC_KEY",
    "RANDOM_CHUNK_BYTES",
    "ActiveCredential",
    "Card",
    "CardError",
    "CardProtocolError",
    "ConfigError",
    "EstAgentError",
    "InputError",
    "ModemError",
    "NoCardError",
    "NotFoundError",
    "ReaderError",
    "SecurityStatusError",
    "SlotUnreadableError",
    "StatusWordError",
    "StoreError",
    "TransportError",
    "UsageError",
    "active_credential",
    "open_card",
]

#: the most bytes one `Card.random` call returns
MAX_RANDOM_BYTES = 4096
#: bytes asked per GET RANDOM: within a short APDU's Le (ISO/IEC 7816-4 §5.1: at most 256) and
#: within the 240-byte answers some cards cap responses at (card/iotsafe.py, READ FILE)
RANDOM_CHUNK_BYTES = 240
#: the virtual SIM's ephemeral ECDH key pair (est-agent sim init); a real card's slot is its
#: issuer's choice (`est-agent card info`: a private key with crypto function 04)
ECDH_KEY = "iotsafe:key-id=04"
#: the virtual SIM's writable public key object for the peer's key
PEER_PUBLIC_KEY = "iotsafe:public-key-id=05"
# A PEM chain is a few KiB; a larger "export" is not one.
_EXPORT_LIMIT_BYTES = 1 << 20


class Card:
    """An open card with the IoT SAFE applet selected on a logical channel of its own.

    Made by `open_card`; use it as a context manager (or call `close`).
    """

    def __init__(self, reader: str, session: CardSession, applet: IotSafeApplet) -> None:
        self._reader = reader
        self._session = session
        self._applet = applet
        self._signers: dict[IotSafeRef, CardSigner] = {}
        self._closed = False

    @property
    def reader(self) -> str:
        """The reader string the card was opened with."""
        return self._reader

    def __enter__(self) -> Card:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the applet's channel and the link (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._session.close()

    def _check_open(self) -> None:
        if self._closed:
            raise UsageError("the card was closed")

    def _signer(self, key: str | IotSafeRef) -> CardSigner:
        from est_agent.backends.iotsafe import CardSigner

        self._check_open()
        ref = _private_key(key)
        signer = self._signers.get(ref)
        if signer is None:
            signer = CardSigner.from_card(self._applet, ref)
            self._signers[ref] = signer
        return signer

    def public_key(self, key: str | IotSafeRef) -> ec.EllipticCurvePublicKey:
        """The P-256 public key of a key pair on the card.

        ``key``: the private key's URI (``iotsafe:key-id=03``: its public key object, found as
        ``CardSigner.from_card`` does), or a public key's (``iotsafe:public-key-id=03``).
        ``NotFoundError`` when the card has no such key.
        """
        from est_agent.backends.signer import public_key_from_point

        self._check_open()
        ref = _key_ref(key)
        if ref.kind is ObjectKind.PUBLIC_KEY:
            return public_key_from_point(self._applet.read_public_key(ref))
        return self._signer(ref).public_key()

    def sign_digest(self, key: str | IotSafeRef, digest: bytes) -> bytes:
        """ECDSA P-256 signature (DER Ecdsa-Sig-Value, RFC 3279 §2.2.3) by the private key
        ``key`` over a ``digest`` computed by the caller: SHA-256, or SHA-384/512 where the key
        takes them (32, 48 or 64 bytes, else ``InputError``). Checked against the key's public
        key before it is returned (``CardProtocolError`` if it does not verify)."""
        return self._signer(key).sign_digest(bytes(digest))

    def new_ecdh_key(self, key: str | IotSafeRef = ECDH_KEY) -> ec.EllipticCurvePublicKey:
        """A fresh P-256 key pair in the key-agreement slot ``key`` (GENERATE KEY PAIR): its
        public key, e.g. for a TLS key share. ``ConditionsNotSatisfiedError`` (a
        ``StatusWordError``, 76) when the slot does not allow key generation."""
        from est_agent.backends.signer import public_key_from_point

        self._check_open()
        return public_key_from_point(self._applet.generate_key_pair(_private_key(key)).public_point)

    def ecdh(
        self,
        peer: ec.EllipticCurvePublicKey | bytes,
        *,
        key: str | IotSafeRef = ECDH_KEY,
        peer_slot: str | IotSafeRef = PEER_PUBLIC_KEY,
    ) -> bytes:
        """ECDH on the card (ECKA, SEC 1 §3.3.1): the peer's P-256 key (a ``cryptography``
        key or a SEC 1 point) is written into the public key object ``peer_slot`` (PUT PUBLIC
        KEY), then COMPUTE DH with the private key ``key``; returns the shared x-coordinate,
        32 bytes, as ``cryptography``'s ``exchange(ec.ECDH(), ...)`` does. ``InputError`` for a
        peer key that is not P-256, ``StatusWordError`` (76; ``SecurityStatusError`` 77 for a
        slot that is not writable) when the card refuses, e.g. a key without key agreement."""
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        self._check_open()
        private = _private_key(key)
        slot = _key_ref(peer_slot)
        if slot.kind is not ObjectKind.PUBLIC_KEY:
            raise InputError(f"{slot} is not a public key object (iotsafe:public-key-...)")
        try:
            public = (
                peer
                if isinstance(peer, ec.EllipticCurvePublicKey)
                else ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), bytes(peer))
            )
        except (TypeError, ValueError):
            raise InputError("ecdh: the peer key is not a P-256 point") from None
        if not isinstance(public.curve, ec.SECP256R1):
            raise InputError(f"ecdh: the peer key is on {public.curve.name}, not P-256")
        point = public.public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
        return self._applet.ecdh(private, slot, point)

    def random(self, length: int) -> bytes:
        """``length`` (1..`MAX_RANDOM_BYTES`) bytes from the card's random number generator
        (GSMA IoT.05 GET RANDOM), asked `RANDOM_CHUNK_BYTES` at a time; ``InputError`` for
        another length, ``StatusWordError`` (a ``CardError``) when the card refuses."""
        self._check_open()
        if isinstance(length, bool) or not isinstance(length, int):
            raise InputError(f"random: length must be an int, got {type(length).__name__}")
        if not 1 <= length <= MAX_RANDOM_BYTES:
            raise InputError(f"random: length must be 1..{MAX_RANDOM_BYTES}, got {length}")
        out = bytearray()
        with self._session.transaction():  # one caller's bytes, not interleaved with another's
            while len(out) < length:
                out += self._applet.get_random(min(RANDOM_CHUNK_BYTES, length - len(out)))
        return bytes(out)


def _key_ref(key: str | IotSafeRef) -> IotSafeRef:
    if isinstance(key, IotSafeRef):
        ref = key
    elif isinstance(key, str):
        ref = parse_iotsafe_ref(key, default_kind=ObjectKind.PRIVATE_KEY)
    else:
        raise InputError(f"a key is an iotsafe: URI, not {type(key).__name__}")
    if ref.kind is ObjectKind.FILE:
        raise InputError(f"{ref} is a file, not a key")
    return ref


def _private_key(key: str | IotSafeRef) -> IotSafeRef:
    ref = _key_ref(key)
    if ref.kind is not ObjectKind.PRIVATE_KEY:
        raise InputError(f"{ref} is not a private key (signing needs iotsafe:key-...)")
    return ref


def open_card(
    reader: str, *, aids: Sequence[bytes] = (DEFAULT_AID,), iso_cla: bool = False
) -> Card:
    """Connect to the card in ``reader`` and select the IoT SAFE applet.

    ``aids``: the applet AIDs to try, in order (GSMA IoT.05's default); ``iso_cla``: applet
    commands with CLA ``0N`` instead of ``8N`` (the configuration's ``card.iso_cla``).
    ``UsageError`` for a reader string of no known scheme, ``TransportError`` (``ReaderError``,
    ``NoCardError``, ``ModemError``) when the card cannot be reached, ``NotFoundError`` when it
    has no IoT SAFE applet.
    """
    from est_agent.card.channel import CardSession
    from est_agent.card.iotsafe import IotSafeApplet
    from est_agent.transport import open_transport

    if not isinstance(reader, str):
        raise UsageError(f"a reader is a string such as pcsc: or sim:FILE, not {reader!r}")
    est_agent.sim.register()  # sim: readers, as the CLI offers them
    session = CardSession(open_transport(reader))
    try:
        session.transport.connect()
        applet = IotSafeApplet.open(session, aids=tuple(aids), proprietary_cla=not iso_cla)
    except BaseException:
        session.close()
        raise
    return Card(reader, session, applet)


@dataclass(frozen=True)
class ActiveCredential:
    """The credential est-agent made active on the SIM.

    ``certificates``: the leaf (read from the SIM slot), then its chain when the PEM export
    (``paths.export_pem``) holds that same leaf; the leaf alone otherwise (the chain the
    server sent is not kept on the SIM). ``key``: the slot's private key URI, for
    `Card.sign_digest`; ``reader``: the configured reader, for `open_card`.
    """

    slot: str
    key: str
    reader: str
    certificates: tuple[x509.Certificate, ...]

    @property
    def certificate(self) -> x509.Certificate:
        """The leaf certificate."""
        return self.certificates[0]


def active_credential(
    config: Config | str | os.PathLike[str] = "/etc/est-agent/est-agent.toml",
) -> ActiveCredential:
    """Read both credential slots from the SIM and return the active one (the valid slot with
    the highest record sequence, store.py).

    ``config``: a configuration file path or a loaded ``Config``. ``ConfigError`` for a bad
    configuration, ``TransportError`` when the card cannot be reached, ``SlotUnreadableError``
    when a slot cannot be read (it could be the newer one: no answer is better than a wrong
    one), ``StoreError`` when no slot holds a valid credential (not enrolled yet).
    """
    from est_agent.config import Config, load_config
    from est_agent.store import Slot, SlotState, pick_active, read_slot
    from est_agent.workflow.session import backend_opener

    if isinstance(config, Config):
        loaded = config
    elif isinstance(config, str | os.PathLike):
        loaded = load_config(Path(config))
    else:
        raise UsageError(f"config is a path or a Config, not {type(config).__name__}")
    est_agent.sim.register()
    slots = [Slot(i, s.key, s.certificate, s.name) for i, s in enumerate(loaded.slots)]
    with backend_opener()(loaded) as backend, backend.transaction():
        views = [read_slot(backend, slot) for slot in slots]
    unknown = [v for v in views if v.state is SlotState.UNKNOWN]
    if unknown:
        names = ", ".join(f"{v.slot.name} ({v.reason}: {v.detail})" for v in unknown)
        raise SlotUnreadableError(f"cannot read slot {names}: the active credential is unknown")
    active = pick_active(views)
    if active is None or active.certificate is None:
        raise StoreError("no valid credential on the SIM (not enrolled yet?)")
    chain = _export_chain(loaded.paths.export_pem, active.certificate)
    return ActiveCredential(
        slot=active.slot.name,
        key=str(active.slot.key),
        reader=loaded.card.reader,
        certificates=(active.certificate, *chain),
    )


def _export_chain(path: Path | None, leaf: x509.Certificate) -> tuple[x509.Certificate, ...]:
    """The chain after ``leaf`` in the PEM export, when the export's first certificate is that
    leaf (an export of an older credential, or none, gives no chain)."""
    from est_agent.certificates import load_certificates
    from est_agent.fileio import read_bounded

    if path is None:
        return ()
    try:
        data = read_bounded(path, limit_bytes=_EXPORT_LIMIT_BYTES, what="paths.export_pem")
        exported = load_certificates(data, "paths.export_pem")
    except EstAgentError:  # missing, unreadable or not PEM: the leaf alone is still right
        return ()
    if not exported or exported[0] != leaf:
        return ()
    return tuple(exported[1:])
