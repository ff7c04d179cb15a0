"""Factory personalization of a virtual SIM: what the issuer puts on the card before shipping.

The card gets an ICCID, a bootstrap identity (private key 01 made by the card's own key
generation, which no device command may regenerate, and its certificate in applet file 01),
two empty operational key slots the device fills with GENERATE KEY PAIR, and UICC EFs the
device may use to store issued certificates (7FF0/6F01, 7FF0/6F02), plus an ADM-only EF
(7FF0/6F10) that a device can never update.

For (D)TLS on the card (GSMA IoT.05 key agreement and derivation, as wolfSSL's IoT-SAFE port
uses them) it also gets:

- private key 04 ``ecdh`` (``iotsafe:key-id=04``): key agreement (ECKA) and key generation
  only, no signature: the ephemeral ECDH slot, refilled by GENERATE KEY PAIR for each
  handshake; its public half is public key 04;
- public key 05 ``peer`` (``iotsafe:public-key-id=05``): writable by PUT PUBLIC KEY, the peer's
  (ephemeral) key for COMPUTE DH, or a key VERIFY SIGNATURE checks against;
- secret key 01 ``psk`` (``iotsafe:secret-id=01``): a PSK / HMAC key for COMPUTE PRF and
  COMPUTE HKDF, loaded from the ``psk`` argument (empty, state 00, without one). No command
  reads it.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ed448, ed25519
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from est_agent.card.iotsafe_codes import (
    ACCESS_READ,
    ACCESS_UPDATE,
    CRYPTO_KEY_AGREEMENT,
    CRYPTO_KEY_GENERATION,
    CRYPTO_SIGNATURE,
    FILE_USAGE_X509,
    KEY_AGREEMENT_ECKA,
)
from est_agent.card.uicc import luhn_check_digit
from est_agent.certificates import SIGNING_KEY_USAGE
from est_agent.errors import InputError, SimStateError
from est_agent.sim import ecc
from est_agent.sim.applet import generate_key_pair, put_file
from est_agent.sim.atr import build_atr
from est_agent.sim.state import (
    MAX_SECRET_BYTES,
    MF_FID,
    AccessRule,
    AppletState,
    CardState,
    DedicatedFile,
    ElementaryFile,
    FileObject,
    PrivateKeyObject,
    PublicKeyObject,
    SecretKeyObject,
    save_state,
)

__all__ = [
    "BOOTSTRAP_CERT_FILE_ID",
    "BOOTSTRAP_KEY_ID",
    "ECDH_KEY_ID",
    "OPERATIONAL_KEY_IDS",
    "PEER_PUBLIC_KEY_ID",
    "PSK_SECRET_ID",
    "PersonalizationReport",
    "encode_iccid",
    "luhn_check_digit",
    "personalize",
]

BOOTSTRAP_KEY_ID = b"\x01"
BOOTSTRAP_CERT_FILE_ID = b"\x01"
OPERATIONAL_KEY_IDS = (b"\x02", b"\x03")
#: the ephemeral ECDH key pair (private and public key objects 04)
ECDH_KEY_ID = b"\x04"
#: the public key object PUT PUBLIC KEY fills with the peer's key
PEER_PUBLIC_KEY_ID = b"\x05"
#: the PSK secret-key object
PSK_SECRET_ID = b"\x01"

EF_ICCID = b"\x2f\xe2"
DF_STORE = b"\x7f\xf0"
EF_STORE_A = b"\x6f\x01"
EF_STORE_B = b"\x6f\x02"
EF_ADM_ONLY = b"\x6f\x10"
STORE_EF_BYTES = 2048
ADM_EF_BYTES = 32
_CERT_CAPACITY = 2048
_VALIDITY_YEARS = 20
_ICCID_PREFIX = "8988"  # telecom (89) + a country code, as on the brief's test cards
_ICCID_DIGITS = 19
_ERASED = 0xFF  # the value of never-written EEPROM on SIM cards


@dataclass(frozen=True)
class PersonalizationReport:
    """What personalization created; ``str()`` gives a readable summary."""

    path: Path
    iccid: str
    card_serial: bytes
    atr: bytes
    objects: tuple[str, ...]
    files: tuple[str, ...]
    bootstrap_certificate: x509.Certificate

    def __str__(self) -> str:
        cert = self.bootstrap_certificate
        lines = [
            f"virtual SIM personalized: {self.path}",
            f"  ICCID        {self.iccid}",
            f"  card serial  {self.card_serial.hex().upper()}",
            f"  ATR          {self.atr.hex(' ').upper()}",
            f"  bootstrap certificate: {cert.subject.rfc4514_string()}",
            f"    issuer {cert.issuer.rfc4514_string()}, "
            f"valid until {cert.not_valid_after_utc:%Y-%m-%d}",
            "  IoT SAFE applet objects:",
            *(f"    {line}" for line in self.objects),
            "  UICC files:",
            *(f"    {line}" for line in self.files),
        ]
        return "\n".join(lines)


def _random_iccid() -> str:
    body_digits = _ICCID_DIGITS - len(_ICCID_PREFIX) - 1
    body = _ICCID_PREFIX + "".join(str(secrets.randbelow(10)) for _ in range(body_digits))
    return body + luhn_check_digit(body)


def encode_iccid(iccid: str) -> bytes:
    """EF_ICCID content: BCD, low nibble first, padded with F to 10 bytes (TS 102 221 §13.2)."""
    padded = iccid.ljust(20, "F")
    return bytes(int(padded[i + 1] + padded[i], 16) for i in range(0, 20, 2))


def _check_iccid(iccid: str) -> str:
    if not (iccid.isascii() and iccid.isdigit() and 18 <= len(iccid) <= 20):
        raise InputError(f"ICCID must be 18 to 20 decimal digits, got {iccid!r}")
    return iccid


def _add_years(moment: datetime, years: int) -> datetime:
    try:
        return moment.replace(year=moment.year + years)
    except ValueError:  # 29 February
        return moment.replace(year=moment.year + years, day=28)


def _signature_hash(key: CertificateIssuerPrivateKeyTypes) -> hashes.SHA256 | None:
    # EdDSA signs the message itself; everything else here signs a SHA-256 digest.
    if isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey):
        return None
    return hashes.SHA256()


def _bootstrap_certificate(
    iccid: str,
    scalar: bytes,
    ca: tuple[x509.Certificate, CertificateIssuerPrivateKeyTypes] | None,
    now: datetime,
) -> x509.Certificate:
    device_key = ecc.private_key_from_scalar(scalar)
    public_key = device_key.public_key()
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, f"bootstrap-{iccid}"),
            x509.NameAttribute(NameOID.SERIAL_NUMBER, iccid),
        ]
    )
    if ca is None:
        issuer_name = subject
        issuer_key: CertificateIssuerPrivateKeyTypes = device_key
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(public_key)
    else:
        ca_cert, issuer_key = ca
        issuer_name = ca_cert.subject
        try:
            ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
            aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
        except x509.ExtensionNotFound:
            aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key())  # type: ignore[arg-type]
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(_add_years(now, _VALIDITY_YEARS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(SIGNING_KEY_USAGE, critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(aki, critical=False)
    )
    return builder.sign(issuer_key, _signature_hash(issuer_key))


def _key_agreement_objects() -> tuple[PrivateKeyObject, PublicKeyObject, PublicKeyObject]:
    ecdh = PrivateKeyObject(
        object_id=ECDH_KEY_ID,
        label="ecdh",
        public_id=ECDH_KEY_ID,
        access=ACCESS_UPDATE,
        crypto_functions=CRYPTO_KEY_AGREEMENT | CRYPTO_KEY_GENERATION,
        signature_algorithms=0x00,
        hash_algorithms=0x0000,
        key_agreement_algorithms=KEY_AGREEMENT_ECKA,
    )
    ecdh_public = PublicKeyObject(
        object_id=ECDH_KEY_ID,
        label="ecdh",
        crypto_functions=CRYPTO_KEY_AGREEMENT,
        signature_algorithms=0x00,
        hash_algorithms=0x0000,
        key_agreement_algorithms=KEY_AGREEMENT_ECKA,
    )
    peer = PublicKeyObject(
        object_id=PEER_PUBLIC_KEY_ID,
        label="peer",
        access=ACCESS_READ | ACCESS_UPDATE,
        crypto_functions=CRYPTO_SIGNATURE | CRYPTO_KEY_AGREEMENT,
        key_agreement_algorithms=KEY_AGREEMENT_ECKA,
    )
    return ecdh, ecdh_public, peer


def _applet_store(psk: bytes) -> AppletState:
    def private(object_id: bytes, label: str, functions: int, access: int) -> PrivateKeyObject:
        return PrivateKeyObject(
            object_id=object_id,
            label=label,
            public_id=object_id,
            access=access,
            crypto_functions=functions,
        )

    labels = ("bootstrap", "op-a", "op-b")
    ids = (BOOTSTRAP_KEY_ID, *OPERATIONAL_KEY_IDS)
    ecdh, ecdh_public, peer = _key_agreement_objects()
    return AppletState(
        private_keys=[
            # signature only: no device command can ever replace the bootstrap key
            private(BOOTSTRAP_KEY_ID, "bootstrap", CRYPTO_SIGNATURE, 0x00),
            *(
                private(i, label, CRYPTO_SIGNATURE | CRYPTO_KEY_GENERATION, ACCESS_UPDATE)
                for i, label in zip(OPERATIONAL_KEY_IDS, labels[1:], strict=True)
            ),
            ecdh,
        ],
        public_keys=[
            *(
                PublicKeyObject(object_id=i, label=label, crypto_functions=CRYPTO_SIGNATURE)
                for i, label in zip(ids, labels, strict=True)
            ),
            ecdh_public,
            peer,
        ],
        secret_keys=[SecretKeyObject(object_id=PSK_SECRET_ID, label="psk", value=psk)],
        files=[
            FileObject(
                object_id=BOOTSTRAP_CERT_FILE_ID,
                label="bootstrap-cert",
                capacity=_CERT_CAPACITY,
                access=ACCESS_READ,
                usage=FILE_USAGE_X509,
            )
        ],
    )


def _file_tree(iccid: str) -> DedicatedFile:
    def erased(size: int) -> bytes:
        return bytes((_ERASED,)) * size

    store = DedicatedFile(
        fid=DF_STORE,
        efs=[
            ElementaryFile(EF_STORE_A, erased(STORE_EF_BYTES)),
            ElementaryFile(EF_STORE_B, erased(STORE_EF_BYTES)),
            ElementaryFile(EF_ADM_ONLY, erased(ADM_EF_BYTES), AccessRule.ADM, AccessRule.ADM),
        ],
    )
    ef_iccid = ElementaryFile(EF_ICCID, encode_iccid(iccid), AccessRule.ALWAYS, AccessRule.NEVER)
    return DedicatedFile(fid=MF_FID, efs=[ef_iccid], dfs=[store])


def _describe_objects(applet: AppletState) -> tuple[str, ...]:
    def functions(value: int) -> str:
        names = [n for bit, n in ((1, "sign"), (2, "keygen"), (4, "key agreement")) if value & bit]
        return "+".join(names) or "none"

    lines = [
        f"private key {k.object_id.hex().upper()} {k.label!r}: P-256, "
        f"{'filled' if k.filled else 'empty'}, functions {functions(k.crypto_functions)}"
        for k in applet.private_keys
    ]
    lines += [
        f"public key  {k.object_id.hex().upper()} {k.label!r}: {'filled' if k.filled else 'empty'}"
        for k in applet.public_keys
    ]
    lines += [
        f"secret key  {k.object_id.hex().upper()} {k.label!r}: "
        f"{'filled' if k.filled else 'empty'}"  # never its length or value
        for k in applet.secret_keys
    ]
    lines += [
        f"file        {f.object_id.hex().upper()} {f.label!r}: {len(f.data)} of {f.capacity} bytes"
        for f in applet.files
    ]
    return tuple(lines)


def _describe_files(df: DedicatedFile, prefix: str = "") -> list[str]:
    path = f"{prefix}{df.fid.hex().upper()}"
    lines = [
        f"{path}/{ef.fid.hex().upper()}: {ef.size} bytes, read {ef.read.name}, "
        f"update {ef.update.name}"
        for ef in df.efs
    ]
    for child in df.dfs:
        lines += _describe_files(child, f"{path}/")
    return lines


def personalize(
    path: str | os.PathLike[str],
    *,
    iccid: str | None = None,
    bootstrap_ca: tuple[x509.Certificate, CertificateIssuerPrivateKeyTypes] | None = None,
    now: datetime | None = None,
    force: bool = False,
    psk: bytes = b"",
) -> PersonalizationReport:
    """Create a personalized virtual SIM in ``path``.

    ``bootstrap_ca`` issues the bootstrap certificate (self-signed without it). An existing file
    is only replaced with ``force=True``: it may hold the only copy of a card's keys. ``psk``
    (1..128 bytes) fills secret key 01; nothing reports it but ``filled``.
    """
    if len(psk) > MAX_SECRET_BYTES:
        raise InputError(f"a PSK is at most {MAX_SECRET_BYTES} bytes, got {len(psk)}")
    target = Path(os.fspath(path))
    if not force and target.exists():
        raise SimStateError(f"{target} already exists; refusing to overwrite a card (use force)")
    iccid = _random_iccid() if iccid is None else _check_iccid(iccid)
    moment = datetime.now(UTC) if now is None else now
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    moment = moment.replace(microsecond=0)  # X.509 times have whole seconds

    state = CardState(
        iccid=iccid, serial=secrets.token_bytes(8), mf=_file_tree(iccid), applet=_applet_store(psk)
    )
    generate_key_pair(state.applet, BOOTSTRAP_KEY_ID)
    scalar = next(k.scalar for k in state.applet.private_keys if k.object_id == BOOTSTRAP_KEY_ID)
    certificate = _bootstrap_certificate(iccid, scalar, bootstrap_ca, moment)
    der = certificate.public_bytes(Encoding.DER)
    cert_file = next(f for f in state.applet.files if f.object_id == BOOTSTRAP_CERT_FILE_ID)
    cert_file.capacity = max(cert_file.capacity, len(der))  # a large CA signature still fits
    put_file(state.applet, BOOTSTRAP_CERT_FILE_ID, der)
    save_state(target, state)
    return PersonalizationReport(
        path=target,
        iccid=iccid,
        card_serial=state.serial,
        atr=build_atr(state.serial),
        objects=_describe_objects(state.applet),
        files=tuple(_describe_files(state.mf)),
        bootstrap_certificate=certificate,
    )
