"""First-boot enrollment, renewal and status: the steps that touch card, server and host state.

Shape (certbot's renewal): read the slots, ``plan`` (workflow/plan.py, a pure function of the
slots' explicit states, the renewal timing and a pending 202), then execute the plan. Order of
operations is chosen for a SIM link where every APDU costs tens of milliseconds and power can
fail at any point:

* the whole card session runs under the run lock (workflow/lock.py) and a card transaction, so
  two runs never pick the same target slot;
* with only ``est.cacerts_fingerprint`` (no ``est.trust_anchor``) and no remembered anchor, the
  TLS trust anchor is bootstrapped from ``/cacerts`` (RFC 7030 §4.1.1, est/bootstrap.py) under
  the run lock but before the card is opened: the card is not touched until the server is
  authenticated;
* the slots are read first (two APDUs each on a fresh SIM), the target slot last, so that it
  is still selected when the certificate is written; a slot that cannot be read stops the run
  before anything is written (``SlotUnreadableError``);
* the EST server is verified before the card signs anything (est/tls/), and the key is
  generated only once the server has answered /cacerts (the card makes it while /csrattrs
  crosses the network: workflow/cardwork.py);
* the server's TLS chain is checked against the anchor store (workflow/anchors.py: current,
  next, the configured fallback), and every /cacerts answer is followed for a CA rollover
  (RFC 7030 §4.1.3) before the key is generated: a refused one stops the run there;
* a new certificate only ever goes to a slot that is *not* active, and counts once it reads
  back intact and matching its key (store.py): whatever fails, the previous credential stays;
* the host state (a cache) notes a record before it is written, and a failure to write the
  host state never hides what happened on the SIM: it becomes a note on the result.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
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

from est_agent.card.uicc import is_valid_iccid
from est_agent.certificates import sha256_fingerprint
from est_agent.config import CsrAttrsMode, PopMode, UiccChannel
from est_agent.errors import (
    AuthError,
    CardError,
    ConfigError,
    EnrollmentPending,
    EstAgentError,
    EstRejectedError,
    EstResponseError,
    InputError,
    SlotUnreadableError,
    StoreError,
    TransportError,
)
from est_agent.store import (
    REASON_KEY_MISMATCH,
    Slot,
    SlotState,
    SlotView,
    public_key_digest,
    read_slot,
    write_slot,
)
from est_agent.transport import open_transport
from est_agent.workflow.anchorcheck import forget_check, write_check
from est_agent.workflow.anchors import (
    AnchorSet,
    AnchorStore,
    Rollover,
    Source,
    Step,
    StoreState,
    decide_rollover,
    fingerprint,
    needs_cacerts_check,
    next_check_at,
)
from est_agent.workflow.cardwork import (
    CardWork,
    apply_card_facts,
    in_background,
    learned_card_facts,
)
from est_agent.workflow.hoststate import (
    ActiveCache,
    Deployment,
    HostState,
    Installing,
    Pending,
    Retry,
    load_host_state,
    save_host_state,
)
from est_agent.workflow.lock import run_lock
from est_agent.workflow.plan import (
    Action,
    EstOperation,
    Operation,
    PendingFacts,
    Plan,
    SlotFacts,
    Timing,
    plan,
)
from est_agent.workflow.quick import cached_not_due
from est_agent.workflow.renewal import (
    is_expired,
    next_attempt_at,
    renewal_due_at,
    retry_not_before,
)
from est_agent.workflow.result import HookReport, Outcome, Result
from est_agent.workflow.session import BackendOpener, backend_opener

if TYPE_CHECKING:
    from est_agent.backends.agreement import KeyAgreement
    from est_agent.backends.base import CredentialBackend
    from est_agent.backends.iotsafe_uicc import TransportOpener
    from est_agent.backends.signer import Signer
    from est_agent.config import Config
    from est_agent.csr import CsrBuilder
    from est_agent.est.client import Enrollment, EstClient
    from est_agent.est.messages import CsrAttributes
    from est_agent.est.tls import ChannelBinding

__all__ = [
    "Agent",
    "AnchorReport",
    "Outcome",
    "Result",
    "SlotReport",
    "StatusReport",
    "pop_setting_hint",
]

log = logging.getLogger(__name__)

#: in ``paths.state_dir``: the root a fingerprint-only bootstrap established (RFC 7030 §4.1.1)


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class SlotReport:
    name: str
    key: str
    certificate_ef: str
    status: str  # valid | empty | damaged | unknown (store.SlotState)
    reason: str = ""  # why damaged or unknown: torn, key-mismatch, record-unreadable, ...
    detail: str = ""
    sequence: int | None = None
    subject: str | None = None
    serial: str | None = None
    not_after: str | None = None


@dataclass(frozen=True)
class AnchorReport:
    """One trust anchor for the EST server's TLS chain (workflow/anchors.py)."""

    role: str  # current | next | fallback (the configured anchor when it is not current)
    source: str  # configured | bootstrap | rollover
    subject: str
    sha256: str
    not_after: str


@dataclass(frozen=True)
class StatusReport:
    reader: str
    iccid: str | None
    aid: str
    slots: tuple[SlotReport, ...]
    active: str | None
    renew_at: str | None
    pending: dict[str, str] | None = None
    deployment: dict[str, Any] | None = None
    #: failed attempts since the last success, and when the next may start (None: none failed)
    retry: dict[str, Any] | None = None
    anchors: tuple[AnchorReport, ...] = ()
    #: the anchor store's state: {"state": empty|valid|damaged, "sequence", "copies": [...]}
    anchor_store: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    #: which credential backend holds the slots: "iotsafe" (the SIM) or "pkcs11" (a token)
    backend: str = "iotsafe"

    def to_json(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "reader": self.reader,
            "iccid": self.iccid,
            "aid": self.aid,
            "active_slot": self.active,
            "renew_at": self.renew_at,
            "pending": self.pending,
            "deployment": self.deployment,
            "retry": self.retry,
            "slots": [vars(s) for s in self.slots],
            "anchors": [vars(a) for a in self.anchors],
            "anchor_store": self.anchor_store,
        }


def _point(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)


def _hexserial(cert: x509.Certificate) -> str:
    return f"{cert.serial_number:X}"


@dataclass(frozen=True)
class _BootstrapIdentity:
    """The bootstrap credential of a first enrollment and what its subject templates need."""

    chain: list[x509.Certificate]
    signer: Signer
    values: dict[str, str]  # {"iccid": ..., "imei": ...} for the subject templates


class _HostStateFile:
    """The host state of one run: read once under the run lock, written through ``update``.

    A write that fails is logged and kept as a note for the result (the SIM stays
    authoritative); the in-memory state moves on either way, so the rest of the run sees what
    it decided.
    """

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.state = load_host_state(state_dir)
        self.notes: list[str] = []

    def update(self, **changes: Any) -> bool:
        new = replace(self.state, **changes)
        if new == self.state:
            return True
        self.state = new
        try:
            save_host_state(self.state_dir, new)
        except StoreError as exc:
            log.warning("%s", exc)
            if str(exc) not in self.notes:
                self.notes.append(str(exc))
            return False
        return True

    def forget(self) -> None:
        """Remove the file (best effort): a cache that cannot be updated must not be trusted."""
        with contextlib.suppress(OSError):
            os.unlink(self.state_dir / "state.json")


class Agent:
    """Runs enroll / renew / run / status for one configuration.

    Seams: ``clock`` (renewal timing, pending waits), ``client_factory`` (the EST client),
    ``backends`` (opens the credential backend; default: the SIM behind ``config.card.reader``,
    its transport built by ``opener``).
    """

    def __init__(
        self,
        config: Config,
        *,
        progress: Callable[[str], None] | None = None,
        clock: Callable[[], datetime] = _now,
        client_factory: Callable[..., EstClient] | None = None,
        opener: TransportOpener | None = None,
        backends: BackendOpener | None = None,
    ) -> None:
        self.config = config
        self._progress = progress or (lambda text: log.info("%s", text))
        #: what the progress lines call the device holding the keys
        self._device = "token" if config.backend == "pkcs11" else "SIM"
        self._clock = clock
        self._client_factory = client_factory
        self._opener = opener
        self._backends = backends
        self.slots = tuple(
            Slot(i, s.key, s.certificate, s.name) for i, s in enumerate(config.slots)
        )
        #: the last session's link statistics (benchmarks and --json read them)
        self.link_stats: Any = None
        self.card_signatures = 0
        #: the trust anchors of this run (loaded once per run, see `_anchors`)
        self._held: AnchorSet | None = None
        #: anchor-store writes that failed this run (notes on the result, like the host state's)
        self._anchor_notes: list[str] = []

    # -- commands ----------------------------------------------------------------------------

    def enroll(self) -> Result:
        """First boot: nothing to do when a valid credential exists, else bootstrap enrollment."""
        return self._execute(Operation.ENROLL, use_cache=False)

    def renew(self, *, force: bool = False, use_cache: bool = True) -> Result:
        """Renew when due (or forced); enroll with the bootstrap credential when nothing valid
        is left (none yet, or the current certificate expired). ``use_cache``: first try the
        fast path (workflow/quick.py) in this card session."""
        if force:
            return self._execute(Operation.RENEW_FORCED, use_cache=False)
        return self._execute(Operation.RENEW, use_cache=use_cache)

    def run(self, *, use_cache: bool = True) -> Result:
        """What the timer calls: enroll if there is nothing, renew if due, else nothing."""
        return self.renew(force=False, use_cache=use_cache)

    def status(self) -> StatusReport:
        with self._session() as (backend, host), backend.transaction():
            views = self._scan(backend)
            iccid = backend.iccid()
            details = backend.details()
            anchors, anchor_store = self._anchor_report(backend)
        state = host.state
        active = self._decide(Operation.ENROLL, views, state).active
        reports = []
        for view in views:
            cert = view.certificate
            reports.append(
                SlotReport(
                    name=view.slot.name,
                    key=str(view.slot.key),
                    certificate_ef=str(view.slot.record),
                    status=view.state.value,
                    reason=view.reason,
                    detail=view.detail,
                    sequence=view.header.sequence if view.header else None,
                    subject=cert.subject.rfc4514_string() if cert else None,
                    serial=_hexserial(cert) if cert else None,
                    not_after=cert.not_valid_after_utc.isoformat() if cert else None,
                )
            )
        pending = None
        if state.pending is not None and state.pending.slot < len(self.slots):
            pending = {
                "operation": state.pending.operation,
                "slot": self.slots[state.pending.slot].name,
                "retry_at": state.pending.retry_at.isoformat(),
                "since": state.pending.since.isoformat(),
            }
        renew_at = None
        deployment = None
        if active is not None:
            view = views[active]
            assert view.certificate is not None and view.header is not None
            renew_at = self._due_at(view.certificate).isoformat()
            deployment = self._deployment_report(view, state)
        retry = self._retry_report(views[active] if active is not None else None, state)
        return StatusReport(
            reader=details.get("reader", backend.description),
            iccid=iccid,
            aid=details.get("aid", ""),
            slots=tuple(sorted(reports, key=lambda r: r.name)),
            active=self.slots[active].name if active is not None else None,
            renew_at=renew_at,
            pending=pending,
            deployment=deployment,
            retry=retry,
            anchors=anchors,
            anchor_store=anchor_store,
            backend=details.get("backend", "iotsafe"),
        )

    def _anchor_report(
        self, backend: CredentialBackend
    ) -> tuple[tuple[AnchorReport, ...], dict[str, Any]]:
        """The anchors as the next run would trust them (nothing is written here)."""
        try:
            held = self._load_anchors(backend)
        except ConfigError as exc:  # e.g. no anchor configured and none stored
            return (), {"state": "unusable", "error": str(exc)}
        rows: list[AnchorReport] = []

        def row(role: str, source: str, cert: x509.Certificate) -> AnchorReport:
            return AnchorReport(
                role,
                source,
                cert.subject.rfc4514_string(),
                fingerprint(cert),
                cert.not_valid_after_utc.isoformat(),
            )

        for anchor in held.current:
            rows.append(row("current", anchor.source.value, anchor.certificate))
        if held.next is not None:
            rows.append(row("next", held.next.source.value, held.next.certificate))
        for anchor in held.fallback:
            if not any(a.certificate == anchor.certificate for a in held.current):
                rows.append(row("fallback", anchor.source.value, anchor.certificate))
        store = {
            "state": held.state.value,
            "sequence": held.sequence,
            "copies": [
                {
                    "file": c.name,
                    "state": c.state.value,
                    "sequence": c.sequence,
                    "reason": c.reason or None,
                }
                for c in held.copies
            ],
        }
        return tuple(rows), store

    # -- the run -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def _session(
        self, *, anchor_first: bool = False
    ) -> Iterator[tuple[CredentialBackend, _HostStateFile]]:
        """Run lock, then (``anchor_first``) the TLS trust anchor, then the credential backend,
        then the host state (read once)."""
        paths = self.config.paths
        open_backend = self._backends or backend_opener(self._opener or open_transport)
        self._held = None  # the anchors are read again by every run
        self._anchor_notes = []
        with run_lock(paths.state_dir, wait_s=paths.lock_wait_s):
            # RFC 7030 §4.1.1: a fingerprint-only bootstrap talks to an unverified server, so
            # it happens before the card is opened: the card is not touched at all unless the
            # server has been authenticated (est/bootstrap.py).
            notes = self._establish_trust_anchor() if anchor_first else []
            with open_backend(self.config) as backend:
                try:
                    host = _HostStateFile(paths.state_dir)
                    host.notes.extend(notes)
                    apply_card_facts(backend, host.state)
                    try:
                        yield backend, host
                    finally:
                        if learned_card_facts(backend, host.state) is not None:
                            host.update(implicit_channel_refused=True)
                finally:
                    self.link_stats = backend.stats

    def _execute(self, operation: Operation, *, use_cache: bool) -> Result:
        with self._session(anchor_first=True) as (backend, host):
            with backend.transaction():  # the slots are judged as one picture
                if use_cache:
                    quick = cached_not_due(self.config, backend, host.state, self._clock())
                    if quick is not None:
                        return self._check_anchors(backend, quick)
                self._progress(f"reading the credential slots on the {self._device}")
                views = self._scan(backend)
            decision = self._decide(operation, views, host.state)
            log.info("plan: %s %s", decision.action.value, decision.reason)
            active = views[decision.active] if decision.active is not None else None
            if decision.action is Action.STOP_UNKNOWN:
                raise self._unreadable(views, decision)
            hook = None
            if active is not None:
                hook = self._adopt(active, host)
            if decision.action is Action.WAIT_PENDING:
                pending = host.state.pending
                assert pending is not None
                wait = (pending.retry_at - self._clock()).total_seconds()
                raise EnrollmentPending(
                    wait,
                    f"enrollment pending at the server; retry after {pending.retry_at:%H:%M:%S}",
                )
            if decision.action is Action.WAIT_RETRY:
                assert active is not None
                return self._retry_later(active, hook, host)
            if decision.action in (Action.ALREADY_ENROLLED, Action.NOT_DUE):
                assert active is not None
                outcome = (
                    Outcome.ALREADY_ENROLLED
                    if decision.action is Action.ALREADY_ENROLLED
                    else Outcome.NOT_DUE
                )
                return self._check_anchors(backend, self._result(outcome, active, hook, host))
            try:
                if decision.action is Action.BOOTSTRAP:
                    if active is not None:
                        log.warning("the active certificate expired: falling back to bootstrap")
                    return self._bootstrap_enroll(backend, views, decision, host)
                assert active is not None
                return self._reenroll(backend, views, decision, active, host)
            except EnrollmentPending:
                raise  # the server said when to come back: remembered as the pending request
            except ConfigError:
                raise  # the operator's to fix: the next run (after the fix) must not wait
            except EstAgentError as exc:
                self._record_failure(host, decision, active, exc)
                raise

    def _decide(self, operation: Operation, views: Sequence[SlotView], host: HostState) -> Plan:
        now = self._clock()
        facts = [
            SlotFacts(
                v.state,
                v.header.sequence if v.header else None,
                key_mismatch=v.reason == REASON_KEY_MISMATCH,
            )
            for v in views
        ]
        timings: list[Timing | None] = []
        for view in views:
            cert = view.certificate
            if not view.valid or cert is None:
                timings.append(None)
                continue
            timings.append(
                Timing(
                    expired=is_expired(cert.not_valid_after_utc, now),
                    due=now >= self._due_at(cert),
                    retry_later=self._retry_wait(view, host) is not None,
                )
            )
        pending = None
        if host.pending is not None:
            pending = PendingFacts(
                EstOperation(host.pending.operation),
                host.pending.slot,
                ready=host.pending.retry_at <= now,
            )
        return plan(operation, facts, timings, pending)

    def _unreadable(self, views: Sequence[SlotView], decision: Plan) -> SlotUnreadableError:
        if not any(v.state is SlotState.UNKNOWN for v in views):
            # the newest record's key does not match (plan.py rule 4): kept, not overwritten
            return SlotUnreadableError(
                f"{decision.reason} (the card reports another key than the newest certificate's:"
                " it may misreport it, or another program regenerated it); nothing was written."
                " If the key really was replaced, clear that slot's record to let it be reused"
            )
        parts = [
            f"slot {v.slot.name} ({v.reason}: {v.detail})"
            for v in views
            if v.state is SlotState.UNKNOWN
        ]
        hint = ""
        on_channel = self.config.card.uicc_channel.resolve(self.config.card.reader)
        if on_channel is not UiccChannel.BASIC and any(
            "6881" in v.detail for v in views if v.state is SlotState.UNKNOWN
        ):
            # SW 6881: logical channel not supported (ETSI TS 102 221 §10.2.1.5): the link
            # cannot carry the EF commands on a channel of their own (CGLA-only modems)
            hint = '; the link refuses logical channels: set card.uicc_channel = "basic"'
        return SlotUnreadableError(
            "cannot read "
            + "; ".join(parts)
            + ": nothing was written (a slot that cannot be read may hold the working "
            f"credential){hint}"
        )

    def _scan(self, backend: CredentialBackend) -> list[SlotView]:
        views = [read_slot(backend, s) for s in self.slots]
        for view in views:
            log.info(
                "slot %s: %s%s",
                view.slot.name,
                view.state.value,
                f" ({view.reason}: {view.detail})" if view.reason else "",
            )
        return views

    def _bootstrap_enroll(
        self,
        backend: CredentialBackend,
        views: list[SlotView],
        decision: Plan,
        host: _HostStateFile,
    ) -> Result:
        self._progress(f"reading the bootstrap credential from the {self._device}")
        identity = self._bootstrap_identity(backend)
        with self._client(backend, identity.chain, identity.signer) as client:
            return self._enroll_into(
                backend, views, decision, client, host, current=None, values=identity.values
            )

    def _reenroll(
        self,
        backend: CredentialBackend,
        views: list[SlotView],
        decision: Plan,
        active: SlotView,
        host: _HostStateFile,
    ) -> Result:
        assert active.certificate is not None
        current = active.certificate
        current_key = current.public_key()
        assert isinstance(current_key, ec.EllipticCurvePublicKey)  # VALID: it matched the slot
        signer = backend.signer(active.slot.key, current_key)
        self._progress(
            f"renewing the certificate of slot {active.slot.name} (serial {_hexserial(current)})"
        )
        with self._client(backend, [current], signer) as client:
            return self._enroll_into(backend, views, decision, client, host, current=current)

    def _enroll_into(
        self,
        backend: CredentialBackend,
        views: list[SlotView],
        decision: Plan,
        client: EstClient,
        host: _HostStateFile,
        *,
        current: x509.Certificate | None,
        values: dict[str, str] | None = None,
    ) -> Result:
        assert decision.target is not None and decision.est_operation is not None
        target = self.slots[decision.target]
        operation = decision.est_operation.value
        if decision.target == decision.active or views[decision.target].state is SlotState.UNKNOWN:
            # plan() never does this; the check keeps a future change from costing a credential
            raise StoreError(f"refusing to write slot {target.name}: it is active or unknown")
        self._progress(f"connecting to the EST server (TLS authenticated by the {self._device})")
        key: ec.EllipticCurvePublicKey | None = None
        op_signer: Signer | None = None
        try:
            cacerts = client.cacerts()
            if not self._rolled_over_to(cacerts.roles.roots):
                self._check_fingerprint(cacerts.anchor)
            # RFC 7030 §4.1.3: every run that talks to the server follows a CA rollover
            # before the card makes a key: a refused /cacerts stops here (76)
            self._roll_anchors(cacerts.certificates)
            # The key is allowed from here on (/cacerts answered and followed). It is only
            # needed for the CSR, so the card makes it while /csrattrs crosses the network
            # (workflow/cardwork.py); a failed /csrattrs still waits for the card first.
            keygen = self._start_target_key(backend, target, host.state.pending, decision)
            try:
                attrs = self._server_csrattrs(client)
            finally:
                keygen.wait()
            key = keygen.result()
            op_signer = backend.signer(target.key, key)
            self._progress(
                f"requesting the certificate ({operation}; CSR signed by the {self._device})"
            )
            enrollment = self._request(
                client, operation, op_signer, attrs, current, values=values
            )
        except EnrollmentPending as pending:
            # A 202 (the server knows this key: resume with it) or a Retry-After longer than
            # this run waits, on any request (no key yet: the next run makes one).
            self._remember_pending(host, operation, target, key, pending)
            raise
        finally:
            if op_signer is not None:
                self.card_signatures += getattr(op_signer, "signatures", 0)
        self._progress(
            f"writing the certificate to {self._device} slot {target.name} and reading it back"
        )
        sequence = 1 + max((v.header.sequence for v in views if v.header), default=0)
        der = enrollment.certificate.public_bytes(Encoding.DER)
        if not host.update(installing=Installing(target.index, sequence)):
            host.forget()  # the fast path must not trust a cache that missed this write
        try:
            installed = write_slot(backend, target, sequence, der, key)
        except StoreError:
            host.update(installing=None)  # nothing complete was written
            raise
        host.update(active=self._cache_of(installed), pending=None, installing=None, retry=None)
        hook = self._deploy(installed, enrollment.chain, host)
        outcome = Outcome.RENEWED if current is not None else Outcome.ENROLLED
        return self._result(outcome, installed, hook, host)

    def _remember_pending(
        self,
        host: _HostStateFile,
        operation: str,
        target: Slot,
        key: ec.EllipticCurvePublicKey | None,
        pending: EnrollmentPending,
    ) -> None:
        """Store when to try again, so the next run neither asks early nor rekeys in vain;
        a server's Retry-After is honoured up to renewal.retry_cap_s."""
        now = self._clock()
        previous = host.state.pending
        remembered = host.update(
            pending=Pending(
                operation=operation,
                slot=target.index,
                public_key=_point(key).hex() if key is not None else "",
                retry_at=now
                + timedelta(seconds=min(pending.retry_after_s, self.config.renewal.retry_cap_s)),
                since=previous.since if previous is not None else now,
            )
        )
        if not remembered:
            raise EnrollmentPending(
                pending.retry_after_s,
                f"{pending} (not remembered: {host.notes[-1]}; the next run asks again)",
            ) from pending

    def _server_csrattrs(self, client: EstClient) -> CsrAttributes | None:
        """What `/csrattrs` asks, as `est.csrattrs` says to use it.

        The answer is advice to the client (RFC 7030 §4.5.2, RFC 8951 §4): in advisory mode an
        answer that cannot be used (malformed, a 4xx) is logged and the CSR goes without it;
        strict mode stops (76). An unreachable server or a refused TLS handshake stops in
        every mode: enrolling would fail the same way.
        """
        mode = self.config.est.csrattrs
        if mode is CsrAttrsMode.OFF:
            log.info('/csrattrs not asked (est.csrattrs = "off")')
            return None
        try:
            return client.csrattrs()
        except (EstResponseError, EstRejectedError) as exc:
            if mode is CsrAttrsMode.STRICT:
                raise
            log.warning(
                '/csrattrs cannot be used (%s): enrolling without it (est.csrattrs = "advisory";'
                ' "strict" stops here)',
                exc,
            )
            return None

    def _request(
        self,
        client: EstClient,
        operation: str,
        signer: Signer,
        attrs: CsrAttributes | None,
        current: x509.Certificate | None,
        *,
        values: dict[str, str] | None,
    ) -> Enrollment:
        from est_agent.csr import CsrBuilder, render_subject
        from est_agent.est.messages import challenge_password_value

        pop = self.config.est.pop
        strict = self.config.est.csrattrs is CsrAttrsMode.STRICT
        if current is not None:
            # RFC 7030 §4.2.2: Subject and SubjectAltName byte-equal to the current certificate
            base = CsrBuilder().copy_from_certificate(current)
        else:
            name, sans = render_subject(*self.config.subject.templates(), values or {})
            base = CsrBuilder().subject(name)
            if sans:
                base = base.subject_alt_names(list(sans))
        base = base.key_usage().eku_client_auth().csr_attributes(attrs, strict=strict)
        # RFC 8951 §4: a server that requires the CSR to be linked to the TLS session lists
        # challengePassword in /csrattrs; that is what est.pop = "auto" follows.
        asked = attrs is not None and attrs.challenge_password
        if not strict:
            self._warn_deviations(base, signer, asked=asked and pop is PopMode.OFF)
        sent: list[str] = []  # the binding the last CSR carried (RFC 7030 §3.5), if any

        def csr_factory(binding: ChannelBinding | None) -> bytes:
            builder = base
            sent.clear()
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
            sent.append(binding.kind)
            return builder.build(signer)

        try:
            if operation == EstOperation.SIMPLEREENROLL.value:
                return client.simplereenroll(csr_factory)
            return client.simpleenroll(csr_factory)
        except (EstRejectedError, AuthError) as exc:
            hint = pop_setting_hint(
                str(exc),
                sent[0] if sent else None,
                pop=pop,
                csrattrs=self.config.est.csrattrs,
            )
            if hint is None:
                raise
            kind = AuthError if isinstance(exc, AuthError) else EstRejectedError
            raise kind(f"{exc}; {hint}") from exc

    def _warn_deviations(self, base: CsrBuilder, signer: Signer, *, asked: bool) -> None:
        """Advisory mode: say what /csrattrs asked that this CSR does not carry, and why."""
        for deviation in base.fit(signer).deviations:
            log.warning('%s (est.csrattrs = "advisory": enrolling anyway)', deviation)
        if asked:
            log.warning(
                "the EST server asks for a challengePassword (proof of possession, RFC 7030"
                ' §3.5); sending none: est.pop = "off"'
            )

    # -- helpers -----------------------------------------------------------------------------

    def _bootstrap_identity(self, backend: CredentialBackend) -> _BootstrapIdentity:
        """The bootstrap certificate chain and a signer for its key: on the SIM (IoT SAFE key,
        certificate in an applet file or a UICC EF) or, on devices without one, PEM files;
        and the ICCID / IMEI the subject templates ask for."""
        from est_agent.backends.signer import SoftwareSigner

        boot = self.config.bootstrap
        if isinstance(boot.certificate, Path):
            data = _read_file(boot.certificate, "bootstrap.certificate")
        else:
            data = backend.read_object(boot.certificate)
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
            signer = backend.signer(boot.key, key)
        values: dict[str, str] = {}
        if self._needs("{iccid}"):
            iccid = _iccid_from_certificate(chain[0]) or backend.iccid()
            if iccid:
                values["iccid"] = iccid
        if self._needs("{imei}"):
            imei = backend.imei()
            if imei:
                values["imei"] = imei
        return _BootstrapIdentity(chain, signer, values)

    def _needs(self, placeholder: str) -> bool:
        subject = self.config.subject
        texts = [subject.common_name, subject.organization, subject.serial_number]
        texts += [*subject.san_dns, *subject.san_uri]
        return any(placeholder in t for t in texts)

    @contextlib.contextmanager
    def _client(
        self,
        backend: CredentialBackend,
        chain: Sequence[x509.Certificate] | None,
        signer: Signer | None,
    ) -> Iterator[EstClient]:
        """The EST client of this run; without `chain` and `signer` a server-only TLS client
        (the card is not touched: the anchor check of a run that is otherwise not due)."""
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
        agreement = self._key_agreement(backend) if signer is not None else None
        factory = self._client_factory or EstClient
        client = factory(
            est.url,
            trust_anchors=self._anchors(backend).trusted(self._clock()),
            label=est.label,
            client_cert_chain=list(chain) if chain is not None else None,
            signer=signer,
            key_agreement=agreement,
            basic_auth=basic,
            http_auth=est.http_auth.value,
            timeout_s=est.timeout_s,
            # one budget for the run's network work: a bootstrap's share is spent already
            run_timeout_s=max(0.0, est.run_timeout_s - self._bootstrap_spent_s),
            tls_max="1.2" if est.pop is PopMode.TLS_UNIQUE else "1.3",
            proxy=est.https_proxy(),
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

    def _key_agreement(self, backend: CredentialBackend) -> KeyAgreement | None:
        """``card.key_agreement``: the TLS 1.3 key share made on the card, else on the host."""
        from est_agent.backends.base import KeyAgreementBackend

        card = self.config.card
        if card.key_agreement is None:
            return None
        if not isinstance(backend, KeyAgreementBackend):
            raise ConfigError(
                f"card.key_agreement: {backend.description} cannot run a key agreement"
            )
        return backend.key_agreement(card.key_agreement, card.peer_public_key)

    def _trust_anchors(self, backend: CredentialBackend) -> list[x509.Certificate]:
        source = self.config.est.trust_anchor
        if source is None:
            # Fingerprint-only (RFC 7030 §4.1.1): the root this run's bootstrap established,
            # or the one an earlier run's bootstrap remembered.
            anchor = self._bootstrap_anchor or self._remembered_bootstrap_anchor()
            if anchor is None:
                # never trust an unverified peer: the run establishes the anchor first
                raise ConfigError(
                    "est.trust_anchor is empty and no anchor was bootstrapped from"
                    " est.cacerts_fingerprint yet"
                )
            return [anchor]
        if isinstance(source, Path):
            data = _read_file(source, "est.trust_anchor")
        else:
            data = backend.read_object(source)
        return _load_certificates(data, "est.trust_anchor")

    def _establish_trust_anchor(self) -> list[str]:
        """With ``est.trust_anchor = ""``: the remembered bootstrap anchor, else a bootstrap by
        ``est.cacerts_fingerprint`` (RFC 7030 §4.1.1, est/bootstrap.py) whose root is then
        remembered. Runs before the card is opened; returns notes for the run's result."""
        est = self.config.est
        if est.trust_anchor is not None or est.cacerts_fingerprint is None:
            return []
        remembered = self._remembered_bootstrap_anchor()
        if remembered is not None:
            self._bootstrap_anchor = remembered
            return []
        from est_agent.est.bootstrap import fetch_bootstrap_anchor
        from est_agent.est.client import RetryPolicy

        self._progress(
            "no TLS trust anchor yet: fetching /cacerts on a provisional connection and"
            " checking it against est.cacerts_fingerprint (RFC 7030 §4.1.1)"
        )
        cap = self.config.renewal.retry_cap_s
        defaults = RetryPolicy()
        started = time.monotonic()
        bootstrap = fetch_bootstrap_anchor(
            est.url,
            fingerprint=est.cacerts_fingerprint,
            label=est.label,
            timeout_s=est.timeout_s,
            run_timeout_s=est.run_timeout_s,
            tls_max="1.2" if est.pop is PopMode.TLS_UNIQUE else "1.3",
            proxy=est.https_proxy(),
            # renewal.retry_cap_s bounds the waits inside this run, as on the enrollment path
            retry=RetryPolicy(
                cap_s=min(defaults.cap_s, cap),
                retry_after_cap_s=min(defaults.retry_after_cap_s, cap),
            ),
            clock=self._clock,
        )
        self._bootstrap_spent_s = time.monotonic() - started
        root = bootstrap.root
        log.info(
            "bootstrap: %s (SHA-256 %s) matches est.cacerts_fingerprint and authenticates the"
            " server: it is the TLS trust anchor",
            root.subject.rfc4514_string(),
            est.cacerts_fingerprint.hex(),
        )
        self._bootstrap_anchor = root
        return self._remember_bootstrap_anchor(root)

    #: the root this run's bootstrap established (fingerprint-only configuration)
    _bootstrap_anchor: x509.Certificate | None = None
    #: seconds of ``est.run_timeout_s`` this run's bootstrap used (the enrollment gets the rest)
    _bootstrap_spent_s: float = 0.0

    def _remember_bootstrap_anchor(self, root: x509.Certificate) -> list[str]:
        """Keep the bootstrapped root for later runs: the current anchor of the trust-anchor
        store (A/B copies, workflow/anchors.py). When it cannot be written, the run goes on
        with it and says so: the next run bootstraps again."""
        try:
            AnchorStore(self.config.paths.state_dir).adopt(root)
        except StoreError as exc:
            note = (
                f"{exc}: the bootstrapped trust anchor is not remembered (the next run"
                " bootstraps again)"
            )
            log.warning("%s", note)
            return [note]
        return []

    def _remembered_bootstrap_anchor(self) -> x509.Certificate | None:
        """The current anchor an earlier bootstrap (or a CA rollover after it) stored, when it
        may still be used with ``est.cacerts_fingerprint``: the pinned root itself, or a root
        taken from a verified rollover (its links carried the pin's trust on, RFC 7030
        §4.1.3). None (bootstrap again) when the store holds nothing usable: empty, damaged
        (with a pin the bootstrap can be repeated safely), or another fingerprint is
        configured now."""
        held = AnchorStore(self.config.paths.state_dir).load(())
        if held.state is StoreState.DAMAGED:
            log.warning("the trust-anchor store is damaged: bootstrapping the trust anchor again")
            return None
        pin = self.config.est.cacerts_fingerprint
        for anchor in held.current:
            if anchor.source is Source.ROLLOVER or sha256_fingerprint(anchor.certificate) == pin:
                return anchor.certificate
        if held.current:
            log.warning(
                "the stored trust anchor is not the root est.cacerts_fingerprint names:"
                " bootstrapping again"
            )
        return None

    # -- trust anchors (workflow/anchors.py) -------------------------------------------------

    def _load_anchors(self, backend: CredentialBackend) -> AnchorSet:
        """The held anchors: the store in paths.state_dir over the configured est.trust_anchor
        (the initial anchor and the fallback)."""
        configured = (
            self._trust_anchors(backend) if self.config.est.trust_anchor is not None else []
        )
        store = AnchorStore(self.config.paths.state_dir)
        held = store.load(configured)
        if not held.current:
            # nothing configured, nothing stored: `_trust_anchors`' answer (the root this
            # run's fingerprint bootstrap matched when the store could not keep it; else its
            # ConfigError)
            held = store.load(self._trust_anchors(backend))
        if held.state is StoreState.DAMAGED:
            log.warning(
                "the trust-anchor store is damaged (%s): trusting the configured anchor only",
                "; ".join(f"{c.name}: {c.state.value} {c.reason}".strip() for c in held.copies),
            )
        return held

    def _anchors(self, backend: CredentialBackend) -> AnchorSet:
        """This run's anchors, loaded once; the next anchor takes over here, without any
        request, when the current one has expired (RFC 7030 §4.1.3)."""
        if self._held is None:
            held = self._load_anchors(backend)
            self._held = held
            self._apply_rollover(decide_rollover(held, None, self._clock()))
            self._note_check()
        assert self._held is not None
        return self._held

    def _note_check(self) -> None:
        """Tell `run`'s fast path when it must next give way (workflow/anchorcheck.py)."""
        held = self._held
        assert held is not None
        state_dir = self.config.paths.state_dir
        if held.state is StoreState.DAMAGED:
            forget_check(state_dir)  # the fast path gives way: the full run reports it
            return
        write_check(state_dir, next_check_at(held), self.config.est.trust_anchor)

    def _roll_anchors(self, certificates: Sequence[x509.Certificate]) -> None:
        """Follow a CA rollover in one /cacerts answer (`decide_rollover`); refused: 76."""
        held = self._held
        if held is None:
            return  # a client from elsewhere (tests' factories): no anchors loaded
        decision = decide_rollover(held, certificates, self._clock())
        log.info(
            "/cacerts: %s: %s (%s)",
            "+".join(decision.roles),
            decision.step.value,
            decision.reason,
        )
        decision.raise_if_refused()
        self._apply_rollover(decision)

    def _apply_rollover(self, decision: Rollover) -> None:
        held = self._held
        assert held is not None
        if decision.stored is None:
            return
        if decision.step is Step.SWITCH:
            self._progress(f"CA rollover: switching the trust anchor ({decision.reason})")
        else:
            self._progress(decision.reason)
        # The fast path's note goes first: a power cut after the store write must not leave a
        # note computed from the previous anchors.
        forget_check(self.config.paths.state_dir)
        try:
            self._held = AnchorStore(self.config.paths.state_dir).save(held, decision.stored)
        except StoreError as exc:
            # Like the host state: the run goes on with what it verified (the overlap's trust
            # holds in memory); the next run decides again from the same facts and stores it.
            note = f"{exc} (the CA rollover step is retried by the next run)"
            log.warning("%s", note)
            self._anchor_notes.append(note[:600])
            self._held = held.with_stored(decision.stored)
            return  # no fast-path note: the next run looks again
        self._note_check()

    def _rolled_over_to(self, roots: Sequence[x509.Certificate]) -> bool:
        """Whether /cacerts holds a root this device took from a verified rollover: the
        fingerprint pin named the root before it; the link certificates carried the trust on
        (RFC 7030 §4.1.3), so the pin no longer decides."""
        held = self._held
        if held is None:
            return False
        rolled = [a for a in (*held.current, held.next) if a is not None]
        return any(
            a.source is Source.ROLLOVER and a.same_key(root) for a in rolled for root in roots
        )

    def _check_anchors(self, backend: CredentialBackend, result: Result) -> Result:
        """A run that is not due makes no request, except /cacerts (server-only TLS, no card)
        when an anchor nears its end or a next anchor is held (anchors.ANCHOR_CHECK_MARGIN).
        A server that cannot be asked is a note on the result; a refused /cacerts is 76."""
        try:
            held = self._anchors(backend)
        except EstAgentError as exc:
            log.warning("trust anchors: %s", exc)
            return replace(result, notes=(*result.notes, f"trust anchors: {exc}"))
        if not needs_cacerts_check(held, self._clock()):
            return self._with_anchor_notes(result)
        self._progress("checking /cacerts for a CA rollover (the trust anchor nears its end)")
        try:
            with self._client(backend, None, None) as client:
                certificates = client.cacerts().certificates
        except EstAgentError as exc:
            note = f"CA rollover check failed (retried by the next run): {exc}"
            log.warning("%s", note)
            return replace(result, notes=(*result.notes, note[:600]))
        self._roll_anchors(certificates)
        return self._with_anchor_notes(result)

    def _with_anchor_notes(self, result: Result) -> Result:
        new = [n for n in self._anchor_notes if n not in result.notes]
        return replace(result, notes=(*result.notes, *new)) if new else result

    def _check_fingerprint(self, anchor: x509.Certificate) -> None:
        pin = self.config.est.cacerts_fingerprint
        if not pin:
            return
        got = sha256_fingerprint(anchor)
        if got != pin:
            raise EstResponseError(
                f"the EST CA from /cacerts ({got.hex()}) does not match "
                "est.cacerts_fingerprint: refusing to enroll"
            )

    def _start_target_key(
        self, backend: CredentialBackend, target: Slot, pending: Pending | None, decision: Plan
    ) -> CardWork[ec.EllipticCurvePublicKey]:
        """``_target_key`` in a worker thread (workflow/cardwork.py), bounded by the link's
        deadline for slow commands (GENERATE KEY PAIR)."""
        transport = getattr(backend, "transport", None)
        deadline_s = float(getattr(transport, "slow_timeout_s", 60.0))
        return in_background(
            lambda: self._target_key(backend, target, pending, decision),
            name=f"key generation in slot {target.name}",
            deadline_s=deadline_s,
        )

    def _target_key(
        self, backend: CredentialBackend, target: Slot, pending: Pending | None, decision: Plan
    ) -> ec.EllipticCurvePublicKey:
        """The key for the new certificate: the pending request's key when resuming a 202
        (the server knows that key), else a fresh one generated inside the SIM."""
        if decision.resume_pending and pending is not None and pending.public_key:
            try:
                existing: ec.EllipticCurvePublicKey | None = backend.public_key(target.key)
            except TransportError:
                raise
            except CardError as exc:
                log.info("slot %s: pending request's key not readable (%s)", target.name, exc)
                existing = None
            if existing is not None and _point(existing).hex() == pending.public_key:
                self._progress(f"resuming the pending request with the key in slot {target.name}")
                return existing
        self._progress(f"generating a key in {self._device} slot {target.name}")
        return backend.generate_key(target.key)

    def _retry_wait(self, view: SlotView, host: HostState) -> datetime | None:
        """Until when a due renewal of this slot's credential waits after failed attempts
        (workflow/renewal.py ``retry_not_before``), or None."""
        retry = host.retry
        if retry is None or retry.next_at is None or view.header is None:
            return None
        if not retry.is_for(view.header.sha256.hex()):
            return None
        now = self._clock()
        if view.certificate is None or is_expired(view.certificate.not_valid_after_utc, now):
            return None  # expired: the bootstrap credential enrolls now, nothing to wait with
        return retry_not_before(
            retry.failed_at, retry.next_at, now, cap_s=self.config.renewal.retry_cap_s
        )

    def _record_failure(
        self, host: _HostStateFile, decision: Plan, active: SlotView | None, exc: EstAgentError
    ) -> None:
        """Count a failed enrollment attempt and, when it renewed a valid credential, set when
        the next may start (workflow/renewal.py ``next_attempt_at``). Without a valid credential
        every run tries: the device has no working certificate to wait with."""
        now = self._clock()
        sha256 = active.header.sha256.hex() if active is not None and active.header else ""
        previous = host.state.retry
        failures = 1 + (previous.failures if previous and previous.is_for(sha256) else 0)
        next_at = None
        if decision.action is Action.REENROLL and active is not None and active.certificate:
            next_at = next_attempt_at(
                now,
                active.certificate.not_valid_after_utc,
                failures,
                cap_s=self.config.renewal.retry_cap_s,
            )
        host.update(
            retry=Retry(
                sha256=sha256,
                failures=min(failures, 2**32 - 1),
                error=type(exc).__name__,
                exit_code=exc.exit_code,
                failed_at=now,
                next_at=next_at,
            )
        )
        if next_at is not None:
            log.warning(
                "renewal failed (%d attempt(s) in a row, %s): the next run tries again after %s"
                " (renew --force tries now)",
                failures,
                type(exc).__name__,
                next_at.isoformat(),
            )

    def _retry_later(
        self, view: SlotView, hook: HookReport | None, host: _HostStateFile
    ) -> Result:
        until = self._retry_wait(view, host.state)
        assert until is not None and host.state.retry is not None  # plan() saw it
        retry = host.state.retry
        log.info(
            "renewal due; waiting after %d failed attempt(s) (last: %s): next attempt after %s",
            retry.failures,
            retry.error,
            until.isoformat(),
        )
        return replace(
            self._result(Outcome.RETRY_LATER, view, hook, host), next_attempt_at=until
        )

    def _retry_report(self, active: SlotView | None, state: HostState) -> dict[str, Any] | None:
        retry = state.retry
        if retry is None:
            return None
        sha256 = active.header.sha256.hex() if active is not None and active.header else ""
        if not retry.is_for(sha256):
            return None  # another credential's failures: the next full run clears them
        until = self._retry_wait(active, state) if active is not None else None
        return {
            "failures": retry.failures,
            "last_error": retry.error,
            "exit_code": retry.exit_code,
            "failed_at": retry.failed_at.isoformat(),
            "next_attempt_at": until.isoformat() if until is not None else None,
        }

    def _due_at(self, cert: x509.Certificate) -> datetime:
        return renewal_due_at(
            cert.not_valid_before_utc,
            cert.not_valid_after_utc,
            threshold=self.config.renewal.threshold,
            jitter_s=self.config.renewal.jitter_s,
            serial=cert.serial_number,
        )

    @staticmethod
    def _cache_of(view: SlotView) -> ActiveCache:
        cert = view.certificate
        assert cert is not None and view.header is not None
        key = cert.public_key()
        assert isinstance(key, ec.EllipticCurvePublicKey)
        return ActiveCache(
            slot=view.slot.index,
            sequence=view.header.sequence,
            sha256=view.header.sha256.hex(),
            serial=_hexserial(cert),
            subject=cert.subject.rfc4514_string(),
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
            public_key_sha256=public_key_digest(key),
        )

    def _deploys(self) -> bool:
        paths = self.config.paths
        return paths.export_pem is not None or bool(paths.deploy_hook)

    def _adopt(self, view: SlotView, host: _HostStateFile) -> HookReport | None:
        """Remember the active credential found on the SIM, and deploy it when its PEM export
        and deploy hook have not succeeded yet: a run died after writing it, or an earlier
        deployment failed (retried by every run until it succeeds; leaf only: the chain the
        server sent is not kept on the SIM)."""
        assert view.header is not None and view.certificate is not None
        changes: dict[str, Any] = {"active": self._cache_of(view)}
        state = host.state
        if state.pending is not None and state.pending.slot == view.slot.index:
            changes["pending"] = None  # the pending request's slot now holds a valid certificate
        if state.installing is not None:
            changes["installing"] = None  # the full read judged every slot
        if state.retry is not None and not state.retry.is_for(view.header.sha256.hex()):
            changes["retry"] = None  # failures of another credential's renewal: not this one's
        host.update(**changes)
        hook = None
        deployment = state.deployment
        done = deployment is not None and deployment.succeeded and deployment.is_for(
            view.slot.index, view.header.sequence, view.header.sha256.hex()
        )
        if (
            not done
            and self._deploys()
            and not is_expired(view.certificate.not_valid_after_utc, self._clock())
        ):
            log.warning(
                "slot %s: active certificate not deployed yet: deploying it", view.slot.name
            )
            hook = self._deploy(view, (), host)
        return hook

    def _deploy(
        self, view: SlotView, chain: Sequence[x509.Certificate], host: _HostStateFile
    ) -> HookReport | None:
        """PEM export and deploy hook (certbot's deploy hook): only after a successful install,
        reported (and retried by later runs) but never undoing the installed credential."""
        if not self._deploys():
            return None  # nothing to do: skip importing hooks (subprocess, selectors, ...)
        from est_agent import hooks

        assert view.certificate is not None and view.header is not None
        paths = self.config.paths
        report = hooks.deploy_new_certificate(
            [view.certificate, *chain],
            slot=view.slot.name,
            # the key URI as the configuration writes it (card/uri.py): EST_AGENT_KEY
            key=str(view.slot.key),
            export_path=paths.export_pem,
            hook_argv=paths.deploy_hook,
        )
        previous = host.state.deployment
        sequence, sha256 = view.header.sequence, view.header.sha256.hex()
        attempts = 1
        if previous is not None and previous.is_for(view.slot.index, sequence, sha256):
            attempts = previous.attempts + 1
        error = ""
        if report.export is not None and not report.export.ok:
            error = report.export.error or "PEM export failed"
        elif report.hook is not None and not report.hook.ok:
            error = report.hook.describe()
        host.update(
            deployment=Deployment(
                slot=view.slot.index,
                sequence=sequence,
                sha256=sha256,
                succeeded=report.ok,
                attempts=attempts,
                at=self._clock(),
                error=error[:500],
            )
        )
        if not report.ok:
            note = f"deployment failed (attempt {attempts}; retried by the next run): {error}"
            host.notes.append(note[:600])
        if report.hook is None:
            return None
        hook = report.hook
        return HookReport(tuple(hook.argv), hook.exit_status, hook.timed_out, hook.error)

    def _deployment_report(self, view: SlotView, state: HostState) -> dict[str, Any] | None:
        if not self._deploys():
            return None
        assert view.header is not None
        deployment = state.deployment
        if deployment is None or not deployment.is_for(
            view.slot.index, view.header.sequence, view.header.sha256.hex()
        ):
            return {"state": "pending", "attempts": 0}
        return {
            "state": "done" if deployment.succeeded else "failed",
            "attempts": deployment.attempts,
            "at": deployment.at.isoformat(),
            "error": deployment.error or None,
        }

    def _result(
        self,
        outcome: Outcome,
        view: SlotView,
        hook: HookReport | None,
        host: _HostStateFile,
    ) -> Result:
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
            (*host.notes, *self._anchor_notes),
        )


def pop_setting_hint(
    text: str, sent: str | None, *, pop: PopMode, csrattrs: CsrAttrsMode
) -> str | None:
    """Which setting to change when the server refused a CSR over proof of possession (RFC
    7030 §3.5): `text` is its error, `sent` the binding the CSR carried (None: none). None when
    the error is not about proof of possession."""
    from est_agent.est.messages import pop_refusal

    named = pop_refusal(text)
    if named is None:
        return None
    either = 'set est.pop = "tls-unique" (TLS 1.2) or "tls-exporter" (TLS 1.3)'
    wanted = f'set est.pop = "{named}"' if named else either
    if sent is None:
        if pop is PopMode.OFF:
            return f'the server wants proof of possession and est.pop = "off": {wanted}'
        why = (
            '/csrattrs was not asked (est.csrattrs = "off")'
            if csrattrs is CsrAttrsMode.OFF
            else "the server's /csrattrs did not list challengePassword (RFC 8951 §4)"
        )
        return (
            "the server wants proof of possession but the CSR carried none"
            f' (est.pop = "{pop.value}" and {why}): {wanted}'
        )
    if named and named != sent:
        return f"the server checks {named}, the CSR carried {sent}: {wanted}"
    other = "tls-unique" if sent == "tls-exporter" else "tls-exporter"
    return (
        f'the server refused the CSR\'s {sent} binding: set est.pop = "{other}" if it binds to'
        ' that, or "off" if it does not need proof of possession'
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
    from est_agent.fileio import PEM_LIMIT_BYTES, read_bounded

    return read_bounded(path, limit_bytes=PEM_LIMIT_BYTES, what=key)


def _load_certificates(data: bytes, key: str) -> list[x509.Certificate]:
    """PEM (one or more certificates) or a single DER certificate, e.g. from a SIM file."""
    try:
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_certificates(data)
        return [x509.load_der_x509_certificate(data)]
    except ValueError as exc:
        raise InputError(f"{key}: no usable certificate ({exc})") from exc
