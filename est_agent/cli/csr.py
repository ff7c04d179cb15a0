"""`est-agent csr`: print a PEM CSR signed by a key inside the card (diagnostic command)."""

from __future__ import annotations

import argparse
import sys

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from est_agent.backends.iotsafe import CardSigner
from est_agent.card.channel import CardSession
from est_agent.card.iotsafe import IotSafeApplet
from est_agent.card.uri import ObjectKind, parse_iotsafe_ref
from est_agent.cli.card import parse_aids
from est_agent.csr import CsrBuilder, parse_san, parse_subject
from est_agent.errors import UsageError
from est_agent.transport import open_transport

__all__ = ["csr"]


def csr(args: argparse.Namespace) -> int:
    # Everything that can be checked without the card is checked first: a typo must not cost
    # a key generation (which replaces the slot's key) or a card signature.
    key = parse_iotsafe_ref(args.key, default_kind=ObjectKind.PRIVATE_KEY)
    if key.kind is not ObjectKind.PRIVATE_KEY:
        raise UsageError(f"--key must name a private key, got {args.key!r}")
    builder = CsrBuilder().subject(parse_subject(args.subject))
    if args.san:
        builder = builder.subject_alt_names([parse_san(s) for s in args.san])
    builder = builder.eku_client_auth(args.eku_client_auth)
    aid = parse_aids([args.aid] if args.aid else None)[0]

    transport = open_transport(args.reader)
    session = CardSession(transport)
    try:
        transport.connect()
        applet = IotSafeApplet.open(session, aids=(aid,), proprietary_cla=not args.iso_cla)
        try:
            if args.generate:
                applet.generate_key_pair(key)
            signer = CardSigner.from_card(applet, key)
            der = builder.build(signer)
        finally:
            applet.close()
    finally:
        session.close()
    sys.stdout.write(x509.load_der_x509_csr(der).public_bytes(Encoding.PEM).decode("ascii"))
    return 0
