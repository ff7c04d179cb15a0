"""`est-agent card ...`: diagnostics against whatever card is in the reader."""

from __future__ import annotations

import argparse
import json

from est_agent.card.channel import CardSession
from est_agent.card.info import CardInfo, read_card_info
from est_agent.card.iotsafe import DEFAULT_AID
from est_agent.errors import UsageError
from est_agent.transport import open_transport


def _aids(values: list[str] | None) -> tuple[bytes, ...]:
    if not values:
        return (DEFAULT_AID,)
    try:
        aids = tuple(bytes.fromhex(v) for v in values)
    except ValueError:
        raise UsageError(f"--aid must be hex, got {values}") from None
    if any(not 5 <= len(a) <= 16 for a in aids):
        raise UsageError("an AID is 5 to 16 bytes")
    return aids


def info(args: argparse.Namespace) -> int:
    aids = _aids(args.aid)
    transport = open_transport(args.reader)
    session = CardSession(transport)
    try:
        transport.connect()
        card = read_card_info(session, aids=aids, proprietary_cla=not args.iso_cla)
    finally:
        session.close()
    if args.json:
        print(json.dumps(card.to_json(), indent=2))
    else:
        print(render_card_info(card))
    return 0


def render_card_info(card: CardInfo) -> str:
    a = card.applet
    lines = [
        f"reader:   {card.reader}",
        f"ATR:      {card.atr.hex(' ').upper() or '-'}",
        f"ICCID:    {card.iccid or '-'}",
        f"applet:   IoT SAFE {card.aid.hex().upper()} version {a.version}",
        f"          max files {a.max_files}, private keys {a.max_private_keys}, public keys "
        f"{a.max_public_keys}, secret keys {a.max_secret_keys}, sessions {a.max_sessions}",
        "objects:",
    ]
    for obj in card.objects:
        oid = obj.object_id.hex().upper() if obj.object_id is not None else "-"
        state = "activated" if obj.activated else "empty"
        extra = f", {obj.file_size} bytes" if obj.file_size is not None else ""
        lines.append(
            f"  {obj.type.name.lower().replace('_', ' '):12} id {oid:6} label "
            f"{obj.label or '-':16} {state}{extra}"
        )
    return "\n".join(lines)
