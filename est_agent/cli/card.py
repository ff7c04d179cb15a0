"""`est-agent card ...`: diagnostics against whatever card is in the reader."""

from __future__ import annotations

import argparse
import json
import sys

from est_agent.card.channel import CardSession
from est_agent.card.info import read_card_info
from est_agent.card.uri import DEFAULT_AID
from est_agent.errors import UsageError
from est_agent.transport import open_transport


def parse_aids(values: list[str] | None) -> tuple[bytes, ...]:
    """``--aid`` values (hex, 5..16 bytes each, ISO/IEC 7816-4 §12.2.3); the default AID if none."""
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
    aids = parse_aids(args.aid)
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
        print(card.render())
    return 0


def random(args: argparse.Namespace) -> int:
    """`card random N [--hex]`: the bytes through the public API (est_agent/api.py), raw on
    stdout or as one line of hex."""
    from est_agent.api import open_card

    aids = parse_aids([args.aid] if args.aid else None)
    with open_card(args.reader, aids=aids, iso_cla=args.iso_cla) as card:
        data = card.random(args.length)
    if args.hex:
        print(data.hex())
    else:
        sys.stdout.buffer.write(data)
    return 0
