"""The GSMA IoT SAFE applet (IoT.05) as the card sees it; commands as in docs/iot-safe-card.md §3.

Implemented: GET DATA (``CB``), GENERATE KEY PAIR (``B9``), READ PUBLIC KEY (``CD``), GET RANDOM
(``84``), COMPUTE SIGNATURE INIT/UPDATE (``2A``/``2B``) and VERIFY SIGNATURE INIT/UPDATE
(``2C``/``2D``) in modes 01 (full text, the card hashes), 02 (last block, no resumed hash state)
and 03 (pad and sign: the host's digest) with SHA-256/384/512 and ECDSA P-256, PUT PUBLIC KEY
INIT/UPDATE (``24``/``D8``), COMPUTE DH (``46``, ECKA: the raw x-coordinate), COMPUTE PRF
(``48``, TLS 1.2 PRF SHA-256), COMPUTE HKDF (``4A``, RFC 5869 extract, or extract and expand)
and READ FILE (``B0``). Anything else is ``6D00``. The object store is issuer-made: the device
creates no objects and writes no files (docs/iot-safe-card.md §7); ``put_file`` is the
simulated-OTA back door for that. The only objects a command writes are public keys (PUT PUBLIC
KEY, on objects whose access allows update) and key pairs (GENERATE KEY PAIR).

Private key scalars and secret-key values are only ever used inside ``ecc`` and
``derivation``; no answer built here contains one. COMPUTE DH answers the shared secret itself
(what every public client expects of it: no form writes it into a secret-key object), so a
derived secret leaves the card by design; a secret-key object's value never does.
Volatile applet state (signature/verification/put-key sessions, the object-list cursor) is kept
per logical channel and dropped on deselection, channel close and reset.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from est_agent.card import iotsafe_codes as iot
from est_agent.card.apdu import CommandApdu
from est_agent.card.tlv import decode_tlvs, encode_tlv
from est_agent.errors import CardProtocolError, InputError
from est_agent.sim import derivation, ecc
from est_agent.sim.options import CardOptions
from est_agent.sim.reply import (
    SW_CONDITIONS,
    SW_INCORRECT_DATA,
    SW_INS_NOT_SUPPORTED,
    SW_MORE_DATA,
    SW_OK,
    SW_P1P2,
    SW_REF_NOT_FOUND,
    SW_SECURITY,
    SW_SIGNATURE_MISMATCH,
    SW_WRONG_LENGTH,
    Reply,
)
from est_agent.sim.signing import split_message_block
from est_agent.sim.state import (
    AppletState,
    CardState,
    FileObject,
    PrivateKeyObject,
    PublicKeyObject,
    SecretKeyObject,
)

__all__ = [
    "APPLET_IDENTIFIER",
    "MAX_SESSIONS",
    "IotSafeApplet",
    "generate_key_pair",
    "put_file",
]

#: sessions per command family and channel; numbers 0..MAX_SESSIONS-1 (GET DATA tag B7)
MAX_SESSIONS = 4
APPLET_VERSION = 0x01
#: GET DATA tag 11 is 32 bytes (Orange's IoT-SAFE-APDU-library issue #2; docs/iot-safe-card.md §4)
APPLET_IDENTIFIER = b"est-agent virtual IoT SAFE".ljust(32, b"\x00")


#: GET DATA tag 91: the hashes COMPUTE/VERIFY SIGNATURE take (IoT.05 §2.5 table B)
_OFFERED_HASHES = iot.HASH_SHA256 | iot.HASH_SHA384 | iot.HASH_SHA512


class _RefusedError(Exception):
    """A command handler gives up with this status word."""

    def __init__(self, sw: int) -> None:
        super().__init__(f"{sw:04X}")
        self.sw = sw


class _Named(Protocol):
    object_id: bytes
    label: str


_O = TypeVar("_O", PrivateKeyObject, PublicKeyObject, FileObject, SecretKeyObject)
_K = TypeVar("_K")
_V = TypeVar("_V")
#: the most PUT PUBLIC KEY UPDATE fragments add up to: a P-256 `49 { 86 point }` is 69 bytes
_MAX_PUT_KEY_BYTES = 512
#: the most bytes a derivation answers: one short response APDU (ISO/IEC 7816-4 §5.1)
_MAX_DERIVED_BYTES = 256
#: the hash names COMPUTE HKDF takes in its tag 91, by bit (the same table as the signatures)
_HKDF_HASHES = iot.HASHES


def _tlvs(cmd: CommandApdu) -> dict[int, bytes]:
    """The data field as tag → value; 6700 when empty, 6A80 when malformed or repeated."""
    if not cmd.data:
        raise _RefusedError(SW_WRONG_LENGTH)
    try:
        items = decode_tlvs(cmd.data)
    except CardProtocolError:
        raise _RefusedError(SW_INCORRECT_DATA) from None
    tags = {item.tag: item.value for item in items}
    if len(tags) != len(items):
        raise _RefusedError(SW_INCORRECT_DATA)
    return tags


def _pick(
    tlvs: dict[int, bytes],
    container: int,
    objects: Sequence[_O],
    id_of: Callable[[_O], bytes],
) -> _O:
    """The one object an ID or a label TLV names (IoT.05: never both); ``container`` is the
    kind's info container tag (its ID and label tags are in ``iot.REF_TAGS``)."""
    id_tag, label_tag = iot.REF_TAGS[container]
    object_id = tlvs.get(id_tag)
    label = tlvs.get(label_tag)
    if (object_id is None) == (label is None):
        raise _RefusedError(SW_INCORRECT_DATA)
    for obj in objects:
        if object_id is not None and id_of(obj) == object_id:
            return obj
        if label is not None and obj.label.encode("utf-8") == label:
            return obj
    raise _RefusedError(SW_REF_NOT_FOUND)


@dataclass
class _PutKeySession:
    """An open PUT PUBLIC KEY session: the target object and the ``34`` fragments so far."""

    object_id: bytes
    received: bytes = b""


def _output_length(value: bytes | None) -> int:
    """Tag D3: the output length, 1 or 2 bytes big-endian, 1..256; else 6A80."""
    if value is None or len(value) not in (1, 2):
        raise _RefusedError(SW_INCORRECT_DATA)
    length = int.from_bytes(value, "big")
    if not 1 <= length <= _MAX_DERIVED_BYTES:
        raise _RefusedError(SW_INCORRECT_DATA)
    return length


def _check_only(tlvs: dict[int, bytes], allowed: set[int]) -> None:
    if set(tlvs) - allowed:
        raise _RefusedError(SW_INCORRECT_DATA)


def _own_id(obj: _Named) -> bytes:
    return obj.object_id


def _check_p1p2(cmd: CommandApdu) -> None:
    if cmd.p1 or cmd.p2:
        raise _RefusedError(SW_P1P2)


def _close_or_check_open(
    cmd: CommandApdu, sessions: MutableMapping[_K, _V], key: _K
) -> Reply | None:
    """The INIT of a session command (GSMA IoT.05: P1 00 opens, P1 01 closes, P2 the session
    number): the close's reply, None for an open, 6A86 for any other P1. The change happens once
    the reply is delivered (``transient``)."""
    _check_session(cmd.p2)
    if cmd.p1 == iot.P1_CLOSE:

        def close_session() -> None:
            # Closing a session that is not open is harmless: clients do it to clear stale ones.
            sessions.pop(key, None)

        return Reply(SW_OK, transient=close_session)
    if cmd.p1 != iot.P1_OPEN:
        raise _RefusedError(SW_P1P2)
    return None


def _opened(sessions: MutableMapping[_K, _V], key: _K, session: _V) -> Reply:
    """The INIT's reply that opens ``session`` (replacing one already open under ``key``)."""

    def open_session() -> None:
        sessions[key] = session

    return Reply(SW_OK, transient=open_session)


def _check_session(p2: int) -> None:
    if p2 >= MAX_SESSIONS:
        raise _RefusedError(SW_P1P2)


@dataclass(frozen=True)
class _Algorithms:
    """What a COMPUTE/VERIFY SIGNATURE INIT asked for (tags A1, 91, 92)."""

    mode: int
    hash_bit: int

    @property
    def hash_name(self) -> str:
        return iot.HASHES[self.hash_bit][0]

    @property
    def digest_size(self) -> int:
        return iot.HASHES[self.hash_bit][1]


def _check_algorithms(tlvs: dict[int, bytes]) -> _Algorithms:
    """Modes 01 (full text), 02 (last block) and 03 (pad and sign), SHA-256/384/512 and ECDSA
    (GET DATA 90/91/92). A value the card does not offer is incorrect data (6A80): 6A86 is
    for P1-P2 only (ISO/IEC 7816-4 §5.6)."""
    mode, hash_alg, sig_alg = (
        tlvs.get(tag) for tag in (iot.TAG_MODE, iot.TAG_HASH_ALGS, iot.TAG_SIG_ALGS)
    )
    if mode is None or hash_alg is None or sig_alg is None or len(mode) != 1:
        raise _RefusedError(SW_INCORRECT_DATA)
    if mode[0] not in (iot.MODE_FULL_TEXT, iot.MODE_LAST_BLOCK, iot.MODE_PAD_AND_SIGN):
        raise _RefusedError(SW_INCORRECT_DATA)
    hash_bit = int.from_bytes(hash_alg, "big") if len(hash_alg) == 2 else 0
    if hash_bit not in iot.HASHES or sig_alg != bytes((iot.SIGNATURE_ECDSA,)):
        raise _RefusedError(SW_INCORRECT_DATA)
    return _Algorithms(mode[0], hash_bit)


def _check_key_use(key: PrivateKeyObject | PublicKeyObject, algorithms: _Algorithms) -> None:
    if not (
        key.crypto_functions & iot.CRYPTO_SIGNATURE
        and key.signature_algorithms & iot.SIGNATURE_ECDSA
        and key.hash_algorithms & algorithms.hash_bit
        and key.filled
    ):
        raise _RefusedError(SW_CONDITIONS)


@dataclass
class _Session:
    """An open signature/verification session: its key, algorithms, and (mode 01) the hash of
    the message so far plus the bytes a total-length 9B still owes."""

    object_id: bytes
    algorithms: _Algorithms
    hasher: Any = None  # hashlib object (mode 01), fresh after each last block
    remaining: int = 0
    started: bool = False

    def fresh_hash(self) -> Any:
        return hashlib.new(self.algorithms.hash_name)


def _signature_value(data: bytes) -> tuple[int, int] | None:
    """(r, s) of exactly one tag-33 TLV (1-byte, BER or 2-byte length; raw r||s or DER)."""
    try:
        items = decode_tlvs(data)
    except CardProtocolError:
        return None
    if len(items) != 1 or items[0].tag != iot.TAG_SIGNATURE:
        return None
    return ecc.decode_signature(items[0].value)


def _is_signature_tlv(data: bytes) -> bool:
    return _signature_value(data) is not None


def _public_key_tlv(point: bytes) -> bytes:
    ecc_key = encode_tlv(iot.TAG_ECC_KEY, encode_tlv(iot.TAG_EC_POINT, point))
    return encode_tlv(iot.TAG_PUBLIC_KEY, ecc_key)


def _ecc_point(encoding: bytes) -> bytes | None:
    """The P-256 point of an ECC key encoding ``49 { 86 04||X||Y }``; None unless exactly that
    with a point on the curve."""
    try:
        outer = decode_tlvs(encoding)
        if len(outer) != 1 or outer[0].tag != iot.TAG_ECC_KEY:
            return None
        inner = decode_tlvs(outer[0].value)
    except CardProtocolError:
        return None
    if len(inner) != 1 or inner[0].tag != iot.TAG_EC_POINT:
        return None
    point = inner[0].value
    return point if ecc.is_valid_point(point) else None


def _install_key_pair(applet: AppletState, private_id: bytes, scalar: bytes, point: bytes) -> None:
    private = next(k for k in applet.private_keys if k.object_id == private_id)
    public = next(k for k in applet.public_keys if k.object_id == private.public_id)
    private.scalar = scalar
    public.point = point


def generate_key_pair(applet: AppletState, private_id: bytes) -> bytes:
    """The card's own key generation into a private key slot and its public key slot.

    Returns the public point. No policy check here: the factory may fill slots that a device
    may not (the bootstrap key); GENERATE KEY PAIR checks crypto function bit 02 itself.
    """
    if not any(k.object_id == private_id for k in applet.private_keys):
        raise InputError(f"no private key object {private_id.hex().upper()}")
    scalar, point = ecc.generate_key_pair()
    _install_key_pair(applet, private_id, scalar, point)
    return point


def put_file(applet: AppletState, file_id: bytes, data: bytes) -> None:
    """Simulated OTA: place ``data`` in a file container (no APDU can do this, IoT.05 §3.12)."""
    for obj in applet.files:
        if obj.object_id == file_id:
            if len(data) > obj.capacity:
                raise InputError(
                    f"{len(data)} bytes do not fit file {file_id.hex().upper()} "
                    f"(capacity {obj.capacity})"
                )
            obj.data = bytes(data)
            return
    raise InputError(f"no file object {file_id.hex().upper()}")


class IotSafeApplet:
    """Answers IoT SAFE commands for the channels on which it is selected."""

    def __init__(self, options: CardOptions) -> None:
        self._options = options
        # (channel, INIT INS, session number) -> the open session (key object, algorithms)
        self._sessions: dict[tuple[int, int, int], _Session] = {}
        # channel -> index of the next object-list container (P2 01 continues from there)
        self._list_cursor: dict[int, int] = {}
        # (channel, session number) -> the open PUT PUBLIC KEY session
        self._put_sessions: dict[tuple[int, int], _PutKeySession] = {}
        self._handlers: dict[int, Callable[[int, CommandApdu, AppletState], Reply]] = {
            iot.INS_GET_DATA: self._get_data,
            iot.INS_GENERATE_KEY_PAIR: self._generate_key_pair,
            iot.INS_READ_PUBLIC_KEY: self._read_public_key,
            iot.INS_GET_RANDOM: self._get_random,
            iot.INS_SIGN_INIT: self._sign_init,
            iot.INS_SIGN_UPDATE: self._sign_update,
            iot.INS_VERIFY_INIT: self._verify_init,
            iot.INS_VERIFY_UPDATE: self._verify_update,
            iot.INS_READ_FILE: self._read_file,
            iot.INS_PUT_PUBLIC_KEY_INIT: self._put_key_init,
            iot.INS_PUT_PUBLIC_KEY_UPDATE: self._put_key_update,
            iot.INS_COMPUTE_DH: self._compute_dh,
            iot.INS_COMPUTE_PRF: self._compute_prf,
            iot.INS_COMPUTE_HKDF: self._compute_hkdf,
        }

    def reset(self) -> None:
        self._sessions.clear()
        self._list_cursor.clear()
        self._put_sessions.clear()

    def deselect(self, channel: int) -> None:
        """Drop the channel's sessions, as a Java Card applet's transient state is on deselect."""
        self._sessions = {k: v for k, v in self._sessions.items() if k[0] != channel}
        self._list_cursor.pop(channel, None)
        self._put_sessions = {k: v for k, v in self._put_sessions.items() if k[0] != channel}

    def process(self, channel: int, cmd: CommandApdu, applet: AppletState) -> Reply:
        handler = self._handlers.get(cmd.ins)
        if handler is None:
            return Reply(SW_INS_NOT_SUPPORTED)
        try:
            return handler(channel, cmd, applet)
        except _RefusedError as refused:
            return Reply(refused.sw)

    # -- identifiers -----------------------------------------------------------------------

    def _public_id(self, key: PublicKeyObject) -> bytes:
        """The ID a public key has on the APDU interface (see ``CardOptions.pubkey_id_offset``)."""
        offset = self._options.pubkey_id_offset
        if not offset:
            return key.object_id
        return key.object_id[:-1] + bytes(((key.object_id[-1] + offset) & 0xFF,))

    # -- GET DATA --------------------------------------------------------------------------

    def _app_info(self, applet: AppletState) -> bytes:
        def count(n: int) -> bytes:
            return bytes((min(n, 0xFF),))

        # every function, algorithm and count below is one this applet carries out (a test
        # reads this answer and tries each advertised capability, and a few that are not)
        functions = (
            iot.CRYPTO_SIGNATURE
            | iot.CRYPTO_KEY_GENERATION
            | iot.CRYPTO_KEY_AGREEMENT
            | iot.CRYPTO_KEY_DERIVATION
        )

        return b"".join(
            (
                encode_tlv(iot.TAG_APPLET_VERSION, bytes((APPLET_VERSION,))),
                encode_tlv(iot.TAG_APPLET_ID, APPLET_IDENTIFIER),
                encode_tlv(iot.TAG_MAX_FILES, count(len(applet.files))),
                encode_tlv(iot.TAG_MAX_PRIVATE_KEYS, count(len(applet.private_keys))),
                encode_tlv(iot.TAG_MAX_PUBLIC_KEYS, count(len(applet.public_keys))),
                encode_tlv(iot.TAG_MAX_SECRET_KEYS, count(len(applet.secret_keys))),
                encode_tlv(iot.TAG_CRYPTO_FUNCTIONS, bytes((functions,))),
                encode_tlv(iot.TAG_HASH_ALGS, _OFFERED_HASHES.to_bytes(2, "big")),
                encode_tlv(iot.TAG_SIG_ALGS, bytes((iot.SIGNATURE_ECDSA,))),
                encode_tlv(iot.TAG_KEY_AGREEMENT_ALGS, bytes((iot.KEY_AGREEMENT_ECKA,))),
                encode_tlv(
                    iot.TAG_KEY_DERIVATION_ALGS,
                    bytes((iot.DERIVATION_TLS12_PRF | iot.DERIVATION_HKDF,)),
                ),
                encode_tlv(iot.TAG_MAX_SESSIONS, bytes((MAX_SESSIONS,))),
            )
        )

    @staticmethod
    def _key_container(
        tag: int,
        key: PrivateKeyObject | PublicKeyObject,
        key_id: bytes,
    ) -> bytes:
        id_tag, label_tag = iot.REF_TAGS[tag]
        body = b"".join(
            (
                encode_tlv(label_tag, key.label.encode("utf-8")) if key.label else b"",
                encode_tlv(id_tag, key_id),
                encode_tlv(iot.TAG_ACCESS, bytes((key.access,))),
                encode_tlv(iot.TAG_STATE, b"\x01" if key.filled else b"\x00"),
                encode_tlv(iot.TAG_KEY_TYPE, bytes((key.key_type,))),
                encode_tlv(iot.TAG_KEY_USAGE, bytes((key.usage,))),
                encode_tlv(iot.TAG_OBJECT_FUNCTIONS, bytes((key.crypto_functions,))),
                encode_tlv(iot.TAG_SIG_ALGS, bytes((key.signature_algorithms,))),
                encode_tlv(iot.TAG_HASH_ALGS, key.hash_algorithms.to_bytes(2, "big")),
                (
                    encode_tlv(iot.TAG_OBJECT_KEY_AGREEMENT, bytes((key.key_agreement_algorithms,)))
                    if key.key_agreement_algorithms
                    else b""
                ),
            )
        )
        return encode_tlv(tag, body)

    def _private_container(self, key: PrivateKeyObject) -> bytes:
        return self._key_container(iot.CONTAINER_PRIVATE_KEY, key, key.object_id)

    def _public_container(self, key: PublicKeyObject) -> bytes:
        return self._key_container(iot.CONTAINER_PUBLIC_KEY, key, self._public_id(key))

    @staticmethod
    def _secret_container(key: SecretKeyObject) -> bytes:
        """``C4``: 76 label, 86 ID, 60, 4A, 4B key type, 61, 94 key-derivation algorithms
        (docs/iot-safe-card.md §4); never the value."""
        body = b"".join(
            (
                encode_tlv(iot.TAG_SECRET_KEY_LABEL, key.label.encode("utf-8"))
                if key.label
                else b"",
                encode_tlv(iot.TAG_SECRET_KEY_ID, key.object_id),
                encode_tlv(iot.TAG_ACCESS, bytes((key.access,))),
                encode_tlv(iot.TAG_STATE, b"\x01" if key.filled else b"\x00"),
                encode_tlv(iot.TAG_KEY_TYPE, bytes((key.key_type,))),
                encode_tlv(iot.TAG_OBJECT_FUNCTIONS, bytes((key.crypto_functions,))),
                encode_tlv(iot.TAG_OBJECT_KEY_DERIVATION, bytes((key.key_derivation_algorithms,))),
            )
        )
        return encode_tlv(iot.CONTAINER_SECRET_KEY, body)

    @staticmethod
    def _file_container(obj: FileObject) -> bytes:
        body = b"".join(
            (
                encode_tlv(iot.TAG_FILE_LABEL, obj.label.encode("utf-8")) if obj.label else b"",
                encode_tlv(iot.TAG_FILE_ID, obj.object_id),
                encode_tlv(iot.TAG_ACCESS, bytes((obj.access,))),
                encode_tlv(iot.TAG_STATE, b"\x01" if obj.filled else b"\x00"),
                encode_tlv(iot.TAG_FILE_USAGE, bytes((obj.usage,))),
                # the size big-endian, as Thales' and wolfSSL's code read it
                # (docs/iot-safe-card.md §4)
                encode_tlv(iot.TAG_FILE_SIZE, len(obj.data).to_bytes(2, "big")),
            )
        )
        return encode_tlv(iot.CONTAINER_FILE, body)

    def _containers(self, applet: AppletState) -> list[bytes]:
        # Orange's parser wants private keys, public keys, (secret keys,) files, in that
        # order (docs/iot-safe-card.md §4)
        return (
            [self._private_container(k) for k in applet.private_keys]
            + [self._public_container(k) for k in applet.public_keys]
            + [self._secret_container(k) for k in applet.secret_keys]
            + [self._file_container(f) for f in applet.files]
        )

    def _object_list(self, channel: int, cmd: CommandApdu, applet: AppletState) -> Reply:
        if cmd.p2 == 0x00:
            start = 0
        elif cmd.p2 == 0x01:
            cursor = self._list_cursor.get(channel)
            if cursor is None:
                raise _RefusedError(SW_CONDITIONS)
            start = cursor
        else:
            raise _RefusedError(SW_P1P2)
        containers = self._containers(applet)
        end = start
        size = 0
        while end < len(containers):
            size += len(containers[end])
            # a container larger than a page still goes out, alone
            if size > self._options.object_list_page_bytes and end > start:
                break
            end += 1
        more = end < len(containers)

        def move_cursor() -> None:
            if more:
                self._list_cursor[channel] = end
            else:
                self._list_cursor.pop(channel, None)

        page = b"".join(containers[start:end])
        return Reply(SW_MORE_DATA if more else SW_OK, page, exact=True, transient=move_cursor)

    def _get_data(self, channel: int, cmd: CommandApdu, applet: AppletState) -> Reply:
        if cmd.p1 == iot.GET_DATA_APP_INFO:
            if cmd.p2:
                raise _RefusedError(SW_P1P2)
            return Reply(SW_OK, self._app_info(applet), exact=True)
        if cmd.p1 == iot.GET_DATA_OBJECT_LIST:
            return self._object_list(channel, cmd, applet)
        if cmd.p1 not in (
            iot.CONTAINER_PRIVATE_KEY,
            iot.CONTAINER_PUBLIC_KEY,
            iot.CONTAINER_FILE,
            iot.CONTAINER_SECRET_KEY,
        ):
            raise _RefusedError(SW_P1P2)
        if cmd.p2:
            raise _RefusedError(SW_P1P2)
        tlvs = _tlvs(cmd)
        if cmd.p1 == iot.CONTAINER_PRIVATE_KEY:
            private = _pick(tlvs, iot.CONTAINER_PRIVATE_KEY, applet.private_keys, _own_id)
            data = self._private_container(private)
        elif cmd.p1 == iot.CONTAINER_PUBLIC_KEY:
            public = _pick(tlvs, iot.CONTAINER_PUBLIC_KEY, applet.public_keys, self._public_id)
            data = self._public_container(public)
        elif cmd.p1 == iot.CONTAINER_SECRET_KEY:
            secret = _pick(tlvs, iot.CONTAINER_SECRET_KEY, applet.secret_keys, _own_id)
            data = self._secret_container(secret)
        else:
            data = self._file_container(_pick(tlvs, iot.CONTAINER_FILE, applet.files, _own_id))
        return Reply(SW_OK, data, exact=True)

    # -- keys ------------------------------------------------------------------------------

    def _paired_public(self, applet: AppletState, private: PrivateKeyObject) -> PublicKeyObject:
        for key in applet.public_keys:
            if key.object_id == private.public_id:
                return key
        raise _RefusedError(SW_REF_NOT_FOUND)

    def _generate_key_pair(self, channel: int, cmd: CommandApdu, applet: AppletState) -> Reply:
        _check_p1p2(cmd)
        private = _pick(_tlvs(cmd), iot.CONTAINER_PRIVATE_KEY, applet.private_keys, _own_id)
        if not private.crypto_functions & iot.CRYPTO_KEY_GENERATION:
            raise _RefusedError(SW_CONDITIONS)
        public = self._paired_public(applet, private)
        scalar, point = ecc.generate_key_pair()
        private_id = private.object_id

        def install(state: CardState) -> None:
            _install_key_pair(state.applet, private_id, scalar, point)

        data = (
            encode_tlv(iot.TAG_PRIVATE_KEY_ID, private.object_id)
            + encode_tlv(iot.TAG_PUBLIC_KEY_ID, self._public_id(public))
            + _public_key_tlv(point)
        )
        return Reply(SW_OK, data, exact=True, update=install)

    def _read_public_key(self, channel: int, cmd: CommandApdu, applet: AppletState) -> Reply:
        _check_p1p2(cmd)
        public = _pick(_tlvs(cmd), iot.CONTAINER_PUBLIC_KEY, applet.public_keys, self._public_id)
        if not public.access & iot.ACCESS_READ:
            raise _RefusedError(SW_SECURITY)
        if not public.filled:
            raise _RefusedError(SW_CONDITIONS)
        return Reply(SW_OK, _public_key_tlv(public.point), exact=True)

    def _get_random(self, channel: int, cmd: CommandApdu, applet: AppletState) -> Reply:
        _check_p1p2(cmd)
        if cmd.le is None or cmd.le > 256:
            raise _RefusedError(SW_WRONG_LENGTH)
        return Reply(SW_OK, secrets.token_bytes(cmd.le))

    # -- sessions --------------------------------------------------------------------------

    def _init(
        self,
        channel: int,
        cmd: CommandApdu,
        pick: Callable[[dict[int, bytes]], PrivateKeyObject | PublicKeyObject],
    ) -> Reply:
        key = (channel, cmd.ins, cmd.p2)
        if (closed := _close_or_check_open(cmd, self._sessions, key)) is not None:
            return closed
        tlvs = _tlvs(cmd)
        obj = pick(tlvs)
        algorithms = _check_algorithms(tlvs)
        _check_key_use(obj, algorithms)
        return _opened(self._sessions, key, _Session(obj.object_id, algorithms))

    def _session_update(
        self, channel: int, cmd: CommandApdu, init_ins: int, *, verify: bool
    ) -> tuple[_Session, bytes | None, bytes, Callable[[], None]]:
        """(session, digest or None before the last block, data after the message part, the
        session change to apply once answered) for an UPDATE of an open session."""
        if cmd.p1 not in (iot.P1_LAST_BLOCK, iot.P1_MORE_BLOCKS):
            raise _RefusedError(SW_P1P2)
        _check_session(cmd.p2)
        session = self._sessions.get((channel, init_ins, cmd.p2))
        if session is None:
            raise _RefusedError(SW_CONDITIONS)
        last = cmd.p1 == iot.P1_LAST_BLOCK
        mode = session.algorithms.mode
        if mode != iot.MODE_FULL_TEXT:
            if not last:
                raise _RefusedError(SW_P1P2)  # modes 02 and 03 take one block
            digest, rest = self._digest(cmd, session.algorithms, verify=verify)
            return session, digest, rest, lambda: None
        return self._full_text_update(session, cmd, last=last, verify=verify)

    @staticmethod
    def _full_text_update(
        session: _Session, cmd: CommandApdu, *, last: bool, verify: bool
    ) -> tuple[_Session, bytes | None, bytes, Callable[[], None]]:
        """Mode 01: hash the ``9B`` message blocks (est_agent.sim.signing) on the card."""

        def rest_ok(rest: bytes) -> bool:
            return not rest if not (last and verify) else _is_signature_tlv(rest)

        if not cmd.data:
            raise _RefusedError(SW_WRONG_LENGTH)
        block = split_message_block(
            cmd.data, remaining=session.remaining, first_block=not session.started, rest_ok=rest_ok
        )
        if block is None or (last and block.remaining):
            raise _RefusedError(SW_INCORRECT_DATA)
        hasher = (session.hasher or session.fresh_hash()).copy()
        hasher.update(block.chunk)
        digest = hasher.digest() if last else None

        def advance() -> None:
            if last:
                session.hasher, session.remaining, session.started = None, 0, False
            else:
                session.hasher, session.remaining, session.started = hasher, block.remaining, True

        return session, digest, block.rest, advance

    @staticmethod
    def _digest(cmd: CommandApdu, algorithms: _Algorithms, *, verify: bool) -> tuple[bytes, bytes]:
        """(digest, the data other than the hash) of a mode 02/03 last block."""
        tlvs = _tlvs(cmd)
        if algorithms.mode == iot.MODE_PAD_AND_SIGN:
            digest = tlvs.get(iot.TAG_HASH_VALUE)
            extra = set(tlvs) - {iot.TAG_HASH_VALUE, iot.TAG_SIGNATURE}
        else:
            # Mode 02: the host hashed all but the last block (9A); 9C is the intermediate
            # hash state and 9D the bytes hashed so far. Resuming a SHA-2 state is not offered
            # by the hash libraries used here, so only a message that is all last block (9D
            # absent or zero) is signed; a resumed one is refused as incorrect data.
            block = tlvs.get(iot.TAG_LAST_BLOCK)
            counted = tlvs.get(iot.TAG_HASHED_LENGTH, b"")
            if block is None or any(counted):
                raise _RefusedError(SW_INCORRECT_DATA)
            digest = hashlib.new(algorithms.hash_name, block).digest()
            extra = set(tlvs) - {
                iot.TAG_LAST_BLOCK,
                iot.TAG_INTERMEDIATE_HASH,
                iot.TAG_HASHED_LENGTH,
                iot.TAG_SIGNATURE,
            }
        if digest is None or len(digest) != algorithms.digest_size or extra:
            raise _RefusedError(SW_INCORRECT_DATA)
        signature = tlvs.get(iot.TAG_SIGNATURE)
        if (signature is None) == verify:
            raise _RefusedError(SW_INCORRECT_DATA)
        return digest, b"" if signature is None else encode_tlv(iot.TAG_SIGNATURE, signature)

    def _sign_init(self, channel: int, cmd: CommandApdu, applet: AppletState) -> Reply:
        def key(tlvs: dict[int, bytes]) -> PrivateKeyObject:
            return _pick(tlvs, iot.CONTAINER_PRIVATE_KEY, applet.private_keys, _own_id)

        return self._init(channel, cmd, key)

    def _verify_init(self, channel: int, cmd: CommandApdu, applet: AppletState) -> Reply:
        def key(tlvs: dict[int, bytes]) -> PublicKeyObject:
            return _pick(tlvs, iot.CONTAINER_PUBLIC_KEY, applet.public_keys, self._public_id)

        return self._init(channel, cmd, key)

    def _sign_update(self, channel: int, cmd: CommandApdu, applet: AppletState) -> Reply:
        session, digest, _, advance = self._session_update(
            channel, cmd, iot.INS_SIGN_INIT, verify=False
        )
        private = next((k for k in applet.private_keys if k.object_id == session.object_id), None)
        if private is None or not private.filled:
            raise _RefusedError(SW_CONDITIONS)
        if digest is None:
            return Reply(SW_OK, transient=advance)
        r, s = ecc.sign_digest(private.scalar, digest)
        return Reply(SW_OK, self._signature_tlv(r, s), exact=True, transient=advance)

    def _signature_tlv(self, r: int, s: int) -> bytes:
        fmt = self._options.signature_format
        if fmt == "der":
            # here, not with the card model: cryptography loads on the first key operation
            from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

            return encode_tlv(iot.TAG_SIGNATURE, encode_dss_signature(r, s))
        raw = r.to_bytes(ecc.COORDINATE_BYTES, "big") + s.to_bytes(ecc.COORDINATE_BYTES, "big")
        return encode_tlv(iot.TAG_SIGNATURE, raw, two_byte_length=fmt == "wide")

    def _verify_update(self, channel: int, cmd: CommandApdu, applet: AppletState) -> Reply:
        session, digest, rest, advance = self._session_update(
            channel, cmd, iot.INS_VERIFY_INIT, verify=True
        )
        public = next((k for k in applet.public_keys if k.object_id == session.object_id), None)
        if public is None or not public.filled:
            raise _RefusedError(SW_CONDITIONS)
        if digest is None:
            return Reply(SW_OK, transient=advance)
        rs = _signature_value(rest)
        if rs is None:
            raise _RefusedError(SW_INCORRECT_DATA)
        ok = ecc.verify_digest(public.point, digest, *rs)
        return Reply(SW_OK if ok else SW_SIGNATURE_MISMATCH, transient=advance)

    # -- PUT PUBLIC KEY ----------------------------------------------------------------------

    def _put_key_init(self, channel: int, cmd: CommandApdu, applet: AppletState) -> Reply:
        """INIT (``24``): P1 00 opens a session on a public key object whose access allows
        update (else 6982), P1 01 closes it; P2 the session (docs/iot-safe-card.md §3)."""
        key = (channel, cmd.p2)
        if (closed := _close_or_check_open(cmd, self._put_sessions, key)) is not None:
            return closed
        tlvs = _tlvs(cmd)
        id_tag, label_tag = iot.REF_TAGS[iot.CONTAINER_PUBLIC_KEY]
        _check_only(tlvs, {id_tag, label_tag})
        public = _pick(tlvs, iot.CONTAINER_PUBLIC_KEY, applet.public_keys, self._public_id)
        if not public.access & iot.ACCESS_UPDATE:
            raise _RefusedError(SW_SECURITY)
        if public.key_type != iot.KEY_TYPE_P256:
            raise _RefusedError(SW_CONDITIONS)
        return _opened(self._put_sessions, key, _PutKeySession(public.object_id))

    def _put_key_update(self, channel: int, cmd: CommandApdu, applet: AppletState) -> Reply:
        """UPDATE (``D8``): each block one ``34`` TLV carrying a fragment of the key's
        ``49 { 86 04||X||Y }`` (Thales' PKCS#11 splits it so; one block holds a P-256 key);
        P1 00 more, 80 last. The last block checks the point is on P-256 (SEC 1 §3.2.2) and
        writes it; the session stays open for another key until INIT P1 01."""
        if cmd.p1 not in (iot.P1_LAST_BLOCK, iot.P1_MORE_BLOCKS):
            raise _RefusedError(SW_P1P2)
        _check_session(cmd.p2)
        session = self._put_sessions.get((channel, cmd.p2))
        if session is None:
            raise _RefusedError(SW_CONDITIONS)
        tlvs = _tlvs(cmd)  # 6700 empty, 6A80 malformed or a tag repeated
        if set(tlvs) != {iot.TAG_PUBLIC_KEY}:
            raise _RefusedError(SW_INCORRECT_DATA)
        received = session.received + tlvs[iot.TAG_PUBLIC_KEY]
        if len(received) > _MAX_PUT_KEY_BYTES:
            raise _RefusedError(SW_INCORRECT_DATA)
        if cmd.p1 == iot.P1_MORE_BLOCKS:

            def keep() -> None:
                session.received = received

            return Reply(SW_OK, transient=keep)
        point = _ecc_point(received)
        if point is None:
            raise _RefusedError(SW_INCORRECT_DATA)
        target = session.object_id

        def store(state: CardState) -> None:
            for obj in state.applet.public_keys:
                if obj.object_id == target:
                    obj.point = point

        def restart() -> None:
            session.received = b""

        return Reply(SW_OK, update=store, transient=restart)

    # -- key agreement and derivation -------------------------------------------------------

    def _compute_dh(self, channel: int, cmd: CommandApdu, applet: AppletState) -> Reply:
        """COMPUTE DH (``46``): ECKA between a private key whose functions include key
        agreement (61 bit 04, 6F bit 01 ECKA) and a filled public key object that allows key
        agreement; answers the x-coordinate raw, 32 bytes (docs/iot-safe-card.md §3). A key
        whose usage forbids it, an empty slot, or no peer key put yet: 6985."""
        _check_p1p2(cmd)
        tlvs = _tlvs(cmd)
        _check_only(
            tlvs,
            {*iot.REF_TAGS[iot.CONTAINER_PRIVATE_KEY], *iot.REF_TAGS[iot.CONTAINER_PUBLIC_KEY]},
        )
        private = _pick(tlvs, iot.CONTAINER_PRIVATE_KEY, applet.private_keys, _own_id)
        public = _pick(tlvs, iot.CONTAINER_PUBLIC_KEY, applet.public_keys, self._public_id)
        for key in (private, public):
            if not (
                key.crypto_functions & iot.CRYPTO_KEY_AGREEMENT
                and key.key_agreement_algorithms & iot.KEY_AGREEMENT_ECKA
                and key.key_type == iot.KEY_TYPE_P256
                and key.filled
            ):
                raise _RefusedError(SW_CONDITIONS)
        return Reply(SW_OK, ecc.ecka(private.scalar, public.point), exact=True)

    def _derivation_secret(
        self, tlvs: dict[int, bytes], applet: AppletState, algorithm: int
    ) -> bytes:
        """The secret of a PRF/HKDF: a secret-key object (86/76) allowing ``algorithm`` (else
        6985), or one given in the command (D1); exactly one of them (else 6A80)."""
        given = tlvs.get(iot.TAG_SECRET_VALUE)
        id_tag, label_tag = iot.REF_TAGS[iot.CONTAINER_SECRET_KEY]
        by_ref = id_tag in tlvs or label_tag in tlvs
        if (given is not None) == by_ref:
            raise _RefusedError(SW_INCORRECT_DATA)
        if given is not None:
            if not given:
                raise _RefusedError(SW_INCORRECT_DATA)
            return given
        secret = _pick(tlvs, iot.CONTAINER_SECRET_KEY, applet.secret_keys, _own_id)
        if not (
            secret.crypto_functions & iot.CRYPTO_KEY_DERIVATION
            and secret.key_derivation_algorithms & algorithm
            and secret.filled
        ):
            raise _RefusedError(SW_CONDITIONS)
        return secret.value

    def _compute_prf(self, channel: int, cmd: CommandApdu, applet: AppletState) -> Reply:
        """COMPUTE PRF (``48``): TLS 1.2 PRF SHA-256 (RFC 5246 §5) of the secret over D2
        (label || seed), D3 bytes. P1 00 only: the secret used as it is (Thales' mode 00; its
        PSK premaster modes 01/02 are not offered: 6A86)."""
        _check_p1p2(cmd)
        tlvs = _tlvs(cmd)
        _check_only(
            tlvs,
            {
                iot.TAG_SECRET_VALUE,
                *iot.REF_TAGS[iot.CONTAINER_SECRET_KEY],
                iot.TAG_LABEL_SEED,
                iot.TAG_OUTPUT_LENGTH,
            },
        )
        label_seed = tlvs.get(iot.TAG_LABEL_SEED)
        if not label_seed:
            raise _RefusedError(SW_INCORRECT_DATA)
        length = _output_length(tlvs.get(iot.TAG_OUTPUT_LENGTH))
        secret = self._derivation_secret(tlvs, applet, iot.DERIVATION_TLS12_PRF)
        return Reply(SW_OK, derivation.tls12_prf(secret, label_seed, length), exact=True)

    def _compute_hkdf(self, channel: int, cmd: CommandApdu, applet: AppletState) -> Reply:
        """COMPUTE HKDF (``4A``): RFC 5869 with the hash of tag 91 (SHA-256/384/512) over the
        secret as IKM and the salt D5 (absent or empty: HashLen zeros, §2.2). Without D3 the
        answer is the PRK (extract, as wolfSSL's TLS 1.3 port asks); with D3 it is that many
        bytes of OKM (extract then expand with the info D6, §2.3)."""
        _check_p1p2(cmd)
        tlvs = _tlvs(cmd)
        _check_only(
            tlvs,
            {
                iot.TAG_SECRET_VALUE,
                *iot.REF_TAGS[iot.CONTAINER_SECRET_KEY],
                iot.TAG_SALT,
                iot.TAG_HASH_ALGS,
                iot.TAG_INFO,
                iot.TAG_OUTPUT_LENGTH,
            },
        )
        hash_alg = tlvs.get(iot.TAG_HASH_ALGS)
        hash_bit = int.from_bytes(hash_alg, "big") if hash_alg and len(hash_alg) == 2 else 0
        if hash_bit not in _HKDF_HASHES:
            raise _RefusedError(SW_INCORRECT_DATA)
        hash_name, hash_size = _HKDF_HASHES[hash_bit]
        expand = iot.TAG_OUTPUT_LENGTH in tlvs
        if iot.TAG_INFO in tlvs and not expand:
            raise _RefusedError(SW_INCORRECT_DATA)
        # at most 256 bytes: always within HKDF-Expand's 255 * HashLen (RFC 5869 §2.3)
        length = _output_length(tlvs[iot.TAG_OUTPUT_LENGTH]) if expand else hash_size
        ikm = self._derivation_secret(tlvs, applet, iot.DERIVATION_HKDF)
        prk = derivation.hkdf_extract(hash_name, tlvs.get(iot.TAG_SALT, b""), ikm)
        if not expand:
            return Reply(SW_OK, prk, exact=True)
        okm = derivation.hkdf_expand(hash_name, prk, tlvs.get(iot.TAG_INFO, b""), length)
        return Reply(SW_OK, okm, exact=True)

    # -- files -----------------------------------------------------------------------------

    def _read_file(self, channel: int, cmd: CommandApdu, applet: AppletState) -> Reply:
        obj = _pick(_tlvs(cmd), iot.CONTAINER_FILE, applet.files, _own_id)
        if not obj.access & iot.ACCESS_READ:
            raise _RefusedError(SW_SECURITY)
        if not obj.filled:
            raise _RefusedError(SW_CONDITIONS)
        offset = (cmd.p1 << 8) | cmd.p2
        if offset >= len(obj.data):
            raise _RefusedError(self._options.read_oob_sw)
        # Le 00 or absent: IoT.05 §2.21 answers up to 256 bytes; a smaller Le is a chunk size.
        wanted = 256 if cmd.le is None else min(cmd.le, 256)
        count = min(wanted, self._options.read_file_max, len(obj.data) - offset)
        return Reply(SW_OK, obj.data[offset : offset + count])
