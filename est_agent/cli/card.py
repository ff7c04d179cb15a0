"""`est-agent card ...`: diagnostics against whatever card is in the reader.

`card dh` and `card hkdf` print secrets (a shared secret, derived keys): only because the
operator asked, to stdout, never to the log. Exit codes: those of est_agent.errors, and for
`card verify` 0 valid / `EX_SIGNATURE_INVALID` (1) invalid.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING

from est_agent.card.channel import CardSession
from est_agent.card.info import read_card_info
from est_agent.card.uri import DEFAULT_AID, IotSafeRef, ObjectKind, parse_iotsafe_ref
from est_agent.errors import UsageError
from est_agent.transport import open_transport

if TYPE_CHECKING:
    from est_agent.card.iotsafe import IotSafeApplet


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


# -- on-card cryptography: `card verify`, `card dh`, `card hkdf` ------------------------------

#: `card verify`: the signature does not verify (0: it does). Like `cmp` and `openssl dgst
#: -verify`, 1 is "the answer is no", not an error: errors keep their own codes (64, 65, 69, 76)
EX_SIGNATURE_INVALID = 1
#: --peer / --signature / --message files: far larger than any of them is
_INPUT_LIMIT_BYTES = 1 << 20


def _hex_option(text: str, option: str) -> bytes:
    try:
        return bytes.fromhex(text.replace(":", ""))
    except ValueError:
        raise UsageError(f"{option}: not hex") from None  # never echoes the value: may be secret


def _read_input(path: str, option: str) -> bytes:
    from est_agent.errors import InputError
    from est_agent.fileio import read_bounded

    return read_bounded(path, limit_bytes=_INPUT_LIMIT_BYTES, what=option, error=InputError)


def _card_ref(text: str, kind: ObjectKind, option: str) -> IotSafeRef:
    ref = parse_iotsafe_ref(text, default_kind=kind)
    if ref.kind is not kind:
        wanted = {
            ObjectKind.PRIVATE_KEY: "a private key (iotsafe:key-id=..)",
            ObjectKind.PUBLIC_KEY: "a public key object (iotsafe:public-key-id=..)",
            ObjectKind.SECRET_KEY: "a secret-key object (iotsafe:secret-id=..)",
            ObjectKind.FILE: "a file (iotsafe:file-id=..)",
        }[kind]
        raise UsageError(f"{option}: expected {wanted}, got {ref}")
    return ref


@contextlib.contextmanager
def _applet(args: argparse.Namespace) -> Iterator[IotSafeApplet]:
    """The IoT SAFE applet on a logical channel of the card in ``--reader``; closed after."""
    from est_agent.card.iotsafe import IotSafeApplet

    aids = parse_aids([args.aid] if args.aid else None)
    session = CardSession(open_transport(args.reader))
    try:
        session.transport.connect()
        yield IotSafeApplet.open(session, aids=aids, proprietary_cla=not args.iso_cla)
    finally:
        session.close()


def _signature_der(data: bytes) -> bytes:
    """A DER Ecdsa-Sig-Value (RFC 3279 §2.2.3) or raw r||s (64 bytes) as DER; InputError."""
    from cryptography.hazmat.primitives.asymmetric.utils import (
        decode_dss_signature,
        encode_dss_signature,
    )

    from est_agent.errors import InputError

    if len(data) == 64:
        return encode_dss_signature(int.from_bytes(data[:32]), int.from_bytes(data[32:]))
    try:
        r, s = decode_dss_signature(data)
    except ValueError:
        raise InputError("the signature is neither DER nor a 64-byte raw r||s") from None
    return encode_dss_signature(r, s)


def _digest(args: argparse.Namespace) -> bytes:
    from est_agent.errors import InputError

    if args.digest_hex is not None:
        digest = _hex_option(args.digest_hex, "--digest-hex")
        expected = hashlib.new(args.hash).digest_size
        if len(digest) != expected:
            raise InputError(f"--digest-hex: a {args.hash} digest is {expected} bytes")
        return digest
    if args.message_hex is not None:
        message = _hex_option(args.message_hex, "--message-hex")
    else:
        message = _read_input(args.message, "--message")
    return hashlib.new(args.hash, message).digest()


def verify(args: argparse.Namespace) -> int:
    """`card verify`: VERIFY SIGNATURE on the card (GSMA IoT.05, mode 03: the host hashes);
    prints ``valid`` (exit 0) or ``invalid`` (exit `EX_SIGNATURE_INVALID`)."""
    key = _card_ref(args.key, ObjectKind.PUBLIC_KEY, "--key")
    digest = _digest(args)
    if args.signature_hex is not None:
        signature = _signature_der(_hex_option(args.signature_hex, "--signature-hex"))
    else:
        signature = _signature_der(_read_input(args.signature, "--signature"))
    with _applet(args) as applet:
        valid = applet.verify_signature(key, digest, signature)
    print("valid" if valid else "invalid")
    return 0 if valid else EX_SIGNATURE_INVALID


def _peer_point(args: argparse.Namespace) -> bytes:
    """--peer FILE (PEM or DER SubjectPublicKeyInfo) or --peer-hex (SEC 1 point, either
    form): the uncompressed P-256 point; InputError for anything else."""
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import (
        Encoding,
        PublicFormat,
        load_der_public_key,
        load_pem_public_key,
    )

    from est_agent.errors import InputError

    key: object
    try:
        if args.peer_hex is not None:
            raw = _hex_option(args.peer_hex, "--peer-hex")
            key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), raw)
        else:
            data = _read_input(args.peer, "--peer")
            loader = load_pem_public_key if b"-----BEGIN" in data else load_der_public_key
            key = loader(data)
    except ValueError:
        raise InputError("the peer public key is not a P-256 point or public key") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise InputError("the peer public key is not a P-256 (secp256r1) key")
    return key.public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)


def dh(args: argparse.Namespace) -> int:
    """`card dh`: PUT PUBLIC KEY of the peer into ``--peer-slot``, COMPUTE DH with ``--key``;
    prints the shared x-coordinate as hex (with ``--generate``: the card's new public point
    first, on its own line). The operator asked for the secret: it goes to stdout only."""
    key = _card_ref(args.key, ObjectKind.PRIVATE_KEY, "--key")
    slot = _card_ref(args.peer_slot, ObjectKind.PUBLIC_KEY, "--peer-slot")
    point = _peer_point(args)
    with _applet(args) as applet:
        generated = applet.generate_key_pair(key) if args.generate else None
        applet.put_public_key(slot, point)
        shared = applet.compute_dh(key, slot)
    if generated is not None:
        print(generated.public_point.hex())
    print(shared.hex())
    return 0


def hkdf(args: argparse.Namespace) -> int:
    """`card hkdf`: COMPUTE HKDF over a secret-key object; the PRK (no --info/--length) or
    --length bytes of OKM, as hex on stdout (asked for by the operator; never logged)."""
    secret = _card_ref(args.secret, ObjectKind.SECRET_KEY, "--secret")
    salt = _hex_option(args.salt, "--salt")
    info = None if args.info is None else _hex_option(args.info, "--info")
    if (info is None) != (args.length is None):
        raise UsageError("--info and --length go together (neither: HKDF-Extract only)")
    with _applet(args) as applet:
        out = applet.compute_hkdf(
            secret, salt, info=info, length=args.length, hash_name=args.hash
        )
    print(out.hex())
    return 0
