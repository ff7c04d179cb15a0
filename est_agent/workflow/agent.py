"""First-boot enrollment, renewal and status: the steps that touch card, server and host state.

Order of operations is chosen for a SIM link where every APDU costs tens of milliseconds and
power can fail at any point:

* the slots are read first (two APDUs each on a fresh SIM), the target slot last, so that it
  is still selected when the certificate is written;
* the EST server is verified before the card signs anything (est/tls.py), and the key is
  generated only once the server has answered /cacerts and /csrattrs;
* a new certificate only ever goes to the slot that is *not* active, and counts once it reads
  back intact and matching its key (store.py): whatever fails, the previous credential stays.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_pem_private_key,
)

from est_agent.card.channel import CardSession
from est_agent.card.iotsafe import IotSafeApplet
from est_agent.card.signer import CardSigner, public_key_from_point
from est_agent.card.uicc import EF_ICCID, UiccFiles, decode_iccid, is_valid_iccid
from est_agent.card.uri import IotSafeRef, UiccPath
from est_agent.errors import (
    CardError,
    ConfigError,
    EnrollmentPending,
    EstResponseError,
    InputError,
    StatusWordError,
)
from est_agent.store import (
    Slot,
    SlotView,
    pick_active,
    read_slot,
    write_slot,
)
from est_agent.transport import open_transport
from est_agent.workflow.hoststate import (
    ActiveCache,
    HostState,
    Pending,
    load_host_state,
    save_host_state,
)
from est_agent.workflow.quick import cached_not_due
from est_agent.workflow.renewal import is_expired, renewal_due_at
from est_agent.workflow.result import Outcome, Result

if TYPE_CHECKING:
    from est_agent.card.signer import Signer
    from est_agent.config import Config
    from est_agent.est.client import Enrollment, EstClient
    from est_agent.est.messages import CsrAttributes
    from est_agent.est.tls import ChannelBinding

__all__ = ["Agent", "Outcome", "Result", "SlotReport", "StatusReport"]

log = logging.getLogger(__name__)


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class SlotReport:
    name: str
    key: str
    certificate_ef: str
    status: str
    detail: str = ""
    sequence: int | None = None
    subject: str | None = None
    serial: str | None = None
    not_after: str | None = None


@dataclass(frozen=True)
class StatusReport:
    reader: str
    iccid: str | None
    aid: str
    slots: tuple[SlotReport, ...]
    active: str | None
    renew_at: str | None
    pending: dict[str, str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "reader": self.reader,
            "iccid": self.iccid,
            "aid": self.aid,
            "active_slot": self.active,
            "renew_at": self.renew_at,
            "pending": self.pending,
            "slots": [vars(s) for s in self.slots],
        }


def _point(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)


def _hexserial(cert: x509.Certificate) -> str:
    return f"{cert.serial_number:X}"


class _Card:
    """The open card: UICC files on their channel now, the applet only when first needed."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.session = CardSession(open_transport(config.card.reader))
        self.session.transport.connect()
        from est_agent.config import UiccChannel

        if config.card.uicc_channel.resolve(config.card.reader) is UiccChannel.BASIC:
            channel = self.session.basic_channel
        else:
            channel = self.session.open_channel()
        self.files = UiccFiles(channel)
        self._applet: IotSafeApplet | None = None

    @property
    def applet(self) -> IotSafeApplet:
        if self._applet is None:
            self._applet = IotSafeApplet.open(
                self.session,
                aids=tuple(self.config.card.aids),
                proprietary_cla=not self.config.card.iso_cla,
            )
        return self._applet

    def public_key_of(self, slot: Slot) -> ec.EllipticCurvePublicKey | None:
        try:
            return CardSigner.from_card(self.applet, slot.key).public_key()
        except StatusWordError as exc:
            log.debug("slot %s: no readable key (%s)", slot.name, exc)
            return None

    def close(self) -> None:
        self.session.close()


class Agent:
    """Runs enroll / renew / run / status for one configuration."""

    def __init__(
        self,
        config: Config,
        *,
        progress: Callable[[str], None] | None = None,
        clock: Callable[[], datetime] = _now,
        client_factory: Callable[..., EstClient] | None = None,
    ) -> None:
        self.config = config
        self._progress = progress or (lambda text: log.info("%s", text))
        self._clock = clock
        self._client_factory = client_factory
        self.slots = tuple(
            Slot(i, s.key, s.certificate, s.name) for i, s in enumerate(config.slots)
        )
        #: the last card session's link statistics (benchmarks read them)
        self.link_stats: Any = None
        self.card_signatures = 0

    # -- commands ----------------------------------------------------------------------------

    def enroll(self) -> Result:
        """First boot: nothing to do when a valid credential exists, else bootstrap enrollment."""
        with self._card() as card:
            self._progress("reading the credential slots on the SIM")
            views = self._scan(card)
            active = pick_active(views)
            if active is not None and active.certificate is not None:
                return self._result(Outcome.ALREADY_ENROLLED, active, self._adopt(active))
            return self._bootstrap_enroll(card, views)

    def renew(self, *, force: bool = False) -> Result:
        """Renew when due (or forced); enroll with the bootstrap credential when nothing valid
        is left (none yet, or the current certificate expired)."""
        host = load_host_state(self._state_dir)
        with self._card() as card:
            if not force:
                quick = self._not_due_from_cache(card, host)
                if quick is not None:
                    return quick
            self._progress("reading the credential slots on the SIM")
            views = self._scan(card)
            active = pick_active(views)
            if active is None or active.certificate is None:
                return self._bootstrap_enroll(card, views)
            cert = active.certificate
            now = self._clock()
            hook = self._adopt(active)
            if is_expired(cert.not_valid_after_utc, now):
                log.warning("the active certificate expired: falling back to bootstrap")
                return self._bootstrap_enroll(card, views)
            due = self._due_at(cert)
            if not force and now < due:
                return self._result(Outcome.NOT_DUE, active, hook)
            return self._reenroll(card, views, active)

    def run(self) -> Result:
        """What the timer calls: enroll if there is nothing, renew if due, else nothing."""
        return self.renew(force=False)

    def status(self) -> StatusReport:
        host = load_host_state(self._state_dir)
        with self._card() as card:
            views = self._scan(card)
            iccid = self._read_iccid(card)
            aid = card.applet.aid.hex().upper()
            reader = card.session.transport.description
        active = pick_active(views)
        reports = []
        for view in views:
            cert = view.certificate
            reports.append(
                SlotReport(
                    name=view.slot.name,
                    key=str(view.slot.key),
                    certificate_ef=str(view.slot.ef),
                    status=view.status.value,
                    detail=view.detail,
                    sequence=view.header.sequence if view.header else None,
                    subject=cert.subject.rfc4514_string() if cert else None,
                    serial=_hexserial(cert) if cert else None,
                    not_after=cert.not_valid_after_utc.isoformat() if cert else None,
                )
            )
        pending = None
        if host.pending is not None:
            pending = {
                "operation": host.pending.operation,
                "slot": self.slots[host.pending.slot].name,
                "retry_at": host.pending.retry_at.isoformat(),
                "since": host.pending.since.isoformat(),
            }
        renew_at = None
        if active is not None and active.certificate is not None:
            renew_at = self._due_at(active.certificate).isoformat()
        return StatusReport(
            reader=reader,
            iccid=iccid,
            aid=aid,
            slots=tuple(sorted(reports, key=lambda r: r.name)),
            active=active.slot.name if active else None,
            renew_at=renew_at,
            pending=pending,
        )

    # -- steps -------------------------------------------------------------------------------

    @property
    def _state_dir(self) -> Any:
        return self.config.paths.state_dir

    @contextmanager
    def _card(self) -> Iterator[_Card]:
        card = _Card(self.config)
        try:
            yield card
        finally:
            self.link_stats = card.session.transport.stats
            card.close()

    def _scan(self, card: _Card) -> list[SlotView]:
        # Read the other slots first and slot 0 last: on a fresh SIM slot 0 is the target and
        # stays selected for the write (one SELECT less).
        views = [read_slot(card.files, s, card.public_key_of) for s in reversed(self.slots)]
        views.reverse()
        for view in views:
            log.info("slot %s: %s %s", view.slot.name, view.status.value, view.detail)
        return views

    def _not_due_from_cache(self, card: _Card, host: HostState) -> Result | None:
        return cached_not_due(self.config, card.files, host, self._clock())

    def _plan(self, views: list[SlotView], operation: str) -> tuple[HostState, Slot]:
        """Host state and target slot of an enrollment; EnrollmentPending (before any card or
        network work) while a pending request's Retry-After has not passed."""
        host = load_host_state(self._state_dir)
        target = self._target_slot(views, host.pending, operation)
        self._check_pending_wait(host.pending, operation)
        return host, target

    def _bootstrap_enroll(self, card: _Card, views: list[SlotView]) -> Result:
        host, target = self._plan(views, "simpleenroll")
        self._progress("reading the bootstrap credential from the SIM")
        chain, signer = self._bootstrap_identity(card)
        with self._client(card, chain, signer) as client:
            return self._enroll_into(
                card, views, target, client, host, operation="simpleenroll", current=None
            )

    def _reenroll(self, card: _Card, views: list[SlotView], active: SlotView) -> Result:
        host, target = self._plan(views, "simplereenroll")
        assert active.certificate is not None
        current = active.certificate
        signer = CardSigner(card.applet, active.slot.key, current.public_key())  # type: ignore[arg-type]
        self._progress(
            f"renewing the certificate of slot {active.slot.name} (serial {_hexserial(current)})"
        )
        with self._client(card, [current], signer) as client:
            return self._enroll_into(
                card, views, target, client, host, operation="simplereenroll", current=current
            )

    def _enroll_into(
        self,
        card: _Card,
        views: list[SlotView],
        target: Slot,
        client: EstClient,
        host: HostState,
        *,
        operation: str,
        current: x509.Certificate | None,
    ) -> Result:
        self._progress("connecting to the EST server (TLS authenticated by the SIM)")
        cacerts = client.cacerts()
        self._check_fingerprint(cacerts.anchor)
        attrs = client.csrattrs()
        key = self._target_key(card, target, host.pending, operation)
        op_signer = CardSigner(card.applet, target.key, key)
        self._progress(f"requesting the certificate ({operation}; CSR signed by the SIM)")
        try:
            enrollment = self._request(client, operation, op_signer, attrs, current)
        except EnrollmentPending as pending:
            now = self._clock()
            save_host_state(
                self._state_dir,
                HostState(
                    active=host.active,
                    pending=Pending(
                        operation=operation,
                        slot=target.index,
                        public_key=_point(key).hex(),
                        # a server's Retry-After is honoured up to renewal.retry_cap_s
                        retry_at=now
                        + timedelta(
                            seconds=min(pending.retry_after_s, self.config.renewal.retry_cap_s)
                        ),
                        since=host.pending.since if host.pending else now,
                    ),
                ),
            )
            raise
        finally:
            self.card_signatures += op_signer.signatures
        self._progress(f"writing the certificate to SIM slot {target.name} and reading it back")
        sequence = 1 + max((v.header.sequence for v in views if v.header), default=0)
        der = enrollment.certificate.public_bytes(Encoding.DER)
        installed = write_slot(card.files, target, sequence, der, key)
        outcome = Outcome.RENEWED if current is not None else Outcome.ENROLLED
        # deploy first, remember second: a run that dies in between leaves the host state on
        # the previous credential, so the next run sees the new one as not deployed (_adopt)
        hook = self._after_install(installed, enrollment.chain)
        self._remember(installed)
        return self._result(outcome, installed, hook)

    def _request(
        self,
        client: EstClient,
        operation: str,
        signer: CardSigner,
        attrs: CsrAttributes | None,
        current: x509.Certificate | None,
    ) -> Enrollment:
        from est_agent.config import PopMode
        from est_agent.csr import CsrBuilder
        from est_agent.est.messages import challenge_password_value

        pop = self.config.est.pop
        if current is not None:
            # RFC 7030 §4.2.2: Subject and SubjectAltName byte-equal to the current certificate
            base = CsrBuilder().copy_from_certificate(current)
        else:
            values = {"iccid": self._iccid} if self._iccid else {}
            if self._imei:
                values["imei"] = self._imei
            name, sans = self.config.subject.render(values)
            base = CsrBuilder().subject(name)
            if sans:
                base = base.subject_alt_names(list(sans))
        base = base.key_usage().eku_client_auth().csr_attributes(attrs)
        asked = attrs is not None and attrs.challenge_password

        def csr_factory(binding: ChannelBinding | None) -> bytes:
            builder = base
            if pop is PopMode.OFF or (pop is PopMode.AUTO and not asked):
                return builder.build(signer)
            if binding is None:
                raise EstResponseError("proof of possession needs a TLS channel binding")
            if pop is not PopMode.AUTO and binding.kind != pop.value:
                raise ConfigError(
                    f"est.pop = {pop.value!r} but the connection offers {binding.kind} "
                    f"({binding.tls_version})"
                )
            builder = builder.challenge_password(challenge_password_value(binding.value))
            return builder.build(signer)

        if operation == "simplereenroll":
            return client.simplereenroll(csr_factory)
        return client.simpleenroll(csr_factory)

    # -- helpers -----------------------------------------------------------------------------

    _iccid: str | None = None
    _imei: str | None = None

    def _bootstrap_identity(self, card: _Card) -> tuple[list[x509.Certificate], Signer]:
        """The bootstrap certificate chain and a signer for its key: on the SIM (IoT SAFE key,
        certificate in an applet file or a UICC EF) or, on devices without one, PEM files."""
        from est_agent.card.signer import SoftwareSigner

        boot = self.config.bootstrap
        if isinstance(boot.certificate, Path):
            data = _read_file(boot.certificate, "bootstrap.certificate")
        else:
            data = self._read_card_object(card, boot.certificate)
        chain = _load_certificates(data, "bootstrap.certificate")
        key = chain[0].public_key()
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise InputError("the bootstrap certificate's key is not an EC key")
        signer: Signer
        if isinstance(boot.key, Path):
            private = load_pem_private_key(_read_file(boot.key, "bootstrap.key"), password=None)
            if not isinstance(private, ec.EllipticCurvePrivateKey):
                raise ConfigError("bootstrap.key: only EC (P-256) private keys are supported")
            signer = SoftwareSigner(private)
            if _point(private.public_key()) != _point(key):
                raise ConfigError("bootstrap.key does not match bootstrap.certificate")
        else:
            signer = CardSigner(card.applet, boot.key, key)
        if self._needs("{iccid}"):
            self._iccid = _iccid_from_certificate(chain[0]) or self._read_iccid(card)
        if self._needs("{imei}"):
            self._imei = self._modem_imei(card)
        return chain, signer

    def _modem_imei(self, card: _Card) -> str | None:
        """AT+CGSN on a ``modem:`` link (TS 27.007 §5.4); other links know no IMEI."""
        imei = getattr(card.session.transport, "imei", None)
        if not callable(imei):
            return None
        try:
            return str(imei())
        except CardError as exc:
            log.warning("cannot read the modem's IMEI: %s", exc)
            return None

    def _needs(self, placeholder: str) -> bool:
        subject = self.config.subject
        texts = [subject.common_name, subject.organization, subject.serial_number]
        texts += [*subject.san_dns, *subject.san_uri]
        return any(placeholder in t for t in texts)

    def _read_iccid(self, card: _Card) -> str | None:
        try:
            return decode_iccid(card.files.read(EF_ICCID))
        except (CardError, InputError) as exc:
            log.warning("cannot read EF_ICCID: %s", exc)
            return None

    def _read_card_object(self, card: _Card, ref: IotSafeRef | UiccPath) -> bytes:
        if isinstance(ref, UiccPath):
            return card.files.read(ref)
        return card.applet.read_file(ref)

    @contextmanager
    def _client(
        self, card: _Card, chain: Sequence[x509.Certificate], signer: Signer
    ) -> Iterator[EstClient]:
        from est_agent.config import PopMode
        from est_agent.est.client import EstClient, RetryPolicy

        est = self.config.est
        cap = self.config.renewal.retry_cap_s
        defaults = RetryPolicy()
        username = est.basic_username
        basic = None
        if username:
            from est_agent.logs import register_secret

            password = self.config.basic_password() or ""
            register_secret(password)  # masked in every log line from now on
            basic = (username, password)
        factory = self._client_factory or EstClient
        client = factory(
            est.url,
            trust_anchors=self._trust_anchors(card),
            label=est.label,
            client_cert_chain=list(chain),
            signer=signer,
            basic_auth=basic,
            timeout_s=est.timeout_s,
            tls_max="1.2" if est.pop is PopMode.TLS_UNIQUE else "1.3",
            require_client_auth_eku=est.require_client_auth_eku,
            # renewal.retry_cap_s bounds the waits inside this run too
            retry=RetryPolicy(
                cap_s=min(defaults.cap_s, cap),
                retry_after_cap_s=min(defaults.retry_after_cap_s, cap),
            ),
        )
        try:
            yield client
        finally:
            self.card_signatures += getattr(signer, "signatures", 0)
            client.close()

    def _trust_anchors(self, card: _Card) -> list[x509.Certificate]:
        source = self.config.est.trust_anchor
        if source is None:
            # RFC 7030 §4.1.1 bootstrap distribution (provisional TLS, /cacerts checked against
            # the fingerprint) is not implemented: refuse rather than trust an unverified peer.
            raise ConfigError(
                "est.trust_anchor is required: enrollment without an explicit TLS trust anchor "
                "(fingerprint-only bootstrap) is not supported yet"
            )
        if isinstance(source, Path):
            data = _read_file(source, "est.trust_anchor")
        else:
            data = self._read_card_object(card, source)
        return _load_certificates(data, "est.trust_anchor")

    def _check_fingerprint(self, anchor: x509.Certificate) -> None:
        pin = self.config.est.cacerts_fingerprint
        if not pin:
            return
        got = hashlib.sha256(anchor.public_bytes(Encoding.DER)).digest()
        if got != pin:
            raise EstResponseError(
                f"the EST CA from /cacerts ({got.hex()}) does not match "
                "est.cacerts_fingerprint: refusing to enroll"
            )

    def _target_slot(self, views: list[SlotView], pending: Pending | None, operation: str) -> Slot:
        if (
            pending is not None
            and pending.operation == operation
            and pending.slot < len(self.slots)
        ):
            return self.slots[pending.slot]
        active = pick_active(views)
        candidates = [v for v in views if active is None or v.slot != active.slot]
        # prefer a slot with nothing valid in it, then the lowest index
        candidates.sort(key=lambda v: (v.valid, v.slot.index))
        return candidates[0].slot

    def _check_pending_wait(self, pending: Pending | None, operation: str) -> None:
        if pending is None or pending.operation != operation:
            return
        wait = (pending.retry_at - self._clock()).total_seconds()
        if wait > 0:
            raise EnrollmentPending(
                wait, f"enrollment pending at the server; retry after {pending.retry_at:%H:%M:%S}"
            )

    def _target_key(
        self, card: _Card, target: Slot, pending: Pending | None, operation: str
    ) -> ec.EllipticCurvePublicKey:
        """The key for the new certificate: the pending request's key when resuming a 202
        (the server knows that key), else a fresh one generated inside the SIM."""
        if pending is not None and pending.operation == operation and pending.slot == target.index:
            existing = card.public_key_of(target)
            if existing is not None and _point(existing).hex() == pending.public_key:
                self._progress(f"resuming the pending request with the key in slot {target.name}")
                return existing
        self._progress(f"generating a key in SIM slot {target.name}")
        generated = card.applet.generate_key_pair(target.key)
        return public_key_from_point(generated.public_point)

    def _due_at(self, cert: x509.Certificate) -> datetime:
        return renewal_due_at(
            cert.not_valid_before_utc,
            cert.not_valid_after_utc,
            threshold=self.config.renewal.threshold,
            jitter_s=self.config.renewal.jitter_s,
            serial=cert.serial_number,
        )

    def _remember(self, view: SlotView) -> None:
        cert = view.certificate
        if cert is None or view.header is None:
            return
        host = load_host_state(self._state_dir)
        cache = ActiveCache(
            slot=view.slot.index,
            sequence=view.header.sequence,
            sha256=view.header.sha256.hex(),
            serial=_hexserial(cert),
            subject=cert.subject.rfc4514_string(),
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
        )
        pending = host.pending
        if pending is not None and view.header.sequence and pending.slot == view.slot.index:
            pending = None  # the pending request's slot now holds a valid certificate
        if host.active != cache or pending != host.pending:
            save_host_state(self._state_dir, HostState(active=cache, pending=pending))

    def _adopt(self, view: SlotView) -> dict[str, Any] | None:
        """Remember the active credential found on the SIM. When it is not the one the host
        state records, a run died after writing it but before its PEM export and deploy hook:
        deploy it now (leaf only: the chain the server sent is not kept on the SIM)."""
        hook = None
        cache = load_host_state(self._state_dir).active
        paths = self.config.paths
        cert = view.certificate
        deployed = (
            cache is not None
            and view.header is not None
            and (cache.slot, cache.sequence, cache.sha256)
            == (view.slot.index, view.header.sequence, view.header.sha256.hex())
        )
        if (
            not deployed
            and cert is not None
            and (paths.export_pem is not None or paths.deploy_hook)
            and not is_expired(cert.not_valid_after_utc, self._clock())
        ):
            log.warning(
                "slot %s: active certificate not deployed yet: deploying it", view.slot.name
            )
            hook = self._after_install(view, ())
        self._remember(view)
        return hook

    def _after_install(
        self, view: SlotView, chain: Sequence[x509.Certificate]
    ) -> dict[str, Any] | None:
        """PEM export and deploy hook (certbot's deploy hook): only after a successful install,
        reported but never undoing the installed credential."""
        paths = self.config.paths
        if paths.export_pem is None and not paths.deploy_hook:
            return None  # nothing to do: skip importing hooks (subprocess, selectors, ...)
        from est_agent import hooks

        assert view.certificate is not None
        report = hooks.deploy_new_certificate(
            [view.certificate, *chain],
            slot=view.slot.name,
            export_path=paths.export_pem,
            hook_argv=paths.deploy_hook,
        )
        if report.hook is None:
            return None
        return {
            "argv": list(report.hook.argv),
            "exit_status": report.hook.exit_status,
            "timed_out": report.hook.timed_out,
            "error": report.hook.error,
        }

    def _result(self, outcome: str, view: SlotView, hook: dict[str, Any] | None = None) -> Result:
        cert = view.certificate
        assert cert is not None
        return Result(
            outcome,
            view.slot.name,
            cert.subject.rfc4514_string(),
            _hexserial(cert),
            cert.not_valid_after_utc,
            self._due_at(cert),
            hook,
        )


def _iccid_from_certificate(cert: x509.Certificate) -> str | None:
    """The ICCID a SIM provider put in the bootstrap certificate's serialNumber attribute.

    Taking it from there saves reading EF_ICCID (two APDUs) on first boot; accepted only when
    it is a well-formed ICCID (18-20 digits, valid Luhn check digit, ITU-T E.118).
    """
    from cryptography.x509.oid import NameOID

    for attribute in cert.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER):
        value = attribute.value
        if isinstance(value, str) and is_valid_iccid(value):
            return value
    return None


def _read_file(path: Path, key: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path}: {exc.strerror}") from exc


def _load_certificates(data: bytes, key: str) -> list[x509.Certificate]:
    """PEM (one or more certificates) or a single DER certificate, e.g. from a SIM file."""
    try:
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_certificates(data)
        return [x509.load_der_x509_certificate(data)]
    except ValueError as exc:
        raise InputError(f"{key}: no usable certificate ({exc})") from exc
