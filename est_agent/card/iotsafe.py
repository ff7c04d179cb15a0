"""GSMA IoT SAFE (IoT.05) applet client: pure encoders/decoders plus ``IotSafeApplet``.

Byte layouts: GSMA IoT.05 as the public implementations use it, written up in
docs/iot-safe-card.md (cited below as ``[card §N]``; §8 is a worked exchange). Where cards and
libraries disagree the decoders accept every variant seen in the wild: 1- or 2-byte (and
BER) lengths on the signature TLV, raw r||s or DER signatures, public-key IDs that differ from
the private-key ID after GENERATE KEY PAIR, responses without the ``84``/``85`` TLVs, object
lists with several objects per container in any order, and ``63 00`` paging.

Key agreement and derivation (``put_public_key``, ``compute_dh``, ``compute_prf``,
``compute_hkdf``) send what wolfSSL's and Thales' clients send [card §3]: PUT PUBLIC KEY INIT +
one UPDATE + close, COMPUTE DH with the two object references, COMPUTE PRF P1 00 with ``D2`` /
``D3``, COMPUTE HKDF with ``D5`` salt and ``91`` hash (plus ``D6`` info / ``D3`` length for an
expand, which only the virtual SIM is known to answer).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, TypedDict, TypeVar, Unpack

from est_agent.card.channel import CardSession, ExchangeOptions, LogicalChannel
from est_agent.card.iotsafe_codes import (
    CONTAINER_FILE,
    CONTAINER_PRIVATE_KEY,
    CONTAINER_PUBLIC_KEY,
    CONTAINER_SECRET_KEY,
    DEFAULT_AID,
    HASH_SHA256,
    HASHES,
    INS_COMPUTE_DH,
    INS_COMPUTE_HKDF,
    INS_COMPUTE_PRF,
    INS_GENERATE_KEY_PAIR,
    INS_GET_DATA,
    INS_GET_RANDOM,
    INS_PUT_PUBLIC_KEY_INIT,
    INS_PUT_PUBLIC_KEY_UPDATE,
    INS_READ_FILE,
    INS_READ_PUBLIC_KEY,
    INS_SIGN_INIT,
    INS_SIGN_UPDATE,
    INS_VERIFY_INIT,
    INS_VERIFY_UPDATE,
    MODE_PAD_AND_SIGN,
    REF_TAGS,
    SIGNATURE_ECDSA,
    SW_MORE_DATA,
    SW_SIGNATURE_MISMATCH,
    TAG_ACCESS,
    TAG_APPLET_ID,
    TAG_APPLET_VERSION,
    TAG_CRYPTO_FUNCTIONS,
    TAG_EC_POINT,
    TAG_ECC_KEY,
    TAG_FILE_SIZE,
    TAG_FILE_USAGE,
    TAG_HASH_ALGS,
    TAG_HASH_VALUE,
    TAG_INFO,
    TAG_KEY_AGREEMENT_ALGS,
    TAG_KEY_DERIVATION_ALGS,
    TAG_KEY_TYPE,
    TAG_KEY_USAGE,
    TAG_LABEL_SEED,
    TAG_MAX_FILES,
    TAG_MAX_PRIVATE_KEYS,
    TAG_MAX_PUBLIC_KEYS,
    TAG_MAX_SECRET_KEYS,
    TAG_MAX_SESSIONS,
    TAG_MODE,
    TAG_OBJECT_FUNCTIONS,
    TAG_OBJECT_KEY_AGREEMENT,
    TAG_OBJECT_KEY_DERIVATION,
    TAG_OUTPUT_LENGTH,
    TAG_PRIVATE_KEY_ID,
    TAG_PUBLIC_KEY,
    TAG_PUBLIC_KEY_ID,
    TAG_SALT,
    TAG_SECRET_VALUE,
    TAG_SIG_ALGS,
    TAG_SIGNATURE,
    TAG_STATE,
)
from est_agent.card.tlv import Tlv, decode_tlvs, encode_tlv, find_tlv
from est_agent.card.uri import IotSafeRef, ObjectKind
from est_agent.errors import CardProtocolError, InputError, NotFoundError, StatusWordError

__all__ = [
    "DEFAULT_AID",
    "AppletInfo",
    "AppletOptions",
    "GeneratedKey",
    "IotSafeApplet",
    "ObjectInfo",
    "ObjectType",
    "decode_app_info",
    "decode_der_length",
    "decode_generate_key_response",
    "decode_object_list",
    "decode_public_key",
    "decode_signature",
    "encode_hkdf",
    "encode_object_ref",
    "encode_prf",
    "encode_put_public_key",
    "encode_sign_init",
    "hash_for_digest",
    "hash_names",
    "raw_signature_to_der",
]

log = logging.getLogger(__name__)

INS_SELECT = 0xA4  # ISO/IEC 7816-4 §11.1.1; the IoT SAFE instructions are in iotsafe_codes

_GET_DATA_P1 = {
    ObjectKind.PRIVATE_KEY: CONTAINER_PRIVATE_KEY,
    ObjectKind.PUBLIC_KEY: CONTAINER_PUBLIC_KEY,
    ObjectKind.FILE: CONTAINER_FILE,
    ObjectKind.SECRET_KEY: CONTAINER_SECRET_KEY,
}
#: a derivation's answer is one short response APDU (ISO/IEC 7816-4 §5.1)
MAX_DERIVED_BYTES = 256
_MAX_PAGES = 32
# Command framing [card §3]: data-carrying commands go
# without Le (T=0 cards answer 61xx, T=1 cards the data), GET DATA lists and READ FILE with Le.
_SHORT_LE = 256  # Le byte 00: "up to 256 bytes"


#: hashlib name -> digest size, of the hashes tag 91 names
HASHES_BY_NAME = {name: size for name, size in HASHES.values()}


class ObjectType(IntEnum):
    """Info container tags of GET DATA [card §4]."""

    PRIVATE_KEY = CONTAINER_PRIVATE_KEY
    PUBLIC_KEY = CONTAINER_PUBLIC_KEY
    FILE = CONTAINER_FILE
    SECRET_KEY = CONTAINER_SECRET_KEY


@dataclass(frozen=True)
class AppletInfo:
    """GET DATA P1=00 [card §4]. Bitmaps are kept as the integers the card sends."""

    version: int | None
    applet_id: bytes
    max_files: int | None
    max_private_keys: int | None
    max_public_keys: int | None
    max_secret_keys: int | None
    crypto_functions: int | None
    hash_algorithms: int | None
    signature_algorithms: int | None
    key_agreement_algorithms: int | None
    key_derivation_algorithms: int | None
    max_sessions: int | None


@dataclass(frozen=True)
class ObjectInfo:
    """One entry of the object list (or a single-object GET DATA)."""

    type: ObjectType
    object_id: bytes | None
    label: str | None
    access: int | None = None
    state: int | None = None
    key_type: int | None = None
    key_usage: int | None = None
    crypto_functions: int | None = None
    signature_algorithms: int | None = None
    hash_algorithms: int | None = None
    key_agreement_algorithms: int | None = None
    key_derivation_algorithms: int | None = None
    file_usage: int | None = None
    file_size: int | None = None
    extra: tuple[Tlv, ...] = field(default=(), repr=False)

    @property
    def activated(self) -> bool:
        return self.state == 0x01


@dataclass(frozen=True)
class GeneratedKey:
    """GENERATE KEY PAIR result: the IDs the card chose (may be absent) and the public point."""

    private_id: bytes | None
    public_id: bytes | None
    public_point: bytes  # SEC1 uncompressed 04||X||Y


# --- pure encoders ---------------------------------------------------------------------------


def encode_object_ref(ref: IotSafeRef, kind: ObjectKind | None = None) -> bytes:
    """The ID or label TLV addressing ``ref`` as an object of ``kind`` (default: its own)."""
    kind = kind or ref.kind
    if ref.object_id is not None:
        return encode_tlv(REF_TAGS[_GET_DATA_P1[kind]][0], ref.object_id)
    assert ref.label is not None  # guaranteed by IotSafeRef
    return encode_tlv(REF_TAGS[_GET_DATA_P1[kind]][1], ref.label.encode())


def encode_sign_init(
    key: IotSafeRef, kind: ObjectKind = ObjectKind.PRIVATE_KEY, hash_bit: int = HASH_SHA256
) -> bytes:
    """COMPUTE/VERIFY SIGNATURE INIT data: key + mode 03 + hash (tag 91) + ECDSA [card §3]."""
    return (
        encode_object_ref(key, kind)
        + encode_tlv(TAG_MODE, bytes((MODE_PAD_AND_SIGN,)))
        + encode_tlv(TAG_HASH_ALGS, hash_bit.to_bytes(2, "big"))
        + encode_tlv(TAG_SIG_ALGS, bytes((SIGNATURE_ECDSA,)))
    )


def encode_put_public_key(point: bytes) -> bytes:
    """PUT PUBLIC KEY UPDATE data: ``34 { 49 { 86 04||X||Y } }``, the encoding GENERATE KEY
    PAIR and READ PUBLIC KEY answer [card §3]; one block for a P-256 key."""
    if len(point) != 65 or point[0] != 0x04:
        raise InputError(f"a P-256 public key is a 65-byte uncompressed point, got {len(point)}")
    return encode_tlv(TAG_PUBLIC_KEY, encode_tlv(TAG_ECC_KEY, encode_tlv(TAG_EC_POINT, point)))


def _derivation_secret(secret: IotSafeRef | bytes) -> bytes:
    """A secret-key object's ID/label TLV (86/76), or a secret given in the command (D1)."""
    if isinstance(secret, IotSafeRef):
        return encode_object_ref(secret, ObjectKind.SECRET_KEY)
    if not secret:
        raise InputError("the derivation secret is empty")
    return encode_tlv(TAG_SECRET_VALUE, secret)


def _length_tlv(length: int) -> bytes:
    if not 1 <= length <= MAX_DERIVED_BYTES:
        raise InputError(f"output length must be 1..{MAX_DERIVED_BYTES}, got {length}")
    # one byte as the AT/Thales traces send it (D3 01 10), two for 256
    return encode_tlv(TAG_OUTPUT_LENGTH, length.to_bytes(1 if length < 256 else 2, "big"))


def encode_prf(secret: IotSafeRef | bytes, label_seed: bytes, length: int) -> bytes:
    """COMPUTE PRF data: the secret, ``D2`` label||seed, ``D3`` output length [card §3]."""
    if not label_seed:
        raise InputError("the PRF label and seed are empty")
    return _derivation_secret(secret) + encode_tlv(TAG_LABEL_SEED, label_seed) + _length_tlv(length)


def encode_hkdf(
    secret: IotSafeRef | bytes,
    salt: bytes,
    *,
    info: bytes | None = None,
    length: int | None = None,
    hash_name: str = "sha256",
) -> bytes:
    """COMPUTE HKDF data: the secret (IKM), ``D5`` salt, ``91`` hash; for extract and expand
    also ``D6`` info and ``D3`` the output length [card §3]; both or neither."""
    if (info is None) != (length is None):
        raise InputError("HKDF expand needs both info and length (neither: extract only)")
    bits = [bit for bit, (name, _size) in HASHES.items() if name == hash_name]
    if not bits:
        raise InputError(f"HKDF hash must be one of {hash_names(0xFFFF)}, got {hash_name!r}")
    data = (
        _derivation_secret(secret)
        + encode_tlv(TAG_SALT, salt)
        + encode_tlv(TAG_HASH_ALGS, bits[0].to_bytes(2, "big"))
    )
    if info is not None and length is not None:
        data += encode_tlv(TAG_INFO, info) + _length_tlv(length)
    return data


def hash_for_digest(digest: bytes) -> int:
    """The tag-91 hash bit of a SHA-256/384/512 digest, by its size; InputError otherwise."""
    for bit, (_name, size) in HASHES.items():
        if len(digest) == size:
            return bit
    raise InputError(
        f"expected a SHA-256, SHA-384 or SHA-512 digest (32, 48 or 64 bytes), got {len(digest)}"
    )


def hash_names(bitmap: int | None) -> tuple[str, ...]:
    """hashlib names of the hashes in a tag-91 bitmap, SHA-256 first (None: SHA-256 only)."""
    if bitmap is None:
        return (HASHES[HASH_SHA256][0],)
    return tuple(name for bit, (name, _size) in HASHES.items() if bitmap & bit)


def raw_signature_to_der(raw: bytes) -> bytes:
    """r||s (equal halves) to a minimal DER Ecdsa-Sig-Value."""
    from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

    if len(raw) % 2 or not raw:
        raise CardProtocolError(f"raw ECDSA signature has odd length {len(raw)}")
    half = len(raw) // 2
    r = int.from_bytes(raw[:half], "big")
    s = int.from_bytes(raw[half:], "big")
    if r == 0 or s == 0:
        raise CardProtocolError("card returned a signature with r or s equal to zero")
    return encode_dss_signature(r, s)


# --- pure decoders ---------------------------------------------------------------------------


def _int(value: bytes | None) -> int | None:
    return int.from_bytes(value, "big") if value else None


# AppletInfo / ObjectInfo field -> the tag carrying it as a big-endian integer
_APP_INFO_INTS = {
    "version": TAG_APPLET_VERSION,
    "max_files": TAG_MAX_FILES,
    "max_private_keys": TAG_MAX_PRIVATE_KEYS,
    "max_public_keys": TAG_MAX_PUBLIC_KEYS,
    "max_secret_keys": TAG_MAX_SECRET_KEYS,
    "crypto_functions": TAG_CRYPTO_FUNCTIONS,
    "hash_algorithms": TAG_HASH_ALGS,
    "signature_algorithms": TAG_SIG_ALGS,
    "key_agreement_algorithms": TAG_KEY_AGREEMENT_ALGS,
    "key_derivation_algorithms": TAG_KEY_DERIVATION_ALGS,
    "max_sessions": TAG_MAX_SESSIONS,
}
_OBJECT_INTS = {
    "access": TAG_ACCESS,
    "state": TAG_STATE,
    "key_type": TAG_KEY_TYPE,
    "key_usage": TAG_KEY_USAGE,
    "crypto_functions": TAG_OBJECT_FUNCTIONS,
    "signature_algorithms": TAG_SIG_ALGS,
    "hash_algorithms": TAG_HASH_ALGS,
    "key_agreement_algorithms": TAG_OBJECT_KEY_AGREEMENT,
    "key_derivation_algorithms": TAG_OBJECT_KEY_DERIVATION,
}
# big-endian, as Thales' and wolfSSL's code decode it (Orange's little-endian reading is a
# bug: [card §4])
_FILE_INTS = {"file_usage": TAG_FILE_USAGE, "file_size": TAG_FILE_SIZE}


def _ints(tlvs: list[Tlv], fields: dict[str, int]) -> dict[str, int | None]:
    return {name: _int(find_tlv(tlvs, tag)) for name, tag in fields.items()}


def decode_app_info(data: bytes) -> AppletInfo:
    """GET DATA P1=00. Tags are looked up, not read in order; the hash bitmap may be 1 byte."""
    tlvs = decode_tlvs(data)
    if not tlvs:
        raise CardProtocolError("GET DATA application info: empty answer")
    return AppletInfo(applet_id=find_tlv(tlvs, TAG_APPLET_ID) or b"", **_ints(tlvs, _APP_INFO_INTS))


def _object_from_tlvs(kind: ObjectType, tlvs: list[Tlv]) -> ObjectInfo:
    id_tag, label_tag = REF_TAGS[kind]
    fields = _OBJECT_INTS | _FILE_INTS if kind is ObjectType.FILE else _OBJECT_INTS
    known = {id_tag, label_tag, *_OBJECT_INTS.values(), *_FILE_INTS.values()}
    label = find_tlv(tlvs, label_tag)
    return ObjectInfo(
        type=kind,
        object_id=find_tlv(tlvs, id_tag),
        label=label.decode("utf-8", "replace") if label is not None else None,
        extra=tuple(t for t in tlvs if t.tag not in known),
        **_ints(tlvs, fields),
    )


def _split_objects(kind: ObjectType, tlvs: list[Tlv]) -> list[ObjectInfo]:
    """Split one container's TLVs into objects: a repeated ID or label tag starts a new one."""
    id_tag, label_tag = REF_TAGS[kind]
    objects: list[ObjectInfo] = []
    current: list[Tlv] = []
    seen: set[int] = set()
    for tlv in tlvs:
        if tlv.tag in (id_tag, label_tag) and tlv.tag in seen:
            objects.append(_object_from_tlvs(kind, current))
            current, seen = [], set()
        seen.add(tlv.tag)
        current.append(tlv)
    if current:
        objects.append(_object_from_tlvs(kind, current))
    return objects


def decode_object_list(data: bytes, *, expect: ObjectType | None = None) -> list[ObjectInfo]:
    """GET DATA P1=01 (or C1/C2/C3): containers in any order, several objects per container.

    Some applets answer a single-object query with the container's content only: pass
    ``expect`` to accept that form.
    """
    tlvs = decode_tlvs(data)
    container_tags = {t.value for t in ObjectType}
    if expect is not None and tlvs and tlvs[0].tag not in container_tags:
        return _split_objects(expect, tlvs)
    objects: list[ObjectInfo] = []
    for tlv in tlvs:
        if tlv.tag not in container_tags:
            log.debug("object list: ignoring unknown tag %02X", tlv.tag)
            continue
        objects.extend(_split_objects(ObjectType(tlv.tag), decode_tlvs(tlv.value)))
    return objects


def decode_public_key(data: bytes) -> bytes:
    """``34 { 49 { 86 04||X||Y } }`` [card §3] to the 65-byte point; bare forms tolerated."""
    value = data
    for tag in (TAG_PUBLIC_KEY, TAG_ECC_KEY, TAG_EC_POINT):
        if value[:1] == bytes((tag,)):
            inner = find_tlv(decode_tlvs(value), tag)
            if inner is None:  # pragma: no cover - decode_tlvs found the tag
                break
            value = inner
    if len(value) != 65 or value[0] != 0x04:
        raise CardProtocolError(
            f"public key is not an uncompressed P-256 point ({len(value)} bytes)"
        )
    return value


def decode_generate_key_response(data: bytes) -> GeneratedKey:
    tlvs = decode_tlvs(data)
    public = find_tlv(tlvs, TAG_PUBLIC_KEY)
    if public is None:
        raise CardProtocolError("GENERATE KEY PAIR: no public key (tag 34) in the answer")
    return GeneratedKey(
        private_id=find_tlv(tlvs, TAG_PRIVATE_KEY_ID),
        public_id=find_tlv(tlvs, TAG_PUBLIC_KEY_ID),
        public_point=decode_public_key(encode_tlv(TAG_PUBLIC_KEY, public)),
    )


def _is_der_signature(value: bytes) -> bool:
    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

    if len(value) < 8 or value[0] != 0x30 or value[1] != len(value) - 2:
        return False
    try:
        decode_dss_signature(value)
    except ValueError:
        return False
    return True


def decode_signature(data: bytes) -> bytes:
    """The last COMPUTE SIGNATURE UPDATE answer to DER: ``33 00 40``, ``33 40`` or DER
    [card §2, §3]."""
    value = data
    if data[:1] == bytes((TAG_SIGNATURE,)):
        found = find_tlv(decode_tlvs(data), TAG_SIGNATURE)
        if found is None:  # pragma: no cover
            raise CardProtocolError("signature TLV missing")
        value = found
    if _is_der_signature(value):
        from cryptography.hazmat.primitives.asymmetric.utils import (
            decode_dss_signature,
            encode_dss_signature,
        )

        r, s = decode_dss_signature(value)
        return encode_dss_signature(r, s)  # re-encode: some applets emit non-minimal DER
    if len(value) != 64:
        raise CardProtocolError(
            f"signature is neither DER nor a 64-byte P-256 r||s ({len(value)} bytes)"
        )
    return raw_signature_to_der(value)


def decode_der_length(header: bytes) -> int | None:
    """Total length of the DER element starting ``header``, or None if it cannot be known yet."""
    if len(header) < 2:
        return None
    first = header[1]
    if first < 0x80:
        return 2 + first
    count = first & 0x7F
    if count == 0 or count > 3:
        return None  # indefinite or absurd: the caller falls back to size / short reads
    if len(header) < 2 + count:
        return None
    return 2 + count + int.from_bytes(header[2 : 2 + count], "big")


# --- the applet on a channel -----------------------------------------------------------------


_Method = TypeVar("_Method", bound=Callable[..., Any])


def _one_transaction(method: _Method) -> _Method:
    """Run a multi-APDU applet operation (INIT + UPDATE, paged reads) in one card transaction,
    so no other client of a shared reader slips a command in between."""

    @functools.wraps(method)
    def wrapper(self: IotSafeApplet, *args: Any, **kwargs: Any) -> Any:
        with self.channel.session.transaction():
            return method(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


class AppletOptions(TypedDict, total=False):
    """How to talk to the applet once selected: the keywords ``IotSafeApplet`` takes besides
    the channel and AID (``open`` and ``select`` pass them through)."""

    proprietary_cla: bool
    session_number: int
    close_sessions: bool


def _require_aids(aids: Sequence[bytes]) -> None:
    if not aids:
        raise InputError("no IoT SAFE AID configured")


class IotSafeApplet:
    """The IoT SAFE applet selected on a logical channel of ``session``.

    ``proprietary_cla`` picks `8N` (default: wolfSSL's default class and the real ZARIOT SIM)
    or `0N` (Orange's and Thales' libraries) for applet commands; SELECT always uses the ISO
    class [card §1].
    """

    def __init__(
        self,
        channel: LogicalChannel,
        *,
        proprietary_cla: bool = True,
        session_number: int = 1,
        aid: bytes = DEFAULT_AID,
        close_sessions: bool = False,
    ) -> None:
        self.channel = channel
        self.proprietary_cla = proprietary_cla
        self.session_number = session_number
        self.aid = aid
        self.close_sessions = close_sessions
        #: the card answered 6881 to a SELECT that was to open a channel implicitly (``open``)
        self.implicit_refused = False

    @classmethod
    def open(
        cls,
        session: CardSession,
        *,
        aids: Sequence[bytes] = (DEFAULT_AID,),
        implicit_channel: bool = False,
        **options: Unpack[AppletOptions],
    ) -> IotSafeApplet:
        """Open a logical channel and select the first AID that answers [card §1].

        ``implicit_channel``: first SELECT on the lowest channel this session has not opened,
        without MANAGE CHANNEL: a Java Card runtime opens a closed channel on a SELECT by AID
        (ISO/IEC 7816-4 §5.5.2 lets the card do so), one APDU fewer. A card that refuses
        (6881) gets MANAGE CHANNEL and the SELECT again, one APDU more; the applet then says
        so (``implicit_refused``), for the caller to remember. Off here by default: on a card
        shared with other software (the modem's baseband, another PC/SC client) that channel
        may be open already, and the SELECT would take it over instead of failing; the SIM
        backend turns it on where the agent's EFs use the basic channel (a PC/SC reader).

        ``close_sessions``: close the signature session after every signature. Off by default:
        closing the channel deselects the applet, which ends its sessions (Java Card clears
        session state on deselect), and an INIT that finds a stale session (6985) closes it
        and retries. That saves one APDU per signature on links where each costs tens of ms.
        """
        _require_aids(aids)  # before a channel is opened for nothing
        with session.transaction():
            if implicit_channel:
                channel = session.unopened_channel()
                try:
                    applet = cls.select(channel, aids=aids, **options)
                except StatusWordError as exc:
                    if exc.sw != 0x6881:  # logical channel not supported: open it first
                        raise
                    log.debug("no implicit opening of channel %d: MANAGE CHANNEL", channel.number)
                else:
                    session.adopt_channel(channel.number)
                    return applet
            channel = session.open_channel()
            try:
                applet = cls.select(channel, aids=aids, **options)
            except BaseException:
                channel.close()
                raise
            applet.implicit_refused = implicit_channel
            return applet

    @classmethod
    def select(
        cls,
        channel: LogicalChannel,
        *,
        aids: Sequence[bytes] = (DEFAULT_AID,),
        **options: Unpack[AppletOptions],
    ) -> IotSafeApplet:
        """Select the first AID that answers on an already open ``channel`` [card §1]; the
        channel's earlier selection (e.g. a UICC EF) is gone afterwards."""
        _require_aids(aids)
        for aid in aids:
            try:
                channel.exchange(INS_SELECT, 0x04, 0x00, aid, name="SELECT IoT SAFE applet")
            except NotFoundError:
                log.debug("no applet with AID %s", aid.hex().upper())
                continue
            return cls(channel, aid=aid, **options)
        tried = ", ".join(a.hex().upper() for a in aids)
        raise NotFoundError(0x6A82, "SELECT", f"no IoT SAFE applet on the card (tried {tried})")

    def close(self) -> None:
        self.channel.close()

    def _exchange(
        self,
        ins: int,
        p1: int,
        p2: int,
        data: bytes = b"",
        le: int | None = None,
        **how: Unpack[ExchangeOptions],
    ) -> tuple[bytes, int]:
        response = self.channel.exchange(
            ins, p1, p2, data, le, proprietary=self.proprietary_cla, **how
        )
        return response.data, response.sw

    # GET DATA ------------------------------------------------------------------------------

    def info(self) -> AppletInfo:
        # Le 44: the 68 bytes of the applet information [card §4]; another length gets 6Cxx
        data, _ = self._exchange(INS_GET_DATA, 0x00, 0x00, le=0x44, name="GET DATA info")
        return decode_app_info(data)

    @_one_transaction
    def objects(self) -> list[ObjectInfo]:
        """The whole object list, following ``63 00`` paging with P2=01 [card §4]."""
        collected = b""
        p2 = 0x00
        for _ in range(_MAX_PAGES):
            data, sw = self._exchange(
                INS_GET_DATA,
                0x01,
                p2,
                le=_SHORT_LE,
                name="GET DATA object list",
                accept=(SW_MORE_DATA,),
            )
            collected += data
            if sw != SW_MORE_DATA:
                return decode_object_list(collected)
            p2 = 0x01
        raise CardProtocolError("GET DATA object list: card keeps paging (63 00)")

    def object_info(self, ref: IotSafeRef) -> ObjectInfo:
        p1 = _GET_DATA_P1[ref.kind]
        data, _ = self._exchange(
            INS_GET_DATA, p1, 0x00, encode_object_ref(ref), name="GET DATA object"
        )
        found = decode_object_list(data, expect=ObjectType(p1))
        if not found:
            raise CardProtocolError(f"GET DATA object: empty answer for {ref}")
        return found[0]

    # keys ----------------------------------------------------------------------------------

    def _object_command(
        self, ins: int, ref: IotSafeRef, kind: ObjectKind, name: str, *, slow: bool = False
    ) -> bytes:
        data, _ = self._exchange(
            ins, 0x00, 0x00, encode_object_ref(ref, kind), name=name, slow=slow
        )
        return data

    def generate_key_pair(self, key: IotSafeRef) -> GeneratedKey:
        # an ECC key pair takes a real SIM seconds: the transport's key-generation deadline
        data = self._object_command(
            INS_GENERATE_KEY_PAIR, key, ObjectKind.PRIVATE_KEY, "GENERATE KEY PAIR", slow=True
        )
        return decode_generate_key_response(data)

    def read_public_key(self, public_key: IotSafeRef) -> bytes:
        data = self._object_command(
            INS_READ_PUBLIC_KEY, public_key, ObjectKind.PUBLIC_KEY, "READ PUBLIC KEY"
        )
        return decode_public_key(data)

    @_one_transaction
    def sign_digest(self, key: IotSafeRef, digest: bytes) -> bytes:
        """ECDSA over a host-computed SHA-256/384/512 digest (mode 03, [card §3], the hash
        named in tag 91 by the digest's size); returns DER."""
        sess = self.session_number
        init = encode_sign_init(key, ObjectKind.PRIVATE_KEY, hash_for_digest(digest))
        try:
            self._exchange(INS_SIGN_INIT, 0x00, sess, init, name="COMPUTE SIGNATURE INIT")
        except StatusWordError as exc:
            if exc.sw != 0x6985:
                raise
            # A session left open by a crashed run: close it and try once more ([card §5]:
            # Orange's library closes before every INIT; only on failure saves an APDU per sign).
            self._close_session(INS_SIGN_INIT)
            self._exchange(INS_SIGN_INIT, 0x00, sess, init, name="COMPUTE SIGNATURE INIT")
        try:
            data, _ = self._exchange(
                INS_SIGN_UPDATE,
                0x80,
                sess,
                encode_tlv(TAG_HASH_VALUE, digest),
                name="COMPUTE SIGNATURE UPDATE",
            )
        finally:
            if self.close_sessions:
                self._close_session(INS_SIGN_INIT)
        return decode_signature(data)

    @_one_transaction
    def verify_signature(self, public_key: IotSafeRef, digest: bytes, der_signature: bytes) -> bool:
        """VERIFY SIGNATURE on the card [card §3]: True on 9000, False on 6D01."""
        from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

        hash_bit = hash_for_digest(digest)
        r, s = decode_dss_signature(der_signature)
        raw = r.to_bytes(32, "big") + s.to_bytes(32, "big")
        sess = self.session_number
        self._exchange(
            INS_VERIFY_INIT,
            0x00,
            sess,
            encode_sign_init(public_key, ObjectKind.PUBLIC_KEY, hash_bit),
            name="VERIFY SIGNATURE INIT",
        )
        try:
            _, sw = self._exchange(
                INS_VERIFY_UPDATE,
                0x80,
                sess,
                encode_tlv(TAG_HASH_VALUE, digest)
                + encode_tlv(TAG_SIGNATURE, raw, two_byte_length=True),
                name="VERIFY SIGNATURE UPDATE",
                accept=(SW_SIGNATURE_MISMATCH,),
            )
        finally:
            self._close_session(INS_VERIFY_INIT)
        return sw != SW_SIGNATURE_MISMATCH

    def _close_session(self, init_ins: int) -> None:
        try:
            self._exchange(init_ins, 0x01, self.session_number, name="close session")
        except StatusWordError as exc:
            log.debug("closing session: %s", exc)

    # key agreement and derivation ---------------------------------------------------------

    @_one_transaction
    def put_public_key(self, public_key: IotSafeRef, point: bytes) -> None:
        """PUT PUBLIC KEY [card §3]: write a peer's P-256 point into a writable public key
        object (INIT on the session, one UPDATE with P1 80 carrying ``34``, then INIT P1 01 to
        close, as wolfSSL's port does)."""
        data = encode_put_public_key(point)
        sess = self.session_number
        ref = encode_object_ref(public_key, ObjectKind.PUBLIC_KEY)
        self._exchange(INS_PUT_PUBLIC_KEY_INIT, 0x00, sess, ref, name="PUT PUBLIC KEY INIT")
        try:
            self._exchange(
                INS_PUT_PUBLIC_KEY_UPDATE, 0x80, sess, data, name="PUT PUBLIC KEY UPDATE"
            )
        finally:
            self._close_session(INS_PUT_PUBLIC_KEY_INIT)

    def compute_dh(self, private_key: IotSafeRef, public_key: IotSafeRef) -> bytes:
        """COMPUTE DH [card §3]: ECKA of a key-agreement private key with a public key object
        (filled by `put_public_key`); the shared x-coordinate, 32 bytes, raw."""
        data, _ = self._exchange(
            INS_COMPUTE_DH,
            0x00,
            0x00,
            encode_object_ref(private_key, ObjectKind.PRIVATE_KEY)
            + encode_object_ref(public_key, ObjectKind.PUBLIC_KEY),
            name="COMPUTE DH",
        )
        if len(data) != 32:
            raise CardProtocolError(f"COMPUTE DH: expected a 32-byte P-256 secret, got {len(data)}")
        return data

    @_one_transaction
    def ecdh(self, private_key: IotSafeRef, peer_slot: IotSafeRef, peer_point: bytes) -> bytes:
        """`put_public_key` of the peer's point into ``peer_slot``, then `compute_dh` with it,
        in one card transaction: no other client's key can land in the slot in between."""
        self.put_public_key(peer_slot, peer_point)
        return self.compute_dh(private_key, peer_slot)

    def compute_prf(self, secret: IotSafeRef | bytes, label_seed: bytes, length: int) -> bytes:
        """COMPUTE PRF (P1 00) [card §3]: TLS 1.2 PRF SHA-256 (RFC 5246 §5) of a secret-key
        object (or a secret given as bytes) over label||seed, ``length`` bytes."""
        data, _ = self._exchange(
            INS_COMPUTE_PRF, 0x00, 0x00, encode_prf(secret, label_seed, length), name="COMPUTE PRF"
        )
        if len(data) != length:
            raise CardProtocolError(f"COMPUTE PRF: asked {length} bytes, got {len(data)}")
        return data

    def compute_hkdf(
        self,
        secret: IotSafeRef | bytes,
        salt: bytes,
        *,
        info: bytes | None = None,
        length: int | None = None,
        hash_name: str = "sha256",
    ) -> bytes:
        """COMPUTE HKDF [card §3]: RFC 5869 over a secret-key object (or IKM bytes) and
        ``salt``: the PRK (extract) without ``info``/``length``, else ``length`` bytes of OKM
        (extract and expand)."""
        data, _ = self._exchange(
            INS_COMPUTE_HKDF,
            0x00,
            0x00,
            encode_hkdf(secret, salt, info=info, length=length, hash_name=hash_name),
            name="COMPUTE HKDF",
        )
        want = length if length is not None else HASHES_BY_NAME[hash_name]
        if len(data) != want:
            raise CardProtocolError(f"COMPUTE HKDF: expected {want} bytes, got {len(data)}")
        return data

    # other ---------------------------------------------------------------------------------

    def get_random(self, length: int) -> bytes:
        if not 1 <= length <= 256:
            raise InputError("GET RANDOM length must be 1..256")
        data, _ = self._exchange(INS_GET_RANDOM, 0x00, 0x00, le=length, name="GET RANDOM")
        if len(data) != length:
            raise CardProtocolError(f"GET RANDOM: asked {length} bytes, got {len(data)}")
        return data

    @_one_transaction
    def read_file(self, file: IotSafeRef, *, size: int | None = None, chunk: int = 256) -> bytes:
        """READ FILE [card §6] from offset 0 until ``size``, the DER length, or the end of file.

        Advances by what the card returned (cards cap answers at 240/255/256 bytes); stops at
        the DER length of a certificate so a container larger than its content costs nothing.
        """
        ref = encode_object_ref(file, ObjectKind.FILE)
        out = b""
        limit = size
        while limit is None or len(out) < limit:
            offset = len(out)
            if offset > 0x7FFF:
                raise CardProtocolError("READ FILE: offset beyond 32 KiB")
            want = chunk if limit is None else min(chunk, limit - offset)
            try:
                data, _ = self._exchange(
                    INS_READ_FILE, offset >> 8, offset & 0xFF, ref, want, name="READ FILE"
                )
            except StatusWordError as exc:
                # an offset past the end: 6981 or 6A86 by source, 6B00 by UICC habit [card §6]
                if offset > 0 and exc.sw in (0x6981, 0x6A86, 0x6B00):
                    break
                raise
            if not data:
                break
            out += data
            if limit is None and out[:1] == b"\x30":
                limit = decode_der_length(out)
            # A short answer alone does not mean end of file (cards cap answers at 240/255
            # bytes): without a size, read on until an empty answer or an out-of-bounds SW.
        return out if limit is None else out[:limit]
