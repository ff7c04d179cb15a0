"""`est-agent token info`: what a PKCS#11 module shows (slots, tokens, mechanisms, objects).

No secrets: object values are never read, only class, label, id and the key attributes that say
whether a key can leave the token (CKA_SENSITIVE, CKA_EXTRACTABLE). Also `provision_bootstrap`:
a bootstrap key pair made on a token and certified by a (test) bootstrap CA, for the demo and
the tests (the CLI layer may use the test server's PKI; the runtime never does).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from est_agent.errors import TokenError, TransportError, UsageError

if TYPE_CHECKING:
    from est_agent.backends.pkcs11 import Pkcs11Backend
    from est_agent.pkcs11_uri import Pkcs11Uri
    from est_agent.testserver.issuer import CertificateAuthority

__all__ = ["info", "provision_bootstrap", "token_info"]

#: the key attributes shown for every key object (booleans, never values)
_KEY_FLAGS = ("TOKEN", "PRIVATE", "SENSITIVE", "EXTRACTABLE", "SIGN")


def _object_row(obj: Any) -> dict[str, Any]:
    import pkcs11
    from pkcs11 import Attribute, ObjectClass

    def get(attr: Any) -> Any:
        try:
            return obj[attr]
        except (pkcs11.PKCS11Error, KeyError):
            return None

    cls = get(Attribute.CLASS)
    row: dict[str, Any] = {
        "class": cls.name.lower() if isinstance(cls, ObjectClass) else str(cls),
        "label": get(Attribute.LABEL),
        "id": (get(Attribute.ID) or b"").hex(),
    }
    if cls in (ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY):
        for flag in _KEY_FLAGS:
            value = get(getattr(Attribute, flag))
            if value is not None:
                row[flag.lower()] = bool(value)
    if cls is ObjectClass.DATA:
        row["application"] = get(Attribute.APPLICATION)
    return row


def token_info(module: str, *, pin: str | None = None) -> dict[str, Any]:
    """Slots with a token, their mechanisms and (logged in with ``pin`` if given) objects."""
    import pkcs11

    from est_agent.backends.pkcs11 import load_module

    lib = load_module(module)
    slots: list[dict[str, Any]] = []
    try:
        for slot in lib.get_slots(token_present=True):
            try:
                token = slot.get_token()
                if not token.flags & pkcs11.TokenFlag.TOKEN_INITIALIZED:
                    raise pkcs11.exceptions.TokenNotRecognised()
            except pkcs11.PKCS11Error as exc:  # e.g. a free slot with an uninitialised token
                slots.append(
                    {
                        "slot_id": slot.slot_id,
                        "description": slot.slot_description.strip(),
                        "error": type(exc).__name__,
                    }
                )
                continue
            mechanisms = sorted(
                m.name if isinstance(m, pkcs11.Mechanism) else hex(m)
                for m in slot.get_mechanisms()
            )
            objects: list[dict[str, Any]] = []
            with token.open(user_pin=pin) as session:
                objects = [_object_row(o) for o in session.get_objects()]
            slots.append(
                {
                    "slot_id": slot.slot_id,
                    "description": slot.slot_description.strip(),
                    "token": token.label.strip(),
                    "manufacturer": token.manufacturer_id.strip(),
                    "model": token.model.strip(),
                    "serial": token.serial.decode("ascii", "replace").strip(),
                    "uri": f"pkcs11:token={token.label.strip()}",
                    "mechanisms": mechanisms,
                    "objects": objects,
                }
            )
    except pkcs11.PKCS11Error as exc:
        from est_agent.backends.pkcs11 import _map_error

        raise _map_error("reading the token list", exc) from None
    return {
        "module": module,
        "library": lib.library_description.strip(),
        "manufacturer": lib.manufacturer_id.strip(),
        "cryptoki_version": ".".join(map(str, lib.cryptoki_version)),
        "slots": slots,
    }


def _render(report: dict[str, Any]) -> str:
    lines = [
        f"module:       {report['module']}",
        f"library:      {report['library']} ({report['manufacturer']}),"
        f" Cryptoki {report['cryptoki_version']}",
    ]
    if not report["slots"]:
        lines.append("no slot with a token")
    for slot in report["slots"]:
        if "error" in slot:
            lines.append(
                f"slot {slot['slot_id']}: {slot['description']}: no initialised token"
                f" ({slot['error']})"
            )
            continue
        lines += [
            f"slot {slot['slot_id']}: {slot['description']}",
            f"  token:      {slot['token']} ({slot['manufacturer']} {slot['model']},"
            f" serial {slot['serial']})",
            f"  uri:        {slot['uri']}",
            f"  mechanisms: {', '.join(slot['mechanisms'])}",
            f"  objects:    {len(slot['objects'])}",
        ]
        for obj in slot["objects"]:
            flags = [f for f in ("sensitive", "extractable", "sign") if obj.get(f)]
            extra = f" [{', '.join(flags)}]" if flags else ""
            where = (
                f"application={obj.get('application')}"
                if obj["class"] == "data"
                else f"id={obj['id']}"
            )
            lines.append(f"    {obj['class']:<12} label={obj['label']!s} {where}{extra}")
    return "\n".join(lines)


def info(args: argparse.Namespace) -> int:
    """`token info --module M [--pin-file F | --pin-env VAR] [--json]`."""
    from est_agent.logs import register_secret
    from est_agent.passwords import read_secret

    if args.pin_file and args.pin_env:
        raise UsageError("--pin-file or --pin-env, not both")
    pin = read_secret(
        file=Path(args.pin_file) if args.pin_file else None,
        env=args.pin_env or None,
        file_key="--pin-file",
        env_key="--pin-env",
    )
    if pin:
        register_secret(pin)
    if not Path(args.module).is_file():
        raise TransportError(f"no PKCS#11 module at {args.module}")
    report = token_info(args.module, pin=pin)
    print(json.dumps(report, indent=2) if args.json else _render(report))
    return 0


def provision_bootstrap(
    backend: Pkcs11Backend,
    key: Pkcs11Uri,
    certificate: Pkcs11Uri,
    ca: CertificateAuthority,
    common_name: str,
) -> None:
    """A bootstrap key pair generated on the token and its certificate from ``ca``, stored as
    the token's certificate object ``certificate`` (factory provisioning, for demo and tests)."""
    from cryptography.hazmat.primitives.serialization import Encoding

    from est_agent.testserver.pki import issue_bootstrap_certificate

    public = backend.generate_key(key)
    cert = issue_bootstrap_certificate(ca, public, common_name)
    if backend.public_key(key) != public:
        raise TokenError("the bootstrap key changed while it was being certified")
    backend.store_certificate(certificate, cert.public_bytes(Encoding.DER))
