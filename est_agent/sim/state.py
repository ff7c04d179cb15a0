"""Everything the virtual SIM remembers across power cycles, and its one state file.

The state is the card's non-volatile memory: the UICC file tree, the IoT SAFE applet's object
store (private key scalars included: this file *is* the card's secure memory, so it is written
with mode 0600 and no APDU ever returns a private key), the ICCID and the card serial that makes
each card's ATR distinct. Logical channels, selections and sessions are volatile and live in
``VirtualCard``.

File format (JSON, bytes as upper-case hex)::

    {"format": "est-agent-virtual-sim", "version": 1,
     "sha256": "<hex SHA-256 of the canonical JSON of 'card'>",
     "card": {"iccid": "8988...", "serial": "<8 bytes>",
              "mf": {"fid": "3F00", "name": "", "efs": [...], "dfs": [...]},
              "applet": {"private_keys": [...], "public_keys": [...], "files": [...],
                         "secret_keys": [...]}}}

``secret_keys`` may be absent (a file written before secret-key objects existed): none then.

The checksum is taken over ``json.dumps(card, sort_keys=True, separators=(",", ":"))`` so the
file may be pretty-printed; it catches truncation and bit rot, and hand edits that forgot it.
Writes go through `fileio.atomic_write` (a temporary file in the same directory, fsynced, renamed
over the old file, the directory fsynced): a crash leaves either the old or the new state, never
a mix. Reads go through `fileio.read_bounded`: a FIFO, a device or a file over
`fileio.SIM_STATE_LIMIT_BYTES` is refused before it is read.
"""

from __future__ import annotations

import enum
import hashlib
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from est_agent.card.iotsafe_codes import (
    ACCESS_READ,
    CRYPTO_KEY_DERIVATION,
    CRYPTO_SIGNATURE,
    DERIVATION_HKDF,
    DERIVATION_TLS12_PRF,
    FILE_USAGE_GENERAL,
    HASH_SHA256,
    HASH_SHA384,
    HASH_SHA512,
    KEY_TYPE_HMAC,
    KEY_TYPE_P256,
    KEY_USAGE_GENERAL,
    MAX_ID_BYTES,
    MAX_LABEL_BYTES,
    SIGNATURE_ECDSA,
)
from est_agent.errors import SimStateError
from est_agent.fileio import SIM_STATE_LIMIT_BYTES, atomic_write, read_bounded

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "MF_FID",
    "AccessRule",
    "AppletState",
    "CardState",
    "DedicatedFile",
    "ElementaryFile",
    "FileObject",
    "KeyObject",
    "PrivateKeyObject",
    "PublicKeyObject",
    "SecretKeyObject",
    "decode_state",
    "encode_state",
    "load_state",
    "save_state",
]

FORMAT = "est-agent-virtual-sim"
FORMAT_VERSION = 1

MF_FID = b"\x3f\x00"
_MAX_EF_SIZE = 0x7FFF  # READ/UPDATE BINARY carry a 15-bit offset (TS 102 221 §11.1.3)

_SCALAR_BYTES = 32
_POINT_BYTES = 65
_SERIAL_BYTES = 8
#: the largest secret a secret-key object holds (an HMAC key longer than the SHA-512 block is
#: hashed first, RFC 2104 §3, so more would add nothing)
MAX_SECRET_BYTES = 128


class AccessRule(enum.Enum):
    """Access condition of a UICC EF operation; ADM is never satisfied (no ADM keys here)."""

    ALWAYS = "always"
    ADM = "adm"
    NEVER = "never"


@dataclass
class ElementaryFile:
    """A transparent EF; its size is ``len(data)`` and never changes."""

    fid: bytes
    data: bytes
    read: AccessRule = AccessRule.ALWAYS
    update: AccessRule = AccessRule.ALWAYS

    @property
    def size(self) -> int:
        return len(self.data)


@dataclass
class DedicatedFile:
    """The MF or a DF; ``name`` is the DF name SELECT by name (P1 04) matches, if any."""

    fid: bytes
    efs: list[ElementaryFile] = field(default_factory=list)
    dfs: list[DedicatedFile] = field(default_factory=list)
    name: bytes = b""


@dataclass(kw_only=True)
class KeyObject:
    """What private and public key slots share: their GET DATA info (docs/iot-safe-card.md §4)."""

    object_id: bytes
    label: str
    access: int
    key_type: int = KEY_TYPE_P256
    usage: int = KEY_USAGE_GENERAL
    crypto_functions: int = CRYPTO_SIGNATURE
    signature_algorithms: int = SIGNATURE_ECDSA
    # SHA-256/384/512 with ECDSA P-256 (a state file written before keeps what it stored)
    hash_algorithms: int = HASH_SHA256 | HASH_SHA384 | HASH_SHA512
    key_agreement_algorithms: int = 0x00


@dataclass(kw_only=True)
class PrivateKeyObject(KeyObject):
    """A private key slot. ``scalar`` is empty while the slot is empty (state 00)."""

    public_id: bytes  # the public key object GENERATE KEY PAIR fills alongside
    access: int = 0x00
    scalar: bytes = field(default=b"", repr=False)

    @property
    def filled(self) -> bool:
        return bool(self.scalar)


@dataclass(kw_only=True)
class PublicKeyObject(KeyObject):
    """A public key slot; ``point`` is the SEC1 uncompressed point ``04||X||Y`` or empty."""

    access: int = ACCESS_READ
    point: bytes = b""

    @property
    def filled(self) -> bool:
        return bool(self.point)


@dataclass
class FileObject:
    """An applet file container: ``capacity`` bytes at most, ``data`` as provisioned."""

    object_id: bytes
    label: str
    capacity: int
    access: int = ACCESS_READ
    usage: int = FILE_USAGE_GENERAL
    data: bytes = b""

    @property
    def filled(self) -> bool:
        return bool(self.data)


@dataclass(kw_only=True)
class SecretKeyObject:
    """A secret-key object (GET DATA container ``C4``): a PSK / HMAC-capable key (type ``A0``)
    the key-derivation commands (COMPUTE PRF / COMPUTE HKDF) take as their secret. ``value`` is
    empty while the object is empty (state 00); no command ever answers it."""

    object_id: bytes
    label: str
    access: int = 0x00  # neither read nor update from the device
    key_type: int = KEY_TYPE_HMAC
    crypto_functions: int = CRYPTO_KEY_DERIVATION
    key_derivation_algorithms: int = DERIVATION_TLS12_PRF | DERIVATION_HKDF
    value: bytes = field(default=b"", repr=False)

    @property
    def filled(self) -> bool:
        return bool(self.value)


@dataclass
class AppletState:
    """The IoT SAFE object store, fixed by the issuer (devices create no objects)."""

    private_keys: list[PrivateKeyObject] = field(default_factory=list)
    public_keys: list[PublicKeyObject] = field(default_factory=list)
    files: list[FileObject] = field(default_factory=list)
    secret_keys: list[SecretKeyObject] = field(default_factory=list)


@dataclass
class CardState:
    iccid: str
    serial: bytes
    mf: DedicatedFile
    applet: AppletState


# -- encoding ------------------------------------------------------------------------------


def _hex(value: bytes) -> str:
    return value.hex().upper()


def _ef_to_json(ef: ElementaryFile) -> dict[str, Any]:
    return {
        "fid": _hex(ef.fid),
        "read": ef.read.value,
        "update": ef.update.value,
        "data": _hex(ef.data),
    }


def _df_to_json(df: DedicatedFile) -> dict[str, Any]:
    return {
        "fid": _hex(df.fid),
        "name": _hex(df.name),
        "efs": [_ef_to_json(ef) for ef in df.efs],
        "dfs": [_df_to_json(child) for child in df.dfs],
    }


def _key_attributes(key: KeyObject) -> dict[str, Any]:
    return {
        "id": _hex(key.object_id),
        "label": key.label,
        "access": key.access,
        "key_type": key.key_type,
        "usage": key.usage,
        "crypto_functions": key.crypto_functions,
        "signature_algorithms": key.signature_algorithms,
        "hash_algorithms": key.hash_algorithms,
        "key_agreement_algorithms": key.key_agreement_algorithms,
    }


def _card_to_json(state: CardState) -> dict[str, Any]:
    applet = state.applet
    return {
        "iccid": state.iccid,
        "serial": _hex(state.serial),
        "mf": _df_to_json(state.mf),
        "applet": {
            "private_keys": [
                {**_key_attributes(k), "public_id": _hex(k.public_id), "scalar": _hex(k.scalar)}
                for k in applet.private_keys
            ],
            "public_keys": [
                {**_key_attributes(k), "point": _hex(k.point)} for k in applet.public_keys
            ],
            "files": [
                {
                    "id": _hex(f.object_id),
                    "label": f.label,
                    "capacity": f.capacity,
                    "access": f.access,
                    "usage": f.usage,
                    "data": _hex(f.data),
                }
                for f in applet.files
            ],
            "secret_keys": [
                {
                    "id": _hex(k.object_id),
                    "label": k.label,
                    "access": k.access,
                    "key_type": k.key_type,
                    "crypto_functions": k.crypto_functions,
                    "key_derivation_algorithms": k.key_derivation_algorithms,
                    "value": _hex(k.value),
                }
                for k in applet.secret_keys
            ],
        },
    }


def _checksum(card: Any) -> str:
    canonical = json.dumps(card, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


def encode_state(state: CardState) -> bytes:
    """The state file's bytes (validated first, so that no invalid file is ever written)."""
    card = _card_to_json(state)
    _card_from_json(card)
    document = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "sha256": _checksum(card),
        "card": card,
    }
    return (json.dumps(document, indent=2, ensure_ascii=True) + "\n").encode("ascii")


# -- decoding ------------------------------------------------------------------------------


class _InvalidError(Exception):
    """Content error inside the state document; ``where`` is a JSON path."""


_T = TypeVar("_T")


def _field(obj: Any, key: str, kind: type[_T], where: str) -> _T:
    if not isinstance(obj, dict):
        raise _InvalidError(f"{where}: expected an object")
    if key not in obj:
        raise _InvalidError(f"{where}.{key}: missing")
    value = obj[key]
    # bool is an int subclass: a JSON true must not pass as a number
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise _InvalidError(f"{where}.{key}: expected {kind.__name__}")
    return value


def _bytes_field(obj: Any, key: str, where: str, sizes: Iterable[int] | None = None) -> bytes:
    text = _field(obj, key, str, where)
    try:
        value = bytes.fromhex(text)
    except ValueError:
        raise _InvalidError(f"{where}.{key}: not hex") from None
    if sizes is not None and len(value) not in set(sizes):
        raise _InvalidError(f"{where}.{key}: wrong length {len(value)}")
    return value


def _byte_field(obj: Any, key: str, where: str, maximum: int = 0xFF) -> int:
    value = _field(obj, key, int, where)
    if not 0 <= value <= maximum:
        raise _InvalidError(f"{where}.{key}: out of range")
    return value


def _list_field(obj: Any, key: str, where: str) -> list[Any]:
    return _field(obj, key, list, where)


def _object_id(obj: Any, key: str, where: str) -> bytes:
    return _bytes_field(obj, key, where, range(1, MAX_ID_BYTES + 1))


def _label(obj: Any, where: str) -> str:
    label = _field(obj, "label", str, where)
    if len(label.encode("utf-8")) > MAX_LABEL_BYTES:
        raise _InvalidError(f"{where}.label: longer than {MAX_LABEL_BYTES} bytes")
    return label


def _ef_from_json(obj: Any, where: str) -> ElementaryFile:
    rules = {rule.value: rule for rule in AccessRule}
    read = _field(obj, "read", str, where)
    update = _field(obj, "update", str, where)
    if read not in rules or update not in rules:
        raise _InvalidError(f"{where}: access rule must be one of {sorted(rules)}")
    data = _bytes_field(obj, "data", where)
    if len(data) > _MAX_EF_SIZE:
        raise _InvalidError(f"{where}.data: larger than {_MAX_EF_SIZE} bytes")
    return ElementaryFile(_bytes_field(obj, "fid", where, (2,)), data, rules[read], rules[update])


def _df_from_json(obj: Any, where: str) -> DedicatedFile:
    df = DedicatedFile(
        fid=_bytes_field(obj, "fid", where, (2,)),
        name=_bytes_field(obj, "name", where, range(17)),
        efs=[
            _ef_from_json(item, f"{where}.efs[{i}]")
            for i, item in enumerate(_list_field(obj, "efs", where))
        ],
        dfs=[
            _df_from_json(item, f"{where}.dfs[{i}]")
            for i, item in enumerate(_list_field(obj, "dfs", where))
        ],
    )
    fids = [ef.fid for ef in df.efs] + [child.fid for child in df.dfs]
    if len(set(fids)) != len(fids) or df.fid in fids or MF_FID in fids:
        raise _InvalidError(f"{where}: duplicate file ID")
    return df


def _key_kwargs(obj: Any, where: str) -> dict[str, Any]:
    return {
        "object_id": _object_id(obj, "id", where),
        "label": _label(obj, where),
        "access": _byte_field(obj, "access", where),
        "key_type": _byte_field(obj, "key_type", where),
        "usage": _byte_field(obj, "usage", where),
        "crypto_functions": _byte_field(obj, "crypto_functions", where),
        "signature_algorithms": _byte_field(obj, "signature_algorithms", where),
        "hash_algorithms": _byte_field(obj, "hash_algorithms", where, 0xFFFF),
        "key_agreement_algorithms": _byte_field(obj, "key_agreement_algorithms", where),
    }


def _private_key_from_json(obj: Any, where: str) -> PrivateKeyObject:
    scalar = _bytes_field(obj, "scalar", where, (0, _SCALAR_BYTES))
    return PrivateKeyObject(
        **_key_kwargs(obj, where), public_id=_object_id(obj, "public_id", where), scalar=scalar
    )


def _public_key_from_json(obj: Any, where: str) -> PublicKeyObject:
    point = _bytes_field(obj, "point", where, (0, _POINT_BYTES))
    if point and point[0] != 0x04:
        raise _InvalidError(f"{where}.point: not an uncompressed point")
    return PublicKeyObject(**_key_kwargs(obj, where), point=point)


def _file_from_json(obj: Any, where: str) -> FileObject:
    capacity = _byte_field(obj, "capacity", where, 0xFFFF)
    data = _bytes_field(obj, "data", where)
    if len(data) > capacity:
        raise _InvalidError(f"{where}.data: larger than the capacity")
    return FileObject(
        object_id=_object_id(obj, "id", where),
        label=_label(obj, where),
        capacity=capacity,
        access=_byte_field(obj, "access", where),
        usage=_byte_field(obj, "usage", where),
        data=data,
    )


def _secret_key_from_json(obj: Any, where: str) -> SecretKeyObject:
    value = _bytes_field(obj, "value", where, range(MAX_SECRET_BYTES + 1))
    return SecretKeyObject(
        object_id=_object_id(obj, "id", where),
        label=_label(obj, where),
        access=_byte_field(obj, "access", where),
        key_type=_byte_field(obj, "key_type", where),
        crypto_functions=_byte_field(obj, "crypto_functions", where),
        key_derivation_algorithms=_byte_field(obj, "key_derivation_algorithms", where),
        value=value,
    )


_O = TypeVar("_O", PrivateKeyObject, PublicKeyObject, FileObject, SecretKeyObject)


def _objects(obj: Any, key: str, where: str, parse: Callable[[Any, str], _O]) -> list[_O]:
    items = [
        parse(item, f"{where}.{key}[{i}]") for i, item in enumerate(_list_field(obj, key, where))
    ]
    ids = [item.object_id for item in items]
    if len(set(ids)) != len(ids):
        raise _InvalidError(f"{where}.{key}: duplicate object ID")
    return items


def _card_from_json(card: Any) -> CardState:
    where = "card"
    iccid = _field(card, "iccid", str, where)
    if not (iccid.isascii() and iccid.isdigit() and 18 <= len(iccid) <= 20):
        raise _InvalidError("card.iccid: must be 18..20 digits")
    mf = _df_from_json(_field(card, "mf", dict, where), "card.mf")
    if mf.fid != MF_FID:
        raise _InvalidError("card.mf.fid: must be 3F00")
    applet_obj = _field(card, "applet", dict, where)
    applet = AppletState(
        private_keys=_objects(applet_obj, "private_keys", "card.applet", _private_key_from_json),
        public_keys=_objects(applet_obj, "public_keys", "card.applet", _public_key_from_json),
        files=_objects(applet_obj, "files", "card.applet", _file_from_json),
        secret_keys=(
            _objects(applet_obj, "secret_keys", "card.applet", _secret_key_from_json)
            if "secret_keys" in applet_obj
            else []
        ),
    )
    public_ids = {k.object_id for k in applet.public_keys}
    for key in applet.private_keys:
        if key.public_id not in public_ids:
            raise _InvalidError(f"card.applet: private key {_hex(key.object_id)} has no public key")
    return CardState(
        iccid=iccid,
        serial=_bytes_field(card, "serial", where, (_SERIAL_BYTES,)),
        mf=mf,
        applet=applet,
    )


def decode_state(raw: bytes, source: str = "state file") -> CardState:
    """Parse and check a state file's bytes; SimStateError says what is wrong (never a value)."""
    try:
        document = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise SimStateError(
            f"{source}: corrupt (not JSON); restore it or personalize again"
        ) from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise SimStateError(f"{source}: not a virtual SIM state file")
    version = document.get("version")
    if version != FORMAT_VERSION:
        raise SimStateError(
            f"{source}: unsupported format version {version!r} (this est-agent reads "
            f"version {FORMAT_VERSION})"
        )
    card = document.get("card")
    if not isinstance(document.get("sha256"), str) or _checksum(card) != document["sha256"]:
        raise SimStateError(f"{source}: checksum mismatch: the file is corrupt or was edited")
    try:
        return _card_from_json(card)
    except _InvalidError as exc:
        raise SimStateError(f"{source}: invalid content at {exc}") from None


def load_state(path: str | os.PathLike[str]) -> CardState:
    """Read a state file; SimStateError when it is missing, unreadable, corrupt or too new."""
    where = os.fspath(path)
    raw = read_bounded(
        where,
        limit_bytes=SIM_STATE_LIMIT_BYTES,
        what="virtual SIM state file",
        error=SimStateError,
        hint_if_missing="personalize a card first",
    )
    return decode_state(raw, f"virtual SIM state file {where}")


def save_state(path: str | os.PathLike[str], state: CardState) -> None:
    """Replace the state file atomically (`fileio.atomic_write`), mode 0600: it holds the
    card's private keys. SimStateError when it cannot be written; the old file is then intact."""
    atomic_write(
        path, encode_state(state), mode=0o600, error=SimStateError, what="virtual SIM state file"
    )
