"""The virtual SIM opened in process, and a minimal card-signed CSR for the EST tests.

`build_csr` is deliberately small and independent of `est_agent.csr` (built with asn1crypto
from the RFC 2986 structure): it lets these tests drive the EST client before, and apart
from, the project's own CSR builder.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from asn1crypto import csr as asn1_csr
from asn1crypto import keys as asn1_keys
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from est_agent.backends.iotsafe import CardSigner
from est_agent.backends.signer import Signer, public_key_from_point
from est_agent.card.channel import CardSession
from est_agent.card.iotsafe import IotSafeApplet
from est_agent.card.uri import IotSafeRef, ObjectKind
from est_agent.sim.personalize import personalize
from est_agent.sim.transport import SimTransport
from est_agent.testserver import DevPki

BOOTSTRAP_KEY = IotSafeRef(ObjectKind.PRIVATE_KEY, object_id=b"\x01")
BOOTSTRAP_CERT_FILE = IotSafeRef(ObjectKind.FILE, object_id=b"\x01")
OP_KEY_A = IotSafeRef(ObjectKind.PRIVATE_KEY, object_id=b"\x02")
OP_KEY_B = IotSafeRef(ObjectKind.PRIVATE_KEY, object_id=b"\x03")


@dataclass
class SimCard:
    transport: SimTransport
    applet: IotSafeApplet
    bootstrap_cert: x509.Certificate
    bootstrap: CardSigner

    def new_key(self, ref: IotSafeRef) -> CardSigner:
        """GENERATE KEY PAIR in an operational slot; a signer for the new key."""
        point = self.applet.generate_key_pair(ref).public_point
        return CardSigner(self.applet, ref, public_key_from_point(point))

    def close(self) -> None:
        self.applet.close()
        self.transport.close()


def open_sim_card(path: Path) -> SimCard:
    transport = SimTransport(path)
    applet = IotSafeApplet.open(CardSession(transport))
    cert = x509.load_der_x509_certificate(applet.read_file(BOOTSTRAP_CERT_FILE))
    public_key = cert.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    return SimCard(transport, applet, cert, CardSigner(applet, BOOTSTRAP_KEY, public_key))


def build_csr(
    signer: Signer,
    *,
    subject_der: bytes | None = None,
    san_der: bytes | None = None,
    dns_names: tuple[str, ...] = ("device-1.example",),
    challenge_password: str | None = None,
) -> bytes:
    """A PKCS#10 request (RFC 2986) for the signer's key, signed by `signer` (one signature).

    `subject_der` / `san_der` (raw GeneralNames) are copied as bytes when given, as RFC 7030
    §4.2.2 re-enrollment needs; else CN=device-1 and `dns_names`.
    """
    spki = signer.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    subject = (
        asn1_x509.Name.load(subject_der)
        if subject_der is not None
        else asn1_x509.Name.build({"common_name": "device-1"})
    )
    if san_der is not None:
        names = asn1_x509.GeneralNames.load(san_der)
    else:
        names = asn1_x509.GeneralNames([asn1_x509.GeneralName("dns_name", n) for n in dns_names])
    attributes = []
    if len(names):
        extensions = asn1_x509.Extensions(
            [{"extn_id": "subject_alt_name", "critical": False, "extn_value": names}]
        )
        attributes.append({"type": "extension_request", "values": [extensions]})
    if challenge_password is not None:
        attributes.append(
            {
                "type": "challenge_password",
                "values": [asn1_csr.DirectoryString("printable_string", challenge_password)],
            }
        )
    info = asn1_csr.CertificationRequestInfo(
        {
            "version": "v1",
            "subject": subject,
            "subject_pk_info": asn1_keys.PublicKeyInfo.load(spki),
            "attributes": attributes,
        }
    )
    signature = signer.sign_digest(hashlib.sha256(info.dump()).digest())
    request = asn1_csr.CertificationRequest(
        {
            "certification_request_info": info,
            "signature_algorithm": {"algorithm": "sha256_ecdsa"},
            "signature": signature,
        }
    )
    der: bytes = request.dump()
    x509.load_der_x509_csr(der)  # parses, or the test fails here rather than at the server
    return der


def raw_subject_and_san(cert: x509.Certificate) -> tuple[bytes, bytes | None]:
    tbs = asn1_x509.Certificate.load(cert.public_bytes(Encoding.DER))["tbs_certificate"]
    san = None
    for ext in tbs["extensions"] if tbs["extensions"].native is not None else []:
        if ext["extn_id"].native == "subject_alt_name":
            san = bytes(ext["extn_value"].contents)
    return bytes(tbs["subject"].dump()), san


def personalized_sim(directory: Path, pki: DevPki) -> bytes:
    """A fresh virtual SIM's state, its bootstrap certificate from `pki`'s bootstrap CA."""
    path = directory / "sim.json"
    ca = pki.bootstrap_ca
    personalize(path, iccid="8988247000001234567", bootstrap_ca=(ca.certificate, ca.key))
    return path.read_bytes()


@contextmanager
def sim_from(directory: Path, template: bytes) -> Iterator[SimCard]:
    """A copy of `template` in `directory`, opened as a card; closed afterwards."""
    path = directory / "sim.json"
    path.write_bytes(template)
    card = open_sim_card(path)
    try:
        yield card
    finally:
        card.close()
