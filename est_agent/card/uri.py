"""Card object addresses as strings, for configuration files and the command line.

iotsafe:key-id=02          IoT SAFE private key by ID (hex bytes, any length)
iotsafe:label=op-a         IoT SAFE key by label (what it names depends on where it is used)
iotsafe:key-label=op-a     explicit forms of the same
iotsafe:file-id=01         IoT SAFE file container by ID
iotsafe:file-label=cert    ... by label
iotsafe:public-key-id=05   IoT SAFE public key object by ID (public-key-label= by label)
iotsafe:secret-id=01       IoT SAFE secret-key object (PSK / HMAC key) by ID (secret-label=)
uicc:path=7FF0/6F01        UICC transparent EF, path from the MF (3F00 implied)

and ``DEFAULT_AID``, the address of the IoT SAFE applet itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

# DEFAULT_AID (the IoT SAFE applet's address) is re-exported here with the other card
# addresses: configuration takes it from this pure module, never from the applet client.
from est_agent.card.iotsafe_codes import DEFAULT_AID, MAX_ID_BYTES, MAX_LABEL_BYTES
from est_agent.errors import InputError

__all__ = [
    "DEFAULT_AID",
    "IotSafeRef",
    "ObjectKind",
    "UiccPath",
    "parse_card_uri",
    "parse_iotsafe_ref",
]




class ObjectKind(Enum):
    PRIVATE_KEY = "key"
    PUBLIC_KEY = "public-key"
    FILE = "file"
    SECRET_KEY = "secret"  # noqa: S105 - the URI field name, not a secret


@dataclass(frozen=True)
class IotSafeRef:
    """An IoT SAFE object addressed by exactly one of ID or label."""

    kind: ObjectKind
    object_id: bytes | None = None
    label: str | None = None

    def __post_init__(self) -> None:
        if (self.object_id is None) == (self.label is None):
            raise InputError("an IoT SAFE reference needs exactly one of id or label")
        if self.object_id is not None and not 1 <= len(self.object_id) <= MAX_ID_BYTES:
            raise InputError(f"IoT SAFE object id must be 1..{MAX_ID_BYTES} bytes")
        if self.label is not None and not 1 <= len(self.label.encode()) <= MAX_LABEL_BYTES:
            raise InputError(f"IoT SAFE label must be 1..{MAX_LABEL_BYTES} bytes")

    def __str__(self) -> str:
        prefix = {ObjectKind.FILE: "file", ObjectKind.SECRET_KEY: "secret"}.get(self.kind, "key")
        if self.object_id is not None:
            return f"iotsafe:{prefix}-id={self.object_id.hex().upper()}"
        return f"iotsafe:{prefix}-label={self.label}"


@dataclass(frozen=True)
class UiccPath:
    """A path of 2-byte file IDs from the MF (which is implied and never listed)."""

    fids: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.fids:
            raise InputError("a UICC path needs at least one file ID")
        for fid in self.fids:
            if not 0 <= fid <= 0xFFFF or fid == 0x3F00:
                raise InputError(f"invalid file ID in UICC path: {fid:04X}")

    def encode(self) -> bytes:
        return b"".join(fid.to_bytes(2, "big") for fid in self.fids)

    def __str__(self) -> str:
        return "uicc:path=" + "/".join(f"{fid:04X}" for fid in self.fids)


def _parse_hex(text: str, what: str) -> bytes:
    try:
        value = bytes.fromhex(text)
    except ValueError:
        raise InputError(f"{what} is not hex: {text!r}") from None
    if not value:
        raise InputError(f"{what} is empty")
    return value


def parse_iotsafe_ref(uri: str, *, default_kind: ObjectKind) -> IotSafeRef:
    """Parse an ``iotsafe:`` URI; ``label=``/``id=`` take ``default_kind``."""
    ref = parse_card_uri(uri, default_kind=default_kind)
    if not isinstance(ref, IotSafeRef):
        raise InputError(f"expected an iotsafe: URI, got {uri!r}")
    return ref


def parse_card_uri(
    uri: str, *, default_kind: ObjectKind = ObjectKind.PRIVATE_KEY
) -> IotSafeRef | UiccPath:
    scheme, sep, rest = uri.partition(":")
    key, eq, value = rest.partition("=")
    if not sep or not eq or not value:
        raise InputError(f"card URI must look like scheme:name=value, got {uri!r}")
    scheme, key = scheme.strip().lower(), key.strip().lower()
    value = value.strip()
    if scheme == "uicc":
        if key != "path":
            raise InputError(f"unknown uicc: URI field {key!r} (expected path=)")
        parts = [p for p in value.replace("\\", "/").split("/") if p]
        fids = []
        for part in parts:
            raw = _parse_hex(part, "UICC file ID")
            if len(raw) != 2:
                raise InputError(f"UICC file ID must be 2 bytes (4 hex digits), got {part!r}")
            fids.append(int.from_bytes(raw, "big"))
        if fids and fids[0] == 0x3F00:
            fids = fids[1:]  # an explicit MF is allowed and implied
        return UiccPath(tuple(fids))
    if scheme != "iotsafe":
        raise InputError(f"unknown card URI scheme {scheme!r} (expected iotsafe: or uicc:)")
    kinds = {
        "key": ObjectKind.PRIVATE_KEY,
        "public-key": ObjectKind.PUBLIC_KEY,
        "file": ObjectKind.FILE,
        "secret": ObjectKind.SECRET_KEY,
    }
    prefix, dash, field = key.rpartition("-")
    if not dash:
        field, kind = key, default_kind
    elif prefix in kinds:
        kind = kinds[prefix]
    else:
        raise InputError(f"unknown iotsafe: URI field {key!r}")
    if field == "id":
        return IotSafeRef(kind, object_id=_parse_hex(value, "IoT SAFE object id"))
    if field == "label":
        return IotSafeRef(kind, label=value)
    raise InputError(f"unknown iotsafe: URI field {key!r} (expected id= or label=)")
