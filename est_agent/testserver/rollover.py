"""A CA root key rollover for the test server and the tests (RFC 7030 §4.1.3, RFC 4210 §4.4).

From the current EST CA (OldWithOld) a new self-signed root (NewWithNew) is made, and the two
link certificates: NewWithOld (the new key, signed by the old key) and OldWithNew (the old key,
signed by the new key). No I/O; the caller decides what "now" is.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from est_agent.testserver.issuer import CertificateAuthority, make_ca, random_serial

__all__ = ["RootRollover", "link_certificate", "make_rollover"]


@dataclass(frozen=True)
class RootRollover:
    old: CertificateAuthority  # OldWithOld and its key
    new: CertificateAuthority  # NewWithNew and its key
    new_with_old: x509.Certificate
    old_with_new: x509.Certificate

    @property
    def four(self) -> list[x509.Certificate]:
        """What /cacerts sends during the overlap."""
        return [self.old.certificate, self.new_with_old, self.old_with_new, self.new.certificate]


def link_certificate(
    subject: x509.Certificate,
    key: ec.EllipticCurvePublicKey,
    signer: CertificateAuthority,
    not_before: datetime,
    not_after: datetime,
) -> x509.Certificate:
    """A rollover link: `subject`'s name and `key`, issued (and signed) by `signer`."""
    return (
        x509.CertificateBuilder()
        .subject_name(subject.subject)
        .issuer_name(signer.certificate.subject)
        .public_key(key)
        .serial_number(random_serial())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.key.public_key()),
            critical=False,
        )
        .sign(signer.key, hashes.SHA256())
    )


def make_rollover(
    old: CertificateAuthority,
    now: datetime,
    validity: timedelta = timedelta(days=3650),
    *,
    common_name: str = "est-agent dev EST CA 2",
) -> RootRollover:
    """A new root valid from `now` and the links between it and `old` (the links live as long
    as the old root: RFC 4210 §4.4.1, OldWithNew until the old key's certificates expire)."""
    new = make_ca(common_name, now, validity)
    end = old.certificate.not_valid_after_utc
    new_with_old = link_certificate(new.certificate, new.key.public_key(), old, now, end)
    old_with_new = link_certificate(old.certificate, old.key.public_key(), new, now, end)
    return RootRollover(old, new, new_with_old, old_with_new)
