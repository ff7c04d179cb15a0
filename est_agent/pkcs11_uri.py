"""``pkcs11:`` URIs (RFC 7512): which token, which object, and how to log in. Pure parsing.

    pkcs11:token=Device;object=est-slot-a;type=private?module-path=/usr/lib/x.so&pin-source=file:/etc/pin

Path attributes (``;``-separated, RFC 7512 §2.3) select the token and the object; query
attributes (``&``-separated) say how to reach it: ``module-path``, ``module-name``,
``pin-value``, ``pin-source``. Every value is percent-decoded (RFC 3986 §2.1); ``id`` is the
object's ``CKA_ID`` as percent-encoded *bytes* (``id=%01%a2``), the other values are UTF-8 text.

An unknown path attribute is refused: a consumer that does not understand one cannot tell
which object is meant (RFC 7512 §3.3: such a URI matches nothing), and a typo here must not make
the agent write to an object the operator did not name. Unknown query attributes (``x-``
vendor ones, RFC 7512 §2.3) are kept and ignored. An attribute given twice is refused.

The PIN never appears in ``str()`` / ``repr()`` of a `Pkcs11Uri` (it is left out of the
comparison too: two URIs naming the same object with different PINs are the same object).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, unquote_to_bytes

from est_agent.errors import InputError

__all__ = ["OBJECT_TYPES", "Pkcs11Uri", "is_pkcs11_uri", "parse_pkcs11_uri"]

SCHEME = "pkcs11:"
#: RFC 7512 §2.3 pk11-type values
OBJECT_TYPES = ("public", "private", "cert", "secret-key", "data")
_PATH_ATTRS = (
    "token",
    "manufacturer",
    "serial",
    "model",
    "library-manufacturer",
    "library-description",
    "library-version",
    "object",
    "type",
    "id",
    "slot-description",
    "slot-manufacturer",
    "slot-id",
)
_QUERY_ATTRS = ("pin-source", "pin-value", "module-name", "module-path")
# RFC 3986 §2.1: "%" followed by two hex digits; a lone "%" is malformed
_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
# pk11-*-res-avail (RFC 7512 §2.3): what stays unencoded when the URI is written back
_SAFE = ":[]@!$'()*+,=&-._~/"


def is_pkcs11_uri(text: str) -> bool:
    return text[: len(SCHEME)].lower() == SCHEME


@dataclass(frozen=True)
class Pkcs11Uri:
    """A parsed ``pkcs11:`` URI. ``id`` is bytes, everything else text; None when absent."""

    token: str | None = None
    manufacturer: str | None = None
    serial: str | None = None
    model: str | None = None
    object: str | None = None
    type: str | None = None
    id: bytes | None = None
    slot_id: int | None = None
    module_path: str | None = None
    module_name: str | None = None
    #: secrets: excluded from repr and equality
    pin_value: str | None = field(default=None, repr=False, compare=False)
    pin_source: str | None = field(default=None, compare=False)
    #: attributes parsed but not used here (library-*, slot-description, x-* query ...)
    other: tuple[tuple[str, str], ...] = field(default=(), compare=False)

    def with_type(self, kind: str) -> Pkcs11Uri:
        """The same token and object, another object class (key URI -> its certificate)."""
        from dataclasses import replace

        return replace(self, type=kind)

    def pin_file(self) -> Path | None:
        """``pin-source=file:/path`` or a plain path (RFC 7512 §2.3 leaves the form open)."""
        if self.pin_source is None:
            return None
        text = self.pin_source
        if text.lower().startswith("file:"):
            text = text[5:]
            if text.startswith("//"):
                text = text[2:]  # file:///etc/pin -> /etc/pin (empty authority)
        if not text:
            raise InputError("pin-source: empty file path")
        return Path(text)

    @property
    def selector(self) -> str:
        """Object label and/or id, for messages (no PIN, no module)."""
        parts = []
        if self.object is not None:
            parts.append(f"object={_q(self.object)}")
        if self.id is not None:
            parts.append("id=" + "".join(f"%{b:02x}" for b in self.id))
        return ";".join(parts) or "(any object)"

    def __str__(self) -> str:
        """The URI without ``pin-value`` (the PIN is never printed)."""
        path: list[str] = []
        for name, value in (
            ("token", self.token),
            ("manufacturer", self.manufacturer),
            ("serial", self.serial),
            ("model", self.model),
            ("object", self.object),
            ("type", self.type),
        ):
            if value is not None:
                path.append(f"{name}={_q(value)}")
        if self.id is not None:
            path.append("id=" + "".join(f"%{b:02x}" for b in self.id))
        if self.slot_id is not None:
            path.append(f"slot-id={self.slot_id}")
        query = [
            f"{name}={_q(value)}"
            for name, value in (
                ("module-path", self.module_path),
                ("module-name", self.module_name),
                ("pin-source", self.pin_source),
            )
            if value is not None
        ]
        return SCHEME + ";".join(path) + ("?" + "&".join(query) if query else "")


def _q(text: str) -> str:
    return quote(text, safe=_SAFE.replace(";", "").replace("&", "").replace("?", ""))


def _decode(name: str, raw: str) -> bytes:
    if _BAD_PERCENT.search(raw):
        raise InputError(f"pkcs11 URI: {name}: malformed percent-encoding in {raw!r}")
    return unquote_to_bytes(raw)


def _text(name: str, raw: str) -> str:
    try:
        return _decode(name, raw).decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(f"pkcs11 URI: {name} is not UTF-8 text") from None


def _pairs(part: str, sep: str, where: str) -> list[tuple[str, str]]:
    pairs = []
    for item in part.split(sep):
        if not item:
            continue  # "pkcs11:" and a trailing separator name nothing
        name, eq, value = item.partition("=")
        if not eq or not name:
            raise InputError(f"pkcs11 URI: expected name=value in the {where}, got {item!r}")
        pairs.append((name.lower(), value))
    return pairs


def parse_pkcs11_uri(text: str) -> Pkcs11Uri:
    """Parse an RFC 7512 URI; `InputError` naming the attribute on anything malformed."""
    if not is_pkcs11_uri(text):
        raise InputError(f"not a pkcs11: URI: {text!r}")
    if "\x00" in text or any(c in text for c in "\r\n"):
        raise InputError("pkcs11 URI contains a control character")
    path, _, query = text[len(SCHEME) :].partition("?")
    values: dict[str, object] = {}
    other: list[tuple[str, str]] = []
    seen: set[str] = set()
    for name, raw in _pairs(path, ";", "path"):
        if name in seen:
            raise InputError(f"pkcs11 URI: {name} given twice")
        seen.add(name)
        if name not in _PATH_ATTRS and not name.startswith("x-"):
            raise InputError(
                f"pkcs11 URI: unknown path attribute {name!r} (RFC 7512 §2.3; known: "
                f"{', '.join(_PATH_ATTRS)})"
            )
        if name == "id":
            decoded_id = _decode(name, raw)
            if not decoded_id:
                raise InputError("pkcs11 URI: empty id")
            values["id"] = decoded_id
        elif name == "slot-id":
            slot = _text(name, raw)
            if not slot.isdigit():
                raise InputError(f"pkcs11 URI: slot-id is a decimal number, got {slot!r}")
            values["slot_id"] = int(slot)
        elif name == "type":
            kind = _text(name, raw)
            if kind not in OBJECT_TYPES:
                raise InputError(
                    f"pkcs11 URI: type is one of {', '.join(OBJECT_TYPES)}, got {kind!r}"
                )
            values["type"] = kind
        elif name in ("token", "manufacturer", "serial", "model", "object"):
            values[name] = _text(name, raw)
        else:
            other.append((name, _text(name, raw)))
    for name, raw in _pairs(query, "&", "query"):
        if name in seen:
            raise InputError(f"pkcs11 URI: {name} given twice")
        seen.add(name)
        if name in _QUERY_ATTRS:
            value = _text(name, raw)
            if not value:
                raise InputError(f"pkcs11 URI: {name} is empty")
            values[name.replace("-", "_")] = value
        else:
            other.append((name, _text(name, raw)))  # §2.3: unknown query attributes ignored
    if "pin_value" in values and "pin_source" in values:
        raise InputError("pkcs11 URI: pin-value and pin-source both given (use one)")
    return Pkcs11Uri(other=tuple(other), **values)  # type: ignore[arg-type]
