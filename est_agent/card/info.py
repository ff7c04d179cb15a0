"""What is on the card: ICCID, the IoT SAFE applet's capabilities and its objects."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from est_agent.card.channel import CardSession
from est_agent.card.iotsafe import DEFAULT_AID, AppletInfo, IotSafeApplet, ObjectInfo
from est_agent.card.uicc import EF_ICCID, UiccFiles, decode_iccid
from est_agent.errors import StatusWordError

__all__ = ["CardInfo", "read_card_info"]


@dataclass(frozen=True)
class CardInfo:
    reader: str
    atr: bytes
    iccid: str | None
    aid: bytes
    applet: AppletInfo
    objects: tuple[ObjectInfo, ...]

    def to_json(self) -> dict[str, Any]:
        """Plain JSON types; bytes as upper-case hex."""
        a = self.applet
        return {
            "reader": self.reader,
            "atr": self.atr.hex().upper(),
            "iccid": self.iccid,
            "applet": {
                "aid": self.aid.hex().upper(),
                "version": a.version,
                "applet_id": a.applet_id.hex().upper(),
                "max_files": a.max_files,
                "max_private_keys": a.max_private_keys,
                "max_public_keys": a.max_public_keys,
                "max_secret_keys": a.max_secret_keys,
                "crypto_functions": a.crypto_functions,
                "hash_algorithms": a.hash_algorithms,
                "signature_algorithms": a.signature_algorithms,
                "key_agreement_algorithms": a.key_agreement_algorithms,
                "key_derivation_algorithms": a.key_derivation_algorithms,
                "max_sessions": a.max_sessions,
            },
            "objects": [_object_json(o) for o in self.objects],
        }

    def render(self) -> str:
        """The human-readable form `est-agent card info` prints."""
        a = self.applet
        lines = [
            f"reader:   {self.reader}",
            f"ATR:      {self.atr.hex(' ').upper() or '-'}",
            f"ICCID:    {self.iccid or '-'}",
            f"applet:   IoT SAFE {self.aid.hex().upper()} version {a.version}",
            f"          max files {a.max_files}, private keys {a.max_private_keys}, public keys "
            f"{a.max_public_keys}, secret keys {a.max_secret_keys}, sessions {a.max_sessions}",
            "objects:",
        ]
        for obj in self.objects:
            oid = obj.object_id.hex().upper() if obj.object_id is not None else "-"
            state = "activated" if obj.activated else "empty"
            extra = f", {obj.file_size} bytes" if obj.file_size is not None else ""
            lines.append(
                f"  {obj.type.name.lower().replace('_', ' '):12} id {oid:6} label "
                f"{obj.label or '-':16} {state}{extra}"
            )
        return "\n".join(lines)


def _object_json(obj: ObjectInfo) -> dict[str, Any]:
    out: dict[str, Any] = {
        "type": obj.type.name.lower().replace("_", "-"),
        "id": obj.object_id.hex().upper() if obj.object_id is not None else None,
        "label": obj.label,
        "state": "activated" if obj.activated else "empty",
        "access": obj.access,
    }
    for name in ("key_type", "key_usage", "crypto_functions", "file_usage", "file_size"):
        value = getattr(obj, name)
        if value is not None:
            out[name] = value
    return out


def read_card_info(
    session: CardSession, *, aids: tuple[bytes, ...] = (DEFAULT_AID,), proprietary_cla: bool = True
) -> CardInfo:
    """Applet info and object list; the ICCID from EF_ICCID on its own logical channel."""
    applet = IotSafeApplet.open(session, aids=aids, proprietary_cla=proprietary_cla)
    try:
        info = applet.info()
        objects = tuple(applet.objects())
    finally:
        applet.close()
    iccid: str | None = None
    channel = session.open_channel()
    try:
        iccid = decode_iccid(UiccFiles(channel).read(EF_ICCID))
    except StatusWordError:
        iccid = None  # not every card exposes EF_ICCID to the device
    finally:
        channel.close()
    transport = session.transport
    return CardInfo(transport.description, transport.atr, iccid, applet.aid, info, objects)
